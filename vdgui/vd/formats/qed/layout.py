"""On-disk structures of qemu's QED format: the header and its feature bits and limits.

Specification: qemu ``docs/interop/qed_spec.txt`` ("Header"). All fields are little-endian. The
L1/L2 tables are handled as arrays in :mod:`.qed`.
"""
from __future__ import annotations

from construct import Const, Int32ul, Int64ul, Struct

from . import MAGIC as MAGIC  # the declaration holds these (cheap to import)
from . import MAX_CLUSTER as MAX_CLUSTER
from . import MAX_TABLE_SIZE as MAX_TABLE_SIZE
from . import MIN_CLUSTER as MIN_CLUSTER

# qed_spec.txt "Header" (64 bytes, little-endian)
QedHeader = Struct(
    "magic" / Const(MAGIC),
    "cluster_size" / Int32ul,
    "table_size" / Int32ul,
    "header_size" / Int32ul,
    "features" / Int64ul,
    "compat_features" / Int64ul,
    "autoclear_features" / Int64ul,
    "l1_table_offset" / Int64ul,
    "image_size" / Int64ul,
    "backing_filename_offset" / Int32ul,
    "backing_filename_size" / Int32ul,
)
HEADER_SIZE = 64

F_BACKING_FILE = 0x01
F_NEED_CHECK = 0x02
F_BACKING_FORMAT_NO_PROBE = 0x04
F_KNOWN = F_BACKING_FILE | F_NEED_CHECK | F_BACKING_FORMAT_NO_PROBE

OFF_FEATURES = 16
OFF_AUTOCLEAR = 32
OFF_IMAGE_SIZE = 48

MAX_TABLE_BYTES = 64 << 20      # refuse (rather than allocate) larger tables
MAX_BACKING_NAME = 4095
CLUSTER_ZERO = 1
