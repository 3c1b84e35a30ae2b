"""What a snapshot changed: the files whose content differs between a differencing image's view
and its parent's view (issue #15 item 4).

Only the ranges the differencing image holds are candidates: each file whose allocation (in
either view) meets one of them, or whose size or type changed, is confirmed by comparing its
content in both views, so a block shared by neighbouring small files does not report them.
Metadata-only changes (times; folders added or removed) are reported apart.
Covered: ext2/3/4, FAT12/16/32 and exFAT (allocation through the libraries). Other file systems are
listed in ``not_covered``.
"""
from __future__ import annotations

import bisect
import io
from dataclasses import dataclass, field

from ..disk import Disk
from ..errors import InvalidArgument
from .diskfile import DiskFile, SliceFile
from .filesystems import open_filesystem
from .partitions import read_layout

COVERED = {"ext2", "ext3", "ext4", "fat12", "fat16", "fat32", "exfat"}


@dataclass
class Change:
    path: str           # "N:/path" when partitioned
    change: str         # added, removed, modified


@dataclass
class ChangeReport:
    files: list[Change] = field(default_factory=list)
    metadata: list[Change] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    not_covered: list[str] = field(default_factory=list)


class _Ranges:
    def __init__(self, runs):
        runs = sorted(runs)
        self.starts = [s for s, _ in runs]
        self.ends = [s + n for s, n in runs]

    def meets(self, start: int, length: int) -> bool:
        # runs are sorted and disjoint, so their ends increase: only the last run starting
        # before our end can reach into us
        i = bisect.bisect_right(self.starts, start + length - 1) - 1
        return i >= 0 and self.ends[i] > start

    def __bool__(self):
        return bool(self.starts)


GRAIN = 4096
CHUNK = 1 << 20


def _differing(disk: Disk, level: int, held: list) -> list:
    """The parts of ``held`` whose bytes differ between the two views, in GRAIN units (a
    snapshot tool may rewrite identical bytes or write zeroes over zeroes)."""
    from ..image import Alloc
    out: list = []
    for e in disk.allocation(top=level, bottom=level):
        if e.level != level:
            continue
        if e.status != Alloc.DATA:   # zeroes: a change only where the parent held data
            below = [(x.start, x.length) for x in disk.allocation(e.start, e.length,
                                                                  top=level - 1)
                     if x.status == Alloc.DATA]
        else:
            below = [(e.start, e.length)]
        for start, length in below:
            pos, end = start, start + length
            while pos < end:
                n = min(CHUNK, end - pos)
                a = disk.read(pos, n, level)
                b = disk.read(pos, n, level - 1)
                if a != b:
                    for g in range(0, n, GRAIN):
                        if a[g:g + GRAIN] != b[g:g + GRAIN]:
                            gs = pos + g
                            if out and out[-1][0] + out[-1][1] == gs:
                                out[-1] = (out[-1][0], out[-1][1] + min(GRAIN, n - g))
                            else:
                                out.append((gs, min(GRAIN, n - g)))
                pos += n
    return out


def _same_content(a, b) -> bool:
    while True:
        x, y = a.read(1 << 20), b.read(1 << 20)
        if x != y:
            return False
        if not x:
            return True


def _alloc(vol, path):
    try:
        return vol.allocation(path)
    except Exception:
        return None


def changed(disk: Disk, top: int | None = None) -> ChangeReport:
    level = len(disk.images) - 1 if top is None else top
    if not 0 <= level < len(disk.images):
        raise InvalidArgument(f"no image number {top} in the chain")
    if level == 0:
        raise InvalidArgument(f"{disk.images[0].location}: not a differencing image (it has no "
                              "parent to compare with)")
    held = [(e.start, e.length) for e in disk.allocation(top=level, bottom=level)
            if e.level == level]
    rep = ChangeReport()
    if not held:
        return rep
    new_f, old_f = DiskFile(disk, top=level), DiskFile(disk, top=level - 1)
    held = _differing(disk, level, held)
    if not held:
        return rep
    new_l = read_layout(new_f.pread, new_f.size, disk.sector_size)
    old_l = read_layout(old_f.pread, old_f.size, disk.sector_size)
    old_parts = {p.number: p for p in old_l.partitions}
    partitioned = any(p.number for p in new_l.partitions)
    all_ranges = _Ranges(held)
    for p in new_l.partitions:
        prefix = f"{p.number}:" if partitioned else ""
        q = old_parts.get(p.number)
        if p.size <= 0 or not all_ranges.meets(p.start, p.size):
            continue
        if q is None or (q.start, q.size) != (p.start, p.size):
            rep.problems.append(f"partition {p.number} is new or moved in this snapshot: its "
                                "files are not compared")
            continue
        if p.filesystem not in COVERED or q.filesystem != p.filesystem:
            rep.not_covered.append(f"partition {p.number} ({p.filesystem or 'unknown'}): "
                                   "changes inside are not listed for this file system")
            continue
        end = min(p.end, new_f.size)
        rel = _Ranges([(max(s, p.start) - p.start, min(s + n, end) - max(s, p.start))
                       for s, n in held if s < end and s + n > p.start])
        name = disk.images[level].location
        nv = open_filesystem(io.BufferedReader(SliceFile(new_f, p.start, end - p.start)),
                             p.filesystem, f"{name} {prefix}")
        ov = open_filesystem(io.BufferedReader(SliceFile(old_f, p.start, end - p.start)),
                             q.filesystem, f"{name} (parent's view) {prefix}")
        _compare(nv, ov, rel, prefix, rep)
    rep.files.sort(key=lambda c: c.path)
    rep.metadata.sort(key=lambda c: c.path)
    return rep


def _compare(nv, ov, held: _Ranges, prefix: str, rep: ChangeReport) -> None:
    new = {e.path: e for e in nv.walk("/")}
    old = {e.path: e for e in ov.walk("/")}
    for path in sorted(new.keys() | old.keys()):
        a, b = new.get(path), old.get(path)
        e = a or b
        assert e is not None  # path is a key of new or old
        data = e.type != "dir"
        if b is None:
            (rep.files if data else rep.metadata).append(Change(prefix + path, "added"))
            continue
        if a is None:
            (rep.files if data else rep.metadata).append(Change(prefix + path, "removed"))
            continue
        if a.type != b.type:
            rep.files.append(Change(prefix + path, "modified"))
            continue
        if a.type == "dir":
            if a.mtime != b.mtime:
                rep.metadata.append(Change(prefix + path, "modified"))
            continue
        differs = False
        if a.type == "symlink":
            differs = a.target != b.target
        elif a.size != b.size:
            differs = True
        else:
            ra, rb = _alloc(nv, path), _alloc(ov, path)
            candidate = ra is None or rb is None or ra != rb or \
                any(held.meets(s, n) for s, n in ra if s is not None)
            if candidate:
                with nv.open(path) as fa, ov.open(path) as fb:
                    differs = not _same_content(fa, fb)
        if differs:
            rep.files.append(Change(prefix + path, "modified"))
        elif a.mtime != b.mtime:
            rep.metadata.append(Change(prefix + path, "modified"))
