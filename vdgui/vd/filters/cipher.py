"""AES-XTS for the CRYPT filter, through the shared primitives (vd/crypto/primitives.py, the one
place ``cryptography`` is imported): one XTS unit per data unit, the unit's number (disk offset /
unit size) as the little-endian 16-byte tweak (plain64)."""
from __future__ import annotations

from ..crypto.cipher import counter_ivs
from ..crypto.primitives import aes_units


def xts_encrypt(key: bytes, tweak: bytes, data: bytes) -> bytes:
    return bytes(aes_units("xts", key, data, tweak, len(data), True))


def xts_decrypt(key: bytes, tweak: bytes, data: bytes) -> bytes:
    return bytes(aes_units("xts", key, data, tweak, len(data), False))


def xts_units(key: bytes, data, first: int, unit: int, encrypt: bool) -> bytearray:
    return aes_units("xts", key, data, counter_ivs(first, len(data) // unit), unit, encrypt)


class XtsUnits:
    """Whole data units of a disk, in place: unit *i* of the disk has tweak plain64(i)."""

    def __init__(self, key: bytes, unit: int = 512):
        self.key = bytes(key)
        self.unit = unit
        self._zero = bytes(unit)

    def encrypt(self, offset: int, buf: memoryview) -> None:
        u = self.unit
        buf[:] = xts_units(self.key, buf, offset // u, u, True)

    def decrypt(self, offset: int, buf: memoryview) -> None:
        """Runs of units whose stored bytes are not all zero are decrypted; an all-zero unit
        was never written (a hole, a block's unwritten rest) and reads as zeroes."""
        u = self.unit
        n = len(buf) // u
        if self._zero not in buf.tobytes():    # no zero unit can hide in there: one call
            buf[:] = xts_units(self.key, buf, offset // u, u, False)
            return
        i = 0
        while i < n:
            if buf[i * u:(i + 1) * u] == self._zero:
                i += 1
                continue
            j = i + 1
            while j < n and buf[j * u:(j + 1) * u] != self._zero:
                j += 1
            run = buf[i * u:j * u]
            run[:] = xts_units(self.key, run, offset // u + i, u, False)
            i = j


__all__ = ["XtsUnits", "xts_decrypt", "xts_encrypt"]
