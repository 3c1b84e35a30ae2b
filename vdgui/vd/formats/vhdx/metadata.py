"""VHDX metadata region ([MS-VHDX] 2.6): the metadata table and items (file parameters,
sizes, page 83 data, parent locator), their in-place updates, relink and turning a child into
a base image."""
from __future__ import annotations

import os
import struct
import uuid as uuidlib

from ...align import align_up, ceil_div
from ...backend import ImageFlags
from ...errors import NotSupported, ParentMismatch
from ...fileio import relative_name
from ...image import Image, ParentHint
from ...sparse import zeroes
from .layout import (
    FILE_PARAMETERS,
    FP_HAS_PARENT,
    FP_LEAVE_BLOCK_ALLOCATED,
    KNOWN_ITEMS,
    LOGICAL_SECTOR,
    MAX_METADATA_ENTRIES,
    MAX_METADATA_ITEM,
    MAX_SIZE,
    MD_IS_REQUIRED,
    METADATA_GUID,
    METADATA_TABLE_SIZE,
    PAGE83,
    PARENT_LOCATOR,
    PAYLOAD_FULLY_PRESENT,
    PAYLOAD_PARTIALLY_PRESENT,
    PHYSICAL_SECTOR,
    SB_NOT_PRESENT,
    SB_PRESENT,
    VHDX_LOCATOR_TYPE,
    VIRTUAL_DISK_SIZE,
    FileParameters,
    MetadataTableEntry,
    MetadataTableHeader,
    MiB,
    ParentLocatorEntry,
    ParentLocatorHeader,
    bat_entry_count,
    guid_bytes,
    guid_from_bytes,
    utf16,
)
from .state import VhdxState


def native_path(loc: str) -> str:
    """A stored Windows-style path as a name chain.py can resolve ('.\\x' -> 'x',
    '\\\\?\\d:\\x' -> 'd:/x'; absolute ones stay absolute and are confined by chain.py)."""
    if loc.startswith("\\\\?\\") and len(loc) > 5 and loc[5] == ":":
        loc = loc[4:]                           # \\?\d:\... -> d:\... (volume paths stay)
    s = loc.replace("\\", "/")
    while s.startswith("./"):
        s = s[2:]
    return s


def locator_for(child: str, parent: str, linkage: uuidlib.UUID) -> dict[str, str]:
    rel = relative_name(child, parent).replace("/", "\\")
    if not rel.startswith("..") and not rel.startswith(".\\"):
        rel = ".\\" + rel
    kv = {
        "parent_linkage": "{" + str(linkage) + "}",     # lowercase with braces (2.6.2.6.3)
        "relative_path": rel,
    }
    if os.name == "nt":     # "\\?\d:\..." form; a POSIX path has no Win32 equivalent
        kv["absolute_win32_path"] = "\\\\?\\" + os.path.abspath(parent)
    return kv


def build_locator(kv: dict[str, str]) -> bytes:
    """MS-VHDX 2.6.2.6: locator header, key/value entries, then the UTF-16 strings."""
    n = len(kv)
    head: bytes = ParentLocatorHeader.build(dict(locator_type=guid_bytes(VHDX_LOCATOR_TYPE),
                                                 reserved=0, key_value_count=n))
    pos = 20 + 12 * n
    entries = b""
    strings = b""
    for k, v in kv.items():
        kb, vb = utf16(k), utf16(v)
        entries += ParentLocatorEntry.build(dict(key_offset=pos, value_offset=pos + len(kb),
                                                 key_length=len(kb), value_length=len(vb)))
        strings += kb + vb
        pos += len(kb) + len(vb)
    return head + entries + strings


class MetadataMixin(VhdxState):
    """Metadata items, the parent locator and relink of a :class:`.image.VhdxImage`."""

    def _read_metadata(self) -> None:
        mo, ml = self.vregions[METADATA_GUID]
        self.md_offset, self.md_length = mo, ml
        table = self.f.read_exact(mo, METADATA_TABLE_SIZE, "metadata table")
        mh = MetadataTableHeader.parse(table)
        if mh.signature != b"metadata":
            raise self._corrupt("bad metadata table signature", field="metadata signature",
                                offset=mo, expected="'metadata'", found=repr(bytes(mh.signature)))
        if mh.entry_count > MAX_METADATA_ENTRIES:
            raise self._corrupt("too many metadata entries", field="EntryCount", offset=mo + 10,
                                expected=f"<= {MAX_METADATA_ENTRIES}", found=mh.entry_count)
        self.md_entries = {}
        for k in range(mh.entry_count):
            where = mo + 32 + 32 * k
            e = MetadataTableEntry.parse(table[32 + 32 * k:64 + 32 * k])
            g = guid_from_bytes(e.item_id)
            if g not in KNOWN_ITEMS:
                if e.flags & MD_IS_REQUIRED:
                    raise NotSupported(f"{self.location}: metadata item {g} (at {where:#x}) is "
                                       "marked required but is unknown to this implementation")
                continue
            if g in self.md_entries:
                raise self._corrupt(f"metadata item '{KNOWN_ITEMS[g]}' listed twice",
                                    field="metadata table", offset=where)
            if e.length and (e.offset < METADATA_TABLE_SIZE or e.length > MAX_METADATA_ITEM
                             or e.offset + e.length > ml):
                raise self._corrupt(f"metadata item '{KNOWN_ITEMS[g]}' lies outside the metadata "
                                    "region", field="Offset/Length", offset=where,
                                    expected=f">= 64 KiB, end <= {ml}",
                                    found=f"{e.offset}/{e.length}")
            self.md_entries[g] = (e.offset, e.length, e.flags, k)

        def item(g: uuidlib.UUID, size: int) -> bytes:
            if g not in self.md_entries:
                raise self._corrupt(f"required metadata item '{KNOWN_ITEMS[g]}' is missing",
                                    field="metadata table", offset=mo)
            off, ln, _fl, _k = self.md_entries[g]
            if ln < size:
                raise self._corrupt(f"metadata item '{KNOWN_ITEMS[g]}' is too short",
                                    field="Length", offset=mo + off, expected=f">= {size}",
                                    found=ln)
            return self.f.read_exact(mo + off, size, f"metadata item '{KNOWN_ITEMS[g]}'")

        fp = FileParameters.parse(item(FILE_PARAMETERS, 8))
        bs = fp.block_size
        if bs < MiB or bs > 256 * MiB or bs & (bs - 1):
            raise self._corrupt("invalid block size", field="BlockSize",
                                offset=mo + self.md_entries[FILE_PARAMETERS][0],
                                expected="a power of two from 1 MiB to 256 MiB", found=bs)
        self.block_size = bs
        self.fp_flags = fp.flags
        self.leave_allocated = bool(fp.flags & FP_LEAVE_BLOCK_ALLOCATED)
        self.has_parent = bool(fp.flags & FP_HAS_PARENT)
        lss = struct.unpack("<I", item(LOGICAL_SECTOR, 4))[0]
        pss = struct.unpack("<I", item(PHYSICAL_SECTOR, 4))[0]
        if lss not in (512, 4096):
            raise self._corrupt("invalid logical sector size", field="LogicalSectorSize",
                                expected="512 or 4096", found=lss)
        if pss not in (512, 4096):
            raise self._corrupt("invalid physical sector size", field="PhysicalSectorSize",
                                expected="512 or 4096", found=pss)
        self.sector_size = lss
        self.physical_sector_size = pss
        size = struct.unpack("<Q", item(VIRTUAL_DISK_SIZE, 8))[0]
        if size == 0 or size > MAX_SIZE or size % lss:
            raise self._corrupt("invalid virtual disk size", field="VirtualDiskSize",
                                expected=f"a non-zero multiple of {lss} up to 64 TiB", found=size)
        self.size = size
        self.uuid = guid_from_bytes(item(PAGE83, 16))
        self.modification_uuid = guid_from_bytes(self.hdr.data_write_guid)
        self.flags = ImageFlags.FIXED if self.leave_allocated else ImageFlags.NONE
        self.parent_locator = {}
        if self.has_parent:
            self.flags |= ImageFlags.DIFF
            self._read_parent_locator()

    def _read_parent_locator(self) -> None:
        mo = self.md_offset
        if PARENT_LOCATOR not in self.md_entries:
            raise self._corrupt("differencing image without a parent locator",
                                field="metadata table", offset=mo)
        off, ln, _fl, _k = self.md_entries[PARENT_LOCATOR]
        if ln < ParentLocatorHeader.sizeof():
            raise self._corrupt("parent locator too short", field="parent locator",
                                offset=mo + off, expected=">= 20 bytes", found=ln)
        raw = self.f.read_exact(mo + off, ln, "parent locator")
        ph = ParentLocatorHeader.parse(raw)
        if guid_from_bytes(ph.locator_type) != VHDX_LOCATOR_TYPE:
            raise NotSupported(f"{self.location}: parent locator type "
                               f"{guid_from_bytes(ph.locator_type)} is not the VHDX locator type "
                               f"{VHDX_LOCATOR_TYPE}")
        n = ph.key_value_count
        if 20 + 12 * n > ln:
            raise self._corrupt("parent locator entry count exceeds the item",
                                field="KeyValueCount", offset=mo + off + 18,
                                expected=f"<= {(ln - 20) // 12}", found=n)
        kv = {}
        for i in range(n):
            e = ParentLocatorEntry.parse(raw[20 + 12 * i:32 + 12 * i])
            for o, length in ((e.key_offset, e.key_length), (e.value_offset, e.value_length)):
                if o + length > ln or length % 2:
                    raise self._corrupt("parent locator key/value lies outside the item",
                                        field="parent locator entry", offset=mo + off + 20 + 12 * i,
                                        expected=f"end <= {ln}, even length", found=f"{o}+{length}")
            key = raw[e.key_offset:e.key_offset + e.key_length].decode("utf-16-le", "replace")
            val = raw[e.value_offset:e.value_offset + e.value_length].decode("utf-16-le", "replace")
            kv[key] = val
        self.parent_locator = kv
        linkage = kv.get("parent_linkage")
        self.parent_modification_uuid = None
        if linkage:
            try:
                self.parent_modification_uuid = uuidlib.UUID(linkage.strip("{}"))
            except ValueError:
                raise self._corrupt("parent_linkage is not a GUID", field="parent_linkage",
                                    offset=mo + off, found=repr(linkage)) from None
        self.parent_linkage2 = None
        l2 = kv.get("parent_linkage2")
        if l2:
            try:
                self.parent_linkage2 = uuidlib.UUID(l2.strip("{}"))
            except ValueError:
                pass
        # MS-VHDX 2.6.2.6.3: paths are tried relative_path, volume_path, absolute_win32_path
        locs = [kv[k] for k in ("relative_path", "volume_path", "absolute_win32_path") if kv.get(k)]
        self.parent_hint = ParentHint(locations=[native_path(loc) for loc in locs], uuid=None,
                                      format="VHDX")

    # -- metadata ------------------------------------------------------------------------
    def info(self) -> dict:
        sub = "differencing" if self.has_parent else "fixed" if self.leave_allocated else "dynamic"
        d = {
            "subformat": sub,
            "creator": self.creator,
            "block_size": self.block_size,
            "logical_sector_size": self.sector_size,
            "physical_sector_size": self.physical_sector_size,
            "chunk_ratio": self.cr,
            "bat_entries": self.bat_count,
            "header_sequence": self.hdr.sequence_number,
            "current_header": self.hdr_slot + 1,
            "file_write_guid": str(guid_from_bytes(self.hdr.file_write_guid)),
            "data_write_guid": str(guid_from_bytes(self.hdr.data_write_guid)),
            "log_offset": self.hdr.log_offset,
            "log_length": self.hdr.log_length,
            "log_replayed": self.log_replayed,
            "log_pending": self.log_pending,
        }
        if self.has_parent:
            d["parent_locator"] = dict(self.parent_locator)
        return d

    def check_parent_link(self, parent: Image) -> None:
        if self.parent_modification_uuid is None:
            return
        mine = self.parent_modification_uuid
        theirs = parent.modification_uuid
        # MS-VHDX 2.6.2.6.3: the parent's DataWriteGuid matches parent_linkage or parent_linkage2
        if theirs is None or theirs not in (mine, getattr(self, "parent_linkage2", None)):
            raise ParentMismatch(f"{self.location}: differencing image does not belong to "
                                 f"{parent.location} (parent_linkage is the parent's "
                                 "DataWriteGuid)",
                                 field="parent_linkage", expected=theirs, found=mine)
        # 2.6.2.6.3: "upon successful open of a chain, update stale path entries"
        if not self.read_only and os.path.isfile(parent.location):
            rel = locator_for(self.location, parent.location, mine)["relative_path"]
            if native_path(self.parent_locator.get("relative_path") or "") != native_path(rel):
                kv = dict(self.parent_locator, relative_path=rel)
                try:
                    self._write_metadata_item(PARENT_LOCATOR, build_locator(kv))
                except NotSupported:
                    return                      # no room: the stale path stays, nothing breaks
                self.parent_locator = kv
                hint = self.parent_hint             # set whenever parent_linkage is
                if hint is not None:
                    hint.locations = [native_path(rel)] + [
                        loc for loc in hint.locations if loc != native_path(rel)]

    def _write_metadata_item(self, g: uuidlib.UUID, payload: bytes) -> None:
        """Replace a metadata item: in place when same length (one aligned write), else in free
        space of the region followed by the table entry update (data before the table)."""
        self.require_writable()
        off, ln, flags, k = self.md_entries[g]
        if len(payload) == ln:
            self.f.pwrite(self.md_offset + off, payload)
            self.f.sync()
            return
        end = METADATA_TABLE_SIZE
        for o, length, _f, _k in self.md_entries.values():
            end = max(end, o + length)
        new_off = align_up(end, 4096) if end else METADATA_TABLE_SIZE
        if new_off + len(payload) > self.md_length:
            raise NotSupported(f"{self.location}: no room left in the metadata region "
                               f"({self.md_length} bytes) for a new {KNOWN_ITEMS[g]}")
        self.f.pwrite(self.md_offset + new_off, payload)
        self.f.sync()
        entry = MetadataTableEntry.build(dict(item_id=guid_bytes(g), offset=new_off,
                                              length=len(payload), flags=flags, reserved=0))
        self.f.pwrite(self.md_offset + 32 + 32 * k, entry)
        self.f.sync()
        self.md_entries[g] = (new_off, len(payload), flags, k)

    def set_uuid(self, value: uuidlib.UUID) -> None:
        self.require_writable()
        self._write_metadata_item(PAGE83, guid_bytes(value))
        self.uuid = value

    def set_modification_uuid(self, value: uuidlib.UUID) -> None:
        self.require_writable()
        self._update_header(data_write_guid=guid_bytes(value))
        self._data_guid_updated = True
        self.modification_uuid = value

    def set_parent_modification_uuid(self, value: uuidlib.UUID) -> None:
        self.require_writable()
        if not self.has_parent:
            self._no_field("a parent link (not a differencing image)")
        kv = dict(self.parent_locator)
        kv["parent_linkage"] = "{" + str(value) + "}"
        self._write_metadata_item(PARENT_LOCATOR, build_locator(kv))
        self.parent_locator = kv
        self.parent_modification_uuid = value

    def relink_refusal(self, parent: Image | None) -> str | None:
        if parent is None:
            return None
        if not self.has_parent:
            return f"{self.location}: not a differencing image"
        if parent.format != "VHDX" or parent.modification_uuid is None:
            return f"{self.location}: a VHDX differencing image needs a VHDX parent"
        return None

    def set_parent(self, parent: Image | None) -> None:
        self.require_writable()
        if parent is None:
            self._make_base()
            return
        if not self.has_parent:
            raise NotSupported(f"{self.location}: not a differencing image")
        if parent.format != "VHDX" or parent.modification_uuid is None:
            raise NotSupported(f"{self.location}: a VHDX differencing image needs a VHDX parent")
        kv = locator_for(self.location, parent.location, parent.modification_uuid)
        self._write_metadata_item(PARENT_LOCATOR, build_locator(kv))
        self.parent_locator = kv
        self.parent_modification_uuid = parent.modification_uuid
        self.parent_linkage2 = None
        locs = [kv[k] for k in ("relative_path", "absolute_win32_path") if k in kv]
        self.parent_hint = ParentHint(locations=[native_path(loc) for loc in locs], format="VHDX")

    def _make_base(self) -> None:
        """Turn this differencing image into a base image (after a merge copied the parent's
        data in). Steps, each complete before the next: partially present blocks become fully
        present (their absent sectors zeroed), sector bitmap entries are dropped, then the
        HasParent flag is cleared (the commit point), then the parent locator entry goes."""
        self._fresh.clear()
        if not self.has_parent:
            return
        ss = self.sector_size
        for blk in range(self.payload_blocks):
            if self._check_state(blk) != PAYLOAD_PARTIALLY_PRESENT:
                continue
            boff = self._block_offset(blk)
            n = min(self.block_size, self.size - blk * self.block_size)
            for o, ln, present in self._partial_runs(blk, 0, align_up(n, ss)):
                if not present:
                    self.f.pwrite(boff + o, zeroes(ln))
            self.f.sync()
            self._set_entry(self._bat_index(blk), PAYLOAD_FULLY_PRESENT, boff)
        self.f.sync()
        for chunk in range(ceil_div(self.payload_blocks, self.cr)):
            idx = self._sb_index(chunk)
            if idx < len(self.bat) and self.bat[idx]:
                st, off = self._entry(idx)
                self._set_entry(idx, SB_NOT_PRESENT, 0)
                if st == SB_PRESENT and off >= MiB:
                    self.f.punch_hole(off, MiB)
        self.f.sync()
        self._sb_cache.clear()
        self._write_metadata_item(FILE_PARAMETERS, FileParameters.build(dict(
            block_size=self.block_size, flags=self.fp_flags & ~FP_HAS_PARENT)))
        self.fp_flags &= ~FP_HAS_PARENT
        self.has_parent = False
        self.flags &= ~ImageFlags.DIFF
        self.parent_hint = None
        self.parent_modification_uuid = None
        self.parent_locator = {}
        self.bat_count = bat_entry_count(self.size, self.block_size, self.sector_size, False)
        # drop the locator's table entry (one write of the table's first 4 KiB)
        if PARENT_LOCATOR in self.md_entries:
            _o, _l, _f, k = self.md_entries.pop(PARENT_LOCATOR)
            table = bytearray(self.f.read_exact(self.md_offset, 4096, "metadata table"))
            count = struct.unpack_from("<H", table, 10)[0]
            entries_end = 32 + 32 * count
            if entries_end <= 4096:
                last = count - 1
                if k != last:
                    table[32 + 32 * k:64 + 32 * k] = table[32 + 32 * last:64 + 32 * last]
                    for g, (o, length, fl, kk) in list(self.md_entries.items()):
                        if kk == last:
                            self.md_entries[g] = (o, length, fl, k)
                table[32 + 32 * last:64 + 32 * last] = bytes(32)
                struct.pack_into("<H", table, 10, count - 1)
                self.f.pwrite(self.md_offset, bytes(table))
                self.f.sync()
