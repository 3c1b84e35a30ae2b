"""CRC-32C (Castagnoli), as used by VHDX checksums (MS-VHDX 2.2: CRC-32C with the Castagnoli
polynomial 0x1EDC6F41, here in its reflected form 0x82F63B78; initial value and final XOR
0xFFFFFFFF). A plain table-driven implementation, no dependency; shared so other formats may use it.
"""
from __future__ import annotations

_POLY = 0x82F63B78


def _make_table() -> tuple[int, ...]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ _POLY if c & 1 else c >> 1
        table.append(c)
    return tuple(table)


_TABLE = _make_table()


def crc32c(data, crc: int = 0) -> int:
    """CRC-32C of ``data`` (bytes-like); pass a previous result as ``crc`` to continue it."""
    t = _TABLE
    c = crc ^ 0xFFFFFFFF
    for b in memoryview(data).cast("B"):
        c = t[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF
