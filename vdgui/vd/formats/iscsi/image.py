"""The iSCSI backend's connection, image and open (its declaration is the package's)."""
from __future__ import annotations

import logging
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NoReturn

from ...backend import Backend, OpenFlags
from ...config import parse_config
from ...errors import (
    AuthenticationError,
    ConfigError,
    ImageNotFound,
    NetworkError,
    NotSupported,
    VDError,
    VDIOError,
    VDTimeoutError,
)
from ...image import Alloc, FillFn, Image
from . import (  # noqa: F401  (the declaration's, used here and by old imports)
    CONFIG_KEYS,
    DEFAULT_INITIATOR,
    DEFAULT_PORT,
    IscsiBackend,
    parse_address,
    parse_lun,
)
from . import pdu as P

if TYPE_CHECKING:
    import socket

log = logging.getLogger(__name__)

OUR_MAX_RECV = 262144
OUR_BURST = 262144
MAX_RECV_SEGMENT = 16 << 20     # refuse larger data segments from a target
READ_CHUNK = 1 << 20
PIPELINE = 4                    # SCSI reads in flight at once (1: one after another)
PIPELINE_WRITES = 8             # SCSI writes in flight (bench/README.md: 8 beat 4 with latency)
_WINDOW_OPS = frozenset({P.OP_NOP_IN, P.OP_SCSI_RESP, P.OP_LOGIN_RESP, P.OP_DATA_IN, P.OP_R2T,
                         P.OP_ASYNC, P.OP_REJECT, P.OP_TEXT_RESP, P.OP_LOGOUT_RESP,
                         P.OP_TASK_MGMT_RESP})



Buffer = bytes | memoryview
Command = tuple[bytes, int, Buffer]     # CDB, read length, data to write
Result = tuple[int, bytes, bytes]       # SCSI status, data read, sense
TARGET_FAILURE = 0x100                  # | iSCSI response: the target failed the command


class _Dropped(Exception):
    """The connection went away (EOF, reset): reconnect and retry once."""


@dataclass
class _Task:
    """A command in flight: its place in the batch, task tag, Data-In buffer, data to write."""
    index: int
    itt: int
    buf: bytearray
    wdata: Buffer


def retryable(status: int, sense: bytes) -> bool:
    """May the same command, sent again, succeed? UNIT ATTENTION (after a login or reset),
    BUSY, TASK SET FULL."""
    if status in (0x08, 0x28):
        return True
    return status == 0x02 and P.parse_sense(sense)[0] == 0x6


def _written(pieces: Sequence[tuple[int, Buffer]], done: list[bool]) -> str:
    """Which byte ranges of a write were written and which not (end exclusive)."""
    spans: dict[bool, list[list[int]]] = {True: [], False: []}
    for (pos, buf), ok in zip(pieces, done, strict=True):
        runs = spans[ok]
        if runs and runs[-1][1] == pos:
            runs[-1][1] = pos + len(buf)
        else:
            runs.append([pos, pos + len(buf)])

    def text(runs: list[list[int]]) -> str:
        return ", ".join(f"{a}..{b}" for a, b in runs) or "none"
    return (f"written: {text(spans[True])}; not written, or only in part: {text(spans[False])} "
            "(byte offsets, end exclusive)")


def describe_status(status: int, sense: bytes) -> str:
    if status & TARGET_FAILURE:
        return f"the target failed it (iSCSI response {status & 0xFF:#x})"
    if status == 0x02:
        return P.describe_sense(sense)
    return f"SCSI status {status:#x}"




class Connection:
    """One logged-in iSCSI session with one connection."""

    def __init__(self, cfg: dict) -> None:
        self.cfg = cfg
        self.host, self.port = parse_address(cfg["TargetAddress"])
        self.timeout = cfg["Timeout"] / 1000.0
        self.lun = parse_lun(cfg["LUN"])
        self.sock: socket.socket | None = None
        self.isid = bytes([0x80]) + os.urandom(5)
        self.itt = 0
        self.cmdsn = 1
        self.max_cmdsn: int | None = None  # the target's command window (RFC 7143 4.2.2.1)
        self.expstatsn = 0
        self.target_mrdsl = 8192
        self.first_burst = 65536
        self.max_burst = OUR_BURST
        self.immediate_data = False
        self.initial_r2t = True
        self.dump = bool(cfg.get("DumpMalformedPackets"))

    # -- transport -------------------------------------------------------------------------------
    def connect(self) -> None:
        self.close()
        import socket
        try:
            self.sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except TimeoutError:          # the builtin (socket.timeout)
            raise VDTimeoutError(f"iSCSI target {self.host}:{self.port} did not answer within "
                                 f"{self.cfg['Timeout']} ms") from None
        except OSError as exc:
            raise NetworkError(f"cannot connect to iSCSI target {self.host}:{self.port}: "
                               f"{exc.strerror or exc}") from None
        self.itt = 0
        try:
            self.login()
        except _Dropped as exc:
            self.close()
            raise NetworkError(
                f"iSCSI target {self.host}:{self.port} closed the connection during login "
                f"({exc}); check the target name, that the target allows this initiator "
                f"({self.cfg.get('InitiatorName')}) in its access list, and that the address "
                "is an iSCSI target") from None
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            finally:
                self.sock = None

    def _recv_exact(self, n: int) -> bytes:
        if self.sock is None:
            raise _Dropped("not connected")
        buf = bytearray()
        while len(buf) < n:
            try:
                chunk = self.sock.recv(n - len(buf))
            except TimeoutError:
                raise VDTimeoutError(f"iSCSI target {self.host}:{self.port} stopped answering "
                                     f"(no data for {self.cfg['Timeout']} ms)") from None
            except OSError as exc:
                raise _Dropped(str(exc)) from None
            if not chunk:
                raise _Dropped("connection closed by the target")
            buf += chunk
        return bytes(buf)

    def send(self, pdu: P.PDU) -> None:
        if self.sock is None:
            raise _Dropped("not connected")
        try:
            self.sock.sendall(pdu.encode())
        except TimeoutError:
            raise VDTimeoutError(f"iSCSI target {self.host}:{self.port} stopped accepting data "
                                 f"for {self.cfg['Timeout']} ms") from None
        except OSError as exc:
            raise _Dropped(str(exc)) from None

    def recv(self) -> P.PDU:
        bhs = self._recv_exact(P.BHS_LEN)
        ahs_len, dlen = P.parse_bhs(bhs)
        if dlen > MAX_RECV_SEGMENT:
            self._malformed(bhs, f"data segment length {dlen} exceeds {MAX_RECV_SEGMENT}")
        ahs = self._recv_exact(ahs_len) if ahs_len else b""
        data = self._recv_exact(dlen + P.pad4(dlen))[:dlen] if dlen else b""
        pdu = P.PDU(bytearray(bhs), data, ahs)
        if pdu.opcode in _WINDOW_OPS:
            mx = pdu.u32(32)
            # MaxCmdSN only moves forward (serial arithmetic); ExpCmdSN - 1 == MaxCmdSN: shut
            if self.max_cmdsn is None or 0 < ((mx - self.max_cmdsn) & 0xFFFFFFFF) < 1 << 31:
                self.max_cmdsn = mx
        return pdu

    def window_open(self) -> bool:
        """May a command with the next CmdSN be sent (CmdSN <= MaxCmdSN, serially)?"""
        if self.max_cmdsn is None:
            return True
        return ((self.max_cmdsn - self.cmdsn) & 0xFFFFFFFF) < 1 << 31

    def _malformed(self, raw: bytes, why: str) -> NoReturn:
        if self.dump:
            log.warning("malformed iSCSI PDU from %s:%d (%s): %s", self.host, self.port, why,
                        raw[:256].hex())
        raise NetworkError(f"iSCSI target {self.host}:{self.port} sent a malformed PDU: {why}")

    def _next_itt(self) -> int:
        self.itt = (self.itt + 1) & 0x7FFFFFFF
        return self.itt

    # -- login -----------------------------------------------------------------------------------
    def _login_round(self, csg: int, nsg: int, transit: bool, keys: dict,
                     itt: int) -> tuple[dict, dict]:
        self.send(
            P.login_request(
                self.isid, 0, itt, 0, self.cmdsn, self.expstatsn, csg, nsg, transit, keys
            )
        )
        while True:
            resp = self.recv()
            if resp.opcode == P.OP_LOGIN_RESP:
                break
            if resp.opcode == P.OP_REJECT:
                raise NetworkError(
                    f"iSCSI target rejected the login request (reason {resp.bhs[2]:#x})"
                )
            self._malformed(bytes(resp.bhs), f"unexpected {resp.name} during login")
        f = P.login_response_fields(resp)
        self.expstatsn = (f["statsn"] + 1) & 0xFFFFFFFF
        cls, det = f["status_class"], f["status_detail"]
        if cls != 0:
            target = self.cfg["TargetName"]
            if cls == 2 and det == 1:
                raise AuthenticationError(
                    f"iSCSI login to {target} failed: authentication failure "
                    "(check InitiatorUsername / InitiatorSecret)"
                )
            if cls == 2 and det == 2:
                raise AuthenticationError(f"iSCSI login to {target} failed: not authorized")
            if cls == 2 and det in (3, 4):
                raise ImageNotFound(f"iSCSI target {target} not found at {self.host}:{self.port}")
            if cls == 1:
                raise NetworkError(
                    f"iSCSI target {target} redirects elsewhere "
                    f"(status {cls}/{det}); redirection is not supported"
                )
            raise NetworkError(
                f"iSCSI login to {target} failed with status class {cls}, detail {det}"
            )
        try:
            keys_back = P.decode_text(resp.data)
        except P.PDUError as exc:
            self._malformed(bytes(resp.bhs), str(exc))
        return f, keys_back

    def login(self) -> None:
        cfg = self.cfg
        user, secret = cfg.get("InitiatorUsername"), cfg.get("InitiatorSecret")
        tuser, tsecret = cfg.get("TargetUsername"), cfg.get("TargetSecret")
        if bool(tuser) != bool(tsecret):
            raise ConfigError("mutual CHAP needs both TargetUsername and TargetSecret")
        if tuser and not (user and secret):
            raise ConfigError("mutual CHAP needs InitiatorUsername and InitiatorSecret too")
        itt = self._next_itt()
        first = {
            "InitiatorName": cfg["InitiatorName"],
            "SessionType": "Normal",
            "TargetName": cfg["TargetName"],
            "AuthMethod": "CHAP" if user and secret else "None",
        }
        if user and secret:
            f, keys = self._login_round(0, 1, False, first, itt)
            method = keys.get("AuthMethod", "")
            if method == "CHAP":
                f, keys = self._login_round(0, 1, False, {"CHAP_A": "5"}, itt)
                if keys.get("CHAP_A") != "5":
                    raise AuthenticationError(
                        f"iSCSI target offered CHAP algorithm "
                        f"{keys.get('CHAP_A')!r}; only MD5 (5) is supported"
                    )
                try:
                    ident = int(keys["CHAP_I"])
                    challenge = P.decode_binary(keys["CHAP_C"])
                except (KeyError, ValueError, P.PDUError):
                    raise AuthenticationError(
                        "iSCSI target sent an invalid CHAP challenge"
                    ) from None
                if len(challenge) > 1024:
                    raise AuthenticationError("iSCSI target's CHAP challenge is too long")
                answer = {
                    "CHAP_N": user,
                    "CHAP_R": P.encode_binary(P.chap_response(ident, secret, challenge)),
                }
                mine: P.ChapChallenge | None = None
                their_secret = b""
                if tuser and tsecret:
                    mine = P.ChapChallenge()
                    their_secret = tsecret
                    answer.update(mine.keys())
                f, keys = self._login_round(0, 1, True, answer, itt)
                if mine is not None:
                    try:
                        ok = keys.get("CHAP_N") == tuser and mine.verify(
                            their_secret, P.decode_binary(keys.get("CHAP_R", ""))
                        )
                    except P.PDUError:
                        ok = False
                    if not ok:
                        raise AuthenticationError(
                            "iSCSI target failed mutual CHAP authentication "
                            "(TargetUsername / TargetSecret do not match)"
                        )
            elif method != "None":
                raise AuthenticationError(f"iSCSI target refused CHAP (AuthMethod={method!r})")
        else:
            f, keys = self._login_round(0, 1, True, first, itt)
            if keys.get("AuthMethod") not in (None, "None"):
                raise AuthenticationError(
                    "iSCSI target requires authentication "
                    f"(AuthMethod={keys.get('AuthMethod')!r}); set "
                    "InitiatorUsername and InitiatorSecret"
                )
        rounds = 0
        while (
            not (f["transit"] and f["nsg"] == P.STAGE_OPERATIONAL) and f["csg"] == P.STAGE_SECURITY
        ):
            rounds += 1
            if rounds > 8:
                raise NetworkError("iSCSI security negotiation did not finish")
            f, keys = self._login_round(0, 1, True, {}, itt)
        ours = {
            "HeaderDigest": "None",
            "DataDigest": "None",
            "MaxRecvDataSegmentLength": str(OUR_MAX_RECV),
            "InitialR2T": "No",         # unsolicited Data-Out welcome (OR: Yes wins)
            "ImmediateData": "Yes",
            "MaxBurstLength": str(OUR_BURST),
            "FirstBurstLength": str(OUR_BURST),
            "DefaultTime2Wait": "0",
            "DefaultTime2Retain": "0",
            "MaxOutstandingR2T": "1",
            "MaxConnections": "1",
            "DataPDUInOrder": "Yes",
            "DataSequenceInOrder": "Yes",
            "ErrorRecoveryLevel": "0",
        }
        got: dict[str, str] = {}
        send = ours
        for _ in range(8):
            f, keys = self._login_round(1, 3, True, send, itt)
            got.update(keys)
            if f["transit"] and f["nsg"] == P.STAGE_FULL_FEATURE:
                break
            send = {k: v for k, v in keys.items() if k not in ours}  # answer its proposals
        else:
            raise NetworkError("iSCSI operational negotiation did not finish")
        for k in ("HeaderDigest", "DataDigest"):
            if got.get(k, "None") != "None":
                raise NotSupported(
                    f"iSCSI target insists on {k}={got[k]}; digests are not supported"
                )

        def num(key: str, default: int) -> int:
            try:
                return int(got.get(key, default))
            except ValueError:
                raise NetworkError(
                    f"iSCSI target sent a bad {key} value {got.get(key)!r}"
                ) from None

        self.target_mrdsl = max(512, num("MaxRecvDataSegmentLength", 8192))
        self.max_burst = min(OUR_BURST, num("MaxBurstLength", 262144))
        self.first_burst = min(self.max_burst, num("FirstBurstLength", 65536))
        self.immediate_data = got.get("ImmediateData", "Yes") == "Yes"
        self.initial_r2t = got.get("InitialR2T", "Yes") != "No"
        self.tsih = f["tsih"]

    def logout(self) -> None:
        if self.sock is None:
            return
        try:
            self.send(P.logout_request(self._next_itt(), 0, self.cmdsn, self.expstatsn))
            for _ in range(4):
                r = self.recv()
                if r.opcode == P.OP_LOGOUT_RESP:
                    break
        except (_Dropped, VDTimeoutError, NetworkError):
            pass
        finally:
            self.close()

    # -- commands --------------------------------------------------------------------------------
    def _answer_nop(self, p: P.PDU) -> None:
        ttt = p.u32(20)
        if ttt != P.RESERVED_TAG:
            self.send(P.nop_out(P.RESERVED_TAG, ttt, self.cmdsn, self.expstatsn, self.lun))

    def read_pipelined(self, cmds: list[tuple[bytes, int]], depth: int,
                       results: list[Result | None] | None = None) -> list[Result | None]:
        """READs ((cdb, length) each) through :meth:`pipelined`."""
        return self.pipelined([(cdb, n, b"") for cdb, n in cmds], depth, results)

    def pipelined(self, cmds: list[Command], depth: int,
                  results: list[Result | None] | None = None) -> list[Result | None]:
        """Run ``cmds`` ((cdb, read length, write data) each) with up to ``depth`` in flight,
        each with its own task tag, never past the target's MaxCmdSN. ``results[i]`` is set
        when command i completes: (status, data, sense); status ``TARGET_FAILURE | response``
        when the target failed it at the iSCSI level. After a result that a retry cannot mend
        (:func:`retryable`), no further command is sent; those in flight are waited for, so
        ``results`` says which completed. A dropped connection raises :class:`_Dropped` with
        ``results`` filled so far; any other error closes the connection (tasks may be left
        in flight) and is raised."""
        if results is None:
            results = [None] * len(cmds)
        inflight: dict[int, _Task] = {}
        nxt = 0
        stop = False
        try:
            while (nxt < len(cmds) and not stop) or inflight:
                while not stop and nxt < len(cmds) and len(inflight) < depth and (
                        self.window_open() or not inflight):
                    task = self._start(nxt, *cmds[nxt])
                    inflight[task.itt] = task
                    nxt += 1
                p = self.recv()
                op = p.opcode
                if op == P.OP_NOP_IN:
                    if p.itt == P.RESERVED_TAG:
                        self._answer_nop(p)
                    continue
                if op == P.OP_ASYNC:
                    if p.bhs[36] == 0:
                        continue
                    raise _Dropped(f"target sent async event {p.bhs[36]} (logout/drop requested)")
                if op == P.OP_REJECT:
                    raise NetworkError(f"iSCSI target rejected a command (reason {p.bhs[2]:#x})")
                found = inflight.get(p.itt)
                if found is None:
                    self._malformed(bytes(p.bhs), f"{p.name} for unknown task {p.itt:#x}")
                task = found
                done: Result | None = None
                if op == P.OP_DATA_IN:
                    off = p.u32(40)
                    if off + len(p.data) > len(task.buf):
                        self._malformed(bytes(p.bhs), f"Data-In at {off}+{len(p.data)} beyond "
                                        f"the {len(task.buf)} bytes asked for")
                    task.buf[off:off + len(p.data)] = p.data
                    if p.flags & 0x01:                   # status in the last Data-In
                        self.expstatsn = (p.u32(24) + 1) & 0xFFFFFFFF
                        done = (p.bhs[3], bytes(task.buf), b"")
                elif op == P.OP_R2T:
                    self._answer_r2t(p, task)
                elif op == P.OP_SCSI_RESP:
                    self.expstatsn = (p.u32(24) + 1) & 0xFFFFFFFF
                    sense = b""
                    if len(p.data) >= 2:
                        sl = struct.unpack_from(">H", p.data, 0)[0]
                        sense = p.data[2:2 + sl]
                    status = p.bhs[3] if p.bhs[2] == 0 else TARGET_FAILURE | p.bhs[2]
                    done = (status, bytes(task.buf), sense)
                else:
                    self._malformed(bytes(p.bhs), f"unexpected {p.name}")
                if done is not None:
                    results[task.index] = done
                    del inflight[task.itt]
                    if done[0] != 0 and not retryable(done[0], done[2]):
                        stop = True
        except _Dropped:
            raise
        except BaseException:
            if inflight:
                self.close()           # its tasks' answers would confuse the next command
            raise
        return results

    def _start(self, index: int, cdb: bytes, read_length: int, wdata: Buffer) -> _Task:
        """Send one command: its immediate data, then unsolicited Data-Out when InitialR2T=No
        (together at most FirstBurstLength; RFC 7143 13.10-13.14)."""
        itt = self._next_itt()
        cmdsn = self.cmdsn
        self.cmdsn = (self.cmdsn + 1) & 0xFFFFFFFF
        wlen = len(wdata)
        imm = min(self.first_burst, self.target_mrdsl, wlen) if self.immediate_data else 0
        unsolicited = imm if self.initial_r2t else min(self.first_burst, wlen)
        self.send(P.scsi_command(self.lun, itt, cdb, read=read_length > 0, write=wlen > 0,
                                 expected_length=read_length or wlen, cmdsn=cmdsn,
                                 expstatsn=self.expstatsn, data=bytes(wdata[:imm]),
                                 final=unsolicited <= imm))
        if unsolicited > imm:
            self._data_out(itt, P.RESERVED_TAG, wdata, imm, unsolicited)
        return _Task(index, itt, bytearray(read_length), wdata)

    def _data_out(self, itt: int, ttt: int, wdata: Buffer, start: int, end: int) -> None:
        """One Data-Out sequence: ``wdata[start:end]`` in PDUs the target can take."""
        datasn = 0
        pos = start
        while pos < end:
            n = min(self.target_mrdsl, end - pos)
            self.send(P.data_out(self.lun, itt, ttt, self.expstatsn, datasn, pos,
                                 bytes(wdata[pos:pos + n]), final=pos + n >= end))
            datasn += 1
            pos += n

    def _answer_r2t(self, p: P.PDU, task: _Task) -> None:
        ttt, off, want = p.u32(20), p.u32(40), p.u32(44)
        wlen = len(task.wdata)
        if off + want > wlen or want == 0:
            self._malformed(bytes(p.bhs),
                            f"R2T for {off}+{want} beyond the {wlen} bytes being written")
        self._data_out(task.itt, ttt, task.wdata, off, off + want)

    def execute(self, cdb: bytes, read_length: int = 0,
                write_data: Buffer = b"") -> tuple[int, bytes, bytes]:
        """Run one SCSI command: returns (status, data, sense)."""
        result = self.pipelined([(cdb, read_length, write_data)], 1)[0]
        assert result is not None
        return result


class IscsiImage(Image):
    def __init__(self, backend: Backend, location: str, cfg: dict, read_only: bool) -> None:
        super().__init__(backend, location, read_only)
        self.cfg = cfg
        self.write_split: int = cfg["WriteSplit"]
        self.pipeline = PIPELINE
        self.write_pipeline = PIPELINE_WRITES
        self.conn = Connection(cfg)
        self.conn.connect()
        try:
            self._scsi(P.CDB_TEST_UNIT_READY, what="TEST UNIT READY")
            _, inq, _ = self._scsi(P.cdb_inquiry(96), read_length=96, what="INQUIRY")
            ptype = inq[0] & 0x1F if inq else 0x1F
            if ptype not in (0x00, 0x05, 0x07, 0x0E):
                raise NotSupported(
                    f"{location}: LUN is not a disk (SCSI peripheral type "
                    f"{ptype:#x}); choose a data LUN (usually 1 on tgt)"
                )
            self.vendor = inq[8:16].decode("ascii", "replace").strip()
            self.product = inq[16:32].decode("ascii", "replace").strip()
            _, cap, _ = self._scsi(P.CDB_READ_CAPACITY10, read_length=8, what="READ CAPACITY(10)")
            last, blen = struct.unpack(">II", cap)
            if last == 0xFFFFFFFF:
                _, cap, _ = self._scsi(
                    P.CDB_READ_CAPACITY16, read_length=32, what="READ CAPACITY(16)"
                )
                last, blen = struct.unpack_from(">QI", cap)
            if blen not in (512, 1024, 2048, 4096):
                raise NotSupported(f"{location}: unsupported LUN block size {blen}")
        except BaseException:
            self.conn.close()
            raise
        self.sector_size = blen
        self.block_size = blen
        self.size = (last + 1) * blen

    def info(self) -> dict[str, object]:
        return {
            "target": self.cfg["TargetName"],
            "lun": self.conn.lun,
            "address": f"{self.conn.host}:{self.conn.port}",
            "vendor": self.vendor,
            "product": self.product,
            "block_size": self.block_size,
            "max_burst": self.conn.max_burst,
            "target_max_recv": self.conn.target_mrdsl,
        }

    def files(self) -> list[str]:
        return []

    @property
    def allocated_size(self) -> int:
        return self.size

    def _scsi(self, cdb: bytes, read_length: int = 0, write_data: Buffer = b"",
              what: str = "command") -> Result:
        """Execute with reconnect-and-retry-once on a dropped connection; UNIT ATTENTION, BUSY
        and TASK SET FULL retried (3 times)."""
        attempts = 0
        while True:
            attempts += 1
            try:
                status, data, sense = self.conn.execute(cdb, read_length, write_data)
            except _Dropped as exc:
                if attempts > 1:
                    raise NetworkError(
                        f"{self.location}: connection lost during {what} and the "
                        f"retry failed too: {exc}"
                    ) from None
                self.conn.connect()
                continue
            if status == 0:
                return status, data, sense
            if retryable(status, sense) and attempts < 4:
                continue
            raise VDIOError(f"{self.location}: {what} failed: {describe_status(status, sense)}")

    def block_status(self, offset: int, length: int) -> list[tuple[int, int, Alloc]]:
        return [(offset, length, Alloc.DATA)]

    def read(self, offset: int, length: int) -> bytes:
        bs = self.block_size
        pieces = []
        pos = offset
        end = offset + length
        while pos < end:
            n = min(READ_CHUNK, end - pos)
            pieces.append((pos, n))
            pos += n
        if self.pipeline > 1 and len(pieces) > 1:
            return self._read_pipelined(pieces)
        out = bytearray()
        for pos, n in pieces:
            _, data, _ = self._scsi(
                P.cdb_read(pos // bs, n // bs), read_length=n, what=f"READ at {pos}"
            )
            out += data
        return bytes(out)

    def read_many(self, ranges: list[tuple[int, int]]) -> list[bytes]:
        """Several reads (block-aligned (offset, length) each) with their READs in flight
        together: the IoQueue hands over the independent reads it has ready."""
        if self.pipeline <= 1:
            return [self.read(o, n) for o, n in ranges]
        pieces = []
        for offset, length in ranges:
            for pos in range(offset, offset + length, READ_CHUNK):
                pieces.append((pos, min(READ_CHUNK, offset + length - pos)))
        data = self._read_pipelined(pieces)
        out = []
        pos = 0
        for _offset, length in ranges:
            out.append(data[pos:pos + length])
            pos += length
        return out

    def _read_pipelined(self, pieces: list[tuple[int, int]]) -> bytes:
        """Several READs in flight; a piece that fails (UNIT ATTENTION, BUSY...) or was not
        answered is read again alone, through :meth:`_scsi`'s retries; a dropped connection:
        reconnect first."""
        bs = self.block_size
        cmds = [(P.cdb_read(pos // bs, n // bs), n) for pos, n in pieces]
        results: list[Result | None] = [None] * len(cmds)
        try:
            results = self.conn.read_pipelined(cmds, self.pipeline, results)
        except _Dropped:
            self.conn.connect()
        out = bytearray()
        for (pos, n), r in zip(pieces, results, strict=True):
            if r is None or r[0] != 0:
                r = self._scsi(P.cdb_read(pos // bs, n // bs), read_length=n,
                               what=f"READ at {pos}")
            out += r[1]
        return bytes(out)

    def write(self, offset: int, data: bytes, fill: FillFn) -> None:
        """WRITEs of at most WriteSplit bytes, ``write_pipeline`` in flight. A command that fails
        for good stops the sending; the error names it and which bytes were written (their
        GOOD status came back) and which were not, or only in part."""
        self.require_writable()
        bs = self.block_size
        mv = memoryview(data)
        step = self.write_split
        pieces = [(offset + p, mv[p:p + step]) for p in range(0, len(mv), step)]
        cmds: list[Command] = [(P.cdb_write(pos // bs, len(buf) // bs), 0, buf)
                               for pos, buf in pieces]
        results: list[Result | None] = [None] * len(cmds)
        try:
            try:
                self.conn.pipelined(cmds, max(1, self.write_pipeline), results)
            except _Dropped:
                self.conn.connect()       # the unanswered WRITEs are sent again below
            for (pos, buf), r in zip(pieces, results, strict=True):
                if r is not None and r[0] != 0 and not retryable(r[0], r[2]):
                    raise VDIOError(f"{self.location}: WRITE of {len(buf)} bytes at {pos} "
                                    f"failed: {describe_status(r[0], r[2])}")
            for i, (pos, buf) in enumerate(pieces):
                r = results[i]
                if r is None or r[0] != 0:
                    results[i] = self._scsi(cmds[i][0], write_data=buf,
                                            what=f"WRITE of {len(buf)} bytes at {pos}")
        except VDError as exc:
            done = [r is not None and r[0] == 0 for r in results]
            raise type(exc)(f"{exc.message}; {_written(pieces, done)}") from None


    def flush(self) -> None:
        if not self.read_only:
            self._scsi(P.CDB_SYNC_CACHE10, what="SYNCHRONIZE CACHE")

    def close(self) -> None:
        self.conn.logout()


def open_image(backend: IscsiBackend, location: str, flags: OpenFlags = OpenFlags.NORMAL,
         config: dict | None = None) -> Image:
    given = dict(config or {})
    if location and location != "-":
        for k, v in backend.parse_location(location).items():
            given.setdefault(k, v)
    cfg = parse_config(backend.config_keys, given, owner="iSCSI")
    if cfg.get("HostIPStack") == 0:
        raise NotSupported(
            "iSCSI: HostIPStack=0 (VirtualBox's internal networking) is not "
            "available outside a VM; use 1"
        )
    return IscsiImage(backend, backend.compose_location(cfg), cfg, flags.read_only)

