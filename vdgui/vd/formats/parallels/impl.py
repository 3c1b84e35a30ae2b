"""The Parallels backend's open and create (its declaration and probe are the package's)."""
from __future__ import annotations

import os
import shutil
import uuid as uuidlib

from ...align import align_up, ceil_div
from ...backend import (
    CreateParams,
    OpenFlags,
    too_large,
)
from ...config import parse_config
from ...errors import FileExists, InvalidArgument, NotSupported, require_text
from ...fileio import ImageFile, temp_name
from ...image import Image
from . import ParallelsBackend, _limit_reason
from .bundle import _DESCRIPTOR, ParallelsBundleImage, _xml_escape
from .image import ParallelsImage, _write_new_image
from .layout import (
    DESCRIPTOR_NAME,
    HEADER_SIZE,
    MAGIC_EXT,
    MAGIC_V2,
    MAX_BAT_ENTRIES,
    MAX_CLUSTER,
    SECTOR,
    TOP_GUID,
)


def open_image(backend: ParallelsBackend, location: str, flags: OpenFlags = OpenFlags.NORMAL,
         config: dict | None = None) -> Image:
    parse_config(backend.config_keys, config, owner=backend.name)
    if os.path.isdir(location):
        return ParallelsBundleImage(backend, location, os.path.join(location, DESCRIPTOR_NAME),
                                    flags)
    if os.path.basename(location) == DESCRIPTOR_NAME:
        return ParallelsBundleImage(backend, location, location, flags)
    f = ImageFile(location, writable=not flags.read_only)
    return ParallelsImage(backend, location, f, flags)


def create_image(backend: ParallelsBackend,
                 p: CreateParams) -> ParallelsImage | ParallelsBundleImage:
    if p.parent is not None:
        raise NotSupported("Parallels differencing images (bundle snapshots) cannot be "
                           "created by this backend")
    cfg = parse_config(backend.config_keys, p.config, creating=True, owner=backend.name)
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
        return create_bundle(backend, p, size, cl)
    f = ImageFile.create_temp(p.location)
    try:
        _write_new_image(f, size, cl, MAGIC_EXT)
        if p.progress:
            p.progress(size, size)
        f.commit()
    except BaseException:
        f.abandon()
        raise
    return ParallelsImage(backend, p.location, f, OpenFlags.NORMAL, fresh=True)


def create_bundle(backend: ParallelsBackend, p: CreateParams, size: int,
                  cl: int) -> ParallelsBundleImage:
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
    return ParallelsBundleImage(backend, final, os.path.join(final, DESCRIPTOR_NAME),
                                OpenFlags.NORMAL)

