"""A Disk (any chain, opened at any member) as a seekable io.RawIOBase.

Model: VirtualBox's VDCreateVfsFileFromDisk. Reads are rounded out to whole cache blocks and
runs of missing blocks are read from the chain in one call (file-system libraries do many small
reads); recently read blocks are kept within a bounded budget. Writable only when the Disk's top
image was opened for writing; a write drops the cached blocks it touches.
"""
from __future__ import annotations

import io
from collections import OrderedDict

from ..disk import Disk
from ..errors import InvalidArgument, ReadOnlyImage

BLOCK = 64 * 1024
CACHE_BYTES = 8 * 1024 * 1024
DIRECT = 4 * BLOCK          # reads this large bypass the cache


class DiskFile(io.RawIOBase):
    def __init__(self, disk: Disk, *, top: int | None = None, block_size: int = BLOCK,
                 cache_bytes: int = CACHE_BYTES) -> None:
        super().__init__()
        if block_size <= 0 or block_size % 512:
            raise InvalidArgument(f"cache block size {block_size} is not a multiple of 512")
        self._disk = disk
        self._top = len(disk.images) - 1 if top is None else top
        if not 0 <= self._top < len(disk.images):
            raise InvalidArgument(f"no image number {top} in the chain")
        self._size = disk.images[self._top].size
        self._pos = 0
        self._bs = block_size
        self._max_blocks = max(1, cache_bytes // block_size)
        self._cache: OrderedDict[int, bytes] = OrderedDict()

    # -- io.RawIOBase ---------------------------------------------------------------------
    @property
    def size(self) -> int:
        return self._size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return self._top == len(self._disk.images) - 1 and not self._disk.top.read_only

    def tell(self) -> int:
        self._checkClosed()
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._checkClosed()
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self._size + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if pos < 0:
            raise ValueError(f"negative seek position {pos}")
        self._pos = pos
        return pos

    def readinto(self, b) -> int:
        self._checkClosed()
        mv = memoryview(b).cast("B")
        n = max(0, min(len(mv), self._size - self._pos))
        if n == 0:
            return 0
        self.pread_into(self._pos, mv[:n])
        self._pos += n
        return n

    def write(self, b) -> int:
        self._checkClosed()
        if not self.writable():
            raise ReadOnlyImage("the disk is opened read-only")
        data = bytes(b)
        if self._pos + len(data) > self._size:
            raise InvalidArgument(f"write of {len(data)} bytes at {self._pos} is outside the "
                                  f"disk (size {self._size})")
        if data:
            self._disk.write(self._pos, data)
            first, last = self._pos // self._bs, (self._pos + len(data) - 1) // self._bs
            for blk in range(first, last + 1):
                self._cache.pop(blk, None)
            self._pos += len(data)
        return len(data)

    def flush(self) -> None:
        if not self.closed and self.writable():
            self._disk.flush()

    def close(self) -> None:
        self._cache.clear()
        super().close()

    # -- positional reads -----------------------------------------------------------------
    def pread(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset`` (short at the end of the disk)."""
        n = max(0, min(length, self._size - offset))
        buf = bytearray(n)
        if n:
            self.pread_into(offset, memoryview(buf))
        return bytes(buf)

    def pread_into(self, offset: int, out: memoryview) -> None:
        bs, n = self._bs, len(out)
        if n >= min(DIRECT, self._max_blocks * bs // 2):
            # a large read: straight from the chain into ``out``; the cache would only be
            # flushed by it
            self._disk.read_into(offset, out, self._top)
            return
        first, last = offset // bs, (offset + n - 1) // bs
        blocks: dict[int, bytes] = {}
        missing_from = None
        for blk in range(first, last + 2):
            data = self._cache.get(blk) if blk <= last else None
            if data is not None:
                self._cache.move_to_end(blk)
                blocks[blk] = data
            if blk <= last and data is None:
                if missing_from is None:
                    missing_from = blk
                continue
            if missing_from is not None:     # one read for the run of missing blocks
                start = missing_from * bs
                end = min(blk * bs, self._size)
                raw = self._disk.read(start, end - start, self._top)
                for i, b in enumerate(range(missing_from, blk)):
                    piece = raw[i * bs:(i + 1) * bs]
                    blocks[b] = piece
                    self._cache[b] = piece
                missing_from = None
        while len(self._cache) > self._max_blocks:
            self._cache.popitem(last=False)
        pos = 0
        for blk in range(first, last + 1):
            data = blocks[blk]
            lo = offset + pos - blk * bs
            take = min(len(data) - lo, n - pos)
            out[pos:pos + take] = data[lo:lo + take]
            pos += take


class SliceFile(io.RawIOBase):
    """A window [start, start+size) of another seekable raw file (a partition of a DiskFile)."""

    def __init__(self, base: DiskFile, start: int, size: int) -> None:
        super().__init__()
        self._base, self._start, self._size, self._pos = base, start, size, 0

    @property
    def size(self) -> int:
        return self._size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}.get(whence)
        if base is None:
            raise ValueError(f"invalid whence {whence}")
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset}")
        self._pos = base + offset
        return self._pos

    def readinto(self, b) -> int:
        mv = memoryview(b).cast("B")
        n = max(0, min(len(mv), self._size - self._pos))
        if n:
            self._base.pread_into(self._start + self._pos, mv[:n])
            self._pos += n
        return n

    def pread(self, offset: int, length: int) -> bytes:
        n = max(0, min(length, self._size - offset))
        return self._base.pread(self._start + offset, n) if n else b""

    def pread_into(self, offset: int, out: memoryview) -> int:
        """Fill ``out`` from ``offset``; short at the end of the slice. Returns the count."""
        n = max(0, min(len(out), self._size - offset))
        if n:
            self._base.pread_into(self._start + offset, out[:n])
        return n
