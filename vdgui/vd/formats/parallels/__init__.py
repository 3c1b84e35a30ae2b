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
import shutil
import uuid as uuidlib

from ...align import align_up, ceil_div
from ...backend import (
    Backend,
    Cap,
    CreateParams,
    FileExtension,
    ImageFlags,
    OpenFlags,
    Operation,
    ProbeInput,
    too_large,
)
from ...config import ConfigKey, KeyFlag, ValueType, parse_config
from ...errors import FileExists, InvalidArgument, NotSupported, require_text
from ...fileio import ImageFile, temp_name
from ...image import Image
from .bundle import _DESCRIPTOR, ParallelsBundleImage, _xml_escape
from .image import ParallelsImage, _limit_reason, _write_new_image
from .layout import *  # noqa: F403  (the structures and constants, as parallels.py exported them)
from .layout import (
    DEFAULT_CLUSTER,
    DESCRIPTOR_NAME,
    HEADER_SIZE,
    MAGIC_EXT,
    MAGIC_V2,
    MAX_BAT_ENTRIES,
    MAX_CLUSTER,
    SECTOR,
    TOP_GUID,
)


class ParallelsBackend(Backend):
    name = "Parallels"
    description = "Parallels expanding disk image (also name.hdd bundles)"
    aliases = ("parallels", "hdd")
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

    def open(self, location: str, flags: OpenFlags = OpenFlags.NORMAL,
             config: dict | None = None) -> Image:
        parse_config(self.config_keys, config, owner=self.name)
        if os.path.isdir(location):
            return ParallelsBundleImage(self, location, os.path.join(location, DESCRIPTOR_NAME),
                                        flags)
        if os.path.basename(location) == DESCRIPTOR_NAME:
            return ParallelsBundleImage(self, location, location, flags)
        f = ImageFile(location, writable=not flags.read_only)
        return ParallelsImage(self, location, f, flags)

    def create(self, p: CreateParams) -> ParallelsImage | ParallelsBundleImage:
        if p.parent is not None:
            raise NotSupported("Parallels differencing images (bundle snapshots) cannot be "
                               "created by this backend")
        cfg = parse_config(self.config_keys, p.config, creating=True, owner=self.name)
        cl = cfg["ClusterSize"]
        if cl % SECTOR or cl > MAX_CLUSTER:
            raise InvalidArgument(f"Parallels ClusterSize must be a multiple of 512 up to 64 MiB, "
                                  f"found {cl}")
        size = p.size
        if size <= 0 or size % SECTOR:
            raise InvalidArgument(f"Parallels image size must be a positive multiple of 512, "
                                  f"found {size}")
        if size > MAX_BAT_ENTRIES * cl:       # an image the opener would refuse is never made
            raise too_large("Parallels", size, MAX_BAT_ENTRIES * cl, p.location,
                            _limit_reason(cl))
        if cfg["Bundle"]:
            return self._create_bundle(p, size, cl)
        f = ImageFile.create_temp(p.location)
        try:
            _write_new_image(f, size, cl, MAGIC_EXT)
            if p.progress:
                p.progress(size, size)
            f.commit()
        except BaseException:
            f.abandon()
            raise
        return ParallelsImage(self, p.location, f, OpenFlags.NORMAL, fresh=True)

    def _create_bundle(self, p: CreateParams, size: int, cl: int) -> ParallelsBundleImage:
        """A ``name.hdd`` folder as Parallels Desktop lays it out: DiskDescriptor.xml, one
        expanding ``.hds`` extent, an empty ``name.hdd`` placeholder. Built in a temporary folder
        beside the target and renamed into place when complete."""
        final = os.path.abspath(p.location)
        if os.path.lexists(final):
            raise FileExists(f"{final}: file already exists")
        require_text(os.path.basename(final), "the bundle's file name", final)
        tmp = temp_name(final)
        shutil.rmtree(tmp, ignore_errors=True)
        os.mkdir(tmp)
        try:
            name = os.path.basename(final)
            guid = TOP_GUID           # the base snapshot of every real bundle (ploop, dissect)
            hds = f"{name}.0.{guid}.hds"
            # "WithoutFreeSpace" as Parallels Desktop writes it, unless offsets need 64 bits
            data_off = align_up(HEADER_SIZE + 4 * ceil_div(size, cl), cl)
            small = (data_off + align_up(size, cl)) // SECTOR <= 0xFFFFFFFF
            with ImageFile(os.path.join(tmp, hds), create=True) as f:
                _write_new_image(f, size, cl, MAGIC_V2 if small else MAGIC_EXT)
            uid = "{" + str(p.uuid or uuidlib.uuid4()) + "}"
            sectors = size // SECTOR
            desc = _DESCRIPTOR.format(
                sectors=sectors, cylinders=min(sectors // (16 * 32), 0xFFFFFFFF), uid=uid,
                name=_xml_escape(os.path.splitext(name)[0]), blocksize=cl // SECTOR,
                file=_xml_escape(hds), guid=guid)
            with open(os.path.join(tmp, DESCRIPTOR_NAME), "w", encoding="utf-8") as fh:
                fh.write(desc)
                fh.flush()
                os.fsync(fh.fileno())
            open(os.path.join(tmp, name), "wb").close()
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if p.progress:
            p.progress(size, size)
        return ParallelsBundleImage(self, final, os.path.join(final, DESCRIPTOR_NAME),
                                    OpenFlags.NORMAL)


BACKEND = ParallelsBackend()
