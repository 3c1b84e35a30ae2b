"""The VMDK backend's open and create (its declaration and probe are the package's)."""
from __future__ import annotations

import os
import uuid as uuidlib

from construct import ConstructError

from ...backend import (
    CreateParams,
    ImageFlags,
    OpenFlags,
)
from ...config import parse_config
from ...errors import CorruptImage, NotSupported
from ...fileio import ImageFile, resolve_stored_name
from . import VmdkBackend
from .create import create
from .descriptor import MAX_DESCRIPTOR_BYTES, Descriptor
from .image import VmdkImage
from .layout import (
    COWD_MAGIC,
    CREATE_TYPES,
    MAGIC,
    SECTOR,
    SESPARSE_MAGIC,
)
from .sparse import SparseExtent, parse_sparse_header


def open_image(backend: VmdkBackend, location: str, flags: OpenFlags = OpenFlags.NORMAL,
               config: dict | None = None, *, _file: ImageFile | None = None) -> VmdkImage:
    parse_config(backend.config_keys, config, owner=backend.name)
    ro = flags.read_only
    img = VmdkImage(backend, location, ro)
    img.allow_unsafe = bool(flags & OpenFlags.ALLOW_UNSAFE_PATHS)
    info_only = bool(flags & OpenFlags.INFO)
    try:
        f = _file if _file is not None else ImageFile(location, writable=not ro)
        img.desc_file = f
        img._files[os.path.abspath(location)] = f
        head = f.pread(0, SECTOR)
        if head[:4] == MAGIC:
            hdr = parse_sparse_header(head, location)
            if hdr["descriptor_offset"] == 0 or hdr["descriptor_size"] == 0:
                raise NotSupported(
                    f"{location}: this is one extent of a multi-file VMDK (it has "
                    "no embedded descriptor); open the descriptor .vmdk instead"
                )
            dsz = hdr["descriptor_size"] * SECTOR
            if dsz > MAX_DESCRIPTOR_BYTES:
                raise CorruptImage(
                    "embedded descriptor is too large",
                    path=location,
                    field="descriptorSize",
                    offset=0x1C,
                    expected=f"at most {MAX_DESCRIPTOR_BYTES // SECTOR} sectors",
                    found=hdr["descriptor_size"],
                )
            doff = hdr["descriptor_offset"] * SECTOR
            if doff + dsz > f.size():
                raise CorruptImage(
                    "embedded descriptor lies past the end of the file",
                    path=location,
                    field="descriptorOffset",
                    offset=0x1C,
                    expected=f"an area inside {f.size()} bytes",
                    found=f"sector {hdr['descriptor_offset']}",
                )
            raw = f.read_exact(doff, dsz, "embedded descriptor")
            img.desc = Descriptor.parse(raw, location)
            img.embedded = (doff, dsz)
            exts = img.desc.extents
            if len(exts) != 1 or exts[0].type != "SPARSE":
                raise CorruptImage(
                    "a sparse file's embedded descriptor must list exactly one "
                    "SPARSE extent (itself)",
                    path=location,
                    expected="1 SPARSE extent",
                    found=", ".join(e.type for e in exts),
                )
            img._load_metadata()
            img._files[os.path.abspath(location)] = f
            line = exts[0]
            img.extent_paths = [location]
            img.extents.append(img.opener.sparse(line, 0, location, f, hdr, writable=not ro))
        elif head[:8] == SESPARSE_MAGIC.to_bytes(8, "little"):
            raise NotSupported(
                f"{location}: this is an ESXi seSparse extent; open the "
                "descriptor .vmdk that lists it instead"
            )
        elif head[:4] == COWD_MAGIC:
            raise NotSupported(
                f"{location}: this is an ESX vmfsSparse (COWD) extent; open the "
                "descriptor .vmdk that lists it instead"
            )
        else:
            size = f.size()
            if size > MAX_DESCRIPTOR_BYTES:
                raise CorruptImage(
                    "not a VMDK descriptor: the file is too large for one",
                    path=location,
                    expected=f"at most {MAX_DESCRIPTOR_BYTES} bytes of text",
                    found=f"{size} bytes",
                )
            img.desc = Descriptor.parse(f.pread(0, size), location)
            img._load_metadata()
            ct = img.create_type.lower()
            if ct and ct not in CREATE_TYPES:
                raise NotSupported(f"{location}: unknown createType {img.create_type!r}")
            vstart = 0
            # a raw disk's drives are named by absolute path: an INFO open, which opens no
            # extent, may name them (files() never counts them as the image's)
            raw_info = info_only and bool(img.flags & ImageFlags.RAWDISK)
            for line in img.desc.extents:
                path = None
                if line.type != "ZERO":
                    assert line.filename is not None    # the parser refuses it missing
                    path = resolve_stored_name(
                        location,
                        line.filename,
                        allow_unsafe=img.allow_unsafe or raw_info,
                        what="extent file",
                    )
                img.extent_paths.append(path)
                if info_only:
                    vstart += line.sectors * SECTOR
                    continue
                img.extents.append(
                    img.opener.extent(
                        line, vstart, path, writable=not ro and line.access == "RW"
                    )
                )
                vstart += line.sectors * SECTOR
            img.info_only = info_only
        img.size = sum(e.sectors for e in img.desc.extents) * SECTOR
        if not ro and not info_only and img.uuid is None:
            # as VirtualBox does: an image without a UUID (made by VMware or qemu) gets one
            # when it is first opened for writing
            img.uuid = uuidlib.uuid4()
            img.desc.set("ddb.uuid.image", str(img.uuid))
            if img.modification_uuid is None:
                img.modification_uuid = uuidlib.uuid4()
                img.desc.set("ddb.uuid.modification", str(img.modification_uuid))
            try:
                img._write_descriptor()
            except NotSupported:  # no room in an embedded descriptor: leave it be
                img.desc.remove("ddb.uuid.image")
                img.desc.remove("ddb.uuid.modification")
                img.uuid = img.modification_uuid = None
        if img.extents:
            img._starts = [e.vstart for e in img.extents]
        grains = [e.grain for e in img.extents if isinstance(e, SparseExtent)]
        img.block_size = grains[0] if grains else SECTOR
        if any(getattr(e, "compressed", False) for e in img.extents):
            img.flags |= ImageFlags.STREAM_OPTIMIZED
    except ConstructError as exc:
        img.close()
        raise CorruptImage(f"malformed structure: {exc}", path=location) from None
    except BaseException:
        img.close()
        raise
    return img


def create_image(backend: VmdkBackend, p: CreateParams) -> VmdkImage:
    return create(backend, p)

