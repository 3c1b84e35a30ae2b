"""Asynchronous I/O on a disk (VDAsyncRead / VDAsyncWrite / VDAsyncFlush / VDAsyncDiscardRanges
and the VDIoQueue* idea; issue #19 part 6). docs/ioqueue.md.

Requests are submitted with a completion callback and run by a bounded pool of worker threads.
Ordering, as VirtualBox's VD layer keeps it:

- a read waits for the earlier writes and discards it overlaps (it sees their data);
- a write or discard waits for the earlier reads, writes and discards it overlaps (earlier
  reads see the old data, overlapping writes land in submission order);
- a flush waits for every earlier write and discard (what it makes durable includes them);
- everything else may run in any order, concurrently.

A request still queued can be cancelled (by id or by its handle): its callback runs with
``Cancelled``. A running one finishes. Errors reach the callback (``req.error``) and
``req.wait()`` raises them. The disk and its images are not thread-safe: requests run on it one
at a time (the pool overlaps the callbacks and the caller's work); a read-only queue given an
``opener`` reads through one opened disk per worker instead, concurrently. ``copy_reads=False``
hands a read's buffer over as the disk filled it (it may be a bytearray): no copy into bytes.
"""
from __future__ import annotations

import enum
import itertools
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from .errors import Cancelled, InvalidArgument

MAX_WORKERS = 16
BATCH = 16                      # ready reads one worker hands to Disk.read_many together


class IoKind(enum.Enum):
    READ = "read"
    WRITE = "write"
    FLUSH = "flush"
    DISCARD = "discard"


class IoState(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


Callback = Callable[["IoRequest"], None]
_CHANGES = (IoKind.WRITE, IoKind.DISCARD)


class IoRequest:
    """A handle on one submitted request."""

    def __init__(self, queue: IoQueue, kind: IoKind, offset: int, length: int,
                 data: bytes | None, callback: Callback | None, top: int | None = None,
                 level: int | None = None) -> None:
        self.queue = queue
        self.kind = kind
        self.offset = offset
        self.length = length
        self.data = data
        self.callback = callback
        self.top = top            # reads: the chain seen up to image ``top``
        self.level = level        # reads: straight from this chain member (it holds it all)
        self.id = 0
        self.state = IoState.QUEUED
        self.result: bytes | None = None
        self.error: BaseException | None = None
        self.waits_for: set[IoRequest] = set()
        self._done = threading.Event()

    def overlaps(self, other: IoRequest) -> bool:
        return (self.offset < other.offset + other.length
                and other.offset < self.offset + self.length)

    def after(self, earlier: IoRequest) -> bool:
        """Must this request wait for ``earlier`` (submitted before it)?"""
        if self.kind is IoKind.FLUSH:
            return earlier.kind in _CHANGES
        if earlier.kind is IoKind.FLUSH:
            return False
        if self.kind is IoKind.READ and earlier.kind is IoKind.READ:
            return False
        return self.overlaps(earlier)

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> bool:
        return self.queue.cancel(self)

    def join(self, timeout: float | None = None) -> bool:
        """Wait until the request is finished (without raising its error)."""
        return self._done.wait(timeout)

    def wait(self, timeout: float | None = None) -> bytes | None:
        """The read's bytes (None for the others); raises the request's error."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} still {self.state.value}")
        if self.error is not None:
            raise self.error
        return self.result

    def __repr__(self) -> str:
        return (f"IoRequest({self.id}, {self.kind.value}, {self.offset}+{self.length}, "
                f"{self.state.value})")


class IoQueue:
    """A request queue on ``disk`` run by at most ``workers`` threads, at most ``max_queued``
    requests unfinished (submitting more waits)."""

    def __init__(self, disk: Any, *, workers: int = 4, max_queued: int = 64,
                 opener: Callable[[], Any] | None = None, copy_reads: bool = True) -> None:
        if not 1 <= workers <= MAX_WORKERS:
            raise InvalidArgument(f"I/O queue workers must be 1..{MAX_WORKERS}", found=workers)
        if max_queued < 1:
            raise InvalidArgument("I/O queue depth must be at least 1", found=max_queued)
        self.disk = disk
        self.workers = workers
        self.max_queued = max_queued
        self.opener = opener
        self.copy_reads = copy_reads
        self._cv = threading.Condition()
        self._disk_lock = threading.Lock()
        self._pending: list[IoRequest] = []          # unfinished, in submission order
        self._ready: deque[IoRequest] = deque()
        self._by_id: dict[int, IoRequest] = {}
        self._ids = itertools.count(1)
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._room_waiters = 0                       # submitters waiting for room
        self._closed = False
        self._local = threading.local()

    # -- submitting ---------------------------------------------------------------------------
    def read(self, offset: int, length: int, callback: Callback | None = None, *,
             top: int | None = None, level: int | None = None) -> IoRequest:
        """VDAsyncRead (``top``: up to that chain member; ``level``: straight from the member
        known to hold the whole range)."""
        return self._submit(IoRequest(self, IoKind.READ, offset, length, None, callback,
                                      top, level))

    def write(self, offset: int, data: bytes, callback: Callback | None = None) -> IoRequest:
        """VDAsyncWrite."""
        self._writable()
        return self._submit(IoRequest(self, IoKind.WRITE, offset, len(data), bytes(data),
                                      callback))

    def flush(self, callback: Callback | None = None) -> IoRequest:
        """VDAsyncFlush: done once every earlier write and discard is done and synced."""
        self._writable()
        return self._submit(IoRequest(self, IoKind.FLUSH, 0, 0, None, callback))

    def discard(self, offset: int, length: int, callback: Callback | None = None) -> IoRequest:
        """VDAsyncDiscardRanges (one range)."""
        self._writable()
        return self._submit(IoRequest(self, IoKind.DISCARD, offset, length, None, callback))

    def _writable(self) -> None:
        if self.opener is not None:
            raise InvalidArgument("this I/O queue reads through per-worker opens: read-only")

    def _submit(self, req: IoRequest) -> IoRequest:
        if req.offset < 0 or req.length < 0:
            raise InvalidArgument(f"{req.kind.value} range {req.offset}+{req.length} is negative")
        with self._cv:
            while not self._closed and len(self._pending) >= self.max_queued:
                self._room_waiters += 1
                try:
                    self._cv.wait()
                finally:
                    self._room_waiters -= 1
            if self._closed:
                raise InvalidArgument("the I/O queue is closed")
            req.id = next(self._ids)
            req.waits_for = {p for p in self._pending if req.after(p)}
            self._pending.append(req)
            self._by_id[req.id] = req
            if not req.waits_for:
                self._ready.append(req)
                self._wake(1)
            if self._idle == 0 and len(self._threads) < self.workers:
                t = threading.Thread(target=self._work, name=f"vdgui-io-{len(self._threads)}",
                                     daemon=True)
                self._threads.append(t)
                t.start()
        return req

    # -- running ------------------------------------------------------------------------------
    def _work(self) -> None:
        try:
            while True:
                with self._cv:
                    self._idle += 1
                    while not self._ready and not self._closed:
                        self._cv.wait()
                    self._idle -= 1
                    if not self._ready:
                        return
                    req = self._ready.popleft()
                    req.state = IoState.RUNNING
                    batch = [req]
                    if self._batchable(req):     # other ready reads go with it
                        for r in list(self._ready):
                            if len(batch) >= BATCH:
                                break
                            if self._batchable(r):
                                self._ready.remove(r)
                                r.state = IoState.RUNNING
                                batch.append(r)
                if len(batch) > 1:
                    self._run_batch(batch)
                else:
                    self._run_one(req)
        finally:
            d = getattr(self._local, "disk", None)
            if d is not None:
                d.close()

    def _batchable(self, req: IoRequest) -> bool:
        return (req.kind is IoKind.READ and self.opener is None and req.top is None
                and req.level is None)

    def _run_batch(self, batch: list[IoRequest]) -> None:
        """Ready reads together (Disk.read_many: pipelined on iSCSI); when that fails, each
        alone, so that each request gets its own result or error."""
        try:
            with self._disk_lock:
                results = self.disk.read_many([(r.offset, r.length) for r in batch])
        except BaseException:
            for r in batch:
                self._run_one(r)
            return
        for r, data in zip(batch, results, strict=True):
            self._finish(r, IoState.DONE, bytes(data) if self.copy_reads else data, None)

    def _run_one(self, req: IoRequest) -> None:
        try:
            result = self._run(req)
        except BaseException as exc:
            self._finish(req, IoState.FAILED, None, exc)
        else:
            self._finish(req, IoState.DONE, result, None)

    def _read(self, d: Any, req: IoRequest) -> bytes:
        if req.level is None:
            data = (d.read(req.offset, req.length, top=req.top) if self.copy_reads
                    else d.read(req.offset, req.length, top=req.top, as_buffer=True))
        else:
            data = d.images[req.level].read(req.offset, req.length)
            if d.filters:
                data = bytearray(data)
                d.decode(req.offset, memoryview(data))
        # a bytearray of a window is megabytes: copying it holds the GIL the writer waits for
        return bytes(data) if self.copy_reads else data

    def _run(self, req: IoRequest) -> bytes | None:
        if req.kind is IoKind.READ and self.opener is not None:
            d = getattr(self._local, "disk", None)
            if d is None:
                d = self._local.disk = self.opener()
            return self._read(d, req)
        with self._disk_lock:
            if req.kind is IoKind.READ:
                return self._read(self.disk, req)
            if req.kind is IoKind.WRITE:
                assert req.data is not None
                self.disk.write(req.offset, req.data)
            elif req.kind is IoKind.DISCARD:
                self.disk.discard(req.offset, req.length)
            else:
                self.disk.flush()
        return None

    def _wake(self, ready: int) -> None:
        """Wake the threads that have something to do (called holding the lock): every waiter
        when a submitter waits for room (it shares the condition with the workers), else one
        worker per request made ready. Waking every idle worker at each completion (read-ahead:
        up to 3 per window, each taking the GIL to find nothing) held up the thread writing."""
        if self._room_waiters:
            self._cv.notify_all()
        elif ready:
            self._cv.notify(ready)

    def _finish(self, req: IoRequest, state: IoState, result: bytes | None,
                error: BaseException | None) -> None:
        with self._cv:
            req.state, req.result, req.error = state, result, error
            req.data = None
            self._pending.remove(req)
            self._by_id.pop(req.id, None)
            ready = 0
            for p in self._pending:
                if req in p.waits_for:
                    p.waits_for.discard(req)
                    if not p.waits_for and p.state is IoState.QUEUED:
                        self._ready.append(p)
                        ready += 1
            self._wake(ready)
        req._done.set()
        if req.callback is not None:
            try:
                req.callback(req)
            except Exception:
                import logging  # only when a callback fails: not in every command's start-up
                logging.getLogger(__name__).exception("I/O completion callback of %r failed",
                                                      req)

    # -- cancelling and closing ---------------------------------------------------------------
    def cancel(self, req: IoRequest | int) -> bool:
        """Cancel a queued request (by handle or id): True when it will not run."""
        with self._cv:
            r = self._by_id.get(req) if isinstance(req, int) else req
            if r is None or r.queue is not self or r.state is not IoState.QUEUED:
                return False
            r.state = IoState.CANCELLED
            if r in self._ready:
                self._ready.remove(r)
        self._finish(r, IoState.CANCELLED, None, Cancelled(f"{r.kind.value} request cancelled"))
        return True

    def pending(self) -> list[IoRequest]:
        with self._cv:
            return list(self._pending)

    def close(self, *, cancel: bool = False) -> None:
        """Stop taking requests; ``cancel`` the queued ones or let them run; join the workers."""
        with self._cv:
            self._closed = True
            queued = [r for r in self._pending if r.state is IoState.QUEUED]
            self._cv.notify_all()
        if cancel:
            for r in queued:
                self.cancel(r)
        else:
            for r in queued:
                r._done.wait()
        with self._cv:
            threads, self._threads = self._threads, []
            self._cv.notify_all()
        for t in threads:
            t.join()

    def __enter__(self) -> IoQueue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(cancel=exc[0] is not None)
