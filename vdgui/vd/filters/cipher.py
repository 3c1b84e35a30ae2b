"""AES-XTS through the ``cryptography`` package (imported on first use): one XTS data unit per
call, the unit's number (disk offset / unit size) as the little-endian 16-byte tweak (plain64).
The calls release the GIL, so read-ahead and write-behind threads run them in parallel."""
from __future__ import annotations

from functools import lru_cache

from ..errors import NotSupported


@lru_cache(maxsize=1)
def _lib():
    try:
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    except ImportError:
        raise NotSupported("encrypted disks need the Python package 'cryptography' "
                           "(pip install cryptography)") from None
    return Cipher, algorithms, modes


def _cipher(key: bytes, tweak: bytes):
    Cipher, algorithms, modes = _lib()
    return Cipher(algorithms.AES(key), modes.XTS(tweak))


def xts_encrypt(key: bytes, tweak: bytes, data: bytes) -> bytes:
    return _cipher(key, tweak).encryptor().update(data)


def xts_decrypt(key: bytes, tweak: bytes, data: bytes) -> bytes:
    return _cipher(key, tweak).decryptor().update(data)


class XtsUnits:
    """Whole data units of a disk, in place: unit *i* of the disk has tweak plain64(i)."""

    def __init__(self, key: bytes, unit: int = 512):
        Cipher, algorithms, modes = _lib()
        self.key = bytes(key)
        self._aes = algorithms.AES(self.key)
        self._cipher = Cipher
        self._xts = modes.XTS
        self.unit = unit
        self._zero = bytes(unit)

    def _run(self, offset: int, buf: memoryview, encrypt: bool) -> None:
        u = self.unit
        first = offset // u
        for i in range(len(buf) // u):
            piece = buf[i * u:(i + 1) * u]
            if not encrypt and piece == self._zero:
                continue            # never written (a hole, a block's unwritten rest): zeroes
            c = self._cipher(self._aes, self._xts((first + i).to_bytes(16, "little")))
            ctx = c.encryptor() if encrypt else c.decryptor()
            piece[:] = ctx.update(piece)

    def decrypt(self, offset: int, buf: memoryview) -> None:
        self._run(offset, buf, False)

    def encrypt(self, offset: int, buf: memoryview) -> None:
        self._run(offset, buf, True)


__all__ = ["XtsUnits", "xts_decrypt", "xts_encrypt"]
