"""Fixed-width integer tables (block maps, L1/L2 tables, BATs) as ``array`` objects.

Formats store their tables little- or big-endian; these helpers convert whole tables at once
(no per-entry struct calls) and drop a trailing partial entry.
"""
from __future__ import annotations

import sys
from array import array

_LITTLE_HOST = sys.byteorder == "little"


def table_from_bytes(data, typecode: str = "Q", big_endian: bool = False) -> array:
    """A table of ``typecode`` integers from raw bytes in the given byte order."""
    a = array(typecode)
    data = bytes(data)
    a.frombytes(data[:len(data) // a.itemsize * a.itemsize])
    if big_endian == _LITTLE_HOST:
        a.byteswap()
    return a


def table_to_bytes(a: array, big_endian: bool = False) -> bytes:
    """The raw bytes of a table in the given byte order (``a`` is left unchanged)."""
    if big_endian != _LITTLE_HOST:
        return a.tobytes()
    b = array(a.typecode, a)
    b.byteswap()
    return b.tobytes()


def first_shared(targets) -> tuple[int, int, int] | None:
    """Cross-link detection: the first value two references share, as ``(value, i, j)`` with
    ``i < j`` indices into ``targets`` (one block or cluster number per reference), or None.
    O(n); the common case (all distinct) is decided by one set at C speed."""
    if len(set(targets)) == len(targets):
        return None
    seen: dict[int, int] = {}
    for j, t in enumerate(targets):
        i = seen.setdefault(t, j)
        if i != j:
            return t, i, j
    return None
