"""Asynchronous I/O queues on a disk (issue #19 part 6: VDAsyncRead/Write/Flush, VDIoQueue*):
ordering, cancellation, errors reaching the completion callback, no thread left after close."""
from __future__ import annotations

import threading
import time

import pytest

from vdgui.vd import Cancelled, Disk, InvalidArgument, IoKind, IoState, VDIOError

MiB = 1 << 20


@pytest.fixture
def disk(tmp_path):
    d = Disk()
    d.create_base(str(tmp_path / "a.vdi"), 8 * MiB, "VDI")
    yield d
    d.close()


class Gate:
    """Makes the disk's operations block until released, recording their order."""

    def __init__(self, d):
        self.order = []
        self.open = threading.Event()
        self.entered = threading.Event()
        for name in ("read", "write", "flush", "discard"):
            orig = getattr(d, name)

            def wrapped(*a, _orig=orig, _name=name, **k):
                self.entered.set()
                self.open.wait(5)
                self.order.append((_name, a[0] if a else None))
                return _orig(*a, **k)
            setattr(d, name, wrapped)


def _threads():
    return {t for t in threading.enumerate() if t.name.startswith("vdgui-io-")}


def test_read_write_flush_discard_with_callbacks(disk):
    done = []
    q = disk.io_queue(workers=3)
    w = q.write(0, b"\x5A" * 65536, done.append)
    r = q.read(0, 4096, done.append)
    f = q.flush(done.append)
    assert r.wait(10) == b"\x5A" * 4096
    assert w.wait(10) is None and f.wait(10) is None
    dz = q.discard(0, MiB, done.append)
    dz.wait(10)
    assert q.read(0, 4096).wait(10) == bytes(4096)
    q.close()
    assert {x.kind for x in done} == {IoKind.WRITE, IoKind.READ, IoKind.FLUSH, IoKind.DISCARD}
    assert all(x.state is IoState.DONE for x in done)


def test_overlapping_requests_keep_submission_order(disk):
    g = Gate(disk)
    q = disk.io_queue(workers=4)
    w1 = q.write(0, b"\x01" * 4096)
    assert g.entered.wait(5)
    r1 = q.read(0, 4096)                 # after w1 (overlaps): sees \x01
    w2 = q.write(0, b"\x02" * 4096)      # after r1 and w1
    r2 = q.read(2048, 4096)              # after w2: sees \x02
    other = q.read(MiB, 4096)            # overlaps nothing: free to run any time
    assert r1.waits_for == {w1} and w2.waits_for == {w1, r1} and r2.waits_for == {w1, w2}
    assert other.waits_for == set()
    g.open.set()
    assert r1.wait(10) == b"\x01" * 4096
    assert r2.wait(10) == b"\x02" * 2048 + bytes(2048)
    order = [x for x in g.order if x[1] != MiB]
    assert order == [("write", 0), ("read", 0), ("write", 0), ("read", 2048)]
    q.close()


def test_flush_waits_for_every_earlier_write(disk):
    g = Gate(disk)
    q = disk.io_queue(workers=4)
    writes = [q.write(i * 65536, bytes([i + 1]) * 65536) for i in range(5)]
    f = q.flush()
    later = q.write(MiB, b"x" * 512)
    assert f.waits_for == set(writes) - {w for w in writes if w.finished}
    assert later.waits_for == set()          # a later write need not wait for the flush
    g.open.set()
    f.wait(10)
    assert all(w.state is IoState.DONE for w in writes)
    flush_at = g.order.index(("flush", None))
    assert {("write", i * 65536) for i in range(5)} <= set(g.order[:flush_at])
    q.close()


def test_cancel_by_handle_and_by_id(disk):
    g = Gate(disk)
    q = disk.io_queue(workers=1)
    first = q.write(0, b"a" * 512)
    assert g.entered.wait(5)
    a = q.read(MiB, 512)
    got = []
    b = q.read(2 * MiB, 512, got.append)
    assert not first.cancel()                 # running: it finishes
    assert a.cancel()
    assert q.cancel(b.id)
    assert not q.cancel(b.id) and not q.cancel(12345)
    assert got == [b] and isinstance(b.error, Cancelled)
    with pytest.raises(Cancelled):
        a.wait(1)
    g.open.set()
    first.wait(10)
    q.close()
    assert ("read", MiB) not in g.order and ("read", 2 * MiB) not in g.order


def test_cancelled_write_releases_what_waited_for_it(disk):
    g = Gate(disk)
    q = disk.io_queue(workers=1)
    q.read(5 * MiB, 512)
    assert g.entered.wait(5)
    w = q.write(0, b"w" * 512)
    r = q.read(0, 512)
    assert r.waits_for == {w}
    w.cancel()
    assert r.waits_for == set()
    g.open.set()
    assert r.wait(10) == bytes(512)           # the cancelled write never happened
    q.close()


def test_errors_reach_the_completion_callback(disk):
    q = disk.io_queue()
    got = []
    ev = threading.Event()

    def cb(req):
        got.append(req)
        ev.set()
    r = q.read(7 * MiB, 2 * MiB, cb)          # past the end of the disk
    assert ev.wait(10)
    assert r.state is IoState.FAILED and isinstance(r.error, InvalidArgument)
    assert got == [r]
    with pytest.raises(InvalidArgument, match="outside the disk"):
        r.wait(1)

    def broken(*a):
        raise VDIOError("device gone")
    disk.top.write = lambda *a, **k: broken()
    w = q.write(0, b"x" * 512, cb)
    with pytest.raises(VDIOError, match="device gone"):
        w.wait(10)
    # a callback that raises is logged, the queue goes on
    bad = q.read(0, 512, lambda req: 1 / 0)
    bad.wait(10)
    assert q.read(0, 512).wait(10) == bytes(512)
    q.close()


def test_bounded_pool_and_no_thread_left_after_close(disk):
    before = _threads()
    g = Gate(disk)
    q = disk.io_queue(workers=3, max_queued=8)
    reqs = [q.read(i * 4096, 4096) for i in range(8)]
    assert len(_threads() - before) <= 3
    g.open.set()
    for r in reqs:
        r.wait(10)
    q.close()
    assert _threads() - before == set()
    with pytest.raises(InvalidArgument, match="closed"):
        q.read(0, 512)
    # closing the disk closes its queues, queued requests first
    q2 = disk.io_queue(workers=2)
    rs = [q2.read(i * 4096, 4096) for i in range(20)]
    disk.close()
    assert all(r.state is IoState.DONE for r in rs)
    assert _threads() - before == set()


def test_submit_waits_when_the_queue_is_full(disk):
    g = Gate(disk)
    q = disk.io_queue(workers=1, max_queued=2)
    q.read(0, 512)
    q.read(4096, 512)
    t0 = time.monotonic()
    threading.Timer(0.3, g.open.set).start()
    q.read(8192, 512).wait(10)
    assert time.monotonic() - t0 >= 0.25
    q.close()


def test_close_with_cancel(disk):
    g = Gate(disk)
    q = disk.io_queue(workers=1)
    q.read(0, 512)
    assert g.entered.wait(5)
    rest = [q.read(i * 4096, 512) for i in range(1, 6)]
    threading.Timer(0.2, g.open.set).start()
    q.close(cancel=True)
    assert all(r.state is IoState.CANCELLED for r in rest)


def test_bad_arguments(disk):
    with pytest.raises(InvalidArgument):
        disk.io_queue(workers=0)
    with pytest.raises(InvalidArgument):
        disk.io_queue(max_queued=0)
    q = disk.io_queue()
    with pytest.raises(InvalidArgument):
        q.read(-1, 10)
    q.close()


def test_read_only_queue_reads_through_one_open_per_worker(tmp_path):
    from vdgui.vd import IoQueue, OpenFlags
    p = str(tmp_path / "a.vdi")
    with Disk() as d:
        d.create_base(p, 8 * MiB, "VDI")
        for i in range(8):
            d.write(i * MiB, bytes([i + 1]) * MiB)
    opened = []

    def opener():
        dd = Disk.open_chain(p, flags=OpenFlags.READ_ONLY)
        opened.append(dd)
        return dd
    before = _threads()
    with Disk.open_chain(p, flags=OpenFlags.READ_ONLY) as d:
        q = IoQueue(d, workers=3, opener=opener)
        reqs = [q.read(i * MiB, MiB) for i in range(8) for _ in range(3)]
        for k, r in enumerate(reqs):
            assert r.wait(10) == bytes([k // 3 + 1]) * MiB
        with pytest.raises(InvalidArgument, match="read-only"):
            q.write(0, b"x")
        with pytest.raises(InvalidArgument, match="read-only"):
            q.flush()
        q.close()
    assert 1 <= len(opened) <= 3
    assert all(not dd.images for dd in opened)        # each worker closed its open
    assert _threads() - before == set()


def test_uncopied_chain_reads_hand_over_the_buffer_filled(tmp_path, monkeypatch):
    """copy_reads=False: a read through the chain (no level) comes back as the bytearray the
    disk filled, not copied into bytes (a copy's windows: megabytes held under the GIL)."""
    from vdgui.vd import IoQueue, OpenFlags
    p = str(tmp_path / "a.vdi")
    with Disk() as d:
        d.create_base(p, 8 * MiB, "VDI")
        d.write(MiB, b"\x42" * MiB)
    with Disk.open_chain(p, flags=OpenFlags.READ_ONLY) as d:
        q = IoQueue(d, workers=1, opener=lambda: Disk.open_chain(p, flags=OpenFlags.READ_ONLY),
                    copy_reads=False)
        got = q.read(0, 2 * MiB).wait(10)
        q.close()
        assert isinstance(got, bytearray)
        assert got == bytes(MiB) + b"\x42" * MiB
        assert isinstance(d.read(0, 2 * MiB), bytes)           # the default still copies
        assert d.read(0, 512, as_buffer=True) == bytes(512)


class _CountingCondition(threading.Condition):
    def __init__(self):
        super().__init__()
        self.woken = self.all = 0

    def notify(self, n=1):
        self.woken += n
        super().notify(n)

    def notify_all(self):
        self.all += 1
        super().notify_all()


def test_a_finished_read_wakes_no_idle_worker(tmp_path):
    """A completion wakes only the threads it gives work to (issue #18 goal 4): read-ahead
    completions woke every idle worker (notify_all per window, each taking the GIL to find
    nothing, ~16k futex calls in a 1 GiB convert) while the writer thread waited for the GIL.
    A submitter waiting for room is still woken; every read completes."""
    from vdgui.vd import IoQueue, OpenFlags
    p = str(tmp_path / "a.vdi")
    with Disk() as d:
        d.create_base(p, 8 * MiB, "VDI")
        for i in range(8):
            d.write(i * MiB, bytes([i + 1]) * MiB)
    q = IoQueue(None, workers=4, opener=lambda: Disk.open_chain(p, flags=OpenFlags.READ_ONLY))
    cv = q._cv = _CountingCondition()
    for k in range(40):
        assert q.read(k % 8 * MiB, 4096).wait(10) == bytes([k % 8 + 1]) * 4096
    assert cv.all == 0 and cv.woken == 40, (cv.all, cv.woken)
    q.close()
    q = IoQueue(None, workers=3, max_queued=2,
                opener=lambda: Disk.open_chain(p, flags=OpenFlags.READ_ONLY))
    reqs = [q.read(k % 8 * MiB, MiB) for k in range(30)]      # submits wait for room
    assert [r.wait(10)[0] for r in reqs] == [k % 8 + 1 for k in range(30)]
    q.close()
