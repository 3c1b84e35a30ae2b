"""ISO9660 disc images with Joliet and Rock Ridge made from the host's files and folders (the
idea of VirtualBox's VISO), through pycdlib.

Names: Rock Ridge keeps each name as it is (up to 255 bytes), symbolic links and permissions;
Joliet (what Windows reads) keeps up to 64 UTF-16 characters; the plain ISO9660 names are made
unique upper-case d-characters of at most 30 (interchange level 3, which also allows files of
4 GiB and more). Files are read only while the image is written, in pieces (never a whole file
in memory, at most one open at a time); the image is written under a temporary name and renamed
when complete (rule 11).
"""
from __future__ import annotations

import io
import os
import stat
from collections.abc import Sequence

from ..errors import Cancelled, FileExists, InvalidArgument, VDError, VDIOError
from ..progress import Progress, ProgressCallback
from ..temps import atomic_files
from .sources import Source, collect, open_source

ISO_NAME = 30            # Ecma-119 7.5.2: file name and extension together
ISO_DIR = 31
JOLIET_NAME = 64         # UCS-2 characters (Joliet specification, section 3.2)
RR_NAME = 255            # bytes
LABEL = 32               # volume identifier: d-characters
DEFAULT_LABEL = "CDROM"
COPY_PIECE = 1 << 20     # files are copied in pieces of at most this many bytes
_D = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")
_JOLIET_BAD = frozenset("*/:;?\\")


def iso_label(label: str | None) -> str:
    """The volume identifier (upper-case d-characters, at most 32), from a free-form label."""
    text = (label or "").strip()
    if not text:
        return DEFAULT_LABEL
    out = "".join(c if c in _D else "_" for c in text.upper())
    if len(out) > LABEL:
        raise InvalidArgument(f"volume label {label!r} is longer than {LABEL} characters")
    return out


def _unique(cands: list[str], limit: int, keep_ext: bool) -> list[str]:
    """Make names unique (case-sensitively as given) by a numeric tail before the extension,
    keeping each within ``limit`` characters."""
    out: list[str] = []
    taken: set[str] = set()
    for c in cands:
        base, dot, ext = c.rpartition(".") if keep_ext and "." in c[1:] else (c, "", "")
        name = c
        n = 0
        while name in taken:
            n += 1
            tail = f"{n}"
            name = base[: limit - len(tail) - len(dot + ext)] + tail + dot + ext
        taken.add(name)
        out.append(name)
    return out


def _iso_names(items: list[Source]) -> list[str]:
    cands = []
    for s in items:
        if s.kind == "dir":
            cands.append("".join(c if c in _D else "_" for c in s.name.upper())[:ISO_DIR] or "_")
            continue
        base, dot, ext = s.name.upper().rpartition(".")
        if not dot:
            base, ext = ext, ""
        base = "".join(c if c in _D else "_" for c in base) or "_"
        ext = "".join(c if c in _D else "_" for c in ext)[:3 if len(base) > 26 else 8]
        cands.append(base[: ISO_NAME - len(ext) - 1] + ("." + ext if ext else "."))
    return _unique(cands, ISO_NAME, keep_ext=True)


def _joliet_names(items: list[Source]) -> list[str]:
    cands = []
    for s in items:
        name = "".join("_" if c in _JOLIET_BAD else c for c in s.name)
        if len(name.encode("utf-16-le")) // 2 > JOLIET_NAME:
            base, dot, ext = name.rpartition(".")
            if not dot or len(ext) > 10:
                base, dot, ext = name, "", ""
            name = _cut_utf16(base, JOLIET_NAME - len(dot + ext)) + dot + ext
        cands.append(name)
    return _unique(cands, JOLIET_NAME, keep_ext=True)


def _cut_utf16(text: str, units: int) -> str:
    out = ""
    for c in text:
        if len((out + c).encode("utf-16-le")) // 2 > units:
            break
        out += c
    return out


class _LazyFile(io.RawIOBase):
    """A source file opened only when pycdlib copies it (so thousands of files never hold
    thousands of descriptors), read to exactly its planned size, closed at its end."""

    def __init__(self, src: Source, prog: Progress):
        super().__init__()
        self.src, self.prog = src, prog
        self.f: io.RawIOBase | None = None
        self.pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if self.f is None:
            self.f = open_source(self.src)
        self.pos = self.f.seek(offset, whence)
        return self.pos

    def read(self, n: int = -1) -> bytes:
        if self.f is None:
            self.seek(0)
        assert self.f is not None
        want = self.src.size - self.pos if n < 0 else min(n, self.src.size - self.pos)
        data = self.f.read(want) or b""
        while len(data) < want:
            more = self.f.read(want - len(data))
            if not more:
                raise VDIOError(f"{self.src.host}: the file became shorter while it was "
                                f"copied (expected {self.src.size} bytes, found "
                                f"{self.pos + len(data)})")
            data += more
        self.pos += len(data)
        if self.pos >= self.src.size:
            self.close_source()
        return data

    def close_source(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None


def _stamp(iso, mtime: float, **path: str) -> None:
    """Give a new record (by ``iso_path=`` or ``joliet_path=``) the source's modification time:
    pycdlib dates new records "now"; its record date and Rock Ridge TF times are replaced."""
    from pycdlib.dates import DirectoryRecordDate

    def date() -> DirectoryRecordDate:
        d = DirectoryRecordDate()
        d.new(mtime)
        return d
    rec = iso.get_record(**path)
    rec.date = date()
    rr = getattr(rec, "rock_ridge", None)
    for entries in (getattr(rr, "dr_entries", None), getattr(rr, "ce_entries", None)):
        tf = getattr(entries, "tf_record", None)
        for attr in ("modification_time", "access_time"):
            if isinstance(getattr(tf, attr, None), DirectoryRecordDate):
                setattr(tf, attr, date())


def _plan(iso, root: Source, prog: Progress, lazies: list[_LazyFile]) -> None:
    """Add the tree to the pycdlib object: folders, files (lazily read), symbolic links."""
    stack = [(root, "/", "/")]
    dates: list[tuple[float, str, str | None]] = []
    while stack:
        folder, ipath, jpath = stack.pop()
        for child, iname, jname in zip(folder.children, _iso_names(folder.children),
                                       _joliet_names(folder.children)):
            if len(child.name.encode("utf-8")) > RR_NAME:
                raise InvalidArgument(f"{child.host}: the name is longer than Rock Ridge's "
                                      f"{RR_NAME} bytes")
            ip, jp = ipath + iname, jpath + jname
            if child.kind == "dir":
                iso.add_directory(iso_path=ip, rr_name=child.name, joliet_path=jp,
                                  file_mode=stat.S_IFDIR | child.mode)
                stack.append((child, ip + "/", jp + "/"))
            elif child.kind == "symlink":
                iso.add_symlink(symlink_path=ip + ";1", rr_symlink_name=child.name,
                                rr_path=child.target)
            else:
                lazy = _LazyFile(child, prog)
                lazies.append(lazy)
                iso.add_fp(lazy, child.size, iso_path=ip + ";1", rr_name=child.name,
                           joliet_path=jp, file_mode=stat.S_IFREG | child.mode)
            dates.append((child.mtime, ip if child.kind == "dir" else ip + ";1",
                          None if child.kind == "symlink" else jp))
    # after every add: a lookup lays the whole image out again when something was added since
    for mtime, iso_path, joliet_path in dates:
        _stamp(iso, mtime, iso_path=iso_path)
        if joliet_path is not None:
            _stamp(iso, mtime, joliet_path=joliet_path)


def create_iso(path: str, sources: Sequence[str], *, label: str | None = None,
               progress: ProgressCallback | None = None) -> str:
    """Create an ISO9660 image (Joliet and Rock Ridge) at ``path`` (refused if it exists)
    holding ``sources`` at its root, each under its own name. Returns ``path``."""
    import pycdlib
    from pycdlib.pycdlibexception import PyCdlibException

    vol = iso_label(label)
    if os.path.lexists(path):
        raise FileExists(f"{path}: file already exists")
    root = collect(sources, symlinks=True, what="an ISO image")
    prog = Progress(progress, 1)
    prog.start()
    iso = pycdlib.PyCdlib()
    lazies: list[_LazyFile] = []
    try:
        iso.new(interchange_level=3, vol_ident=vol, joliet=3, rock_ridge="1.09")
        _plan(iso, root, prog, lazies)
        with atomic_files([path]) as (tmp,):
            try:
                with open(tmp, "wb") as out:
                    def cb(done: int, total: int, _opaque: object) -> None:
                        prog.total = total
                        prog.set(done)
                    iso.write_fp(out, blocksize=COPY_PIECE, progress_cb=cb)
                    out.flush()
                    os.fsync(out.fileno())
            except OSError as exc:
                raise VDIOError(f"{path}: cannot write: {exc.strerror or exc}") from None
            prog.finish()                  # the last chance to cancel: before the rename
    except (VDError, Cancelled):
        raise
    except PyCdlibException as exc:
        raise InvalidArgument(f"{path}: cannot make the ISO image: {exc}") from None
    finally:
        for lz in lazies:
            lz.close_source()
        iso.close()
    return path
