"""The RAW backend's image, open and create (its declaration and probe are the package's)."""
from __future__ import annotations

from ...align import align_up
from ...backend import (
    Backend,
    CreateParams,
    ImageFlags,
    OpenFlags,
)
from ...errors import NotSupported
from ...fileimage import FileImage
from ...fileio import ImageFile
from ...geometry import vbox_pchs
from ...image import Alloc, FillFn
from ...progress import ProgressCallback
from ...runs import RunList
from ...space import preallocate
from . import _PVD_OFFSET, RawBackend


def _iso_label(f: ImageFile) -> str | None:
    pvd = f.pread(_PVD_OFFSET, 2048)
    if len(pvd) < 72 or pvd[0] != 1 or pvd[1:6] != b"CD001":
        return None
    return pvd[40:72].decode("ascii", "replace").rstrip(" \x00") or ""


class RawImage(FileImage):
    def __init__(self, backend: Backend, location: str, f: ImageFile, read_only: bool) -> None:
        super().__init__(backend, location, f, read_only)
        self.size = f.size()
        self.block_size = 512
        self.flags = ImageFlags.FIXED
        self.pchs = vbox_pchs(self.size)

    def info(self) -> dict:
        d: dict = {}
        label = _iso_label(self.f)
        if label is not None:
            d["iso_volume_label"] = label
        return d

    def block_status(self, offset: int, length: int) -> list[tuple[int, int, Alloc]]:
        end = offset + length
        holes = self.f.data_runs(offset, length)
        if holes is None:
            return [(offset, length, Alloc.DATA)]
        runs = [(a, b - a, Alloc.DATA if is_data else Alloc.UNALLOCATED) for a, b, is_data in holes]
        # align runs to sectors: a partly-written sector counts as data
        out: RunList[Alloc] = RunList()
        for s, n, st in runs:
            if st == Alloc.UNALLOCATED:
                a = align_up(s, 512)
                b = (s + n) // 512 * 512 if s + n < end else s + n
                if b <= a:
                    st = Alloc.DATA
            out.add(s, n, st)
        return out.runs

    def read(self, offset: int, length: int) -> bytes:
        data = self.f.pread(offset, length)
        if len(data) < length:
            data += bytes(length - len(data))
        return data

    def write(self, offset: int, data: bytes, fill: FillFn) -> None:
        self.require_writable()
        self.f.pwrite(offset, data)

    def stored_runs(self, offset: int, length: int) -> list[tuple[ImageFile, int, int]] | None:
        return [(self.f, offset, length)] if self.f.kernel_copy else None

    def flat_file(self) -> ImageFile | None:
        return None if self.read_only or not self.f.kernel_copy else self.f

    def discard(self, offset: int, length: int, fill: FillFn | None = None) -> None:
        """Holes punched in a file (the size kept); zeroes written where that cannot be done
        (block devices, file systems without hole punching)."""
        self.require_writable()
        if not self.f.is_device and self.f.punch_hole(offset, length):
            return
        pos, end = offset, offset + length
        while pos < end:
            n = min(end - pos, 4 << 20)
            self.f.pwrite(pos, bytes(n))
            pos += n

    def write_zeroes(self, offset: int, length: int, fill: FillFn) -> None:
        """A hole (a RAW image has no parent: nothing shows through)."""
        self.discard(offset, length)

    def resizes_in_place(self, new_size: int) -> bool:
        return not self.f.is_device        # one ftruncate

    def resize(self, new_size: int, progress: ProgressCallback | None = None) -> None:
        self.require_writable()
        if self.f.is_device:
            raise NotSupported(f"{self.location}: a device cannot be resized")
        if new_size < self.size:
            self._refuse_cut_data(new_size)
        self.f.truncate(new_size)
        self.size = new_size
        self.pchs = vbox_pchs(new_size)
        if progress:
            progress(1, 1)


def open_image(backend: RawBackend, location: str, flags: OpenFlags = OpenFlags.NORMAL,
         config: dict | None = None) -> RawImage:
    ro = flags.read_only
    f = ImageFile(location, writable=not ro)
    return RawImage(backend, location, f, ro)


def create_image(backend: RawBackend, p: CreateParams) -> RawImage:
    if p.parent is not None:
        raise NotSupported("RAW images cannot be differencing images")
    f = ImageFile.create_temp(p.location)
    try:
        f.truncate(p.size)
        if p.flags & ImageFlags.FIXED:
            preallocate(f, 0, p.size)
        if p.progress:
            p.progress(p.size, p.size)
        f.sync()  # complete on disk before it appears under its name
        f.commit()
    except BaseException:
        f.abandon()
        raise
    return RawImage(backend, p.location, f, False)

