"""Compare what two disks read (qemu-img compare's rules): identical, or the first offset where
they differ. A size difference alone is not a difference when the larger disk reads zero past the
smaller one's end.

Only the ranges that some chain member holds are read: the allocation maps of both chains are
taken once and merged, so the cost follows the data, not the virtual size (an empty 1 TiB pair
compares in the time of two map walks). Progress counts the bytes actually read.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..disk import Disk
from ..image import Alloc
from ..progress import Progress, ProgressCallback
from ..sparse import first_nonzero

CHUNK = 4 << 20


@dataclass(frozen=True)
class CompareResult:
    identical: bool
    offset: int | None = None          # the first byte that differs, when not identical
    sizes: tuple[int, int] = (0, 0)    # virtual sizes of the two disks

    @property
    def size_mismatch(self) -> bool:
        return self.sizes[0] != self.sizes[1]


def _data_runs(d: Disk, start: int, length: int) -> list[tuple[int, int]]:
    return [(e.start, e.length) for e in d.allocation(start, length)
            if e.level is not None and e.status == Alloc.DATA]


def _union(a: list, b: list) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for s, n in sorted(a + b):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], s + n)
        else:
            out.append([s, s + n])
    return [(s, e - s) for s, e in out]


def first_difference(a: bytes, b: bytes) -> int:
    """Index of the first differing byte of two equal-length buffers that differ."""
    lo, hi = 0, min(len(a), len(b))
    while hi - lo > 64:                # halves compared with memcmp: fast on 4 MiB windows
        mid = (lo + hi) // 2
        if a[lo:mid] != b[lo:mid]:
            hi = mid
        else:
            lo = mid
    for i in range(lo, hi):
        if a[i] != b[i]:
            return i
    return hi


def compare_disks(da: Disk, db: Disk, progress: ProgressCallback | None = None) -> CompareResult:
    """Compare two opened disks (any formats, any chains)."""
    sizes = (da.size, db.size)
    common = min(sizes)
    runs = _union(_data_runs(da, 0, common), _data_runs(db, 0, common))
    big = da if da.size > db.size else db
    tail = _data_runs(big, common, big.size - common) if da.size != db.size else []
    prog = Progress(progress, max(1, sum(n for _s, n in runs) + sum(n for _s, n in tail)))
    prog.start()
    for start, length in runs:
        pos, end = start, start + length
        while pos < end:
            n = min(CHUNK, end - pos)
            x, y = da.read(pos, n), db.read(pos, n)
            if x != y:
                return CompareResult(False, pos + first_difference(x, y), sizes)
            prog.advance(n)
            pos += n
    if tail:
        bad = first_nonzero(tail, big.read, CHUNK)
        if bad is not None:
            return CompareResult(False, bad, sizes)
    prog.finish()
    return CompareResult(True, None, sizes)


def compare(a_path: str, b_path: str, *, a_format: str | None = None, b_format: str | None = None,
            progress: ProgressCallback | None = None) -> CompareResult:
    """Open both chains read-only and compare them."""
    from ..backend import OpenFlags
    with Disk.open_chain(a_path, a_format, OpenFlags.READ_ONLY) as da, \
            Disk.open_chain(b_path, b_format, OpenFlags.READ_ONLY) as db:
        return compare_disks(da, db, progress)


__all__ = ["CompareResult", "compare", "compare_disks", "first_difference"]
