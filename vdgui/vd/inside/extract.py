"""Writing a file or folder tree of a volume to the host (issue #15).

Every name is checked before anything is written. Each tree is built in a temporary folder
beside its destination and renamed when complete, so a cancel or failure leaves nothing.
Files are created with O_EXCL|O_NOFOLLOW (never written through a symlink); times are kept,
folders' after their content.
"""
from __future__ import annotations

import os
import posixpath
import shutil
import tempfile
from dataclasses import dataclass

from ..errors import Cancelled, InvalidArgument
from ..progress import ProgressCallback
from .filesystems import Entry, FileSystem

_BUF = 1 << 20


def safe_extract_parts(rel: str, dest: str) -> list[str]:
    """The host path parts of ``rel`` (a volume path relative to the tree's top); refuses
    ``.``/``..``, separators, NUL and names over 255 bytes (``dest`` names the destination)."""
    parts = [p for p in rel.split("/") if p]
    for p in parts:
        if p in (".", "..") or "\0" in p or os.sep in p or (os.altsep and os.altsep in p):
            raise InvalidArgument(f"refusing to extract {rel!r}: the name {p!r} would escape "
                                  f"{dest} or is not valid on this system")
        if len(p.encode("utf-8", "surrogateescape")) > 255:
            raise InvalidArgument(f"refusing to extract {rel!r}: the name is longer than 255 "
                                  "bytes")
    return parts


@dataclass
class _Plan:
    fs: FileSystem
    dest: str
    entries: list[tuple[Entry, list[str]]]   # (entry, host parts below dest)


def _plan(fs: FileSystem, path: str, dest: str, into: bool) -> _Plan:
    root = fs.stat(path)
    if into:
        base = posixpath.basename(root.path.rstrip("/")) or "root"
        dest = os.path.join(dest, *safe_extract_parts(base, dest))
    if os.path.lexists(dest):
        raise InvalidArgument(f"{dest} already exists: remove it or choose another destination")
    entries: list[tuple[Entry, list[str]]] = [(root, [])]
    if root.type == "dir":
        entries += [(e, safe_extract_parts(posixpath.relpath(e.path, root.path), dest))
                    for e in fs.walk(root.path)]
    return _Plan(fs, dest, entries)


def extract_trees(items: list[tuple[FileSystem, str, str]], progress: ProgressCallback | None
                  = None, *, into: bool = False) -> list[str]:
    """Write each ``(fs, path, dest)``: the file or folder ``path`` of ``fs`` becomes ``dest``
    (``into``: a new entry of folder ``dest``, named as in the volume, ``root`` for ``/``).
    All are checked before any is written; ``progress(done, total)`` counts file bytes of all
    of them, returning False cancels (:class:`Cancelled`, the unfinished tree removed).
    Returns the created paths."""
    plans = [_plan(fs, path, dest, into) for fs, path, dest in items]
    total = sum(e.size for p in plans for e, _ in p.entries if e.type == "file")
    done = 0

    def report(n: int) -> None:
        if progress is not None and progress(n, total) is False:
            raise Cancelled()

    report(0)
    buf = bytearray(_BUF)
    view = memoryview(buf)
    made = []
    for plan in plans:
        tmp = tempfile.mkdtemp(prefix=".vdgui-extract-",
                               dir=os.path.dirname(os.path.abspath(plan.dest)))
        try:
            top = os.path.join(tmp, "x")
            dirs = []
            for e, parts in plan.entries:
                target = os.path.join(top, *parts)
                if e.type == "dir":
                    os.mkdir(target)
                    dirs.append((target, e))
                elif e.type == "symlink":
                    os.symlink(e.target, target)
                elif e.type == "file":
                    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                                 0o644)
                    with os.fdopen(fd, "wb", buffering=0) as out, plan.fs.open(e.path) as f:
                        while n := f.readinto(buf):
                            out.write(view[:n])
                            done += n
                            report(done)
                else:
                    continue
                if e.mtime is not None and e.type != "dir":
                    os.utime(target, (e.atime or e.mtime, e.mtime), follow_symlinks=False)
            for target, e in reversed(dirs):     # after their content, which changes them
                if e.mtime is not None:
                    os.utime(target, (e.atime or e.mtime, e.mtime))
            os.rename(top, plan.dest)
            made.append(plan.dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if progress is not None:
        progress(total, total)
    return made


def extract_tree(fs: FileSystem, path: str, dest: str, progress: ProgressCallback | None = None,
                 *, into: bool = False) -> str:
    """Write the file or folder ``path`` of ``fs`` as ``dest`` (see :func:`extract_trees`);
    returns the created path."""
    return extract_trees([(fs, path, dest)], progress, into=into)[0]
