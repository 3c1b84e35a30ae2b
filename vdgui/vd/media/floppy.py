"""Formatted FAT12 floppy images, as VirtualBox's Virtual Media Manager makes them: the standard
PC floppy layouts (boot sector with BPB, two FATs, a fixed root folder), a volume label, and
optionally files and folders copied in with long (VFAT) names.

Layouts follow the DOS/Windows format of each size (fatgen103; the parameters mformat and
IPRT's RTFsFatVolFormat use). Everything is laid out in memory first (at most 2.88 MB: files
are copied into their clusters in pieces), checked to fit, then written under a temporary name
and renamed (rule 11).
"""
from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

from ..align import ceil_div
from ..errors import FileExists, InvalidArgument, VDIOError
from ..progress import Progress, ProgressCallback
from ..sizes import format_size
from ..temps import atomic_files
from . import fat_layout as L
from .sources import Source, collect, open_source


@dataclass(frozen=True)
class FloppyFormat:
    name: str
    sectors: int
    sectors_per_cluster: int
    root_entries: int
    media: int
    sectors_per_fat: int
    sectors_per_track: int
    heads: int = 2

    @property
    def size(self) -> int:
        return self.sectors * L.SECTOR

    @property
    def first_data_sector(self) -> int:
        return 1 + 2 * self.sectors_per_fat + self.root_entries * L.DIR_ENTRY // L.SECTOR

    @property
    def clusters(self) -> int:
        return (self.sectors - self.first_data_sector) // self.sectors_per_cluster

    @property
    def cluster_bytes(self) -> int:
        return self.sectors_per_cluster * L.SECTOR


# the standard PC floppy formats (as DOS FORMAT makes them), smallest first
FLOPPY_FORMATS: dict[str, FloppyFormat] = {f.name: f for f in (
    FloppyFormat("360K", 720, 2, 112, 0xFD, 2, 9),
    FloppyFormat("720K", 1440, 2, 112, 0xF9, 3, 9),
    FloppyFormat("1.2M", 2400, 1, 224, 0xF9, 7, 15),
    FloppyFormat("1.44M", 2880, 1, 224, 0xF0, 9, 18),
    FloppyFormat("2.88M", 5760, 2, 240, 0xF0, 9, 36),
)}
DEFAULT_FLOPPY = "1.44M"


def floppy_format(text: str | int) -> FloppyFormat:
    """A floppy format by its name (1.44M, 720K, 2.88M ...; also 1440K, 1.44MB) or size in
    bytes."""
    key = str(text).strip().upper().removesuffix("B").removesuffix("I")
    for f in FLOPPY_FORMATS.values():
        kib = f.size // 1024
        if key in (f.name, f"{kib}K", str(kib), str(f.size)):
            return f
    raise InvalidArgument(f"unknown floppy size {text!r} (known: "
                          f"{', '.join(FLOPPY_FORMATS)})")


# -- names ------------------------------------------------------------------------------------
_SHORT_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'()-@^_`{}~")
_LONG_BAD = frozenset('"*/:<>?\\|')


def _split(name: str) -> tuple[str, str]:
    base, dot, ext = name.rpartition(".")
    return (base, ext) if dot and base else (name, "")


def _plain_short(name: str) -> bytes | None:
    """The 11-byte short name when ``name`` is a valid upper-case 8.3 name itself."""
    base, ext = _split(name)
    if not 1 <= len(base) <= 8 or len(ext) > 3 or "." in base:
        return None
    if not set(base + ext) <= _SHORT_CHARS:
        return None
    return (base.ljust(8) + ext.ljust(3)).encode("ascii")


def _check_long(src: Source) -> None:
    name = src.name
    bad = sorted({c for c in name if c in _LONG_BAD or ord(c) < 0x20})
    if bad:
        raise InvalidArgument(f"{src.host}: FAT names cannot contain "
                              f"{' '.join(repr(c) for c in bad)}; rename it first")
    if name.endswith((".", " ")):
        raise InvalidArgument(f"{src.host}: FAT names cannot end with a dot or a space")
    if len(name.encode("utf-16-le")) // 2 > L.MAX_LFN:
        raise InvalidArgument(f"{src.host}: the name is longer than FAT's {L.MAX_LFN} "
                              "characters")


def _short_basis(name: str) -> tuple[str, str, bool]:
    """(base, extension, lossy) of the short name for ``name`` (fatgen103 "Basis-Name
    Generation"): upper case, other characters as '_', spaces and extra dots dropped."""
    lossy = False

    def oem(s: str) -> str:
        nonlocal lossy
        out = "".join(c if c in _SHORT_CHARS else "_" for c in s.upper() if c not in " .")
        lossy |= out != s.upper()
        return out
    stripped = name.lstrip(".")
    lossy = stripped != name
    base, ext = _split(stripped)
    base, ext = oem(base), oem(ext)
    lossy |= len(base) > 8 or len(ext) > 3 or not base
    return base or "_", ext[:3], lossy


def _short_names(items: list[Source], where: str) -> list[tuple[bytes, bool]]:
    """(11-byte short name, needs a long name) for each item of one folder."""
    folded: dict[str, str] = {}
    for s in items:
        _check_long(s)
        key = s.name.casefold()
        if key in folded:
            raise InvalidArgument(f"{folded[key]} and {s.host} differ only in case, which FAT "
                                  f"cannot tell apart (in {where})")
        folded[key] = s.host
    out: list[tuple[bytes, bool]] = []
    taken = {p for p in (_plain_short(s.name) for s in items) if p is not None}
    for s in items:
        plain = _plain_short(s.name)
        if plain is not None:
            out.append((plain, False))
            continue
        base, ext, lossy = _short_basis(s.name)
        short = (base.ljust(8) + ext.ljust(3)).encode("ascii")
        if not lossy and short not in taken:
            taken.add(short)
            out.append((short, True))
            continue
        for n in range(1, 1_000_000):
            tail = f"~{n}"
            cand = (base[: 8 - len(tail)] + tail).ljust(8) + ext.ljust(3)
            short = cand.encode("ascii")
            if short not in taken:
                break
        taken.add(short)
        out.append((short, True))
    return out


def _checksum(short: bytes) -> int:
    s = 0
    for b in short:
        s = (((s & 1) << 7) + (s >> 1) + b) & 0xFF
    return s


def _lfn_entries(name: str, short: bytes) -> list[bytes]:
    units = name.encode("utf-16-le")
    count = ceil_div(len(units) // 2, L.LFN_CHARS)
    padded = units + (b"\0\0" if len(units) // 2 % L.LFN_CHARS else b"")
    padded = padded.ljust(count * L.LFN_CHARS * 2, b"\xff")
    csum = _checksum(short)
    out = []
    for i in range(count, 0, -1):            # stored last piece first
        piece = padded[(i - 1) * 26: i * 26]
        out.append(L.LfnEntry.build({
            "order": i | (L.LFN_LAST if i == count else 0),
            "name1": piece[:10], "checksum": csum, "name2": piece[10:22], "name3": piece[22:],
        }))
    return out


def label_bytes(label: str | None) -> bytes | None:
    """A volume label as FAT stores it (11 bytes, upper case), or None for no label."""
    text = (label or "").strip().upper()
    if not text:
        return None
    bad = sorted({c for c in text if c not in _SHORT_CHARS and c != " "})
    if bad or len(text) > 11:
        raise InvalidArgument(
            f"volume label {label!r}: at most 11 characters of A-Z, 0-9, space and "
            f"{''.join(sorted(_SHORT_CHARS - set('ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789')))}"
            + (f"; not {' '.join(repr(c) for c in bad)}" if bad else ""))
    return text.ljust(11).encode("ascii")


def _dos_time(t: float) -> tuple[int, int]:
    """(date, time) words of FAT for ``t`` in local time, clamped to 1980..2107."""
    tm = time.localtime(t)
    if tm.tm_year < 1980:
        return (1 << 5) | 1, 0
    if tm.tm_year > 2107:
        return (127 << 9) | (12 << 5) | 31, (23 << 11) | (59 << 5) | 29
    return ((tm.tm_year - 1980) << 9) | (tm.tm_mon << 5) | tm.tm_mday, \
        (tm.tm_hour << 11) | (tm.tm_min << 5) | (min(tm.tm_sec, 59) // 2)


def _entry(short: bytes, attr: int, cluster: int, size: int, mtime: float) -> bytes:
    date, tod = _dos_time(mtime)
    return L.DirEntry.build({
        "name": short, "attr": attr, "nt_reserved": 0, "create_tenths": 0,
        "create_time": tod, "create_date": date, "access_date": date, "cluster_high": 0,
        "write_time": tod, "write_date": date, "cluster": cluster, "size": size})


# -- the boot sector --------------------------------------------------------------------------
# not bootable: print the message, wait for a key, ask the BIOS for the next boot device
_MESSAGE = b"\r\nThis floppy is not bootable: remove it and press a key.\r\n\0"


def _boot_code() -> bytes:
    msg = 0x7C00 + L.BOOT_CODE_OFFSET + 28          # the message follows the 28 code bytes
    return bytes([
        0x31, 0xC0,                     # xor ax, ax
        0x8E, 0xD8,                     # mov ds, ax
        0xBE, msg & 0xFF, msg >> 8,     # mov si, message
        0xFC,                           # cld
        0xAC,                           # next: lodsb
        0x84, 0xC0,                     # test al, al
        0x74, 0x09,                     # jz key
        0xB4, 0x0E,                     # mov ah, 0Eh (teletype output)
        0xBB, 0x07, 0x00,               # mov bx, 7
        0xCD, 0x10,                     # int 10h
        0xEB, 0xF2,                     # jmp next
        0x30, 0xE4,                     # key: xor ah, ah
        0xCD, 0x16,                     # int 16h (wait for a key)
        0xCD, 0x19,                     # int 19h (the next boot device)
    ])


def boot_sector(fmt: FloppyFormat, label: bytes | None, volume_id: int) -> bytes:
    head = L.BootSector.build({
        "jump": bytes([0xEB, L.BOOT_CODE_OFFSET - 2, 0x90]), "oem_name": b"MSWIN4.1",
        "bytes_per_sector": L.SECTOR, "sectors_per_cluster": fmt.sectors_per_cluster,
        "reserved_sectors": 1, "fat_count": 2, "root_entries": fmt.root_entries,
        "total_sectors_16": fmt.sectors, "media": fmt.media,
        "sectors_per_fat": fmt.sectors_per_fat, "sectors_per_track": fmt.sectors_per_track,
        "heads": fmt.heads, "hidden_sectors": 0, "total_sectors_32": 0, "drive_number": 0,
        "reserved1": 0, "volume_id": volume_id, "volume_label": label or b"NO NAME    ",
        "fs_type": b"FAT12   "})
    sector = bytearray(L.SECTOR)
    sector[: len(head)] = head
    code = _boot_code() + _MESSAGE
    sector[L.BOOT_CODE_OFFSET: L.BOOT_CODE_OFFSET + len(code)] = code
    sector[L.SIGNATURE_OFFSET:] = L.SIGNATURE
    return bytes(sector)


# -- layout and writing -----------------------------------------------------------------------
class _Builder:
    """Lays the tree out in the image buffer: folders and files get contiguous clusters in
    walk order; the FAT chains link them."""

    def __init__(self, fmt: FloppyFormat, image: bytearray):
        self.fmt, self.image = fmt, image
        self.fat = [0] * (fmt.clusters + 2)
        self.fat[0], self.fat[1] = 0xF00 | fmt.media, 0xFFF
        self.next = 2
        self.copies: list[tuple[Source, int]] = []     # (file, byte offset of its data)

    def clusters_for(self, nbytes: int) -> int:
        return ceil_div(nbytes, self.fmt.cluster_bytes)

    def allocate(self, count: int) -> int:
        if count == 0:
            return 0
        first = self.next
        for c in range(first, first + count - 1):
            self.fat[c] = c + 1
        self.fat[first + count - 1] = 0xFFF
        self.next += count
        return first

    def offset(self, cluster: int) -> int:
        f = self.fmt
        return (f.first_data_sector + (cluster - 2) * f.sectors_per_cluster) * L.SECTOR

    def folder(self, src: Source, where: str, cluster: int, parent: int,
               label: bytes | None = None) -> bytes:
        """The entries of a folder (its own clusters are ``cluster``, 0 for the root)."""
        names = _short_names(src.children, where)
        out = []
        if label is not None:
            out.append(_entry(label, L.ATTR_VOLUME_ID, 0, 0, time.time()))
        if cluster:
            out.append(_entry(b".          ", L.ATTR_DIRECTORY, cluster, 0, src.mtime))
            out.append(_entry(b"..         ", L.ATTR_DIRECTORY, parent, 0, src.mtime))
        placed = []
        for child, (short, long) in zip(src.children, names):
            if long:
                out += _lfn_entries(child.name, short)
            if child.kind == "dir":
                entries = 2 + _entries(child.children, where)
                first = self.allocate(self.clusters_for(entries * L.DIR_ENTRY))
                out.append(_entry(short, L.ATTR_DIRECTORY, first, 0, child.mtime))
                placed.append((child, first))
            else:
                first = self.allocate(self.clusters_for(child.size))
                out.append(_entry(short, L.ATTR_ARCHIVE, first, child.size, child.mtime))
                if child.size:
                    self.copies.append((child, self.offset(first)))
        for child, first in placed:
            data = self.folder(child, child.host, first, cluster)
            off = self.offset(first)
            self.image[off: off + len(data)] = data
        return b"".join(out)

    def fat_bytes(self) -> bytes:
        out = bytearray(self.fmt.sectors_per_fat * L.SECTOR)
        for n, v in enumerate(self.fat):
            off = n * 3 // 2
            if n % 2 == 0:
                out[off] = v & 0xFF
                out[off + 1] = (out[off + 1] & 0xF0) | (v >> 8)
            else:
                out[off] = (out[off] & 0x0F) | ((v & 0x0F) << 4)
                out[off + 1] = v >> 4
        return bytes(out)


def _entries(items: list[Source], where: str) -> int:
    """Folder entries the items take: one each, and the long-name entries of those that need
    them."""
    return sum(1 + (ceil_div(len(c.name.encode("utf-16-le")) // 2, L.LFN_CHARS) if lng else 0)
               for c, (_, lng) in zip(items, _short_names(items, where)))


def _needed_clusters(fmt: FloppyFormat, root: Source) -> int:
    need = 0
    for s in root.walk():
        if s.kind == "dir":
            entries = 2 + _entries(s.children, s.host)
            need += ceil_div(entries * L.DIR_ENTRY, fmt.cluster_bytes)
        else:
            need += ceil_div(s.size, fmt.cluster_bytes)
    return need


def create_floppy(path: str, size: str | int = DEFAULT_FLOPPY, *, label: str | None = None,
                  sources: Sequence[str] = (), volume_id: int | None = None,
                  progress: ProgressCallback | None = None) -> str:
    """Create a formatted FAT12 floppy image at ``path`` (refused if it exists) holding the
    files and folders ``sources`` at its root. Returns ``path``."""
    fmt = floppy_format(size)
    lab = label_bytes(label)
    if os.path.lexists(path):
        raise FileExists(f"{path}: file already exists")
    root = collect(sources, symlinks=False, what="a FAT floppy")
    top = _entries(root.children, "the root folder") + (1 if lab else 0)
    if top > fmt.root_entries:
        raise InvalidArgument(f"too many items at the root of a {fmt.name} floppy: they need "
                              f"{top} folder entries (long names take more than one), the "
                              f"root folder holds {fmt.root_entries}; put them in a folder")
    need = _needed_clusters(fmt, root)
    if need > fmt.clusters:
        raise InvalidArgument(
            f"the files do not fit on a {fmt.name} floppy: they need "
            f"{format_size(need * fmt.cluster_bytes)}, it holds "
            f"{format_size(fmt.clusters * fmt.cluster_bytes)}")
    file_bytes = root.file_bytes()
    prog = Progress(progress, file_bytes + fmt.size)
    prog.start()
    image = bytearray(fmt.size)
    b = _Builder(fmt, image)
    vid = volume_id if volume_id is not None else int.from_bytes(os.urandom(4), "little")
    image[: L.SECTOR] = boot_sector(fmt, lab, vid)
    rootdir = b.folder(root, "the root folder", 0, 0, lab)
    rd = (1 + 2 * fmt.sectors_per_fat) * L.SECTOR
    image[rd: rd + len(rootdir)] = rootdir
    fat = b.fat_bytes()
    for i in range(2):
        start = (1 + i * fmt.sectors_per_fat) * L.SECTOR
        image[start: start + len(fat)] = fat
    view = memoryview(image)
    for src, off in b.copies:
        with open_source(src) as f:
            done = 0
            while done < src.size:
                n = f.readinto(view[off + done: off + min(src.size, done + (256 << 10))])
                if not n:
                    raise VDIOError(f"{src.host}: the file became shorter while it was copied "
                                    f"(expected {src.size} bytes, found {done})")
                done += n
                prog.advance(n)
    with atomic_files([path]) as (tmp,):
        try:
            with open(tmp, "wb") as out:
                for pos in range(0, fmt.size, 256 << 10):
                    out.write(view[pos: pos + (256 << 10)])
                    prog.advance(min(256 << 10, fmt.size - pos))
                out.flush()
                os.fsync(out.fileno())
        except OSError as exc:
            raise VDIOError(f"{path}: cannot write: {exc.strerror or exc}") from None
        prog.finish()                      # the last chance to cancel: before the rename
    return path
