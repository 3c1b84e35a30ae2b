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


_CONTEXTS: tuple[Any, Any] | None = None


def _contexts() -> tuple[Any, Any]:
    """(encryption, decryption) context factories taking (algorithm, mode). A data unit is one
    context (XTS and CBC restart per unit), so the per-context cost is what limits throughput:
    ``cryptography``'s own factories behind ``Cipher`` skip its Python-level checks (about a
    third of the time per 512-byte unit). Used only when present and when they give what
    ``Cipher`` gives on a known input; ``Cipher`` otherwise."""
    global _CONTEXTS
    if _CONTEXTS is not None:
        return _CONTEXTS
    Cipher, algorithms, modes = _cryptography()

    def enc(alg: Any, mode: Any) -> Any:
        return Cipher(alg, mode).encryptor()

    def dec(alg: Any, mode: Any) -> Any:
        return Cipher(alg, mode).decryptor()
    _CONTEXTS = (enc, dec)
    try:
        from cryptography.hazmat.bindings._rust import openssl as rust
        fast = (rust.ciphers.create_encryption_ctx, rust.ciphers.create_decryption_ctx)
        alg, mode = algorithms.AES(bytes(range(64))), modes.XTS(bytes(range(16)))
        probe = bytes(range(64))
        if fast[0](alg, mode).update(probe) == enc(alg, mode).update(probe) and \
                fast[1](alg, mode).update(probe) == dec(alg, mode).update(probe):
            _CONTEXTS = fast
    except Exception:   # any change in the library: the public path
        pass
    return _CONTEXTS


def xts_units(key: bytes, data, tweaks: list[bytes], unit: int, encrypt: bool) -> bytearray:
    """AES-XTS over ``len(tweaks)`` data units of ``unit`` bytes, one tweak each."""
    _Cipher, algorithms, modes = _cryptography()
    make = _contexts()[0 if encrypt else 1]
    aes, xts = algorithms.AES(key), modes.XTS
    mv = memoryview(data)
    out = bytearray(len(mv))
    o = memoryview(out)
    pos = 0
    for t in tweaks:
        o[pos:pos + unit] = make(aes, xts(t)).update(mv[pos:pos + unit])
        pos += unit
    return out


def cbc_units(key: bytes, data, ivs: list[bytes], unit: int, encrypt: bool) -> bytearray:
    """AES-CBC, each data unit chained on its own from its IV."""
    _Cipher, algorithms, modes = _cryptography()
    make = _contexts()[0 if encrypt else 1]
    aes, cbc = algorithms.AES(key), modes.CBC
    mv = memoryview(data)
    out = bytearray(len(mv))
    o = memoryview(out)
    pos = 0
    for iv in ivs:
        o[pos:pos + unit] = make(aes, cbc(iv)).update(mv[pos:pos + unit])
        pos += unit
    return out
