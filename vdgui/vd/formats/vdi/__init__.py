"""VDI backend: VirtualBox's native container (dynamic, fixed and differencing images).

Specification: VirtualBox ``src/VBox/Storage/VDI.cpp`` / ``VDICore.h``; structures in
:mod:`.layout`. Reads header versions 0.x, 1.0, 1.1 and 1.1+ (with LCHS); writes 1.1+ when
creating and keeps the version of an existing file. Limits and conventions:

* block size (``AllocationBlockSize``): a power of two, 512 B .. 256 MiB (1 MiB by default; qemu
  only opens 1 MiB blocks); ``cbBlockExtra`` bytes before each block are honoured and kept;
* at most 0x3fffffff blocks; the map must lie inside the file; new images put the map and the
  data area each on a 1 MiB boundary, as VirtualBox does (VDI_DATA_ALIGN), so an empty image is
  2 MiB and the map has room to grow in place; a differencing image's legacy geometry is 0/0/0;
* new blocks are appended at index ``cBlocksAllocated``; writes go data -> map entry ->
  header (the header's count is written at flush/close); block indices stay dense
  (0..allocated-1) after compact, discard and repair, which is what qemu-img check expects;
* a differencing image names its parent only by UUID (uuidLinkage) and the parent's
  modification UUID (uuidParentModify); there is no parent path in the format;
* the modification UUID changes on the first write of a session, as VirtualBox's VD layer does.
"""
from __future__ import annotations

import uuid as uuidlib
from array import array

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
from ...errors import InvalidArgument, NotSupported
from ...fileio import ImageFile
from ...geometry import Geometry
from ...space import preallocate
from ...tables import CHUNK_ENTRIES as MAP_CHUNK
from . import layout as L
from .blockmap import (
    DATA_ALIGN,
    MAX_BLOCK,
    MAX_BLOCKS,
    MIN_BLOCK,
    _map_to_disk,
    _max_size,
    _size_limit,
    _uuid_bytes,
    free_bytes,
)
from .image import VdiImage


class VdiBackend(Backend):
    name = "VDI"
    description = "VirtualBox Disk Image"
    aliases = ("vdi",)
    caps = (Cap.UUID | Cap.CREATE_FIXED | Cap.CREATE_DYNAMIC | Cap.DIFF | Cap.FILE | Cap.ASYNC
            | Cap.VFS | Cap.DISCARD | Cap.PREFERRED)
    extensions = (FileExtension("vdi"),)
    owns_extensions = True
    config_keys = (
        ConfigKey("AllocationBlockSize", "1048576", ValueType.INTEGER, KeyFlag.CREATEONLY,
                  description="the unit of allocation (a power of two; qemu opens only 1 MiB "
                              "blocks)",
                  minimum=MIN_BLOCK, maximum=MAX_BLOCK, power_of_two=True,
                  label="Block size", unit="bytes"),
    )
    operations = frozenset({Operation.WRITE, Operation.CREATE, Operation.COMPACT,
                            Operation.RESIZE, Operation.CHECK, Operation.REPAIR,
                            Operation.RELINK, Operation.DISCARD, Operation.COMMENT})
    create_flags = ImageFlags.FIXED
    max_size = _max_size(1 << 20)
    size_granularity = 512
    can_shrink = True

    def max_size_for(self, config: dict | None = None) -> int:
        return _max_size(self.config_int(config, "AllocationBlockSize"))

    def limit_reason(self, config: dict | None = None) -> str:
        return _size_limit(self.config_int(config, "AllocationBlockSize"))

    def probe(self, src: ProbeInput) -> int:
        h = src.head
        if len(h) < L.PRE_HEADER_SIZE:
            return 0
        sig = int.from_bytes(h[L.OFF_SIGNATURE:L.OFF_SIGNATURE + 4], "little")
        if sig != L.SIGNATURE:
            return 0
        major = int.from_bytes(h[L.OFF_VERSION:L.OFF_VERSION + 4], "little") >> 16
        return 100 if major in (0, 1) else 60

    def open(self, location: str, flags: OpenFlags = OpenFlags.NORMAL,
             config: dict | None = None) -> VdiImage:
        parse_config(self.config_keys, config, owner=self.name)
        ro = flags.read_only
        return ImageFile(location, writable=not ro).hand_to(
            lambda f: VdiImage(self, location, f, ro))

    def create(self, p: CreateParams) -> VdiImage:
        cfg = parse_config(self.config_keys, p.config, creating=True, owner=self.name)
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
            img = VdiImage(self, p.location, f, False)
        except BaseException:
            f.abandon()
            raise
        return img


BACKEND = VdiBackend()
