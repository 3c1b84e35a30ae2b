"""QCOW version 1 (qemu ``block/qcow.c`` layout): read-only."""
from __future__ import annotations

import os
from array import array
from collections import OrderedDict

from ...align import ceil_div
from ...backend import Backend, ImageFlags, OpenFlags
from ...errors import CorruptImage, NotSupported, ParentMismatch
from ...fileio import ImageFile
from ...image import Alloc, Image, ParentHint
from . import layout as L
from .clusters import DecompressError, be_array, inflate


class QcowV1Image(Image):
    """QCOW version 1 (qemu block/qcow.c layout), read-only."""

    f: ImageFile
    fsize: int
    cb: int                 # cluster bits
    cs: int                 # cluster size
    l2_bits: int            # log2 of the entries per L2 table
    l1: array[int]
    backing_file: str | None

    def __init__(self, backend: Backend, location: str, f: ImageFile, flags: OpenFlags) -> None:
        super().__init__(backend, location, True)
        self.f = f
        self.fsize = f.size()
        raw = f.read_exact(0, L.V1_HEADER_SIZE, "qcow header")
        h = L.QcowV1Header.parse(raw)
        if not 9 <= h.cluster_bits <= 16:
            raise CorruptImage("cluster size out of range", path=location, field="cluster_bits",
                               offset=32, expected="9..16", found=h.cluster_bits)
        if not 6 <= h.l2_bits <= 16:
            raise CorruptImage("L2 table size out of range", path=location, field="l2_bits",
                               offset=33, expected="6..16", found=h.l2_bits)
        if h.crypt_method:
            raise NotSupported(f"{location}: encrypted qcow images are not supported",
                               field="crypt_method", offset=36)
        self.cb, self.l2_bits = h.cluster_bits, h.l2_bits
        self.cs = 1 << h.cluster_bits
        self.size = h.size
        self.block_size = self.cs
        span = 1 << (h.cluster_bits + h.l2_bits)
        if h.size > (1 << 62):
            raise CorruptImage("virtual size too large", path=location, field="size", offset=24,
                               found=h.size)
        l1_size = ceil_div(h.size, span)
        if l1_size * 8 > L.MAX_L1_BYTES:
            raise CorruptImage("L1 table too large", path=location, field="size", offset=24,
                               expected="an L1 table of at most 32 MiB", found=h.size)
        self.l1 = array("Q")
        if l1_size:
            self.l1 = be_array(f.read_exact(h.l1_table_offset, l1_size * 8, "L1 table"))
        self._l2: OrderedDict[int, array[int]] = OrderedDict()  # LRU of L2 tables
        self.backing_file = None
        if h.backing_file_offset:
            if h.backing_file_size > L.MAX_BACKING_NAME:
                raise CorruptImage("backing file name too long", path=location,
                                   field="backing_file_size", offset=16, found=h.backing_file_size)
            name = f.read_exact(h.backing_file_offset, h.backing_file_size, "backing file name")
            self.backing_file = name.decode("utf-8", "replace") or None
        if self.backing_file:
            self.parent_hint = ParentHint(locations=[self.backing_file])
            self.flags = ImageFlags.DIFF

    def info(self) -> dict[str, object]:
        d: dict[str, object] = {"qcow_version": 1, "cluster_size": self.cs, "l2_bits": self.l2_bits}
        if self.backing_file:
            d["backing_file"] = self.backing_file
        return d

    def check_parent_link(self, parent: Image) -> None:
        if self.backing_file and os.path.basename(self.backing_file) != os.path.basename(
            parent.location
        ):
            raise ParentMismatch(
                f"{self.location}: backing file is not {parent.location}",
                expected=self.backing_file,
                found=parent.location,
            )

    def _entry(self, ci: int) -> int:
        l1i, l2i = divmod(ci, 1 << self.l2_bits)
        if l1i >= len(self.l1) or not self.l1[l1i]:
            return 0
        off = self.l1[l1i]
        tbl = self._l2.get(off)
        if tbl is None:
            n = 8 << self.l2_bits
            if off + n > self.fsize:
                raise CorruptImage(
                    "L2 table lies past the end of the file",
                    path=self.location,
                    offset=off,
                    expected=f"end <= {self.fsize}",
                    found=off + n,
                )
            tbl = be_array(self.f.read_exact(off, n, "L2 table"))
            self._l2[off] = tbl
            if len(self._l2) > 64:
                self._l2.popitem(last=False)
        return tbl[l2i]

    def block_status(self, offset: int, length: int) -> list[tuple[int, int, Alloc]]:
        from ...sparse import block_runs

        return block_runs(
            offset, length, self.cs, lambda ci: Alloc.DATA if self._entry(ci) else Alloc.UNALLOCATED
        )

    def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        pos = offset
        end = offset + length
        while pos < end:
            ci, inner = divmod(pos, self.cs)
            n = min(self.cs - inner, end - pos)
            e = self._entry(ci)
            if e >> 63:
                shift = 63 - self.cb
                csize = (e >> shift) & (self.cs - 1)
                coff = e & ((1 << shift) - 1)
                if coff + csize > self.fsize:
                    raise CorruptImage(
                        "compressed cluster lies past the end of the file",
                        path=self.location,
                        offset=coff,
                    )
                try:
                    out = inflate(self.f.pread(coff, csize), self.cs)
                except DecompressError as exc:
                    raise CorruptImage(
                        f"compressed cluster cannot be decompressed: {exc}",
                        path=self.location,
                        offset=coff,
                    ) from None
                if len(out) < self.cs:
                    raise CorruptImage(
                        "compressed cluster is short", path=self.location, offset=coff
                    )
                buf[pos - offset : pos - offset + n] = out[inner : inner + n]
            elif e:
                data = self.f.read_exact(e + inner, n, "data cluster")
                buf[pos - offset : pos - offset + n] = data
            pos += n
        return bytes(buf)

    def close(self) -> None:
        self.f.close()
