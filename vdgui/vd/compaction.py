"""Compaction shared by the block-mapped formats: plan moves into holes, copy, sync, repoint.

:func:`plan_moves` decides which blocks move where: from the highest block down, each goes to
the lowest hole below it that takes it. :func:`move_blocks` carries a plan out in the one
crash-safe order (docs/operations.md, "Writes"):

1. every block is copied into its hole: holes are unreferenced, so a crash here changes
   nothing visible;
2. the file is synced: the copies are durable before anything names them;
3. ``repoint(moves)`` writes the table entries naming the new places (the old copies stay
   intact: an entry that reaches the disk and one that does not both read the same bytes);
4. sync, then ``header()`` (counts, end of data) once, then sync.

The caller truncates or reuses the space freed above afterwards.
"""
from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from .align import align_up

COPY_CHUNK = 4 << 20
K = TypeVar("K", bound=Hashable)         # a block's key: what its table entry is found by


@dataclass(slots=True)
class Move(Generic[K]):
    """Copy ``length`` bytes of the block ``key`` from ``src`` to ``dst`` (file offsets)."""
    key: K
    src: int
    dst: int
    length: int


def holes_between(used: Iterable[tuple[int, int]], start: int = 0,
                  end: int | None = None) -> list[list[int]]:
    """The free ``[a, b]`` ranges between ``start`` and ``end`` (default: the end of the last
    used range) not covered by any used ``(a, b)`` range."""
    out: list[list[int]] = []
    cur = start
    for a, b in sorted(used):
        if end is not None and a >= end:
            break
        if a > cur:
            out.append([cur, a])
        cur = max(cur, b)
    if end is not None and end > cur:
        out.append([cur, end])
    return out


def slot_holes(owner, unit: int, base: int = 0, free=None) -> list[list[int]]:
    """Holes of a file cut into fixed slots: slot ``i`` (at ``base + i * unit``) is free when
    ``owner[i] == free``; each run of free slots becomes one ``[a, b]`` byte range."""
    out: list[list[int]] = []
    run = -1
    n = len(owner)
    for i in range(n):
        if owner[i] == free:
            if run < 0:
                run = i
        elif run >= 0:
            out.append([base + run * unit, base + i * unit])
            run = -1
    if run >= 0:
        out.append([base + run * unit, base + n * unit])
    return out


def overlapping(blocks: Sequence[tuple[int, int, K]]) -> set[K]:
    """Keys of the blocks (``(offset, length, key)``) that share bytes with another one (a
    damaged table): they stay where they are."""
    out: set[K] = set()
    order = sorted(blocks, key=lambda b: b[0])
    end, last = -1, 0                        # the end reached so far, and whose it is
    for i, (off, n, key) in enumerate(order):
        if off < end:
            out.update((order[last][2], key))
        if off + n > end:
            end, last = off + n, i
    return out


def plan_moves(blocks: Sequence[tuple[int, int, K]], holes: list[list[int]],
               align: int = 1) -> list[Move[K]]:
    """Moves that close ``holes`` (``[a, b]`` free byte ranges, ascending, consumed in place)
    with the ``blocks`` (``(offset, length, key)``) lying above them: the highest block first,
    each into the lowest hole that takes it at an ``align``-ed offset ending at or below its
    own start. A block that fits nowhere stays (a lower one may still fit)."""
    moves: list[Move[K]] = []
    if not holes or not blocks:
        return moves
    smallest = min(n for _o, n, _k in blocks)
    j = 0                                    # holes before j cannot take any block
    for src, n, key in sorted(blocks, key=lambda b: b[0], reverse=True):
        while j < len(holes) and align_up(holes[j][0], align) + smallest > holes[j][1]:
            j += 1
        k = j
        while k < len(holes) and holes[k][0] < src:
            dst = align_up(holes[k][0], align)
            if dst + n <= holes[k][1] and dst + n <= src:
                moves.append(Move(key, src, dst, n))
                holes[k][0] = dst + n
                break
            k += 1
        if j >= len(holes):
            break
    return moves


def copy_range(f, src: int, dst: int, length: int, buf: bytearray | None = None) -> None:
    """Copy ``length`` bytes of ``f`` from ``src`` to ``dst`` (non-overlapping), through one
    reused buffer; bytes past the end of the file copy as zeroes."""
    if buf is None:
        buf = bytearray(min(COPY_CHUNK, length))
    mv = memoryview(buf)
    pos = 0
    while pos < length:
        k = min(len(mv), length - pos)
        got = f.preadv_into(src + pos, mv[:k])
        if got < k:
            mv[got:k] = bytes(k - got)
        f.pwrite(dst + pos, mv[:k])
        pos += k


def move_blocks(f, moves: Sequence[Move[K]], repoint: Callable[[Sequence[Move[K]]], None], *,
                header: Callable[[], None] | None = None,
                advance: Callable[[int], object] | None = None,
                copy: Callable[[Move[K]], None] | None = None) -> None:
    """Carry out ``moves`` in ``f``: copy each, sync, ``repoint(moves)``, sync, then
    ``header()`` and sync (the header is written even when nothing moved). ``advance(n)`` is
    told the bytes of each finished copy. ``copy(move)``, when given, copies instead of a byte
    copy (an encrypted block whose IV is its offset is re-encrypted on the way)."""
    if moves:
        buf = bytearray(min(COPY_CHUNK, max(m.length for m in moves)))
        for m in moves:
            if copy is not None:
                copy(m)
            else:
                copy_range(f, m.src, m.dst, m.length, buf)
            if advance is not None:
                advance(m.length)
        f.sync()
        repoint(moves)
        f.sync()
    if header is not None:
        header()
        f.sync()


def punch_blocks(f, starts: Iterable[int], length: int) -> None:
    """Give back the space of blocks of ``length`` bytes at ``starts`` (file offsets no table
    names any more, the tables synced first): adjacent blocks in one call."""
    run_a = run_b = -1
    for s in sorted(starts):
        if s == run_b:
            run_b += length
            continue
        if run_b > run_a:
            f.punch_hole(run_a, run_b - run_a)
        run_a, run_b = s, s + length
    if run_b > run_a:
        f.punch_hole(run_a, run_b - run_a)
