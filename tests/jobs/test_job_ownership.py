"""Who keeps a job alive, and on which thread its state changes.

The queue owns each job from submit until the pool thread has let go of it; the last reference
is then dropped on the GUI thread (a job holds a QObject: deleting it in a pool thread is what
crashes). No timer: the old code kept finished jobs for 10 s and hoped the pool was done.
While workers run Python, garbage cycles are collected on the GUI thread only."""
from __future__ import annotations

import gc
import threading
import weakref

import pytest

from vdgui.jobs import Job, JobQueue, JobState
from vdgui.vd import Cancelled, CorruptImage

pytestmark = pytest.mark.gui

MAIN = threading.main_thread()


class Recorded(Job):
    """A job that notes the thread of every change to what the GUI reads."""

    WATCHED = {"state", "done", "total", "result", "error", "traceback", "started_at", "ended_at"}

    def __setattr__(self, name, value):
        if name in self.WATCHED and "changes" in self.__dict__:
            self.__dict__["changes"].append((name, threading.current_thread()))
        super().__setattr__(name, value)

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.changes = []


def _released_on(job, where: list) -> weakref.ref:
    weakref.finalize(job, lambda: where.append(threading.current_thread()))
    return weakref.ref(job)


def test_running_job_is_owned_by_the_queue_and_released_on_the_gui_thread(qtbot):
    gate = threading.Event()
    q = JobQueue()
    seen, where = [], []
    job = Job("hold", lambda p: gate.wait(5) and "ok", visible=False)
    job.signals.finished.connect(lambda j, r: seen.append((j.state, j.result, j.id in q.live)))
    ref = _released_on(job, where)
    q.submit(job)
    del job
    qtbot.waitUntil(lambda: ref().state == JobState.RUNNING, timeout=5000)
    gc.collect()
    assert ref() is not None and ref().id in q.live      # nobody but the queue holds it
    gate.set()
    # alive (and still owned) when its final signal is handled, then released
    qtbot.waitUntil(lambda: bool(seen), timeout=5000)
    assert seen == [(JobState.DONE, "ok", True)]
    qtbot.waitUntil(lambda: ref() is None, timeout=3000)
    assert not q.live and where == [MAIN]


@pytest.mark.parametrize("ending", ["done", "failed", "bug", "cancelled"])
def test_every_ending_releases_the_job_on_the_gui_thread(qtbot, ending):
    def fn(progress):
        progress(0, 10)
        if ending == "failed":
            raise CorruptImage("bad header", path="x.vdi")
        if ending == "bug":
            return {}["missing"]
        if ending == "cancelled":
            raise Cancelled()
        progress(10, 10)
        return 1
    q = JobQueue()
    where = []
    jobs = [Job(f"j{i}", fn, visible=False) for i in range(20)]
    refs = [_released_on(j, where) for j in jobs]
    for j in jobs:
        q.submit(j)
    del jobs, j
    qtbot.waitUntil(lambda: all(r() is None for r in refs), timeout=10000)
    assert where == [MAIN] * 20 and not q.live


def test_visible_jobs_stay_in_the_history_until_cleared(qtbot):
    q = JobQueue()
    where = []
    job = q.submit(Job("shown", lambda p: 7))
    ref = _released_on(job, where)
    del job
    qtbot.waitUntil(lambda: not q.live, timeout=5000)
    assert ref() is not None and ref().result == 7       # the panel's history holds it
    q.clear_finished()
    assert ref() is None and where == [MAIN]


def test_a_job_cancelled_before_it_ran_is_released_at_once(qtbot):
    gate = threading.Event()
    q = JobQueue()
    first = q.submit(Job("first", lambda p: gate.wait(5), keys=["k"], visible=False))
    second = q.submit(Job("second", lambda p: "never", keys=["k"], visible=False))
    where = []
    ref = _released_on(second, where)
    q.cancel(second)
    assert second.state == JobState.CANCELLED and second.id not in q.live
    del second
    assert ref() is None and where == [MAIN]
    gate.set()
    qtbot.waitUntil(lambda: first.finished, timeout=5000)


@pytest.mark.parametrize("ending", ["done", "failed", "cancelled"])
def test_state_changes_only_on_the_gui_thread(qtbot, ending):
    running = threading.Event()

    def fn(progress):
        for i in range(5):
            progress(i, 4)
        running.set()
        if ending == "failed":
            raise CorruptImage("bad header", path="x.vdi")
        if ending == "cancelled":
            while progress(4, 4) is not False:
                pass
            raise Cancelled()
        return "r"
    q = JobQueue()
    job = Recorded("watched", fn)
    q.submit(job)
    if ending == "cancelled":
        assert running.wait(5)
        q.cancel(job)
    qtbot.waitUntil(lambda: job.finished, timeout=5000)
    qtbot.waitUntil(lambda: not q.live, timeout=5000)
    expected = {"done": JobState.DONE, "failed": JobState.FAILED,
                "cancelled": JobState.CANCELLED}[ending]
    assert job.state == expected
    assert {name for name, _ in job.changes} >= {"state", "started_at", "ended_at"}
    wrong = [(name, t.name) for name, t in job.changes if t is not MAIN]
    assert not wrong, f"changed outside the GUI thread: {wrong}"


def test_receivers_see_the_final_state_and_result(qtbot):
    q = JobQueue()
    job = Job("r", lambda p: (p(5, 10), p(10, 10), "result")[-1])
    seen = []
    job.signals.finished.connect(lambda j, r: seen.append((j.state, j.result, j.done, j.total)))
    q.submit(job)
    qtbot.waitUntil(lambda: bool(seen), timeout=5000)
    assert seen == [(JobState.DONE, "result", 10, 10)]


def test_wait_delivers_the_end_of_every_job(qtbot):
    """Closing the app waits for the pool; after wait() no job is left 'running'."""
    q = JobQueue()
    jobs = [q.submit(Job(f"w{i}", lambda p: 1)) for i in range(5)]
    assert q.wait(10000)
    assert all(j.state == JobState.DONE for j in jobs) and q.active() == []


def test_garbage_qt_objects_are_never_destroyed_in_a_pool_thread(qtbot):
    """A pool thread that allocates would run the cyclic collector itself, destroying there the
    widgets it frees; while workers run, collection happens on the GUI thread instead."""
    from PySide6.QtWidgets import QLabel, QWidget

    garbage_made = threading.Event()

    def allocate(progress):
        assert garbage_made.wait(5)
        for _ in range(300):                    # thousands of container allocations
            junk = [[i] for i in range(1000)]
        del junk
        return "ok"
    q = JobQueue()
    job = q.submit(Job("allocates", allocate, visible=False))
    where = []
    for _ in range(50):
        w = QWidget()
        w.label = QLabel("x", w)
        w.me = w                                # a reference cycle: only the collector frees it
        weakref.finalize(w, lambda: where.append(threading.current_thread()))
        del w
    garbage_made.set()
    qtbot.waitUntil(lambda: job.finished and not q.live, timeout=10000)
    assert gc.isenabled()                       # automatic collection is back once idle
    gc.collect()
    assert len(where) == 50 and set(where) == {MAIN}
