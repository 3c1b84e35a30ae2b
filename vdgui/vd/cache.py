"""A cache image in front of a disk (VDCacheOpen / VDCacheClose; issue #19 part 2).

The cache holds what the chain reads (below the filters) in whole ``CHUNK``s: a read takes the
chunks it finds from the cache file and reads the missing ones from the chain in one call,
keeping them; a write goes to the disk first, then the cached copies of what it covers are
rewritten; a discard drops them. docs/cache.md.
"""
from __future__ import annotations

import os
import threading
import uuid as uuidlib
from collections.abc import Callable

from .backend import is_network_location
from .errors import InvalidArgument
from .formats import vci

CHUNK = vci.CHUNK
DEFAULT_SIZE = 256 << 20
ReadFn = Callable[[int, int, memoryview], None]


def binding_token(location: str, size: int) -> bytes:
    """The identity a cache is tied to: the disk's top location and virtual size."""
    loc = location if is_network_location(location) else os.path.realpath(location)
    return uuidlib.uuid5(uuidlib.NAMESPACE_URL, f"vdgui-cache:{loc}|{size}").bytes


class DiskCache:
    """A VCI cache attached to a disk of ``size`` bytes (thread-safe)."""

    def __init__(self, cache: vci.VciCache, size: int) -> None:
        self.cache = cache
        self.size = size
        self._lock = threading.Lock()

    @classmethod
    def attach(cls, path: str, location: str, size: int, *, create_size: int | None = None,
               reset: bool = False) -> DiskCache:
        """Open the cache at ``path`` (made with ``create_size`` bytes when absent and a size is
        given) for the disk at ``location``."""
        token = binding_token(location, size)
        if not os.path.lexists(path) and create_size is not None:
            c = vci.VciCache.create(path, create_size, binding=token)
        else:
            c = vci.VciCache.open(path, reset=reset)
        try:
            c.bind(token)
        except BaseException:
            c.abandon()
            raise
        return cls(c, size)

    @property
    def path(self) -> str:
        return self.cache.path

    def read(self, offset: int, length: int, out: memoryview, read_chain: ReadFn) -> None:
        """Fill ``out`` with the disk's bytes at ``offset``: cached chunks from the cache,
        missing ones (runs of them in one call) from ``read_chain`` and then kept."""
        end = offset + length
        pos = offset
        with self._lock:
            c = self.cache
            while pos < end:
                hit = c.find(pos)
                if hit is not None:
                    d0, n, f0 = hit
                    take = min(end, d0 + n) - pos
                    c.read(f0 + pos - d0, out[pos - offset:pos - offset + take])
                    c.hits += 1
                    pos += take
                    continue
                # a run of missing chunks
                c0 = pos - pos % CHUNK
                c1 = c0 + CHUNK
                while c1 < end and c1 < self.size and c.find(c1) is None:
                    c1 += CHUNK
                c1 = min(c1, self.size)
                if c0 == pos and c1 <= end:
                    buf = out[pos - offset:c1 - offset]
                    read_chain(c0, c1 - c0, buf)
                else:
                    tmp = bytearray(c1 - c0)
                    buf = memoryview(tmp)
                    read_chain(c0, c1 - c0, buf)
                    stop = min(end, c1)
                    out[pos - offset:stop - offset] = buf[pos - c0:stop - c0]
                c.misses += 1
                for k in range(c0, c1, CHUNK):
                    if c.find(k) is None:
                        c.store(k, buf[k - c0:min(k + CHUNK, c1) - c0])
                pos = min(end, c1)

    def wrote(self, offset: int, data: bytes) -> None:
        with self._lock:
            self.cache.update(offset, data)

    def invalidate(self, offset: int, length: int) -> None:
        with self._lock:
            self.cache.invalidate(offset, length)

    def flush(self) -> None:
        with self._lock:
            self.cache.flush()

    def close(self) -> None:
        with self._lock:
            self.cache.close()

    def info(self) -> dict:
        with self._lock:
            return self.cache.info()


def cache_info(path: str) -> dict:
    """What a cache file holds, without attaching it (read-only look at a clean cache)."""
    c = vci.VciCache.open(path)
    try:
        return c.info()
    finally:
        c.abandon()


def check_size(size: int) -> int:
    if size < vci.MIN_SIZE or size > vci.MAX_SIZE or size % vci.SIZE_STEP:
        raise InvalidArgument(
            f"cache size must be {vci.MIN_SIZE >> 20} MiB..{vci.MAX_SIZE >> 30} GiB in steps of "
            f"{vci.SIZE_STEP >> 20} MiB", found=size)
    return size
