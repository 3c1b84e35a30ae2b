"""VMDK resize (grow: last extent, grain directory moved when it outgrows its sectors, new
split extents) and compact (sparse extents: zero / parent-equal grains dropped, grains moved
down, file truncated)."""
from __future__ import annotations

import array
import os

from ...align import align_up, ceil_div
from ...backend import ImageFlags
from ...compaction import holes_between, move_blocks, plan_moves, punch_blocks
from ...errors import CorruptImage, InvalidArgument, NotSupported
from ...fileio import ImageFile, atomic_files
from ...image import FillFn
from ...progress import Progress, ProgressCallback
from ...space import preallocate, require_space
from ...sparse import is_zero, split_blocks, zeroes
from .descriptor import ExtentLine
from .extents import Extent, FlatExtent, u32_bytes
from .layout import MAX_SPARSE_SIZE, SECTOR, SPLIT_SIZE, SparseHeader
from .sparse import SparseExtent, write_sparse_extent
from .state import VmdkState
from .stream import StreamWriter


class MaintenanceMixin(VmdkState):
    """Resize and compact of a :class:`.image.VmdkImage`."""

    # -- RESIZE --------------------------------------------------------------------------------
    def resizes_in_place(self, new_size: int) -> bool:
        # growing a sparse extent: new grain tables and a moved directory go to the end of the
        # file (unreferenced until the header names them), then the header's capacity and the
        # descriptor's extent size
        return (new_size > self.size and len(self.extents) == 1
                and not self.flags & ImageFlags.STREAM_OPTIMIZED
                and all(isinstance(e, SparseExtent) and e.header is not None
                        and not getattr(e, "compressed", False) for e in self.extents))

    def resize(self, new_size: int, progress: ProgressCallback | None = None) -> None:
        self.require_writable()
        if new_size % SECTOR:
            raise InvalidArgument(f"{self.location}: VMDK sizes are multiples of 512 bytes, "
                                  f"found {new_size}")
        if new_size < self.size:
            raise InvalidArgument(f"{self.location}: shrinking a VMDK image is not supported "
                                  f"(from {self.size} to {new_size} bytes)")
        if self.flags & ImageFlags.STREAM_OPTIMIZED or any(
                isinstance(e, (StreamWriter,)) or getattr(e, "compressed", False)
                or not e.writable for e in self.extents):
            raise NotSupported(f"{self.location}: this VMDK ({self.create_type}) cannot be resized")
        if new_size == self.size:
            return
        if any(isinstance(e, SparseExtent) for e in self.extents) and new_size > MAX_SPARSE_SIZE:
            raise InvalidArgument(f"{self.location}: sparse VMDK images are limited to 2 TiB")
        prog = Progress(progress, new_size - self.size)
        prog.start()
        split = bool(self.flags & ImageFlags.SPLIT_2G)
        last = self.extents[-1]
        grow = new_size - self.size
        # 1. grow the last extent
        room = (SPLIT_SIZE - last.length) if split else grow
        take = min(grow, max(room, 0))
        # a sparse extent's header names its size too (qemu reads that one): growing it and
        # adding extents could not switch at once, so new extents then take the whole growth
        if take < grow and isinstance(last, SparseExtent):
            take = 0
        if take > 0:
            self._grow_extent(last, last.length + take)
            grow -= take
        # 2. new extents (split images)
        index = len(self.extents)
        stem = os.path.splitext(os.path.basename(self.location))[0]
        sparse = isinstance(last, SparseExtent)
        pending = []
        while grow > 0:
            n = min(grow, SPLIT_SIZE)
            index += 1
            name = f"{stem}-{'s' if sparse else 'f'}{index:03d}.vmdk"
            line = ExtentLine("RW", n // SECTOR, "SPARSE" if sparse else "FLAT", name, 0)
            pending.append(
                (os.path.join(os.path.dirname(os.path.abspath(self.location)), name), line)
            )
            grow -= n
        if pending:
            with atomic_files([p for p, _ in pending]) as temps:
                for tmp, (_p, line) in zip(temps, pending):
                    f = ImageFile(tmp, create=True)
                    try:
                        if sparse:
                            write_sparse_extent(f, line.sectors, None)
                        else:  # flat extents hold their blocks
                            f.truncate(line.sectors * SECTOR)
                            preallocate(f, 0, line.sectors * SECTOR, _p)
                    finally:
                        f.close()
            for p, line in pending:
                self.desc.add_extent(line)
                vstart = self.extents[-1].vstart + self.extents[-1].length
                self.extents.append(self.opener.extent(line, vstart, p, writable=True))
                self.extent_paths.append(p)
        self._starts = [e.vstart for e in self.extents]
        self.size = new_size
        self._write_descriptor()
        prog.finish()

    def _grow_extent(self, ext: Extent, new_len: int) -> None:
        i = self.extents.index(ext)
        line = ext.line
        if isinstance(ext, FlatExtent):
            if ext.f.is_device:
                raise NotSupported(f"{self.location}: an extent on a device cannot be grown")
            need = ext.base + new_len
            have = ext.f.size()
            if have < need:
                require_space(ext.f.path, need - have, "the grown flat extent")
                ext.f.truncate(need)
                preallocate(ext.f, have, need - have)
        elif isinstance(ext, SparseExtent):
            self._grow_sparse(ext, new_len // SECTOR)
        else:
            raise NotSupported(f"{self.location}: a {ext.kind} extent cannot be grown")
        line.sectors = new_len // SECTOR
        ext.length = new_len
        self.desc.set_extent(i, line)

    def _grow_sparse(self, ext: SparseExtent, new_cap: int) -> None:
        if ext.header is None:
            raise NotSupported(f"{self.location}: this sparse extent cannot be grown")
        per_gt = ext.grain_sectors * ext.gtes
        n_new = ceil_div(new_cap, per_gt)
        f = ext.f
        hdr = dict(ext.header)
        if n_new > ext.n_gts:
            gd = array.array("I", ext.gd) + array.array("I", bytes(4 * (n_new - ext.n_gts)))
            rgd = None
            if ext.rgd is not None:
                rgd = array.array("I", ext.rgd) + array.array("I", bytes(4 * (n_new - ext.n_gts)))
            # new tables (zeroed: qemu writes only through allocated tables) in one run at the
            # end: past the end of the file the file's growth zeroes them, nothing is written
            gt_bytes = ext.gt_sectors * SECTOR
            per = 2 if rgd is not None else 1
            start = ext._alloc(gt_bytes * per * (n_new - ext.n_gts))
            end = ext.next_free
            if start >= f.size():
                f.truncate(end)
            else:
                f.pwrite(start, bytes(end - start))
            off = start
            for t in range(ext.n_gts, n_new):
                gd[t] = off // SECTOR
                off += gt_bytes
                if rgd is not None:
                    rgd[t] = off // SECTOR
                    off += gt_bytes
            old_room = align_up(ext.n_gts * 4, SECTOR)
            gd_sector, rgd_sector = ext.gd_sector, ext.rgd_sector
            if n_new * 4 > old_room:  # the directories move to the end
                gsz = align_up(n_new * 4, SECTOR)
                gd_sector = ext._alloc(gsz) // SECTOR
                if rgd is not None:
                    rgd_sector = ext._alloc(gsz) // SECTOR
            f.pwrite(gd_sector * SECTOR, u32_bytes(gd))
            if rgd is not None:
                f.pwrite(rgd_sector * SECTOR, u32_bytes(rgd))
            f.sync()
            ext.gd, ext.rgd, ext.n_gts = gd, rgd, n_new
            ext.gd_sector, ext.rgd_sector = gd_sector, rgd_sector
            ext.file_size = max(ext.file_size, ext.next_free)
            hdr.update(gd_offset=gd_sector, rgd_offset=rgd_sector if rgd is not None else 0)
        hdr["capacity"] = new_cap
        f.pwrite(ext.header_offset, SparseHeader.build(hdr))  # header last
        f.sync()
        ext.header = hdr
        ext.capacity = new_cap

    # -- COMPACT -----------------------------------------------------------------------------
    def compact(self, progress: ProgressCallback | None = None,
                parent_read: FillFn | None = None) -> None:
        """Drop grains that read as zeroes (base) or as the parent does (diff), then move the
        last grains into the holes and shrink the files. Every move is: copy the grain into
        free space, sync, then point both grain tables at it; a grain's old place is never
        reused before its tables point elsewhere, so an interruption leaves a valid image."""
        self.require_writable()
        sparse = [e for e in self.extents if isinstance(e, SparseExtent) and e.writable]
        if not sparse:
            raise NotSupported(
                f"{self.location}: only sparse (not fixed, not streamOptimized) "
                "VMDK images can be compacted"
            )
        total = sum(self._count_grains(e) for e in sparse) * 2 or 1
        prog = Progress(progress, total)
        prog.start()
        for e in sparse:
            self._compact_extent(e, parent_read, prog)
        prog.finish()

    # -- DISCARD -------------------------------------------------------------------------------
    def discard(self, offset: int, length: int, fill: FillFn | None = None) -> None:
        """Whole grains of sparse extents leave their tables (a base: unallocated; a child:
        zeroed-grain entries), tables synced, then their space punched; parts of grains are
        zeroed. Refused (NotSupported) when a piece lies in an extent that is not a writable
        sparse one, or in a child whose extents have no zeroed-grain entries."""
        self.require_writable()
        diff = self.is_diff
        pieces: list[tuple[SparseExtent, int, int]] = []
        for ext, rel, n in list(self._pieces(offset, length)):
            if not isinstance(ext, SparseExtent) or not ext.writable or \
                    (diff and not ext.zero_grain):
                raise NotSupported(f"{self.location}: discard is not supported for this "
                                   f"VMDK ({self.create_type}{', a child' if diff else ''})")
            pieces.append((ext, rel, n))
        self.write(offset, b"", fill)            # the checks and the CID a change needs
        for ext, rel, n in pieces:
            values: dict[int, int] = {}
            gone: list[int] = []
            for idx, inner, pos, cnt in split_blocks(rel, n, ext.grain):
                gte = ext._gte(idx)
                glen = min(ext.grain, ext.length - idx * ext.grain)
                if inner == 0 and cnt >= glen:
                    new = 1 if diff else 0
                    if gte != new and not (gte == 1 and not diff):
                        values[idx] = new
                        if gte > 1:
                            gone.append(gte * SECTOR)
                elif gte > 1:
                    ext.f.pwrite(gte * SECTOR + inner, zeroes(cnt))
                elif gte == 0 and diff:                 # over the parent: zeroes stored
                    if fill is None:
                        raise NotSupported(f"{self.location}: discarding part of a grain held "
                                           "by the parent needs the parent's content")
                    saved = self.honor_zeroes
                    self.honor_zeroes = True
                    try:
                        self.write(ext.vstart + pos, zeroes(cnt), fill)
                    finally:
                        self.honor_zeroes = saved
            if values:
                ext.set_gtes(values)
                ext.f.sync()                        # the tables stop naming the grains first
                punch_blocks(ext.f, gone, ext.grain)

    def close_holes(self, progress: ProgressCallback | None = None) -> bool:
        """After discards: in each writable sparse extent the last grains move down into the
        holes, in place (compact's second half), and the file is cut."""
        self.require_writable()
        sparse = [e for e in self.extents if isinstance(e, SparseExtent) and e.writable]
        if not sparse or len(sparse) != len(self.extents):
            return False
        prog = Progress(progress, sum(self._count_grains(e) for e in sparse) or 1)
        prog.start()
        for e in sparse:
            live = []
            for t in range(e.n_gts):
                gt = e._gt(t)
                if gt is not None:
                    live += [(v * SECTOR, t * e.gtes + i) for i, v in enumerate(gt) if v > 1]
            self._pack_extent(e, live, prog)
        prog.finish()
        return True

    def _count_grains(self, e: SparseExtent) -> int:
        n = 0
        for t in range(e.n_gts):
            gt = e._gt(t)
            if gt is not None:
                n += sum(1 for v in gt if v > 1)
        return n

    def _compact_extent(self, e: SparseExtent, parent_read: FillFn | None,
                        prog: Progress) -> None:
        f = e.f
        diff = self.is_diff
        live: list[tuple[int, int]] = []  # (file offset, grain index)
        # 1. drop grains that add nothing
        for t in range(e.n_gts):
            gt = e._gt(t)
            if gt is None:
                continue
            for i in range(e.gtes):
                v = gt[i]
                if v <= 1:
                    continue
                idx = t * e.gtes + i
                vstart = e.vstart + idx * e.grain
                glen = min(e.grain, e.length - idx * e.grain)
                if glen <= 0:
                    live.append((v * SECTOR, idx))
                    continue
                data = f.pread(v * SECTOR, glen)
                prog.advance(1)
                if len(data) < glen:
                    raise CorruptImage(
                        f"grain {idx} lies past the end of the file",
                        path=f.path,
                        found=f"sector {v}",
                    )
                if not diff:
                    drop = is_zero(data)
                    new = 0
                else:
                    below = parent_read(vstart, glen) if parent_read else bytes(glen)
                    drop = data == below
                    new = 0
                    if not drop and e.zero_grain and is_zero(data):
                        drop, new = True, 1
                if drop:
                    e._set_gte(idx, new)
                else:
                    live.append((v * SECTOR, idx))
        f.sync()
        self._pack_extent(e, live, prog)

    def _pack_extent(self, e: SparseExtent, live: list[tuple[int, int]],
                     prog: Progress) -> None:
        """Fixed metadata outside the first overhead stays; the grains in ``live`` ((file
        offset, grain index)) move down into the holes; the file is cut."""
        f = e.f
        base_end = (e.header["overhead"] if e.header else 0) * SECTOR
        base_end = max(base_end, SECTOR)
        if len({o for o, _ in live}) != len(live) or any(o < base_end for o, _ in live):
            raise CorruptImage(
                "grain tables reference a grain twice or point into the metadata "
                "area; run check --repair first (nothing was moved)",
                path=f.path,
            )
        fixed: list[tuple[int, int]] = []
        gsz = align_up(e.n_gts * 4, SECTOR)
        for sec in (e.gd_sector, e.rgd_sector):
            if sec:
                fixed.append((sec * SECTOR, sec * SECTOR + gsz))
        for arr in (e.gd, e.rgd):
            if arr is not None:
                for sec in arr:
                    if sec:
                        fixed.append((sec * SECTOR, sec * SECTOR + e.gt_sectors * SECTOR))
        fixed = [(a, b) for a, b in fixed if b > base_end]
        occupied = fixed + [(o, o + e.grain) for o, _ in live]
        kept_end = max([base_end] + [b for _a, b in fixed])
        # the last grains into the lowest holes: copies, sync, both grain tables, sync
        moves = plan_moves(
            [(o, e.grain, idx) for o, idx in live], holes_between(occupied, start=base_end), SECTOR
        )
        move_blocks(
            f,
            moves,
            lambda ms: e.set_gtes({m.key: m.dst // SECTOR for m in ms}),
            advance=lambda _n: prog.advance(1),
        )
        for _off, idx in live:
            cur = e._gte(idx) * SECTOR
            kept_end = max(kept_end, cur + e.grain)
        kept_end = align_up(kept_end, SECTOR)
        if kept_end < f.size():
            f.truncate(kept_end)
        e.file_size = f.size()
        e.next_free = align_up(e.file_size, SECTOR)
        f.sync()
