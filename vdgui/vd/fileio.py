"""File access shared by every file-based backend: positional I/O, locking, safe names,
temporary-name creation.

Locking: a read-write open takes an exclusive ``flock`` (conflicts with any other read-write
open, in this process or another) and qemu-compatible open-file-description byte-range locks
on bytes 100..299, so qemu-img refuses to write an image we are writing and vice versa.
Read-only opens take no lock and coexist with everything.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import struct
import threading

from .errors import (CorruptImage, FileExists, ImageInUse, ImageNotFound, UnsafePath,
                     VDIOError)

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


def _os_error(exc: OSError, path: str, what: str):
    if exc.errno == errno.ENOENT:
        return ImageNotFound(f"{path}: file not found")
    return VDIOError(f"{path}: {what}: {exc.strerror or exc}")


class ImageFile:
    """An open file with pread/pwrite. ``writable`` opens lock the file exclusively."""

    def __init__(self, path: str, writable: bool = False, create: bool = False,
                 lock: bool = True):
        self.path = path
        self.writable = writable or create
        flags = os.O_RDWR if self.writable else os.O_RDONLY
        if create:
            flags |= os.O_CREAT | os.O_EXCL
        flags |= getattr(os, "O_CLOEXEC", 0)
        try:
            self.fd = os.open(path, flags, 0o644)
        except FileExistsError:
            raise FileExists(f"{path}: file already exists") from None
        except IsADirectoryError:
            raise ImageNotFound(f"{path}: is a directory, not an image file") from None
        except OSError as exc:
            raise _os_error(exc, path, "cannot open") from None
        try:
            st = os.fstat(self.fd)
            if stat.S_ISDIR(st.st_mode):
                raise ImageNotFound(f"{path}: is a directory, not an image file")
            self.is_device = stat.S_ISBLK(st.st_mode) or stat.S_ISCHR(st.st_mode)
            if self.writable and lock:
                self._lock()
        except BaseException:
            os.close(self.fd)
            raise

    def _lock(self) -> None:
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ImageInUse(f"{self.path}: image is in use (opened for writing elsewhere)") from None
        if hasattr(fcntl, "F_OFD_SETLK"):
            lk = struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, _QEMU_LOCK_START, _QEMU_LOCK_LEN, 0)
            try:
                fcntl.fcntl(self.fd, fcntl.F_OFD_SETLK, lk)
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.EACCES):
                    raise ImageInUse(f"{self.path}: image is in use by another program "
                                     "(e.g. qemu holds a lock on it)") from None
                # file systems without byte-range locks: flock alone protects us

    @classmethod
    def create_temp(cls, final: str, *, overwrite: bool = False) -> "ImageFile":
        """Create a new file under a temporary name beside ``final`` (locked for writing).
        Call :meth:`commit` when complete to rename it into place, :meth:`abandon` on failure."""
        if os.path.lexists(final) and not overwrite:
            raise FileExists(f"{final}: file already exists")
        tmp = temp_name(final)
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
                               offset=offset, expected=f"{length} bytes", found=f"{len(data)} bytes")
        return data

    def pwrite(self, offset: int, data) -> None:
        mv = memoryview(data)
        if offset < 0 or offset > _MAX_OFFSET - mv.nbytes:
            raise VDIOError(f"{self.path}: write of {mv.nbytes} bytes at {offset:#x} failed: "
                            "outside the largest possible file")
        try:
            while mv:
                n = os.pwrite(self.fd, mv, offset)
                mv = mv[n:]
                offset += n
        except OSError as exc:
            raise _os_error(exc, self.path, f"write at {offset:#x} failed") from None

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
                    if exc.errno != errno.ENXIO:     # ENXIO: only a hole up to the end
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

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            try:
                os.close(fd)  # releases flock and OFD locks
            except OSError as exc:
                # the descriptor is gone either way; a failure here (EIO on NFS) means data
                # written through it may not have reached the file: an error, never ignored
                raise _os_error(exc, self.path, "close failed") from None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


_FALLOCATE = []
_SYNC_FILE_RANGE = []


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
        fn(fd, 0, 0, 2)   # SYNC_FILE_RANGE_WRITE


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


# -- names stored inside images ---------------------------------------------------------------
def resolve_stored_name(image_path: str, name: str, *, allow_unsafe: bool = False,
                        what: str = "referenced file") -> str:
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
        raise UnsafePath(f"{image_path}: {what} {name!r} is an absolute path; "
                         "refused unless unsafe paths are allowed")
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
        raise UnsafePath(f"{image_path}: {what} {name!r} resolves outside the image's folder "
                         f"(to {real}); refused")
    try:
        st = os.stat(path)
    except OSError:
        return path
    if stat.S_ISBLK(st.st_mode) or stat.S_ISCHR(st.st_mode):
        raise UnsafePath(f"{image_path}: {what} {name!r} is a device node; refused")
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        # a FIFO or socket: opening it would block until some other process writes to it
        raise UnsafePath(f"{image_path}: {what} {name!r} is not a regular file "
                         "(a FIFO or socket); refused")
    return path


def real_path(path: str) -> str:
    """``path`` normalised for comparisons: absolute, symbolic links resolved."""
    return os.path.realpath(os.path.abspath(path))


def relative_name(from_image: str, to_file: str) -> str:
    """The name to store in ``from_image`` for ``to_file`` (relative to its folder)."""
    return os.path.relpath(os.path.abspath(to_file), os.path.dirname(os.path.abspath(from_image)))


# -- writing new files under a temporary name ------------------------------------------------
def temp_name(final: str) -> str:
    d, b = os.path.split(os.path.abspath(final))
    return os.path.join(d, f".{b}.vdgui-tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_files(finals: list[str], *, overwrite: bool = False):
    """Yield temporary paths for ``finals``; on success rename them into place, on any exception
    remove the temporaries. Refuses existing targets unless ``overwrite``."""
    for f in finals:
        if os.path.lexists(f) and not overwrite:
            raise FileExists(f"{f}: file already exists")
    temps = [temp_name(f) for f in finals]
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
