"""The copy pipeline shared by copy and merge: source windows read ahead in worker threads
(Readers), the kernel's writeback of the target started as the copy goes (Writeback), ranges
made to read zeroes without writing zeroes where the target need not (store_zeroes), a copy's
target writer skipping zero grains (Writer) and windows copied inside the kernel into flat
targets (CopyRanges, copy_file_range)."""
from __future__ import annotations

import contextlib
import contextvars
import os
import threading
from typing import TYPE_CHECKING

from ..alloc import Alloc
from ..backend import Operation
from ..disk import Disk
from ..errors import NotSupported, VDIOError
from ..fileio import ImageFile, copy_range, start_writeback, syncing
from ..image import FillFn, Image
from ..ioqueue import IoQueue, IoRequest
from ..sparse import is_zero, zeroes

if TYPE_CHECKING:  # pragma: no cover
    from concurrent.futures import Future

READAHEAD = 32 << 20        # bytes read ahead
READERS = 4                 # reader threads (flat copies of file-based chains)
WRITEBACK_EVERY = 64 << 20  # start the kernel writing the target out every 64 MiB
WINDOW = 1 << 20            # bytes read/written per step (at least one target block)
MAX_GRAIN = 2 << 20         # zero detection granularity (and window) at most
MIN_GRAIN = 4096            # zero detection granularity (at least)
COARSE = 64 << 10           # zero stretches of small-grain targets are first tested this large
ZEROS = bytes(MAX_GRAIN)


class Writeback:
    """Start the kernel's writeback of an image's files every WRITEBACK_EVERY bytes written, so
    the fsync at the end overlaps with the copy instead of following it. The request can block
    while the device queue is busy, so it runs in a helper thread, one at a time. Does nothing
    when nothing will wait for the disk (:func:`unsynced`)."""

    def __init__(self, image: Image):
        self.image = image
        self.sync = syncing()
        self._since = 0
        self._fds: list[int] | None = None
        self._thread: threading.Thread | None = None

    def add(self, n: int) -> None:
        self._since += n
        if self._since >= WRITEBACK_EVERY and self.sync:
            self._since = 0
            self._start()

    def _start(self) -> None:
        if self._fds is None:
            self._fds = []
            for f in self.image.files():
                with contextlib.suppress(OSError):
                    self._fds.append(os.open(f, os.O_RDONLY | os.O_CLOEXEC))
        if self._thread is not None and self._thread.is_alive():
            return
        fds = list(self._fds)

        def writeback() -> None:
            for fd in fds:
                start_writeback(fd)
        self._thread = threading.Thread(target=writeback, name="vdgui-writeback", daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for fd in self._fds or ():
            os.close(fd)
        self._fds = None


class Readers:
    """Reads source windows ahead in worker threads, each thread with its own read-only open of
    the chain (backends need not be thread-safe; read-only opens take no lock). Overlapping the
    reads with the writes, and several reads in flight, is what keeps up with cold disks. A
    read-only :class:`~vdgui.vd.ioqueue.IoQueue` with an opener does the work (issue #19:
    bench/readahead.py: as fast as the thread pool it replaced, 0.98-1.13x)."""

    def __init__(self, opener, workers: int = READERS):
        # the workers open the chain in the caller's context (its passphrase provider)
        context = contextvars.copy_context()
        self.queue = IoQueue(None, workers=workers, max_queued=1 << 16,
                             opener=lambda: context.copy().run(opener), copy_reads=False)

    def submit(self, off: int, n: int, top: int, level: int | None) -> Window:
        return Window(self.queue.read(off, n, top=top, level=level))

    def close(self) -> None:
        self.queue.close(cancel=True)


class Window:
    """A window being read: ``result()`` waits for its bytes (or raises its error)."""

    def __init__(self, req: IoRequest):
        self.req = req

    def result(self) -> bytes | bytearray:
        data = self.req.wait()
        assert data is not None
        return data

    def exception(self) -> BaseException | None:
        """The error the read ended with (waits for it), None when it succeeded."""
        self.req.join()
        return self.req.error


def read_window(d: Disk, off: int, n: int, top: int, level: int | None):
    """A window's bytes: straight from the chain member that holds all of it when known (saves
    the chain walk and two copies), else through the chain."""
    if level is not None:
        data = d.images[level].read(off, n)
        if d.filters:
            buf = bytearray(data)
            d.decode(off, memoryview(buf))
            return buf
        return data
    return d.read(off, n, top=top)


ZERO_CHECK = 4 << 20        # bytes of the content below compared at a time


def store_zeroes(img: Image, offset: int, length: int, fill: FillFn,
                 below: FillFn | None) -> None:
    """Make [offset, offset+length) of ``img`` read zeroes: its ``write_zeroes`` (zero markers,
    holes, unallocated blocks), then zeroes written as data only over the parts left
    UNALLOCATED where ``below`` (what will lie under ``img`` when the operation is done; None:
    nothing) does not read zero. ``fill``: the content under ``img`` now (copy-on-write)."""
    img.write_zeroes(offset, length, fill)
    if below is None:
        return
    for s, n, st in img.block_status(offset, length):
        if st != Alloc.UNALLOCATED:
            continue
        pos, end = s, s + n
        while pos < end:
            k = min(ZERO_CHECK, end - pos)
            if not is_zero(below(pos, k)):
                saved = img.honor_zeroes
                img.honor_zeroes = True
                try:
                    img.write(pos, zeroes(k), fill)
                finally:
                    img.honor_zeroes = saved
                if any(st2 == Alloc.UNALLOCATED for _, _, st2 in img.block_status(pos, k)):
                    raise NotSupported(
                        f"{img.location}: the {img.format} backend did not store zeroes "
                        f"written at offset {pos:#x} over content below them")
            pos += k


def zero_grain(mv) -> bool:
    """All-zero test for a buffer of at most MAX_GRAIN bytes (memcmp speed)."""
    return ZEROS.startswith(mv)


class Writer:
    """Writes windows into the target's top image, skipping all-zero grains when allowed."""

    def __init__(self, tdisk: Disk, grain: int, fresh: bool, allocated: bool = False):
        self.t = tdisk
        self.g = grain
        self.fresh = fresh
        self.zero_grain = bytes(grain)
        self.wb = Writeback(tdisk.top)
        # a target whose bytes lie in one file as they read (RAW, fixed VHD) is filled with
        # copy_file_range where zero detection cannot save space: its blocks are all
        # ``allocated`` already (preallocated), or it is written whole (not fresh). A sparse
        # RAW target keeps zero detection: written zeroes become holes, as with qemu-img.
        self.flat = None
        if (allocated or not fresh) and len(tdisk.images) == 1 and not tdisk.filters:
            self.flat = tdisk.top.flat_file()
        # a target that skips zero pieces itself (VHD) gets the windows untested (one zero
        # scan), and windows follow the source's data, not widened to whole target blocks (it
        # stores a partly written new block sparsely: no zero-filled halves read and scanned)
        self.passthrough = (fresh and len(tdisk.images) == 1 and not tdisk.filters
                            and tdisk.top.sparse_writes)
        if self.passthrough:
            self.g = MIN_GRAIN

    def close(self) -> None:
        self.wb.close()

    def write(self, off: int, data: bytes, below_zero=None) -> None:
        """Write ``data`` at ``off`` (``off`` need not be grain-aligned). Zero grains are skipped
        on a fresh target when ``below_zero(o, n)`` (default: always) says the image below reads
        zero there too."""
        n = len(data)
        self.wb.add(n)
        if not self.fresh or (self.passthrough and below_zero is None):
            self.t.write(off, data)
            return
        mv = memoryview(data)
        if n <= MAX_GRAIN and zero_grain(mv):
            if below_zero is None:
                return
        elif below_zero is None and n <= self.g:
            self.t.write(off, data)
            return
        elif below_zero is None and self.g <= MIN_GRAIN and data.find(self.zero_grain) < 0:
            self.t.write(off, data)       # no zero grain can hide in there: one write
            return
        g = self.g
        run_start = None
        pos = 0
        while pos < n:
            if g < COARSE and not (off + pos) % COARSE and pos + COARSE <= n \
                    and zero_grain(mv[pos:pos + COARSE]):
                step = COARSE        # a whole zero stretch in one test, not one per small grain
                keep = below_zero is not None and not below_zero(off + pos, step)
            else:
                step = min(g - (off + pos) % g, n - pos)
                keep = not zero_grain(mv[pos:pos + step]) or (
                    below_zero is not None and not below_zero(off + pos, step))
            if keep:
                if run_start is None:
                    run_start = pos
            elif run_start is not None:
                self.t.write(off + run_start, data[run_start:pos])
                run_start = None
            pos += step
        if run_start is not None:
            self.t.write(off + run_start, data if run_start == 0 else data[run_start:])

    def zero_fill(self, off: int, length: int) -> None:
        """Make [off, off+length) read as zeroes on a target that was not freshly created."""
        img = self.t.top
        ss = self.t.sector_size
        if (img.backend.can(Operation.DISCARD) and off % ss == 0 and length % ss == 0):
            try:
                self.t.discard(off, length)
                return
            except NotSupported:
                pass
        end = off + length
        while off < end:
            n = min(WINDOW, end - off)
            self.t.write(off, ZEROS[:n])
            off += n


class CopyRanges:
    """Windows copied inside the kernel (copy_file_range) from a source member's stored runs
    into a flat target, in worker threads (several reads in flight, as :class:`Readers`). The
    first refusal (another file system, no support) turns it off: the rest goes the long way."""

    def __init__(self, dst: ImageFile, workers: int = READERS):
        from concurrent.futures import ThreadPoolExecutor  # flat targets only

        self.dst = dst
        self.on = True
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vdgui-cfr")

    def submit(self, runs: list[tuple[ImageFile, int, int]], off: int) -> Future:
        return self.pool.submit(self._copy, runs, off)

    def _copy(self, runs: list[tuple[ImageFile, int, int]], off: int) -> int:
        """Bytes copied from the window's start (all of them, or up to the first refusal)."""
        done = 0
        for f, pos, n in runs:
            if not self.on:
                break
            try:
                k = copy_range(f.fd, pos, self.dst.fd, off + done, n)
            except OSError as exc:
                raise VDIOError(f"{self.dst.path}: copy of {n} bytes from {f.path} at {pos:#x} "
                                f"failed: {exc.strerror or exc}") from None
            done += k
            if k < n:
                if k == 0:
                    self.on = False
                break
        return done

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def stored_runs(src: Disk, lv: int | None, a: int, n: int):
    """The source member's stored runs of a window held whole by member ``lv`` (None: the
    window must be read through the chain or decoded)."""
    if lv is None or src.filters:
        return None
    return src.images[lv].stored_runs(a, n)
