"""ParallelsImage: one expanding (version 2) image file: header, BAT, reads, writes, discard,
compact, resize, check; and writing a new empty image."""
from __future__ import annotations

import hashlib
from array import array

from ...align import align_up, ceil_div
from ...backend import Backend, OpenFlags, too_large
from ...compaction import holes_between, move_blocks, overlapping, plan_moves, punch_blocks
from ...errors import InvalidArgument, NotSupported
from ...fileimage import FileImage
from ...fileio import ImageFile
from ...geometry import Geometry
from ...image import Alloc, CheckReport, FillFn, Problem, ProblemCode
from ...progress import ProgressCallback
from ...runs import RunList
from ...sparse import is_zero, split_blocks, zeroes
from ...tables import BlockTable, first_shared, read_table
from . import _limit_reason
from .layout import (
    EXT_MAGIC,
    FLAG_EMPTY,
    HEADER_SIZE,
    INUSE_MAGIC,
    MAGIC_EXT,
    MAGIC_V2,
    MAX_BAT_ENTRIES,
    MAX_CLUSTER,
    SECTOR,
    VERSION,
    FormatExtensionHeader,
    Header,
)


class ParallelsImage(FileImage):
    """One expanding Parallels image file (a plain ``.hdd`` or a bundle's ``.hds``)."""

    f: ImageFile
    file_len: int
    ext: bool                           # 'WithouFreSpacExt': BAT entries count clusters
    data_off: int
    bat: array[int]
    mult: int                           # bytes per BAT entry unit
    dirty: bool
    empty: bool
    ext_cluster: int                    # format extension cluster offset (0: none)
    alloc_end: int

    @property
    def max_size(self) -> int:
        return MAX_BAT_ENTRIES * self.block_size

    def __init__(self, backend: Backend, location: str, f: ImageFile, flags: OpenFlags, *,
                 fresh: bool = False) -> None:
        super().__init__(backend, location, f, flags.read_only)
        self.open_flags = flags
        self.repaired_on_open: CheckReport | None = None
        try:
            self._load()
            if not self.read_only:
                if self.dirty and not fresh:
                    self.repaired_on_open = self.check(repair=True)
                self._find_cross_links()
        except BaseException:
            f.close()
            raise

    def _load(self) -> None:
        f = self.f
        self.file_len = f.size()
        raw = f.read_exact(0, HEADER_SIZE, "Parallels header")
        h = Header.parse(raw)
        if h.magic not in (MAGIC_V2, MAGIC_EXT):
            raise self._corrupt("not a Parallels image", field="magic", offset=0,
                                expected="'WithoutFreeSpace' or 'WithouFreSpacExt'",
                                found=repr(bytes(h.magic)))
        if h.version != VERSION:
            raise self._corrupt("unsupported version", field="version", offset=16,
                                expected=VERSION, found=h.version)
        self.hdr = h
        self.ext = h.magic == MAGIC_EXT
        if h.tracks == 0 or h.tracks * SECTOR > MAX_CLUSTER:
            raise self._corrupt("invalid cluster size", field="tracks", offset=28,
                                expected=f"1..{MAX_CLUSTER // SECTOR} sectors", found=h.tracks)
        self.block_size = h.tracks * SECTOR
        nb = h.nb_sectors if self.ext else h.nb_sectors & 0xFFFFFFFF
        self.size = nb * SECTOR
        need = ceil_div(nb, h.tracks)
        if h.bat_entries < need:
            raise self._corrupt("BAT too small for the disk size", field="bat_entries", offset=32,
                                expected=f">= {need} for {nb} sectors", found=h.bat_entries)
        if h.bat_entries > MAX_BAT_ENTRIES:
            raise self._corrupt("BAT too large", field="bat_entries", offset=32,
                                expected=f"<= {MAX_BAT_ENTRIES}", found=h.bat_entries)
        bat_end = HEADER_SIZE + 4 * h.bat_entries
        if bat_end > self.file_len:
            raise self._corrupt("BAT lies past the end of the file", field="bat_entries",
                                offset=32, expected=f"<= {(self.file_len - HEADER_SIZE) // 4}",
                                found=h.bat_entries)
        if h.data_off:
            self.data_off = h.data_off * SECTOR
        elif self.ext:
            raise self._corrupt("data_off must be set in a 'WithouFreSpacExt' image",
                                field="data_off", offset=48, expected="non-zero", found=0)
        else:
            self.data_off = align_up(bat_end, SECTOR)
        if self.data_off < bat_end:
            raise self._corrupt("data area overlaps the BAT", field="data_off", offset=48,
                                expected=f">= {bat_end // SECTOR} sectors", found=h.data_off)
        if self.ext and self.data_off % self.block_size:
            raise self._corrupt("data_off is not cluster aligned", field="data_off", offset=48,
                                expected=f"a multiple of {h.tracks}", found=h.data_off)
        self.bat = bat = read_table(f, HEADER_SIZE, h.bat_entries, "I", False, "BAT")
        self.mult = self.block_size if self.ext else SECTOR
        self.dirty = h.inuse == INUSE_MAGIC
        self.empty = bool(h.flags & FLAG_EMPTY)
        self.pchs = Geometry(h.cylinders, h.heads, 32) if h.heads and h.cylinders else None
        used_end = self.data_off
        for e in bat:
            if e:
                used_end = max(used_end, e * self.mult + self.block_size)
        self.ext_cluster = 0
        if h.ext_off:
            eo = h.ext_off * SECTOR
            if eo < self.data_off or eo + self.block_size > self.file_len:
                raise self._corrupt("format extension cluster lies outside the data area",
                                    field="ext_off", offset=56,
                                    expected=f"{self.data_off // SECTOR}.."
                                             f"{self.file_len // SECTOR}",
                                    found=h.ext_off)
            cluster = f.read_exact(eo, self.block_size, "format extension")
            fx = FormatExtensionHeader.parse(cluster)
            if fx.magic != EXT_MAGIC:
                raise self._corrupt("bad format extension magic", field="format extension",
                                    offset=eo, expected=hex(EXT_MAGIC), found=hex(fx.magic))
            digest = hashlib.md5(cluster[24:]).digest()
            if fx.checksum != digest:
                raise self._corrupt("format extension checksum mismatch", field="m_CheckSum",
                                    offset=eo + 8, expected=digest.hex(),
                                    found=bytes(fx.checksum).hex())
            self.ext_cluster = eo
            used_end = max(used_end, eo + self.block_size)
            if not self.read_only:
                # the extension carries dirty bitmaps (incremental backups); writing data without
                # updating them would silently break the next backup
                raise NotSupported(f"{self.location}: the image carries a format extension "
                                   "(dirty bitmaps); writing it is not supported, open read-only")
        self.alloc_end = self._align_up(max(used_end, self.file_len))
        if self.empty and not self.read_only:
            # "the image should be considered clear": make it so before writing anything
            self.bat = array("I", bytes(4 * h.bat_entries))
            self.f.pwrite(HEADER_SIZE, bytes(4 * h.bat_entries))
            self._write_header(flags=h.flags & ~FLAG_EMPTY)
            self.empty = False

    def _find_cross_links(self) -> None:
        """Two BAT entries (or one and the format extension) naming one cluster refuse writes,
        as check calls them corrupt."""
        self.write_refusal = None
        idx = [i for i, e in enumerate(self.bat) if e]
        refs = [self.bat[i] * self.mult for i in idx]
        if self.ext_cluster:
            idx.append(-1)
            refs.append(self.ext_cluster)
        hit = first_shared(refs)
        if hit is not None:
            off, a, b = hit
            names = ["the format extension" if idx[k] < 0 else f"BAT[{idx[k]}]" for k in (a, b)]
            self.write_refusal = f"{names[0]} and {names[1]} both name the cluster at {off:#x}"

    def _set_bat(self, values: dict[int, int]) -> None:
        """Set BAT entries (cluster offsets in bytes) and write them, neighbours joined."""
        t = BlockTable(self.f, HEADER_SIZE, self.bat)
        for idx, off in values.items():
            t[idx] = off // self.mult
        t.write_back()

    def _align_up(self, off: int) -> int:
        rel = max(off - self.data_off, 0)
        return self.data_off + align_up(rel, self.block_size)

    def _write_header(self, **changes: int) -> None:
        h = dict(self.hdr)
        h.pop("_io", None)
        h.update(changes)
        raw = Header.build(h)
        self.f.pwrite(0, raw)
        self.hdr = Header.parse(raw)

    # -- data ------------------------------------------------------------------------------
    def _cluster_offset(self, idx: int) -> int:
        """File offset of cluster ``idx`` (0 when unallocated); raises on an entry past EOF."""
        if self.empty:
            return 0
        e = self.bat[idx]
        if not e:
            return 0
        off = e * self.mult
        if off < self.data_off or off + self.block_size > self.file_len \
                or (off - self.data_off) % (self.block_size if self.ext else SECTOR):
            raise self._corrupt(f"BAT entry {idx} points outside the data area",
                                field=f"BAT[{idx}]", offset=HEADER_SIZE + 4 * idx,
                                expected=f"{self.data_off:#x} <= offset, end <= {self.file_len:#x}",
                                found=f"{off:#x}")
        return off

    def block_status(self, offset: int, length: int) -> list[tuple[int, int, Alloc]]:
        runs: RunList[Alloc] = RunList()
        for idx, _inner, pos, n in split_blocks(offset, length, self.block_size):
            runs.add(pos, n, Alloc.DATA if self._cluster_offset(idx) else Alloc.UNALLOCATED)
        return runs.runs

    def read(self, offset: int, length: int) -> bytes:
        out = bytearray(length)
        for idx, inner, pos, n in split_blocks(offset, length, self.block_size):
            off = self._cluster_offset(idx)
            if off:
                out[pos - offset:pos - offset + n] = self.f.read_exact(off + inner, n,
                                                                        f"cluster {idx}")
        return bytes(out)

    def write(self, offset: int, data: bytes | memoryview, fill: FillFn,
              fill_below: bool = False) -> None:
        """``fill_below``: the image has layers below it (bundle snapshots); a new cluster is then
        completed from ``fill`` instead of reading as zeroes."""
        self.require_writable()
        self._refuse_cross_linked()
        mv = memoryview(data)
        for idx, inner, pos, n in split_blocks(offset, len(data), self.block_size):
            piece = mv[pos - offset:pos - offset + n]
            off = self._cluster_offset(idx)
            if off:
                self.f.pwrite(off + inner, piece)
                continue
            if not fill_below and not self.honor_zeroes and is_zero(piece):
                continue
            new = self.alloc_end
            if new // self.mult > 0xFFFFFFFF:
                raise NotSupported(f"{self.location}: image file would exceed the largest offset "
                                   "a BAT entry can hold")
            self.alloc_end = new + self.block_size
            self.f.truncate(self.alloc_end)
            self.file_len = self.alloc_end
            if fill_below and n < self.block_size:
                start = pos - inner
                cl = bytearray(fill(start, min(self.block_size, self.size - start)))
                cl[inner:inner + n] = piece
                self.f.pwrite(new, cl)
            else:
                self.f.pwrite(new + inner, piece)
            self.f.sync()                       # data before the BAT entry naming it
            self._set_bat({idx: new})

    def info(self) -> dict[str, object]:
        return {
            "subformat": "WithouFreSpacExt" if self.ext else "WithoutFreeSpace",
            "cluster_size": self.block_size,
            "bat_entries": self.hdr.bat_entries,
            "data_offset": self.data_off,
            "dirty": self.dirty,
            "empty": self.empty,
            "format_extension_offset": self.hdr.ext_off * SECTOR if self.hdr.ext_off else None,
            "repaired_on_open": bool(self.repaired_on_open and self.repaired_on_open.problems),
        }

    # -- operations ------------------------------------------------------------------------
    def check(self, repair: bool = False, dry_run: bool = False,
              progress: ProgressCallback | None = None) -> CheckReport:
        rep = CheckReport()
        fix = repair and not dry_run
        if fix:
            self.require_writable()
        if self.repaired_on_open is not None:
            # a dirty image was repaired when it was opened read-write: report what was done
            rep.problems.extend(self.repaired_on_open.problems)
        if self.dirty:
            rep.problems.append(Problem("corrupt", "image was not closed cleanly (in_use flag set)",
                                        44, repaired=fix, code=ProblemCode.NOT_CLOSED))
        seen: dict[int, int] = {}
        dups: list[int] = []
        high = self.data_off
        if self.ext_cluster:
            seen[self.ext_cluster] = -1
            high = self.ext_cluster + self.block_size
        for idx, e in enumerate(self.bat):
            if not e:
                continue
            off = e * self.mult
            where = HEADER_SIZE + 4 * idx
            bad: str | None = None
            code = ProblemCode.ENTRY_INVALID
            align = self.block_size if self.ext else SECTOR
            if off < self.data_off or (off - self.data_off) % align:
                bad = f"BAT[{idx}]: cluster offset {off:#x} is outside or misaligned in the " \
                      "data area"
                code = ProblemCode.ENTRY_INVALID
            elif off + self.block_size > self.file_len:
                bad = f"BAT[{idx}]: cluster offset {off:#x} lies past the end of the file " \
                      f"({self.file_len} bytes)"
                code = ProblemCode.ENTRY_PAST_END
            elif idx >= ceil_div(self.size, self.block_size):
                bad = f"BAT[{idx}]: entry beyond the disk size is allocated"
                code = ProblemCode.ENTRY_INVALID
            if bad:
                rep.problems.append(Problem("corrupt", bad, where, repaired=fix, code=code))
                if fix:
                    self.bat[idx] = 0
                    self.f.pwrite(where, bytes(4))
                continue
            if off in seen:
                other = "the format extension" if seen[off] < 0 else f"BAT[{seen[off]}]"
                rep.problems.append(Problem("corrupt", f"BAT[{idx}]: cluster at {off:#x} is also "
                                            f"used by {other}", where, repaired=fix,
                                            code=ProblemCode.CROSS_LINKED))
                dups.append(idx)
                continue
            seen[off] = idx
            high = max(high, off + self.block_size)
        if fix:
            for idx in dups:     # give each duplicate its own copy of the data
                src = self.bat[idx] * self.mult
                data = self.f.read_exact(src, self.block_size, f"cluster {idx}")
                new = max(self.alloc_end, self._align_up(high))
                self.f.truncate(new + self.block_size)
                self.f.pwrite(new, data)
                self.f.sync()
                self._set_bat({idx: new})
                high = new + self.block_size
                self.alloc_end = high
                self.file_len = max(self.file_len, high)
        if self.file_len > high and not dups:
            rep.problems.append(Problem("leak", f"{self.file_len - high} bytes past the last used "
                                        "cluster", high, repaired=fix, code=ProblemCode.LEAK))
            rep.orphans.append((self.location, high, self.file_len - high))
            if fix:
                self.f.truncate(high)
                self.file_len = high
                self.alloc_end = high
        if fix:
            self.f.sync()
            if self.hdr.inuse == INUSE_MAGIC:       # the repairs are on disk: now clean
                self._write_header(inuse=0)
                self.f.sync()
            self.dirty = False
            self._find_cross_links()
        rep.repaired = any(p.repaired for p in rep.problems)
        if progress:
            progress(1, 1)
        return rep

    def compact(self, progress: ProgressCallback | None = None,
                parent_read: FillFn | None = None) -> None:
        """Drop clusters that read as zeroes (or as ``parent_read``), move the rest down into
        the holes (data copied and flushed before the BAT entry changes), shrink the file."""
        self.require_writable()
        entries = ceil_div(self.size, self.block_size)
        for idx in range(min(entries, len(self.bat))):
            if progress and progress(idx, entries + 1) is False:
                from ...errors import Cancelled
                raise Cancelled()
            off = self._cluster_offset(idx)
            if not off:
                continue
            start = idx * self.block_size
            n = min(self.block_size, self.size - start)
            data = self.f.read_exact(off, n, f"cluster {idx}")
            below = parent_read(start, n) if parent_read else None
            if (below is None and is_zero(data)) or (below is not None and data == below):
                self._set_bat({idx: 0})
        self.f.sync()
        self._pack()
        if progress:
            progress(entries + 1, entries + 1)

    def discard(self, offset: int, length: int, fill: FillFn | None = None) -> None:
        """Whole clusters leave the BAT (synced), then their space is punched, a run per call;
        parts of clusters are zeroed."""
        self.require_writable()
        self._refuse_cross_linked()
        bs = self.block_size
        freed: dict[int, int] = {}
        gone: list[int] = []
        for idx, inner, _pos, n in split_blocks(offset, length, bs):
            off = self._cluster_offset(idx) if idx < len(self.bat) else 0
            if not off:
                continue                            # reads zeroes already
            if inner == 0 and n >= min(bs, self.size - idx * bs):
                freed[idx] = 0
                gone.append(off)
            else:
                self.f.pwrite(off + inner, zeroes(n))
        if freed:
            self._set_bat(freed)
            self.f.sync()                           # the BAT stops naming the clusters first
            punch_blocks(self.f, gone, bs)

    def close_holes(self, progress: ProgressCallback | None = None) -> bool:
        """After discards: the last clusters move down into the holes, in place, and the file
        is cut (compact's second half)."""
        self.require_writable()
        self._pack()
        if progress:
            progress(1, 1)
        return True

    def _pack(self) -> None:
        """The highest clusters move into the lowest holes (compaction.move_blocks: copies,
        sync, BAT entries, sync); clusters overlapping another (a damaged image) stay; the
        file is cut after the last one."""
        bs = self.block_size
        used = sorted((self.bat[i] * self.mult, i) for i in range(len(self.bat)) if self.bat[i])
        stuck = overlapping([(off, bs, i) for off, i in used])
        blocks = [(off, bs, i) for off, i in used if i not in stuck]
        taken = [(0, self.data_off)] + [(off, off + bs) for off, _i in used]
        moves = plan_moves(blocks, holes_between(taken), self.mult)
        move_blocks(self.f, moves, lambda ms: self._set_bat({m.key: m.dst for m in ms}))
        gone = {m.src for m in moves}
        target = max([self.data_off] + [off + bs for off, _i in used if off not in gone] +
                     [m.dst + bs for m in moves])
        self.f.truncate(target)
        self.file_len = self.alloc_end = target

    def resizes_in_place(self, new_size: int) -> bool:
        # growing within the BAT's room: new entries zeroed past the counted ones, then the
        # header (one write) names the new size and count
        return (self.size < new_size <= MAX_BAT_ENTRIES * self.block_size
                and new_size % SECTOR == 0
                and HEADER_SIZE + 4 * ceil_div(new_size, self.block_size) <= self.data_off
                and (self.ext or new_size // SECTOR <= 0xFFFFFFFF))

    def resize(self, new_size: int, progress: ProgressCallback | None = None) -> None:
        self.require_writable()
        if new_size < self.size:
            raise InvalidArgument(f"{self.location}: shrinking a Parallels image is not supported "
                                  f"({self.size} -> {new_size} bytes)")
        if new_size % SECTOR:
            raise InvalidArgument(f"{self.location}: size must be a multiple of 512, "
                                  f"found {new_size}")
        if new_size > MAX_BAT_ENTRIES * self.block_size:
            raise too_large("Parallels", new_size, MAX_BAT_ENTRIES * self.block_size,
                            self.location, _limit_reason(self.block_size))
        entries = ceil_div(new_size, self.block_size)
        if HEADER_SIZE + 4 * entries > self.data_off:
            raise NotSupported(f"{self.location}: growing to {new_size} bytes needs "
                               f"{entries} BAT entries, more than fit before the data area")
        if not self.ext and new_size // SECTOR > 0xFFFFFFFF:
            raise NotSupported(f"{self.location}: a 'WithoutFreeSpace' image holds at most 2 TiB")
        if entries > len(self.bat):
            self.f.pwrite(HEADER_SIZE + 4 * len(self.bat), bytes(4 * (entries - len(self.bat))))
            self.bat.extend([0] * (entries - len(self.bat)))
            self.f.sync()
        self._write_header(bat_entries=max(entries, self.hdr.bat_entries),
                           nb_sectors=new_size // SECTOR,
                           cylinders=min(new_size // SECTOR // (16 * 32), 0xFFFFFFFF))
        self.f.sync()
        self.size = new_size
        if progress:
            progress(1, 1)


# -- bundles -----------------------------------------------------------------------------------

def _write_new_image(f: ImageFile, size: int, cl: int, magic: bytes) -> None:
    """Header and an empty BAT (qemu parallels.txt); the data area starts cluster aligned."""
    entries = ceil_div(size, cl)
    data_off = align_up(HEADER_SIZE + 4 * entries, cl)
    heads = 16
    f.pwrite(0, Header.build(dict(magic=magic, version=VERSION, heads=heads,
                                  cylinders=min(size // SECTOR // (heads * 32), 0xFFFFFFFF),
                                  tracks=cl // SECTOR, bat_entries=entries,
                                  nb_sectors=size // SECTOR, inuse=0, data_off=data_off // SECTOR,
                                  flags=0, ext_off=0)))
    f.truncate(data_off)
    f.sync()
