"""On-disk structures of VirtualBox's cache image (VCI).

Source: VirtualBox ``src/VBox/Storage/VCICache.cpp`` (VciHdr, VciBlkMap, VciTreeNode,
VciCacheExtent, VciTreeNodeInternal). All fields little-endian; addresses and sizes count
512-byte blocks. The allocation bitmap (one bit per block, bit 0 of byte 0 = block 0) and the
extent arrays inside a tree node are handled as bytes in :mod:`.vci`.
"""
from __future__ import annotations

from construct import Bytes, Const, Int8ul, Int32ul, Int64ul, Padding, Struct

BLOCK = 512
SIGNATURE = 0x00494356          # "VCI\0" read as bytes
VERSION = 1
CLEAN, UNCLEAN = 0, 1
TYPE_DYNAMIC, TYPE_FIXED = 1, 2

# VciHdr: 2 blocks at block 0
VciHeader = Struct(
    "signature" / Int32ul,
    "version" / Int32ul,
    "blocks_cache" / Int64ul,       # the largest the cache file may grow, metadata included
    "unclean" / Int8ul,
    "cache_type" / Int32ul,
    "tree_root" / Int64ul,          # block address of the B+-tree root node
    "blkmap" / Int64ul,             # block address of the block map (its header first)
    "blkmap_blocks" / Int32ul,      # its header + bitmap, in blocks
    "uuid_image" / Bytes(16),
    "uuid_modification" / Bytes(16),
    Padding(951),
)
HEADER_SIZE = 2 * BLOCK
OFF_UNCLEAN = 16

BLKMAP_MAGIC = 0x4B4C4256       # "VBLK"
BLKMAP_VERSION = 1

# VciBlkMap: one block, then the bitmap
VciBlockMap = Struct(
    "magic" / Const(BLKMAP_MAGIC, Int32ul),
    "version" / Int32ul,
    "blocks" / Int64ul,
    "blocks_free" / Int64ul,
    "blocks_meta" / Int64ul,
    "blocks_data" / Int64ul,
    Padding(472),
)

# VciTreeNode: 4096 bytes, a type byte then entries
NODE_SIZE = 8 * BLOCK
NODE_INTERNAL, NODE_LEAF = 1, 2
NodeType = Struct("type" / Int8ul)

# VciCacheExtent (38 bytes): a run of cached disk blocks and where they are in the file
VciExtent = Struct(
    "lru_prev" / Int64ul,
    "lru_next" / Int64ul,
    "flags" / Int8ul,
    "reserved" / Int8ul,
    "disk_block" / Int64ul,
    "blocks" / Int32ul,
    "file_block" / Int64ul,
)
EXTENT_SIZE = 38
EXTENTS_PER_NODE = (NODE_SIZE - 1) // EXTENT_SIZE          # 107

# VciTreeNodeInternal (20 bytes): a child node covering a range of disk blocks
VciInternal = Struct(
    "disk_block" / Int64ul,
    "blocks" / Int32ul,
    "child" / Int64ul,
)
INTERNAL_SIZE = 20
INTERNALS_PER_NODE = (NODE_SIZE - 1) // INTERNAL_SIZE      # 204
MAX_TREE_DEPTH = 8
