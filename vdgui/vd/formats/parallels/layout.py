"""On-disk structures of the Parallels format (version 2 "WithoutFreeSpace" images and their
"WithouFreSpacExt" variant) and the constants of its bundle folders (DiskDescriptor.xml).

Specification: qemu ``docs/interop/parallels.txt`` ("Header", "Format Extension"). All fields
are little-endian. The BAT is handled as an array in :mod:`.image`.
"""
from __future__ import annotations

from construct import Bytes, Int32ul, Int64ul, Struct

from . import CLOSED_MAGIC as CLOSED_MAGIC  # the declaration holds these (cheap to import)
from . import DEFAULT_CLUSTER as DEFAULT_CLUSTER
from . import DESCRIPTOR_NAME as DESCRIPTOR_NAME
from . import FLAG_EMPTY as FLAG_EMPTY
from . import INUSE_MAGIC as INUSE_MAGIC
from . import MAGIC_EXT as MAGIC_EXT
from . import MAGIC_V2 as MAGIC_V2
from . import MAX_BAT_ENTRIES as MAX_BAT_ENTRIES
from . import MAX_CLUSTER as MAX_CLUSTER
from . import MAX_DESCRIPTOR as MAX_DESCRIPTOR
from . import MAX_EXTENTS as MAX_EXTENTS
from . import MAX_SNAPSHOTS as MAX_SNAPSHOTS
from . import SECTOR as SECTOR
from . import TOP_GUID as TOP_GUID
from . import VERSION as VERSION
from . import ZERO_GUID as ZERO_GUID

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
