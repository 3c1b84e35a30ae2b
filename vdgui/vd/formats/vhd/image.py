"""VhdImage: one opened VHD (fixed, dynamic or differencing): footer and dynamic header,
parent locators, BAT and block bitmaps, reads, writes, metadata setters, relink. Resize,
compact and check are the mixin of :mod:`.maintenance`."""
from __future__ import annotations

import array
import bisect
import os
import uuid as uuidlib
from typing import TYPE_CHECKING

from ...align import ceil_div
from ...backend import Backend, ImageFlags, OpenFlags
from ...errors import InvalidArgument, NotSupported, require_text
from ...fileio import ImageFile, relative_name
from ...geometry import Geometry
from ...image import Alloc, FillFn, Image, ParentHint, Problem, ProblemCode
from ...runs import RunList
from ...sparse import is_zero, nonzero_runs, split_blocks, zeroes
from ...tables import BlockTable, read_table
from .fields import (
    _decode_utf16,
    _iso,
    _mac_url_to_path,
    _parent_time,
    _round,
    _with_checksum,
    bitmap_runs,
    checksum,
    fixed_geometry,
    set_bits,
)
from .layout import (
    COOKIE,
    CURRENT_SIZE_CREATORS,
    DYN_COOKIE,
    DYN_HEADER,
    FOOTER,
    FOOTER_CHECKSUM_AT,
    FOOTER_SIZE,
    FREE,
    HEADER_CHECKSUM_AT,
    HEADER_SIZE,
    LOCATOR_SPACE,
    MAX_BLOCK,
    MAX_GEOMETRY,
    MAX_LOCATOR,
    MAX_READ_VIRTUAL,
    SECTOR,
    TYPE_DIFF,
    TYPE_DYNAMIC,
    TYPE_FIXED,
    TYPE_NAMES,
    Container,
)
from .state import VhdState

if TYPE_CHECKING:
    from .maintenance import MaintenanceMixin
else:   # resize, compact, discard and check load on first use (most commands use none)
    from ...later import later
    MaintenanceMixin = later(f"{__package__}.maintenance", "MaintenanceMixin",
                             "_new_size_and_geometry resizes_in_place resize _resize_fixed "
                             "_resize_dynamic _move_out_of compact discard close_holes "
                             "_block_is_redundant _pack check _find_leaks")

_FOOTER_FIELDS = tuple(sc.name for sc in FOOTER.subcons)


class VhdImage(MaintenanceMixin, VhdState):
    """One opened VHD file (fixed, dynamic or differencing)."""

    def __init__(
        self,
        backend: Backend,
        location: str,
        f: ImageFile,
        read_only: bool,
        flags: OpenFlags = OpenFlags.NORMAL,
    ) -> None:
        super().__init__(backend, location, f, read_only)
        self.honor_zeroes = False
        self.open_flags = flags
        self.size_rounded_from = None
        self._problems = []  # found while opening, reported by check()
        self._bitmaps = {}
        self._bad = {}
        self._alloc_cache = None
        self._footer_cache: tuple[tuple, bytes] | None = None
        self._end_known: tuple[int, int] | None = None  # (footer offset, file end) after appends
        self.header = None
        self.bat = array.array("I")
        self.n_blocks = 0
        self._load()

    # -- opening --------------------------------------------------------------------------------
    def _read_footer_at(
        self, offset: int, length: int = FOOTER_SIZE
    ) -> tuple[Container | None, bool, bytes]:
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
            raise self._corrupt(
                "file is too small to hold a VHD footer",
                expected=f"at least {FOOTER_SIZE} bytes",
                found=f"{fsize} bytes",
            )
        end_len = FOOTER_SIZE
        end, end_ok, _ = (
            self._read_footer_at(fsize - FOOTER_SIZE)
            if fsize >= FOOTER_SIZE
            else (None, False, b"")
        )
        if end is None and fsize >= FOOTER_SIZE - 1:
            # Virtual PC before 2004 wrote a 511-byte footer (VHD specification, "Hard Disk Footer")
            alt, alt_ok, _ = self._read_footer_at(fsize - (FOOTER_SIZE - 1), FOOTER_SIZE - 1)
            if alt is not None:
                end, end_ok, end_len = alt, alt_ok, FOOTER_SIZE - 1
        head, head_ok, _ = self._read_footer_at(0) if fsize >= FOOTER_SIZE else (None, False, b"")
        if head is not None and head.disk_type not in (TYPE_DYNAMIC, TYPE_DIFF):
            head, head_ok = None, False  # fixed disks have no copy: these are guest bytes
        self.footer_from = "end"
        if end is not None and end_ok:
            footer = end
        elif head is not None and head_ok:
            footer = head
            self.footer_from = "copy at offset 0"
            state = "damaged (bad checksum)" if end is not None else "missing"
            self._problems.append(
                Problem(
                    "corrupt",
                    f"footer at the end of the file is {state}; the copy at offset 0 is used",
                    offset=fsize - end_len,
                    code=ProblemCode.FOOTER,
                )
            )
        elif end is not None:
            footer = end
            self._problems.append(
                Problem(
                    "corrupt",
                    "footer checksum is wrong (expected "
                    f"{checksum(FOOTER.build(end), FOOTER_CHECKSUM_AT):#010x}, "
                    f"found {end.checksum:#010x})",
                    offset=fsize - end_len,
                    code=ProblemCode.FOOTER,
                )
            )
        elif head is not None:
            footer = head
            self.footer_from = "copy at offset 0"
            self._problems.append(
                Problem(
                    "corrupt",
                    "footer at the end of the file is missing and the copy at offset 0 has a "
                    "wrong checksum; the copy is used",
                    offset=0,
                    code=ProblemCode.FOOTER,
                )
            )
        else:
            raise self._corrupt(
                "no VHD footer (cookie 'conectix') at the end of the file or at offset 0",
                field="cookie",
                offset=max(fsize - FOOTER_SIZE, 0),
                expected="b'conectix'",
                found=repr(self.f.pread(max(fsize - FOOTER_SIZE, 0), 8)),
            )
        self.footer = footer
        fbase = 0 if self.footer_from != "end" else fsize - end_len  # for error offsets
        if footer.disk_type not in TYPE_NAMES:
            raise self._corrupt(
                "unknown disk type",
                field="disk type",
                offset=fbase + 60,
                expected="2 (fixed), 3 (dynamic) or 4 (differencing)",
                found=footer.disk_type,
            )
        self.disk_type = footer.disk_type
        if head is not None and self.footer_from == "end" and self.disk_type != TYPE_FIXED:
            if FOOTER.build(head) != FOOTER.build(footer):
                # both copies valid, only the size differing: a grow stopped between its two
                # footer writes; the end footer's size holds (each copy's size is readable)
                sized = ("current_size", "cylinders", "heads", "sectors", "checksum")
                only_size = all(head[k] == footer[k] for k in footer if k not in sized
                                and not k.startswith("_"))
                self._problems.append(
                    Problem(
                        "leak" if only_size else "corrupt",
                        "the footer copy at offset 0 names another size than the footer at "
                        "the end (a resize was interrupted)" if only_size else
                        "the footer copy at offset 0 differs from the footer at the end",
                        offset=0,
                        code=ProblemCode.FOOTER,
                    )
                )
        elif head is None and self.disk_type != TYPE_FIXED:
            self._problems.append(
                Problem(
                    "corrupt",
                    "the footer copy at offset 0 is missing or damaged",
                    offset=0,
                    code=ProblemCode.FOOTER,
                )
            )
        self.uuid = uuidlib.UUID(bytes_le=bytes(footer.unique_id))
        if self.uuid.int == 0:
            self.uuid = None
        self.pchs = Geometry(footer.cylinders, footer.heads, footer.sectors)
        self.lchs = None
        self.size, self.size_source = self._decide_size(footer)
        if self.size > MAX_READ_VIRTUAL and self.disk_type != TYPE_FIXED:
            raise self._corrupt(
                "virtual size is larger than a VHD can be",
                field="current size" if self.size_source != "geometry" else "geometry",
                offset=fbase + (48 if self.size_source != "geometry" else 56),
                expected=f"at most {MAX_READ_VIRTUAL}",
                found=self.size,
            )
        if self.disk_type == TYPE_FIXED:
            self.flags = ImageFlags.FIXED
            self.block_size = SECTOR
            self.footer_offset = fsize - end_len
            if self.size > self.footer_offset:
                raise self._corrupt(
                    "fixed disk is shorter than its virtual size (truncated?)",
                    field="current size",
                    offset=fbase + 48,
                    expected=f"at most {self.footer_offset} bytes of data",
                    found=self.size,
                )
            return
        self.flags = ImageFlags.DIFF if self.disk_type == TYPE_DIFF else ImageFlags.NONE
        self._load_dynamic(fsize, end_len)

    def _decide_size(self, footer: Container) -> tuple[int, str]:
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
            raise self._corrupt(
                "dynamic disk header lies outside the file or over the footer copy",
                field="data offset",
                offset=16,
                expected=f"{FOOTER_SIZE}..{fsize - HEADER_SIZE}",
                found=hoff,
            )
        raw = self.f.read_exact(hoff, HEADER_SIZE, "dynamic disk header")
        if raw[:8] != DYN_COOKIE:
            raise self._corrupt(
                "dynamic disk header cookie is wrong",
                field="cookie",
                offset=hoff,
                expected="b'cxsparse'",
                found=repr(raw[:8]),
            )
        hdr = DYN_HEADER.parse(raw)
        self.header = hdr
        self.header_offset = hoff
        good = checksum(raw, HEADER_CHECKSUM_AT)
        if hdr.checksum != good:
            self._problems.append(
                Problem(
                    "corrupt",
                    f"dynamic disk header checksum is wrong (expected {good:#010x}, found "
                    f"{hdr.checksum:#010x})",
                    offset=hoff + HEADER_CHECKSUM_AT,
                    code=ProblemCode.HEADER_CHECKSUM,
                )
            )
        bs = hdr.block_size
        if bs < SECTOR or bs > MAX_BLOCK or bs & (bs - 1):
            raise self._corrupt(
                "block size must be a power of two between 512 bytes and 256 MiB",
                field="block size",
                offset=hoff + 32,
                found=bs,
            )
        self.block_size = bs
        self.spb = bs // SECTOR  # sectors per block
        self.bm_size = _round(ceil_div(self.spb, 8))  # bitmap, padded to a sector
        self.total = self.bm_size + bs
        self.n_blocks = ceil_div(self.size, bs)
        if hdr.max_table_entries < self.n_blocks:
            raise self._corrupt(
                "the block allocation table is too small for the virtual size",
                field="max table entries",
                offset=hoff + 28,
                expected=f"at least {self.n_blocks}",
                found=hdr.max_table_entries,
            )
        self.bat_offset = hdr.table_offset
        if self.bat_offset + self.n_blocks * 4 > fsize:
            raise self._corrupt(
                "block allocation table lies past the end of the file",
                field="table offset",
                offset=hoff + 16,
                expected=f"a table of {self.n_blocks} entries inside {fsize} bytes",
                found=self.bat_offset,
            )
        bat_end = self.bat_offset + self.n_blocks * 4
        if self.n_blocks and (
            self.bat_offset < FOOTER_SIZE
            or (self.bat_offset < hoff + HEADER_SIZE and hoff < bat_end)
        ):
            raise self._corrupt(
                "block allocation table overlaps the footer copy or the dynamic disk header",
                field="table offset",
                offset=hoff + 16,
                expected=f"a table clear of 0..{FOOTER_SIZE} and {hoff:#x}.."
                f"{hoff + HEADER_SIZE:#x}",
                found=self.bat_offset,
            )
        self.bat = read_table(
            self.f, self.bat_offset, self.n_blocks, "I", True, "block allocation table"
        )
        self._parse_parent(hdr, fsize)
        self._scan_blocks(fsize, end_len)

    @staticmethod
    def _locator_region(loc: Container) -> tuple[int, int]:
        """The bytes a locator uses (its data, rounded to a sector). The reserved space field is
        not trusted: writers disagree on its unit (the spec says sectors, everyone writes bytes)."""
        return loc.data_offset, loc.data_offset + _round(max(loc.data_length, 1))

    def _parse_parent(self, hdr: Container, fsize: int) -> None:
        self.locators = []
        self._bad_locators = set()  # indexes repair clears (PARENT_LOCATOR)
        for i, loc in enumerate(hdr.locators):
            code = bytes(loc.code)
            if code == b"\x00\x00\x00\x00":
                continue
            if loc.data_length == 0:
                continue
            if loc.data_length > MAX_LOCATOR or loc.data_offset + loc.data_length > fsize:
                self._problems.append(
                    Problem(
                        "corrupt",
                        f"parent locator {i} ({code!r}) data lies outside the file or is "
                        f"too long ({loc.data_length} bytes at {loc.data_offset:#x})",
                        offset=self.header_offset + 576 + 24 * i,
                        code=ProblemCode.PARENT_LOCATOR,
                    )
                )
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
                continue  # "Mac " is a Mac OS alias record: not a path
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
        regs = [
            (0, FOOTER_SIZE, "footer copy"),
            (self.header_offset, self.header_offset + HEADER_SIZE, "dynamic disk header"),
            (
                self.bat_offset,
                self.bat_offset + _round(max(self.n_blocks * 4, 1)),
                "block allocation table",
            ),
        ]
        for i, loc in enumerate(self.dyn_header.locators):
            if (
                bytes(loc.code) != b"\x00\x00\x00\x00"
                and loc.data_length
                and loc.data_length <= MAX_LOCATOR
                and loc.data_offset + loc.data_length <= self.fsize
            ):
                s, e = self._locator_region(loc)
                regs.append((s, e, f"parent locator {i}"))
        return regs

    def _scan_blocks(self, fsize: int, end_len: int) -> None:
        """Validate BAT entries: inside the file, clear of metadata and of each other."""
        self._bad = {}
        self.write_refusal = None
        self._bad_code = {}
        self._intersects_footer = []
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
                self._bad[idx] = (
                    f"BAT entry {idx} points past the end of the file (block at "
                    f"{start:#x}..{end:#x}, file size {fsize:#x})"
                )
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
                self._bad[idx] = (
                    f"BAT entry {idx} (block at {start:#x}) overlaps the block of "
                    f"BAT entry {prev_idx}"
                )
                self.write_refusal = (
                    self.write_refusal
                    or f"BAT entries {prev_idx} and {idx} name overlapping blocks (at {start:#x})"
                )
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
            d["bat_entries"] = self.dyn_header.max_table_entries
            d["allocated_blocks"] = sum(1 for e in self.bat if e != FREE)
        if self.disk_type == TYPE_DIFF:
            d["parent_name"] = self.parent_name
            d["parent_timestamp"] = _iso(self.dyn_header.parent_timestamp)
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
            raise self._corrupt(
                self._bad[idx] + "; run check --repair",
                field="BAT",
                offset=self.bat_offset + 4 * idx,
            )
        return e * SECTOR

    def _bitmap(self, idx: int, start: int) -> bytearray:
        bm = self._bitmaps.get(idx)
        if bm is None:
            if len(self._bitmaps) > 512:
                self._bitmaps.clear()
            bm = bytearray(self.f.read_exact(start, self.bm_size, f"sector bitmap of block {idx}"))
            self._bitmaps[idx] = bm
        return bm

    def block_status(self, offset: int, length: int) -> list[tuple[int, int, Alloc]]:
        if self.is_fixed:
            return self._fixed_status(offset, length)
        runs: RunList[Alloc] = RunList()
        add = runs.add
        end = offset + length
        bs = self.block_size
        allocated = self._allocated_indices()
        pos = offset
        while pos < end:
            idx, inner = divmod(pos, bs)
            start = self._block_start(idx)
            if start is None:  # skip to the next allocated block at once
                k = bisect.bisect_left(allocated, idx)
                nxt = allocated[k] * bs if k < len(allocated) else end
                stop = min(max(nxt, pos + 1), end)
                add(pos, stop - pos, Alloc.UNALLOCATED)
                pos = stop
                continue
            n = min(bs - inner, end - pos)
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
            self._alloc_cache = (
                (id(self.bat), len(self.bat)),
                [i for i, e in enumerate(self.bat) if e != FREE],
            )
        return self._alloc_cache[1]

    def _fixed_status(self, offset: int, length: int) -> list[tuple[int, int, Alloc]]:
        """Holes of a sparse fixed disk read as unallocated (so copies stay sparse)."""
        raw = self.f.data_runs(offset, length)
        if raw is None:
            return [(offset, length, Alloc.DATA)]
        runs: RunList[Alloc] = RunList()

        def add(a: int, b: int, st: Alloc) -> None:
            runs.add(a, b - a, st)

        for a, b, is_data in raw:
            if is_data:
                add(a, b, Alloc.DATA)
                continue
            ia, ib = _round(a), b - b % SECTOR  # only whole sectors are holes
            if ib > ia:
                add(a, ia, Alloc.DATA)
                add(ia, ib, Alloc.UNALLOCATED)
                add(ib, b, Alloc.DATA)
            else:
                add(a, b, Alloc.DATA)
        return runs.runs or [(offset, length, Alloc.DATA)]

    def read(self, offset: int, length: int) -> bytes:
        if self.is_fixed:
            data = self.f.pread(offset, length)
            return data + bytes(length - len(data)) if len(data) < length else data
        parts = []
        for idx, inner, _pos, n in split_blocks(offset, length, self.block_size):
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
                parts.append(
                    self.f.read_exact(base + s * SECTOR, ln, f"data of block {idx}")
                    if on
                    else zeroes(ln)
                )
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def stored_runs(self, offset: int, length: int) -> list[tuple[ImageFile, int, int]] | None:
        return [(self.f, offset, length)] if self.is_fixed and self.f.kernel_copy else None

    def flat_file(self) -> ImageFile | None:
        ok = self.is_fixed and not self.read_only and self.f.kernel_copy
        return self.f if ok else None

    @property
    def sparse_writes(self) -> bool:
        """A dynamic base disk stores only the non-zero pieces of new blocks (see _allocate)."""
        return self.disk_type == TYPE_DYNAMIC and not self.honor_zeroes

    def write(self, offset: int, data: bytes, fill: FillFn | None) -> None:
        self.require_writable()
        self._refuse_cross_linked()
        if self.is_fixed:
            self.f.pwrite(offset, data)
            return
        mv = memoryview(data)
        new: list[tuple[int, int, memoryview]] = []
        for idx, inner, pos, n in split_blocks(offset, len(mv), self.block_size):
            chunk = mv[pos - offset : pos - offset + n]
            start = self._block_start(idx)
            if start is None:
                new.append((idx, inner, chunk))  # appended together below
                continue
            first, cnt = inner // SECTOR, ceil_div(n, SECTOR)
            self.f.pwrite(start + self.bm_size + inner, chunk)  # data first
            bm = self._bitmap(idx, start)
            span = set_bits(bm, first, cnt)
            if span:
                self.f.pwrite(start + span[0], bm[span[0] : span[1]])  # then the bitmap
        if new:
            self._allocate(new)

    def _file_end(self) -> int:
        """The file's length: as the last append left it while the footer has not moved since,
        else asked from the file (one fstat, not one per block)."""
        known = self._end_known
        if known is not None and known[0] == self.footer_offset:
            return known[1]
        return self.f.size()

    def _allocate(self, new: list[tuple[int, int, memoryview]]) -> None:
        """Append blocks for the ``(idx, inner, chunk)`` pieces of one write: the footer at the
        new end first, then each block's bitmap and data (neighbours in one pwritev), then the
        BAT entries (neighbours in one write). A crash at any point leaves at most unreferenced
        blocks, and the file always ends in a footer (the copy at offset 0 stays valid).

        On a base disk, blocks appended past the end of the file lie in space that reads zeroes
        already: only their non-zero 64 KiB pieces are written (the file stays sparse), and a
        piece that is all zeroes allocates nothing. This is the only zero test of the data
        (:attr:`sparse_writes`: a copy does not test before)."""
        pos = _round(self.footer_offset)
        bm_size, total = self.bm_size, self.total
        sparse = not self.is_diff
        fresh = sparse and pos + bm_size >= self._file_end()
        plan: list[tuple[int, int, int, memoryview, list[tuple[int, int]]]] = []
        for idx, inner, chunk in new:
            if fresh:
                runs = nonzero_runs(chunk, inner)
            elif sparse and not self.honor_zeroes and is_zero(chunk):
                runs = []
            else:
                runs = [(0, len(chunk))]
            if not runs and not self.honor_zeroes:
                continue  # an unallocated block of a base disk already reads zeroes
            plan.append((idx, pos + len(plan) * total, inner, chunk, runs))
        if not plan:
            return
        new_footer = pos + len(plan) * total
        self._write_footer_at(new_footer)  # (forgets the known end until all is written)
        # bitmap, data, next block's bitmap ...: neighbours in one pwritev
        pieces: list[tuple[int, bytearray | memoryview]] = []
        bitmaps = {}
        for idx, bpos, inner, chunk, runs in plan:
            bm = bytearray(bm_size)
            set_bits(bm, inner // SECTOR, ceil_div(len(chunk), SECTOR))
            bitmaps[idx] = bm
            pieces.append((bpos, bm))
            pieces += [(bpos + bm_size + inner + a,
                        chunk[a:b] if (a, b) != (0, len(chunk)) else chunk) for a, b in runs]
        self.f.pwrite_pieces(pieces)
        self._set_bats({idx: bpos // SECTOR for idx, bpos, _i, _c, _r in plan})
        if len(self._bitmaps) + len(bitmaps) > 512:
            self._bitmaps.clear()
        self._bitmaps.update(bitmaps)
        self.footer_offset = new_footer
        self.used_end = max(self.used_end, new_footer)
        self.fsize = max(self.fsize, new_footer + FOOTER_SIZE)
        self._end_known = (new_footer, new_footer + FOOTER_SIZE)

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
        # built once per content: a copy moves the footer with every block it appends
        key = tuple(self.footer.get(name) for name in _FOOTER_FIELDS)
        if self._footer_cache is None or self._footer_cache[0] != key:
            raw = _with_checksum(FOOTER.build(self.footer), FOOTER_CHECKSUM_AT)
            self._footer_cache = (key, raw)
        return self._footer_cache[1]

    def _write_footer_at(self, offset: int) -> None:
        self._end_known = None  # the file's end moves: _allocate sets it again after its writes
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
        raw = _with_checksum(DYN_HEADER.build(self.dyn_header), HEADER_CHECKSUM_AT)
        self.header = DYN_HEADER.parse(raw)
        self.f.pwrite(self.header_offset, raw)

    # -- metadata setters -----------------------------------------------------------------------
    def set_uuid(self, value: uuidlib.UUID) -> None:
        self.require_writable()
        self.footer.unique_id = value.bytes_le
        self._store_footer()
        self.uuid = value

    def set_parent_uuid(self, value: uuidlib.UUID) -> None:
        self.require_writable()
        if self.disk_type != TYPE_DIFF:
            self._no_field("a parent UUID (not a differencing disk)")
        self.dyn_header.parent_uuid = value.bytes_le
        self._store_header()
        self.parent_uuid = value
        if self.parent_hint is not None:  # set on every differencing disk
            self.parent_hint.uuid = value

    def set_pchs(self, value: Geometry) -> None:
        self.require_writable()
        c, h, s = value
        if not (0 < c <= 65535 and 0 < h <= 255 and 0 < s <= 255):
            raise InvalidArgument(
                f"{self.location}: VHD geometry must fit 65535/255/255, found {value}"
            )
        qemu_uses_chs = (
            bytes(self.footer.creator_app) not in CURRENT_SIZE_CREATORS
            and self.disk_type != TYPE_DIFF
            and (c, h, s) != MAX_GEOMETRY
        )
        if qemu_uses_chs and c * h * s * SECTOR != self.size:
            raise InvalidArgument(
                f"{self.location}: this VHD's size is defined by its geometry (creator "
                f"{bytes(self.footer.creator_app)!r}); {value} describes "
                f"{c * h * s * SECTOR} bytes, "
                f"not {self.size}"
            )
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
        self._write_footer_at(pos + need)  # the footer moves first: the file stays valid
        self.footer_offset = pos + need
        self.used_end = max(self.used_end, pos + need)
        return pos, need

    def set_parent(self, parent: Image | None) -> None:
        self.require_writable()
        if self.is_fixed:
            raise NotSupported(f"{self.location}: a fixed VHD cannot have a parent")
        hdr = self.dyn_header
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
        ppath = require_text(
            os.path.abspath(parent.location), "the parent's file name", self.location
        )
        rel = relative_name(self.location, ppath)
        rel_win = (rel if rel.startswith("..") else ".\\" + rel).replace("/", "\\")
        entries = []
        for code, text in ((b"W2ku", ppath), (b"W2ru", rel_win)):
            data = text.encode("utf-16-le")
            if len(data) > MAX_LOCATOR:
                raise InvalidArgument(f"{self.location}: parent path is too long for a VHD locator")
            off, space = self._space_for(data)
            self.f.pwrite(off, data + bytes(_round(len(data)) - len(data)))
            entries.append(
                dict(
                    code=code, data_space=space, data_length=len(data), reserved=0, data_offset=off
                )
            )
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
        self._parse_parent(self.dyn_header, max(self.fsize, self.f.size()))
        self._rescan()

    def _rescan(self) -> None:
        self.fsize = self.f.size()
        end_len = (
            self.fsize - self.footer_offset
            if self.fsize - self.footer_offset in (511, 512)
            else 512
        )
        self._scan_blocks(self.fsize, end_len)
