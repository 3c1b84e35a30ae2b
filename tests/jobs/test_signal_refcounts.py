"""Emitting signals must not eat references to True (PySide6 6.12 on Python 3.11 does; vdgui
hands them back, see vdgui/qtfix.py). Without the fix a few hundred emits abort the process."""
from __future__ import annotations

import gc
import sys

import pytest
from PySide6.QtCore import QObject, Signal

from vdgui.jobs import Job, JobQueue

pytestmark = pytest.mark.gui

N = 200


class _Emitter(QObject):
    bare = Signal()
    value = Signal(object)
    flag = Signal(bool)


def _true_refs() -> int:
    gc.collect()
    return sys.getrefcount(True)


@pytest.mark.parametrize("which", ["bare", "value", "flag"])
def test_emit_keeps_true_alive(qapp, which):
    e = _Emitter()
    received = []
    getattr(e, which).connect(lambda *a: received.append(a))
    args = {"bare": (), "value": (True,), "flag": (True,)}[which]
    before = _true_refs()
    for _ in range(N):
        getattr(e, which).emit(*args)
    assert len(received) == N
    received.clear()
    lost = before - _true_refs()
    assert lost <= 16, f"{lost} references to True lost over {N} emits"


def test_job_queue_runs_keep_true_alive(qtbot):
    q = JobQueue()
    before = _true_refs()
    for _ in range(50):
        job = q.submit(Job("t", lambda progress: (progress(1, 2), progress(2, 2), True)[-1]))
        qtbot.waitUntil(lambda: job.finished, timeout=5000)
    q.wait()
    qtbot.wait(10)
    q.clear_finished()
    lost = before - _true_refs()
    assert lost <= 16, f"{lost} references to True lost over 50 jobs"
