"""VHDX on-disk structures ([MS-VHDX] 2.2-2.6): file identifier, headers, region table,
log entries and descriptors, metadata table and items, parent locator; GUIDs, BAT states and
limits; CRC-32C checksums and the BAT size formulas. All little-endian."""
from __future__ import annotations

import struct
import uuid as uuidlib

from construct import Bytes, Int16ul, Int32ul, Int64ul, Struct
from construct import Container as Container  # a parsed structure, for annotations

from ...align import ceil_div
from ...crc32c import crc32c
from . import MAX_LOG as MAX_LOG
from . import MAX_NEW_BLOCKS as MAX_NEW_BLOCKS
from . import MAX_SIZE as MAX_SIZE
from . import GiB as GiB  # the declaration holds these (cheap to import)
from . import KiB as KiB
from . import MiB as MiB
from . import TiB as TiB
from . import limit_reason as limit_reason
from . import vhdx_max_size as vhdx_max_size

HEADER_OFFSETS = (64 * KiB, 128 * KiB)
HEADER_SIZE = 4 * KiB
REGION_OFFSETS = (192 * KiB, 256 * KiB)
REGION_SIZE = 64 * KiB
MAX_REGION_ENTRIES = 2047
MAX_METADATA_ENTRIES = 2047
METADATA_TABLE_SIZE = 64 * KiB
MAX_METADATA_ITEM = 1 * MiB
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
STATE_MASK = 7
OFFSET_SHIFT = 20

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


def guid_from_bytes(b: bytes) -> uuidlib.UUID:
    return uuidlib.UUID(bytes_le=bytes(b))


def guid_bytes(u: uuidlib.UUID) -> bytes:
    return u.bytes_le


def with_checksum(buf: bytearray, at: int = 4) -> bytearray:
    struct.pack_into("<I", buf, at, 0)
    struct.pack_into("<I", buf, at, crc32c(buf))
    return buf


def checksum_ok(buf: bytes | bytearray, at: int = 4) -> bool:
    stored: int = struct.unpack_from("<I", buf, at)[0]
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


def utf16(s: str) -> bytes:
    return s.encode("utf-16-le")


