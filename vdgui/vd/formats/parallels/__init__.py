"""Parallels backend: the expanding ("Compressed") image format of Parallels Desktop / Virtuozzo,
and the ``name.hdd/`` bundle that holds it.

Specification: qemu's ``docs/interop/parallels.txt`` ("Parallels Expandable Image File Format").
Facts used:

* a 64-byte header (magic "WithoutFreeSpace" or "WithouFreSpacExt", version 2, geometry, cluster
  size in sectors ("tracks"), BAT entry count, size in sectors, in_use, data_off, flags, ext_off),
  then the BAT (32-bit entries), then the data area.
* a BAT entry is a cluster's file offset: in sectors for "WithoutFreeSpace" images, in clusters
  for "WithouFreSpacExt" images; 0 means unallocated (reads as zeroes). Offsets are >= the data
  offset, (offset - data offset) is cluster aligned, below the file size, and unique.
* "WithoutFreeSpace": only the low 32 bits of nb_sectors count; data_off 0 means "right after the
  BAT, sector aligned". "WithouFreSpacExt": data_off is non-zero and cluster aligned.
* in_use is 0x746F6E59 while software has the image open read-write. qemu writes 0 on close, the
  document names 0x312e3276; Parallels Desktop itself writes other values (e.g. "pd17"); only the
  in-use magic means "not closed cleanly". A dirty image is checked (and repaired) when opened
  read-write and read as it is when opened read-only.
* We never set in_use: every update is ordered crash-safe (data, sync, BAT entry; a kill leaves
  at most a leaked cluster at the end), so the flag would only make a killed session look corrupt
  to us and to qemu. Our locks (also at qemu's offsets) keep other writers out while we hold it.
  Repairing a dirty image clears the flag after the repairs are synced; other values are kept.
* flags bit 0: the image is empty (all clusters read as zeroes).

Bundles (Parallels Desktop): a folder ``name.hdd`` holds ``DiskDescriptor.xml`` (disk parameters,
``StorageData`` of ``Storage`` extents with Start/End in sectors and one ``Image`` per snapshot
(GUID, Type Compressed|Plain, File), and ``Snapshots`` of ``Shot`` GUID/ParentGUID). Opening the
folder or its descriptor reads the extents in order, each through its snapshot chain up to the
current (top) snapshot. Names in the descriptor are confined to the bundle folder.

Operations: create (a single expanding file, "WithouFreSpacExt" like qemu; or with Bundle=1 a
Parallels Desktop bundle folder), write, check/repair (in_use left set, BAT entries outside the
data area or past the end of the file, clusters shared by two entries (copied apart), space
leaked at the end), resize (grow, while the BAT fits before the data area), compact. An image
carrying a format extension (dirty bitmaps) opens read-only. Differencing images are not
created: a lone file has no parent link (VirtualBox's DIFF capability is a flag only).

Limits (parser safety): cluster <= 64 MiB, BAT <= 16 Mi entries and inside the file,
descriptor <= 1 MiB and no DTD,
<= 4096 extents, <= 1024 snapshots.
"""
from __future__ import annotations

import os

from ...backend import Backend, Cap, FileExtension, ImageFlags, Operation, ProbeInput, lazy_exports
from ...config import ConfigKey, KeyFlag, ValueType

# the format's constants: what the declaration and its probe need, without the layout's
# construct structures or the image code
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


def _limit_reason(cl: int) -> str:
    return (f" with {cl}-byte clusters (vdgui opens BATs of at most {MAX_BAT_ENTRIES} entries; "
            "a larger ClusterSize allows more)")


class ParallelsBackend(Backend):
    name = "Parallels"
    description = "Parallels expanding disk image (also name.hdd bundles)"
    aliases = ("parallels", "hdd")
    resize_keeps_child_links = True   # children (of other formats) name it by file name only
    caps = Cap.FILE | Cap.ASYNC | Cap.VFS | Cap.CREATE_DYNAMIC
    extensions = (FileExtension("hdd"), FileExtension("hds"))
    config_keys = (
        ConfigKey("ClusterSize", str(DEFAULT_CLUSTER), ValueType.INTEGER, KeyFlag.CREATEONLY,
                  "the unit of allocation (a multiple of 512, at most 64 MiB)",
                  minimum=SECTOR, maximum=MAX_CLUSTER, label="Cluster size", unit="bytes"),
        ConfigKey("Bundle", "0", ValueType.INTEGER, KeyFlag.CREATEONLY,
                  "create a Parallels Desktop bundle (a name.hdd folder holding "
                  "DiskDescriptor.xml and one .hds extent) instead of a single file",
                  minimum=0, maximum=1, label="Parallels Desktop bundle"),
    )
    operations = frozenset({Operation.WRITE, Operation.CREATE, Operation.CHECK, Operation.REPAIR,
                            Operation.RESIZE, Operation.COMPACT, Operation.DISCARD})
    create_flags = ImageFlags.NONE
    size_granularity = SECTOR
    impl_module = f"{__name__}.impl"
    max_size = MAX_BAT_ENTRIES * DEFAULT_CLUSTER     # 16 TiB with the default 1 MiB clusters

    def max_size_for(self, config: dict | None = None) -> int:
        return MAX_BAT_ENTRIES * self.config_int(config, "ClusterSize")

    def limit_reason(self, config: dict | None = None) -> str:
        return _limit_reason(self.config_int(config, "ClusterSize"))

    bundle_descriptor = DESCRIPTOR_NAME     # registry: a name.hdd/ folder probes through it

    def probe(self, src: ProbeInput) -> int:
        if src.head[:16] in (MAGIC_V2, MAGIC_EXT):
            return 100
        if b"<Parallels_disk_image" in src.head[:4096] and (
                os.path.basename(src.path) == DESCRIPTOR_NAME or os.path.isdir(src.path)):
            return 100
        return 0


BACKEND = ParallelsBackend()
__getattr__ = lazy_exports(__name__, "impl", "image", "bundle", "layout")
