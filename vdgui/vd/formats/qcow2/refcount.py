"""QCOW2 reference counts: the refcount table and its blocks of 1..64-bit entries
(qcow2.txt "Host cluster management"), and allocation of clusters: freed ones (once a sync made
their release durable) or new ones at the end of the file (refcount written before anything
points at a cluster)."""
from __future__ import annotations

import struct
from array import array

from ...align import align_up
from ...errors import CorruptImage, NotSupported
from . import layout as L
from .clusters import BE_U64, L2E_MASK, array_be_bytes, be_array
from .state import Bytes, Qcow2State

REUSE_SYNC = 16 << 20       # bytes freed before a sync is made mid-write to reuse them


def rc_get(blk: Bytes, idx: int, bits: int) -> int:
    """Entry ``idx`` of a refcount block of ``bits``-bit entries (sub-byte: LSB first)."""
    if bits == 16:
        return blk[2 * idx] << 8 | blk[2 * idx + 1]
    if bits < 8:
        bitpos = idx * bits
        return blk[bitpos >> 3] >> (bitpos & 7) & ((1 << bits) - 1)
    w = bits // 8
    return int.from_bytes(blk[idx * w:idx * w + w], "big")


def rc_set(blk: bytearray, idx: int, value: int, bits: int) -> tuple[int, int]:
    """Set entry ``idx``; returns the (byte offset, length) changed."""
    if bits < 8:
        bitpos = idx * bits
        mask = ((1 << bits) - 1) << (bitpos & 7)
        b = bitpos >> 3
        blk[b] = (blk[b] & ~mask) | (value << (bitpos & 7))
        return b, 1
    w = bits // 8
    blk[idx * w:idx * w + w] = value.to_bytes(w, "big")
    return idx * w, w


class RefcountsMixin(Qcow2State):
    """Refcount lookups and updates, cluster allocation and release."""

    # ------------------------------------------------------------------ refcounts
    def _load_rt(self) -> array[int]:
        if self.rt is None:
            self.rt = be_array(self.f.read_exact(self.rt_offset, self.rt_clusters * self.cs,
                                                  "refcount table"))
        return self.rt

    def _refblock(self, rti: int) -> bytearray | None:
        """Refcount block ``rti`` (cached), None when the table has none."""
        blk = self._rb_cache.get(rti)
        if blk is not None:
            return blk
        rt = self._load_rt()
        off = rt[rti] & L.REFT_OFFSET_MASK if rti < len(rt) else 0
        if off:
            if off % self.cs or off + self.cs > max(self.fsize, self.next_cluster * self.cs):
                raise self._corrupt(f"refcount block {rti} offset invalid", offset=off,
                                    expected="cluster aligned inside the file", found=hex(off))
            blk = bytearray(self.f.read_exact(off, self.cs, "refcount block"))
            self._rb_cache[rti] = blk
            return blk
        return None

    def _refblock_for_write(self, rti: int) -> bytearray:
        """Refcount block ``rti``, made when the table has none."""
        blk = self._refblock(rti)
        return blk if blk is not None else self._new_refblock(rti)

    def _rc_get_in(self, blk: bytearray, idx: int) -> int:
        return rc_get(blk, idx, self.refcount_bits)

    def _rc_set_in(self, blk: bytearray, idx: int, value: int) -> tuple[int, int]:
        if value < 0 or value >> self.refcount_bits:
            raise CorruptImage(f"refcount {value} does not fit in {self.refcount_bits} bits",
                               path=self.location)
        return rc_set(blk, idx, value, self.refcount_bits)

    def refcount(self, ci: int) -> int:
        rti, idx = divmod(ci, self.rb_entries)
        blk = self._refblock(rti)
        return 0 if blk is None else self._rc_get_in(blk, idx)

    def _set_refcount(self, ci: int, value: int) -> None:
        rti, idx = divmod(ci, self.rb_entries)
        blk = self._refblock_for_write(rti)
        b, n = self._rc_set_in(blk, idx, value)
        off = self._load_rt()[rti] & L.REFT_OFFSET_MASK
        self.f.pwrite(off + b, blk[b:b + n])

    def _take(self, n: int, grow: bool = True) -> int:
        """Reserve ``n`` clusters at the end of the file (refcounts not touched); first index.
        ``grow=False``: the caller writes them whole at once, which extends the file."""
        ci = self.next_cluster
        self.next_cluster += n
        end = self.next_cluster * self.cs
        if end > self.fsize:
            if grow:
                self.f.truncate(end)
            self.fsize = end
        return ci

    def _new_refblock(self, rti: int) -> bytearray:
        rt = self._load_rt()
        if rti >= len(rt):
            self._grow_rt(rti)
            rt = self._load_rt()
            # growing the table counted its own new clusters, which may have made this very
            # refcount block: use it (a second one would drop those refcounts)
            made = self._refblock(rti)
            if made is not None:
                return made
        ci = self._take(1)
        blk = bytearray(self.cs)
        own = ci // self.rb_entries == rti
        if own:
            self._rc_set_in(blk, ci % self.rb_entries, 1)
        off = ci * self.cs
        self.f.pwrite(off, blk)
        rt[rti] = off
        self.f.pwrite(self.rt_offset + 8 * rti, BE_U64.pack(off))
        self._rb_cache[rti] = blk
        if not own:
            self._set_refcount(ci, 1)
        return blk

    def _grow_rt(self, min_index: int) -> None:
        old = self._load_rt()
        old_off, old_clusters = self.rt_offset, self.rt_clusters
        per = self.cs // 8
        need = max(min_index + 1, (self.next_cluster + 8) // self.rb_entries + 4, len(old) * 2)
        entries = align_up(need, per)
        nclu = entries // per
        if entries * 8 > L.MAX_REFTABLE_BYTES:
            raise NotSupported(f"{self.location}: the refcount table would exceed qemu's limit "
                               f"of {L.MAX_REFTABLE_BYTES >> 20} MiB")
        ci = self._take(nclu)
        new = array("Q", old)
        new.extend([0] * (entries - len(old)))
        self.rt = new
        self.rt_offset = ci * self.cs
        self.rt_clusters = nclu
        self.f.pwrite(self.rt_offset, array_be_bytes(new))
        for c in range(ci, ci + nclu):
            self._set_refcount(c, 1)
        self.f.pwrite(self.rt_offset, array_be_bytes(self.rt))
        self.f.sync()
        hdr = struct.pack(">QI", self.rt_offset, self.rt_clusters)
        self.header_raw[L.OFF_REFCOUNT_TABLE_OFFSET:L.OFF_REFCOUNT_TABLE_OFFSET + 12] = hdr
        self.f.pwrite(L.OFF_REFCOUNT_TABLE_OFFSET, hdr)
        for c in range(old_off // self.cs, old_off // self.cs + old_clusters):
            rc = self.refcount(c)
            if rc:
                self._set_refcount(c, rc - 1)

    def _alloc(self, n: int = 1, data: Bytes | None = None) -> int:
        """Allocate ``n`` contiguous clusters; returns the byte offset. One cluster may be a
        freed one (:meth:`_take_free`), more are appended at the end of the file. ``data``
        (exactly ``n`` clusters) is written there before the refcounts are set (a crash in
        between leaves unreferenced space: nothing reads it, nothing leaks)."""
        if n == 1:
            ci, k = self._take_free(1)
            if k:
                if data is not None:
                    self._write_data(ci * self.cs, data)
                self._set_refcounts(ci, 1, 1)
                return ci * self.cs
        first = self.next_cluster
        while True:
            ci = self._take(n, grow=data is None)
            if all(self.refcount(c) == 0 for c in range(ci, ci + n)):
                break
            if self.next_cluster - first > 65536:
                raise self._corrupt("refcounts claim clusters far past the end of the file; "
                                    "run a check with repair", offset=first * self.cs)
        if data is not None:
            self._write_data(ci * self.cs, data)
        self._set_refcounts(ci, n, 1)
        return ci * self.cs

    def _alloc_runs(self, n: int, data: Bytes) -> list[tuple[int, int]]:
        """``n`` clusters holding ``data`` (n clusters): freed clusters first, the rest
        appended. Each run's data is written, then the refcounts are set. Returns (first
        cluster, count) runs in ``data``'s order."""
        runs = []
        left = n
        while left:
            ci, k = self._take_free(left)
            if not k:
                break
            runs.append((ci, k))
            left -= k
        if left:
            runs.append((self._alloc(left, memoryview(data)[(n - left) * self.cs:]) // self.cs,
                         left))
        pos = 0
        for ci, k in runs[:len(runs) - (1 if left else 0)]:
            self._write_data(ci * self.cs, memoryview(data)[pos:pos + k * self.cs])
            self._set_refcounts(ci, k, 1)
            pos += k * self.cs
        return runs

    # -- freed clusters: reused once the write that freed them is on disk --------------------
    def _take_free(self, most: int) -> tuple[int, int]:
        """Up to ``most`` adjacent freed clusters (first index, count), taken from the pool;
        (0, 0) when there are none. Only clusters freed before a sync are reused: a power loss
        can then never leave an old table entry pointing at new data. A sync is made here once
        REUSE_SYNC bytes wait for one."""
        if self.compress_writes:
            return 0, 0             # compressed clusters are packed at the end of the file
        if not self._free and len(self._freed) * self.cs >= REUSE_SYNC:
            self.f.sync()
            self._settle_freed()
        pool = self._free
        while pool:
            ci = pool.pop()
            if ci < self.next_cluster and self.refcount(ci) == 0:
                break
        else:
            return 0, 0
        k = 1
        while (k < most and pool and pool[-1] == ci + k and ci + k < self.next_cluster
               and self.refcount(ci + k) == 0):
            pool.pop()
            k += 1
        return ci, k

    def _settle_freed(self) -> None:
        """After a sync: the clusters freed before it join the pool."""
        if self._freed:
            self._free = sorted(set(self._free).union(self._freed), reverse=True)
            self._freed = []

    def _forget_free(self) -> None:
        """Before the refcounts are rebuilt or clusters moved (repair, compact, resize): the
        deferred punches are made and the pool is emptied."""
        self._punch_deferred_now()
        self._free = []
        self._freed = []

    def _punch_deferred_now(self) -> None:
        """Punch what write_zeroes freed and nothing reused since, adjacent clusters together."""
        ranges, self._punch_deferred = self._punch_deferred, []
        cs = self.cs
        out: list[tuple[int, int]] = []
        for a, b in ranges:
            run = None
            for c in range(a, b):
                if c < self.next_cluster and self.refcount(c) == 0:
                    if run is None:
                        run = c
                    continue
                if run is not None:
                    out.append((run * cs, (c - run) * cs))
                    run = None
            if run is not None:
                out.append((run * cs, (b - run) * cs))
        for off, n in out:
            self.f.punch_hole(off, n)

    def _write_back(self) -> None:
        self._punch_deferred_now()

    def _after_sync(self) -> None:
        self._settle_freed()

    def _set_refcounts(self, ci: int, n: int, value: int) -> None:
        """Set the refcounts of clusters [ci, ci+n): one write per refcount block touched."""
        end = ci + n
        while ci < end:
            rti, idx = divmod(ci, self.rb_entries)
            k = min(end - ci, self.rb_entries - idx)
            blk = self._refblock_for_write(rti)
            lo, hi = self.cs, 0
            for i in range(idx, idx + k):
                b, m = self._rc_set_in(blk, i, value)
                lo = min(lo, b)
                hi = max(hi, b + m)
            off = self._load_rt()[rti] & L.REFT_OFFSET_MASK
            self.f.pwrite(off + lo, blk[lo:hi])
            ci += k

    def _unref(self, off: int, length: int, punch: bool = True) -> None:
        first = off // self.cs
        last = (off + length - 1) // self.cs
        for c in range(first, last + 1):
            rc = self.refcount(c)
            if rc:
                self._set_refcount(c, rc - 1)
                if rc == 1:
                    self._freed_one(c, punch)

    def _unref_clusters(self, clusters: list[int]) -> None:
        """Drop one reference from each of ``clusters`` (data clusters of L2 entries already
        rewritten): one write per refcount block touched."""
        by_block: dict[int, list[int]] = {}
        for c in clusters:
            by_block.setdefault(c // self.rb_entries, []).append(c)
        for rti, cs_ in by_block.items():
            blk = self._refblock(rti)
            if blk is None:
                continue
            lo, hi = self.cs, 0
            for c in cs_:
                idx = c % self.rb_entries
                rc = self._rc_get_in(blk, idx)
                if not rc:
                    continue
                b, m = self._rc_set_in(blk, idx, rc - 1)
                lo, hi = min(lo, b), max(hi, b + m)
                if rc == 1:
                    self._freed_one(c, True)
            if hi > lo:
                off = self._load_rt()[rti] & L.REFT_OFFSET_MASK
                self.f.pwrite(off + lo, blk[lo:hi])

    def _freed_one(self, c: int, punch: bool) -> None:
        """Cluster ``c``'s refcount reached 0: it joins the clusters freed since the last sync,
        and is punched (now, or with its batch) when ``punch``."""
        self._freed.append(c)
        if not punch:
            return
        batch = self._punch_batch
        if batch is None:
            self.f.punch_hole(c * self.cs, self.cs)
        elif batch and batch[-1][1] == c:
            batch[-1][1] = c + 1
        else:
            batch.append([c, c + 1])

    def _punch_batched(self) -> None:
        """Punch the clusters a discard freed, adjacent ones in one call (one call per
        cluster made a discard of gigabytes take minutes)."""
        batch, self._punch_batch = self._punch_batch, None
        for a, b in batch or ():
            self.f.punch_hole(a * self.cs, (b - a) * self.cs)

    def _unref_entry(self, e: int) -> None:
        """Drop the host references of an L2 entry being replaced."""
        if e & L.OFLAG_COMPRESSED:
            coff, csize = self._compressed_range(e)
            self._unref(coff & ~511, csize + (coff & 511), punch=False)
        elif e & L2E_MASK and not self.incompat & L.INCOMPAT_DATA_FILE:
            self._unref(e & L2E_MASK, self.cs)
