"""The copy pipeline shared by copy and merge: source windows read ahead in worker threads
(Readers), the kernel's writeback of the target started as the copy goes (Writeback), and
ranges made to read zeroes without writing zeroes where the target need not (store_zeroes)."""
from __future__ import annotations

import contextlib
import contextvars
import os
import threading

from ..alloc import Alloc
from ..disk import Disk
from ..errors import NotSupported
from ..fileio import start_writeback, syncing
from ..image import FillFn, Image
from ..ioqueue import IoQueue, IoRequest
from ..sparse import is_zero, zeroes

READAHEAD = 32 << 20        # bytes read ahead
READERS = 4                 # reader threads (flat copies of file-based chains)
WRITEBACK_EVERY = 64 << 20  # start the kernel writing the target out every 64 MiB


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
                             opener=lambda: context.copy().run(opener))

    def submit(self, off: int, n: int, top: int, level: int | None) -> _Window:
        return _Window(self.queue.read(off, n, top=top, level=level))

    def close(self) -> None:
        self.queue.close(cancel=True)


class _Window:
    """A window being read: ``result()`` waits for its bytes (or raises its error)."""

    def __init__(self, req: IoRequest):
        self.req = req

    def result(self) -> bytes:
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
