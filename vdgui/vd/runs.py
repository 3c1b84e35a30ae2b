"""Run lists: ``(start, length, state)`` runs in order, adjacent runs of one state merged as
they are added (block_status answers, allocation maps)."""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Generic, TypeVar

S = TypeVar("S")


class RunList(Generic[S]):
    """Append-only list of runs; :meth:`add` merges a run into the last one when they touch and
    share their state. ``runs`` is the plain list of tuples callers return."""

    __slots__ = ("runs",)

    def __init__(self) -> None:
        self.runs: list[tuple[int, int, S]] = []

    def add(self, start: int, length: int, state: S) -> None:
        if length <= 0:
            return
        r = self.runs
        if r:
            s, n, st = r[-1]
            if st == state and s + n == start:
                r[-1] = (s, n + length, st)
                return
        r.append((start, length, state))

    def __len__(self) -> int:
        return len(self.runs)

    def __iter__(self) -> Iterator[tuple[int, int, S]]:
        return iter(self.runs)


def merge_runs(runs: Iterable[tuple[int, int, S]]) -> list[tuple[int, int, S]]:
    """``runs`` with touching runs of one state merged (and empty runs dropped)."""
    out: RunList[S] = RunList()
    for s, n, st in runs:
        out.add(s, n, st)
    return out.runs
