"""VirtualBox's disk key store (``CRYPT/KeyStore``, base64 in the media registry): 250 bytes,
packed, little-endian. Follows VirtualBox ``src/VBox/Storage/VDKeyStore.cpp`` (struct
VDKeyStore, VD_KEYSTORE_MAGIC, VD_KEYSTORE_VERSION); checked against two published key stores
(docs/design-encryption.md §1.5)."""
from __future__ import annotations

from construct import Bytes, Int16ul, Int32ul, Struct

MAGIC = 0x454E4353            # "SCNE" on disk
VERSION = 0x0100
SIZE = 250
# the declaration's (the CRYPT filter's config keys): known without loading the key store code
ALGORITHMS = {"AES-XTS128-PLAIN64": 32, "AES-XTS256-PLAIN64": 64}   # name -> DEK bytes
# hostile key stores: VirtualBox writes 2000..~10^6; each count is checked before any work
MAX_ITERATIONS = 10_000_000

KeyStoreStruct = Struct(
    "magic" / Int32ul,                 # MAGIC
    "version" / Int16ul,
    "cipher" / Bytes(32),              # NUL-terminated: AES-XTS128-PLAIN64, AES-XTS256-PLAIN64
    "kdf" / Bytes(32),                 # NUL-terminated: PBKDF2-SHA256 (-SHA1, -SHA512 read)
    "key_size" / Int32ul,              # cbKey: DEK bytes (32: XTS-128, 64: XTS-256)
    "dek_digest" / Bytes(32),
    "digest_size" / Int32ul,           # cbDekDigest
    "digest_salt" / Bytes(32),
    "digest_iterations" / Int32ul,
    "dek_salt" / Bytes(32),
    "dek_iterations" / Int32ul,
    "dek_enc_size" / Int32ul,          # cbDekEnc
    "dek_enc" / Bytes(64),
)
assert KeyStoreStruct.sizeof() == SIZE

__all__ = ["ALGORITHMS", "MAGIC", "MAX_ITERATIONS", "SIZE", "VERSION", "KeyStoreStruct"]
