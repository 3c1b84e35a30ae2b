"""The QED backend's image, open and create (its declaration and probe are the package's)."""
from __future__ import annotations

import struct
from array import array
from collections import OrderedDict
from collections.abc import Sequence

from ...align import align_up, ceil_div
from ...backend import (
    Backend,
    CreateParams,
    ImageFlags,
    OpenFlags,
    too_large,
)
from ...compaction import Move, holes_between, move_blocks, plan_moves
from ...config import parse_config
from ...errors import InvalidArgument, NotSupported
from ...fileimage import FileImage
from ...fileio import ImageFile, relative_name
from ...image import (
    Alloc,
    CheckReport,
    FillFn,
    Image,
    ParentHint,
    Problem,
    ProblemCode,
    check_backing_name,
)
from ...progress import Progress, ProgressCallback
from ...runs import RunList
from ...sparse import is_zero, zeroes
from ...tables import BlockTable, first_shared, table_from_bytes, table_to_bytes
from . import QedBackend, _limit_reason, qed_max_size
from .discard import close_holes, discard_clusters
from .layout import (
    CLUSTER_ZERO,
    F_BACKING_FILE,
    F_BACKING_FORMAT_NO_PROBE,
    F_KNOWN,
    F_NEED_CHECK,
    HEADER_SIZE,
    MAGIC,
    MAX_BACKING_NAME,
    MAX_CLUSTER,
    MAX_TABLE_BYTES,
    MAX_TABLE_SIZE,
    MIN_CLUSTER,
    OFF_AUTOCLEAR,
    OFF_FEATURES,
    OFF_IMAGE_SIZE,
    QedHeader,
)


def _le_array(data: bytes) -> array[int]:
    return table_from_bytes(data, "Q", big_endian=False)


def _array_le_bytes(a: array[int]) -> bytes:
    return table_to_bytes(a, big_endian=False)


# a movable unit of the file: ("table", L1 index) for an L2 table, ("data", L1 index, L2 index)
# for a data cluster
_Unit = tuple[str, int] | tuple[str, int, int]


class QedImage(FileImage):
    L2_CACHE_BYTES = 64 << 20

    f: ImageFile
    header: dict[str, int]              # the header fields as read (updated on relink)
    fsize: int
    cs: int                             # cluster size
    table_bytes: int
    entries: int                        # entries per table
    features: int
    autoclear: int
    header_clusters: int
    l1_offset: int
    l1: array[int]
    backing_file: str | None
    backing_format: str | None
    end_cluster: int                    # first cluster past the end: where allocation goes

    @property
    def max_size(self) -> int:
        return qed_max_size(self.cs, self.table_bytes // self.cs)

    def __init__(self, backend: Backend, location: str, f: ImageFile, flags: OpenFlags) -> None:
        super().__init__(backend, location, f, flags.read_only)
        self.open_flags = flags
        self.honor_zeroes = False
        self._l2_cache: OrderedDict[int, array[int]] = OrderedDict()
        self._l2_bytes = 0
        self._parse()
        if not self.read_only:
            self._prepare_write()

    # ------------------------------------------------------------------ parsing
    def _parse(self) -> None:
        f = self.f
        self.fsize = f.size()
        raw = f.read_exact(0, HEADER_SIZE, "QED header")
        if raw[:4] != MAGIC:
            raise self._corrupt("not a QED image (bad magic)", field="magic", offset=0,
                                expected=MAGIC, found=raw[:4])
        h = QedHeader.parse(raw)
        self.header = dict(h)
        self.header.pop("_io", None)
        cs = h.cluster_size
        if cs < MIN_CLUSTER or cs > MAX_CLUSTER or cs & (cs - 1):
            raise self._corrupt("invalid cluster size", field="cluster_size", offset=4,
                                expected="a power of two in 4096..67108864", found=cs)
        ts = h.table_size
        if ts < 1 or ts > MAX_TABLE_SIZE or ts & (ts - 1):
            raise self._corrupt("invalid table size", field="table_size", offset=8,
                                expected="a power of two in 1..16", found=ts)
        if h.header_size < 1 or h.header_size * cs > (1 << 30):
            raise self._corrupt("invalid header size", field="header_size", offset=12,
                                expected="1 or more clusters, at most 1 GiB", found=h.header_size)
        unknown = h.features & ~F_KNOWN
        if unknown:
            raise NotSupported(f"{self.location}: unsupported QED feature bits {unknown:#x}",
                               field="features", offset=16, found=hex(h.features))
        self.cs = cs
        self.table_bytes = ts * cs
        if self.table_bytes > MAX_TABLE_BYTES:
            raise NotSupported(f"{self.location}: QED tables of {self.table_bytes} bytes exceed "
                               f"the supported {MAX_TABLE_BYTES >> 20} MiB",
                               field="table_size", offset=8, found=ts)
        self.entries = self.table_bytes // 8
        self.features = h.features
        self.autoclear = h.autoclear_features
        self.header_clusters = h.header_size
        maxsize = self.entries * self.entries * cs
        if h.image_size % 512 or h.image_size > maxsize:
            raise self._corrupt("invalid image size", field="image_size", offset=48,
                                expected=f"a multiple of 512, at most {maxsize}",
                                found=h.image_size)
        self.size = h.image_size
        self.block_size = cs
        self.l1_offset = h.l1_table_offset
        self._check_table_offset(h.l1_table_offset, "L1 table", field="l1_table_offset", at=40)
        self.l1 = _le_array(f.read_exact(h.l1_table_offset, self.table_bytes, "L1 table"))
        self.backing_file = None
        self.backing_format = None
        if h.features & F_BACKING_FILE:
            n, off = h.backing_filename_size, h.backing_filename_offset
            if n > MAX_BACKING_NAME or off + n > h.header_size * cs or (n and off < HEADER_SIZE):
                raise self._corrupt("backing file name outside the header clusters or too long",
                                    field="backing_filename_offset", offset=56,
                                    expected=f"inside {h.header_size * cs} bytes, at most "
                                    f"{MAX_BACKING_NAME} long", found=f"{n} bytes at {off}")
            name = f.read_exact(off, n, "backing file name")
            try:
                self.backing_file = name.decode("utf-8") or None
            except UnicodeDecodeError:
                raise self._corrupt("backing file name is not UTF-8", offset=off) from None
            if self.backing_file is None:
                raise self._corrupt("backing file feature set with an empty name",
                                    field="backing_filename_size", offset=60, found=0)
            if h.features & F_BACKING_FORMAT_NO_PROBE:
                self.backing_format = "raw"
            self.parent_hint = ParentHint(locations=[self.backing_file],
                                          format=self.backing_format)
            self.flags = ImageFlags.DIFF
        self.end_cluster = ceil_div(self.fsize, cs)

    def _valid_cluster(self, off: int) -> bool:
        return (off % self.cs == 0 and off >= self.header_clusters * self.cs
                and off < self.fsize)

    def _check_table_offset(self, off: int, what: str, field: str | None = None,
                            at: int | None = None) -> None:
        if (off % self.cs or off < self.header_clusters * self.cs
                or off + self.table_bytes > self.fsize):
            raise self._corrupt(f"{what} offset invalid", field=field,
                                offset=at if at is not None else off,
                                expected=f"cluster aligned, after the header, table inside the "
                                f"file ({self.fsize} bytes)", found=hex(off))

    # ------------------------------------------------------------------ info / identity
    def info(self) -> dict[str, object]:
        d: dict[str, object] = {"cluster_size": self.cs, "table_size": self.table_bytes // self.cs,
             "header_size": self.header_clusters, "need_check": bool(self.features & F_NEED_CHECK),
             "features": hex(self.features)}
        if self.backing_file is not None:
            d["backing_file"] = self.backing_file
            d["backing_format"] = self.backing_format
        return d

    def check_parent_link(self, parent: Image) -> None:
        check_backing_name(self, self.backing_file, parent)

    # ------------------------------------------------------------------ tables
    def _load_l2(self, off: int, l1i: int) -> array[int]:
        tbl = self._l2_cache.get(off)
        if tbl is not None:
            self._l2_cache.move_to_end(off)
            return tbl
        self._check_table_offset(off, f"L2 table (L1 index {l1i})")
        tbl = _le_array(self.f.read_exact(off, self.table_bytes, "L2 table"))
        self._l2_cache[off] = tbl
        self._l2_bytes += self.table_bytes
        while self._l2_bytes > self.L2_CACHE_BYTES and len(self._l2_cache) > 1:
            self._l2_cache.popitem(last=False)
            self._l2_bytes -= self.table_bytes
        return tbl

    def _entry(self, ci: int) -> int:
        l1i, l2i = divmod(ci, self.entries)
        off = self.l1[l1i]
        if not off:
            return 0
        return self._load_l2(off, l1i)[l2i]

    def _segments(self, offset: int, length: int) -> list[tuple[int, int, int, int]]:
        """(pos, n, kind, host): kind 0 unallocated, 1 zero, 2 data."""
        cs = self.cs
        out: list[tuple[int, int, int, int]] = []
        end = offset + length
        pos = offset
        span = cs * self.entries
        while pos < end:
            l1i = pos // span
            stop = min(end, (l1i + 1) * span)
            off = self.l1[l1i]
            if not off:
                kinds = [(pos, stop - pos, 0, 0)]
                pos = stop
            else:
                tbl = self._load_l2(off, l1i)
                kinds = []
                while pos < stop:
                    ci = pos // cs
                    inner = pos - ci * cs
                    n = min(cs - inner, stop - pos)
                    e = tbl[ci % self.entries]
                    if e == 0:
                        kinds.append((pos, n, 0, 0))
                    elif e == CLUSTER_ZERO:
                        kinds.append((pos, n, 1, 0))
                    else:
                        if not self._valid_cluster(e):
                            raise self._corrupt("data cluster offset invalid", offset=e,
                                                field=f"L2 entry of guest offset {ci * cs:#x}",
                                                expected=f"cluster aligned inside the file "
                                                f"({self.fsize} bytes)", found=hex(e))
                        kinds.append((pos, n, 2, e + inner))
                    pos += n
            for k in kinds:
                if out and out[-1][2] == k[2] and out[-1][0] + out[-1][1] == k[0] and (
                        k[2] != 2 or out[-1][3] + out[-1][1] == k[3]):
                    p0, n0, kk, h0 = out[-1]
                    out[-1] = (p0, n0 + k[1], kk, h0)
                else:
                    out.append(k)
        return out

    # ------------------------------------------------------------------ reading
    def block_status(self, offset: int, length: int) -> list[tuple[int, int, Alloc]]:
        m = {0: Alloc.UNALLOCATED, 1: Alloc.ZERO, 2: Alloc.DATA}
        runs: RunList[Alloc] = RunList()
        for pos, n, k, _ in self._segments(offset, length):
            runs.add(pos, n, m[k])
        return runs.runs

    def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        for pos, n, k, host in self._segments(offset, length):
            if k == 2:
                buf[pos - offset:pos - offset + n] = self.f.read_exact(host, n, "data cluster")
        return bytes(buf)

    # ------------------------------------------------------------------ writing
    def _write_header_field(self, off: int, fmt: str, value: int) -> None:
        self.f.pwrite(off, struct.pack(fmt, value))

    def _prepare_write(self) -> None:
        if self.autoclear:
            self.autoclear = 0       # no autoclear feature is known: clear them before writing
            self._write_header_field(OFF_AUTOCLEAR, "<Q", 0)
        if self.features & F_NEED_CHECK:
            report = self.check(repair=True)
            if report.corrupt:
                raise self._corrupt("the image needs a consistency check and could not be "
                                    "repaired")
            self._set_need_check(False)

    _xlinks_checked = False
    _discarded = False              # discard left clusters nothing names (discard.py)

    def _find_cross_links(self) -> None:
        """Once, before the first write: every cluster the header, the L1 table, the L2 tables
        and their entries name (as check counts them); one named twice refuses writes."""
        self._xlinks_checked = True
        cs = self.cs
        fsize = self.f.size()
        tclu = self.table_bytes // cs
        refs = list(range(self.header_clusters))
        where = [0] * len(refs)             # file offset of the entry naming it (0: header)
        refs += range(self.l1_offset // cs, self.l1_offset // cs + tclu)
        where += [0] * tclu
        for i, off in enumerate(self.l1):
            if not off or off % cs or off + self.table_bytes > fsize:
                continue                    # invalid entries: refused where they are used
            refs += range(off // cs, off // cs + tclu)
            where += [self.l1_offset + 8 * i] * tclu
            tbl = _le_array(self.f.pread(off, self.table_bytes))
            for j, e in enumerate(tbl):
                if e > CLUSTER_ZERO and self._valid_cluster(e):
                    refs.append(e // cs)
                    where.append(off + 8 * j)
        hit = first_shared(refs)
        if hit is not None:
            c, a, b = hit
            names = ["the header or the L1 table" if where[k] == 0 else
                     f"the table entry at {where[k]:#x}" for k in (a, b)]
            self.write_refusal = (f"cluster {c} (offset {c * cs:#x}) is named by {names[0]} and "
                                  f"by {names[1]}")

    def _set_need_check(self, on: bool) -> None:
        new = (self.features | F_NEED_CHECK) if on else (self.features & ~F_NEED_CHECK)
        if new == self.features:
            return
        self.f.sync()
        self.features = new
        self._write_header_field(OFF_FEATURES, "<Q", new)
        self.f.sync()

    def _alloc(self, nclusters: int) -> int:
        off = self.end_cluster * self.cs
        self.end_cluster += nclusters
        end = self.end_cluster * self.cs
        if end > self.fsize:
            self.f.truncate(end)
            self.fsize = end
        return off

    def _l2_for_write(self, l1i: int) -> tuple[array[int], int]:
        off = self.l1[l1i]
        if off:
            return self._load_l2(off, l1i), off
        self._set_need_check(True)
        nclu = self.table_bytes // self.cs
        new = self._alloc(nclu)
        self.f.pwrite(new, zeroes(self.table_bytes))
        tbl = array("Q", bytes(self.table_bytes))
        self._l2_cache[new] = tbl
        self._l2_bytes += self.table_bytes
        self.l1[l1i] = new
        self.f.pwrite(self.l1_offset + 8 * l1i, struct.pack("<Q", new))
        return tbl, new

    def _set_l2(self, tbl: array[int], l2off: int, l2i: int, value: int) -> None:
        tbl[l2i] = value
        self.f.pwrite(l2off + 8 * l2i, struct.pack("<Q", value))

    def write(self, offset: int, data: bytes, fill: FillFn) -> None:
        self.require_writable()
        if not self._xlinks_checked:
            self._find_cross_links()
        self._refuse_cross_linked()
        mv = memoryview(data)
        cs = self.cs
        pos = offset
        end = offset + len(data)
        while pos < end:
            ci = pos // cs
            inner = pos - ci * cs
            n = min(cs - inner, end - pos)
            self._write_cluster(ci, inner, mv[pos - offset:pos - offset + n], fill)
            pos += n

    def _write_cluster(self, ci: int, inner: int, chunk: memoryview, fill: FillFn) -> None:
        cs = self.cs
        clen = min(cs, self.size - ci * cs)
        e = self._entry(ci)
        has_backing = self.backing_file is not None
        if e > CLUSTER_ZERO:
            if not self._valid_cluster(e):
                raise self._corrupt("data cluster offset invalid", offset=e,
                                    found=hex(e), field=f"L2 entry of guest offset {ci * cs:#x}")
            self.f.pwrite(e + inner, chunk)
            return
        full = inner == 0 and len(chunk) >= clen
        if is_zero(chunk) and not self.honor_zeroes:
            if e == CLUSTER_ZERO or not has_backing:
                return
            if full:
                tbl, l2off = self._l2_for_write(ci // self.entries)
                self._set_l2(tbl, l2off, ci % self.entries, CLUSTER_ZERO)
                return
        if full:
            content = bytearray(chunk[:clen])
        elif e == CLUSTER_ZERO or not has_backing:
            content = bytearray(clen)
            content[inner:inner + len(chunk)] = chunk
        else:
            content = bytearray(clen)
            below = fill(ci * cs, clen)
            content[:len(below)] = below
            content[inner:inner + len(chunk)] = chunk
        if len(content) < cs:
            content += bytes(cs - len(content))
        self._set_need_check(True)
        tbl, l2off = self._l2_for_write(ci // self.entries)
        new = self._alloc(1)
        self.f.pwrite(new, content)
        self._set_l2(tbl, l2off, ci % self.entries, new)

    def _after_sync(self) -> None:
        if self._discarded:
            return          # unreferenced clusters left by discard: the flag stays until packed
        self._set_need_check(False)         # flush: data and tables synced, then the flag

    def close(self) -> None:
        if self._discarded and not self.read_only and self.f.fd >= 0:
            self.close_holes()              # no session ends with clusters nothing names
        super().close()

    # ------------------------------------------------------------------ compact
    def compact(self, progress: ProgressCallback | None = None,
                parent_read: FillFn | None = None) -> None:
        """Drop clusters reading as zeroes (no backing file) or as the parent (``parent_read``),
        then move clusters and tables from the end of the file into the holes and truncate it.
        QED has no refcounts: every cluster left unreferenced would be a leak, so the file is
        packed as far as the table size allows."""
        self.require_writable()
        cs = self.cs
        nclu = ceil_div(self.size, cs)
        prog = Progress(progress, 2 * nclu)
        prog.start()
        has_backing = self.backing_file is not None
        self._set_need_check(True)
        # only clusters under an L2 table can hold anything: the walk follows the tables
        # present, not the virtual size (an almost empty 1 TiB image walked 16 M entries)
        per = self.entries
        present = [i for i, off in enumerate(self.l1) if off]
        for ci in (c for i in present for c in range(i * per, min((i + 1) * per, nclu))):
            prog.set(ci)
            e = self._entry(ci)
            if e == 0:
                continue
            start = ci * cs
            clen = min(cs, self.size - start)
            new = e
            if e == CLUSTER_ZERO:
                if not has_backing or (parent_read is not None
                                       and is_zero(parent_read(start, clen))):
                    new = 0
            else:
                if not self._valid_cluster(e):
                    raise self._corrupt("data cluster offset invalid", offset=e, found=hex(e))
                data = self.f.read_exact(e, clen, "data cluster")
                if not has_backing:
                    new = 0 if is_zero(data) else e
                elif parent_read is not None:
                    under = parent_read(start, clen)
                    under = bytes(under) + bytes(clen - len(under))
                    new = 0 if data == under else CLUSTER_ZERO if is_zero(data) else e
                elif is_zero(data):
                    new = CLUSTER_ZERO
            if new != e:
                tbl, l2off = self._l2_for_write(ci // self.entries)
                self._set_l2(tbl, l2off, ci % self.entries, new)
        self._pack(prog, nclu)
        self.flush()
        prog.finish()

    def discard(self, offset: int, length: int, fill: FillFn | None = None) -> None:
        discard_clusters(self, offset, length, fill)

    def close_holes(self, progress: ProgressCallback | None = None) -> bool:
        return close_holes(self, progress)

    def _units(self) -> tuple[list[tuple[int, int, _Unit]], list[tuple[int, int]]]:
        """The movable units of the file, ``(offset, length, key)``: L2 tables
        (``("table", l1 index)``) and data clusters (``("data", l1 index, l2 index)``), and
        the fixed ranges (header, L1 table)."""
        cs = self.cs
        fixed = [(0, self.header_clusters * cs),
                 (self.l1_offset, self.l1_offset + self.table_bytes)]
        units: list[tuple[int, int, _Unit]] = []
        for i in range(self.entries):
            off = self.l1[i]
            if not off:
                continue
            units.append((off, self.table_bytes, ("table", i)))
            tbl = self._load_l2(off, i)
            units += [(tbl[j], cs, ("data", i, j)) for j in range(self.entries)
                      if tbl[j] > CLUSTER_ZERO]
        return units, fixed

    def _repoint(self, moves: Sequence[Move[_Unit]]) -> None:
        """Name the new places of moved units: L1 entries of moved tables first, then the data
        entries, written into their tables at the tables' new places."""
        self.fsize = max(self.fsize, self.f.size())
        l1 = BlockTable(self.f, self.l1_offset, self.l1)
        data: dict[int, list[tuple[int, int]]] = {}  # L1 index: (L2 index, new place)
        for m in moves:
            match m.key:
                case ("table", i):
                    tbl = self._l2_cache.pop(m.src, None)
                    if tbl is not None:
                        self._l2_cache[m.dst] = tbl
                    l1[i] = m.dst
                case (_, i, j):
                    data.setdefault(i, []).append((j, m.dst))
        l1.write_back()
        for i, ms in data.items():
            t = BlockTable(self.f, self.l1[i], self._load_l2(self.l1[i], i))
            for j, dst in ms:
                t[j] = dst
            t.write_back()

    def _pack(self, prog: Progress, base: int) -> None:
        """Move tables and clusters from the end of the file into the holes (compaction's
        planner and mover: copies, sync, L1 and L2 entries, sync), then truncate; when holes no
        table fits in remain, lay everything out again."""
        cs = self.cs
        self.fsize = self.f.size()
        units, fixed = self._units()
        used = fixed + [(o, o + n) for o, n, _k in units]
        moves = plan_moves(units, holes_between(used), cs)
        done = [0]

        def advance(_n: int) -> None:
            done[0] += 1
            prog.set(base + base * done[0] // max(len(moves), 1))

        move_blocks(self.f, moves, self._repoint, advance=advance)
        gone = {m.src for m in moves}
        used = fixed + [(o, o + n) for o, n, _k in units if o not in gone] + \
            [(m.dst, m.dst + m.length) for m in moves]
        last = ceil_div(max(b for _a, b in used), cs)
        if holes_between(used):
            self._repack_all(last)          # holes no table fits in: lay everything out again
            return
        if last * cs < self.fsize:
            self.f.sync()
            self.f.truncate(last * cs)
            self.fsize = last * cs
            self.end_cluster = last

    def _repack_all(self, end: int) -> None:
        """Lay out every L2 table and data cluster again, without holes: first copy them all
        (in their final order) past ``end``, then down right after the header and the L1
        table. Each pass is one compaction.move_blocks: copies, sync, entries, sync."""
        cs = self.cs
        tclu = self.table_bytes // cs
        l1c = self.l1_offset // cs
        units, _fixed = self._units()       # each table, then the clusters it maps
        moves: list[Move[_Unit]] = []
        pos = end * cs
        for off, n, key in units:
            moves.append(Move(key, off, pos, n))
            pos += n
        move_blocks(self.f, moves, self._repoint)
        dst = self.header_clusters
        down: list[Move[_Unit]] = []
        for m in moves:
            n = m.length // cs
            if dst < l1c + tclu and dst + n > l1c:
                dst = l1c + tclu              # skip over the L1 table
            down.append(Move(m.key, m.dst, dst * cs, m.length))
            dst += n
        move_blocks(self.f, down, self._repoint)
        last = max(dst, l1c + tclu)
        self.f.truncate(last * cs)
        self.fsize = last * cs
        self.end_cluster = last

    # ------------------------------------------------------------------ resize / relink
    def resizes_in_place(self, new_size: int) -> bool:
        # the L1 table is sized for max_size: growing is the one header field
        return self.size < new_size <= self.max_size

    def resize(self, new_size: int, progress: ProgressCallback | None = None) -> None:
        self.require_writable()
        if new_size % 512:
            raise InvalidArgument(f"{self.location}: new size must be a multiple of 512, "
                                  f"found {new_size}")
        if new_size < self.size:
            raise InvalidArgument(f"{self.location}: shrinking a QED image is not supported "
                                  f"(from {self.size} to {new_size} bytes)")
        if new_size > self.max_size:
            raise too_large("QED", new_size, self.max_size, self.location,
                            _limit_reason(self.cs, self.table_bytes // self.cs))
        self.f.sync()
        self._write_header_field(OFF_IMAGE_SIZE, "<Q", new_size)
        self.f.sync()
        self.size = new_size
        if progress:
            progress(1, 1)

    def relink_refusal(self, parent: Image | None) -> str | None:
        if parent is None:
            return None
        n = len(relative_name(self.location, parent.location).encode())
        if n > MAX_BACKING_NAME:
            return f"{self.location}: backing file name of {n} bytes is too long"
        try:
            self._name_slot(n)
        except InvalidArgument as exc:
            return str(exc)
        return None

    def set_parent(self, parent: Image | None) -> None:
        self.require_writable()
        name, raw, hint = None, False, None
        if parent is not None:
            name = relative_name(self.location, parent.location)
            raw = parent.backend.name.upper() == "RAW"
            hint = ParentHint(locations=[name], format=parent.backend.name if raw else None)
        self._write_backing(name, raw)
        self.backing_file = name
        self.backing_format = "raw" if raw else None
        self.parent_hint = hint
        if hint is None:
            self.flags &= ~ImageFlags.DIFF
        else:
            self.flags |= ImageFlags.DIFF

    def _write_backing(self, name: str | None, raw: bool) -> None:
        data = name.encode() if name else b""
        if len(data) > MAX_BACKING_NAME or HEADER_SIZE + len(data) > self.header_clusters * self.cs:
            raise InvalidArgument(f"{self.location}: backing file name of {len(data)} bytes does "
                                  "not fit in the header clusters")
        features = self.features & ~(F_BACKING_FILE | F_BACKING_FORMAT_NO_PROBE)
        if name:
            features |= F_BACKING_FILE | (F_BACKING_FORMAT_NO_PROBE if raw else 0)
        off = self._name_slot(len(data)) if data else 0
        if data:
            # the new name goes where the current one is not: until the header write below,
            # the old link stays intact
            self.f.pwrite(off, data)
            self.f.sync()
        # features, name offset and name length switch together: one write inside the first
        # sector, so any stop leaves the old link or the new one, never a mix of the two
        hdr = bytearray(self.f.read_exact(0, HEADER_SIZE, "QED header"))
        struct.pack_into("<Q", hdr, OFF_FEATURES, features)
        struct.pack_into("<II", hdr, 56, off, len(data))
        self.f.pwrite(0, hdr)
        self.f.sync()
        self.features = features
        self.header.update(features=features, backing_filename_offset=off,
                           backing_filename_size=len(data))

    def _name_slot(self, n: int) -> int:
        """Where a new backing file name of ``n`` bytes can go in the header clusters without
        touching the name the header names now."""
        limit = self.header_clusters * self.cs
        old_off, old_n = 0, 0
        if self.features & F_BACKING_FILE:
            old_off = self.header["backing_filename_offset"]
            old_n = self.header["backing_filename_size"]
        for at in (HEADER_SIZE, align_up(old_off + old_n, 8), limit - n):
            if at >= HEADER_SIZE and at + n <= limit and (
                    not old_n or at + n <= old_off or at >= old_off + old_n):
                return at
        raise InvalidArgument(f"{self.location}: no room in the header clusters for a backing "
                              f"file name of {n} bytes beside the current one of {old_n} bytes")

    # ------------------------------------------------------------------ check
    def check(self, repair: bool = False, dry_run: bool = False,
              progress: ProgressCallback | None = None) -> CheckReport:
        if repair and not dry_run:
            self.require_writable()
        cs = self.cs
        self.fsize = self.f.size()
        nclusters = ceil_div(self.fsize, cs)
        used = bytearray(nclusters)
        problems: list[Problem] = []
        fixes: list[tuple[int, str]] = []    # (file offset of the entry, what)
        extend_to = 0                        # the end of a data cluster cut off by truncation
        prog = Progress(progress, self.entries)
        prog.start()

        def mark(off: int, n: int, what: str, entry_at: int) -> bool:
            first = off // cs
            for c in range(first, first + n):
                if used[c]:
                    problems.append(Problem("corrupt", f"{what} at {off:#x}: cluster {c} is "
                                            "referenced more than once", off,
                                            code=ProblemCode.CROSS_LINKED))
                    fixes.append((entry_at, what))
                    return False
            for c in range(first, first + n):
                used[c] = 1
            return True

        for c in range(min(self.header_clusters, nclusters)):
            used[c] = 1
        tclu = self.table_bytes // cs
        mark(self.l1_offset, tclu, "L1 table", -1)
        for i in range(self.entries):
            off = self.l1[i]
            if not off:
                continue
            at = self.l1_offset + 8 * i
            if off % cs or off < self.header_clusters * cs or off + self.table_bytes > self.fsize:
                problems.append(Problem("corrupt", f"L1 entry {i}: L2 table offset {off:#x} "
                                        "invalid", off, code=ProblemCode.ENTRY_INVALID))
                fixes.append((at, "L2 table"))
                continue
            if not mark(off, tclu, f"L2 table (L1 entry {i})", at):
                continue
            tbl = _le_array(self.f.pread(off, self.table_bytes))
            for j in range(self.entries):
                e = tbl[j]
                if e <= CLUSTER_ZERO:
                    continue
                eat = off + 8 * j
                if not self._valid_cluster(e):
                    problems.append(Problem("corrupt", f"L2 table {off:#x} entry {j}: data "
                                            f"cluster offset {e:#x} invalid", e,
                                            code=ProblemCode.ENTRY_INVALID))
                    fixes.append((eat, "data cluster"))
                    continue
                if e + cs > self.fsize:
                    # a truncated file: the cluster starts inside it but runs past its end
                    # (reading it fails; qemu-img check reports it). Repair keeps the bytes
                    # that are there and extends the file so that the rest reads zero.
                    problems.append(Problem("corrupt", f"L2 table {off:#x} entry {j}: data "
                                            f"cluster at {e:#x} runs past the end of the file "
                                            f"({self.fsize - e} of {cs} bytes present)", e,
                                            code=ProblemCode.ENTRY_PAST_END))
                    extend_to = max(extend_to, e + cs)
                mark(e, 1, f"data cluster (L2 table {off:#x} entry {j})", eat)
            prog.set(i)
        leaks = [c for c in range(nclusters) if not used[c]]
        for c in leaks:
            problems.append(Problem("leak", f"cluster {c} (offset {c * cs:#x}) is not referenced",
                                    c * cs, code=ProblemCode.LEAK))
        report = CheckReport(problems=problems)
        report.orphans = [(self.location, c * cs, min(cs, self.fsize - c * cs)) for c in leaks]
        if repair and not dry_run and problems:
            fixed_entries = {at for at, _ in fixes if at >= 0}
            for at in fixed_entries:
                self.f.pwrite(at, struct.pack("<Q", 0))
            self._l2_cache.clear()
            self._l2_bytes = 0
            self.l1 = _le_array(self.f.read_exact(self.l1_offset, self.table_bytes, "L1 table"))
            if extend_to > self.fsize:
                self.f.truncate(extend_to)
                self.fsize = extend_to
                self.end_cluster = max(self.end_cluster, ceil_div(extend_to, cs))
            # trailing leaked clusters can simply be cut off
            last = nclusters
            while last > 0 and not used[last - 1]:
                last -= 1
            if last < nclusters:
                self.f.truncate(last * cs)
                self.fsize = last * cs
                self.end_cluster = last
            self.f.sync()
            self._xlinks_checked = False
            self.write_refusal = None
            for p in problems:
                if p.severity == "corrupt" or (p.offset is not None and p.offset >= last * cs):
                    p.repaired = True
            report.repaired = True
        prog.finish()
        return report


def open_image(backend: QedBackend, location: str, flags: OpenFlags = OpenFlags.NORMAL,
         config: dict | None = None) -> Image:
    parse_config(backend.config_keys, config, owner=backend.name)
    ro = flags.read_only
    return ImageFile(location, writable=not ro).hand_to(
        lambda f: QedImage(backend, location, f, flags))


def create_image(backend: QedBackend, p: CreateParams) -> QedImage:
    cfg = parse_config(backend.config_keys, p.config, creating=True, owner=backend.name)
    cs, ts = cfg["ClusterSize"], cfg["TableSize"]
    if ts * cs > MAX_TABLE_BYTES:
        raise InvalidArgument(f"QED: tables of {ts} x {cs} bytes exceed "
                              f"{MAX_TABLE_BYTES >> 20} MiB")
    if p.size <= 0 or p.size % 512:
        raise InvalidArgument(f"QED: size must be a positive multiple of 512, found {p.size}")
    if p.size > qed_max_size(cs, ts):
        raise too_large("QED", p.size, qed_max_size(cs, ts), p.location, _limit_reason(cs, ts))
    name = raw = None
    features = 0
    if p.parent is not None:
        name = relative_name(p.location, p.parent.location).encode()
        raw = p.parent.backend.name.upper() == "RAW"
        features = F_BACKING_FILE | (F_BACKING_FORMAT_NO_PROBE if raw else 0)
        if len(name) > MAX_BACKING_NAME or HEADER_SIZE + len(name) > cs:
            raise InvalidArgument(f"QED: backing file name of {len(name)} bytes does not fit "
                                  "in the header cluster")
    hdr = QedHeader.build(dict(
        cluster_size=cs, table_size=ts, header_size=1, features=features, compat_features=0,
        autoclear_features=0, l1_table_offset=cs, image_size=p.size,
        backing_filename_offset=HEADER_SIZE if name else 0,
        backing_filename_size=len(name) if name else 0))
    f = ImageFile.create_temp(p.location)
    try:
        f.truncate(cs + ts * cs)
        f.pwrite(0, hdr + (name or b""))
        f.sync()
        img = QedImage(backend, p.location, f, OpenFlags.NORMAL)
        f.commit()
    except BaseException:
        f.abandon()
        raise
    if p.progress:
        p.progress(p.size, p.size)
    return img

