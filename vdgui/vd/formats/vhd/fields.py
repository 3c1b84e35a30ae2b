"""Encodings of VHD fields: the one's-complement checksum, timestamps (seconds since 2000),
CHS geometry from a size, block bitmap runs, parent locator text (UTF-16, Mac URLs)."""
from __future__ import annotations

import os
import time
from urllib.parse import unquote

from ...align import align_up, ceil_div
from ...geometry import Geometry, vhd_chs
from ...image import Image
from . import checksum as checksum  # the declaration's (its probe checks footers)
from .layout import MAX_GEOMETRY, SECTOR, VHD_EPOCH


def _with_checksum(raw: bytes, at: int) -> bytes:
    b = bytearray(raw)
    b[at : at + 4] = checksum(b, at).to_bytes(4, "big")
    return bytes(b)


def vhd_time(unix: float | None = None) -> int:
    t = int(time.time() if unix is None else unix) - VHD_EPOCH
    return min(max(t, 0), 0xFFFFFFFF)


def _iso(ts: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(VHD_EPOCH + ts))


def round_size_to_chs(size: int) -> tuple[int, Geometry]:
    """The smallest size >= ``size`` that a VHD CHS geometry describes exactly, and that geometry
    (qemu's and Virtual PC's rounding). Beyond the largest geometry the size stays as asked (the
    footer then carries 65535/16/255 and every reader uses the current size)."""
    total = ceil_div(size, SECTOR)
    max_total = MAX_GEOMETRY[0] * MAX_GEOMETRY[1] * MAX_GEOMETRY[2]
    if total >= max_total:
        return total * SECTOR, Geometry(*MAX_GEOMETRY)
    i = 0
    while True:
        g = vhd_chs((total + i) * SECTOR)
        if g.cylinders * g.heads * g.sectors >= total:
            return g.cylinders * g.heads * g.sectors * SECTOR, g
        i += 1


def fixed_geometry(size: int) -> Geometry:
    """Geometry for a fixed disk that keeps its exact size: the specification's CHS when it
    describes the size exactly, else the maximum geometry 65535/16/255, which tells every reader
    (qemu of any version included) to use the footer's current size, as qemu's force_size does."""
    g = vhd_chs(size)
    return g if g.cylinders * g.heads * g.sectors * SECTOR == size else Geometry(*MAX_GEOMETRY)


def bitmap_runs(bm: bytes | bytearray, first: int, count: int) -> list[tuple[int, int, bool]]:
    """(first_sector, n, is_set) runs of a VHD sector bitmap (MSB = lowest sector) over
    sectors [first, first+count)."""
    nbits = len(bm) * 8
    value = int.from_bytes(bm, "big")
    width = count
    x = (value >> (nbits - first - count)) & ((1 << count) - 1)
    out = []
    pos = first
    while width > 0:
        mask = (1 << width) - 1
        x &= mask
        if (x >> (width - 1)) & 1:
            n = width - ((~x) & mask).bit_length()
            out.append((pos, n, True))
        else:
            n = width - x.bit_length()
            out.append((pos, n, False))
        pos += n
        width -= n
    return out


def set_bits(bm: bytearray, first: int, count: int) -> tuple[int, int] | None:
    """Set sectors [first, first+count) in a bitmap; return the changed byte span or None."""
    end = first + count
    lo_byte, hi_byte = first // 8, (end + 7) // 8
    old = bytes(bm[lo_byte:hi_byte])
    span = hi_byte - lo_byte
    cur = int.from_bytes(old, "big")
    width = span * 8
    start_bit = first - lo_byte * 8
    mask = ((1 << count) - 1) << (width - start_bit - count)
    new = (cur | mask).to_bytes(span, "big")
    if new == old:
        return None
    bm[lo_byte:hi_byte] = new
    return lo_byte, hi_byte


def _decode_utf16(raw: bytes, big: bool) -> str:
    n = len(raw) - len(raw) % 2
    s = raw[:n].decode("utf-16-be" if big else "utf-16-le", "replace")
    return s.split("\x00", 1)[0]


def _mac_url_to_path(text: str) -> str:
    t = text.split("\x00", 1)[0]
    if t.lower().startswith("file://"):
        rest = t[7:]
        if not rest.startswith("/"):
            slash = rest.find("/")
            rest = rest[slash:] if slash >= 0 else ""
        t = rest
    return unquote(t)


def _round(n: int, to: int = SECTOR) -> int:
    return align_up(n, to)


def _parent_time(parent: Image) -> int:
    """The parent's modification time (VHD specification: "Parent Time Stamp")."""
    try:
        return vhd_time(os.stat(parent.location).st_mtime)
    except OSError:
        return vhd_time()
