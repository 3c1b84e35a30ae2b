"""Rewriting an image in a verified copy beside it (compact, resize and repair share this):
copy the file sparse, run the hook on the copy, verify, flush, rename over the original in one
atomic step, then relink the children whose link the rewrite changed. Also the small helpers
those operations share (backend_for, require_op, finish, view_read, compare_views)."""
from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable

from ..backend import Backend, ImageFlags, OpenFlags, Operation
from ..errors import Cancelled, CorruptImage, NotSupported, VDError, VDIOError
from ..fileio import ImageFile, LockMode, lock_files, sweep_stale_temps, temp_name
from ..fileio import copy_range as kernel_copy_range
from ..image import Alloc, Image
from ..progress import Progress, ProgressCallback, sub_progress
from ..registry import get_backend, probe
from ..space import preallocate

COPY_CHUNK = 8 << 20
VERIFY_CHUNK = 4 << 20


def backend_for(path: str, format: str | None) -> Backend:
    """The backend named ``format``, or the one probing claims ``path``."""
    return get_backend(format) if format else probe(path)


def require_op(backend: Backend, op: Operation, path: str, what: str) -> None:
    if not backend.can(op):
        raise NotSupported(f"{path}: {what} is not supported for {backend.name} images")


# -- copies --------------------------------------------------------------------------------------
def data_ranges(fd: int, size: int) -> list[tuple[int, int]]:
    """(start, end) ranges of the file holding data (SEEK_DATA/SEEK_HOLE; all if unknown)."""
    out = []
    pos = 0
    try:
        while pos < size:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    break
                raise
            hole = min(os.lseek(fd, data, os.SEEK_HOLE), size)
            if hole > data:
                out.append((data, hole))
            pos = hole
    except OSError:
        return [(0, size)] if size else []
    return out


def copy_range(src: int, dst: int, start: int, end: int, advance: Callable[[int], None],
               path: str = "") -> None:
    """Copy [start, end) between the same offsets of two files: inside the kernel where it
    takes them (fileio.copy_range), read and written here where it does not."""
    pos = start
    while pos < end:
        n = min(COPY_CHUNK, end - pos)
        try:
            done = kernel_copy_range(src, pos, dst, pos, n)
            if done == 0:
                buf = os.pread(src, n, pos)
                if not buf:
                    return
                mv = memoryview(buf)
                off = pos
                while mv:
                    w = os.pwrite(dst, mv, off)
                    mv = mv[w:]
                    off += w
                done = len(buf)
        except OSError as exc:
            raise VDIOError(f"{path}: copy of {n} bytes at {pos:#x} failed: "
                            f"{exc.strerror or exc}") from None
        pos += done
        advance(done)


def remove_stale_temps(path: str) -> None:
    """Delete our own leftovers of dead processes in ``path``'s folder (temps' sweep)."""
    sweep_stale_temps(os.path.dirname(os.path.abspath(path)))


def finish(prog: Progress) -> None:
    """Report the end. The work is complete (committed) here: a late cancel changes nothing."""
    try:
        prog.finish()
    except Cancelled:
        pass


def fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(os.path.dirname(os.path.abspath(path)) or ".", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def view_read(img: Image, below: Callable[[int, int], bytes] | None, offset: int,
              length: int) -> bytes:
    """What ``img`` reads at ``offset`` over ``below`` (the parent's content, None: zeroes)."""
    if offset >= img.size:
        return bytes(length)
    avail = min(length, img.size - offset)
    buf = bytearray(length)
    for s, n, st in img.block_status(offset, avail):
        if st == Alloc.DATA:
            buf[s - offset:s - offset + n] = img.read(s, n)
        elif st == Alloc.UNALLOCATED and below is not None:
            buf[s - offset:s - offset + n] = below(s, n)
    return bytes(buf)


def _pairs(a: list, b: list):
    """Walk two run lists covering the same range: (start, end, status_a, status_b)."""
    i = j = 0
    while i < len(a) and j < len(b):
        s = max(a[i][0], b[j][0])
        e = min(a[i][0] + a[i][1], b[j][0] + b[j][1])
        if e > s:
            yield s, e, a[i][2], b[j][2]
        if a[i][0] + a[i][1] == e:
            i += 1
        if b[j][0] + b[j][1] == e:
            j += 1


def data_bytes(img: Image, start: int, end: int) -> int:
    """Bytes ``img`` itself holds as data in [start, end): the work of reading them."""
    end = min(end, img.size)
    if end <= start:
        return 0
    return sum(n for _s, n, st in img.block_status(start, end - start) if st == Alloc.DATA)


def compare_views(a_img: Image, a_read, b_img: Image, b_read, start: int, end: int,
                  advance: Callable[[int], None]) -> int | None:
    """Compare two views of [start, end) (two images over the same parent content). Ranges that
    both images leave unallocated (or both mark as zero) are equal by construction and are not
    read. Returns the first differing chunk's offset, or None."""
    if end <= start:
        return None
    for s, e, sa, sb in _pairs(a_img.block_status(start, end - start),
                               b_img.block_status(start, end - start)):
        if sa == sb and sa != Alloc.DATA:
            continue                    # not read: no work
        pos = s
        while pos < e:
            n = min(VERIFY_CHUNK - pos % VERIFY_CHUNK, e - pos)
            if a_read(pos, n) != b_read(pos, n):
                return pos
            pos += n
            advance(n)
    return None


def rewrite_in_copy(path: str, backend: Backend, progress: ProgressCallback | None,
                    work: Callable[[Image, ProgressCallback], bool],
                    verify: Callable[[Image, Callable[[int], None]], None] | None = None,
                    verify_bytes: int = 0,
                    open_flags: tuple[OpenFlags, ...] = (OpenFlags.NORMAL,)):
    """Run ``work(image, progress)`` on a copy of the single-file image ``path`` and, when it
    returns True, atomically replace ``path`` with the copy. ``verify(image, advance)`` may raise
    to refuse the replacement. Progress: copy, work, verify, each weighted by bytes."""
    real = os.path.realpath(path)
    remove_stale_temps(real)
    lock = ImageFile(real, writable=True)          # no writer may change the original meanwhile
    tmp = temp_name(real)
    img: Image | None = None
    try:
        size = lock.size()
        ranges = data_ranges(lock.fd, size)
        copy_bytes = sum(e - s for s, e in ranges)
        work_span = max(copy_bytes, 1)
        prog = Progress(progress, copy_bytes + work_span + verify_bytes)
        prog.start()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        out = ImageFile(tmp, create=True)
        try:
            for s, e in ranges:
                copy_range(lock.fd, out.fd, s, e, prog.advance, path)
            out.truncate(size)
            with contextlib.suppress(OSError):      # the original's mode (no shutil to load)
                os.chmod(tmp, stat.S_IMODE(os.stat(real).st_mode))
        finally:
            out.close()

        for i, fl in enumerate(open_flags):
            try:
                img = backend.open(tmp, fl, None)
                break
            except CorruptImage:
                if i == len(open_flags) - 1:
                    raise
        assert img is not None          # the last flags either opened it or raised
        # the children keep their link (VMDK CID, VHDX DataWriteGuid) across the rewrite: a kill
        # between the rename and a relink would otherwise leave them unopenable
        img.keep_link_identity = True
        changed = work(img, sub_progress(prog, copy_bytes, work_span))
        prog.set(copy_bytes + work_span)
        if not changed:
            img.close()
            img = None
            os.unlink(tmp)
            finish(prog)
            return False
        img.flush()
        if verify is not None:
            verify(img, prog.advance)
        stale = _stale_children(real, img)
        fixed = bool(img.flags & ImageFlags.FIXED)
        # the children relinked after the commit point are locked before it
        kid_locks = lock_files([p for p, _be in stale], LockMode.WRITE)
        try:
            img.close()
            img = None
            if fixed:         # the sparse copy left holes: a fixed image holds all its blocks
                with ImageFile(tmp, writable=True) as fixed_file:
                    fixed_file.final = path
                    preallocate(fixed_file, 0, fixed_file.size())
            try:
                fd = os.open(tmp, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                prog.poll()                         # last moment to cancel
                lock.check_in_place()  # the original was not deleted or replaced meanwhile
                os.replace(tmp, real)                # the commit point
            except OSError as exc:
                raise VDIOError(f"{path}: replacing the file failed: "
                                f"{exc.strerror or exc}") from None
            fsync_dir(real)
            _relink_children(real, backend, stale)
        finally:
            kid_locks.close()
        finish(prog)
        return True
    except BaseException as exc:
        if img is not None:
            with contextlib.suppress(Exception):
                img.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, VDError) and tmp in exc.message:
            exc.message = exc.message.replace(tmp, path)  # name the user's file, not ours
            exc.args = (exc.message,)
        raise
    finally:
        lock.close()


def _stale_children(real: str, new: Image) -> list[tuple[str, Backend]]:
    """Differencing images of ``real`` whose link would not accept the rewritten image (formats
    whose link names the parent's modification id, e.g. VHDX parent_linkage), among those whose
    link accepted the original (a link already broken is not rewritten). Refuses (original
    kept) when such a child's backend cannot relink."""
    from ..chain import find_children, link_matches  # a folder scan: only when asked
    try:
        orig = new.backend.open(real, OpenFlags.INFO | OpenFlags.READ_ONLY, None)
    except VDError:
        return []
    stale = []
    try:
        for p, be in find_children(orig):
            try:
                kid = be.open(p, OpenFlags.INFO | OpenFlags.READ_ONLY, None)
            except VDError:
                continue
            try:
                if not link_matches(kid, orig):
                    continue  # a link broken before is left as it is
                try:
                    kid.check_parent_link(new)
                except VDError:
                    if not be.can(Operation.RELINK):
                        raise NotSupported(
                            f"{real}: the operation would break the parent link "
                            f"of {p} and {be.name} cannot relink; nothing was "
                            "changed"
                        ) from None
                    stale.append((p, be))
            finally:
                kid.close()
    finally:
        orig.close()
    return stale


def _relink_children(real: str, backend: Backend, stale: list[tuple[str, Backend]]) -> None:
    if not stale:
        return
    parent = backend.open(real, OpenFlags.READ_ONLY, None)
    try:
        for p, be in stale:
            kid = be.open(p, OpenFlags.NORMAL, None)
            try:
                parent.check_in_place()
                kid.check_in_place()
                kid.set_parent(parent)
                kid.flush()
            finally:
                kid.close()
    finally:
        parent.close()
