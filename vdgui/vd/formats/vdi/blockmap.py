"""VDI limits and the helpers of the block map (u32 entries, little-endian on disk) and of
the header fields (UUIDs, geometry, comment)."""
from __future__ import annotations

import functools
import uuid as uuidlib
from array import array

from ...geometry import Geometry
from ...tables import CHUNK_ENTRIES as MAP_CHUNK
from ...tables import table_to_bytes
from . import MAX_BLOCK as MAX_BLOCK  # the declaration holds these (cheap to import)
from . import MAX_NEW_BLOCKS as MAX_NEW_BLOCKS
from . import MAX_SIZE as MAX_SIZE
from . import MIN_BLOCK as MIN_BLOCK
from . import _max_size as _max_size
from . import _size_limit as _size_limit
from . import layout as L
from .layout import Container

_FREE = L.BLOCK_FREE
_ZERO = L.BLOCK_ZERO
_NULL_UUID = bytes(16)
MAX_BLOCKS = 0x3FFFFFFF
MAX_EXTRA = 1 << 20
DATA_ALIGN = 1 << 20
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
