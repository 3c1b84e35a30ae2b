"""VMDK on-disk structures: the hosted sparse extent header, stream markers, the ESX COWD
header, the seSparse headers, and their constants (VMware "Virtual Disk Format 5.0"; COWD and
seSparse as qemu's block/vmdk.c reads them). All little-endian."""
from __future__ import annotations

import struct

from construct import Array, Bytes, Int8ul, Int16ul, Int32ul, Int64ul, Struct
from construct import Container as Container  # a parsed structure, for annotations

from . import COWD_MAGIC as COWD_MAGIC  # the declaration holds these (its probe's)
from . import MAGIC as MAGIC
from . import MAX_SPARSE_SIZE as MAX_SPARSE_SIZE
from . import SECTOR as SECTOR
from . import SESPARSE_MAGIC as SESPARSE_MAGIC

# -- on-disk structures ------------------------------------------------------------------------
# VMware Virtual Disk Format 5.0, "Hosted Sparse Extent Header" (SparseExtentHeader), 512 bytes.
SparseHeader = Struct(
    "magic" / Bytes(4),                 # 'KDMV'
    "version" / Int32ul,                # 1, 2 (zeroed-grain GTEs), 3 (streamOptimized)
    "flags" / Int32ul,
    "capacity" / Int64ul,               # sectors
    "grain_size" / Int64ul,             # sectors, power of two
    "descriptor_offset" / Int64ul,      # sectors (0: no embedded descriptor)
    "descriptor_size" / Int64ul,        # sectors
    "num_gtes_per_gt" / Int32ul,        # 512
    "rgd_offset" / Int64ul,             # sectors: redundant grain directory
    "gd_offset" / Int64ul,              # sectors (GD_AT_END: see the footer)
    "overhead" / Int64ul,               # sectors of metadata before the first grain
    "unclean_shutdown" / Int8ul,
    "single_end_line_char" / Bytes(1),  # '\n'
    "non_end_line_char" / Bytes(1),     # ' '
    "double_end_line_char1" / Bytes(1),  # '\r'
    "double_end_line_char2" / Bytes(1),  # '\n'
    "compress_algorithm" / Int16ul,     # 0 none, 1 deflate
    "pad" / Bytes(433),
)
assert SparseHeader.sizeof() == SECTOR

# streamOptimized markers (same note, "Stream-Optimized Compressed Sparse Extents").
GrainMarker = Struct("lba" / Int64ul, "size" / Int32ul)              # before compressed data
MARKER = struct.Struct("<QI")   # the same marker, for the per-grain paths (no construct per grain)
MetaMarker = Struct("num_sectors" / Int64ul, "size" / Int32ul, "type" / Int32ul,
                    "pad" / Bytes(496))                              # size == 0; one sector

# ESX 3 vmfsSparse ("COWD") header, as qemu's VMDK3Header reads it (first 44 bytes of 2048).
CowdHeader = Struct(
    "magic" / Bytes(4),                 # 'COWD'
    "version" / Int32ul,
    "flags" / Int32ul,
    "num_sectors" / Int32ul,            # capacity
    "grain_size" / Int32ul,             # sectors
    "gd_offset" / Int32ul,              # sectors
    "num_gd_entries" / Int32ul,
    "free_sector" / Int32ul,
    "cylinders" / Int32ul,
    "heads" / Int32ul,
    "sectors" / Int32ul,
)

# ESXi 6.5+ "seSparse" extents (not documented by VMware; layout as qemu's block/vmdk.c reads it).
SESparseConstHeader = Struct(
    "magic" / Int64ul,                  # 0xcafebabe
    "version" / Int64ul,                # 0x0000000200000001
    "capacity" / Int64ul,               # sectors
    "grain_size" / Int64ul,             # sectors (8)
    "grain_table_size" / Int64ul,       # sectors (64: 4096 u64 entries)
    "flags" / Int64ul,
    "reserved" / Array(4, Int64ul),
    "volatile_header_offset" / Int64ul,
    "volatile_header_size" / Int64ul,
    "journal_header_offset" / Int64ul,
    "journal_header_size" / Int64ul,
    "journal_offset" / Int64ul,
    "journal_size" / Int64ul,
    "grain_dir_offset" / Int64ul,       # sectors
    "grain_dir_size" / Int64ul,         # sectors
    "grain_tables_offset" / Int64ul,    # sectors
    "grain_tables_size" / Int64ul,
    "free_bitmap_offset" / Int64ul,
    "free_bitmap_size" / Int64ul,
    "backmap_offset" / Int64ul,
    "backmap_size" / Int64ul,
    "grains_offset" / Int64ul,          # sectors
    "grains_size" / Int64ul,
    "pad" / Bytes(304),
)
SESparseVolatileHeader = Struct(
    "magic" / Int64ul,                  # 0xcafecafe
    "free_gt_number" / Int64ul,
    "next_txn_seq_number" / Int64ul,
    "replay_journal" / Int64ul,
    "pad" / Bytes(480),
)
SESPARSE_VOLATILE_MAGIC = 0xCAFECAFE
SESPARSE_VERSION = 0x0000000200000001

COWD_GTES = 4096
GD_AT_END = 0xFFFFFFFFFFFFFFFF
FLAG_NL_TEST = 1 << 0
FLAG_RGD = 1 << 1
FLAG_ZERO_GRAIN = 1 << 2
FLAG_COMPRESSED = 1 << 16
FLAG_MARKERS = 1 << 17
MARKER_EOS, MARKER_GT, MARKER_GD, MARKER_FOOTER = 0, 1, 2, 3

MAX_GRAIN_SECTORS = 32768            # 16 MiB
MAX_GTES = 4096
DEFAULT_GRAIN = 128                  # 64 KiB
DEFAULT_GTES = 512
EMBEDDED_DESC_SECTORS = 20
SPLIT_SIZE = 2047 * (1 << 20)        # VirtualBox's VMDK_2G_SPLIT_SIZE

CREATE_TYPES = {
    "monolithicsparse", "monolithicflat", "twogbmaxextentsparse", "twogbmaxextentflat",
    "streamoptimized", "vmfs", "vmfsthin", "vmfssparse", "vmfspreallocated", "vmfseagerzeroedthick",
    "fulldevice", "partitioneddevice", "vmfsraw", "vmfsrawdevicemap",
    "vmfspassthroughrawdevicemap", "custom", "sesparse", "vmfsthinprovisioned",
}


def header_dict(**kw: object) -> dict:
    d = dict(magic=MAGIC, version=1, flags=FLAG_NL_TEST | FLAG_RGD, capacity=0,
             grain_size=DEFAULT_GRAIN, descriptor_offset=0, descriptor_size=0,
             num_gtes_per_gt=DEFAULT_GTES, rgd_offset=0, gd_offset=0, overhead=0,
             unclean_shutdown=0, single_end_line_char=b"\n", non_end_line_char=b" ",
             double_end_line_char1=b"\r", double_end_line_char2=b"\n", compress_algorithm=0,
             pad=bytes(433))
    d.update(kw)
    return d
