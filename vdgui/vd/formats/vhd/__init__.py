"""VHD backend: Microsoft's Virtual Hard Disk (Connectix / Virtual PC), qemu's "vpc".

Follows the *Virtual Hard Disk Image Format Specification* (Microsoft, version 1.0, 2006) and
VirtualBox's behaviour (VHD.cpp): fixed, dynamic and differencing disks.

Layout (all integers big-endian)::

  fixed:    [data: current size bytes][footer 512]
  dynamic:  [footer copy 512][dynamic header 1024][BAT][parent locators...]
            [block: sector bitmap (padded to 512) + data]... [footer 512]

* The **footer** (512 bytes, cookie ``conectix``) ends every file; dynamic and differencing disks
  keep a copy at offset 0. Checksums (one's complement of the byte sum, checksum field zeroed)
  are verified on open: a damaged footer with a sound copy uses the copy; both are reported by
  ``check`` and rewritten by ``check(repair=True)``.
* The **BAT** holds one 32-bit sector number per block (0xFFFFFFFF = not allocated). Each block
  starts with a **sector bitmap** (most significant bit = first sector): allocation is per
  sector, so ``block_status`` reports per-sector runs and a differencing disk reads unmarked
  sectors from its parent.
* **Size**: as qemu decides it, the footer's current size for creators ``win ``, ``qem2``,
  ``d2v ``, ``CTXS``, ``tap\\0``, for fixed and differencing disks and for the maximum geometry
  65535/16/255; the CHS geometry (C*H*S*512) for the others (``vpc ``, ``vbox``, ``qemu``...).
  Dynamic images we create are rounded up to the next size the CHS geometry describes exactly
  (as qemu and Virtual PC do), so every reader sees the same size; fixed images keep the exact
  size (Azure-style whole-MiB disks): when no CHS geometry describes it exactly, the footer
  carries the maximum geometry 65535/16/255 (as qemu's ``force_size`` does), which makes every
  qemu version (7.2 sizes fixed disks of other creators by geometry too) use the current size.
* **Parent locators**: W2ru (relative, UTF-16LE), W2ku (absolute, UTF-16LE), Wi2r/Wi2k (ANSI,
  deprecated), MacX (UTF-8 file URL) are read; children are created with W2ku + W2ru (data
  space in bytes, as Virtual PC, Hyper-V and VirtualBox store it), the parent's UTF-16BE file
  name, UUID and modification time.

Limits (checked before anything is allocated): footer/header fields against the file size, block
size a power of two in [512 B, 256 MiB], BAT entries inside the file, locators <= 64 KiB.
UUIDs are read as Windows GUIDs (``bytes_le``), as VirtualBox and Windows show them.
"""
from __future__ import annotations

import uuid as uuidlib

from ...align import ceil_div
from ...backend import (
    Backend,
    Cap,
    CreateParams,
    DeviceType,
    FileExtension,
    ImageFlags,
    OpenFlags,
    Operation,
    ProbeInput,
)
from ...errors import InvalidArgument, NotSupported
from ...fileio import ImageFile
from ...geometry import vhd_chs
from ...space import preallocate
from .fields import (
    _round,
    _with_checksum,
    bitmap_runs,
    checksum,
    fixed_geometry,
    round_size_to_chs,
    set_bits,
    vhd_time,
)
from .image import VhdImage
from .layout import *  # noqa: F403  (the structures and constants, as vhd.py exported them)
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
    TYPE_NAMES,
)

__all__ = ["BACKEND", "VhdBackend", "VhdImage", "bitmap_runs", "checksum", "fixed_geometry",
           "round_size_to_chs", "set_bits", "vhd_time"]


class VhdBackend(Backend):
    name = "VHD"
    description = "Virtual Hard Disk (Virtual PC / Hyper-V)"
    aliases = ("vpc",)
    qemu_name = "vpc"
    caps = (Cap.UUID | Cap.DIFF | Cap.FILE | Cap.CREATE_FIXED | Cap.CREATE_DYNAMIC | Cap.ASYNC
            | Cap.VFS | Cap.PREFERRED)
    extensions = (FileExtension("vhd", DeviceType.HARD_DISK),)
    owns_extensions = True
    operations = frozenset({Operation.WRITE, Operation.CREATE, Operation.COMPACT, Operation.RESIZE,
                            Operation.CHECK, Operation.REPAIR, Operation.RELINK,
                            Operation.DISCARD})
    create_flags = ImageFlags.FIXED
    max_size = MAX_VIRTUAL
    size_granularity = SECTOR
    can_shrink = True

    def probe(self, src: ProbeInput) -> int:
        best = 0
        for raw in (src.tail[-FOOTER_SIZE:] if len(src.tail) >= FOOTER_SIZE else b"",
                    src.head[:FOOTER_SIZE] if len(src.head) >= FOOTER_SIZE else b"",
                    (src.tail[-(FOOTER_SIZE - 1):] + b"\x00")
                    if len(src.tail) >= FOOTER_SIZE - 1 else b""):
            if len(raw) == FOOTER_SIZE and raw[:8] == COOKIE:
                ok = int.from_bytes(raw[64:68], "big") == checksum(raw, FOOTER_CHECKSUM_AT)
                t = int.from_bytes(raw[60:64], "big")
                best = max(best, 100 if ok and t in TYPE_NAMES else 85)
        return best

    def open(
        self, location: str, flags: OpenFlags = OpenFlags.NORMAL, config: dict | None = None
    ) -> VhdImage:
        ro = flags.read_only
        return ImageFile(location, writable=not ro).hand_to(
            lambda f: VhdImage(self, location, f, ro, flags))

    def create(self, p: CreateParams) -> VhdImage:
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
            img = VhdImage(self, f.path, f, False)
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


BACKEND = VhdBackend()
