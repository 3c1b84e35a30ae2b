"""Opening one volume of a disk: its partition found in the table, its file system read."""
from __future__ import annotations

import io

from ..disk import Disk
from .diskfile import DiskFile, SliceFile
from .filesystems import open_filesystem
from .partitions import read_layout


def open_volume(disk: Disk, number: int | None = None, top: int | None = None):
    """(Partition, FileSystem) for partition ``number`` (None: the only volume, or the whole
    unpartitioned disk)."""
    from ..errors import InvalidArgument
    f = DiskFile(disk, top=top)
    layout = read_layout(f.pread, f.size, disk.sector_size)
    vols = [p for p in layout.partitions if p.size > 0]
    if number is None:
        if len(vols) != 1:
            raise InvalidArgument(
                f"{disk.top.location}: the disk has {len(vols)} partitions: name one as N:PATH ("
                + ", ".join(f"{p.number}: {p.filesystem or p.type_name}" for p in vols) + ")")
        part = vols[0]
    else:
        try:
            part = layout.partition(number)
        except KeyError:
            raise InvalidArgument(f"{disk.top.location}: no partition {number} (the disk has "
                                  + (", ".join(str(p.number) for p in vols) or "none")
                                  + ")") from None
    end = min(part.end, f.size)
    if part.start >= end:
        raise InvalidArgument(f"partition {part.number} lies past the end of the disk")
    fh = io.BufferedReader(SliceFile(f, part.start, end - part.start), 64 * 1024)
    name = f"{disk.top.location}" + (f" partition {part.number}" if part.number else "")
    return part, open_filesystem(fh, part.filesystem, name)
