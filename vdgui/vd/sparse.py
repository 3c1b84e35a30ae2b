"""Helpers shared by block-mapped (sparse) formats: zero detection, block iteration, run merging."""
from __future__ import annotations

from collections.abc import Callable, Iterator

from .alloc import Alloc
from .runs import RunList

_ZERO = bytes(4 << 20)


def is_zero(buf) -> bool:
    """True when every byte of ``buf`` is zero (memcmp speed, no per-byte Python loop)."""
    mv = memoryview(buf).cast("B")
    n = len(mv)
    pos = 0
    while pos < n:
        step = min(n - pos, len(_ZERO))
        # bytes.startswith compares with memcmp; memoryview != compares item by item (60x slower)
        if not _ZERO.startswith(mv[pos:pos + step]):
            return False
        pos += step
    return True


def zeroes(n: int) -> bytes:
    return _ZERO[:n] if n <= len(_ZERO) else bytes(n)


def split_blocks(offset: int, length: int, block_size: int) -> Iterator[tuple[int, int, int, int]]:
    """Yield (block_index, offset_in_block, absolute_offset, count) pieces of a range."""
    end = offset + length
    pos = offset
    while pos < end:
        idx, inner = divmod(pos, block_size)
        n = min(block_size - inner, end - pos)
        yield idx, inner, pos, n
        pos += n


def block_runs(offset: int, length: int, block_size: int,
               status_of: Callable[[int], Alloc]) -> list[tuple[int, int, Alloc]]:
    """Build merged (start, length, Alloc) runs for a range from a per-block status function."""
    runs: RunList[Alloc] = RunList()
    for idx, _inner, pos, n in split_blocks(offset, length, block_size):
        runs.add(pos, n, status_of(idx))
    return runs.runs


def nonzero_runs(mv, start: int, unit: int = 64 << 10) -> list[tuple[int, int]]:
    """(a, b) ranges of ``mv`` that are not all zero, in pieces of ``unit`` bytes (at most 4 MiB)
    aligned to ``start + offset`` (memcmp speed; a piece of random data fails at its first
    bytes)."""
    zero = _ZERO
    runs: list[tuple[int, int]] = []
    n = len(mv)
    pos = 0
    run = None
    while pos < n:
        step = min(unit - (start + pos) % unit, n - pos)
        if zero.startswith(mv[pos:pos + step]):
            if run is not None:
                runs.append((run, pos))
                run = None
        elif run is None:
            run = pos
        pos += step
    if run is not None:
        runs.append((run, n))
    return runs


def first_nonzero(runs, read: Callable[[int, int], bytes], chunk: int = 4 << 20) -> int | None:
    """Offset of the first non-zero byte in ``runs`` ((start, length) pairs, in order), read
    ``chunk`` bytes at a time with ``read(pos, n)``; None when they all read zero."""
    for start, length in runs:
        pos, end = start, start + length
        while pos < end:
            n = min(chunk, end - pos)
            buf = read(pos, n)
            if not is_zero(buf):
                return pos + len(buf) - len(bytes(buf).lstrip(b"\0"))
            pos += n
    return None
