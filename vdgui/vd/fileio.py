"""File access shared by every file-based backend: positional I/O, locking, safe names,
temporary-name creation.

Locking (one place: :class:`ImageFile` takes it, :func:`lock_context` says how much): every lock
is taken twice, in our scheme (``flock``: shared or exclusive) and in qemu's (open-file-description
byte-range locks, as qemu's file-posix ``raw_apply_lock_bytes``: a read lock on byte 100+i for each
permission *i* held, on byte 200+i for each permission *i* not shared with others; a permission
is refused when another open holds the opposite byte). Permissions are qemu's BLK_PERM_*: consistent
read (0), write (1), write unchanged (2), resize (3). Modes:

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

Image paths must name a regular file or a block device: anything else (a FIFO, a socket, a
character device) is refused before it can block (opened non-blocking, then checked).
"""
from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import os
import re
import stat
import struct
import threading

from .errors import (
    CorruptImage,
    FileExists,
    ImageChanged,
    ImageInUse,
    ImageNotFound,
    InvalidArgument,
    UnsafePath,
    VDIOError,
    require_text,
)

_QEMU_LOCK_START = 100
_QEMU_LOCK_LEN = 200
_MAX_OFFSET = (1 << 63) - 1      # off_t: no file reaches past this
_BIG_READ = 64 << 20             # reads longer than this are first clamped to the file's end
_UNSYNCED = threading.local()


@contextlib.contextmanager
def unsynced():
    """In this thread, ImageFile.sync() does not wait for the disk (qemu's cache=unsafe): data
    and metadata still reach the file in the same order, but a power loss soon after may lose
    them. For copies the caller does not need durable right away."""
    prev = getattr(_UNSYNCED, "on", False)
    _UNSYNCED.on = True
    try:
        yield
    finally:
        _UNSYNCED.on = prev


def syncing() -> bool:
    """False inside :func:`unsynced` (this thread)."""
    return not getattr(_UNSYNCED, "on", False)


# -- locks ------------------------------------------------------------------------------------
PERM_READ, PERM_WRITE, PERM_WRITE_UNCHANGED, PERM_RESIZE = 1, 2, 4, 8     # qemu's BLK_PERM_*
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


def _ctx_mode() -> LockMode:
    return getattr(_LOCK_CTX, "mode", None) or LockMode.NONE


def _union(modes) -> tuple[int, int]:
    perm = unshared = 0
    for m in modes:
        perm |= m.value[0]
        unshared |= m.value[1]
    return perm, unshared


def _bytes_of(perm: int, unshared: int) -> set[int]:
    return ({_QEMU_LOCK_START + i for i in range(4) if perm >> i & 1}
            | {_QEMU_LOCK_START + 100 + i for i in range(4) if unshared >> i & 1})


class _LockEntry:
    def __init__(self, fd: int):
        self.fd = fd
        self.holders: list[LockMode] = []
        self.writers = 0
        self.flock = 0                 # 0, LOCK_SH or LOCK_EX
        self.held: set[int] = set()    # qemu lock bytes held


_LOCKS: dict[tuple[int, int], _LockEntry] = {}
_LOCKS_GUARD = threading.Lock()


def _forget_locks_in_child() -> None:
    """A forked child shares its parent's lock descriptions: it must never change them (that
    would drop the parent's locks); it starts with an empty table of its own."""
    global _LOCKS_GUARD
    _LOCKS_GUARD = threading.Lock()
    for e in _LOCKS.values():
        with contextlib.suppress(OSError):
            os.close(e.fd)          # the parent's descriptor keeps the locks alive
    _LOCKS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_locks_in_child)


def _ofd(fd: int, cmd: int, typ: int, start: int) -> int:
    lk = struct.pack("hhqqi4x", typ, 0, start, 1, 0)
    return struct.unpack("hhqqi4x", fcntl.fcntl(fd, cmd, lk))[0]


def _in_use(path: str, mode: LockMode, detail: str) -> ImageInUse:
    what = {LockMode.SHARED: "read", LockMode.WRITE: "write",
            LockMode.EXCLUSIVE: "delete or replace"}.get(mode, "open")
    return ImageInUse(f"{path}: image is in use {detail}; cannot {what} it now")


def _apply(e: _LockEntry, perm: int, unshared: int, path: str, mode: LockMode) -> None:
    """Make ``e`` hold (perm, unshared) in both schemes; on a conflict leave it as it was and
    raise ImageInUse."""
    want_flock = 0 if not (perm | unshared) else (
        fcntl.LOCK_EX if perm & (PERM_WRITE | PERM_RESIZE) or unshared & PERM_READ
        else fcntl.LOCK_SH)
    old_flock = e.flock
    if want_flock != e.flock:
        try:
            fcntl.flock(e.fd, (want_flock or fcntl.LOCK_UN) | fcntl.LOCK_NB)
            e.flock = want_flock
        except BlockingIOError:
            raise _in_use(path, mode, "by another process (it holds a lock on it)") from None
        except OSError:
            e.flock = want_flock       # a file system without flock: the OFD locks still work
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
                if have >> i & 1 and _ofd(e.fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK,
                                          _QEMU_LOCK_START + other + i) != fcntl.F_UNLCK:
                    held = "holds" if other == 0 else "does not share"
                    raise _in_use(path, mode, f"by another program (it {held} qemu's "
                                              f"\"{_PERM_NAMES[i]}\" permission)")
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
        _release_bytes(e, added)    # no byte-range locks on this file system: flock alone
        return
    _release_bytes(e, e.held - want)


def _release_bytes(e: _LockEntry, which) -> None:
    for b in sorted(which):
        with contextlib.suppress(OSError):
            _ofd(e.fd, fcntl.F_OFD_SETLK, fcntl.F_UNLCK, b)
        e.held.discard(b)


class _LockHandle:
    __slots__ = ("key", "mode", "writer")

    def __init__(self, key, mode, writer):
        self.key, self.mode, self.writer = key, mode, writer


def _acquire(fd: int, path: str, mode: LockMode, writer: bool) -> _LockHandle | None:
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
                raise ImageInUse(f"{path}: image is in use (opened for writing elsewhere in "
                                 "this program)")
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
        return _LockHandle(key, mode, writer)


def _release(h: _LockHandle | None) -> None:
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
            os.close(e.fd)           # releases flock and every OFD lock of this description
            return
        perm, unshared = _union(e.holders)     # a downgrade: drop what is no longer needed
        if e.flock == fcntl.LOCK_EX and not (perm & (PERM_WRITE | PERM_RESIZE)
                                             or unshared & PERM_READ):
            with contextlib.suppress(OSError):
                fcntl.flock(e.fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                e.flock = fcntl.LOCK_SH
        _release_bytes(e, e.held - _bytes_of(perm, unshared))


class HeldLocks:
    """Locks taken on files by path, without reading them (see :func:`lock_files`)."""

    def __init__(self):
        self._held: list[tuple[int, _LockHandle | None]] = []

    def close(self) -> None:
        while self._held:
            fd, h = self._held.pop()
            os.close(fd)
            _release(h)

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
                fd = _open_checked(p, os.O_RDONLY)
            except OSError as exc:
                raise _os_error(exc, p, "cannot open") from None
            try:
                h = _acquire(fd, p, mode, False)
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
        fd = _open_checked(path, os.O_RDONLY)
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
            if _ofd(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK,
                    _QEMU_LOCK_START + 100 + 1) != fcntl.F_UNLCK:
                return "for reading"
        except OSError:
            return None
        return None
    finally:
        os.close(fd)


def _open_checked(path: str, flags: int, mode: int = 0o644) -> int:
    """os.open that never blocks on a FIFO and refuses what is not a regular file or a block
    device (a FIFO, socket or character device would hang or stream forever)."""
    fd = os.open(path, flags | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0), mode)
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise ImageNotFound(f"{path}: is a directory, not an image file")
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(st.st_mode) else
                    "a socket" if stat.S_ISSOCK(st.st_mode) else
                    "a character device" if stat.S_ISCHR(st.st_mode) else "not a regular file")
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
        return _open_checked(path, os.O_RDONLY)
    except IsADirectoryError:
        raise ImageNotFound(f"{path}: is a directory, not an image file") from None
    except OSError as exc:
        raise _os_error(exc, path, "cannot open") from None


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
            raise InvalidArgument(f"{path}: cannot read {what}: a FIFO (named pipe) with no "
                                  "data and no writer")
        return data
    finally:
        os.close(fd)


def _os_error(exc: OSError, path: str, what: str):
    if exc.errno == errno.ENOENT:
        return ImageNotFound(f"{path}: file not found")
    return VDIOError(f"{path}: {what}: {exc.strerror or exc}")


class ImageFile:
    """An open file with pread/pwrite. ``writable`` opens take the WRITE lock; read-only opens
    the mode of the current :func:`lock_context` (none outside one). ``lock=False``: no lock
    (private temporaries)."""

    def __init__(self, path: str, writable: bool = False, create: bool = False,
                 lock: bool = True):
        self.path = path
        self.writable = writable or create
        self._lock_handle = None
        self.final: str | None = None  # create_temp: the name the file is renamed to
        flags = os.O_RDWR if self.writable else os.O_RDONLY
        if create:
            flags |= os.O_CREAT | os.O_EXCL
        try:
            self.fd = _open_checked(path, flags)
        except FileExistsError:
            raise FileExists(f"{path}: file already exists") from None
        except IsADirectoryError:
            raise ImageNotFound(f"{path}: is a directory, not an image file") from None
        except OSError as exc:
            raise _os_error(exc, path, "cannot open") from None
        try:
            st = os.fstat(self.fd)
            self.is_device = stat.S_ISBLK(st.st_mode) or stat.S_ISCHR(st.st_mode)
            if lock:
                mode = _ctx_mode()
                if self.writable and mode in (LockMode.NONE, LockMode.SHARED):
                    mode = LockMode.WRITE
                self._lock_handle = _acquire(self.fd, path, mode, self.writable)
        except BaseException:
            os.close(self.fd)
            raise

    @classmethod
    def create_temp(cls, final: str, *, overwrite: bool = False) -> ImageFile:
        """Create a new file under a temporary name beside ``final`` (locked for writing).
        Call :meth:`commit` when complete to rename it into place, :meth:`abandon` on failure."""
        if os.path.lexists(final) and not overwrite:
            raise FileExists(f"{final}: file already exists")
        tmp = temp_name(final)
        sweep_stale_temps(os.path.dirname(tmp))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        f = cls(tmp, create=True)
        f.final = final
        return f

    def commit(self) -> None:
        final = getattr(self, "final", None)
        if final and self.path != final:
            os.replace(self.path, final)
            self.path = final

    def abandon(self) -> None:
        """Close and delete a file made by create_temp that was never committed."""
        final = getattr(self, "final", None)
        self.close()
        if final and self.path != final:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    # -- I/O ---------------------------------------------------------------------------------
    def size(self) -> int:
        if self.is_device:
            return os.lseek(self.fd, 0, os.SEEK_END)
        return os.fstat(self.fd).st_size

    def pread(self, offset: int, length: int) -> bytes:
        # offsets and lengths may come from damaged tables: past off_t there is nothing to read
        # (os.pread would raise OverflowError), and a huge length would allocate its whole
        # buffer before reading: clamp it to what the file holds (same result, a short read)
        if offset > _MAX_OFFSET or length > _MAX_OFFSET - max(offset, 0):
            return b""
        if length > _BIG_READ and offset >= 0:
            length = max(0, min(length, self.size() - offset))
        got = 0
        try:
            data = os.pread(self.fd, length, offset)
            if len(data) < length:  # short read: loop (large reads may come back in pieces)
                parts = [data]
                got = len(data)
                while got < length:
                    more = os.pread(self.fd, length - got, offset + got)
                    if not more:
                        break
                    parts.append(more)
                    got += len(more)
                data = b"".join(parts)
        except OSError as exc:
            raise _os_error(exc, self.path, f"read of {length} bytes at {offset + got:#x} "
                                            "failed") from None
        return data

    def read_exact(self, offset: int, length: int, what: str) -> bytes:
        """Read or raise CorruptImage naming ``what`` when the file is too short."""
        data = self.pread(offset, length)
        if len(data) != length:
            raise CorruptImage(f"{what} lies past the end of the file", path=self.path,
                               offset=offset, expected=f"{length} bytes",
                               found=f"{len(data)} bytes")
        return data

    def pwrite(self, offset: int, data) -> None:
        mv = memoryview(data)
        if offset < 0 or offset > _MAX_OFFSET - mv.nbytes:
            raise VDIOError(
                f"{self.path}: write of {mv.nbytes} bytes at {offset:#x} failed: "
                "outside the largest possible file"
            )
        try:
            while mv:
                n = os.pwrite(self.fd, mv, offset)
                mv = mv[n:]
                offset += n
        except OSError as exc:
            raise _os_error(exc, self.path, f"write at {offset:#x} failed") from None

    def pwritev(self, offset: int, bufs) -> None:
        """Gather-write ``bufs`` (bytes-like, in order) at ``offset`` without joining them."""
        if len(bufs) == 1:
            self.pwrite(offset, bufs[0])
            return
        views = [memoryview(b).cast("B") for b in bufs]
        end = offset + sum(v.nbytes for v in views)
        if offset < 0 or end > _MAX_OFFSET:
            raise VDIOError(
                f"{self.path}: write of {end - offset} bytes at {offset:#x} failed: "
                "outside the largest possible file"
            )
        try:
            while views:
                n = os.pwritev(self.fd, views[:_IOV_MAX], offset)
                offset += n
                k = 0
                while k < len(views) and n >= views[k].nbytes:
                    n -= views[k].nbytes
                    k += 1
                del views[:k]
                if n:
                    views[0] = views[0][n:]
        except OSError as exc:
            raise _os_error(exc, self.path, f"write at {offset:#x} failed") from None

    def preadv_into(self, offset: int, buf) -> int:
        """Read into the writable buffer ``buf`` from ``offset`` (no intermediate bytes object);
        returns how many bytes were read: fewer only at the end of the file."""
        mv = memoryview(buf).cast("B")
        n = mv.nbytes
        got = 0
        try:
            while got < n:
                r = os.preadv(self.fd, [mv[got:]], offset + got)
                if r <= 0:
                    break
                got += r
        except OverflowError:  # an offset past off_t (damaged table): nothing there
            return got
        except OSError as exc:
            raise _os_error(
                exc, self.path, f"read of {n} bytes at {offset + got:#x} failed"
            ) from None
        return got

    def data_ranges(self, offset: int, length: int) -> list[tuple[int, int]]:
        """(start, end) ranges of [offset, offset+length) that hold data (SEEK_DATA/SEEK_HOLE);
        the whole range when the file system or device cannot tell."""
        runs = self.data_runs(offset, length)
        if runs is None:
            return [(offset, offset + length)] if length > 0 else []
        return [(a, b) for a, b, is_data in runs if is_data]

    def data_runs(self, offset: int, length: int) -> list[tuple[int, int, bool]] | None:
        """(start, end, is_data) runs of the file over [offset, offset+length) from SEEK_DATA /
        SEEK_HOLE; None for a device or a file system that cannot tell."""
        if self.is_device:
            return None
        end = offset + length
        runs: list[tuple[int, int, bool]] = []
        pos = offset
        try:
            while pos < end:
                try:
                    data = min(os.lseek(self.fd, pos, os.SEEK_DATA), end)
                except OSError as exc:
                    if exc.errno != errno.ENXIO:  # ENXIO: only a hole up to the end
                        raise
                    data = end
                if data > pos:
                    runs.append((pos, data, False))
                if data >= end:
                    break
                hole = min(os.lseek(self.fd, data, os.SEEK_HOLE), end)
                runs.append((data, hole, True))
                pos = hole
        except OSError:
            return None
        return runs

    def truncate(self, size: int) -> None:
        try:
            os.ftruncate(self.fd, size)
        except OSError as exc:
            raise _os_error(exc, self.path, "truncate failed") from None

    def sync(self) -> None:
        if not syncing():
            return
        try:
            os.fsync(self.fd)
        except OSError as exc:
            raise _os_error(exc, self.path, "flush failed") from None

    def punch_hole(self, offset: int, length: int) -> bool:
        """Deallocate a range of the file (keeps the size); False where unsupported."""
        try:
            fallocate = _libc_fallocate()
            if fallocate is None:
                return False
            return fallocate(self.fd, 0x01 | 0x02, offset, length) == 0  # KEEP_SIZE|PUNCH_HOLE
        except OSError:
            return False

    def check_in_place(self, what: str = "the operation") -> None:
        """Raise ImageChanged unless ``path`` still names this open file (see
        :func:`check_same_file`)."""
        if self.fd >= 0:
            check_same_file(self.path, self.fd, what)

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            h, self._lock_handle = self._lock_handle, None
            try:
                os.close(fd)
            except OSError as exc:
                # the descriptor is gone either way; a failure here (EIO on NFS) means data
                # written through it may not have reached the file: an error, never ignored
                raise _os_error(exc, self.path, "close failed") from None
            finally:
                _release(h)  # the locks go with the last descriptor of this file

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


_IOV_MAX = 1024  # buffers per pwritev call (Linux's UIO_MAXIOV)
_FALLOCATE: list = []
_SYNC_FILE_RANGE: list = []


def start_writeback(fd: int) -> None:
    """Ask the kernel to start writing a file's dirty pages now (sync_file_range WRITE, not
    waiting), so a final fsync has little left to do. A no-op where unavailable."""
    if not _SYNC_FILE_RANGE:
        try:
            import ctypes

            fn = ctypes.CDLL(None, use_errno=True).sync_file_range
            fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
            _SYNC_FILE_RANGE.append(fn)
        except (OSError, AttributeError):
            _SYNC_FILE_RANGE.append(None)
    fn = _SYNC_FILE_RANGE[0]
    if fn is not None:
        fn(fd, 0, 0, 2)  # SYNC_FILE_RANGE_WRITE


def _libc_fallocate():
    if not _FALLOCATE:
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            fn = libc.fallocate
            fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
            _FALLOCATE.append(fn)
        except (OSError, AttributeError):
            _FALLOCATE.append(None)
    return _FALLOCATE[0]


def check_same_file(path: str, fd: int, what: str = "the operation") -> None:
    """Raise ImageChanged unless ``path`` still names the file open as ``fd`` (same st_dev and
    st_ino): it was not deleted, renamed away or replaced since it was opened. Every operation
    calls this for each file it opened right before it relinks or deletes anything, so that a
    file changed under it is never relinked to, written over by a rename, or deleted."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ImageChanged(
            f"{path}: the file was deleted or renamed while {what} ran; nothing "
            "was relinked or deleted"
        ) from None
    except OSError as exc:
        raise _os_error(exc, path, "cannot check the file") from None
    try:
        fs = os.fstat(fd)
    except OSError as exc:
        raise _os_error(exc, path, "cannot check the open file") from None
    if (st.st_dev, st.st_ino) != (fs.st_dev, fs.st_ino):
        raise ImageChanged(
            f"{path}: the file was replaced by another one while {what} ran; "
            "nothing was relinked or deleted"
        )


# -- names stored inside images ---------------------------------------------------------------
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


# -- writing new files under a temporary name ------------------------------------------------
# Temporaries are hidden names in the target's folder: ``.<name>.vdgui-tmp-<pid>`` (one file)
# and ``.<name>.vdgui-tmp-<pid>-<8 hex>/`` (a private folder, holding an owner record). A process
# killed before it cleans up leaves them; the next process that makes a temporary in that folder
# removes those whose owner is gone (sweep_stale_temps). Listings skip them (is_temp_name).
_TEMP_RE = re.compile(r"^\..+\.vdgui-tmp-(?P<pid>[0-9]+)(?:-(?P<rand>[0-9a-f]{8}))?$", re.S)
_OWNER = ".vdgui-owner"  # the owner record inside a temporary folder


def temp_name(final: str) -> str:
    d, b = os.path.split(os.path.abspath(final))
    return os.path.join(d, f".{b}.vdgui-tmp-{os.getpid()}")


def is_temp_name(name: str) -> bool:
    """Is ``name`` (a base name) one of our temporaries? Listings never show these."""
    return _TEMP_RE.match(os.path.basename(name)) is not None


def _proc_start(pid: int) -> str | None:
    """The start time of process ``pid`` (clock ticks since boot), None when unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        return data[data.rindex(b")") + 2 :].split()[19].decode()
    except (OSError, ValueError, IndexError):
        return None


def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # never ours to judge
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _owner_record() -> str:
    import json
    import socket

    return json.dumps(
        {
            "host": socket.gethostname(),
            "boot": _boot_id(),
            "pid": os.getpid(),
            "start": _proc_start(os.getpid()),
        }
    )


def _owner_gone(folder: str, pid: int) -> bool:
    """A temporary folder's owner is gone: its record names this host, and the machine was
    rebooted since, or the process no longer runs (or its PID now belongs to another process).
    A folder from another host (a shared file system) is never judged gone."""
    import json
    import socket

    try:
        fd = os.open(os.path.join(folder, _OWNER), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        rec = json.loads(os.read(fd, 4096).decode())
    except (OSError, ValueError):
        return False
    finally:
        os.close(fd)
    if (
        not isinstance(rec, dict)
        or rec.get("host") != socket.gethostname()
        or rec.get("pid") != pid
    ):
        return False
    boot = _boot_id()
    if boot is not None and rec.get("boot") not in (None, boot):
        return True  # rebooted since: nothing of before still runs
    if not _pid_alive(pid):
        return True
    start = _proc_start(pid)
    return start is not None and rec.get("start") is not None and start != rec.get("start")


def sweep_stale_temps(folder: str) -> list[str]:
    """Remove our temporaries in ``folder`` whose process is gone; return their names. Only
    names of our pattern are considered: a file whose PID no longer runs, a folder whose owner
    record says its process is gone. Symbolic links and anything else are never touched."""
    import shutil

    removed: list[str] = []
    try:
        names = os.listdir(folder or ".")
    except OSError:
        return removed
    me = os.getpid()
    for n in names:
        m = _TEMP_RE.match(n)
        if m is None:
            continue
        pid = int(m.group("pid"))
        if pid == me:
            continue
        p = os.path.join(folder, n)
        try:
            st = os.lstat(p)
        except OSError:
            continue
        try:
            if m.group("rand") and stat.S_ISDIR(st.st_mode):
                if _owner_gone(p, pid):
                    shutil.rmtree(p)
                    removed.append(n)
            elif not m.group("rand") and stat.S_ISREG(st.st_mode) and not _pid_alive(pid):
                os.unlink(p)
                removed.append(n)
        except OSError:
            continue
    return removed


def make_temp_dir(dst_path: str) -> str:
    """A private temporary folder beside ``dst_path`` (``.<name>.vdgui-tmp-<pid>-<8 hex>/``,
    mode 0700, with an owner record), after removing stale ones of dead processes there."""
    folder = os.path.dirname(os.path.abspath(dst_path))
    if not os.path.isdir(folder):
        raise ImageNotFound(f"{folder}: target folder does not exist")
    sweep_stale_temps(folder)
    name = f".{os.path.basename(dst_path)}.vdgui-tmp-{os.getpid()}-{os.urandom(4).hex()}"
    path = os.path.join(folder, name)
    try:
        os.mkdir(path, 0o700)
        fd = os.open(os.path.join(path, _OWNER), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, _owner_record().encode())
        finally:
            os.close(fd)
    except OSError as exc:
        import shutil

        shutil.rmtree(path, ignore_errors=True)
        raise VDIOError(
            f"{folder}: cannot create a temporary folder: {exc.strerror or exc}"
        ) from None
    return path


def temp_dir_files(tmpdir: str):
    """(path, path relative to ``tmpdir``) of every file a copy made in ``tmpdir`` (the owner
    record left out)."""
    for root, _dirs, files in os.walk(tmpdir):
        for name in files:
            if root == tmpdir and name == _OWNER:
                continue
            p = os.path.join(root, name)
            yield p, os.path.relpath(p, tmpdir)


@contextlib.contextmanager
def atomic_files(finals: list[str], *, overwrite: bool = False):
    """Yield temporary paths for ``finals``; on success rename them into place, on any exception
    remove the temporaries. Refuses existing targets unless ``overwrite``."""
    for f in finals:
        if os.path.lexists(f) and not overwrite:
            raise FileExists(f"{f}: file already exists")
    temps = [temp_name(f) for f in finals]
    for d in {os.path.dirname(t) for t in temps}:
        sweep_stale_temps(d)
    for t in temps:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(t)
    try:
        yield temps
    except BaseException:
        for t in temps:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(t)
        raise
    for t, f in zip(temps, finals):
        if os.path.exists(t):
            os.replace(t, f)


def close_all(closers) -> None:
    """Call every ``close`` in ``closers`` even when one fails; then raise the first error (a
    failed final flush must not leave the other files of an image open and locked)."""
    first = None
    for close in closers:
        try:
            close()
        except BaseException as exc:
            first = first or exc
    if first is not None:
        raise first
