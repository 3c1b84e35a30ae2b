"""VMDK sparse extents: hosted sparse (KDMV, also streamOptimized when read), ESX COWD
(read-only) and ESXi seSparse (read-only); the grain directory and grain tables, reads,
writes (data, then GT and redundant GT entries), and writing a new empty sparse extent."""
from __future__ import annotations

import array
import zlib

from ...align import align_up, ceil_div
from ...errors import CorruptImage, NotSupported
from ...fileio import ImageFile
from ...image import Alloc, FillFn, Image
from ...runs import RunList
from ...sparse import is_zero, split_blocks, zeroes
from ...tables import BlockTable, arithmetic_run, table_from_bytes
from .descriptor import ExtentLine
from .extents import Extent, u32_array, u32_bytes, zero_part
from .layout import (
    DEFAULT_GRAIN,
    DEFAULT_GTES,
    EMBEDDED_DESC_SECTORS,
    FLAG_COMPRESSED,
    FLAG_MARKERS,
    FLAG_NL_TEST,
    FLAG_RGD,
    FLAG_ZERO_GRAIN,
    MAGIC,
    MARKER,
    MAX_GRAIN_SECTORS,
    MAX_GTES,
    SECTOR,
    Container,
    SparseHeader,
    header_dict,
)


class SparseExtent(Extent):
    """A hosted sparse (KDMV) extent, a streamOptimized one, or an ESX COWD one (read-only)."""
    kind = "SPARSE"
    plain_gtes = True       # _gte is the table entry itself (block_status/read walk tables)
    path: str

    def __init__(self, line: ExtentLine, vstart: int, path: str, f: ImageFile, writable: bool, *,
                 grain_sectors: int, gtes: int, gd_sector: int, rgd_sector: int, n_gts: int,
                 capacity: int, flags: int, header: dict | None, header_offset: int = 0,
                 cowd: bool = False):
        super().__init__(line, vstart, path)
        self.f = f
        self.grain = grain_sectors * SECTOR
        self.grain_sectors = grain_sectors
        self.gtes = gtes
        self.gt_bytes = gtes * 4
        self.gt_sectors = align_up(self.gt_bytes, SECTOR) // SECTOR
        self.gd_sector = gd_sector
        self.rgd_sector = rgd_sector
        self.n_gts = n_gts
        self.capacity = capacity
        self.flags = flags
        self.header = header
        self.header_offset = header_offset
        self.cowd = cowd
        self.compressed = bool(flags & FLAG_COMPRESSED) and not cowd
        self.markers = bool(flags & FLAG_MARKERS) and not cowd
        self.zero_grain = bool(flags & FLAG_ZERO_GRAIN) and not cowd
        self.writable = writable and not self.compressed and not cowd
        self.file_size = f.size()
        gd_raw = f.read_exact(gd_sector * SECTOR, n_gts * 4, "grain directory")
        self.gd = u32_array(gd_raw)
        self.rgd = None
        if rgd_sector:
            self.rgd = u32_array(f.read_exact(rgd_sector * SECTOR, n_gts * 4,
                                               "redundant grain directory"))
        self._gts: dict[int, array.array] = {}
        self._cgrain: tuple[int, bytes] | None = None
        self.next_free = align_up(self.file_size, SECTOR)
        self._marked = False             # uncleanShutdown set (or found set) in this session
        self._clear_on_close = False     # ... by this session: a clean close clears it
        if cowd:
            self.kind = "VMFSSPARSE"

    # -- tables ------------------------------------------------------------------------------
    def _gt(self, t: int) -> array.array | None:
        gt = self._gts.get(t)
        if gt is not None:
            return gt
        if t >= self.n_gts:
            return None
        sec = self.gd[t]
        if sec == 0:
            return None
        off = sec * SECTOR
        if off + self.gt_bytes > self.file_size:
            raise CorruptImage(f"grain table {t} lies past the end of the file", path=self.f.path,
                               field=f"grain directory entry {t}",
                               offset=self.gd_sector * SECTOR + 4 * t,
                               expected=f"a table ending before {self.file_size:#x}",
                               found=f"sector {sec}")
        gt = u32_array(self.f.pread(off, self.gt_bytes))
        if len(self._gts) > 4096:
            self._gts.clear()
        self._gts[t] = gt
        return gt

    def _gte(self, idx: int) -> int:
        gt = self._gt(idx // self.gtes)
        return 0 if gt is None else gt[idx % self.gtes]

    def _status(self, gte: int) -> Alloc:
        if gte == 0:
            return Alloc.UNALLOCATED
        if gte == 1:            # zeroed-grain GTE (no grain can live in sector 1)
            return Alloc.ZERO
        return Alloc.DATA

    def block_status(self, off: int, n: int) -> list[tuple[int, int, Alloc]]:
        if not self.plain_gtes:
            return self._block_status_by_grain(off, n)
        out: RunList[Alloc] = RunList()
        end = off + n
        g = self.grain
        span = g * self.gtes
        stat = (Alloc.UNALLOCATED, Alloc.ZERO, Alloc.DATA)     # by GTE: 0, 1 (zeroed), other
        pos = off
        while pos < end:                      # one grain table at a time
            t = pos // span
            base = t * span
            tend = min(end, base + span)
            gt = self._gt(t)
            if gt is None or is_zero(memoryview(gt).cast("B")):
                out.add(pos, tend - pos, Alloc.UNALLOCATED)
            else:                             # runs of equal status over the table's entries
                i = (pos - base) // g
                prev = -1
                start = pos
                for gte in gt[i:(tend - 1 - base) // g + 1]:
                    c = gte if gte < 2 else 2
                    if c != prev:
                        gpos = base + i * g
                        if prev >= 0:
                            out.add(start, gpos - start, stat[prev])
                            start = gpos
                        prev = c
                    i += 1
                out.add(start, tend - start, stat[prev])
            pos = tend
        return out.runs

    def _grain_data(self, idx: int, gte: int) -> bytes:
        """The decompressed content of a compressed grain (cached: one grain)."""
        if self._cgrain is not None and self._cgrain[0] == idx:
            return self._cgrain[1]
        off = gte * SECTOR
        # one read covers the marker and a grain's worth of compressed data (the usual case);
        # only a grain that compressed badly needs a second read
        buf = self.f.pread(off, MARKER.size + self.grain)
        data_off, size = off, None
        if len(buf) >= MARKER.size:
            lba, sz = MARKER.unpack_from(buf)
            if self.markers or (lba == idx * self.grain_sectors
                                and 0 < sz <= 2 * self.grain + 1024):
                data_off, size = off + MARKER.size, sz
        if size is None:
            size = min(2 * self.grain + 1024, max(self.file_size - off, 0))
        if size == 0 or size > 2 * self.grain + 1024:
            raise CorruptImage(
                f"compressed grain {idx} has an impossible size",
                path=self.f.path,
                offset=off,
                expected=f"1..{2 * self.grain + 1024} bytes",
                found=size,
            )
        skip = data_off - off
        comp = buf[skip : skip + size] if skip + size <= len(buf) else self.f.pread(data_off, size)
        if len(comp) < size and self.markers:
            raise CorruptImage(
                f"compressed grain {idx} lies past the end of the file",
                path=self.f.path,
                offset=off,
            )
        try:
            d = zlib.decompressobj()
            out = d.decompress(comp, self.grain)  # never more than one grain
        except zlib.error as exc:
            raise CorruptImage(
                f"compressed grain {idx} does not inflate: {exc}", path=self.f.path, offset=off
            ) from None
        if d.unconsumed_tail:
            raise CorruptImage(
                f"compressed grain {idx} inflates to more than a grain",
                path=self.f.path,
                offset=off,
                expected=f"{self.grain} bytes",
                found="more",
            )
        if len(out) < self.grain:
            out += bytes(self.grain - len(out))
        self._cgrain = (idx, out)
        return out

    def read(self, off: int, n: int) -> bytes:
        parts = self._parts_by_grain(off, n) if not self.plain_gtes else self._parts(off, n)
        out = []
        for kind, where, cnt in parts:
            if kind == 0:
                out.append(zeroes(cnt))
            elif kind == 2:
                out.append(where)
            else:
                data = self.f.pread(where, cnt)
                if len(data) < cnt:
                    data += bytes(cnt - len(data))
                out.append(data)
        return out[0] if len(out) == 1 else b"".join(out)

    def _parts(self, off: int, n: int) -> list:
        """[kind, file offset or data, length] pieces of a read (kind 0 zeroes, 1 file data,
        2 decompressed data), file pieces merged when contiguous; the table's entries are read
        directly, a grain table at a time."""
        parts: list = []
        g = self.grain
        gs = g // SECTOR
        gtes = self.gtes
        fsize = self.file_size
        end = off + n
        pos = off
        while pos < end:  # one grain table at a time
            idx, inner = divmod(pos, g)
            t, i = divmod(idx, gtes)
            tend = min(end, (t + 1) * g * gtes)
            gt = self._gt(t)
            while pos < tend:
                cnt = min(g - inner, tend - pos)
                gte = 0 if gt is None else gt[i]
                k = 1
                if gte < 2:  # unallocated or zeroed grain
                    zero_part(parts, cnt)
                else:
                    more = (tend - pos - cnt) // g
                    if more > 0 and not inner and not self.compressed and gt is not None \
                            and gt[i + 1] == gte + gs:
                        # the grains after it that follow it in the file: one step
                        k = arithmetic_run(gt, i + 1, i + 1 + more, gte + gs, gs) - i
                        cnt += (k - 1) * g
                    self._data_part(parts, idx, gte, inner, cnt, fsize)
                pos += cnt
                idx += k
                i += k
                inner = 0
        return parts

    def _block_status_by_grain(self, off: int, n: int) -> list[tuple[int, int, Alloc]]:
        """block_status through _gt/_gte/_status, grain by grain (subclasses' tables)."""
        out: RunList[Alloc] = RunList()
        end = off + n
        span = self.grain * self.gtes
        pos = off
        while pos < end:  # one grain table at a time
            t = pos // span
            tend = min(end, (t + 1) * span)
            gt = self._gt(t)
            if gt is None or is_zero(memoryview(gt).cast("B")):
                out.add(pos, tend - pos, Alloc.UNALLOCATED)
            else:
                for idx, _inner, p, cnt in split_blocks(pos, tend - pos, self.grain):
                    out.add(p, cnt, self._status(self._gte(idx)))
            pos = tend
        return out.runs

    def _parts_by_grain(self, off: int, n: int) -> list:
        """read's parts through _gte/_status, grain by grain (subclasses' tables)."""
        parts: list = []
        for idx, inner, _pos, cnt in split_blocks(off, n, self.grain):
            gte = self._gte(idx)
            if self._status(gte) != Alloc.DATA:
                zero_part(parts, cnt)
            else:
                self._data_part(parts, idx, gte, inner, cnt, self.file_size)
        return parts

    def _data_part(self, parts: list, idx: int, gte: int, inner: int, cnt: int, fsize: int) -> None:
        """Add ``cnt`` bytes of allocated grain ``idx`` (at ``inner``) to a read's parts:
        decompressed data, or a file range merged with the previous one when contiguous."""
        if self.compressed:
            parts.append([2, self._grain_data(idx, gte)[inner : inner + cnt], cnt])
            return
        foff = gte * SECTOR + inner
        if foff + cnt > fsize:
            raise CorruptImage(
                f"grain {idx} lies past the end of the file",
                path=self.f.path,
                field=f"grain table entry for grain {idx}",
                expected=f"an offset below {fsize:#x}",
                found=f"sector {gte}",
            )
        last = parts[-1] if parts else None
        if last is not None and last[0] == 1 and last[1] + last[2] == foff:
            last[2] += cnt
        else:
            parts.append([1, foff, cnt])

    # -- writing -----------------------------------------------------------------------------
    def begin_update(self) -> None:
        """VMware's uncleanShutdown byte, set and synced before this session first changes a
        grain table or directory. The primary and the redundant copy are two writes: a crash
        between them leaves the redundant copy one update behind, which check reports as a leak
        (not corruption) exactly when this byte says an update was interrupted."""
        if self._marked or self.header is None or not self.writable:
            return
        self._marked = True
        if not self.header["unclean_shutdown"]:
            self.header = dict(self.header, unclean_shutdown=1)
            self.f.pwrite(self.header_offset, SparseHeader.build(self.header))
            self.f.sync()
            self._clear_on_close = True

    def end_update(self) -> None:
        """A clean close: clear the byte this session set (tables synced first)."""
        if not self._clear_on_close or self.header is None:    # set only with a header
            return
        self.f.sync()
        self.header = dict(self.header, unclean_shutdown=0)
        self.f.pwrite(self.header_offset, SparseHeader.build(self.header))
        self.f.sync()
        self._clear_on_close = False

    def _alloc(self, nbytes: int) -> int:
        off = self.next_free
        self.next_free = align_up(off + nbytes, SECTOR)
        return off

    def _ensure_gt(self, t: int) -> array.array:
        gt = self._gt(t)
        if gt is not None and (self.rgd is None or self.rgd[t] != 0):
            return gt
        self.begin_update()
        if t >= self.n_gts:
            raise CorruptImage(
                f"grain directory has {self.n_gts} entries; table {t} needed", path=self.f.path
            )
        zero = bytes(self.gt_sectors * SECTOR)
        if gt is None:
            goff = self._alloc(len(zero))
            self.f.pwrite(goff, zero)
            gt = array.array("I", bytes(self.gt_bytes))
        else:
            goff = None
        if self.rgd is not None and self.rgd[t] == 0:
            roff = self._alloc(len(zero))
            self.f.pwrite(roff, u32_bytes(gt).ljust(len(zero), b"\0"))
            self.rgd[t] = roff // SECTOR
            self.f.pwrite(self.rgd_sector * SECTOR + 4 * t, (roff // SECTOR).to_bytes(4, "little"))
        if goff is not None:
            self.gd[t] = goff // SECTOR
            self.f.pwrite(self.gd_sector * SECTOR + 4 * t, (goff // SECTOR).to_bytes(4, "little"))
        self.file_size = max(self.file_size, self.next_free)
        self._gts[t] = gt
        return gt

    def _set_gte(self, idx: int, value: int) -> None:
        self.begin_update()
        t, i = divmod(idx, self.gtes)
        gt = self._ensure_gt(t)
        gt[i] = value
        raw = value.to_bytes(4, "little")
        self.f.pwrite(self.gd[t] * SECTOR + 4 * i, raw)
        if self.rgd is not None:
            self.f.pwrite(self.rgd[t] * SECTOR + 4 * i, raw)

    def set_gtes(self, values: dict[int, int]) -> None:
        """Set grain table entries (grain index -> sector) and write them into the primary and
        the redundant table, neighbouring entries in one write."""
        self.begin_update()
        by_table: dict[int, list[tuple[int, int]]] = {}
        for idx, value in values.items():
            t, i = divmod(idx, self.gtes)
            by_table.setdefault(t, []).append((i, value))
        for t, entries in by_table.items():
            gt = self._ensure_gt(t)
            for i, value in entries:
                gt[i] = value
            changed = [i for i, _v in entries]
            for d in (self.gd, self.rgd):
                if d is not None:
                    BlockTable(self.f, d[t] * SECTOR, gt).write_entries(changed)

    def write(self, off: int, data: bytes | memoryview, fill: FillFn, image: Image) -> None:
        if not self.writable:
            if self.compressed:
                raise NotSupported(
                    f"{image.location}: streamOptimized (compressed) VMDK images are "
                    "written once, sequentially, when created; writing into an "
                    "existing one is refused"
                )
            super().write(off, data, fill, image)
        mv = memoryview(data)
        honor = getattr(image, "honor_zeroes", False)
        new: list = []  # (grain index, file offset, data) of grains allocated here
        # write_zeroes: whole allocated grains of zeroes become holes in the file
        punch: list[list[int]] | None = [] if getattr(image, "punch_zero_grains", False) else None
        held: list = []     # writes into allocated grains adjacent in the file: one pwritev
        held_at = held_end = 0
        for idx, inner, pos, cnt in split_blocks(off, len(data), self.grain):
            piece = mv[pos - off : pos - off + cnt]
            gte = self._gte(idx)
            if gte > 1:
                if gte * SECTOR + inner + cnt > self.file_size:
                    raise CorruptImage(
                        f"grain {idx} lies past the end of the file",
                        path=self.f.path,
                        found=f"sector {gte}",
                    )
                at = gte * SECTOR
                if punch is not None and cnt == self.grain and is_zero(piece):
                    if punch and punch[-1][1] == at:
                        punch[-1][1] += cnt
                    else:
                        punch.append([at, at + cnt])
                    continue
                if held and held_end != at + inner:
                    self.f.pwritev(held_at, held)
                    held = []
                if not held:
                    held_at = at + inner
                held.append(piece)
                held_end = at + inner + cnt
                continue
            gstart = idx * self.grain
            glen = min(self.grain, self.length - gstart)
            zero_piece = is_zero(piece)
            if zero_piece and not honor:
                if gte == 1:
                    continue  # already reads as zeroes
                if not image.is_diff and cnt == glen:
                    continue  # a base's hole reads as zeroes already
                if self.zero_grain and cnt == glen:
                    self._set_gte(idx, 1)  # hide the parent without storing data
                    continue
            gdata: bytes | memoryview
            if cnt == self.grain:
                gdata = piece  # committed before this call returns
            else:
                below = bytearray(glen) if gte == 1 else bytearray(fill(gstart, glen))
                below[inner : inner + cnt] = piece
                if len(below) < self.grain:
                    below += bytes(self.grain - len(below))
                gdata = bytes(below)
            if not honor and not image.is_diff and is_zero(gdata) and gte == 0:
                continue
            new.append((idx, self._alloc(self.grain), gdata))
            if len(new) >= 256:
                self._commit_new(new)
        if held:
            self.f.pwritev(held_at, held)
        self._commit_new(new)
        for a, b in punch or ():
            if not self.f.punch_hole(a, b - a):
                self.f.pwrite(a, bytes(b - a))

    def _commit_new(self, new: list) -> None:
        """Write freshly allocated grains (one pwrite per contiguous run), then their table
        entries (one pwrite per contiguous run of entries, primary and redundant table)."""
        if not new:
            return
        self.begin_update()
        run_off, run = new[0][1], [new[0][2]]
        for _idx, goff, gdata in new[1:]:
            if goff == run_off + len(run) * self.grain:
                run.append(gdata)
            else:
                self.f.pwritev(run_off, run)
                run_off, run = goff, [gdata]
        self.f.pwritev(run_off, run)  # data first ...
        self.file_size = max(self.file_size, self.next_free)
        by_table: dict[int, list[tuple[int, int]]] = {}
        for idx, goff, _ in new:
            t, i = divmod(idx, self.gtes)
            by_table.setdefault(t, []).append((i, goff // SECTOR))
        for t, entries in by_table.items():  # ... then the tables
            gt = self._ensure_gt(t)
            for i, sec in entries:
                gt[i] = sec
            lo = min(i for i, _ in entries)
            hi = max(i for i, _ in entries) + 1
            raw = u32_bytes(gt[lo:hi])
            self.f.pwrite(self.gd[t] * SECTOR + 4 * lo, raw)
            if self.rgd is not None:
                self.f.pwrite(self.rgd[t] * SECTOR + 4 * lo, raw)
        new.clear()

    def flush(self) -> None:
        if self.writable:
            self.f.sync()


class SESparseExtent(SparseExtent):
    """An ESXi seSparse extent (read-only): u64 grain directory and tables; table entries carry
    a type in their top nibble (0 unallocated, 1 unmapped and 2 zero: read as zeroes,
    3 allocated: grain number in the other bits)."""

    plain_gtes = False
    kind = "SESPARSE"

    def __init__(self, line: ExtentLine, vstart: int, path: str, f: ImageFile,
                 h: Container) -> None:
        Extent.__init__(self, line, vstart, path)
        self.f = f
        self.file_size = f.size()
        self.grain_sectors = h.grain_size
        self.grain = h.grain_size * SECTOR
        self.gtes = h.grain_table_size * SECTOR // 8
        self.gt_bytes = self.gtes * 8
        self.gt_sectors = h.grain_table_size
        self.n_gts = h.grain_dir_size * SECTOR // 8
        need = ceil_div(max(h.capacity, line.sectors), (self.grain_sectors * self.gtes))
        gd_off = h.grain_dir_offset * SECTOR
        if self.n_gts < need or gd_off + self.n_gts * 8 > self.file_size or not gd_off:
            raise CorruptImage(
                "seSparse grain directory does not fit",
                path=path,
                field="grain_dir_offset/size",
                offset=0x80,
                expected=f">= {need} entries inside the file",
                found=f"{self.n_gts} entries at sector {h.grain_dir_offset}",
            )
        self.gd = table_from_bytes(f.pread(gd_off, self.n_gts * 8), "Q")
        self.gt_base: int = h.grain_tables_offset
        self.grains_base: int = h.grains_offset
        self.capacity = h.capacity
        self.header = None
        self.rgd = None
        self.rgd_sector = 0
        self.gd_sector = h.grain_dir_offset
        self.flags = 0
        self.cowd = True
        self.compressed = self.markers = False
        self.zero_grain = True
        self.writable = False
        self._gts = {}
        self._cgrain = None
        self.next_free = align_up(self.file_size, SECTOR)

    def _gt(self, t: int) -> array.array[int] | None:
        gt = self._gts.get(t)
        if gt is not None or t >= self.n_gts:
            return gt
        v = self.gd[t]
        if v == 0:
            return None
        if v >> 32 != 0x10000000:
            raise CorruptImage(
                f"seSparse grain directory entry {t} is invalid",
                path=self.f.path,
                offset=self.gd_sector * SECTOR + 8 * t,
                expected="0x10000000xxxxxxxx",
                found=f"{v:#018x}",
            )
        off = (self.gt_base + (v & 0xFFFFFFFF) * self.gt_sectors) * SECTOR
        if off + self.gt_bytes > self.file_size:
            raise CorruptImage(
                f"seSparse grain table {t} lies past the end of the file",
                path=self.f.path,
                found=f"offset {off:#x}",
            )
        gt = table_from_bytes(self.f.pread(off, self.gt_bytes), "Q")
        if len(self._gts) > 1024:
            self._gts.clear()
        self._gts[t] = gt
        return gt

    def _gte(self, idx: int) -> int:
        gt = self._gt(idx // self.gtes)
        if gt is None:
            return 0
        v = gt[idx % self.gtes]
        kind = v >> 60
        if kind == 0:
            if v:
                raise CorruptImage(
                    f"seSparse grain table entry for grain {idx} is invalid",
                    path=self.f.path,
                    found=f"{v:#018x}",
                )
            return 0
        if kind in (1, 2):
            return 1
        if kind == 3:
            n = ((v & 0x0FFF000000000000) >> 48) | ((v & 0x0000FFFFFFFFFFFF) << 12)
            return self.grains_base + n * self.grain_sectors
        raise CorruptImage(
            f"seSparse grain table entry for grain {idx} has an unknown type",
            path=self.f.path,
            found=f"{v:#018x}",
        )


def parse_sparse_header(raw: bytes, path: str) -> dict:
    """Parse and validate a hosted sparse extent header."""
    if len(raw) < SECTOR:
        raise CorruptImage(
            "sparse extent header is truncated",
            path=path,
            expected="512 bytes",
            found=f"{len(raw)} bytes",
        )
    h = dict(SparseHeader.parse(raw[:SECTOR]))
    h.pop("_io", None)
    if h["magic"] != MAGIC:
        raise CorruptImage(
            "not a VMDK sparse extent",
            path=path,
            field="magicNumber",
            offset=0,
            expected="'KDMV'",
            found=repr(h["magic"]),
        )
    if h["version"] not in (1, 2, 3):
        raise NotSupported(
            "unsupported sparse extent version",
            path=path,
            field="version",
            offset=4,
            expected="1, 2 or 3",
            found=h["version"],
        )
    gs = h["grain_size"]
    if gs == 0 or gs & (gs - 1) or gs > MAX_GRAIN_SECTORS:
        raise CorruptImage(
            "grain size must be a power of two",
            path=path,
            field="grainSize",
            offset=0x14,
            expected=f"1..{MAX_GRAIN_SECTORS} sectors",
            found=gs,
        )
    n = h["num_gtes_per_gt"]
    if not 1 <= n <= MAX_GTES:
        raise CorruptImage(
            "bad grain table size",
            path=path,
            field="numGTEsPerGT",
            offset=0x2C,
            expected=f"1..{MAX_GTES}",
            found=n,
        )
    if h["capacity"] > (1 << 48):
        raise CorruptImage(
            "capacity out of range",
            path=path,
            field="capacity",
            offset=0xC,
            expected="< 2^48 sectors",
            found=h["capacity"],
        )
    if h["flags"] & FLAG_COMPRESSED and h["compress_algorithm"] not in (0, 1):
        raise NotSupported(
            "unknown grain compression",
            path=path,
            field="compressAlgorithm",
            offset=0x4D,
            expected="1 (deflate)",
            found=h["compress_algorithm"],
        )
    return h


def sparse_layout(
    capacity: int, desc_sectors: int, grain: int = DEFAULT_GRAIN, gtes: int = DEFAULT_GTES
) -> dict:
    n_gts = max(1, ceil_div(capacity, (grain * gtes)))
    gd_sectors = align_up(n_gts * 4, SECTOR) // SECTOR
    gt_sectors = align_up(gtes * 4, SECTOR) // SECTOR
    rgd = 1 + desc_sectors
    rgt0 = rgd + gd_sectors
    gd = rgt0 + n_gts * gt_sectors
    gt0 = gd + gd_sectors
    end = gt0 + n_gts * gt_sectors
    return dict(
        n_gts=n_gts,
        rgd=rgd,
        rgt0=rgt0,
        gd=gd,
        gt0=gt0,
        gt_sectors=gt_sectors,
        overhead=align_up(end, grain),
    )


def write_sparse_extent(
    f: ImageFile,
    capacity: int,
    descriptor: bytes | None,
    *,
    grain: int = DEFAULT_GRAIN,
    gtes: int = DEFAULT_GTES,
    flags: int = FLAG_NL_TEST | FLAG_RGD,
) -> None:
    """A new hosted sparse extent: header, [descriptor], RGD, RGTs, GD, GTs (qemu's layout)."""
    desc_sectors = EMBEDDED_DESC_SECTORS if descriptor is not None else 0
    if descriptor is not None and len(descriptor) > desc_sectors * SECTOR:
        raise NotSupported(f"{f.path}: descriptor too large for the embedded area")
    lay = sparse_layout(capacity, desc_sectors, grain, gtes)
    hdr = header_dict(
        capacity=capacity,
        descriptor_offset=1 if desc_sectors else 0,
        descriptor_size=desc_sectors,
        rgd_offset=lay["rgd"],
        gd_offset=lay["gd"],
        overhead=lay["overhead"],
        grain_size=grain,
        num_gtes_per_gt=gtes,
        flags=flags,
        version=2 if flags & FLAG_ZERO_GRAIN else 1,
    )
    f.truncate(lay["overhead"] * SECTOR)
    f.pwrite(0, SparseHeader.build(hdr))
    if descriptor is not None:
        f.pwrite(SECTOR, descriptor.ljust(desc_sectors * SECTOR, b"\0"))
    n, gts = lay["n_gts"], lay["gt_sectors"]
    rgd = array.array("I", (lay["rgt0"] + i * gts for i in range(n)))
    gd = array.array("I", (lay["gt0"] + i * gts for i in range(n)))
    f.pwrite(lay["rgd"] * SECTOR, u32_bytes(rgd))
    f.pwrite(lay["gd"] * SECTOR, u32_bytes(gd))
