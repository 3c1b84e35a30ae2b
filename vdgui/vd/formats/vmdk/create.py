"""Creating VMDKs: monolithic and split, sparse and flat, ESX, streamOptimized, and raw host
disk descriptors (whole drives or chosen partitions)."""
from __future__ import annotations

import os
import uuid as uuidlib
from typing import TYPE_CHECKING

from ...align import align_up
from ...backend import CreateParams, ImageFlags, OpenFlags
from ...config import parse_config
from ...errors import FileExists, InvalidArgument, NotSupported, UnsafePath
from ...fileio import ImageFile, atomic_files, relative_name
from ...geometry import vbox_pchs
from ...space import preallocate
from .descriptor import NO_PARENT_CID, Descriptor, ExtentLine, build, new_cid
from .image import VmdkImage
from .layout import (
    DEFAULT_GRAIN,
    EMBEDDED_DESC_SECTORS,
    FLAG_COMPRESSED,
    FLAG_MARKERS,
    FLAG_NL_TEST,
    GD_AT_END,
    MAX_SPARSE_SIZE,
    SECTOR,
    SPLIT_SIZE,
    SparseHeader,
    header_dict,
)
from .sparse import write_sparse_extent
from .stream import StreamWriter

if TYPE_CHECKING:
    from . import VmdkBackend


# -- create ------------------------------------------------------------------------------
def create(backend: VmdkBackend, p: CreateParams) -> VmdkImage:
    cfg = parse_config(backend.config_keys, p.config, creating=True, owner=backend.name)
    if cfg.get("RawDrive"):
        return create_raw(backend, p, cfg)
    if cfg.get("Partitions") or cfg.get("BootSector") or cfg.get("Relative"):
        raise InvalidArgument("Partitions, BootSector and Relative need RawDrive (the host "
                              "drive of a raw disk VMDK)")
    fl = p.flags
    stream = bool(fl & ImageFlags.STREAM_OPTIMIZED)
    esx = bool(fl & ImageFlags.ESX)
    fixed = bool(fl & ImageFlags.FIXED) or esx
    split = bool(fl & ImageFlags.SPLIT_2G)
    parent = p.parent
    if p.size % SECTOR or p.size <= 0:
        raise InvalidArgument(f"VMDK size must be a positive multiple of 512, found {p.size}")
    if stream and (fixed or split or parent is not None):
        raise NotSupported("a streamOptimized VMDK is a single compressed file: it cannot be "
                           "fixed, split or a differencing image")
    if esx and split:
        raise NotSupported("the ESX (vmfs) variant cannot be split")
    if parent is not None and fixed:
        raise NotSupported("a VMDK differencing image is always sparse (not fixed)")
    if parent is not None and not isinstance(parent, VmdkImage):
        raise NotSupported(f"a VMDK differencing image needs a VMDK parent, not {parent.format}")
    if not fixed and p.size > MAX_SPARSE_SIZE:
        raise InvalidArgument(f"sparse VMDK images are limited to 2 TiB, asked for {p.size}")
    if stream:
        ctype = "streamOptimized"
    elif esx:
        ctype = "vmfs"
    elif fixed:
        ctype = "twoGbMaxExtentFlat" if split else "monolithicFlat"
    else:
        ctype = "twoGbMaxExtentSparse" if split else "monolithicSparse"
    location = p.location
    if os.path.lexists(location):
        raise FileExists(f"{location}: file already exists")
    folder = os.path.dirname(os.path.abspath(location))
    stem = os.path.splitext(os.path.basename(location))[0]
    sectors = p.size // SECTOR
    # extents
    extents: list[ExtentLine] = []
    if ctype in ("monolithicSparse", "streamOptimized"):
        extents.append(ExtentLine("RW", sectors, "SPARSE", os.path.basename(location)))
    elif ctype in ("monolithicFlat", "vmfs"):
        extents.append(ExtentLine("RW", sectors, "VMFS" if esx else "FLAT",
                                  f"{stem}-flat.vmdk", 0))
    else:
        left, i = p.size, 0
        while left > 0:
            n = min(left, SPLIT_SIZE)
            i += 1
            if fixed:
                extents.append(ExtentLine("RW", n // SECTOR, "FLAT", f"{stem}-f{i:03d}.vmdk", 0))
            else:
                extents.append(ExtentLine("RW", n // SECTOR, "SPARSE", f"{stem}-s{i:03d}.vmdk"))
            left -= n
    # descriptor
    cid = new_cid()
    uid = p.uuid or uuidlib.uuid4()
    header = [("version", "1", False), ("encoding", "UTF-8", True), ("CID", f"{cid:08x}", False),
              ("parentCID", f"{parent.cid if parent else NO_PARENT_CID:08x}", False)]
    if parent is not None:
        if parent.read_only is False:
            parent.flush()
        header.append(("parentFileNameHint", relative_name(location, parent.location), True))
    header.append(("createType", ctype, True))
    pchs = p.pchs or (parent.pchs if parent else None) or vbox_pchs(p.size)
    adapter = (parent.desc.get("ddb.adapterType") if parent else None) or \
        ("lsilogic" if esx else "ide")
    hw = (parent.desc.get("ddb.virtualHWVersion") if parent else None) or "4"
    ddb = [("ddb.virtualHWVersion", hw), ("ddb.adapterType", adapter),
           ("ddb.geometry.cylinders", str(pchs.cylinders)),
           ("ddb.geometry.heads", str(pchs.heads)), ("ddb.geometry.sectors", str(pchs.sectors))]
    if p.lchs and not p.lchs.is_zero:
        ddb += [("ddb.geometry.biosCylinders", str(p.lchs.cylinders)),
                ("ddb.geometry.biosHeads", str(p.lchs.heads)),
                ("ddb.geometry.biosSectors", str(p.lchs.sectors))]
    zero = str(uuidlib.UUID(int=0))
    ddb += [("ddb.uuid.image", str(uid)),
            ("ddb.uuid.parent", str(parent.uuid) if parent and parent.uuid else zero),
            ("ddb.uuid.modification", str(uuidlib.uuid4())),
            ("ddb.uuid.parentmodification",
             str(parent.modification_uuid) if parent and parent.modification_uuid else zero)]
    desc = build(header, extents, ddb, location)
    desc_bytes = desc.to_bytes()
    if ctype == "streamOptimized":
        return create_stream(backend, p, desc_bytes, sectors)
    finals = [location] if ctype == "monolithicSparse" else \
        [location] + [os.path.join(folder, e.filename) for e in extents if e.filename]
    with atomic_files(finals) as temps:
        for i, tmp in enumerate(temps):
            f = ImageFile(tmp, create=True, lock=False)
            try:
                if ctype == "monolithicSparse":
                    write_sparse_extent(f, sectors, desc_bytes)
                elif i == 0:
                    f.pwrite(0, desc_bytes)
                else:
                    ext = extents[i - 1]
                    if ext.type == "SPARSE":
                        write_sparse_extent(f, ext.sectors, None)
                    else:
                        f.truncate(ext.sectors * SECTOR)
                        if fixed:
                            preallocate(f, 0, ext.sectors * SECTOR, finals[i])
            finally:
                f.close()
    if p.progress:
        p.progress(p.size, p.size)
    img = backend.open(location, OpenFlags.NORMAL | (OpenFlags.ALLOW_UNSAFE_PATHS
                                                  if p.allow_unsafe_paths else 0))
    return img

def create_raw(backend: VmdkBackend, p: CreateParams, cfg: dict) -> VmdkImage:
    """A raw host disk descriptor (VirtualBox's RawDisk variant): 'fullDevice', one FLAT
    extent of the whole drive, or 'partitionedDevice' exposing chosen partitions, the partition
    tables copied into ``NAME-pt.vmdk`` (the plan: vd/rawdisk.py). Drives are named by absolute
    path, so unsafe paths must be allowed; the drive is opened read-only."""
    from ...rawdisk import inspect_drive, parse_partitions, plan

    drive = cfg["RawDrive"]
    if not p.allow_unsafe_paths:
        raise UnsafePath(f"{p.location}: a raw disk VMDK gives direct access to {drive!r}; "
                         "refused unless unsafe paths are allowed")
    if p.parent is not None:
        raise NotSupported("a raw disk VMDK cannot be a differencing image")
    parts = parse_partitions(cfg.get("Partitions"))
    boot = cfg.get("BootSector")
    if os.path.lexists(p.location):
        raise FileExists(f"{p.location}: file already exists")
    raw = plan(inspect_drive(drive), parts, bool(cfg.get("Relative")), boot)
    size = raw.drive.size
    stem = os.path.splitext(os.path.basename(p.location))[0]
    side_name = f"{stem}-pt.vmdk"
    side_path = os.path.join(os.path.dirname(os.path.abspath(p.location)), side_name)
    lines = [ExtentLine("RW", e.sectors, e.kind, None if e.kind == "ZERO" else
                        (e.path or side_name), e.offset) for e in raw.extents]
    pchs = p.pchs or vbox_pchs(size)
    zero = str(uuidlib.UUID(int=0))
    desc = build([("version", "1", False), ("encoding", "UTF-8", True),
                  ("CID", f"{new_cid():08x}", False), ("parentCID", "ffffffff", False),
                  ("createType", raw.create_type, True)],
                 lines,
                 [("ddb.virtualHWVersion", "4"), ("ddb.adapterType", "ide"),
                  ("ddb.geometry.cylinders", str(pchs.cylinders)),
                  ("ddb.geometry.heads", str(pchs.heads)),
                  ("ddb.geometry.sectors", str(pchs.sectors)),
                  ("ddb.uuid.image", str(p.uuid or uuidlib.uuid4())),
                  ("ddb.uuid.parent", zero), ("ddb.uuid.modification", str(uuidlib.uuid4())),
                  ("ddb.uuid.parentmodification", zero)], p.location)
    finals = ([side_path] if raw.copies else []) + [p.location]
    with atomic_files(finals) as temps:
        if raw.copies:
            raw.write_side(temps[0])
        with open(temps[-1], "xb") as out:
            out.write(desc.to_bytes())
            out.flush()
            os.fsync(out.fileno())
    if p.progress:
        p.progress(size, size)
    return backend.open(p.location, OpenFlags.NORMAL | OpenFlags.ALLOW_UNSAFE_PATHS)

def create_stream(backend: VmdkBackend, p: CreateParams, desc_bytes: bytes,
                  sectors: int) -> VmdkImage:
    desc_sectors = max(EMBEDDED_DESC_SECTORS, align_up(len(desc_bytes), SECTOR) // SECTOR)
    overhead = align_up(1 + desc_sectors, DEFAULT_GRAIN)
    hdr = header_dict(version=3, flags=FLAG_NL_TEST | FLAG_COMPRESSED | FLAG_MARKERS,
                       capacity=sectors, descriptor_offset=1, descriptor_size=desc_sectors,
                       rgd_offset=0, gd_offset=GD_AT_END, overhead=overhead,
                       compress_algorithm=1)
    f = ImageFile.create_temp(p.location)
    try:
        f.pwrite(0, SparseHeader.build(hdr))
        f.pwrite(SECTOR, desc_bytes.ljust(desc_sectors * SECTOR, b"\0"))
        f.truncate(overhead * SECTOR)
        img = VmdkImage(backend, p.location, False)
        img.desc = Descriptor.parse(desc_bytes, p.location)
        img._load_metadata()
        img.flags |= ImageFlags.STREAM_OPTIMIZED
        line = img.desc.extents[0]
        w = StreamWriter(line, 0, p.location, f, hdr, overhead * SECTOR)
        img.extents = [w]
        img._starts = [0]
        img.extent_paths = [p.location]
        img.size = sectors * SECTOR
        img.block_size = DEFAULT_GRAIN * SECTOR
        img._stream_temp = f
        img.desc_file = f                   # the descriptor is embedded: set_uuid etc. write it
        img.embedded = (SECTOR, desc_sectors * SECTOR)
        img._files = {}
    except BaseException:
        f.abandon()
        raise
    if p.progress:
        p.progress(p.size, p.size)
    return img
