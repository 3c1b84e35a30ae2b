"""VHD resize (grow and shrink; fixed and dynamic), compact (redundant blocks dropped, blocks
packed into holes, file cut) and check/repair."""
from __future__ import annotations

from collections.abc import Sequence

from ...align import ceil_div
from ...compaction import Move, holes_between, move_blocks, plan_moves, punch_blocks
from ...errors import InvalidArgument, NotSupported
from ...geometry import Geometry, vhd_chs
from ...image import CheckReport, FillFn, Problem, ProblemCode
from ...progress import Progress, ProgressCallback
from ...space import preallocate, require_space
from ...sparse import is_zero, split_blocks, zeroes
from .fields import _round, bitmap_runs, fixed_geometry, round_size_to_chs
from .layout import (
    CURRENT_SIZE_CREATORS,
    FOOTER,
    FOOTER_SIZE,
    FREE,
    LOCATOR_SPACE,
    MAX_LOCATOR,
    MAX_VIRTUAL,
    SECTOR,
    TYPE_DIFF,
    TYPE_FIXED,
)
from .state import VhdState


class MaintenanceMixin(VhdState):
    """Resize, compact and check of a :class:`.image.VhdImage`."""

    # -- RESIZE ---------------------------------------------------------------------------------
    def _new_size_and_geometry(self, new_size: int) -> tuple[int, Geometry]:
        """Fixed and differencing disks and current-size creators keep the exact size; the others
        round up to a size their CHS geometry describes (what readers will compute)."""
        if self.disk_type == TYPE_DIFF or bytes(self.footer.creator_app) in CURRENT_SIZE_CREATORS:
            return new_size, vhd_chs(new_size)
        if self.disk_type == TYPE_FIXED:
            return new_size, fixed_geometry(new_size)
        return round_size_to_chs(new_size)

    def resizes_in_place(self, new_size: int) -> bool:
        # growing: blocks in the way of a longer BAT move to the end (copy, sync, repoint), the
        # new entries and count go to space the old size never reads, and the footer (fixed:
        # moved to the new end first) names the new size last
        return (new_size > self.size and not self._bad and not self._problems
                and (self.is_fixed or not self._intersects_footer))

    def resize(self, new_size: int, progress: ProgressCallback | None = None) -> None:
        self.require_writable()
        if new_size <= 0 or new_size % SECTOR:
            raise InvalidArgument(f"{self.location}: new size must be a positive multiple of 512, "
                                  f"found {new_size}")
        if new_size > MAX_VIRTUAL:
            raise InvalidArgument(f"{self.location}: VHD images can be at most {MAX_VIRTUAL} bytes")
        size, geo = self._new_size_and_geometry(new_size)
        prog = Progress(progress, 1)
        prog.start()
        if size < self.size:
            self._refuse_cut_data(size)
        if self.is_fixed:
            self._resize_fixed(size)
        else:
            self._resize_dynamic(size, prog)
        self.footer.current_size = size
        self.footer.cylinders, self.footer.heads, self.footer.sectors = geo
        if self.is_fixed:
            self._write_footer_at(self.footer_offset)
            self.footer = FOOTER.parse(self._footer_bytes())
        else:
            self._store_footer()
        self.f.sync()
        self.size = size
        self.pchs = Geometry(*geo)
        self.size_rounded_from = new_size if size != new_size else None
        if not self.is_fixed:
            shrunk = self.n_blocks > ceil_div(size, self.block_size)
            self.n_blocks = ceil_div(size, self.block_size)
            del self.bat[self.n_blocks:]
            self._rescan()
            if shrunk:
                self._pack()              # the dropped tail blocks leave holes: close them
        prog.finish()

    def _resize_fixed(self, size: int) -> None:
        """Grow: the footer, still naming the old size, goes to the new end first (the image
        reads as before), then its old place and the new area become zeroes, then the caller
        writes the footer with the new size in the same place (one sector: the new size)."""
        old_footer = self.footer_offset
        if size > old_footer:
            require_space(self.location, size - old_footer, "the grown fixed image")
            self.f.pwrite(size, self._footer_bytes())
            self.f.sync()
            self.f.pwrite(old_footer, bytes(FOOTER_SIZE))
            preallocate(self.f, old_footer, size - old_footer)
            self.f.sync()
        else:
            self.footer.current_size = size
            self.f.pwrite(size, self._footer_bytes())
            self.f.truncate(size + FOOTER_SIZE)
        self.footer_offset = size
        self.fsize = size + FOOTER_SIZE

    def _resize_dynamic(self, size: int, prog: Progress) -> None:
        need = ceil_div(size, self.block_size)
        old = self.n_blocks
        if need <= old:
            for i in range(need, old):       # blocks beyond the new end (holding zeroes) go
                if self.bat[i] != FREE:
                    self._set_bat(i, FREE)
            return
        table_end = self.bat_offset + _round(need * 4)
        # everything in the way of the longer table moves to the end of the file
        if any(s < table_end and e > self.bat_offset + old * 4
               for s, e, n in self._meta_regions() if n in ("footer copy", "dynamic disk header")):
            raise NotSupported(f"{self.location}: the dynamic header follows the BAT; "
                               "cannot grow it")
        self._move_out_of(table_end, old)
        for li in range(8):
            loc = self.dyn_header.locators[li]  # fresh: _store_header replaces the header
            if bytes(loc.code) == b"\x00\x00\x00\x00" or not loc.data_length:
                continue
            if (
                loc.data_offset < table_end
                and loc.data_offset + loc.data_length > self.bat_offset + old * 4
            ):
                data = self.f.pread(loc.data_offset, min(loc.data_length, MAX_LOCATOR))
                space = _round(max(len(data), LOCATOR_SPACE))
                pos = _round(max(self.footer_offset, table_end))
                self._write_footer_at(pos + space)
                self.f.pwrite(pos, data)
                self.f.sync()
                self.footer_offset = pos + space
                loc.data_offset, loc.data_space = pos, space
                self._store_header()
                self.f.sync()
        if self.footer_offset < table_end:  # an empty disk: the footer moves out first
            self._write_footer_at(table_end)
            self.footer_offset = table_end
        # the new table entries (free), then the header's entry count
        self.f.pwrite(self.bat_offset + old * 4, b"\xff" * (_round(need * 4) - old * 4))
        self.f.sync()
        self.bat.extend([FREE] * (need - old))
        if self.dyn_header.max_table_entries < need:
            self.dyn_header.max_table_entries = need
            self._store_header()
            self.f.sync()
        self.n_blocks = need

    def _move_out_of(self, table_end: int, old: int) -> None:
        """Move the blocks lying where the longer BAT goes to the end of the file, as
        VirtualBox does: the footer goes past their new places first (the old one is then
        plain unused space), then compaction.move_blocks copies, syncs, repoints, syncs."""
        dest = _round(max(self.footer_offset, table_end))
        moves = []
        for i in range(old):
            e = self.bat[i]
            if (e != FREE and i not in self._bad and e * SECTOR < table_end
                    and e * SECTOR + self.total > self.bat_offset):
                moves.append(Move(i, e * SECTOR, dest, self.total))
                dest += self.total
        if not moves:
            return
        self._write_footer_at(dest)
        self.f.sync()
        self.footer_offset = dest
        self.fsize = max(self.fsize, dest + FOOTER_SIZE)

        def repoint(moved: Sequence[Move[int]]) -> None:
            self._set_bats({m.key: m.dst // SECTOR for m in moved})
            for m in moved:
                self._bitmaps.pop(m.key, None)

        move_blocks(self.f, moves, repoint)

    # -- COMPACT --------------------------------------------------------------------------------
    def compact(
        self, progress: ProgressCallback | None = None, parent_read: FillFn | None = None
    ) -> None:
        self.require_writable()
        if self.is_fixed:
            raise NotSupported(f"{self.location}: a fixed VHD cannot be compacted")
        if self._bad:
            raise self._corrupt("the block allocation table is damaged; run check --repair first")
        alloc = [i for i in range(self.n_blocks) if self.bat[i] != FREE]
        prog = Progress(progress, max(len(alloc) * 2, 1))
        prog.start()
        for idx in alloc:  # 1. drop blocks that add nothing
            if self._block_is_redundant(idx, parent_read):
                self._set_bat(idx, FREE)
                self._bitmaps.pop(idx, None)
            prog.advance(1)
        self._pack(prog)
        prog.finish()

    # -- DISCARD (dynamic base disks) -----------------------------------------------------------
    def discard(self, offset: int, length: int, fill: FillFn | None = None) -> None:
        """Whole blocks leave the BAT (synced) and give their space back; parts of blocks are
        zeroed. A differencing VHD cannot say "reads zero" over its parent, and a fixed one
        holds every block: both refuse (NotSupported), so callers write zeroes or skip."""
        self.require_writable()
        self._refuse_cross_linked()
        if self.is_fixed or self.is_diff:
            raise NotSupported(f"{self.location}: discard is not supported for a "
                               f"{'fixed' if self.is_fixed else 'differencing'} VHD")
        freed: dict[int, int] = {}
        for idx, inner, _pos, n in split_blocks(offset, length, self.block_size):
            start = self._block_start(idx)
            if start is None:
                continue                            # reads zeroes already
            if inner == 0 and n >= min(self.block_size, self.size - idx * self.block_size):
                freed[idx] = start
            else:
                self.f.pwrite(start + self.bm_size + inner, zeroes(n))
        if freed:
            self._set_bats(dict.fromkeys(freed, FREE))
            for idx in freed:
                self._bitmaps.pop(idx, None)
            self.f.sync()                           # the BAT stops naming the blocks first
            punch_blocks(self.f, freed.values(), self.total)

    def close_holes(self, progress: ProgressCallback | None = None) -> bool:
        """After discards: the last blocks move down into the holes, in place (as compact's
        second half), the footer follows and the file is cut."""
        self.require_writable()
        if self.is_fixed or self._bad:
            return False
        prog = Progress(progress, max(sum(1 for e in self.bat if e != FREE), 1))
        prog.start()
        self._pack(prog)
        prog.finish()
        return True

    def _block_is_redundant(self, idx: int, parent_read: FillFn | None) -> bool:
        start = self.bat[idx] * SECTOR
        bm = self._bitmap(idx, start)
        vstart = idx * self.block_size
        vlen = min(self.block_size, self.size - vstart)
        for s, k, on in bitmap_runs(bm, 0, ceil_div(vlen, SECTOR)):
            if not on:
                continue
            pos, end = s * SECTOR, min((s + k) * SECTOR, vlen)
            while pos < end:
                n = min(4 << 20, end - pos)
                data = self.f.read_exact(start + self.bm_size + pos, n, f"data of block {idx}")
                if self.is_diff:
                    if parent_read is None or parent_read(vstart + pos, n) != data:
                        return False
                elif not is_zero(data):
                    return False
                pos += n
        return True

    def _pack(self, prog: Progress | None = None) -> None:
        """Close the holes: move the last blocks into the lowest holes before them, then the
        parent locators that lie past the last block, then the footer down, and truncate.
        Every move copies first and repoints (BAT entry / header) after: interruption-safe."""
        meta = [(a, b) for a, b, _n in self._meta_regions()]
        blocks = [
            (self.bat[i] * SECTOR, self.total, i)
            for i in range(self.n_blocks)
            if self.bat[i] != FREE and i not in self._bad
        ]
        holes = holes_between(meta + [(a, a + n) for a, n, _i in blocks])

        def repoint(moves: Sequence[Move[int]]) -> None:
            self._set_bats({m.key: m.dst // SECTOR for m in moves})
            for m in moves:
                self._bitmaps.pop(m.key, None)

        # copies into holes (unreferenced), sync, BAT entries, sync (compaction.move_blocks)
        move_blocks(
            self.f,
            plan_moves(blocks, holes, SECTOR),
            repoint,
            advance=(lambda _n: prog.advance(1)) if prog else None,
        )
        # parent locators beyond the last block move down too (they would pin the file's end)
        block_ends = [
            self.bat[i] * SECTOR + self.total
            for i in range(self.n_blocks)
            if self.bat[i] != FREE and i not in self._bad
        ]
        fixed_meta = [(a, b) for a, b, n in self._meta_regions() if not n.startswith("parent")]
        floor = max([b for _a, b in fixed_meta] + block_ends)
        for li in range(8):
            loc = self.dyn_header.locators[li]  # fresh: _store_header replaces the header
            regs = {n: (a, b) for a, b, n in self._meta_regions()}
            if f"parent locator {li}" not in regs:
                continue
            a, b = regs[f"parent locator {li}"]
            if a < floor:
                continue
            others = [r for n, r in regs.items() if n != f"parent locator {li}"]
            for h0, h1 in holes_between(
                others + [(a, a)] + [(x - self.total, x) for x in block_ends]
            ):
                dest = _round(h0)
                if dest + (b - a) <= min(h1, a) and dest >= FOOTER_SIZE:
                    data = self.f.read_exact(a, loc.data_length, f"parent locator {li}")
                    self.f.pwrite(dest, data + bytes(_round(len(data)) - len(data)))
                    loc.data_offset = dest
                    loc.data_space = (
                        max(loc.data_space, _round(len(data)))
                        if loc.data_space <= MAX_LOCATOR
                        else _round(len(data))
                    )
                    self._store_header()
                    break
        ends = [b for _a, b, _n in self._meta_regions()] + block_ends
        new_end = _round(max(ends))
        if new_end < self.footer_offset:
            self._write_footer_at(new_end)
            self.f.truncate(new_end + FOOTER_SIZE)
            self.footer_offset = new_end
        self._rescan()

    # -- CHECK / REPAIR -------------------------------------------------------------------------
    def check(
        self, repair: bool = False, dry_run: bool = False, progress: ProgressCallback | None = None
    ) -> CheckReport:
        """VirtualBox's vhdRepair checks: footer (backup copy, checksum), dynamic header checksum,
        BAT entries past the end, over metadata or over each other, blocks running into the
        footer; plus parent locators outside the file and unreferenced space (leaks).
        Repair order: BAT, header, footer; then leaks are closed by moving blocks down."""
        fix = repair and not dry_run
        if fix:
            self.require_writable()
        rep = CheckReport()
        prog = Progress(progress, 4)
        prog.start()
        header_fix = False
        bad_locators = set(getattr(self, "_bad_locators", ()))
        for p in self._problems:  # what to fix follows the codes, not the words
            rep.problems.append(Problem(p.severity, p.what, p.offset, code=p.code))
            if p.code in (ProblemCode.PARENT_LOCATOR, ProblemCode.HEADER_CHECKSUM):
                header_fix = True
        prog.advance(1)
        bat_fix: list[int] = []
        if not self.is_fixed:
            for idx, why in sorted(self._bad.items()):
                rep.problems.append(
                    Problem("corrupt", why, self.bat_offset + 4 * idx, code=self._bad_code[idx])
                )
                bat_fix.append(idx)
            for idx in self._intersects_footer:
                rep.problems.append(
                    Problem(
                        "corrupt",
                        f"the block of BAT entry {idx} runs into the footer",
                        self.bat[idx] * SECTOR,
                        code=ProblemCode.OVERLAP,
                    )
                )
            for off, n, what in self._find_leaks():
                rep.problems.append(Problem("leak", what, off, code=ProblemCode.LEAK))
                rep.orphans.append((self.location, off, n))
        prog.advance(1)
        if fix and rep.problems:
            for idx in bat_fix:  # BAT first, header next, footer last
                self._set_bat(idx, FREE)
                self._bitmaps.pop(idx, None)
            if header_fix:
                for i, loc in enumerate(self.dyn_header.locators):
                    if i in bad_locators:
                        loc.code, loc.data_space, loc.data_length, loc.data_offset = (
                            b"\0" * 4,
                            0,
                            0,
                            0,
                        )
                self._store_header()
            if not self.is_fixed:
                self._rescan()
                self.footer_offset = max(self.footer_offset, self.used_end)
            self._store_footer()
            if not self.is_fixed and self.f.size() > self.footer_offset + FOOTER_SIZE:
                self.f.truncate(self.footer_offset + FOOTER_SIZE)
            self._problems = []
            self.footer_from = "end"
            still = set()
            if not self.is_fixed:
                self._rescan()
                if self._find_leaks():
                    self._pack()
                still = {off for off, _n, _w in self._find_leaks()}
                if self.disk_type == TYPE_DIFF:
                    self._parse_parent(self.dyn_header, self.f.size())
            for p in rep.problems:
                p.repaired = not (p.severity == "leak" and p.offset in still)
            rep.repaired = True
        prog.finish()
        return rep

    def _find_leaks(self) -> list[tuple[int, int, str]]:
        """Unreferenced file ranges large enough to hold a block (e.g. left by an interrupted
        allocation or a dropped block)."""
        out = []
        regions = sorted(
            [(s, e) for s, e, _n in self._meta_regions()]
            + [
                (self.bat[i] * SECTOR, self.bat[i] * SECTOR + self.total)
                for i in range(self.n_blocks)
                if self.bat[i] != FREE and i not in self._bad
            ]
        )
        cur = 0
        for s, e in regions + [(self.footer_offset, self.footer_offset)]:
            if s - cur >= self.total:
                out.append(
                    (
                        cur,
                        s - cur,
                        f"{s - cur} unreferenced bytes at {cur:#x} (room for "
                        f"{(s - cur) // self.total} block(s))",
                    )
                )
            cur = max(cur, e)
        return out
