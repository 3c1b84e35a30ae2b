"""Pipelined iSCSI WRITEs (issue #19 part 6) against tgt on loopback: several WRITE commands
in flight, their data sent as the negotiated InitialR2T / ImmediateData / FirstBurstLength allow
(RFC 7143), and a command failing in the middle failing the whole write, saying which bytes
were written and which not."""
from __future__ import annotations

import os

import pytest

from tests.iscsi.test_pipeline import Tracker
from vdgui.vd import Disk, NetworkError, VDIOError
from vdgui.vd.formats import iscsi
from vdgui.vd.formats.iscsi import pdu as P

pytestmark = pytest.mark.iscsi
IQN = "iqn.2026-11.org.vdgui.test:wpipe"
LUN_SIZE = 16 << 20


@pytest.fixture
def target(tgt_factory, tmp_path):
    t = tgt_factory()
    p = tmp_path / "lun.img"
    p.write_bytes(bytes([0xEE]) * LUN_SIZE)
    t.add_target(IQN, str(p))
    return t, f"iscsi://127.0.0.1:{t.port}/{IQN}/1", p


class DataTracker(Tracker):
    """Also records each WRITE command's immediate data and F bit, and every Data-Out PDU."""

    def __init__(self, conn, window=None):
        super().__init__(conn, window)
        self.cmds = {}          # itt -> (immediate bytes, F bit, expected length)
        self.data_out = []      # (itt, ttt, datasn, offset, length, final)
        send = conn.send

        def tracked_send(pdu):
            if pdu.opcode == P.OP_SCSI_CMD:
                self.cmds[pdu.itt] = (len(pdu.data), bool(pdu.flags & P.FINAL), pdu.u32(20))
            elif pdu.opcode == P.OP_DATA_OUT:
                self.data_out.append((pdu.itt, pdu.u32(20), pdu.u32(36), pdu.u32(40),
                                      len(pdu.data), bool(pdu.flags & P.FINAL)))
            return send(pdu)
        conn.send = tracked_send

    def unsolicited(self, itt):
        return [d for d in self.data_out if d[0] == itt and d[1] == P.RESERVED_TAG]


@pytest.mark.parametrize("initial_r2t", ["Yes", "No"])
@pytest.mark.parametrize("immediate", ["Yes", "No"])
def test_pipelined_writes_land_as_negotiated(target, initial_r2t, immediate):
    t, url, backing = target
    t.adm("--op", "update", "--mode", "target", "--tid", str(t.tids[-1]),
          "--name", "InitialR2T", "--value", initial_r2t)
    t.adm("--op", "update", "--mode", "target", "--tid", str(t.tids[-1]),
          "--name", "ImmediateData", "--value", immediate)
    payload = os.urandom(6 << 20)
    with Disk() as d:
        d.open(url)
        img = d.top
        conn = img.conn
        assert conn.initial_r2t == (initial_r2t == "Yes")
        assert conn.immediate_data == (immediate == "Yes")
        tr = DataTracker(conn)
        d.write(1 << 20, payload)
        d.flush()
        assert tr.peak == img.write_pipeline == 8           # several WRITEs in flight
        itts = [s[0] for s in tr.sent]
        assert len(set(itts)) == len(itts)
        for itt, (imm, final, length) in tr.cmds.items():
            if length == 0:
                continue                                    # SYNCHRONIZE CACHE
            assert imm == (min(conn.first_burst, conn.target_mrdsl) if conn.immediate_data
                           else 0)
            unsol = tr.unsolicited(itt)
            if conn.initial_r2t:
                assert not unsol and final
            else:                                           # up to FirstBurstLength unasked
                assert imm + sum(u[4] for u in unsol) == min(conn.first_burst, length)
                assert final == (not unsol)
                assert [u[2] for u in unsol] == list(range(len(unsol)))     # DataSN
                assert unsol[-1][5] and not any(u[5] for u in unsol[:-1])
            mine = [x for x in tr.data_out if x[0] == itt]
            assert all(x[4] <= conn.target_mrdsl for x in mine)
            assert imm + sum(x[4] for x in mine) == length  # every byte sent once
    data = backing.read_bytes()
    assert data[1 << 20:(1 << 20) + len(payload)] == payload
    assert data[:1 << 20] == bytes([0xEE]) * (1 << 20)


def test_pipelined_writes_stay_within_the_targets_window(target):
    _t, url, backing = target
    payload = os.urandom(4 << 20)
    with Disk() as d:
        d.open(url)
        conn = d.top.conn
        tr = Tracker(conn, window=2)
        conn.max_cmdsn = (conn.cmdsn + 1) & 0xFFFFFFFF
        d.write(0, payload)
        for _itt, cmdsn, max_cmdsn in tr.sent:
            assert max_cmdsn is None or ((max_cmdsn - cmdsn) & 0xFFFFFFFF) < 1 << 31
        assert 1 < tr.peak <= d.top.write_pipeline
    assert backing.read_bytes()[:len(payload)] == payload


def _third_write_past_the_end(conn, split):
    """Send the third WRITE to an LBA past the LUN's end (tgt refuses it, writes nothing);
    returns the count of WRITE commands sent."""
    send = conn.send
    count = [0]

    def bad_third(pdu):
        if pdu.opcode == P.OP_SCSI_CMD and pdu.bhs[32] == 0x2A:
            count[0] += 1
            if count[0] == 3:
                pdu.bhs[32:42] = P.cdb_write(LUN_SIZE // 512 + 8, split // 512)
        return send(pdu)
    conn.send = bad_third
    return count


def test_a_write_failing_in_the_middle_fails_the_whole_write(target):
    """The third of eight WRITEs fails: the write fails with the target's reason, no WRITE is
    sent once the failure is known, those in flight are waited for, and the message claims
    written exactly the pieces whose GOOD status came back. The connection stays usable."""
    _t, url, _backing = target
    split = 65536
    payload = os.urandom(8 * split)
    base = 2 << 20
    with Disk() as d:
        d.open(url, config={"WriteSplit": str(split)})
        d.top.write_pipeline = 4
        conn = d.top.conn
        send = conn.send
        count = _third_write_past_the_end(conn, split)
        with pytest.raises(VDIOError) as ei:
            d.write(base, payload)
        sent = count[0]
        assert 3 < sent < 8                                 # stopped sending
        msg = str(ei.value)
        assert f"WRITE of {split} bytes at {base + 2 * split} failed: ILLEGAL REQUEST: " \
               "logical block address out of range" in msg
        end = base + sent * split
        assert (f"; written: {base}..{base + 2 * split}, {base + 3 * split}..{end}; "
                f"not written, or only in part: {base + 2 * split}..{base + 3 * split}, "
                f"{end}..{base + 8 * split}") in msg
        conn.send = send
        d.write(base, payload)
        d.flush()
        assert d.read(base, len(payload)) == payload


def test_claimed_writes_match_the_backing_file(target):
    """As above, without the repair: the backing file holds the new bytes exactly where the
    message says written, the old ones elsewhere (failed piece, pieces never sent)."""
    _t, url, backing = target
    split = 65536
    payload = os.urandom(8 * split)
    base = 2 << 20
    with Disk() as d:
        d.open(url, config={"WriteSplit": str(split)})
        d.top.write_pipeline = 4
        conn = d.top.conn
        send = conn.send
        count = _third_write_past_the_end(conn, split)
        with pytest.raises(VDIOError) as ei:
            d.write(base, payload)
        conn.send = send
        d.flush()
    msg = str(ei.value)
    written, _, rest = msg.partition("written: ")[2].partition("; not written, or only in part: ")
    rest = rest.partition(" (")[0]
    got = backing.read_bytes()[base:base + len(payload)]
    covered = 0
    for text, new in ((written, True), (rest, False)):
        for span in text.split(", "):
            a, b = (int(x) - base for x in span.split(".."))
            covered += b - a
            assert got[a:b] == (payload[a:b] if new else bytes([0xEE]) * (b - a)), span
    assert covered == len(payload)
    assert count[0] < 8


def test_a_dropped_connection_mid_write_resends_the_unanswered(target):
    """The connection breaks after two WRITEs were answered: reconnect, send again only what
    was not answered; every byte lands."""
    _t, url, backing = target
    split = 262144
    payload = os.urandom(12 * split)
    with Disk() as d:
        d.open(url)
        conn = d.top.conn
        recv, send = conn.recv, conn.send
        answered = [0]
        writes = []

        def dropping_recv():
            p = recv()
            if p.opcode == P.OP_SCSI_RESP:
                answered[0] += 1
                if answered[0] == 3:
                    conn.close()
                    raise iscsi._Dropped("cut by the test")
            return p

        def counting_send(pdu):
            if pdu.opcode == P.OP_SCSI_CMD and pdu.bhs[32] == 0x2A:
                writes.append(pdu.bhs[32:42])
            return send(pdu)
        conn.recv, conn.send = dropping_recv, counting_send
        d.write(0, payload)
        conn.recv = recv
        d.flush()
        assert d.read(0, len(payload)) == payload
        # before the cut: pipeline + 2 sent (one more per answer); after: all but the 2
        # answered, again (a UNIT ATTENTION after the new login may repeat one)
        first = d.top.write_pipeline + 2
        again = {bytes(c) for c in writes[first:]}
        assert again == {bytes(P.cdb_write(i * split // 512, split // 512))
                         for i in range(2, 12)}
    assert backing.read_bytes()[:len(payload)] == payload


def test_a_write_whose_retry_fails_too_says_what_was_written(target):
    """Dropped, and the reconnection fails: a NetworkError that names the written ranges."""
    _t, url, _backing = target
    with Disk() as d:
        d.open(url)
        conn = d.top.conn
        recv = conn.recv
        answered = [0]

        def dropping_recv():
            p = recv()
            if p.opcode == P.OP_SCSI_RESP:
                answered[0] += 1
                if answered[0] == 2:
                    conn.close()
                    conn.port = 1                           # nothing listens there
                    raise iscsi._Dropped("cut by the test")
            return p
        conn.recv = dropping_recv
        with pytest.raises(NetworkError, match=r"cannot connect.*; written: 0\.\.262144; not "
                                               r"written, or only in part: 262144\.\.4194304"):
            d.write(0, os.urandom(4 << 20))
