"""Looking inside a disk: the disk as a file object, partition tables, file-system readers."""
from __future__ import annotations

from ..disk import Disk
from .diskfile import DiskFile, SliceFile
from .partitions import Layout, Partition, detect_filesystem, read_layout


def disk_layout(disk: Disk, top: int | None = None) -> Layout:
    """The partitions of ``disk`` as seen at chain member ``top`` (default: the top)."""
    with DiskFile(disk, top=top) as f:
        return read_layout(f.pread, f.size, disk.sector_size)


__all__ = [
    "DiskFile",
    "Layout",
    "Partition",
    "SliceFile",
    "detect_filesystem",
    "disk_layout",
    "read_layout",
]

from .filesystems import Entry, FileSystem, open_filesystem  # noqa: E402
from .volume import open_volume  # noqa: E402

__all__ += ["Entry", "FileSystem", "open_filesystem", "open_volume"]

from .changes import Change, ChangeReport, changed  # noqa: E402

__all__ += ["Change", "ChangeReport", "changed"]

from .extract import extract_tree, extract_trees, safe_extract_parts  # noqa: E402

__all__ += ["extract_tree", "extract_trees", "safe_extract_parts"]

from .volumes import VolumeCache, volumes  # noqa: E402

__all__ += ["VolumeCache", "volumes"]
