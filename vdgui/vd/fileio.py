"""File access shared by every file-based backend: :class:`ImageFile` (positional I/O, the one
place locks are taken), durability helpers (unsynced, start_writeback, punch_hole),
check_same_file and close_all.

Split by concern (issue #14): locks in :mod:`.locks`, safe opening and stored names in
:mod:`.paths`, temporaries in :mod:`.temps`; their public names are re-exported here.
"""

from __future__ import annotations

import contextlib
import errno
import os
import queue
import stat
import threading
from collections.abc import Callable
from typing import TypeVar

from .errors import CorruptImage, FileExists, ImageChanged, ImageNotFound, VDIOError
from .locks import (
    PERM_READ,
    PERM_RESIZE,
    PERM_WRITE,
    PERM_WRITE_UNCHANGED,
    HeldLocks,
    LockMode,
    acquire_lock,
    current_lock_mode,
    held_elsewhere,
    lock_context,
    lock_files,
    release_lock,
)
from .paths import (
    io_error,
    open_checked,
    open_image_path,
    read_small_file,
    real_path,
    relative_name,
    resolve_stored_name,
)
from .temps import (
    atomic_files,
    is_temp_name,
    make_temp_dir,
    sweep_stale_temps,
    temp_dir_files,
    temp_name,
)

# ours and the re-exported public names of locks, paths and temps
__all__ = [
    "COPY_RANGE_UNSUPPORTED",
    "PERM_READ",
    "PERM_RESIZE",
    "PERM_WRITE",
    "PERM_WRITE_UNCHANGED",
    "HeldLocks",
    "ImageFile",
    "LockMode",
    "atomic_files",
    "check_same_file",
    "close_all",
    "copy_range",
    "held_elsewhere",
    "is_temp_name",
    "lock_context",
    "lock_files",
    "make_temp_dir",
    "open_image_path",
    "read_small_file",
    "real_path",
    "relative_name",
    "resolve_stored_name",
    "start_writeback",
    "sweep_stale_temps",
    "syncing",
    "temp_dir_files",
    "temp_name",
    "unsynced",
]

_MAX_OFFSET = (1 << 63) - 1  # off_t: no file reaches past this
_BIG_READ = 64 << 20  # reads longer than this are first clamped to the file's end
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


_T = TypeVar("_T")


class ImageFile:
    """An open file with pread/pwrite. ``writable`` opens take the WRITE lock; read-only opens
    the mode of the current :func:`lock_context` (none outside one). ``lock=False``: no lock
    (private temporaries)."""

    # offsets here are offsets in ``fd``: copy_file_range may use it (a window onto a part of
    # another file, as an OVA member, says False)
    kernel_copy = True

    def __init__(self, path: str, writable: bool = False, create: bool = False, lock: bool = True):
        self.path = path
        self.writable = writable or create
        self._lock_handle = None
        self.final: str | None = None  # create_temp: the name the file is renamed to
        self._punches: queue.SimpleQueue | None = None  # punch_later's work, its thread below
        self._puncher: threading.Thread | None = None
        flags = os.O_RDWR if self.writable else os.O_RDONLY
        if create:
            flags |= os.O_CREAT | os.O_EXCL
        try:
            self.fd = open_checked(path, flags)
        except FileExistsError:
            raise FileExists(f"{path}: file already exists") from None
        except IsADirectoryError:
            raise ImageNotFound(f"{path}: is a directory, not an image file") from None
        except OSError as exc:
            what = "cannot open for writing" if self.writable else "cannot open"
            raise io_error(exc, path, what) from None
        try:
            st = os.fstat(self.fd)
            self.is_device = stat.S_ISBLK(st.st_mode) or stat.S_ISCHR(st.st_mode)
            if lock:
                mode = current_lock_mode()
                if self.writable and mode in (LockMode.NONE, LockMode.SHARED):
                    mode = LockMode.WRITE
                self._lock_handle = acquire_lock(self.fd, path, mode, self.writable)
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
            raise io_error(
                exc, self.path, f"read of {length} bytes at {offset + got:#x} failed"
            ) from None
        return data

    def read_exact(self, offset: int, length: int, what: str) -> bytes:
        """Read or raise CorruptImage naming ``what`` when the file is too short."""
        data = self.pread(offset, length)
        if len(data) != length:
            raise CorruptImage(
                f"{what} lies past the end of the file",
                path=self.path,
                offset=offset,
                expected=f"{length} bytes",
                found=f"{len(data)} bytes",
            )
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
            raise io_error(exc, self.path, f"write at {offset:#x} failed") from None

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
            raise io_error(exc, self.path, f"write at {offset:#x} failed") from None

    def pwrite_pieces(self, pieces) -> int:
        """Write ``(offset, buffer)`` pieces given in file order, each run of neighbours in one
        pwritev; returns the end of the last piece (-1 when there is none)."""
        at, start = -1, -1
        run: list = []
        for off, buf in pieces:
            if off != at and run:
                self.pwritev(start, run)
                run = []
            if not run:
                start = off
            run.append(buf)
            at = off + memoryview(buf).nbytes
        if run:
            self.pwritev(start, run)
        return at

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
            raise io_error(
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
            raise io_error(exc, self.path, "truncate failed") from None

    def punch_later(self, ranges: list[tuple[int, int]]) -> None:
        """Deallocate (offset, length) ranges in a helper thread: for space nothing references
        any more, whose freeing need not hold up the caller. sync and close wait for it."""
        if not ranges:
            return
        if self._punches is None:
            self._punches = queue.SimpleQueue()
            self._puncher = threading.Thread(target=self._punch_worker, args=(self._punches,),
                                             name="vdgui-punch", daemon=True)
            self._puncher.start()
        self._punches.put(list(ranges))

    def _punch_worker(self, work: queue.SimpleQueue) -> None:
        while (item := work.get()) is not None:
            for off, n in item:
                self.punch_hole(off, n)

    def wait_punches(self) -> None:
        if self._punches is not None and self._puncher is not None:
            self._punches.put(None)
            self._puncher.join()
        self._punches = self._puncher = None

    def sync(self) -> None:
        self.wait_punches()
        if not syncing():
            return
        try:
            os.fsync(self.fd)
        except OSError as exc:
            raise io_error(exc, self.path, "flush failed") from None

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
        self.wait_punches()
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            h, self._lock_handle = self._lock_handle, None
            try:
                os.close(fd)
            except OSError as exc:
                # the descriptor is gone either way; a failure here (EIO on NFS) means data
                # written through it may not have reached the file: an error, never ignored
                raise io_error(exc, self.path, "close failed") from None
            finally:
                release_lock(h)  # the locks go with the last descriptor of this file

    def hand_to(self, owner: Callable[[ImageFile], _T]) -> _T:
        """``owner(self)``: what keeps this file from now on (an image opened on it); the
        file is closed when that raises."""
        try:
            return owner(self)
        except BaseException:
            self.close()
            raise

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


# copy_file_range errors that mean "not here" (other file system, old kernel, a device, a
# file type it does not handle): the caller copies the long way instead
COPY_RANGE_UNSUPPORTED = frozenset({errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP,
                                    errno.ENOTSUP, errno.EBADF, errno.ETXTBSY, errno.EPERM})


def copy_range(src_fd: int, src_off: int, dst_fd: int, dst_off: int, length: int) -> int:
    """Copy ``length`` bytes between files inside the kernel (os.copy_file_range: a reflink on
    btrfs/XFS, no round trip through Python elsewhere). Returns the bytes copied: fewer when
    the source ends early, 0 when copy_file_range is unavailable or refuses these files
    (:data:`COPY_RANGE_UNSUPPORTED`); the caller copies the rest itself. Other errors raise."""
    done = 0
    cfr = getattr(os, "copy_file_range", None)
    if cfr is None:
        return 0
    while done < length:
        try:
            n = cfr(src_fd, dst_fd, length - done, src_off + done, dst_off + done)
        except OSError as exc:
            if exc.errno in COPY_RANGE_UNSUPPORTED:
                return done
            raise
        if n <= 0:
            break
        done += n
    return done


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
        raise io_error(exc, path, "cannot check the file") from None
    try:
        fs = os.fstat(fd)
    except OSError as exc:
        raise io_error(exc, path, "cannot check the open file") from None
    if (st.st_dev, st.st_ino) != (fs.st_dev, fs.st_ino):
        raise ImageChanged(
            f"{path}: the file was replaced by another one while {what} ran; "
            "nothing was relinked or deleted"
        )


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
