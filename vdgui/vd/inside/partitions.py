"""Partition tables (MBR with extended/logical partitions, GPT with its CRCs and backup header,
protective and hybrid MBR) and the file system found at the start of each volume.

Damage is data: ``Layout.problems`` lists what is wrong (bad CRC, overlaps, a partition past the
end, a backup GPT that disagrees); a VDError is raised only when nothing can be read at all.
File-system detection reads only the signature, label and UUID fields (what blkid reads); reading
the file systems themselves is left to libraries.
"""
from __future__ import annotations

import io
import itertools
import struct
import uuid as uuidlib
import zlib
from dataclasses import dataclass, field

from ..align import ceil_div
from ..errors import CorruptImage

MBR_TYPES = {
    0x01: "FAT12",
    0x04: "FAT16 <32M",
    0x05: "Extended",
    0x06: "FAT16",
    0x07: "NTFS/exFAT/HPFS",
    0x0B: "W95 FAT32",
    0x0C: "W95 FAT32 (LBA)",
    0x0E: "W95 FAT16 (LBA)",
    0x0F: "W95 Extended (LBA)",
    0x11: "Hidden FAT12",
    0x12: "Compaq diagnostics",
    0x14: "Hidden FAT16 <32M",
    0x16: "Hidden FAT16",
    0x17: "Hidden NTFS/HPFS",
    0x1B: "Hidden W95 FAT32",
    0x1C: "Hidden W95 FAT32 (LBA)",
    0x1E: "Hidden W95 FAT16 (LBA)",
    0x27: "Windows recovery",
    0x42: "Windows dynamic",
    0x82: "Linux swap / Solaris",
    0x83: "Linux",
    0x85: "Linux extended",
    0x8E: "Linux LVM",
    0xA5: "FreeBSD",
    0xA6: "OpenBSD",
    0xA8: "Darwin UFS",
    0xA9: "NetBSD",
    0xAF: "HFS / HFS+",
    0xBE: "Solaris boot",
    0xBF: "Solaris",
    0xEE: "GPT protective",
    0xEF: "EFI (FAT-12/16/32)",
    0xFB: "VMware VMFS",
    0xFC: "VMware VMKCORE",
    0xFD: "Linux raid autodetect",
}
EXTENDED = {0x05, 0x0F, 0x85}

GPT_TYPES = {
    "00000000-0000-0000-0000-000000000000": "Unused",
    "c12a7328-f81f-11d2-ba4b-00a0c93ec93b": "EFI System",
    "21686148-6449-6e6f-744e-656564454649": "BIOS boot",
    "e3c9e316-0b5c-4db8-817d-f92df00215ae": "Microsoft reserved",
    "ebd0a0a2-b9e5-4433-87c0-68b6b72699c7": "Microsoft basic data",
    "de94bba4-06d1-4d40-a16a-bfd50179d6ac": "Windows recovery environment",
    "5808c8aa-7e8f-42e0-85d2-e1e90434cfb3": "Windows LDM metadata",
    "af9b60a0-1431-4f62-bc68-3311714a69ad": "Windows LDM data",
    "0fc63daf-8483-4772-8e79-3d69d8477de4": "Linux filesystem",
    "0657fd6d-a4ab-43c4-84e5-0933c84b4f4f": "Linux swap",
    "e6d6d379-f507-44c2-a23c-238f2a3df928": "Linux LVM",
    "a19d880f-05fc-4d3b-a006-743f0f84911e": "Linux RAID",
    "933ac7e1-2eb4-4f13-b844-0e14e2aef915": "Linux home",
    "4f68bce3-e8cd-4db1-96e7-fbcaf984b709": "Linux root (x86-64)",
    "44479540-f297-41b2-9af7-d131d5f0458a": "Linux root (x86)",
    "b921b045-1df0-41c3-af44-4c6f280d3fae": "Linux root (ARM64)",
    "bc13c2ff-59e6-4262-a352-b275fd6f7172": "Linux extended boot",
    "48465300-0000-11aa-aa11-00306543ecac": "Apple HFS+",
    "7c3457ef-0000-11aa-aa11-00306543ecac": "Apple APFS",
    "516e7cb4-6ecf-11d6-8ff8-00022d09712b": "FreeBSD UFS",
    "aa31e02a-400f-11db-9590-000c2911d1b8": "VMware VMFS",
}


@dataclass
class Partition:
    number: int  # 1..4 primary, 5.. logical, GPT entry index + 1; 0: whole disk
    start: int  # bytes
    size: int  # bytes
    type: str  # "0x83" or a GPT type GUID
    type_name: str
    name: str = ""  # GPT partition name
    attributes: int = 0  # GPT attribute bits
    guid: str = ""  # GPT unique partition GUID
    bootable: bool = False
    filesystem: str = ""  # ext4, fat32, ntfs, exfat, iso9660, ... ("" unknown)
    label: str = ""
    uuid: str = ""

    @property
    def end(self) -> int:
        return self.start + self.size

    def as_dict(self) -> dict:
        return {
            "number": self.number,
            "start": self.start,
            "size": self.size,
            "type": self.type,
            "type_name": self.type_name,
            "name": self.name,
            "attributes": self.attributes,
            "guid": self.guid,
            "bootable": self.bootable,
            "filesystem": self.filesystem,
            "label": self.label,
            "uuid": self.uuid,
        }


@dataclass
class Layout:
    scheme: str  # "gpt", "mbr", "hybrid" (GPT + hybrid MBR), "none" (one volume)
    size: int
    sector_size: int
    partitions: list[Partition] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    disk_guid: str = ""
    # where the tables lie: (byte offset, length) of the MBR, each EBR of the logical
    # partitions' chain, each GPT header and entry array that was read
    tables: list[tuple[int, int]] = field(default_factory=list)

    def partition(self, number: int) -> Partition:
        for p in self.partitions:
            if p.number == number:
                return p
        raise KeyError(number)


# -- file-system signatures (blkid's fields) ----------------------------------------------------
def _text(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("latin-1").rstrip()


def detect_filesystem(pread, size: int) -> tuple[str, str, str]:
    """(filesystem, label, uuid) of the volume read by ``pread(offset, length)``; ("", "", "")
    when nothing is recognised."""
    head = pread(0, 4096) if size else b""
    if len(head) >= 512 and head[510:512] == b"\x55\xaa":
        if head[3:11] == b"NTFS    ":
            return ("ntfs", _ntfs_label(pread, size),
                    "%016X" % struct.unpack_from("<Q", head, 0x48)[0])
        if head[3:11] == b"EXFAT   ":
            serial = struct.unpack_from("<I", head, 100)[0]
            return "exfat", _exfat_label(pread, head), "%04X-%04X" % (serial >> 16,
                                                                      serial & 0xFFFF)
        fat = _fat(head)
        if fat:
            return fat
    if len(head) >= 1024 + 136 and head[1024 + 56 : 1024 + 58] == b"\x53\xef":
        sb = head[1024:]
        compat, incompat = struct.unpack_from("<II", sb, 92)
        ro_compat = struct.unpack_from("<I", sb, 100)[0]
        kind = (
            "ext4" if incompat & 0x2C0 or ro_compat & 0x78 else "ext3" if compat & 0x4 else "ext2"
        )
        return kind, _text(sb[120:136]), str(uuidlib.UUID(bytes=bytes(sb[104:120])))
    if size >= 32768 + 2048:
        pvd = pread(32768, 2048)
        if pvd[1:6] == b"CD001" and pvd[0] == 1:
            created = pvd[813:830]
            uid = (
                f"{created[0:4].decode('latin-1')}-{created[4:6].decode('latin-1')}-"
                f"{created[6:8].decode('latin-1')}-{created[8:10].decode('latin-1')}-"
                f"{created[10:12].decode('latin-1')}-{created[12:14].decode('latin-1')}-"
                f"{created[14:16].decode('latin-1')}"
            )
            return "iso9660", _text(pvd[40:72]), uid
    if len(head) >= 6 and head[0:6] == b"LUKS\xba\xbe":
        return "crypto_LUKS", "", _text(head[168:208])
    if len(head) == 4096 and head[4086:4096] == b"SWAPSPACE2":
        return (
            "swap",
            _text(head[1024 + 28 : 1024 + 44]),
            str(uuidlib.UUID(bytes=bytes(head[1024 + 12 : 1024 + 28]))),
        )
    return "", "", ""


class _PreadFile(io.RawIOBase):
    """A read-only file over ``pread(offset, length)`` (for a library that wants one)."""

    def __init__(self, pread, size: int) -> None:
        super().__init__()
        self._pread, self._size, self._pos = pread, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._pos = max(0, {io.SEEK_SET: 0, io.SEEK_CUR: self._pos,
                            io.SEEK_END: self._size}[whence] + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, b) -> int:
        data = self._pread(self._pos, min(len(b), max(0, self._size - self._pos)))
        b[:len(data)] = data
        self._pos += len(data)
        return len(data)


def _ntfs_label(pread, size: int) -> str:
    """The volume name ($Volume's VOLUME_NAME attribute, read by dissect.ntfs), as blkid shows
    it; "" when it cannot be read (the volume is still detected)."""
    try:
        from dissect.ntfs import NTFS
        attr = NTFS(_PreadFile(pread, size)).mft.get(3).attributes.get(0x60)
        return attr[0].data().decode("utf-16-le", "replace") if attr else ""
    except Exception:
        return ""


def _exfat_label(pread, head: bytes) -> str:
    """The volume label entry (type 0x83) of the root folder's first cluster, as blkid reads
    it; "" without one."""
    sector = 1 << min(head[0x6C], 12)
    cluster = sector << min(head[0x6D], 25 - 9)
    heap, root = struct.unpack_from("<I", head, 0x58)[0], struct.unpack_from("<I", head, 0x60)[0]
    if root < 2:
        return ""
    raw = pread(heap * sector + (root - 2) * cluster, min(cluster, 64 * 1024))
    for i in range(0, len(raw) - 31, 32):
        kind = raw[i]
        if kind == 0:
            break
        if kind == 0x83:
            n = min(raw[i + 1], 11)
            return raw[i + 2:i + 2 + 2 * n].decode("utf-16-le", "replace")
    return ""


def _fat(bs: bytes):
    bps = struct.unpack_from("<H", bs, 11)[0]
    spc, reserved, nfats = bs[13], struct.unpack_from("<H", bs, 14)[0], bs[16]
    if (
        bps not in (512, 1024, 2048, 4096)
        or spc == 0
        or spc & (spc - 1)
        or nfats == 0
        or reserved == 0
        or bs[0] not in (0xEB, 0xE9)
    ):
        return None
    root_entries, tot16, fatsz16 = (
        struct.unpack_from("<H", bs, 17)[0],
        struct.unpack_from("<H", bs, 19)[0],
        struct.unpack_from("<H", bs, 22)[0],
    )
    tot32, fatsz32 = struct.unpack_from("<I", bs, 32)[0], struct.unpack_from("<I", bs, 36)[0]
    total = tot16 or tot32
    fatsz = fatsz16 or fatsz32
    root_secs = (root_entries * 32 + bps - 1) // bps
    data = total - (reserved + nfats * fatsz + root_secs)
    if total == 0 or fatsz == 0 or data <= 0:
        return None
    clusters = data // spc
    if fatsz16 == 0:  # FAT32 BPB
        serial, label = struct.unpack_from("<I", bs, 67)[0], bs[71:82]
        kind = "fat32"
    else:
        serial, label = struct.unpack_from("<I", bs, 39)[0], bs[43:54]
        kind = "fat12" if clusters < 4085 else "fat16"
    lab = _text(label)
    if lab == "NO NAME":
        lab = ""
    return kind, lab, "%04X-%04X" % (serial >> 16, serial & 0xFFFF)


# -- tables ---------------------------------------------------------------------------------------
def _mbr_entries(sector: bytes):
    for i in range(4):
        e = sector[446 + 16 * i : 446 + 16 * (i + 1)]
        boot, ptype = e[0], e[4]
        lba, count = struct.unpack_from("<II", e, 8)
        yield i, boot, ptype, lba, count


def _read_mbr(pread, disk_size: int, ss: int, layout: Layout, sector: bytes) -> None:
    ext_seen = False
    for i, boot, ptype, lba, count in _mbr_entries(sector):
        if ptype == 0 or count == 0:
            continue
        if boot not in (0, 0x80):
            layout.problems.append(f"MBR entry {i + 1}: invalid boot flag 0x{boot:02x}")
        if ptype in EXTENDED:
            if ext_seen:
                layout.problems.append(f"MBR entry {i + 1}: a second extended partition (ignored)")
                continue
            ext_seen = True
            _read_logical(pread, disk_size, ss, layout, lba, count)
            continue
        if ptype == 0xEE:
            continue
        layout.partitions.append(
            Partition(
                i + 1,
                lba * ss,
                count * ss,
                f"0x{ptype:02x}",
                MBR_TYPES.get(ptype, "Unknown"),
                bootable=boot == 0x80,
            )
        )


def _read_logical(pread, disk_size, ss, layout, ext_lba, ext_count) -> None:
    ebr_lba, number = ext_lba, 5
    seen: set[int] = set()
    while True:
        if ebr_lba in seen:
            layout.problems.append(
                f"extended partition: the chain of logical partitions loops "
                f"back to sector {ebr_lba}"
            )
            return
        if len(seen) >= 1024:
            layout.problems.append(
                "extended partition: more than 1024 logical partitions (the rest ignored)"
            )
            return
        seen.add(ebr_lba)
        if (ebr_lba + 1) * ss > disk_size:
            layout.problems.append(
                f"extended partition: logical partition table at sector "
                f"{ebr_lba} is past the end of the disk"
            )
            return
        ebr = pread(ebr_lba * ss, 512)
        if ebr[510:512] != b"\x55\xaa":
            layout.problems.append(
                f"extended partition: no table signature at sector {ebr_lba} "
                f"(expected 55 AA, found {ebr[510:512].hex(' ').upper()})"
            )
            return
        layout.tables.append((ebr_lba * ss, ss))
        entries = list(_mbr_entries(ebr))
        _, boot, ptype, lba, count = entries[0]
        if ptype and count:
            layout.partitions.append(
                Partition(
                    number,
                    (ebr_lba + lba) * ss,
                    count * ss,
                    f"0x{ptype:02x}",
                    MBR_TYPES.get(ptype, "Unknown"),
                    bootable=boot == 0x80,
                )
            )
            if ebr_lba + lba + count > ext_lba + ext_count:
                layout.problems.append(f"partition {number} ends past its extended partition")
            number += 1
        _, _, ntype, nlba, ncount = entries[1]
        if ntype not in EXTENDED or ncount == 0:
            return
        ebr_lba = ext_lba + nlba


def _gpt_header(pread, lba: int, ss: int, disk_size: int, where: str, problems: list):
    if lba <= 0 or (lba + 1) * ss > disk_size:
        problems.append(f"{where} GPT header: sector {lba} is outside the disk")
        return None
    raw = pread(lba * ss, ss)
    if raw[:8] != b"EFI PART":
        problems.append(
            f"{where} GPT header at sector {lba}: no signature (expected 'EFI PART', "
            f"found {raw[:8]!r})"
        )
        return None
    hsize = struct.unpack_from("<I", raw, 12)[0]
    if not 92 <= hsize <= ss:
        problems.append(f"{where} GPT header: header size {hsize} (expected 92..{ss})")
        return None
    crc = struct.unpack_from("<I", raw, 16)[0]
    calc = zlib.crc32(raw[:16] + b"\0\0\0\0" + raw[20:hsize])
    h = dict(zip(("current", "backup", "first", "last"), struct.unpack_from("<QQQQ", raw, 24)))
    h["guid"] = str(uuidlib.UUID(bytes_le=bytes(raw[56:72])))
    h["entries_lba"], h["count"], h["entry_size"], h["entries_crc"] = struct.unpack_from(
        "<QIII", raw, 72
    )
    h["crc_ok"] = crc == calc
    if crc != calc:
        problems.append(f"{where} GPT header: bad CRC32 (stored {crc:08x}, computed {calc:08x})")
    if h["current"] != lba:
        problems.append(f"{where} GPT header: says it is at sector {h['current']}, found at {lba}")
    if (
        h["entry_size"] < 128
        or h["entry_size"] % 8
        or h["count"] > 65536
        or h["count"] * h["entry_size"] > 4 * 1024 * 1024
    ):
        problems.append(
            f"{where} GPT header: unusable entry array ({h['count']} entries of "
            f"{h['entry_size']} bytes)"
        )
        return None
    table_bytes = h["count"] * h["entry_size"]
    if h["entries_lba"] * ss + table_bytes > disk_size:
        problems.append(
            f"{where} GPT: partition entry array at sector {h['entries_lba']} runs "
            "past the end of the disk"
        )
        return None
    h["table"] = pread(h["entries_lba"] * ss, table_bytes)
    h["lba"] = lba
    tcrc = zlib.crc32(h["table"])
    h["table_ok"] = tcrc == h["entries_crc"]
    if not h["table_ok"]:
        problems.append(
            f"{where} GPT partition entries: bad CRC32 (stored "
            f"{h['entries_crc']:08x}, computed {tcrc:08x})"
        )
    return h


def _gpt_entries(h, ss) -> list[Partition]:
    out = []
    es, t = h["entry_size"], h["table"]
    for i in range(h["count"]):
        e = t[i * es : (i + 1) * es]
        if e[:16] == b"\0" * 16:
            continue
        tguid = str(uuidlib.UUID(bytes_le=bytes(e[0:16])))
        first, last, attrs = struct.unpack_from("<QQQ", e, 32)
        name = bytes(e[56:128]).decode("utf-16-le", "replace").split("\0", 1)[0]
        size = (last - first + 1) * ss if last >= first else 0
        out.append(
            Partition(
                i + 1,
                first * ss,
                size,
                tguid,
                GPT_TYPES.get(tguid, "Unknown"),
                name=name,
                attributes=attrs,
                guid=str(uuidlib.UUID(bytes_le=bytes(e[16:32]))),
            )
        )
    return out


def _read_gpt(pread, disk_size: int, ss: int, layout: Layout) -> bool:
    probs: list[str] = []
    primary = _gpt_header(pread, 1, ss, disk_size, "primary", probs)
    last_lba = disk_size // ss - 1
    backup_lba = primary["backup"] if primary and primary["crc_ok"] else last_lba
    backup = _gpt_header(pread, backup_lba, ss, disk_size, "backup", probs)
    if backup is None and backup_lba != last_lba:
        backup = _gpt_header(pread, last_lba, ss, disk_size, "backup", probs)
    good = [h for h in (primary, backup) if h and h["crc_ok"] and h["table_ok"]]
    if not good and primary is None and backup is None:
        return False
    layout.problems.extend(probs)
    for h in (primary, backup):
        if h is not None:
            n = h["count"] * h["entry_size"]
            layout.tables += [(h["lba"] * ss, ss), (h["entries_lba"] * ss, ceil_div(n, ss) * ss)]
    use = good[0] if good else (primary or backup)
    if not good:
        layout.problems.append(
            "no GPT header with valid CRCs: the partitions below are read from a damaged table"
        )
    elif use is backup:
        layout.problems.append("the primary GPT is damaged: partitions read from the backup")
    layout.disk_guid = use["guid"]
    layout.partitions = _gpt_entries(use, ss)
    if primary and backup and primary["crc_ok"] and backup["crc_ok"]:
        if (
            _gpt_entries(primary, ss) != _gpt_entries(backup, ss)
            or primary["guid"] != backup["guid"]
        ):
            layout.problems.append("the backup GPT disagrees with the primary GPT")
        if backup["current"] != last_lba:
            layout.problems.append(
                f"the backup GPT header is at sector {backup['current']}, "
                f"not at the last sector {last_lba} (disk resized?)"
            )
    for p in layout.partitions:
        outside = p.start < use["first"] * ss or p.end > (use["last"] + 1) * ss
        if outside and p.end <= disk_size:
            layout.problems.append(f"partition {p.number} lies outside the GPT's usable area")
    return True


def read_layout(pread, disk_size: int, sector_size: int = 512) -> Layout:
    """The partition layout of a disk read by ``pread(offset, length)``."""
    ss = sector_size
    if disk_size < ss:
        raise CorruptImage(f"the disk is {disk_size} bytes: too small to hold a partition table")
    head = pread(0, ss)
    layout = Layout("none", disk_size, ss)
    whole = lambda: [Partition(0, 0, disk_size, "", "Whole disk")]  # noqa: E731
    fs = detect_filesystem(pread, disk_size)
    if fs[0] == "iso9660" or (fs[0] and fs[0] not in ("ext2", "ext3", "ext4")):
        layout.partitions = whole()
    else:
        mbr_ok = head[510:512] == b"\x55\xaa"
        types = [e[2] for e in _mbr_entries(head)] if mbr_ok else []
        if mbr_ok:
            layout.tables.append((0, ss))
        if mbr_ok and 0xEE in types:
            layout.scheme = "gpt" if all(t in (0, 0xEE) for t in types) else "hybrid"
            if not _read_gpt(pread, disk_size, ss, layout):
                layout.problems.append(
                    "the MBR is protective (type EE) but no GPT header "
                    "can be read: the primary and backup headers are both "
                    "missing"
                )
                if fs[0]:
                    layout.scheme, layout.partitions = "none", whole()
        elif mbr_ok and any(types):
            layout.scheme = "mbr"
            _read_mbr(pread, disk_size, ss, layout, head)
        else:
            probs: list[str] = []
            gpt = _gpt_header(pread, 1, ss, disk_size, "primary", probs)
            if gpt is not None:  # a GPT without protective MBR
                layout.scheme = "gpt"
                layout.problems.append("GPT without a protective MBR")
                _read_gpt(pread, disk_size, ss, layout)
            elif fs[0]:
                layout.partitions = whole()
    _diagnose(layout)
    for p in layout.partitions:
        if p.number == 0:
            p.filesystem, p.label, p.uuid = fs
            continue
        if p.size <= 0 or p.start >= disk_size:
            continue
        start, size = p.start, min(p.size, disk_size - p.start)
        p.filesystem, p.label, p.uuid = detect_filesystem(
            lambda o, n, s=start, z=size: pread(s + o, max(0, min(n, z - o))), size
        )
    return layout


def _diagnose(layout: Layout) -> None:
    parts = sorted(layout.partitions, key=lambda p: p.start)
    for p in parts:
        if p.number == 0:
            continue
        if p.size <= 0:
            layout.problems.append(f"partition {p.number}: empty or negative size")
        elif p.end > layout.size:
            layout.problems.append(
                f"partition {p.number} ends past the end of the disk "
                f"(ends at byte {p.end}, disk is {layout.size} bytes)"
            )
        elif p.start < layout.sector_size and layout.scheme != "none":
            layout.problems.append(f"partition {p.number} overlaps the partition table")
    for a, b in itertools.pairwise(parts):
        if a.number and b.number and b.start < a.end and a.size > 0 and b.size > 0:
            layout.problems.append(
                f"partitions {a.number} and {b.number} overlap (bytes "
                f"{b.start}..{min(a.end, b.end)})"
            )
