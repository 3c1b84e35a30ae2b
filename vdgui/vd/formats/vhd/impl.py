"""The VHD backend's open and create (its declaration and probe are the package's)."""
from __future__ import annotations

import uuid as uuidlib

from ...align import ceil_div
from ...backend import (
    CreateParams,
    ImageFlags,
    OpenFlags,
)
from ...errors import InvalidArgument, NotSupported
from ...fileio import ImageFile
from ...geometry import vhd_chs
from ...space import preallocate
from . import VhdBackend
from .fields import (
    _round,
    _with_checksum,
    fixed_geometry,
    round_size_to_chs,
    vhd_time,
)
from .image import VhdImage
from .layout import (
    COOKIE,
    CREATOR_APP,
    CREATOR_OS,
    CREATOR_VERSION,
    DEFAULT_BLOCK,
    DYN_COOKIE,
    DYN_HEADER,
    FOOTER,
    FOOTER_CHECKSUM_AT,
    FOOTER_SIZE,
    HEADER_CHECKSUM_AT,
    HEADER_SIZE,
    MAX_VIRTUAL,
    NO_OFFSET,
    SECTOR,
    TYPE_DIFF,
    TYPE_DYNAMIC,
    TYPE_FIXED,
)


def open_image(
    backend: VhdBackend, location: str, flags: OpenFlags = OpenFlags.NORMAL,
    config: dict | None = None,
) -> VhdImage:
    ro = flags.read_only
    return ImageFile(location, writable=not ro).hand_to(
        lambda f: VhdImage(backend, location, f, ro, flags))


def create_image(backend: VhdBackend, p: CreateParams) -> VhdImage:
    fixed = bool(p.flags & ImageFlags.FIXED)
    diff = p.parent is not None
    if fixed and diff:
        raise NotSupported("a differencing VHD cannot be fixed")
    if p.size <= 0 or p.size % SECTOR:
        raise InvalidArgument(
            f"{p.location}: VHD size must be a positive multiple of 512, found {p.size}"
        )
    if p.size > MAX_VIRTUAL:
        raise InvalidArgument(f"{p.location}: VHD images can be at most {MAX_VIRTUAL} bytes")
    if fixed or diff:
        size, geo = p.size, vhd_chs(p.size) if diff else fixed_geometry(p.size)
    else:
        size, geo = round_size_to_chs(p.size)
    uid = p.uuid or uuidlib.uuid4()
    footer = dict(
        cookie=COOKIE,
        features=2,
        version=0x00010000,
        data_offset=NO_OFFSET if fixed else FOOTER_SIZE,
        timestamp=vhd_time(),
        creator_app=CREATOR_APP,
        creator_version=CREATOR_VERSION,
        creator_os=CREATOR_OS,
        original_size=size,
        current_size=size,
        cylinders=geo.cylinders,
        heads=geo.heads,
        sectors=geo.sectors,
        disk_type=TYPE_FIXED if fixed else TYPE_DIFF if diff else TYPE_DYNAMIC,
        checksum=0,
        unique_id=uid.bytes_le,
        saved_state=0,
        reserved=bytes(427),
    )
    fraw = _with_checksum(FOOTER.build(footer), FOOTER_CHECKSUM_AT)
    if p.progress:
        p.progress(0, size)
    f = ImageFile.create_temp(p.location)
    try:
        if fixed:
            f.truncate(size + FOOTER_SIZE)
            preallocate(f, 0, size + FOOTER_SIZE)
            f.pwrite(size, fraw)
        else:
            n = ceil_div(size, DEFAULT_BLOCK)
            bat_off = FOOTER_SIZE + HEADER_SIZE
            end = bat_off + _round(n * 4)
            hdr = dict(
                cookie=DYN_COOKIE,
                data_offset=NO_OFFSET,
                table_offset=bat_off,
                version=0x00010000,
                max_table_entries=n,
                block_size=DEFAULT_BLOCK,
                checksum=0,
                parent_uuid=bytes(16),
                parent_timestamp=0,
                reserved1=0,
                parent_name=bytes(512),
                locators=[
                    dict(
                        code=b"\x00" * 4, data_space=0, data_length=0, reserved=0, data_offset=0
                    )
                ]
                * 8,
                reserved2=bytes(256),
            )
            f.pwrite(bat_off, b"\xff" * _round(n * 4))
            f.pwrite(FOOTER_SIZE, _with_checksum(DYN_HEADER.build(hdr), HEADER_CHECKSUM_AT))
            f.pwrite(0, fraw)
            f.pwrite(end, fraw)
        img = VhdImage(backend, f.path, f, False)
        if diff:
            img.set_parent(p.parent)  # locators, parent name, UUID, timestamp
        if size != p.size:
            img.size_rounded_from = p.size
        if p.progress:
            p.progress(size, size)
        f.sync()  # complete on disk before it appears under its name
        f.commit()
        img.location = p.location
    except BaseException:
        f.abandon()
        raise
    return img

