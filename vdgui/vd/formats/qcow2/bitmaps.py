"""QCOW2 persistent dirty bitmaps (qcow2.txt "Bitmaps extension"): enabled bitmaps are
updated before each data write; bitmaps that cannot be maintained are removed cleanly."""
from __future__ import annotations

import struct

from ...align import ceil_div
from ...image import Problem, ProblemCode
from . import layout as L
from .clusters import BE_U64, L2E_MASK, be_array
from .state import Qcow2State, RefCounter, TrackedBitmap


def _set_bit_range(buf: bytearray, base_byte: int, lo: int, hi: int) -> None:
    """Set bits lo..hi (inclusive; bit 0 = LSB of byte 0) in ``buf``, which starts at byte
    ``base_byte`` of the bitmap cluster."""
    a, z = lo >> 3, hi >> 3
    if a == z:
        buf[a - base_byte] |= (0xFF << (lo & 7)) & (0xFF >> (7 - (hi & 7)))
        return
    buf[a - base_byte] |= (0xFF << (lo & 7)) & 0xFF
    buf[z - base_byte] |= 0xFF >> (7 - (hi & 7))
    if z - a > 1:
        buf[a + 1 - base_byte:z - base_byte] = b"\xff" * (z - a - 1)


class BitmapsMixin(Qcow2State):
    """Persistent dirty bitmaps: kept, updated or dropped."""

    def _settle_bitmaps(self) -> None:
        """Before the first change of a version 3 image with autoclear bits set (the image's
        _check_write): clear the autoclear bits we do not maintain. Persistent dirty bitmaps
        (autoclear bit 0) are kept and updated on every write when they are well formed;
        otherwise they are removed cleanly (extension dropped, clusters freed: no leaks)."""
        if self.bitmaps_ext and self.autoclear & L.AUTOCLEAR_BITMAPS:
            tracked = self._maintainable_bitmaps(self.bitmaps_ext)
            if tracked is not None:
                self._tracked = tracked
                keep = L.AUTOCLEAR_DATA_FILE_RAW | L.AUTOCLEAR_BITMAPS
                if self.autoclear & ~keep:
                    self.autoclear &= keep
                    self._write_feature_bits()
                return
        if self.autoclear & ~L.AUTOCLEAR_DATA_FILE_RAW:
            self._drop_bitmaps()

    def _drop_bitmaps(self) -> None:
        ranges: list[tuple[int, int]] = []
        if self.bitmaps_ext and self.autoclear & L.AUTOCLEAR_BITMAPS:
            def collect(off: int, length: int, what: str) -> bool:
                ranges.append((off, length))
                return True
            self._count_bitmaps(collect, [])
        self._tracked = []
        self.autoclear &= L.AUTOCLEAR_DATA_FILE_RAW
        struct.pack_into(">Q", self.header_raw, L.OFF_AUTOCLEAR, self.autoclear)
        if any(t == L.EXT_BITMAPS for t, _ in self.extensions) and ranges:
            self.extensions = [(t, d) for t, d in self.extensions if t != L.EXT_BITMAPS]
            self._write_header_area(self.backing_file, self.backing_format)
            self.bitmaps_ext = None
            for off, length in ranges:
                self._unref(off, length)
        else:
            self._write_feature_bits()

    def _maintainable_bitmaps(self, ext: dict[str, int]) -> list[TrackedBitmap] | None:
        """The enabled ('auto') bitmaps of the bitmaps extension ``ext`` to update on writes, or
        None when some bitmap cannot be kept consistent (unknown type/flags, foreign extra data,
        wrong table size...)."""
        cs = self.cs
        d_off, d_size = ext["bitmap_directory_offset"], ext["bitmap_directory_size"]
        if d_size > (64 << 20) or d_off % cs or d_off + d_size > self.fsize:
            return None
        data = self.f.pread(d_off, d_size)
        pos = 0
        tracked: list[TrackedBitmap] = []
        for _ in range(ext["nb_bitmaps"]):
            if pos + 24 > len(data):
                return None
            b = L.BitmapDirEntry.parse(data[pos:pos + 24])
            pos += (24 + b.extra_data_size + b.name_size + 7) & ~7
            if b.type != 1 or b.flags & ~7 or b.granularity_bits > 63:
                return None
            if b.extra_data_size and not b.flags & 4:
                return None                  # foreign extra data: the bitmap must not be used
            if b.flags & 1 or not b.flags & 2:
                continue                     # in use (inconsistent) or disabled: left as is
            bits = ceil_div(self.size, (1 << b.granularity_bits))
            entries = ceil_div(ceil_div(bits, 8), cs)
            if b.bitmap_table_size != entries or b.bitmap_table_offset % cs or \
                    b.bitmap_table_offset + 8 * entries > self.fsize:
                return None
            tbl = be_array(self.f.read_exact(b.bitmap_table_offset, 8 * entries, "bitmap table"))
            for e in tbl:
                if e & ~(L2E_MASK | 1) or (e & L2E_MASK and (e & 1 or (e & L2E_MASK) % cs)):
                    return None
            tracked.append({"g": b.granularity_bits, "table_offset": b.bitmap_table_offset,
                            "table": tbl})
        return tracked

    def _mark_dirty(self, offset: int, length: int) -> None:
        """Set the bits of [offset, offset+length) in every enabled persistent bitmap (before
        the data is written, so that a crash leaves a superset of the changes)."""
        if not self._tracked or length <= 0:
            return
        cs = self.cs
        per = cs * 8
        for bm in self._tracked:
            first = offset >> bm["g"]
            last = (offset + length - 1) >> bm["g"]
            tbl = bm["table"]
            t = first // per
            while t <= last // per:
                lo = max(first, t * per) - t * per
                hi = min(last, (t + 1) * per - 1) - t * per
                e = tbl[t]
                host = e & L2E_MASK
                if host or not e & 1:
                    if host:
                        b0, b1 = lo >> 3, hi >> 3
                        buf = bytearray(self.f.read_exact(host + b0, b1 - b0 + 1, "bitmap data"))
                    else:
                        b0, b1 = 0, cs - 1
                        buf = bytearray(cs)
                    _set_bit_range(buf, b0, lo, hi)
                    if host:
                        self.f.pwrite(host + b0, buf)
                    else:
                        new = self._alloc(1)
                        self.f.pwrite(new, buf)
                        tbl[t] = new
                        self.f.pwrite(bm["table_offset"] + 8 * t, BE_U64.pack(new))
                t += 1

    def _count_bitmaps(self, add: RefCounter, problems: list[Problem]) -> None:
        ext = self.bitmaps_ext
        if not ext or not self.autoclear & L.AUTOCLEAR_BITMAPS:
            return
        d_off, d_size = ext["bitmap_directory_offset"], ext["bitmap_directory_size"]
        if d_size > (64 << 20) or d_off % self.cs:
            problems.append(Problem("corrupt", "bitmap directory invalid", d_off,
                                    code=ProblemCode.ENTRY_INVALID))
            return
        if not add(d_off, d_size, "bitmap directory"):
            return
        data = self.f.pread(d_off, d_size)
        pos = 0
        for _ in range(min(ext["nb_bitmaps"], 65535)):
            if pos + 24 > len(data):
                break
            b = L.BitmapDirEntry.parse(data[pos:pos + 24])
            sane = b.bitmap_table_size * 8 <= (64 << 20) and not b.bitmap_table_offset % self.cs
            if sane and add(b.bitmap_table_offset, b.bitmap_table_size * 8, "bitmap table"):
                raw = self.f.pread(b.bitmap_table_offset, b.bitmap_table_size * 8)
                tbl = be_array(raw[:len(raw) // 8 * 8])
                for e in tbl:
                    o = e & L2E_MASK
                    if o:
                        add(o, self.cs, "bitmap data")
            pos += (24 + b.extra_data_size + b.name_size + 7) & ~7
