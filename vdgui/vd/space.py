"""Disk space for fixed ("pre-allocated") images: check it before writing, then really allocate.

A fixed image promises that its data blocks exist on disk (VirtualBox writes fixed VDIs in full;
VHD and flat VMDK are allocated so that the guest never meets a full host disk). A sparse file
of the right length does not keep that promise. :func:`require_space` refuses up front, naming
both numbers, when the file system cannot hold what a fixed image needs; :func:`preallocate`
reserves the blocks with ``posix_fallocate`` and, where a file system cannot (EOPNOTSUPP,
EINVAL), writes zeroes.
"""
from __future__ import annotations

import errno
import os

from .errors import VDIOError
from .sizes import describe_size

ZERO_CHUNK = 4 << 20


def free_space(path: str) -> int | None:
    """Bytes an unprivileged writer may still use in the folder of ``path`` (statvfs), or None
    when the file system does not tell."""
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path)) or "."
    try:
        st = os.statvfs(folder)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def require_space(path: str, needed: int, what: str = "a fixed image") -> None:
    """Raise VDIOError (before anything is written) when ``needed`` bytes do not fit."""
    avail = free_space(path)
    if avail is not None and needed > avail:
        raise VDIOError(f"{path}: not enough free space for {what}: it needs "
                        f"{describe_size(needed)}, the file system has {describe_size(avail)} "
                        "available")


def preallocate(f, offset: int, length: int, shown: str | None = None) -> None:
    """Make bytes ``offset .. offset+length`` of the open ImageFile ``f`` hold real blocks (the
    file grows to cover them when shorter). Content already there is kept."""
    if length <= 0:
        return
    name = shown or getattr(f, "final", None) or f.path
    try:
        os.posix_fallocate(f.fd, offset, length)
        return
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise VDIOError(f"{name}: not enough free space to allocate {describe_size(length)} "
                            f"(available: {describe_size(free_space(name) or 0)})") from None
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS,
                             getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)):
            raise VDIOError(f"{name}: allocating {describe_size(length)} failed: "
                            f"{exc.strerror or exc}") from None
    # no fallocate here: write zeroes where the file holds none yet (holes and the new tail)
    end = offset + length
    size = f.size()
    zero = bytes(ZERO_CHUNK)
    pos = offset
    while pos < end:
        n = min(ZERO_CHUNK, end - pos)
        if pos + n <= size:
            data = f.pread(pos, n)
            if data.count(0) != len(data):      # written data: keep it
                pos += n
                continue
        f.pwrite(pos, zero[:n])
        pos += n
