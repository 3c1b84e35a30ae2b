"""CUE/BIN backend: optical images described by a cue sheet (read-only).

The cue sheet names one or more BIN files (``FILE "x.bin" BINARY``) and their tracks
(``TRACK nn MODE1/2048|MODE1/2352|MODE2/2336|MODE2/2352|AUDIO``) with ``INDEX nn mm:ss:ff``
positions (75 frames a second). The disk is the concatenation of the BIN files; each track is a
region (VirtualBox's VDQueryRegions) with its block size and data form.
"""
from __future__ import annotations

import re

from ...backend import Backend, Cap, DeviceType, FileExtension, ProbeInput, lazy_exports

MAX_CUE = 1 << 20


class CueBackend(Backend):
    name = "CUE"
    description = "CD/DVD image described by a cue sheet (CUE/BIN), read-only"
    aliases = ("cue", "bin")
    caps = Cap.FILE | Cap.VFS
    extensions = (FileExtension("cue", DeviceType.OPTICAL),)
    operations = frozenset()
    impl_module = f"{__name__}.image"

    def probe(self, src: ProbeInput) -> int:
        head = src.head[:4096]
        if src.size > MAX_CUE or b"\x00" in head:
            return 0
        text = head.decode("latin-1").upper()
        if re.search(r"^\s*FILE\s+.+\s+(BINARY|MOTOROLA)\s*$", text, re.M) and "TRACK" in text:
            return 90 if src.ext == "cue" else 70
        return 0


BACKEND = CueBackend()
__getattr__ = lazy_exports(__name__, "image")
