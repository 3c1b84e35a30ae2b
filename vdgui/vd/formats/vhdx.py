"""VHDX backend: Microsoft's Virtual Hard Disk v2 (Hyper-V), read and write.

Specification: [MS-VHDX] "Virtual Hard Disk v2 (VHDX) File Format" v1.0 (Microsoft Open
Specifications). Facts used here (section numbers of MS-VHDX):

* 2.1 layout: file type identifier at 0, headers at 64 KiB and 128 KiB (4 KiB each, the valid one
  with the highest sequence number is current), region tables at 192 KiB and 256 KiB (64 KiB each).
  Every object past the first MiB (log, metadata region, BAT, payload and sector-bitmap blocks) is
  1 MiB aligned.
* 2.2 checksums: CRC-32C over the whole structure with the checksum field zeroed.
* 2.3 log: circular, 4 KiB sectors; entries ("loge") hold zero ("zero") and data ("desc")
  descriptors, data sectors ("data") carry 4084 bytes between the descriptor's 8 leading and
  4 trailing bytes. The active sequence (highest sequence number, consecutive numbers, header's
  LogGuid) is replayed from the head entry's tail before anything else is read.
* 2.4 region table: BAT and metadata regions (unknown regions marked required: refuse).
* 2.5 BAT: 64-bit entries, state in bits 0-2, file offset in MiB in bits 20-63; a sector bitmap
  entry follows every ``chunk ratio`` payload entries, chunk ratio = 2^23 * logical sector size /
  block size.
* 2.6 metadata region: table ("metadata", at most 2047 entries) and items: file parameters
  (block size 1..256 MiB power of two, LeaveBlockAllocated, HasParent), virtual disk size, page 83
  data (used as this image's UUID), logical and physical sector size (512 or 4096), parent locator
  (type B04AEFB7-..., UTF-16 keys parent_linkage, relative_path, volume_path, absolute_win32_path).

Writing: a new payload block is appended at the 1 MiB aligned end of the file; its data is written
and flushed before its BAT entry. In a differencing image a write into a block that is not present
marks the written sectors in the chunk's sector bitmap (PARTIALLY_PRESENT), so the parent's data is
never copied. BAT, bitmap and metadata updates are written in place, each a single aligned write
inside one 4 KiB sector and ordered data -> bitmap -> BAT, so an interruption leaves a readable
image. (MS-VHDX 2.3 asks for metadata updates to go through the log; this implementation replays
logs written by others but orders its own single-sector updates instead, as qemu's readers and
Hyper-V only need the result to be consistent.) A BAT that outgrows its region on resize is copied
to the end of the file before region table 1, then 2, are rewritten. Header updates alternate
between the two header copies with increasing sequence numbers.
The DataWriteGuid changes before the first data write of a session, the FileWriteGuid on every
read-write open (2.2.2). A child's parent_linkage is its parent's DataWriteGuid (exposed as
modification_uuid / parent_modification_uuid); page 83 data is the image UUID.

Operations: create (dynamic, fixed, differencing; 512 or 4096-byte logical sectors), write,
discard, resize (grow; the BAT moves when it outgrows its region), compact (in a copy, by
ops.compact), check/repair (a pending log, damaged header copies, BAT entries with bad states or
outside the file), relink (rewrite the parent locator; None turns the child into a base image).
A read-only open of an image whose log holds changes raises LogReplayNeeded (a CorruptImage);
any read-write open replays it, as ``qemu-img check -r all`` does.

Limits (parser safety): region table entries <= 2047, metadata entries <= 2047, metadata items
<= 1 MiB, log <= 64 MiB, virtual size <= 64 TiB, BAT region must lie inside the file.
"""
from __future__ import annotations

import os
import struct
import uuid as uuidlib
from array import array

from construct import Bytes, Int16ul, Int32ul, Int64ul, Struct

from ..align import align_up, ceil_div
from ..backend import (Backend, Cap, CreateParams, FileExtension, ImageFlags, OpenFlags,
                       Operation, ProbeInput, too_large)
from ..config import ConfigKey, KeyFlag, ValueType, parse_config
from ..crc32c import crc32c
from ..errors import (CorruptImage, InvalidArgument, NotSupported, ParentMismatch, ReadOnlyImage)
from ..compaction import holes_between, move_blocks, overlapping, plan_moves
from ..fileimage import FileImage
from ..fileio import ImageFile, relative_name
from ..image import Alloc, CheckReport, ParentHint, Problem, ProblemCode
from ..runs import RunList
from ..space import preallocate, require_space
from ..sparse import is_zero, nonzero_runs, split_blocks, zeroes
from ..tables import BlockTable, read_table, table_to_bytes

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB

HEADER_OFFSETS = (64 * KiB, 128 * KiB)
HEADER_SIZE = 4 * KiB
REGION_OFFSETS = (192 * KiB, 256 * KiB)
REGION_SIZE = 64 * KiB
MAX_REGION_ENTRIES = 2047
MAX_METADATA_ENTRIES = 2047
METADATA_TABLE_SIZE = 64 * KiB
MAX_METADATA_ITEM = 1 * MiB
MAX_LOG = 64 * MiB
MAX_SIZE = 64 * TiB
# the largest file a log replay may leave: the largest virtual size plus room for its metadata
# (BAT, sector bitmaps, regions, log); a LastFileOffset beyond is damage, not a file to grow to
MAX_FILE = MAX_SIZE + MAX_SIZE // 8
LOG_SECTOR = 4 * KiB

# -- GUIDs (MS-VHDX 2.4.1, 2.6.2) ------------------------------------------------------------
BAT_GUID = uuidlib.UUID("2DC27766-F623-4200-9D64-115E9BFD4A08")
METADATA_GUID = uuidlib.UUID("8B7CA206-4790-4B9A-B8FE-575F050F886E")
FILE_PARAMETERS = uuidlib.UUID("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
VIRTUAL_DISK_SIZE = uuidlib.UUID("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
PAGE83 = uuidlib.UUID("BECA12AB-B2E6-4523-93EF-C309E000C746")
LOGICAL_SECTOR = uuidlib.UUID("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
PHYSICAL_SECTOR = uuidlib.UUID("CDA348C7-445D-4471-9CC9-E9885251C556")
PARENT_LOCATOR = uuidlib.UUID("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")
VHDX_LOCATOR_TYPE = uuidlib.UUID("B04AEFB7-D19E-4A81-B789-25B8E9445913")
ZERO_GUID = bytes(16)

KNOWN_ITEMS = {FILE_PARAMETERS: "file parameters", VIRTUAL_DISK_SIZE: "virtual disk size",
               PAGE83: "page 83 data", LOGICAL_SECTOR: "logical sector size",
               PHYSICAL_SECTOR: "physical sector size", PARENT_LOCATOR: "parent locator"}

# metadata table entry flags (2.6.1.2)
MD_IS_USER = 1
MD_IS_VIRTUAL_DISK = 2
MD_IS_REQUIRED = 4

# file parameters flags (2.6.2.1)
FP_LEAVE_BLOCK_ALLOCATED = 1
FP_HAS_PARENT = 2

# BAT entry states (2.5.1.1, 2.5.1.2)
PAYLOAD_NOT_PRESENT = 0
PAYLOAD_UNDEFINED = 1
PAYLOAD_ZERO = 2
PAYLOAD_UNMAPPED = 3
PAYLOAD_FULLY_PRESENT = 6
PAYLOAD_PARTIALLY_PRESENT = 7
SB_NOT_PRESENT = 0
SB_PRESENT = 6
STATE_NAMES = {0: "NOT_PRESENT", 1: "UNDEFINED", 2: "ZERO", 3: "UNMAPPED", 6: "FULLY_PRESENT",
               7: "PARTIALLY_PRESENT"}
_STATE_MASK = 7
_OFFSET_SHIFT = 20

# -- on-disk structures ------------------------------------------------------------------------
# MS-VHDX 2.2.1 File Type Identifier (the first 64 KiB; only the first 520 bytes are defined)
FileIdentifier = Struct(
    "signature" / Bytes(8),          # "vhdxfile"
    "creator" / Bytes(512),          # UTF-16LE, NUL padded
)
# MS-VHDX 2.2.2 Header (4 KiB)
Header = Struct(
    "signature" / Bytes(4),          # "head"
    "checksum" / Int32ul,
    "sequence_number" / Int64ul,
    "file_write_guid" / Bytes(16),
    "data_write_guid" / Bytes(16),
    "log_guid" / Bytes(16),
    "log_version" / Int16ul,         # 0
    "version" / Int16ul,             # 1
    "log_length" / Int32ul,
    "log_offset" / Int64ul,
    "reserved" / Bytes(4016),
)
# MS-VHDX 2.2.3 Region Table Header and 2.2.3.1 Region Table Entry
RegionTableHeader = Struct(
    "signature" / Bytes(4),          # "regi"
    "checksum" / Int32ul,
    "entry_count" / Int32ul,         # <= 2047
    "reserved" / Int32ul,
)
RegionTableEntry = Struct(
    "guid" / Bytes(16),
    "file_offset" / Int64ul,
    "length" / Int32ul,
    "required" / Int32ul,            # bit 0
)
# MS-VHDX 2.3.1.1 Entry Header, 2.3.1.2 Zero Descriptor, 2.3.1.3 Data Descriptor,
# 2.3.1.4 Data Sector
LogEntryHeader = Struct(
    "signature" / Bytes(4),          # "loge"
    "checksum" / Int32ul,
    "entry_length" / Int32ul,
    "tail" / Int32ul,
    "sequence_number" / Int64ul,
    "descriptor_count" / Int32ul,
    "reserved" / Int32ul,
    "log_guid" / Bytes(16),
    "flushed_file_offset" / Int64ul,
    "last_file_offset" / Int64ul,
)
ZeroDescriptor = Struct(
    "signature" / Bytes(4),          # "zero"
    "reserved" / Int32ul,
    "zero_length" / Int64ul,
    "file_offset" / Int64ul,
    "sequence_number" / Int64ul,
)
DataDescriptor = Struct(
    "signature" / Bytes(4),          # "desc"
    "trailing_bytes" / Bytes(4),
    "leading_bytes" / Bytes(8),
    "file_offset" / Int64ul,
    "sequence_number" / Int64ul,
)
DataSector = Struct(
    "signature" / Bytes(4),          # "data"
    "sequence_high" / Int32ul,
    "data" / Bytes(4084),
    "sequence_low" / Int32ul,
)
# MS-VHDX 2.6.1.1 Metadata Table Header and 2.6.1.2 Metadata Table Entry
MetadataTableHeader = Struct(
    "signature" / Bytes(8),          # "metadata"
    "reserved" / Int16ul,
    "entry_count" / Int16ul,         # <= 2047
    "reserved2" / Bytes(20),
)
MetadataTableEntry = Struct(
    "item_id" / Bytes(16),
    "offset" / Int32ul,              # from the start of the metadata region, >= 64 KiB
    "length" / Int32ul,
    "flags" / Int32ul,               # IsUser, IsVirtualDisk, IsRequired
    "reserved" / Int32ul,
)
# MS-VHDX 2.6.2.1 File Parameters
FileParameters = Struct(
    "block_size" / Int32ul,
    "flags" / Int32ul,
)
# MS-VHDX 2.6.2.6 Parent Locator header and 2.6.2.6.1 key/value entry
ParentLocatorHeader = Struct(
    "locator_type" / Bytes(16),
    "reserved" / Int16ul,
    "key_value_count" / Int16ul,
)
ParentLocatorEntry = Struct(
    "key_offset" / Int32ul,          # from the start of the locator item
    "value_offset" / Int32ul,
    "key_length" / Int16ul,          # bytes
    "value_length" / Int16ul,
)

STRUCTS = {"FileIdentifier": FileIdentifier, "Header": Header,
           "RegionTableHeader": RegionTableHeader, "RegionTableEntry": RegionTableEntry,
           "LogEntryHeader": LogEntryHeader, "ZeroDescriptor": ZeroDescriptor,
           "DataDescriptor": DataDescriptor, "DataSector": DataSector,
           "MetadataTableHeader": MetadataTableHeader, "MetadataTableEntry": MetadataTableEntry,
           "FileParameters": FileParameters, "ParentLocatorHeader": ParentLocatorHeader,
           "ParentLocatorEntry": ParentLocatorEntry}


def _guid(b: bytes) -> uuidlib.UUID:
    return uuidlib.UUID(bytes_le=bytes(b))


def _gbytes(u: uuidlib.UUID) -> bytes:
    return u.bytes_le


def _with_checksum(buf: bytearray, at: int = 4) -> bytearray:
    struct.pack_into("<I", buf, at, 0)
    struct.pack_into("<I", buf, at, crc32c(buf))
    return buf


def _checksum_ok(buf, at: int = 4) -> bool:
    stored = struct.unpack_from("<I", buf, at)[0]
    b = bytearray(buf)
    struct.pack_into("<I", b, at, 0)
    return crc32c(b) == stored


def chunk_ratio(logical_sector: int, block_size: int) -> int:
    """MS-VHDX 2.5: payload blocks per sector bitmap block."""
    return (1 << 23) * logical_sector // block_size


def bat_entry_count(size: int, block_size: int, logical_sector: int, diff: bool) -> int:
    """MS-VHDX 2.5: BAT entries for a disk (payload entries with interleaved bitmap entries)."""
    cr = chunk_ratio(logical_sector, block_size)
    payload = ceil_div(size, block_size)
    if diff:
        return ceil_div(payload, cr) * (cr + 1)
    return payload + (payload - 1) // cr if payload else 0




def _utf16(s: str) -> bytes:
    return s.encode("utf-16-le")


def _default_block_size(size: int, diff: bool) -> int:
    if diff:
        return 2 * MiB
    return 32 * MiB if size > 100 * GiB else 8 * MiB


class LogReplayNeeded(CorruptImage):
    """A read-only open of a VHDX whose log still holds changes (reading it would be stale)."""
    code = "LOG_REPLAY_NEEDED"


# -- the image -------------------------------------------------------------------------------
# vdgui keeps the BAT in memory (8 bytes an entry): images it creates or grows have at most 2**22
# payload blocks (a 32 MiB BAT; a convert holds two, with copies: < 300 MiB): the spec's 64 TiB
# with blocks of 16 MiB or more (the default for large disks is 32 MiB), 4 TiB with 1 MiB blocks
MAX_NEW_BLOCKS = 1 << 22


def vhdx_max_size(block_size: int) -> int:
    return min(MAX_SIZE, MAX_NEW_BLOCKS * block_size)


def _limit_reason(block_size: int) -> str:
    if MAX_NEW_BLOCKS * block_size >= MAX_SIZE:
        return " (the VHDX specification's limit)"
    return (f" with {block_size}-byte blocks (vdgui keeps the BAT in memory, {MAX_NEW_BLOCKS} "
            "blocks at most; a larger BlockSize allows up to 64 TiB)")


class VhdxImage(FileImage):
    @property
    def max_size(self) -> int:
        return vhdx_max_size(self.block_size)

    def __init__(self, backend, location: str, f: ImageFile, flags: OpenFlags):
        super().__init__(backend, location, f, flags.read_only)
        self.open_flags = flags
        self._data_guid_updated = False
        self._sb_cache: dict[int, bytearray] = {}
        # blocks of a base image allocated in space added to the file by this open: BAT index
        # -> (BAT entry, offset in the block from which on nothing was written since; it reads
        # zeroes there)
        self._fresh: dict[int, tuple[int, int]] = {}
        self.log_replayed = False
        self.log_pending = False
        try:
            self._load()
        except BaseException:
            f.close()
            raise

    # -- loading -----------------------------------------------------------------------
    def _load(self) -> None:
        f = self.f
        self.file_len = f.size()
        if self.file_len < 1 * MiB:
            raise self._corrupt("file too small for a VHDX header section", field="file size",
                                expected=">= 1 MiB", found=self.file_len)
        ident = FileIdentifier.parse(f.read_exact(0, FileIdentifier.sizeof(), "file identifier"))
        if ident.signature != b"vhdxfile":
            raise self._corrupt("not a VHDX file", field="signature", offset=0,
                                expected="'vhdxfile'", found=repr(ident.signature))
        self.creator = ident.creator.decode("utf-16-le", "replace").split("\x00")[0]
        self._read_headers()
        hdr = self.hdr
        seq = _active_sequence(self) if hdr.log_guid != ZERO_GUID else []
        if hdr.log_guid != ZERO_GUID and not seq:
            # a log GUID without a valid sequence: nothing to replay (qemu opens these too);
            # a read-write open clears the GUID
            if not self.read_only:
                self._update_header(log_guid=ZERO_GUID)
        elif seq:
            if self.open_flags & OpenFlags.INFO:
                self.log_pending = True
            elif self.read_only:
                raise LogReplayNeeded(
                    "the VHDX log holds changes that need to be replayed; open the image "
                    "read-write once (any read-write open, e.g. 'vdgui-img check --repair', "
                    "replays it)", path=self.location, field="LogGuid",
                    offset=HEADER_OFFSETS[self.hdr_slot] + 48)
            else:
                self._replay_log(seq)
        self._read_regions()
        self._read_metadata()
        self._read_bat()
        self.pchs = None
        self.lchs = None
        if not self.read_only:
            # MS-VHDX 2.2.2: FileWriteGuid changes on the first open for writing
            self._update_header(file_write_guid=uuidlib.uuid4().bytes_le)

    def _replay_log(self, seq) -> None:
        """Replay the active log sequence, then clear the header's LogGuid (MS-VHDX 2.3.3)."""
        _replay(self, seq)
        self._update_header(log_guid=ZERO_GUID)
        self.log_replayed = True

    def _read_headers(self) -> None:
        valid = []
        self.header_problems = []
        for slot, off in enumerate(HEADER_OFFSETS):
            raw = self.f.pread(off, HEADER_SIZE)
            if len(raw) != HEADER_SIZE:
                self.header_problems.append(f"header {slot + 1} at {off:#x} is truncated")
                continue
            h = Header.parse(raw)
            if h.signature != b"head":
                self.header_problems.append(f"header {slot + 1} at {off:#x}: bad signature "
                                            f"{bytes(h.signature)!r}")
                continue
            if not _checksum_ok(raw):
                self.header_problems.append(f"header {slot + 1} at {off:#x}: checksum mismatch")
                continue
            if h.version != 1:
                self.header_problems.append(f"header {slot + 1} at {off:#x}: version {h.version}")
                continue
            valid.append((h.sequence_number, slot, h))
        if not valid:
            raise self._corrupt("no valid VHDX header (" + "; ".join(self.header_problems) + ")",
                                field="header", offset=HEADER_OFFSETS[0])
        valid.sort(key=lambda t: (t[0], t[1]))
        _seq, self.hdr_slot, self.hdr = valid[-1]
        h = self.hdr
        if h.log_version != 0 and h.log_guid != ZERO_GUID:   # 2.2.2: only matters with a log
            raise NotSupported(f"{self.location}: VHDX log version {h.log_version} is not "
                               "supported (expected 0)")
        if h.log_length % MiB or h.log_offset % MiB or (h.log_length and h.log_offset < MiB):
            raise self._corrupt("log location is not 1 MiB aligned", field="LogOffset/LogLength",
                                offset=HEADER_OFFSETS[self.hdr_slot],
                                expected="multiples of 1 MiB past the first MiB",
                                found=f"{h.log_offset:#x}/{h.log_length:#x}")

    def _update_header(self, **changes) -> None:
        """Write a new current header (both copies, alternating, sequence number + 1 each)."""
        if self.read_only:
            raise ReadOnlyImage(f"{self.location}: image is opened read-only")
        for _ in range(2):
            h = dict(self.hdr)
            h.pop("_io", None)
            h.update(changes)
            h["sequence_number"] = self.hdr.sequence_number + 1
            h["checksum"] = 0
            raw = _with_checksum(bytearray(Header.build(h)))
            slot = 1 - self.hdr_slot
            self.f.pwrite(HEADER_OFFSETS[slot], raw)
            self.f.sync()
            self.hdr = Header.parse(bytes(raw))
            self.hdr_slot = slot

    def _read_regions(self) -> None:
        problems = []
        for i, off in enumerate(REGION_OFFSETS):
            raw = self.f.pread(off, REGION_SIZE)
            if len(raw) != REGION_SIZE:
                problems.append(f"region table {i + 1} truncated")
                continue
            rh = RegionTableHeader.parse(raw)
            if rh.signature != b"regi":
                problems.append(f"region table {i + 1}: bad signature {bytes(rh.signature)!r}")
                continue
            if not _checksum_ok(raw):
                problems.append(f"region table {i + 1}: checksum mismatch")
                continue
            if rh.entry_count > MAX_REGION_ENTRIES:
                raise self._corrupt("too many region table entries", field="EntryCount",
                                    offset=off + 8, expected=f"<= {MAX_REGION_ENTRIES}",
                                    found=rh.entry_count)
            self.region_raw = raw
            self.region_table = i
            break
        else:
            raise self._corrupt("no valid region table (" + "; ".join(problems) + ")",
                                field="region table", offset=REGION_OFFSETS[0])
        self.vregions = {}
        self.region_entries = []
        for k in range(rh.entry_count):
            e = RegionTableEntry.parse(raw[16 + 32 * k:48 + 32 * k])
            g = _guid(e.guid)
            where = REGION_OFFSETS[self.region_table] + 16 + 32 * k
            self.region_entries.append(e)
            if g not in (BAT_GUID, METADATA_GUID):
                if e.required & 1:
                    raise NotSupported(f"{self.location}: region {g} at {where:#x} is marked "
                                       "required but is unknown to this implementation")
                continue
            name = "BAT" if g == BAT_GUID else "metadata"
            if g in self.vregions:
                raise self._corrupt(f"{name} region listed twice", field="region table",
                                    offset=where)
            if e.file_offset % MiB or e.file_offset < MiB or e.length % MiB or not e.length:
                raise self._corrupt(f"{name} region is not 1 MiB aligned",
                                    field="FileOffset/Length",
                                    offset=where, expected="non-zero multiples of 1 MiB past 1 MiB",
                                    found=f"{e.file_offset:#x}/{e.length:#x}")
            if e.file_offset + e.length > self.file_len:
                raise self._corrupt(f"{name} region lies past the end of the file",
                                    field="FileOffset", offset=where,
                                    expected=f"end <= {self.file_len}",
                                    found=e.file_offset + e.length)
            self.vregions[g] = (e.file_offset, e.length)
        for g, name in ((BAT_GUID, "BAT"), (METADATA_GUID, "metadata")):
            if g not in self.vregions:
                raise self._corrupt(f"the region table has no {name} region", field="region table",
                                    offset=REGION_OFFSETS[self.region_table])

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
        self.md_entries: dict[uuidlib.UUID, tuple[int, int, int, int]] = {}
        for k in range(mh.entry_count):
            where = mo + 32 + 32 * k
            e = MetadataTableEntry.parse(table[32 + 32 * k:64 + 32 * k])
            g = _guid(e.item_id)
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

        def item(g, size):
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
        self.uuid = _guid(item(PAGE83, 16))
        self.modification_uuid = _guid(self.hdr.data_write_guid)
        self.flags = ImageFlags.FIXED if self.leave_allocated else ImageFlags.NONE
        self.parent_locator: dict[str, str] = {}
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
        if _guid(ph.locator_type) != VHDX_LOCATOR_TYPE:
            raise NotSupported(f"{self.location}: parent locator type {_guid(ph.locator_type)} is "
                               f"not the VHDX locator type {VHDX_LOCATOR_TYPE}")
        n = ph.key_value_count
        if 20 + 12 * n > ln:
            raise self._corrupt("parent locator entry count exceeds the item",
                                field="KeyValueCount", offset=mo + off + 18,
                                expected=f"<= {(ln - 20) // 12}", found=n)
        kv = {}
        for i in range(n):
            e = ParentLocatorEntry.parse(raw[20 + 12 * i:32 + 12 * i])
            for o, l in ((e.key_offset, e.key_length), (e.value_offset, e.value_length)):
                if o + l > ln or l % 2:
                    raise self._corrupt("parent locator key/value lies outside the item",
                                        field="parent locator entry", offset=mo + off + 20 + 12 * i,
                                        expected=f"end <= {ln}, even length", found=f"{o}+{l}")
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
        self.parent_hint = ParentHint(locations=[_native(l) for l in locs], uuid=None,
                                      format="VHDX")

    def _read_bat(self) -> None:
        bo, bl = self.vregions[BAT_GUID]
        self.bat_offset, self.bat_length = bo, bl
        self.cr = chunk_ratio(self.sector_size, self.block_size)
        self.payload_blocks = ceil_div(self.size, self.block_size)
        self.bat_count = bat_entry_count(self.size, self.block_size, self.sector_size,
                                         self.has_parent)
        if self.bat_count * 8 > bl:
            raise self._corrupt("BAT region too small for the disk", field="BAT length",
                                offset=REGION_OFFSETS[self.region_table],
                                expected=f">= {self.bat_count * 8} bytes", found=bl)
        self._bat = None
        if not self.open_flags & OpenFlags.INFO:      # INFO opens (chain walks) skip the BAT
            self._load_bat()
        end = max(MiB, self.file_len)
        for off, ln in self.vregions.values():
            end = max(end, off + ln)
        if self.hdr.log_length:
            end = max(end, self.hdr.log_offset + self.hdr.log_length)
        self.alloc_end = align_up(end, MiB)

    # -- BAT helpers ---------------------------------------------------------------------
    def _load_bat(self) -> array:
        self._bat = bat = read_table(self.f, self.bat_offset, self.bat_count, "Q", False, "BAT")
        return bat

    @property
    def bat(self) -> array:
        return self._bat if self._bat is not None else self._load_bat()

    @bat.setter
    def bat(self, value: array) -> None:
        self._bat = value

    def _bat_index(self, block: int) -> int:
        return block + block // self.cr

    def _sb_index(self, chunk: int) -> int:
        return chunk * (self.cr + 1) + self.cr

    def _entry(self, idx: int) -> tuple[int, int]:
        e = self.bat[idx]
        return e & _STATE_MASK, (e >> _OFFSET_SHIFT) * MiB

    def _block_offset(self, block: int, what="payload block") -> int:
        idx = self._bat_index(block)
        _st, off = self._entry(idx)
        # the last block may be short in the file when the disk ends inside it
        need = min(self.block_size, self.size - block * self.block_size)
        if off < MiB or off + need > self.file_len:
            raise self._corrupt(f"BAT entry of {what} {block} points outside the file",
                                field=f"BAT[{idx}]", offset=self.bat_offset + 8 * idx,
                                expected=f"1 MiB <= offset, end <= {self.file_len}",
                                found=f"{off:#x}")
        return off

    def _set_entry(self, idx: int, state: int, off: int) -> None:
        self._set_entries({idx: (state, off)})

    def _set_entries(self, values: dict[int, tuple[int, int]]) -> None:
        """Set BAT entries to ``(state, file offset)`` and write them, neighbours joined."""
        t = BlockTable(self.f, self.bat_offset, self.bat)
        for idx, (state, off) in values.items():
            t[idx] = (off // MiB) << _OFFSET_SHIFT | state
        t.write_back()

    def _state(self, block: int) -> int:
        return self.bat[self._bat_index(block)] & _STATE_MASK

    def _sector_bitmap(self, chunk: int) -> bytearray | None:
        if chunk in self._sb_cache:
            return self._sb_cache[chunk]
        idx = self._sb_index(chunk)
        if idx >= len(self.bat):
            return None
        st, off = self._entry(idx)
        if st != SB_PRESENT:
            return None
        if off < MiB or off + MiB > self.file_len:
            raise self._corrupt(f"sector bitmap block {chunk} lies outside the file",
                                field=f"BAT[{idx}]", offset=self.bat_offset + 8 * idx,
                                expected=f"end <= {self.file_len}", found=f"{off:#x}")
        bm = bytearray(self.f.read_exact(off, MiB, f"sector bitmap block {chunk}"))
        self._sb_cache[chunk] = bm
        return bm

    def _partial_runs(self, block: int, inner: int, n: int) -> list[tuple[int, int, bool]]:
        """(offset in block, length, present) for a range of a PARTIALLY_PRESENT block."""
        ss = self.sector_size
        chunk = block // self.cr
        bm = self._sector_bitmap(chunk)
        first = (block % self.cr) * (self.block_size // ss) + inner // ss
        count = ceil_div(n, ss) if n else 0
        runs: list[tuple[int, int, bool]] = []
        if bm is None:
            return [(inner, n, False)]
        # walk the bitmap; whole bytes of 0x00/0xFF at a time where possible
        s = 0
        while s < count:
            bit = first + s
            if bit % 8 == 0 and count - s >= 8 and bm[bit >> 3] in (0, 255):
                present, step = bm[bit >> 3] == 255, 8
            else:
                present, step = bool(bm[bit >> 3] >> (bit & 7) & 1), 1
            pos = inner + s * ss
            ln = min(step * ss, inner + n - pos)
            if runs and runs[-1][2] == present:
                runs[-1] = (runs[-1][0], runs[-1][1] + ln, present)
            else:
                runs.append((pos, ln, present))
            s += step
        return runs

    # -- data ----------------------------------------------------------------------------
    def _status_of(self, state: int) -> Alloc:
        if state in (PAYLOAD_FULLY_PRESENT,):
            return Alloc.DATA
        if state == PAYLOAD_PARTIALLY_PRESENT:
            return Alloc.DATA if not self.has_parent else None  # resolved per sector
        if state == PAYLOAD_ZERO:
            return Alloc.ZERO
        if self.has_parent:
            # MS-VHDX 2.5.1.1: UNMAPPED reads as zeroes (or old contents), never the parent's
            return Alloc.ZERO if state == PAYLOAD_UNMAPPED else Alloc.UNALLOCATED
        if state in (PAYLOAD_NOT_PRESENT, PAYLOAD_UNDEFINED, PAYLOAD_UNMAPPED):
            return Alloc.UNALLOCATED
        raise self._corrupt(f"invalid payload block state {state}", field="BAT state")

    def _check_state(self, block: int) -> int:
        st = self._state(block)
        if st not in STATE_NAMES:
            idx = self._bat_index(block)
            raise self._corrupt("invalid payload block state", field=f"BAT[{idx}]",
                                offset=self.bat_offset + 8 * idx,
                                expected="0, 1, 2, 3, 6 or 7", found=st)
        return st

    def block_status(self, offset, length):
        runs = RunList()
        add = runs.add
        for block, inner, pos, n in split_blocks(offset, length, self.block_size):
            st = self._check_state(block)
            a = self._status_of(st)
            if a is None:
                base = pos - inner
                for o, ln, present in self._partial_runs(block, inner, n):
                    add(base + o, ln, Alloc.DATA if present else Alloc.UNALLOCATED)
            else:
                add(pos, n, a)
        return runs.runs

    def read(self, offset, length):
        block, inner = divmod(offset, self.block_size)
        if inner + length <= self.block_size and \
                self._status_of(self._check_state(block)) is Alloc.DATA:
            # the common case: one present block, no copy
            return self.f.read_exact(self._block_offset(block) + inner, length,
                                     f"payload block {block}")
        out = bytearray(length)
        for block, inner, pos, n in split_blocks(offset, length, self.block_size):
            st = self._check_state(block)
            a = self._status_of(st)
            if a is Alloc.DATA:
                boff = self._block_offset(block)
                out[pos - offset:pos - offset + n] = self.f.read_exact(
                    boff + inner, n, f"payload block {block}")
            elif a is None:
                boff = self._block_offset(block)
                for o, ln, present in self._partial_runs(block, inner, n):
                    if present:
                        p = pos - inner + o - offset
                        out[p:p + ln] = self.f.read_exact(boff + o, ln, f"payload block {block}")
        return bytes(out)

    def _begin_write(self) -> None:
        self.require_writable()
        if not self._xlinks_checked:
            self._find_cross_links()
        self._refuse_cross_linked()
        if not self._data_guid_updated and not self.keep_link_identity:
            # MS-VHDX 2.2.2: DataWriteGuid changes before the first user-visible write (not in a
            # merge, which relinks the children itself: their parent_linkage must keep matching)
            self._update_header(data_write_guid=uuidlib.uuid4().bytes_le)
            self.modification_uuid = _guid(self.hdr.data_write_guid)
            self._data_guid_updated = True

    _xlinks_checked = False

    def _fixed_spans(self) -> list[tuple[int, int, str, int | None]]:
        """(start, end, name, None) of the header section, the regions and the log."""
        spans: list[tuple[int, int, str, int | None]] = [(0, MiB, "the header section", None)]
        for g, (o, ln) in self.vregions.items():
            spans.append((o, o + ln, "the BAT region" if g == BAT_GUID else
                          "the metadata region", None))
        if self.hdr.log_length:
            spans.append((self.hdr.log_offset, self.hdr.log_offset + self.hdr.log_length,
                          "the log", None))
        return spans

    def _find_cross_links(self) -> None:
        """Once, before the first write: a present block overlapping another one or the
        metadata (check: "overlaps") refuses writes (a write would change both)."""
        self._xlinks_checked = True
        self.write_refusal = None
        spans = self._fixed_spans()
        cr, bs = self.cr, self.block_size
        for idx, e in enumerate(self.bat):
            st, off = e & _STATE_MASK, (e >> _OFFSET_SHIFT) * MiB
            if idx % (cr + 1) == cr:
                if st != SB_PRESENT or not self.has_parent:
                    continue
                length = MiB
            else:
                blk = idx - idx // (cr + 1)
                if st not in (PAYLOAD_FULLY_PRESENT, PAYLOAD_PARTIALLY_PRESENT) or \
                        blk >= self.payload_blocks:
                    continue
                length = align_up(min(bs, self.size - blk * bs), MiB)
            if off < MiB or off + length > self.file_len:
                continue                        # refused where it is used
            spans.append((off, off + length, f"BAT[{idx}]", idx))
        spans.sort(key=lambda t: (t[0], t[1]))
        reach, reach_name = 0, ""
        for s1, e1, n1, _i in spans:
            if s1 < reach:
                self.write_refusal = f"{n1} (at {s1:#x}) and {reach_name} overlap"
                return
            if e1 > reach:
                reach, reach_name = e1, n1

    def _allocate(self, length: int) -> int:
        off = self.alloc_end
        self.alloc_end = off + align_up(length, MiB)
        if self.alloc_end > self.file_len:
            self.f.truncate(self.alloc_end)
            self.file_len = self.alloc_end
        return off

    def _mark_sectors(self, block: int, inner: int, n: int) -> bool:
        """Set the sector bitmap bits of a write in a differencing image; True when the whole
        block is now present."""
        ss = self.sector_size
        chunk = block // self.cr
        idx = self._sb_index(chunk)
        bm = self._sector_bitmap(chunk)
        if bm is None:
            off = self._allocate(MiB)           # fresh space reads as zeroes
            self._set_entry(idx, SB_PRESENT, off)
            bm = bytearray(MiB)
            self._sb_cache[chunk] = bm
        per_block = self.block_size // ss
        first = (block % self.cr) * per_block + inner // ss
        count = n // ss
        lo, hi = first >> 3, (first + count - 1) >> 3
        for s in range(first, first + count):
            if s & 7 == 0 and first + count - s >= 8:
                bm[s >> 3] = 0xFF
            else:
                bm[s >> 3] |= 1 << (s & 7)
        sboff = self._entry(idx)[1]
        # only the changed bytes, rounded to 512 so the update stays within sector writes
        a = lo - lo % 512
        b = min(align_up(hi + 1, 512), MiB)
        self.f.pwrite(sboff + a, bytes(bm[a:b]))
        bfirst = (block % self.cr) * per_block
        seg = bm[bfirst >> 3:(bfirst + per_block) >> 3]
        return seg.count(0xFF) == len(seg)

    def write(self, offset, data, fill):
        self._begin_write()
        mv = memoryview(data)
        for block, inner, pos, n in split_blocks(offset, len(data), self.block_size):
            piece = mv[pos - offset:pos - offset + n]
            st = self._check_state(block)
            idx = self._bat_index(block)
            if st == PAYLOAD_FULLY_PRESENT or (st == PAYLOAD_PARTIALLY_PRESENT
                                               and not self.has_parent):
                boff = self._block_offset(block)
                fr = self._fresh.get(idx)
                if fr is not None and fr[0] != self.bat[idx]:
                    del self._fresh[idx]
                    fr = None
                if fr is not None and inner >= fr[1]:
                    for a, b in nonzero_runs(piece, inner):   # untouched space: reads zeroes
                        self.f.pwrite(boff + inner + a, piece[a:b])
                else:
                    self.f.pwrite(boff + inner, piece)
                if fr is not None:
                    self._fresh_mark(idx, fr[0], max(fr[1], inner + n))
                continue
            if st == PAYLOAD_PARTIALLY_PRESENT:
                boff = self._block_offset(block)
                self.f.pwrite(boff + inner, piece)
                self.f.sync()
                if self._mark_sectors(block, inner, n):
                    self._set_entry(idx, PAYLOAD_FULLY_PRESENT, boff)
                continue
            zero = not getattr(self, "honor_zeroes", False) and is_zero(piece)
            whole = inner == 0 and (n == self.block_size or pos + n == self.size)
            if zero and (not self.has_parent or st in (PAYLOAD_ZERO, PAYLOAD_UNMAPPED)):
                continue                       # already reads as zeroes
            if zero and whole:
                self._set_entry(idx, PAYLOAD_ZERO, 0)
                continue
            old_len = self.file_len
            boff = self._allocate(self.block_size)
            fresh = not self.has_parent and boff >= old_len
            if fresh:
                # the block lies in space just added to the file: it reads zeroes already, so
                # only the non-zero parts of the data are written (the file stays sparse there)
                for a, b in nonzero_runs(piece, inner):
                    self.f.pwrite(boff + inner + a, piece[a:b])
            else:
                self.f.pwrite(boff + inner, piece)
            if self.has_parent or boff < old_len:
                # data before the BAT entry naming it: a crash must not make the parent's
                # content (or stale bytes) appear. A base image's block read zeroes before, and
                # space just added to the file reads zeroes or the new data: no sync needed.
                self.f.sync()
            if self.has_parent and st not in (PAYLOAD_ZERO, PAYLOAD_UNMAPPED) and not whole:
                full = self._mark_sectors(block, inner, n)
                self.f.sync()
                self._set_entry(idx, PAYLOAD_FULLY_PRESENT if full else PAYLOAD_PARTIALLY_PRESENT,
                                boff)
            else:
                self._set_entry(idx, PAYLOAD_FULLY_PRESENT, boff)
                if fresh:
                    self._fresh_mark(idx, self.bat[idx], inner + n)

    def _fresh_mark(self, idx: int, entry: int, written_to: int) -> None:
        if written_to >= self.block_size:
            self._fresh.pop(idx, None)
        else:
            self._fresh[idx] = (entry, written_to)

    def discard(self, offset, length, fill=None):
        """Whole blocks lose their data (base: UNMAPPED, read as zeroes; differencing: ZERO,
        hiding the parent; fixed: zeroes written, the block stays allocated) and their space is
        returned to the file system; partial blocks are zeroed."""
        self._begin_write()
        self._fresh.clear()
        for block, inner, pos, n in split_blocks(offset, length, self.block_size):
            st = self._check_state(block)
            idx = self._bat_index(block)
            whole = inner == 0 and (n == self.block_size or pos + n == self.size)
            allocated = st in (PAYLOAD_FULLY_PRESENT, PAYLOAD_PARTIALLY_PRESENT)
            if whole and not (self.leave_allocated and allocated):
                new = PAYLOAD_ZERO if self.has_parent else PAYLOAD_UNMAPPED
                if st == new:
                    continue
                old = self._block_offset(block) if allocated else 0
                self._set_entry(idx, new, 0)
                self.f.sync()                   # the BAT stops naming the block first
                if old:
                    self.f.punch_hole(old, self.block_size)
                continue
            if not allocated and (st in (PAYLOAD_ZERO, PAYLOAD_UNMAPPED) or not self.has_parent):
                continue                        # already reads as zeroes
            done = 0
            while done < n:
                k = min(n - done, 4 << 20)
                if allocated:
                    self.f.pwrite(self._block_offset(block) + inner + done, zeroes(k))
                    if st == PAYLOAD_PARTIALLY_PRESENT:
                        self._mark_sectors(block, inner + done, k)
                else:
                    saved = getattr(self, "honor_zeroes", False)
                    self.honor_zeroes = True    # zeroes must hide the parent here
                    try:
                        self.write(pos + done, zeroes(k), None)
                    finally:
                        self.honor_zeroes = saved
                    st = self._check_state(block)
                    allocated = st in (PAYLOAD_FULLY_PRESENT, PAYLOAD_PARTIALLY_PRESENT)
                done += k

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
            "file_write_guid": str(_guid(self.hdr.file_write_guid)),
            "data_write_guid": str(_guid(self.hdr.data_write_guid)),
            "log_offset": self.hdr.log_offset,
            "log_length": self.hdr.log_length,
            "log_replayed": self.log_replayed,
            "log_pending": self.log_pending,
        }
        if self.has_parent:
            d["parent_locator"] = dict(self.parent_locator)
        return d

    def check_parent_link(self, parent):
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
            if _native(self.parent_locator.get("relative_path") or "") != _native(rel):
                kv = dict(self.parent_locator, relative_path=rel)
                try:
                    self._write_metadata_item(PARENT_LOCATOR, build_locator(kv))
                except NotSupported:
                    return                      # no room: the stale path stays, nothing breaks
                self.parent_locator = kv
                self.parent_hint.locations = [_native(rel)] + [
                    loc for loc in self.parent_hint.locations if loc != _native(rel)]

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
        for o, l, _f, _k in self.md_entries.values():
            end = max(end, o + l)
        new_off = align_up(end, 4096) if end else METADATA_TABLE_SIZE
        if new_off + len(payload) > self.md_length:
            raise NotSupported(f"{self.location}: no room left in the metadata region "
                               f"({self.md_length} bytes) for a new {KNOWN_ITEMS[g]}")
        self.f.pwrite(self.md_offset + new_off, payload)
        self.f.sync()
        entry = MetadataTableEntry.build(dict(item_id=_gbytes(g), offset=new_off,
                                              length=len(payload), flags=flags, reserved=0))
        self.f.pwrite(self.md_offset + 32 + 32 * k, entry)
        self.f.sync()
        self.md_entries[g] = (new_off, len(payload), flags, k)

    def set_uuid(self, value):
        self.require_writable()
        self._write_metadata_item(PAGE83, _gbytes(value))
        self.uuid = value

    def set_modification_uuid(self, value):
        self.require_writable()
        self._update_header(data_write_guid=_gbytes(value))
        self._data_guid_updated = True
        self.modification_uuid = value

    def set_parent_modification_uuid(self, value):
        self.require_writable()
        if not self.has_parent:
            self._no_field("a parent link (not a differencing image)")
        kv = dict(self.parent_locator)
        kv["parent_linkage"] = "{" + str(value) + "}"
        self._write_metadata_item(PARENT_LOCATOR, build_locator(kv))
        self.parent_locator = kv
        self.parent_modification_uuid = value

    def relink_refusal(self, parent):
        if parent is None:
            return None
        if not self.has_parent:
            return f"{self.location}: not a differencing image"
        if parent.format != "VHDX" or parent.modification_uuid is None:
            return f"{self.location}: a VHDX differencing image needs a VHDX parent"
        return None

    def set_parent(self, parent):
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
        self.parent_hint = ParentHint(locations=[_native(l) for l in locs], format="VHDX")

    def _relocate_bat(self, count: int) -> None:
        """Move the BAT to a larger region at the end of the file: the new BAT is written and
        flushed first, then region table 1, then region table 2 (each with its checksum). An
        interruption leaves either the old or the new table valid, each naming a complete BAT."""
        new_len = align_up(count * 8, MiB)
        if new_len > 0xFFFFFFFF - MiB:
            raise NotSupported(f"{self.location}: the BAT would exceed a region's 4 GiB limit")
        new_off = self._allocate(new_len)
        self.f.pwrite(new_off, table_to_bytes(self.bat))
        self.f.sync()
        old_off, old_len = self.bat_offset, self.bat_length
        raw = bytearray(self.region_raw)
        for k, e in enumerate(self.region_entries):
            if _guid(e.guid) == BAT_GUID:
                e = dict(e)
                e.pop("_io", None)
                e.update(file_offset=new_off, length=new_len)
                raw[16 + 32 * k:48 + 32 * k] = RegionTableEntry.build(e)
                self.region_entries[k] = RegionTableEntry.parse(raw[16 + 32 * k:48 + 32 * k])
        _with_checksum(raw)
        for off in REGION_OFFSETS:
            self.f.pwrite(off, bytes(raw))
            self.f.sync()
        self.region_raw = bytes(raw)
        self.vregions[BAT_GUID] = (new_off, new_len)
        self.bat_offset, self.bat_length = new_off, new_len
        self.f.punch_hole(old_off, old_len)

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
                    for g, (o, l, fl, kk) in list(self.md_entries.items()):
                        if kk == last:
                            self.md_entries[g] = (o, l, fl, k)
                table[32 + 32 * last:64 + 32 * last] = bytes(32)
                struct.pack_into("<H", table, 10, count - 1)
                self.f.pwrite(self.md_offset, bytes(table))
                self.f.sync()

    # -- operations ----------------------------------------------------------------------
    def resizes_in_place(self, new_size):
        # growing when the BAT region has room: entries past the old end are zeroed (nothing
        # reads them yet), then one metadata write names the new size
        if new_size <= self.size or self.leave_allocated or new_size > MAX_SIZE:
            return False
        count = bat_entry_count(new_size, self.block_size, self.sector_size, self.has_parent)
        return count * 8 <= self.bat_length

    def resize(self, new_size, progress=None):
        self.require_writable()
        self._fresh.clear()
        if new_size % self.sector_size:
            raise InvalidArgument(f"{self.location}: new size must be a multiple of "
                                  f"{self.sector_size} bytes, found {new_size}")
        if new_size > self.max_size:
            raise too_large("VHDX", new_size, self.max_size, self.location,
                            _limit_reason(self.block_size))
        if new_size == self.size:
            return
        if new_size < self.size:
            self._shrink(new_size)
            if progress:
                progress(1, 1)
            return
        count = bat_entry_count(new_size, self.block_size, self.sector_size, self.has_parent)
        self._begin_write()
        if count * 8 > self.bat_length:
            self._relocate_bat(count)
        old_blocks = self.payload_blocks
        new_bat = array("Q", self.bat) + array("Q", bytes(8 * (count - len(self.bat))))
        # entries past the old end must read as "not present" before the size grows
        start = len(self.bat)
        if count > start:
            self.f.pwrite(self.bat_offset + 8 * start, bytes(8 * (count - start)))
        self.bat = new_bat
        self.bat_count = count
        self.payload_blocks = ceil_div(new_size, self.block_size)
        if self.leave_allocated and not self.has_parent:
            first = self.alloc_end
            require_space(self.location, (self.payload_blocks - old_blocks) * self.block_size,
                          "the grown fixed image")
            for blk in range(old_blocks, self.payload_blocks):
                off = self._allocate(self.block_size)
                self._set_entry(self._bat_index(blk), PAYLOAD_FULLY_PRESENT, off)
            preallocate(self.f, first, self.alloc_end - first)
        self.f.sync()
        self._write_metadata_item(VIRTUAL_DISK_SIZE, struct.pack("<Q", new_size))
        self.size = new_size
        if progress:
            progress(1, 1)

    def _in_use(self) -> tuple[list[tuple[int, int, int, int]], int]:
        """The blocks the BAT names (file offset, length, BAT index, state) and the end of the
        header, regions and log rounded up to a MiB (nothing may move below it)."""
        used = []
        for idx in range(self.bat_count):
            e = self.bat[idx]
            st, off = e & _STATE_MASK, (e >> _OFFSET_SHIFT) * MiB
            is_sb = idx % (self.cr + 1) == self.cr
            if is_sb and st == SB_PRESENT:
                used.append((off, MiB, idx, st))
            elif not is_sb and st in (PAYLOAD_FULLY_PRESENT, PAYLOAD_PARTIALLY_PRESENT):
                used.append((off, self.block_size, idx, st))
        end = MiB
        for o, ln in self.vregions.values():
            end = max(end, o + ln)
        if self.hdr.log_length:
            end = max(end, self.hdr.log_offset + self.hdr.log_length)
        return used, align_up(end, MiB)

    def _shrink(self, new_size: int) -> None:
        """Cut the virtual size (refused when this image holds data past ``new_size``; the
        operation has checked the whole chain): BAT entries past the new end become "not
        present" (zeroed in the BAT region), the size is written, and the file is cut after the
        last block still in use."""
        self._refuse_cut_data(new_size)
        count = bat_entry_count(new_size, self.block_size, self.sector_size, self.has_parent)
        self._begin_write()
        if count < self.bat_count:
            self.f.pwrite(self.bat_offset + 8 * count, bytes(8 * (self.bat_count - count)))
        self.f.sync()
        self.bat = array("Q", self.bat[:count])
        self.bat_count = count
        self.payload_blocks = ceil_div(new_size, self.block_size)
        self._sb_cache.clear()
        self._write_metadata_item(VIRTUAL_DISK_SIZE, struct.pack("<Q", new_size))
        self.size = new_size
        self.f.sync()
        used, end = self._in_use()
        end = max([end] + [off + ln for off, ln, _i, _s in used])
        if end < self.file_len:
            self.f.truncate(end)
            self.file_len = self.alloc_end = end

    def compact(self, progress=None, parent_read=None):
        """Drop blocks that read as zeroes (base) or as the parent (differencing; a zero block over
        non-zero parent data becomes a ZERO entry), move the remaining blocks down into the holes
        and shrink the file. The user-visible content does not change, so neither does the
        DataWriteGuid (children stay linked). Fixed images keep every block allocated."""
        self.require_writable()
        self._fresh.clear()
        total = self.payload_blocks
        done = 0
        for blk in range(self.payload_blocks):
            if progress and progress(done, total + 1) is False:
                from ..errors import Cancelled
                raise Cancelled()
            done += 1
            st = self._check_state(blk)
            if self.leave_allocated or st != PAYLOAD_FULLY_PRESENT:
                continue
            start = blk * self.block_size
            n = min(self.block_size, self.size - start)
            data = self.read(start, n)
            idx = self._bat_index(blk)
            if not self.has_parent:
                if is_zero(data):
                    self._set_entry(idx, PAYLOAD_NOT_PRESENT, 0)
                continue
            below = parent_read(start, n) if parent_read else zeroes(n)
            if data == below:
                self._set_entry(idx, PAYLOAD_NOT_PRESENT, 0)
            elif is_zero(data):
                self._set_entry(idx, PAYLOAD_ZERO, 0)
        self.f.sync()
        # pack: the highest blocks move into the lowest holes past the metadata
        # (compaction.move_blocks: copies, sync, BAT entries, sync); blocks overlapping the
        # metadata or each other (check reports such images) stay
        used, meta_end = self._in_use()
        blocks = [(off, ln, (idx, st)) for off, ln, idx, st in used]
        stuck = overlapping(blocks)
        movable = [b for b in blocks if b[0] >= meta_end and b[2] not in stuck]
        taken = [(0, meta_end)] + [(off, off + ln) for off, ln, _k in blocks]
        moves = plan_moves(movable, holes_between(taken), MiB)
        move_blocks(self.f, moves,
                    lambda ms: self._set_entries({m.key[0]: (m.key[1], m.dst) for m in ms}))
        gone = {m.src for m in moves}
        target = max([meta_end] + [off + ln for off, ln, _k in blocks if off not in gone] +
                     [m.dst + m.length for m in moves])
        self._sb_cache.clear()
        self.f.truncate(target)
        self.file_len = target
        self.alloc_end = target
        if progress:
            progress(total + 1, total + 1)

    def check(self, repair=False, dry_run=False, progress=None) -> CheckReport:
        """Headers, log state and every BAT entry (state, range, overlaps). Repair (read-write
        images): the log was already replayed by the open; a damaged header copy is rewritten;
        BAT entries with an invalid state or pointing outside the file become "not present"."""
        rep = CheckReport()
        fix = repair and not dry_run and not self.read_only
        if self.log_replayed:
            rep.problems.append(Problem("corrupt", "the log held changes that were not replayed; "
                                        "replayed on open", self.hdr.log_offset, repaired=True,
                                        code=ProblemCode.LOG_PENDING))
        elif self.log_pending:
            rep.problems.append(Problem("corrupt", "the log holds changes that need to be "
                                        "replayed", self.hdr.log_offset,
                                        code=ProblemCode.LOG_PENDING))
        for p in getattr(self, "header_problems", []):
            rep.problems.append(Problem("corrupt", p,
                                        HEADER_OFFSETS[1 - self.hdr_slot], repaired=fix,
                                        code=ProblemCode.HEADER_COPY))
        if fix and self.header_problems:
            self._update_header()
            self.header_problems = []
        bad: list[tuple[int, int]] = []
        # (start, end, name, BAT index or None): checked for overlaps after one sort
        spans = self._fixed_spans()
        for idx in range(self.bat_count):
            e = self.bat[idx]
            st, off = e & _STATE_MASK, (e >> _OFFSET_SHIFT) * MiB
            is_sb = idx % (self.cr + 1) == self.cr
            where = self.bat_offset + 8 * idx
            if is_sb:
                if st == SB_NOT_PRESENT:
                    continue
                if st != SB_PRESENT or not self.has_parent:
                    rep.problems.append(Problem("corrupt", f"BAT[{idx}]: invalid sector bitmap "
                                                f"state {st}", where, repaired=fix,
                                                code=ProblemCode.ENTRY_INVALID))
                    bad.append((idx, SB_NOT_PRESENT))
                    continue
                need = length = MiB
                what = "sector bitmap block"
            else:
                blk = idx - idx // (self.cr + 1)
                if st not in STATE_NAMES:
                    rep.problems.append(Problem("corrupt", f"BAT[{idx}]: invalid payload block "
                                                f"state {st}", where, repaired=fix,
                                                code=ProblemCode.ENTRY_INVALID))
                    bad.append((idx, PAYLOAD_NOT_PRESENT))
                    continue
                if st not in (PAYLOAD_FULLY_PRESENT, PAYLOAD_PARTIALLY_PRESENT):
                    continue
                if blk >= self.payload_blocks:
                    continue
                need = min(self.block_size, self.size - blk * self.block_size)
                length, what = align_up(need, MiB), f"payload block {blk}"
            if off < MiB or off + need > self.file_len:
                rep.problems.append(Problem("corrupt", f"BAT[{idx}]: {what} at {off:#x} lies "
                                            f"outside the file ({self.file_len} bytes)", where,
                                            repaired=fix, code=ProblemCode.ENTRY_PAST_END))
                bad.append((idx, SB_NOT_PRESENT if is_sb else PAYLOAD_NOT_PRESENT))
                continue
            spans.append((off, off + length, f"{what} (BAT[{idx}])", idx))
        spans.sort(key=lambda t: (t[0], t[1]))
        reach, reach_name, reach_idx = 0, "", None
        moves: list[tuple[int, int, int]] = []      # (BAT index, offset, length) to copy
        for s1, e1, n1, i1 in spans:
            if s1 < reach:
                where = self.bat_offset + 8 * i1 if i1 is not None else None
                # repair gives the block its own copy of what it reads now (the block that
                # meets the metadata when the later span is a region)
                mover = i1 if i1 is not None else reach_idx
                if mover is not None and fix:
                    _st, off = self._entry(mover)
                    moves.append((mover, off, e1 - s1 if i1 is not None else reach - off))
                rep.problems.append(Problem("corrupt", f"{n1} at {s1:#x} overlaps {reach_name}",
                                            where, code=ProblemCode.OVERLAP,
                                            repaired=fix and mover is not None))
            if e1 > reach:
                reach, reach_name, reach_idx = e1, n1, i1
        for idx, off, length in moves:
            st, cur = self._entry(idx)
            if cur != off:
                continue                        # already moved
            data = self.f.pread(off, length)
            new = self._allocate(length)
            self.f.pwrite(new, data)
            self.f.sync()                       # the copy before the BAT entry naming it
            self._set_entry(idx, st, new)
        if moves:
            self._sb_cache.clear()
            self.f.sync()
            self._xlinks_checked = False
        if fix and bad:
            for idx, state in bad:
                self._set_entry(idx, state, 0)
            self._sb_cache.clear()
            self.f.sync()
        rep.repaired = any(p.repaired for p in rep.problems)
        if progress:
            progress(1, 1)
        return rep


def _native(loc: str) -> str:
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
    head = ParentLocatorHeader.build(dict(locator_type=_gbytes(VHDX_LOCATOR_TYPE), reserved=0,
                                          key_value_count=n))
    pos = 20 + 12 * n
    entries = b""
    strings = b""
    for k, v in kv.items():
        kb, vb = _utf16(k), _utf16(v)
        entries += ParentLocatorEntry.build(dict(key_offset=pos, value_offset=pos + len(kb),
                                                 key_length=len(kb), value_length=len(vb)))
        strings += kb + vb
        pos += len(kb) + len(vb)
    return head + entries + strings


# -- log replay --------------------------------------------------------------------------------
class _LogEntry:
    __slots__ = ("pos", "hdr", "descs", "sectors")


def _parse_log_entry(log: bytes, pos: int, guid: bytes) -> "_LogEntry | None":
    """Parse and validate one log entry at ``pos`` of the circular log buffer; None if invalid."""
    n = len(log)

    def take(p, ln):
        p %= n
        if p + ln <= n:
            return log[p:p + ln]
        return log[p:] + log[:ln - (n - p)]

    head = take(pos, 64)
    if head[:4] != b"loge":
        return None
    h = LogEntryHeader.parse(head)
    if (h.entry_length < LOG_SECTOR or h.entry_length % LOG_SECTOR or h.entry_length > n
            or h.tail % LOG_SECTOR or h.tail >= n or h.log_guid != guid or h.sequence_number == 0):
        return None
    desc_area = align_up(64 + 32 * h.descriptor_count, LOG_SECTOR)
    if desc_area > h.entry_length:
        return None
    raw = bytearray(take(pos, h.entry_length))
    if not _checksum_ok(raw):
        return None
    descs = []
    ndata = 0
    for i in range(h.descriptor_count):
        d = raw[64 + 32 * i:96 + 32 * i]
        if d[:4] == b"zero":
            z = ZeroDescriptor.parse(d)
            if z.sequence_number != h.sequence_number or z.zero_length % LOG_SECTOR \
                    or z.file_offset % LOG_SECTOR:
                return None
            descs.append(("zero", z))
        elif d[:4] == b"desc":
            dd = DataDescriptor.parse(d)
            if dd.sequence_number != h.sequence_number or dd.file_offset % LOG_SECTOR:
                return None
            descs.append(("data", dd))
            ndata += 1
        else:
            return None
    if desc_area + ndata * LOG_SECTOR != h.entry_length:
        return None
    sectors = []
    for i in range(ndata):
        at = desc_area + i * LOG_SECTOR
        s = DataSector.parse(bytes(raw[at:at + LOG_SECTOR]))
        if (s.signature != b"data" or s.sequence_high != h.sequence_number >> 32
                or s.sequence_low != h.sequence_number & 0xFFFFFFFF):
            return None
        sectors.append(s.data)
    e = _LogEntry()
    e.pos, e.hdr, e.descs, e.sectors = pos, h, descs, sectors
    return e


def find_active_sequence(log: bytes, guid: bytes) -> list[_LogEntry]:
    """MS-VHDX 2.3.3: the sequence of consecutive valid entries with the highest sequence
    number, from the head entry's tail to the head. Empty when the log has none."""
    n = len(log)
    cache: dict[int, _LogEntry | None] = {}

    def entry(p):
        if p not in cache:
            cache[p] = _parse_log_entry(log, p, guid)
        return cache[p]

    best: list[_LogEntry] = []
    for start in range(0, n, LOG_SECTOR):
        e = entry(start)
        if e is None:
            continue
        seq = [e]
        used = e.hdr.entry_length
        while used < n:
            nxt = entry((seq[-1].pos + seq[-1].hdr.entry_length) % n)
            if nxt is None or nxt.hdr.sequence_number != seq[-1].hdr.sequence_number + 1:
                break
            used += nxt.hdr.entry_length
            if used > n:
                break
            seq.append(nxt)
        # valid when the head entry's tail lies within the sequence; replay from that tail
        tail = seq[-1].hdr.tail
        for i, e in enumerate(seq):
            if e.pos == tail:
                if not best or seq[-1].hdr.sequence_number > best[-1].hdr.sequence_number:
                    best = seq[i:]
                break
    return best


def _active_sequence(img: VhdxImage) -> list[_LogEntry]:
    h = img.hdr
    if h.log_length == 0:
        return []
    if h.log_length > MAX_LOG:
        raise img._corrupt("log too large", field="LogLength", offset=HEADER_OFFSETS[img.hdr_slot],
                           expected=f"<= {MAX_LOG}", found=h.log_length)
    if h.log_offset + h.log_length > img.file_len:
        raise img._corrupt("log lies past the end of the file", field="LogOffset",
                           offset=HEADER_OFFSETS[img.hdr_slot],
                           expected=f"end <= {img.file_len}", found=h.log_offset + h.log_length)
    log = img.f.read_exact(h.log_offset, h.log_length, "log")
    return find_active_sequence(log, h.log_guid)


def _replay_zero(img: VhdxImage, start: int, length: int) -> None:
    """Make [start, start+length) read zero without writing more than the file already holds:
    zeroes go only over the file's data runs (holes already read zero), and the part past the
    end of the file is made by extending it (a hole). An attacker's zero descriptor as long as
    its LastFileOffset then costs nothing (it used to write that many zero bytes)."""
    size = img.f.size()
    end = start + length
    inside = min(end, size)
    if inside > start:
        runs = img.f.data_runs(start, inside - start)
        for a, b, is_data in runs if runs is not None else [(start, inside, True)]:
            pos = a
            while is_data and pos < b:
                k = min(4 * MiB, b - pos)
                img.f.pwrite(pos, zeroes(k))
                pos += k
    if end > size:
        img.f.truncate(end)


def _replay(img: VhdxImage, seq: list[_LogEntry]) -> None:
    h = img.hdr
    if not seq:
        return                                  # nothing valid to replay: only clear the GUID
    head = seq[-1].hdr
    if head.last_file_offset > MAX_FILE:
        raise img._corrupt("log says the file ends past the largest possible VHDX file",
                           field="LastFileOffset", offset=h.log_offset + seq[-1].pos,
                           expected=f"<= {MAX_FILE}", found=head.last_file_offset)
    if img.file_len < head.flushed_file_offset:
        raise img._corrupt("file is shorter than the log says it was when flushed",
                           field="FlushedFileOffset", expected=f">= {head.flushed_file_offset}",
                           found=img.file_len)
    for e in seq:
        si = 0
        for kind, d in e.descs:
            if d.file_offset < REGION_OFFSETS[0]:
                raise img._corrupt("log entry writes into the VHDX headers",
                                   field="log descriptor FileOffset",
                                   offset=h.log_offset + e.pos, expected=">= 192 KiB",
                                   found=d.file_offset)
            if kind == "zero":
                if d.file_offset + d.zero_length > max(head.last_file_offset, img.file_len):
                    raise img._corrupt("log zero descriptor lies past the file's end",
                                       field="ZeroLength", offset=h.log_offset + e.pos,
                                       expected=f"end <= {head.last_file_offset}",
                                       found=d.file_offset + d.zero_length)
                _replay_zero(img, d.file_offset, d.zero_length)
            else:
                if d.file_offset + LOG_SECTOR > max(head.last_file_offset, img.file_len):
                    raise img._corrupt("log data descriptor lies past the file's end",
                                       field="log descriptor FileOffset",
                                       offset=h.log_offset + e.pos,
                                       expected=f"end <= {head.last_file_offset}",
                                       found=d.file_offset + LOG_SECTOR)
                data = bytes(d.leading_bytes) + bytes(e.sectors[si]) + bytes(d.trailing_bytes)
                si += 1
                img.f.pwrite(d.file_offset, data)
    img.f.sync()
    size = img.f.size()
    if size < head.last_file_offset:
        img.f.truncate(head.last_file_offset)
        img.f.sync()
    img.file_len = img.f.size()


# -- the backend --------------------------------------------------------------------------------
class VhdxBackend(Backend):
    name = "VHDX"
    description = "Hyper-V Virtual Hard Disk v2"
    aliases = ("vhdx",)
    caps = (Cap.FILE | Cap.VFS | Cap.CREATE_DYNAMIC | Cap.CREATE_FIXED | Cap.DIFF | Cap.UUID
            | Cap.DISCARD)
    extensions = (FileExtension("vhdx"), FileExtension("avhdx"))
    config_keys = (
        ConfigKey("BlockSize", "0", ValueType.INTEGER, KeyFlag.CREATEONLY,
                  "the unit of allocation (1 MiB .. 256 MiB, power of two); 0 chooses "
                  "8 MiB (32 MiB above 100 GiB, 2 MiB for differencing images)",
                  minimum=0, maximum=256 * MiB, label="Block size", unit="bytes"),
        ConfigKey("LogicalSectorSize", "512", ValueType.INTEGER,
                  KeyFlag.CREATEONLY | KeyFlag.EXPERT,
                  "the sector size the guest sees", minimum=512, maximum=4096,
                  label="Logical sector size", unit="bytes", choices=("512", "4096")),
        ConfigKey("PhysicalSectorSize", "4096", ValueType.INTEGER,
                  KeyFlag.CREATEONLY | KeyFlag.EXPERT, "the sector size the disk reports as "
                  "physical", minimum=512, maximum=4096, label="Physical sector size",
                  unit="bytes", choices=("512", "4096")),
        ConfigKey("LogSize", str(MiB), ValueType.INTEGER, KeyFlag.CREATEONLY | KeyFlag.EXPERT,
                  "size of the metadata log (a multiple of 1 MiB)", minimum=MiB,
                  maximum=MAX_LOG, label="Log size", unit="bytes"),
    )
    operations = frozenset({Operation.WRITE, Operation.CREATE, Operation.RESIZE, Operation.CHECK,
                            Operation.REPAIR, Operation.RELINK, Operation.DISCARD,
                            Operation.COMPACT})
    create_flags = ImageFlags.FIXED
    max_size = MAX_SIZE
    size_granularity = 512
    can_shrink = True

    def max_size_for(self, config=None):
        bs = self.config_value(config, "BlockSize")
        return vhdx_max_size(bs) if bs else MAX_SIZE    # automatic: 32 MiB blocks when large

    def limit_reason(self, config=None):
        return _limit_reason(self.config_value(config, "BlockSize") or 32 * MiB)

    def probe(self, src: ProbeInput) -> int:
        return 100 if src.head[:8] == b"vhdxfile" else 0

    def open(self, location, flags=OpenFlags.NORMAL, config=None):
        parse_config(self.config_keys, config, owner=self.name)
        f = ImageFile(location, writable=not flags.read_only)
        return VhdxImage(self, location, f, flags)

    def create(self, p: CreateParams):
        cfg = parse_config(self.config_keys, p.config, creating=True, owner=self.name)
        parent = p.parent
        diff = parent is not None
        if diff:
            if parent.format != "VHDX" or parent.modification_uuid is None:
                raise NotSupported("a VHDX differencing image needs a VHDX parent "
                                   f"({parent.location} is {parent.format})")
            if p.flags & ImageFlags.FIXED:
                raise NotSupported("a VHDX differencing image cannot be fixed")
        lss = cfg["LogicalSectorSize"]
        pss = cfg["PhysicalSectorSize"]
        if diff:
            lss = parent.sector_size
        for name, v in (("LogicalSectorSize", lss), ("PhysicalSectorSize", pss)):
            if v not in (512, 4096):
                raise InvalidArgument(f"VHDX {name} must be 512 or 4096, found {v}")
        size = p.size
        if size <= 0 or size % lss or size > MAX_SIZE:
            raise InvalidArgument(f"VHDX size must be a non-zero multiple of the logical sector "
                                  f"size {lss} up to 64 TiB, found {size}")
        bs = cfg["BlockSize"] or _default_block_size(size, diff)
        if bs < MiB or bs > 256 * MiB or bs & (bs - 1):
            raise InvalidArgument(f"VHDX BlockSize must be a power of two from 1 MiB to 256 MiB, "
                                  f"found {bs}")
        if size > vhdx_max_size(bs):
            raise too_large("VHDX", size, vhdx_max_size(bs), p.location, _limit_reason(bs))
        log_len = cfg["LogSize"]
        if log_len % MiB:
            raise InvalidArgument(f"VHDX LogSize must be a multiple of 1 MiB, found {log_len}")
        fixed = bool(p.flags & ImageFlags.FIXED)
        count = bat_entry_count(size, bs, lss, diff)
        log_off = MiB
        md_off = log_off + log_len
        md_len = MiB
        bat_off = md_off + md_len
        bat_len = max(MiB, align_up(count * 8, MiB))
        data_off = bat_off + bat_len
        page83 = p.uuid or uuidlib.uuid4()

        f = ImageFile.create_temp(p.location)
        try:
            ident = FileIdentifier.build(dict(signature=b"vhdxfile",
                                              creator=_utf16("vdgui").ljust(512, b"\0")))
            f.pwrite(0, ident)
            # metadata region
            items = [
                (FILE_PARAMETERS, FileParameters.build(dict(
                    block_size=bs, flags=(FP_LEAVE_BLOCK_ALLOCATED if fixed else 0)
                    | (FP_HAS_PARENT if diff else 0))), MD_IS_REQUIRED),
                (VIRTUAL_DISK_SIZE, struct.pack("<Q", size), MD_IS_VIRTUAL_DISK | MD_IS_REQUIRED),
                (PAGE83, _gbytes(page83), MD_IS_VIRTUAL_DISK | MD_IS_REQUIRED),
                (LOGICAL_SECTOR, struct.pack("<I", lss), MD_IS_VIRTUAL_DISK | MD_IS_REQUIRED),
                (PHYSICAL_SECTOR, struct.pack("<I", pss), MD_IS_VIRTUAL_DISK | MD_IS_REQUIRED),
            ]
            if diff:
                kv = locator_for(p.location, parent.location, parent.modification_uuid)
                items.append((PARENT_LOCATOR, build_locator(kv), MD_IS_REQUIRED))
            table = bytearray(MetadataTableHeader.build(dict(signature=b"metadata", reserved=0,
                                                             entry_count=len(items),
                                                             reserved2=bytes(20))))
            pos = METADATA_TABLE_SIZE
            blobs = b""
            for g, payload, fl in items:
                table += MetadataTableEntry.build(dict(item_id=_gbytes(g), offset=pos,
                                                       length=len(payload), flags=fl, reserved=0))
                blobs += payload
                pos += len(payload)
            f.pwrite(md_off, bytes(table))
            f.pwrite(md_off + METADATA_TABLE_SIZE, blobs)
            # BAT (fixed: every payload block present, laid out in order)
            bat = array("Q", bytes(8 * count))
            end = data_off
            if fixed:
                cr = chunk_ratio(lss, bs)
                for blk in range(ceil_div(size, bs)):
                    bat[blk + blk // cr] = (end // MiB) << _OFFSET_SHIFT | PAYLOAD_FULLY_PRESENT
                    end += bs
            f.pwrite(bat_off, table_to_bytes(bat))
            f.truncate(max(end, data_off))
            if fixed:
                preallocate(f, data_off, end - data_off)
            # region tables (both copies)
            rt = bytearray(REGION_SIZE)
            rt[0:16] = RegionTableHeader.build(dict(signature=b"regi", checksum=0, entry_count=2,
                                                    reserved=0))
            rt[16:48] = RegionTableEntry.build(dict(guid=_gbytes(BAT_GUID), file_offset=bat_off,
                                                    length=bat_len, required=1))
            rt[48:80] = RegionTableEntry.build(dict(guid=_gbytes(METADATA_GUID), file_offset=md_off,
                                                    length=md_len, required=1))
            _with_checksum(rt)
            for off in REGION_OFFSETS:
                f.pwrite(off, bytes(rt))
            # headers (sequence 0 and 1; the second is current)
            fwg, dwg = uuidlib.uuid4(), uuidlib.uuid4()
            for seq, off in enumerate(HEADER_OFFSETS):
                h = bytearray(Header.build(dict(
                    signature=b"head", checksum=0, sequence_number=seq,
                    file_write_guid=_gbytes(fwg),
                    data_write_guid=_gbytes(dwg), log_guid=ZERO_GUID, log_version=0, version=1,
                    log_length=log_len, log_offset=log_off, reserved=bytes(4016))))
                f.pwrite(off, bytes(_with_checksum(h)))
            f.sync()
            if p.progress:
                p.progress(size, size)
            f.commit()
        except BaseException:
            f.abandon()
            raise
        return VhdxImage(self, p.location, f, OpenFlags.NORMAL)


BACKEND = VhdxBackend()
