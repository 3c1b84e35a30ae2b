"""QCOW2 L1/L2 tables: cluster mapping (standard and extended L2 entries, compressed
clusters), reads, writes (copy on write of shared clusters, subclusters, compressed writes)
and discard. Table bytes are big-endian arrays (qcow2.txt "Cluster mapping")."""
from __future__ import annotations

import io
import struct
import zlib
from array import array

from ...align import ceil_div
from ...errors import InvalidArgument, NotSupported
from ...fileio import ImageFile
from ...image import Alloc, FillFn
from ...runs import RunList
from ...sparse import is_zero, zeroes
from ...tables import arithmetic_run, first_nonzero, table_from_bytes, table_to_bytes
from . import layout as L
from .state import Bytes, Qcow2State

BE_U64 = struct.Struct(">Q")



def be_array(data: Bytes) -> array[int]:
    return table_from_bytes(data, "Q", big_endian=True)


def array_be_bytes(a: array[int]) -> bytes:
    return table_to_bytes(a, big_endian=True)


class DecompressError(Exception):
    pass


def inflate(data: bytes, limit: int) -> bytes:
    """Raw deflate (qemu writes window bits -12; -15 reads those too), output capped."""
    try:
        d = zlib.decompressobj(-15)
        out = d.decompress(data, limit)
    except zlib.error as exc:
        raise DecompressError(f"deflate data is invalid: {exc}") from None
    return out


def _unzstd(data: bytes, limit: int) -> bytes:
    try:
        import zstandard
    except ImportError:  # pragma: no cover - zstandard is declared as an optional dependency
        raise NotSupported(
            "unsupported compression type zstd: install the 'zstandard' module"
        ) from None
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(
            io.BytesIO(data), read_across_frames=True
        )
        out = bytearray()
        while len(out) < limit:
            chunk = reader.read(limit - len(out))
            if not chunk:
                break
            out += chunk
        return bytes(out)
    except zstandard.ZstdError as exc:
        raise DecompressError(f"zstd data is invalid: {exc}") from None


L2E_MASK = L.L2E_OFFSET_MASK


def _subcluster_mask(s0: int, s1: int) -> int:
    """Bits s0..s1 inclusive."""
    return ((1 << (s1 - s0 + 1)) - 1) << s0


class _Segment:
    __slots__ = ("host", "kind", "n", "pos")

    def __init__(self, pos: int, n: int, kind: int, host: int) -> None:
        self.pos, self.n, self.kind, self.host = pos, n, kind, host


K_UNALLOC, K_ZERO, K_DATA, K_COMP = 0, 1, 2, 3
_KIND_ALLOC = {
    K_UNALLOC: Alloc.UNALLOCATED,
    K_ZERO: Alloc.ZERO,
    K_DATA: Alloc.DATA,
    K_COMP: Alloc.DATA,
}


class ClustersMixin(Qcow2State):
    """Mapping guest clusters to host clusters through the L1 and L2 tables."""

    # ------------------------------------------------------------------ tables
    def _load_l2(self, off: int, where: str) -> array[int]:
        tbl = self._l2_cache.get(off)
        if tbl is not None:
            self._l2_cache.move_to_end(off)
            return tbl
        if off % self.cs:
            raise self._corrupt(
                f"L2 table offset not cluster aligned ({where})",
                offset=off,
                expected=f"a multiple of {self.cs}",
                found=hex(off),
            )
        if off + self.cs > self.fsize:
            raise self._corrupt(
                f"L2 table lies past the end of the file ({where})",
                offset=off,
                expected=f"end <= {self.fsize}",
                found=off + self.cs,
            )
        tbl = be_array(self.f.read_exact(off, self.cs, "L2 table"))
        self._l2_cache[off] = tbl
        self._l2_cache_bytes += self.cs
        while self._l2_cache_bytes > self.L2_CACHE_BYTES and len(self._l2_cache) > 1:
            self._l2_cache.popitem(last=False)
            self._l2_cache_bytes -= self.cs
        return tbl

    def _l2_of(self, l1_index: int) -> tuple[array[int] | None, int]:
        if l1_index >= len(self.l1):
            return None, 0
        off = self.l1[l1_index] & L.L1E_OFFSET_MASK
        if not off:
            return None, 0
        return self._load_l2(off, f"L1 index {l1_index}"), off

    def _entry(self, ci: int) -> tuple[int, int]:
        """(L2 entry, subcluster bitmap) of guest cluster ``ci`` (0, 0 when unallocated)."""
        l1i, l2i = divmod(ci, self.l2_entries)
        tbl, _ = self._l2_of(l1i)
        if tbl is None:
            return 0, 0
        if self.extended_l2:
            return tbl[2 * l2i], tbl[2 * l2i + 1]
        return tbl[l2i], 0

    def _compressed_range(self, e: int) -> tuple[int, int]:
        x = 62 - (self.cb - 8)
        coff = e & ((1 << x) - 1)
        nsec = ((e >> x) & ((1 << (62 - x)) - 1)) + 1
        return coff, nsec * 512 - (coff & 511)

    def _segments(self, offset: int, length: int) -> list[_Segment]:
        """Map a guest range to segments (pos, n, kind, host); adjacent ones merged."""
        if self.extended_l2:
            return self._segments_ext(offset, length)
        # standard L2 entries: one pass over the entries, a segment object per run only
        cs, cb = self.cs, self.cb
        cmask = cs - 1
        nl2 = self.l2_entries
        span = cs * nl2
        data_file = self.incompat & L.INCOMPAT_DATA_FILE
        f_comp, f_zero, f_copied = L.OFLAG_COMPRESSED, L.OFLAG_ZERO, L.OFLAG_COPIED
        out: list[_Segment] = []
        rk = -1  # the open run: kind (-1: none), guest start, length, host start
        rpos = rn = rhost = 0
        end = offset + length
        pos = offset
        while pos < end:
            l1i = pos // span
            stop = min(end, (l1i + 1) * span)
            tbl, _ = self._l2_of(l1i)
            if tbl is None:
                if rk == K_UNALLOC:
                    rn += stop - pos
                else:
                    if rk >= 0:
                        out.append(_Segment(rpos, rn, rk, rhost))
                    rk, rpos, rn, rhost = K_UNALLOC, pos, stop - pos, 0
                pos = stop
                continue
            i = (pos >> cb) % nl2
            while pos < stop:
                e = tbl[i]
                i += 1
                inner = pos & cmask
                n = cs - inner
                if pos + n > stop:
                    n = stop - pos
                if not e:
                    kind = K_UNALLOC
                    host = 0
                    # a stretch of unallocated entries in one step, not one by one
                    more = (stop - pos - n) // cs
                    if more:
                        j = first_nonzero(tbl, i, i + more)
                        n += (j - i) * cs
                        i = j
                elif e & f_comp:
                    if data_file:
                        raise self._corrupt(
                            "compressed cluster in an image with an external data file", offset=pos
                        )
                    if rk >= 0:
                        out.append(_Segment(rpos, rn, rk, rhost))
                    out.append(_Segment(pos, n, K_COMP, e))
                    rk = -1
                    pos += n
                    continue
                else:
                    host = e & L2E_MASK
                    if host & cmask:
                        ci = pos >> cb
                        raise self._corrupt(
                            "cluster offset not cluster aligned",
                            offset=host,
                            field=f"L2 entry of guest offset {ci * cs:#x}",
                            expected=f"a multiple of {cs}",
                            found=hex(host),
                        )
                    if e & f_zero:
                        kind = K_ZERO
                        host = 0
                    elif host or (data_file and e & f_copied):
                        kind = K_DATA
                        if not inner:
                            # the entries after it that continue it in the file (same flags,
                            # next host cluster, no carry out of the offset bits): one step
                            more = min((stop - pos - n) >> cb, (L2E_MASK - host) >> cb)
                            if more > 0 and tbl[i] == e + cs:
                                j = arithmetic_run(tbl, i, i + more, e + cs, cs)
                                n += (j - i) * cs
                                i = j
                        host += inner
                    else:
                        kind = K_UNALLOC
                if kind == rk and (kind != K_DATA or rhost + rn == host):
                    rn += n
                else:
                    if rk >= 0:
                        out.append(_Segment(rpos, rn, rk, rhost))
                    rk, rpos, rn, rhost = kind, pos, n, host
                pos += n
        if rk >= 0:
            out.append(_Segment(rpos, rn, rk, rhost))
        return out

    def _segments_ext(self, offset: int, length: int) -> list[_Segment]:
        """_segments for images with extended L2 entries (subcluster bitmaps)."""
        cs, cb = self.cs, self.cb
        out: list[_Segment] = []

        def add(pos: int, n: int, kind: int, host: int) -> None:
            if out:
                last = out[-1]
                if (
                    last.kind == kind
                    and last.pos + last.n == pos
                    and (
                        kind in (K_UNALLOC, K_ZERO)
                        or (kind == K_DATA and last.host + last.n == host)
                    )
                ):
                    last.n += n
                    return
            out.append(_Segment(pos, n, kind, host))

        end = offset + length
        pos = offset
        span = cs * self.l2_entries
        data_file = self.incompat & L.INCOMPAT_DATA_FILE
        while pos < end:
            l1i = pos // span
            stop = min(end, (l1i + 1) * span)
            tbl, _ = self._l2_of(l1i)
            if tbl is None:
                add(pos, stop - pos, K_UNALLOC, 0)
                pos = stop
                continue
            while pos < stop:
                ci = pos >> cb
                inner = pos & (cs - 1)
                n = min(cs - inner, stop - pos)
                l2i = ci % self.l2_entries
                if self.extended_l2:
                    e, bm = tbl[2 * l2i], tbl[2 * l2i + 1]
                else:
                    e, bm = tbl[l2i], 0
                if e & L.OFLAG_COMPRESSED:
                    if data_file:
                        raise self._corrupt(
                            "compressed cluster in an image with an external data file", offset=pos
                        )
                    out.append(_Segment(pos, n, K_COMP, e))
                    pos += n
                    continue
                host = e & L2E_MASK
                if host % cs:
                    raise self._corrupt(
                        "cluster offset not cluster aligned",
                        offset=host,
                        field=f"L2 entry of guest offset {ci * cs:#x}",
                        expected=f"a multiple of {cs}",
                        found=hex(host),
                    )
                if not self.extended_l2:
                    if e & L.OFLAG_ZERO:
                        add(pos, n, K_ZERO, 0)
                    elif host or (data_file and e & L.OFLAG_COPIED):
                        add(pos, n, K_DATA, host + inner)
                    else:
                        add(pos, n, K_UNALLOC, 0)
                    pos += n
                    continue
                alloc, zero = bm & 0xFFFFFFFF, bm >> 32
                if alloc & zero:
                    raise self._corrupt(
                        "subcluster both allocated and zero",
                        field=f"L2 bitmap of guest offset {ci * cs:#x}",
                        found=hex(bm),
                    )
                if alloc and not host and not (data_file and e & L.OFLAG_COPIED):
                    raise self._corrupt(
                        "allocated subclusters without a host cluster",
                        field=f"L2 entry of guest offset {ci * cs:#x}",
                        found=hex(e),
                    )
                scs = self.sc_size
                p = inner
                while p < inner + n:
                    k = p // scs
                    q = min((k + 1) * scs, inner + n)
                    if alloc >> k & 1:
                        add(ci * cs + p, q - p, K_DATA, host + p)
                    elif zero >> k & 1:
                        add(ci * cs + p, q - p, K_ZERO, 0)
                    else:
                        add(ci * cs + p, q - p, K_UNALLOC, 0)
                    p = q
                pos += n
        return out

    def _decompress_cluster(self, e: int, where: int) -> bytes:
        coff, csize = self._compressed_range(e)
        if coff >= self.fsize or coff + csize > self.fsize + 512:
            raise self._corrupt(
                "compressed cluster lies past the end of the file",
                offset=coff,
                field=f"compressed L2 entry of guest offset {where:#x}",
                expected=f"data inside the file ({self.fsize} bytes)",
                found=f"{csize} bytes at {coff:#x}",
            )
        raw = self.f.pread(coff, min(csize, self.fsize - coff))
        try:
            out = _unzstd(raw, self.cs) if self.compression_type == 1 else inflate(raw, self.cs)
        except DecompressError as exc:
            raise self._corrupt(
                f"compressed cluster cannot be decompressed: {exc}",
                offset=coff,
                field=f"compressed L2 entry of guest offset {where:#x}",
            ) from None
        if len(out) < self.cs:
            raise self._corrupt(
                "compressed cluster is short",
                offset=coff,
                expected=f"{self.cs} bytes",
                found=f"{len(out)} bytes",
            )
        return out

    # ------------------------------------------------------------------ reading
    def block_status(self, offset: int, length: int) -> list[tuple[int, int, Alloc]]:
        runs: RunList[Alloc] = RunList()
        for s in self._segments(offset, length):
            runs.add(s.pos, s.n, _KIND_ALLOC[s.kind])
        return runs.runs

    def _data_file(self) -> ImageFile:
        if self.incompat & L.INCOMPAT_DATA_FILE:
            if self.data_f is None:
                raise NotSupported(
                    f"{self.location}: the external data file "
                    f"{self.data_file_name!r} is not open (info-only open)"
                )
            return self.data_f
        return self.f

    def _read_host(self, host: int, n: int, where: int) -> bytes:
        src = self._data_file()
        data = src.pread(host, n)
        if len(data) < n:
            if src is self.f:
                raise self._corrupt(
                    "data cluster lies past the end of the file",
                    offset=host,
                    field=f"L2 entry of guest offset {where:#x}",
                    expected=f"{n} bytes",
                    found=f"{len(data)} bytes",
                )
            data += bytes(n - len(data))  # a raw data file shorter than the disk reads zeroes
        if self.crypt_method:
            return self._decrypt_host(host, data, where)
        return data

    def read(self, offset: int, length: int) -> bytes:
        segs = self._segments(offset, length)
        if len(segs) == 1 and segs[0].kind == K_DATA:
            return self._read_host(segs[0].host, length, offset)  # one run: no copy
        buf = bytearray(length)
        mv = memoryview(buf)
        cs = self.cs
        direct = not self.incompat & L.INCOMPAT_DATA_FILE and not self.crypt_method
        for s in segs:
            a = s.pos - offset
            if s.kind == K_DATA:
                # straight into the buffer when the run lies inside the file, else through
                # _read_host (short reads, errors, external data files)
                if not (
                    direct
                    and s.host + s.n <= self.fsize
                    and self.f.preadv_into(s.host, mv[a : a + s.n]) == s.n
                ):
                    mv[a : a + s.n] = self._read_host(s.host, s.n, s.pos)
            elif s.kind == K_COMP:
                out = self._decompress_cluster(s.host, s.pos)
                inner = s.pos & (cs - 1)
                mv[a : a + s.n] = out[inner : inner + s.n]
        return bytes(buf)

    def _l2_for_write(self, l1i: int) -> tuple[array[int], int]:
        """The L2 table of L1 index ``l1i``, allocated or copied so that it can be modified."""
        l1e = self.l1[l1i]
        old = l1e & L.L1E_OFFSET_MASK
        if old:
            tbl = self._load_l2(old, f"L1 index {l1i}")
            if self.refcount(old // self.cs) == 1:
                if not l1e & L.OFLAG_COPIED:
                    self._set_l1(l1i, old | L.OFLAG_COPIED)
                return tbl, old
            content = array_be_bytes(tbl)
            tbl = array("Q", tbl)
        else:
            content = None
            tbl = array("Q", bytes(self.cs))
        new = self._alloc(1)
        self.f.pwrite(new, content if content is not None else zeroes(self.cs))
        self._l2_cache[new] = tbl
        self._l2_cache_bytes += self.cs
        self._set_l1(l1i, new | L.OFLAG_COPIED)
        if old:
            self._unref(old, self.cs, punch=False)
        return tbl, new

    def _set_l1(self, l1i: int, value: int) -> None:
        self.l1[l1i] = value
        self.f.pwrite(self.l1_offset + 8 * l1i, BE_U64.pack(value))

    def _set_l2(self, tbl: array[int], l2off: int, l2i: int, e: int, bm: int = 0) -> None:
        if self.extended_l2:
            tbl[2 * l2i] = e
            tbl[2 * l2i + 1] = bm
            self.f.pwrite(l2off + 16 * l2i, struct.pack(">QQ", e, bm))
        else:
            tbl[l2i] = e
            self.f.pwrite(l2off + 8 * l2i, BE_U64.pack(e))

    def _cluster_len(self, ci: int) -> int:
        return min(self.cs, self.size - ci * self.cs)

    def _own_view(self, start: int, n: int, fill: FillFn) -> bytearray:
        """This image's content of [start, start+n), unallocated parts from ``fill``."""
        buf = bytearray(n)
        mv = memoryview(buf)
        for s in self._segments(start, n):
            a = s.pos - start
            if s.kind == K_DATA:
                mv[a : a + s.n] = self._read_host(s.host, s.n, s.pos)
            elif s.kind == K_COMP:
                inner = s.pos & (self.cs - 1)
                mv[a : a + s.n] = self._decompress_cluster(s.host, s.pos)[inner : inner + s.n]
            elif s.kind == K_UNALLOC and self.backing_file is not None:
                got = fill(s.pos, s.n)
                mv[a : a + len(got)] = got
        return buf

    def write(self, offset: int, data: bytes, fill: FillFn) -> None:
        self._check_write()
        self._check_cross_links()
        if self._tracked:              # persistent bitmaps kept (bitmaps.py)
            self._mark_dirty(offset, len(data))
        mv = memoryview(data)
        end = offset + len(data)
        pos = offset
        cs = self.cs
        batch = not self.extended_l2 and not self.compress_writes
        while pos < end:
            ci = pos // cs
            inner = pos - ci * cs
            if batch and not inner and end - pos >= 2 * cs:
                k = self._write_new_run(ci, mv[pos - offset :], (end - pos) // cs)
                if not k:
                    k = self._write_own_run(ci, mv[pos - offset :], (end - pos) // cs)
                if k:
                    pos += k * cs
                    continue
            n = min(cs - inner, end - pos)
            self._write_cluster(ci, inner, mv[pos - offset : pos - offset + n], fill)
            pos += n

    def _write_new_run(self, ci: int, mv: memoryview, most: int) -> int:
        """Whole clusters ci, ci+1, ... that this image does not hold yet and that are not all
        zero, within one L2 table: allocated together (freed clusters first, see
        ``_alloc_runs``), written with one write per host run for the data, then the refcounts,
        then one write for the L2 entries (in that order, so a crash only leaks). Returns how
        many clusters were written (0: none qualify, the caller goes cluster by cluster)."""
        cs = self.cs
        l1i, l2i = divmod(ci, self.l2_entries)
        most = min(most, self.l2_entries - l2i, (self.size - ci * cs) // cs)
        tbl, _ = self._l2_of(l1i)
        k = 0
        while k < most:
            if tbl is not None and tbl[l2i + k] & (L2E_MASK | L.OFLAG_COMPRESSED):
                break
            if is_zero(mv[k * cs : (k + 1) * cs]):
                break
            k += 1
        if k < 2:
            return 0
        tbl, l2off = self._l2_for_write(l1i)
        i = l2i
        for c, m in self._alloc_runs(k, mv[: k * cs]):
            for h in range(c, c + m):
                tbl[i] = h * cs | L.OFLAG_COPIED
                i += 1
        self.f.pwrite(l2off + 8 * l2i, array_be_bytes(tbl[l2i : l2i + k]))
        return k

    def _write_own_run(self, ci: int, mv: memoryview, most: int) -> int:
        """Whole clusters ci, ci+1, ... that this image holds alone (OFLAG_COPIED, refcount 1,
        in an L2 table of its own) in adjacent host clusters: overwritten in place with one
        write, nothing else changes. Returns how many (0: fewer than two qualify)."""
        cs = self.cs
        l1i, l2i = divmod(ci, self.l2_entries)
        most = min(most, self.l2_entries - l2i, (self.size - ci * cs) // cs)
        tbl, l2off = self._l2_of(l1i)
        if tbl is None or self.refcount(l2off // cs) != 1:
            return 0
        host = tbl[l2i] & L2E_MASK
        skip = L.OFLAG_COMPRESSED | L.OFLAG_ZERO
        k = 0
        while k < most:
            e = tbl[l2i + k]
            if e & skip or not e & L.OFLAG_COPIED or e & L2E_MASK != host + k * cs or not host:
                break
            if self.refcount(host // cs + k) != 1:
                break
            if not self.honor_zeroes and is_zero(mv[k * cs : (k + 1) * cs]):
                break           # becomes a zero cluster (_write_cluster)
            k += 1
        if k < 2:
            return 0
        self._write_data(host, mv[: k * cs])
        return k

    def _write_cluster(self, ci: int, inner: int, chunk: Bytes, fill: FillFn) -> None:
        cs = self.cs
        clen = self._cluster_len(ci)
        l1i, l2i = divmod(ci, self.l2_entries)
        e, bm = self._entry(ci)
        host = e & L2E_MASK
        compressed = bool(e & L.OFLAG_COMPRESSED)
        zero_flag = bool(e & L.OFLAG_ZERO) and not self.extended_l2 and not compressed
        full = inner == 0 and len(chunk) >= clen
        allzero = is_zero(chunk)
        has_backing = self.backing_file is not None
        if allzero and not self.honor_zeroes:
            if not compressed:
                if self.extended_l2:
                    if not bm & 0xFFFFFFFF and (not has_backing or bm >> 32 == 0xFFFFFFFF):
                        return
                elif zero_flag or (not host and not has_backing):
                    return
            if full and self.version >= 3 and (has_backing or host or compressed):
                tbl, l2off = self._l2_for_write(l1i)
                if self.extended_l2:
                    self._set_l2(tbl, l2off, l2i, 0, 0xFFFFFFFF << 32)
                else:
                    self._set_l2(tbl, l2off, l2i, L.OFLAG_ZERO)
                if compressed or host:
                    self._unref_entry(e)
                return
        tbl, l2off = self._l2_for_write(l1i)
        e, bm = (tbl[2 * l2i], tbl[2 * l2i + 1]) if self.extended_l2 else (tbl[l2i], 0)
        host = e & L2E_MASK
        compressed = bool(e & L.OFLAG_COMPRESSED)
        own = host and not compressed and self.refcount(host // cs) == 1
        if self.extended_l2 and not compressed:
            if own:
                self._write_subclusters(tbl, l2off, l2i, ci, host, e, bm, inner, chunk, fill)
                return
            if not host or not (bm & 0xFFFFFFFF):
                new = self._alloc(1)
                self._write_subclusters(
                    tbl, l2off, l2i, ci, new, 0, bm & ~0xFFFFFFFF, inner, chunk, fill
                )
                if host:
                    self._unref(host, cs, punch=False)
                return
        if own and not self.extended_l2:
            if e & L.OFLAG_ZERO:  # preallocated zero cluster: materialise in place
                content = bytearray(cs)
                content[inner : inner + len(chunk)] = chunk
                self._write_data(host, content)
            else:
                self._write_data(host + inner, chunk)
            if e != host | L.OFLAG_COPIED:
                self._set_l2(tbl, l2off, l2i, host | L.OFLAG_COPIED)
            return
        # a new cluster: copy of this image's view (compressed, shared, zero or from below)
        if full:
            content = bytearray(chunk[:clen])
        else:
            content = self._own_view(ci * cs, clen, fill)
            content[inner : inner + len(chunk)] = chunk
        if len(content) < cs:
            content += bytes(cs - len(content))
        if (
            self.compress_writes
            and full
            and not self.extended_l2
            and self._write_compressed(tbl, l2off, l2i, content)
        ):
            if compressed or host:
                self._unref_entry(e)
            return
        new = self._alloc(1, content)       # data, then its refcount: no truncate to grow
        if self.extended_l2:
            self._set_l2(tbl, l2off, l2i, new | L.OFLAG_COPIED, 0xFFFFFFFF)
        else:
            self._set_l2(tbl, l2off, l2i, new | L.OFLAG_COPIED)
        if compressed or host:
            self._unref_entry(e)

    def _write_compressed(self, tbl: array[int], l2off: int, l2i: int, content: bytearray) -> bool:
        """Store one whole cluster compressed (as ``qemu-img convert -c`` does): deflate (or
        zstd) data packed byte-wise after the previous compressed cluster; every host cluster it
        touches gets one more reference. False when it would not save space."""
        cs = self.cs
        try:
            if self.compression_type == 1:
                import zstandard

                out = zstandard.ZstdCompressor().compress(bytes(content))
            else:
                z = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -12)
                out = z.compress(bytes(content)) + z.flush()
        except ImportError:
            return False
        need = len(out)
        if need > cs - 1:  # as qemu: only when it saves at least a byte
            return False
        maxrc = (1 << self.refcount_bits) - 1
        pos = self._cfree
        if pos is not None:
            cur = pos // cs
            fits = pos % cs and cur == self.next_cluster - 1 and self.refcount(cur) < maxrc
            if not fits:
                pos = None
        x = 62 - (self.cb - 8)
        if (self.next_cluster + 2) * cs + need >> x:
            return False  # beyond the reach of a compressed descriptor
        if pos is not None:
            spill = (pos + need - 1) // cs - pos // cs
            if spill:
                got = self._alloc(spill)  # the clusters right after the current one
                if got != (pos // cs + 1) * cs:
                    for c in range(got // cs, got // cs + spill):
                        self._set_refcount(c, 0)
                    pos = None
        if pos is not None:
            coff = pos
            self._set_refcount(pos // cs, self.refcount(pos // cs) + 1)
        else:
            coff = self._alloc(ceil_div(need, cs))
        nsec = ((coff + need - 1) >> 9) - (coff >> 9)
        self.f.pwrite(coff, out)
        self._cfree = coff + need
        self._set_l2(tbl, l2off, l2i, L.OFLAG_COMPRESSED | (nsec << x) | coff)
        return True

    def _write_subclusters(self, tbl: array[int], l2off: int, l2i: int, ci: int, host: int,
                           e: int, bm: int, inner: int, chunk: Bytes, fill: FillFn) -> None:
        cs, scs = self.cs, self.sc_size
        clen = self._cluster_len(ci)
        s0 = inner // scs
        s1 = (inner + len(chunk) - 1) // scs
        lo = s0 * scs
        hi = min((s1 + 1) * scs, clen)
        alloc, zero = bm & 0xFFFFFFFF, bm >> 32
        buf = bytearray(hi - lo)
        has_backing = self.backing_file is not None
        for k in (s0, s1):
            kb = k * scs
            kn = min(scs, clen - kb)
            if kn <= 0 or (inner <= kb and inner + len(chunk) >= kb + kn):
                continue  # fully overwritten
            if alloc >> k & 1:
                part = self._read_host(host + kb, kn, ci * cs + kb)
            elif zero >> k & 1 or not has_backing:
                continue
            else:
                part = fill(ci * cs + kb, kn)
            buf[kb - lo : kb - lo + len(part)] = part
        buf[inner - lo : inner - lo + len(chunk)] = chunk
        self._write_data(host + lo, buf)
        mask = _subcluster_mask(s0, s1)
        alloc |= mask
        zero &= ~mask
        self._set_l2(tbl, l2off, l2i, host | L.OFLAG_COPIED, (zero << 32) | alloc)

    # ------------------------------------------------------------------ zeroes
    def write_zeroes(self, offset: int, length: int, fill: FillFn) -> None:
        """Whole clusters become zero clusters (with a backing file) or unallocated (without),
        one L2 write per table, one refcount write per block; the clusters freed are reused by
        later writes once a sync made this durable, and those still free are punched at the next
        flush (adjacent ones in one call). Partial clusters, version 2 images with a backing
        file and extended L2 entries go through ``write``."""
        if self.extended_l2 or (self.version < 3 and self.backing_file is not None):
            super().write_zeroes(offset, length, fill)
            return
        self._check_write()
        self._check_cross_links()
        if self._tracked:              # persistent bitmaps kept (bitmaps.py)
            self._mark_dirty(offset, length)
        cs = self.cs
        end = offset + length
        pos = offset
        self._punch_batch = []
        try:
            while pos < end:
                ci = pos // cs
                inner = pos - ci * cs
                clen = self._cluster_len(ci)
                if inner or end - pos < clen:
                    n = min(clen - inner, end - pos)
                    super().write_zeroes(pos, n, fill)
                    pos += n
                    continue
                l2i = ci % self.l2_entries
                k = min((end - pos) // cs, self.l2_entries - l2i)
                if k == 0:          # the short last cluster of the image, whole
                    k = 1
                self._zero_clusters(ci, k)
                pos = min(pos + k * cs, self.size)
        finally:
            batch, self._punch_batch = self._punch_batch, None
            self._punch_deferred.extend(batch or ())

    def _zero_clusters(self, ci: int, k: int) -> None:
        """Clusters ci..ci+k-1 (within one L2 table) read zeroes: L2 entries first, then the
        references they held dropped (a crash in between leaks, never loses)."""
        backing = self.backing_file is not None
        l1i, l2i = divmod(ci, self.l2_entries)
        new = L.OFLAG_ZERO if backing else 0

        def reads_zero(e: int) -> bool:
            if e & L.OFLAG_COMPRESSED:
                return False
            return bool(e & L.OFLAG_ZERO) or (not backing and not e & L2E_MASK)

        tbl, _ = self._l2_of(l1i)
        if tbl is None:
            if not backing:
                return
        elif all(reads_zero(tbl[i]) for i in range(l2i, l2i + k)):
            return
        tbl, l2off = self._l2_for_write(l1i)
        old = []
        hosts = []
        plain = not self.incompat & L.INCOMPAT_DATA_FILE
        for i in range(l2i, l2i + k):
            e = tbl[i]
            if not reads_zero(e):
                if e & L.OFLAG_COMPRESSED:
                    old.append(e)
                elif e & L2E_MASK and plain:
                    hosts.append((e & L2E_MASK) // self.cs)
                tbl[i] = new
        self.f.pwrite(l2off + 8 * l2i, array_be_bytes(tbl[l2i : l2i + k]))
        self._unref_clusters(hosts)
        for e in old:
            self._unref_entry(e)

    # ------------------------------------------------------------------ discard
    def discard(self, offset: int, length: int, fill: FillFn | None = None) -> None:
        self._check_write()
        self._check_cross_links()
        if self._tracked:              # persistent bitmaps kept (bitmaps.py)
            self._mark_dirty(offset, length)
        self._punch_batch = []
        try:
            self._discard(offset, length)
        finally:
            self._punch_batched()

    def _discard(self, offset: int, length: int) -> None:
        cs = self.cs
        end = offset + length
        pos = offset
        has_backing = self.backing_file is not None
        while pos < end:
            ci = pos // cs
            inner = pos - ci * cs
            clen = self._cluster_len(ci)
            n = min(clen - inner, end - pos)
            e, bm = self._entry(ci)
            unalloc = not e and not bm
            if inner == 0 and n == clen:
                if unalloc and not has_backing:
                    pos += n
                    continue
                if has_backing and self.version < 3:
                    self._write_cluster(ci, 0, zeroes(clen), lambda o, k: zeroes(k))
                    pos += n
                    continue
                tbl, l2off = self._l2_for_write(ci // self.l2_entries)
                l2i = ci % self.l2_entries
                e, bm = (tbl[2 * l2i], tbl[2 * l2i + 1]) if self.extended_l2 else (tbl[l2i], 0)
                if has_backing:
                    ne, nbm = (0, 0xFFFFFFFF << 32) if self.extended_l2 else (L.OFLAG_ZERO, 0)
                else:
                    ne, nbm = 0, 0
                self._set_l2(tbl, l2off, l2i, ne, nbm)
                if e & L.OFLAG_COMPRESSED or e & L2E_MASK:
                    self._unref_entry(e)
            else:
                sc = self.sc_size
                aligned = pos % sc == 0 and (n % sc == 0 or pos + n == self.size)
                segs = self._segments(pos, n)
                if self.extended_l2 and aligned and not e & L.OFLAG_COMPRESSED:
                    if any(sg.kind != K_UNALLOC for sg in segs) or has_backing:
                        self._zero_subclusters(ci, inner, n, has_backing)
                elif has_backing and any(sg.kind == K_UNALLOC for sg in segs):
                    raise InvalidArgument(
                        f"{self.location}: discard of {n} bytes at {pos:#x} covers part of a "
                        f"cluster inherited from the backing file; discard whole clusters "
                        f"({cs} bytes) instead"
                    )
                elif any(sg.kind in (K_DATA, K_COMP) for sg in segs):
                    self._write_cluster(ci, inner, zeroes(n), lambda o, k: zeroes(k))
            pos += n

    def _zero_subclusters(self, ci: int, inner: int, n: int, zero: bool = True) -> None:
        tbl, l2off = self._l2_for_write(ci // self.l2_entries)
        l2i = ci % self.l2_entries
        e, bm = tbl[2 * l2i], tbl[2 * l2i + 1]
        if e & L.OFLAG_COMPRESSED:
            return
        mask = _subcluster_mask(inner // self.sc_size, (inner + n - 1) // self.sc_size)
        alloc, zbits = bm & 0xFFFFFFFF, bm >> 32
        zbits = (zbits | mask) if zero else (zbits & ~mask)
        self._set_l2(tbl, l2off, l2i, e, (zbits << 32) | (alloc & ~mask))

    def _replace_entry(self, ci: int, old: int, e: int, bm: int) -> None:
        tbl, l2off = self._l2_for_write(ci // self.l2_entries)
        self._set_l2(tbl, l2off, ci % self.l2_entries, e, bm)
        if old & L.OFLAG_COMPRESSED or old & L2E_MASK:
            self._unref_entry(old)
