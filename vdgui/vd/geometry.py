"""Disk geometry (cylinders/heads/sectors) as VirtualBox and the VHD specification compute it."""
from __future__ import annotations

from typing import NamedTuple

from .errors import InvalidArgument


class Geometry(NamedTuple):
    cylinders: int
    heads: int
    sectors: int

    def __str__(self) -> str:
        return f"{self.cylinders}/{self.heads}/{self.sectors}"

    @property
    def is_zero(self) -> bool:
        return self.cylinders == 0 and self.heads == 0 and self.sectors == 0

    @property
    def size(self) -> int:
        return self.cylinders * self.heads * self.sectors * 512

    @classmethod
    def parse(cls, text: str) -> Geometry:
        try:
            c, h, s = (int(x) for x in text.replace("/", ",").split(","))
        except ValueError:
            raise InvalidArgument(
                f"geometry must be C,H,S (e.g. 1024,16,63), found {text!r}"
            ) from None
        if not (0 <= c <= 16383 * 16 and 0 <= h <= 255 and 0 <= s <= 255):
            raise InvalidArgument(f"geometry {text!r} out of range (C<=262128, H<=255, S<=255)")
        return cls(c, h, s)


ZERO_GEOMETRY = Geometry(0, 0, 0)


def vbox_pchs(size: int) -> Geometry:
    """VirtualBox's default physical geometry: 16 heads, 63 sectors, at most 16383 cylinders."""
    cylinders = min(size // 512 // (16 * 63), 16383)
    return Geometry(max(cylinders, 1 if size else 0), 16, 63)


def vbox_lchs(size: int) -> Geometry:
    """BIOS-style LBA-assisted translation (what VirtualBox's BIOS picks when LCHS is 0/0/0)."""
    mib = size // (1024 * 1024)
    heads = (
        16
        if mib <= 504
        else 32
        if mib <= 1008
        else 64
        if mib <= 2016
        else 128
        if mib <= 4032
        else 255
    )
    cylinders = min(size // 512 // (heads * 63), 1024)
    return Geometry(max(cylinders, 1 if size else 0), heads, 63)


def vhd_chs(size: int) -> Geometry:
    """CHS as the VHD specification (Appendix: CHS calculation) computes it."""
    total = size // 512
    if total > 65535 * 16 * 255:
        total = 65535 * 16 * 255
    if total >= 65535 * 16 * 63:
        spt, heads = 255, 16
        cth = total // spt
    else:
        spt = 17
        cth = total // spt
        heads = (cth + 1023) // 1024
        if heads < 4:
            heads = 4
        if cth >= heads * 1024 or heads > 16:
            spt, heads = 31, 16
            cth = total // spt
        if cth >= heads * 1024:
            spt, heads = 63, 16
            cth = total // spt
    return Geometry(cth // heads, heads, spt)
