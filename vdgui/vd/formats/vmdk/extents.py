"""VMDK extents that need no tables (ZERO, FLAT/VMFS), the base class every extent shares,
and the small helpers of the table code (little-endian u32 tables)."""
from __future__ import annotations

import array

from ...align import align_up
from ...errors import ReadOnlyImage
from ...fileio import ImageFile
from ...image import Alloc, FillFn, Image
from ...runs import RunList
from ...tables import table_from_bytes, table_to_bytes
from .descriptor import ExtentLine
from .layout import SECTOR


def u32_array(data: bytes) -> array.array:
    """A grain directory or table (little-endian u32 entries) from its bytes."""
    return table_from_bytes(data, "I", big_endian=False)


def u32_bytes(a: array.array) -> bytes:
    return table_to_bytes(a, big_endian=False)


# -- extents -----------------------------------------------------------------------------------
class Extent:
    """One extent: ``length`` bytes of the virtual disk starting at ``vstart``."""
    kind = "?"
    writable = False

    def __init__(self, line: ExtentLine, vstart: int, path: str | None):
        self.line = line
        self.vstart = vstart
        self.length = line.sectors * SECTOR
        self.path = path

    def block_status(self, off: int, n: int) -> list[tuple[int, int, Alloc]]:
        return [(off, n, Alloc.DATA)]

    def read(self, off: int, n: int) -> bytes:
        return bytes(n)

    def write(self, off: int, data: bytes | memoryview, fill: FillFn, image: Image) -> None:
        raise ReadOnlyImage(f"{image.location}: extent {self.line.filename or self.kind!r} "
                            f"({self.kind}) cannot be written")

    def flush(self) -> None:
        pass


class ZeroExtent(Extent):
    kind = "ZERO"

    def block_status(self, off: int, n: int) -> list[tuple[int, int, Alloc]]:
        return [(off, n, Alloc.ZERO)]


class FlatExtent(Extent):
    kind = "FLAT"
    path: str

    def __init__(self, line: ExtentLine, vstart: int, path: str, f: ImageFile, writable: bool):
        super().__init__(line, vstart, path)
        self.f = f
        self.base = line.offset * SECTOR
        self.writable = writable

    def block_status(self, off: int, n: int) -> list[tuple[int, int, Alloc]]:
        start, end = self.base + off, self.base + off + n
        raw = self.f.data_runs(start, n)          # SEEK_DATA/SEEK_HOLE; None: cannot tell
        if raw is None:
            return [(off, n, Alloc.DATA)]
        runs = [(a, b - a, Alloc.DATA if d else Alloc.UNALLOCATED) for a, b, d in raw]
        out: RunList[Alloc] = RunList()
        for s, ln, st in runs:
            if st == Alloc.UNALLOCATED:    # partial sectors count as data
                a = align_up(s - self.base, SECTOR) + self.base
                b = (s + ln - self.base) // SECTOR * SECTOR + self.base if s + ln < end else s + ln
                if b <= a:
                    st = Alloc.DATA
                elif a > s or b < s + ln:
                    pieces = [(s, a - s, Alloc.DATA), (a, b - a, Alloc.UNALLOCATED),
                              (b, s + ln - b, Alloc.DATA)]
                    for p in pieces:
                        out.add(p[0] - self.base, p[1], p[2])
                    continue
            out.add(s - self.base, ln, st)
        return out.runs

    def read(self, off: int, n: int) -> bytes:
        data = self.f.pread(self.base + off, n)
        if len(data) < n:
            data += bytes(n - len(data))
        return data

    def write(self, off: int, data: bytes | memoryview, fill: FillFn, image: Image) -> None:
        if not self.writable:
            super().write(off, data, fill, image)
        self.f.pwrite(self.base + off, data)

    def flush(self) -> None:
        if self.writable:
            self.f.sync()


def zero_part(parts: list, cnt: int) -> None:
    """Add ``cnt`` bytes that read as zeroes to a read's parts (merged with a zero part before)."""
    if parts and parts[-1][0] == 0:
        parts[-1][2] += cnt
    else:
        parts.append([0, None, cnt])

