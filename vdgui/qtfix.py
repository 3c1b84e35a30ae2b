"""Work-arounds for bugs in the installed Qt binding, applied once when vdgui imports Qt.

PySide6 6.12 (on Python < 3.12, where True is not immortal) returns ``True`` from
``SignalInstance.emit()`` without taking a reference: every emit from Python leaves True's
reference count one lower. After a few hundred emits (progress signals, model updates) the
interpreter aborts with "bool_dealloc: deallocating True or False", mid-session or at exit.
We measure whether this binding has the bug and, only if it does, hand back the missing
reference after each emit. Keeping an extra reference to True is harmless; losing one is not.

The same release also loses a reference to None on every Qt call that returns nothing
(``setText``, ``setVisible``...): too many methods to patch, so the fix is the pin in
constraints.txt (6.11.3 measured clean). :func:`binding_problem` names a binding that leaks, so
the app and the package build refuse it instead of aborting minutes later with "none_dealloc".
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


_Py_IncRef = ctypes.pythonapi.Py_IncRef
_Py_IncRef.argtypes = [ctypes.py_object]
_Py_IncRef.restype = None


def _incref(obj, n: int) -> None:
    for _ in range(n):
        _Py_IncRef(obj)


def void_call_loses_none_reference() -> bool:
    """True when this binding drops a reference to None on every Qt call that returns nothing.
    The references the probe loses are handed back."""
    probe = QObject()
    before = sys.getrefcount(None)
    for _ in range(_PROBES):
        probe.setObjectName("probe")
    lost = before - sys.getrefcount(None)
    if lost > 0:
        _incref(None, lost)
    return lost >= _PROBES


def binding_problem() -> str | None:
    """Why this Qt binding cannot run vdgui safely, or None when it can."""
    if not NONE_LEAKS:
        return None
    import PySide6
    return (f"PySide6 {PySide6.__version__} on Python {sys.version.split()[0]} loses a reference "
            "to None on every Qt call, and the program would abort after a few minutes "
            "('none_dealloc'). Install the Qt binding that constraints.txt names: "
            "pip install -c constraints.txt PySide6-Essentials (scripts/bootstrap does this).")


def _install() -> bool:
    if getattr(SignalInstance.emit, "_vdgui_fixed", False):
        return True
    if not emit_loses_true_reference():
        return False
    original = SignalInstance.emit

    def emit(self, *args):
        result = original(self, *args)
        if result is True:
            _incref(True, 1)
        return result

    emit._vdgui_fixed = True
    SignalInstance.emit = emit
    return True


EMIT_FIXED = _install()
NONE_LEAKS = void_call_loses_none_reference()

__all__ = ["EMIT_FIXED", "NONE_LEAKS", "binding_problem", "emit_loses_true_reference",
           "void_call_loses_none_reference"]
