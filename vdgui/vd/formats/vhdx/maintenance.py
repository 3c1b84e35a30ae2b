"""VHDX resize (grow: BAT moved to the end when it outgrows its region; shrink), compact
(blocks into the lowest holes) and check/repair."""
from __future__ import annotations

import struct
from array import array

from ...align import align_up, ceil_div
from ...backend import too_large
from ...compaction import holes_between, move_blocks, overlapping, plan_moves
from ...errors import InvalidArgument, NotSupported
from ...image import CheckReport, FillFn, Problem, ProblemCode
from ...progress import Progress, ProgressCallback
from ...space import preallocate, require_space
from ...sparse import is_zero, zeroes
from ...tables import table_to_bytes
from .layout import (
    BAT_GUID,
    HEADER_OFFSETS,
    MAX_SIZE,
    OFFSET_SHIFT,
    PAYLOAD_FULLY_PRESENT,
    PAYLOAD_NOT_PRESENT,
    PAYLOAD_PARTIALLY_PRESENT,
    PAYLOAD_ZERO,
    REGION_OFFSETS,
    SB_NOT_PRESENT,
    SB_PRESENT,
    STATE_MASK,
    STATE_NAMES,
    VIRTUAL_DISK_SIZE,
    MiB,
    RegionTableEntry,
    bat_entry_count,
    guid_from_bytes,
    limit_reason,
    with_checksum,
)
from .state import VhdxState


class MaintenanceMixin(VhdxState):
    """Resize, compact and check of a :class:`.image.VhdxImage`."""

    def _relocate_bat(self, count: int) -> None:
        """Move the BAT to a larger region at the end of the file: the new BAT is written and
        flushed first, then region table 1, then region table 2 (each with its checksum). An
        interruption leaves either the old or the new table valid, each naming a complete BAT."""
        new_len = align_up(count * 8, MiB)
        if new_len > 0xFFFFFFFF - MiB:
            raise NotSupported(f"{self.location}: the BAT would exceed a region's 4 GiB limit")
        new_off = self._allocate(new_len)
        self.f.pwrite(new_off, table_to_bytes(self.bat))
        self.f.sync()
        old_off, old_len = self.bat_offset, self.bat_length
        raw = bytearray(self.region_raw)
        for k, e in enumerate(self.region_entries):
            if guid_from_bytes(e.guid) == BAT_GUID:
                e = dict(e)
                e.pop("_io", None)
                e.update(file_offset=new_off, length=new_len)
                raw[16 + 32 * k:48 + 32 * k] = RegionTableEntry.build(e)
                self.region_entries[k] = RegionTableEntry.parse(raw[16 + 32 * k:48 + 32 * k])
        with_checksum(raw)
        for off in REGION_OFFSETS:
            self.f.pwrite(off, bytes(raw))
            self.f.sync()
        self.region_raw = bytes(raw)
        self.vregions[BAT_GUID] = (new_off, new_len)
        self.bat_offset, self.bat_length = new_off, new_len
        self.f.punch_hole(old_off, old_len)

    # -- operations ----------------------------------------------------------------------
    def resizes_in_place(self, new_size: int) -> bool:
        # growing when the BAT region has room: entries past the old end are zeroed (nothing
        # reads them yet), then one metadata write names the new size
        if new_size <= self.size or self.leave_allocated or new_size > MAX_SIZE:
            return False
        count = bat_entry_count(new_size, self.block_size, self.sector_size, self.has_parent)
        return count * 8 <= self.bat_length

    def resize(self, new_size: int, progress: ProgressCallback | None = None) -> None:
        self.require_writable()
        self._fresh.clear()
        if new_size % self.sector_size:
            raise InvalidArgument(f"{self.location}: new size must be a multiple of "
                                  f"{self.sector_size} bytes, found {new_size}")
        if new_size > self.max_size:
            raise too_large("VHDX", new_size, self.max_size, self.location,
                            limit_reason(self.block_size))
        if new_size == self.size:
            return
        if new_size < self.size:
            self._shrink(new_size)
            if progress:
                progress(1, 1)
            return
        count = bat_entry_count(new_size, self.block_size, self.sector_size, self.has_parent)
        self._begin_write()
        if count * 8 > self.bat_length:
            self._relocate_bat(count)
        old_blocks = self.payload_blocks
        new_bat = array("Q", self.bat) + array("Q", bytes(8 * (count - len(self.bat))))
        # entries past the old end must read as "not present" before the size grows
        start = len(self.bat)
        if count > start:
            self.f.pwrite(self.bat_offset + 8 * start, bytes(8 * (count - start)))
        self.bat = new_bat
        self.bat_count = count
        self.payload_blocks = ceil_div(new_size, self.block_size)
        if self.leave_allocated and not self.has_parent:
            first = self.alloc_end
            require_space(self.location, (self.payload_blocks - old_blocks) * self.block_size,
                          "the grown fixed image")
            for blk in range(old_blocks, self.payload_blocks):
                off = self._allocate(self.block_size)
                self._set_entry(self._bat_index(blk), PAYLOAD_FULLY_PRESENT, off)
            preallocate(self.f, first, self.alloc_end - first)
        self.f.sync()
        self._write_metadata_item(VIRTUAL_DISK_SIZE, struct.pack("<Q", new_size))
        self.size = new_size
        if progress:
            progress(1, 1)

    def _in_use(self) -> tuple[list[tuple[int, int, int, int]], int]:
        """The blocks the BAT names (file offset, length, BAT index, state) and the end of the
        header, regions and log rounded up to a MiB (nothing may move below it)."""
        used = []
        for idx in range(self.bat_count):
            e = self.bat[idx]
            st, off = e & STATE_MASK, (e >> OFFSET_SHIFT) * MiB
            is_sb = idx % (self.cr + 1) == self.cr
            if is_sb and st == SB_PRESENT:
                used.append((off, MiB, idx, st))
            elif not is_sb and st in (PAYLOAD_FULLY_PRESENT, PAYLOAD_PARTIALLY_PRESENT):
                used.append((off, self.block_size, idx, st))
        end = MiB
        for o, ln in self.vregions.values():
            end = max(end, o + ln)
        if self.hdr.log_length:
            end = max(end, self.hdr.log_offset + self.hdr.log_length)
        return used, align_up(end, MiB)

    def _shrink(self, new_size: int) -> None:
        """Cut the virtual size (refused when this image holds data past ``new_size``; the
        operation has checked the whole chain): BAT entries past the new end become "not
        present" (zeroed in the BAT region), the size is written, and the file is cut after the
        last block still in use."""
        self._refuse_cut_data(new_size)
        count = bat_entry_count(new_size, self.block_size, self.sector_size, self.has_parent)
        self._begin_write()
        if count < self.bat_count:
            self.f.pwrite(self.bat_offset + 8 * count, bytes(8 * (self.bat_count - count)))
        self.f.sync()
        self.bat = array("Q", self.bat[:count])
        self.bat_count = count
        self.payload_blocks = ceil_div(new_size, self.block_size)
        self._sb_cache.clear()
        self._write_metadata_item(VIRTUAL_DISK_SIZE, struct.pack("<Q", new_size))
        self.size = new_size
        self.f.sync()
        used, end = self._in_use()
        end = max([end] + [off + ln for off, ln, _i, _s in used])
        if end < self.file_len:
            self.f.truncate(end)
            self.file_len = self.alloc_end = end

    def compact(self, progress: ProgressCallback | None = None,
                parent_read: FillFn | None = None) -> None:
        """Drop blocks that read as zeroes (base) or as the parent (differencing; a zero block over
        non-zero parent data becomes a ZERO entry), move the remaining blocks down into the holes
        and shrink the file. The user-visible content does not change, so neither does the
        DataWriteGuid (children stay linked). Fixed images keep every block allocated."""
        self.require_writable()
        self._fresh.clear()
        total = self.payload_blocks
        done = 0
        for blk in range(self.payload_blocks):
            if progress and progress(done, total + 1) is False:
                from ...errors import Cancelled
                raise Cancelled()
            done += 1
            st = self._check_state(blk)
            if self.leave_allocated or st != PAYLOAD_FULLY_PRESENT:
                continue
            start = blk * self.block_size
            n = min(self.block_size, self.size - start)
            data = self.read(start, n)
            idx = self._bat_index(blk)
            if not self.has_parent:
                if is_zero(data):
                    self._set_entry(idx, PAYLOAD_NOT_PRESENT, 0)
                continue
            below = parent_read(start, n) if parent_read else zeroes(n)
            if data == below:
                self._set_entry(idx, PAYLOAD_NOT_PRESENT, 0)
            elif is_zero(data):
                self._set_entry(idx, PAYLOAD_ZERO, 0)
        self.f.sync()
        self._pack()
        if progress:
            progress(total + 1, total + 1)

    def close_holes(self, progress: ProgressCallback | None = None) -> bool:
        """After discards: the blocks above the holes move down into them, in place, and the
        file is cut after the last block in use (no content is read to judge it)."""
        self.require_writable()
        if self.leave_allocated:
            return False
        self._fresh.clear()
        self._pack(progress)
        return True

    def _pack(self, progress: ProgressCallback | None = None) -> None:
        """The highest blocks move into the lowest holes past the metadata
        (compaction.move_blocks: copies, sync, BAT entries, sync); blocks overlapping the
        metadata or each other (check reports such images) stay. Then the file is cut."""
        used, meta_end = self._in_use()
        blocks = [(off, ln, (idx, st)) for off, ln, idx, st in used]
        stuck = overlapping(blocks)
        movable = [b for b in blocks if b[0] >= meta_end and b[2] not in stuck]
        taken = [(0, meta_end)] + [(off, off + ln) for off, ln, _k in blocks]
        moves = plan_moves(movable, holes_between(taken), MiB)
        prog = Progress(progress, sum(m.length for m in moves))
        prog.start()
        move_blocks(self.f, moves,
                    lambda ms: self._set_entries({m.key[0]: (m.key[1], m.dst) for m in ms}),
                    advance=prog.advance)
        gone = {m.src for m in moves}
        target = max([meta_end] + [off + ln for off, ln, _k in blocks if off not in gone] +
                     [m.dst + m.length for m in moves])
        self._sb_cache.clear()
        self.f.truncate(target)
        self.file_len = target
        self.alloc_end = target
        prog.finish()

    def check(self, repair: bool = False, dry_run: bool = False,
              progress: ProgressCallback | None = None) -> CheckReport:
        """Headers, log state and every BAT entry (state, range, overlaps). Repair (read-write
        images): the log was already replayed by the open; a damaged header copy is rewritten;
        BAT entries with an invalid state or pointing outside the file become "not present"."""
        rep = CheckReport()
        fix = repair and not dry_run and not self.read_only
        if self.log_replayed:
            rep.problems.append(Problem("corrupt", "the log held changes that were not replayed; "
                                        "replayed on open", self.hdr.log_offset, repaired=True,
                                        code=ProblemCode.LOG_PENDING))
        elif self.log_pending:
            rep.problems.append(Problem("corrupt", "the log holds changes that need to be "
                                        "replayed", self.hdr.log_offset,
                                        code=ProblemCode.LOG_PENDING))
        for p in getattr(self, "header_problems", []):
            rep.problems.append(Problem("corrupt", p,
                                        HEADER_OFFSETS[1 - self.hdr_slot], repaired=fix,
                                        code=ProblemCode.HEADER_COPY))
        if fix and self.header_problems:
            self._update_header()
            self.header_problems = []
        bad: list[tuple[int, int]] = []
        # (start, end, name, BAT index or None): checked for overlaps after one sort
        spans = self._fixed_spans()
        for idx in range(self.bat_count):
            e = self.bat[idx]
            st, off = e & STATE_MASK, (e >> OFFSET_SHIFT) * MiB
            is_sb = idx % (self.cr + 1) == self.cr
            where = self.bat_offset + 8 * idx
            if is_sb:
                if st == SB_NOT_PRESENT:
                    continue
                if st != SB_PRESENT or not self.has_parent:
                    rep.problems.append(Problem("corrupt", f"BAT[{idx}]: invalid sector bitmap "
                                                f"state {st}", where, repaired=fix,
                                                code=ProblemCode.ENTRY_INVALID))
                    bad.append((idx, SB_NOT_PRESENT))
                    continue
                need = length = MiB
                what = "sector bitmap block"
            else:
                blk = idx - idx // (self.cr + 1)
                if st not in STATE_NAMES:
                    rep.problems.append(Problem("corrupt", f"BAT[{idx}]: invalid payload block "
                                                f"state {st}", where, repaired=fix,
                                                code=ProblemCode.ENTRY_INVALID))
                    bad.append((idx, PAYLOAD_NOT_PRESENT))
                    continue
                if st not in (PAYLOAD_FULLY_PRESENT, PAYLOAD_PARTIALLY_PRESENT):
                    continue
                if blk >= self.payload_blocks:
                    continue
                need = min(self.block_size, self.size - blk * self.block_size)
                length, what = align_up(need, MiB), f"payload block {blk}"
            if off < MiB or off + need > self.file_len:
                rep.problems.append(Problem("corrupt", f"BAT[{idx}]: {what} at {off:#x} lies "
                                            f"outside the file ({self.file_len} bytes)", where,
                                            repaired=fix, code=ProblemCode.ENTRY_PAST_END))
                bad.append((idx, SB_NOT_PRESENT if is_sb else PAYLOAD_NOT_PRESENT))
                continue
            spans.append((off, off + length, f"{what} (BAT[{idx}])", idx))
        spans.sort(key=lambda t: (t[0], t[1]))
        reach, reach_name, reach_idx = 0, "", None
        moves: list[tuple[int, int, int]] = []      # (BAT index, offset, length) to copy
        for s1, e1, n1, i1 in spans:
            if s1 < reach:
                at = self.bat_offset + 8 * i1 if i1 is not None else None
                # repair gives the block its own copy of what it reads now (the block that
                # meets the metadata when the later span is a region)
                mover = i1 if i1 is not None else reach_idx
                if mover is not None and fix:
                    _st, off = self._entry(mover)
                    moves.append((mover, off, e1 - s1 if i1 is not None else reach - off))
                rep.problems.append(Problem("corrupt", f"{n1} at {s1:#x} overlaps {reach_name}",
                                            at, code=ProblemCode.OVERLAP,
                                            repaired=fix and mover is not None))
            if e1 > reach:
                reach, reach_name, reach_idx = e1, n1, i1
        for idx, off, length in moves:
            st, cur = self._entry(idx)
            if cur != off:
                continue                        # already moved
            data = self.f.pread(off, length)
            new = self._allocate(length)
            self.f.pwrite(new, data)
            self.f.sync()                       # the copy before the BAT entry naming it
            self._set_entry(idx, st, new)
        if moves:
            self._sb_cache.clear()
            self.f.sync()
            self._xlinks_checked = False
        if fix and bad:
            for idx, state in bad:
                self._set_entry(idx, state, 0)
            self._sb_cache.clear()
            self.f.sync()
        rep.repaired = any(p.repaired for p in rep.problems)
        if progress:
            progress(1, 1)
        return rep
