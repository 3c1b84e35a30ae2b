"""Long work off the GUI thread: Job + JobSignals (QObject), and the JobQueue (a QThreadPool).

A job wraps a function ``fn(progress)`` where ``progress(done, total)`` is the engine's progress
callback; returning False from it cancels the operation (the engine then raises Cancelled).
Signals carry ``object`` (64-bit safe byte counts). Progress reaches the GUI at most ~10 times a
second, monotonic, always starting with 0 and ending with the total.

Threads and ownership (the model is superqt's thread worker: a runnable plus QObject signals,
cooperative cancel):

- The worker only *reports*: it runs ``fn`` and emits started / progress / finished | failed |
  cancelled. Everything the GUI reads on a job (state, done, total, result, error, times) is
  changed on the GUI thread, by the job's own receiver, which is connected first and so runs
  before any other receiver of the same signal.
- The queue owns every job it was given, in ``JobQueue.live``, from ``submit`` until the worker
  has let go of it: the worker's last act, after its final signal and after dropping its own
  reference, is a ``released(id)`` notice, delivered on the GUI thread after that final signal.
  So the last reference to a job (and to its QObject) is dropped on the GUI thread, never in a
  pool thread, with no timer. A job cancelled before it ran leaves ``live`` when its
  ``cancelled`` signal has been delivered.
- While workers run Python, the cyclic garbage collector runs on the GUI thread only
  (``_Workers``): a collection in a pool thread would destroy any Qt object it frees there;
  and the interpreter's switch interval is 1 ms, so the GUI thread never waits long for the
  GIL (the event loop never stalls > 50 ms during a job: bench/gui_stall.py).

Passphrases (issue #17): a queue given a ``passphrases`` factory (the app's, in
vdgui/gui/passphrases.py) runs each job's function within the provider it makes for the job
(``vd.using_passphrases``), so an encrypted image opened by the job asks through it; the provider
is closed (its secrets wiped) when the function returns. ``Job.asks`` False: the job never
prompts (background reads); ``Job.new_passphrase``: what the job encrypts with.

The queue serialises jobs that share a key (one key per chain: jobs on one chain run one after
another) and runs the others in parallel in a QThreadPool.
"""
from __future__ import annotations

import functools
import gc
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from typing import Any

from PySide6.QtCore import QCoreApplication, QEvent, QObject, QThreadPool, QTimer, Signal, Slot

from vdgui import qtfix  # noqa: F401  (before any signal is emitted)
from vdgui.vd import Cancelled, PassphraseProvider, VDError, using_passphrases

PROGRESS_INTERVAL = 0.1   # seconds between progress signals
# Two workers busy in Python hand the GIL to each other and the GUI thread waits 60-100 ms for
# it (bench/gui_scale.py, progress case). While workers run, the GUI thread marks the time every
# GUI_BEAT_MS; a worker that finds the mark older than STARVED_S at a progress call sleeps
# YIELD_S (at most once per STARVED_S), so the GUI thread gets the GIL.
GUI_BEAT_MS = 10
STARVED_S = 0.02
YIELD_S = 0.001
_gui_beat = [0.0]          # time.monotonic() of the GUI thread's last mark


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
    """A job's signals. Created with the job, on the GUI thread; emitted from the pool thread.
    Its own receivers (connected here, so before any other) record each report on the job."""

    started = Signal(object)                   # job
    progress = Signal(object, object, object)  # job, done, total (bytes, Python ints)
    finished = Signal(object, object)          # job, result
    failed = Signal(object, object, object)    # job, message, traceback text (None: engine error)
    cancelled = Signal(object)                 # job

    def __init__(self):
        super().__init__()
        self.started.connect(self._record_started)
        self.progress.connect(self._record_progress)
        self.finished.connect(self._record_finished)
        self.failed.connect(self._record_failed)
        self.cancelled.connect(self._record_cancelled)

    # Each receives the job as the signal's first argument: no reference back to the job here,
    # so a job and its signals form no cycle (nothing waits for the cyclic collector).
    @Slot(object)
    def _record_started(self, job) -> None:
        job._on_started()

    @Slot(object, object, object)
    def _record_progress(self, job, done, total) -> None:
        job._on_progress(done, total)

    @Slot(object, object)
    def _record_finished(self, job, result) -> None:
        job._on_finished(result)

    @Slot(object, object, object)
    def _record_failed(self, job, message, tb) -> None:
        job._on_failed(message, tb)

    @Slot(object)
    def _record_cancelled(self, job) -> None:
        job._on_cancelled()


class _Workers(QObject):
    """The GUI-thread side of the pool threads, one for the process, created on the GUI thread
    and never deleted (so a worker may hold it, unlike a queue or a job, without the risk of
    dropping the last reference to a QObject in a pool thread). It does two things:

    - carries the workers' "I no longer hold job N" notices to the GUI thread (``released``);
    - while any worker runs Python, runs the cyclic garbage collector itself, on the GUI thread,
      with automatic collection off. Python collects in whichever thread happens to allocate,
      and a collection in a pool thread destroys the Qt objects it frees right there: measured,
      200 of 200 widgets left in reference cycles were destroyed in the worker thread (PySide6
      6.11.3 and 6.12.0), where Qt forbids it. This is about every Qt object, not about jobs,
      whose lifetime is explicit (JobQueue.live).
    """

    released = Signal(object)                  # job id
    COLLECT_EVERY_MS = 200
    # While workers run, a thread asking for the GIL gets it after at most this long (Python's
    # default is 5 ms per holder): with a job and its reader threads all busy in Python, the
    # GUI thread waited several 5 ms turns; bench/gui_stall.py measured stalls up to 66 ms.
    SWITCH_INTERVAL = 0.001

    def __init__(self):
        super().__init__()
        self._running = 0                      # workers between pool.start and 'released'
        self._collection_off = False           # automatic collection turned off by us
        self._switch_interval: float | None = None   # Python's, while ours is set
        self._timer = QTimer(self)
        self._timer.setInterval(self.COLLECT_EVERY_MS)
        self._timer.timeout.connect(self.collect)
        self._beat = QTimer(self)
        self._beat.setInterval(GUI_BEAT_MS)
        self._beat.timeout.connect(self.beat)
        self.released.connect(self._worker_released)     # first receiver: once per worker

    @Slot()
    def beat(self) -> None:
        _gui_beat[0] = time.monotonic()

    def worker_started(self) -> None:
        self._running += 1
        if self._running == 1:
            self.beat()
            self._beat.start()
        if self._running == 1 and self._switch_interval is None:
            self._switch_interval = sys.getswitchinterval()
            sys.setswitchinterval(min(self._switch_interval, self.SWITCH_INTERVAL))
        if self._running == 1 and gc.isenabled():
            gc.disable()
            self._collection_off = True
            self._timer.start()

    @Slot(object)
    def _worker_released(self, _job_id=None) -> None:
        self._running = max(self._running - 1, 0)
        if self._running == 0:
            self._beat.stop()
        if self._running == 0 and self._switch_interval is not None:
            sys.setswitchinterval(self._switch_interval)
            self._switch_interval = None
        if self._running == 0 and self._collection_off:
            self._timer.stop()
            self._collection_off = False
            gc.enable()

    @Slot()
    def collect(self) -> None:
        """What automatic collection would have done by now, here on the GUI thread."""
        thresholds, counts = gc.get_threshold(), gc.get_count()
        generation = -1
        for g in range(3):
            if counts[g] > thresholds[g]:
                generation = g
            else:
                break
        if generation >= 0:
            gc.collect(generation)


_workers: _Workers | None = None


def _the_workers() -> _Workers:
    global _workers
    if _workers is None:
        _workers = _Workers()
    return _workers


def _work(box: list, workers: _Workers) -> None:
    """What a pool thread runs for one job. ``box`` holds the job; taking it out leaves this
    frame the worker's only reference, dropped before the ``released`` notice."""
    job = box.pop()
    job_id = job.id
    try:
        job._execute()
    finally:
        del job
        workers.released.emit(job_id)


class Job:
    """One unit of long work. ``fn(progress)`` runs in a pool thread; everything else about the
    job (its attributes, its signals' receivers) lives on the GUI thread."""

    _ids = 0

    def __init__(self, title: str, fn: Callable[[Callable[[int, int], bool | None]], Any], *,
                 keys: Iterable[str] = (), paths: Iterable[str] = (), kind: str = "",
                 visible: bool = True, passes: bool = False, asks: bool = True,
                 rate: bool = True):
        Job._ids += 1
        self.id = Job._ids
        self.title = title
        self.fn = fn
        self.kind = kind
        self.keys = frozenset(keys)      # serialisation keys (chain roots)
        self.paths = frozenset(paths)    # images shown busy while the job runs
        self.visible = visible
        # the progress counts every pass over the data (copy, work, verify): it is work, not data
        self.passes = passes
        # the progress counts bytes read or written, so bytes per second mean something (not a
        # dynamic create's virtual size, nor a count of files)
        self.rate = rate and not passes
        self.asks = asks                 # may prompt for a passphrase
        self.new_passphrase = None       # vd.Passphrase the job encrypts with (wiped after)
        self._passphrases: Callable[[Job], Any] | None = None   # the queue's factory
        self.signals = JobSignals()
        # GUI-thread view of the job, changed only by the receivers of its signals
        self.state = JobState.QUEUED
        self.done = 0
        self.total = 0
        self.result = None
        self.error: str | None = None
        self.traceback: str | None = None
        self.created = time.monotonic()
        self.started_at: float | None = None
        self.ended_at: float | None = None
        # worker side (only the pool thread touches these)
        self._cancel = threading.Event()
        self._w_done = 0
        self._w_total = 0
        self._last_emit = 0.0
        self._last_yield = 0.0
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
        if self.total:
            return min(self.done / self.total, 1.0)
        return 1.0 if self.state == JobState.DONE else 0.0

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

    # -- GUI thread: what the signals report ----------------------------------------------
    def _on_started(self) -> None:
        if self.state == JobState.QUEUED:
            self.state = JobState.RUNNING
            self.started_at = time.monotonic()

    def _on_progress(self, done, total) -> None:
        if self.finished:
            return
        self.total = total
        self.done = max(done, self.done)

    def _end(self, state: str) -> None:
        now = time.monotonic()
        if self.started_at is None:
            self.started_at = now
        self.ended_at = now
        self.state = state

    def _on_finished(self, result) -> None:
        self.result = result
        self.done = self.total  # the worker reported (total, total) just before
        self._end(JobState.DONE)

    def _on_failed(self, message, tb) -> None:
        self.error = message
        self.traceback = tb
        self._end(JobState.FAILED)

    def _on_cancelled(self) -> None:
        if not self.finished:
            self._end(JobState.CANCELLED)

    # -- worker side ----------------------------------------------------------------------
    def _progress(self, done: int, total: int):
        """The engine's callback (runs in the worker thread): throttle, emit, cancel."""
        if self._cancel.is_set():
            return False
        done, total = int(done), int(total)
        self._w_total = total
        done = max(done, self._w_done)  # monotonic
        self._w_done = done
        now = time.monotonic()
        if now - _gui_beat[0] > STARVED_S and now - self._last_yield > STARVED_S:
            self._last_yield = now
            time.sleep(YIELD_S)                # the GUI thread has not run lately: let it
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

    def _execute(self) -> None:
        """Run ``fn`` in this (pool) thread and report how it ended. Changes nothing the GUI
        reads: the receivers of the signals do that, on the GUI thread."""
        _lower_thread_priority()
        if self._cancel.is_set():
            self.signals.cancelled.emit(self)
            return
        self.signals.started.emit(self)
        provider = None
        try:
            if self._passphrases is not None:
                provider = self._passphrases(self)
            elif self.new_passphrase is not None:
                provider = PassphraseProvider(new=self.new_passphrase)
            with using_passphrases(provider):
                result = self.fn(self._progress)
        except Cancelled:
            self.signals.cancelled.emit(self)
            return
        except VDError as exc:
            self.signals.failed.emit(self, exc.message, None)
            return
        except BaseException as exc:  # a bug: the GUI shows it with the traceback
            self.signals.failed.emit(self, f"{type(exc).__name__}: {exc}", traceback.format_exc())
            return
        finally:
            if provider is not None:
                provider.close()
            if self.new_passphrase is not None:
                self.new_passphrase.wipe()
        total = self._w_total or 1
        if not self._emitted_zero:
            self._emitted_zero = True
            self._emit(0, total)
        self._w_total = self._w_done = total
        self._emit(total, total)
        self.signals.finished.emit(self, result)

    def __repr__(self) -> str:
        return f"<Job {self.id} {self.title!r} {self.state}>"


class JobQueue(QObject):
    """Runs jobs in a QThreadPool; jobs sharing a key run one after another, in order.

    ``live`` maps a job's id to the job from ``submit`` until no pool thread holds it any more
    (see the module's docstring): the queue is what keeps a job alive while it runs."""

    jobAdded = Signal(object)
    jobChanged = Signal(object)  # state or progress changed
    jobEnded = Signal(object)  # reached a final state
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
        self.jobs: list[Job] = []  # every visible job submitted (panel history)
        self.live: dict[int, Job] = {}  # owned: submitted and not yet released by its worker
        self._waiting: list[Job] = []
        self._running: list[Job] = []
        self._workers = _the_workers()
        self._workers.released.connect(self._on_released)
        # job -> vd.PassphraseProvider for it (called in the pool thread); None: no prompts
        self.passphrases: Callable[[Job], Any] | None = None

    # -- submitting -----------------------------------------------------------------------
    def submit(self, job: Job) -> Job:
        job._passphrases = self.passphrases
        s = job.signals
        s.started.connect(self._on_started)
        s.progress.connect(self._on_progress)
        s.finished.connect(self._on_end)
        s.failed.connect(self._on_end)
        s.cancelled.connect(self._on_end)
        self.live[job.id] = job
        if job.visible:
            self.jobs.append(job)
        self._waiting.append(job)
        if job.visible:
            self.jobAdded.emit(job)
        self._pump()
        self.busyChanged.emit()
        return job

    def _pump(self) -> None:
        blocked: set[str] = set()
        for r in self._running:
            blocked |= r.keys
        for job in list(self._waiting):
            if job.keys & blocked:
                blocked |= job.keys  # keep the order among jobs of one chain
                continue
            self._waiting.remove(job)
            self._running.append(job)
            blocked |= job.keys
            # the pool calls a plain function (Qt makes and deletes the runnable): the only
            # reference the pool thread gets is the one in the box
            self._workers.worker_started()
            self.pool.start(functools.partial(_work, [job], self._workers))

    # -- signal handlers (GUI thread) -----------------------------------------------------
    def _on_started(self, job: Job) -> None:
        self.jobChanged.emit(job)

    def _on_progress(self, job: Job, done, total) -> None:
        self.jobChanged.emit(job)

    def _on_end(self, job: Job, *args) -> None:
        if job in self._running:
            self._running.remove(job)
        elif job in self._waiting:  # cancelled before it ran: no worker holds it
            self._waiting.remove(job)
            self.live.pop(job.id, None)
        self.jobChanged.emit(job)
        self.jobEnded.emit(job)
        self._pump()
        self.busyChanged.emit()

    def _on_released(self, job_id) -> None:
        """A pool thread has dropped its last reference to the job: the queue lets go too."""
        self.live.pop(job_id, None)

    # -- control --------------------------------------------------------------------------
    def cancel(self, job: Job) -> None:
        job.cancel()
        if job in self._waiting:
            job.signals.cancelled.emit(job)  # GUI thread: its receivers run now

    def cancel_all(self) -> None:
        for job in list(self._waiting) + list(self._running):
            self.cancel(job)

    def wait(self, msecs: int = -1) -> bool:
        """Block until every running job has returned, then deliver what the workers reported
        (the jobs' final states, the queue's end handling) so that nothing stays running."""
        done = self.pool.waitForDone(msecs)
        for job in list(self.live.values()):  # each job's own receivers first: its state
            QCoreApplication.sendPostedEvents(job.signals, QEvent.Type.MetaCall)
        QCoreApplication.sendPostedEvents(self._workers, QEvent.Type.MetaCall)
        QCoreApplication.sendPostedEvents(self, QEvent.Type.MetaCall)
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
        """Forget finished jobs (the panel's history); ones still held by a worker stay owned
        in ``live`` until it lets go."""
        self.jobs = [j for j in self.jobs if not j.finished]


__all__ = ["PROGRESS_INTERVAL", "Job", "JobQueue", "JobSignals", "JobState"]
