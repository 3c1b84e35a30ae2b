"""The LUKS backend's image, open and create (its declaration and probe are the
package's)."""
from __future__ import annotations

from ...align import align_down, align_up
from ...backend import (
    Backend,
    CreateParams,
    ImageFlags,
    OpenFlags,
)
from ...config import parse_config
from ...crypto import luks
from ...crypto.cipher import SectorCipher
from ...errors import NotSupported
from ...fileimage import FileImage
from ...fileio import ImageFile
from ...geometry import vbox_pchs
from ...image import Alloc, FillFn
from ...secrets import SecretRequest, new_passphrase
from . import LuksBackend

SECTOR = 512


class LuksImage(FileImage):
    zero_init = False

    def __init__(self, backend: Backend, location: str, f: ImageFile, flags: OpenFlags) -> None:
        super().__init__(backend, location, f, flags.read_only)
        fsize = f.size()
        self.header = luks.parse(f.pread, fsize, location)
        h = self.header
        self.payload = h.payload_offset
        end = fsize if h.payload_size is None else min(fsize, self.payload + h.payload_size)
        self.size = max(0, align_down(end - self.payload, h.sector_size))
        self.block_size = h.sector_size
        self.flags = ImageFlags.FIXED
        self.pchs = vbox_pchs(self.size)
        self.encryption = h.info()
        self.cipher: SectorCipher | None = None
        if not flags & OpenFlags.INFO:
            mk = luks.unlock(h, f.pread, location)
            self.cipher = h.data_cipher(bytes(mk))

    def _need_key(self) -> SectorCipher:
        if self.cipher is None:
            raise NotSupported(f"{self.location}: opened for its header only (no passphrase)")
        return self.cipher

    def block_status(self, offset: int, length: int) -> list[tuple[int, int, Alloc]]:
        return [(offset, length, Alloc.DATA)]

    def _first_iv(self, offset: int) -> int:
        return offset // SECTOR + self.header.iv_tweak

    def _read_units(self, a: int, b: int) -> bytearray:
        c = self._need_key()
        raw = self.f.pread(self.payload + a, b - a)
        if len(raw) < b - a:
            raw += bytes(b - a - len(raw))
        return c.decrypt(raw, self._first_iv(a))

    def read(self, offset: int, length: int) -> bytes:
        u = self.block_size
        a, b = align_down(offset, u), align_up(offset + length, u)
        return bytes(memoryview(self._read_units(a, b))[offset - a:offset - a + length])

    def write(self, offset: int, data: bytes, fill: FillFn) -> None:
        self.require_writable()
        c = self._need_key()
        u = self.block_size
        a, b = align_down(offset, u), align_up(offset + len(data), u)
        buf: bytes | bytearray
        if a == offset and b == offset + len(data):
            buf = data
        else:                           # partial units: read, patch, encrypt whole units
            buf = bytearray(b - a)
            buf[:u] = self._read_units(a, a + u)
            if b - u > a:
                buf[b - a - u:] = self._read_units(b - u, b)
            buf[offset - a:offset - a + len(data)] = data
        self.f.pwrite(self.payload + a, c.encrypt(buf, self._first_iv(a)))

    def info(self) -> dict:
        return {"payload_offset": self.payload}

    # -- passphrases ---------------------------------------------------------------------------
    def change_passphrase(self, iter_time_ms: int | None = None) -> int:
        """Add a keyslot for the provider's new passphrase, then remove the slot the current
        passphrase opened (every slot it opens). Returns the new slot's index."""
        self.require_writable()

        def write(off: int, data: bytes) -> None:
            self.f.pwrite(off, data)
            self.f.sync()
        return luks.change_passphrase(self.header, self.f.pread, write, self.location,
                                      iter_time_ms)

    def close(self) -> None:
        try:
            super().close()
        finally:
            if self.cipher is not None:
                self.cipher.wipe()


def open_image(backend: LuksBackend, location: str, flags: OpenFlags = OpenFlags.NORMAL,
         config: dict | None = None) -> LuksImage:
    parse_config(backend.config_keys, config, owner=backend.name)
    return ImageFile(location, writable=not flags.read_only).hand_to(
        lambda f: LuksImage(backend, location, f, flags))


def create_image(backend: LuksBackend, p: CreateParams) -> LuksImage:
    if p.parent is not None:
        raise NotSupported("LUKS images cannot be differencing images")
    cfg = parse_config(backend.config_keys, p.config, creating=True, owner=backend.name)
    pw = new_passphrase(SecretRequest(p.location, "luks1", "new passphrase"))
    area, mk = luks.create1(pw.reveal(), iter_time_ms=cfg["IterTime"], where=p.location)
    f = ImageFile.create_temp(p.location)
    try:
        f.pwrite(0, area)
        f.truncate(len(area) + align_up(p.size, SECTOR))
        if p.progress:
            p.progress(p.size, p.size)
        f.sync()
        f.commit()
    except BaseException:
        f.abandon()
        raise
    img = LuksImage(backend, p.location, f, OpenFlags.INFO)
    img.read_only = False
    img.cipher = img.header.data_cipher(mk)
    return img

