"""On-disk structures of VirtualBox's VDI container (all little-endian).

Follows VirtualBox's ``VDICore.h`` (VDIPREHEADER, VDIHEADER0, VDIHEADER1, VDIHEADER1PLUS) and qemu's
``block/vdi.c`` header description. A VDI file is::

    0x00  pre-header: 64 bytes of text ("<<< Oracle VM VirtualBox Disk Image >>>\\n"),
          signature 0xbeda107f, version (major << 16 | minor)
    0x48  header: v0 (VDIHEADER0, 348 bytes), v1.0/v1.1 (VDIHEADER1, 384 bytes) or
          v1.1+ (VDIHEADER1PLUS, 400 bytes: VDIHEADER1 followed by the LCHS geometry)
    offBlocks  block map: cBlocks little-endian uint32 entries; 0xffffffff = free (read through
          to the parent, zeroes in a base), 0xfffffffe = zero (reads as zeroes), else the index
          of the block in the data area
    offData    data area: block i at offData + i * (cbBlockExtra + cbBlock); each block starts
          with cbBlockExtra bytes private to the image, followed by the cbBlock data bytes

For v0 the map follows the header directly (0x48 + 348) and the data follows the map.
UUIDs are stored as RTUUIDs, i.e. in the little-endian field order (Python's ``bytes_le``).

The block map itself is read into an ``array('I')``, never parsed with construct.
"""
from __future__ import annotations

from construct import Bytes, Int32ul, Int64ul, Struct
from construct import Container as Container  # a parsed structure, for annotations

from . import OFF_SIGNATURE as OFF_SIGNATURE  # the declaration holds these (its probe's)
from . import OFF_VERSION as OFF_VERSION
from . import PRE_HEADER_SIZE as PRE_HEADER_SIZE
from . import SIGNATURE as SIGNATURE

VERSION_1_1 = 0x00010001
FILE_INFO = b"<<< Oracle VM VirtualBox Disk Image >>>\n"

COMMENT_SIZE = 256
BLOCK_FREE = 0xFFFFFFFF
BLOCK_ZERO = 0xFFFFFFFE

# image types (VDIIMAGETYPE)
TYPE_NORMAL = 1
TYPE_FIXED = 2
TYPE_UNDO = 3
TYPE_DIFF = 4
TYPE_NAMES = {TYPE_NORMAL: "normal", TYPE_FIXED: "fixed", TYPE_UNDO: "undo", TYPE_DIFF: "diff"}

PreHeader = Struct(
    "file_info" / Bytes(64),          # szFileInfo: free text, NUL padded
    "signature" / Int32ul,            # u32Signature
    "version" / Int32ul,              # u32Version
)
assert PreHeader.sizeof() == PRE_HEADER_SIZE

DiskGeometry = Struct(                # VDIDISKGEOMETRY
    "cylinders" / Int32ul,
    "heads" / Int32ul,
    "sectors" / Int32ul,
    "sector_size" / Int32ul,
)

Header0 = Struct(                     # VDIHEADER0 (version 0.x)
    "image_type" / Int32ul,           # u32Type
    "flags" / Int32ul,                # fFlags
    "comment" / Bytes(COMMENT_SIZE),  # szComment
    "legacy_geometry" / DiskGeometry, # LegacyGeometry (PCHS)
    "disk_size" / Int64ul,            # cbDisk
    "block_size" / Int32ul,           # cbBlock
    "blocks" / Int32ul,               # cBlocks
    "blocks_allocated" / Int32ul,     # cBlocksAllocated
    "uuid_create" / Bytes(16),
    "uuid_modify" / Bytes(16),
    "uuid_linkage" / Bytes(16),       # parent's creation UUID
)
HEADER0_SIZE = 348

_HEADER1_FIELDS = (
    "header_size" / Int32ul,          # cbHeader
    "image_type" / Int32ul,           # u32Type
    "flags" / Int32ul,                # fFlags
    "comment" / Bytes(COMMENT_SIZE),  # szComment
    "offset_blocks" / Int32ul,        # offBlocks
    "offset_data" / Int32ul,          # offData
    "legacy_geometry" / DiskGeometry, # LegacyGeometry (PCHS)
    "dummy" / Int32ul,                # u32Dummy (was the geometry translation)
    "disk_size" / Int64ul,            # cbDisk
    "block_size" / Int32ul,           # cbBlock
    "block_extra" / Int32ul,          # cbBlockExtra
    "blocks" / Int32ul,               # cBlocks
    "blocks_allocated" / Int32ul,     # cBlocksAllocated
    "uuid_create" / Bytes(16),
    "uuid_modify" / Bytes(16),
    "uuid_linkage" / Bytes(16),       # parent's creation UUID
    "uuid_parent_modify" / Bytes(16), # parent's modification UUID when linked
)
Header1 = Struct(*_HEADER1_FIELDS)    # VDIHEADER1 (versions 1.0 and 1.1)
HEADER1_SIZE = 384
Header1Plus = Struct(*_HEADER1_FIELDS, "lchs" / DiskGeometry)   # VDIHEADER1PLUS (1.1+)
HEADER1PLUS_SIZE = 400

# byte offsets of the fields (for error messages and targeted updates)
H1 = {  # absolute offsets of VDIHEADER1 fields
    "header_size": 0x48, "image_type": 0x4C, "flags": 0x50, "comment": 0x54,
    "offset_blocks": 0x154, "offset_data": 0x158, "legacy_geometry": 0x15C, "dummy": 0x16C,
    "disk_size": 0x170, "block_size": 0x178, "block_extra": 0x17C, "blocks": 0x180,
    "blocks_allocated": 0x184, "uuid_create": 0x188, "uuid_modify": 0x198,
    "uuid_linkage": 0x1A8, "uuid_parent_modify": 0x1B8, "lchs": 0x1C8,
}
H0 = {  # absolute offsets of VDIHEADER0 fields
    "image_type": 0x48, "flags": 0x4C, "comment": 0x50, "legacy_geometry": 0x150,
    "disk_size": 0x160, "block_size": 0x168, "blocks": 0x16C, "blocks_allocated": 0x170,
    "uuid_create": 0x174, "uuid_modify": 0x184, "uuid_linkage": 0x194,
}

assert PreHeader.sizeof() == PRE_HEADER_SIZE
assert Header0.sizeof() == HEADER0_SIZE
assert Header1.sizeof() == HEADER1_SIZE
assert Header1Plus.sizeof() == HEADER1PLUS_SIZE
