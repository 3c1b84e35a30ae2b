"""Raw host-disk VMDKs (VirtualBox's ``createmedium disk --variant RawDisk``, formerly
``internalcommands createrawvmdk``): the host drive, its partitions, what is mounted, and the
extent plan of a descriptor that exposes the whole drive or chosen partitions.

Layout of a partition-level raw VMDK (createType ``partitionedDevice``), as VirtualBox makes it:
the partition tables (MBR, each EBR of the logical partitions' chain, the GPT headers and entry
arrays) are copied into a side file ``NAME-pt.vmdk`` and mapped by FLAT extents into it; each
table's copy runs on over the unused sectors after it (boot loaders live there) up to the next
partition or table, at most 1 MiB from the table's start. The chosen partitions are FLAT extents
of the drive at their start sector (``Relative``: of the partition device, offset 0); everything
else is a ZERO extent. ``BootSector`` replaces the boot code (bytes 0..439) of the MBR's copy;
the disk signature and partition table stay the host's, so the guest sees the same partitions.

Only block devices are host drives. A regular file may stand in for one when the environment
variable ``VDGUI_TEST_RAW_FILES`` is ``1`` (the tests' flag; no command line option sets it).
The drive is only ever opened read-only here.
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field

from .errors import ImageNotFound, InvalidArgument, NotSupported, Refused
from .fileio import ImageFile
from .inside.partitions import Layout, Partition, read_layout
from .paths import device_access_hint

SECTOR = 512
TEST_ENV = "VDGUI_TEST_RAW_FILES"
MOUNTS = "/proc/self/mounts"
SYS_BLOCK = "/sys/dev/block"
MAX_PADDING = 1 << 20
BOOT_CODE = 440          # the MBR's boot code; the disk signature and table follow


@dataclass
class RawDrive:
    """A host drive as a raw VMDK would see it."""
    path: str
    size: int                       # whole sectors
    is_device: bool
    layout: Layout
    in_use: dict[int, str] = field(default_factory=dict)   # partition (0: the drive) -> where

    def partition_device(self, number: int) -> str:
        return partition_device(self.path, number)


@dataclass(frozen=True)
class RawExtent:
    sectors: int
    kind: str                       # "FLAT" or "ZERO"
    path: str | None = None         # FLAT: the drive, a partition device, or None: the side file
    offset: int = 0                 # sectors into ``path`` (or into the side file)


@dataclass
class RawPlan:
    drive: RawDrive
    extents: list[RawExtent]
    copies: list[tuple[int, int]]   # the side file: these (offset, length) of the drive, in order
    create_type: str
    boot_code: bytes | None = None  # replaces the side file's first bytes (the MBR's boot code)

    def write_side(self, path: str, chunk: int = 1 << 20) -> None:
        """Write the side file (a new file at ``path``): the tables copied from the drive, read
        a piece at a time, then the boot code; synced."""
        f = ImageFile(self.drive.path)
        try:
            with open(path, "xb") as out:
                for a, n in self.copies:
                    for pos in range(a, a + n, chunk):
                        out.write(f.read_exact(pos, min(chunk, a + n - pos), "partition table"))
                if self.boot_code:
                    out.seek(0)
                    out.write(self.boot_code)
                out.flush()
                os.fsync(out.fileno())
        finally:
            f.close()


def stand_ins_allowed() -> bool:
    return os.environ.get(TEST_ENV) == "1"


def check_drive_path(path: str) -> tuple[str, os.stat_result]:
    """The absolute path of a host drive and its stat; a regular file only under the tests'
    flag, anything else refused."""
    path = os.path.abspath(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ImageNotFound(f"{path}: raw drive not found") from None
    except OSError as exc:
        raise InvalidArgument(f"{path}: cannot look at the raw drive: {exc.strerror}") from None
    if stat.S_ISREG(st.st_mode):
        if not stand_ins_allowed():
            raise NotSupported(f"{path}: is a regular file, not a host drive; a raw disk VMDK "
                               "maps a block device such as /dev/sda (add an image file as an "
                               "image instead)")
    elif not stat.S_ISBLK(st.st_mode):
        raise NotSupported(f"{path}: a raw drive must be a block device (such as /dev/sda)")
    if not os.access(path, os.R_OK):
        raise Refused(f"{path}: permission denied" + device_access_hint(path))
    return path, st


def host_drives() -> list[str]:
    """The host's whole drives (/dev/NAME for each non-empty /sys/block entry), for a picker."""
    try:
        names = sorted(os.listdir("/sys/block"))
    except OSError:
        return []
    out = []
    for name in names:
        try:
            with open(os.path.join("/sys/block", name, "size")) as f:
                if int(f.read().strip() or 0) <= 0:
                    continue
        except (OSError, ValueError):
            continue
        if os.path.exists(os.path.join("/dev", name)):
            out.append(os.path.join("/dev", name))
    return out


def _partition_nodes(drive: str) -> dict[int, str]:
    """The sysfs folders of a block device's partitions, by number ({} for a regular file)."""
    node = _sys_node(drive)
    out: dict[int, str] = {}
    if not node:
        return out
    try:
        names = sorted(os.listdir(node))
    except OSError:
        return out
    for name in names:
        try:
            with open(os.path.join(node, name, "partition")) as f:
                out[int(f.read().strip())] = os.path.join(node, name)
        except (OSError, ValueError):
            continue
    return out


def partition_device(drive: str, number: int) -> str:
    """The device of partition ``number`` of ``drive``: the kernel's name from sysfs when the
    drive is a block device, else Linux's naming (sda -> sda2, nvme0n1 -> nvme0n1p2)."""
    node = _partition_nodes(drive).get(number)
    if node:
        return os.path.join("/dev", os.path.basename(node))
    return f"{drive}{'p' if drive[-1:].isdigit() else ''}{number}"


def _sys_node(path: str) -> str | None:
    """The sysfs folder of a block device (None for anything else)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISBLK(st.st_mode):
        return None
    node = os.path.join(SYS_BLOCK, f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}")
    return os.path.realpath(node) if os.path.isdir(node) else None


def _sys_value(node: str | None, name: str) -> int | None:
    """A number sysfs shows for a device (None when there is none)."""
    if not node:
        return None
    try:
        with open(os.path.join(node, name)) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _same(a: str, b: str) -> bool:
    """Two paths naming one file or one device."""
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return False
    if stat.S_ISBLK(sa.st_mode) and stat.S_ISBLK(sb.st_mode):
        return sa.st_rdev == sb.st_rdev
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _unescape(field_text: str) -> str:
    out, i = [], 0
    while i < len(field_text):
        c = field_text[i]
        if c == "\\" and field_text[i + 1:i + 4].isdigit():
            out.append(chr(int(field_text[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(c)
            i += 1
    return "".join(out)


def mounts() -> list[tuple[str, str]]:
    """(source, mount point) of this host's mounts."""
    try:
        with open(MOUNTS, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        parts = line.split()
        if len(parts) >= 2 and parts[0].startswith("/"):
            out.append((_unescape(parts[0]), _unescape(parts[1])))
    return out


def in_use(drive: str, layout: Layout) -> dict[int, str]:
    """Which of the drive's partitions (0: the drive itself) are mounted on this host, or held
    by another block device (device mapper, RAID: sysfs ``holders``)."""
    found: dict[int, str] = {}
    nodes = {0: _sys_node(drive)} | _partition_nodes(drive)
    devs = {0: drive} | {p.number: partition_device(drive, p.number)
                         for p in layout.partitions if p.number}
    table = mounts()
    for n, dev in devs.items():
        for src, where in table:
            if _same(src, dev):
                found[n] = f"mounted at {where}"
                break
        else:
            node = nodes.get(n)
            try:
                holders = sorted(os.listdir(os.path.join(node, "holders"))) if node else []
            except OSError:
                holders = []
            if holders:
                found[n] = "in use by " + ", ".join(holders)
    return found


def inspect_drive(path: str) -> RawDrive:
    """Open a host drive read-only and read its partitions and what of it is in use."""
    path, st = check_drive_path(path)
    ss = _sys_value(_sys_node(path), "queue/logical_block_size")
    if ss not in (None, SECTOR):
        raise NotSupported(f"{path}: has {ss}-byte sectors; a raw disk VMDK maps 512-byte "
                           "sectors (as VirtualBox's)")
    f = ImageFile(path)
    try:
        size = f.size() // SECTOR * SECTOR
        if size <= 0:
            raise InvalidArgument(f"{path}: the raw drive is empty")
        layout = read_layout(f.pread, size, SECTOR)
    finally:
        f.close()
    return RawDrive(path, size, stat.S_ISBLK(st.st_mode), layout, in_use(path, layout))


def parse_partitions(text: str | None) -> list[int] | None:
    """'1,3,5' -> [1, 3, 5]; None or '' -> None (the whole drive)."""
    if text is None or not str(text).strip():
        return None
    out: list[int] = []
    for word in str(text).replace(" ", "").split(","):
        if not word.isdigit() or int(word) < 1:
            raise InvalidArgument(f"Partitions: {word!r} is not a partition number "
                                  "(expected numbers such as 1,3,5)")
        if int(word) not in out:
            out.append(int(word))
    return out


def _busy_message(drive: RawDrive, n: int) -> str:
    what = "the drive" if n == 0 else f"partition {n} ({drive.partition_device(n)})"
    return (f"{drive.path}: {what} is {drive.in_use[n]} on this host; a virtual machine writing "
            "to it would corrupt it. Unmount it first, or leave it out")


def plan(drive: RawDrive, partitions: list[int] | None, relative: bool = False,
         boot_sector: bytes | None = None) -> RawPlan:
    """The extents of a raw VMDK of ``drive``: the whole drive (``partitions`` None) or the
    chosen partitions, the tables copied into the side file, the rest ZERO."""
    if partitions is None:
        if relative or boot_sector:
            raise InvalidArgument("Relative and BootSector need Partitions: they apply to a "
                                  "VMDK that exposes chosen partitions")
        busy = sorted(drive.in_use)
        if busy:
            raise Refused(_busy_message(drive, busy[0]))
        return RawPlan(drive, [RawExtent(drive.size // SECTOR, "FLAT", drive.path, 0)], [],
                       "fullDevice")
    layout = drive.layout
    if layout.scheme == "none":
        raise InvalidArgument(f"{drive.path}: has no partition table; expose the whole drive")
    chosen: list[Partition] = []
    numbers = sorted(p.number for p in layout.partitions if p.number)
    for n in partitions:
        try:
            chosen.append(layout.partition(n))
        except KeyError:
            raise InvalidArgument(f"{drive.path}: has no partition {n} (its partitions: "
                                  f"{', '.join(map(str, numbers)) or 'none'})") from None
    if 0 in drive.in_use:
        raise Refused(_busy_message(drive, 0))
    for p in chosen:
        if p.number in drive.in_use:
            raise Refused(_busy_message(drive, p.number))
        if p.size <= 0 or p.end > drive.size or p.start % SECTOR or p.size % SECTOR:
            raise InvalidArgument(f"{drive.path}: partition {p.number} (bytes {p.start}.."
                                  f"{p.end}) does not lie whole inside the drive "
                                  f"({drive.size} bytes)")
    # the tables, each with the unused sectors after it
    starts = sorted({p.start for p in layout.partitions if p.size > 0} |
                    {a for a, _ in layout.tables} | {drive.size})
    copies: list[list[int]] = []
    for a, n in sorted(set(layout.tables)):
        end = min(a + n, drive.size)
        nxt = min((s for s in starts if s >= end), default=drive.size)
        end = max(end, min(nxt, a + MAX_PADDING))
        if copies and a <= copies[-1][1]:
            copies[-1][1] = max(copies[-1][1], end)
        else:
            copies.append([a, end])
    for p in chosen:
        for a, b in copies:
            if p.start < b and a < p.end:
                raise InvalidArgument(f"{drive.path}: partition {p.number} (bytes {p.start}.."
                                      f"{p.end}) overlaps the partition table at bytes "
                                      f"{a}..{b}")
    for p, q in zip(sorted(chosen, key=lambda x: x.start),
                    sorted(chosen, key=lambda x: x.start)[1:]):
        if q.start < p.end:
            raise InvalidArgument(f"{drive.path}: partitions {p.number} and {q.number} overlap")
    devices: dict[int, str] = {}
    if relative:
        for p in chosen:
            devices[p.number] = _check_partition_device(drive, p)
    # the side file, then the extents in disk order
    pieces: list[tuple[int, int, RawExtent]] = []
    side = 0
    for a, b in copies:
        pieces.append((a, b, RawExtent((b - a) // SECTOR, "FLAT", None, side // SECTOR)))
        side += b - a
    code = None
    if boot_sector is not None:
        if len(boot_sector) > SECTOR:
            raise InvalidArgument(f"BootSector: {len(boot_sector)} bytes (expected at most "
                                  f"{SECTOR}: one sector; its first {BOOT_CODE} are used)")
        if not copies or copies[0][0] != 0 or layout.scheme not in ("mbr", "gpt", "hybrid"):
            raise InvalidArgument(f"{drive.path}: has no MBR to put a boot sector in")
        code = bytes(boot_sector[:BOOT_CODE])
    for p in chosen:
        path, off = (devices[p.number], 0) if relative else (drive.path, p.start // SECTOR)
        pieces.append((p.start, p.end, RawExtent(p.size // SECTOR, "FLAT", path, off)))
    pieces.sort(key=lambda x: x[0])
    extents: list[RawExtent] = []
    pos = 0
    for a, b, ext in pieces + [(drive.size, drive.size, None)]:
        if a > pos:
            extents.append(RawExtent((a - pos) // SECTOR, "ZERO"))
        if ext is not None:
            extents.append(ext)
        pos = b
    return RawPlan(drive, extents, [(a, b - a) for a, b in copies], "partitionedDevice", code)


def _check_partition_device(drive: RawDrive, p: Partition) -> str:
    """The partition device for a Relative extent: it exists, is as large as the partition,
    and (for a block device) the kernel places it where the table does."""
    dev = drive.partition_device(p.number)
    path, _ = check_drive_path(dev)
    kstart = _sys_value(_partition_nodes(drive.path).get(p.number), "start")
    if kstart is not None:
        start = kstart * SECTOR
        if start != p.start:
            raise Refused(f"{path}: the kernel places partition {p.number} at byte {start}, "
                          f"the partition table at byte {p.start}; have the kernel re-read "
                          "the table (partprobe) first")
    f = ImageFile(path)
    try:
        size = f.size()
    finally:
        f.close()
    if size < p.size:
        raise InvalidArgument(f"{path}: is {size} bytes, partition {p.number} is {p.size}")
    return path
