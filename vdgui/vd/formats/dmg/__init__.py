"""DMG backend: Apple UDIF disk images (read-only), as written by hdiutil.

Layout (Apple's UDIF as documented publicly; VirtualBox's DMG.cpp reads the same):
  * the 512-byte ``koly`` trailer at the end of the file (big-endian) locates the data fork and
    the XML property list;
  * the plist's ``resource-fork/blkx`` array holds one ``mish`` block table per partition;
  * each ``mish`` lists chunks: zero-fill, raw, ignore, ADC, zlib (UDZO), bzip2 (UDBZ),
    LZFSE (ULFO, when the ``lzfse`` module is installed), LZMA (ULMO), comments and a terminator.
Caps (as qemu): chunk ≤ 64 MiB decompressed and compressed, plist ≤ 16 MiB. Beyond qemu: the
virtual size is at most what the chunk tables can describe (MAX_SECTORS); no two chunks may
share compressed bytes (a table repeating one chunk would multiply the work of reading it);
every decompressor, LZFSE included, stops at the chunk's declared size; decompressed chunks
are cached within one process-wide budget (CACHE_BUDGET), however many times a file is open.
"""
from __future__ import annotations

from ...backend import Backend, Cap, DeviceType, FileExtension, ProbeInput, lazy_exports


class DmgBackend(Backend):
    name = "DMG"
    description = "Apple disk image (UDIF), read-only"
    aliases = ("dmg", "udif")
    caps = Cap.FILE | Cap.VFS
    extensions = (FileExtension("dmg", DeviceType.OPTICAL),)
    operations = frozenset()
    impl_module = f"{__name__}.image"

    def probe(self, src: ProbeInput) -> int:
        if src.size >= 512 and src.tail[-512:-508] == b"koly":
            return 100
        return 0


BACKEND = DmgBackend()
__getattr__ = lazy_exports(__name__, "image", "layout")
