"""VdiImage: one opened VDI: header (versions 0 and 1.1), block map, reads, writes, metadata
setters, relink. Compact, resize, discard and check are the mixin of :mod:`.maintenance`."""
from __future__ import annotations

import uuid as uuidlib
from array import array
from collections.abc import Iterable
from typing import TYPE_CHECKING

from ...align import ceil_div
from ...backend import Backend, ImageFlags
from ...errors import CorruptImage, InvalidArgument, NotSupported, VDError, require_text
from ...fileio import ImageFile
from ...geometry import Geometry, vbox_pchs
from ...image import Alloc, FillFn, Image, ParentHint
from ...sparse import is_zero, nonzero_runs, zeroes
from ...tables import CHUNK_ENTRIES as MAP_CHUNK
from ...tables import BlockTable, first_shared, read_table
from . import layout as L
from .blockmap import (
    _FREE,
    _ZERO,
    MAX_BLOCK,
    MAX_BLOCKS,
    MAX_EXTRA,
    MIN_BLOCK,
    _comment_text,
    _geometry,
    _max_size,
    _pow2,
    _uuid_bytes,
    _uuid_or_none,
)
from .state import VdiState

if TYPE_CHECKING:
    from .maintenance import MaintenanceMixin
else:   # compact, resize, discard and check load on first use (most commands use none)
    from ...later import later
    MaintenanceMixin = later(f"{__package__}.maintenance", "MaintenanceMixin",
                             "_used_blocks _close_holes compact resizes_in_place resize _shrink "
                             "_zero_block_tail _grow _relocation_plan _relocate_for_map discard "
                             "close_holes check")


class VdiImage(MaintenanceMixin, VdiState):
    """One opened VDI file."""

    @property
    def max_size(self) -> int:
        return _max_size(self.block_size)

    def __init__(self, backend: Backend, location: str, f: ImageFile, read_only: bool) -> None:
        super().__init__(backend, location, f, read_only)
        self.honor_zeroes = False
        self._modified = False          # modification UUID already renewed this session
        self._hdr_dirty = False
        self._hdr_key: tuple | None = None  # header as last written whole (_write_header)
        self._parse()
        if not read_only:
            self._scan_map()

    # -- header ---------------------------------------------------------------------------
    def _err(self, field: str, offset: int, message: str, expected: object, found: object,
             cls: type[VDError] = CorruptImage) -> VDError:
        return cls(message, path=self.location, field=field, offset=offset, expected=expected,
                   found=found)

    def _parse(self) -> None:
        f = self.f
        file_size = f.size()
        self._file_size = file_size
        pre = L.PreHeader.parse(f.read_exact(0, L.PRE_HEADER_SIZE, "VDI pre-header"))
        if pre.signature != L.SIGNATURE:
            raise self._err("u32Signature", L.OFF_SIGNATURE, "not a VDI image: bad signature",
                            f"{L.SIGNATURE:#010x}", f"{pre.signature:#010x}")
        self.version = pre.version
        self.file_info = pre.file_info.split(b"\0", 1)[0].decode("latin-1").strip()
        major = pre.version >> 16
        if major == 0:
            raw = f.read_exact(L.PRE_HEADER_SIZE, L.HEADER0_SIZE, "VDI v0 header")
            h = L.Header0.parse(raw)
            self._v0 = True
            self._plus = False
            offs = L.H0
            self.offset_blocks = L.PRE_HEADER_SIZE + L.HEADER0_SIZE
            self.offset_data = self.offset_blocks + h.blocks * 4
            self.block_extra = 0
            self.header_size = L.HEADER0_SIZE
        elif major == 1:
            raw = f.read_exact(L.PRE_HEADER_SIZE, L.HEADER1_SIZE, "VDI v1 header")
            h = L.Header1.parse(raw)
            self._v0 = False
            offs = L.H1
            if h.header_size < L.HEADER1_SIZE:
                raise self._err("cbHeader", offs["header_size"], "header size too small",
                                f">= {L.HEADER1_SIZE}", h.header_size)
            self._plus = h.header_size >= L.HEADER1PLUS_SIZE
            if self._plus:
                h = L.Header1Plus.parse(f.read_exact(L.PRE_HEADER_SIZE, L.HEADER1PLUS_SIZE,
                                                     "VDI v1.1+ header"))
            self.header_size = h.header_size
            self.offset_blocks = h.offset_blocks
            self.offset_data = h.offset_data
            self.block_extra = h.block_extra
        else:
            raise self._err("u32Version", L.OFF_VERSION, "unsupported VDI version",
                            "major version 0 or 1", f"{pre.version >> 16}.{pre.version & 0xffff}",
                            cls=NotSupported)
        self._h = h
        self._offs = offs
        if h.image_type not in L.TYPE_NAMES:
            raise self._err("u32Type", offs["image_type"], "unknown image type",
                            "1 (normal), 2 (fixed), 3 (undo) or 4 (diff)", h.image_type)
        bs = h.block_size
        if not _pow2(bs):
            raise self._err("cbBlock", offs["block_size"], "block size is not a power of two",
                            "a power of two", bs)
        if bs < MIN_BLOCK or bs > MAX_BLOCK:
            raise self._err("cbBlock", offs["block_size"], "block size out of range",
                            f"{MIN_BLOCK}..{MAX_BLOCK}", bs, cls=NotSupported)
        if self.block_extra and (not _pow2(self.block_extra) or self.block_extra > MAX_EXTRA):
            raise self._err("cbBlockExtra", offs["block_extra"], "bad extra data size per block",
                            f"0 or a power of two up to {MAX_EXTRA}", self.block_extra)
        if h.disk_size == 0:
            raise self._err("cbDisk", offs["disk_size"], "disk size is zero", "> 0", 0)
        if h.disk_size < 512:
            raise self._err("cbDisk", offs["disk_size"], "disk size is less than one sector",
                            ">= 512", h.disk_size)
        if h.blocks == 0 or h.blocks > MAX_BLOCKS:
            raise self._err("cBlocks", offs["blocks"], "block count out of range",
                            f"1..{MAX_BLOCKS}", h.blocks)
        if h.blocks * bs < h.disk_size:
            raise self._err("cBlocks", offs["blocks"], "block count does not cover the disk size",
                            f">= {ceil_div(h.disk_size, bs)} blocks of {bs} bytes for "
                            f"{h.disk_size} bytes", h.blocks)
        if h.blocks_allocated > h.blocks:
            raise self._err("cBlocksAllocated", offs["blocks_allocated"],
                            "more blocks allocated than the image has", f"<= {h.blocks}",
                            h.blocks_allocated)
        if not self._v0:
            if self.offset_blocks < L.PRE_HEADER_SIZE + L.HEADER1_SIZE:
                raise self._err("offBlocks", offs["offset_blocks"],
                                "block map overlaps the header",
                                f">= {L.PRE_HEADER_SIZE + L.HEADER1_SIZE}", self.offset_blocks)
            if self.offset_data < self.offset_blocks + h.blocks * 4:
                raise self._err("offData", offs["offset_data"],
                                "data area overlaps the block map",
                                f">= {self.offset_blocks + h.blocks * 4}", self.offset_data)
        map_end = self.offset_blocks + h.blocks * 4
        if map_end > file_size:
            field = "cBlocks" if self._v0 else "offBlocks"    # v0: the map follows the header
            raise self._err(field, offs["blocks" if self._v0 else "offset_blocks"],
                            f"block map ({h.blocks} entries) lies past the end of the file",
                            f"map end <= file size {file_size}", f"map end {map_end}")
        # read-only opens (info, chain and children scans) of large images read the map when
        # first used
        lazy = self.read_only and h.blocks > MAP_CHUNK
        self._map_arr = None if lazy else self._read_map(h.blocks)
        self.blocks = h.blocks
        self.allocated = h.blocks_allocated
        self.image_type = h.image_type
        self.block_size = bs
        self._total = bs + self.block_extra
        self.header_disk_size = h.disk_size
        self.size = h.disk_size & ~0x1FF      # VirtualBox rounds an unaligned size down
        self.comment = _comment_text(h.comment)
        self.uuid = _uuid_or_none(h.uuid_create)
        self.modification_uuid = _uuid_or_none(h.uuid_modify)
        self.parent_uuid = _uuid_or_none(h.uuid_linkage)
        self.parent_modification_uuid = (None if self._v0 else
                                         _uuid_or_none(h.uuid_parent_modify))
        self._stored_pchs = _geometry(h.legacy_geometry)
        self.pchs = self._stored_pchs or vbox_pchs(self.size)
        self.lchs = _geometry(h.lchs) if self._plus else None
        self._set_type_flags()
        self._next = self.allocated
        self._bad = set()

    def _read_map(self, blocks: int) -> array:
        return read_table(self.f, self.offset_blocks, blocks, "I", False, "VDI block map")

    @property
    def _table(self) -> BlockTable:
        """The block map as stored (little-endian u32 entries at offBlocks)."""
        return BlockTable(self.f, self.offset_blocks, self._map)

    @property
    def _map(self) -> array:
        m = self._map_arr
        if m is None:
            m = self._map_arr = self._read_map(self.blocks)
        return m

    @_map.setter
    def _map(self, m: array) -> None:
        self._map_arr = m

    def _set_type_flags(self) -> None:
        t = self.image_type
        self.flags = (ImageFlags.FIXED if t == L.TYPE_FIXED else
                      ImageFlags.DIFF if t in (L.TYPE_DIFF, L.TYPE_UNDO) else ImageFlags.NONE)
        if t in (L.TYPE_DIFF, L.TYPE_UNDO):
            self.parent_hint = ParentHint(locations=[], uuid=self.parent_uuid, format=None)
        else:
            self.parent_hint = None

    def _header_bytes(self) -> bytes:
        h = self._h
        h.image_type = self.image_type
        if (self.comment or "") != _comment_text(h.comment):    # untouched bytes stay as read
            comment = (self.comment or "").encode("utf-8")[:L.COMMENT_SIZE - 1]
            h.comment = comment + bytes(L.COMMENT_SIZE - len(comment))
        h.disk_size = self.header_disk_size
        h.blocks = self.blocks
        h.blocks_allocated = self.allocated
        h.uuid_create = _uuid_bytes(self.uuid)
        h.uuid_modify = _uuid_bytes(self.modification_uuid)
        h.uuid_linkage = _uuid_bytes(self.parent_uuid)
        if self._stored_pchs != _geometry(h.legacy_geometry):
            g = self._stored_pchs or Geometry(0, 0, 0)
            h.legacy_geometry.cylinders, h.legacy_geometry.heads, h.legacy_geometry.sectors = g
        if self._v0:
            return bytes(L.Header0.build(h))
        h.offset_blocks = self.offset_blocks
        h.offset_data = self.offset_data
        h.uuid_parent_modify = _uuid_bytes(self.parent_modification_uuid)
        if self._plus:
            if self.lchs != _geometry(h.lchs):
                g = self.lchs or Geometry(0, 0, 0)
                h.lchs.cylinders, h.lchs.heads, h.lchs.sectors = g
                h.lchs.sector_size = 512
            return bytes(L.Header1Plus.build(h))
        return bytes(L.Header1.build(h))

    def _header_key(self) -> tuple:
        """Everything the header holds but the allocated count (see :meth:`_write_header`)."""
        return (self._h, self.image_type, self.comment, self.header_disk_size, self.blocks,
                self.uuid, self.modification_uuid, self.parent_uuid,
                self.parent_modification_uuid, self._stored_pchs, self.lchs,
                self.offset_blocks, self.offset_data)

    def _write_header(self) -> None:
        key = self._header_key()
        last = self._hdr_key
        if last is not None and len(last) == len(key) and all(
                a is b or a == b for a, b in zip(last, key)):
            # only the count changed since the last write (a copy allocating block after
            # block): that field alone, not a header built anew each time
            self._h.blocks_allocated = self.allocated
            at = (L.H0 if self._v0 else L.H1)["blocks_allocated"]
            self.f.pwrite(at, self.allocated.to_bytes(4, "little"))
        else:
            self.f.pwrite(L.PRE_HEADER_SIZE, self._header_bytes())
            self._hdr_key = key
        self._hdr_dirty = False

    # -- block map helpers ----------------------------------------------------------------
    def _data_pos(self, ptr: int) -> int:
        """File offset of the data of file block ``ptr`` (after its extra bytes)."""
        return self.offset_data + ptr * self._total + self.block_extra

    def _file_blocks(self) -> int:
        """How many whole file blocks fit in the data area of the file."""
        return max(0, (self.f.size() - self.offset_data) // self._total)

    def _scan_map(self) -> None:
        """Find entries that must not be written through (past EOF, cross-linked) and the
        next free file block index (read-write opens only)."""
        limit = self._file_blocks()
        self.write_refusal = None
        if self._healthy_map(limit):                        # the common case, streamed
            return
        used = [v for v in self._map if v < _ZERO]
        shared = first_shared(used)
        if shared is not None:
            v = shared[0]
            i = self._map.index(v)
            j = self._map.index(v, i + 1)
            self.write_refusal = f"block map entries {i} and {j} both point to file block {v}"
            return
        seen = bytearray(limit)
        bad = set()
        top = -1
        for i, v in enumerate(self._map):
            if v >= _ZERO:
                continue
            if v >= limit or seen[v]:
                bad.add(i)
                continue
            seen[v] = 1
            if v > top:
                top = v
        self._bad = bad
        self._next = max(self.allocated, top + 1)

    def _healthy_map(self, limit: int) -> bool:
        """True (and the next free block set) when every used entry lies before ``limit`` and
        none repeats. Streams the map in chunks: chunks holding only free/zero entries (most of
        a large, young image) are passed over at C speed; memory stays O(chunk + file blocks)."""
        m = self._map
        top = -1
        seen = None
        for a in range(0, len(m), MAP_CHUNK):
            chunk = m[a:a + MAP_CHUNK]
            if chunk.count(_FREE) + chunk.count(_ZERO) == len(chunk):
                continue
            for v in chunk:
                if v >= _ZERO:
                    continue
                if v >= limit:
                    return False
                if seen is None:
                    seen = bytearray(limit)
                if seen[v]:
                    return False
                seen[v] = 1
                if v > top:
                    top = v
        self._bad = set()
        self._next = max(self.allocated, top + 1)
        return True

    def _write_map_entries(self, indices: Iterable[int]) -> None:
        self._table.write_entries(indices)

    def _touch(self) -> None:
        """First modification of this session: new modification UUID (VirtualBox's VD does)."""
        if not self._modified:
            self._modified = True
            self.modification_uuid = uuidlib.uuid4()
            self._hdr_dirty = True

    # -- data -----------------------------------------------------------------------------
    def block_status(self, offset: int, length: int) -> list[tuple[int, int, Alloc]]:
        bs = self.block_size
        end = offset + length
        first = offset // bs
        last = (end - 1) // bs
        m = self._map
        runs: list[tuple[int, int, Alloc]] = []
        cur: Alloc | None = None
        start = offset
        idx = first
        while idx <= last:
            v = m[idx]
            if v == _FREE:
                # skip a run of free entries at C speed, a window at a time
                n = 0
                j = idx
                while j <= last:
                    w = min(last + 1, j + 4096)
                    raw = m[j:w].tobytes()
                    k = (len(raw) - len(raw.lstrip(b"\xff"))) // 4
                    n += k
                    j += k
                    if j < w:
                        break
                st = Alloc.UNALLOCATED
            else:
                n = 1
                st = Alloc.DATA if v < _ZERO else Alloc.ZERO
            if st is not cur:
                pos = max(idx * bs, offset)
                if cur is not None:
                    runs.append((start, pos - start, cur))
                cur = st
                start = pos
            idx += max(n, 1)
        if cur is not None:                     # None: an empty range
            runs.append((start, end - start, cur))
        return runs

    def read(self, offset: int, length: int) -> bytes:
        bs = self.block_size
        first, inner = divmod(offset, bs)
        last = (offset + length - 1) // bs
        m = self._map
        v = m[first]
        if v < _ZERO:
            # fast path: the whole range is one file-contiguous run -> one pread, no copies
            start = self._data_pos(v) + inner
            if first == last or (not self.block_extra and all(
                    m[first + k] == v + k for k in range(1, last - first + 1))):
                data = self.f.pread(start, length)
                if len(data) < length:
                    data += bytes(length - len(data))
                return data
        buf = bytearray(length)
        mv = memoryview(buf)
        bs = self.block_size
        m = self._map
        end = offset + length
        pos = offset
        run_file = run_buf = run_len = 0
        read_into = self.f.preadv_into
        while pos < end:
            idx, inner = divmod(pos, bs)
            n = min(bs - inner, end - pos)
            v = m[idx]
            if v < _ZERO:
                fpos = self._data_pos(v) + inner
                if run_len and run_file + run_len == fpos:
                    run_len += n
                else:
                    if run_len:       # short past the end of the file: zeroes (check reports it)
                        read_into(run_file, mv[run_buf:run_buf + run_len])
                    run_file, run_buf, run_len = fpos, pos - offset, n
            pos += n
        if run_len:
            read_into(run_file, mv[run_buf:run_buf + run_len])
        # a bytearray: bytes-like, saves a copy of the whole range
        return buf  # type: ignore[return-value]

    @property
    def sparse_writes(self) -> bool:
        """A base image stores only the non-zero 64 KiB pieces of a new block, whole or partly
        written (the rest is a hole past the data), and no all-zero write to a free block
        (_write): a copy need neither test its windows nor widen them to whole blocks."""
        return self.parent_hint is None and not self.honor_zeroes

    def write(self, offset: int, data: bytes, fill: FillFn) -> None:
        self.require_writable()
        self._refuse_cross_linked()
        self._write(offset, memoryview(data).cast("B"), fill, honor=self.honor_zeroes)

    def write_zeroes(self, offset: int, length: int, fill: FillFn) -> None:
        """Whole allocated blocks keep their map entry and lose their bytes: a hole punched
        (adjacent blocks in one call; zeroes written where the file system cannot). The rest
        as ``write`` stores zeroes: the zero-block marker in a differencing image, nothing
        over a base's free block."""
        self.require_writable()
        self._refuse_cross_linked()
        self._touch()
        bs = self.block_size
        end = offset + length
        pos = offset
        other = None                       # [start, end) of pieces left to write()
        punch: list[list[int]] = []        # [file start, file end) of whole blocks
        while pos < end:
            idx, inner = divmod(pos, bs)
            n = min(bs - inner, end - pos)
            v = self._map[idx]
            if v < _ZERO and inner == 0 and n >= min(bs, self.size - idx * bs) \
                    and idx not in self._bad:
                at = self._data_pos(v)
                if punch and punch[-1][1] == at:
                    punch[-1][1] += bs
                else:
                    punch.append([at, at + bs])
            elif other is not None and other[1] == pos:
                other[1] += n
            else:
                if other is not None:
                    super().write_zeroes(other[0], other[1] - other[0], fill)
                other = [pos, pos + n]
            pos += n
        if other is not None:
            super().write_zeroes(other[0], other[1] - other[0], fill)
        for a, b in punch:
            while a < b and not self.f.punch_hole(a, b - a):
                k = min(b - a, 4 << 20)
                self.f.pwrite(a, zeroes(k))
                a += k

    def close(self) -> None:
        if self._discarded and not self.read_only and self.f.fd >= 0:
            self.close_holes()                      # no session ends with blocks nothing names
        super().close()

    def _write(self, offset: int, mv: memoryview, fill: FillFn, honor: bool) -> None:
        bs = self.block_size
        m = self._map
        size = self.size
        is_diff = self.parent_hint is not None
        end = offset + len(mv)
        pos = offset
        pending_pos = -1
        pending: list = []
        pending_len = 0
        dirty: list[int] = []
        extend_to = 0
        written_end = 0
        fsize = None
        f = self.f

        def flush_pending() -> None:
            nonlocal pending, pending_len, pending_pos
            if pending:
                f.pwritev(pending_pos, pending)
            pending, pending_len, pending_pos = [], 0, -1

        def emit(fpos: int, chunk: bytes | bytearray | memoryview) -> None:
            nonlocal pending_len, pending_pos, written_end
            written_end = max(written_end, fpos + len(chunk))
            if pending and pending_pos + pending_len == fpos and pending_len < (64 << 20):
                pending.append(chunk)
                pending_len += len(chunk)
            else:
                flush_pending()
                pending.append(chunk)
                pending_pos = fpos
                pending_len = len(chunk)

        self._touch()
        undo: list[tuple[int, int]] = []        # (entry, old value) of this call's map changes
        grew = False
        try:
            while pos < end:
                idx, inner = divmod(pos, bs)
                n = min(bs - inner, end - pos)
                chunk = mv[pos - offset:pos - offset + n]
                v = m[idx]
                pos += n
                if v < _ZERO:
                    if idx in self._bad:
                        raise CorruptImage(f"block map entry {idx} is damaged (points past the end "
                                           "of the file or to another block's data); run check "
                                           "with repair first", path=self.location)
                    emit(self._data_pos(v) + inner, chunk)
                    continue
                # FREE or ZERO: maybe nothing to store
                blen = min(bs, size - idx * bs)
                if not honor and is_zero(chunk):
                    if v == _ZERO or (not is_diff and v == _FREE):
                        continue                    # already reads as zeroes
                    if n >= blen:                   # whole (visible) block of zeroes in a diff
                        undo.append((idx, v))
                        m[idx] = _ZERO
                        dirty.append(idx)
                        continue
                if self._bad:
                    raise CorruptImage("the block map is damaged (entries past the end of the "
                                       "file or cross-linked); new blocks cannot be allocated "
                                       "until the image is repaired (check with repair)",
                                       path=self.location)
                # allocate a new block at the end, completing it from below when partial
                new = self._next
                bpos = self._data_pos(new)
                if fsize is None:
                    fsize = self.f.size()       # once per call: new blocks of this call lie past it
                fresh = fsize <= bpos - self.block_extra
                if n == bs and fresh:
                    # past the end of the file: only the non-zero pieces are written, the rest
                    # stays a hole (reads zero; less to write out and to store)
                    for a, b in nonzero_runs(chunk, 0):
                        emit(bpos + a, chunk[a:b])
                    extend_to = max(extend_to, bpos + bs)
                elif n == bs:
                    if self.block_extra:
                        emit(bpos - self.block_extra, bytes(self.block_extra))
                    emit(bpos, chunk)
                elif not (v == _FREE and is_diff) and fresh:
                    # below reads zero and the block lies past the end of the file: write only
                    # the new non-zero pieces and extend the file, the rest stays a hole
                    for a, b in nonzero_runs(chunk, inner):
                        emit(bpos + inner + a, chunk[a:b])
                    extend_to = max(extend_to, bpos + bs)
                else:
                    blk = bytearray(bs)
                    if v == _FREE and is_diff:
                        below = fill(idx * bs, blen)
                        blk[:len(below)] = below
                    blk[inner:inner + n] = chunk
                    if blen < bs:
                        blk[blen:] = zeroes(bs - blen)   # bytes past the disk end stay zero
                    if self.block_extra:
                        emit(bpos - self.block_extra, bytes(self.block_extra))
                    emit(bpos, blk)
                self._next = new + 1
                undo.append((idx, v))
                m[idx] = new
                dirty.append(idx)
                self.allocated = self._next
                self._hdr_dirty = True
                grew = True
            flush_pending()                     # data first ...
            # the file is now as long as it was or as the data written (no fstat to ask)
            if fsize is not None and extend_to > max(fsize, written_end):
                self.f.truncate(extend_to)
            if grew:
                # ... then the count covering the new blocks (cBlocksAllocated: qemu and
                # VirtualBox allocate from it, so it never lags the map on disk) ...
                self._write_header()
            self._write_map_entries(dirty)      # ... then the map entries naming them
        except BaseException:
            # the data may be incomplete: the entries of this call are not made visible (blocks
            # taken stay taken: the count only ever covers more than the map names, a leak)
            for idx, v in reversed(undo):
                m[idx] = v
            raise

    def _write_back(self) -> None:
        if self._hdr_dirty:
            self._write_header()          # the header, then FileImage.flush syncs

    # -- metadata -------------------------------------------------------------------------
    def info(self) -> dict:
        return {
            "header_version": f"{self.version >> 16}.{self.version & 0xffff}",
            "header_size": self.header_size,
            "image_type": L.TYPE_NAMES.get(self.image_type, str(self.image_type)),
            "file_info": self.file_info,
            "block_size": self.block_size,
            "block_extra": self.block_extra,
            "blocks": self.blocks,
            "blocks_allocated": self.allocated,
            "offset_blocks": self.offset_blocks,
            "offset_data": self.offset_data,
        }

    def _set(self) -> None:
        self.require_writable()
        self._write_header()

    def set_uuid(self, value: uuidlib.UUID) -> None:
        self.require_writable()
        self.uuid = value
        self._set()

    def set_modification_uuid(self, value: uuidlib.UUID) -> None:
        self.require_writable()
        self.modification_uuid = value
        self._modified = True
        self._set()

    def set_parent_uuid(self, value: uuidlib.UUID) -> None:
        self.require_writable()
        self.parent_uuid = value
        if self.parent_hint is not None:
            self.parent_hint.uuid = value
        self._set()

    def set_parent_modification_uuid(self, value: uuidlib.UUID) -> None:
        self.require_writable()
        if self._v0:
            self._no_field("a parent modification UUID (VDI v0 header)")
        self.parent_modification_uuid = value
        self._set()

    def set_comment(self, value: str) -> None:
        self.require_writable()
        value = value or ""
        if self._v0:
            self._no_field("a comment (VDI v0 header)")   # as VirtualBox: old images refuse
        require_text(value, "the comment", self.location)
        if len(value.encode("utf-8")) >= L.COMMENT_SIZE:
            raise InvalidArgument(f"{self.location}: VDI comments are limited to "
                                  f"{L.COMMENT_SIZE - 1} bytes, found {len(value.encode())}")
        self.comment = value
        self._set()

    def set_pchs(self, value: Geometry) -> None:
        self.require_writable()
        self._stored_pchs = Geometry(*value) if value and not Geometry(*value).is_zero else None
        self.pchs = self._stored_pchs or vbox_pchs(self.size)
        self._set()

    def set_lchs(self, value: Geometry) -> None:
        self.require_writable()
        if not self._plus:
            if self._v0 or self.offset_blocks < L.PRE_HEADER_SIZE + L.HEADER1PLUS_SIZE:
                self._no_field("a logical geometry (this VDI header version has no LCHS field)")
            # upgrade a 1.x header to 1.1+ in place (the map starts after it), as VirtualBox does
            self._h = L.Header1Plus.parse(self._header_bytes() + bytes(16))
            self._h.header_size = L.HEADER1PLUS_SIZE
            self.version = L.VERSION_1_1
            self._plus = True
            self.header_size = L.HEADER1PLUS_SIZE
            self.f.pwrite(L.OFF_VERSION, L.VERSION_1_1.to_bytes(4, "little"))
        self.lchs = Geometry(*value) if value and not Geometry(*value).is_zero else None
        self._set()

    # -- operations -----------------------------------------------------------------------
    def relink_refusal(self, parent: Image | None) -> str | None:
        if parent is not None and parent.uuid is None:
            return (f"{self.location}: a VDI differencing image links to its parent by UUID, "
                    f"and {parent.location} has none")
        if parent is not None and self.image_type == L.TYPE_FIXED:
            return f"{self.location}: a fixed VDI image cannot become a differencing image"
        return None

    def set_parent(self, parent: Image | None) -> None:
        self.require_writable()
        if parent is None:
            self.parent_uuid = None
            self.parent_modification_uuid = None
            if self.image_type in (L.TYPE_DIFF, L.TYPE_UNDO):
                self.image_type = L.TYPE_NORMAL
        else:
            if parent.uuid is None:
                raise NotSupported(f"{self.location}: a VDI differencing image links to its "
                                   f"parent by UUID, and {parent.location} has none")
            if self.image_type == L.TYPE_FIXED:
                raise NotSupported(f"{self.location}: a fixed VDI image cannot become a "
                                   "differencing image")
            self.parent_uuid = parent.uuid
            self.parent_modification_uuid = parent.modification_uuid
            self.image_type = L.TYPE_DIFF
        self._set_type_flags()
        self._write_header()
        self.f.sync()
