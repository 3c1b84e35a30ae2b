"""VDI limits and the helpers of the block map (u32 entries, little-endian on disk) and of
the header fields (UUIDs, geometry, comment)."""
from __future__ import annotations

import functools
import uuid as uuidlib
from array import array

from ...geometry import Geometry
from ...tables import CHUNK_ENTRIES as MAP_CHUNK
from ...tables import table_to_bytes
from . import layout as L
from .layout import Container

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


@functools.cache
def _free_chunk_bytes() -> bytes:
    """MAP_CHUNK FREE entries as stored: 4 MiB, made on first use (not at import)."""
    return b"\xff" * (4 * MAP_CHUNK)


@functools.cache
def _free_chunk() -> array:
    return array("I", _free_chunk_bytes())


def free_bytes(n: int) -> bytes:
    """``n`` FREE entries as stored (n <= MAP_CHUNK)."""
    return _free_chunk_bytes() if n == MAP_CHUNK else _free_chunk_bytes()[:4 * n]


def _extend_free(m: array, n: int) -> None:
    """Append n FREE entries in chunks (``m.extend(array * n)`` would build the new part
    twice; growing a large array reallocates in place, by mremap)."""
    chunk = _free_chunk()
    while n > 0:
        k = min(n, MAP_CHUNK)
        m.extend(chunk if k == MAP_CHUNK else chunk[:k])
        n -= k


def _uuid_or_none(b: bytes) -> uuidlib.UUID | None:
    return None if b == _NULL_UUID else uuidlib.UUID(bytes_le=bytes(b))


def _uuid_bytes(u: uuidlib.UUID | None) -> bytes:
    return _NULL_UUID if u is None else u.bytes_le


def _geometry(g: Container) -> Geometry | None:
    if g.cylinders == 0 or g.heads == 0 or g.sectors == 0:
        return None
    return Geometry(g.cylinders, g.heads, g.sectors)


def _comment_text(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def _pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0
