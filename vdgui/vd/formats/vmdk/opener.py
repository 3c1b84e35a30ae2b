"""Extent factories: the extent object for each descriptor line (ZERO, FLAT/VMFS, SPARSE,
VMFSSPARSE, SESPARSE), with the checks that span extents (a sparse file listed twice, flat
extents over the same bytes of one file)."""
from __future__ import annotations

import bisect
import os
from typing import TYPE_CHECKING

from ...align import ceil_div
from ...errors import CorruptImage, ImageNotFound, NotSupported
from ...fileio import ImageFile
from .descriptor import ExtentLine
from .extents import Extent, FlatExtent, ZeroExtent
from .layout import (
    COWD_GTES,
    COWD_MAGIC,
    FLAG_RGD,
    GD_AT_END,
    MAGIC,
    MAX_GRAIN_SECTORS,
    SECTOR,
    SESPARSE_MAGIC,
    SESPARSE_VERSION,
    SESPARSE_VOLATILE_MAGIC,
    CowdHeader,
    SESparseConstHeader,
    SESparseVolatileHeader,
)
from .sparse import SESparseExtent, SparseExtent, parse_sparse_header

if TYPE_CHECKING:
    from .state import VmdkState


class ExtentOpener:
    """Makes the extent objects of one image from its descriptor lines. Remembers what it has
    opened, to refuse a sparse file listed twice and flat extents over the same bytes of one
    file (state of the opener, for the life of the image: resize adds extents through it)."""

    def __init__(self, image: VmdkState) -> None:
        self.image = image              # for its location (messages) and its shared files
        self._sparse_paths: set[str] = set()
        self._flat_spans: dict = {}     # file identity -> (sorted starts, [(start, end, ext)])

    def sparse(self, line: ExtentLine, vstart: int, path: str, f: ImageFile, hdr: dict,
               writable: bool) -> SparseExtent:
        """A hosted sparse or streamOptimized extent whose header ``hdr`` was read from ``f``."""
        size = f.size()
        gd_sector = hdr["gd_offset"]
        if gd_sector == GD_AT_END:
            # streamOptimized with the directory at the end: read the footer (1024 bytes from
            # the end)
            if size < 3 * SECTOR:
                raise CorruptImage("streamOptimized file has no footer", path=path,
                                   expected="a footer 1024 bytes before the end",
                                   found=f"{size} bytes")
            foot = parse_sparse_header(f.read_exact(size - 2 * SECTOR, SECTOR, "footer"), path)
            gd_sector = foot["gd_offset"]
            if gd_sector == GD_AT_END:
                raise CorruptImage("footer does not locate the grain directory", path=path,
                                   field="gdOffset", offset=size - 2 * SECTOR + 0x38,
                                   expected="a sector number", found="-1")
        per_gt = hdr["grain_size"] * hdr["num_gtes_per_gt"]
        if line.sectors > hdr["capacity"] and \
                not (line.sectors - hdr["capacity"] < hdr["grain_size"]):
            raise CorruptImage("extent is larger than its sparse file's capacity", path=path,
                               field="capacity", offset=0xC, expected=f">= {line.sectors} sectors",
                               found=hdr["capacity"])
        n_gts = max(1, ceil_div(max(hdr["capacity"], line.sectors), per_gt))
        gd_bytes = n_gts * 4
        if gd_sector * SECTOR + gd_bytes > size or gd_sector == 0:
            raise CorruptImage("grain directory lies outside the file", path=path, field="gdOffset",
                               offset=0x38, expected=f"{n_gts} entries inside {size} bytes",
                               found=f"sector {gd_sector}")
        rgd_sector = 0
        if hdr["flags"] & FLAG_RGD and hdr["rgd_offset"] and hdr["gd_offset"] != GD_AT_END:
            rgd_sector = hdr["rgd_offset"]
            if rgd_sector * SECTOR + gd_bytes > size:
                raise CorruptImage("redundant grain directory lies outside the file", path=path,
                                   field="rgdOffset", offset=0x30,
                                   expected=f"{n_gts} entries inside {size} bytes",
                                   found=f"sector {rgd_sector}")
        ext = SparseExtent(line, vstart, path, f, writable and line.access == "RW",
                           grain_sectors=hdr["grain_size"], gtes=hdr["num_gtes_per_gt"],
                           gd_sector=gd_sector, rgd_sector=rgd_sector, n_gts=n_gts,
                           capacity=hdr["capacity"], flags=hdr["flags"], header=hdr)
        return ext


    def extent(self, line: ExtentLine, vstart: int, path: str | None,
               writable: bool) -> Extent:
        """The extent a descriptor line names (its file opened through the image)."""
        t = line.type
        if t == "ZERO":
            return ZeroExtent(line, vstart, None)
        if path is None or not os.path.exists(path):
            raise ImageNotFound(f"{self.image.location}: extent file {line.filename!r} not found "
                                f"(looked for {path})")
        f = self.image._file(path, writable)
        if t not in ("FLAT", "VMFS", "VMFSRDM", "VMFSRAW"):
            key = os.path.realpath(path)
            if key in self._sparse_paths:
                raise CorruptImage(f"{self.image.location}: sparse extent file {line.filename!r} "
                                   "is listed more than once", field="extent description",
                                   expected="each sparse file once", found="a repeat")
            self._sparse_paths.add(key)
        if t in ("FLAT", "VMFS", "VMFSRDM", "VMFSRAW"):
            ext = FlatExtent(line, vstart, path, f, writable)
            self._refuse_aliasing(ext, f)
            return ext
        head = f.pread(0, SECTOR)
        if head[:4] == MAGIC:
            hdr = parse_sparse_header(head, path)
            return self.sparse(line, vstart, path, f, hdr, writable)
        if head[:4] == COWD_MAGIC and t == "VMFSSPARSE":
            return self.cowd(line, vstart, path, f)
        if t == "SESPARSE":
            return self.sesparse(line, vstart, path, f)
        raise CorruptImage(f"extent file is not a {t} extent", path=path, field="magic", offset=0,
                           expected="'KDMV'" + (" or 'COWD'" if t == "VMFSSPARSE" else ""),
                           found=repr(head[:4]))


    def _refuse_aliasing(self, ext: FlatExtent, f: ImageFile) -> None:
        """Two flat extents over the same bytes of one file (the same file named twice, or through a
        hard link) make a write through one change the other, and a descriptor repeating one line
        thousands of times multiplies every read: refused, naming both lines. Each file's ranges are
        kept sorted, so a descriptor of n extents costs n log n."""
        key: tuple[int, int] | str
        try:
            st = os.fstat(f.fd)
            key = (st.st_dev, st.st_ino)
        except (OSError, AttributeError):
            key = os.path.realpath(ext.path)
        starts, spans = self._flat_spans.setdefault(key, ([], []))
        a, b = ext.base, ext.base + ext.length
        if b <= a:
            return
        i = bisect.bisect_left(starts, a)
        for j in (i - 1, i):
            if 0 <= j < len(spans):
                s, e, other = spans[j]
                if s < b and a < e:
                    raise CorruptImage(
                        f"{self.image.location}: extent {ext.line.filename!r} at file bytes "
                        f"{a:#x}..{b:#x} overlaps extent {other.line.filename!r} at "
                        f"{s:#x}..{e:#x} of the same file (a write through one would change "
                        "the other)", field="extent description",
                        expected="extents over disjoint parts of their files",
                        found="two extents over the same bytes")
        starts.insert(i, a)
        spans.insert(i, (a, b, ext))


    def cowd(self, line: ExtentLine, vstart: int, path: str, f: ImageFile) -> SparseExtent:
        """An ESX vmfsSparse (COWD) extent, read-only."""
        if f.size() < 2048:
            raise CorruptImage("COWD header is truncated", path=path, expected="2048 bytes",
                               found=f"{f.size()} bytes")
        h = CowdHeader.parse(f.pread(0, CowdHeader.sizeof()))
        gs = h.grain_size
        if gs == 0 or gs > MAX_GRAIN_SECTORS:
            raise CorruptImage("bad grain size", path=path, field="grainSize", offset=16,
                               expected=f"1..{MAX_GRAIN_SECTORS}", found=gs)
        need = ceil_div(max(h.num_sectors, line.sectors), (gs * COWD_GTES))
        if h.num_gd_entries < need or h.num_gd_entries * 4 > f.size():
            raise CorruptImage("grain directory size does not fit the capacity", path=path,
                               field="numGDEntries", offset=24, expected=f">= {need}",
                               found=h.num_gd_entries)
        if h.gd_offset == 0 or h.gd_offset * SECTOR + 4 * h.num_gd_entries > f.size():
            raise CorruptImage("grain directory lies outside the file", path=path, field="gdOffset",
                               offset=20, found=f"sector {h.gd_offset}")
        ext = SparseExtent(line, vstart, path, f, False, grain_sectors=gs, gtes=COWD_GTES,
                           gd_sector=h.gd_offset, rgd_sector=0, n_gts=h.num_gd_entries,
                           capacity=h.num_sectors, flags=0, header=None, cowd=True)
        return ext


    @staticmethod
    def sesparse(line: ExtentLine, vstart: int, path: str, f: ImageFile) -> SESparseExtent:
        """An ESXi seSparse extent, read-only."""
        h = SESparseConstHeader.parse(f.read_exact(0, SECTOR, "seSparse header"))
        if h.magic != SESPARSE_MAGIC:
            raise CorruptImage("not a seSparse extent", path=path, field="magic", offset=0,
                               expected=f"{SESPARSE_MAGIC:#x}", found=f"{h.magic:#x}")
        for name, want, off in (("version", SESPARSE_VERSION, 8), ("grain_size", 8, 0x18),
                                ("grain_table_size", 64, 0x20), ("flags", 0, 0x28)):
            if h[name] != want:
                raise NotSupported("unsupported seSparse extent", path=path, field=name, offset=off,
                                   expected=hex(want), found=hex(h[name]))
        if h.capacity < line.sectors:
            raise CorruptImage("seSparse capacity is smaller than the extent", path=path,
                               field="capacity", offset=0x10, expected=f">= {line.sectors}",
                               found=h.capacity)
        vol_off = h.volatile_header_offset * SECTOR
        if vol_off + SECTOR > f.size():
            raise CorruptImage("seSparse volatile header lies past the end of the file", path=path,
                               field="volatile_header_offset", offset=0x50,
                               found=f"sector {h.volatile_header_offset}")
        v = SESparseVolatileHeader.parse(f.read_exact(vol_off, SECTOR, "seSparse volatile header"))
        if v.magic != SESPARSE_VOLATILE_MAGIC:
            raise CorruptImage("bad seSparse volatile header", path=path, field="magic",
                               offset=vol_off, expected=f"{SESPARSE_VOLATILE_MAGIC:#x}",
                               found=f"{v.magic:#x}")
        if v.replay_journal:
            raise NotSupported(f"{path}: the seSparse extent has an unreplayed journal (the ESXi "
                               "host did not close it cleanly); replaying it is not supported")
        return SESparseExtent(line, vstart, path, f, h)
