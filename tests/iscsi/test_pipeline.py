"""Pipelined iSCSI reads (issue #19 part 6) against tgt on loopback: several SCSI READs in
flight with distinct task tags, never past the target's MaxCmdSN, same bytes as one at a time."""
from __future__ import annotations

import pytest

from vdgui.vd import Disk, OpenFlags
from vdgui.vd.formats.iscsi import pdu as P

pytestmark = pytest.mark.iscsi
IQN = "iqn.2026-11.org.vdgui.test:pipeline"
LUN_SIZE = 16 << 20


@pytest.fixture
def lun(tgt_factory, tmp_path):
    t = tgt_factory()
    p = tmp_path / "lun.img"
    p.write_bytes(b"".join(bytes([(i * 13) % 251 + 1]) * 4096 for i in range(LUN_SIZE // 4096)))
    t.add_target(IQN, str(p))
    return f"iscsi://127.0.0.1:{t.port}/{IQN}/1", p.read_bytes()


class Tracker:
    """Records the READ commands sent (task tag, CmdSN, the window then) and how many were in
    flight at once."""

    def __init__(self, conn, window=None):
        self.conn = conn
        self.sent = []
        self.inflight = 0
        self.peak = 0
        send, recv = conn.send, conn.recv

        def tracked_send(pdu):
            if pdu.opcode == P.OP_SCSI_CMD:
                self.sent.append((pdu.itt, pdu.u32(24), conn.max_cmdsn))
                self.inflight += 1
                self.peak = max(self.peak, self.inflight)
            return send(pdu)

        def tracked_recv():
            p = recv()
            if p.opcode == P.OP_SCSI_RESP or (p.opcode == P.OP_DATA_IN and p.flags & 1):
                self.inflight -= 1
            if window is not None and p.opcode in (P.OP_SCSI_RESP, P.OP_DATA_IN, P.OP_R2T):
                conn.max_cmdsn = (p.u32(28) + window - 1) & 0xFFFFFFFF   # a narrow window
            return p
        conn.send, conn.recv = tracked_send, tracked_recv


def test_pipelined_reads_match_and_overlap(lun):
    url, want = lun
    with Disk() as d:
        d.open(url, flags=OpenFlags.READ_ONLY)
        img = d.top
        t = Tracker(img.conn)
        assert d.read(0, LUN_SIZE) == want
        assert d.read(12345, 5 << 20) == want[12345:12345 + (5 << 20)]
        assert 1 < t.peak <= img.pipeline
        itts = [s[0] for s in t.sent]
        assert len(set(itts)) == len(itts)                 # distinct task tags
        img.pipeline = 1                                    # the old path: one at a time
        t2 = Tracker(img.conn)
        assert d.read(0, LUN_SIZE) == want
        assert t2.peak == 1


def test_pipeline_stays_within_the_targets_window(lun):
    url, want = lun
    with Disk() as d:
        d.open(url, flags=OpenFlags.READ_ONLY)
        img = d.top
        t = Tracker(img.conn, window=2)
        img.conn.max_cmdsn = (img.conn.cmdsn + 1) & 0xFFFFFFFF     # CmdSN and the next one
        assert d.read(0, LUN_SIZE) == want
        for _itt, cmdsn, max_cmdsn in t.sent:
            assert max_cmdsn is None or ((max_cmdsn - cmdsn) & 0xFFFFFFFF) < 1 << 31
        assert t.peak <= img.pipeline


def test_a_failed_piece_is_read_again_alone(lun):
    """A piece whose status is not GOOD (here: forced) goes through the one-at-a-time path and
    its retries; the bytes still match."""
    url, want = lun
    with Disk() as d:
        d.open(url, flags=OpenFlags.READ_ONLY)
        conn = d.top.conn
        orig = conn.read_pipelined

        def one_busy(cmds, depth, results):
            res = orig(cmds, depth, results)
            res[2] = (0x08, b"", b"")                       # BUSY
            return res
        conn.read_pipelined = one_busy
        assert d.read(0, 8 << 20) == want[:8 << 20]


def test_queue_over_iscsi_reads_and_writes_in_order(lun, tmp_path):
    url, want = lun
    with Disk() as d:
        d.open(url)
        q = d.io_queue(workers=4)
        w = q.write(1 << 20, b"\x77" * 65536)
        r = q.read(1 << 20, 4 << 20)
        f = q.flush()
        reads = [q.read(i << 20, 1 << 20) for i in range(8, 16)]
        assert r.wait(30) == b"\x77" * 65536 + want[(1 << 20) + 65536:5 << 20]
        assert w.wait(30) is None and f.wait(30) is None
        assert b"".join(x.wait(30) for x in reads) == want[8 << 20:]
        q.close()


def test_queued_reads_go_to_the_target_together(lun):
    """Small reads waiting in an IoQueue are handed to the backend together (Disk.read_many):
    their READs are in flight at once, each request still gets its own bytes."""
    url, want = lun
    with Disk() as d:
        d.open(url, flags=OpenFlags.READ_ONLY)
        t = Tracker(d.top.conn)
        q = d.io_queue(workers=1)
        offsets = [(i * 7919 % 4000) * 4096 for i in range(64)]
        reqs = [q.read(o, 4096) for o in offsets]
        for o, r in zip(offsets, reqs):
            assert r.wait(30) == want[o:o + 4096]
        q.close()
        assert t.peak > 1
        assert t.peak <= d.top.pipeline


def test_a_failing_batch_gives_each_request_its_own_result(lun):
    """A batch that fails is run request by request: the bad one fails alone."""
    url, want = lun
    with Disk() as d:
        d.open(url, flags=OpenFlags.READ_ONLY)
        q = d.io_queue(workers=1)
        with q._disk_lock:                    # hold the worker: the reads pile up as ready
            first = q.read(0, 4096)
            reqs = [q.read(o, 4096) for o in (4096, 8192)]
            bad = q.read(LUN_SIZE - 4096, 8192)     # past the end
            more = q.read(12288, 4096)
        assert first.wait(30) == want[:4096]
        assert [r.wait(30) for r in reqs] == [want[4096:8192], want[8192:12288]]
        with pytest.raises(Exception, match="outside the disk"):
            bad.wait(30)
        assert more.wait(30) == want[12288:16384]
        q.close()
