"""On-disk structures of the VHD format: the hard disk footer, the dynamic disk header and its
parent locator entries, and their constants.

Specification: Microsoft "Virtual Hard Disk Image Format Specification" (October 2006), "Hard
Disk Footer Format" and "Dynamic Disk Header Format". All fields are big-endian. The BAT and the
block bitmaps are handled as arrays in :mod:`.image`.
"""
from __future__ import annotations

from construct import Array, Bytes, Int8ub, Int16ub, Int32ub, Int64ub, Struct
from construct import Container as Container  # a parsed structure, for annotations

from . import COOKIE as COOKIE  # the declaration holds these (cheap to import)
from . import FOOTER_CHECKSUM_AT as FOOTER_CHECKSUM_AT
from . import FOOTER_SIZE as FOOTER_SIZE
from . import MAX_VIRTUAL as MAX_VIRTUAL
from . import SECTOR as SECTOR
from . import TYPE_DIFF as TYPE_DIFF
from . import TYPE_DYNAMIC as TYPE_DYNAMIC
from . import TYPE_FIXED as TYPE_FIXED
from . import TYPE_NAMES as TYPE_NAMES

# -- on-disk structures (VHD specification, "Hard Disk Footer Format" and "Dynamic Disk Header
#    Format"; all fields big-endian) -------------------------------------------------------------
FOOTER = Struct(
    "cookie" / Bytes(8),               # "conectix"
    "features" / Int32ub,              # bit 0 temporary, bit 1 reserved (always set)
    "version" / Int32ub,               # 0x00010000
    "data_offset" / Int64ub,           # dynamic header offset; 0xFFFFFFFFFFFFFFFF for fixed disks
    "timestamp" / Int32ub,             # seconds since 2000-01-01 00:00:00 UTC
    "creator_app" / Bytes(4),          # "vpc ", "vs  ", "win ", "qemu", "vbox"...
    "creator_version" / Int32ub,       # major << 16 | minor
    "creator_os" / Bytes(4),           # "Wi2k" or "Mac "
    "original_size" / Int64ub,
    "current_size" / Int64ub,
    "cylinders" / Int16ub,
    "heads" / Int8ub,
    "sectors" / Int8ub,
    "disk_type" / Int32ub,             # 2 fixed, 3 dynamic, 4 differencing
    "checksum" / Int32ub,
    "unique_id" / Bytes(16),
    "saved_state" / Int8ub,
    "reserved" / Bytes(427),
)

PARENT_LOCATOR = Struct(
    "code" / Bytes(4),                 # "W2ru", "W2ku", "Wi2r", "Wi2k", "Mac ", "MacX" or zeros
    "data_space" / Int32ub,            # space reserved (bytes in practice; the spec says sectors)
    "data_length" / Int32ub,           # bytes of locator data
    "reserved" / Int32ub,
    "data_offset" / Int64ub,           # absolute file offset of the locator data
)

DYN_HEADER = Struct(
    "cookie" / Bytes(8),               # "cxsparse"
    "data_offset" / Int64ub,           # unused: 0xFFFFFFFFFFFFFFFF
    "table_offset" / Int64ub,          # BAT offset
    "version" / Int32ub,               # 0x00010000
    "max_table_entries" / Int32ub,
    "block_size" / Int32ub,            # default 2 MiB
    "checksum" / Int32ub,
    "parent_uuid" / Bytes(16),
    "parent_timestamp" / Int32ub,
    "reserved1" / Int32ub,
    "parent_name" / Bytes(512),        # UTF-16BE parent file name
    "locators" / Array(8, PARENT_LOCATOR),
    "reserved2" / Bytes(256),
)
HEADER_SIZE = 1024
HEADER_CHECKSUM_AT = 36

DYN_COOKIE = b"cxsparse"
FREE = 0xFFFFFFFF
NO_OFFSET = 0xFFFFFFFFFFFFFFFF
DEFAULT_BLOCK = 2 << 20
MAX_BLOCK = 256 << 20
MAX_LOCATOR = 64 << 10
MAX_READ_VIRTUAL = 1 << 41                # dynamic disks larger than 2 TiB are refused on open
MAX_GEOMETRY = (65535, 16, 255)
VHD_EPOCH = 946684800                     # 2000-01-01T00:00:00Z in Unix time
CURRENT_SIZE_CREATORS = (b"win ", b"qem2", b"d2v ", b"CTXS", b"tap\x00")
CREATOR_APP = b"vbox"
CREATOR_VERSION = 0x00070000              # "7.0", VirtualBox-style
CREATOR_OS = b"Wi2k"
LOCATOR_SPACE = 1024                      # VirtualBox reserves 512 UTF-16 characters per locator
