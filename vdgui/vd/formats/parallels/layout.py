"""On-disk structures of the Parallels format (version 2 "WithoutFreeSpace" images and their
"WithouFreSpacExt" variant) and the constants of its bundle folders (DiskDescriptor.xml).

Specification: qemu ``docs/interop/parallels.txt`` ("Header", "Format Extension"). All fields
are little-endian. The BAT is handled as an array in :mod:`.image`.
"""
from __future__ import annotations

from construct import Bytes, Int32ul, Int64ul, Struct

SECTOR = 512
MAGIC_V2 = b"WithoutFreeSpace"
MAGIC_EXT = b"WithouFreSpacExt"
VERSION = 2
INUSE_MAGIC = 0x746F6E59
CLOSED_MAGIC = 0x312E3276
FLAG_EMPTY = 1
MAX_CLUSTER = 64 << 20
DEFAULT_CLUSTER = 1 << 20
MAX_DESCRIPTOR = 1 << 20
MAX_BAT_ENTRIES = 16 << 20      # a 64 MiB BAT (16 TiB with 1 MiB clusters)
MAX_EXTENTS = 4096
MAX_SNAPSHOTS = 1024
DESCRIPTOR_NAME = "DiskDescriptor.xml"
ZERO_GUID = "{00000000-0000-0000-0000-000000000000}"
# Parallels Desktop and ploop name a disk's base snapshot with this predefined GUID, and readers
# (ploop, dissect.hypervisor) look for it when a descriptor has no TopGUID
TOP_GUID = "{5fbaabe3-6958-40ff-92a7-860e329aab41}"

# qemu docs/interop/parallels.txt, "Header"
Header = Struct(
    "magic" / Bytes(16),
    "version" / Int32ul,
    "heads" / Int32ul,
    "cylinders" / Int32ul,
    "tracks" / Int32ul,          # cluster size in sectors
    "bat_entries" / Int32ul,
    "nb_sectors" / Int64ul,
    "inuse" / Int32ul,
    "data_off" / Int32ul,        # sectors
    "flags" / Int32ul,
    "ext_off" / Int64ul,         # sectors
)
# qemu docs/interop/parallels.txt, "Format Extension" (first 24 bytes)
FormatExtensionHeader = Struct(
    "magic" / Int64ul,           # 0xAB234CEF23DCEA87
    "checksum" / Bytes(16),      # MD5
)
EXT_MAGIC = 0xAB234CEF23DCEA87
STRUCTS = {"Header": Header, "FormatExtensionHeader": FormatExtensionHeader}
HEADER_SIZE = 64
