"""On-disk structures of qemu's QCOW (version 1) and QCOW2 (versions 2 and 3) formats.

Specification: qemu ``docs/interop/qcow2.txt`` (header, header extensions, feature name table,
bitmaps extension, refcount table/blocks, L1/L2 entries, extended L2 entries, snapshot table).
QCOW version 1 has no published specification; its header is the one qemu's ``block/qcow.c``
reads (48 bytes, big-endian). All numbers are big-endian.

Headers, extensions and snapshot entries are ``construct`` Structs; the L1/L2/refcount tables are
handled as arrays in :mod:`.clusters` and :mod:`.refcount`.
"""
from __future__ import annotations

from construct import Bytes, Const, Int8ub, Int16ub, Int32ub, Int64ub, Struct

from . import MAGIC as MAGIC  # the declaration holds them (cheap to import)
from . import MAX_L1_BYTES as MAX_L1_BYTES

# qcow2.txt "Header", bytes 0-71 (the whole version 2 header)
Qcow2HeaderV2 = Struct(
    "magic" / Const(MAGIC),
    "version" / Int32ub,
    "backing_file_offset" / Int64ub,
    "backing_file_size" / Int32ub,
    "cluster_bits" / Int32ub,
    "size" / Int64ub,
    "crypt_method" / Int32ub,
    "l1_size" / Int32ub,
    "l1_table_offset" / Int64ub,
    "refcount_table_offset" / Int64ub,
    "refcount_table_clusters" / Int32ub,
    "nb_snapshots" / Int32ub,
    "snapshots_offset" / Int64ub,
)
V2_HEADER_SIZE = 72

# qcow2.txt "Header", bytes 72-103 (version 3 and higher)
Qcow2HeaderV3Tail = Struct(
    "incompatible_features" / Int64ub,
    "compatible_features" / Int64ub,
    "autoclear_features" / Int64ub,
    "refcount_order" / Int32ub,
    "header_length" / Int32ub,
)
V3_HEADER_MIN = 104
COMPRESSION_TYPE_OFFSET = 104    # "Additional fields": one byte, present when header_length > 104

# Header field offsets used for in-place updates
OFF_BACKING_FILE_OFFSET = 8
OFF_BACKING_FILE_SIZE = 16
OFF_SIZE = 24
OFF_L1_SIZE = 36
OFF_L1_TABLE_OFFSET = 40
OFF_REFCOUNT_TABLE_OFFSET = 48
OFF_REFCOUNT_TABLE_CLUSTERS = 56
OFF_INCOMPATIBLE = 72
OFF_AUTOCLEAR = 88


def _field_offsets(s: Struct, start: int) -> dict[str, int]:
    out, pos = {}, start
    for sc in s.subcons:
        out[sc.name] = pos
        pos += sc.sizeof()
    return out


# every header field's byte offset, for errors that name the field
HEADER_OFFSETS = {**_field_offsets(Qcow2HeaderV2, 0),
                  **_field_offsets(Qcow2HeaderV3Tail, V2_HEADER_SIZE),
                  "compression_type": COMPRESSION_TYPE_OFFSET}

# qcow2.txt "Header extensions"
HeaderExtension = Struct(
    "type" / Int32ub,
    "length" / Int32ub,
)
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

# qcow2.txt "Feature name table": one 48-byte entry
FeatureNameEntry = Struct(
    "type" / Int8ub,
    "bit" / Int8ub,
    "name" / Bytes(46),
)

# qcow2.txt "Bitmaps extension"
BitmapsExtension = Struct(
    "nb_bitmaps" / Int32ub,
    "reserved" / Int32ub,
    "bitmap_directory_size" / Int64ub,
    "bitmap_directory_offset" / Int64ub,
)

# qcow2.txt "Bitmap directory" entry, fixed part (followed by extra data, name, padding to 8)
BitmapDirEntry = Struct(
    "bitmap_table_offset" / Int64ub,
    "bitmap_table_size" / Int32ub,
    "flags" / Int32ub,
    "type" / Int8ub,
    "granularity_bits" / Int8ub,
    "name_size" / Int16ub,
    "extra_data_size" / Int32ub,
)

# qcow2.txt "Snapshot table entry", fixed part (followed by extra data, id, name, padding to 8)
SnapshotEntry = Struct(
    "l1_table_offset" / Int64ub,
    "l1_size" / Int32ub,
    "id_str_size" / Int16ub,
    "name_size" / Int16ub,
    "date_sec" / Int32ub,
    "date_nsec" / Int32ub,
    "vm_clock_nsec" / Int64ub,
    "vm_state_size" / Int32ub,
    "extra_data_size" / Int32ub,
)
SNAPSHOT_FIXED_SIZE = 40

# QCOW version 1 header (qemu block/qcow.c QCowHeader), 48 bytes
QcowV1Header = Struct(
    "magic" / Const(MAGIC),
    "version" / Int32ub,
    "backing_file_offset" / Int64ub,
    "backing_file_size" / Int32ub,
    "mtime" / Int32ub,
    "size" / Int64ub,
    "cluster_bits" / Int8ub,
    "l2_bits" / Int8ub,
    "padding" / Int16ub,
    "crypt_method" / Int32ub,
    "l1_table_offset" / Int64ub,
)
V1_HEADER_SIZE = 48

# Feature bits (qcow2.txt, header bytes 72-95)
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = (INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION
                  | INCOMPAT_EXTL2)
COMPAT_LAZY_REFCOUNTS = 1 << 0
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1

INCOMPAT_NAMES = {0: "dirty", 1: "corrupt", 2: "external data file", 3: "compression type",
                  4: "extended L2 entries"}
COMPAT_NAMES = {0: "lazy refcounts"}
AUTOCLEAR_NAMES = {0: "bitmaps", 1: "raw external data"}

# L1 / L2 / refcount table entries (qcow2.txt "Cluster mapping", "Host cluster management")
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
L1E_RESERVED_MASK = 0x7F000000000001FF
L2E_STD_RESERVED_MASK = 0x3F000000000001FE
REFT_RESERVED_MASK = 0x1FF
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1 << 0

# qemu's implementation limits (block/qcow2.h), applied as caps on hostile headers
MAX_REFTABLE_BYTES = 8 << 20
MAX_SNAPSHOTS = 65536
MAX_SNAPSHOT_EXTRA = 1024
MAX_SNAPSHOTS_BYTES = 1024 * MAX_SNAPSHOTS
MAX_BACKING_NAME = 1023
MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
