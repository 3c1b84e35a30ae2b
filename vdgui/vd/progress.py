"""Progress reporting and cancellation for long operations.

A progress callback is ``callback(done, total)`` in bytes. Returning ``False`` (exactly) asks the
operation to stop; it then raises :class:`~vdgui.vd.errors.Cancelled` after cleaning up.
Every operation reports 0 first and ``total`` last, monotonically.
"""
from __future__ import annotations

import time
from typing import Callable, Optional

from .errors import Cancelled

ProgressCallback = Callable[[int, int], Optional[bool]]


class Progress:
    """Wraps a callback: monotonic, throttled (~20/s) but always reports start and end."""

    def __init__(self, callback: ProgressCallback | None, total: int, interval: float = 0.05):
        self.callback = callback
        self.total = max(int(total), 0)
        self.done = 0
        self.interval = interval
        self._last = 0.0
        self._started = False

    def start(self) -> None:
        self._started = True
        self._emit(force=True)

    def _emit(self, force: bool = False) -> None:
        if self.callback is None:
            return
        now = time.monotonic()
        if not force and now - self._last < self.interval:
            return
        self._last = now
        if self.callback(self.done, self.total) is False:
            raise Cancelled()

    def advance(self, n: int) -> None:
        self.set(self.done + n)

    def set(self, done: int) -> None:
        if not self._started:
            self.start()
        done = min(max(done, self.done), self.total)
        self.done = done
        self._emit()

    def poll(self) -> None:
        """Give the callback a chance to cancel without advancing."""
        if not self._started:
            self.start()
        self._emit()

    def finish(self) -> None:
        if not self._started:
            self.start()
        self.done = self.total
        self._emit(force=True)


def sub_progress(prog: Progress, start: int, span: int) -> ProgressCallback:
    """A callback for a sub-step (a hook's own ``progress(done, total)``) that moves ``prog``
    over [start, start + span] as the sub-step goes from 0 to its total."""
    def cb(done: int, sub_total: int) -> None:
        frac = done / sub_total if sub_total else 1.0
        prog.set(start + int(span * min(max(frac, 0.0), 1.0)))
    return cb
