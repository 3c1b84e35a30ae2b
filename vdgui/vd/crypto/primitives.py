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


# -- AES over many data units (XTS and CBC restart per unit, each with its own IV) -------------
# ``cryptography`` offers one context per IV, a key schedule each: ~2-4 us per 512-byte sector,
# GIL held. OpenSSL's EVP interface (the libcrypto hashlib uses, through cffi's ABI mode) keeps
# one context per call and re-initialises only the IV per unit (EVP_CipherInit_ex with the
# cipher and key NULL); cffi releases the GIL in each call. Still OpenSSL's XTS/CBC; used only
# when it gives what ``Cipher`` gives on a known input, ``Cipher`` per unit otherwise.
_EVP_CDEF = """
typedef struct evp_cipher_ctx_st EVP_CIPHER_CTX;
typedef struct evp_cipher_st EVP_CIPHER;
EVP_CIPHER_CTX *EVP_CIPHER_CTX_new(void);
void EVP_CIPHER_CTX_free(EVP_CIPHER_CTX *ctx);
int EVP_CIPHER_CTX_set_padding(EVP_CIPHER_CTX *ctx, int pad);
const EVP_CIPHER *EVP_aes_128_xts(void);
const EVP_CIPHER *EVP_aes_256_xts(void);
const EVP_CIPHER *EVP_aes_128_cbc(void);
const EVP_CIPHER *EVP_aes_192_cbc(void);
const EVP_CIPHER *EVP_aes_256_cbc(void);
int EVP_CipherInit_ex(EVP_CIPHER_CTX *ctx, const EVP_CIPHER *cipher, void *impl,
                      const unsigned char *key, const unsigned char *iv, int enc);
int EVP_CipherUpdate(EVP_CIPHER_CTX *ctx, unsigned char *out, int *outl,
                     const unsigned char *in, int inl);
"""
_LIBCRYPTO = ("libcrypto.so.3", "libcrypto.so.1.1", "libcrypto.3.dylib", "libcrypto-3-x64.dll")
_EVP: Any = None            # None: not tried yet; False: unavailable; else (ffi, lib)


def _load_evp() -> Any:
    import ctypes.util

    import cffi
    ffi = cffi.FFI()
    ffi.cdef(_EVP_CDEF)
    found = ctypes.util.find_library("crypto")
    for name in (*_LIBCRYPTO, *([found] if found else [])):
        try:
            return ffi, ffi.dlopen(name)
        except OSError:
            continue
    raise OSError("no libcrypto")


def _evp() -> Any:
    """(ffi, lib) once OpenSSL's EVP agrees with ``cryptography`` on XTS and CBC, else False."""
    global _EVP
    if _EVP is None:
        _EVP = False
        try:
            evp = _load_evp()
            key, data, ivs = bytes(range(64)), bytes(range(256)) * 4, bytes(range(32))
            for chain, k in (("xts", key), ("cbc", key[:32])):
                ct = _evp_units(evp, chain, k, data, ivs, 512, True)
                if ct != _cipher_units(chain, k, data, ivs, 512, True) or \
                        _evp_units(evp, chain, k, ct, ivs, 512, False) != data:
                    return _EVP
            _EVP = evp
        except Exception:   # no cffi, no libcrypto, another OpenSSL: the public path
            pass
    return _EVP


def _evp_units(evp: Any, chain: str, key: bytes, data, ivs, unit: int,
               encrypt: bool) -> bytearray:
    ffi, lib = evp
    n = len(data) // unit
    out = bytearray(memoryview(data)[:n * unit])     # worked on in place
    if not n:
        return out
    cipher = getattr(lib, f"EVP_aes_{len(key) * 4 if chain == 'xts' else len(key) * 8}_{chain}")
    ctx = lib.EVP_CIPHER_CTX_new()
    if ctx == ffi.NULL:
        raise MemoryError("EVP_CIPHER_CTX_new")
    try:
        if lib.EVP_CipherInit_ex(ctx, cipher(), ffi.NULL, bytes(key), ffi.NULL, int(encrypt)) != 1:
            raise NotSupported(f"OpenSSL refused the aes-{chain} key")
        lib.EVP_CIPHER_CTX_set_padding(ctx, 0)
        buf = ffi.cast("unsigned char *", ffi.from_buffer(out))
        iv = ffi.cast("const unsigned char *", ffi.from_buffer(ivs))
        got = ffi.new("int *")
        init, update, null = lib.EVP_CipherInit_ex, lib.EVP_CipherUpdate, ffi.NULL
        ok = 1
        for i, pos in zip(range(0, 16 * n, 16), range(0, unit * n, unit)):
            p = buf + pos
            ok &= init(ctx, null, null, null, iv + i, -1) & update(ctx, p, got, p, unit)
        if ok != 1 or got[0] != unit:
            raise NotSupported(f"OpenSSL failed on aes-{chain} data units of {unit} bytes")
    finally:
        lib.EVP_CIPHER_CTX_free(ctx)
    return out


def _cipher_units(chain: str, key: bytes, data, ivs, unit: int, encrypt: bool) -> bytearray:
    Cipher, algorithms, modes = _cryptography()
    aes, mode = algorithms.AES(key), modes.XTS if chain == "xts" else modes.CBC
    mv, iv = memoryview(data), bytes(ivs)
    out = bytearray(len(mv) // unit * unit)
    o = memoryview(out)
    for i, pos in enumerate(range(0, len(out), unit)):
        c = Cipher(aes, mode(iv[16 * i:16 * i + 16]))
        ctx = c.encryptor() if encrypt else c.decryptor()
        o[pos:pos + unit] = ctx.update(mv[pos:pos + unit])
    return out


def aes_units(chain: str, key: bytes, data, ivs, unit: int, encrypt: bool) -> bytearray:
    """AES-``chain`` ('xts' or 'cbc') over ``len(data) // unit`` data units of ``unit`` bytes,
    unit *i* with the 16-byte IV ``ivs[16 * i:16 * i + 16]`` (``ivs``: any buffer)."""
    if len(ivs) < len(data) // unit * 16:
        raise ValueError(f"{len(ivs)} bytes of IVs for {len(data) // unit} data units")
    evp = _evp()
    if evp:
        return _evp_units(evp, chain, key, data, ivs, unit, encrypt)
    return _cipher_units(chain, key, data, ivs, unit, encrypt)

