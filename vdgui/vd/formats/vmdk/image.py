"""VmdkImage: one opened VMDK, its descriptor and extents; reads and writes dispatched to the
extents, CID bump, uncleanShutdown, metadata setters and relink. Resize/compact and
check/repair are the mixins of :mod:`.maintenance` and :mod:`.check`."""
from __future__ import annotations

import bisect
import os
import uuid as uuidlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

from ...backend import ImageFlags
from ...errors import CorruptImage, NotSupported, ParentMismatch
from ...fileio import ImageFile, close_all, relative_name
from ...geometry import Geometry
from ...image import Alloc, FillFn, Image, ParentHint
from ...runs import RunList
from ...tables import first_shared
from .descriptor import MAX_DESCRIPTOR_BYTES, NO_PARENT_CID, Descriptor, new_cid
from .extents import Extent
from .opener import ExtentOpener
from .sparse import SparseExtent
from .state import VmdkState
from .stream import StreamWriter

if TYPE_CHECKING:
    from . import VmdkBackend
    from .check import CheckMixin
    from .maintenance import MaintenanceMixin
else:   # resize, compact, discard and check load on first use (most commands use none)
    from ...later import later
    MaintenanceMixin = later(f"{__package__}.maintenance", "MaintenanceMixin",
                             "resizes_in_place resize _grow_extent _grow_sparse compact discard "
                             "close_holes _count_grains _compact_extent _pack_extent")
    CheckMixin = later(f"{__package__}.check", "CheckMixin", "check _check_tail _check_extent")


def _parse_uuid(desc: Descriptor, key: str) -> uuidlib.UUID | None:
    v = desc.get(key)
    if v is None or not v.strip():
        return None
    try:
        u = uuidlib.UUID(v.strip())
    except ValueError:
        raise CorruptImage(f"descriptor key '{key}' is not a UUID", path=desc.path,
                           expected="xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx", found=repr(v)) from None
    return None if u.int == 0 else u


def _geometry(desc: Descriptor, c: str, h: str, s: str) -> Geometry | None:
    vals = [desc.get_int(k) for k in (c, h, s)]
    cyl, heads, secs = vals
    if cyl is None or heads is None or secs is None:
        return None
    if not (0 <= cyl <= 1 << 32 and 0 <= heads <= 255 and 0 <= secs <= 255):
        raise CorruptImage(f"descriptor geometry {c}/{h}/{s} out of range", path=desc.path,
                           expected="C<2^32, H<=255, S<=255", found="/".join(map(str, vals)))
    return Geometry(cyl, heads, secs)


class VmdkImage(MaintenanceMixin, CheckMixin, VmdkState):
    def __init__(self, backend: VmdkBackend, location: str, read_only: bool) -> None:
        super().__init__(backend, location, read_only)
        self.desc_file = None
        self.embedded = None
        self.extents = []
        self._starts = []
        self._files = {}
        self.extent_paths = []
        self.cid = NO_PARENT_CID
        self.parent_cid = NO_PARENT_CID
        self.create_type = ""
        self.info_only = False
        self.allow_unsafe = False
        self._cid_bumped = False
        self._desc_dirty = False
        self._stream_temp = None
        self._closed = False
        self.honor_zeroes = False
        self.punch_zero_grains = False  # set by write_zeroes: zeroed whole grains punched
        self.opener = ExtentOpener(self)       # makes the extent objects

    # -- helpers -----------------------------------------------------------------------------
    def _file(self, path: str, writable: bool) -> ImageFile:
        key = os.path.abspath(path)
        f = self._files.get(key)
        if f is None:
            f = self.backend.extent_file(path, writable)
            self._files[key] = f
        return f

    def _load_metadata(self) -> None:
        d = self.desc
        self.create_type = d.get("createType", "") or ""
        self.cid = self._cid_value("CID", NO_PARENT_CID)
        self.parent_cid = self._cid_value("parentCID", NO_PARENT_CID)
        self.uuid = _parse_uuid(d, "ddb.uuid.image")
        self.modification_uuid = _parse_uuid(d, "ddb.uuid.modification")
        self.parent_uuid = _parse_uuid(d, "ddb.uuid.parent")
        self.parent_modification_uuid = _parse_uuid(d, "ddb.uuid.parentmodification")
        self.pchs = _geometry(d, "ddb.geometry.cylinders", "ddb.geometry.heads",
                              "ddb.geometry.sectors")
        self.lchs = _geometry(d, "ddb.geometry.biosCylinders", "ddb.geometry.biosHeads",
                              "ddb.geometry.biosSectors")
        ct = self.create_type.lower()
        flags = ImageFlags.NONE
        if ct.startswith("twogbmaxextent"):
            flags |= ImageFlags.SPLIT_2G
        if ct in ("monolithicflat", "twogbmaxextentflat", "vmfs", "vmfsthin", "vmfspreallocated",
                  "vmfseagerzeroedthick", "fulldevice", "partitioneddevice"):
            flags |= ImageFlags.FIXED
        if ct == "streamoptimized":
            flags |= ImageFlags.STREAM_OPTIMIZED
        if ct.startswith("vmfs"):
            flags |= ImageFlags.ESX
        if ct in ("fulldevice", "partitioneddevice", "vmfsraw", "vmfsrawdevicemap",
                  "vmfspassthroughrawdevicemap"):
            flags |= ImageFlags.RAWDISK
        if self.parent_cid != NO_PARENT_CID:
            flags |= ImageFlags.DIFF
            hint = d.get("parentFileNameHint")
            self.parent_hint = ParentHint(locations=[hint] if hint else [], uuid=self.parent_uuid,
                                          format="VMDK")
        self.flags = flags

    def _cid_value(self, key: str, default: int) -> int:
        v = self.desc.get(key)
        if v is None:
            return default
        try:
            c = int(v.strip(), 16)
        except ValueError:
            raise CorruptImage(
                f"descriptor key '{key}' is not a hexadecimal CID",
                path=self.location,
                expected="8 hex digits",
                found=repr(v),
            ) from None
        if not 0 <= c <= 0xFFFFFFFF:
            raise CorruptImage(
                f"descriptor key '{key}' out of range",
                path=self.location,
                expected="8 hex digits",
                found=repr(v),
            )
        return c

    def _locate(self, offset: int) -> int:
        return bisect.bisect_right(self._starts, offset) - 1

    def _pieces(self, offset: int, length: int) -> Iterator[tuple[Extent, int, int]]:
        if self.info_only:
            raise NotSupported(
                f"{self.location}: opened for information only (extent files are "
                "not opened); open it normally to read data"
            )
        end = offset + length
        i = self._locate(offset)
        while offset < end:
            ext = self.extents[i]
            rel = offset - ext.vstart
            n = min(end - offset, ext.length - rel)
            if n <= 0:
                i += 1
                continue
            yield ext, rel, n
            offset += n
            i += 1

    # -- data --------------------------------------------------------------------------------
    def block_status(self, offset: int, length: int) -> list[tuple[int, int, Alloc]]:
        out: RunList[Alloc] = RunList()
        for ext, rel, n in self._pieces(offset, length):
            for s, ln, st in ext.block_status(rel, n):
                out.add(s + ext.vstart, ln, st)
        return out.runs

    def read(self, offset: int, length: int) -> bytes:
        parts = [ext.read(rel, n) for ext, rel, n in self._pieces(offset, length)]
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _extent_fill(self, fill: FillFn | None, vstart: int) -> FillFn:
        """``fill`` for the extent at ``vstart`` (offsets inside it; zeroes past the disk's
        end); without one, an extent that needs the content below refuses."""
        def efill(o: int, ln: int) -> bytes:
            if fill is None:
                raise NotSupported(f"{self.location}: writing part of a grain needs the content "
                                   "below it")
            ln2 = max(0, min(ln, self.size - (vstart + o)))
            got = fill(vstart + o, ln2) if ln2 else b""
            return got + bytes(ln - len(got))
        return efill

    def write(self, offset: int, data: bytes, fill: FillFn | None) -> None:
        self.require_writable()
        if not self._xlinks_checked and self._stream_temp is None:
            self._find_cross_links()
        self._refuse_cross_linked()
        if not self._cid_bumped and self._stream_temp is None:
            for ext, rel, _n in self._pieces(offset, len(data)):
                if not ext.writable:
                    ext.write(rel, b"", self._extent_fill(fill, ext.vstart), self)  # refuses
            self._cid_bumped = True
            if not self.keep_link_identity:  # a merge keeps it: it relinks the children itself
                self.cid = new_cid(self.cid)
                self.desc.set("CID", f"{self.cid:08x}")
                self._write_descriptor()  # before the data: children see the change
            self._mark_unclean(True)
        mv = memoryview(data)
        pos = 0
        for ext, rel, n in self._pieces(offset, len(data)):
            ext.write(rel, mv[pos : pos + n], self._extent_fill(fill, ext.vstart), self)
            pos += n

    def write_zeroes(self, offset: int, length: int, fill: FillFn) -> None:
        """As write of zeroes with markers (zeroed-grain entries where the extent has them),
        and whole allocated grains of sparse extents punched instead of written."""
        self.punch_zero_grains = True
        try:
            super().write_zeroes(offset, length, fill)
        finally:
            self.punch_zero_grains = False

    def flush(self) -> None:
        if self.read_only or self._closed:
            return
        for ext in self.extents:
            ext.flush()
        if self._desc_dirty:
            self._write_descriptor()

    def close(self) -> None:
        if self._closed:
            return
        stream = self._stream_temp
        try:
            if not self.read_only:
                if stream is not None:
                    for ext in self.extents:
                        if isinstance(ext, StreamWriter):
                            ext.finish()
                    stream.commit()
                    self._stream_temp = None
                self.flush()
                self._mark_unclean(False)  # where this session set it
        finally:
            self._closed = True
            closers = [f.close for f in self._files.values()]
            if self.desc_file is not None:
                closers.append(self.desc_file.close)
            if self._stream_temp is not None:
                closers.append(self._stream_temp.abandon)
            elif stream is not None:
                closers.append(stream.close)
            close_all(closers)

    _xlinks_checked = False

    def _find_cross_links(self) -> None:
        """Once, before the first write: two grain table entries of one sparse extent naming
        the same grain (check: "cross-linked") refuse writes."""
        self._xlinks_checked = True
        for ext in self.extents:
            if not isinstance(ext, SparseExtent) or not ext.writable:
                continue
            refs: list[int] = []
            where: list[int] = []
            for t in range(ext.n_gts):
                try:
                    gt = ext._gt(t)
                except CorruptImage:
                    continue  # refused where it is used
                if gt is None:
                    continue
                for i, v in enumerate(gt):
                    if v > 1:  # 0 unallocated, 1 zero grain
                        refs.append(v)
                        where.append(t * ext.gtes + i)
            hit = first_shared(refs)
            if hit is not None:
                sec, a, b = hit
                self.write_refusal = (
                    f"{ext.f.path}: grains {where[a]} and {where[b]} both point to sector {sec}"
                )
                return

    def _mark_unclean(self, on: bool) -> None:
        """VMware's uncleanShutdown byte: set in every writable hosted sparse extent while this
        session writes, cleared after the final flush (a crash leaves it set)."""
        for ext in self.extents:
            if isinstance(ext, SparseExtent) and ext.writable and ext.header is not None:
                if on:
                    ext.begin_update()
                else:
                    ext.end_update()

    def _write_descriptor(self) -> None:
        f = self.desc_file
        if f is None:       # every open and create sets it
            raise NotSupported(f"{self.location}: the descriptor has no file to be written to")
        data = self.desc.to_bytes()
        if self.embedded is not None:
            off, cap = self.embedded
            if len(data) > cap:
                raise NotSupported(
                    f"{self.location}: the descriptor ({len(data)} bytes) no longer "
                    f"fits the embedded descriptor area ({cap} bytes)"
                )
            f.pwrite(off, data.ljust(cap, b"\0"))
        else:
            if len(data) > MAX_DESCRIPTOR_BYTES:
                raise NotSupported(f"{self.location}: descriptor would exceed 1 MiB")
            # one write covers the old text whole (a shorter descriptor is padded with blank
            # lines), so a stop before the truncate leaves the new descriptor, never new text
            # followed by the tail of the old one
            pad = max(0, f.size() - len(data))
            f.pwrite(0, data + b"\n" * pad)
            f.truncate(len(data))
        f.sync()
        self._desc_dirty = False

    # -- metadata ----------------------------------------------------------------------------
    def files(self) -> list[str]:
        out = [os.path.abspath(self.location)]
        raw = bool(self.flags & ImageFlags.RAWDISK)
        for line, p in zip(self.desc.extents, self.extent_paths):
            # a raw disk's drives (absolute names) are not part of the image: never moved or
            # deleted with it; its partition-table copy (NAME-pt.vmdk, relative) is
            if raw and (line.filename is None or os.path.isabs(line.filename)):
                continue
            if p and os.path.abspath(p) not in out:
                out.append(os.path.abspath(p))
        return out

    def info(self) -> dict:
        d: dict[str, object] = {
            "create_type": self.create_type,
            "cid": f"{self.cid:08x}",
            "parent_cid": f"{self.parent_cid:08x}",
            "adapter_type": self.desc.get("ddb.adapterType"),
            "virtual_hw_version": self.desc.get("ddb.virtualHWVersion"),
            "descriptor": "embedded" if self.embedded is not None else "separate",
            "extents": [
                {
                    "access": e.access,
                    "sectors": e.sectors,
                    "type": e.type,
                    "file": e.filename,
                    "offset": e.offset,
                }
                for e in self.desc.extents
            ],
        }
        sparse = [e for e in self.extents if isinstance(e, SparseExtent)]
        if sparse:
            e = sparse[0]
            d["grain_size"] = e.grain
            d["sparse_version"] = e.header["version"] if e.header else None
            d["compressed"] = e.compressed
            d["zeroed_grain"] = e.zero_grain
            d["unclean_shutdown"] = bool(e.header and e.header["unclean_shutdown"])
        if self.parent_hint and self.parent_hint.locations:
            d["parent_file_name_hint"] = self.parent_hint.locations[0]
        return d

    def check_parent_link(self, parent: Image) -> None:
        if isinstance(parent, VmdkImage) and self.parent_cid != parent.cid:
            raise ParentMismatch(
                f"{self.location}: differencing image does not belong to "
                f"{parent.location} (content ID link broken)",
                field="parentCID",
                expected=f"{parent.cid:08x}",
                found=f"{self.parent_cid:08x}",
            )
        super().check_parent_link(parent)

    def _set_ddb(self, key: str, value: str) -> None:
        self.require_writable()
        self.desc.set(key, value)
        self._write_descriptor()

    def set_uuid(self, value: uuidlib.UUID) -> None:
        self._set_ddb("ddb.uuid.image", str(value))
        self.uuid = value

    def set_modification_uuid(self, value: uuidlib.UUID) -> None:
        self._set_ddb("ddb.uuid.modification", str(value))
        self.modification_uuid = value

    def set_parent_uuid(self, value: uuidlib.UUID) -> None:
        self._set_ddb("ddb.uuid.parent", str(value))
        self.parent_uuid = value
        if self.parent_hint:
            self.parent_hint.uuid = value

    def set_parent_modification_uuid(self, value: uuidlib.UUID) -> None:
        self._set_ddb("ddb.uuid.parentmodification", str(value))
        self.parent_modification_uuid = value

    def set_pchs(self, value: Geometry) -> None:
        self.require_writable()
        for k, v in zip(("cylinders", "heads", "sectors"), value):
            self.desc.set(f"ddb.geometry.{k}", str(v))
        self._write_descriptor()
        self.pchs = Geometry(*value)

    def set_lchs(self, value: Geometry) -> None:
        self.require_writable()
        for k, v in zip(("biosCylinders", "biosHeads", "biosSectors"), value):
            self.desc.set(f"ddb.geometry.{k}", str(v))
        self._write_descriptor()
        self.lchs = Geometry(*value)

    # -- RELINK --------------------------------------------------------------------------------
    def relink_refusal(self, parent: Image | None) -> str | None:
        if parent is not None and not isinstance(parent, VmdkImage):
            return (
                f"{self.location}: a VMDK differencing image can only have a VMDK parent, "
                f"not {parent.format}"
            )
        return None

    def set_parent(self, parent: Image | None) -> None:
        self.require_writable()
        d = self.desc
        if parent is None:
            d.set("parentCID", f"{NO_PARENT_CID:08x}")
            d.remove("parentFileNameHint")
            d.set("ddb.uuid.parent", str(uuidlib.UUID(int=0)))
            d.set("ddb.uuid.parentmodification", str(uuidlib.UUID(int=0)))
            self.parent_cid = NO_PARENT_CID
            self.parent_uuid = self.parent_modification_uuid = None
            self.parent_hint = None
            self.flags &= ~ImageFlags.DIFF
        else:
            if not isinstance(parent, VmdkImage):
                raise NotSupported(
                    f"{self.location}: a VMDK differencing image can only have a "
                    f"VMDK parent, not {parent.format}"
                )
            hint = relative_name(self.location, parent.location)
            d.set("parentCID", f"{parent.cid:08x}")
            d.set("parentFileNameHint", hint, quoted=True)
            if parent.uuid:
                d.set("ddb.uuid.parent", str(parent.uuid))
            if parent.modification_uuid:
                d.set("ddb.uuid.parentmodification", str(parent.modification_uuid))
            self.parent_cid = parent.cid
            self.parent_uuid = parent.uuid
            self.parent_modification_uuid = parent.modification_uuid
            self.parent_hint = ParentHint(locations=[hint], uuid=parent.uuid, format="VMDK")
            self.flags |= ImageFlags.DIFF
        self._write_descriptor()
