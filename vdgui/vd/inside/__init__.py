"""Looking inside a disk: the disk as a file object, partition tables, file-system readers."""
from __future__ import annotations

from ..disk import Disk
from .diskfile import DiskFile, SliceFile
from .partitions import Layout, Partition, detect_filesystem, read_layout


def disk_layout(disk: Disk, top: int | None = None) -> Layout:
    """The partitions of ``disk`` as seen at chain member ``top`` (default: the top)."""
    with DiskFile(disk, top=top) as f:
        return read_layout(f.pread, f.size, disk.sector_size)


__all__ = ["DiskFile", "SliceFile", "Layout", "Partition", "detect_filesystem", "read_layout",
           "disk_layout"]
