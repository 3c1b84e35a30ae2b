"""The Qt binding must not eat references to None or True.

PySide6 6.12.0 on Python 3.11 drops one reference to None on every Qt call that returns nothing
and one to True on every emit: the process aborts ("none_dealloc: deallocating None") after a
few minutes of use. The emit case is handed back by vdgui/qtfix.py; the void-call case is why
constraints.txt pins the binding. These tests check the binding actually installed."""
from __future__ import annotations

import ctypes
import gc
import sys

import pytest
from PySide6.QtCore import QObject, Signal
from PySide6.QtWidgets import QLabel

from vdgui import qtfix
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


VOID_CALLS = 40_000
BATCH = 2_000


def _give_back(obj, n: int) -> None:
    """Return ``n`` lost references, so that a failing run reports instead of aborting."""
    incref = ctypes.pythonapi.Py_IncRef
    incref.argtypes = [ctypes.py_object]
    incref.restype = None
    for _ in range(n):
        incref(obj)


def test_void_qt_calls_keep_none_alive(qapp):
    """Tens of thousands of Qt calls that return nothing leave None's reference count where it
    was (6.12.0 on Python 3.11: -1 per call, and the interpreter aborts)."""
    label = QLabel()
    calls = (lambda: label.setText("x"), lambda: label.setVisible(False),
             lambda: label.setEnabled(True), lambda: label.setToolTip("t"))
    gc.collect()
    before = sys.getrefcount(None)
    made = 0
    while made < VOID_CALLS:
        for _ in range(BATCH // len(calls)):
            for call in calls:
                call()
        made += BATCH
        lost = before - sys.getrefcount(None)
        if lost > BATCH // 2:                     # stop well before None's count reaches zero
            _give_back(None, lost)
            pytest.fail(f"{lost} references to None lost over {made} void Qt calls (the Qt "
                        "binding leaks: install the version constraints.txt names)")
    gc.collect()
    drift = sys.getrefcount(None) - before
    assert abs(drift) <= 64, f"None's reference count drifted by {drift} over {made} void Qt calls"


def test_the_binding_in_use_is_accepted():
    """The app refuses a leaking binding (qtfix.binding_problem); the installed one must pass."""
    assert qtfix.binding_problem() is None
