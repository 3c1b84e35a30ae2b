"""VMDK extents that need no tables (ZERO, FLAT/VMFS), the base class every extent shares,
and the small helpers of the table code (u32 arrays, vectored writes, run merging)."""
from __future__ import annotations

import array
import errno
import os
import sys

from ...errors import ReadOnlyImage
from ...fileio import ImageFile
from ...image import Alloc
from .descriptor import ExtentLine
from .layout import SECTOR


HOST_LE = sys.byteorder == "little"


def u32_array(data: bytes) -> array.array:
    a = array.array("I")
    a.frombytes(data)
    if not HOST_LE:
        a.byteswap()
    return a


def u32_bytes(a: array.array) -> bytes:
    if HOST_LE:
        return a.tobytes()
    b = array.array("I", a)
    b.byteswap()
    return b.tobytes()


def pwritev(f: ImageFile, offset: int, bufs: list) -> None:
    """Write several buffers at ``offset`` without joining them (falls back to pwrite)."""
    if len(bufs) == 1 or not hasattr(os, "pwritev"):
        f.pwrite(offset, b"".join(bufs) if len(bufs) > 1 else bufs[0])
        return
    total = sum(len(b) for b in bufs)
    try:
        n = os.pwritev(f.fd, bufs[:1024], offset)
    except OSError:
        n = 0
    if n < total:
        f.pwrite(offset + n, b"".join(bytes(b) for b in bufs)[n:])


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


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

    def block_status(self, off, n):
        return [(off, n, Alloc.DATA)]

    def read(self, off, n) -> bytes:
        return bytes(n)

    def write(self, off, data, fill, image) -> None:
        raise ReadOnlyImage(f"{image.location}: extent {self.line.filename or self.kind!r} "
                            f"({self.kind}) cannot be written")

    def flush(self):
        pass


class ZeroExtent(Extent):
    kind = "ZERO"

    def block_status(self, off, n):
        return [(off, n, Alloc.ZERO)]


class FlatExtent(Extent):
    kind = "FLAT"

    def __init__(self, line, vstart, path, f: ImageFile, writable: bool):
        super().__init__(line, vstart, path)
        self.f = f
        self.base = line.offset * SECTOR
        self.writable = writable

    def block_status(self, off, n):
        if self.f.is_device:
            return [(off, n, Alloc.DATA)]
        fd = self.f.fd
        start, end = self.base + off, self.base + off + n
        runs = []
        pos = start
        try:
            while pos < end:
                try:
                    data = os.lseek(fd, pos, os.SEEK_DATA)
                except OSError as exc:
                    if exc.errno != errno.ENXIO:
                        raise
                    data = end
                data = min(data, end)
                if data > pos:
                    runs.append([pos, data - pos, Alloc.UNALLOCATED])
                if data >= end:
                    break
                hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
                runs.append([data, hole - data, Alloc.DATA])
                pos = hole
        except OSError:
            return [(off, n, Alloc.DATA)]
        out: list = []
        for s, ln, st in runs:
            if st == Alloc.UNALLOCATED:    # partial sectors count as data
                a = round_up(s - self.base, SECTOR) + self.base
                b = (s + ln - self.base) // SECTOR * SECTOR + self.base if s + ln < end else s + ln
                if b <= a:
                    st = Alloc.DATA
                elif a > s or b < s + ln:
                    pieces = [(s, a - s, Alloc.DATA), (a, b - a, Alloc.UNALLOCATED),
                              (b, s + ln - b, Alloc.DATA)]
                    for p in pieces:
                        if p[1] > 0:
                            append_run(out, p[0] - self.base, p[1], p[2])
                    continue
            append_run(out, s - self.base, ln, st)
        return out

    def read(self, off, n):
        data = self.f.pread(self.base + off, n)
        if len(data) < n:
            data += bytes(n - len(data))
        return data

    def write(self, off, data, fill, image):
        if not self.writable:
            super().write(off, data, fill, image)
        self.f.pwrite(self.base + off, data)

    def flush(self):
        if self.writable:
            self.f.sync()


def zero_part(parts: list, cnt: int) -> None:
    """Add ``cnt`` bytes that read as zeroes to a read's parts (merged with a zero part before)."""
    if parts and parts[-1][0] == 0:
        parts[-1][2] += cnt
    else:
        parts.append([0, None, cnt])


def append_run(out: list, s: int, n: int, st: Alloc) -> None:
    if n <= 0:
        return
    if out and out[-1][2] == st and out[-1][0] + out[-1][1] == s:
        out[-1] = (out[-1][0], out[-1][1] + n, st)
    else:
        out.append((s, n, st))
