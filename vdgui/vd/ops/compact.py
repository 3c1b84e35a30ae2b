"""Compact an image (vd.h VDCompact): drop blocks that read as zeroes (or, for a differencing
image, that read the same as the parent), close the holes, shrink the file.

Safety: the COMPACT hook moves blocks around inside the file. So that a crash, a kill or a cancel
can never leave a damaged image, a single-file image is compacted in a copy beside it
(``.<name>.vdgui-tmp-<pid>``, sparse, with copy_file_range), the copy is checked to read exactly
as the original, flushed, and then renamed over the original in one atomic step. Until the rename
the original is untouched (and locked against writers); after it, the compacted image is complete.
Images made of several files are compacted in place by the hook (the backend orders its writes
data -> tables -> header). docs/operations.md has the step-by-step reasoning.

:func:`rewrite_in_copy` is the shared machinery (also used by resize and repair).
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
from typing import Callable

from ..backend import Backend, ImageFlags, OpenFlags, Operation
from ..disk import Disk
from ..errors import Cancelled, CorruptImage, NotSupported, VDError, VDIOError
from ..fileio import ImageFile, LockMode, lock_files, sweep_stale_temps, temp_name
from ..image import Alloc, Image
from ..progress import Progress, ProgressCallback
from ..registry import get_backend, probe
from ..space import preallocate

COPY_CHUNK = 8 << 20
VERIFY_CHUNK = 4 << 20


def _backend(path: str, format: str | None) -> Backend:
    return get_backend(format) if format else probe(path)


def require_op(backend: Backend, op: Operation, path: str, what: str) -> None:
    if not backend.can(op):
        raise NotSupported(f"{path}: {what} is not supported for {backend.name} images")


# -- copies --------------------------------------------------------------------------------------
def _data_ranges(fd: int, size: int) -> list[tuple[int, int]]:
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


def _copy_range(src: int, dst: int, start: int, end: int, advance: Callable[[int], None],
                path: str = "") -> None:
    pos = start
    while pos < end:
        n = min(COPY_CHUNK, end - pos)
        try:
            done = os.copy_file_range(src, dst, n, pos, pos)
        except (OSError, AttributeError):
            done = 0
        if done <= 0:
            try:
                buf = os.pread(src, n, pos)
                if not buf:
                    return
                mv = memoryview(buf)
                off = pos
                while mv:
                    w = os.pwrite(dst, mv, off)
                    mv = mv[w:]
                    off += w
            except OSError as exc:
                raise VDIOError(f"{path}: copy of {n} bytes at {pos:#x} failed: "
                                f"{exc.strerror or exc}") from None
            done = len(buf)
        pos += done
        advance(done)


def remove_stale_temps(path: str) -> None:
    """Delete our own leftovers of dead processes in ``path``'s folder (fileio's sweep)."""
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
            advance(e - s)
            continue
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
        ranges = _data_ranges(lock.fd, size)
        copy_bytes = sum(e - s for s, e in ranges)
        work_span = max(copy_bytes, 1)
        prog = Progress(progress, copy_bytes + work_span + verify_bytes)
        prog.start()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        out = ImageFile(tmp, create=True)
        try:
            for s, e in ranges:
                _copy_range(lock.fd, out.fd, s, e, prog.advance, path)
            out.truncate(size)
            with contextlib.suppress(OSError):
                shutil.copymode(real, tmp)
        finally:
            out.close()

        def sub(done, total):
            frac = done / total if total else 1.0
            prog.set(copy_bytes + int(work_span * min(max(frac, 0.0), 1.0)))

        for i, fl in enumerate(open_flags):
            try:
                img = backend.open(tmp, fl, None)
                break
            except CorruptImage:
                if i == len(open_flags) - 1:
                    raise
        # the children keep their link (VMDK CID, VHDX DataWriteGuid) across the rewrite: a kill
        # between the rename and a relink would otherwise leave them unopenable
        img.keep_link_identity = True
        changed = work(img, sub)
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
                prog.check()                         # last moment to cancel
                lock.check_in_place()  # the original was not deleted or replaced meanwhile
                os.replace(tmp, real)                # the commit point
            except OSError as exc:
                raise VDIOError(f"{path}: replacing the file failed: {exc.strerror or exc}") from None
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
            exc.message = exc.message.replace(tmp, path)     # name the user's file, not ours
            exc.args = (exc.message,)
        raise
    finally:
        lock.close()


def _stale_children(real: str, new: Image) -> list[tuple[str, Backend]]:
    """Differencing images of ``real`` whose link would not accept the rewritten image (formats
    whose link names the parent's modification id, e.g. VHDX parent_linkage), among those whose
    link accepted the original (a link already broken is not rewritten). Refuses (original
    kept) when such a child's backend cannot relink."""
    from ..chain import find_children, link_matches
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
                    continue                    # a link broken before is left as it is
                try:
                    kid.check_parent_link(new)
                except VDError:
                    if not be.can(Operation.RELINK):
                        raise NotSupported(f"{real}: the operation would break the parent link "
                                           f"of {p} and {be.name} cannot relink; nothing was "
                                           "changed") from None
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


# -- compact ------------------------------------------------------------------------------------
def compact(path: str, *, format: str | None = None, drop_parent_duplicates: bool = False,
            progress: ProgressCallback | None = None) -> None:
    """Compact ``path`` with its backend's COMPACT hook.

    A base image drops its all-zero blocks. A differencing image is always compared with its
    parent's content (a zero block over non-zero parent data is data and is kept); blocks reading
    the same as the parent are dropped, which keeps the content. ``drop_parent_duplicates`` is
    accepted for API symmetry: for a differencing image the parent comparison is the only
    content-preserving rule, so it is always applied.
    """
    backend = _backend(path, format)
    require_op(backend, Operation.COMPACT, path, "compact")
    with Disk.open_chain(path, backend.name, OpenFlags.READ_ONLY) as chain:
        top = len(chain.images) - 1
        orig = chain.images[top]
        below = (lambda o, n: chain._read_below(top, o, n)) if top > 0 else None
        del drop_parent_duplicates

        def work(img: Image, cb) -> bool:
            img.compact(cb, below)
            return True

        def verify(img: Image, advance) -> None:
            if img.size != orig.size:
                raise CorruptImage(f"{path}: compact changed the virtual size; original kept",
                                   expected=orig.size, found=img.size)
            bad = compare_views(orig, lambda o, n: chain.read(o, n), img,
                                lambda o, n: view_read(img, below, o, n), 0, orig.size, advance)
            if bad is not None:
                raise CorruptImage(f"{path}: the compacted copy reads differently at offset "
                                   f"{bad:#x}; the original is kept unchanged")

        if not orig.single_file:
            _compact_in_place(path, backend, progress, below, chain)
            return
        rewrite_in_copy(path, backend, progress, work, verify, verify_bytes=orig.size)


def _compact_in_place(path, backend, progress, below, chain: Disk) -> None:
    """Images of several files: run the hook on the image itself (backend write ordering)."""
    img = backend.open(path, OpenFlags.NORMAL, None)
    try:
        prog = Progress(progress, max(img.size, 1))
        prog.start()
        img.compact(lambda d, t: prog.set(int(prog.total * (d / t if t else 1.0))), below)
        img.flush()
        finish(prog)
    finally:
        img.close()


__all__ = ["compact", "rewrite_in_copy", "view_read", "remove_stale_temps"]
