"""LUKS backend: qemu's raw ``luks`` container, a LUKS1 or LUKS2 header and key material followed
by the encrypted payload (docs/design-encryption.md; qemu crypto/block-luks.c, block/crypto.c).

The disk is the payload: from the header's payload offset to the end of the file (LUKS2: the
segment's size when fixed). Data units are 512 bytes (LUKS1) or the segment's sector size
(LUKS2), IVs count 512-byte sectors from the payload's start (plus LUKS2's iv_tweak). Every
sector holds data: the file's holes decrypt to noise, as in qemu, so a new image is not
zero-initialised (a copy writes its zeroes). Created images are LUKS1 with aes-xts-plain64 and
sha256, as qemu-img makes them. Opening for data asks the passphrase provider
(:mod:`vdgui.vd.secrets`); an info-only open reads the header alone.
"""
from __future__ import annotations

from typing import ClassVar

from ...backend import Backend, Cap, FileExtension, ImageFlags, Operation, ProbeInput, lazy_exports
from ...config import ConfigKey, KeyFlag, ValueType
from ...crypto import DEFAULT_ITER_TIME_MS, is_luks


class LuksBackend(Backend):
    name = "LUKS"
    description = "LUKS encrypted container (qemu's luks format)"
    aliases = ("luks",)
    caps = Cap.CREATE_FIXED | Cap.FILE
    extensions = (FileExtension("luks"),)
    owns_extensions = True
    operations = frozenset({Operation.WRITE, Operation.CREATE})
    create_flags = ImageFlags.FIXED
    size_granularity = 512
    max_size = (1 << 63) - (4 << 20)
    encryptions: ClassVar[dict[str, dict[str, str]]] = {"luks": {}}
    needs_passphrase = True
    impl_module = f"{__name__}.image"
    config_keys = (
        ConfigKey("IterTime", str(DEFAULT_ITER_TIME_MS), ValueType.INTEGER,
                  KeyFlag.CREATEONLY | KeyFlag.EXPERT,
                  "time the passphrase's key derivation takes here (qemu's iter-time)",
                  minimum=1, maximum=60000, label="Key derivation time", unit="ms"),
    )

    def probe(self, src: ProbeInput) -> int:
        return 100 if is_luks(src.head) else 0


BACKEND = LuksBackend()
__getattr__ = lazy_exports(__name__, "image")
