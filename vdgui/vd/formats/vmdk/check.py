"""VMDK check and repair: directory vs redundant directory, tables vs redundant tables,
entries past the end of the file or into metadata, cross-linked grains, unreferenced tail."""
from __future__ import annotations

import array

from ...align import align_up
from ...image import CheckReport, Problem, ProblemCode
from ...progress import Progress, ProgressCallback
from .extents import FlatExtent, u32_array, u32_bytes
from .layout import SECTOR
from .sparse import SESparseExtent, SparseExtent
from .state import VmdkState


class CheckMixin(VmdkState):
    """Check and repair of a :class:`.image.VmdkImage`."""

    # -- CHECK / REPAIR ----------------------------------------------------------------------
    def check(self, repair: bool = False, dry_run: bool = False,
              progress: ProgressCallback | None = None) -> CheckReport:
        if repair and not dry_run:
            self.require_writable()
        report = CheckReport()
        sparse = [e for e in self.extents
                  if isinstance(e, SparseExtent) and not isinstance(e, SESparseExtent)]
        prog = Progress(progress, max(1, sum(e.n_gts for e in sparse)))
        prog.start()
        fix = repair and not dry_run
        for e in sparse:
            self._check_extent(e, report, fix and e.writable, prog)
        for x in self.extents:
            if isinstance(x, FlatExtent) and not x.f.is_device and x.f.size() < x.base + x.length:
                report.problems.append(Problem(
                    "corrupt", f"flat extent {x.path} is shorter than described "
                    f"({x.f.size()} < {x.base + x.length} bytes)", None,
                    code=ProblemCode.EXTENT))
        for e in sparse:
            if e.header is not None and not e.compressed:
                self._check_tail(e, report, fix and e.writable)
        if fix:
            for e in sparse:
                e.f.sync()
        report.repaired = fix and any(p.repaired for p in report.problems)
        prog.finish()
        return report

    def _check_tail(self, e: SparseExtent, report: CheckReport, fix: bool) -> None:
        """Space after the last referenced structure (a grain written but never linked, e.g.
        after a crash between the data and the table update) is a leak; repair truncates it."""
        size = e.f.size()
        assert e.header is not None             # only hosted sparse extents are checked here
        end = max(e.header["overhead"] * SECTOR, SECTOR)
        gsz = align_up(e.n_gts * 4, SECTOR)
        for sec in (e.gd_sector, e.rgd_sector):
            if sec:
                end = max(end, sec * SECTOR + gsz)
        for arr in (e.gd, e.rgd):
            if arr is None:
                continue
            for t, sec in enumerate(arr):
                if not sec or sec * SECTOR + e.gt_bytes > size:
                    continue
                end = max(end, sec * SECTOR + e.gt_sectors * SECTOR)
                gt = e._gts.get(t) if arr is e.gd else None
                if gt is None:
                    gt = u32_array(e.f.pread(sec * SECTOR, e.gt_bytes))
                top = max(gt) if len(gt) else 0
                if top > 1 and top * SECTOR < size:
                    end = max(end, min(top * SECTOR + e.grain, size))
        end = align_up(end, SECTOR)
        if size > end:
            report.problems.append(Problem(
                "leak", f"{e.path}: {size - end} bytes after the last referenced grain or table "
                f"are not used", end, fix, code=ProblemCode.LEAK))
            report.orphans.append((e.path, end, size - end))
            if fix:
                e.f.truncate(end)
                e.file_size = end
                e.next_free = end

    def _check_extent(self, e: SparseExtent, report: CheckReport, fix: bool,
                      prog: Progress) -> None:
        """Directory/redundant directory and table/redundant table consistency; entries that
        point past the end of the file or into the metadata area. Repair takes the valid copy
        (the primary one when both are valid but differ); an entry with no valid copy becomes
        unallocated."""
        size = e.f.size()
        path = e.path
        meta_end = e.header["overhead"] if e.header else 1

        def table_ok(sec: int) -> bool:
            return sec == 0 or (sec >= 1 and sec * SECTOR + e.gt_bytes <= size)

        def grain_ok(v: int, idx: int) -> bool:
            if v == 0 or v == 1:
                return True
            if v < meta_end:
                return False
            glen = max(min(e.grain, e.length - idx * e.grain), SECTOR)
            return v * SECTOR + (12 if e.compressed else glen) <= size

        def problem(what: str, off: int | None, code: str, repaired: bool = False,
                    severity: str = "corrupt") -> Problem:
            pr = Problem(severity, f"{path}: {what}", off, repaired, code=code)
            report.problems.append(pr)
            return pr

        # uncleanShutdown: a writer stopped between the primary and the redundant copy of an
        # update (see SparseExtent.begin_update). Two valid copies that differ are then one
        # update apart; readers use the primary, so the lagging copy is a leak, not corruption.
        interrupted = bool(e.header and e.header["unclean_shutdown"])
        if fix and e.header is not None:
            e.begin_update()
            e._clear_on_close = True     # the copies agree after the repair

        def copy_table(src: array.array) -> int:
            sec = e._alloc(e.gt_sectors * SECTOR) // SECTOR
            e.f.pwrite(sec * SECTOR, u32_bytes(src).ljust(e.gt_sectors * SECTOR, b"\0"))
            return sec

        used = bytearray(size // (8 * SECTOR) + 1)     # grain start sectors seen so far
        for t in range(e.n_gts):
            prog.advance(1)
            g = e.gd[t]
            r = e.rgd[t] if e.rgd is not None else None
            gok, rok = table_ok(g), (r is None or table_ok(r))
            pg = pr = None
            if not gok:
                pg = problem(f"grain directory entry {t} points past the end of the file "
                             f"(sector {g})", e.gd_sector * SECTOR + 4 * t,
                             ProblemCode.ENTRY_PAST_END)
            if not rok:
                pr = problem(f"redundant grain directory entry {t} points past the end of the "
                             f"file (sector {r})", e.rgd_sector * SECTOR + 4 * t,
                             ProblemCode.ENTRY_PAST_END)
            gt = u32_array(e.f.pread(g * SECTOR, e.gt_bytes)) if gok and g else None
            rgt = u32_array(e.f.pread(r * SECTOR, e.gt_bytes)) if r and rok else None
            if r is not None and gok and rok and (g == 0) != (r == 0):
                which = "primary" if g == 0 else "redundant"
                only = gt if gt is not None else rgt
                unused = only is not None and not any(only)   # an empty table: reads the same
                p = problem(f"grain directory entry {t}: the {which} copy is empty, the other "
                            f"is {'an unused table' if unused else 'not'} ({g} vs {r})",
                            e.gd_sector * SECTOR + 4 * t, ProblemCode.TABLE_MISMATCH,
                            severity="leak" if unused else "corrupt")
                pg = pg or (p if g == 0 else None)
                pr = pr or (p if r == 0 else None)
            if fix and pg is not None:          # rebuild the primary table from the redundant one
                newg = copy_table(rgt) if rgt is not None else 0
                gt = array.array("I", rgt) if rgt is not None else None
                e.gd[t] = newg
                e.f.pwrite(e.gd_sector * SECTOR + 4 * t, newg.to_bytes(4, "little"))
                e._gts.pop(t, None)
                g, pg.repaired = newg, True
            if fix and pr is not None:          # and the redundant one from the primary
                assert e.rgd is not None        # pr: the redundant directory exists
                newr = copy_table(gt) if gt is not None else 0
                rgt = array.array("I", gt) if gt is not None else None
                e.rgd[t] = newr
                e.f.pwrite(e.rgd_sector * SECTOR + 4 * t, newr.to_bytes(4, "little"))
                r, pr.repaired = newr, True
            e.file_size = max(e.file_size, e.next_free)
            size = max(size, e.next_free)
            if gt is None and rgt is None:
                continue
            same = gt if rgt is None else rgt if gt is None else gt if gt == rgt else None
            fast_ok = False
            if same is not None:                 # fast path: both copies agree
                vals = set(same)
                vals.discard(0)
                vals.discard(1)
                fast_ok = not vals or (min(vals) >= meta_end and max(vals) * SECTOR +
                                       (12 if e.compressed else e.grain) <= size)
            changed_g = changed_r = False
            for i in range(0 if fast_ok else e.gtes):
                a = gt[i] if gt is not None else None
                b = rgt[i] if rgt is not None else None
                if a == b and (a is None or a <= 1):
                    continue
                idx = t * e.gtes + i
                aok = a is None or grain_ok(a, idx)
                bok = b is None or grain_ok(b, idx)
                if aok and bok and (a is None or b is None or a == b):
                    continue
                if not aok:
                    what = (f"grain table {t} entry {i} (grain {idx}) points past the end of the "
                            f"file or into metadata (sector {a})")
                    off = g * SECTOR + 4 * i
                    code = ProblemCode.ENTRY_PAST_END
                elif not bok:
                    assert r is not None        # b came from the redundant table
                    what = (f"redundant grain table {t} entry {i} (grain {idx}) points past the "
                            f"end of the file or into metadata (sector {b})")
                    off = r * SECTOR + 4 * i
                    code = ProblemCode.ENTRY_PAST_END
                else:
                    what = (f"grain table {t} entry {i} (grain {idx}) differs from the redundant "
                            f"table ({a} vs {b})")
                    off = g * SECTOR + 4 * i
                    code = ProblemCode.TABLE_MISMATCH
                    if interrupted:
                        what += (": an interrupted update (uncleanShutdown is set); the primary "
                                 "table is the one read, repair copies it")
                good = a if aok and a is not None else b if bok and b is not None else 0
                if fix:
                    if gt is not None and gt[i] != good:
                        gt[i] = good
                        changed_g = True
                    if rgt is not None and rgt[i] != good:
                        rgt[i] = good
                        changed_r = True
                problem(what, off, code, fix,
                        severity="leak" if interrupted and aok and bok else "corrupt")
            if changed_g and gt is not None:
                e.f.pwrite(g * SECTOR, u32_bytes(gt))
            if changed_r and r is not None and rgt is not None:
                e.f.pwrite(r * SECTOR, u32_bytes(rgt))
            if fix and gt is not None:
                e._gts[t] = gt
            # grains shared by two entries (cross-linked): repair gives the later one a copy
            final = gt if gt is not None else rgt
            assert final is not None            # both None was skipped above
            if final.count(0) + final.count(1) == len(final):
                continue
            for i, v in enumerate(final):
                if v <= 1:
                    continue
                if v >= len(used) * 8:
                    continue                     # past the end: reported above
                byte, bit = divmod(v, 8)
                if not used[byte] & (1 << bit):
                    used[byte] |= 1 << bit
                    continue
                idx = t * e.gtes + i
                done = False
                if fix and e.writable:
                    data = e.f.pread(v * SECTOR, e.grain)
                    noff = e._alloc(e.grain)
                    e.f.pwrite(noff, data + bytes(e.grain - len(data)))
                    e.f.sync()
                    sec = noff // SECTOR
                    for arr, tsec in ((gt, g), (rgt, r)):
                        if arr is not None and tsec:
                            arr[i] = sec
                            e.f.pwrite(tsec * SECTOR + 4 * i, sec.to_bytes(4, "little"))
                    e.file_size = max(e.file_size, e.next_free)
                    done = True
                problem(f"grain table {t} entry {i} (grain {idx}) shares sector {v} with another "
                        "grain (cross-linked)", (g or r or 0) * SECTOR + 4 * i,
                        ProblemCode.CROSS_LINKED, done)


# -- creation helpers --------------------------------------------------------------------------
