"""VirtualBox's CRYPT filter (VDFilterCrypt.cpp): AES-XTS-128 or -256 over the whole disk, one
XTS unit per 512-byte data unit, tweak = the unit's number in the disk (plain64). The DEK comes
from the key store (``KeyStore``: unlocked with the passphrase) or a new key store is made
(``CreateKeyStore`` = 1, with ``Algorithm``), as cryptCreate decides.

Where vdgui differs: a data unit whose stored bytes are all zero reads as zeroes (a hole, or the
part of a block nothing was ever written to); VirtualBox decrypts it too (docs/design-encryption.md,
unknown 3)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .. import secrets
from ..config import ConfigKey, KeyFlag, ValueType
from ..errors import InvalidArgument, WrongPassphrase
from ..filter import Filter, FilterBackend, FilterCap, check_units
from ..secrets import SecretRequest
from .keystore_layout import ALGORITHMS, MAX_ITERATIONS

if TYPE_CHECKING:  # pragma: no cover
    from .keystore import KeyStore

DATA_UNIT = 512
NAME = "CRYPT"
KIND = "vbox-crypt"         # SecretRequest.kind


class CryptFilter(Filter):
    data_unit = DATA_UNIT

    def __init__(self, keystore: KeyStore, dek: bytes, key_id: str, created: bool):
        self.backend = CRYPT
        self.keystore = keystore
        self.key_id = key_id
        self.created = created
        from .cipher import XtsUnits  # AES on first use, not when the table loads
        self._units = XtsUnits(dek, DATA_UNIT)

    def decode(self, offset: int, buf: memoryview) -> None:
        check_units(self, offset, len(buf))
        self._units.decrypt(offset, buf)

    def encode(self, offset: int, buf: memoryview) -> None:
        check_units(self, offset, len(buf))
        self._units.encrypt(offset, buf)

    def info(self) -> dict:
        return {"name": NAME, **self.keystore.summary(), "key_id": self.key_id}

    def properties(self) -> dict[str, str]:
        return {"KeyId": self.key_id, "KeyStore": self.keystore.encode()}

    def rewrap(self, location: str = "", *, iterations: int | None = None) -> KeyStore:
        """A key store for the same DEK under the provider's new passphrase (the data stays as
        it is: VirtualBox's change of password). The filter keeps the new key store."""
        from .keystore import KeyStore
        pw = secrets.new_passphrase(SecretRequest(location or "CRYPT/KeyStore", KIND,
                                                  "new passphrase"))
        ks, _dek = KeyStore.create(pw.reveal(), self.keystore.cipher, self._units.key,
                                   iterations=iterations)
        self.keystore = ks
        return ks


def _open(config: dict, location: str) -> CryptFilter:
    from .keystore import KeyStore  # the key store's code (hashes, base64) when a filter opens
    where = location or "CRYPT/KeyStore"
    key_id = str(config.get("KeyId") or "")
    store = config.get("KeyStore")
    if store:
        ks = KeyStore.decode(store, f"{where}: CRYPT/KeyStore")

        def attempt(pw: bytes) -> bytearray | None:
            try:
                return bytearray(ks.unlock(pw, where))
            except WrongPassphrase:
                return None

        found = secrets.unlock(SecretRequest(where, KIND), attempt, (KIND, ks.build()))
        return CryptFilter(ks, bytes(found), key_id, False)
    if not config.get("CreateKeyStore"):
        raise InvalidArgument("filter CRYPT needs KeyStore, or CreateKeyStore=1 with Algorithm")
    algo = config.get("Algorithm")
    if not algo:
        raise InvalidArgument("filter CRYPT: CreateKeyStore needs Algorithm "
                              f"({' or '.join(ALGORITHMS)})")
    pw = secrets.new_passphrase(SecretRequest(where, KIND, "new passphrase"))
    ks, dek = KeyStore.create(pw.reveal(), algo, iterations=config.get("Iterations") or None)
    return CryptFilter(ks, dek, key_id, True)


CRYPT = FilterBackend(
    name=NAME,
    description="VirtualBox disk encryption (AES-XTS, key store in the media registry)",
    caps=FilterCap.READ | FilterCap.WRITE | FilterCap.SECRET | FilterCap.KEYSTORE,
    config_keys=(
        ConfigKey("Algorithm", None, ValueType.STRING, choices=tuple(ALGORITHMS),
                  label="Cipher", description="cipher of a new key store"),
        ConfigKey("KeyId", None, ValueType.STRING, label="Key ID",
                  description="name VirtualBox asks the passphrase under (CRYPT/KeyId)"),
        ConfigKey("CreateKeyStore", "0", ValueType.INTEGER, minimum=0, maximum=1,
                  label="Create key store", description="make a new key and key store"),
        ConfigKey("KeyStore", None, ValueType.STRING, label="Key store",
                  description="the base64 key store (CRYPT/KeyStore)"),
        ConfigKey("Iterations", None, ValueType.INTEGER, KeyFlag.EXPERT, minimum=1,
                  maximum=MAX_ITERATIONS, label="PBKDF2 iterations",
                  description="for a new key store (default: what takes 250 ms here, as "
                              "VirtualBox measures it)"),
    ),
    opener=_open,
)

__all__ = ["CRYPT", "DATA_UNIT", "CryptFilter"]
