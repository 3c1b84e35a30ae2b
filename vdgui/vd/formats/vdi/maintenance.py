"""VDI compact (blocks into the lowest holes), resize (grow: map moved when it must; shrink),
discard and check/repair."""
from __future__ import annotations

import uuid as uuidlib
from array import array
from collections.abc import Sequence

from ...align import ceil_div
from ...backend import too_large
from ...compaction import Move, move_blocks, plan_moves, punch_blocks, slot_holes
from ...errors import CorruptImage, InvalidArgument, NotSupported
from ...geometry import vbox_lchs, vbox_pchs
from ...image import CheckReport, FillFn, Problem, ProblemCode
from ...progress import Progress, ProgressCallback
from ...space import preallocate, require_space
from ...sparse import is_zero, zeroes
from ...tables import CHUNK_ENTRIES as MAP_CHUNK
from ...tables import BlockTable
from . import layout as L
from .blockmap import _FREE, _ZERO, MAX_BLOCKS, _extend_free, _size_limit
from .state import VdiState


class MaintenanceMixin(VdiState):
    """Compact, resize, discard and check of a :class:`.image.VdiImage`."""

    def _used_blocks(self) -> tuple[array, int]:
        """Reverse map: file block index -> block map index (FREE for holes), up to the
        highest referenced file block."""
        limit = self._file_blocks()
        top = -1
        for v in self._map:
            if v < _ZERO and v < limit and v > top:
                top = v
        rev = array("I", [_FREE]) * (top + 1)
        for i, v in enumerate(self._map):
            if v < _ZERO and v < limit and rev[v] == _FREE:
                rev[v] = i
        return rev, top + 1

    def _close_holes(self) -> None:
        """Move the last referenced blocks into unreferenced file blocks (holes), set the count
        to the blocks in use, then truncate the file. The order is compaction.move_blocks':
        copies (into unreferenced blocks: a crash changes nothing visible), sync, the moved map
        entries, sync, the header, sync."""
        rev, n = self._used_blocks()
        total = self._total
        base = self.offset_data
        holes = slot_holes(rev, total, base, free=_FREE)
        free = sum(b - a for a, b in holes) // total
        blocks: list[tuple[int, int, int]] = []     # only the top ``free`` blocks can move
        j = n - 1
        while j >= 0 and len(blocks) < free:
            if rev[j] != _FREE:
                blocks.append((base + j * total, total, rev[j]))
            j -= 1
        used = n - free

        def repoint(moves: Sequence[Move[int]]) -> None:
            for m in moves:
                self._map[m.key] = (m.dst - base) // total
            self._write_map_entries([m.key for m in moves])

        def header() -> None:
            self.allocated = self._next = used
            self._write_header()

        move_blocks(self.f, plan_moves(blocks, holes), repoint, header=header)
        self.f.truncate(max(base + used * total, self.offset_blocks + self.blocks * 4))

    def compact(self, progress: ProgressCallback | None = None,
                parent_read: FillFn | None = None) -> None:
        self.require_writable()
        if self.image_type == L.TYPE_FIXED:
            raise NotSupported(f"{self.location}: fixed VDI images cannot be compacted "
                               "(all blocks are allocated by design)")
        if self._bad:
            raise CorruptImage("the block map is damaged; repair the image before compacting",
                               path=self.location)
        bs = self.block_size
        is_diff = self.parent_hint is not None
        nblocks = ceil_div(self.size, bs)
        todo = [i for i in range(nblocks) if self._map[i] != _FREE]
        prog = Progress(progress, len(todo) * bs)
        prog.start()
        changes: dict[int, int] = {}
        for i in todo:                      # scan phase: reads only, safe to cancel
            v = self._map[i]
            bstart = i * bs
            blen = min(bs, self.size - bstart)
            if v < _ZERO:
                data = self.f.pread(self._data_pos(v), blen)
                if len(data) < blen:
                    data += bytes(blen - len(data))
            else:
                data = None                  # ZERO entry
            if parent_read is not None and is_diff:
                below = parent_read(bstart, blen)
                if (data is None and is_zero(below)) or (data is not None and data == below):
                    changes[i] = _FREE
                elif data is not None and is_zero(data):
                    changes[i] = _ZERO
            elif data is None:
                if not is_diff:
                    changes[i] = _FREE
            elif is_zero(data):
                changes[i] = _ZERO if is_diff else _FREE
            prog.advance(bs)
        if changes:
            self._touch()
            for i, v in changes.items():
                self._map[i] = v
            self._write_map_entries(changes)
            self.f.sync()
        self._close_holes()
        prog.finish()

    def resizes_in_place(self, new_size: int) -> bool:
        # growing: the zeroed tail of the last block, blocks moved out of the way of a longer
        # map, the new map and new blocks all go to space nothing reads yet; the header (one
        # sector) then names the new size, map and data area at once. Moved blocks must stay
        # countable under the old layout (cBlocksAllocated <= cBlocks, as VirtualBox checks):
        # a map area with no spare entry and every block in use cannot do that
        if new_size <= self.size or self._v0 or self._bad:
            return False
        new_blocks = ceil_div(new_size, self.block_size)
        if self.offset_blocks + new_blocks * 4 <= self.offset_data:
            return True
        _k, _moves, nxt = self._relocation_plan(new_blocks)
        return self.offset_blocks + max(self.blocks, nxt) * 4 <= self.offset_data

    def resize(self, new_size: int, progress: ProgressCallback | None = None) -> None:
        self.require_writable()
        if new_size <= 0 or new_size % 512:
            raise InvalidArgument(f"{self.location}: new size must be a positive multiple of "
                                  f"512, found {new_size}")
        if new_size > self.max_size:
            raise too_large("VDI", new_size, self.max_size, self.location,
                            _size_limit(self.block_size))
        if self._v0:
            raise NotSupported(f"{self.location}: VDI v0 images cannot be resized")
        if self._bad:
            raise CorruptImage("the block map is damaged; repair the image before resizing",
                               path=self.location)
        prog = Progress(progress, 1)
        prog.start()
        bs = self.block_size
        old_size = self.size
        new_blocks = ceil_div(new_size, bs)
        if new_size > old_size:
            new_blocks = max(new_blocks, self.blocks)
        if new_blocks > MAX_BLOCKS:
            raise InvalidArgument(f"{self.location}: {new_size} bytes need {new_blocks} blocks "
                                  f"of {bs} bytes, more than the {MAX_BLOCKS} VDI allows")
        # the modification UUID stays, as VirtualBox's (VDResize and vdiResize leave it): a
        # differencing image naming it stays linked, so resize needs no look for children
        if new_size < old_size:
            self._shrink(new_size, new_blocks)
        elif new_size > old_size:
            self._grow(new_size, new_blocks)
        self.size = new_size
        self.header_disk_size = new_size
        if self._stored_pchs is not None:
            self._stored_pchs = vbox_pchs(new_size)
        self.pchs = self._stored_pchs or vbox_pchs(new_size)
        if self.lchs is not None:
            self.lchs = vbox_lchs(new_size)
        self._write_header()
        self.f.sync()
        prog.finish()

    def _shrink(self, new_size: int, new_blocks: int) -> None:
        bs = self.block_size
        self._refuse_cut_data(new_size)        # the part beyond the new end must hold no data
        freed: list[int] = []
        for i in range(new_blocks, self.blocks):
            if self._map[i] != _FREE:
                self._map[i] = _FREE
                freed.append(i)
        # zero the (now invisible) tail of the last block so a later grow reads zeroes
        self._zero_block_tail(new_blocks - 1, new_size - (new_blocks - 1) * bs)
        self._write_map_entries(freed)
        self.f.sync()
        self.blocks = new_blocks
        del self._map[new_blocks:]
        self.header_disk_size = new_size
        self._close_holes()

    def _zero_block_tail(self, idx: int, keep: int) -> None:
        bs = self.block_size
        v = self._map[idx]
        if v < _ZERO and keep < bs:
            self.f.pwrite(self._data_pos(v) + keep, zeroes(bs - keep))

    def _grow(self, new_size: int, new_blocks: int) -> None:
        """Everything but the header: the caller's header write makes the new size visible."""
        bs = self.block_size
        old_blocks = self.blocks
        last = ceil_div(self.size, bs) - 1
        self._zero_block_tail(last, self.size - last * bs)
        fixed = self.image_type == L.TYPE_FIXED
        total = self._total
        relocated = self.offset_blocks + new_blocks * 4 > self.offset_data
        if relocated:       # the new map is written and synced there
            self._relocate_for_map(new_blocks)
        else:
            _extend_free(self._map, new_blocks - len(self._map))
        if fixed:
            for i in range(old_blocks, new_blocks):
                if self._map[i] == _FREE:
                    self._map[i] = self._next
                    self._next += 1
            grown = self.offset_data + self._next * total
            old_end = self.f.size()
            if grown > old_end:
                require_space(self.location, grown - old_end, "the grown fixed image")
            self.f.truncate(grown)
            preallocate(self.f, old_end, grown - old_end)
        if fixed or not relocated:
            self._table.write_range(old_blocks, new_blocks)
            self.f.sync()
        self.blocks = new_blocks
        self.allocated = self._next

    def _relocation_plan(self, new_blocks: int) -> tuple[int, list[Move[int]], int]:
        """``(k, moves, next)``: a map of ``new_blocks`` entries takes the place of the first
        ``k`` file blocks; ``moves`` carry the used ones past the end, ``next`` is the first
        file block after them."""
        total = self._total
        k = ceil_div(new_blocks * 4, total)
        rev, n = self._used_blocks()
        # past every used block and past the new map area (file block k becomes block 0)
        nxt = max(self._next, n, k)
        moves: list[Move[int]] = []
        for j in range(min(k, n)):
            if rev[j] != _FREE:
                moves.append(Move(rev[j], self.offset_data + j * total,
                                  self.offset_data + nxt * total, total))
                nxt += 1
        return k, moves, nxt

    def _relocate_for_map(self, new_blocks: int) -> None:
        """Make room for a map of ``new_blocks`` entries, as two steps that each leave a valid
        image of the old size:

        1. the first ``k`` data blocks move past the end (compaction.move_blocks: copy, sync,
           repoint, sync); before the entries change, the header counts the new places
           (cBlocksAllocated, and cBlocks over spare free entries of the map area when the
           count would pass it);
        2. the new map, renumbered for a data area starting ``k`` blocks later, is written
           where those blocks were (space nothing reads now), then synced.

        The caller's header write (offBlocks, offData, size: one sector) switches to the new
        layout at once. The old map's sectors stay behind unused."""
        total = self._total
        k, moves, nxt = self._relocation_plan(new_blocks)

        old_blocks = self.blocks
        # spare entries of the map area (past the disk's end: no reader looks at them) name the
        # copies, then swap with the moved entries, so that every file block up to the count
        # is named exactly once at each step (qemu-img check wants that). Without spare
        # entries the count passes the vacated blocks until the new header
        room = (self.offset_data - self.offset_blocks) // 4
        spare = len(moves) if old_blocks + len(moves) <= room else 0
        if moves and old_blocks + spare - min(mv.key for mv in moves) > MAP_CHUNK:
            spare = 0           # the swap would take more than one write (a map of 4 MiB+)
        count = max(old_blocks + spare, nxt)

        def repoint(moved: Sequence[Move[int]]) -> None:
            if count > old_blocks:      # entries past cBlocks first, then the header counts them
                _extend_free(self._map, count - len(self._map))
                for i in range(spare):
                    self._map[old_blocks + i] = (moved[i].dst - self.offset_data) // total
                self._table.write_range(old_blocks, count)
                self.f.sync()
                self.blocks = count
            self.allocated = self._next = nxt      # the count first: a crash then only leaks
            self._write_header()
            self.f.sync()
            for i, mv in enumerate(moved):
                self._map[mv.key] = (mv.dst - self.offset_data) // total
                if i < spare:
                    self._map[old_blocks + i] = (mv.src - self.offset_data) // total
            # one write from the first moved entry to the last spare one: the swap is whole
            self._table.write_range(min(mv.key for mv in moved),
                                    old_blocks + spare if spare else
                                    max(mv.key for mv in moved) + 1)

        move_blocks(self.f, moves, repoint)
        m = array("I", self._map)
        for i in range(len(m)):
            v = m[i]
            if v < _ZERO:
                m[i] = v - k if i < old_blocks else _FREE     # spare entries: free again
        _extend_free(m, new_blocks - len(m))
        del m[new_blocks:]
        new_off_blocks = self.offset_data
        BlockTable(self.f, new_off_blocks, m).write_range(0, new_blocks)
        self.f.sync()
        self._map = m
        self.offset_blocks = new_off_blocks
        self.offset_data = new_off_blocks + k * total
        self.allocated = self._next = nxt - k

    def discard(self, offset: int, length: int, fill: FillFn | None = None) -> None:
        self.require_writable()
        self._refuse_cross_linked()
        if self._bad:
            raise CorruptImage("the block map is damaged; repair the image before discarding",
                               path=self.location)
        bs = self.block_size
        is_diff = self.parent_hint is not None
        end = offset + length
        pos = offset
        dirty = []
        gone: list[int] = []                        # file offsets of the blocks freed
        self._touch()
        while pos < end:
            idx, inner = divmod(pos, bs)
            n = min(bs - inner, end - pos)
            blen = min(bs, self.size - idx * bs)
            v = self._map[idx]
            whole = inner == 0 and n >= blen
            if v < _ZERO and idx in self._bad:
                raise CorruptImage(f"block map entry {idx} is damaged; repair the image first",
                                   path=self.location)
            if whole:
                target = _ZERO if is_diff else _FREE
                if v != target and not (v == _ZERO and not is_diff):
                    self._map[idx] = target
                    dirty.append(idx)
                    if v < _ZERO:
                        gone.append(self.offset_data + v * self._total)
            elif v < _ZERO:
                self.f.pwrite(self._data_pos(v) + inner, zeroes(n))
                data = self.f.pread(self._data_pos(v), blen)
                if is_zero(data):
                    self._map[idx] = _ZERO if is_diff else _FREE
                    dirty.append(idx)
                    gone.append(self.offset_data + v * self._total)
            elif v == _FREE and is_diff:
                if fill is None:
                    raise NotSupported(f"{self.location}: discarding part of a block held by "
                                       "the parent needs the parent's content")
                self._write(pos, memoryview(zeroes(n)), fill, honor=True)
            pos += n
        if dirty:
            self._write_map_entries(dirty)
            self.f.sync()                           # the map stops naming the blocks first
        if gone:
            # their space goes back now; the file is packed once, by close_holes (sparsify
            # after all its discards) or when the image is closed: one pass, not one per call
            punch_blocks(self.f, gone, self._total)
            self._discarded = True

    def close_holes(self, progress: ProgressCallback | None = None) -> bool:
        """After discards: the last blocks move into the holes, in place, and the file is cut
        (compaction.move_blocks' order)."""
        self.require_writable()
        self._close_holes()
        self._discarded = False
        if progress:
            progress(1, 1)
        return True

    def check(self, repair: bool = False, dry_run: bool = False,
              progress: ProgressCallback | None = None) -> CheckReport:
        fix = repair and not dry_run
        if fix:
            self.require_writable()
        report = CheckReport()
        prog = Progress(progress, max(1, self.blocks))
        prog.start()

        def add(sev: str, what: str, off: int | None, code: str) -> None:
            report.problems.append(Problem(sev, what, off, repaired=fix, code=code))

        hdr_fix = False
        if self.header_disk_size % 512:
            add("corrupt", f"header field 'cbDisk' ({self.header_disk_size}) is not a multiple "
                           f"of 512; repair rounds it down to {self.size}",
                self._offs["disk_size"], ProblemCode.HEADER_FIELD)
            hdr_fix = True
        if self.uuid is None:
            add("corrupt", "header field 'uuidCreate' is the null UUID; repair assigns a new one",
                self._offs["uuid_create"], ProblemCode.HEADER_FIELD)
            hdr_fix = True
        if self.modification_uuid is None:
            add("corrupt", "header field 'uuidModify' is the null UUID; repair assigns a new one",
                self._offs["uuid_modify"], ProblemCode.HEADER_FIELD)
            hdr_fix = True
        limit = self._file_blocks()
        seen = bytearray(limit)
        cleared = []
        used = 0
        top = -1
        for i, v in enumerate(self._map):
            if v >= _ZERO:
                continue
            eoff = self.offset_blocks + 4 * i
            if v >= limit:
                add("corrupt", f"block map entry {i} points to file block {v} at "
                               f"{self.offset_data + v * self._total:#x}, past the end of the "
                               f"file ({limit} blocks fit); repair clears the entry", eoff,
                    ProblemCode.ENTRY_PAST_END)
                cleared.append(i)
            elif seen[v]:
                add("corrupt", f"block map entry {i} points to file block {v}, which another "
                               "entry already uses (cross-linked); repair clears the entry", eoff,
                    ProblemCode.CROSS_LINKED)
                cleared.append(i)
            else:
                seen[v] = 1
                used += 1
                top = max(top, v)
        holes = top + 1 - used
        if self.allocated < top + 1:
            add("corrupt", f"header field 'cBlocksAllocated' is {self.allocated} but file blocks "
                           f"up to {top} are in use (new blocks would overwrite data); "
                           f"repair sets it to {used}", self._offs["blocks_allocated"],
                ProblemCode.ALLOC_POINTER)
        elif self.allocated > top + 1:
            in_use = "1 block is" if used == 1 else f"{used} blocks are"
            add("leak", f"header field 'cBlocksAllocated' is {self.allocated} but only "
                        f"{in_use} in use; repair sets it to {used}",
                self._offs["blocks_allocated"], ProblemCode.LEAK)
        if holes > 0:
            add("leak", f"{holes} file block(s) below block {top} are not referenced by the "
                        "map; repair compacts the data area", self.offset_data, ProblemCode.LEAK)
        # every whole block slot of the file no entry references: a repair drops it
        report.orphans = [(self.location, self.offset_data + v * self._total, self._total)
                          for v in range(limit) if not seen[v]]
        want = max(self.offset_data + (top + 1) * self._total,
                   self.offset_data + self.allocated * self._total,
                   self.offset_blocks + self.blocks * 4)
        fsize = self.f.size()
        if fsize > want:
            add("leak", f"{fsize - want} bytes after the last block are unused; repair "
                        "truncates the file", want, ProblemCode.LEAK)
        prog.set(self.blocks)
        if fix and report.problems:
            self._touch()
            if self.uuid is None:
                self.uuid = uuidlib.uuid4()
            if self.modification_uuid is None:
                self.modification_uuid = uuidlib.uuid4()
            if hdr_fix:
                self.header_disk_size = self.size
            for i in cleared:
                self._map[i] = _FREE
            self._write_map_entries(cleared)
            self.f.sync()
            self._bad = set()
            self._close_holes()         # densify, fix the count, truncate, write the header
            self._scan_map()
            report.repaired = True
        prog.finish()
        return report
