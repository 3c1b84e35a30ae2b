"""QCOW2 encryption (qcow2.txt "crypt_method", "Full disk encryption header pointer"; qemu
block/qcow2.c qcow2_co_encdec, crypto/block-luks.c, crypto/block-qcow.c;
docs/design-encryption.md §1.4).

* crypt_method 2, LUKS: a LUKS1 header and its key material in refcounted clusters named by
  the header extension 0x0537be77 (offset, length). Guest data clusters are encrypted in
  512-byte sectors whose IV is the sector's HOST offset / 512: a cluster moved in the file must
  be re-encrypted. Tables are plain; zero and unallocated clusters are not encrypted.
* crypt_method 1, legacy AES: AES-128-CBC keyed by the passphrase's first 16 bytes, IV plain64
  of the GUEST sector. Weak by design (qemu's words); read-only here, with a warning.
"""
from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from ...align import align_down, align_up
from ...backend import OpenFlags
from ...errors import NotSupported
from ...secrets import SecretRequest, unlock
from . import layout as L
from .state import Bytes, Qcow2State

if TYPE_CHECKING:  # LUKS and the ciphers load when an image is encrypted
    from ...crypto import luks
    from ...crypto.cipher import SectorCipher

CRYPT_NONE, CRYPT_AES, CRYPT_LUKS = 0, 1, 2
SECTOR = 512
_WARNED: set[str] = set()
AES_WARNING = ("legacy QCOW2 AES encryption is weak (no key derivation, predictable IVs); "
               "read-only here: convert to a plain or LUKS-encrypted copy")


class CryptMixin(Qcow2State):
    """Encryption of a :class:`.image.Qcow2Image`'s data clusters."""

    crypt_method = CRYPT_NONE
    _crypt: SectorCipher | None = None
    luks_header: luks.LuksHeader | None = None
    crypt_offset = 0
    crypt_length = 0

    def _setup_crypt(self, method: int, key: bytes | None = None) -> None:
        """After the header and extensions are read: the encryption's header and, unless the
        open is for information only, its key (``key``: a new image's, already known)."""
        self.crypt_method = method
        if method == CRYPT_NONE:
            return
        if method == CRYPT_AES:
            self.encryption = {"format": "aes", "cipher": "aes-cbc-plain64", "key_bits": 128,
                               "warning": AES_WARNING}
            if not self.read_only:
                raise NotSupported(f"{self.location}: {AES_WARNING}")
            if not self.open_flags & OpenFlags.INFO:
                if self.location not in _WARNED:    # once, not once per read-ahead thread
                    import logging
                    _WARNED.add(self.location)
                    logging.getLogger(__name__).warning("%s: %s", self.location, AES_WARNING)
                self._crypt = unlock(SecretRequest(self.location, "qcow2-aes"), _aes_key)
            return
        if method != CRYPT_LUKS:
            raise NotSupported(f"{self.location}: unknown encryption method {method}",
                               field="crypt_method", offset=32, expected="0, 1 or 2",
                               found=method)
        ext = [d for t, d in self.extensions if t == L.EXT_CRYPTO]
        if len(ext) != 1 or len(ext[0]) < 16:
            raise self._corrupt("LUKS-encrypted image without its crypt header extension",
                                field="header extension 0x0537be77",
                                expected="one extension of 16 bytes", found=len(ext))
        off, length = struct.unpack_from(">QQ", ext[0])
        if off % self.cs or not length or off + length > self.fsize:
            raise self._corrupt("crypt header extension points outside the file",
                                field="header extension 0x0537be77",
                                expected=f"a cluster-aligned area inside {self.fsize} bytes",
                                found=f"{length} bytes at {off:#x}")
        self.crypt_offset, self.crypt_length = off, length
        from ...crypto import luks
        h = luks.parse(self._crypt_read, length, self.location)
        self.luks_header = h
        self.encryption = h.info()
        if h.sector_size != SECTOR:
            raise NotSupported(f"{self.location}: LUKS data units of {h.sector_size} bytes "
                               "in a qcow2 image", expected=SECTOR, found=h.sector_size)
        if key is None and not self.open_flags & OpenFlags.INFO:
            key = bytes(luks.unlock(h, self._crypt_read, self.location))
        if key is not None:
            self._crypt = h.data_cipher(key)

    def _crypt_read(self, off: int, n: int) -> bytes:
        n = max(0, min(n, self.crypt_length - off))
        return self.f.pread(self.crypt_offset + off, n)

    def _crypt_write(self, off: int, data: bytes) -> None:
        self.f.pwrite(self.crypt_offset + off, data)
        self.f.sync()

    def _cipher(self) -> SectorCipher:
        if self._crypt is None:
            raise NotSupported(f"{self.location}: encrypted; opened for its header only "
                               "(no passphrase)")
        return self._crypt

    # -- the data path ---------------------------------------------------------------------------
    def _decrypt_host(self, host: int, data: Bytes, guest: int) -> bytes:
        """``data`` read at ``host`` (guest offset ``guest``), decrypted; any alignment."""
        c = self._cipher()
        a = align_down(host, SECTOR)
        b = align_up(host + len(data), SECTOR)
        whole: Bytes = data
        if a != host or b != host + len(data):
            whole = self._data_file().pread(a, b - a)
            whole += bytes(b - a - len(whole))
        first = a // SECTOR if self.crypt_method == CRYPT_LUKS else (guest - (host - a)) // SECTOR
        out = c.decrypt(whole, first)
        return bytes(memoryview(out)[host - a:host - a + len(data)])

    def _write_data(self, host: int, data: Bytes) -> None:
        """Data written at ``host``: encrypted first when the image is (whole sectors)."""
        if self.crypt_method == CRYPT_NONE:
            self.f.pwrite(host, data)
            return
        c = self._cipher()
        if host % SECTOR or len(data) % SECTOR:
            a, b = align_down(host, SECTOR), align_up(host + len(data), SECTOR)
            buf = bytearray(self._decrypt_host(a, self.f.pread(a, b - a).ljust(b - a, b"\0"),
                                               0))
            buf[host - a:host - a + len(data)] = data
            host, data = a, buf
        self.f.pwrite(host, c.encrypt(data, host // SECTOR))

    def change_passphrase(self, iter_time_ms: int | None = None) -> int:
        self.require_writable()
        if self.crypt_method != CRYPT_LUKS or self.luks_header is None:
            raise NotSupported(f"{self.location}: not a LUKS-encrypted image")
        from ...crypto import luks
        return luks.change_passphrase(self.luks_header, self._crypt_read, self._crypt_write,
                                      self.location, iter_time_ms)

    def _wipe_crypt(self) -> None:
        if self._crypt is not None:
            self._crypt.wipe()


def _aes_key(pw: bytes) -> SectorCipher | None:
    """qemu's legacy key: the passphrase's first 16 bytes, zero padded. Nothing in the format
    can tell a wrong passphrase (it reads as noise): any passphrase opens."""
    from ...crypto.cipher import SectorCipher
    return SectorCipher("aes", "cbc-plain64", pw[:16].ljust(16, b"\0"))


def crypt_extension(offset: int, length: int) -> bytes:
    return struct.pack(">QQ", offset, length)
