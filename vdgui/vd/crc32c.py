"""CRC-32C (Castagnoli), as used by VHDX checksums (MS-VHDX 2.2: CRC-32C with the Castagnoli
polynomial 0x1EDC6F41, here in its reflected form 0x82F63B78; initial value and final XOR
0xFFFFFFFF). A plain table-driven implementation, no dependency; shared so other formats may use it.

VHDX structures are mostly zero (a 64 KiB region table holds a few entries), so runs of 512 zero
bytes are folded in one step: feeding zero bytes is a linear map of the CRC register, applied
as a precomputed 32x32 bit matrix.
"""
from __future__ import annotations

_POLY = 0x82F63B78
_ZRUN = 512
_ZEROS = bytes(_ZRUN)


def _make_table() -> tuple[int, ...]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ _POLY if c & 1 else c >> 1
        table.append(c)
    return tuple(table)


_TABLE = _make_table()
_ZERO_MAP: list[int] = []     # column i: the register after _ZRUN zero bytes from 1 << i


def _zero_map() -> list[int]:
    if not _ZERO_MAP:
        t = _TABLE
        for i in range(32):
            c = 1 << i
            for _ in range(_ZRUN):
                c = t[c & 0xFF] ^ (c >> 8)
            _ZERO_MAP.append(c)
    return _ZERO_MAP


def crc32c(data, crc: int = 0) -> int:
    """CRC-32C of ``data`` (bytes-like); pass a previous result as ``crc`` to continue it."""
    t = _TABLE
    c = crc ^ 0xFFFFFFFF
    mv = memoryview(data).cast("B")
    n = len(mv)
    pos = 0
    while pos < n:
        chunk = mv[pos:pos + _ZRUN]
        if len(chunk) == _ZRUN and chunk == _ZEROS:
            zm = _zero_map()
            r = 0
            i = 0
            while c:
                if c & 1:
                    r ^= zm[i]
                c >>= 1
                i += 1
            c = r
        else:
            for b in chunk:
                c = t[(c ^ b) & 0xFF] ^ (c >> 8)
        pos += _ZRUN
    return c ^ 0xFFFFFFFF
