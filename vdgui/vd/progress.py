"""Progress reporting and cancellation for long operations.

A progress callback is ``callback(done, total)`` in bytes. Returning ``False`` (exactly) asks the
operation to stop; it then raises :class:`~vdgui.vd.errors.Cancelled` after cleaning up.
Every operation reports 0 first and ``total`` last, monotonically.

``total`` is the work the operation will actually do: the allocated bytes it moves or reads,
never the virtual size of mostly empty images (a time-left estimate is made from it). An
operation that walks positions reports them through a :class:`WorkMap` (``Progress.at``).
An operation that passes over the data several times (copy, compact, verify) counts every pass;
its job is marked ``passes`` (jobs/tasks.py) and the job line says "work", not data.
"""
from __future__ import annotations

import time
from array import array
from bisect import bisect_right
from collections.abc import Callable, Iterable

from .errors import Cancelled

ProgressCallback = Callable[[int, int], bool | None]


class WorkMap:
    """Positions of a walk -> work done: the bytes of the given ranges below a position.
    ``ranges``: (start, end) in increasing order, not overlapping (touching ones are joined)."""

    def __init__(self, ranges: Iterable[tuple[int, int]] = ()):
        self._starts = array("q")
        self._ends = array("q")
        self._before = array("q")      # work in the ranges before each one
        self.total = 0
        for s, e in ranges:
            self.add(s, e)

    def add(self, start: int, end: int) -> None:
        if end <= start:
            return
        if self._ends and start < self._ends[-1]:
            raise ValueError("WorkMap ranges must come in increasing order")
        if self._ends and start == self._ends[-1]:
            self._ends[-1] = end
        else:
            self._starts.append(start)
            self._ends.append(end)
            self._before.append(self.total)
        self.total += end - start

    def at(self, pos: int) -> int:
        """Work in the ranges below ``pos``."""
        i = bisect_right(self._starts, pos) - 1
        if i < 0:
            return 0
        return self._before[i] + min(pos, self._ends[i]) - self._starts[i]


INTERVAL = 0.05     # seconds between reports (tests set 0: every step reported)


class Progress:
    """Wraps a callback: monotonic, throttled (~20/s) but always reports start and end.
    With ``work``, the total is the map's work and :meth:`at` reports walk positions."""

    def __init__(self, callback: ProgressCallback | None, total: int = 0,
                 interval: float | None = None, *, work: WorkMap | None = None):
        self.callback = callback
        self.work = work
        self.total = max(int(work.total if work is not None else total), 0)
        self.done = 0
        self.interval = INTERVAL if interval is None else interval
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

    def at(self, pos: int) -> None:
        """The walk reached position ``pos``: the work below it is done."""
        self.set(self.work.at(pos) if self.work is not None else pos)

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
