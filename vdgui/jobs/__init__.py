"""Long work off the GUI thread: Job (QRunnable) + JobSignals (QObject), and the JobQueue.

A job wraps a function ``fn(progress)`` where ``progress(done, total)`` is the engine's progress
callback; returning False from it cancels the operation (the engine then raises Cancelled).
Signals carry ``object`` (64-bit safe byte counts). Progress reaches the GUI at most ~10 times a
second, monotonic, always starting with 0 and ending with the total.

The queue serialises jobs that share a key (one key per chain: jobs on one chain run one after
another) and runs the others in parallel in a QThreadPool.
"""
from __future__ import annotations

import gc
import os
import threading
import time
import traceback
from typing import Any, Callable, Iterable

from PySide6.QtCore import QObject, QRunnable, QThreadPool, QTimer, Signal

from vdgui import qtfix  # noqa: F401  (before any signal is emitted)

from vdgui.vd import Cancelled, VDError

PROGRESS_INTERVAL = 0.1   # seconds between progress signals


class JobState:
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    FINAL = (DONE, FAILED, CANCELLED)


def _lower_thread_priority() -> None:
    """Pool threads run at a lower scheduling priority than the GUI thread, so a busy job does
    not delay the event loop when the machine is loaded (Linux: per-thread niceness)."""
    try:
        tid = threading.get_native_id()
        if os.getpriority(os.PRIO_PROCESS, tid) < WORKER_NICENESS:
            os.setpriority(os.PRIO_PROCESS, tid, WORKER_NICENESS)
    except (AttributeError, OSError):
        pass


WORKER_NICENESS = 10


class JobSignals(QObject):
    started = Signal(object)                   # job
    progress = Signal(object, object, object)  # job, done, total (bytes, Python ints)
    finished = Signal(object, object)          # job, result
    failed = Signal(object, object, object)    # job, message, traceback text (None: engine error)
    cancelled = Signal(object)                 # job


class Job(QRunnable):
    """One unit of long work. ``fn(progress)`` runs in a pool thread."""

    _ids = 0

    def __init__(self, title: str, fn: Callable[[Callable[[int, int], bool | None]], Any], *,
                 keys: Iterable[str] = (), paths: Iterable[str] = (), kind: str = "",
                 visible: bool = True):
        super().__init__()
        self.setAutoDelete(False)
        Job._ids += 1
        self.id = Job._ids
        self.title = title
        self.fn = fn
        self.kind = kind
        self.keys = frozenset(keys)      # serialisation keys (chain roots)
        self.paths = frozenset(paths)    # images shown busy while the job runs
        self.visible = visible
        self.signals = JobSignals()
        self.state = JobState.QUEUED
        self.done = 0
        self.total = 0
        self.result = None
        self.error: str | None = None
        self.traceback: str | None = None
        self.created = time.monotonic()
        self.started_at: float | None = None
        self.ended_at: float | None = None
        self._cancel = threading.Event()
        self._last_emit = 0.0
        self._emitted_zero = False
        self._emitted: tuple[int, int] | None = None

    # -- control --------------------------------------------------------------------------
    def cancel(self) -> None:
        """Ask the job to stop; the engine notices at its next progress call."""
        self._cancel.set()

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    @property
    def finished(self) -> bool:
        return self.state in JobState.FINAL

    @property
    def fraction(self) -> float:
        return min(self.done / self.total, 1.0) if self.total else (1.0 if self.state == JobState.DONE else 0.0)

    def elapsed(self) -> float:
        if self.started_at is None:
            return 0.0
        return (self.ended_at or time.monotonic()) - self.started_at

    def throughput(self) -> float:
        """Bytes per second so far."""
        t = self.elapsed()
        return self.done / t if t > 0.05 else 0.0

    def remaining(self) -> float | None:
        rate = self.throughput()
        if not rate or not self.total or self.finished:
            return None
        return max(self.total - self.done, 0) / rate

    # -- worker side ----------------------------------------------------------------------
    def _progress(self, done: int, total: int):
        """The engine's callback (runs in the worker thread): throttle, emit, cancel."""
        if self._cancel.is_set():
            return False
        done, total = int(done), int(total)
        if total != self.total:
            self.total = total
        done = max(done, self.done)          # monotonic
        self.done = done
        now = time.monotonic()
        if not self._emitted_zero:
            self._emitted_zero = True
            self._last_emit = now
            self._emit(0, total)
            if done == 0:
                return None
        if (total and done >= total) or now - self._last_emit >= PROGRESS_INTERVAL:
            self._last_emit = now
            self._emit(done, total)
        return False if self._cancel.is_set() else None

    def _emit(self, done: int, total: int) -> None:
        if self._emitted == (done, total):
            return
        self._emitted = (done, total)
        self.signals.progress.emit(self, done, total)

    def run(self) -> None:  # noqa: D401 - QRunnable entry point
        _lower_thread_priority()
        self.started_at = time.monotonic()
        if self._cancel.is_set():
            self.state = JobState.CANCELLED
            self.ended_at = time.monotonic()
            self.signals.cancelled.emit(self)
            return
        self.state = JobState.RUNNING
        self.signals.started.emit(self)
        try:
            result = self.fn(self._progress)
        except Cancelled:
            self.state = JobState.CANCELLED
            self.ended_at = time.monotonic()
            self.signals.cancelled.emit(self)
            return
        except VDError as exc:
            self.error = exc.message
            self.state = JobState.FAILED
            self.ended_at = time.monotonic()
            self.signals.failed.emit(self, exc.message, None)
            return
        except BaseException as exc:  # a bug: the GUI shows it with the traceback
            self.error = f"{type(exc).__name__}: {exc}"
            self.traceback = traceback.format_exc()
            self.state = JobState.FAILED
            self.ended_at = time.monotonic()
            self.signals.failed.emit(self, self.error, self.traceback)
            return
        if self._cancel.is_set() and result is None:
            # the function returned without looking at the flag again; report what it did
            pass
        total = self.total or 1
        if not self._emitted_zero:
            self._emitted_zero = True
            self._emit(0, total)
        self.total = total
        self.done = total
        self._emit(total, total)
        self.result = result
        self.state = JobState.DONE
        self.ended_at = time.monotonic()
        self.signals.finished.emit(self, result)

    def __repr__(self) -> str:
        return f"<Job {self.id} {self.title!r} {self.state}>"


class JobQueue(QObject):
    """Runs jobs in a QThreadPool; jobs sharing a key run one after another, in order."""

    jobAdded = Signal(object)
    jobChanged = Signal(object)      # state or progress changed
    jobEnded = Signal(object)        # reached a final state
    busyChanged = Signal()

    def __init__(self, parent: QObject | None = None, max_threads: int | None = None):
        super().__init__(parent)
        self.pool = QThreadPool(self)
        # Pool threads live as long as the queue: no thread exits (and tears down its Python
        # state) while the app runs.
        self.pool.setExpiryTimeout(-1)
        if max_threads:
            self.pool.setMaxThreadCount(max_threads)
        else:
            self.pool.setMaxThreadCount(max(2, self.pool.maxThreadCount()))
        self.jobs: list[Job] = []          # every job submitted (panel history)
        self._waiting: list[Job] = []
        self._running: list[Job] = []
        self._retired: list[Job] = []

    # -- submitting -----------------------------------------------------------------------
    def submit(self, job: Job) -> Job:
        s = job.signals
        s.started.connect(self._on_started)
        s.progress.connect(self._on_progress)
        s.finished.connect(self._on_end)
        s.failed.connect(self._on_end)
        s.cancelled.connect(self._on_end)
        self.jobs.append(job)
        self._waiting.append(job)
        if job.visible:
            self.jobAdded.emit(job)
        self._pump()
        self.busyChanged.emit()
        return job

    # Python's cyclic garbage collector runs in whichever thread happens to allocate; if it
    # frees a Qt wrapper (widgets and dialogs often sit in reference cycles through connected
    # lambdas) inside a pool thread, PySide has to defer the C++ deletion to the GUI thread,
    # which has crashed PySide 6.12 in testing. So while jobs run, automatic collection is off;
    # it resumes (in the GUI thread, the only one running Python then) when the pool is idle.
    _gc_holds = 0

    @classmethod
    def _hold_gc(cls) -> None:
        if cls._gc_holds == 0 and gc.isenabled():
            gc.disable()
            cls._gc_disabled_by_us = True
        cls._gc_holds += 1

    @classmethod
    def _release_gc(cls) -> None:
        cls._gc_holds = max(cls._gc_holds - 1, 0)
        if cls._gc_holds == 0 and getattr(cls, "_gc_disabled_by_us", False):
            cls._gc_disabled_by_us = False
            gc.enable()        # collection resumes on its own schedule (no full pass here)

    def _pump(self) -> None:
        blocked: set[str] = set()
        for r in self._running:
            blocked |= r.keys
        for job in list(self._waiting):
            if job.keys & blocked:
                blocked |= job.keys      # keep the order among jobs of one chain
                continue
            self._waiting.remove(job)
            self._running.append(job)
            blocked |= job.keys
            self._hold_gc()
            self.pool.start(job)

    # -- signal handlers (GUI thread) -----------------------------------------------------
    def _on_started(self, job: Job) -> None:
        self.jobChanged.emit(job)

    def _on_progress(self, job: Job, done, total) -> None:
        self.jobChanged.emit(job)

    def _on_end(self, job: Job, *args) -> None:
        if job in self._running:
            self._running.remove(job)
            QTimer.singleShot(0, self._release_gc)   # after the other receivers of this signal
        if not job.visible and job in self.jobs:
            self.jobs.remove(job)        # internal jobs leave no history…
            self._retire(job)
        self.jobChanged.emit(job)
        self.jobEnded.emit(job)
        self._pump()
        self.busyChanged.emit()

    # -- control --------------------------------------------------------------------------
    def cancel(self, job: Job) -> None:
        job.cancel()
        if job in self._waiting:
            self._waiting.remove(job)
            job.state = JobState.CANCELLED
            job.ended_at = time.monotonic()
            job.signals.cancelled.emit(job)

    def cancel_all(self) -> None:
        for job in list(self._waiting) + list(self._running):
            self.cancel(job)

    def wait(self, msecs: int = -1) -> bool:
        """Block until every running job has returned (used when closing)."""
        done = self.pool.waitForDone(msecs)
        for job in list(self._running):
            if job.finished:                     # its end signal may never be delivered now
                self._running.remove(job)
                self._release_gc()
        return done

    def active(self) -> list[Job]:
        return [j for j in self._running + self._waiting if not j.finished]

    def visible_active(self) -> list[Job]:
        return [j for j in self.active() if j.visible]

    def busy_paths(self) -> set[str]:
        out: set[str] = set()
        for j in self.active():
            out |= j.paths
        return out

    def clear_finished(self) -> None:
        for j in self.jobs:
            if j.finished:
                self._retire(j)
        self.jobs = [j for j in self.jobs if not j.finished]

    def _retire(self, job: Job) -> None:
        """Drop a finished job, but keep a reference for a while: its signal arrives while the
        pool thread is still returning from run(), and the QRunnable must outlive that."""
        now = time.monotonic()
        self._retired = [j for j in self._retired if j.ended_at is None or now - j.ended_at < 10.0]
        self._retired.append(job)


__all__ = ["Job", "JobSignals", "JobQueue", "JobState", "PROGRESS_INTERVAL"]
