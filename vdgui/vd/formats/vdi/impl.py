"""The VDI backend's open and create (its declaration and probe are the package's)."""
from __future__ import annotations

import uuid as uuidlib
from array import array

from ...align import align_up, ceil_div
from ...backend import (
    CreateParams,
    ImageFlags,
    OpenFlags,
    too_large,
)
from ...config import parse_config
from ...errors import InvalidArgument, NotSupported
from ...fileio import ImageFile
from ...geometry import Geometry
from ...space import preallocate
from ...tables import CHUNK_ENTRIES as MAP_CHUNK
from . import VdiBackend
from . import layout as L
from .blockmap import (
    DATA_ALIGN,
    MAX_BLOCKS,
    _map_to_disk,
    _max_size,
    _size_limit,
    _uuid_bytes,
    free_bytes,
)
from .image import VdiImage


def open_image(backend: VdiBackend, location: str, flags: OpenFlags = OpenFlags.NORMAL,
         config: dict | None = None) -> VdiImage:
    parse_config(backend.config_keys, config, owner=backend.name)
    ro = flags.read_only
    return ImageFile(location, writable=not ro).hand_to(
        lambda f: VdiImage(backend, location, f, ro))


def create_image(backend: VdiBackend, p: CreateParams) -> VdiImage:
    cfg = parse_config(backend.config_keys, p.config, creating=True, owner=backend.name)
    bs = cfg["AllocationBlockSize"]
    size = p.size
    if size <= 0 or size % 512:
        raise InvalidArgument(f"VDI image size must be a positive multiple of 512, "
                              f"found {size}")
    if size > _max_size(bs):
        raise too_large("VDI", size, _max_size(bs), p.location, _size_limit(bs))
    blocks = ceil_div(size, bs)
    if blocks > MAX_BLOCKS:
        raise InvalidArgument(
            f"{size} bytes need {blocks} blocks of {bs} bytes, more than "
            f"the {MAX_BLOCKS} a VDI image can hold"
        )
    fixed = bool(p.flags & ImageFlags.FIXED)
    parent = p.parent
    diff = parent is not None or bool(p.flags & ImageFlags.DIFF)
    if diff and parent is None:
        raise InvalidArgument("a differencing VDI image needs its parent")
    if diff and fixed:
        raise NotSupported("VDI differencing images cannot be fixed")
    comment = (p.comment or "").encode("utf-8")
    if len(comment) >= L.COMMENT_SIZE:
        raise InvalidArgument(
            f"VDI comments are limited to {L.COMMENT_SIZE - 1} bytes, found {len(comment)}"
        )
    if parent is not None and parent.uuid is None:
        raise NotSupported(
            f"{parent.location}: the parent has no UUID, and a VDI "
            "differencing image links to its parent by UUID"
        )
    # VirtualBox's layout (vdiInitHeader): the map and the data each start on a 1 MiB boundary
    offset_blocks = align_up(L.PRE_HEADER_SIZE + L.HEADER1PLUS_SIZE, DATA_ALIGN)
    offset_data = align_up(offset_blocks + blocks * 4, DATA_ALIGN)
    if offset_data > 0xFFFFFFFF:
        raise InvalidArgument(
            f"{size} bytes in {bs}-byte blocks need a block map too large "
            "for VDI; use a larger AllocationBlockSize"
        )
    image_type = L.TYPE_FIXED if fixed else L.TYPE_DIFF if diff else L.TYPE_NORMAL
    g0 = {"cylinders": 0, "heads": 0, "sectors": 0, "sector_size": 512}
    # a differencing image's legacy geometry stays "not calculated" (0/0/0), as VirtualBox
    # writes it: the disk's geometry is the base's
    pchs = p.pchs if p.pchs and not diff and not Geometry(*p.pchs).is_zero else None
    lchs = p.lchs if p.lchs and not Geometry(*p.lchs).is_zero else None
    hdr = dict(
        header_size=L.HEADER1PLUS_SIZE,
        image_type=image_type,
        flags=0,
        comment=comment + bytes(L.COMMENT_SIZE - len(comment)),
        offset_blocks=offset_blocks,
        offset_data=offset_data,
        legacy_geometry=dict(
            g0, **(dict(zip(("cylinders", "heads", "sectors"), pchs)) if pchs else {})
        ),
        dummy=0,
        disk_size=size,
        block_size=bs,
        block_extra=0,
        blocks=blocks,
        blocks_allocated=blocks if fixed else 0,
        uuid_create=_uuid_bytes(p.uuid or uuidlib.uuid4()),
        uuid_modify=_uuid_bytes(uuidlib.uuid4()),
        uuid_linkage=_uuid_bytes(parent.uuid if parent is not None else None),
        uuid_parent_modify=_uuid_bytes(parent.modification_uuid if parent is not None
                                       else None),
        lchs=dict(g0, **(dict(zip(("cylinders", "heads", "sectors"), lchs)) if lchs else {})),
    )
    pre = L.PreHeader.build(
        dict(
            file_info=L.FILE_INFO.ljust(64, b"\0"), signature=L.SIGNATURE, version=L.VERSION_1_1
        )
    )
    head = pre + L.Header1Plus.build(hdr)
    f = ImageFile.create_temp(p.location)
    try:
        f.pwrite(0, head + bytes(-len(head) % 512))  # the gap up to the map stays a hole
        for a in range(0, blocks, MAP_CHUNK):  # the map, streamed
            b = min(blocks, a + MAP_CHUNK)
            f.pwrite(
                offset_blocks + a * 4,
                _map_to_disk(array("I", range(a, b))) if fixed else free_bytes(b - a),
            )
        f.truncate(offset_data + (blocks * bs if fixed else 0))
        if fixed:  # a fixed VDI holds its blocks (VirtualBox writes it full)
            preallocate(f, offset_data, blocks * bs)
        f.sync()
        if p.progress:
            p.progress(size, size)
        f.commit()
        img = VdiImage(backend, p.location, f, False)
    except BaseException:
        f.abandon()
        raise
    return img

