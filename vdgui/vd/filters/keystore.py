"""VirtualBox's disk key store: decode, unlock, create, re-wrap (VDKeyStore.cpp's behaviour).

The key store holds the data encryption key (DEK) wrapped by a key derived from the passphrase:
``kek = PBKDF2(hash, passphrase, dek_salt, dek_iterations, key_size)``, ``DEK = AES-XTS(kek,
tweak 0)`` decryption of ``dek_enc``; the passphrase is right when
``PBKDF2(hash, DEK, digest_salt, digest_iterations, digest_size)`` equals ``dek_digest``.
It is not a secret (VirtualBox keeps it in clear in its XML); the passphrase and the DEK are.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import time
from dataclasses import dataclass

from construct import ConstructError

from ..errors import CorruptImage, InvalidArgument, WrongPassphrase
from .keystore_layout import ALGORITHMS, MAGIC, MAX_ITERATIONS, SIZE, VERSION, KeyStoreStruct

KDFS = {"PBKDF2-SHA1": "sha1", "PBKDF2-SHA256": "sha256", "PBKDF2-SHA512": "sha512"}
NEW_KDF = "PBKDF2-SHA256"
DIGEST_ITERATIONS = 20000       # VD_KEYSTORE_ITERATIONS_MIN: digest count, DEK count minimum
BENCHMARK_MS = 250              # VD_KEYSTORE_PBKDF2_COMPUTE_MAX: DEK count from a benchmark
B64_LINE = 64                   # RTBase64Encode's line length


def _text(raw: bytes, field: str, where: str) -> str:
    name = raw.split(b"\0", 1)[0]
    try:
        return name.decode("ascii")
    except UnicodeDecodeError:
        raise CorruptImage("not ASCII text", path=where, field=field,
                           found=name[:32].hex()) from None


@dataclass
class KeyStore:
    cipher: str
    kdf: str
    key_size: int
    dek_digest: bytes
    digest_size: int
    digest_salt: bytes
    digest_iterations: int
    dek_salt: bytes
    dek_iterations: int
    dek_enc_size: int
    dek_enc: bytes
    version: int = VERSION
    raw_cipher: bytes | None = None     # the 32-byte fields as read (byte-exact re-encoding)
    raw_kdf: bytes | None = None

    # -- bytes ----------------------------------------------------------------------------
    @classmethod
    def parse(cls, raw: bytes, where: str = "key store") -> KeyStore:
        """The 250-byte structure, validated before any key derivation (hostile input)."""
        if len(raw) != SIZE:
            raise CorruptImage("a VirtualBox key store is 250 bytes", path=where,
                               expected=SIZE, found=len(raw))
        try:
            s = KeyStoreStruct.parse(raw)
        except ConstructError as exc:     # pragma: no cover - fixed-size fields
            raise CorruptImage(f"cannot parse: {exc}", path=where) from None
        if s.magic != MAGIC:
            raise CorruptImage("not a VirtualBox key store", path=where, field="magic",
                               offset=0, expected="SCNE", found=raw[:4].hex())
        if s.version != VERSION:
            raise CorruptImage("unsupported key store version", path=where, field="version",
                               offset=4, expected=f"{VERSION:#06x}", found=f"{s.version:#06x}")
        ks = cls(
            cipher=_text(s.cipher, "cipher", where), kdf=_text(s.kdf, "kdf", where),
            key_size=s.key_size, dek_digest=s.dek_digest, digest_size=s.digest_size,
            digest_salt=s.digest_salt, digest_iterations=s.digest_iterations,
            dek_salt=s.dek_salt, dek_iterations=s.dek_iterations,
            dek_enc_size=s.dek_enc_size, dek_enc=s.dek_enc, version=s.version,
            raw_cipher=s.cipher, raw_kdf=s.kdf,
        )
        ks.validate(where)
        return ks

    def validate(self, where: str = "key store") -> None:
        if self.cipher not in ALGORITHMS:
            raise CorruptImage("unsupported cipher", path=where, field="cipher",
                               expected=" or ".join(ALGORITHMS), found=repr(self.cipher))
        if self.kdf not in KDFS:
            raise CorruptImage("unsupported key derivation", path=where, field="kdf",
                               expected=" or ".join(KDFS), found=repr(self.kdf))
        want = ALGORITHMS[self.cipher]
        if self.key_size != want:
            raise CorruptImage(f"key size does not fit {self.cipher}", path=where,
                               field="cbKey", expected=want, found=self.key_size)
        if not 1 <= self.digest_size <= 32:
            raise CorruptImage("bad DEK digest size", path=where, field="cbDekDigest",
                               expected="1..32", found=self.digest_size)
        if self.dek_enc_size != self.key_size:
            raise CorruptImage("bad encrypted DEK size", path=where, field="cbDekEnc",
                               expected=self.key_size, found=self.dek_enc_size)
        for name, n in (("cDekIterations", self.dek_iterations),
                        ("cDekDigestIterations", self.digest_iterations)):
            if not 1 <= n <= MAX_ITERATIONS:
                raise CorruptImage("PBKDF2 iteration count out of range", path=where,
                                   field=name, expected=f"1..{MAX_ITERATIONS}", found=n)

    def build(self) -> bytes:
        def field(raw: bytes | None, text: str) -> bytes:
            return raw if raw is not None else text.encode("ascii").ljust(32, b"\0")

        return KeyStoreStruct.build(dict(
            magic=MAGIC, version=self.version,
            cipher=field(self.raw_cipher, self.cipher), kdf=field(self.raw_kdf, self.kdf),
            key_size=self.key_size, dek_digest=self.dek_digest, digest_size=self.digest_size,
            digest_salt=self.digest_salt, digest_iterations=self.digest_iterations,
            dek_salt=self.dek_salt, dek_iterations=self.dek_iterations,
            dek_enc_size=self.dek_enc_size, dek_enc=self.dek_enc,
        ))

    # -- base64, as in the media registry ------------------------------------------------
    @classmethod
    def decode(cls, text: str | bytes, where: str = "key store") -> KeyStore:
        """The registry's base64 value; line breaks (LF, CRLF) and spaces are ignored."""
        if isinstance(text, str):
            text = text.encode("ascii", "replace")
        compact = b"".join(text.split())
        if len(compact) > 4 * SIZE:
            raise CorruptImage("key store text too long", path=where,
                               expected=f"about {4 * ((SIZE + 2) // 3)} characters",
                               found=len(compact))
        try:
            raw = base64.b64decode(compact, validate=True)
        except (binascii.Error, ValueError):
            raise CorruptImage("key store is not valid base64", path=where) from None
        return cls.parse(raw, where)

    def encode(self) -> str:
        """Base64 in 64-character lines joined by LF, as VirtualBox writes it on Linux."""
        b64 = base64.b64encode(self.build()).decode("ascii")
        return "\n".join(b64[i:i + B64_LINE] for i in range(0, len(b64), B64_LINE))

    # -- keys -------------------------------------------------------------------------------
    def _hash(self) -> str:
        return KDFS[self.kdf]

    def unlock(self, passphrase: bytes, where: str = "key store") -> bytes:
        """The DEK; :class:`WrongPassphrase` when the digest does not match."""
        self.validate(where)
        pw = _c_string(passphrase)
        kek = hashlib.pbkdf2_hmac(self._hash(), pw, self.dek_salt, self.dek_iterations,
                                  self.key_size)
        from .cipher import xts_decrypt  # AES on first use (cryptography: ~10 ms to import)
        dek = xts_decrypt(kek, bytes(16), self.dek_enc[:self.dek_enc_size])
        check = hashlib.pbkdf2_hmac(self._hash(), dek, self.digest_salt,
                                    self.digest_iterations, self.digest_size)
        if not hmac.compare_digest(check, self.dek_digest[:self.digest_size]):
            raise WrongPassphrase("wrong passphrase", path=where)
        return dek

    @classmethod
    def create(cls, passphrase: bytes, cipher: str, dek: bytes | None = None, *,
               iterations: int | None = None) -> tuple[KeyStore, bytes]:
        """A new key store for ``dek`` (a new random one when None), as vdKeyStoreCreate: DEK
        count from a 250 ms benchmark (at least 20000), digest count 20000. Returns it and the
        DEK."""
        if cipher not in ALGORITHMS:
            raise InvalidArgument(f"unknown CRYPT algorithm {cipher!r} "
                                  f"(known: {', '.join(ALGORITHMS)})")
        size = ALGORITHMS[cipher]
        if dek is None:
            dek = os.urandom(size)
        if len(dek) != size:
            raise InvalidArgument(f"{cipher} needs a {size}-byte key, found {len(dek)}")
        pw = _c_string(passphrase)
        if iterations is None:
            iterations = _benchmark(len(pw), size)
        if not 1 <= iterations <= MAX_ITERATIONS:
            raise InvalidArgument(f"PBKDF2 iteration count must be 1..{MAX_ITERATIONS}, "
                                  f"found {iterations}")
        hname = KDFS[NEW_KDF]
        digest_salt, dek_salt = os.urandom(32), os.urandom(32)
        digest = hashlib.pbkdf2_hmac(hname, dek, digest_salt, DIGEST_ITERATIONS, 32)
        kek = hashlib.pbkdf2_hmac(hname, pw, dek_salt, iterations, size)
        from .cipher import xts_encrypt
        enc = xts_encrypt(kek, bytes(16), dek)
        ks = cls(cipher=cipher, kdf=NEW_KDF, key_size=size, dek_digest=digest, digest_size=32,
                 digest_salt=digest_salt, digest_iterations=DIGEST_ITERATIONS,
                 dek_salt=dek_salt, dek_iterations=iterations, dek_enc_size=size,
                 dek_enc=enc.ljust(64, b"\0"))
        return ks, dek

    def summary(self) -> dict:
        """What ``info`` shows without a passphrase."""
        return {"format": "vbox-crypt", "cipher": self.cipher, "key_bits": self.key_size * 8,
                "hash": KDFS[self.kdf],
                "keyslots": [{"slot": 0, "active": True, "kdf": "pbkdf2",
                              "hash": KDFS[self.kdf], "iterations": self.dek_iterations}],
                "digest_iterations": self.digest_iterations}


def _c_string(passphrase: bytes) -> bytes:
    """VirtualBox passes the passphrase as a C string: it ends at the first NUL."""
    if not passphrase:
        raise InvalidArgument("the passphrase is empty")
    return bytes(passphrase).split(b"\0", 1)[0]


def _benchmark(pw_len: int, size: int) -> int:
    """vdKeyStoreIterationCountBenchmark: how many 20000-iteration steps fit in 250 ms."""
    count = 0
    deadline = time.monotonic() + BENCHMARK_MS / 1000
    while time.monotonic() < deadline and count < MAX_ITERATIONS - DIGEST_ITERATIONS:
        hashlib.pbkdf2_hmac("sha256", bytes(pw_len), bytes(32), DIGEST_ITERATIONS, size)
        count += DIGEST_ITERATIONS
    return max(DIGEST_ITERATIONS, count)


__all__ = ["ALGORITHMS", "KeyStore"]
