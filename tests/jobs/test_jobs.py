"""Jobs: signals, throttled monotonic progress with 0 % and 100 %, failures, cancellation, and
the queue's per-chain ordering."""
from __future__ import annotations

import itertools
import threading
import time

import pytest

from vdgui.jobs import PROGRESS_INTERVAL, Job, JobQueue, JobState
from vdgui.vd import Cancelled, CorruptImage

pytestmark = pytest.mark.gui


def collect(job):
    seen = []
    job.signals.progress.connect(lambda j, d, t: seen.append((d, t)))
    return seen


def wait(qtbot, job, timeout=10000):
    qtbot.waitUntil(lambda: job.finished, timeout=timeout)
    qtbot.wait(10)


def test_progress_is_throttled_monotonic_and_complete(qtbot):
    total = 10 << 30                               # beyond 32 bits on purpose

    def fn(progress):
        for i in range(0, 2001):
            progress(i * total // 2000, total)
            time.sleep(0.0002)
        return "ok"
    q = JobQueue()
    job = Job("spin", fn)
    seen = collect(job)
    done = []
    job.signals.finished.connect(lambda j, r: done.append(r))
    started = time.monotonic()
    q.submit(job)
    wait(qtbot, job)
    elapsed = time.monotonic() - started
    assert done == ["ok"] and job.state == JobState.DONE
    assert seen[0] == (0, total) and seen[-1] == (total, total)
    assert all(a[0] <= b[0] for a, b in itertools.pairwise(seen))
    assert len(seen) <= elapsed / PROGRESS_INTERVAL + 3


def test_zero_and_hundred_even_without_engine_calls(qtbot):
    q = JobQueue()
    job = Job("quiet", lambda progress: 42)
    seen = collect(job)
    q.submit(job)
    wait(qtbot, job)
    assert seen[0][0] == 0 and seen[-1][0] == seen[-1][1] and job.result == 42


def test_engine_error_is_a_message(qtbot):
    def fn(progress):
        progress(0, 10)
        raise CorruptImage("bad header", path="x.vdi", field="cbBlock", expected=1, found=3)
    q = JobQueue()
    job = Job("bad", fn)
    got = []
    job.signals.failed.connect(lambda j, msg, tb: got.append((msg, tb)))
    q.submit(job)
    wait(qtbot, job)
    assert job.state == JobState.FAILED
    assert got and "cbBlock" in got[0][0] and got[0][1] is None


def test_bug_carries_traceback(qtbot):
    def fn(progress):
        return {}["missing"]
    q = JobQueue()
    job = Job("buggy", fn)
    got = []
    job.signals.failed.connect(lambda j, msg, tb: got.append((msg, tb)))
    q.submit(job)
    wait(qtbot, job)
    assert got and "KeyError" in got[0][0] and "Traceback" in got[0][1]


def test_cancel_makes_the_callback_return_false(qtbot):
    answers = []
    running = threading.Event()

    def fn(progress):
        for i in range(100000):
            r = progress(i, 100000)
            answers.append(r)
            running.set()
            if r is False:
                raise Cancelled()
            time.sleep(0.001)
        return "finished"
    q = JobQueue()
    job = Job("long", fn)
    cancelled = []
    job.signals.cancelled.connect(lambda j: cancelled.append(j))
    q.submit(job)
    assert running.wait(5)
    q.cancel(job)
    wait(qtbot, job)
    assert job.state == JobState.CANCELLED and cancelled == [job]
    assert answers[-1] is False


def test_same_chain_serialised_other_chains_parallel(qtbot):
    log = []
    lock = threading.Lock()

    def make(name, delay=0.15):
        def fn(progress):
            with lock:
                log.append(("start", name))
            time.sleep(delay)
            with lock:
                log.append(("end", name))
        return fn
    q = JobQueue(max_threads=4)
    a1 = q.submit(Job("a1", make("a1"), keys=["chainA"]))
    a2 = q.submit(Job("a2", make("a2"), keys=["chainA"]))
    b1 = q.submit(Job("b1", make("b1"), keys=["chainB"]))
    assert a2.state == JobState.QUEUED
    for j in (a1, a2, b1):
        wait(qtbot, j)
    order = [e for e in log]
    assert order.index(("end", "a1")) < order.index(("start", "a2"))
    assert order.index(("start", "b1")) < order.index(("end", "a1"))


def test_cancel_a_queued_job(qtbot):
    gate = threading.Event()
    q = JobQueue()
    first = q.submit(Job("first", lambda p: gate.wait(5), keys=["k"]))
    second = q.submit(Job("second", lambda p: "never", keys=["k"]))
    got = []
    second.signals.cancelled.connect(lambda j: got.append(j))
    q.cancel(second)
    assert second.state == JobState.CANCELLED
    gate.set()
    wait(qtbot, first)
    assert second.result is None
    assert q.busy_paths() == set()


def test_busy_paths_follow_running_jobs(qtbot):
    gate = threading.Event()
    q = JobQueue()
    job = q.submit(Job("hold", lambda p: gate.wait(5), paths=["/a/x.vdi", "/a/y.vdi"]))
    qtbot.waitUntil(lambda: job.state == JobState.RUNNING, timeout=5000)
    assert q.busy_paths() == {"/a/x.vdi", "/a/y.vdi"}
    gate.set()
    wait(qtbot, job)
    assert q.busy_paths() == set()


def test_a_worker_lets_a_starved_gui_thread_run(qapp, monkeypatch):
    """Issue #18 goal 5: busy workers handed the GIL to each other for 60-100 ms. At a progress
    call a worker sleeps briefly when the GUI thread's mark is stale, at most once per
    STARVED_S, and never while the GUI thread keeps marking."""
    import vdgui.jobs as jobs

    clock = [1000.0]
    slept = []
    monkeypatch.setattr(jobs.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(jobs.time, "sleep", slept.append)
    job = Job("spin", lambda progress: None)
    job.signals.progress.connect(lambda *a: None)
    jobs._gui_beat[0] = clock[0]                  # the GUI thread just ran
    for i in range(50):
        clock[0] += 0.001
        jobs._gui_beat[0] = clock[0]
        job._progress(i, 100)
    assert slept == []
    for i in range(50, 100):                      # the GUI thread stops marking: 50 ms
        clock[0] += 0.001
        job._progress(i, 100)
    assert slept and all(s == jobs.YIELD_S for s in slept)
    assert len(slept) <= 0.05 / jobs.STARVED_S + 1


def test_the_gui_thread_marks_while_workers_run(qtbot):
    """The mark the workers read moves while a job runs (the GUI beat timer)."""
    import vdgui.jobs as jobs

    q = JobQueue()
    gate = threading.Event()
    job = q.submit(Job("wait", lambda progress: gate.wait(5)))
    start = jobs._gui_beat[0]
    qtbot.waitUntil(lambda: jobs._gui_beat[0] > start + 0.02, timeout=3000)
    gate.set()
    qtbot.waitUntil(lambda: job.finished, timeout=5000)
    q.wait()
