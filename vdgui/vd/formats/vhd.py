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

import array
import bisect
import os
import time
import uuid as uuidlib
from urllib.parse import unquote

from ..align import align_up, ceil_div
from ..backend import (Backend, Cap, CreateParams, DeviceType, FileExtension, ImageFlags,
                       OpenFlags, Operation, ProbeInput)
from ..errors import InvalidArgument, NotSupported, require_text
from ..compaction import holes_between, move_blocks, plan_moves
from ..fileimage import FileImage
from ..fileio import ImageFile, relative_name
from ..geometry import Geometry, vhd_chs
from ..image import Alloc, CheckReport, Image, ParentHint, Problem, ProblemCode
from ..progress import Progress
from ..space import preallocate, require_space
from ..runs import RunList
from ..sparse import is_zero, nonzero_runs, split_blocks, zeroes
from ..tables import BlockTable, read_table
from .vhd_layout import (FOOTER, FOOTER_SIZE, FOOTER_CHECKSUM_AT, PARENT_LOCATOR, DYN_HEADER,
                         HEADER_SIZE, HEADER_CHECKSUM_AT, COOKIE, DYN_COOKIE, TYPE_FIXED,
                         TYPE_DYNAMIC, TYPE_DIFF, TYPE_NAMES, FREE, NO_OFFSET, SECTOR,
                         DEFAULT_BLOCK, MAX_BLOCK, MAX_LOCATOR, MAX_VIRTUAL, MAX_READ_VIRTUAL,
                         MAX_GEOMETRY, VHD_EPOCH, CURRENT_SIZE_CREATORS, CREATOR_APP,
                         CREATOR_VERSION, CREATOR_OS, LOCATOR_SPACE)


def checksum(buf, at: int) -> int:
    """The VHD checksum: one's complement of the byte sum, the 4-byte field at ``at`` counted as 0."""
    mv = memoryview(buf)
    total = sum(mv[:at]) + sum(mv[at + 4:])
    return (~total) & 0xFFFFFFFF


def _with_checksum(raw: bytes, at: int) -> bytes:
    b = bytearray(raw)
    b[at:at + 4] = checksum(b, at).to_bytes(4, "big")
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


def bitmap_runs(bm, first: int, count: int) -> list[tuple[int, int, bool]]:
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


class VhdImage(FileImage):
    """One opened VHD file (fixed, dynamic or differencing)."""

    def __init__(self, backend, location: str, f: ImageFile, read_only: bool, flags=OpenFlags.NORMAL):
        super().__init__(backend, location, f, read_only)
        self.honor_zeroes = False
        self.open_flags = flags
        self.size_rounded_from: int | None = None
        self._problems: list[Problem] = []        # found while opening, reported by check()
        self._bitmaps: dict[int, bytearray] = {}
        self._bad: dict[int, str] = {}
        self._alloc_cache = None
        self.header = None
        self.bat = array.array("I")
        self.n_blocks = 0
        self._load()

    # -- opening --------------------------------------------------------------------------------
    def _read_footer_at(self, offset: int, length: int = FOOTER_SIZE):
        raw = self.f.pread(offset, length)
        if len(raw) != length:
            return None, False, b""
        raw = raw + bytes(FOOTER_SIZE - length)
        if raw[:8] != COOKIE:
            return None, False, raw
        ok = int.from_bytes(raw[64:68], "big") == checksum(raw, FOOTER_CHECKSUM_AT)
        return FOOTER.parse(raw), ok, raw

    def _load(self) -> None:
        fsize = self.f.size()
        self.fsize = fsize
        if fsize < FOOTER_SIZE - 1:
            raise self._corrupt("file is too small to hold a VHD footer",
                                expected=f"at least {FOOTER_SIZE} bytes", found=f"{fsize} bytes")
        end_len = FOOTER_SIZE
        end, end_ok, _ = (self._read_footer_at(fsize - FOOTER_SIZE) if fsize >= FOOTER_SIZE
                          else (None, False, b""))
        if end is None and fsize >= FOOTER_SIZE - 1:
            # Virtual PC before 2004 wrote a 511-byte footer (VHD specification, "Hard Disk Footer")
            alt, alt_ok, _ = self._read_footer_at(fsize - (FOOTER_SIZE - 1), FOOTER_SIZE - 1)
            if alt is not None:
                end, end_ok, end_len = alt, alt_ok, FOOTER_SIZE - 1
        head, head_ok, _ = self._read_footer_at(0) if fsize >= FOOTER_SIZE else (None, False, b"")
        if head is not None and head.disk_type not in (TYPE_DYNAMIC, TYPE_DIFF):
            head, head_ok = None, False          # fixed disks have no copy: these are guest bytes
        self.footer_from = "end"
        if end is not None and end_ok:
            footer = end
        elif head is not None and head_ok:
            footer = head
            self.footer_from = "copy at offset 0"
            state = "damaged (bad checksum)" if end is not None else "missing"
            self._problems.append(Problem(
                "corrupt", f"footer at the end of the file is {state}; the copy at offset 0 is used",
                offset=fsize - end_len, code=ProblemCode.FOOTER))
        elif end is not None:
            footer = end
            self._problems.append(Problem(
                "corrupt", "footer checksum is wrong (expected "
                f"{checksum(FOOTER.build(end), FOOTER_CHECKSUM_AT):#010x}, found {end.checksum:#010x})",
                offset=fsize - end_len, code=ProblemCode.FOOTER))
        elif head is not None:
            footer = head
            self.footer_from = "copy at offset 0"
            self._problems.append(Problem(
                "corrupt", "footer at the end of the file is missing and the copy at offset 0 has a "
                "wrong checksum; the copy is used", offset=0, code=ProblemCode.FOOTER))
        else:
            raise self._corrupt("no VHD footer (cookie 'conectix') at the end of the file or at "
                                "offset 0", field="cookie", offset=max(fsize - FOOTER_SIZE, 0),
                                expected="b'conectix'",
                                found=repr(self.f.pread(max(fsize - FOOTER_SIZE, 0), 8)))
        self.footer = footer
        fbase = 0 if self.footer_from != "end" else fsize - end_len     # for error offsets
        if footer.disk_type not in TYPE_NAMES:
            raise self._corrupt("unknown disk type", field="disk type", offset=fbase + 60,
                                expected="2 (fixed), 3 (dynamic) or 4 (differencing)",
                                found=footer.disk_type)
        self.disk_type = footer.disk_type
        if head is not None and self.footer_from == "end" and self.disk_type != TYPE_FIXED:
            if FOOTER.build(head) != FOOTER.build(footer):
                self._problems.append(Problem(
                    "corrupt", "the footer copy at offset 0 differs from the footer at the end",
                    offset=0, code=ProblemCode.FOOTER))
        elif head is None and self.disk_type != TYPE_FIXED:
            self._problems.append(Problem("corrupt", "the footer copy at offset 0 is missing or damaged",
                                          offset=0, code=ProblemCode.FOOTER))
        self.uuid = uuidlib.UUID(bytes_le=bytes(footer.unique_id))
        if self.uuid.int == 0:
            self.uuid = None
        self.pchs = Geometry(footer.cylinders, footer.heads, footer.sectors)
        self.lchs = None
        self.size, self.size_source = self._decide_size(footer)
        if self.size > MAX_READ_VIRTUAL and self.disk_type != TYPE_FIXED:
            raise self._corrupt("virtual size is larger than a VHD can be",
                                field="current size" if self.size_source != "geometry" else "geometry",
                                offset=fbase + (48 if self.size_source != "geometry" else 56),
                                expected=f"at most {MAX_READ_VIRTUAL}", found=self.size)
        if self.disk_type == TYPE_FIXED:
            self.flags = ImageFlags.FIXED
            self.block_size = SECTOR
            self.footer_offset = fsize - end_len
            if self.size > self.footer_offset:
                raise self._corrupt("fixed disk is shorter than its virtual size (truncated?)",
                                    field="current size", offset=fbase + 48,
                                    expected=f"at most {self.footer_offset} bytes of data",
                                    found=self.size)
            return
        self.flags = ImageFlags.DIFF if self.disk_type == TYPE_DIFF else ImageFlags.NONE
        self._load_dynamic(fsize, end_len)

    def _decide_size(self, footer) -> tuple[int, str]:
        """qemu's rule (block/vpc.c): current size for some creators, for fixed disks and for the
        maximum geometry; the CHS geometry otherwise. Differencing disks use the current size
        (qemu cannot open them as such; Windows, Virtual PC and VirtualBox use the current size)."""
        current = footer.current_size - footer.current_size % SECTOR
        chs = footer.cylinders * footer.heads * footer.sectors
        if footer.disk_type in (TYPE_FIXED, TYPE_DIFF):
            return current, "current size"
        if bytes(footer.creator_app) in CURRENT_SIZE_CREATORS:
            return current, "current size"
        if (footer.cylinders, footer.heads, footer.sectors) == MAX_GEOMETRY:
            return current, "current size"
        if chs == 0:
            return current, "current size"
        return chs * SECTOR, "geometry"

    def _load_dynamic(self, fsize: int, end_len: int) -> None:
        hoff = self.footer.data_offset
        if hoff + HEADER_SIZE > fsize or hoff < FOOTER_SIZE:
            raise self._corrupt("dynamic disk header lies outside the file or over the footer copy",
                                field="data offset", offset=16,
                                expected=f"{FOOTER_SIZE}..{fsize - HEADER_SIZE}", found=hoff)
        raw = self.f.read_exact(hoff, HEADER_SIZE, "dynamic disk header")
        if raw[:8] != DYN_COOKIE:
            raise self._corrupt("dynamic disk header cookie is wrong", field="cookie", offset=hoff,
                                expected="b'cxsparse'", found=repr(raw[:8]))
        hdr = DYN_HEADER.parse(raw)
        self.header = hdr
        self.header_offset = hoff
        good = checksum(raw, HEADER_CHECKSUM_AT)
        if hdr.checksum != good:
            self._problems.append(Problem(
                "corrupt", f"dynamic disk header checksum is wrong (expected {good:#010x}, found "
                f"{hdr.checksum:#010x})", offset=hoff + HEADER_CHECKSUM_AT,
                code=ProblemCode.HEADER_CHECKSUM))
        bs = hdr.block_size
        if bs < SECTOR or bs > MAX_BLOCK or bs & (bs - 1):
            raise self._corrupt("block size must be a power of two between 512 bytes and 256 MiB",
                                field="block size", offset=hoff + 32, found=bs)
        self.block_size = bs
        self.spb = bs // SECTOR                                   # sectors per block
        self.bm_size = _round(ceil_div(self.spb, 8))                  # bitmap, padded to a sector
        self.total = self.bm_size + bs
        self.n_blocks = ceil_div(self.size, bs)
        if hdr.max_table_entries < self.n_blocks:
            raise self._corrupt("the block allocation table is too small for the virtual size",
                                field="max table entries", offset=hoff + 28,
                                expected=f"at least {self.n_blocks}", found=hdr.max_table_entries)
        self.bat_offset = hdr.table_offset
        if self.bat_offset + self.n_blocks * 4 > fsize:
            raise self._corrupt("block allocation table lies past the end of the file",
                                field="table offset", offset=hoff + 16,
                                expected=f"a table of {self.n_blocks} entries inside {fsize} bytes",
                                found=self.bat_offset)
        bat_end = self.bat_offset + self.n_blocks * 4
        if self.n_blocks and (self.bat_offset < FOOTER_SIZE or
                              (self.bat_offset < hoff + HEADER_SIZE and hoff < bat_end)):
            raise self._corrupt("block allocation table overlaps the footer copy or the dynamic "
                                "disk header", field="table offset", offset=hoff + 16,
                                expected=f"a table clear of 0..{FOOTER_SIZE} and {hoff:#x}.."
                                f"{hoff + HEADER_SIZE:#x}", found=self.bat_offset)
        self.bat = read_table(self.f, self.bat_offset, self.n_blocks, "I", True,
                              "block allocation table")
        self._parse_parent(hdr, fsize)
        self._scan_blocks(fsize, end_len)

    @staticmethod
    def _locator_region(loc) -> tuple[int, int]:
        """The bytes a locator uses (its data, rounded to a sector). The reserved space field is
        not trusted: writers disagree on its unit (the spec says sectors, everyone writes bytes)."""
        return loc.data_offset, loc.data_offset + _round(max(loc.data_length, 1))

    def _parse_parent(self, hdr, fsize: int) -> None:
        self.locators: list[tuple[str, str]] = []
        self._bad_locators: set[int] = set()      # indexes repair clears (PARENT_LOCATOR)
        for i, loc in enumerate(hdr.locators):
            code = bytes(loc.code)
            if code == b"\x00\x00\x00\x00":
                continue
            if loc.data_length == 0:
                continue
            if loc.data_length > MAX_LOCATOR or loc.data_offset + loc.data_length > fsize:
                self._problems.append(Problem(
                    "corrupt", f"parent locator {i} ({code!r}) data lies outside the file or is "
                    f"too long ({loc.data_length} bytes at {loc.data_offset:#x})",
                    offset=self.header_offset + 576 + 24 * i, code=ProblemCode.PARENT_LOCATOR))
                self._bad_locators.add(i)
                continue
            if self.disk_type != TYPE_DIFF:
                continue
            data = self.f.pread(loc.data_offset, loc.data_length)
            if code in (b"W2ru", b"W2ku"):
                text = _decode_utf16(data, big=False)
            elif code in (b"Wi2r", b"Wi2k"):
                text = data.decode("latin-1").split("\x00", 1)[0]
            elif code == b"MacX":
                text = _mac_url_to_path(data.decode("utf-8", "replace"))
            else:
                continue                      # "Mac " is a Mac OS alias record: not a path
            if text:
                self.locators.append((code.decode("latin-1"), text))
        self.parent_name = _decode_utf16(bytes(hdr.parent_name), big=True)
        if self.disk_type != TYPE_DIFF:
            self.parent_hint = None
            return
        order = {"W2ru": 0, "Wi2r": 1, "W2ku": 2, "Wi2k": 3, "MacX": 4}
        locs = [t for _c, t in sorted(self.locators, key=lambda ct: order.get(ct[0], 9))]
        if self.parent_name and self.parent_name not in locs:
            locs.append(self.parent_name)
        pu = uuidlib.UUID(bytes_le=bytes(hdr.parent_uuid))
        self.parent_uuid = pu if pu.int else None
        self.parent_hint = ParentHint(locations=locs, uuid=self.parent_uuid, format=None)

    def _meta_regions(self) -> list[tuple[int, int, str]]:
        """File ranges holding metadata (not blocks)."""
        regs = [(0, FOOTER_SIZE, "footer copy"),
                (self.header_offset, self.header_offset + HEADER_SIZE, "dynamic disk header"),
                (self.bat_offset, self.bat_offset + _round(max(self.n_blocks * 4, 1)),
                 "block allocation table")]
        for i, loc in enumerate(self.header.locators):
            if bytes(loc.code) != b"\x00\x00\x00\x00" and loc.data_length and \
                    loc.data_length <= MAX_LOCATOR and loc.data_offset + loc.data_length <= self.fsize:
                s, e = self._locator_region(loc)
                regs.append((s, e, f"parent locator {i}"))
        return regs

    def _scan_blocks(self, fsize: int, end_len: int) -> None:
        """Validate BAT entries: inside the file, clear of metadata and of each other."""
        self._bad = {}
        self.write_refusal = None
        self._bad_code: dict[int, str] = {}
        self._intersects_footer: list[int] = []
        meta = self._meta_regions()
        used_end = max(e for _s, e, _n in meta)
        footer_at = fsize - end_len
        spans = []
        total = self.total
        for idx, e in enumerate(self.bat):
            if e == FREE:
                continue
            start = e * SECTOR
            end = start + total
            if end > fsize:
                self._bad[idx] = (f"BAT entry {idx} points past the end of the file (block at "
                                  f"{start:#x}..{end:#x}, file size {fsize:#x})")
                self._bad_code[idx] = ProblemCode.ENTRY_PAST_END
                continue
            hit = next((n for s, en, n in meta if start < en and s < end), None)
            if hit:
                self._bad[idx] = f"BAT entry {idx} (block at {start:#x}) overlaps the {hit}"
                self._bad_code[idx] = ProblemCode.OVERLAP
                continue
            if end > footer_at:
                self._intersects_footer.append(idx)
            spans.append((start, end, idx))
        spans.sort()
        prev_end, prev_idx = -1, -1
        for start, end, idx in spans:
            if start < prev_end:
                self._bad[idx] = (f"BAT entry {idx} (block at {start:#x}) overlaps the block of "
                                  f"BAT entry {prev_idx}")
                self.write_refusal = self.write_refusal or \
                    f"BAT entries {prev_idx} and {idx} name overlapping blocks (at {start:#x})"
                self._bad_code[idx] = ProblemCode.CROSS_LINKED
                continue
            prev_end, prev_idx = end, idx
            used_end = max(used_end, end)
        self.used_end = used_end
        self.footer_offset = max(footer_at, used_end)

    # -- facts ----------------------------------------------------------------------------------
    @property
    def is_fixed(self) -> bool:
        return self.disk_type == TYPE_FIXED

    def info(self) -> dict:
        ft = self.footer
        d = {
            "disk_type": TYPE_NAMES[self.disk_type],
            "creator_app": bytes(ft.creator_app).decode("latin-1"),
            "creator_version": f"{ft.creator_version >> 16}.{ft.creator_version & 0xFFFF}",
            "creator_host_os": bytes(ft.creator_os).decode("latin-1"),
            "created": _iso(ft.timestamp),
            "chs": f"{ft.cylinders}/{ft.heads}/{ft.sectors}",
            "current_size": ft.current_size,
            "original_size": ft.original_size,
            "geometry_size": ft.cylinders * ft.heads * ft.sectors * SECTOR,
            "size_source": self.size_source,
            "saved_state": bool(ft.saved_state),
            "footer": self.footer_from,
        }
        if self.size_rounded_from is not None:
            d["size_rounded_from"] = self.size_rounded_from
        if not self.is_fixed:
            d["block_size"] = self.block_size
            d["bat_entries"] = self.header.max_table_entries
            d["allocated_blocks"] = sum(1 for e in self.bat if e != FREE)
        if self.disk_type == TYPE_DIFF:
            d["parent_name"] = self.parent_name
            d["parent_timestamp"] = _iso(self.header.parent_timestamp)
            d["parent_locators"] = [f"{c}:{t}" for c, t in self.locators]
        if self._problems:
            d["problems"] = [p.what for p in self._problems]
        return d

    # -- data -----------------------------------------------------------------------------------
    def _block_start(self, idx: int) -> int | None:
        e = self.bat[idx]
        if e == FREE:
            return None
        if idx in self._bad:
            raise self._corrupt(self._bad[idx] + "; run check --repair", field="BAT",
                                offset=self.bat_offset + 4 * idx)
        return e * SECTOR

    def _bitmap(self, idx: int, start: int) -> bytearray:
        bm = self._bitmaps.get(idx)
        if bm is None:
            if len(self._bitmaps) > 512:
                self._bitmaps.clear()
            bm = bytearray(self.f.read_exact(start, self.bm_size, f"sector bitmap of block {idx}"))
            self._bitmaps[idx] = bm
        return bm

    def block_status(self, offset, length):
        if self.is_fixed:
            return self._fixed_status(offset, length)
        runs = RunList()
        add = runs.add
        end = offset + length
        bs = self.block_size
        allocated = self._allocated_indices()
        pos = offset
        while pos < end:
            idx, inner = divmod(pos, bs)
            if self.bat[idx] == FREE:              # skip to the next allocated block at once
                k = bisect.bisect_left(allocated, idx)
                nxt = allocated[k] * bs if k < len(allocated) else end
                stop = min(max(nxt, pos + 1), end)
                add(pos, stop - pos, Alloc.UNALLOCATED)
                pos = stop
                continue
            n = min(bs - inner, end - pos)
            start = self._block_start(idx)
            bm = self._bitmap(idx, start)
            first = inner // SECTOR
            cnt = ceil_div(n, SECTOR)
            for s_, k, on in bitmap_runs(bm, first, cnt):
                a = pos + (s_ - first) * SECTOR
                b = min(a + k * SECTOR, pos + n)
                add(a, b - a, Alloc.DATA if on else Alloc.UNALLOCATED)
            pos += n
        return runs.runs

    def _allocated_indices(self) -> list[int]:
        """Sorted indices of allocated BAT entries (cached; _set_bat invalidates it)."""
        if self._alloc_cache is None or self._alloc_cache[0] != (id(self.bat), len(self.bat)):
            self._alloc_cache = ((id(self.bat), len(self.bat)),
                                 [i for i, e in enumerate(self.bat) if e != FREE])
        return self._alloc_cache[1]

    def _fixed_status(self, offset, length):
        """Holes of a sparse fixed disk read as unallocated (so copies stay sparse)."""
        raw = self.f.data_runs(offset, length)
        if raw is None:
            return [(offset, length, Alloc.DATA)]
        runs = RunList()

        def add(a, b, st):
            runs.add(a, b - a, st)

        for a, b, is_data in raw:
            if is_data:
                add(a, b, Alloc.DATA)
                continue
            ia, ib = _round(a), b - b % SECTOR          # only whole sectors are holes
            if ib > ia:
                add(a, ia, Alloc.DATA)
                add(ia, ib, Alloc.UNALLOCATED)
                add(ib, b, Alloc.DATA)
            else:
                add(a, b, Alloc.DATA)
        return runs.runs or [(offset, length, Alloc.DATA)]

    def read(self, offset, length):
        if self.is_fixed:
            data = self.f.pread(offset, length)
            return data + bytes(length - len(data)) if len(data) < length else data
        parts = []
        for idx, inner, pos, n in split_blocks(offset, length, self.block_size):
            start = self._block_start(idx)
            if start is None:
                parts.append(zeroes(n))
                continue
            bm = self._bitmap(idx, start)
            first = inner // SECTOR
            base = start + self.bm_size
            left = n
            for s, k, on in bitmap_runs(bm, first, ceil_div(n, SECTOR)):
                ln = min(k * SECTOR, left)
                left -= ln
                parts.append(self.f.read_exact(base + s * SECTOR, ln, f"data of block {idx}")
                             if on else zeroes(ln))
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def write(self, offset, data, fill):
        self.require_writable()
        self._refuse_cross_linked()
        if self.is_fixed:
            self.f.pwrite(offset, data)
            return
        mv = memoryview(data)
        for idx, inner, pos, n in split_blocks(offset, len(mv), self.block_size):
            chunk = mv[pos - offset:pos - offset + n]
            start = self._block_start(idx)
            first, cnt = inner // SECTOR, ceil_div(n, SECTOR)
            if start is None:
                if not self.is_diff and not self.honor_zeroes and is_zero(chunk):
                    continue            # an unallocated block of a base disk already reads zeroes
                self._allocate(idx, inner, chunk)
                continue
            self.f.pwrite(start + self.bm_size + inner, chunk)                # data first
            bm = self._bitmap(idx, start)
            span = set_bits(bm, first, cnt)
            if span:
                self.f.pwrite(start + span[0], bm[span[0]:span[1]])          # then the bitmap

    def _allocate(self, idx: int, inner: int, chunk) -> None:
        """Append a block: footer at the new end, data, bitmap, then the BAT entry (a crash at
        any point leaves at most an unreferenced block; the footer copy at 0 stays valid)."""
        pos = _round(self.footer_offset)
        new_footer = pos + self.total
        fresh = not self.is_diff and pos + self.bm_size >= self.f.size()
        self._write_footer_at(new_footer)
        if fresh:
            # the data area lies in space the footer's move just added to the file: it reads
            # zeroes already, so only the non-zero parts are written (the file stays sparse)
            data_at = pos + self.bm_size + inner
            for a, b in nonzero_runs(chunk, data_at):
                self.f.pwrite(data_at + a, chunk[a:b])
        else:
            self.f.pwrite(pos + self.bm_size + inner, chunk)
        bm = bytearray(self.bm_size)
        set_bits(bm, inner // SECTOR, ceil_div(len(chunk), SECTOR))
        self.f.pwrite(pos, bm)
        self._set_bat(idx, pos // SECTOR)
        self._bitmaps[idx] = bm
        self.footer_offset = new_footer
        self.used_end = max(self.used_end, new_footer)
        self.fsize = max(self.fsize, new_footer + FOOTER_SIZE)

    @property
    def _table(self) -> BlockTable:
        """The BAT as stored (big-endian u32 sector numbers at the table offset)."""
        return BlockTable(self.f, self.bat_offset, self.bat, big_endian=True)

    def _set_bat(self, idx: int, value: int) -> None:
        self._set_bats({idx: value})

    def _set_bats(self, values: dict[int, int]) -> None:
        """Set BAT entries and write them (neighbours in one write)."""
        self._alloc_cache = None
        t = self._table
        for idx, value in values.items():
            t[idx] = value
        t.write_back()

    # -- footer/header writing ------------------------------------------------------------------
    def _footer_bytes(self) -> bytes:
        raw = FOOTER.build(self.footer)
        return _with_checksum(raw, FOOTER_CHECKSUM_AT)

    def _write_footer_at(self, offset: int) -> None:
        self.f.pwrite(offset, self._footer_bytes())

    def _store_footer(self) -> None:
        """Write the footer at the end, then its copy at offset 0 (dynamic/differencing)."""
        raw = self._footer_bytes()
        self.footer = FOOTER.parse(raw)
        self.f.pwrite(self.footer_offset, raw)
        if not self.is_fixed:
            self.f.pwrite(0, raw)

    def _store_header(self) -> None:
        """Write the dynamic header (checksum recomputed). Replaces ``self.header`` with the
        parsed result: do not keep references to its locators across this call."""
        raw = _with_checksum(DYN_HEADER.build(self.header), HEADER_CHECKSUM_AT)
        self.header = DYN_HEADER.parse(raw)
        self.f.pwrite(self.header_offset, raw)

    # -- metadata setters -----------------------------------------------------------------------
    def set_uuid(self, value):
        self.require_writable()
        self.footer.unique_id = value.bytes_le
        self._store_footer()
        self.uuid = value

    def set_parent_uuid(self, value):
        self.require_writable()
        if self.disk_type != TYPE_DIFF:
            self._no_field("a parent UUID (not a differencing disk)")
        self.header.parent_uuid = value.bytes_le
        self._store_header()
        self.parent_uuid = value
        self.parent_hint.uuid = value

    def set_pchs(self, value):
        self.require_writable()
        c, h, s = value
        if not (0 < c <= 65535 and 0 < h <= 255 and 0 < s <= 255):
            raise InvalidArgument(f"{self.location}: VHD geometry must fit 65535/255/255, found {value}")
        qemu_uses_chs = bytes(self.footer.creator_app) not in CURRENT_SIZE_CREATORS and \
            self.disk_type != TYPE_DIFF and (c, h, s) != MAX_GEOMETRY
        if qemu_uses_chs and c * h * s * SECTOR != self.size:
            raise InvalidArgument(
                f"{self.location}: this VHD's size is defined by its geometry (creator "
                f"{bytes(self.footer.creator_app)!r}); {value} describes {c * h * s * SECTOR} bytes, "
                f"not {self.size}")
        self.footer.cylinders, self.footer.heads, self.footer.sectors = c, h, s
        self._store_footer()
        self.pchs = Geometry(c, h, s)

    # -- RELINK ---------------------------------------------------------------------------------
    def _space_for(self, data: bytes) -> tuple[int, int]:
        """(offset, space) for new locator data, appended where the footer was. The locators
        the header references now are never overwritten: until the new header is written, the
        old link stays intact (a crash leaves the old parent link, never a mixed one)."""
        need = _round(max(len(data), LOCATOR_SPACE))
        pos = _round(self.footer_offset)
        self._write_footer_at(pos + need)       # the footer moves first: the file stays valid
        self.footer_offset = pos + need
        self.used_end = max(self.used_end, pos + need)
        return pos, need

    def set_parent(self, parent):
        self.require_writable()
        if self.is_fixed:
            raise NotSupported(f"{self.location}: a fixed VHD cannot have a parent")
        hdr = self.header
        empty = dict(code=b"\x00" * 4, data_space=0, data_length=0, reserved=0, data_offset=0)
        if parent is None:
            # footer first: a dynamic disk ignores the parent fields, so a crash in between
            # leaves a valid base disk; then the header forgets the parent
            self.footer.disk_type = TYPE_DYNAMIC
            ft = self.footer
            cur = ft.current_size - ft.current_size % SECTOR
            if ft.cylinders * ft.heads * ft.sectors * SECTOR != cur:
                # a dynamic disk is sized by its geometry unless the geometry is the maximum:
                # keep the size the diff had (e.g. over an odd-sized non-VHD parent)
                ft.cylinders, ft.heads, ft.sectors = fixed_geometry(cur)
            self._store_footer()
            hdr.parent_uuid = bytes(16)
            hdr.parent_timestamp = 0
            hdr.parent_name = bytes(512)
            hdr.locators = [dict(empty) for _ in range(8)]
            self._store_header()
            self.disk_type = TYPE_DYNAMIC
            self.flags = ImageFlags.NONE
            self.parent_hint = None
            self.parent_uuid = None
            self.locators = []
            self.parent_name = ""
            self._rescan()
            return
        ppath = require_text(os.path.abspath(parent.location), "the parent's file name",
                             self.location)
        rel = relative_name(self.location, ppath)
        rel_win = (rel if rel.startswith("..") else ".\\" + rel).replace("/", "\\")
        entries = []
        for code, text in ((b"W2ku", ppath), (b"W2ru", rel_win)):
            data = text.encode("utf-16-le")
            if len(data) > MAX_LOCATOR:
                raise InvalidArgument(f"{self.location}: parent path is too long for a VHD locator")
            off, space = self._space_for(data)
            self.f.pwrite(off, data + bytes(_round(len(data)) - len(data)))
            entries.append(dict(code=code, data_space=space, data_length=len(data), reserved=0,
                                data_offset=off))
        name = os.path.basename(ppath).encode("utf-16-be")[:510]
        hdr.parent_name = name + bytes(512 - len(name))
        hdr.parent_uuid = parent.uuid.bytes_le if parent.uuid else bytes(16)
        hdr.parent_timestamp = _parent_time(parent)
        hdr.locators = entries + [dict(empty) for _ in range(8 - len(entries))]
        self._store_header()
        if self.disk_type != TYPE_DIFF:
            self.footer.disk_type = TYPE_DIFF
            self._store_footer()
            self.disk_type = TYPE_DIFF
            self.flags = ImageFlags.DIFF
        self.size, self.size_source = self._decide_size(self.footer)
        self._parse_parent(self.header, max(self.fsize, self.f.size()))
        self._rescan()

    def _rescan(self) -> None:
        self.fsize = self.f.size()
        end_len = self.fsize - self.footer_offset if self.fsize - self.footer_offset in (511, 512) else 512
        self._scan_blocks(self.fsize, end_len)

    # -- RESIZE ---------------------------------------------------------------------------------
    def _new_size_and_geometry(self, new_size: int) -> tuple[int, Geometry]:
        """Fixed and differencing disks and current-size creators keep the exact size; the others
        round up to a size their CHS geometry describes (what readers will compute)."""
        if self.disk_type == TYPE_DIFF or bytes(self.footer.creator_app) in CURRENT_SIZE_CREATORS:
            return new_size, vhd_chs(new_size)
        if self.disk_type == TYPE_FIXED:
            return new_size, fixed_geometry(new_size)
        return round_size_to_chs(new_size)

    def resize(self, new_size, progress=None):
        self.require_writable()
        if new_size <= 0 or new_size % SECTOR:
            raise InvalidArgument(f"{self.location}: new size must be a positive multiple of 512, "
                                  f"found {new_size}")
        if new_size > MAX_VIRTUAL:
            raise InvalidArgument(f"{self.location}: VHD images can be at most {MAX_VIRTUAL} bytes")
        size, geo = self._new_size_and_geometry(new_size)
        prog = Progress(progress, 1)
        prog.start()
        if size < self.size:
            self._refuse_cut_data(size)
        if self.is_fixed:
            self._resize_fixed(size)
        else:
            self._resize_dynamic(size, prog)
        self.footer.current_size = size
        self.footer.cylinders, self.footer.heads, self.footer.sectors = geo
        if self.is_fixed:
            self._write_footer_at(self.footer_offset)
            self.footer = FOOTER.parse(self._footer_bytes())
        else:
            self._store_footer()
        self.size = size
        self.pchs = Geometry(*geo)
        self.size_rounded_from = new_size if size != new_size else None
        if not self.is_fixed:
            shrunk = self.n_blocks > ceil_div(size, self.block_size)
            self.n_blocks = ceil_div(size, self.block_size)
            del self.bat[self.n_blocks:]
            self._rescan()
            if shrunk:
                self._pack()              # the dropped tail blocks leave holes: close them
        prog.finish()

    def _resize_fixed(self, size: int) -> None:
        old_footer = self.footer_offset
        self.footer.current_size = size
        if size > old_footer:
            require_space(self.location, size - old_footer, "the grown fixed image")
            preallocate(self.f, old_footer + FOOTER_SIZE, size - old_footer)
            # the new footer goes first, then the old one (now inside the data) is zeroed
            self.f.pwrite(size, self._footer_bytes())
            self.f.pwrite(old_footer, bytes(FOOTER_SIZE))
            self.f.truncate(size + FOOTER_SIZE)
        else:
            self.f.pwrite(size, self._footer_bytes())
            self.f.truncate(size + FOOTER_SIZE)
        self.footer_offset = size
        self.fsize = size + FOOTER_SIZE

    def _resize_dynamic(self, size: int, prog: Progress) -> None:
        need = ceil_div(size, self.block_size)
        old = self.n_blocks
        if need <= old:
            for i in range(need, old):       # blocks beyond the new end (holding zeroes) go
                if self.bat[i] != FREE:
                    self._set_bat(i, FREE)
            return
        table_end = self.bat_offset + _round(need * 4)
        # everything in the way of the longer table moves to the end of the file
        if any(s < table_end and e > self.bat_offset + old * 4
               for s, e, n in self._meta_regions() if n in ("footer copy", "dynamic disk header")):
            raise NotSupported(f"{self.location}: the dynamic header follows the BAT; cannot grow it")
        for i in range(old):
            e = self.bat[i]
            if e != FREE and i not in self._bad and e * SECTOR < table_end and \
                    e * SECTOR + self.total > self.bat_offset:
                self._move_block(i, _round(max(self.footer_offset, table_end)))
        for li in range(8):
            loc = self.header.locators[li]        # fresh: _store_header replaces the header
            if bytes(loc.code) == b"\x00\x00\x00\x00" or not loc.data_length:
                continue
            if loc.data_offset < table_end and loc.data_offset + loc.data_length > self.bat_offset + old * 4:
                data = self.f.pread(loc.data_offset, min(loc.data_length, MAX_LOCATOR))
                space = _round(max(len(data), LOCATOR_SPACE))
                pos = _round(max(self.footer_offset, table_end))
                self._write_footer_at(pos + space)
                self.f.pwrite(pos, data)
                self.footer_offset = pos + space
                loc.data_offset, loc.data_space = pos, space
                self._store_header()
        if self.footer_offset < table_end:          # an empty disk: the footer moves out first
            self._write_footer_at(table_end)
            self.footer_offset = table_end
        # the new table entries (free), then the header's entry count
        self.f.pwrite(self.bat_offset + old * 4, b"\xff" * (_round(need * 4) - old * 4))
        self.bat.extend([FREE] * (need - old))
        if self.header.max_table_entries < need:
            self.header.max_table_entries = need
            self._store_header()
        self.n_blocks = need

    def _move_block(self, idx: int, dest: int) -> None:
        """Copy block ``idx`` to ``dest`` (at or past the footer: footer moves first), then
        repoint its BAT entry: the old copy stays valid until the entry changes."""
        src = self.bat[idx] * SECTOR
        if dest >= self.footer_offset:
            self._write_footer_at(dest + self.total)
            self.footer_offset = dest + self.total
        pos = 0
        while pos < self.total:
            k = min(4 << 20, self.total - pos)
            self.f.pwrite(dest + pos, self.f.read_exact(src + pos, k, f"block {idx}"))
            pos += k
        self._set_bat(idx, dest // SECTOR)
        self._bitmaps.pop(idx, None)

    # -- COMPACT --------------------------------------------------------------------------------
    def compact(self, progress=None, parent_read=None):
        self.require_writable()
        if self.is_fixed:
            raise NotSupported(f"{self.location}: a fixed VHD cannot be compacted")
        if self._bad:
            raise self._corrupt("the block allocation table is damaged; run check --repair first")
        alloc = [i for i in range(self.n_blocks) if self.bat[i] != FREE]
        prog = Progress(progress, max(len(alloc) * 2, 1))
        prog.start()
        for idx in alloc:                           # 1. drop blocks that add nothing
            if self._block_is_redundant(idx, parent_read):
                self._set_bat(idx, FREE)
                self._bitmaps.pop(idx, None)
            prog.advance(1)
        self._pack(prog)
        prog.finish()

    def _block_is_redundant(self, idx: int, parent_read) -> bool:
        start = self.bat[idx] * SECTOR
        bm = self._bitmap(idx, start)
        vstart = idx * self.block_size
        vlen = min(self.block_size, self.size - vstart)
        for s, k, on in bitmap_runs(bm, 0, ceil_div(vlen, SECTOR)):
            if not on:
                continue
            pos, end = s * SECTOR, min((s + k) * SECTOR, vlen)
            while pos < end:
                n = min(4 << 20, end - pos)
                data = self.f.read_exact(start + self.bm_size + pos, n, f"data of block {idx}")
                if self.is_diff:
                    if parent_read is None or parent_read(vstart + pos, n) != data:
                        return False
                elif not is_zero(data):
                    return False
                pos += n
        return True

    def _pack(self, prog: Progress | None = None) -> None:
        """Close the holes: move the last blocks into the lowest holes before them, then the
        parent locators that lie past the last block, then the footer down, and truncate.
        Every move copies first and repoints (BAT entry / header) after: interruption-safe."""
        meta = [(a, b) for a, b, _n in self._meta_regions()]
        blocks = [(self.bat[i] * SECTOR, self.total, i) for i in range(self.n_blocks)
                  if self.bat[i] != FREE and i not in self._bad]
        holes = holes_between(meta + [(a, a + n) for a, n, _i in blocks])

        def repoint(moves):
            self._set_bats({m.key: m.dst // SECTOR for m in moves})
            for m in moves:
                self._bitmaps.pop(m.key, None)

        # copies into holes (unreferenced), sync, BAT entries, sync (compaction.move_blocks)
        move_blocks(self.f, plan_moves(blocks, holes, SECTOR), repoint,
                    advance=(lambda _n: prog.advance(1)) if prog else None)
        # parent locators beyond the last block move down too (they would pin the file's end)
        block_ends = [self.bat[i] * SECTOR + self.total for i in range(self.n_blocks)
                      if self.bat[i] != FREE and i not in self._bad]
        fixed_meta = [(a, b) for a, b, n in self._meta_regions() if not n.startswith("parent")]
        floor = max([b for _a, b in fixed_meta] + block_ends)
        for li in range(8):
            loc = self.header.locators[li]        # fresh: _store_header replaces the header
            regs = {n: (a, b) for a, b, n in self._meta_regions()}
            if f"parent locator {li}" not in regs:
                continue
            a, b = regs[f"parent locator {li}"]
            if a < floor:
                continue
            others = [r for n, r in regs.items() if n != f"parent locator {li}"]
            for h0, h1 in holes_between(others + [(a, a)] + [(x - self.total, x) for x in block_ends]):
                dest = _round(h0)
                if dest + (b - a) <= min(h1, a) and dest >= FOOTER_SIZE:
                    data = self.f.read_exact(a, loc.data_length, f"parent locator {li}")
                    self.f.pwrite(dest, data + bytes(_round(len(data)) - len(data)))
                    loc.data_offset = dest
                    loc.data_space = max(loc.data_space, _round(len(data))) \
                        if loc.data_space <= MAX_LOCATOR else _round(len(data))
                    self._store_header()
                    break
        ends = [b for _a, b, _n in self._meta_regions()] + block_ends
        new_end = _round(max(ends))
        if new_end < self.footer_offset:
            self._write_footer_at(new_end)
            self.f.truncate(new_end + FOOTER_SIZE)
            self.footer_offset = new_end
        self._rescan()

    # -- CHECK / REPAIR -------------------------------------------------------------------------
    def check(self, repair=False, dry_run=False, progress=None):
        """VirtualBox's vhdRepair checks: footer (backup copy, checksum), dynamic header checksum,
        BAT entries past the end, over metadata or over each other, blocks running into the
        footer; plus parent locators outside the file and unreferenced space (leaks).
        Repair order: BAT, header, footer; then leaks are closed by moving blocks down."""
        fix = repair and not dry_run
        if fix:
            self.require_writable()
        rep = CheckReport()
        prog = Progress(progress, 4)
        prog.start()
        header_fix = False
        bad_locators = set(getattr(self, "_bad_locators", ()))
        for p in self._problems:                 # what to fix follows the codes, not the words
            rep.problems.append(Problem(p.severity, p.what, p.offset, code=p.code))
            if p.code in (ProblemCode.PARENT_LOCATOR, ProblemCode.HEADER_CHECKSUM):
                header_fix = True
        prog.advance(1)
        bat_fix: list[int] = []
        if not self.is_fixed:
            for idx, why in sorted(self._bad.items()):
                rep.problems.append(Problem("corrupt", why, self.bat_offset + 4 * idx,
                                            code=self._bad_code[idx]))
                bat_fix.append(idx)
            for idx in self._intersects_footer:
                rep.problems.append(Problem(
                    "corrupt", f"the block of BAT entry {idx} runs into the footer",
                    self.bat[idx] * SECTOR, code=ProblemCode.OVERLAP))
            for off, n, what in self._find_leaks():
                rep.problems.append(Problem("leak", what, off, code=ProblemCode.LEAK))
                rep.orphans.append((self.location, off, n))
        prog.advance(1)
        if fix and rep.problems:
            for idx in bat_fix:                      # BAT first, header next, footer last
                self._set_bat(idx, FREE)
                self._bitmaps.pop(idx, None)
            if header_fix:
                for i, loc in enumerate(self.header.locators):
                    if i in bad_locators:
                        loc.code, loc.data_space, loc.data_length, loc.data_offset = b"\0" * 4, 0, 0, 0
                self._store_header()
            if not self.is_fixed:
                self._rescan()
                self.footer_offset = max(self.footer_offset, self.used_end)
            self._store_footer()
            if not self.is_fixed and self.f.size() > self.footer_offset + FOOTER_SIZE:
                self.f.truncate(self.footer_offset + FOOTER_SIZE)
            self._problems = []
            self.footer_from = "end"
            still = set()
            if not self.is_fixed:
                self._rescan()
                if self._find_leaks():
                    self._pack()
                still = {off for off, _n, _w in self._find_leaks()}
                if self.disk_type == TYPE_DIFF:
                    self._parse_parent(self.header, self.f.size())
            for p in rep.problems:
                p.repaired = not (p.severity == "leak" and p.offset in still)
            rep.repaired = True
        prog.finish()
        return rep

    def _find_leaks(self) -> list[tuple[int, int, str]]:
        """Unreferenced file ranges large enough to hold a block (e.g. left by an interrupted
        allocation or a dropped block)."""
        out = []
        regions = sorted([(s, e) for s, e, _n in self._meta_regions()] +
                         [(self.bat[i] * SECTOR, self.bat[i] * SECTOR + self.total)
                          for i in range(self.n_blocks) if self.bat[i] != FREE and i not in self._bad])
        cur = 0
        for s, e in regions + [(self.footer_offset, self.footer_offset)]:
            if s - cur >= self.total:
                out.append((cur, s - cur, f"{s - cur} unreferenced bytes at {cur:#x} (room for "
                            f"{(s - cur) // self.total} block(s))"))
            cur = max(cur, e)
        return out


def _parent_time(parent: Image) -> int:
    """The parent's modification time (VHD specification: "Parent Time Stamp")."""
    try:
        return vhd_time(os.stat(parent.location).st_mtime)
    except OSError:
        return vhd_time()


class VhdBackend(Backend):
    name = "VHD"
    description = "Virtual Hard Disk (Virtual PC / Hyper-V)"
    aliases = ("vpc",)
    qemu_name = "vpc"
    caps = (Cap.UUID | Cap.DIFF | Cap.FILE | Cap.CREATE_FIXED | Cap.CREATE_DYNAMIC | Cap.ASYNC
            | Cap.VFS | Cap.PREFERRED)
    extensions = (FileExtension("vhd", DeviceType.HARD_DISK),)
    operations = frozenset({Operation.WRITE, Operation.CREATE, Operation.COMPACT, Operation.RESIZE,
                            Operation.CHECK, Operation.REPAIR, Operation.RELINK})
    create_flags = ImageFlags.FIXED
    max_size = MAX_VIRTUAL
    size_granularity = SECTOR
    can_shrink = True

    def probe(self, src: ProbeInput) -> int:
        best = 0
        for raw in (src.tail[-FOOTER_SIZE:] if len(src.tail) >= FOOTER_SIZE else b"",
                    src.head[:FOOTER_SIZE] if len(src.head) >= FOOTER_SIZE else b"",
                    (src.tail[-(FOOTER_SIZE - 1):] + b"\x00") if len(src.tail) >= FOOTER_SIZE - 1 else b""):
            if len(raw) == FOOTER_SIZE and raw[:8] == COOKIE:
                ok = int.from_bytes(raw[64:68], "big") == checksum(raw, FOOTER_CHECKSUM_AT)
                t = int.from_bytes(raw[60:64], "big")
                best = max(best, 100 if ok and t in TYPE_NAMES else 85)
        return best

    def open(self, location, flags=OpenFlags.NORMAL, config=None):
        ro = flags.read_only
        f = ImageFile(location, writable=not ro)
        try:
            return VhdImage(self, location, f, ro, flags)
        except BaseException:
            f.close()
            raise

    def create(self, p: CreateParams):
        fixed = bool(p.flags & ImageFlags.FIXED)
        diff = p.parent is not None
        if fixed and diff:
            raise NotSupported("a differencing VHD cannot be fixed")
        if p.size <= 0 or p.size % SECTOR:
            raise InvalidArgument(f"{p.location}: VHD size must be a positive multiple of 512, "
                                  f"found {p.size}")
        if p.size > MAX_VIRTUAL:
            raise InvalidArgument(f"{p.location}: VHD images can be at most {MAX_VIRTUAL} bytes")
        if fixed or diff:
            size, geo = p.size, vhd_chs(p.size) if diff else fixed_geometry(p.size)
        else:
            size, geo = round_size_to_chs(p.size)
        uid = p.uuid or uuidlib.uuid4()
        footer = dict(cookie=COOKIE, features=2, version=0x00010000,
                      data_offset=NO_OFFSET if fixed else FOOTER_SIZE, timestamp=vhd_time(),
                      creator_app=CREATOR_APP, creator_version=CREATOR_VERSION,
                      creator_os=CREATOR_OS, original_size=size, current_size=size,
                      cylinders=geo.cylinders, heads=geo.heads, sectors=geo.sectors,
                      disk_type=TYPE_FIXED if fixed else TYPE_DIFF if diff else TYPE_DYNAMIC,
                      checksum=0, unique_id=uid.bytes_le, saved_state=0, reserved=bytes(427))
        fraw = _with_checksum(FOOTER.build(footer), FOOTER_CHECKSUM_AT)
        if p.progress:
            p.progress(0, size)
        f = ImageFile.create_temp(p.location)
        try:
            if fixed:
                f.truncate(size + FOOTER_SIZE)
                preallocate(f, 0, size + FOOTER_SIZE)
                f.pwrite(size, fraw)
            else:
                n = ceil_div(size, DEFAULT_BLOCK)
                bat_off = FOOTER_SIZE + HEADER_SIZE
                end = bat_off + _round(n * 4)
                hdr = dict(cookie=DYN_COOKIE, data_offset=NO_OFFSET, table_offset=bat_off,
                           version=0x00010000, max_table_entries=n, block_size=DEFAULT_BLOCK,
                           checksum=0, parent_uuid=bytes(16), parent_timestamp=0, reserved1=0,
                           parent_name=bytes(512),
                           locators=[dict(code=b"\x00" * 4, data_space=0, data_length=0,
                                          reserved=0, data_offset=0)] * 8,
                           reserved2=bytes(256))
                f.pwrite(bat_off, b"\xff" * _round(n * 4))
                f.pwrite(FOOTER_SIZE, _with_checksum(DYN_HEADER.build(hdr), HEADER_CHECKSUM_AT))
                f.pwrite(0, fraw)
                f.pwrite(end, fraw)
            img = VhdImage(self, f.path, f, False)
            if diff:
                img.set_parent(p.parent)      # locators, parent name, UUID, timestamp
            if size != p.size:
                img.size_rounded_from = p.size
            if p.progress:
                p.progress(size, size)
            f.sync()                    # complete on disk before it appears under its name
            f.commit()
            img.location = p.location
        except BaseException:
            f.abandon()
            raise
        return img


BACKEND = VhdBackend()
