"""Sparsify (issue #16): give back the space the guest's file systems do not use, without
booting the guest.

Free ranges come from each file system's own allocation map (ext2/3/4 block bitmaps with
uninitialised groups honoured, NTFS $Bitmap, the FAT, exFAT's allocation bitmap, Linux swap
after its header) and from the
space outside every partition (never the tables, GPT's backup, nor the gap before the first
partition, where boot loaders live). Volumes without a reader are left untouched and reported.

Safety: a volume not cleanly unmounted refuses the whole operation (:class:`Refused`, naming the
flag and how to clear it); so does an image open elsewhere (the locks) or one with children
(unless the result goes into a copy). In place the order is map -> discard (the format's own
discard; a base image whose format cannot discard gets zeroes written over its allocated free
ranges; a child whose format cannot store "reads zero" skips the range and reports it) ->
compact. Only ranges the file system marks free change, so files read the same at every moment.
"""
from __future__ import annotations

import contextlib
import os
import re
import struct
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass, field

from ..alloc import Alloc
from ..backend import Cap, ImageFlags, OpenFlags, Operation
from ..disk import Disk
from ..errors import CorruptImage, InvalidArgument, NotSupported, Refused, VDError
from ..filter import Filter, FilterBackend, FilterCap
from ..inside.diskfile import DiskFile, SliceFile
from ..inside.filesystems import ExfatVolume, FileSystem, open_filesystem
from ..inside.partitions import Layout, Partition, read_layout
from ..progress import Progress, ProgressCallback, WorkMap, sub_progress
from ..temps import temp_name
from .rewrite import backend_for

Ranges = list[tuple[int, int]]          # (start, end), sorted, disjoint
CHUNK = 256 << 20          # per discard call: formats close holes per call


@dataclass
class VolumeResult:
    number: int
    filesystem: str
    start: int
    size: int
    used: int = 0
    free: int = 0
    skipped: str | None = None
    ranges: Ranges = field(default_factory=list, repr=False)   # free, absolute disk offsets
    reclaimable: int = 0

    def as_dict(self) -> dict:
        return {
            "number": self.number if self.number >= 0 else None,
            "filesystem": self.filesystem,
            "size": self.size,
            "used": self.used,
            "free": self.free,
            "skipped": self.skipped,
            "reclaimable": self.reclaimable,
        }


@dataclass
class SparsifyReport:
    partitions: list[VolumeResult] = field(default_factory=list)
    reclaimable: int = 0
    before: int = 0
    after: int | None = None
    skipped_ranges: int = 0  # free bytes a child could not mark as reading zero
    path: str = ""
    offer: str | None = None  # a fixed image: how to get its dynamic variant instead

    @property
    def freed(self) -> int:
        return max(self.before - (self.after or 0), 0) if self.after is not None else 0

    def summary(self) -> str:
        """One line for a job: "freed 37.2 GiB (from 61.0 to 23.8 GiB)"."""
        from ..sizes import format_size

        if self.after is None:
            return f"up to {format_size(self.reclaimable)} can be given back"
        return (
            f"freed {format_size(self.freed)} (from {format_size(self.before)} to "
            f"{format_size(self.after)})"
        )

    def as_dict(self) -> dict:
        d = {
            "reclaimable": self.reclaimable,
            "partitions": [p.as_dict() for p in self.partitions],
            "before": self.before,
        }
        if self.after is not None:
            d["after"] = self.after
        if self.skipped_ranges:
            d["skipped_bytes"] = self.skipped_ranges
        if self.offer:
            d["offer"] = self.offer
        return d


# -- ranges ---------------------------------------------------------------------------------
def _add(out: Ranges, s: int, e: int) -> None:
    if e <= s:
        return
    if out and out[-1][1] >= s:
        out[-1] = (out[-1][0], max(out[-1][1], e))
    else:
        out.append((s, e))


def _clip(ranges: Ranges, lo: int, hi: int, align: int) -> Ranges:
    """Ranges cut to [lo, hi) and shrunk inwards to ``align`` boundaries."""
    out: Ranges = []
    for s, e in ranges:
        s = max(s, lo)
        e = min(e, hi)
        s = -(-s // align) * align
        e = e // align * align
        _add(out, s, e)
    return out


def _total(ranges: Ranges) -> int:
    return sum(e - s for s, e in ranges)


def _intersect(a: Ranges, b: Ranges) -> Ranges:
    out: Ranges = []
    i = j = 0
    while i < len(a) and j < len(b):
        s = max(a[i][0], b[j][0])
        e = min(a[i][1], b[j][1])
        if s < e:
            out.append((s, e))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


_FULL = re.compile(b"\xff+")
_EMPTY = re.compile(b"\x00+")


def _bits_free(bitmap: bytes, count: int, base: int, unit: int, out: Ranges) -> None:
    """Clear bits (LSB first) among the first ``count`` -> byte ranges base + bit * unit."""
    n = min(count, len(bitmap) * 8)
    full = n // 8
    i = 0
    while i < n:
        byte_i = i >> 3
        if (i & 7) == 0 and byte_i < full:
            b = bitmap[byte_i]
            if b == 0xFF or b == 0:             # a run of whole bytes: one step
                m = (_FULL if b else _EMPTY).match(bitmap, byte_i, full)
                assert m is not None
                if not b:
                    _add(out, base + i * unit, base + m.end() * 8 * unit)
                i = m.end() * 8
                continue
        if not (bitmap[byte_i] >> (i & 7)) & 1:
            _add(out, base + i * unit, base + (i + 1) * unit)
        i += 1


# -- per file system: (free ranges relative to the volume, refusal) --------------------------
def _ext_free(fs: FileSystem, pread, size: int) -> Ranges:
    x = fs.fs  # dissect ExtFS
    sb = x.sb
    bs = x.block_size
    if sb.s_state & 0x0002:
        raise Refused(
            f"{fs.name}: the ext file system has recorded errors (state flag "
            "EXT2_ERROR_FS); run e2fsck -fy on it (or fsck in the guest) first"
        )
    if sb.s_feature_incompat & 0x0004:
        raise Refused(
            f"{fs.name}: the ext journal needs recovery (feature needs_recovery): "
            "the file system was not cleanly unmounted; boot the guest and shut it "
            "down cleanly, or run e2fsck -fy on it"
        )
    if sb.s_last_orphan:
        raise Refused(
            f"{fs.name}: the ext file system has an orphan list (s_last_orphan = "
            f"{sb.s_last_orphan}): it was not cleanly unmounted; run e2fsck -fy on it"
        )
    if not sb.s_state & 0x0001:
        raise Refused(
            f"{fs.name}: the ext file system is not marked clean (state flag "
            "EXT2_VALID_FS clear): it is mounted or was not cleanly unmounted; "
            "run e2fsck -fy on it"
        )
    meta_bg = bool(sb.s_feature_incompat & 0x0010)  # descriptor blocks spread out
    bpg = sb.s_blocks_per_group
    first = sb.s_first_data_block
    count = x.block_count
    groups = x.groups_count
    sparse = bool(sb.s_feature_ro_compat & 0x0001)
    desc_blocks = -(-groups * x._group_desc_size // bs)
    descs = [x._read_group_desc(g) for g in range(groups)]

    def lo_hi(d, name):
        v = getattr(d, name + "_lo")
        hi = getattr(d, name + "_hi", 0) if hasattr(d, name + "_hi") else 0
        return v | (hi << 32)

    meta: dict[int, list[int]] = {}  # group -> blocks of any group's bitmaps/tables in it
    ipg_blocks = -(-sb.s_inodes_per_group * sb.s_inode_size // bs)
    for d in descs:
        for blk, n in (
            (lo_hi(d, "bg_block_bitmap"), 1),
            (lo_hi(d, "bg_inode_bitmap"), 1),
            (lo_hi(d, "bg_inode_table"), ipg_blocks),
        ):
            for b in range(blk, blk + n):
                meta.setdefault((b - first) // bpg, []).append(b)

    def has_super(g: int) -> bool:
        if g <= 1 or not sparse:
            return True
        for p in (3, 5, 7):
            v = p
            while v < g:
                v *= p
            if v == g:
                return True
        return False

    out: Ranges = []
    for g, d in enumerate(descs):
        gstart = first + g * bpg
        n = min(bpg, count - gstart)
        if n <= 0:
            break
        if d.bg_flags & 0x0002:  # BLOCK_UNINIT: the bitmap is not on disk
            if meta_bg:
                continue  # layout too involved: leave the group alone
            used = set(meta.get(g, []))
            if has_super(g):
                used.update(range(gstart, gstart + 1 + desc_blocks + sb.s_reserved_gdt_blocks))
            for b in range(gstart, gstart + n):
                if b not in used:
                    _add(out, b * bs, (b + 1) * bs)
            continue
        bm = pread(lo_hi(d, "bg_block_bitmap") * bs, bs)
        if len(bm) < bs:
            raise CorruptImage(
                f"{fs.name}: ext block bitmap of group {g} lies past the end of the volume"
            )
        _bits_free(bm, n, gstart * bs, bs, out)
    # the first block(s) before s_first_data_block (1 KiB blocks: the boot block) stay
    return _clip(out, 0, size, 1)


def _fat_free(fs: FileSystem, pread, size: int) -> Ranges:
    x = fs.fs  # dissect FATFS
    ss = x.sector_size
    boot = pread(0, 512)
    fat32 = x.bpb_ext is not None and x.type.name == "FAT32"
    flag_at = 0x41 if fat32 else 0x25
    if boot[flag_at] & 0x01:
        raise Refused(
            f"{fs.name}: the FAT volume's dirty bit is set (boot sector byte "
            f"{flag_at:#x}): it was not cleanly unmounted; run fsck.fat -a on it "
            "(or chkdsk in the guest)"
        )
    bits = {"FAT12": 12, "FAT16": 16, "FAT32": 32}[x.type.name]
    data_sec = x.total_sectors - x.first_data_sector
    clusters = data_sec // x.bpb.BPB_SecPerClus
    fat = pread(x.bpb.BPB_RsvdSecCnt * ss, x.fat_size * ss)
    nent = min(clusters + 2, len(fat) * 8 // bits)
    base = x.first_data_sector * ss
    cs = x.cluster_size
    out: Ranges = []
    if bits == 32:
        vals = struct.unpack_from(f"<{nent}I", fat)
        for c in range(2, nent):
            if not vals[c] & 0x0FFFFFFF:
                _add(out, base + (c - 2) * cs, base + (c - 1) * cs)
    elif bits == 16:
        vals = struct.unpack_from(f"<{nent}H", fat)
        for c in range(2, nent):
            if not vals[c]:
                _add(out, base + (c - 2) * cs, base + (c - 1) * cs)
    else:
        for c in range(2, nent):
            v = struct.unpack_from("<H", fat, c + c // 2)[0]
            v = v >> 4 if c & 1 else v & 0xFFF
            if not v:
                _add(out, base + (c - 2) * cs, base + (c - 1) * cs)
    return _clip(out, 0, size, 1)


def _exfat_free(fs: FileSystem, pread, size: int) -> Ranges:
    assert isinstance(fs, ExfatVolume)
    x = fs.fs  # dissect ExFAT
    flags = struct.unpack_from("<H", pread(0, 512), 0x6A)[0]
    if flags & 0x0002:
        raise Refused(
            f"{fs.name}: the exFAT volume's VolumeDirty flag is set (boot sector VolumeFlags, "
            "byte 0x6a): it was not cleanly unmounted; run fsck.exfat -y on it (or chkdsk "
            "in Windows)"
        )
    bm = x.alloc_bitmap
    count = x.cluster_count
    if bm is None or bm.bitmap_length * 8 < count:
        raise CorruptImage(
            f"{fs.name}: the exFAT allocation bitmap is missing or too short (needs "
            f"{-(-count // 8)} bytes, found {0 if bm is None else bm.bitmap_length})"
        )
    runs = fs.runs(bm.bitmap_start_cluster, bm.bitmap_length, False)
    bitmap = b"".join(pread(off, n) for off, n in runs)
    out: Ranges = []
    _bits_free(bitmap, count, fs.heap, x.cluster_size, out)
    return _clip(out, 0, size, 1)


def _ntfs_free(fs: FileSystem, pread, size: int) -> Ranges:
    x = fs.fs  # dissect NTFS
    try:
        vol = x.mft.get(3)
        info = vol.attributes.get(0x70)
        raw = info[0].data() if info else b""
    except Exception as e:
        raise CorruptImage(f"{fs.name}: NTFS $Volume cannot be read: {e}") from None
    if len(raw) >= 12 and struct.unpack_from("<H", raw, 10)[0] & 0x0001:
        raise Refused(
            f"{fs.name}: the NTFS volume's dirty flag is set ($Volume "
            "VOLUME_IS_DIRTY): run chkdsk /f in Windows, or ntfsfix -d on it"
        )
    try:
        hib = x.mft.get("hiberfil.sys")
        head = hib.open().read(8)
    except Exception:
        head = b""
    if head[:4].lower() in (b"hibr", b"wake") or head[:4] == b"RSTR":
        raise Refused(
            f"{fs.name}: Windows is hibernated or uses fast startup (hiberfil.sys "
            "holds a hibernation image): boot Windows and shut it down fully "
            "(shutdown /s /t 0, or turn fast startup off)"
        )
    try:
        bm = x.mft.get(6).open().read()
    except Exception as e:
        raise CorruptImage(f"{fs.name}: NTFS $Bitmap cannot be read: {e}") from None
    total_sectors = x.boot_sector.NumberSectors
    clusters = total_sectors * x.sector_size // x.cluster_size
    out: Ranges = []
    _bits_free(bm, clusters, 0, x.cluster_size, out)
    # cluster 0 holds the boot sector; the backup boot sector sits past the last cluster
    return _clip(out, x.cluster_size, min(size, clusters * x.cluster_size), 1)


def _swap_free(pread, size: int, name: str) -> Ranges:
    for page in (4096, 8192, 16384, 65536):
        if page > size:
            break
        magic = pread(page - 10, 10)
        if magic == b"SWAPSPACE2":
            return [(page, size)] if size > page else []
        if magic in (b"S1SUSPEND\0", b"S2SUSPEND\0") or magic[:9] in (b"S1SUSPEND", b"S2SUSPEND"):
            raise Refused(
                f"{name}: the swap area holds a hibernation image (signature "
                f"{magic!r}): resume the guest and shut it down cleanly first"
            )
    raise NotSupported("swap header not recognised")


_READERS: dict[str, Callable] = {
    "ext2": _ext_free,
    "ext3": _ext_free,
    "ext4": _ext_free,
    "fat12": _fat_free,
    "fat16": _fat_free,
    "fat32": _fat_free,
    "exfat": _exfat_free,
    "ntfs": _ntfs_free,
}


def _in_free(free: Ranges, starts: list[int], off: int, n: int) -> tuple[int, int] | None:
    """The part of [off, off + n) that ``free`` holds (the first one), or None."""
    i = bisect_right(starts, off + n - 1) - 1
    if i >= 0 and free[i][1] > off:
        return max(off, free[i][0]), min(off + n, free[i][1])
    return None


def _check_ntfs(fs: FileSystem, free: Ranges) -> None:
    """Every cluster a record in use names (any non-resident attribute of any file, the
    metadata files included) must be marked in use in $Bitmap: stop with the evidence."""
    x = fs.fs
    cs = x.cluster_size
    starts = [s for s, _ in free]
    for rec in x.mft.segments():
        if not rec.header.Flags & 0x0001:           # FILE_RECORD_SEGMENT_IN_USE
            continue
        try:
            attrs = [a for coll in rec.attributes.values() for a in coll if not a.resident]
            runs = [(a, lcn, k) for a in attrs for lcn, k in a.dataruns() if lcn is not None]
        except Exception as exc:
            raise CorruptImage(f"{fs.name}: MFT record {rec.segment} cannot be read: "
                               f"{exc}") from None
        for a, lcn, k in runs:
            hit = _in_free(free, starts, lcn * cs, k * cs)
            if hit:
                what = f"MFT record {rec.segment}" + (f" ({rec.filename})"
                                                       if rec.filename else "")
                raise CorruptImage(
                    f"{fs.name}: $Bitmap marks bytes {hit[0]}..{hit[1]} free, but {what} "
                    f"uses them (attribute {a.type.name}{':' + a.name if a.name else ''}, "
                    f"clusters {lcn}..{lcn + k - 1}); nothing was changed (run chkdsk /f, "
                    "or ntfsfix, first)")


def _check_files(fs: FileSystem, free: Ranges) -> None:
    """A file's data in a range the bitmap calls free: stop with the evidence."""
    if fs.kind == "ntfs" and free:
        _check_ntfs(fs, free)
        return
    alloc = getattr(fs, "allocation", None)
    if alloc is None or not free:
        return
    starts = [s for s, _ in free]
    for e in fs.walk("/"):
        if e.type not in ("file", "dir"):
            continue
        try:
            runs = alloc(e.path)
        except VDError:
            raise
        except Exception as exc:
            raise CorruptImage(f"{fs.name}: cannot map {e.path}: {exc}") from None
        for off, n in runs:
            i = bisect_right(starts, off + n - 1) - 1
            if i >= 0 and free[i][1] > off:
                raise CorruptImage(
                    f"{fs.name}: the allocation map marks bytes {max(off, free[i][0])}.."
                    f"{min(off + n, free[i][1])} free, but {e.path} uses them; nothing was "
                    "changed (run the file system's check first)"
                )


# -- the plan -------------------------------------------------------------------------------
def _volume(disk_file: DiskFile, part: Partition, check_files: bool, where: str) -> VolumeResult:
    end = min(part.end, disk_file.size)
    res = VolumeResult(part.number, part.filesystem or "", part.start, max(end - part.start, 0))
    if res.size <= 0:
        res.skipped = "lies past the end of the disk"
        return res
    base = part.start

    def pread(o: int, n: int) -> bytes:
        n = max(0, min(n, res.size - o))
        return disk_file.pread(base + o, n) if n else b""

    name = where + (f" partition {part.number}" if part.number else "")
    kind = part.filesystem
    if kind == "swap":
        try:
            rel = _swap_free(pread, res.size, name)
        except NotSupported as e:
            res.skipped = str(e)
            return res
    elif kind in _READERS:
        import io

        fh = io.BufferedReader(SliceFile(disk_file, base, res.size), 64 * 1024)
        fs = open_filesystem(fh, kind, name)
        rel = _READERS[kind](fs, pread, res.size)
        if check_files:
            _check_files(fs, rel)
    else:
        res.skipped = f"no reader for {kind} volumes" if kind else "no file system recognised"
        return res
    res.ranges = [(base + s, base + e) for s, e in rel]
    res.free = _total(rel)
    res.used = res.size - res.free
    return res


def _outside(disk_file: DiskFile, layout: Layout, ss: int) -> Ranges:
    """Space outside every partition that no table, boot loader or GPT backup uses."""
    size = disk_file.size
    if layout.scheme == "none" or not layout.partitions:
        return []
    keep: Ranges = []
    parts = sorted((p.start, p.end) for p in layout.partitions if p.size > 0)
    first = parts[0][0] if parts else size
    keep.append((0, max(first, ss)))  # MBR, GPT, and the boot loader gap
    ext = [p for p in layout.partitions if p.type in ("0x05", "0x0f", "0x85")]
    for s, e in parts:
        keep.append((s, e))
    for p in ext:  # EBRs live inside the extended container
        keep.append((p.start, p.end))
    if layout.scheme in ("gpt", "hybrid"):
        hdr = disk_file.pread(ss, 92)
        last_usable = struct.unpack_from("<Q", hdr, 48)[0] if hdr[:8] == b"EFI PART" else 0
        tail = (last_usable + 1) * ss if last_usable else size - 34 * ss
        keep.append((min(tail, size - 33 * ss), size))
    keep.sort()
    merged: Ranges = []
    for s, e in keep:
        _add(merged, s, e)
    out: Ranges = []
    pos = 0
    for s, e in merged:
        _add(out, pos, s)
        pos = max(pos, e)
    _add(out, pos, size)
    return out


def plan(disk: Disk, *, check_files: bool = True) -> SparsifyReport:
    """Map the free ranges of ``disk`` (read only). Raises Refused for a volume that was not
    cleanly unmounted."""
    report = SparsifyReport(path=disk.top.location)
    ss = disk.sector_size
    with DiskFile(disk) as f:
        layout = read_layout(f.pread, f.size, ss)
        parts = [p for p in layout.partitions if p.type not in ("0x05", "0x0f", "0x85")]
        for p in parts:
            report.partitions.append(_volume(f, p, check_files, disk.top.location))
        outside = _outside(f, layout, ss)
        if outside:
            report.partitions.append(
                VolumeResult(
                    -1, "unpartitioned", 0, _total(outside), 0, _total(outside), None, outside
                )
            )
    for v in report.partitions:
        v.ranges = _clip(v.ranges, 0, disk.size, ss)
        v.reclaimable = _total(_intersect(v.ranges, _held(disk, v.ranges)))
    report.reclaimable = sum(v.reclaimable for v in report.partitions)
    return report


def _held(disk: Disk, ranges: Ranges) -> Ranges:
    """Of ``ranges``, what the top image stores itself (DATA)."""
    out: Ranges = []
    img = disk.top
    for s, e in ranges:
        for off, n, st in img.block_status(s, e - s):
            if st == Alloc.DATA:
                _add(out, off, off + n)
    return out


# -- into a copy: the free ranges read as zeroes on the way ----------------------------------
_FREE_AS_ZERO = FilterBackend("SPARSIFY", "the free ranges of the guest's file systems read "
                              "as zeroes", FilterCap.READ)


class _FreeAsZero(Filter):
    """A read filter: the mapped free ranges read as zeroes, so that a copy (which stores no
    zeroes) leaves them out. Stateless: the copy's reader threads share it."""
    backend = _FREE_AS_ZERO

    def __init__(self, ranges: Ranges):
        self.ranges = ranges
        self.starts = [s for s, _ in ranges]

    def decode(self, offset: int, buf: memoryview) -> None:
        end = offset + len(buf)
        i = max(bisect_right(self.starts, offset) - 1, 0)
        while i < len(self.ranges) and self.ranges[i][0] < end:
            a, b = max(self.ranges[i][0], offset), min(self.ranges[i][1], end)
            if a < b:
                buf[a - offset:b - offset] = bytes(b - a)
            i += 1

    def encode(self, offset: int, buf: memoryview) -> None:
        raise NotSupported("the sparsify filter only reads")


def _variant(flags: ImageFlags) -> ImageFlags:
    """The copy's variant: the source's, but never fixed (a fixed copy would give nothing
    back: a fixed image's sparsified copy is its dynamic variant)."""
    return ImageFlags(flags & (ImageFlags.STREAM_OPTIMIZED | ImageFlags.SPLIT_2G))


def _into(path: str, fmt: str, into: str, into_format: str | None,
          progress: ProgressCallback | None, keep_uuid: bool = False) -> SparsifyReport:
    """One copy of the chain into ``into`` (a fixed image's dynamic variant), read through
    :class:`_FreeAsZero`: the copy's progress is the operation's (bytes copied)."""
    from .copy import copy_image

    with Disk.open_chain(path, fmt, OpenFlags.READ_ONLY) as disk:
        report = plan(disk)  # refuses before anything is written
        report.before = _allocated(disk.top.files())
        flags = ImageFlags(disk.top.flags)
    free: Ranges = []
    for s, e in sorted(r for v in report.partitions for r in v.ranges):
        _add(free, s, e)
    same = into_format is None or backend_for(into, into_format).name == fmt
    made = copy_image(path, into, into_format or fmt, src_format=fmt,
                      variant=_variant(flags) if same else ImageFlags.NONE,
                      progress=progress, src_filters=[_FreeAsZero(free)], keep_uuid=keep_uuid)
    report.after = _allocated([f for p in made for f in _files_of(p)])
    report.path = into
    return report


def _files_of(path: str) -> list[str]:
    with Disk.open_chain(path, None, OpenFlags.READ_ONLY | OpenFlags.INFO) as d:
        return d.top.files()


def _through_copy(path: str, fmt: str, progress: ProgressCallback | None) -> SparsifyReport:
    """In place through a copy (a streamOptimized VMDK, or ``dynamic``): the sparsified copy is
    made beside the image under a temporary name, then renamed over it in one step."""
    from .rewrite import fsync_dir

    real = os.path.realpath(path)
    st = os.stat(real)
    tmp = temp_name(real)
    try:
        report = _into(path, fmt, tmp, None, progress, keep_uuid=True)  # the same disk
        now = os.stat(real)
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            raise VDError(f"{path}: the image was replaced meanwhile; it is left alone")
        os.replace(tmp, real)               # the commit point
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(real)
    report.path = path
    return report


def _fixed(disk: Disk) -> bool:
    """A fixed base image whose format has a dynamic variant (RAW has none)."""
    top = disk.top
    return (len(disk.images) == 1 and bool(top.flags & ImageFlags.FIXED)
            and bool(top.backend.caps & Cap.CREATE_DYNAMIC))


def _fixed_offer(path: str, fmt: str, single: bool, refused: bool = False) -> str:
    how = "--dynamic (replaces it) or --into DST" if single else "--into DST"
    return (f"{path}: a fixed {fmt} image keeps its length"
            + ("; it cannot give space back in place (nothing was changed)" if refused else
               " (at best its free space becomes holes in the file)")
            + f"; its dynamic variant gives the space back: sparsify with {how}")


# -- the operation --------------------------------------------------------------------------
def _allocated(paths: list[str]) -> int:
    total = 0
    for p in paths:
        try:
            total += os.stat(p).st_blocks * 512
        except OSError:
            pass
    return total


def sparsify(
    path: str,
    *,
    format: str | None = None,
    dry_run: bool = False,
    into: str | None = None,
    into_format: str | None = None,
    progress: ProgressCallback | None = None,
    dynamic: bool = False,
) -> SparsifyReport:
    """Sparsify ``path`` in place (or, with ``into``, a new image DST: the chain's content
    without the free ranges, in one copy, never fixed; ``path`` is never changed).
    ``dynamic``: a fixed image is replaced by its dynamic variant (through a copy). A
    streamOptimized VMDK is always sparsified through a copy. Returns the report; ``after`` is
    None on a dry run."""
    from ..chain import find_children

    backend = backend_for(path, format)
    if dry_run:
        with Disk.open_chain(path, backend.name, OpenFlags.READ_ONLY) as disk:
            report = plan(disk)
            report.before = _allocated(disk.top.files())
            if _fixed(disk):
                report.offer = _fixed_offer(path, backend.name, disk.top.single_file)
        return report
    if into is not None:
        return _into(path, backend.name, into, into_format, progress)
    with Disk.open_chain(path, backend.name, OpenFlags.READ_ONLY) as disk:
        kids = find_children(
            disk.top, exclude={os.path.realpath(f) for i in disk.images for f in i.files()}
        )
        flags = ImageFlags(disk.top.flags)
        single = disk.top.single_file
        fixed = _fixed(disk)
    if kids:
        raise Refused(
            f"{path}: the image has differencing images ({', '.join(k for k, _ in kids)})"
            ": freeing ranges in it would change what they read; use --into to "
            "sparsify into a copy"
        )
    if dynamic and not fixed:
        raise InvalidArgument(f"{path}: --dynamic is for fixed images; this one is not")
    if (dynamic or flags & ImageFlags.STREAM_OPTIMIZED) and not single:
        raise NotSupported(_fixed_offer(path, backend.name, False, True))
    if dynamic or flags & ImageFlags.STREAM_OPTIMIZED:
        return _through_copy(path, backend.name, progress)
    report = _in_place(path, backend.name, progress, fixed)
    if fixed:
        report.offer = _fixed_offer(path, backend.name, single)
    return report


def _holes(files: list[str]) -> bool:
    """The files hold more than 16 MiB (2 %) of holes below their end."""
    length = sum(os.path.getsize(f) for f in files if os.path.exists(f))
    return length - _allocated(files) > max(16 << 20, length // 50)


def _in_place(path: str, fmt: str | None, progress: ProgressCallback | None,
              fixed: bool = False) -> SparsifyReport:
    from .compact import compact

    backend = backend_for(path, fmt)
    with Disk.open_chain(path, backend.name, OpenFlags.NORMAL) as disk:
        report = plan(disk)
        report.before = _allocated(disk.top.files())
        top = disk.top
        child = len(disk.images) > 1
        can_discard = top.backend.can(Operation.DISCARD)
        targets: Ranges = []
        for v in report.partitions:
            for s, e in _intersect(v.ranges, _held(disk, v.ranges)):
                _add(targets, s, e)
        work = WorkMap(targets)
        can_compact = backend.can(Operation.COMPACT)
        prog = Progress(progress, work.total * (2 if can_compact else 1))
        prog.start()
        # a format (or variant: a fixed image, a VHD child) that cannot discard: a base gets
        # zeroes written, a child keeps the range
        fallback = "skip" if child else "zero"
        mode = "discard" if can_discard else fallback
        for s, e in targets:
            pos = s
            while pos < e:
                n = min(CHUNK - pos % CHUNK, e - pos)  # whole blocks stay whole
                if mode == "discard":
                    try:
                        disk.discard(pos, n)
                    except NotSupported:
                        if fixed:  # zeroes written could never leave the file: say so first
                            raise NotSupported(_fixed_offer(
                                path, backend.name, top.single_file, True)) from None
                        mode = fallback
                        continue
                elif mode == "skip":
                    report.skipped_ranges += n
                else:
                    disk.write(pos, bytes(n))
                pos += n
                prog.set(work.at(pos))
        disk.flush()
        files = top.files()
        # what discard left as holes inside the file: the format closes them in place when it
        # can (only the blocks above the holes move; nothing is read to be judged)
        closed = False
        if mode == "discard" and targets and _holes(files):
            closed = top.close_holes(sub_progress(prog, work.total, work.total))
            disk.flush()
    # otherwise compacting closes them (through a verified copy): blocks of written zeroes, or
    # holes inside the file
    if can_compact and targets and not closed and (mode == "zero" or _holes(files)):
        compact(path, format=backend.name, progress=sub_progress(prog, work.total, work.total))
    prog.finish()
    with Disk.open_chain(path, backend.name, OpenFlags.READ_ONLY) as disk:
        report.after = _allocated(disk.top.files())
    return report


__all__ = ["Refused", "SparsifyReport", "VolumeResult", "plan", "sparsify"]
