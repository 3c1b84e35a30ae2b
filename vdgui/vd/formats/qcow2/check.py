"""QCOW2 check and repair, like ``qemu-img check``: refcounts recounted from every L1/L2
table, snapshot and bitmap; repair writes a new refcount structure at the end of the file and
fixes OFLAG_COPIED and reserved bits. Also the cross-link test before the first write."""
from __future__ import annotations

import struct
from array import array

from ...align import ceil_div
from ...errors import CorruptImage, NotSupported, VDError
from ...image import CheckReport, Problem, ProblemCode
from ...progress import Progress, ProgressCallback
from . import layout as L
from .clusters import BE_U64, L2E_MASK, array_be_bytes, be_array
from .state import Qcow2State

# a flag repair: ("l1", index, value), ("l2", L2 table offset, index, entry) or
# ("l2bm", L2 table offset, index, subcluster bitmap)
_Fix = tuple[str, int, int] | tuple[str, int, int, int]


class CheckMixin(Qcow2State):
    """Check and repair."""

    _xlinks_checked = False

    def _check_cross_links(self) -> None:
        """Once, before the first data write: count every reference to every cluster (all L1/L2
        tables, snapshots, bitmaps, refcount structures, as check does). A cluster referenced
        more often than its refcount says is cross-linked: a write in place (refcount 1) would
        change what the other reference reads. Clusters shared with a snapshot carry refcount
        2 or more and are copied on write, as in qemu: not a cross-link."""
        if self._xlinks_checked:
            self._refuse_cross_linked()
            return
        self._xlinks_checked = True
        if self.incompat & L.INCOMPAT_DATA_FILE:
            return
        counts, _ = self._count_refs([])
        rt = self._load_rt()
        for e in rt:
            off = e & L.REFT_OFFSET_MASK
            if off and not off % self.cs and off // self.cs < len(counts):
                counts[off // self.cs] += 1
        if max(counts, default=0) > 1:
            for c, n in enumerate(counts):
                if n > 1 and n > self.refcount(c):
                    self.write_refusal = (f"cluster {c} (offset {c * self.cs:#x}) is referenced "
                                          f"{n} times but its refcount is {self.refcount(c)}")
                    break
        self._refuse_cross_linked()

    # ------------------------------------------------------------------ check / repair
    def _count_refs(self, problems: list[Problem], progress: Progress | None = None,
                    include_rt: bool = True) -> tuple[array[int], list[_Fix]]:
        """Walk all metadata; return (refcount array indexed by cluster, fix list).

        ``fix`` lists (kind, where, value) for flag repairs: ("l1", index, value) or
        ("l2", l2_offset, index, entry)."""
        cs = self.cs
        self.fsize = self.f.size()
        nclusters = max(self.next_cluster, ceil_div(self.fsize, cs))
        counts = array("I", [0]) * (nclusters + 1)
        fixes: list[_Fix] = []
        file_clusters = ceil_div(self.fsize, cs)

        def add(off: int, length: int, what: str) -> bool:
            if length <= 0:
                return True
            first, last = off // cs, (off + length - 1) // cs
            if last >= file_clusters:
                problems.append(Problem("corrupt", f"{what} at {off:#x} lies past the end of the "
                                        f"file ({self.fsize} bytes)", off,
                                        code=ProblemCode.ENTRY_PAST_END))
                return False
            for c in range(first, last + 1):
                counts[c] += 1
            return True

        add(0, cs, "header")
        if self.crypt_length:       # the LUKS header and key material (crypt header extension)
            add(self.crypt_offset, self.crypt_length, "encryption header")
        if include_rt:
            add(self.rt_offset, self.rt_clusters * cs, "refcount table")
        if self.nb_snapshots:
            add(self.snapshots_offset, self.snapshot_table_size, "snapshot table")
        self._count_bitmaps(add, problems)
        l1_tables = [(self.l1_offset, len(self.l1), True, self.l1)]
        for s in self.snapshots:
            l1 = None
            try:
                l1 = be_array(self.f.read_exact(s["l1_table_offset"], s["l1_size"] * 8,
                                                 f"snapshot {s['id']} L1 table"))
            except CorruptImage as exc:
                problems.append(Problem("corrupt", str(exc), s["l1_table_offset"],
                                        code=ProblemCode.ENTRY_PAST_END))
                continue
            l1_tables.append((s["l1_table_offset"], s["l1_size"], False, l1))
        data_file = bool(self.incompat & L.INCOMPAT_DATA_FILE)
        for l1_off, l1_n, active, l1 in l1_tables:
            add(l1_off, l1_n * 8, "L1 table")
            for i in range(l1_n):
                if progress is not None and active:
                    progress.set(i)
                l1e = l1[i]
                off = l1e & L.L1E_OFFSET_MASK
                if l1e & L.L1E_RESERVED_MASK and active:
                    problems.append(Problem("corrupt", f"L1 entry {i} has reserved bits set: "
                                            f"{l1e:#x}", self.l1_offset + 8 * i,
                                            code=ProblemCode.ENTRY_INVALID))
                    fixes.append(("l1", i, l1e & ~L.L1E_RESERVED_MASK))
                if not off:
                    if l1e & ~L.L1E_RESERVED_MASK and active:
                        problems.append(Problem("corrupt", f"L1 entry {i} = {l1e:#x} has flags "
                                                "but no L2 table offset", self.l1_offset + 8 * i,
                                                code=ProblemCode.ENTRY_INVALID))
                        fixes.append(("l1", i, 0))
                    continue
                if off % cs:
                    problems.append(Problem("corrupt", f"L1 entry {i}: L2 table offset {off:#x} "
                                            "not cluster aligned", off,
                                            code=ProblemCode.ENTRY_INVALID))
                    if active:
                        fixes.append(("l1", i, 0))
                    continue
                if not add(off, cs, f"L2 table (L1 entry {i})"):
                    if active:
                        fixes.append(("l1", i, 0))
                    continue
                tbl = be_array(self.f.pread(off, cs))
                if len(tbl) < self.l2_entries * (2 if self.extended_l2 else 1):
                    continue
                entries = tbl[::2] if self.extended_l2 else tbl
                if self.extended_l2 and any(tbl[1::2]):
                    self._check_subclusters(off, tbl, active, data_file, problems, fixes)
                for j, e in [(j, e) for j, e in enumerate(entries) if e]:
                    if e & L.OFLAG_COMPRESSED:
                        coff, csize = self._compressed_range(e)
                        if coff + csize > self.fsize + 512 or coff >= self.fsize:
                            problems.append(Problem("corrupt", f"compressed cluster at {coff:#x} "
                                                    "lies past the end of the file", coff,
                                                    code=ProblemCode.ENTRY_PAST_END))
                            if active:
                                fixes.append(("l2", off, j, 0))
                            continue
                        first, last = coff // cs, (coff + csize - 1) // cs
                        last = min(last, file_clusters - 1)
                        for c in range(first, last + 1):
                            counts[c] += 1
                        continue
                    if e & L.L2E_STD_RESERVED_MASK:
                        problems.append(Problem("corrupt", f"L2 table at {off:#x} entry {j} has "
                                                f"reserved bits set: {e:#x}", off,
                                                code=ProblemCode.ENTRY_INVALID))
                        if active:
                            fixes.append(("l2", off, j, e & ~L.L2E_STD_RESERVED_MASK))
                    host = e & L2E_MASK
                    if not host or data_file:
                        continue
                    if host % cs:
                        problems.append(Problem("corrupt", f"L2 table at {off:#x} entry {j}: "
                                                f"cluster offset {host:#x} not aligned", host,
                                                code=ProblemCode.ENTRY_INVALID))
                        if active:
                            fixes.append(("l2", off, j, 0))
                        continue
                    if not add(host, cs, f"data cluster (L2 table {off:#x} entry {j})") and active:
                        fixes.append(("l2", off, j, 0))
            if progress:
                progress.poll()
        return counts, fixes

    def _check_subclusters(self, off: int, tbl: array[int], active: bool, data_file: bool,
                           problems: list[Problem], fixes: list[_Fix]) -> None:
        """Extended L2 subcluster bitmaps (what reading refuses, as qemu does): no subcluster
        both allocated and zero, no allocated subcluster without a host cluster. Repair keeps
        the data: a subcluster marked both stays allocated (its zero bit is cleared); allocation
        bits with no cluster to point into are cleared."""
        for j in range(self.l2_entries):
            bm = tbl[2 * j + 1]
            if not bm:
                continue
            e = tbl[2 * j]
            if e & L.OFLAG_COMPRESSED:
                continue
            alloc, zero = bm & 0xFFFFFFFF, bm >> 32
            host = e & L2E_MASK
            if alloc & zero:
                what = (f"L2 table at {off:#x} entry {j}: subclusters {alloc & zero:#010x} are "
                        f"marked both allocated and zero (bitmap {bm:#018x})")
                new = alloc | (zero & ~alloc) << 32
            elif alloc and not host and not (data_file and e & L.OFLAG_COPIED):
                what = (f"L2 table at {off:#x} entry {j}: subclusters {alloc:#010x} are "
                        f"allocated but the entry has no cluster (entry {e:#x})")
                new = zero << 32
            else:
                continue
            problems.append(Problem("corrupt", what, off + 16 * j + 8,
                                    code=ProblemCode.SUBCLUSTER))
            if active:
                fixes.append(("l2bm", off, j, new))

    def _stored_problems(self, counts: array[int], problems: list[Problem]) -> bool:
        """Compare computed refcounts with the stored ones; True when a rebuild is needed."""
        cs = self.cs
        rt = self._load_rt()
        bad_structure = False
        n = len(counts)
        refblocks: dict[int, int] = {}
        for rti in range(len(rt)):
            off = rt[rti] & L.REFT_OFFSET_MASK
            if rt[rti] & L.REFT_RESERVED_MASK:
                problems.append(Problem("corrupt", f"refcount table entry {rti} has reserved "
                                        f"bits set: {rt[rti]:#x}", self.rt_offset + 8 * rti,
                                        code=ProblemCode.ENTRY_INVALID))
                bad_structure = True
            if not off:
                continue
            if off % cs or off + cs > self.fsize:
                problems.append(Problem("corrupt", f"refcount block {rti} at {off:#x} is invalid "
                                        "(unaligned or past the end of the file)", off,
                                        code=ProblemCode.ENTRY_INVALID))
                bad_structure = True
                continue
            refblocks[rti] = off
            c = off // cs
            if c < n:
                counts[c] += 1
        for c in range(n):
            rti, idx = divmod(c, self.rb_entries)
            if rti in refblocks:
                blk = self._rb_cache.get(rti)
                if blk is None:
                    blk = bytearray(self.f.pread(refblocks[rti], cs))
                    self._rb_cache[rti] = blk
                stored = self._rc_get_in(blk, idx)
            else:
                stored = 0
            want = counts[c]
            if stored == want:
                continue
            if stored < want:
                problems.append(Problem("corrupt", f"cluster {c} (offset {c * cs:#x}): "
                                        f"refcount={stored} reference={want}", c * cs,
                                        code=ProblemCode.REFCOUNT))
            else:
                problems.append(Problem("leak", f"cluster {c} (offset {c * cs:#x}) leaked: "
                                        f"refcount={stored} reference={want}", c * cs,
                                        code=ProblemCode.LEAK))
                if want == 0 and c * cs < self.fsize:     # nothing references it: an orphan
                    self._orphans.append((self.location, c * cs, min(cs, self.fsize - c * cs)))
        return bad_structure

    def _copied_problems(self, problems: list[Problem], counts: array[int],
                         fixes: list[_Fix]) -> None:
        """OFLAG_COPIED must be set exactly when the (stored) refcount is 1, as qemu checks."""
        cs = self.cs

        def rc(c: int) -> int:
            try:
                return self.refcount(c)
            except VDError:
                return counts[c]
        for i, l1e in enumerate(self.l1):
            off = l1e & L.L1E_OFFSET_MASK
            if not off or off % cs or off // cs >= len(counts):
                continue
            want = rc(off // cs) == 1
            if bool(l1e & L.OFLAG_COPIED) != want:
                problems.append(Problem("corrupt", f"OFLAG_COPIED L2 table: L1 entry {i} = "
                                        f"{l1e:#x}, refcount {rc(off // cs)}", off,
                                        code=ProblemCode.ENTRY_INVALID))
                fixes.append(("l1", i, off | (L.OFLAG_COPIED if want else 0)))
            tbl = be_array(self.f.pread(off, cs))
            step = 2 if self.extended_l2 else 1
            if len(tbl) < self.l2_entries * step:
                continue                  # past the end of the file: reported by the walk
            for j in range(self.l2_entries):
                e = tbl[j * step]
                host = e & L2E_MASK
                if e & L.OFLAG_COMPRESSED or not host or host % cs or host // cs >= len(counts):
                    continue
                if self.incompat & L.INCOMPAT_DATA_FILE:
                    continue
                want = rc(host // cs) == 1
                if bool(e & L.OFLAG_COPIED) != want:
                    problems.append(Problem("corrupt", f"OFLAG_COPIED data cluster: L2 table "
                                            f"{off:#x} entry {j} = {e:#x}, refcount "
                                            f"{rc(host // cs)}", host,
                                            code=ProblemCode.ENTRY_INVALID))
                    fixes.append(("l2", off, j, (e & ~(L.OFLAG_COPIED | L.L2E_STD_RESERVED_MASK))
                                  | (L.OFLAG_COPIED if want else 0)))

    def check(self, repair: bool = False, dry_run: bool = False,
              progress: ProgressCallback | None = None) -> CheckReport:
        if repair and not dry_run:
            self.require_writable()
            self._forget_free()       # the refcounts are rebuilt: no pool, no deferred punches
            self.f.wait_punches()
        prog = Progress(progress, max(len(self.l1), 1))
        prog.start()
        problems: list[Problem] = []
        self._orphans = []
        counts, fixes = self._count_refs(problems, prog)
        self._stored_problems(counts, problems)
        self._copied_problems(problems, counts, fixes)
        marked = self.incompat & (L.INCOMPAT_CORRUPT | L.INCOMPAT_DIRTY)
        report = CheckReport(problems=problems, orphans=self._orphans)
        self._orphans = []
        if repair and not dry_run and (problems or marked):
            self._apply_fixes(fixes)
            counts, _ = self._count_refs([], include_rt=False)
            self._rebuild_refcounts(counts)
            after: list[Problem] = []
            counts, fixes2 = self._count_refs(after)
            self._stored_problems(counts, after)
            self._copied_problems(after, counts, fixes2)
            if fixes2:
                self._apply_fixes(fixes2)
                after = []
                counts, _ = self._count_refs(after)
                self._stored_problems(counts, after)
            if not after:
                for p in problems:
                    p.repaired = True
                if marked:
                    self.incompat &= ~(L.INCOMPAT_CORRUPT | L.INCOMPAT_DIRTY)
                    self._write_feature_bits()
                    self.write_blocked = None
                report.repaired = True
            else:
                report.problems = after
        prog.finish()
        return report

    def _apply_fixes(self, fixes: list[_Fix]) -> None:
        for fix in fixes:
            match fix:
                case ("l1", i, value):
                    self._set_l1(i, value)
                case ("l2bm", off, j, bm):
                    self.f.pwrite(off + 16 * j + 8, BE_U64.pack(bm))
                case (_, off, j, e):            # "l2"
                    if self.extended_l2:
                        self.f.pwrite(off + 16 * j, BE_U64.pack(e))
                        if e == 0:
                            self.f.pwrite(off + 16 * j + 8, BE_U64.pack(0))
                    else:
                        self.f.pwrite(off + 8 * j, BE_U64.pack(e))
        if fixes:
            self._l2_cache.clear()
            self._l2_cache_bytes = 0

    def _rebuild_refcounts(self, counts: array[int]) -> None:
        """Write a new refcount table and blocks (at the end of the file) matching ``counts``
        (which excludes the refcount structures), then switch the header to them."""
        cs, per_block = self.cs, self.rb_entries
        maxval = (1 << self.refcount_bits) - 1
        used = len(counts)
        while used > 0 and counts[used - 1] == 0:
            used -= 1
        for c in range(used):
            if counts[c] > maxval:
                raise CorruptImage(f"cluster {c} has {counts[c]} references, more than "
                                   f"{self.refcount_bits}-bit refcounts can hold",
                                   path=self.location)
        base = max(ceil_div(self.fsize, cs), used)
        nb, nt = 0, 1
        while True:
            total = base + nt + nb
            blocks = sorted(
                {c // per_block for c in range(used) if counts[c]}
                | {c // per_block for c in range(base, total)}
            )
            nt2 = max(1, ceil_div((blocks[-1] + 1) * 8, cs))
            if (len(blocks), nt2) == (nb, nt):
                break
            nb, nt = len(blocks), nt2
        if nt * cs > L.MAX_REFTABLE_BYTES:
            raise NotSupported(f"{self.location}: rebuilt refcount table would exceed 8 MiB")
        table_ci = base
        block_ci = {rti: base + nt + i for i, rti in enumerate(blocks)}
        rt = array("Q", bytes(8 * nt * cs // 8))
        for rti, bci in block_ci.items():
            blk = bytearray(cs)
            lo = rti * per_block
            for idx in range(per_block):
                c = lo + idx
                if c < used and counts[c]:
                    self._rc_set_in(blk, idx, counts[c])
                elif base <= c < base + nt + nb:
                    self._rc_set_in(blk, idx, 1)
            self.f.pwrite(bci * cs, blk)
            rt[rti] = bci * cs
        self.f.pwrite(table_ci * cs, array_be_bytes(rt))
        self.f.sync()
        hdr = struct.pack(">QI", table_ci * cs, nt)
        self.header_raw[L.OFF_REFCOUNT_TABLE_OFFSET : L.OFF_REFCOUNT_TABLE_OFFSET + 12] = hdr
        self.f.pwrite(L.OFF_REFCOUNT_TABLE_OFFSET, hdr)
        self.f.sync()
        self.rt_offset, self.rt_clusters, self.rt = table_ci * cs, nt, rt
        self._rb_cache.clear()
        self.fsize = self.f.size()
        self.next_cluster = max(ceil_div(self.fsize, cs), base + nt + nb)
