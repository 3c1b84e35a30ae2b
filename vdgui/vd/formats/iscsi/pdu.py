"""iSCSI PDUs (RFC 7143): the 48-byte Basic Header Segment, text key=value data, CHAP.

Only what an initiator needs: it builds requests and parses responses. No I/O here.
"""
from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass, field

BHS_LEN = 48

# initiator opcodes
OP_NOP_OUT, OP_SCSI_CMD, OP_TASK_MGMT, OP_LOGIN, OP_TEXT, OP_DATA_OUT, OP_LOGOUT = (
    0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06)
# target opcodes
OP_NOP_IN, OP_SCSI_RESP, OP_TASK_MGMT_RESP, OP_LOGIN_RESP, OP_TEXT_RESP, OP_DATA_IN = (
    0x20, 0x21, 0x22, 0x23, 0x24, 0x25)
OP_LOGOUT_RESP, OP_R2T, OP_ASYNC, OP_REJECT = 0x26, 0x31, 0x32, 0x3F
OPCODE_NAMES = {
    OP_NOP_IN: "NOP-In",
    OP_SCSI_RESP: "SCSI Response",
    OP_TASK_MGMT_RESP: "Task Management Response",
    OP_LOGIN_RESP: "Login Response",
    OP_TEXT_RESP: "Text Response",
    OP_DATA_IN: "SCSI Data-In",
    OP_LOGOUT_RESP: "Logout Response",
    OP_R2T: "R2T",
    OP_ASYNC: "Async Message",
    OP_REJECT: "Reject",
}
IMMEDIATE = 0x40
FINAL = 0x80
RESERVED_TAG = 0xFFFFFFFF

# login stages
STAGE_SECURITY, STAGE_OPERATIONAL, STAGE_FULL_FEATURE = 0, 1, 3

MAX_DATA_SEGMENT = (1 << 24) - 1


class PDUError(ValueError):
    """A malformed PDU (the connection layer turns this into a VDError)."""


def pad4(n: int) -> int:
    return (4 - n % 4) % 4


@dataclass
class PDU:
    """One PDU: the raw BHS plus its data segment. Fields are read with the accessors below."""

    bhs: bytearray
    data: bytes = b""
    ahs: bytes = b""

    # common fields
    @property
    def opcode(self) -> int:
        return self.bhs[0] & 0x3F

    @property
    def flags(self) -> int:
        return self.bhs[1]

    @property
    def itt(self) -> int:
        return self.u32(16)

    def u32(self, off: int) -> int:
        value: int = struct.unpack_from(">I", self.bhs, off)[0]
        return value

    @property
    def name(self) -> str:
        return OPCODE_NAMES.get(self.opcode, f"opcode {self.opcode:#x}")

    def encode(self) -> bytes:
        bhs = bytearray(self.bhs)
        bhs[4] = len(self.ahs) // 4
        n = len(self.data)
        if n > MAX_DATA_SEGMENT:
            raise PDUError(f"data segment of {n} bytes is larger than a PDU can carry")
        bhs[5:8] = n.to_bytes(3, "big")
        return bytes(bhs) + self.ahs + self.data + bytes(pad4(n))


def parse_bhs(bhs: bytes) -> tuple[int, int]:
    """Return (AHS length in bytes, data segment length) of a received BHS."""
    if len(bhs) != BHS_LEN:
        raise PDUError(f"basic header segment is {len(bhs)} bytes, expected {BHS_LEN}")
    return bhs[4] * 4, int.from_bytes(bhs[5:8], "big")


def _bhs(opcode: int, flags: int = 0, immediate: bool = False) -> bytearray:
    b = bytearray(BHS_LEN)
    b[0] = (opcode & 0x3F) | (IMMEDIATE if immediate else 0)
    b[1] = flags
    return b


def login_request(
    isid: bytes,
    tsih: int,
    itt: int,
    cid: int,
    cmdsn: int,
    expstatsn: int,
    csg: int,
    nsg: int,
    transit: bool,
    keys: dict[str, str],
) -> PDU:
    flags = (0x80 if transit else 0) | (csg << 2) | (nsg if transit else 0)
    b = _bhs(OP_LOGIN, flags, immediate=True)
    b[2] = 0  # version max
    b[3] = 0  # version min
    b[8:14] = isid
    struct.pack_into(">HIHxxII", b, 14, tsih, itt, cid, cmdsn, expstatsn)
    return PDU(b, encode_text(keys))


def login_response_fields(p: PDU) -> dict:
    b = p.bhs
    return {
        "transit": bool(b[1] & 0x80),
        "continue": bool(b[1] & 0x40),
        "csg": (b[1] >> 2) & 3,
        "nsg": b[1] & 3,
        "version_active": b[3],
        "isid": bytes(b[8:14]),
        "tsih": struct.unpack_from(">H", b, 14)[0],
        "statsn": p.u32(24),
        "expcmdsn": p.u32(28),
        "maxcmdsn": p.u32(32),
        "status_class": b[36],
        "status_detail": b[37],
    }


def scsi_command(
    lun: int,
    itt: int,
    cdb: bytes,
    *,
    read: bool,
    write: bool,
    expected_length: int,
    cmdsn: int,
    expstatsn: int,
    data: bytes = b"",
    final: bool = True,
) -> PDU:
    flags = (FINAL if final else 0) | (0x40 if read else 0) | (0x20 if write else 0) | 0x01
    b = _bhs(OP_SCSI_CMD, flags)
    b[8:16] = encode_lun(lun)
    struct.pack_into(">IIII", b, 16, itt, expected_length, cmdsn, expstatsn)
    if len(cdb) > 16:
        raise PDUError("CDBs longer than 16 bytes need an AHS, which is not supported")
    b[32 : 32 + len(cdb)] = cdb
    return PDU(b, data)


def data_out(
    lun: int, itt: int, ttt: int, expstatsn: int, datasn: int, offset: int, data: bytes, final: bool
) -> PDU:
    b = _bhs(OP_DATA_OUT, FINAL if final else 0)
    b[8:16] = encode_lun(lun)
    struct.pack_into(">II", b, 16, itt, ttt)
    struct.pack_into(">I", b, 28, expstatsn)
    struct.pack_into(">II", b, 36, datasn, offset)
    return PDU(b, data)


def nop_out(itt: int, ttt: int, cmdsn: int, expstatsn: int, lun: int = 0, data: bytes = b"") -> PDU:
    b = _bhs(OP_NOP_OUT, FINAL, immediate=True)
    b[8:16] = encode_lun(lun)
    struct.pack_into(">IIII", b, 16, itt, ttt, cmdsn, expstatsn)
    return PDU(b, data)


def logout_request(itt: int, cid: int, cmdsn: int, expstatsn: int, reason: int = 0) -> PDU:
    b = _bhs(OP_LOGOUT, FINAL | (reason & 0x7F), immediate=True)
    struct.pack_into(">IHxxII", b, 16, itt, cid, cmdsn, expstatsn)
    return PDU(b)


def encode_lun(lun: int) -> bytes:
    """SAM LUN encoding: peripheral (< 256) or flat (< 16384) addressing."""
    if lun < 0 or lun >= 16384:
        raise PDUError(f"LUN {lun} out of range (0..16383)")
    if lun < 256:
        return bytes([0, lun]) + bytes(6)
    return bytes([0x40 | (lun >> 8), lun & 0xFF]) + bytes(6)


# -- text key=value segments ------------------------------------------------------------------
def encode_text(keys: dict[str, str]) -> bytes:
    out = bytearray()
    for k, v in keys.items():
        if "=" in k or "\x00" in k or "\x00" in str(v):
            raise PDUError(f"bad text key {k!r}")
        out += f"{k}={v}".encode() + b"\x00"
    return bytes(out)


def decode_text(data: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in data.split(b"\x00"):
        if not item:
            continue
        if b"=" not in item:
            raise PDUError(f"text key without '=': {item[:40]!r}")
        k, v = item.split(b"=", 1)
        out[k.decode("utf-8", "replace")] = v.decode("utf-8", "replace")
    return out


# -- CHAP (RFC 1994, MD5 only: CHAP_A=5) -------------------------------------------------------
def decode_binary(value: str) -> bytes:
    """iSCSI binary values: 0x... hex or 0b... base64."""
    v = value.strip()
    try:
        if v[:2] in ("0x", "0X"):
            h = v[2:]
            return bytes.fromhex(h if len(h) % 2 == 0 else "0" + h)
        if v[:2] in ("0b", "0B"):
            import base64

            return base64.b64decode(v[2:], validate=True)
    except ValueError:
        pass
    raise PDUError(f"bad binary value {value[:40]!r} (expected 0x... or 0b...)")


def encode_binary(data: bytes) -> str:
    return "0x" + data.hex()


def chap_response(identifier: int, secret: bytes, challenge: bytes) -> bytes:
    return hashlib.md5(bytes([identifier & 0xFF]) + secret + challenge).digest()


@dataclass
class ChapChallenge:
    identifier: int = field(default_factory=lambda: os.urandom(1)[0])
    challenge: bytes = field(default_factory=lambda: os.urandom(16))

    def keys(self) -> dict[str, str]:
        return {"CHAP_I": str(self.identifier), "CHAP_C": encode_binary(self.challenge)}

    def verify(self, secret: bytes, response: bytes) -> bool:
        return chap_response(self.identifier, secret, self.challenge) == response


# -- SCSI -------------------------------------------------------------------------------------
SENSE_KEYS = {
    0x0: "NO SENSE",
    0x1: "RECOVERED ERROR",
    0x2: "NOT READY",
    0x3: "MEDIUM ERROR",
    0x4: "HARDWARE ERROR",
    0x5: "ILLEGAL REQUEST",
    0x6: "UNIT ATTENTION",
    0x7: "DATA PROTECT",
    0x8: "BLANK CHECK",
    0x9: "VENDOR SPECIFIC",
    0xA: "COPY ABORTED",
    0xB: "ABORTED COMMAND",
    0xD: "VOLUME OVERFLOW",
    0xE: "MISCOMPARE",
}
ASC_TEXT = {
    (0x04, 0x00): "logical unit not ready",
    (0x20, 0x00): "invalid command operation code",
    (0x21, 0x00): "logical block address out of range",
    (0x24, 0x00): "invalid field in CDB",
    (0x25, 0x00): "logical unit not supported",
    (0x27, 0x00): "write protected",
    (0x28, 0x00): "medium may have changed",
    (0x29, 0x00): "power on or reset occurred",
    (0x3A, 0x00): "medium not present",
    (0x11, 0x00): "unrecovered read error",
    (0x0C, 0x00): "write error",
}


def parse_sense(sense: bytes) -> tuple[int, int, int]:
    """(sense key, ASC, ASCQ) from fixed (0x70/0x71) or descriptor (0x72/0x73) sense data."""
    if len(sense) < 2:
        return 0, 0, 0
    code = sense[0] & 0x7F
    if code in (0x72, 0x73) and len(sense) >= 4:
        return sense[1] & 0x0F, sense[2], sense[3]
    if code in (0x70, 0x71) and len(sense) >= 14:
        return sense[2] & 0x0F, sense[12], sense[13]
    if code in (0x70, 0x71) and len(sense) >= 3:
        return sense[2] & 0x0F, 0, 0
    return 0, 0, 0


def describe_sense(sense: bytes) -> str:
    key, asc, ascq = parse_sense(sense)
    text = ASC_TEXT.get((asc, ascq)) or ASC_TEXT.get((asc, 0)) or f"ASC {asc:#04x} ASCQ {ascq:#04x}"
    return f"{SENSE_KEYS.get(key, f'sense key {key:#x}')}: {text}"


def cdb_read(lba: int, blocks: int) -> bytes:
    if lba < (1 << 32) and blocks < (1 << 16):
        return struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0)
    return struct.pack(">BBQIBB", 0x88, 0, lba, blocks, 0, 0)


def cdb_write(lba: int, blocks: int) -> bytes:
    if lba < (1 << 32) and blocks < (1 << 16):
        return struct.pack(">BBIBHB", 0x2A, 0, lba, 0, blocks, 0)
    return struct.pack(">BBQIBB", 0x8A, 0, lba, blocks, 0, 0)


CDB_TEST_UNIT_READY = bytes(6)
CDB_READ_CAPACITY10 = bytes([0x25]) + bytes(9)
CDB_READ_CAPACITY16 = struct.pack(">BBQIBB", 0x9E, 0x10, 0, 32, 0, 0)
CDB_SYNC_CACHE10 = bytes([0x35]) + bytes(9)


def cdb_inquiry(alloc: int = 96) -> bytes:
    return struct.pack(">BBBHB", 0x12, 0, 0, alloc, 0)
