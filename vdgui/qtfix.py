"""Work-arounds for bugs in the installed Qt binding, applied once when vdgui imports Qt.

PySide6 6.12 (on Python < 3.12, where True is not immortal) returns ``True`` from
``SignalInstance.emit()`` without taking a reference: every emit from Python leaves True's
reference count one lower. After a few hundred emits (progress signals, model updates) the
interpreter aborts with "bool_dealloc: deallocating True or False", mid-session or at exit.
We measure whether this binding has the bug and, only if it does, hand back the missing
reference after each emit. Keeping an extra reference to True is harmless; losing one is not.
"""
from __future__ import annotations

import ctypes
import sys

from PySide6.QtCore import QObject, Signal, SignalInstance

_PROBES = 16


def emit_loses_true_reference() -> bool:
    """True when this binding's ``emit()`` drops a reference to True on every call."""
    class _Probe(QObject):
        ping = Signal()

    probe = _Probe()
    before = sys.getrefcount(True)
    for _ in range(_PROBES):
        probe.ping.emit()
    return before - sys.getrefcount(True) >= _PROBES


def _install() -> bool:
    if getattr(SignalInstance.emit, "_vdgui_fixed", False):
        return True
    if not emit_loses_true_reference():
        return False
    original = SignalInstance.emit
    incref = ctypes.pythonapi.Py_IncRef
    incref.argtypes = [ctypes.py_object]
    incref.restype = None

    def emit(self, *args):
        result = original(self, *args)
        if result is True:
            incref(True)
        return result

    emit._vdgui_fixed = True
    SignalInstance.emit = emit
    return True


EMIT_FIXED = _install()

__all__ = ["EMIT_FIXED", "emit_loses_true_reference"]
