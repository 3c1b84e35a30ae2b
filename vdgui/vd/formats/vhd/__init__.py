"""VHD backend: Microsoft's Virtual Hard Disk (Connectix / Virtual PC), qemu's "vpc".

Follows the *Virtual Hard Disk Image Format Specification* (Microsoft, version 1.0, 2006) and
VirtualBox's behaviour (VHD.cpp): fixed, dynamic and differencing disks.

Layout (all integers big-endian)::

  fixed:    [data: current size bytes][footer 512]
  dynamic:  [footer copy 512][dynamic header 1024][BAT][parent locators...]
            [block: sector bitmap (padded to 512) + data]... [footer 512]

* The **footer** (512 bytes, cookie ``conectix``) ends every file; dynamic and differencing disks
  keep a copy at offset 0. Checksums (one's complement of the byte sum, checksum field zeroed)
  are verified on open: a damaged footer with a sound copy uses the copy; both are reported by
  ``check`` and rewritten by ``check(repair=True)``.
* The **BAT** holds one 32-bit sector number per block (0xFFFFFFFF = not allocated). Each block
  starts with a **sector bitmap** (most significant bit = first sector): allocation is per
  sector, so ``block_status`` reports per-sector runs and a differencing disk reads unmarked
  sectors from its parent.
* **Size**: as qemu decides it, the footer's current size for creators ``win ``, ``qem2``,
  ``d2v ``, ``CTXS``, ``tap\\0``, for fixed and differencing disks and for the maximum geometry
  65535/16/255; the CHS geometry (C*H*S*512) for the others (``vpc ``, ``vbox``, ``qemu``...).
  Dynamic images we create are rounded up to the next size the CHS geometry describes exactly
  (as qemu and Virtual PC do), so every reader sees the same size; fixed images keep the exact
  size (Azure-style whole-MiB disks): when no CHS geometry describes it exactly, the footer
  carries the maximum geometry 65535/16/255 (as qemu's ``force_size`` does), which makes every
  qemu version (7.2 sizes fixed disks of other creators by geometry too) use the current size.
* **Parent locators**: W2ru (relative, UTF-16LE), W2ku (absolute, UTF-16LE), Wi2r/Wi2k (ANSI,
  deprecated), MacX (UTF-8 file URL) are read; children are created with W2ku + W2ru (data
  space in bytes, as Virtual PC, Hyper-V and VirtualBox store it), the parent's UTF-16BE file
  name, UUID and modification time.

Limits (checked before anything is allocated): footer/header fields against the file size, block
size a power of two in [512 B, 256 MiB], BAT entries inside the file, locators <= 64 KiB.
UUIDs are read as Windows GUIDs (``bytes_le``), as VirtualBox and Windows show them.
"""
from __future__ import annotations

from ...backend import (
    Backend,
    Cap,
    DeviceType,
    FileExtension,
    ImageFlags,
    Operation,
    ProbeInput,
    lazy_exports,
)

# what the declaration and its probe need, without the layout (construct) or the image code
FOOTER_SIZE = 512
FOOTER_CHECKSUM_AT = 64
COOKIE = b"conectix"
TYPE_FIXED, TYPE_DYNAMIC, TYPE_DIFF = 2, 3, 4
TYPE_NAMES = {TYPE_FIXED: "fixed", TYPE_DYNAMIC: "dynamic", TYPE_DIFF: "differencing"}
SECTOR = 512
MAX_VIRTUAL = 2040 << 30                  # qemu's and Hyper-V's VHD limit (BAT sector numbers)


def checksum(buf: bytes | bytearray, at: int) -> int:
    """The VHD checksum: one's complement of the byte sum, the 4-byte field at ``at`` taken as 0."""
    mv = memoryview(buf)
    total = sum(mv[:at]) + sum(mv[at + 4 :])
    return (~total) & 0xFFFFFFFF


class VhdBackend(Backend):
    name = "VHD"
    description = "Virtual Hard Disk (Virtual PC / Hyper-V)"
    aliases = ("vpc",)
    qemu_name = "vpc"
    caps = (Cap.UUID | Cap.DIFF | Cap.FILE | Cap.CREATE_FIXED | Cap.CREATE_DYNAMIC | Cap.ASYNC
            | Cap.VFS | Cap.PREFERRED)
    extensions = (FileExtension("vhd", DeviceType.HARD_DISK),)
    owns_extensions = True
    operations = frozenset({Operation.WRITE, Operation.CREATE, Operation.COMPACT, Operation.RESIZE,
                            Operation.CHECK, Operation.REPAIR, Operation.RELINK,
                            Operation.DISCARD})
    create_flags = ImageFlags.FIXED
    max_size = MAX_VIRTUAL
    size_granularity = SECTOR
    can_shrink = True
    impl_module = f"{__name__}.impl"

    def probe(self, src: ProbeInput) -> int:
        best = 0
        for raw in (src.tail[-FOOTER_SIZE:] if len(src.tail) >= FOOTER_SIZE else b"",
                    src.head[:FOOTER_SIZE] if len(src.head) >= FOOTER_SIZE else b"",
                    (src.tail[-(FOOTER_SIZE - 1):] + b"\x00")
                    if len(src.tail) >= FOOTER_SIZE - 1 else b""):
            if len(raw) == FOOTER_SIZE and raw[:8] == COOKIE:
                ok = int.from_bytes(raw[64:68], "big") == checksum(raw, FOOTER_CHECKSUM_AT)
                t = int.from_bytes(raw[60:64], "big")
                best = max(best, 100 if ok and t in TYPE_NAMES else 85)
        return best


BACKEND = VhdBackend()
__getattr__ = lazy_exports(__name__, "impl", "image", "fields", "layout")
