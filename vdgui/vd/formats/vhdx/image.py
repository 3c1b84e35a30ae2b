"""VhdxImage (headers, region table, BAT, reads, writes, discard; metadata and maintenance
from the mixins) and the VHDX backend (probe, open, create)."""
from __future__ import annotations

import struct
import uuid as uuidlib
from array import array
from typing import TYPE_CHECKING

from ...align import align_up, ceil_div
from ...backend import (
    Backend,
    CreateParams,
    ImageFlags,
    OpenFlags,
    too_large,
)
from ...compaction import punch_blocks
from ...config import parse_config
from ...errors import InvalidArgument, NotSupported, ReadOnlyImage
from ...fileio import ImageFile
from ...image import Alloc, FillFn
from ...runs import RunList
from ...space import preallocate
from ...sparse import is_zero, nonzero_runs, split_blocks, zeroes
from ...tables import BlockTable, first_nonzero, read_table, table_to_bytes
from . import VhdxBackend
from .layout import (
    BAT_GUID,
    FILE_PARAMETERS,
    FP_HAS_PARENT,
    FP_LEAVE_BLOCK_ALLOCATED,
    HEADER_OFFSETS,
    HEADER_SIZE,
    LOGICAL_SECTOR,
    MAX_REGION_ENTRIES,
    MAX_SIZE,
    MD_IS_REQUIRED,
    MD_IS_VIRTUAL_DISK,
    METADATA_GUID,
    METADATA_TABLE_SIZE,
    OFFSET_SHIFT,
    PAGE83,
    PARENT_LOCATOR,
    PAYLOAD_FULLY_PRESENT,
    PAYLOAD_NOT_PRESENT,
    PAYLOAD_PARTIALLY_PRESENT,
    PAYLOAD_UNDEFINED,
    PAYLOAD_UNMAPPED,
    PAYLOAD_ZERO,
    PHYSICAL_SECTOR,
    REGION_OFFSETS,
    REGION_SIZE,
    SB_PRESENT,
    STATE_MASK,
    STATE_NAMES,
    VIRTUAL_DISK_SIZE,
    ZERO_GUID,
    FileIdentifier,
    FileParameters,
    GiB,
    Header,
    MetadataTableEntry,
    MetadataTableHeader,
    MiB,
    RegionTableEntry,
    RegionTableHeader,
    bat_entry_count,
    checksum_ok,
    chunk_ratio,
    guid_bytes,
    guid_from_bytes,
    limit_reason,
    utf16,
    vhdx_max_size,
    with_checksum,
)
from .log import LogEntry, LogReplayNeeded, active_sequence, replay
from .metadata import MetadataMixin, build_locator, locator_for
from .state import VhdxState

if TYPE_CHECKING:
    from .maintenance import MaintenanceMixin
else:   # resize, compact and check load on first use (most commands use none)
    from ...later import later
    MaintenanceMixin = later(f"{__package__}.maintenance", "MaintenanceMixin",
                             "_relocate_bat resizes_in_place resize _in_use _shrink compact "
                             "close_holes _pack check")


def _default_block_size(size: int, diff: bool) -> int:
    if diff:
        return 2 * MiB
    return 32 * MiB if size > 100 * GiB else 8 * MiB


class VhdxImage(MetadataMixin, MaintenanceMixin, VhdxState):
    @property
    def max_size(self) -> int:
        return vhdx_max_size(self.block_size)

    def __init__(self, backend: Backend, location: str, f: ImageFile, flags: OpenFlags) -> None:
        super().__init__(backend, location, f, flags.read_only)
        self.open_flags = flags
        self._data_guid_updated = False
        self._sb_cache: dict[int, bytearray] = {}
        # blocks of a base image allocated in space added to the file by this open: BAT index
        # -> (BAT entry, offset in the block from which on nothing was written since; it reads
        # zeroes there)
        self._fresh: dict[int, tuple[int, int]] = {}
        self.log_replayed = False
        self.log_pending = False
        try:
            self._load()
        except BaseException:
            f.close()
            raise

    # -- loading -----------------------------------------------------------------------
    def _load(self) -> None:
        f = self.f
        self.file_len = f.size()
        if self.file_len < 1 * MiB:
            raise self._corrupt("file too small for a VHDX header section", field="file size",
                                expected=">= 1 MiB", found=self.file_len)
        ident = FileIdentifier.parse(f.read_exact(0, FileIdentifier.sizeof(), "file identifier"))
        if ident.signature != b"vhdxfile":
            raise self._corrupt("not a VHDX file", field="signature", offset=0,
                                expected="'vhdxfile'", found=repr(ident.signature))
        self.creator = ident.creator.decode("utf-16-le", "replace").split("\x00")[0]
        self._read_headers()
        hdr = self.hdr
        seq = active_sequence(self) if hdr.log_guid != ZERO_GUID else []
        if hdr.log_guid != ZERO_GUID and not seq:
            # a log GUID without a valid sequence: nothing to replay (qemu opens these too);
            # a read-write open clears the GUID
            if not self.read_only:
                self._update_header(log_guid=ZERO_GUID)
        elif seq:
            if self.open_flags & OpenFlags.INFO:
                self.log_pending = True
            elif self.read_only:
                raise LogReplayNeeded(
                    "the VHDX log holds changes that need to be replayed; open the image "
                    "read-write once (any read-write open, e.g. 'vdgui-img check --repair', "
                    "replays it)", path=self.location, field="LogGuid",
                    offset=HEADER_OFFSETS[self.hdr_slot] + 48)
            else:
                self._replay_log(seq)
        self._read_regions()
        self._read_metadata()
        self._read_bat()
        self.pchs = None
        self.lchs = None
        if not self.read_only:
            # MS-VHDX 2.2.2: FileWriteGuid changes on the first open for writing
            self._update_header(file_write_guid=uuidlib.uuid4().bytes_le)

    def _replay_log(self, seq: list[LogEntry]) -> None:
        """Replay the active log sequence, then clear the header's LogGuid (MS-VHDX 2.3.3)."""
        replay(self, seq)
        self._update_header(log_guid=ZERO_GUID)
        self.log_replayed = True

    def _read_headers(self) -> None:
        valid = []
        self.header_problems = []
        for slot, off in enumerate(HEADER_OFFSETS):
            raw = self.f.pread(off, HEADER_SIZE)
            if len(raw) != HEADER_SIZE:
                self.header_problems.append(f"header {slot + 1} at {off:#x} is truncated")
                continue
            h = Header.parse(raw)
            if h.signature != b"head":
                self.header_problems.append(f"header {slot + 1} at {off:#x}: bad signature "
                                            f"{bytes(h.signature)!r}")
                continue
            if not checksum_ok(raw):
                self.header_problems.append(f"header {slot + 1} at {off:#x}: checksum mismatch")
                continue
            if h.version != 1:
                self.header_problems.append(f"header {slot + 1} at {off:#x}: version {h.version}")
                continue
            valid.append((h.sequence_number, slot, h))
        if not valid:
            raise self._corrupt("no valid VHDX header (" + "; ".join(self.header_problems) + ")",
                                field="header", offset=HEADER_OFFSETS[0])
        valid.sort(key=lambda t: (t[0], t[1]))
        _seq, self.hdr_slot, self.hdr = valid[-1]
        h = self.hdr
        if h.log_version != 0 and h.log_guid != ZERO_GUID:   # 2.2.2: only matters with a log
            raise NotSupported(f"{self.location}: VHDX log version {h.log_version} is not "
                               "supported (expected 0)")
        if h.log_length % MiB or h.log_offset % MiB or (h.log_length and h.log_offset < MiB):
            raise self._corrupt("log location is not 1 MiB aligned", field="LogOffset/LogLength",
                                offset=HEADER_OFFSETS[self.hdr_slot],
                                expected="multiples of 1 MiB past the first MiB",
                                found=f"{h.log_offset:#x}/{h.log_length:#x}")

    def _update_header(self, **changes: object) -> None:
        """Write a new current header (both copies, alternating, sequence number + 1 each)."""
        if self.read_only:
            raise ReadOnlyImage(f"{self.location}: image is opened read-only")
        for _ in range(2):
            h = dict(self.hdr)
            h.pop("_io", None)
            h.update(changes)
            h["sequence_number"] = self.hdr.sequence_number + 1
            h["checksum"] = 0
            raw = with_checksum(bytearray(Header.build(h)))
            slot = 1 - self.hdr_slot
            self.f.pwrite(HEADER_OFFSETS[slot], raw)
            self.f.sync()
            self.hdr = Header.parse(bytes(raw))
            self.hdr_slot = slot

    def _read_regions(self) -> None:
        problems = []
        for i, off in enumerate(REGION_OFFSETS):
            raw = self.f.pread(off, REGION_SIZE)
            if len(raw) != REGION_SIZE:
                problems.append(f"region table {i + 1} truncated")
                continue
            rh = RegionTableHeader.parse(raw)
            if rh.signature != b"regi":
                problems.append(f"region table {i + 1}: bad signature {bytes(rh.signature)!r}")
                continue
            if not checksum_ok(raw):
                problems.append(f"region table {i + 1}: checksum mismatch")
                continue
            if rh.entry_count > MAX_REGION_ENTRIES:
                raise self._corrupt("too many region table entries", field="EntryCount",
                                    offset=off + 8, expected=f"<= {MAX_REGION_ENTRIES}",
                                    found=rh.entry_count)
            self.region_raw = raw
            self.region_table = i
            break
        else:
            raise self._corrupt("no valid region table (" + "; ".join(problems) + ")",
                                field="region table", offset=REGION_OFFSETS[0])
        self.vregions = {}
        self.region_entries = []
        for k in range(rh.entry_count):
            e = RegionTableEntry.parse(raw[16 + 32 * k:48 + 32 * k])
            g = guid_from_bytes(e.guid)
            where = REGION_OFFSETS[self.region_table] + 16 + 32 * k
            self.region_entries.append(e)
            if g not in (BAT_GUID, METADATA_GUID):
                if e.required & 1:
                    raise NotSupported(f"{self.location}: region {g} at {where:#x} is marked "
                                       "required but is unknown to this implementation")
                continue
            name = "BAT" if g == BAT_GUID else "metadata"
            if g in self.vregions:
                raise self._corrupt(f"{name} region listed twice", field="region table",
                                    offset=where)
            if e.file_offset % MiB or e.file_offset < MiB or e.length % MiB or not e.length:
                raise self._corrupt(f"{name} region is not 1 MiB aligned",
                                    field="FileOffset/Length",
                                    offset=where, expected="non-zero multiples of 1 MiB past 1 MiB",
                                    found=f"{e.file_offset:#x}/{e.length:#x}")
            if e.file_offset + e.length > self.file_len:
                raise self._corrupt(f"{name} region lies past the end of the file",
                                    field="FileOffset", offset=where,
                                    expected=f"end <= {self.file_len}",
                                    found=e.file_offset + e.length)
            self.vregions[g] = (e.file_offset, e.length)
        for g, name in ((BAT_GUID, "BAT"), (METADATA_GUID, "metadata")):
            if g not in self.vregions:
                raise self._corrupt(f"the region table has no {name} region", field="region table",
                                    offset=REGION_OFFSETS[self.region_table])

    def _read_bat(self) -> None:
        bo, bl = self.vregions[BAT_GUID]
        self.bat_offset, self.bat_length = bo, bl
        self.cr = chunk_ratio(self.sector_size, self.block_size)
        self.payload_blocks = ceil_div(self.size, self.block_size)
        self.bat_count = bat_entry_count(self.size, self.block_size, self.sector_size,
                                         self.has_parent)
        if self.bat_count * 8 > bl:
            raise self._corrupt("BAT region too small for the disk", field="BAT length",
                                offset=REGION_OFFSETS[self.region_table],
                                expected=f">= {self.bat_count * 8} bytes", found=bl)
        self._bat = None
        if not self.open_flags & OpenFlags.INFO:      # INFO opens (chain walks) skip the BAT
            self._load_bat()
        end = max(MiB, self.file_len)
        for off, ln in self.vregions.values():
            end = max(end, off + ln)
        if self.hdr.log_length:
            end = max(end, self.hdr.log_offset + self.hdr.log_length)
        self.alloc_end = align_up(end, MiB)

    # -- BAT helpers ---------------------------------------------------------------------
    def _load_bat(self) -> array[int]:
        self._bat = bat = read_table(self.f, self.bat_offset, self.bat_count, "Q", False, "BAT")
        return bat

    @property
    def bat(self) -> array[int]:
        return self._bat if self._bat is not None else self._load_bat()

    @bat.setter
    def bat(self, value: array[int]) -> None:
        self._bat = value

    def _bat_index(self, block: int) -> int:
        return block + block // self.cr

    def _sb_index(self, chunk: int) -> int:
        return chunk * (self.cr + 1) + self.cr

    def _entry(self, idx: int) -> tuple[int, int]:
        e = self.bat[idx]
        return e & STATE_MASK, (e >> OFFSET_SHIFT) * MiB

    def _block_offset(self, block: int, what: str = "payload block") -> int:
        idx = self._bat_index(block)
        _st, off = self._entry(idx)
        # the last block may be short in the file when the disk ends inside it
        need = min(self.block_size, self.size - block * self.block_size)
        if off < MiB or off + need > self.file_len:
            raise self._corrupt(f"BAT entry of {what} {block} points outside the file",
                                field=f"BAT[{idx}]", offset=self.bat_offset + 8 * idx,
                                expected=f"1 MiB <= offset, end <= {self.file_len}",
                                found=f"{off:#x}")
        return off

    def _set_entry(self, idx: int, state: int, off: int) -> None:
        self._set_entries({idx: (state, off)})

    def _set_entries(self, values: dict[int, tuple[int, int]]) -> None:
        """Set BAT entries to ``(state, file offset)`` and write them, neighbours joined."""
        t = BlockTable(self.f, self.bat_offset, self.bat)
        for idx, (state, off) in values.items():
            t[idx] = (off // MiB) << OFFSET_SHIFT | state
        t.write_back()

    def _state(self, block: int) -> int:
        return self.bat[self._bat_index(block)] & STATE_MASK

    def _sb_offset(self, chunk: int) -> int | None:
        """File offset of ``chunk``'s sector bitmap block, None when it has none."""
        idx = self._sb_index(chunk)
        if idx >= len(self.bat):
            return None
        st, off = self._entry(idx)
        if st != SB_PRESENT:
            return None
        if off < MiB or off + MiB > self.file_len:
            raise self._corrupt(f"sector bitmap block {chunk} lies outside the file",
                                field=f"BAT[{idx}]", offset=self.bat_offset + 8 * idx,
                                expected=f"end <= {self.file_len}", found=f"{off:#x}")
        return off

    def _sector_bitmap(self, chunk: int) -> bytearray | None:
        if chunk in self._sb_cache:
            return self._sb_cache[chunk]
        off = self._sb_offset(chunk)
        if off is None:
            return None
        bm = bytearray(self.f.read_exact(off, MiB, f"sector bitmap block {chunk}"))
        self._sb_cache[chunk] = bm
        return bm

    def _block_bitmap(self, block: int) -> bytes | None:
        """``block``'s own bytes of its sector bitmap (the whole bitmap block is not read)."""
        per_block = self.block_size // self.sector_size
        chunk = block // self.cr
        a = (block % self.cr) * per_block >> 3
        b = a + (per_block >> 3)
        if chunk in self._sb_cache:
            return bytes(self._sb_cache[chunk][a:b])
        off = self._sb_offset(chunk)
        if off is None:
            return None
        return self.f.read_exact(off + a, b - a, f"sector bitmap block {chunk}")

    def _partial_runs(self, block: int, inner: int, n: int) -> list[tuple[int, int, bool]]:
        """(offset in block, length, present) for a range of a PARTIALLY_PRESENT block: only
        the block's own bits are read, and walked a run at a time."""
        ss = self.sector_size
        raw = self._block_bitmap(block)
        if raw is None:
            return [(inner, n, False)]
        bits = int.from_bytes(raw, "little")        # bit i: sector i of the block
        end = inner + n
        last = ceil_div(end, ss)                    # sectors inner // ss .. last - 1
        runs: list[tuple[int, int, bool]] = []
        s = inner // ss
        while s < last:
            present = bool(bits >> s & 1)
            rest = (~bits if present else bits) >> s     # the next bit that differs
            nxt = last if rest == 0 else min(s + (rest & -rest).bit_length() - 1, last)
            pos = max(s * ss, inner)
            runs.append((pos, min(nxt * ss, end) - pos, present))
            s = nxt
        return runs

    # -- data ----------------------------------------------------------------------------
    def _status_of(self, state: int) -> Alloc | None:
        if state in (PAYLOAD_FULLY_PRESENT,):
            return Alloc.DATA
        if state == PAYLOAD_PARTIALLY_PRESENT:
            return Alloc.DATA if not self.has_parent else None  # resolved per sector
        if state == PAYLOAD_ZERO:
            return Alloc.ZERO
        if self.has_parent:
            # MS-VHDX 2.5.1.1: UNMAPPED reads as zeroes (or old contents), never the parent's
            return Alloc.ZERO if state == PAYLOAD_UNMAPPED else Alloc.UNALLOCATED
        if state in (PAYLOAD_NOT_PRESENT, PAYLOAD_UNDEFINED, PAYLOAD_UNMAPPED):
            return Alloc.UNALLOCATED
        raise self._corrupt(f"invalid payload block state {state}", field="BAT state")

    def _check_state(self, block: int) -> int:
        st = self._state(block)
        if st not in STATE_NAMES:
            idx = self._bat_index(block)
            raise self._corrupt("invalid payload block state", field=f"BAT[{idx}]",
                                offset=self.bat_offset + 8 * idx,
                                expected="0, 1, 2, 3, 6 or 7", found=st)
        return st

    def _next_used_block(self, block: int, last: int) -> int:
        """The first block of ``block..last`` whose BAT entry is not 0 (``last + 1`` if none):
        never-written blocks are skipped a chunk at a time, not one by one."""
        cr = self.cr
        bat = self.bat
        while block <= last:
            chunk, k = divmod(block, cr)
            first = chunk * (cr + 1)
            stop = first + min(cr, k + last - block + 1)
            if stop > len(bat):
                return block              # a short BAT: the per-block path says so
            idx = first_nonzero(bat, first + k, stop)
            if idx < stop:
                return chunk * cr + idx - first
            block += stop - first - k
        return last + 1

    def block_status(self, offset: int, length: int) -> list[tuple[int, int, Alloc]]:
        runs: RunList[Alloc] = RunList()
        add = runs.add
        bs = self.block_size
        end = offset + length
        last = (end - 1) // bs
        empty = self._status_of(PAYLOAD_NOT_PRESENT) or Alloc.UNALLOCATED   # a 0 entry
        pos = offset
        while pos < end:
            block, inner = divmod(pos, bs)
            used = self._next_used_block(block, last)
            if used > block:                               # never-written blocks, in one run
                stop = min(used * bs, end)
                add(pos, stop - pos, empty)
                pos = stop
                continue
            n = min(bs - inner, end - pos)
            st = self._check_state(block)
            a = self._status_of(st)
            if a is None:
                base = pos - inner
                for o, ln, present in self._partial_runs(block, inner, n):
                    add(base + o, ln, Alloc.DATA if present else Alloc.UNALLOCATED)
            else:
                add(pos, n, a)
            pos += n
        return runs.runs

    def read(self, offset: int, length: int) -> bytes:
        block, inner = divmod(offset, self.block_size)
        if inner + length <= self.block_size and \
                self._status_of(self._check_state(block)) is Alloc.DATA:
            # the common case: one present block, no copy
            return self.f.read_exact(self._block_offset(block) + inner, length,
                                     f"payload block {block}")
        out = bytearray(length)
        for block, inner, pos, n in split_blocks(offset, length, self.block_size):
            st = self._check_state(block)
            a = self._status_of(st)
            if a is Alloc.DATA:
                boff = self._block_offset(block)
                out[pos - offset:pos - offset + n] = self.f.read_exact(
                    boff + inner, n, f"payload block {block}")
            elif a is None:
                boff = self._block_offset(block)
                for o, ln, present in self._partial_runs(block, inner, n):
                    if present:
                        p = pos - inner + o - offset
                        out[p:p + ln] = self.f.read_exact(boff + o, ln, f"payload block {block}")
        return bytes(out)

    def _begin_write(self) -> None:
        self.require_writable()
        if not self._xlinks_checked:
            self._find_cross_links()
        self._refuse_cross_linked()
        if not self._data_guid_updated and not self.keep_link_identity:
            # MS-VHDX 2.2.2: DataWriteGuid changes before the first user-visible write (not in a
            # merge, which relinks the children itself: their parent_linkage must keep matching)
            self._update_header(data_write_guid=uuidlib.uuid4().bytes_le)
            self.modification_uuid = guid_from_bytes(self.hdr.data_write_guid)
            self._data_guid_updated = True

    _xlinks_checked = False

    def _fixed_spans(self) -> list[tuple[int, int, str, int | None]]:
        """(start, end, name, None) of the header section, the regions and the log."""
        spans: list[tuple[int, int, str, int | None]] = [(0, MiB, "the header section", None)]
        for g, (o, ln) in self.vregions.items():
            spans.append((o, o + ln, "the BAT region" if g == BAT_GUID else
                          "the metadata region", None))
        if self.hdr.log_length:
            spans.append((self.hdr.log_offset, self.hdr.log_offset + self.hdr.log_length,
                          "the log", None))
        return spans

    def _find_cross_links(self) -> None:
        """Once, before the first write: a present block overlapping another one or the
        metadata (check: "overlaps") refuses writes (a write would change both)."""
        self._xlinks_checked = True
        self.write_refusal = None
        spans = self._fixed_spans()
        cr, bs = self.cr, self.block_size
        for idx, e in enumerate(self.bat):
            st, off = e & STATE_MASK, (e >> OFFSET_SHIFT) * MiB
            if idx % (cr + 1) == cr:
                if st != SB_PRESENT or not self.has_parent:
                    continue
                length = MiB
            else:
                blk = idx - idx // (cr + 1)
                if st not in (PAYLOAD_FULLY_PRESENT, PAYLOAD_PARTIALLY_PRESENT) or \
                        blk >= self.payload_blocks:
                    continue
                length = align_up(min(bs, self.size - blk * bs), MiB)
            if off < MiB or off + length > self.file_len:
                continue                        # refused where it is used
            spans.append((off, off + length, f"BAT[{idx}]", idx))
        spans.sort(key=lambda t: (t[0], t[1]))
        reach, reach_name = 0, ""
        for s1, e1, n1, _i in spans:
            if s1 < reach:
                self.write_refusal = f"{n1} (at {s1:#x}) and {reach_name} overlap"
                return
            if e1 > reach:
                reach, reach_name = e1, n1

    def _allocate(self, length: int) -> int:
        off = self.alloc_end
        self.alloc_end = off + align_up(length, MiB)
        if self.alloc_end > self.file_len:
            self.f.truncate(self.alloc_end)
            self.file_len = self.alloc_end
        return off

    def _mark_sectors(self, block: int, inner: int, n: int) -> bool:
        """Set the sector bitmap bits of a write in a differencing image; True when the whole
        block is now present."""
        ss = self.sector_size
        chunk = block // self.cr
        idx = self._sb_index(chunk)
        bm = self._sector_bitmap(chunk)
        if bm is None:
            off = self._allocate(MiB)           # fresh space reads as zeroes
            self._set_entry(idx, SB_PRESENT, off)
            bm = bytearray(MiB)
            self._sb_cache[chunk] = bm
        per_block = self.block_size // ss
        first = (block % self.cr) * per_block + inner // ss
        count = n // ss
        lo, hi = first >> 3, (first + count - 1) >> 3
        for s in range(first, first + count):
            if s & 7 == 0 and first + count - s >= 8:
                bm[s >> 3] = 0xFF
            else:
                bm[s >> 3] |= 1 << (s & 7)
        sboff = self._entry(idx)[1]
        # only the changed bytes, rounded to 512 so the update stays within sector writes
        a = lo - lo % 512
        b = min(align_up(hi + 1, 512), MiB)
        self.f.pwrite(sboff + a, bytes(bm[a:b]))
        bfirst = (block % self.cr) * per_block
        seg = bm[bfirst >> 3:(bfirst + per_block) >> 3]
        return seg.count(0xFF) == len(seg)

    def write(self, offset: int, data: bytes, fill: FillFn | None) -> None:
        self._begin_write()
        mv = memoryview(data)
        new: list[tuple[int, int, memoryview]] = []
        for block, inner, pos, n in split_blocks(offset, len(data), self.block_size):
            piece = mv[pos - offset:pos - offset + n]
            st = self._check_state(block)
            idx = self._bat_index(block)
            if st == PAYLOAD_FULLY_PRESENT or (st == PAYLOAD_PARTIALLY_PRESENT
                                               and not self.has_parent):
                boff = self._block_offset(block)
                fr = self._fresh.get(idx)
                if fr is not None and fr[0] != self.bat[idx]:
                    del self._fresh[idx]
                    fr = None
                if fr is not None and inner >= fr[1]:
                    for a, b in nonzero_runs(piece, inner):   # untouched space: reads zeroes
                        self.f.pwrite(boff + inner + a, piece[a:b])
                else:
                    self.f.pwrite(boff + inner, piece)
                if fr is not None:
                    self._fresh_mark(idx, fr[0], max(fr[1], inner + n))
                continue
            if st == PAYLOAD_PARTIALLY_PRESENT:
                boff = self._block_offset(block)
                self.f.pwrite(boff + inner, piece)
                self.f.sync()
                if self._mark_sectors(block, inner, n):
                    self._set_entry(idx, PAYLOAD_FULLY_PRESENT, boff)
                continue
            if not self.has_parent:
                new.append((idx, inner, piece))     # appended together below
                continue
            zero = not self.honor_zeroes and is_zero(piece)
            whole = inner == 0 and (n == self.block_size or pos + n == self.size)
            if zero and st in (PAYLOAD_ZERO, PAYLOAD_UNMAPPED):
                continue                       # already reads as zeroes
            if zero and whole:
                self._set_entry(idx, PAYLOAD_ZERO, 0)
                continue
            boff = self._allocate(self.block_size)
            self.f.pwrite(boff + inner, piece)
            # data before the BAT entry naming it: a crash must not make the parent's content
            # (or stale bytes) appear
            self.f.sync()
            if st not in (PAYLOAD_ZERO, PAYLOAD_UNMAPPED) and not whole:
                full = self._mark_sectors(block, inner, n)
                self.f.sync()
                self._set_entry(idx, PAYLOAD_FULLY_PRESENT if full else PAYLOAD_PARTIALLY_PRESENT,
                                boff)
            else:
                self._set_entry(idx, PAYLOAD_FULLY_PRESENT, boff)
        if new:
            self._append_blocks(new)

    @property
    def sparse_writes(self) -> bool:
        """A dynamic base image stores only the non-zero pieces of new blocks (see
        _append_blocks): a copy into it need not test its data for zeroes first."""
        return not self.has_parent and not self.leave_allocated and not self.honor_zeroes

    def _append_blocks(self, new: list[tuple[int, int, memoryview]]) -> None:
        """New blocks of a base image for the ``(BAT index, inner, piece)`` of one write, laid
        end to end at the end of the file: the data (neighbours in one pwritev), the file
        extended to the last block's end when the data does not reach it, then the BAT entries
        in one write. A crash leaves at most unreferenced space.

        Blocks past the end of the file lie in space that reads zeroes: only the non-zero 64 KiB
        pieces are written (the file stays sparse there), a piece that is all zeroes allocates
        nothing, and no sync is needed before the BAT (the block read zeroes before; it now
        reads zeroes or the new data). This is the only zero test of the data
        (:attr:`sparse_writes`)."""
        bs = self.block_size
        fresh = self.alloc_end >= self.file_len
        plan: list[tuple[int, int, int, memoryview, list[tuple[int, int]]]] = []
        for idx, inner, piece in new:
            if fresh:
                runs = nonzero_runs(piece, inner)
            elif self.honor_zeroes or not is_zero(piece):
                runs = [(0, len(piece))]        # space already in the file: written whole
            else:
                runs = []
            if not runs and not self.honor_zeroes:
                continue                        # an unallocated block already reads zeroes
            plan.append((idx, self.alloc_end + len(plan) * bs, inner, piece, runs))
        if not plan:
            return
        end = self.alloc_end + len(plan) * bs
        self.alloc_end = end
        at = self.f.pwrite_pieces(                 # neighbours in one pwritev
            (boff + inner + a, piece if (a, b) == (0, len(piece)) else piece[a:b])
            for _idx, boff, inner, piece, runs in plan for a, b in runs)
        if end > self.file_len:
            if at < end:
                self.f.truncate(end)            # the data did not extend the file that far
            self.file_len = end
        if not fresh:
            self.f.sync()                       # stale bytes must not appear after a crash
        self._set_entries({idx: (PAYLOAD_FULLY_PRESENT, boff)
                           for idx, boff, _i, _p, _r in plan})
        if fresh:
            for idx, _boff, inner, piece, _r in plan:
                self._fresh_mark(idx, self.bat[idx], inner + len(piece))

    def _fresh_mark(self, idx: int, entry: int, written_to: int) -> None:
        if written_to >= self.block_size:
            self._fresh.pop(idx, None)
        else:
            self._fresh[idx] = (entry, written_to)

    def discard(self, offset: int, length: int, fill: FillFn | None = None) -> None:
        """Whole blocks lose their data (base: UNMAPPED, read as zeroes; differencing: ZERO,
        hiding the parent; fixed: zeroes written, the block stays allocated) and their space is
        returned to the file system; partial blocks are zeroed."""
        self._begin_write()
        self._fresh.clear()
        entries: dict[int, tuple[int, int]] = {}
        gone: list[int] = []
        for block, inner, pos, n in split_blocks(offset, length, self.block_size):
            st = self._check_state(block)
            idx = self._bat_index(block)
            whole = inner == 0 and (n == self.block_size or pos + n == self.size)
            allocated = st in (PAYLOAD_FULLY_PRESENT, PAYLOAD_PARTIALLY_PRESENT)
            if whole and not (self.leave_allocated and allocated):
                new = PAYLOAD_ZERO if self.has_parent else PAYLOAD_UNMAPPED
                if st == new:
                    continue
                if allocated:
                    gone.append(self._block_offset(block))
                entries[idx] = (new, 0)
                continue
            if not allocated and (st in (PAYLOAD_ZERO, PAYLOAD_UNMAPPED) or not self.has_parent):
                continue                        # already reads as zeroes
            done = 0
            while done < n:
                k = min(n - done, 4 << 20)
                if allocated:
                    self.f.pwrite(self._block_offset(block) + inner + done, zeroes(k))
                    if st == PAYLOAD_PARTIALLY_PRESENT:
                        self._mark_sectors(block, inner + done, k)
                else:
                    saved = getattr(self, "honor_zeroes", False)
                    self.honor_zeroes = True    # zeroes must hide the parent here
                    try:
                        self.write(pos + done, zeroes(k), None)
                    finally:
                        self.honor_zeroes = saved
                    st = self._check_state(block)
                    allocated = st in (PAYLOAD_FULLY_PRESENT, PAYLOAD_PARTIALLY_PRESENT)
                done += k
        if entries:
            self._set_entries(entries)
            self.f.sync()                       # the BAT stops naming the blocks first
            punch_blocks(self.f, gone, self.block_size)    # then their space goes

    def write_zeroes(self, offset: int, length: int, fill: FillFn) -> None:
        """As discard: whole blocks become ZERO (differencing) or UNMAPPED (base) entries."""
        self.discard(offset, length, fill)


# -- the backend --------------------------------------------------------------------------------


def open_image(backend: VhdxBackend, location: str, flags: OpenFlags = OpenFlags.NORMAL,
         config: dict | None = None) -> VhdxImage:
    parse_config(backend.config_keys, config, owner=backend.name)
    f = ImageFile(location, writable=not flags.read_only)
    return VhdxImage(backend, location, f, flags)


def create_image(backend: VhdxBackend, p: CreateParams) -> VhdxImage:
    cfg = parse_config(backend.config_keys, p.config, creating=True, owner=backend.name)
    parent = p.parent
    diff = parent is not None
    lss = cfg["LogicalSectorSize"]
    locator: dict[str, str] | None = None
    if parent is not None:
        if parent.format != "VHDX" or parent.modification_uuid is None:
            raise NotSupported("a VHDX differencing image needs a VHDX parent "
                               f"({parent.location} is {parent.format})")
        if p.flags & ImageFlags.FIXED:
            raise NotSupported("a VHDX differencing image cannot be fixed")
        lss = parent.sector_size
        locator = locator_for(p.location, parent.location, parent.modification_uuid)
    pss = cfg["PhysicalSectorSize"]
    for name, v in (("LogicalSectorSize", lss), ("PhysicalSectorSize", pss)):
        if v not in (512, 4096):
            raise InvalidArgument(f"VHDX {name} must be 512 or 4096, found {v}")
    size = p.size
    if size <= 0 or size % lss or size > MAX_SIZE:
        raise InvalidArgument(f"VHDX size must be a non-zero multiple of the logical sector "
                              f"size {lss} up to 64 TiB, found {size}")
    bs = cfg["BlockSize"] or _default_block_size(size, diff)
    if bs < MiB or bs > 256 * MiB or bs & (bs - 1):
        raise InvalidArgument(f"VHDX BlockSize must be a power of two from 1 MiB to 256 MiB, "
                              f"found {bs}")
    if size > vhdx_max_size(bs):
        raise too_large("VHDX", size, vhdx_max_size(bs), p.location, limit_reason(bs))
    log_len = cfg["LogSize"]
    if log_len % MiB:
        raise InvalidArgument(f"VHDX LogSize must be a multiple of 1 MiB, found {log_len}")
    fixed = bool(p.flags & ImageFlags.FIXED)
    count = bat_entry_count(size, bs, lss, diff)
    log_off = MiB
    md_off = log_off + log_len
    md_len = MiB
    bat_off = md_off + md_len
    bat_len = max(MiB, align_up(count * 8, MiB))
    data_off = bat_off + bat_len
    page83 = p.uuid or uuidlib.uuid4()

    f = ImageFile.create_temp(p.location)
    try:
        ident = FileIdentifier.build(dict(signature=b"vhdxfile",
                                          creator=utf16("vdgui").ljust(512, b"\0")))
        f.pwrite(0, ident)
        # metadata region
        items = [
            (FILE_PARAMETERS, FileParameters.build(dict(
                block_size=bs, flags=(FP_LEAVE_BLOCK_ALLOCATED if fixed else 0)
                | (FP_HAS_PARENT if diff else 0))), MD_IS_REQUIRED),
            (VIRTUAL_DISK_SIZE, struct.pack("<Q", size), MD_IS_VIRTUAL_DISK | MD_IS_REQUIRED),
            (PAGE83, guid_bytes(page83), MD_IS_VIRTUAL_DISK | MD_IS_REQUIRED),
            (LOGICAL_SECTOR, struct.pack("<I", lss), MD_IS_VIRTUAL_DISK | MD_IS_REQUIRED),
            (PHYSICAL_SECTOR, struct.pack("<I", pss), MD_IS_VIRTUAL_DISK | MD_IS_REQUIRED),
        ]
        if locator is not None:
            items.append((PARENT_LOCATOR, build_locator(locator), MD_IS_REQUIRED))
        table = bytearray(MetadataTableHeader.build(dict(signature=b"metadata", reserved=0,
                                                         entry_count=len(items),
                                                         reserved2=bytes(20))))
        pos = METADATA_TABLE_SIZE
        blobs = b""
        for g, payload, fl in items:
            table += MetadataTableEntry.build(dict(item_id=guid_bytes(g), offset=pos,
                                                   length=len(payload), flags=fl, reserved=0))
            blobs += payload
            pos += len(payload)
        f.pwrite(md_off, bytes(table))
        f.pwrite(md_off + METADATA_TABLE_SIZE, blobs)
        # BAT (fixed: every payload block present, laid out in order)
        bat = array("Q", bytes(8 * count))
        end = data_off
        if fixed:
            cr = chunk_ratio(lss, bs)
            for blk in range(ceil_div(size, bs)):
                bat[blk + blk // cr] = (end // MiB) << OFFSET_SHIFT | PAYLOAD_FULLY_PRESENT
                end += bs
        f.pwrite(bat_off, table_to_bytes(bat))
        f.truncate(max(end, data_off))
        if fixed:
            preallocate(f, data_off, end - data_off)
        # region tables (both copies)
        rt = bytearray(REGION_SIZE)
        rt[0:16] = RegionTableHeader.build(dict(signature=b"regi", checksum=0, entry_count=2,
                                                reserved=0))
        rt[16:48] = RegionTableEntry.build(dict(guid=guid_bytes(BAT_GUID), file_offset=bat_off,
                                                length=bat_len, required=1))
        rt[48:80] = RegionTableEntry.build(dict(guid=guid_bytes(METADATA_GUID),
                                                file_offset=md_off, length=md_len,
                                                required=1))
        with_checksum(rt)
        for off in REGION_OFFSETS:
            f.pwrite(off, bytes(rt))
        # headers (sequence 0 and 1; the second is current)
        fwg, dwg = uuidlib.uuid4(), uuidlib.uuid4()
        for seq, off in enumerate(HEADER_OFFSETS):
            h = bytearray(Header.build(dict(
                signature=b"head", checksum=0, sequence_number=seq,
                file_write_guid=guid_bytes(fwg),
                data_write_guid=guid_bytes(dwg), log_guid=ZERO_GUID, log_version=0, version=1,
                log_length=log_len, log_offset=log_off, reserved=bytes(4016))))
            f.pwrite(off, bytes(with_checksum(h)))
        f.sync()
        if p.progress:
            p.progress(size, size)
        f.commit()
    except BaseException:
        f.abandon()
        raise
    return VhdxImage(backend, p.location, f, OpenFlags.NORMAL)

