"""On-disk structures of a FAT12 floppy: the boot sector with its BIOS parameter block, the
32-byte directory entry and the long-name (VFAT) entry.

Specification: Microsoft "FAT: General Overview of On-Disk Format" (fatgen103, 2000):
section 3 (boot sector and BPB, FAT12/16 fields from offset 36), section 6 (directory entry),
section 7 (long file names). All fields are little-endian.
"""
from __future__ import annotations

from construct import Bytes, Const, Int8ul, Int16ul, Int32ul, Struct

SECTOR = 512
DIR_ENTRY = 32
LFN_CHARS = 13                 # UCS-2 characters per long-name entry
MAX_LFN = 255                  # UCS-2 characters in one long name

ATTR_READ_ONLY = 0x01
ATTR_VOLUME_ID = 0x08
ATTR_DIRECTORY = 0x10
ATTR_ARCHIVE = 0x20
ATTR_LONG_NAME = 0x0F
LFN_LAST = 0x40                # set in the sequence number of the last (first stored) entry

# fatgen103 section 3.1 + 3.2 (FAT12 and FAT16): 62 bytes, boot code follows; 0x55AA at 510
BootSector = Struct(
    "jump" / Bytes(3),
    "oem_name" / Bytes(8),
    "bytes_per_sector" / Int16ul,
    "sectors_per_cluster" / Int8ul,
    "reserved_sectors" / Int16ul,
    "fat_count" / Int8ul,
    "root_entries" / Int16ul,
    "total_sectors_16" / Int16ul,
    "media" / Int8ul,
    "sectors_per_fat" / Int16ul,
    "sectors_per_track" / Int16ul,
    "heads" / Int16ul,
    "hidden_sectors" / Int32ul,
    "total_sectors_32" / Int32ul,
    "drive_number" / Int8ul,
    "reserved1" / Int8ul,
    "boot_signature" / Const(0x29, Int8ul),
    "volume_id" / Int32ul,
    "volume_label" / Bytes(11),
    "fs_type" / Bytes(8),
)
BOOT_CODE_OFFSET = 62
SIGNATURE_OFFSET = 510
SIGNATURE = b"\x55\xaa"

# fatgen103 section 6: the short (8.3) entry
DirEntry = Struct(
    "name" / Bytes(11),
    "attr" / Int8ul,
    "nt_reserved" / Int8ul,
    "create_tenths" / Int8ul,
    "create_time" / Int16ul,
    "create_date" / Int16ul,
    "access_date" / Int16ul,
    "cluster_high" / Int16ul,
    "write_time" / Int16ul,
    "write_date" / Int16ul,
    "cluster" / Int16ul,
    "size" / Int32ul,
)

# fatgen103 section 7: one long-name entry (13 UCS-2 characters in three pieces)
LfnEntry = Struct(
    "order" / Int8ul,
    "name1" / Bytes(10),
    "attr" / Const(ATTR_LONG_NAME, Int8ul),
    "type" / Const(0, Int8ul),
    "checksum" / Int8ul,
    "name2" / Bytes(12),
    "cluster" / Const(0, Int16ul),
    "name3" / Bytes(4),
)
