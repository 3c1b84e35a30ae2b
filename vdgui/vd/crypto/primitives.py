"""Thin wrappers over the libraries (docs/design-encryption.md §2.6): AES in XTS/CBC/ECB from
``cryptography``, PBKDF2 from hashlib (the same OpenSSL), argon2i/argon2id from ``argon2-cffi``.
Nothing here implements a cipher; the libraries are imported on first use, so start-up does not
pay for them and a missing library is a clear error, not an ImportError."""
from __future__ import annotations

import hashlib
import os
import secrets as _random
from typing import Any

from ..errors import CorruptImage, NotSupported

# a header may ask for any cost: refuse what would hang or exhaust memory (hostile headers)
MAX_PBKDF2_ITERATIONS = 50_000_000          # cryptsetup's benchmarks give 1e5..1e7
MAX_ARGON2_MEMORY_KIB = 4 * 1024 * 1024     # cryptsetup's own maximum (4 GiB)
MAX_ARGON2_TIME = 1000
MAX_ARGON2_LANES = 16
HASHES = ("sha1", "sha256", "sha512", "sha384", "sha224", "ripemd160")


def _cryptography() -> Any:
    try:
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    except ImportError:  # pragma: no cover - a declared dependency
        raise NotSupported("encrypted images need the 'cryptography' package "
                           "(pip install cryptography)") from None
    return Cipher, algorithms, modes


def random_bytes(n: int) -> bytes:
    return _random.token_bytes(n)


def check_hash(name: str, where: str) -> str:
    name = name.lower()
    if name not in HASHES or name not in hashlib.algorithms_available:
        raise NotSupported(f"{where}: hash '{name}' is not supported",
                           expected=", ".join(h for h in HASHES if h != "ripemd160"), found=name)
    return name


def digest_size(name: str) -> int:
    return hashlib.new(name).digest_size


def hash_bytes(name: str, data: bytes) -> bytes:
    return hashlib.new(name, data).digest()


def pbkdf2(hash_name: str, password: bytes, salt: bytes, iterations: int, length: int,
           where: str = "") -> bytes:
    if not 1 <= iterations <= MAX_PBKDF2_ITERATIONS:
        raise CorruptImage(f"{where}: PBKDF2 iteration count out of range",
                           expected=f"1..{MAX_PBKDF2_ITERATIONS}", found=iterations)
    return hashlib.pbkdf2_hmac(hash_name, password, salt, iterations, length)


def argon2(kind: str, password: bytes, salt: bytes, time_cost: int, memory_kib: int,
           lanes: int, length: int, where: str = "") -> bytes:
    """argon2i / argon2id (version 0x13); costs checked before anything is allocated."""
    # memory: cryptsetup's maximum, and never more than half of this machine's memory
    most = min(MAX_ARGON2_MEMORY_KIB, max(available_memory_kib() // 2, 64 * 1024))
    for what, value, lo, hi in (("cpus", lanes, 1, MAX_ARGON2_LANES),
                                ("time", time_cost, 1, MAX_ARGON2_TIME),
                                ("memory (KiB)", memory_kib, 8 * lanes, most)):
        if not lo <= value <= hi:
            raise CorruptImage(f"{where}: {kind} {what} out of range", expected=f"{lo}..{hi}",
                               found=value)
    try:
        from argon2.low_level import Type, hash_secret_raw
    except ImportError:  # pragma: no cover - a declared dependency
        raise NotSupported("LUKS2 argon2 keyslots need the 'argon2-cffi' package") from None
    typ = {"argon2i": Type.I, "argon2id": Type.ID}[kind]
    try:
        return hash_secret_raw(password, salt, time_cost, memory_kib, lanes, length, typ)
    except MemoryError:
        raise NotSupported(f"{where}: not enough memory for {kind} ({memory_kib} KiB)") from None


def available_memory_kib() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 1024
    except (ValueError, OSError):  # pragma: no cover
        return MAX_ARGON2_MEMORY_KIB


# -- AES ---------------------------------------------------------------------------------------
def ecb_encrypt(key: bytes, data: bytes) -> bytes:
    Cipher, algorithms, modes = _cryptography()
    e = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    return e.update(data) + e.finalize()


def ecb_decrypt(key: bytes, data: bytes) -> bytes:
    Cipher, algorithms, modes = _cryptography()
    d = Cipher(algorithms.AES(key), modes.ECB()).decryptor()
    return d.update(data) + d.finalize()


def xts_units(key: bytes, data, tweaks: list[bytes], unit: int, encrypt: bool) -> bytearray:
    """AES-XTS over ``len(tweaks)`` data units of ``unit`` bytes, one tweak each."""
    Cipher, algorithms, modes = _cryptography()
    aes, xts = algorithms.AES(key), modes.XTS
    mv = memoryview(data)
    out = bytearray(len(mv))
    o = memoryview(out)
    pos = 0
    for t in tweaks:
        c = Cipher(aes, xts(t))
        ctx = c.encryptor() if encrypt else c.decryptor()
        o[pos:pos + unit] = ctx.update(mv[pos:pos + unit])
        pos += unit
    return out


def cbc_units(key: bytes, data, ivs: list[bytes], unit: int, encrypt: bool) -> bytearray:
    """AES-CBC, each data unit chained on its own from its IV."""
    Cipher, algorithms, modes = _cryptography()
    aes, cbc = algorithms.AES(key), modes.CBC
    mv = memoryview(data)
    out = bytearray(len(mv))
    o = memoryview(out)
    pos = 0
    for iv in ivs:
        c = Cipher(aes, cbc(iv))
        ctx = c.encryptor() if encrypt else c.decryptor()
        o[pos:pos + unit] = ctx.update(mv[pos:pos + unit])
        pos += unit
    return out
