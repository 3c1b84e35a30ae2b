"""RAW backend: a plain file holding the disk's bytes (hard disk, optical .iso/.cdr, floppy).

Modelled on VirtualBox's RAW backend (RAW.cpp): fixed images only, created sparse here unless the
``fixed`` variant asks for preallocation. Holes in the file (SEEK_HOLE) are reported as
unallocated so copies stay sparse. ISO images report their volume label (ISO 9660 primary
volume descriptor at sector 16).
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ...backend import (
    Backend,
    Cap,
    DeviceType,
    FileExtension,
    ImageFlags,
    OpenFlags,
    Operation,
    ProbeInput,
    lazy_exports,
)

if TYPE_CHECKING:  # pragma: no cover
    from ...fileio import ImageFile
    from ...image import Image

ISO_SECTOR = 2048
_PVD_OFFSET = 16 * ISO_SECTOR


class RawBackend(Backend):
    name = "RAW"
    description = "Raw disk image"
    aliases = ("raw", "img", "iso")
    resize_keeps_child_links = True   # children (of other formats) name it by file name only
    caps = Cap.CREATE_FIXED | Cap.FILE | Cap.ASYNC | Cap.VFS
    extensions = (
        FileExtension("iso", DeviceType.OPTICAL), FileExtension("cdr", DeviceType.OPTICAL),
        FileExtension("img", DeviceType.FLOPPY), FileExtension("ima", DeviceType.FLOPPY),
        FileExtension("dsk", DeviceType.FLOPPY), FileExtension("flp", DeviceType.FLOPPY),
        FileExtension("vfd", DeviceType.FLOPPY), FileExtension("raw", DeviceType.HARD_DISK),
    )
    operations = frozenset({Operation.WRITE, Operation.CREATE, Operation.RESIZE,
                            Operation.DISCARD})
    create_flags = ImageFlags.FIXED
    size_granularity = 512
    can_shrink = True
    impl_module = f"{__name__}.image"
    max_size = (1 << 63) - 512       # a file offset (off_t); the file system may allow less

    def device_type_for(self, path: str) -> DeviceType:
        ext = os.path.splitext(path)[1].lstrip(".").lower()
        for fe in self.extensions:
            if fe.ext == ext:
                return fe.device
        return DeviceType.HARD_DISK   # .raw, .bin, no extension...

    def probe(self, src: ProbeInput) -> int:
        # anything is a raw image; an ISO 9660 signature or a known extension raises the score
        if (len(src.head) >= _PVD_OFFSET + 6
                and src.head[_PVD_OFFSET + 1:_PVD_OFFSET + 6] == b"CD001"):
            return 30
        if src.ext in {fe.ext for fe in self.extensions} or src.ext in ("raw", "bin"):
            return 10
        return 1

    def open_file(self, f: ImageFile, location: str,
                  flags: OpenFlags = OpenFlags.READ_ONLY) -> Image:
        """A raw disk held in an already open (read-only) file, e.g. a member of an archive."""
        image: Image = self.implementation().RawImage(self, location, f, True)
        return image


BACKEND = RawBackend()
__getattr__ = lazy_exports(__name__, "image")
