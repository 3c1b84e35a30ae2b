"""QCOW2 maintenance: compact (drop zero and parent-equal clusters, move clusters into holes,
truncate), resize (grow: L1 moved when it must grow; shrink: entries past the end cleared),
relink (backing file name and format rewritten)."""
from __future__ import annotations

import struct
from array import array
from collections.abc import Callable, Sequence

from ...align import ceil_div
from ...backend import ImageFlags, too_large
from ...compaction import Move, copy_range, move_blocks, plan_moves
from ...errors import InvalidArgument, NotSupported
from ...fileio import relative_name
from ...image import FillFn, Image, ParentHint
from ...progress import Progress, ProgressCallback
from ...sparse import is_zero, zeroes
from ...tables import BlockTable
from . import layout as L
from . import limit_reason
from .clusters import L2E_MASK, array_be_bytes
from .state import Qcow2State

# who refers to a movable cluster: ("l1", L1 index) for an L2 table, ("l2", L1 index, L2
# index) for a data cluster, ("comp", ((L1 index, L2 index), ...)) for compressed clusters
_Owner = tuple[str, int] | tuple[str, int, int] | tuple[str, tuple[tuple[int, int], ...]]


class MaintenanceMixin(Qcow2State):
    """Compact, resize and relink."""

    # ------------------------------------------------------------------ compact
    def compact(self, progress: ProgressCallback | None = None,
                parent_read: FillFn | None = None) -> None:
        """Drop clusters that read as zeroes (no backing file) or as the parent reads
        (``parent_read``), then move clusters from the end of the file into the holes and
        truncate. Clusters shared with internal snapshots are left alone."""
        self._check_write()
        self._forget_free()           # clusters move into free ones below: no pool, no punches
        self.f.wait_punches()
        cs = self.cs
        nclu = ceil_div(self.size, cs)
        prog = Progress(progress, nclu * 2)
        prog.start()
        has_backing = self.backing_file is not None
        below = parent_read if has_backing else None
        # only clusters under an L2 table can hold anything: the walk follows the metadata
        # present, not the virtual size (an almost empty 1 TiB image walked 16 M entries)
        l2n = self.l2_entries
        present = [i for i, l1e in enumerate(self.l1) if l1e & L.L1E_OFFSET_MASK]
        for ci in (c for i in present for c in range(i * l2n, min((i + 1) * l2n, nclu))):
            prog.set(ci)
            e, bm = self._entry(ci)
            if not e and not bm:
                continue
            compressed = bool(e & L.OFLAG_COMPRESSED)
            host = 0 if compressed else e & L2E_MASK
            if host and self.refcount(host // cs) != 1:
                continue
            clen = self._cluster_len(ci)
            start = ci * cs
            if has_backing and below is None:
                # without the parent's content only explicit zeroes can be simplified
                if compressed or not is_zero(self._own_view(start, clen, lambda o, n: zeroes(n))):
                    continue
                if self.version < 3 or (self.extended_l2 and bm & 0xFFFFFFFF != 0xFFFFFFFF):
                    continue
                if not host and not compressed:
                    continue        # already a zero cluster without host space
                self._replace_entry(ci, e, 0 if self.extended_l2 else L.OFLAG_ZERO,
                                    0xFFFFFFFF << 32 if self.extended_l2 else 0)
                continue
            view = self._own_view(start, clen, below or (lambda o, n: zeroes(n)))
            if below is not None:
                under = below(start, clen)
                if bytes(view) == bytes(under) + bytes(clen - len(under)):
                    self._replace_entry(ci, e, 0, 0)
                elif is_zero(view) and self.version >= 3 and (host or compressed):
                    self._replace_entry(ci, e, 0 if self.extended_l2 else L.OFLAG_ZERO,
                                        0xFFFFFFFF << 32 if self.extended_l2 else 0)
            elif is_zero(view):
                self._replace_entry(ci, e, 0, 0)
        if not self.nb_snapshots and not self.bitmaps_ext:
            self._close_holes(lambda d, t: prog.set(nclu + nclu * d // max(t, 1)))
        self.f.sync()
        prog.finish()

    def close_holes(self, progress: ProgressCallback | None = None) -> bool:
        """After discards: clusters above the holes move down into them, in place, and the file
        is truncated (no content is read to judge it). Not with internal snapshots or
        persistent bitmaps (compact leaves those alone too)."""
        self._check_write()
        if self.nb_snapshots or self.bitmaps_ext:
            return False
        self._forget_free()
        progs: list[Progress] = []

        def moved(done: int, total: int) -> None:
            if not progs:
                progs.append(Progress(progress, total))
            progs[0].set(done)

        self._close_holes(moved)
        self.f.sync()
        (progs or [Progress(progress, 1)])[0].finish()
        return True

    def _close_holes(self, moved: Callable[[int, int], None] | None = None) -> None:
        """Move clusters from the end of the file into free clusters (refcount 0, refcount
        block present) and truncate. Movable: data clusters and L2 tables with refcount 1, and
        host clusters holding compressed clusters wholly. compaction.move_blocks copies them,
        syncs, then :meth:`_repoint_clusters`, then syncs."""
        cs = self.cs
        self.fsize = self.f.size()
        end = ceil_div(self.fsize, cs)
        # who refers to each movable cluster; tables are named by their L1 index, so that an
        # entry is written into its table wherever that table moved
        owner: dict[int, _Owner] = {}
        comp: dict[int, list[tuple[int, int]]] = {}
        pinned: set[int] = set()
        for i, l1e in enumerate(self.l1):
            off = l1e & L.L1E_OFFSET_MASK
            if not off or self.refcount(off // cs) != 1:
                continue
            owner[off // cs] = ("l1", i)
            tbl = self._load_l2(off, f"L1 index {i}")
            step = 2 if self.extended_l2 else 1
            for j in range(self.l2_entries):
                e = tbl[j * step]
                if e & L.OFLAG_COMPRESSED:
                    coff, csize = self._compressed_range(e)
                    h = coff // cs
                    if (coff + csize - 1) // cs != h:
                        pinned.add(h)
                        pinned.add((coff + csize - 1) // cs)
                    else:
                        comp.setdefault(h, []).append((i, j))
                    continue
                host = e & L2E_MASK
                if host and self.refcount(host // cs) == 1:
                    owner[host // cs] = ("l2", i, j)
        for h, refs in comp.items():
            if h not in pinned and h not in owner and self.refcount(h) == len(refs):
                owner[h] = ("comp", tuple(refs))
        holes: list[list[int]] = []
        for c in range(1, end):
            if self.refcount(c) == 0 and \
                    self._refblock(c // self.rb_entries) is not None:
                if holes and holes[-1][1] == c * cs:
                    holes[-1][1] += cs
                else:
                    holes.append([c * cs, (c + 1) * cs])
        blocks = [(c * cs, cs, who) for c, who in owner.items() if c < end]
        moves = plan_moves(blocks, holes, cs)
        total = sum(m.length for m in moves)
        done = [0]

        def advance(n: int) -> None:
            done[0] += n
            if moved is not None:
                moved(done[0], total)

        copy = None
        if self.crypt_method:
            # a data cluster's IV is its host offset: moved, it is decrypted and encrypted again
            if any(m.key[0] == "comp" for m in moves):
                raise NotSupported(f"{self.location}: compressed clusters in an encrypted "
                                   "image cannot be moved")

            def copy(m: Move[_Owner]) -> None:
                if m.key[0] == "l2":
                    raw = self.f.pread(m.src, m.length).ljust(m.length, b"\0")
                    self._write_data(m.dst, self._decrypt_host(m.src, raw, 0))
                else:
                    copy_range(self.f, m.src, m.dst, m.length)
        move_blocks(self.f, moves, self._repoint_clusters, advance=advance, copy=copy)
        last = self._cut_free_tail(end)
        run = -1                                # free clusters below the end: one call a run
        for c in range(1, last + 1):
            free = c < last and self.refcount(c) == 0
            if free and run < 0:
                run = c
            elif not free and run >= 0:
                self.f.punch_hole(run * cs, (c - run) * cs)
                run = -1

    def _repoint_clusters(self, moves: Sequence[Move[_Owner]]) -> None:
        """Name the new places of moved clusters: refcounts of the new places first (sync),
        then the L1 entries of moved tables, then the L2 entries (written into each table at
        its new place), sync, then the old places' refcounts drop to zero."""
        cs = self.cs
        for m in moves:
            self._set_refcount(m.dst // cs, self.refcount(m.src // cs))
        self.f.sync()
        l1 = BlockTable(self.f, self.l1_offset, self.l1, big_endian=True)
        for m in moves:
            match m.key:
                case ("l1", int(i)):
                    tbl = self._l2_cache.pop(m.src, None)
                    if tbl is not None:
                        self._l2_cache[m.dst] = tbl
                    l1[i] = m.dst | L.OFLAG_COPIED
        l1.write_back()
        tables: dict[int, BlockTable] = {}

        def table(i: int) -> BlockTable:
            t = tables.get(i)
            if t is None:
                off = self.l1[i] & L.L1E_OFFSET_MASK
                t = tables[i] = BlockTable(self.f, off, self._load_l2(off, "compact"),
                                           big_endian=True)
            return t

        step = 2 if self.extended_l2 else 1
        x = 62 - (self.cb - 8)
        for m in moves:
            match m.key:
                case ("l2", int(i), int(j)):
                    t = table(i)
                    k = j * step
                    t[k] = (t[k] & ~L2E_MASK) | m.dst
                case ("comp", tuple(refs)):
                    for i, j in refs:
                        t = table(i)
                        e = t[j * step]
                        coff = e & ((1 << x) - 1)
                        t[j * step] = (e & ~((1 << x) - 1)) | (m.dst + coff - m.src)
        for t in tables.values():
            t.write_back()
        self.f.sync()
        for m in moves:
            self._set_refcount(m.src // cs, 0)

    # ------------------------------------------------------------------ resize
    def resizes_in_place(self, new_size: int) -> bool:
        # growing: a new L1 table is written to new clusters and named in the header before
        # the size is (a larger L1 is valid); the old one is freed last (a crash only leaks)
        return new_size > self.size and not self._tracked and not self.bitmaps_ext

    def resize(self, new_size: int, progress: ProgressCallback | None = None) -> None:
        self._check_write()
        if self._tracked or (self.bitmaps_ext and self.autoclear & L.AUTOCLEAR_BITMAPS):
            self._drop_bitmaps()             # bitmaps describe the old size: remove them cleanly
        if new_size % 512:
            raise InvalidArgument(f"{self.location}: new size must be a multiple of 512, "
                                  f"found {new_size}")
        if new_size < self.size:
            self._forget_free()
            self._shrink(new_size)
            if progress:
                progress(1, 1)
            return
        span = self.cs * self.l2_entries
        need = ceil_div(new_size, span)
        if need * 8 > L.MAX_L1_BYTES or new_size > self.max_size:
            raise too_large("QCOW2", new_size, self.max_size, self.location, limit_reason(self.cs))
        if need > len(self.l1):
            old_off, old_n = self.l1_offset, len(self.l1)
            nclu = ceil_div(need * 8, self.cs)
            new_off = self._alloc(nclu)
            l1 = array("Q", self.l1)
            l1.extend([0] * (need - len(l1)))
            raw = array_be_bytes(l1)
            self.f.pwrite(new_off, raw + bytes(nclu * self.cs - len(raw)))
            self.f.sync()
            hdr = struct.pack(">IQ", need, new_off)
            self.header_raw[L.OFF_L1_SIZE : L.OFF_L1_SIZE + 12] = hdr
            self.f.pwrite(L.OFF_L1_SIZE, hdr)
            self.l1, self.l1_offset = l1, new_off
            if old_n:
                self._unref(old_off, old_n * 8, punch=False)
        self.f.sync()
        struct.pack_into(">Q", self.header_raw, L.OFF_SIZE, new_size)
        self.f.pwrite(L.OFF_SIZE, self.header_raw[L.OFF_SIZE : L.OFF_SIZE + 8])
        self.size = new_size
        self.f.sync()
        if progress:
            progress(1, 1)

    def _shrink(self, new_size: int) -> None:
        """Cut the virtual size (refused when this image holds data past ``new_size``; the
        operation has checked the whole chain): the L2 entries of clusters wholly past the end
        are cleared and their clusters freed, L2 tables wholly past the end are dropped, then the
        size is written and free clusters at the end of the file are cut off. The L1 table keeps
        its length (a longer one is valid)."""
        if self.nb_snapshots:
            raise InvalidArgument(
                f"{self.location}: cannot shrink a qcow2 image with internal "
                "snapshots (they keep the old size); delete them first"
            )
        self._refuse_cut_data(new_size)
        cs, per = self.cs, self.l2_entries
        w = 2 if self.extended_l2 else 1
        first = ceil_div(new_size, cs)  # first guest cluster wholly cut off
        old_n = ceil_div(self.size, cs)
        keep_l1 = ceil_div(new_size, (cs * per))  # L1 entries that still map something
        for l1i in range(first // per, min(len(self.l1), ceil_div(old_n, per))):
            tbl, l2off = self._l2_of(l1i)
            if tbl is None:
                continue
            lo = max(first - l1i * per, 0)
            hi = min(old_n - l1i * per, per)
            gone = [tbl[w * j] for j in range(lo, hi) if tbl[w * j]]
            tbl[w * lo : w * hi] = array("Q", bytes(8 * w * (hi - lo)))
            if l1i >= keep_l1:  # the whole table: unlink it, then free it
                self._set_l1(l1i, 0)
                if self._l2_cache.pop(l2off, None) is not None:
                    self._l2_cache_bytes -= cs
                self._unref(l2off, cs)
            else:
                self.f.pwrite(l2off + 8 * w * lo, array_be_bytes(tbl[w * lo : w * hi]))
            for e in gone:
                self._unref_entry(e)
        self.f.sync()
        struct.pack_into(">Q", self.header_raw, L.OFF_SIZE, new_size)
        self.f.pwrite(L.OFF_SIZE, self.header_raw[L.OFF_SIZE : L.OFF_SIZE + 8])
        self.size = new_size
        self.f.sync()
        self._cut_free_tail(max(self.next_cluster, ceil_div(self.fsize, cs)))

    def _cut_free_tail(self, end: int) -> int:
        """Truncate the file after its last cluster in use (of ``end`` clusters); returns the
        new number of clusters."""
        last = end
        while last > 1 and self.refcount(last - 1) == 0:
            last -= 1
        if last < end:
            self.f.truncate(last * self.cs)
            self.fsize = last * self.cs
            self.next_cluster = last
        return last

    # ------------------------------------------------------------------ relink
    def set_parent(self, parent: Image | None) -> None:
        self._check_write()
        name = fmt = hint = None
        if parent is not None:
            name = relative_name(self.location, parent.location)
            fmt = parent.backend.qemu_format
            hint = ParentHint(locations=[name], format=parent.backend.name)
        self._write_header_area(name, fmt)
        self.backing_file = name
        self.backing_format = fmt
        self.parent_hint = hint
        if hint is None:
            self.flags &= ~ImageFlags.DIFF
        else:
            self.flags |= ImageFlags.DIFF
