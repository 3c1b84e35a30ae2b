"""Bochs growing disk images as a vdgui backend: an example plugin (docs/plugins.md).

The format, as Bochs writes it (iodev/hdimage/hdimage.h, redolog_t) and qemu's block/bochs.c
reads it. Little-endian; a 512-byte header::

    0   magic     32  "Bochs Virtual HD Image", NUL padded
    32  type      16  "Redolog"
    48  subtype   16  "Growing" (others: "Undoable", "Volatile": not this backend)
    64  version    4  0x00020000 (0x00010000: version 1, no timestamp)
    68  header     4  header size (512)
    72  catalog    4  entries in the catalog
    76  bitmap     4  bytes of the bitmap in front of each extent
    80  extent     4  bytes of each extent (a power of two)
    84  timestamp  4  (version 2; version 1 has the disk size here)
    88  disk       8  virtual size in bytes

then the catalog (one 32-bit entry per extent of the disk: the index of the stored extent, or
0xFFFFFFFF when absent), then the stored extents, each a bitmap (one bit per 512-byte sector
of the extent, padded to 512 bytes) followed by the extent's data. A sector reads as stored only
when its bit is set, else as zeroes.

Writes go data -> bitmap -> catalog entry, so an interrupted write leaves the old content.
"""
from __future__ import annotations

import struct
import time
from array import array

import vdgui.vd as vd

MAGIC = b"Bochs Virtual HD Image".ljust(32, b"\0")
TYPE = b"Redolog".ljust(16, b"\0")
SUBTYPE = b"Growing".ljust(16, b"\0")
V1, V2 = 0x00010000, 0x00020000
HEADER = 512
SECTOR = 512
ABSENT = 0xFFFFFFFF
MAX_CATALOG = 0x100000          # qemu's limit (entries)
MAX_EXTENT = 0x800000           # qemu's limit (bytes)
_HEAD = struct.Struct("<32s16s16sIIIII")


def _geometry(size: int) -> tuple[int, int, int]:
    """(catalog entries, bitmap bytes, extent bytes) for a disk of ``size`` bytes, as Bochs'
    redolog_t::make_header chooses them: entries and bitmap doubled in turn until they cover
    the size."""
    entries, bitmap, flip = 512, 1, 0
    while True:
        extent = 8 * bitmap * SECTOR
        if entries * extent >= size:
            return entries, bitmap, extent
        flip += 1
        if flip & 1:
            bitmap *= 2
        else:
            entries *= 2


def _blocks(n: int) -> int:
    return (n + SECTOR - 1) // SECTOR


class BochsImage(vd.FileImage):
    def __init__(self, backend, location, f, read_only):
        super().__init__(backend, location, f, read_only)
        raw = f.read_exact(0, HEADER, "Bochs header")
        magic, typ, sub, version, header, catalog, bitmap, extent = _HEAD.unpack_from(raw)
        if magic != MAGIC or typ != TYPE or sub != SUBTYPE:
            raise self._corrupt("not a Bochs growing image", field="magic", offset=0,
                                expected="Bochs Virtual HD Image / Redolog / Growing",
                                found=(magic + typ + sub).rstrip(b"\0")[:64])
        if version not in (V1, V2):
            raise self._corrupt("unknown version", field="version", offset=64,
                                expected=f"{V1:#x} or {V2:#x}", found=hex(version))
        if extent < SECTOR or extent & (extent - 1) or extent > MAX_EXTENT:
            raise self._corrupt("invalid extent size", field="extent", offset=80,
                                expected=f"a power of two in 512..{MAX_EXTENT}", found=extent)
        if bitmap * 8 < extent // SECTOR or bitmap > extent:
            raise self._corrupt("bitmap does not cover the extent", field="bitmap", offset=76,
                                expected=f"at least {extent // SECTOR // 8} bytes", found=bitmap)
        if catalog > MAX_CATALOG or header < HEADER:
            raise self._corrupt("catalog too large or header too small", field="catalog",
                                offset=72, expected=f"at most {MAX_CATALOG} entries",
                                found=catalog)
        disk = struct.unpack_from("<Q", raw, 88 if version == V2 else 84)[0]
        if disk % SECTOR or disk > catalog * extent:
            raise self._corrupt("invalid disk size", field="disk", offset=88,
                                expected=f"a multiple of 512, at most {catalog * extent}",
                                found=disk)
        self.version, self.header = version, header
        self.size, self.block_size, self.extent = disk, extent, extent
        self.bitmap_bytes = bitmap
        self.stride = (_blocks(bitmap) + _blocks(extent)) * SECTOR
        self.catalog = array("I", f.read_exact(header, catalog * 4, "Bochs catalog"))
        if struct.pack("=I", 1) != struct.pack("<I", 1):
            self.catalog.byteswap()
        self.data_offset = header + catalog * 4
        fsize = f.size()
        used = [e for e in self.catalog if e != ABSENT]
        for i, e in enumerate(self.catalog):
            if e != ABSENT and self.data_offset + e * self.stride + self.stride > fsize + extent:
                raise self._corrupt("catalog entry beyond the end of the file",
                                    offset=header + 4 * i, expected=f"below {fsize} bytes",
                                    found=e)
        if len(set(used)) != len(used):
            raise self._corrupt("two catalog entries share one stored extent",
                                offset=header)
        self.next_index = max(used, default=-1) + 1
        self._bitmaps: dict[int, bytearray] = {}

    def info(self):
        return {"version": "2" if self.version == V2 else "1", "extent_size": self.extent,
                "catalog_entries": len(self.catalog),
                "stored_extents": sum(1 for e in self.catalog if e != ABSENT)}

    def _extent_at(self, index: int) -> int:
        return self.data_offset + self.catalog[index] * self.stride

    def _bitmap(self, index: int) -> bytearray:
        bm = self._bitmaps.get(index)
        if bm is None:
            bm = bytearray(self.f.pread(self._extent_at(index), self.bitmap_bytes)
                           .ljust(self.bitmap_bytes, b"\0"))
            self._bitmaps[index] = bm
        return bm

    def _runs(self, offset: int, length: int):
        """(start, length, stored file offset or None) runs covering the range."""
        pos, end = offset, offset + length
        while pos < end:
            index, within = divmod(pos, self.extent)
            n = min(end - pos, self.extent - within)
            if self.catalog[index] == ABSENT:
                yield pos, n, None
            else:
                bm, data = self._bitmap(index), self._extent_at(index) + \
                    _blocks(self.bitmap_bytes) * SECTOR
                s = within // SECTOR
                last = (within + n) // SECTOR
                while s < last:
                    bit = bm[s >> 3] >> (s & 7) & 1
                    e = s + 1
                    while e < last and (bm[e >> 3] >> (e & 7) & 1) == bit:
                        e += 1
                    yield (index * self.extent + s * SECTOR, (e - s) * SECTOR,
                           data + s * SECTOR if bit else None)
                    s = e
            pos += n

    def block_status(self, offset, length):
        out: list = []
        for start, n, where in self._runs(offset, length):
            st = vd.Alloc.DATA if where is not None else vd.Alloc.UNALLOCATED
            if out and out[-1][2] == st and out[-1][0] + out[-1][1] == start:
                out[-1] = (out[-1][0], out[-1][1] + n, st)
            else:
                out.append((start, n, st))
        return out

    def read(self, offset, length):
        parts = []
        for _, n, where in self._runs(offset, length):
            parts.append(bytes(n) if where is None else self.f.pread(where, n).ljust(n, b"\0"))
        return b"".join(parts)

    def write(self, offset, data, fill):
        self.require_writable()
        view = memoryview(data)
        pos, end = offset, offset + len(data)
        while pos < end:
            index, within = divmod(pos, self.extent)
            n = min(end - pos, self.extent - within)
            new = self.catalog[index] == ABSENT
            if new:
                self.catalog[index] = self.next_index
                self.next_index += 1
                self._bitmaps[index] = bytearray(self.bitmap_bytes)
                base = self._extent_at(index)
                self.f.truncate(max(self.f.size(), base + self.stride))
            base = self._extent_at(index)
            data_at = base + _blocks(self.bitmap_bytes) * SECTOR
            self.f.pwrite(data_at + within, view[pos - offset: pos - offset + n])  # data
            bm = self._bitmaps[index] if new else self._bitmap(index)
            for s in range(within // SECTOR, (within + n) // SECTOR):
                bm[s >> 3] |= 1 << (s & 7)
            self.f.pwrite(base, bytes(bm))                                        # bitmap
            if new:                                                               # catalog
                self.f.pwrite(self.header + 4 * index, struct.pack("<I", self.catalog[index]))
            pos += n


class BochsBackend(vd.Backend):
    name = "Bochs"
    description = "Bochs growing disk image (example plugin)"
    aliases = ("bochs",)
    caps = vd.Cap.CREATE_DYNAMIC | vd.Cap.FILE
    extensions = (vd.FileExtension("img", vd.DeviceType.HARD_DISK),)
    operations = frozenset({vd.Operation.WRITE, vd.Operation.CREATE})
    max_size = MAX_CATALOG * MAX_EXTENT

    def probe(self, src):
        head = src.head
        if head[:32] == MAGIC and head[32:48] == TYPE and head[48:64] == SUBTYPE:
            return 100
        return 0

    def open(self, location, flags=vd.OpenFlags.NORMAL, config=None):
        f = vd.ImageFile(location, writable=not flags.read_only)
        try:
            return BochsImage(self, location, f, flags.read_only)
        except BaseException:
            f.close()
            raise

    def create(self, p):
        if p.parent is not None:
            raise vd.NotSupported("Bochs growing images cannot be differencing images")
        if p.flags & vd.ImageFlags.FIXED:
            raise vd.NotSupported("Bochs growing images are dynamic only")
        self.check_size(p.size, p.config, p.location)
        if p.size % SECTOR:
            raise vd.InvalidArgument(f"{p.location}: the size must be a multiple of 512",
                                     found=p.size)
        entries, bitmap, extent = _geometry(p.size)
        head = bytearray(HEADER)
        _HEAD.pack_into(head, 0, MAGIC, TYPE, SUBTYPE, V2, HEADER, entries, bitmap, extent)
        struct.pack_into("<IQ", head, 84, int(time.time()) & 0xFFFFFFFF, p.size)
        f = vd.ImageFile.create_temp(p.location)
        try:
            f.pwrite(0, bytes(head) + b"\xff" * (4 * entries))
            if p.progress:
                p.progress(p.size, p.size)
            f.sync()
            f.commit()
        except BaseException:
            f.abandon()
            raise
        return BochsImage(self, p.location, f, False)


BACKEND = BochsBackend()
