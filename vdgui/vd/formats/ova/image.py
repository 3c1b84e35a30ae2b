"""The OVA backend's archive reading, image and open (its declaration and probe are the
package's)."""
from __future__ import annotations

import os
from typing import NoReturn, Protocol, runtime_checkable

from ...backend import Backend, OpenFlags, ProbeInput
from ...config import parse_config
from ...errors import CorruptImage, NotSupported, ReadOnlyImage
from ...fileio import ImageFile
from ...image import Alloc, Image
from . import OvaBackend

MAX_MEMBERS = 4096
_META_EXT = (".ovf", ".mf", ".cert")


class MemberFile(ImageFile):
    """A read-only window onto one member of the archive, with ImageFile's reading interface."""

    kernel_copy = False             # offsets are the member's, not the archive file's

    def __init__(self, outer: ImageFile, base: int, length: int, path: str):
        self.outer, self.base, self.length = outer, base, length
        self.path = path
        self.writable = False
        self.is_device = False
        self.fd = outer.fd

    def size(self) -> int:
        return self.length

    def pread(self, offset: int, length: int) -> bytes:
        if offset < 0 or length <= 0 or offset >= self.length:
            return b""
        return self.outer.pread(self.base + offset, min(length, self.length - offset))

    def data_runs(self, offset: int, length: int) -> list[tuple[int, int, bool]] | None:
        return None

    def _refuse(self) -> NoReturn:
        raise ReadOnlyImage(f"{self.path}: a disk inside an OVA archive is read-only")

    def pwrite(self, offset: int, data: bytes) -> None:
        self._refuse()

    def truncate(self, size: int) -> None:
        self._refuse()

    def sync(self) -> None:
        self._refuse()

    def punch_hole(self, offset: int, length: int) -> bool:
        self._refuse()

    def close(self) -> None:
        pass                        # the archive's file belongs to the OvaImage


@runtime_checkable
class _FileOpener(Protocol):
    """A backend that opens an image held in an already open file (here a member's window)."""

    def open_file(self, f: ImageFile, location: str, flags: OpenFlags = ...) -> Image: ...


class _Disk:
    def __init__(self, name: str, offset: int, size: int):
        self.name, self.offset, self.size = name, offset, size


def _members(f: ImageFile, location: str) -> list[_Disk]:
    """The regular members of the archive (name, data offset, size), checked against the file."""
    fsize = f.size()
    out: list[_Disk] = []

    class _Reader:                   # a file object over the ImageFile for tarfile
        pos = 0

        def read(self, n: int | None = -1) -> bytes:
            n = fsize - self.pos if n is None or n < 0 else n
            data = f.pread(self.pos, n)
            self.pos += len(data)
            return data

        def seek(self, pos: int, whence: int = 0) -> int:
            self.pos = pos if whence == 0 else self.pos + pos if whence == 1 else fsize + pos
            return self.pos

        def tell(self) -> int:
            return self.pos

        def write(self, b: bytes) -> int:
            raise ReadOnlyImage(f"{location}: the OVA archive is read here, never written")

        def close(self) -> None:
            pass                     # the ImageFile belongs to the caller

    import tarfile  # here: only an OVA needs it (start-up)

    try:
        with tarfile.open(fileobj=_Reader(), mode="r:") as tf:
            while True:
                m = tf.next()
                if m is None:
                    break
                if len(out) >= MAX_MEMBERS:
                    raise CorruptImage("too many members in the OVA archive", path=location,
                                       expected=f"at most {MAX_MEMBERS}", found="more")
                if m.issparse():
                    raise NotSupported(f"{location}: member {m.name!r} is stored as a GNU sparse "
                                       "file; extract the archive (tar xf) and open the disk")
                if not m.isreg():
                    continue
                if m.offset_data + m.size > fsize:
                    raise CorruptImage(f"member {m.name!r} lies past the end of the archive",
                                       path=location, offset=m.offset_data,
                                       expected=f"{m.size} bytes inside {fsize}",
                                       found=f"{max(0, fsize - m.offset_data)} bytes")
                out.append(_Disk(m.name, m.offset_data, m.size))
    except tarfile.TarError as exc:
        raise CorruptImage(f"not a readable OVA (tar) archive: {exc}", path=location) from None
    return out


class OvaImage(Image):
    def __init__(self, backend: Backend, location: str, f: ImageFile,
                 disks: list[tuple[str, str | None, int | None]], chosen: int,
                 inner: Image) -> None:
        super().__init__(backend, location, True)
        self.f = f
        self.disks = disks              # [(member, backend name, virtual size)]
        self.chosen = chosen
        self.inner = inner
        for attr in ("size", "block_size", "flags", "uuid", "modification_uuid", "pchs",
                     "lchs", "comment"):
            setattr(self, attr, getattr(inner, attr))

    def info(self) -> dict:
        return {"subformat": self.inner.format,
                "disk": self.disks[self.chosen][0],
                "disks": [{"number": i + 1, "name": n, "format": fmt, "virtual_size": size}
                          for i, (n, fmt, size) in enumerate(self.disks)]}

    def block_status(self, offset: int, length: int) -> list[tuple[int, int, Alloc]]:
        return self.inner.block_status(offset, length)

    def read(self, offset: int, length: int) -> bytes:
        return self.inner.read(offset, length)

    def close(self) -> None:
        try:
            self.inner.close()
        finally:
            self.f.close()


def open_image(backend: OvaBackend, location: str, flags: OpenFlags = OpenFlags.NORMAL,
           config: dict | None = None) -> OvaImage:
    cfg = parse_config(backend.config_keys, config, owner=backend.name)
    if not flags.read_only:
        raise NotSupported(f"{location}: OVA archives are read-only here; convert the disk "
                           "you need to an image file to change it")
    f = ImageFile(location)
    try:
        disks = []
        for m in _members(f, location):
            if m.name.lower().endswith(_META_EXT):
                continue
            disks.append((m, _inner_backend(backend, f, m, location)))
        if not disks:
            raise CorruptImage("the OVA archive holds no disk", path=location,
                               expected="a disk member beside the .ovf", found="none")
        want = str(cfg.get("Disk", "1") or "1")
        idx = next((i for i, (m, _) in enumerate(disks) if m.name == want), None)
        if idx is None and want.isdigit() and 1 <= int(want) <= len(disks):
            idx = int(want) - 1
        if idx is None:
            raise NotSupported(f"{location}: no disk {want!r} in the archive; it holds "
                               + ", ".join(m.name for m, _ in disks))
        summary: list[tuple[str, str | None, int | None]] = []
        inner: Image | None = None
        for i, (m, b) in enumerate(disks):
            if b is None:
                summary.append((m.name, None, None))
                continue
            img = _open_member(b, f, m, location)
            summary.append((m.name, b.name, img.size))
            if i == idx:
                inner = img
            else:
                img.close()
        if inner is None:
            raise NotSupported(f"{location}: disk {disks[idx][0].name!r} is in a format this "
                               "archive cannot be read in place; extract it (tar xf) and open "
                               "the file")
        return OvaImage(backend, location, f, summary, idx, inner)
    except BaseException:
        f.close()
        raise


def _inner_backend(backend: OvaBackend, f: ImageFile, m: _Disk,
               location: str) -> Backend | None:
    head = f.pread(m.offset, 65536)
    tail = f.pread(max(m.offset, m.offset + m.size - 65536), min(m.size, 65536))
    src = ProbeInput(path=os.path.join(location, m.name), size=m.size, head=head, tail=tail)
    best, score = None, 0
    for b in backend._backends():
        if b.name == OvaBackend.name or not isinstance(b, _FileOpener):
            continue
        s = b.probe(src)
        if s > score:
            best, score = b, s
    return best


def _open_member(b: Backend, f: ImageFile, m: _Disk, location: str) -> Image:
    path = os.path.join(location, m.name)
    if not isinstance(b, _FileOpener):      # _inner_backend chose only these
        raise NotSupported(f"{path}: {b.name} images cannot be read inside an archive")
    return b.open_file(MemberFile(f, m.offset, m.size, path), path, OpenFlags.READ_ONLY)
