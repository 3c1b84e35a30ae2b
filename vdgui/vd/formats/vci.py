"""VirtualBox's cache image (VCI): a local file holding copies of a slow disk's blocks.

Layout (VCICache.cpp; structures in :mod:`.vci_layout`): a 1 KiB header at block 0, then the
block map (a 512-byte header and one bit per 512-byte block of the cache file, set = in use),
then a B+-tree whose leaves list extents (a run of disk blocks -> where the copy lies in the
file) sorted by disk block, and the data. VirtualBox never finished writing data into caches
(its vciWrite is a stub); this module fills them by the same structures:

- data is stored in whole chunks (``CHUNK`` bytes, 8-block aligned in the file); each chunk is
  one extent; when the file is full the least recently used extents make room;
- the tree is read whole on open and written whole, to new blocks, on flush/close;
- ``unclean`` is set (and synced) before the first change and cleared by a clean close: a cache
  found unclean may hold data older than its disk and is refused unless reset;
- ``uuid_modification`` binds the cache to one disk (the caller's token): a cache made for
  another disk is refused.

Limits: caches of ``MIN_SIZE``..``MAX_SIZE``, a multiple of ``SIZE_STEP`` (the bitmap is then
whole blocks, as VirtualBox's loader expects).
"""
from __future__ import annotations

import bisect
import os
import threading
import uuid as uuidlib
from collections import OrderedDict
from typing import Any

from ..errors import CacheNotClean, CorruptImage, ImageInUse, InvalidArgument, Refused
from ..fileio import ImageFile
from . import vci_layout as L

CHUNK = 64 * 1024
SIZE_STEP = 4096 * L.BLOCK                  # 2 MiB: 4096 blocks = one block of bitmap
MIN_SIZE = 4 << 20
MAX_SIZE = 64 << 30                         # a 16 MiB bitmap at most
_open_lock = threading.Lock()
_open_paths: set[str] = set()                # caches open in this process (real paths)


def _blocks(n: int) -> int:
    return n // L.BLOCK


class VciCache:
    """An open cache file. Offsets given to the methods are disk byte offsets."""

    def __init__(self, f: ImageFile, hdr: Any, binding: bytes) -> None:
        self.f = f
        self.blocks = hdr.blocks_cache
        self.cache_type = hdr.cache_type
        self.uuid = uuidlib.UUID(bytes=hdr.uuid_image)
        self.binding = binding
        self.blkmap_at = hdr.blkmap
        self.blkmap_blocks = hdr.blkmap_blocks
        self.meta_blocks = 0
        self.bitmap = bytearray()
        # extents: disk block -> [blocks, file block]; LRU order in _lru (oldest first)
        self.ext: dict[int, list[int]] = {}
        self.starts: list[int] = []
        self._lru: OrderedDict[int, None] = OrderedDict()
        self.tree_nodes: list[int] = []
        self.tree_root = hdr.tree_root
        self.dirty = False
        self._unclean_on_disk = bool(hdr.unclean)
        self.hits = self.misses = 0
        self._real = ""

    @property
    def path(self) -> str:
        return self.f.path

    # -- create / open ------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str, size: int, *, fixed: bool = False,
               binding: bytes = bytes(16)) -> VciCache:
        """A new empty cache of ``size`` bytes (the file's largest size), written under a
        temporary name and renamed; returned open."""
        if size < MIN_SIZE or size > MAX_SIZE or size % SIZE_STEP:
            raise InvalidArgument(
                f"{path}: cache size must be {MIN_SIZE >> 20} MiB..{MAX_SIZE >> 30} GiB in "
                f"steps of {SIZE_STEP >> 20} MiB", expected="such a size", found=size)
        blocks = size // L.BLOCK
        bitmap_blocks = blocks // 8 // L.BLOCK
        blkmap_blocks = 1 + bitmap_blocks
        meta = 2 + blkmap_blocks
        root = -(-meta // 8) * 8
        f = ImageFile.create_temp(path)
        try:
            hdr = dict(signature=L.SIGNATURE, version=L.VERSION, blocks_cache=blocks,
                       unclean=L.CLEAN, cache_type=L.TYPE_FIXED if fixed else L.TYPE_DYNAMIC,
                       tree_root=root, blkmap=2, blkmap_blocks=blkmap_blocks,
                       uuid_image=uuidlib.uuid4().bytes, uuid_modification=binding)
            self = cls(f, L.VciHeader.parse(L.VciHeader.build(hdr)), binding)
            self.bitmap = bytearray(blocks // 8)
            self._mark(0, root, True)
            self.meta_blocks = root
            self.tree_nodes = []
            self.dirty = True
            if fixed:
                f.truncate(size)
            self._write_meta(clean=True)
            f.commit()
        except BaseException:
            f.abandon()
            raise
        real = os.path.realpath(path)
        with _open_lock:
            _open_paths.add(real)
        self._real = real
        return self

    @classmethod
    def open(cls, path: str, *, reset: bool = False) -> VciCache:
        real = os.path.realpath(path)
        with _open_lock:
            if real in _open_paths:
                raise ImageInUse(f"{path}: the cache is in use by another open disk")
            _open_paths.add(real)
        try:
            f = ImageFile(path, writable=True)
            try:
                self = cls._load(f, reset)
            except BaseException:
                f.close()
                raise
        except BaseException:
            with _open_lock:
                _open_paths.discard(real)
            raise
        self._real = real
        return self

    def _release(self) -> None:
        with _open_lock:
            _open_paths.discard(self._real)

    @classmethod
    def _load(cls, f: ImageFile, reset: bool) -> VciCache:
        fsize = f.size()
        raw = f.read_exact(0, L.HEADER_SIZE, "the VCI header")
        hdr = L.VciHeader.parse(raw)
        if hdr.signature != L.SIGNATURE:
            raise CorruptImage("not a VCI cache image", path=f.path, field="signature",
                               offset=0, expected=hex(L.SIGNATURE), found=hex(hdr.signature))
        if hdr.version != L.VERSION:
            raise CorruptImage("unsupported VCI version", path=f.path, field="version",
                               offset=4, expected=L.VERSION, found=hdr.version)
        if hdr.cache_type not in (L.TYPE_DYNAMIC, L.TYPE_FIXED):
            raise CorruptImage("unknown cache type", path=f.path, field="cache_type",
                               expected="1 (dynamic) or 2 (fixed)", found=hdr.cache_type)
        blocks = hdr.blocks_cache
        if not (_blocks(MIN_SIZE) <= blocks <= _blocks(MAX_SIZE)) or blocks % 4096:
            raise CorruptImage("cache size out of range", path=f.path, field="cBlocksCache",
                               expected=f"{_blocks(MIN_SIZE)}..{_blocks(MAX_SIZE)} blocks, "
                               "a multiple of 4096", found=blocks)
        bitmap_bytes = blocks // 8
        want = 1 + bitmap_bytes // L.BLOCK
        if hdr.blkmap_blocks != want:
            raise CorruptImage("block map size does not fit the cache size", path=f.path,
                               field="cBlkMap", expected=want, found=hdr.blkmap_blocks)
        if hdr.blkmap < 2 or (hdr.blkmap + want) * L.BLOCK > fsize:
            raise CorruptImage("block map lies outside the file", path=f.path,
                               field="offBlkMap", expected=f"2..{fsize // L.BLOCK - want}",
                               found=hdr.blkmap)
        self = cls(f, hdr, hdr.uuid_modification)
        bm = L.VciBlockMap.parse(f.read_exact(hdr.blkmap * L.BLOCK, L.BLOCK, "the block map"))
        if bm.version != L.BLKMAP_VERSION or bm.blocks != blocks or (
                bm.blocks_free + bm.blocks_meta + bm.blocks_data != bm.blocks):
            raise CorruptImage("block map header is inconsistent", path=f.path,
                               offset=hdr.blkmap * L.BLOCK,
                               expected=f"version 1, {blocks} blocks = free + meta + data",
                               found=f"version {bm.version}, {bm.blocks} blocks, "
                               f"{bm.blocks_free}+{bm.blocks_meta}+{bm.blocks_data}")
        self.bitmap = bytearray(f.read_exact((hdr.blkmap + 1) * L.BLOCK, bitmap_bytes,
                                             "the block bitmap"))
        self.meta_blocks = -(-(hdr.blkmap + want) // 8) * 8
        if hdr.unclean and not reset:
            raise CacheNotClean(
                f"{f.path}: the cache was not closed cleanly, so it may hold data older than "
                "its disk; reset it (empties it) or delete it")
        if reset:
            self._reset()
        else:
            self._load_tree(fsize)
        return self

    def _reset(self) -> None:
        self.bitmap[:] = bytes(len(self.bitmap))
        self._mark(0, self.meta_blocks, True)
        self.ext.clear()
        self.starts.clear()
        self._lru.clear()
        self.tree_nodes = []
        self.dirty = True

    def _node(self, block: int, fsize: int) -> tuple[int, bytes]:
        if block < self.meta_blocks or block + 8 > self.blocks or (block + 8) * L.BLOCK > fsize:
            raise CorruptImage("tree node lies outside the cache's data area", path=self.path,
                               expected=f"{self.meta_blocks}..{min(self.blocks, fsize // 512) - 8}",
                               found=block)
        raw = self.f.read_exact(block * L.BLOCK, L.NODE_SIZE, "a tree node")
        return raw[0], raw

    def _load_tree(self, fsize: int) -> None:
        seen: set[int] = set()
        extents: list[tuple[int, int, int]] = []

        def walk(block: int, depth: int) -> None:
            if depth > L.MAX_TREE_DEPTH or block in seen:
                raise CorruptImage("tree is too deep or loops", path=self.path,
                                   offset=block * L.BLOCK, expected=f"depth <= {L.MAX_TREE_DEPTH}",
                                   found=f"node {block} reached again or depth {depth}")
            seen.add(block)
            kind, raw = self._node(block, fsize)
            if kind == L.NODE_LEAF:
                for i in range(L.EXTENTS_PER_NODE):
                    e = L.VciExtent.parse(raw[1 + i * L.EXTENT_SIZE:])
                    if e.blocks and e.file_block:
                        extents.append((e.disk_block, e.blocks, e.file_block))
            elif kind == L.NODE_INTERNAL:
                for i in range(L.INTERNALS_PER_NODE):
                    n = L.VciInternal.parse(raw[1 + i * L.INTERNAL_SIZE:])
                    if n.blocks and n.child:
                        walk(n.child, depth + 1)
            else:
                raise CorruptImage("unknown tree node type", path=self.path,
                                   offset=block * L.BLOCK, expected="1 or 2", found=kind)

        walk(self.tree_root, 0)
        self.tree_nodes = sorted(seen)
        extents.sort()
        end = 0
        for disk, n, at in extents:
            if disk < end:
                raise CorruptImage("cache extents overlap", path=self.path,
                                   expected=f"an extent from block {end}", found=disk)
            k = bisect.bisect_left(self.tree_nodes, at - 7)
            in_tree = k < len(self.tree_nodes) and self.tree_nodes[k] < at + n
            if (at < self.meta_blocks or at + n > self.blocks or in_tree
                    or not self._all_set(at, n)):
                raise CorruptImage("cache extent points outside the used data area",
                                   path=self.path, expected=f"blocks {self.meta_blocks}.."
                                   f"{self.blocks} marked in use", found=f"{at}+{n}")
            end = disk + n
            self.ext[disk] = [n, at]
            self.starts.append(disk)
            self._lru[disk] = None

    # -- bitmap -------------------------------------------------------------------------------
    def _mark(self, block: int, n: int, used: bool) -> None:
        if not block % 8 and not n % 8:
            self.bitmap[block >> 3:(block + n) >> 3] = (b"\xff" if used else b"\0") * (n >> 3)
            return
        for b in range(block, block + n):
            if used:
                self.bitmap[b >> 3] |= 1 << (b & 7)
            else:
                self.bitmap[b >> 3] &= ~(1 << (b & 7)) & 0xFF

    def _all_set(self, block: int, n: int) -> bool:
        if not block % 8 and not n % 8:
            return self.bitmap[block >> 3:(block + n) >> 3] == b"\xff" * (n >> 3)
        return all(self.bitmap[b >> 3] >> (b & 7) & 1 for b in range(block, block + n))

    def _alloc(self, n: int) -> int | None:
        """``n`` (a multiple of 8) free blocks, 8-block aligned, or None."""
        i = self.bitmap.find(bytes(n // 8), self.meta_blocks // 8)
        if i < 0:
            return None
        self._mark(i * 8, n, True)
        return i * 8

    def counts(self) -> tuple[int, int, int]:
        used = int.from_bytes(self.bitmap, "little").bit_count()
        data = sum(n for n, _a in self.ext.values())
        return self.blocks - used, used - data, data

    # -- lookup and data ----------------------------------------------------------------------
    def find(self, offset: int) -> tuple[int, int, int] | None:
        """The extent holding disk byte ``offset``: (disk offset, length, file offset)."""
        blk = offset // L.BLOCK
        i = bisect.bisect_right(self.starts, blk) - 1
        if i < 0:
            return None
        start = self.starts[i]
        n, at = self.ext[start]
        if blk >= start + n:
            return None
        self._lru.move_to_end(start)
        return start * L.BLOCK, n * L.BLOCK, at * L.BLOCK

    def read(self, file_offset: int, buf: memoryview) -> None:
        got = self.f.preadv_into(file_offset, buf)
        if got < len(buf):
            raise CorruptImage("cached data lies past the end of the file", path=self.path,
                               offset=file_offset, expected=len(buf), found=got)

    def store(self, offset: int, data: memoryview) -> bool:
        """Keep ``data`` (a whole chunk at a chunk boundary, or the disk's last piece)."""
        n = -(-len(data) // L.BLOCK)
        need = -(-n // 8) * 8
        if need > self.blocks - self.meta_blocks - 8:
            return False
        at = self._alloc(need)
        while at is None and self._lru:
            self._drop(next(iter(self._lru)))
            at = self._alloc(need)
        if at is None:
            return False
        self._set_unclean()
        buf = data if len(data) == n * L.BLOCK else bytes(data) + bytes(n * L.BLOCK - len(data))
        self.f.pwrite(at * L.BLOCK, buf)
        blk = offset // L.BLOCK
        self.ext[blk] = [n, at]
        if need > n:
            self._mark(at + n, need - n, False)
        bisect.insort(self.starts, blk)
        self._lru[blk] = None
        self.dirty = True
        return True

    def _drop(self, start: int) -> None:
        n, at = self.ext.pop(start)
        self.starts.pop(bisect.bisect_left(self.starts, start))
        self._lru.pop(start, None)
        self._mark(at, n, False)
        self.dirty = True

    def overlapping(self, offset: int, length: int) -> list[int]:
        lo, hi = offset // L.BLOCK, -(-(offset + length) // L.BLOCK)
        i = max(0, bisect.bisect_right(self.starts, lo) - 1)
        out = []
        while i < len(self.starts) and self.starts[i] < hi:
            s = self.starts[i]
            if s + self.ext[s][0] > lo:
                out.append(s)
            i += 1
        return out

    def update(self, offset: int, data: bytes) -> None:
        """The disk's bytes at ``offset`` became ``data``: cached copies follow."""
        mv = memoryview(data)
        for s in self.overlapping(offset, len(data)):
            n, at = self.ext[s]
            a = max(offset, s * L.BLOCK)
            b = min(offset + len(data), (s + n) * L.BLOCK)
            self._set_unclean()
            try:
                self.f.pwrite(at * L.BLOCK + a - s * L.BLOCK, mv[a - offset:b - offset])
            except Exception:
                self._drop(s)       # the copy is unknown now: forget it
                raise

    def invalidate(self, offset: int, length: int) -> None:
        for s in self.overlapping(offset, length):
            self._drop(s)

    # -- metadata -----------------------------------------------------------------------------
    def _set_unclean(self) -> None:
        if self._unclean_on_disk:
            return
        self.f.pwrite(L.OFF_UNCLEAN, bytes([L.UNCLEAN]))
        self.f.sync()
        self._unclean_on_disk = True

    def _header(self, clean: bool) -> bytes:
        return bytes(L.VciHeader.build(dict(
            signature=L.SIGNATURE, version=L.VERSION, blocks_cache=self.blocks,
            unclean=L.CLEAN if clean else L.UNCLEAN, cache_type=self.cache_type,
            tree_root=self.tree_root, blkmap=self.blkmap_at, blkmap_blocks=self.blkmap_blocks,
            uuid_image=self.uuid.bytes, uuid_modification=self.binding)))

    def _write_tree(self) -> None:
        """The extents as a B+-tree in newly allocated blocks; the old nodes are freed."""
        old = self.tree_nodes
        level: list[tuple[int, int, bytes]] = []     # (first disk block, blocks, node bytes)
        placed: list[tuple[int, int, int]]
        items = [(s, self.ext[s][0], self.ext[s][1]) for s in self.starts]
        for i in range(0, max(len(items), 1), L.EXTENTS_PER_NODE):
            part = items[i:i + L.EXTENTS_PER_NODE]
            body = b"".join(L.VciExtent.build(dict(
                lru_prev=0, lru_next=0, flags=0, reserved=0, disk_block=s, blocks=n,
                file_block=at)) for s, n, at in part)
            first = part[0][0] if part else 0
            span = part[-1][0] + part[-1][1] - first if part else 0
            level.append((first, span, bytes([L.NODE_LEAF]) + body))
        new: list[int] = []
        while True:
            placed = []
            for first, span, node in level:
                at = self._alloc(8)
                if at is None:
                    raise Refused(f"{self.path}: no room left for the cache's tree")
                new.append(at)
                self.f.pwrite(at * L.BLOCK, node.ljust(L.NODE_SIZE, b"\0"))
                placed.append((first, span, at))
            if len(placed) == 1:
                self.tree_root = placed[0][2]
                break
            level = []
            for i in range(0, len(placed), L.INTERNALS_PER_NODE):
                part = placed[i:i + L.INTERNALS_PER_NODE]
                body = b"".join(L.VciInternal.build(dict(disk_block=f0, blocks=max(sp, 1),
                                                         child=c)) for f0, sp, c in part)
                first = part[0][0]
                span = part[-1][0] + part[-1][1] - first
                level.append((first, span, bytes([L.NODE_INTERNAL]) + body))
        for b in old:
            self._mark(b, 8, False)
        self.tree_nodes = new

    def _write_meta(self, clean: bool) -> None:
        """Tree, then block map, sync, then the header (clean or not), sync."""
        self._write_tree()
        free, meta, data = self.counts()
        bm = L.VciBlockMap.build(dict(version=L.BLKMAP_VERSION, blocks=self.blocks,
                                      blocks_free=free, blocks_meta=meta, blocks_data=data))
        self.f.pwritev(self.blkmap_at * L.BLOCK, [bm, self.bitmap])
        self.f.sync()
        self.f.pwrite(0, self._header(clean))
        self.f.sync()
        self._unclean_on_disk = not clean
        self.dirty = False

    def bind(self, token: bytes) -> None:
        """Tie the cache to one disk: refused when it belongs to another."""
        if self.binding not in (bytes(16), token):
            raise Refused(f"{self.path}: this cache belongs to another disk "
                          f"(binding {uuidlib.UUID(bytes=self.binding)}); use a new cache file")
        if self.binding != token:
            self.binding = token
            self._set_unclean()
            self.dirty = True

    def flush(self) -> None:
        if self.dirty:
            self._write_meta(clean=False)

    def close(self) -> None:
        try:
            if self.dirty or self._unclean_on_disk:
                self._write_meta(clean=True)
        finally:
            try:
                self.f.close()
            finally:
                self._release()

    def abandon(self) -> None:
        """Close without writing metadata (a failed attach): the file stays as it was."""
        try:
            self.f.close()
        finally:
            self._release()

    def info(self) -> dict:
        free, meta, data = self.counts()
        return {
            "location": self.path, "format": "VCI", "uuid": str(self.uuid),
            "size": self.blocks * L.BLOCK, "file_size": os.fstat(self.f.fd).st_size,
            "type": "fixed" if self.cache_type == L.TYPE_FIXED else "dynamic",
            "cached_bytes": data * L.BLOCK, "extents": len(self.ext),
            "free_bytes": free * L.BLOCK, "metadata_bytes": meta * L.BLOCK,
            "hits": self.hits, "misses": self.misses,
        }


def probe(head: bytes) -> bool:
    """Is ``head`` (the file's first bytes) a VCI header?"""
    return len(head) >= 8 and int.from_bytes(head[:4], "little") == L.SIGNATURE
