"""Parallels backend: the expanding ("Compressed") image format of Parallels Desktop / Virtuozzo,
and the ``name.hdd/`` bundle that holds it.

Specification: qemu's ``docs/interop/parallels.txt`` ("Parallels Expandable Image File Format").
Facts used:

* a 64-byte header (magic "WithoutFreeSpace" or "WithouFreSpacExt", version 2, geometry, cluster
  size in sectors ("tracks"), BAT entry count, size in sectors, in_use, data_off, flags, ext_off),
  then the BAT (32-bit entries), then the data area.
* a BAT entry is a cluster's file offset: in sectors for "WithoutFreeSpace" images, in clusters
  for "WithouFreSpacExt" images; 0 means unallocated (reads as zeroes). Offsets are >= the data
  offset, (offset - data offset) is cluster aligned, below the file size, and unique.
* "WithoutFreeSpace": only the low 32 bits of nb_sectors count; data_off 0 means "right after the
  BAT, sector aligned". "WithouFreSpacExt": data_off is non-zero and cluster aligned.
* in_use is 0x746F6E59 while software has the image open read-write. qemu writes 0 on close, the
  document names 0x312e3276; Parallels Desktop itself writes other values (e.g. "pd17"); only the
  in-use magic means "not closed cleanly". A dirty image is checked (and repaired) when opened
  read-write and read as it is when opened read-only.
* We never set in_use: every update is ordered crash-safe (data, sync, BAT entry; a kill leaves
  at most a leaked cluster at the end), so the flag would only make a killed session look corrupt
  to us and to qemu. Our locks (also at qemu's offsets) keep other writers out while we hold it.
  Repairing a dirty image clears the flag after the repairs are synced; other values are kept.
* flags bit 0: the image is empty (all clusters read as zeroes).

Bundles (Parallels Desktop): a folder ``name.hdd`` holds ``DiskDescriptor.xml`` (disk parameters,
``StorageData`` of ``Storage`` extents with Start/End in sectors and one ``Image`` per snapshot
(GUID, Type Compressed|Plain, File), and ``Snapshots`` of ``Shot`` GUID/ParentGUID). Opening the
folder or its descriptor reads the extents in order, each through its snapshot chain up to the
current (top) snapshot. Names in the descriptor are confined to the bundle folder.

Operations: create (a single expanding file, "WithouFreSpacExt" like qemu; or with Bundle=1 a
Parallels Desktop bundle folder), write, check/repair (in_use left set, BAT entries outside the
data area or past the end of the file, clusters shared by two entries (copied apart), space
leaked at the end), resize (grow, while the BAT fits before the data area), compact. An image
carrying a format extension (dirty bitmaps) opens read-only. Differencing images are not
created: a lone file has no parent link (VirtualBox's DIFF capability is a flag only).

Limits (parser safety): cluster <= 64 MiB, BAT <= 16 Mi entries and inside the file,
descriptor <= 1 MiB and no DTD,
<= 4096 extents, <= 1024 snapshots.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import uuid as uuidlib
from array import array

from ..align import align_up, ceil_div
from ..backend import (Backend, Cap, CreateParams, FileExtension, ImageFlags, OpenFlags,
                       Operation, ProbeInput, too_large)
from ..config import ConfigKey, KeyFlag, ValueType, parse_config
from ..errors import (CorruptImage, FileExists, ImageNotFound, InvalidArgument, NotSupported,
                      require_text)
from ..compaction import holes_between, move_blocks, overlapping, plan_moves
from ..fileimage import FileImage
from ..fileio import ImageFile, close_all, resolve_stored_name, temp_name
from ..geometry import Geometry
from ..image import Alloc, CheckReport, Image, Problem, ProblemCode
from ..runs import RunList, merge_runs
from ..sparse import is_zero, split_blocks
from ..tables import BlockTable, first_shared, read_table
from .parallels_layout import (SECTOR, MAGIC_V2, MAGIC_EXT, VERSION, INUSE_MAGIC, CLOSED_MAGIC,
                               FLAG_EMPTY, MAX_CLUSTER, DEFAULT_CLUSTER, MAX_DESCRIPTOR,
                               MAX_BAT_ENTRIES, MAX_EXTENTS, MAX_SNAPSHOTS, DESCRIPTOR_NAME,
                               ZERO_GUID, TOP_GUID, Header, FormatExtensionHeader, EXT_MAGIC,
                               STRUCTS, HEADER_SIZE)


def _xml_escape(text: str) -> str:
    """Text for an XML element (xml.sax.saxutils would import urllib and ssl at start-up)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _limit_reason(cl: int) -> str:
    return (f" with {cl}-byte clusters (vdgui opens BATs of at most {MAX_BAT_ENTRIES} entries; "
            "a larger ClusterSize allows more)")


class ParallelsImage(FileImage):
    """One expanding Parallels image file (a plain ``.hdd`` or a bundle's ``.hds``)."""

    @property
    def max_size(self) -> int:
        return MAX_BAT_ENTRIES * self.block_size

    def __init__(self, backend, location: str, f: ImageFile, flags: OpenFlags, *, fresh=False):
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

    def _write_header(self, **changes) -> None:
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

    def block_status(self, offset, length):
        runs = RunList()
        for idx, _inner, pos, n in split_blocks(offset, length, self.block_size):
            runs.add(pos, n, Alloc.DATA if self._cluster_offset(idx) else Alloc.UNALLOCATED)
        return runs.runs

    def read(self, offset, length):
        out = bytearray(length)
        for idx, inner, pos, n in split_blocks(offset, length, self.block_size):
            off = self._cluster_offset(idx)
            if off:
                out[pos - offset:pos - offset + n] = self.f.read_exact(off + inner, n,
                                                                        f"cluster {idx}")
        return bytes(out)

    def write(self, offset, data, fill, fill_below: bool = False):
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
            if not fill_below and not getattr(self, "honor_zeroes", False) and is_zero(piece):
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

    def info(self) -> dict:
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
    def check(self, repair=False, dry_run=False, progress=None) -> CheckReport:
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
            bad = code = None
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

    def compact(self, progress=None, parent_read=None):
        """Drop clusters that read as zeroes (or as ``parent_read``), move the rest down into
        the holes (data copied and flushed before the BAT entry changes), shrink the file."""
        self.require_writable()
        entries = ceil_div(self.size, self.block_size)
        for idx in range(min(entries, len(self.bat))):
            if progress and progress(idx, entries + 1) is False:
                from ..errors import Cancelled
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
        # the highest clusters move into the lowest holes (compaction.move_blocks: copies,
        # sync, BAT entries, sync); clusters overlapping another (a damaged image) stay
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
        if progress:
            progress(entries + 1, entries + 1)

    def resize(self, new_size, progress=None):
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
class _RawLayer:
    """A "Plain" extent image: a flat file."""

    def __init__(self, path: str, f: ImageFile, size: int, read_only: bool):
        self.location, self.f, self.size, self.read_only = path, f, size, read_only

    def block_status(self, offset, length):
        return [(offset, length, Alloc.DATA)]

    def read(self, offset, length):
        data = self.f.pread(offset, length)
        return data + bytes(length - len(data))

    def write(self, offset, data, fill, fill_below=False):
        self.f.pwrite(offset, data)

    def flush(self):
        if not self.read_only:
            self.f.sync()

    def close(self):
        if self.f.fd >= 0:
            try:
                self.flush()
            finally:
                self.f.close()

    def files(self):
        return [self.location]


class _Extent:
    def __init__(self, start: int, end: int, layers: list):
        self.start, self.end, self.layers = start, end, layers   # layers: base first


class ParallelsBundleImage(Image):
    """A Parallels bundle (``name.hdd/`` with DiskDescriptor.xml): extents x snapshot layers."""

    def __init__(self, backend, location: str, descriptor: str, flags: OpenFlags):
        super().__init__(backend, location, flags.read_only)
        self.descriptor = descriptor
        self.extents: list[_Extent] = []
        try:
            self._load(flags)
        except BaseException:
            self.close()
            raise

    def _corrupt(self, message, **kw):
        return CorruptImage(message, path=self.descriptor, **kw)

    def _load(self, flags: OpenFlags) -> None:
        try:
            st = os.stat(self.descriptor)
        except OSError:
            raise ImageNotFound(f"{self.descriptor}: bundle descriptor not found") from None
        if st.st_size > MAX_DESCRIPTOR:
            raise self._corrupt("descriptor too large", field="file size",
                                expected=f"<= {MAX_DESCRIPTOR} bytes", found=st.st_size)
        with ImageFile(self.descriptor) as fh:      # a FIFO is refused, never waited on
            text = fh.pread(0, MAX_DESCRIPTOR + 1)
        if b"<!DOCTYPE" in text or b"<!ENTITY" in text:
            raise self._corrupt("descriptor carries a DTD/entity declarations; refused",
                                field="DOCTYPE")
        import xml.etree.ElementTree as ET   # with the first Parallels image, not at start-up
        try:
            root = ET.fromstring(text)
        except (ET.ParseError, LookupError, ValueError) as exc:   # incl. unknown encodings
            raise self._corrupt(f"descriptor is not well-formed XML ({exc})") from None
        if root.tag != "Parallels_disk_image":
            raise self._corrupt("not a Parallels disk descriptor", field="root element",
                                expected="Parallels_disk_image", found=root.tag)

        def num(elem, tag, where):
            t = elem.findtext(tag)
            try:
                v = int((t or "").strip())
            except ValueError:
                raise self._corrupt(f"{where}: {tag} is not a number", field=tag,
                                    found=repr(t)) from None
            if v < 0:
                raise self._corrupt(f"{where}: {tag} is negative", field=tag, found=v)
            return v

        params = root.find("Disk_Parameters")
        if params is None:
            raise self._corrupt("descriptor has no Disk_Parameters", field="Disk_Parameters")
        total = num(params, "Disk_size", "Disk_Parameters")
        self.size = total * SECTOR
        lss = params.findtext("LogicSectorSize")
        if lss and lss.strip() not in ("512",):
            raise NotSupported(f"{self.descriptor}: logical sector size {lss.strip()} is not "
                               "supported (512 only)")
        uid = (params.findtext("UID") or "").strip()
        try:
            self.uuid = uuidlib.UUID(uid.strip("{}")) if uid else None
        except ValueError:
            self.uuid = None
        heads = params.findtext("Heads")
        cyl = params.findtext("Cylinders")
        secs = params.findtext("Sectors")
        try:
            self.pchs = (Geometry(int(cyl), int(heads), int(secs))
                         if heads and cyl and secs else None)
        except ValueError:
            self.pchs = None
        # snapshots: the chain from the base to the current (top) snapshot
        shots = {}
        snaps = root.find("Snapshots")
        top_guid = None
        if snaps is not None:
            top_guid = (snaps.findtext("TopGUID") or "").strip().lower() or None
            for shot in snaps.findall("Shot"):
                if len(shots) >= MAX_SNAPSHOTS:
                    raise self._corrupt("too many snapshots", field="Snapshots",
                                        expected=f"<= {MAX_SNAPSHOTS}",
                                        found=len(snaps.findall("Shot")))
                g = (shot.findtext("GUID") or "").strip().lower()
                p = (shot.findtext("ParentGUID") or ZERO_GUID).strip().lower()
                if not g:
                    raise self._corrupt("snapshot without a GUID", field="Shot")
                shots[g] = p
        chain = self._snapshot_chain(shots, top_guid)
        self.snapshot_chain = chain
        self.snapshot_count = len(shots)
        storages = root.find("StorageData")
        if storages is None or not storages.findall("Storage"):
            raise self._corrupt("descriptor lists no storage extents", field="StorageData")
        items = storages.findall("Storage")
        if len(items) > MAX_EXTENTS:
            raise self._corrupt("too many storage extents", field="StorageData",
                                expected=f"<= {MAX_EXTENTS}", found=len(items))
        pos = 0
        unsafe = bool(flags & OpenFlags.ALLOW_UNSAFE_PATHS)
        for i, s in enumerate(items):
            where = f"Storage {i}"
            start, end = num(s, "Start", where), num(s, "End", where)
            if start != pos or end <= start:
                raise self._corrupt(f"{where}: extents must be contiguous and non-empty",
                                    field="Start/End", expected=f"Start {pos} < End",
                                    found=f"{start}..{end}")
            images = {}
            for im in s.findall("Image"):
                g = (im.findtext("GUID") or "").strip().lower()
                images[g] = ((im.findtext("Type") or "Compressed").strip(),
                             (im.findtext("File") or "").strip())
            if not images:
                raise self._corrupt(f"{where}: no image listed", field="Image")
            if chain:
                missing = [g for g in chain if g not in images]
                if missing:
                    raise self._corrupt(f"{where}: no image for snapshot {missing[0]}",
                                        field="Image GUID")
                order = chain
            else:
                order = list(images)[:1]
            layers = []
            self.extents.append(_Extent(start * SECTOR, end * SECTOR, layers))
            for n, g in enumerate(order):
                kind, name = images[g]
                top = n == len(order) - 1
                layers.append(self._open_layer(kind, name, (end - start) * SECTOR,
                                               read_only=flags.read_only or not top,
                                               unsafe=unsafe, where=where))
            pos = end
        if pos != total:
            raise self._corrupt("extents do not cover the disk", field="End",
                                expected=f"last End = Disk_size {total}", found=pos)
        first = self.extents[0].layers[0]
        self.block_size = getattr(first, "block_size", SECTOR)
        self.flags = ImageFlags.NONE

    def _snapshot_chain(self, shots: dict, top: str | None) -> list[str]:
        if not shots:
            return []
        if top is None:
            parents = set(shots.values())
            leaves = [g for g in shots if g not in parents]
            if len(leaves) != 1:
                raise NotSupported(f"{self.descriptor}: cannot tell the current snapshot "
                                   f"({len(leaves)} leaves and no TopGUID)")
            top = leaves[0]
        if top not in shots:
            raise self._corrupt("TopGUID names no snapshot", field="TopGUID", found=top)
        chain = [top]
        while shots[chain[-1]] != ZERO_GUID:
            p = shots[chain[-1]]
            if p not in shots or p in chain:
                raise self._corrupt("snapshot parent chain is broken or loops",
                                    field="ParentGUID", found=p)
            chain.append(p)
        return list(reversed(chain))

    def _open_layer(self, kind: str, name: str, size: int, *, read_only: bool, unsafe: bool,
                    where: str):
        path = resolve_stored_name(self.descriptor, name, allow_unsafe=unsafe,
                                   what=f"{where} image file")
        if os.path.abspath(path) == os.path.abspath(self.descriptor):
            raise self._corrupt(f"{where}: image file is the descriptor itself", field="File")
        fl = OpenFlags.READ_ONLY if read_only else OpenFlags.NORMAL
        if kind == "Compressed":
            f = ImageFile(path, writable=not read_only)
            img = ParallelsImage(self.backend, path, f, fl)
            if img.size < size:
                img.close()
                raise self._corrupt(f"{where}: image {name} is smaller than its extent",
                                    field="End", expected=f">= {size} bytes", found=img.size)
            return img
        if kind == "Plain":
            f = ImageFile(path, writable=not read_only)
            return _RawLayer(path, f, size, read_only)
        raise NotSupported(f"{self.descriptor}: {where}: image type {kind!r} is not supported")

    # -- data --------------------------------------------------------------------------------
    def _pieces(self, offset, length):
        end = offset + length
        for e in self.extents:
            if e.end <= offset or e.start >= end:
                continue
            s, t = max(offset, e.start), min(end, e.end)
            yield e, s, t - s

    def _layer_status(self, layers, k, off, n, out, base):
        if k < 0:
            out.append((base + off, n, Alloc.UNALLOCATED))
            return
        for s, ln, st in layers[k].block_status(off, n):
            if st == Alloc.UNALLOCATED:
                self._layer_status(layers, k - 1, s, ln, out, base)
            else:
                out.append((base + s, ln, st))

    def _layer_read(self, layers, k, off, n, buf, bufoff):
        if k < 0:
            return
        for s, ln, st in layers[k].block_status(off, n):
            p = bufoff + s - off
            if st == Alloc.DATA:
                buf[p:p + ln] = layers[k].read(s, ln)
            elif st == Alloc.UNALLOCATED:
                self._layer_read(layers, k - 1, s, ln, buf, p)

    def block_status(self, offset, length):
        out: list = []
        for e, s, n in self._pieces(offset, length):
            self._layer_status(e.layers, len(e.layers) - 1, s - e.start, n, out, e.start)
        return merge_runs(out)

    def read(self, offset, length):
        buf = bytearray(length)
        for e, s, n in self._pieces(offset, length):
            self._layer_read(e.layers, len(e.layers) - 1, s - e.start, n, buf, s - offset)
        return bytes(buf)

    def write(self, offset, data, fill):
        self.require_writable()
        mv = memoryview(data)
        for e, s, n in self._pieces(offset, len(data)):
            top = e.layers[-1]
            below = len(e.layers) > 1
            layers = e.layers

            def fill_from_below(o, ln, layers=layers):
                b = bytearray(ln)
                self._layer_read(layers, len(layers) - 2, o, ln, b, 0)
                return bytes(b)

            top.write(s - e.start, mv[s - offset:s - offset + n], fill_from_below,
                      fill_below=below)

    def flush(self):
        for e in self.extents:
            e.layers[-1].flush()

    def close(self):
        layers = [layer for e in self.extents for layer in e.layers]
        self.extents = []
        close_all(layer.close for layer in layers)

    def files(self):
        out = [self.descriptor]
        for e in self.extents:
            out += [layer.location for layer in e.layers]
        return out

    def info(self) -> dict:
        return {
            "subformat": "bundle",
            "descriptor": self.descriptor,
            "extents": [{"start": e.start, "end": e.end,
                         "files": [os.path.basename(layer.location) for layer in e.layers]}
                        for e in self.extents],
            "snapshots": self.snapshot_count,
            "state": ("current state (top snapshot " + self.snapshot_chain[-1] + ")"
                      if self.snapshot_chain else "base image (no snapshots listed)"),
            "snapshot_chain": list(self.snapshot_chain),
        }

    def compact(self, progress=None, parent_read=None):
        """Compact each extent's top image (clusters equal to the snapshot below are dropped)."""
        self.require_writable()
        total = len(self.extents)
        for i, e in enumerate(self.extents):
            top = e.layers[-1]
            if isinstance(top, ParallelsImage):
                below = None
                if len(e.layers) > 1:
                    def below(o, ln, layers=e.layers):
                        b = bytearray(ln)
                        self._layer_read(layers, len(layers) - 2, o, ln, b, 0)
                        return bytes(b)
                top.compact(None, below)
            if progress and progress(i + 1, total) is False:
                from ..errors import Cancelled
                raise Cancelled()

    def resize(self, new_size, progress=None):
        raise NotSupported(f"{self.location}: resizing a Parallels bundle is not supported "
                           "(resize its .hds extent images or convert the disk)")

    def check(self, repair=False, dry_run=False, progress=None) -> CheckReport:
        rep = CheckReport()
        for e in self.extents:
            for layer in e.layers:
                if isinstance(layer, ParallelsImage):
                    r = layer.check(repair=repair and not layer.read_only, dry_run=dry_run)
                    for p in r.problems:
                        p.what = f"{os.path.basename(layer.location)}: {p.what}"
                        rep.problems.append(p)
                    rep.orphans.extend(r.orphans)
        rep.repaired = any(p.repaired for p in rep.problems)
        if progress:
            progress(1, 1)
        return rep


# -- the backend --------------------------------------------------------------------------------
class ParallelsBackend(Backend):
    name = "Parallels"
    description = "Parallels expanding disk image (also name.hdd bundles)"
    aliases = ("parallels", "hdd")
    caps = Cap.FILE | Cap.ASYNC | Cap.VFS | Cap.CREATE_DYNAMIC
    extensions = (FileExtension("hdd"), FileExtension("hds"))
    config_keys = (
        ConfigKey("ClusterSize", str(DEFAULT_CLUSTER), ValueType.INTEGER, KeyFlag.CREATEONLY,
                  "the unit of allocation (a multiple of 512, at most 64 MiB)",
                  minimum=SECTOR, maximum=MAX_CLUSTER, label="Cluster size", unit="bytes"),
        ConfigKey("Bundle", "0", ValueType.INTEGER, KeyFlag.CREATEONLY,
                  "create a Parallels Desktop bundle (a name.hdd folder holding "
                  "DiskDescriptor.xml and one .hds extent) instead of a single file",
                  minimum=0, maximum=1, label="Parallels Desktop bundle"),
    )
    operations = frozenset({Operation.WRITE, Operation.CREATE, Operation.CHECK, Operation.REPAIR,
                            Operation.RESIZE, Operation.COMPACT})
    create_flags = ImageFlags.NONE
    size_granularity = SECTOR
    max_size = MAX_BAT_ENTRIES * DEFAULT_CLUSTER     # 16 TiB with the default 1 MiB clusters

    def max_size_for(self, config=None):
        return MAX_BAT_ENTRIES * self.config_value(config, "ClusterSize")

    def limit_reason(self, config=None):
        return _limit_reason(self.config_value(config, "ClusterSize"))

    bundle_descriptor = DESCRIPTOR_NAME     # registry: a name.hdd/ folder probes through it

    def probe(self, src: ProbeInput) -> int:
        if src.head[:16] in (MAGIC_V2, MAGIC_EXT):
            return 100
        if b"<Parallels_disk_image" in src.head[:4096] and (
                os.path.basename(src.path) == DESCRIPTOR_NAME or os.path.isdir(src.path)):
            return 100
        return 0

    def open(self, location, flags=OpenFlags.NORMAL, config=None):
        parse_config(self.config_keys, config, owner=self.name)
        if os.path.isdir(location):
            return ParallelsBundleImage(self, location, os.path.join(location, DESCRIPTOR_NAME),
                                        flags)
        if os.path.basename(location) == DESCRIPTOR_NAME:
            return ParallelsBundleImage(self, location, location, flags)
        f = ImageFile(location, writable=not flags.read_only)
        return ParallelsImage(self, location, f, flags)

    def create(self, p: CreateParams):
        if p.parent is not None:
            raise NotSupported("Parallels differencing images (bundle snapshots) cannot be "
                               "created by this backend")
        cfg = parse_config(self.config_keys, p.config, creating=True, owner=self.name)
        cl = cfg["ClusterSize"]
        if cl % SECTOR or cl > MAX_CLUSTER:
            raise InvalidArgument(f"Parallels ClusterSize must be a multiple of 512 up to 64 MiB, "
                                  f"found {cl}")
        size = p.size
        if size <= 0 or size % SECTOR:
            raise InvalidArgument(f"Parallels image size must be a positive multiple of 512, "
                                  f"found {size}")
        if size > MAX_BAT_ENTRIES * cl:       # an image the opener would refuse is never made
            raise too_large("Parallels", size, MAX_BAT_ENTRIES * cl, p.location,
                            _limit_reason(cl))
        if cfg["Bundle"]:
            return self._create_bundle(p, size, cl)
        f = ImageFile.create_temp(p.location)
        try:
            _write_new_image(f, size, cl, MAGIC_EXT)
            if p.progress:
                p.progress(size, size)
            f.commit()
        except BaseException:
            f.abandon()
            raise
        return ParallelsImage(self, p.location, f, OpenFlags.NORMAL, fresh=True)

    def _create_bundle(self, p: CreateParams, size: int, cl: int):
        """A ``name.hdd`` folder as Parallels Desktop lays it out: DiskDescriptor.xml, one
        expanding ``.hds`` extent, an empty ``name.hdd`` placeholder. Built in a temporary folder
        beside the target and renamed into place when complete."""
        final = os.path.abspath(p.location)
        if os.path.lexists(final):
            raise FileExists(f"{final}: file already exists")
        require_text(os.path.basename(final), "the bundle's file name", final)
        tmp = temp_name(final)
        shutil.rmtree(tmp, ignore_errors=True)
        os.mkdir(tmp)
        try:
            name = os.path.basename(final)
            guid = TOP_GUID           # the base snapshot of every real bundle (ploop, dissect)
            hds = f"{name}.0.{guid}.hds"
            # "WithoutFreeSpace" as Parallels Desktop writes it, unless offsets need 64 bits
            data_off = align_up(HEADER_SIZE + 4 * ceil_div(size, cl), cl)
            small = (data_off + align_up(size, cl)) // SECTOR <= 0xFFFFFFFF
            with ImageFile(os.path.join(tmp, hds), create=True) as f:
                _write_new_image(f, size, cl, MAGIC_V2 if small else MAGIC_EXT)
            uid = "{" + str(p.uuid or uuidlib.uuid4()) + "}"
            sectors = size // SECTOR
            desc = _DESCRIPTOR.format(
                sectors=sectors, cylinders=min(sectors // (16 * 32), 0xFFFFFFFF), uid=uid,
                name=_xml_escape(os.path.splitext(name)[0]), blocksize=cl // SECTOR,
                file=_xml_escape(hds), guid=guid)
            with open(os.path.join(tmp, DESCRIPTOR_NAME), "w", encoding="utf-8") as fh:
                fh.write(desc)
                fh.flush()
                os.fsync(fh.fileno())
            open(os.path.join(tmp, name), "wb").close()
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if p.progress:
            p.progress(size, size)
        return ParallelsBundleImage(self, final, os.path.join(final, DESCRIPTOR_NAME),
                                    OpenFlags.NORMAL)


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


_DESCRIPTOR = """<?xml version='1.0' encoding='UTF-8'?>
<Parallels_disk_image Version="1.0">
    <Disk_Parameters>
        <Disk_size>{sectors}</Disk_size>
        <Cylinders>{cylinders}</Cylinders>
        <PhysicalSectorSize>4096</PhysicalSectorSize>
        <LogicSectorSize>512</LogicSectorSize>
        <Heads>16</Heads>
        <Sectors>32</Sectors>
        <Padding>0</Padding>
        <Encryption>
            <Engine>{{00000000-0000-0000-0000-000000000000}}</Engine>
            <Data></Data>
            <Salt></Salt>
        </Encryption>
        <UID>{uid}</UID>
        <Name>{name}</Name>
        <Miscellaneous>
            <CompatLevel>level2</CompatLevel>
            <Bootable>1</Bootable>
            <SuspendState>0</SuspendState>
        </Miscellaneous>
    </Disk_Parameters>
    <StorageData>
        <Storage>
            <Start>0</Start>
            <End>{sectors}</End>
            <Blocksize>{blocksize}</Blocksize>
            <Image>
                <GUID>{guid}</GUID>
                <Type>Compressed</Type>
                <File>{file}</File>
            </Image>
        </Storage>
    </StorageData>
    <Snapshots>
        <TopGUID>{guid}</TopGUID>
        <Shot>
            <GUID>{guid}</GUID>
            <ParentGUID>{{00000000-0000-0000-0000-000000000000}}</ParentGUID>
        </Shot>
    </Snapshots>
</Parallels_disk_image>
"""


BACKEND = ParallelsBackend()
