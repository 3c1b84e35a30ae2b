"""The host files and folders a new floppy or disc image is filled from: collected and checked
before anything is written (names, types, sizes), so a bad item is refused up front."""
from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..errors import ImageNotFound, InvalidArgument, VDIOError, printable


@dataclass
class Source:
    name: str                    # the name inside the image
    host: str                    # the host path
    kind: str                    # "file", "dir" or "symlink"
    size: int = 0
    mtime: float = 0.0
    mode: int = 0
    target: str = ""             # a symbolic link's target
    children: list[Source] = field(default_factory=list)

    def walk(self):
        """Every item below this folder, parents before children."""
        for c in self.children:
            yield c
            if c.kind == "dir":
                yield from c.walk()

    def file_bytes(self) -> int:
        return sum(c.size for c in self.walk() if c.kind == "file")


def folder_contents(folder: str) -> list[str]:
    """The items of ``folder`` (what ``--from DIR`` puts at the image's root), sorted."""
    if not os.path.isdir(folder):
        raise ImageNotFound(f"{folder}: not a folder")
    try:
        return sorted(os.path.join(folder, n) for n in os.listdir(folder))
    except OSError as exc:
        raise VDIOError(f"{folder}: cannot list: {exc.strerror or exc}") from None


def _name(path: str) -> str:
    name = os.path.basename(os.path.normpath(path))
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgument(f"{printable(path)}: the name is not valid UTF-8, so it cannot "
                              "be stored in the image; rename it first") from None
    return name


def _item(path: str, *, symlinks: bool, what: str) -> Source:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise ImageNotFound(f"{path}: no such file or folder") from None
    except OSError as exc:
        raise VDIOError(f"{path}: {exc.strerror or exc}") from None
    src = Source(_name(path), path, "file", mtime=st.st_mtime, mode=stat.S_IMODE(st.st_mode))
    if stat.S_ISDIR(st.st_mode):
        src.kind = "dir"
        src.children = [_item(p, symlinks=symlinks, what=what) for p in folder_contents(path)]
        _unique(src.children, path)
    elif stat.S_ISREG(st.st_mode):
        src.size = st.st_size
    elif stat.S_ISLNK(st.st_mode):
        if not symlinks:
            raise InvalidArgument(f"{path} is a symbolic link, which {what} cannot store; "
                                  "replace it with the file it points to, or leave it out")
        src.kind = "symlink"
        src.target = os.readlink(path)
    else:
        raise InvalidArgument(f"{path} is not a regular file or folder (a device, FIFO or "
                              f"socket): {what} stores files and folders only")
    return src


def _unique(items: list[Source], where: str) -> None:
    seen: dict[str, str] = {}
    for s in items:
        if s.name in seen:
            raise InvalidArgument(f"two items named {s.name!r} would meet in {where}: "
                                  f"{seen[s.name]} and {s.host}")
        seen[s.name] = s.host


def collect(paths: Sequence[str], *, symlinks: bool, what: str) -> Source:
    """The tree to store: each of ``paths`` at the image's root under its own name. ``what``
    names the target in messages ("a FAT floppy")."""
    root = Source("", "", "dir")
    root.children = [_item(p, symlinks=symlinks, what=what) for p in paths]
    _unique(root.children, "the image's root folder")
    return root


def open_source(src: Source):
    """Open a file to copy (never blocks: a FIFO swapped in meanwhile is refused)."""
    try:
        fd = os.open(src.host, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise VDIOError(f"{src.host}: cannot open: {exc.strerror or exc}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise InvalidArgument(f"{src.host} is no longer a regular file")
    return os.fdopen(fd, "rb", buffering=0)
