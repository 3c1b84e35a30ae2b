"""VMDK streamOptimized writing: grains arrive in increasing order and are compressed and
appended, each grain table after its grains; grain directory, footer and end-of-stream marker
last."""
from __future__ import annotations

import array
import zlib

from ...align import align_up, ceil_div
from ...errors import NotSupported
from ...fileio import ImageFile
from ...image import Alloc, FillFn, Image
from ...runs import RunList
from ...sparse import is_zero, split_blocks
from .descriptor import ExtentLine
from .extents import Extent, u32_bytes
from .layout import (
    MARKER,
    MARKER_EOS,
    MARKER_FOOTER,
    MARKER_GD,
    MARKER_GT,
    SECTOR,
    MetaMarker,
    SparseHeader,
)


class StreamWriter(Extent):
    """A streamOptimized extent being created: grains arrive in increasing order and are
    compressed and appended; grain tables follow their grains; GD, footer and end-of-stream
    marker are written by :meth:`finish`."""
    kind = "SPARSE"
    writable = True

    def __init__(self, line: ExtentLine, vstart: int, path: str, f: ImageFile, header: dict,
                 first_free: int) -> None:
        super().__init__(line, vstart, path)
        self.f = f
        self.header = header
        self.grain_sectors = header["grain_size"]
        self.grain = self.grain_sectors * SECTOR
        self.gtes = header["num_gtes_per_gt"]
        self.n_gts = ceil_div(header["capacity"], (self.grain_sectors * self.gtes))
        self.gd = array.array("I", bytes(4 * self.n_gts))
        self.gts: dict[int, array.array] = {}
        self.emitted = -1            # tables < emitted+1 are written
        self.pos = first_free
        self.cur_idx = -1
        self.cur: bytearray | None = None
        self.done = False
        self._cache: tuple[int, bytes] | None = None

    def _gte(self, idx: int) -> int:
        t, i = divmod(idx, self.gtes)
        gt = self.gts.get(t)
        return 0 if gt is None else gt[i]

    def block_status(self, off: int, n: int) -> list[tuple[int, int, Alloc]]:
        out: RunList[Alloc] = RunList()
        for idx, _inner, pos, cnt in split_blocks(off, n, self.grain):
            st = Alloc.DATA if (idx == self.cur_idx or self._gte(idx)) else Alloc.UNALLOCATED
            out.add(pos, cnt, st)
        return out.runs

    def read(self, off: int, n: int) -> bytes:
        buf = bytearray(n)
        for idx, inner, pos, cnt in split_blocks(off, n, self.grain):
            if idx == self.cur_idx and self.cur is not None:
                buf[pos - off:pos - off + cnt] = self.cur[inner:inner + cnt]
                continue
            gte = self._gte(idx)
            if gte:
                if self._cache is None or self._cache[0] != idx:
                    head = self.f.pread(gte * SECTOR, 12)
                    size = int.from_bytes(head[8:12], "little")
                    comp = self.f.pread(gte * SECTOR + 12, size)
                    self._cache = (idx, zlib.decompressobj().decompress(comp, self.grain))
                buf[pos - off:pos - off + cnt] = self._cache[1][inner:inner + cnt]
        return bytes(buf)

    def write(self, off: int, data: bytes | memoryview, fill: FillFn, image: Image) -> None:
        if self.done:
            raise NotSupported(f"{image.location}: the streamOptimized image is complete")
        mv = memoryview(data)
        for idx, inner, pos, cnt in split_blocks(off, len(data), self.grain):
            if idx < self.cur_idx:
                raise NotSupported(
                    f"{image.location}: streamOptimized VMDK images are written sequentially; a "
                    f"write at offset {self.vstart + pos} comes after data at offset "
                    f"{self.vstart + self.cur_idx * self.grain} (random writes are refused)")
            cur = self.cur
            if idx > self.cur_idx or cur is None:       # None only before the first grain
                self._flush_grain()
                self.cur_idx = idx
                self.cur = cur = bytearray(self.grain)
            cur[inner:inner + cnt] = mv[pos - off:pos - off + cnt]

    def _emit_gts_before(self, table: int) -> None:
        while self.emitted + 1 < min(table, self.n_gts):
            t = self.emitted + 1
            gt = self.gts.get(t)
            if gt is not None:
                gt_bytes = u32_bytes(gt)
                padded = gt_bytes.ljust(align_up(len(gt_bytes), SECTOR), b"\0")
                marker = MetaMarker.build(dict(num_sectors=len(padded) // SECTOR, size=0,
                                               type=MARKER_GT, pad=bytes(496)))
                self.f.pwrite(self.pos, marker + padded)
                self.gd[t] = (self.pos + SECTOR) // SECTOR
                self.pos += SECTOR + len(padded)
            self.emitted = t

    def _flush_grain(self) -> None:
        if self.cur is None:
            return
        idx, data = self.cur_idx, self.cur
        self.cur = None
        if is_zero(data):
            return
        self._emit_gts_before(idx // self.gtes)
        # always a whole grain (zero padded past the end of the disk): readers such as
        # VirtualBox expect every grain to inflate to the full grain size
        comp = zlib.compress(bytes(data), 6)
        rec = MARKER.pack(idx * self.grain_sectors, len(comp)) + comp
        rec = rec.ljust(align_up(len(rec), SECTOR), b"\0")
        if (self.pos + len(rec)) // SECTOR >= 1 << 32:
            raise NotSupported(f"{self.f.path}: streamOptimized image grew past 2 TiB")
        self.f.pwrite(self.pos, rec)
        t, i = divmod(idx, self.gtes)
        self.gts.setdefault(t, array.array("I", bytes(4 * self.gtes)))[i] = self.pos // SECTOR
        self.pos += len(rec)

    def finish(self) -> None:
        if self.done:
            return
        self._flush_grain()
        self._emit_gts_before(self.n_gts)
        gd = u32_bytes(self.gd)
        gd_padded = gd.ljust(align_up(len(gd), SECTOR), b"\0")
        marker = MetaMarker.build(dict(num_sectors=len(gd_padded) // SECTOR, size=0,
                                       type=MARKER_GD, pad=bytes(496)))
        self.f.pwrite(self.pos, marker + gd_padded)
        gd_sector = (self.pos + SECTOR) // SECTOR
        self.pos += SECTOR + len(gd_padded)
        footer = SparseHeader.build(dict(self.header, gd_offset=gd_sector))
        fmarker = MetaMarker.build(dict(num_sectors=1, size=0, type=MARKER_FOOTER, pad=bytes(496)))
        eos = MetaMarker.build(dict(num_sectors=0, size=0, type=MARKER_EOS, pad=bytes(496)))
        self.f.pwrite(self.pos, fmarker + footer + eos)
        self.pos += 3 * SECTOR
        self.f.truncate(self.pos)
        self.f.sync()
        self.done = True
