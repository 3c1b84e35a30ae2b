"""On-disk structures of Apple's UDIF disk images (DMG): the "koly" trailer, the "mish" block
table header, chunk types and limits.

Facts from the UDIF layout as documented by the libdmg/dmg2img projects and Apple's hdiutil
output (no official specification). All fields are big-endian; chunk entries (40 bytes each)
are read with ``struct`` in :mod:`.dmg`.
"""
from __future__ import annotations

from construct import Bytes, Const, Int32ub, Int64ub, Struct

SECTOR = 512
MAX_CHUNK = 64 << 20
MAX_PLIST = 16 << 20
MAX_CHUNKS = 1 << 22
MAX_SECTORS = MAX_CHUNKS * (MAX_CHUNK // SECTOR)    # 256 TiB: what the tables can describe

# UDIF trailer (512 bytes at the end of the file).
KolyTrailer = Struct(
    "signature" / Const(b"koly"),
    "version" / Int32ub,
    "header_size" / Int32ub,
    "flags" / Int32ub,
    "running_data_fork_offset" / Int64ub,
    "data_fork_offset" / Int64ub,
    "data_fork_length" / Int64ub,
    "rsrc_fork_offset" / Int64ub,
    "rsrc_fork_length" / Int64ub,
    "segment_number" / Int32ub,
    "segment_count" / Int32ub,
    "segment_id" / Bytes(16),
    "data_checksum_type" / Int32ub,
    "data_checksum_size" / Int32ub,
    "data_checksum" / Bytes(128),
    "xml_offset" / Int64ub,
    "xml_length" / Int64ub,
    "reserved1" / Bytes(120),
    "checksum_type" / Int32ub,
    "checksum_size" / Int32ub,
    "checksum" / Bytes(128),
    "image_variant" / Int32ub,
    "sector_count" / Int64ub,
    "reserved2" / Bytes(12),
)

# Block table ("mish") header; chunk entries (40 bytes each) follow and are read with struct.
MishHeader = Struct(
    "signature" / Const(b"mish"),
    "version" / Int32ub,
    "first_sector" / Int64ub,
    "sector_count" / Int64ub,
    "data_offset" / Int64ub,
    "buffers_needed" / Int32ub,
    "block_descriptors" / Int32ub,
    "reserved" / Bytes(24),
    "checksum_type" / Int32ub,
    "checksum_size" / Int32ub,
    "checksum" / Bytes(128),
    "chunk_count" / Int32ub,
)
MISH_HEADER_SIZE = 204
CHUNK_SIZE = 40

CHUNK_ZERO, CHUNK_RAW, CHUNK_IGNORE = 0x00000000, 0x00000001, 0x00000002
CHUNK_ADC, CHUNK_ZLIB, CHUNK_BZIP2, CHUNK_LZFSE, CHUNK_LZMA = (
    0x80000004, 0x80000005, 0x80000006, 0x80000007, 0x80000008)
CHUNK_COMMENT, CHUNK_END = 0x7FFFFFFE, 0xFFFFFFFF
CHUNK_NAMES = {CHUNK_ZERO: "zero", CHUNK_RAW: "raw", CHUNK_IGNORE: "ignore", CHUNK_ADC: "ADC",
               CHUNK_ZLIB: "zlib", CHUNK_BZIP2: "bzip2", CHUNK_LZFSE: "lzfse", CHUNK_LZMA: "lzma"}
