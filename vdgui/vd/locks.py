"""Locks on image files (:class:`~vdgui.vd.fileio.ImageFile` takes them, :func:`lock_context`
says how much): every lock is taken twice, in our scheme (``flock``: shared or exclusive) and in
qemu's (open-file-description byte-range locks, as qemu's file-posix ``raw_apply_lock_bytes``: a
read lock on byte 100+i for each permission *i* held, on byte 200+i for each permission *i* not
shared with others; a permission is refused when another open holds the opposite byte).
Permissions are qemu's BLK_PERM_*: consistent read (0), write (1), write unchanged (2), resize
(3). Modes:

* ``SHARED`` - readers and the parents (backing files) of an image being written: hold consistent
  read, share neither write nor resize (qemu's reader and backing-file locks). A writer or a
  resize elsewhere is refused while it is held, and it is refused while one is held.
* ``WRITE`` - a read-write open: hold read, write and resize; share none of them (stricter than
  qemu's writer, which shares consistent read: no program, not even a ``-U`` reader, holds a
  file we write). In this process, a second read-write open of the same file is refused too.
* ``EXCLUSIVE`` - an image that will be deleted or replaced: hold and refuse everything.
* ``NONE`` - metadata peeks (INFO opens), qemu's ``-U`` (force share), private temporaries.

One process keeps one lock descriptor per file (device, inode), holding the union of what its
opens need, so that a read-only open inside an operation that writes the same file (read-ahead
threads, the chain opened for comparison) does not refuse itself.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import os
import struct
import threading

from .errors import ImageInUse
from .paths import io_error, open_checked

_QEMU_LOCK_START = 100
_QEMU_LOCK_LEN = 200


PERM_READ, PERM_WRITE, PERM_WRITE_UNCHANGED, PERM_RESIZE = 1, 2, 4, 8  # qemu's BLK_PERM_*
_PERM_NAMES = ("consistent read", "write", "write unchanged", "resize")
_PERM_ALL = 15


class LockMode(enum.Enum):
    """(permissions held, permissions not shared) - see the module docstring."""

    NONE = (0, 0)
    SHARED = (PERM_READ, PERM_WRITE | PERM_RESIZE)
    WRITE = (PERM_READ | PERM_WRITE | PERM_RESIZE, PERM_READ | PERM_WRITE | PERM_RESIZE)
    EXCLUSIVE = (_PERM_ALL, _PERM_ALL)


_LOCK_CTX = threading.local()


@contextlib.contextmanager
def lock_context(mode: LockMode):
    """Read-only :class:`ImageFile` opens in this thread take ``mode`` (writable opens take at
    least WRITE). Backend.open sets it from the open flags, so every file a backend opens for an
    image (extents, data files, bundle parts) is locked alike."""
    prev = getattr(_LOCK_CTX, "mode", None)
    _LOCK_CTX.mode = mode
    try:
        yield
    finally:
        _LOCK_CTX.mode = prev


def current_lock_mode() -> LockMode:
    """The mode :func:`lock_context` set in this thread (NONE outside one)."""
    return getattr(_LOCK_CTX, "mode", None) or LockMode.NONE


def _union(modes) -> tuple[int, int]:
    perm = unshared = 0
    for m in modes:
        perm |= m.value[0]
        unshared |= m.value[1]
    return perm, unshared


def _bytes_of(perm: int, unshared: int) -> set[int]:
    return {_QEMU_LOCK_START + i for i in range(4) if perm >> i & 1} | {
        _QEMU_LOCK_START + 100 + i for i in range(4) if unshared >> i & 1
    }


class _LockEntry:
    def __init__(self, fd: int):
        self.fd = fd
        self.holders: list[LockMode] = []
        self.writers = 0
        self.flock = 0  # 0, LOCK_SH or LOCK_EX
        self.held: set[int] = set()  # qemu lock bytes held


_LOCKS: dict[tuple[int, int], _LockEntry] = {}
_LOCKS_GUARD = threading.Lock()


def _forget_locks_in_child() -> None:
    """A forked child shares its parent's lock descriptions: it must never change them (that
    would drop the parent's locks); it starts with an empty table of its own."""
    global _LOCKS_GUARD
    _LOCKS_GUARD = threading.Lock()
    for e in _LOCKS.values():
        with contextlib.suppress(OSError):
            os.close(e.fd)  # the parent's descriptor keeps the locks alive
    _LOCKS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_locks_in_child)


def _ofd(fd: int, cmd: int, typ: int, start: int) -> int:
    lk = struct.pack("hhqqi4x", typ, 0, start, 1, 0)
    return struct.unpack("hhqqi4x", fcntl.fcntl(fd, cmd, lk))[0]


def _in_use(path: str, mode: LockMode, detail: str) -> ImageInUse:
    what = {
        LockMode.SHARED: "read",
        LockMode.WRITE: "write",
        LockMode.EXCLUSIVE: "delete or replace",
    }.get(mode, "open")
    return ImageInUse(f"{path}: image is in use {detail}; cannot {what} it now")


def _apply(e: _LockEntry, perm: int, unshared: int, path: str, mode: LockMode) -> None:
    """Make ``e`` hold (perm, unshared) in both schemes; on a conflict leave it as it was and
    raise ImageInUse."""
    want_flock = (
        0
        if not (perm | unshared)
        else (
            fcntl.LOCK_EX
            if perm & (PERM_WRITE | PERM_RESIZE) or unshared & PERM_READ
            else fcntl.LOCK_SH
        )
    )
    old_flock = e.flock
    if want_flock != e.flock:
        try:
            fcntl.flock(e.fd, (want_flock or fcntl.LOCK_UN) | fcntl.LOCK_NB)
            e.flock = want_flock
        except BlockingIOError:
            raise _in_use(path, mode, "by another process (it holds a lock on it)") from None
        except OSError:
            e.flock = want_flock  # a file system without flock: the OFD locks still work
    if not hasattr(fcntl, "F_OFD_SETLK"):
        return
    want = _bytes_of(perm, unshared)
    added = want - e.held
    try:
        for b in sorted(added):
            _ofd(e.fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, b)
            e.held.add(b)
        # qemu's order: take, then test the opposite bytes (two openers at once both back off)
        for i in range(4):
            for have, other in ((perm, 100), (unshared, 0)):
                if (
                    have >> i & 1
                    and _ofd(e.fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, _QEMU_LOCK_START + other + i)
                    != fcntl.F_UNLCK
                ):
                    held = "holds" if other == 0 else "does not share"
                    raise _in_use(
                        path,
                        mode,
                        f'by another program (it {held} qemu\'s "{_PERM_NAMES[i]}" permission)',
                    )
    except ImageInUse:
        _release_bytes(e, added)
        if old_flock != e.flock:
            with contextlib.suppress(OSError):
                fcntl.flock(e.fd, (old_flock or fcntl.LOCK_UN) | fcntl.LOCK_NB)
            e.flock = old_flock
        raise
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            _release_bytes(e, added)
            raise _in_use(path, mode, "by another program (qemu holds a lock on it)") from None
        _release_bytes(e, added)  # no byte-range locks on this file system: flock alone
        return
    _release_bytes(e, e.held - want)


def _release_bytes(e: _LockEntry, which) -> None:
    for b in sorted(which):
        with contextlib.suppress(OSError):
            _ofd(e.fd, fcntl.F_OFD_SETLK, fcntl.F_UNLCK, b)
        e.held.discard(b)


class LockHandle:
    """One open's share of its file's lock (give it back to :func:`release_lock`)."""

    __slots__ = ("key", "mode", "writer")

    def __init__(self, key, mode, writer):
        self.key, self.mode, self.writer = key, mode, writer


def acquire_lock(fd: int, path: str, mode: LockMode, writer: bool) -> LockHandle | None:
    """Add ``mode`` to the lock this process holds on ``fd``'s file (ImageInUse when refused);
    None for NONE."""
    if mode is LockMode.NONE:
        return None
    st = os.fstat(fd)
    key = (st.st_dev, st.st_ino)
    with _LOCKS_GUARD:
        old = _LOCKS.get(key)
        fresh = old is None
        # a new entry shares fd's open file description
        e = _LockEntry(os.dup(fd)) if old is None else old
        try:
            if writer and e.writers:
                raise ImageInUse(
                    f"{path}: image is in use (opened for writing elsewhere in this program)"
                )
            perm, unshared = _union(e.holders + [mode])
            _apply(e, perm, unshared, path, mode)
        except BaseException:
            if fresh:
                os.close(e.fd)
            raise
        if fresh:
            _LOCKS[key] = e
        e.holders.append(mode)
        e.writers += writer
        return LockHandle(key, mode, writer)


def release_lock(h: LockHandle | None) -> None:
    """Give back what :func:`acquire_lock` took; the last holder's release drops the file's lock."""
    if h is None:
        return
    with _LOCKS_GUARD:
        e = _LOCKS.get(h.key)
        if e is None:
            return
        with contextlib.suppress(ValueError):
            e.holders.remove(h.mode)
        e.writers -= h.writer
        if not e.holders:
            del _LOCKS[h.key]
            os.close(e.fd)  # releases flock and every OFD lock of this description
            return
        perm, unshared = _union(e.holders)  # a downgrade: drop what is no longer needed
        if e.flock == fcntl.LOCK_EX and not (
            perm & (PERM_WRITE | PERM_RESIZE) or unshared & PERM_READ
        ):
            with contextlib.suppress(OSError):
                fcntl.flock(e.fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                e.flock = fcntl.LOCK_SH
        _release_bytes(e, e.held - _bytes_of(perm, unshared))


class HeldLocks:
    """Locks taken on files by path, without reading them (see :func:`lock_files`)."""

    def __init__(self):
        self._held: list[tuple[int, LockHandle | None]] = []

    def close(self) -> None:
        while self._held:
            fd, h = self._held.pop()
            os.close(fd)
            release_lock(h)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def lock_files(paths, mode: LockMode) -> HeldLocks:
    """Take ``mode`` on every file of ``paths`` now (ImageInUse when another program holds one);
    an operation takes them before its commit point for files it will change after it (e.g.
    children it relinks), so that nothing fails half-way. Opens of the same files by this
    process later on are not refused by these locks."""
    held = HeldLocks()
    try:
        for p in paths:
            try:
                fd = open_checked(p, os.O_RDONLY)
            except OSError as exc:
                raise io_error(exc, p, "cannot open") from None
            try:
                h = acquire_lock(fd, p, mode, False)
            except BaseException:
                os.close(fd)
                raise
            held._held.append((fd, h))
    except BaseException:
        held.close()
        raise
    return held


def held_elsewhere(path: str) -> str | None:
    """Who holds ``path`` against changes right now, without taking anything: "for writing"
    when another open holds qemu's write permission (byte 101) or our exclusive flock, "for
    reading" when one refuses writers (byte 201); None when nobody does or it cannot be told.
    A look for the app's state column; an operation still takes its locks."""
    try:
        fd = open_checked(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            if _ofd(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, _QEMU_LOCK_START + 1) != fcntl.F_UNLCK:
                return "for writing"
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                fcntl.flock(fd, fcntl.LOCK_UN)
            except OSError:
                return "for writing"
            if (
                _ofd(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, _QEMU_LOCK_START + 100 + 1)
                != fcntl.F_UNLCK
            ):
                return "for reading"
        except OSError:
            return None
        return None
    finally:
        os.close(fd)
