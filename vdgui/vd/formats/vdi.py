"""VDI backend: VirtualBox's native container (dynamic, fixed and differencing images).

Specification: VirtualBox ``src/VBox/Storage/VDI.cpp`` / ``VDICore.h``; structures in
:mod:`vdi_layout`. Reads header versions 0.x, 1.0, 1.1 and 1.1+ (with LCHS); writes 1.1+ when
creating and keeps the version of an existing file. Limits and conventions:

* block size (``AllocationBlockSize``): a power of two, 512 B .. 256 MiB (1 MiB by default; qemu
  only opens 1 MiB blocks); ``cbBlockExtra`` bytes before each block are honoured and kept;
* at most 0x3fffffff blocks; the map must lie inside the file; new images put the map and the
  data area each on a 1 MiB boundary, as VirtualBox does (VDI_DATA_ALIGN), so an empty image is
  2 MiB and the map has room to grow in place; a differencing image's legacy geometry is 0/0/0;
* new blocks are appended at index ``cBlocksAllocated``; writes go data -> map entry ->
  header (the header's count is written at flush/close); block indices stay dense
  (0..allocated-1) after compact, discard and repair, which is what qemu-img check expects;
* a differencing image names its parent only by UUID (uuidLinkage) and the parent's
  modification UUID (uuidParentModify); there is no parent path in the format;
* the modification UUID changes on the first write of a session, as VirtualBox's VD layer does.
"""
from __future__ import annotations

import uuid as uuidlib
from array import array

from ..align import align_up, ceil_div
from ..backend import (Backend, Cap, CreateParams, FileExtension, ImageFlags, OpenFlags,
                       Operation, ProbeInput, too_large)
from ..config import ConfigKey, KeyFlag, ValueType, parse_config
from ..errors import CorruptImage, InvalidArgument, NotSupported, require_text
from ..compaction import move_blocks, plan_moves, slot_holes
from ..fileimage import FileImage
from ..fileio import ImageFile
from ..geometry import Geometry, vbox_lchs, vbox_pchs
from ..image import Alloc, CheckReport, ParentHint, Problem, ProblemCode
from ..progress import Progress
from ..space import preallocate, require_space
from ..sparse import is_zero, nonzero_runs, zeroes
from ..tables import CHUNK_ENTRIES as MAP_CHUNK
from ..tables import BlockTable, first_shared, read_table, table_to_bytes
from . import vdi_layout as L

_FREE = L.BLOCK_FREE
_ZERO = L.BLOCK_ZERO
_NULL_UUID = bytes(16)
MIN_BLOCK = 512
MAX_BLOCK = 256 << 20
MAX_BLOCKS = 0x3FFFFFFF
# vdgui keeps the block map (4 bytes a block) in memory: images it creates or grows have at most
# 2**24 blocks (a 64 MiB map, so that a convert holding a source's and a target's map stays far
# below 300 MiB; 16 TiB with the default 1 MiB blocks, ext4's largest file). VirtualBox's own
# limit is MAX_SIZE below, qemu's MAX_BLOCKS blocks; larger images made elsewhere still open.
MAX_NEW_BLOCKS = 1 << 24
MAX_EXTRA = 1 << 20
DATA_ALIGN = 1 << 20
MAX_SIZE = 4 * (1 << 50) - 3 * (1 << 20) - 512   # VirtualBox: below 4 PiB - 3 MiB


def _max_size(block_size: int) -> int:
    """The largest VDI vdgui creates or grows with this block size."""
    return min(MAX_SIZE, MAX_NEW_BLOCKS * block_size)


def _size_limit(block_size: int) -> str:
    return (f" with {block_size}-byte blocks (vdgui keeps the block map in memory, "
            f"{MAX_NEW_BLOCKS} blocks at most; a larger AllocationBlockSize allows more, up to "
            f"VirtualBox's 4 PiB - 3 MiB)")
assert array("I").itemsize == 4


def _map_to_disk(m: array) -> bytes:
    return table_to_bytes(m, big_endian=False)


_FREE_BYTES = b"\xff" * (4 * MAP_CHUNK)
_FREE_CHUNK = array("I", _FREE_BYTES)


def _extend_free(m: array, n: int) -> None:
    """Append n FREE entries in chunks (``m.extend(array * n)`` would build the new part
    twice; growing a large array reallocates in place, by mremap)."""
    while n > 0:
        k = min(n, MAP_CHUNK)
        m.extend(_FREE_CHUNK if k == MAP_CHUNK else _FREE_CHUNK[:k])
        n -= k


def _uuid_or_none(b: bytes) -> uuidlib.UUID | None:
    return None if b == _NULL_UUID else uuidlib.UUID(bytes_le=bytes(b))


def _uuid_bytes(u: uuidlib.UUID | None) -> bytes:
    return _NULL_UUID if u is None else u.bytes_le


def _geometry(g) -> Geometry | None:
    if g.cylinders == 0 or g.heads == 0 or g.sectors == 0:
        return None
    return Geometry(g.cylinders, g.heads, g.sectors)


def _comment_text(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def _pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


class VdiImage(FileImage):
    """One opened VDI file."""

    @property
    def max_size(self) -> int:
        return _max_size(self.block_size)

    def __init__(self, backend, location: str, f: ImageFile, read_only: bool):
        super().__init__(backend, location, f, read_only)
        self.honor_zeroes = False
        self._modified = False          # modification UUID already renewed this session
        self._hdr_dirty = False
        self._parse()
        if not read_only:
            self._scan_map()

    # -- header ---------------------------------------------------------------------------
    def _err(self, field: str, offset: int, message: str, expected, found, cls=CorruptImage):
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
        self._bad: set[int] = set()

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
            return L.Header0.build(h)
        h.offset_blocks = self.offset_blocks
        h.offset_data = self.offset_data
        h.uuid_parent_modify = _uuid_bytes(self.parent_modification_uuid)
        if self._plus:
            if self.lchs != _geometry(h.lchs):
                g = self.lchs or Geometry(0, 0, 0)
                h.lchs.cylinders, h.lchs.heads, h.lchs.sectors = g
                h.lchs.sector_size = 512
            return L.Header1Plus.build(h)
        return L.Header1.build(h)

    def _write_header(self) -> None:
        self.f.pwrite(L.PRE_HEADER_SIZE, self._header_bytes())
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

    def _write_map_entries(self, indices) -> None:
        self._table.write_entries(indices)

    def _touch(self) -> None:
        """First modification of this session: new modification UUID (VirtualBox's VD does)."""
        if not self._modified:
            self._modified = True
            self.modification_uuid = uuidlib.uuid4()
            self._hdr_dirty = True

    # -- data -----------------------------------------------------------------------------
    def block_status(self, offset, length):
        bs = self.block_size
        end = offset + length
        first = offset // bs
        last = (end - 1) // bs
        m = self._map
        runs = []
        cur = None
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
        runs.append((start, end - start, cur))
        return runs

    def read(self, offset, length):
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
        return buf          # a bytearray: bytes-like, saves a copy of the whole range

    def write(self, offset, data, fill):
        self.require_writable()
        self._refuse_cross_linked()
        self._write(offset, memoryview(data).cast("B"), fill, honor=self.honor_zeroes)

    def _write(self, offset, mv, fill, honor: bool) -> None:
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
        fsize = None
        f = self.f

        def flush_pending():
            nonlocal pending, pending_len, pending_pos
            if pending:
                f.pwritev(pending_pos, pending)
            pending, pending_len, pending_pos = [], 0, -1

        def emit(fpos, chunk):
            nonlocal pending_len, pending_pos
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
                    # the new bytes and extend the file, the rest stays a hole (reads zero)
                    emit(bpos + inner, chunk)
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
            if extend_to > self.f.size():
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

    def set_uuid(self, value):
        self.require_writable()
        self.uuid = value
        self._set()

    def set_modification_uuid(self, value):
        self.require_writable()
        self.modification_uuid = value
        self._modified = True
        self._set()

    def set_parent_uuid(self, value):
        self.require_writable()
        self.parent_uuid = value
        if self.parent_hint is not None:
            self.parent_hint.uuid = value
        self._set()

    def set_parent_modification_uuid(self, value):
        self.require_writable()
        if self._v0:
            self._no_field("a parent modification UUID (VDI v0 header)")
        self.parent_modification_uuid = value
        self._set()

    def set_comment(self, value):
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

    def set_pchs(self, value):
        self.require_writable()
        self._stored_pchs = Geometry(*value) if value and not Geometry(*value).is_zero else None
        self.pchs = self._stored_pchs or vbox_pchs(self.size)
        self._set()

    def set_lchs(self, value):
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
    def relink_refusal(self, parent):
        if parent is not None and parent.uuid is None:
            return (f"{self.location}: a VDI differencing image links to its parent by UUID, "
                    f"and {parent.location} has none")
        if parent is not None and self.image_type == L.TYPE_FIXED:
            return f"{self.location}: a fixed VDI image cannot become a differencing image"
        return None

    def set_parent(self, parent):
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

    def _used_blocks(self) -> tuple[array, int]:
        """Reverse map: file block index -> block map index (FREE for holes), up to the
        highest referenced file block."""
        limit = self._file_blocks()
        top = -1
        for v in self._map:
            if v < _ZERO and v < limit and v > top:
                top = v
        rev = array("I", [_FREE]) * (top + 1)
        for i, v in enumerate(self._map):
            if v < _ZERO and v < limit and rev[v] == _FREE:
                rev[v] = i
        return rev, top + 1

    def _close_holes(self) -> None:
        """Move the last referenced blocks into unreferenced file blocks (holes), set the count
        to the blocks in use, then truncate the file. The order is compaction.move_blocks':
        copies (into unreferenced blocks: a crash changes nothing visible), sync, the moved map
        entries, sync, the header, sync."""
        rev, n = self._used_blocks()
        total = self._total
        base = self.offset_data
        holes = slot_holes(rev, total, base, free=_FREE)
        free = sum(b - a for a, b in holes) // total
        blocks = []                         # only the top ``free`` blocks can move
        j = n - 1
        while j >= 0 and len(blocks) < free:
            if rev[j] != _FREE:
                blocks.append((base + j * total, total, rev[j]))
            j -= 1
        used = n - free

        def repoint(moves):
            for m in moves:
                self._map[m.key] = (m.dst - base) // total
            self._write_map_entries([m.key for m in moves])

        def header():
            self.allocated = self._next = used
            self._write_header()

        move_blocks(self.f, plan_moves(blocks, holes), repoint, header=header)
        self.f.truncate(max(base + used * total, self.offset_blocks + self.blocks * 4))

    def compact(self, progress=None, parent_read=None):
        self.require_writable()
        if self.image_type == L.TYPE_FIXED:
            raise NotSupported(f"{self.location}: fixed VDI images cannot be compacted "
                               "(all blocks are allocated by design)")
        if self._bad:
            raise CorruptImage("the block map is damaged; repair the image before compacting",
                               path=self.location)
        bs = self.block_size
        is_diff = self.parent_hint is not None
        nblocks = ceil_div(self.size, bs)
        todo = [i for i in range(nblocks) if self._map[i] != _FREE]
        prog = Progress(progress, len(todo) * bs)
        prog.start()
        changes: dict[int, int] = {}
        for i in todo:                      # scan phase: reads only, safe to cancel
            v = self._map[i]
            bstart = i * bs
            blen = min(bs, self.size - bstart)
            if v < _ZERO:
                data = self.f.pread(self._data_pos(v), blen)
                if len(data) < blen:
                    data += bytes(blen - len(data))
            else:
                data = None                  # ZERO entry
            if parent_read is not None and is_diff:
                below = parent_read(bstart, blen)
                if (data is None and is_zero(below)) or (data is not None and data == below):
                    changes[i] = _FREE
                elif data is not None and is_zero(data):
                    changes[i] = _ZERO
            elif data is None:
                if not is_diff:
                    changes[i] = _FREE
            elif is_zero(data):
                changes[i] = _ZERO if is_diff else _FREE
            prog.advance(bs)
        if changes:
            self._touch()
            for i, v in changes.items():
                self._map[i] = v
            self._write_map_entries(changes)
            self.f.sync()
        self._close_holes()
        prog.finish()

    def resizes_in_place(self, new_size):
        # growing a dynamic image whose map area has room: the zeroed tail of the last block
        # and the new map entries are invisible until the header (one write) names the new size
        if new_size <= self.size or self._v0 or self._bad or self.image_type == L.TYPE_FIXED:
            return False
        new_blocks = ceil_div(new_size, self.block_size)
        return self.offset_blocks + new_blocks * 4 <= self.offset_data

    def resize(self, new_size, progress=None):
        self.require_writable()
        if new_size <= 0 or new_size % 512:
            raise InvalidArgument(f"{self.location}: new size must be a positive multiple of "
                                  f"512, found {new_size}")
        if new_size > self.max_size:
            raise too_large("VDI", new_size, self.max_size, self.location,
                            _size_limit(self.block_size))
        if self._v0:
            raise NotSupported(f"{self.location}: VDI v0 images cannot be resized")
        if self._bad:
            raise CorruptImage("the block map is damaged; repair the image before resizing",
                               path=self.location)
        prog = Progress(progress, 1)
        prog.start()
        bs = self.block_size
        old_size = self.size
        new_blocks = ceil_div(new_size, bs)
        if new_size > old_size:
            new_blocks = max(new_blocks, self.blocks)
        if new_blocks > MAX_BLOCKS:
            raise InvalidArgument(f"{self.location}: {new_size} bytes need {new_blocks} blocks "
                                  f"of {bs} bytes, more than the {MAX_BLOCKS} VDI allows")
        self._touch()
        if new_size < old_size:
            self._shrink(new_size, new_blocks)
        elif new_size > old_size:
            self._grow(new_size, new_blocks)
        self.size = new_size
        self.header_disk_size = new_size
        if self._stored_pchs is not None:
            self._stored_pchs = vbox_pchs(new_size)
        self.pchs = self._stored_pchs or vbox_pchs(new_size)
        if self.lchs is not None:
            self.lchs = vbox_lchs(new_size)
        self._write_header()
        self.f.sync()
        prog.finish()

    def _shrink(self, new_size, new_blocks):
        bs = self.block_size
        self._refuse_cut_data(new_size)        # the part beyond the new end must hold no data
        freed = []
        for i in range(new_blocks, self.blocks):
            if self._map[i] != _FREE:
                self._map[i] = _FREE
                freed.append(i)
        # zero the (now invisible) tail of the last block so a later grow reads zeroes
        self._zero_block_tail(new_blocks - 1, new_size - (new_blocks - 1) * bs)
        self._write_map_entries(freed)
        self.f.sync()
        self.blocks = new_blocks
        del self._map[new_blocks:]
        self.header_disk_size = new_size
        self._close_holes()

    def _zero_block_tail(self, idx, keep):
        bs = self.block_size
        v = self._map[idx]
        if v < _ZERO and keep < bs:
            self.f.pwrite(self._data_pos(v) + keep, zeroes(bs - keep))

    def _grow(self, new_size, new_blocks):
        bs = self.block_size
        old_blocks = self.blocks
        last = ceil_div(self.size, bs) - 1
        self._zero_block_tail(last, self.size - last * bs)
        fixed = self.image_type == L.TYPE_FIXED
        total = self._total
        need_map_end = self.offset_blocks + new_blocks * 4
        if need_map_end > self.offset_data:
            self._relocate_for_map(need_map_end)
        _extend_free(self._map, new_blocks - len(self._map))
        if fixed:
            for i in range(old_blocks, new_blocks):
                if self._map[i] == _FREE:
                    self._map[i] = self._next
                    self._next += 1
            grown = self.offset_data + self._next * total
            old_end = self.f.size()
            if grown > old_end:
                require_space(self.location, grown - old_end, "the grown fixed image")
            self.f.truncate(grown)
            preallocate(self.f, old_end, grown - old_end)
        self._table.write_range(old_blocks, new_blocks)
        self.f.sync()
        self.blocks = new_blocks
        self.allocated = self._next

    def _relocate_for_map(self, need_map_end):
        """Grow the map area by moving the first data blocks to the end of the file (as
        VirtualBox's vdiResize does), then renumber every entry."""
        total = self._total
        k = ceil_div(need_map_end - self.offset_data, total)
        rev, n = self._used_blocks()
        moved = []
        # moved blocks go past the new map area too (file block k becomes block 0): with fewer
        # blocks in use than the map needs, the end of the data lies inside that area
        nxt = max(self._next, n, k)
        for j in range(min(k, n)):
            b = rev[j]
            if b == _FREE:
                continue
            data = self.f.pread(self.offset_data + j * total, total)
            data += bytes(total - len(data))
            self.f.pwrite(self.offset_data + nxt * total, data)
            self._map[b] = nxt
            moved.append(b)
            nxt += 1
        self.f.sync()
        if moved:       # count first (a crash then only leaks), then the moved entries
            self.allocated = self._next = nxt
            self._write_header()
            self.f.sync()
            self._write_map_entries(moved)
            self.f.sync()
        # renumber: file block j becomes j - k once offData moves k blocks further
        m = self._map
        for i in range(len(m)):
            v = m[i]
            if v < _ZERO:
                m[i] = v - k
        self.offset_data += k * total
        self.allocated = self._next = max(0, nxt - k)
        # header, gap and map in one write (the window where they disagree is one pwrite),
        # assembled in one buffer: the map is copied once, not three times
        region = self.f.pread(L.PRE_HEADER_SIZE, self.offset_blocks - L.PRE_HEADER_SIZE)
        hdr = self._header_bytes()
        head = len(region)
        buf = bytearray(head + 4 * len(m))
        buf[:len(hdr)] = hdr
        buf[len(hdr):head] = region[len(hdr):]
        for a in range(0, len(m), MAP_CHUNK):
            b = min(len(m), a + MAP_CHUNK)
            buf[head + 4 * a:head + 4 * b] = _map_to_disk(m[a:b])
        self.f.pwrite(L.PRE_HEADER_SIZE, buf)
        del buf
        self.f.sync()

    def discard(self, offset, length, fill=None):
        self.require_writable()
        self._refuse_cross_linked()
        if self._bad:
            raise CorruptImage("the block map is damaged; repair the image before discarding",
                               path=self.location)
        bs = self.block_size
        is_diff = self.parent_hint is not None
        end = offset + length
        pos = offset
        dirty = []
        freed_any = False
        self._touch()
        while pos < end:
            idx, inner = divmod(pos, bs)
            n = min(bs - inner, end - pos)
            blen = min(bs, self.size - idx * bs)
            v = self._map[idx]
            whole = inner == 0 and n >= blen
            if v < _ZERO and idx in self._bad:
                raise CorruptImage(f"block map entry {idx} is damaged; repair the image first",
                                   path=self.location)
            if whole:
                target = _ZERO if is_diff else _FREE
                if v != target and not (v == _ZERO and not is_diff):
                    self._map[idx] = target
                    dirty.append(idx)
                    freed_any = freed_any or v < _ZERO
            elif v < _ZERO:
                self.f.pwrite(self._data_pos(v) + inner, zeroes(n))
                data = self.f.pread(self._data_pos(v), blen)
                if is_zero(data):
                    self._map[idx] = _ZERO if is_diff else _FREE
                    dirty.append(idx)
                    freed_any = True
            elif v == _FREE and is_diff:
                if fill is None:
                    raise NotSupported(f"{self.location}: discarding part of a block held by "
                                       "the parent needs the parent's content")
                self._write(pos, memoryview(zeroes(n)), fill, honor=True)
            pos += n
        if dirty:
            self._write_map_entries(dirty)
            self.f.sync()
        if freed_any:
            self._close_holes()

    def check(self, repair=False, dry_run=False, progress=None):
        fix = repair and not dry_run
        if fix:
            self.require_writable()
        report = CheckReport()
        prog = Progress(progress, max(1, self.blocks))
        prog.start()

        def add(sev, what, off, code):
            report.problems.append(Problem(sev, what, off, repaired=fix, code=code))

        hdr_fix = False
        if self.header_disk_size % 512:
            add("corrupt", f"header field 'cbDisk' ({self.header_disk_size}) is not a multiple "
                           f"of 512; repair rounds it down to {self.size}",
                self._offs["disk_size"], ProblemCode.HEADER_FIELD)
            hdr_fix = True
        if self.uuid is None:
            add("corrupt", "header field 'uuidCreate' is the null UUID; repair assigns a new one",
                self._offs["uuid_create"], ProblemCode.HEADER_FIELD)
            hdr_fix = True
        if self.modification_uuid is None:
            add("corrupt", "header field 'uuidModify' is the null UUID; repair assigns a new one",
                self._offs["uuid_modify"], ProblemCode.HEADER_FIELD)
            hdr_fix = True
        limit = self._file_blocks()
        seen = bytearray(limit)
        cleared = []
        used = 0
        top = -1
        for i, v in enumerate(self._map):
            if v >= _ZERO:
                continue
            eoff = self.offset_blocks + 4 * i
            if v >= limit:
                add("corrupt", f"block map entry {i} points to file block {v} at "
                               f"{self.offset_data + v * self._total:#x}, past the end of the "
                               f"file ({limit} blocks fit); repair clears the entry", eoff,
                    ProblemCode.ENTRY_PAST_END)
                cleared.append(i)
            elif seen[v]:
                add("corrupt", f"block map entry {i} points to file block {v}, which another "
                               "entry already uses (cross-linked); repair clears the entry", eoff,
                    ProblemCode.CROSS_LINKED)
                cleared.append(i)
            else:
                seen[v] = 1
                used += 1
                top = max(top, v)
        holes = top + 1 - used
        if self.allocated < top + 1:
            add("corrupt", f"header field 'cBlocksAllocated' is {self.allocated} but file blocks "
                           f"up to {top} are in use (new blocks would overwrite data); "
                           f"repair sets it to {used}", self._offs["blocks_allocated"],
                ProblemCode.ALLOC_POINTER)
        elif self.allocated > top + 1:
            in_use = "1 block is" if used == 1 else f"{used} blocks are"
            add("leak", f"header field 'cBlocksAllocated' is {self.allocated} but only "
                        f"{in_use} in use; repair sets it to {used}",
                self._offs["blocks_allocated"], ProblemCode.LEAK)
        if holes > 0:
            add("leak", f"{holes} file block(s) below block {top} are not referenced by the "
                        "map; repair compacts the data area", self.offset_data, ProblemCode.LEAK)
        # every whole block slot of the file no entry references: a repair drops it
        report.orphans = [(self.location, self.offset_data + v * self._total, self._total)
                          for v in range(limit) if not seen[v]]
        want = max(self.offset_data + (top + 1) * self._total,
                   self.offset_data + self.allocated * self._total,
                   self.offset_blocks + self.blocks * 4)
        fsize = self.f.size()
        if fsize > want:
            add("leak", f"{fsize - want} bytes after the last block are unused; repair "
                        "truncates the file", want, ProblemCode.LEAK)
        prog.set(self.blocks)
        if fix and report.problems:
            self._touch()
            if self.uuid is None:
                self.uuid = uuidlib.uuid4()
            if self.modification_uuid is None:
                self.modification_uuid = uuidlib.uuid4()
            if hdr_fix:
                self.header_disk_size = self.size
            for i in cleared:
                self._map[i] = _FREE
            self._write_map_entries(cleared)
            self.f.sync()
            self._bad = set()
            self._close_holes()         # densify, fix the count, truncate, write the header
            self._scan_map()
            report.repaired = True
        prog.finish()
        return report


class VdiBackend(Backend):
    name = "VDI"
    description = "VirtualBox Disk Image"
    aliases = ("vdi",)
    caps = (Cap.UUID | Cap.CREATE_FIXED | Cap.CREATE_DYNAMIC | Cap.DIFF | Cap.FILE | Cap.ASYNC
            | Cap.VFS | Cap.DISCARD | Cap.PREFERRED)
    extensions = (FileExtension("vdi"),)
    config_keys = (
        ConfigKey("AllocationBlockSize", "1048576", ValueType.INTEGER, KeyFlag.CREATEONLY,
                  description="the unit of allocation (a power of two; qemu opens only 1 MiB "
                              "blocks)",
                  minimum=MIN_BLOCK, maximum=MAX_BLOCK, power_of_two=True,
                  label="Block size", unit="bytes"),
    )
    operations = frozenset({Operation.WRITE, Operation.CREATE, Operation.COMPACT,
                            Operation.RESIZE, Operation.CHECK, Operation.REPAIR,
                            Operation.RELINK, Operation.DISCARD, Operation.COMMENT})
    create_flags = ImageFlags.FIXED
    max_size = _max_size(1 << 20)
    size_granularity = 512
    can_shrink = True

    def max_size_for(self, config=None):
        return _max_size(self.config_value(config, "AllocationBlockSize"))

    def limit_reason(self, config=None):
        return _size_limit(self.config_value(config, "AllocationBlockSize"))

    def probe(self, src: ProbeInput) -> int:
        h = src.head
        if len(h) < L.PRE_HEADER_SIZE:
            return 0
        sig = int.from_bytes(h[L.OFF_SIGNATURE:L.OFF_SIGNATURE + 4], "little")
        if sig != L.SIGNATURE:
            return 0
        major = int.from_bytes(h[L.OFF_VERSION:L.OFF_VERSION + 4], "little") >> 16
        return 100 if major in (0, 1) else 60

    def open(self, location, flags=OpenFlags.NORMAL, config=None):
        parse_config(self.config_keys, config, owner=self.name)
        ro = flags.read_only
        f = ImageFile(location, writable=not ro)
        try:
            return VdiImage(self, location, f, ro)
        except BaseException:
            f.close()
            raise

    def create(self, p: CreateParams) -> VdiImage:
        cfg = parse_config(self.config_keys, p.config, creating=True, owner=self.name)
        bs = cfg["AllocationBlockSize"]
        size = p.size
        if size <= 0 or size % 512:
            raise InvalidArgument(f"VDI image size must be a positive multiple of 512, found {size}")
        if size > _max_size(bs):
            raise too_large("VDI", size, _max_size(bs), p.location, _size_limit(bs))
        blocks = ceil_div(size, bs)
        if blocks > MAX_BLOCKS:
            raise InvalidArgument(f"{size} bytes need {blocks} blocks of {bs} bytes, more than "
                                  f"the {MAX_BLOCKS} a VDI image can hold")
        fixed = bool(p.flags & ImageFlags.FIXED)
        diff = p.parent is not None or bool(p.flags & ImageFlags.DIFF)
        if diff and p.parent is None:
            raise InvalidArgument("a differencing VDI image needs its parent")
        if diff and fixed:
            raise NotSupported("VDI differencing images cannot be fixed")
        comment = (p.comment or "").encode("utf-8")
        if len(comment) >= L.COMMENT_SIZE:
            raise InvalidArgument(f"VDI comments are limited to {L.COMMENT_SIZE - 1} bytes, "
                                  f"found {len(comment)}")
        if diff and p.parent.uuid is None:
            raise NotSupported(f"{p.parent.location}: the parent has no UUID, and a VDI "
                               "differencing image links to its parent by UUID")
        # VirtualBox's layout (vdiInitHeader): the map and the data each start on a 1 MiB boundary
        offset_blocks = align_up(L.PRE_HEADER_SIZE + L.HEADER1PLUS_SIZE, DATA_ALIGN)
        offset_data = align_up(offset_blocks + blocks * 4, DATA_ALIGN)
        if offset_data > 0xFFFFFFFF:
            raise InvalidArgument(f"{size} bytes in {bs}-byte blocks need a block map too large "
                                  "for VDI; use a larger AllocationBlockSize")
        image_type = L.TYPE_FIXED if fixed else L.TYPE_DIFF if diff else L.TYPE_NORMAL
        g0 = {"cylinders": 0, "heads": 0, "sectors": 0, "sector_size": 512}
        # a differencing image's legacy geometry stays "not calculated" (0/0/0), as VirtualBox
        # writes it: the disk's geometry is the base's
        pchs = p.pchs if p.pchs and not diff and not Geometry(*p.pchs).is_zero else None
        lchs = p.lchs if p.lchs and not Geometry(*p.lchs).is_zero else None
        hdr = dict(
            header_size=L.HEADER1PLUS_SIZE, image_type=image_type, flags=0,
            comment=comment + bytes(L.COMMENT_SIZE - len(comment)),
            offset_blocks=offset_blocks, offset_data=offset_data,
            legacy_geometry=dict(g0, **(dict(zip(("cylinders", "heads", "sectors"), pchs))
                                        if pchs else {})),
            dummy=0, disk_size=size, block_size=bs, block_extra=0, blocks=blocks,
            blocks_allocated=blocks if fixed else 0,
            uuid_create=_uuid_bytes(p.uuid or uuidlib.uuid4()),
            uuid_modify=_uuid_bytes(uuidlib.uuid4()),
            uuid_linkage=_uuid_bytes(p.parent.uuid if diff else None),
            uuid_parent_modify=_uuid_bytes(p.parent.modification_uuid if diff else None),
            lchs=dict(g0, **(dict(zip(("cylinders", "heads", "sectors"), lchs)) if lchs else {})),
        )
        pre = L.PreHeader.build(dict(file_info=L.FILE_INFO.ljust(64, b"\0"),
                                     signature=L.SIGNATURE, version=L.VERSION_1_1))
        head = pre + L.Header1Plus.build(hdr)
        f = ImageFile.create_temp(p.location)
        try:
            f.pwrite(0, head + bytes(-len(head) % 512))      # the gap up to the map stays a hole
            for a in range(0, blocks, MAP_CHUNK):          # the map, streamed
                b = min(blocks, a + MAP_CHUNK)
                f.pwrite(offset_blocks + a * 4,
                         _map_to_disk(array("I", range(a, b))) if fixed else _FREE_BYTES[:(b - a) * 4])
            f.truncate(offset_data + (blocks * bs if fixed else 0))
            if fixed:                  # a fixed VDI holds its blocks (VirtualBox writes it full)
                preallocate(f, offset_data, blocks * bs)
            f.sync()
            if p.progress:
                p.progress(size, size)
            f.commit()
            img = VdiImage(self, p.location, f, False)
        except BaseException:
            f.abandon()
            raise
        return img


BACKEND = VdiBackend()
