"""A raw host-disk VMDK (VirtualBox's RawDisk variant) in one call: the drive inspected, the
VMDK backend's RawDrive/Partitions/Relative/BootSector keys filled in (plan: vd/rawdisk.py)."""
from __future__ import annotations

from collections.abc import Sequence

from ..disk import Disk
from ..progress import ProgressCallback
from ..rawdisk import inspect_drive


def create_raw_vmdk(path: str, drive: str, partitions: Sequence[int] | None = None, *,
                    relative: bool = False, boot_sector: bytes | None = None,
                    progress: ProgressCallback | None = None) -> str:
    """Create ``path``, a VMDK over the host drive ``drive``: the whole drive, or only
    ``partitions`` (the rest reads zero; the tables are copied beside it as NAME-pt.vmdk).
    Refused when a chosen partition is mounted on this host. Returns ``path``."""
    info = inspect_drive(drive)
    config: dict = {"RawDrive": info.path}
    if partitions:
        config["Partitions"] = ",".join(str(n) for n in partitions)
    if relative:
        config["Relative"] = 1
    if boot_sector is not None:
        config["BootSector"] = boot_sector
    with Disk() as d:
        d.create_base(path, info.size, "VMDK", config=config, allow_unsafe_paths=True,
                      progress=progress)
    return path
