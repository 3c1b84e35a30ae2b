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


CHUNK_ENTRIES = 1 << 20     # entries per read or write when a whole table is streamed
COALESCE_GAP = 16           # unchanged entries rewritten to join two runs into one write
SPAN_ABOVE = 64             # more changed entries than this: one write of their whole span


_ZEROS = bytes(1 << 20)


def first_nonzero(table: array, start: int, stop: int) -> int:
    """Index of the first entry of ``table[start:stop]`` that is not 0, else the end of the
    range (``stop`` within the table's length, never before ``start``): windows
    compared with zeroes at memcmp speed, growing while they are empty, then halved (a block
    status walk over a 2 TiB map of mostly empty entries)."""
    stop = min(stop, len(table))
    size = table.itemsize
    zeros = _ZEROS
    most = len(zeros) // size
    i = start
    step = 64
    with memoryview(table) as m, m.cast("B") as raw:
        while i < stop:
            j = min(stop, i + step, i + most)
            if zeros.startswith(raw[i * size:j * size]):
                i = j
                step *= 2
                continue
            while j - i > 1:                    # [i, j) holds a non-zero entry
                mid = (i + j) // 2
                if zeros.startswith(raw[i * size:mid * size]):
                    i = mid
                else:
                    j = mid
            return i
    return max(start, stop)


def arithmetic_run(table: array, start: int, stop: int, first: int, step: int) -> int:
    """End of the run of entries from ``table[start]`` on that read ``first``, ``first +
    step``, ``first + 2 * step`` … (at most ``stop``): windows compared with an array made from
    a range, at C speed, growing while they match, then halved (the host-contiguous clusters
    of a QCOW2 L2 table, not walked entry by entry in Python)."""
    stop = min(stop, len(table))
    tc = table.typecode
    i = start
    n = 16
    while i < stop:
        n = min(n, stop - i)
        v = first + (i - start) * step
        last = v + (n - 1) * step
        same = table[i + n - 1] == last     # the window's last entry first: a miss costs no array
        if same and n > 1:
            try:
                same = table[i:i + n] == array(tc, range(v, last + 1, step))
            except OverflowError:           # past what an entry holds: no entry matches
                same = False
        if same:
            i += n
            n *= 2
        elif n == 1:
            break
        else:
            n //= 2
    return max(i, start)


def read_table(f, offset: int, count: int, typecode: str = "I", big_endian: bool = False,
               what: str = "table") -> array:
    """``count`` entries at ``offset`` of the open ImageFile ``f``, read in chunks into one
    allocation (a large map is never twice in memory); CorruptImage naming ``what`` when the
    file is too short."""
    a = array(typecode, [0]) * count
    size = a.itemsize
    for lo in range(0, count, CHUNK_ENTRIES):
        n = min(CHUNK_ENTRIES, count - lo)
        t = array(typecode)
        t.frombytes(f.read_exact(offset + lo * size, n * size, what))
        a[lo:lo + n] = t
    if big_endian == _LITTLE_HOST:
        a.byteswap()
    return a


class BlockTable:
    """A table of fixed-width entries (block map, BAT, L1/L2, grain table) stored at ``offset``
    of the ImageFile ``f`` in one byte order. ``a`` is the in-memory ``array`` (hot paths index
    it directly); assignments through the table mark entries changed, and :meth:`write_back`
    writes the changed ones, neighbouring entries joined into few writes. Entries not marked
    must equal what the file holds (everything that changes them goes through the table)."""

    __slots__ = ("a", "big_endian", "changed", "f", "offset")

    def __init__(self, f, offset: int, a: array, big_endian: bool = False):
        self.f = f
        self.offset = offset
        self.a = a
        self.big_endian = big_endian
        self.changed: set[int] = set()

    @classmethod
    def load(cls, f, offset: int, count: int, typecode: str = "I", big_endian: bool = False,
             what: str = "table") -> BlockTable:
        return cls(f, offset, read_table(f, offset, count, typecode, big_endian, what),
                   big_endian)

    def __len__(self) -> int:
        return len(self.a)

    def __getitem__(self, i):
        return self.a[i]

    def __setitem__(self, i: int, value: int) -> None:
        self.a[i] = value
        self.changed.add(i)

    def entry_bytes(self, lo: int, hi: int) -> bytes:
        """Entries ``lo .. hi-1`` as the file stores them."""
        return table_to_bytes(self.a[lo:hi], self.big_endian)

    def write_range(self, lo: int, hi: int) -> None:
        """Write entries ``lo .. hi-1`` (in chunks: no copy of a whole large table)."""
        size = self.a.itemsize
        for a in range(lo, hi, CHUNK_ENTRIES):
            b = min(hi, a + CHUNK_ENTRIES)
            self.f.pwrite(self.offset + a * size, self.entry_bytes(a, b))

    def write_entries(self, indices) -> None:
        """Write the given entries: runs of neighbours (gaps up to COALESCE_GAP entries) as one
        write each; more than SPAN_ABOVE entries as one write of their whole span."""
        idx = sorted(set(indices))
        if not idx:
            return
        if len(idx) > SPAN_ABOVE:
            self.write_range(idx[0], idx[-1] + 1)
            return
        start = prev = idx[0]
        for i in idx[1:]:
            if i - prev <= COALESCE_GAP:
                prev = i
                continue
            self.write_range(start, prev + 1)
            start = prev = i
        self.write_range(start, prev + 1)

    def write_back(self) -> None:
        """Write the changed entries (see :meth:`write_entries`) and forget them."""
        if self.changed:
            changed, self.changed = self.changed, set()
            self.write_entries(changed)
