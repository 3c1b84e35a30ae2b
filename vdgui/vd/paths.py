"""Paths: opening an image path safely (never blocking, only regular files and block devices),
small side files, the engine error for a failed system call, and the names stored inside images
(confined to the image's folder unless unsafe paths are allowed).

Image paths must name a regular file or a block device: anything else (a FIFO, a socket, a
character device) is refused before it can block (opened non-blocking, then checked).
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat

from .errors import ImageNotFound, InvalidArgument, UnsafePath, VDIOError, require_text


def open_checked(path: str, flags: int, mode: int = 0o644) -> int:
    """os.open that never blocks on a FIFO and refuses what is not a regular file or a block
    device (a FIFO, socket or character device would hang or stream forever)."""
    fd = os.open(path, flags | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0), mode)
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise ImageNotFound(f"{path}: is a directory, not an image file")
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            kind = (
                "a FIFO (named pipe)"
                if stat.S_ISFIFO(st.st_mode)
                else "a socket"
                if stat.S_ISSOCK(st.st_mode)
                else "a character device"
                if stat.S_ISCHR(st.st_mode)
                else "not a regular file"
            )
            raise InvalidArgument(f"{path}: is {kind}; expected a regular file or a block device")
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_image_path(path: str) -> int:
    """A read-only descriptor of an image path, refused (ImageNotFound / InvalidArgument /
    VDIOError) unless it is a regular file or a block device; never blocks. For probing."""
    try:
        return open_checked(path, os.O_RDONLY)
    except IsADirectoryError:
        raise ImageNotFound(f"{path}: is a directory, not an image file") from None
    except OSError as exc:
        raise io_error(exc, path, "cannot open") from None


def read_small_file(path: str, what: str, limit: int = 1 << 20) -> bytes:
    """Read a small side file (property or passphrase file). Opening never blocks: a FIFO with
    no writer is refused by name; a pipe with a writer (``<(...)``) is read to its end."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise VDIOError(f"{path}: cannot read {what}: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise InvalidArgument(f"{path}: cannot read {what}: is a directory")
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISFIFO(st.st_mode)):
            raise InvalidArgument(f"{path}: cannot read {what}: not a regular file")
        fifo = stat.S_ISFIFO(st.st_mode)
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        parts, got = [], 0
        while got < limit:
            try:
                b = os.read(fd, limit - got)
            except OSError as exc:
                raise VDIOError(f"{path}: cannot read {what}: {exc.strerror or exc}") from None
            if not b:
                break
            parts.append(b)
            got += len(b)
        data = b"".join(parts)
        if fifo and not data:
            raise InvalidArgument(
                f"{path}: cannot read {what}: a FIFO (named pipe) with no data and no writer"
            )
        return data
    finally:
        os.close(fd)


def io_error(exc: OSError, path: str, what: str):
    """The engine error for a failed system call on ``path`` (``what`` failed); on a block
    device refused for want of permission, what would grant it."""
    if exc.errno == errno.ENOENT:
        return ImageNotFound(f"{path}: file not found")
    hint = ""
    if exc.errno in (errno.EACCES, errno.EPERM):
        hint = device_access_hint(path, write="writ" in what)
    return VDIOError(f"{path}: {what}: {exc.strerror or exc}{hint}")


def device_access_hint(path: str, write: bool = False) -> str:
    """For a block device this user may not read (or write): '; ' + who may, from the device's
    owner, group and mode, e.g. "add yourself to group 'disk'". '' for anything else."""
    try:
        st = os.stat(path)
    except OSError:
        return ""
    if not stat.S_ISBLK(st.st_mode):
        return ""
    import grp
    import pwd

    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    try:
        owner = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        owner = str(st.st_uid)
    need = "read and write" if write else "read"
    bit = stat.S_IWGRP if write else stat.S_IRGRP
    where = f"the device is {owner}:{group}, mode {stat.S_IMODE(st.st_mode):04o}"
    if st.st_mode & bit and st.st_gid != 0:
        return (f"; {where}: to {need} it, add yourself to group '{group}' "
                f"(sudo usermod -aG {group} $USER, then log in again)")
    return f"; {where}: only {owner} may {need} it (run as {owner}, or change its permissions)"


# -- names stored inside images --------------------------------------------------------------
def resolve_stored_name(
    image_path: str, name: str, *, allow_unsafe: bool = False, what: str = "referenced file"
) -> str:
    """Turn a file name stored inside an image into a path.

    Unless ``allow_unsafe``: the name must be relative, without '..', without a protocol or
    ``json:`` prefix, and must not name a device node, FIFO or socket, nor resolve (through
    symbolic links) outside the image's folder; it is taken relative to the image's folder.
    """
    base = os.path.dirname(os.path.abspath(image_path))
    if not name or "\x00" in name:
        raise UnsafePath(f"{image_path}: empty or invalid {what} name {name!r}")
    if allow_unsafe:
        path = name if os.path.isabs(name) else os.path.join(base, name)
        return os.path.normpath(path)
    norm = name.replace("\\", "/")
    if os.path.isabs(norm) or norm.startswith("/") or (len(norm) > 1 and norm[1] == ":"):
        raise UnsafePath(
            f"{image_path}: {what} {name!r} is an absolute path; "
            "refused unless unsafe paths are allowed"
        )
    if ":" in norm.split("/")[0] or norm.startswith("json:"):
        raise UnsafePath(f"{image_path}: {what} {name!r} carries a protocol prefix; refused")
    parts = [p for p in norm.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise UnsafePath(f"{image_path}: {what} {name!r} leaves the image's folder ('..'); refused")
    path = os.path.join(base, *parts)
    # the real path first: a symbolic link (even one whose target does not exist yet, which a
    # later create would follow) must not lead out of the folder
    real_base = os.path.realpath(base)
    real = os.path.realpath(path)
    if os.path.commonpath([real_base, real]) != real_base:
        raise UnsafePath(
            f"{image_path}: {what} {name!r} resolves outside the image's folder "
            f"(to {real}); refused"
        )
    try:
        st = os.stat(path)
    except OSError:
        return path
    if stat.S_ISBLK(st.st_mode) or stat.S_ISCHR(st.st_mode):
        raise UnsafePath(f"{image_path}: {what} {name!r} is a device node; refused")
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        # a FIFO or socket: opening it would block until some other process writes to it
        raise UnsafePath(
            f"{image_path}: {what} {name!r} is not a regular file (a FIFO or socket); refused"
        )
    return path


def real_path(path: str) -> str:
    """``path`` normalised for comparisons: absolute, symbolic links resolved."""
    return os.path.realpath(os.path.abspath(path))


def relative_name(from_image: str, to_file: str) -> str:
    """The name to store in ``from_image`` for ``to_file`` (relative to its folder); names that
    are not valid UTF-8 cannot be stored as text and are refused (InvalidArgument)."""
    rel = os.path.relpath(os.path.abspath(to_file), os.path.dirname(os.path.abspath(from_image)))
    return require_text(rel, "the file name", from_image)
