"""Sector ciphers: AES in XTS or CBC mode with the IV generators of dm-crypt and qemu
(``plain``: 32-bit sector number, ``plain64``: 64-bit, ``essiv:HASH``: the plain64 block
encrypted with AES keyed by HASH(key)); docs/design-encryption.md §1.3."""
from __future__ import annotations

import sys
from array import array

from ..errors import NotSupported
from . import primitives as P

_IVGENS = ("plain", "plain64", "essiv")


def parse_mode(cipher: str, mode: str, key_bytes: int, where: str) -> tuple[str, str, str]:
    """('xts'|'cbc', ivgen, essiv hash or '') after checking what is supported."""
    if cipher.lower() != "aes":
        raise NotSupported(f"{where}: cipher '{cipher}' is not supported", expected="aes",
                           found=cipher)
    chain, _, iv = mode.lower().partition("-")
    ivgen, _, ivhash = iv.partition(":")
    if chain not in ("xts", "cbc") or ivgen not in _IVGENS or (ivgen == "essiv") != bool(ivhash):
        raise NotSupported(f"{where}: cipher mode '{mode}' is not supported",
                           expected="xts-plain64, xts-plain, cbc-essiv:HASH, cbc-plain64, "
                                    "cbc-plain", found=mode)
    sizes = (32, 64) if chain == "xts" else (16, 24, 32)
    if key_bytes not in sizes:
        raise NotSupported(f"{where}: {key_bytes}-byte key for aes-{chain}",
                           expected=" or ".join(map(str, sizes)), found=key_bytes)
    if ivhash:
        P.check_hash(ivhash, where)
        if P.digest_size(ivhash) not in (16, 24, 32):
            raise NotSupported(f"{where}: essiv hash '{ivhash}' makes no AES key")
    return chain, ivgen, ivhash


def counter_ivs(first: int, n: int, step: int = 1, bits: int = 64) -> bytes:
    """``n`` 16-byte IVs: the little-endian ``bits``-bit number ``first + i * step``, zero
    padded (dm-crypt's plain64, or plain with bits=32)."""
    a = array("Q", bytes(16 * n))
    last = first + (n - 1) * step
    if bits < 64 and last >> bits:
        a[0::2] = array("Q", ((first + i * step) & ((1 << bits) - 1) for i in range(n)))
    else:
        a[0::2] = array("Q", range(first, first + n * step, step))
    if sys.byteorder == "big":
        a.byteswap()
    return a.tobytes()


class SectorCipher:
    """Encrypts/decrypts whole data units of ``unit`` bytes; unit *i* of a buffer gets IV
    number ``first + i * iv_step`` (dm-crypt counts IVs in 512-byte sectors whatever the unit,
    unless iv_large_sectors, which LUKS2 does not use). The key is held in a bytearray wiped by
    :meth:`wipe`."""

    def __init__(self, cipher: str, mode: str, key: bytes, unit: int = 512, where: str = "",
                 iv_step: int = 1):
        self.iv_step = iv_step
        self.chain, self.ivgen, ivhash = parse_mode(cipher, mode, len(key), where)
        if self.chain == "xts" and key[:len(key) // 2] == key[len(key) // 2:]:
            raise NotSupported(f"{where}: an XTS key whose two halves are equal is refused "
                               "(as OpenSSL does)")
        self.spec = f"{cipher.lower()}-{mode.lower()}"
        self.unit = unit
        self._key = bytearray(key)
        self._essiv = bytearray(P.hash_bytes(ivhash, key)) if ivhash else None

    def __repr__(self) -> str:
        return f"<SectorCipher {self.spec} unit {self.unit}>"

    def _ivs(self, first: int, n: int) -> bytes:
        ivs = counter_ivs(first, n, self.iv_step, 32 if self.ivgen == "plain" else 64)
        if self._essiv is not None:
            ivs = P.ecb_encrypt(bytes(self._essiv), ivs)
        return ivs

    def _run(self, data, first: int, encrypt: bool) -> bytearray:
        n, rest = divmod(len(data), self.unit)
        if rest:
            raise ValueError(f"{len(data)} bytes is not a whole number of {self.unit}-byte units")
        return P.aes_units(self.chain, bytes(self._key), data, self._ivs(first, n), self.unit,
                           encrypt)

    def decrypt(self, data, first: int) -> bytearray:
        return self._run(data, first, False)

    def encrypt(self, data, first: int) -> bytearray:
        return self._run(data, first, True)

    def wipe(self) -> None:
        for b in (self._key, self._essiv):
            if b is not None:
                b[:] = bytes(len(b))
