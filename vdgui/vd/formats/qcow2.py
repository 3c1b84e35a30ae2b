"""QCOW2 backend: qemu's copy-on-write format, versions 2 and 3 (read/write/create/diff), and
QCOW version 1 (read-only).

Specification: qemu ``docs/interop/qcow2.txt``; structures in :mod:`.qcow2_layout`.
Modelled on VirtualBox's QCOW backend (caps FILE|VFS|CREATE_DYNAMIC|DIFF|ASYNC, no UUIDs).

Limits (qemu's caps, applied to every header before use): cluster size 512 B .. 2 MiB, L1 table
at most 32 MiB, refcount table at most 8 MiB, at most 65,536 snapshots, backing file name at most
1023 bytes, compressed cluster descriptors checked against the file size, decompressed output
capped at one cluster.

Writing keeps refcounts exact (no lazy refcounts): new clusters are allocated at the end of the
file, their refcount written before anything points at them; then data, then the L2 entry, then
the L1 entry, then the header. Shared clusters (internal snapshots, refcount > 1) are copied on
write. Images marked dirty (lazy refcounts) get their refcounts rebuilt on a read-write open;
images marked corrupt open read-only (a read-write open allows only ``check(repair=True)``).
Unknown incompatible feature bits refuse the open; unknown autoclear bits are cleared before
the first write. Enabled persistent dirty bitmaps are kept up to date (bits set before the data
is written); bitmaps that cannot be maintained are removed cleanly instead of leaking.

Operations: RESIZE (grow, L1 table moved when it must grow), CHECK/REPAIR (refcounts recounted
from every L1/L2 table, snapshot and bitmap like ``qemu-img check``; repair writes a new
refcount structure at the end of the file and fixes OFLAG_COPIED and reserved bits), RELINK
(backing file name and format rewritten in the first cluster), DISCARD (clusters unallocated, or
zero clusters over a backing file), COMPACT (zero/parent-equal clusters dropped, clusters moved
into holes, file truncated). External data files are read only when unsafe paths are allowed;
internal snapshots are listed and can be opened read-only (config key ``Snapshot``).
"""
from __future__ import annotations

import io
import os
import struct
import zlib
from array import array
from collections import OrderedDict

from construct import ConstructError

from ..backend import (Backend, Cap, CreateParams, FileExtension, ImageFlags, OpenFlags,
                       Operation, ProbeInput, too_large)
from ..config import ConfigKey, KeyFlag, ValueType, parse_config
from ..errors import (CorruptImage, InvalidArgument, NotSupported, ParentMismatch, ReadOnlyImage,
                      UnsafePath, VDError)
from ..fileio import ImageFile, relative_name, resolve_stored_name
from ..image import (Alloc, CheckReport, Image, ParentHint, Problem, ProblemCode,
                     check_backing_name)
from ..progress import Progress
from ..sparse import is_zero, zeroes
from ..tables import table_from_bytes, table_to_bytes
from . import qcow2_layout as L

_BIG = struct.Struct(">Q")

_SKIPS = ((64, bytes(8 * 64)), (8, bytes(8 * 8)))   # L2 entries tested together for "all zero"


def _be_array(data) -> array:
    return table_from_bytes(data, "Q", big_endian=True)


def _array_be_bytes(a: array) -> bytes:
    return table_to_bytes(a, big_endian=True)


class _DecompressError(Exception):
    pass


def _inflate(data: bytes, limit: int) -> bytes:
    """Raw deflate (qemu writes window bits -12; -15 reads those too), output capped."""
    try:
        d = zlib.decompressobj(-15)
        out = d.decompress(data, limit)
    except zlib.error as exc:
        raise _DecompressError(f"deflate data is invalid: {exc}") from None
    return out


def _unzstd(data: bytes, limit: int) -> bytes:
    try:
        import zstandard
    except ImportError:  # pragma: no cover - zstandard is declared as an optional dependency
        raise NotSupported("unsupported compression type zstd: install the 'zstandard' module") from None
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data), read_across_frames=True)
        out = bytearray()
        while len(out) < limit:
            chunk = reader.read(limit - len(out))
            if not chunk:
                break
            out += chunk
        return bytes(out)
    except zstandard.ZstdError as exc:
        raise _DecompressError(f"zstd data is invalid: {exc}") from None


def _rc_get(blk, idx: int, bits: int) -> int:
    """Entry ``idx`` of a refcount block of ``bits``-bit entries (sub-byte: LSB first)."""
    if bits == 16:
        return blk[2 * idx] << 8 | blk[2 * idx + 1]
    if bits < 8:
        bitpos = idx * bits
        return blk[bitpos >> 3] >> (bitpos & 7) & ((1 << bits) - 1)
    w = bits // 8
    return int.from_bytes(blk[idx * w:idx * w + w], "big")


def _rc_set(blk, idx: int, value: int, bits: int) -> tuple[int, int]:
    """Set entry ``idx``; returns the (byte offset, length) changed."""
    if bits < 8:
        bitpos = idx * bits
        mask = ((1 << bits) - 1) << (bitpos & 7)
        b = bitpos >> 3
        blk[b] = (blk[b] & ~mask) | (value << (bitpos & 7))
        return b, 1
    w = bits // 8
    blk[idx * w:idx * w + w] = value.to_bytes(w, "big")
    return idx * w, w


L2E_MASK = L.L2E_OFFSET_MASK


def _set_bit_range(buf, base_byte: int, lo: int, hi: int) -> None:
    """Set bits lo..hi (inclusive; bit 0 = LSB of byte 0) in ``buf``, which starts at byte
    ``base_byte`` of the bitmap cluster."""
    a, z = lo >> 3, hi >> 3
    if a == z:
        buf[a - base_byte] |= (0xFF << (lo & 7)) & (0xFF >> (7 - (hi & 7)))
        return
    buf[a - base_byte] |= (0xFF << (lo & 7)) & 0xFF
    buf[z - base_byte] |= 0xFF >> (7 - (hi & 7))
    if z - a > 1:
        buf[a + 1 - base_byte:z - base_byte] = b"\xff" * (z - a - 1)


def _subcluster_mask(s0: int, s1: int) -> int:
    """Bits s0..s1 inclusive."""
    return ((1 << (s1 - s0 + 1)) - 1) << s0


def _preadv_all(fd: int, dst: memoryview, host: int, fsize: int) -> bool:
    """Read len(dst) bytes at ``host`` of ``fd`` straight into ``dst`` when they lie inside a
    file of ``fsize`` bytes; False (caller reads the slow way, which reports errors) otherwise."""
    if fd < 0 or host + len(dst) > fsize:
        return False
    try:
        return os.preadv(fd, [dst], host) == len(dst)
    except (OSError, OverflowError):
        return False


class _Segment:
    __slots__ = ("pos", "n", "kind", "host")

    def __init__(self, pos, n, kind, host):
        self.pos, self.n, self.kind, self.host = pos, n, kind, host


K_UNALLOC, K_ZERO, K_DATA, K_COMP = 0, 1, 2, 3
_KIND_ALLOC = {K_UNALLOC: Alloc.UNALLOCATED, K_ZERO: Alloc.ZERO, K_DATA: Alloc.DATA, K_COMP: Alloc.DATA}


def qcow2_max_size(cs: int) -> int:
    """qemu's limit: the L1 table at most 32 MiB (each entry maps cs/8 clusters), and host
    offsets of 56 bits."""
    return min(1 << 56, (L.MAX_L1_BYTES // 8) * (cs // 8) * cs)


def _limit_reason(cs: int) -> str:
    return (f" with {cs}-byte clusters (qemu's L1 table limit, 32 MiB; larger clusters allow "
            "more, up to 64 PiB)")


class Qcow2Image(Image):
    """One opened qcow2 (version 2 or 3) image."""

    L2_CACHE_BYTES = 32 << 20

    @property
    def max_size(self) -> int:
        return qcow2_max_size(self.cs)

    def __init__(self, backend, location, f: ImageFile, flags: OpenFlags,
                 snapshot: str | None = None):
        super().__init__(backend, location, flags.read_only)
        self.f = f
        self.open_flags = flags
        self.snapshot_view: dict | None = None
        self._first_write_done = False
        self.compress_writes = False            # set by create(Compress=1): convert -c
        self._cfree: int | None = None          # next free byte for packed compressed data
        self.data_f: ImageFile | None = None
        self.data_file_name: str | None = None
        self._l2_cache: OrderedDict[int, array] = OrderedDict()
        self._l2_cache_bytes = 0
        self._rb_cache: dict[int, bytearray] = {}
        self.rt: array | None = None
        self.snapshots: list[dict] = []
        self.bitmaps_ext: dict | None = None
        self.write_blocked: str | None = None
        self.honor_zeroes = False
        self._parse_header()
        if snapshot:
            self._select_snapshot(snapshot)
        if not self.read_only:
            self._prepare_write()

    def _select_snapshot(self, which: str) -> None:
        """Read-only view of an internal snapshot (by ID or name): its L1 table and size."""
        if not self.read_only:
            raise InvalidArgument(f"{self.location}: internal snapshots can only be opened "
                                  "read-only")
        found = [s for s in self.snapshots if s["id"] == which] or \
                [s for s in self.snapshots if s["name"] == which]
        if not found:
            known = ", ".join(f"{s['id']} ({s['name']})" for s in self.snapshots) or "none"
            raise InvalidArgument(f"{self.location}: no internal snapshot {which!r} "
                                  f"(snapshots: {known})")
        snap = found[0]
        span = self.cs * self.l2_entries
        if -(-snap["disk_size"] // span) > snap["l1_size"] or snap["disk_size"] > (1 << 62):
            raise self._corrupt(f"snapshot {snap['id']}: L1 table too small for its disk size",
                                field="l1_size", expected=f">= {-(-snap['disk_size'] // span)}",
                                found=snap["l1_size"])
        self.l1 = _be_array(self.f.read_exact(snap["l1_table_offset"], snap["l1_size"] * 8,
                                              f"snapshot {snap['id']} L1 table"))
        self.size = snap["disk_size"]
        self.snapshot_view = snap

    # ------------------------------------------------------------------ parsing / validation
    def _corrupt(self, message, **kw):
        return CorruptImage(message, path=self.location, **kw)

    def _parse_header(self) -> None:
        f = self.f
        self.fsize = f.size()
        head = f.read_exact(0, L.V2_HEADER_SIZE, "qcow2 header")
        try:
            h = L.Qcow2HeaderV2.parse(head)
        except ConstructError:
            raise self._corrupt("not a qcow2 image (bad magic)", field="magic", offset=0,
                                expected=L.MAGIC, found=head[:4]) from None
        self.version = h.version
        if h.version not in (2, 3):
            raise NotSupported(f"{self.location}: qcow2 version {h.version} is not supported "
                               "(versions 1, 2 and 3 are)")
        if not L.MIN_CLUSTER_BITS <= h.cluster_bits <= L.MAX_CLUSTER_BITS:
            raise self._corrupt("cluster size out of range", field="cluster_bits", offset=20,
                                expected=f"{L.MIN_CLUSTER_BITS}..{L.MAX_CLUSTER_BITS}",
                                found=h.cluster_bits)
        self.cb = h.cluster_bits
        self.cs = cs = 1 << self.cb
        if self.version == 3:
            tail = f.read_exact(L.V2_HEADER_SIZE, 32, "qcow2 version 3 header")
            t = L.Qcow2HeaderV3Tail.parse(tail)
            if t.header_length < L.V3_HEADER_MIN or t.header_length % 8 or t.header_length > cs:
                raise self._corrupt("invalid header length", field="header_length", offset=100,
                                    expected=f"a multiple of 8 in {L.V3_HEADER_MIN}..{cs}",
                                    found=t.header_length)
            self.incompat = t.incompatible_features
            self.compat = t.compatible_features
            self.autoclear = t.autoclear_features
            self.refcount_order = t.refcount_order
            self.header_length = t.header_length
        else:
            self.incompat = self.compat = self.autoclear = 0
            self.refcount_order = 4
            self.header_length = L.V2_HEADER_SIZE
        self.header_raw = bytearray(f.read_exact(0, self.header_length, "qcow2 header"))
        unknown = self.incompat & ~L.INCOMPAT_KNOWN
        self._read_extensions(h)
        if unknown:
            names = [self.feature_names.get((0, b), f"bit {b}") for b in range(64) if unknown >> b & 1]
            raise NotSupported(f"{self.location}: unsupported qcow2 incompatible features: "
                               f"{', '.join(names)}", field="incompatible_features", offset=72,
                               found=hex(self.incompat))
        if self.refcount_order > 6:
            raise self._corrupt("refcount width too large", field="refcount_order", offset=96,
                                expected="0..6", found=self.refcount_order)
        self.refcount_bits = 1 << self.refcount_order
        self.extended_l2 = bool(self.incompat & L.INCOMPAT_EXTL2)
        if self.extended_l2 and self.cb < 14:
            raise self._corrupt("extended L2 entries need clusters of at least 16 KiB",
                                field="cluster_bits", offset=20, expected=">= 14", found=self.cb)
        self.compression_type = 0
        if self.header_length > L.COMPRESSION_TYPE_OFFSET:
            self.compression_type = self.header_raw[L.COMPRESSION_TYPE_OFFSET]
        if bool(self.incompat & L.INCOMPAT_COMPRESSION) != (self.compression_type != 0):
            raise self._corrupt("compression type field and feature bit disagree",
                                field="compression_type", offset=104,
                                expected="non-zero exactly when incompatible bit 3 is set",
                                found=self.compression_type)
        if self.compression_type not in (0, 1):
            raise NotSupported(f"{self.location}: unsupported compression type "
                               f"{self.compression_type} (known: 0 zlib, 1 zstd)",
                               field="compression_type", offset=104)
        if h.crypt_method:
            raise NotSupported(f"{self.location}: encrypted qcow2 images are not supported "
                               f"(crypt_method {h.crypt_method})", field="crypt_method", offset=32)
        self.size = h.size
        self.block_size = cs
        self.l2_entries = cs // (16 if self.extended_l2 else 8)
        self.sc_size = cs // 32 if self.extended_l2 else cs
        self.rb_entries = cs * 8 // self.refcount_bits
        # L1 table
        if h.l1_size * 8 > L.MAX_L1_BYTES:
            raise self._corrupt("active L1 table too large", field="l1_size", offset=36,
                                expected=f"at most {L.MAX_L1_BYTES // 8} entries (32 MiB)",
                                found=h.l1_size)
        span = cs * self.l2_entries
        if h.size > (1 << 62) or -(-h.size // span) > h.l1_size:
            raise self._corrupt("L1 table too small for the virtual size", field="l1_size",
                                offset=36, expected=f">= {-(-h.size // span)} entries for "
                                f"{h.size} bytes", found=h.l1_size)
        if h.l1_size and h.l1_table_offset % cs:
            raise self._corrupt("L1 table offset not cluster aligned", field="l1_table_offset",
                                offset=40, found=hex(h.l1_table_offset))
        self.l1_offset = h.l1_table_offset
        self.l1 = _be_array(f.read_exact(h.l1_table_offset, h.l1_size * 8, "active L1 table")) \
            if h.l1_size else array("Q")
        # refcount table (read lazily; validated now)
        if h.refcount_table_clusters * cs > L.MAX_REFTABLE_BYTES:
            raise self._corrupt("refcount table too large", field="refcount_table_clusters",
                                offset=56, expected=f"at most {L.MAX_REFTABLE_BYTES >> 20} MiB",
                                found=h.refcount_table_clusters)
        if h.refcount_table_offset % cs:
            raise self._corrupt("refcount table offset not cluster aligned",
                                field="refcount_table_offset", offset=48,
                                found=hex(h.refcount_table_offset))
        if h.refcount_table_clusters == 0 and not self.open_flags & OpenFlags.INFO:
            raise self._corrupt("image has no refcount table", field="refcount_table_clusters",
                                offset=56, expected="> 0", found=0)
        self.rt_offset = h.refcount_table_offset
        self.rt_clusters = h.refcount_table_clusters
        # snapshots
        if h.nb_snapshots > L.MAX_SNAPSHOTS:
            raise self._corrupt("too many snapshots", field="nb_snapshots", offset=60,
                                expected=f"at most {L.MAX_SNAPSHOTS}", found=h.nb_snapshots)
        if h.nb_snapshots and h.snapshots_offset % cs:
            raise self._corrupt("snapshot table offset not cluster aligned",
                                field="snapshots_offset", offset=64, found=hex(h.snapshots_offset))
        self.nb_snapshots = h.nb_snapshots
        self.snapshots_offset = h.snapshots_offset
        self._read_snapshots()
        # backing file
        self.backing_file = None
        if h.backing_file_offset:
            if h.backing_file_size > L.MAX_BACKING_NAME:
                raise self._corrupt("backing file name too long", field="backing_file_size",
                                    offset=16, expected=f"at most {L.MAX_BACKING_NAME} bytes",
                                    found=h.backing_file_size)
            if h.backing_file_offset > cs:
                raise self._corrupt("backing file name outside the first cluster",
                                    field="backing_file_offset", offset=8,
                                    expected=f"<= {cs}", found=h.backing_file_offset)
            raw = f.read_exact(h.backing_file_offset, h.backing_file_size, "backing file name")
            try:
                self.backing_file = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise self._corrupt("backing file name is not UTF-8", field="backing file name",
                                    offset=h.backing_file_offset, found=raw[:64]) from None
            if not self.backing_file:
                self.backing_file = None
        self.backing_file_offset = h.backing_file_offset
        if self.backing_file is not None:
            self.parent_hint = ParentHint(locations=[self.backing_file],
                                          format=self.backing_format)
            self.flags = ImageFlags.DIFF
        # external data file
        if self.incompat & L.INCOMPAT_DATA_FILE:
            if self.backing_file is not None and self.autoclear & L.AUTOCLEAR_DATA_FILE_RAW:
                raise self._corrupt("a raw external data file cannot have a backing file",
                                    field="autoclear_features", offset=88)
            if not self.open_flags & OpenFlags.INFO:
                self._open_data_file()
        if self.incompat & L.INCOMPAT_CORRUPT:
            self.write_blocked = ("the image is marked corrupt; only a repair "
                                  "(check --repair) may write to it")
        self.next_cluster = -(-self.fsize // cs)

    def _read_extensions(self, h) -> None:
        cs = self.cs
        end = h.backing_file_offset if h.backing_file_offset and h.backing_file_offset <= cs else cs
        end = min(end, self.fsize)
        self.extensions: list[tuple[int, bytes]] = []   # (type, data) in order, except END
        self.feature_names: dict[tuple[int, int], str] = {}
        self.backing_format = None
        pos = self.header_length
        seen = set()
        while pos + 8 <= end:
            e = L.HeaderExtension.parse(self.f.read_exact(pos, 8, "header extension"))
            if e.type == L.EXT_END:
                break
            if pos + 8 + e.length > end:
                raise self._corrupt("header extension runs past the extension area",
                                    field=f"header extension {e.type:#x}", offset=pos,
                                    expected=f"end <= {end}", found=pos + 8 + e.length)
            data = self.f.read_exact(pos + 8, e.length, "header extension")
            if e.type in seen and e.type in (L.EXT_BACKING_FORMAT, L.EXT_DATA_FILE, L.EXT_BITMAPS):
                raise self._corrupt("header extension appears twice",
                                    field=f"header extension {e.type:#x}", offset=pos)
            seen.add(e.type)
            self.extensions.append((e.type, data))
            if e.type == L.EXT_BACKING_FORMAT:
                self.backing_format = data.decode("utf-8", "replace")
            elif e.type == L.EXT_DATA_FILE:
                self.data_file_name = data.decode("utf-8", "replace")
            elif e.type == L.EXT_FEATURE_TABLE:
                for i in range(len(data) // 48):
                    fe = L.FeatureNameEntry.parse(data[i * 48:(i + 1) * 48])
                    self.feature_names[(fe.type, fe.bit)] = fe.name.rstrip(b"\0").decode("utf-8", "replace")
            elif e.type == L.EXT_BITMAPS and len(data) >= 24:
                self.bitmaps_ext = dict(L.BitmapsExtension.parse(data[:24]))
            pos += 8 + ((e.length + 7) & ~7)

    def _read_snapshots(self) -> None:
        pos = self.snapshots_offset
        total = 0
        for i in range(self.nb_snapshots):
            fixed = self.f.read_exact(pos, L.SNAPSHOT_FIXED_SIZE, f"snapshot table entry {i}")
            s = L.SnapshotEntry.parse(fixed)
            if s.extra_data_size > L.MAX_SNAPSHOT_EXTRA:
                raise self._corrupt(f"snapshot {i}: extra data too large", field="extra_data_size",
                                    offset=pos + 36, expected=f"<= {L.MAX_SNAPSHOT_EXTRA}",
                                    found=s.extra_data_size)
            if s.l1_size * 8 > L.MAX_L1_BYTES:
                raise self._corrupt(f"snapshot {i}: L1 table too large", field="l1_size",
                                    offset=pos + 8, expected=f"at most {L.MAX_L1_BYTES // 8}",
                                    found=s.l1_size)
            if s.l1_size and s.l1_table_offset % self.cs:
                raise self._corrupt(f"snapshot {i}: L1 table offset not cluster aligned",
                                    field="l1_table_offset", offset=pos,
                                    found=hex(s.l1_table_offset))
            var = s.extra_data_size + s.id_str_size + s.name_size
            rest = self.f.read_exact(pos + L.SNAPSHOT_FIXED_SIZE, var, f"snapshot table entry {i}")
            extra = rest[:s.extra_data_size]
            ident = rest[s.extra_data_size:s.extra_data_size + s.id_str_size].decode("utf-8", "replace")
            name = rest[s.extra_data_size + s.id_str_size:].decode("utf-8", "replace")
            vm_state = s.vm_state_size
            disk_size = self.size
            if len(extra) >= 8:
                vm_state = struct.unpack_from(">Q", extra, 0)[0]
            if len(extra) >= 16:
                disk_size = struct.unpack_from(">Q", extra, 8)[0]
            entry_size = (L.SNAPSHOT_FIXED_SIZE + var + 7) & ~7
            total += entry_size
            if total > L.MAX_SNAPSHOTS_BYTES:
                raise self._corrupt("snapshot table too large", field="nb_snapshots", offset=60,
                                    expected=f"at most {L.MAX_SNAPSHOTS_BYTES >> 20} MiB")
            self.snapshots.append({"id": ident, "name": name, "date_sec": s.date_sec,
                                   "date_nsec": s.date_nsec, "vm_clock_nsec": s.vm_clock_nsec,
                                   "vm_state_size": vm_state, "disk_size": disk_size,
                                   "l1_table_offset": s.l1_table_offset, "l1_size": s.l1_size})
            pos += entry_size
        self.snapshot_table_size = total

    def _open_data_file(self) -> None:
        if not self.data_file_name:
            raise self._corrupt("external data file bit set but no data file name stored",
                                field="incompatible_features", offset=72)
        if not self.open_flags & OpenFlags.ALLOW_UNSAFE_PATHS:
            raise UnsafePath(f"{self.location}: the image keeps its data in an external data file "
                             f"{self.data_file_name!r}; opening it is refused unless unsafe paths "
                             "are allowed")
        path = resolve_stored_name(self.location, self.data_file_name, allow_unsafe=True,
                                   what="external data file")
        self.data_f = ImageFile(path, writable=False)

    # ------------------------------------------------------------------ identity / info
    def files(self):
        out = [self.location]
        if self.data_f is not None:
            out.append(self.data_f.path)
        return out

    def check_parent_link(self, parent: Image) -> None:
        check_backing_name(self, self.backing_file, parent)

    def _feature_list(self, bits: int, kind: int, names: dict) -> list[str]:
        return [self.feature_names.get((kind, b)) or names.get(b, f"bit {b}")
                for b in range(64) if bits >> b & 1]

    def info(self) -> dict:
        d = {
            "qcow_version": self.version,
            "compat": "0.10" if self.version == 2 else "1.1",
            "cluster_size": self.cs,
            "refcount_bits": self.refcount_bits,
            "compression_type": "zstd" if self.compression_type == 1 else "zlib",
            "extended_l2": self.extended_l2,
            "lazy_refcounts": bool(self.compat & L.COMPAT_LAZY_REFCOUNTS),
            "dirty": bool(self.incompat & L.INCOMPAT_DIRTY),
            "corrupt": bool(self.incompat & L.INCOMPAT_CORRUPT),
            "incompatible_features": self._feature_list(self.incompat, 0, L.INCOMPAT_NAMES),
            "compatible_features": self._feature_list(self.compat, 1, L.COMPAT_NAMES),
            "autoclear_features": self._feature_list(self.autoclear, 2, L.AUTOCLEAR_NAMES),
            "l1_size": len(self.l1),
            "snapshots": [{k: s[k] for k in ("id", "name", "date_sec", "vm_state_size",
                                            "disk_size")} for s in self.snapshots],
        }
        if self.backing_file is not None:
            d["backing_file"] = self.backing_file
            d["backing_format"] = self.backing_format
        if self.data_file_name is not None:
            d["data_file"] = self.data_file_name
            d["data_file_raw"] = bool(self.autoclear & L.AUTOCLEAR_DATA_FILE_RAW)
        if self.bitmaps_ext:
            d["bitmaps"] = self.bitmaps_ext["nb_bitmaps"]
        if self.snapshot_view is not None:
            d["snapshot_view"] = {"id": self.snapshot_view["id"],
                                  "name": self.snapshot_view["name"]}
        return d

    # ------------------------------------------------------------------ tables
    def _load_l2(self, off: int, where: str) -> array:
        tbl = self._l2_cache.get(off)
        if tbl is not None:
            self._l2_cache.move_to_end(off)
            return tbl
        if off % self.cs:
            raise self._corrupt(f"L2 table offset not cluster aligned ({where})", offset=off,
                                expected=f"a multiple of {self.cs}", found=hex(off))
        if off + self.cs > self.fsize:
            raise self._corrupt(f"L2 table lies past the end of the file ({where})", offset=off,
                                expected=f"end <= {self.fsize}", found=off + self.cs)
        tbl = _be_array(self.f.read_exact(off, self.cs, "L2 table"))
        self._l2_cache[off] = tbl
        self._l2_cache_bytes += self.cs
        while self._l2_cache_bytes > self.L2_CACHE_BYTES and len(self._l2_cache) > 1:
            self._l2_cache.popitem(last=False)
            self._l2_cache_bytes -= self.cs
        return tbl

    def _l2_of(self, l1_index: int) -> tuple[array | None, int]:
        if l1_index >= len(self.l1):
            return None, 0
        off = self.l1[l1_index] & L.L1E_OFFSET_MASK
        if not off:
            return None, 0
        return self._load_l2(off, f"L1 index {l1_index}"), off

    def _entry(self, ci: int) -> tuple[int, int]:
        """(L2 entry, subcluster bitmap) of guest cluster ``ci`` (0, 0 when unallocated)."""
        l1i, l2i = divmod(ci, self.l2_entries)
        tbl, _ = self._l2_of(l1i)
        if tbl is None:
            return 0, 0
        if self.extended_l2:
            return tbl[2 * l2i], tbl[2 * l2i + 1]
        return tbl[l2i], 0

    def _compressed_range(self, e: int) -> tuple[int, int]:
        x = 62 - (self.cb - 8)
        coff = e & ((1 << x) - 1)
        nsec = ((e >> x) & ((1 << (62 - x)) - 1)) + 1
        return coff, nsec * 512 - (coff & 511)

    def _segments(self, offset: int, length: int) -> list[_Segment]:
        """Map a guest range to segments (pos, n, kind, host); adjacent ones merged."""
        if self.extended_l2:
            return self._segments_ext(offset, length)
        # standard L2 entries: one pass over the entries, a segment object per run only
        cs, cb = self.cs, self.cb
        cmask = cs - 1
        nl2 = self.l2_entries
        span = cs * nl2
        data_file = self.incompat & L.INCOMPAT_DATA_FILE
        f_comp, f_zero, f_copied = L.OFLAG_COMPRESSED, L.OFLAG_ZERO, L.OFLAG_COPIED
        out: list[_Segment] = []
        rk = -1                 # the open run: kind (-1: none), guest start, length, host start
        rpos = rn = rhost = 0
        end = offset + length
        pos = offset
        while pos < end:
            l1i = pos // span
            stop = min(end, (l1i + 1) * span)
            tbl, _ = self._l2_of(l1i)
            if tbl is None:
                if rk == K_UNALLOC:
                    rn += stop - pos
                else:
                    if rk >= 0:
                        out.append(_Segment(rpos, rn, rk, rhost))
                    rk, rpos, rn, rhost = K_UNALLOC, pos, stop - pos, 0
                pos = stop
                continue
            i = (pos >> cb) % nl2
            raw = memoryview(tbl).cast("B")
            while pos < stop:
                e = tbl[i]
                i += 1
                inner = pos & cmask
                n = cs - inner
                if pos + n > stop:
                    n = stop - pos
                if not e:
                    kind = K_UNALLOC
                    host = 0
                    # a stretch of unallocated entries: 64, then 8 at a time, not one by one
                    more = (stop - pos - n) // cs
                    for k, zk in _SKIPS:
                        while more >= k and raw[8 * i:8 * (i + k)] == zk:
                            i += k
                            n += k * cs
                            more -= k
                elif e & f_comp:
                    if data_file:
                        raise self._corrupt("compressed cluster in an image with an external "
                                            "data file", offset=pos)
                    if rk >= 0:
                        out.append(_Segment(rpos, rn, rk, rhost))
                    out.append(_Segment(pos, n, K_COMP, e))
                    rk = -1
                    pos += n
                    continue
                else:
                    host = e & L2E_MASK
                    if host & cmask:
                        ci = pos >> cb
                        raise self._corrupt("cluster offset not cluster aligned", offset=host,
                                            field=f"L2 entry of guest offset {ci * cs:#x}",
                                            expected=f"a multiple of {cs}", found=hex(host))
                    if e & f_zero:
                        kind = K_ZERO
                        host = 0
                    elif host or (data_file and e & f_copied):
                        kind = K_DATA
                        host += inner
                    else:
                        kind = K_UNALLOC
                if kind == rk and (kind != K_DATA or rhost + rn == host):
                    rn += n
                else:
                    if rk >= 0:
                        out.append(_Segment(rpos, rn, rk, rhost))
                    rk, rpos, rn, rhost = kind, pos, n, host
                pos += n
        if rk >= 0:
            out.append(_Segment(rpos, rn, rk, rhost))
        return out

    def _segments_ext(self, offset: int, length: int) -> list[_Segment]:
        """_segments for images with extended L2 entries (subcluster bitmaps)."""
        cs, cb = self.cs, self.cb
        out: list[_Segment] = []

        def add(pos, n, kind, host):
            if out:
                last = out[-1]
                if last.kind == kind and last.pos + last.n == pos and (
                        kind in (K_UNALLOC, K_ZERO) or
                        (kind == K_DATA and last.host + last.n == host)):
                    last.n += n
                    return
            out.append(_Segment(pos, n, kind, host))

        end = offset + length
        pos = offset
        span = cs * self.l2_entries
        data_file = self.incompat & L.INCOMPAT_DATA_FILE
        while pos < end:
            l1i = pos // span
            stop = min(end, (l1i + 1) * span)
            tbl, _ = self._l2_of(l1i)
            if tbl is None:
                add(pos, stop - pos, K_UNALLOC, 0)
                pos = stop
                continue
            while pos < stop:
                ci = pos >> cb
                inner = pos & (cs - 1)
                n = min(cs - inner, stop - pos)
                l2i = ci % self.l2_entries
                if self.extended_l2:
                    e, bm = tbl[2 * l2i], tbl[2 * l2i + 1]
                else:
                    e, bm = tbl[l2i], 0
                if e & L.OFLAG_COMPRESSED:
                    if data_file:
                        raise self._corrupt("compressed cluster in an image with an external "
                                            "data file", offset=pos)
                    out.append(_Segment(pos, n, K_COMP, e))
                    pos += n
                    continue
                host = e & L2E_MASK
                if host % cs:
                    raise self._corrupt("cluster offset not cluster aligned", offset=host,
                                        field=f"L2 entry of guest offset {ci * cs:#x}",
                                        expected=f"a multiple of {cs}", found=hex(host))
                if not self.extended_l2:
                    if e & L.OFLAG_ZERO:
                        add(pos, n, K_ZERO, 0)
                    elif host or (data_file and e & L.OFLAG_COPIED):
                        add(pos, n, K_DATA, host + inner)
                    else:
                        add(pos, n, K_UNALLOC, 0)
                    pos += n
                    continue
                alloc, zero = bm & 0xFFFFFFFF, bm >> 32
                if alloc & zero:
                    raise self._corrupt("subcluster both allocated and zero",
                                        field=f"L2 bitmap of guest offset {ci * cs:#x}",
                                        found=hex(bm))
                if alloc and not host and not (data_file and e & L.OFLAG_COPIED):
                    raise self._corrupt("allocated subclusters without a host cluster",
                                        field=f"L2 entry of guest offset {ci * cs:#x}",
                                        found=hex(e))
                scs = self.sc_size
                p = inner
                while p < inner + n:
                    k = p // scs
                    q = min((k + 1) * scs, inner + n)
                    if alloc >> k & 1:
                        add(ci * cs + p, q - p, K_DATA, host + p)
                    elif zero >> k & 1:
                        add(ci * cs + p, q - p, K_ZERO, 0)
                    else:
                        add(ci * cs + p, q - p, K_UNALLOC, 0)
                    p = q
                pos += n
        return out

    def _decompress_cluster(self, e: int, where: int) -> bytes:
        coff, csize = self._compressed_range(e)
        if coff >= self.fsize or coff + csize > self.fsize + 512:
            raise self._corrupt("compressed cluster lies past the end of the file", offset=coff,
                                field=f"compressed L2 entry of guest offset {where:#x}",
                                expected=f"data inside the file ({self.fsize} bytes)",
                                found=f"{csize} bytes at {coff:#x}")
        raw = self.f.pread(coff, min(csize, self.fsize - coff))
        try:
            if self.compression_type == 1:
                out = _unzstd(raw, self.cs)
            else:
                out = _inflate(raw, self.cs)
        except _DecompressError as exc:
            raise self._corrupt(f"compressed cluster cannot be decompressed: {exc}", offset=coff,
                                field=f"compressed L2 entry of guest offset {where:#x}") from None
        if len(out) < self.cs:
            raise self._corrupt("compressed cluster is short", offset=coff,
                                expected=f"{self.cs} bytes", found=f"{len(out)} bytes")
        return out

    # ------------------------------------------------------------------ reading
    def block_status(self, offset, length):
        runs: list = []
        for s in self._segments(offset, length):
            st = _KIND_ALLOC[s.kind]
            if runs and runs[-1][2] == st:
                a, n, _ = runs[-1]
                runs[-1] = (a, n + s.n, st)
            else:
                runs.append((s.pos, s.n, st))
        return runs

    def _data_file(self) -> ImageFile:
        if self.incompat & L.INCOMPAT_DATA_FILE:
            if self.data_f is None:
                raise NotSupported(f"{self.location}: the external data file "
                                   f"{self.data_file_name!r} is not open (info-only open)")
            return self.data_f
        return self.f

    def _read_host(self, host: int, n: int, where: int) -> bytes:
        src = self._data_file()
        data = src.pread(host, n)
        if len(data) < n:
            if src is self.f:
                raise self._corrupt("data cluster lies past the end of the file", offset=host,
                                    field=f"L2 entry of guest offset {where:#x}",
                                    expected=f"{n} bytes", found=f"{len(data)} bytes")
            data += bytes(n - len(data))   # a raw data file shorter than the disk reads zeroes
        return data

    def read(self, offset, length):
        segs = self._segments(offset, length)
        if len(segs) == 1 and segs[0].kind == K_DATA:
            return self._read_host(segs[0].host, length, offset)    # one run: no copy
        buf = bytearray(length)
        mv = memoryview(buf)
        cs = self.cs
        fd = getattr(self.f, "fd", -1) if not self.incompat & L.INCOMPAT_DATA_FILE else -1
        for s in segs:
            a = s.pos - offset
            if s.kind == K_DATA:
                # straight into the buffer when the run lies inside the file, else through
                # _read_host (short reads, errors, external data files)
                if not _preadv_all(fd, mv[a:a + s.n], s.host, self.fsize):
                    mv[a:a + s.n] = self._read_host(s.host, s.n, s.pos)
            elif s.kind == K_COMP:
                out = self._decompress_cluster(s.host, s.pos)
                inner = s.pos & (cs - 1)
                mv[a:a + s.n] = out[inner:inner + s.n]
        return bytes(buf)

    # ------------------------------------------------------------------ refcounts
    def _load_rt(self) -> array:
        if self.rt is None:
            self.rt = _be_array(self.f.read_exact(self.rt_offset, self.rt_clusters * self.cs,
                                                  "refcount table"))
        return self.rt

    def _refblock(self, rti: int, create: bool) -> bytearray | None:
        blk = self._rb_cache.get(rti)
        if blk is not None:
            return blk
        rt = self._load_rt()
        off = rt[rti] & L.REFT_OFFSET_MASK if rti < len(rt) else 0
        if off:
            if off % self.cs or off + self.cs > max(self.fsize, self.next_cluster * self.cs):
                raise self._corrupt(f"refcount block {rti} offset invalid", offset=off,
                                    expected="cluster aligned inside the file", found=hex(off))
            blk = bytearray(self.f.read_exact(off, self.cs, "refcount block"))
            self._rb_cache[rti] = blk
            return blk
        if not create:
            return None
        return self._new_refblock(rti)

    def _rc_get_in(self, blk, idx: int) -> int:
        return _rc_get(blk, idx, self.refcount_bits)

    def _rc_set_in(self, blk, idx: int, value: int) -> tuple[int, int]:
        if value < 0 or value >> self.refcount_bits:
            raise CorruptImage(f"refcount {value} does not fit in {self.refcount_bits} bits",
                               path=self.location)
        return _rc_set(blk, idx, value, self.refcount_bits)

    def refcount(self, ci: int) -> int:
        rti, idx = divmod(ci, self.rb_entries)
        blk = self._refblock(rti, create=False)
        return 0 if blk is None else self._rc_get_in(blk, idx)

    def _set_refcount(self, ci: int, value: int) -> None:
        rti, idx = divmod(ci, self.rb_entries)
        blk = self._refblock(rti, create=True)
        b, n = self._rc_set_in(blk, idx, value)
        off = self.rt[rti] & L.REFT_OFFSET_MASK
        self.f.pwrite(off + b, blk[b:b + n])

    def _take(self, n: int, grow: bool = True) -> int:
        """Reserve ``n`` clusters at the end of the file (refcounts not touched); first index.
        ``grow=False``: the caller writes them whole at once, which extends the file."""
        ci = self.next_cluster
        self.next_cluster += n
        end = self.next_cluster * self.cs
        if end > self.fsize:
            if grow:
                self.f.truncate(end)
            self.fsize = end
        return ci

    def _new_refblock(self, rti: int) -> bytearray:
        rt = self._load_rt()
        if rti >= len(rt):
            self._grow_rt(rti)
            rt = self.rt
            if rt[rti]:
                # growing the table counted its own new clusters, which may have made this
                # very refcount block: use it (a second one would drop those refcounts)
                return self._refblock(rti, create=False)
        ci = self._take(1)
        blk = bytearray(self.cs)
        own = ci // self.rb_entries == rti
        if own:
            self._rc_set_in(blk, ci % self.rb_entries, 1)
        off = ci * self.cs
        self.f.pwrite(off, blk)
        rt[rti] = off
        self.f.pwrite(self.rt_offset + 8 * rti, _BIG.pack(off))
        self._rb_cache[rti] = blk
        if not own:
            self._set_refcount(ci, 1)
        return blk

    def _grow_rt(self, min_index: int) -> None:
        old = self._load_rt()
        old_off, old_clusters = self.rt_offset, self.rt_clusters
        per = self.cs // 8
        need = max(min_index + 1, (self.next_cluster + 8) // self.rb_entries + 4, len(old) * 2)
        entries = -(-need // per) * per
        nclu = entries // per
        if entries * 8 > L.MAX_REFTABLE_BYTES:
            raise NotSupported(f"{self.location}: the refcount table would exceed qemu's limit "
                               f"of {L.MAX_REFTABLE_BYTES >> 20} MiB")
        ci = self._take(nclu)
        new = array("Q", old)
        new.extend([0] * (entries - len(old)))
        self.rt = new
        self.rt_offset = ci * self.cs
        self.rt_clusters = nclu
        self.f.pwrite(self.rt_offset, _array_be_bytes(new))
        for c in range(ci, ci + nclu):
            self._set_refcount(c, 1)
        self.f.pwrite(self.rt_offset, _array_be_bytes(self.rt))
        self.f.sync()
        hdr = struct.pack(">QI", self.rt_offset, self.rt_clusters)
        self.header_raw[L.OFF_REFCOUNT_TABLE_OFFSET:L.OFF_REFCOUNT_TABLE_OFFSET + 12] = hdr
        self.f.pwrite(L.OFF_REFCOUNT_TABLE_OFFSET, hdr)
        for c in range(old_off // self.cs, old_off // self.cs + old_clusters):
            rc = self.refcount(c)
            if rc:
                self._set_refcount(c, rc - 1)

    def _alloc(self, n: int = 1, data=None) -> int:
        """Allocate ``n`` contiguous clusters at the end of the file; returns the byte offset.
        ``data`` (exactly ``n`` clusters) is written there before the refcounts are set (a crash
        in between leaves unreferenced space: nothing reads it, nothing leaks)."""
        first = self.next_cluster
        while True:
            ci = self._take(n, grow=data is None)
            if all(self.refcount(c) == 0 for c in range(ci, ci + n)):
                break
            if self.next_cluster - first > 65536:
                raise self._corrupt("refcounts claim clusters far past the end of the file; "
                                    "run a check with repair", offset=first * self.cs)
        if data is not None:
            self.f.pwrite(ci * self.cs, data)
        self._set_refcounts(ci, n, 1)
        return ci * self.cs

    def _set_refcounts(self, ci: int, n: int, value: int) -> None:
        """Set the refcounts of clusters [ci, ci+n): one write per refcount block touched."""
        end = ci + n
        while ci < end:
            rti, idx = divmod(ci, self.rb_entries)
            k = min(end - ci, self.rb_entries - idx)
            blk = self._refblock(rti, create=True)
            lo, hi = None, 0
            for i in range(idx, idx + k):
                b, m = self._rc_set_in(blk, i, value)
                lo = b if lo is None else min(lo, b)
                hi = max(hi, b + m)
            off = self.rt[rti] & L.REFT_OFFSET_MASK
            self.f.pwrite(off + lo, blk[lo:hi])
            ci += k

    def _unref(self, off: int, length: int, punch: bool = True) -> None:
        first = off // self.cs
        last = (off + length - 1) // self.cs
        for c in range(first, last + 1):
            rc = self.refcount(c)
            if rc:
                self._set_refcount(c, rc - 1)
                if rc == 1 and punch:
                    self.f.punch_hole(c * self.cs, self.cs)

    def _unref_entry(self, e: int) -> None:
        """Drop the host references of an L2 entry being replaced."""
        if e & L.OFLAG_COMPRESSED:
            coff, csize = self._compressed_range(e)
            self._unref(coff & ~511, csize + (coff & 511), punch=False)
        elif e & L2E_MASK and not self.incompat & L.INCOMPAT_DATA_FILE:
            self._unref(e & L2E_MASK, self.cs)

    # ------------------------------------------------------------------ writing
    def _prepare_write(self) -> None:
        if self.data_f is not None or self.incompat & L.INCOMPAT_DATA_FILE:
            raise NotSupported(f"{self.location}: writing qcow2 images with an external data "
                               "file is not supported; open read-only")
        self._load_rt()
        header_changed = False
        if self.incompat & L.INCOMPAT_DIRTY and not self.incompat & L.INCOMPAT_CORRUPT:
            # lazy refcounts left dirty: rebuild the refcounts before anything else (the check
            # clears the dirty bit when the image is consistent afterwards)
            report = self.check(repair=True)
            if report.corrupt or report.leaks:
                raise self._corrupt("the image was left dirty and its metadata could not be "
                                    "made consistent; run a check with repair")
        if header_changed:
            self._write_feature_bits()

    def _before_first_write(self) -> None:
        """Before the first change: clear the autoclear bits we do not maintain. Persistent dirty
        bitmaps (autoclear bit 0) are kept and updated on every write when they are well formed;
        otherwise they are removed cleanly (extension dropped, clusters freed: no leaks)."""
        self._first_write_done = True
        self._tracked: list[dict] = []
        if self.version < 3:
            return
        if self.bitmaps_ext and self.autoclear & L.AUTOCLEAR_BITMAPS:
            tracked = self._maintainable_bitmaps()
            if tracked is not None:
                self._tracked = tracked
                keep = L.AUTOCLEAR_DATA_FILE_RAW | L.AUTOCLEAR_BITMAPS
                if self.autoclear & ~keep:
                    self.autoclear &= keep
                    self._write_feature_bits()
                return
        if self.autoclear & ~L.AUTOCLEAR_DATA_FILE_RAW:
            self._drop_bitmaps()

    def _drop_bitmaps(self) -> None:
        ranges: list = []
        if self.bitmaps_ext and self.autoclear & L.AUTOCLEAR_BITMAPS:
            def collect(off, length, what):
                ranges.append((off, length))
                return True
            self._count_bitmaps(collect, [])
        self._tracked = []
        self.autoclear &= L.AUTOCLEAR_DATA_FILE_RAW
        struct.pack_into(">Q", self.header_raw, L.OFF_AUTOCLEAR, self.autoclear)
        if any(t == L.EXT_BITMAPS for t, _ in self.extensions) and ranges:
            self.extensions = [(t, d) for t, d in self.extensions if t != L.EXT_BITMAPS]
            self._write_header_area(self.backing_file, self.backing_format)
            self.bitmaps_ext = None
            for off, length in ranges:
                self._unref(off, length)
        else:
            self._write_feature_bits()

    def _maintainable_bitmaps(self) -> list[dict] | None:
        """The enabled ('auto') bitmaps to update on writes, or None when some bitmap cannot be
        kept consistent (unknown type/flags, foreign extra data, wrong table size...)."""
        ext = self.bitmaps_ext
        cs = self.cs
        d_off, d_size = ext["bitmap_directory_offset"], ext["bitmap_directory_size"]
        if d_size > (64 << 20) or d_off % cs or d_off + d_size > self.fsize:
            return None
        data = self.f.pread(d_off, d_size)
        pos = 0
        tracked = []
        for _ in range(ext["nb_bitmaps"]):
            if pos + 24 > len(data):
                return None
            b = L.BitmapDirEntry.parse(data[pos:pos + 24])
            pos += (24 + b.extra_data_size + b.name_size + 7) & ~7
            if b.type != 1 or b.flags & ~7 or b.granularity_bits > 63:
                return None
            if b.extra_data_size and not b.flags & 4:
                return None                  # foreign extra data: the bitmap must not be used
            if b.flags & 1 or not b.flags & 2:
                continue                     # in use (inconsistent) or disabled: left as is
            bits = -(-self.size // (1 << b.granularity_bits))
            entries = -(-(-(-bits // 8)) // cs)
            if b.bitmap_table_size != entries or b.bitmap_table_offset % cs or \
                    b.bitmap_table_offset + 8 * entries > self.fsize:
                return None
            tbl = _be_array(self.f.read_exact(b.bitmap_table_offset, 8 * entries, "bitmap table"))
            for e in tbl:
                if e & ~(L2E_MASK | 1) or (e & L2E_MASK and (e & 1 or (e & L2E_MASK) % cs)):
                    return None
            tracked.append({"g": b.granularity_bits, "table_offset": b.bitmap_table_offset,
                            "table": tbl})
        return tracked

    def _mark_dirty(self, offset: int, length: int) -> None:
        """Set the bits of [offset, offset+length) in every enabled persistent bitmap (before
        the data is written, so that a crash leaves a superset of the changes)."""
        if not self._tracked or length <= 0:
            return
        cs = self.cs
        per = cs * 8
        for bm in self._tracked:
            first = offset >> bm["g"]
            last = (offset + length - 1) >> bm["g"]
            tbl = bm["table"]
            t = first // per
            while t <= last // per:
                lo = max(first, t * per) - t * per
                hi = min(last, (t + 1) * per - 1) - t * per
                e = tbl[t]
                host = e & L2E_MASK
                if host or not e & 1:
                    if host:
                        b0, b1 = lo >> 3, hi >> 3
                        buf = bytearray(self.f.read_exact(host + b0, b1 - b0 + 1, "bitmap data"))
                    else:
                        b0, b1 = 0, cs - 1
                        buf = bytearray(cs)
                    _set_bit_range(buf, b0, lo, hi)
                    if host:
                        self.f.pwrite(host + b0, buf)
                    else:
                        new = self._alloc(1)
                        self.f.pwrite(new, buf)
                        tbl[t] = new
                        self.f.pwrite(bm["table_offset"] + 8 * t, _BIG.pack(new))
                t += 1

    def _write_feature_bits(self) -> None:
        if self.version < 3:
            return
        struct.pack_into(">Q", self.header_raw, L.OFF_INCOMPATIBLE, self.incompat)
        struct.pack_into(">Q", self.header_raw, L.OFF_AUTOCLEAR, self.autoclear)
        self.f.sync()
        self.f.pwrite(L.OFF_INCOMPATIBLE, self.header_raw[L.OFF_INCOMPATIBLE:L.OFF_INCOMPATIBLE + 24])

    def _check_write(self) -> None:
        self._require_writable()
        if self.write_blocked:
            raise ReadOnlyImage(f"{self.location}: {self.write_blocked}")
        if not self._first_write_done:
            self._before_first_write()

    _xlinks_checked = False

    def _check_cross_links(self) -> None:
        """Once, before the first data write: count every reference to every cluster (all L1/L2
        tables, snapshots, bitmaps, refcount structures, as check does). A cluster referenced
        more often than its refcount says is cross-linked: a write in place (refcount 1) would
        change what the other reference reads. Clusters shared with a snapshot carry refcount
        2 or more and are copied on write, as in qemu: not a cross-link."""
        if self._xlinks_checked:
            self._refuse_cross_linked()
            return
        self._xlinks_checked = True
        if self.incompat & L.INCOMPAT_DATA_FILE:
            return
        counts, _ = self._count_refs([])
        rt = self._load_rt()
        for e in rt:
            off = e & L.REFT_OFFSET_MASK
            if off and not off % self.cs and off // self.cs < len(counts):
                counts[off // self.cs] += 1
        if max(counts, default=0) > 1:
            for c, n in enumerate(counts):
                if n > 1 and n > self.refcount(c):
                    self.write_refusal = (f"cluster {c} (offset {c * self.cs:#x}) is referenced "
                                          f"{n} times but its refcount is {self.refcount(c)}")
                    break
        self._refuse_cross_linked()

    def _l2_for_write(self, l1i: int) -> tuple[array, int]:
        """The L2 table of L1 index ``l1i``, allocated or copied so that it can be modified."""
        l1e = self.l1[l1i]
        old = l1e & L.L1E_OFFSET_MASK
        if old:
            tbl = self._load_l2(old, f"L1 index {l1i}")
            if self.refcount(old // self.cs) == 1:
                if not l1e & L.OFLAG_COPIED:
                    self._set_l1(l1i, old | L.OFLAG_COPIED)
                return tbl, old
            content = _array_be_bytes(tbl)
            tbl = array("Q", tbl)
        else:
            content = None
            tbl = array("Q", bytes(self.cs))
        new = self._alloc(1)
        self.f.pwrite(new, content if content is not None else zeroes(self.cs))
        self._l2_cache[new] = tbl
        self._l2_cache_bytes += self.cs
        self._set_l1(l1i, new | L.OFLAG_COPIED)
        if old:
            self._unref(old, self.cs, punch=False)
        return tbl, new

    def _set_l1(self, l1i: int, value: int) -> None:
        self.l1[l1i] = value
        self.f.pwrite(self.l1_offset + 8 * l1i, _BIG.pack(value))

    def _set_l2(self, tbl: array, l2off: int, l2i: int, e: int, bm: int = 0) -> None:
        if self.extended_l2:
            tbl[2 * l2i] = e
            tbl[2 * l2i + 1] = bm
            self.f.pwrite(l2off + 16 * l2i, struct.pack(">QQ", e, bm))
        else:
            tbl[l2i] = e
            self.f.pwrite(l2off + 8 * l2i, _BIG.pack(e))

    def _cluster_len(self, ci: int) -> int:
        return min(self.cs, self.size - ci * self.cs)

    def _own_view(self, start: int, n: int, fill) -> bytearray:
        """This image's content of [start, start+n), unallocated parts from ``fill``."""
        buf = bytearray(n)
        mv = memoryview(buf)
        for s in self._segments(start, n):
            a = s.pos - start
            if s.kind == K_DATA:
                mv[a:a + s.n] = self._read_host(s.host, s.n, s.pos)
            elif s.kind == K_COMP:
                inner = s.pos & (self.cs - 1)
                mv[a:a + s.n] = self._decompress_cluster(s.host, s.pos)[inner:inner + s.n]
            elif s.kind == K_UNALLOC and self.backing_file is not None:
                got = fill(s.pos, s.n)
                mv[a:a + len(got)] = got
        return buf

    def write(self, offset, data, fill):
        self._check_write()
        self._check_cross_links()
        self._mark_dirty(offset, len(data))
        mv = memoryview(data)
        end = offset + len(data)
        pos = offset
        cs = self.cs
        batch = not self.extended_l2 and not self.compress_writes
        while pos < end:
            ci = pos // cs
            inner = pos - ci * cs
            if batch and not inner and end - pos >= 2 * cs:
                k = self._write_new_run(ci, mv[pos - offset:], (end - pos) // cs)
                if k:
                    pos += k * cs
                    continue
            n = min(cs - inner, end - pos)
            self._write_cluster(ci, inner, mv[pos - offset:pos - offset + n], fill)
            pos += n

    def _write_new_run(self, ci: int, mv, most: int) -> int:
        """Whole clusters ci, ci+1, ... that this image does not hold yet and that are not all
        zero, within one L2 table: allocated together, written with one write each for the
        data, the refcounts and the L2 entries (in that order, so a crash only leaks). Returns
        how many clusters were written (0: none qualify, the caller goes cluster by cluster)."""
        cs = self.cs
        l1i, l2i = divmod(ci, self.l2_entries)
        most = min(most, self.l2_entries - l2i, (self.size - ci * cs) // cs)
        tbl, _ = self._l2_of(l1i)
        k = 0
        while k < most:
            if tbl is not None and tbl[l2i + k] & (L2E_MASK | L.OFLAG_COMPRESSED):
                break
            if is_zero(mv[k * cs:(k + 1) * cs]):
                break
            k += 1
        if k < 2:
            return 0
        tbl, l2off = self._l2_for_write(l1i)
        new = self._alloc(k, mv[:k * cs])
        for i in range(k):
            tbl[l2i + i] = (new + i * cs) | L.OFLAG_COPIED
        self.f.pwrite(l2off + 8 * l2i, _array_be_bytes(tbl[l2i:l2i + k]))
        return k

    def _write_cluster(self, ci: int, inner: int, chunk, fill) -> None:
        cs = self.cs
        clen = self._cluster_len(ci)
        l1i, l2i = divmod(ci, self.l2_entries)
        e, bm = self._entry(ci)
        host = e & L2E_MASK
        compressed = bool(e & L.OFLAG_COMPRESSED)
        zero_flag = bool(e & L.OFLAG_ZERO) and not self.extended_l2 and not compressed
        full = inner == 0 and len(chunk) >= clen
        allzero = is_zero(chunk)
        has_backing = self.backing_file is not None
        if allzero and not self.honor_zeroes:
            if not compressed:
                if self.extended_l2:
                    if not bm & 0xFFFFFFFF and (not has_backing or bm >> 32 == 0xFFFFFFFF):
                        return
                elif zero_flag or (not host and not has_backing):
                    return
            if full and self.version >= 3 and (has_backing or host or compressed):
                tbl, l2off = self._l2_for_write(l1i)
                if self.extended_l2:
                    self._set_l2(tbl, l2off, l2i, 0, 0xFFFFFFFF << 32)
                else:
                    self._set_l2(tbl, l2off, l2i, L.OFLAG_ZERO)
                if compressed or host:
                    self._unref_entry(e)
                return
        tbl, l2off = self._l2_for_write(l1i)
        e, bm = (tbl[2 * l2i], tbl[2 * l2i + 1]) if self.extended_l2 else (tbl[l2i], 0)
        host = e & L2E_MASK
        compressed = bool(e & L.OFLAG_COMPRESSED)
        own = host and not compressed and self.refcount(host // cs) == 1
        if self.extended_l2 and not compressed:
            if own:
                self._write_subclusters(tbl, l2off, l2i, ci, host, e, bm, inner, chunk, fill)
                return
            if not host or not (bm & 0xFFFFFFFF):
                new = self._alloc(1)
                self._write_subclusters(tbl, l2off, l2i, ci, new, 0, bm & ~0xFFFFFFFF, inner,
                                        chunk, fill)
                if host:
                    self._unref(host, cs, punch=False)
                return
        if own and not self.extended_l2:
            if e & L.OFLAG_ZERO:      # preallocated zero cluster: materialise in place
                content = bytearray(cs)
                content[inner:inner + len(chunk)] = chunk
                self.f.pwrite(host, content)
            else:
                self.f.pwrite(host + inner, chunk)
            if e != host | L.OFLAG_COPIED:
                self._set_l2(tbl, l2off, l2i, host | L.OFLAG_COPIED)
            return
        # a new cluster: copy of this image's view (compressed, shared, zero or from below)
        if full:
            content = bytearray(chunk[:clen])
        else:
            content = self._own_view(ci * cs, clen, fill)
            content[inner:inner + len(chunk)] = chunk
        if len(content) < cs:
            content += bytes(cs - len(content))
        if self.compress_writes and full and not self.extended_l2 and \
                self._write_compressed(tbl, l2off, l2i, content):
            if compressed or host:
                self._unref_entry(e)
            return
        new = self._alloc(1)
        self.f.pwrite(new, content)
        if self.extended_l2:
            self._set_l2(tbl, l2off, l2i, new | L.OFLAG_COPIED, 0xFFFFFFFF)
        else:
            self._set_l2(tbl, l2off, l2i, new | L.OFLAG_COPIED)
        if compressed or host:
            self._unref_entry(e)

    def _write_compressed(self, tbl, l2off, l2i, content) -> bool:
        """Store one whole cluster compressed (as ``qemu-img convert -c`` does): deflate (or
        zstd) data packed byte-wise after the previous compressed cluster; every host cluster it
        touches gets one more reference. False when it would not save space."""
        cs = self.cs
        try:
            if self.compression_type == 1:
                import zstandard
                out = zstandard.ZstdCompressor().compress(bytes(content))
            else:
                c = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -12)
                out = c.compress(bytes(content)) + c.flush()
        except ImportError:
            return False
        need = len(out)
        if need > cs - 1:                       # as qemu: only when it saves at least a byte
            return False
        maxrc = (1 << self.refcount_bits) - 1
        pos = self._cfree
        if pos is not None:
            cur = pos // cs
            fits = pos % cs and cur == self.next_cluster - 1 and self.refcount(cur) < maxrc
            if not fits:
                pos = None
        x = 62 - (self.cb - 8)
        if (self.next_cluster + 2) * cs + need >> x:
            return False                        # beyond the reach of a compressed descriptor
        if pos is not None:
            spill = (pos + need - 1) // cs - pos // cs
            if spill:
                got = self._alloc(spill)        # the clusters right after the current one
                if got != (pos // cs + 1) * cs:
                    for c in range(got // cs, got // cs + spill):
                        self._set_refcount(c, 0)
                    pos = None
        if pos is not None:
            coff = pos
            self._set_refcount(pos // cs, self.refcount(pos // cs) + 1)
        else:
            coff = self._alloc(-(-need // cs))
        nsec = ((coff + need - 1) >> 9) - (coff >> 9)
        self.f.pwrite(coff, out)
        self._cfree = coff + need
        self._set_l2(tbl, l2off, l2i, L.OFLAG_COMPRESSED | (nsec << x) | coff)
        return True

    def _write_subclusters(self, tbl, l2off, l2i, ci, host, e, bm, inner, chunk, fill) -> None:
        cs, scs = self.cs, self.sc_size
        clen = self._cluster_len(ci)
        s0 = inner // scs
        s1 = (inner + len(chunk) - 1) // scs
        lo = s0 * scs
        hi = min((s1 + 1) * scs, clen)
        alloc, zero = bm & 0xFFFFFFFF, bm >> 32
        buf = bytearray(hi - lo)
        has_backing = self.backing_file is not None
        for k in (s0, s1):
            kb = k * scs
            kn = min(scs, clen - kb)
            if kn <= 0 or (inner <= kb and inner + len(chunk) >= kb + kn):
                continue     # fully overwritten
            if alloc >> k & 1:
                part = self._read_host(host + kb, kn, ci * cs + kb)
            elif zero >> k & 1 or not has_backing:
                continue
            else:
                part = fill(ci * cs + kb, kn)
            buf[kb - lo:kb - lo + len(part)] = part
        buf[inner - lo:inner - lo + len(chunk)] = chunk
        self.f.pwrite(host + lo, buf)
        mask = _subcluster_mask(s0, s1)
        alloc |= mask
        zero &= ~mask
        self._set_l2(tbl, l2off, l2i, host | L.OFLAG_COPIED, (zero << 32) | alloc)

    def flush(self):
        if not self.read_only:
            self.f.sync()

    def close(self):
        try:
            if self.f.fd >= 0 and not self.read_only:
                self.f.sync()           # a failed fsync is an error, never ignored
        finally:
            self.f.close()
            if self.data_f is not None:
                self.data_f.close()

    # ------------------------------------------------------------------ discard
    def discard(self, offset, length, fill=None):
        self._check_write()
        self._check_cross_links()
        self._mark_dirty(offset, length)
        cs = self.cs
        end = offset + length
        pos = offset
        has_backing = self.backing_file is not None
        while pos < end:
            ci = pos // cs
            inner = pos - ci * cs
            clen = self._cluster_len(ci)
            n = min(clen - inner, end - pos)
            e, bm = self._entry(ci)
            unalloc = not e and not bm
            if inner == 0 and n == clen:
                if unalloc and not has_backing:
                    pos += n
                    continue
                if has_backing and self.version < 3:
                    self._write_cluster(ci, 0, zeroes(clen), lambda o, k: zeroes(k))
                    pos += n
                    continue
                tbl, l2off = self._l2_for_write(ci // self.l2_entries)
                l2i = ci % self.l2_entries
                e, bm = (tbl[2 * l2i], tbl[2 * l2i + 1]) if self.extended_l2 else (tbl[l2i], 0)
                if has_backing:
                    ne, nbm = (0, 0xFFFFFFFF << 32) if self.extended_l2 else (L.OFLAG_ZERO, 0)
                else:
                    ne, nbm = 0, 0
                self._set_l2(tbl, l2off, l2i, ne, nbm)
                if e & L.OFLAG_COMPRESSED or e & L2E_MASK:
                    self._unref_entry(e)
            else:
                sc = self.sc_size
                aligned = pos % sc == 0 and (n % sc == 0 or pos + n == self.size)
                segs = self._segments(pos, n)
                if self.extended_l2 and aligned and not e & L.OFLAG_COMPRESSED:
                    if any(sg.kind != K_UNALLOC for sg in segs) or has_backing:
                        self._zero_subclusters(ci, inner, n, has_backing)
                elif has_backing and any(sg.kind == K_UNALLOC for sg in segs):
                    raise InvalidArgument(
                        f"{self.location}: discard of {n} bytes at {pos:#x} covers part of a "
                        f"cluster inherited from the backing file; discard whole clusters "
                        f"({cs} bytes) instead")
                elif any(sg.kind in (K_DATA, K_COMP) for sg in segs):
                    self._write_cluster(ci, inner, zeroes(n), lambda o, k: zeroes(k))
            pos += n

    def _zero_subclusters(self, ci: int, inner: int, n: int, zero: bool = True) -> None:
        tbl, l2off = self._l2_for_write(ci // self.l2_entries)
        l2i = ci % self.l2_entries
        e, bm = tbl[2 * l2i], tbl[2 * l2i + 1]
        if e & L.OFLAG_COMPRESSED:
            return
        mask = _subcluster_mask(inner // self.sc_size, (inner + n - 1) // self.sc_size)
        alloc, zbits = bm & 0xFFFFFFFF, bm >> 32
        zbits = (zbits | mask) if zero else (zbits & ~mask)
        self._set_l2(tbl, l2off, l2i, e, (zbits << 32) | (alloc & ~mask))

    # ------------------------------------------------------------------ compact
    def compact(self, progress=None, parent_read=None):
        """Drop clusters that read as zeroes (no backing file) or as the parent reads
        (``parent_read``), then move clusters from the end of the file into the holes and
        truncate. Clusters shared with internal snapshots are left alone."""
        self._check_write()
        cs = self.cs
        nclu = -(-self.size // cs)
        prog = Progress(progress, nclu * 2)
        prog.start()
        has_backing = self.backing_file is not None
        below = parent_read if has_backing else None
        # only clusters under an L2 table can hold anything: the walk follows the metadata
        # present, not the virtual size (an almost empty 1 TiB image walked 16 M entries)
        l2n = self.l2_entries
        present = [i for i, l1e in enumerate(self.l1) if l1e & L.L1E_OFFSET_MASK]
        for ci in (c for i in present for c in range(i * l2n, min((i + 1) * l2n, nclu))):
            prog.set(ci)
            e, bm = self._entry(ci)
            if not e and not bm:
                continue
            compressed = bool(e & L.OFLAG_COMPRESSED)
            host = 0 if compressed else e & L2E_MASK
            if host and self.refcount(host // cs) != 1:
                continue
            clen = self._cluster_len(ci)
            start = ci * cs
            if has_backing and below is None:
                # without the parent's content only explicit zeroes can be simplified
                if compressed or not is_zero(self._own_view(start, clen, lambda o, n: zeroes(n))):
                    continue
                if self.version < 3 or (self.extended_l2 and bm & 0xFFFFFFFF != 0xFFFFFFFF):
                    continue
                if not host and not compressed:
                    continue        # already a zero cluster without host space
                self._replace_entry(ci, e, 0 if self.extended_l2 else L.OFLAG_ZERO,
                                    0xFFFFFFFF << 32 if self.extended_l2 else 0)
                continue
            view = self._own_view(start, clen, below or (lambda o, n: zeroes(n)))
            if below is not None:
                under = below(start, clen)
                if bytes(view) == bytes(under) + bytes(clen - len(under)):
                    self._replace_entry(ci, e, 0, 0)
                elif is_zero(view) and self.version >= 3 and (host or compressed):
                    self._replace_entry(ci, e, 0 if self.extended_l2 else L.OFLAG_ZERO,
                                        0xFFFFFFFF << 32 if self.extended_l2 else 0)
            elif is_zero(view):
                self._replace_entry(ci, e, 0, 0)
        if not self.nb_snapshots and not self.bitmaps_ext:
            self._close_holes(prog, nclu)
        self.f.sync()
        prog.finish()

    def _replace_entry(self, ci: int, old: int, e: int, bm: int) -> None:
        tbl, l2off = self._l2_for_write(ci // self.l2_entries)
        self._set_l2(tbl, l2off, ci % self.l2_entries, e, bm)
        if old & L.OFLAG_COMPRESSED or old & L2E_MASK:
            self._unref_entry(old)

    def _close_holes(self, prog: Progress, base: int) -> None:
        cs = self.cs
        self.fsize = self.f.size()
        end = -(-self.fsize // cs)
        # who refers to each movable cluster: data clusters and L2 tables with refcount 1, host
        # clusters holding compressed clusters that lie entirely inside them
        owner: dict[int, tuple] = {}
        comp: dict[int, list] = {}
        pinned: set[int] = set()
        for i, l1e in enumerate(self.l1):
            off = l1e & L.L1E_OFFSET_MASK
            if not off or self.refcount(off // cs) != 1:
                continue
            owner[off // cs] = ("l1", i)
            tbl = self._load_l2(off, f"L1 index {i}")
            step = 2 if self.extended_l2 else 1
            for j in range(self.l2_entries):
                e = tbl[j * step]
                if e & L.OFLAG_COMPRESSED:
                    coff, csize = self._compressed_range(e)
                    h = coff // cs
                    if (coff + csize - 1) // cs != h:
                        pinned.add(h)
                        pinned.add((coff + csize - 1) // cs)
                    else:
                        comp.setdefault(h, []).append((off, j))
                    continue
                host = e & L2E_MASK
                if host and self.refcount(host // cs) == 1:
                    owner[host // cs] = ("l2", off, j)
        for h, refs in comp.items():
            if h not in pinned and h not in owner and self.refcount(h) == len(refs):
                owner[h] = ("comp", refs)
        free = [c for c in range(1, end) if self.refcount(c) == 0 and
                self._refblock(c // self.rb_entries, create=False) is not None]
        fi = 0
        c = end - 1
        while c > 0 and fi < len(free) and free[fi] < c:
            if self.refcount(c) == 0:
                c -= 1
                continue
            who = owner.get(c)
            if who is None:               # immovable (metadata, shared, compressed): skip it
                c -= 1
                continue
            dst = free[fi]
            fi += 1
            data = self.f.pread(c * cs, cs)
            self._set_refcount(dst, self.refcount(c))
            self.f.pwrite(dst * cs, data)
            if who[0] == "comp":
                for l2off, j in who[1]:
                    tbl = self._load_l2(l2off, "compact")
                    k = 2 * j if self.extended_l2 else j
                    e = tbl[k]
                    x = 62 - (self.cb - 8)
                    coff = e & ((1 << x) - 1)
                    ne = (e & ~((1 << x) - 1)) | (dst * cs + coff - c * cs)
                    self._set_l2(tbl, l2off, j, ne, tbl[k + 1] if self.extended_l2 else 0)
            elif who[0] == "l1":
                tbl = self._l2_cache.pop(c * cs, None)
                if tbl is not None:
                    self._l2_cache[dst * cs] = tbl
                self._set_l1(who[1], dst * cs | L.OFLAG_COPIED)
                for k, v in list(owner.items()):
                    if v[0] == "l2" and v[1] == c * cs:
                        owner[k] = ("l2", dst * cs, v[2])
                    elif v[0] == "comp":
                        owner[k] = ("comp", [(dst * cs if o == c * cs else o, j)
                                             for o, j in v[1]])
            else:
                _, l2off, j = who
                tbl = self._load_l2(l2off, "compact")
                if self.extended_l2:
                    e, bm = tbl[2 * j], tbl[2 * j + 1]
                else:
                    e, bm = tbl[j], 0
                self._set_l2(tbl, l2off, j, (e & ~L2E_MASK) | dst * cs, bm)
            self._set_refcount(c, 0)
            c -= 1
            prog.set(base + (end - c) * base // max(end, 1))
        last = self._cut_free_tail(end)
        for c in range(1, last):
            if self.refcount(c) == 0:
                self.f.punch_hole(c * cs, cs)

    # ------------------------------------------------------------------ resize
    def resizes_in_place(self, new_size):
        # growing: a new L1 table is written to new clusters and named in the header before
        # the size is (a larger L1 is valid); the old one is freed last (a crash only leaks)
        return new_size > self.size and not getattr(self, "_tracked", None) and not self.bitmaps_ext

    def resize(self, new_size, progress=None):
        self._check_write()
        if self._tracked or (self.bitmaps_ext and self.autoclear & L.AUTOCLEAR_BITMAPS):
            self._drop_bitmaps()             # bitmaps describe the old size: remove them cleanly
        if new_size % 512:
            raise InvalidArgument(f"{self.location}: new size must be a multiple of 512, found {new_size}")
        if new_size < self.size:
            self._shrink(new_size)
            if progress:
                progress(1, 1)
            return
        span = self.cs * self.l2_entries
        need = -(-new_size // span)
        if need * 8 > L.MAX_L1_BYTES or new_size > self.max_size:
            raise too_large("QCOW2", new_size, self.max_size, self.location,
                            _limit_reason(self.cs))
        if need > len(self.l1):
            old_off, old_n = self.l1_offset, len(self.l1)
            nclu = -(-need * 8 // self.cs)
            new_off = self._alloc(nclu)
            l1 = array("Q", self.l1)
            l1.extend([0] * (need - len(l1)))
            raw = _array_be_bytes(l1)
            self.f.pwrite(new_off, raw + bytes(nclu * self.cs - len(raw)))
            self.f.sync()
            hdr = struct.pack(">IQ", need, new_off)
            self.header_raw[L.OFF_L1_SIZE:L.OFF_L1_SIZE + 12] = hdr
            self.f.pwrite(L.OFF_L1_SIZE, hdr)
            self.l1, self.l1_offset = l1, new_off
            if old_n:
                self._unref(old_off, old_n * 8, punch=False)
        self.f.sync()
        struct.pack_into(">Q", self.header_raw, L.OFF_SIZE, new_size)
        self.f.pwrite(L.OFF_SIZE, self.header_raw[L.OFF_SIZE:L.OFF_SIZE + 8])
        self.size = new_size
        self.f.sync()
        if progress:
            progress(1, 1)

    def _shrink(self, new_size: int) -> None:
        """Cut the virtual size (refused when this image holds data past ``new_size``; the
        operation has checked the whole chain): the L2 entries of clusters wholly past the end
        are cleared and their clusters freed, L2 tables wholly past the end are dropped, then the
        size is written and free clusters at the end of the file are cut off. The L1 table keeps
        its length (a longer one is valid)."""
        if self.nb_snapshots:
            raise InvalidArgument(f"{self.location}: cannot shrink a qcow2 image with internal "
                                  "snapshots (they keep the old size); delete them first")
        self._refuse_cut_data(new_size)
        cs, per = self.cs, self.l2_entries
        w = 2 if self.extended_l2 else 1
        first = -(-new_size // cs)                  # first guest cluster wholly cut off
        old_n = -(-self.size // cs)
        keep_l1 = -(-new_size // (cs * per))        # L1 entries that still map something
        for l1i in range(first // per, min(len(self.l1), -(-old_n // per))):
            tbl, l2off = self._l2_of(l1i)
            if tbl is None:
                continue
            lo = max(first - l1i * per, 0)
            hi = min(old_n - l1i * per, per)
            gone = [tbl[w * j] for j in range(lo, hi) if tbl[w * j]]
            tbl[w * lo:w * hi] = array("Q", bytes(8 * w * (hi - lo)))
            if l1i >= keep_l1:                      # the whole table: unlink it, then free it
                self._set_l1(l1i, 0)
                if self._l2_cache.pop(l2off, None) is not None:
                    self._l2_cache_bytes -= cs
                self._unref(l2off, cs)
            else:
                self.f.pwrite(l2off + 8 * w * lo, _array_be_bytes(tbl[w * lo:w * hi]))
            for e in gone:
                self._unref_entry(e)
        self.f.sync()
        struct.pack_into(">Q", self.header_raw, L.OFF_SIZE, new_size)
        self.f.pwrite(L.OFF_SIZE, self.header_raw[L.OFF_SIZE:L.OFF_SIZE + 8])
        self.size = new_size
        self.f.sync()
        self._cut_free_tail(max(self.next_cluster, -(-self.fsize // cs)))

    def _cut_free_tail(self, end: int) -> int:
        """Truncate the file after its last cluster in use (of ``end`` clusters); returns the
        new number of clusters."""
        last = end
        while last > 1 and self.refcount(last - 1) == 0:
            last -= 1
        if last < end:
            self.f.truncate(last * self.cs)
            self.fsize = last * self.cs
            self.next_cluster = last
        return last

    # ------------------------------------------------------------------ relink
    def set_parent(self, parent):
        self._check_write()
        if parent is None:
            name, fmt = None, None
        else:
            name = relative_name(self.location, parent.location)
            fmt = parent.backend.qemu_format
        self._write_header_area(name, fmt)
        self.backing_file = name
        self.backing_format = fmt
        if name is None:
            self.parent_hint = None
            self.flags &= ~ImageFlags.DIFF
        else:
            self.parent_hint = ParentHint(locations=[name], format=parent.backend.name)
            self.flags |= ImageFlags.DIFF

    def _write_header_area(self, backing: str | None, fmt: str | None) -> None:
        exts = [(t, d) for t, d in self.extensions if t != L.EXT_BACKING_FORMAT]
        if fmt:
            exts.insert(0, (L.EXT_BACKING_FORMAT, fmt.encode()))
        area = bytearray(self.header_raw)
        for t, d in exts:
            area += L.HeaderExtension.build({"type": t, "length": len(d)})
            area += d + bytes(-len(d) % 8)
        area += bytes(8)     # end of the extension area
        name = backing.encode() if backing else b""
        if len(name) > L.MAX_BACKING_NAME:
            raise InvalidArgument(f"{self.location}: backing file name longer than "
                                  f"{L.MAX_BACKING_NAME} bytes: {backing!r}")
        bf_off = len(area) if name else 0
        area += name
        if len(area) > self.cs:
            raise InvalidArgument(f"{self.location}: header, extensions and backing file name "
                                  f"({len(area)} bytes) do not fit in the first cluster "
                                  f"({self.cs} bytes)")
        struct.pack_into(">QI", area, L.OFF_BACKING_FILE_OFFSET, bf_off, len(name))
        self.header_raw[:] = area[:self.header_length]
        # the rest of cluster 0 is reserved for this area: rewrite it whole
        self.f.pwrite(0, bytes(area) + bytes(self.cs - len(area)))
        self.f.sync()
        self.extensions = exts
        self.backing_file_offset = bf_off

    # ------------------------------------------------------------------ check / repair
    def _count_refs(self, problems: list, progress: Progress | None = None,
                    include_rt: bool = True):
        """Walk all metadata; return (refcount array indexed by cluster, fix list).

        ``fix`` lists (kind, where, value) for flag repairs: ("l1", index, value) or
        ("l2", l2_offset, index, entry)."""
        cs = self.cs
        self.fsize = self.f.size()
        nclusters = max(self.next_cluster, -(-self.fsize // cs))
        counts = array("I", [0]) * (nclusters + 1)
        fixes: list = []
        file_clusters = -(-self.fsize // cs)

        def add(off: int, length: int, what: str) -> bool:
            if length <= 0:
                return True
            first, last = off // cs, (off + length - 1) // cs
            if last >= file_clusters:
                problems.append(Problem("corrupt", f"{what} at {off:#x} lies past the end of the "
                                        f"file ({self.fsize} bytes)", off,
                                        code=ProblemCode.ENTRY_PAST_END))
                return False
            for c in range(first, last + 1):
                counts[c] += 1
            return True

        add(0, cs, "header")
        if include_rt:
            add(self.rt_offset, self.rt_clusters * cs, "refcount table")
        if self.nb_snapshots:
            add(self.snapshots_offset, self.snapshot_table_size, "snapshot table")
        self._count_bitmaps(add, problems)
        l1_tables = [(self.l1_offset, len(self.l1), True, self.l1)]
        for s in self.snapshots:
            l1 = None
            try:
                l1 = _be_array(self.f.read_exact(s["l1_table_offset"], s["l1_size"] * 8,
                                                 f"snapshot {s['id']} L1 table"))
            except CorruptImage as exc:
                problems.append(Problem("corrupt", str(exc), s["l1_table_offset"],
                                        code=ProblemCode.ENTRY_PAST_END))
                continue
            l1_tables.append((s["l1_table_offset"], s["l1_size"], False, l1))
        data_file = bool(self.incompat & L.INCOMPAT_DATA_FILE)
        l2_refs: list = []
        for l1_off, l1_n, active, l1 in l1_tables:
            add(l1_off, l1_n * 8, "L1 table")
            for i in range(l1_n):
                if progress is not None and active:
                    progress.set(i)
                l1e = l1[i]
                off = l1e & L.L1E_OFFSET_MASK
                if l1e & L.L1E_RESERVED_MASK and active:
                    problems.append(Problem("corrupt", f"L1 entry {i} has reserved bits set: "
                                            f"{l1e:#x}", self.l1_offset + 8 * i,
                                            code=ProblemCode.ENTRY_INVALID))
                    fixes.append(("l1", i, l1e & ~L.L1E_RESERVED_MASK))
                if not off:
                    if l1e & ~L.L1E_RESERVED_MASK and active:
                        problems.append(Problem("corrupt", f"L1 entry {i} = {l1e:#x} has flags "
                                                "but no L2 table offset", self.l1_offset + 8 * i,
                                                code=ProblemCode.ENTRY_INVALID))
                        fixes.append(("l1", i, 0))
                    continue
                if off % cs:
                    problems.append(Problem("corrupt", f"L1 entry {i}: L2 table offset {off:#x} "
                                            "not cluster aligned", off,
                                            code=ProblemCode.ENTRY_INVALID))
                    if active:
                        fixes.append(("l1", i, 0))
                    continue
                if not add(off, cs, f"L2 table (L1 entry {i})"):
                    if active:
                        fixes.append(("l1", i, 0))
                    continue
                l2_refs.append((off, active, i))
                tbl = _be_array(self.f.pread(off, cs))
                if len(tbl) < self.l2_entries * (2 if self.extended_l2 else 1):
                    continue
                entries = tbl[::2] if self.extended_l2 else tbl
                if self.extended_l2 and any(tbl[1::2]):
                    self._check_subclusters(off, tbl, active, data_file, problems, fixes)
                for j, e in [(j, e) for j, e in enumerate(entries) if e]:
                    if e & L.OFLAG_COMPRESSED:
                        coff, csize = self._compressed_range(e)
                        if coff + csize > self.fsize + 512 or coff >= self.fsize:
                            problems.append(Problem("corrupt", f"compressed cluster at {coff:#x} "
                                                    "lies past the end of the file", coff,
                                                    code=ProblemCode.ENTRY_PAST_END))
                            if active:
                                fixes.append(("l2", off, j, 0))
                            continue
                        first, last = coff // cs, (coff + csize - 1) // cs
                        last = min(last, file_clusters - 1)
                        for c in range(first, last + 1):
                            counts[c] += 1
                        continue
                    if e & L.L2E_STD_RESERVED_MASK:
                        problems.append(Problem("corrupt", f"L2 table at {off:#x} entry {j} has "
                                                f"reserved bits set: {e:#x}", off,
                                                code=ProblemCode.ENTRY_INVALID))
                        if active:
                            fixes.append(("l2", off, j, e & ~L.L2E_STD_RESERVED_MASK))
                    host = e & L2E_MASK
                    if not host or data_file:
                        continue
                    if host % cs:
                        problems.append(Problem("corrupt", f"L2 table at {off:#x} entry {j}: "
                                                f"cluster offset {host:#x} not aligned", host,
                                                code=ProblemCode.ENTRY_INVALID))
                        if active:
                            fixes.append(("l2", off, j, 0))
                        continue
                    if not add(host, cs, f"data cluster (L2 table {off:#x} entry {j})"):
                        if active:
                            fixes.append(("l2", off, j, 0))
            if progress:
                progress.check()
        self._l2_refs = l2_refs
        return counts, fixes

    def _check_subclusters(self, off: int, tbl, active: bool, data_file: bool, problems: list,
                           fixes: list) -> None:
        """Extended L2 subcluster bitmaps (what reading refuses, as qemu does): no subcluster
        both allocated and zero, no allocated subcluster without a host cluster. Repair keeps
        the data: a subcluster marked both stays allocated (its zero bit is cleared); allocation
        bits with no cluster to point into are cleared."""
        for j in range(self.l2_entries):
            bm = tbl[2 * j + 1]
            if not bm:
                continue
            e = tbl[2 * j]
            if e & L.OFLAG_COMPRESSED:
                continue
            alloc, zero = bm & 0xFFFFFFFF, bm >> 32
            host = e & L2E_MASK
            if alloc & zero:
                what = (f"L2 table at {off:#x} entry {j}: subclusters {alloc & zero:#010x} are "
                        f"marked both allocated and zero (bitmap {bm:#018x})")
                new = alloc | (zero & ~alloc) << 32
            elif alloc and not host and not (data_file and e & L.OFLAG_COPIED):
                what = (f"L2 table at {off:#x} entry {j}: subclusters {alloc:#010x} are "
                        f"allocated but the entry has no cluster (entry {e:#x})")
                new = zero << 32
            else:
                continue
            problems.append(Problem("corrupt", what, off + 16 * j + 8,
                                    code=ProblemCode.SUBCLUSTER))
            if active:
                fixes.append(("l2bm", off, j, new))

    def _count_bitmaps(self, add, problems) -> None:
        ext = self.bitmaps_ext
        if not ext or not self.autoclear & L.AUTOCLEAR_BITMAPS:
            return
        d_off, d_size = ext["bitmap_directory_offset"], ext["bitmap_directory_size"]
        if d_size > (64 << 20) or d_off % self.cs:
            problems.append(Problem("corrupt", "bitmap directory invalid", d_off,
                                    code=ProblemCode.ENTRY_INVALID))
            return
        if not add(d_off, d_size, "bitmap directory"):
            return
        data = self.f.pread(d_off, d_size)
        pos = 0
        for _ in range(min(ext["nb_bitmaps"], 65535)):
            if pos + 24 > len(data):
                break
            b = L.BitmapDirEntry.parse(data[pos:pos + 24])
            if b.bitmap_table_size * 8 <= (64 << 20) and not b.bitmap_table_offset % self.cs:
                if add(b.bitmap_table_offset, b.bitmap_table_size * 8, "bitmap table"):
                    raw = self.f.pread(b.bitmap_table_offset, b.bitmap_table_size * 8)
                    tbl = _be_array(raw[:len(raw) // 8 * 8])
                    for e in tbl:
                        o = e & L2E_MASK
                        if o:
                            add(o, self.cs, "bitmap data")
            pos += (24 + b.extra_data_size + b.name_size + 7) & ~7

    def _stored_problems(self, counts, problems: list) -> bool:
        """Compare computed refcounts with the stored ones; True when a rebuild is needed."""
        cs = self.cs
        rt = self._load_rt()
        bad_structure = False
        n = len(counts)
        refblocks = {}
        for rti in range(len(rt)):
            off = rt[rti] & L.REFT_OFFSET_MASK
            if rt[rti] & L.REFT_RESERVED_MASK:
                problems.append(Problem("corrupt", f"refcount table entry {rti} has reserved "
                                        f"bits set: {rt[rti]:#x}", self.rt_offset + 8 * rti,
                                        code=ProblemCode.ENTRY_INVALID))
                bad_structure = True
            if not off:
                continue
            if off % cs or off + cs > self.fsize:
                problems.append(Problem("corrupt", f"refcount block {rti} at {off:#x} is invalid "
                                        "(unaligned or past the end of the file)", off,
                                        code=ProblemCode.ENTRY_INVALID))
                bad_structure = True
                continue
            refblocks[rti] = off
            c = off // cs
            if c < n:
                counts[c] += 1
        for c in range(n):
            rti, idx = divmod(c, self.rb_entries)
            if rti in refblocks:
                blk = self._rb_cache.get(rti)
                if blk is None:
                    blk = bytearray(self.f.pread(refblocks[rti], cs))
                    self._rb_cache[rti] = blk
                stored = self._rc_get_in(blk, idx)
            else:
                stored = 0
            want = counts[c]
            if stored == want:
                continue
            if stored < want:
                problems.append(Problem("corrupt", f"cluster {c} (offset {c * cs:#x}): "
                                        f"refcount={stored} reference={want}", c * cs,
                                        code=ProblemCode.REFCOUNT))
            else:
                problems.append(Problem("leak", f"cluster {c} (offset {c * cs:#x}) leaked: "
                                        f"refcount={stored} reference={want}", c * cs,
                                        code=ProblemCode.LEAK))
                if want == 0 and c * cs < self.fsize:     # nothing references it: an orphan
                    self._orphans.append((self.location, c * cs, min(cs, self.fsize - c * cs)))
        return bad_structure

    def _copied_problems(self, problems: list, counts, fixes: list) -> None:
        """OFLAG_COPIED must be set exactly when the (stored) refcount is 1, as qemu checks."""
        cs = self.cs

        def rc(c: int) -> int:
            try:
                return self.refcount(c)
            except VDError:
                return counts[c]
        for i, l1e in enumerate(self.l1):
            off = l1e & L.L1E_OFFSET_MASK
            if not off or off % cs or off // cs >= len(counts):
                continue
            want = rc(off // cs) == 1
            if bool(l1e & L.OFLAG_COPIED) != want:
                problems.append(Problem("corrupt", f"OFLAG_COPIED L2 table: L1 entry {i} = "
                                        f"{l1e:#x}, refcount {rc(off // cs)}", off,
                                        code=ProblemCode.ENTRY_INVALID))
                fixes.append(("l1", i, off | (L.OFLAG_COPIED if want else 0)))
            tbl = _be_array(self.f.pread(off, cs))
            step = 2 if self.extended_l2 else 1
            if len(tbl) < self.l2_entries * step:
                continue                  # past the end of the file: reported by the walk
            for j in range(self.l2_entries):
                e = tbl[j * step]
                host = e & L2E_MASK
                if e & L.OFLAG_COMPRESSED or not host or host % cs or host // cs >= len(counts):
                    continue
                if self.incompat & L.INCOMPAT_DATA_FILE:
                    continue
                want = rc(host // cs) == 1
                if bool(e & L.OFLAG_COPIED) != want:
                    problems.append(Problem("corrupt", f"OFLAG_COPIED data cluster: L2 table "
                                            f"{off:#x} entry {j} = {e:#x}, refcount "
                                            f"{rc(host // cs)}", host,
                                            code=ProblemCode.ENTRY_INVALID))
                    fixes.append(("l2", off, j, (e & ~(L.OFLAG_COPIED | L.L2E_STD_RESERVED_MASK))
                                  | (L.OFLAG_COPIED if want else 0)))

    def check(self, repair=False, dry_run=False, progress=None):
        if repair and not dry_run:
            self._require_writable()
        prog = Progress(progress, max(len(self.l1), 1))
        prog.start()
        problems: list = []
        self._orphans: list = []
        counts, fixes = self._count_refs(problems, prog)
        bad_structure = self._stored_problems(counts, problems)
        self._copied_problems(problems, counts, fixes)
        marked = self.incompat & (L.INCOMPAT_CORRUPT | L.INCOMPAT_DIRTY)
        report = CheckReport(problems=problems, orphans=self._orphans)
        self._orphans = []
        if repair and not dry_run and (problems or marked):
            self._apply_fixes(fixes)
            counts, _ = self._count_refs([], include_rt=False)
            self._rebuild_refcounts(counts)
            after: list = []
            counts, fixes2 = self._count_refs(after)
            self._stored_problems(counts, after)
            self._copied_problems(after, counts, fixes2)
            if fixes2:
                self._apply_fixes(fixes2)
                after = []
                counts, _ = self._count_refs(after)
                self._stored_problems(counts, after)
            if not after:
                for p in problems:
                    p.repaired = True
                if marked:
                    self.incompat &= ~(L.INCOMPAT_CORRUPT | L.INCOMPAT_DIRTY)
                    self._write_feature_bits()
                    self.write_blocked = None
                report.repaired = True
            else:
                report.problems = after
        prog.finish()
        return report

    def _apply_fixes(self, fixes: list) -> None:
        for fix in fixes:
            if fix[0] == "l1":
                _, i, value = fix
                self._set_l1(i, value)
            elif fix[0] == "l2bm":
                _, off, j, bm = fix
                self.f.pwrite(off + 16 * j + 8, _BIG.pack(bm))
            else:
                _, off, j, e = fix
                if self.extended_l2:
                    self.f.pwrite(off + 16 * j, _BIG.pack(e))
                    if e == 0:
                        self.f.pwrite(off + 16 * j + 8, _BIG.pack(0))
                else:
                    self.f.pwrite(off + 8 * j, _BIG.pack(e))
        if fixes:
            self._l2_cache.clear()
            self._l2_cache_bytes = 0

    def _rebuild_refcounts(self, counts) -> None:
        """Write a new refcount table and blocks (at the end of the file) matching ``counts``
        (which excludes the refcount structures), then switch the header to them."""
        cs, per_block = self.cs, self.rb_entries
        maxval = (1 << self.refcount_bits) - 1
        used = len(counts)
        while used > 0 and counts[used - 1] == 0:
            used -= 1
        for c in range(used):
            if counts[c] > maxval:
                raise CorruptImage(f"cluster {c} has {counts[c]} references, more than "
                                   f"{self.refcount_bits}-bit refcounts can hold", path=self.location)
        base = max(-(-self.fsize // cs), used)
        nb, nt = 0, 1
        while True:
            total = base + nt + nb
            blocks = sorted({c // per_block for c in range(used) if counts[c]} |
                            {c // per_block for c in range(base, total)})
            nt2 = max(1, -(-(blocks[-1] + 1) * 8 // cs))
            if (len(blocks), nt2) == (nb, nt):
                break
            nb, nt = len(blocks), nt2
        if nt * cs > L.MAX_REFTABLE_BYTES:
            raise NotSupported(f"{self.location}: rebuilt refcount table would exceed 8 MiB")
        table_ci = base
        block_ci = {rti: base + nt + i for i, rti in enumerate(blocks)}
        rt = array("Q", bytes(8 * nt * cs // 8))
        for rti, bci in block_ci.items():
            blk = bytearray(cs)
            lo = rti * per_block
            for idx in range(per_block):
                c = lo + idx
                if c < used and counts[c]:
                    self._rc_set_in(blk, idx, counts[c])
                elif base <= c < base + nt + nb:
                    self._rc_set_in(blk, idx, 1)
            self.f.pwrite(bci * cs, blk)
            rt[rti] = bci * cs
        self.f.pwrite(table_ci * cs, _array_be_bytes(rt))
        self.f.sync()
        hdr = struct.pack(">QI", table_ci * cs, nt)
        self.header_raw[L.OFF_REFCOUNT_TABLE_OFFSET:L.OFF_REFCOUNT_TABLE_OFFSET + 12] = hdr
        self.f.pwrite(L.OFF_REFCOUNT_TABLE_OFFSET, hdr)
        self.f.sync()
        self.rt_offset, self.rt_clusters, self.rt = table_ci * cs, nt, rt
        self._rb_cache.clear()
        self.fsize = self.f.size()
        self.next_cluster = max(-(-self.fsize // cs), base + nt + nb)


class QcowV1Image(Image):
    """QCOW version 1 (qemu block/qcow.c layout), read-only."""

    def __init__(self, backend, location, f: ImageFile, flags: OpenFlags):
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
        l1_size = -(-h.size // span)
        if l1_size * 8 > L.MAX_L1_BYTES:
            raise CorruptImage("L1 table too large", path=location, field="size", offset=24,
                               expected="an L1 table of at most 32 MiB", found=h.size)
        self.l1 = _be_array(f.read_exact(h.l1_table_offset, l1_size * 8, "L1 table")) \
            if l1_size else array("Q")
        self._l2: OrderedDict[int, array] = OrderedDict()
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

    def info(self):
        d = {"qcow_version": 1, "cluster_size": self.cs, "l2_bits": self.l2_bits}
        if self.backing_file:
            d["backing_file"] = self.backing_file
        return d

    def check_parent_link(self, parent):
        if self.backing_file and os.path.basename(self.backing_file) != os.path.basename(parent.location):
            raise ParentMismatch(f"{self.location}: backing file is not {parent.location}",
                                 expected=self.backing_file, found=parent.location)

    def _entry(self, ci: int) -> int:
        l1i, l2i = divmod(ci, 1 << self.l2_bits)
        if l1i >= len(self.l1) or not self.l1[l1i]:
            return 0
        off = self.l1[l1i]
        tbl = self._l2.get(off)
        if tbl is None:
            n = 8 << self.l2_bits
            if off + n > self.fsize:
                raise CorruptImage("L2 table lies past the end of the file", path=self.location,
                                   offset=off, expected=f"end <= {self.fsize}", found=off + n)
            tbl = _be_array(self.f.read_exact(off, n, "L2 table"))
            self._l2[off] = tbl
            if len(self._l2) > 64:
                self._l2.popitem(last=False)
        return tbl[l2i]

    def block_status(self, offset, length):
        from ..sparse import block_runs
        return block_runs(offset, length, self.cs,
                          lambda ci: Alloc.DATA if self._entry(ci) else Alloc.UNALLOCATED)

    def read(self, offset, length):
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
                    raise CorruptImage("compressed cluster lies past the end of the file",
                                       path=self.location, offset=coff)
                try:
                    out = _inflate(self.f.pread(coff, csize), self.cs)
                except _DecompressError as exc:
                    raise CorruptImage(f"compressed cluster cannot be decompressed: {exc}",
                                       path=self.location, offset=coff) from None
                if len(out) < self.cs:
                    raise CorruptImage("compressed cluster is short", path=self.location,
                                       offset=coff)
                buf[pos - offset:pos - offset + n] = out[inner:inner + n]
            elif e:
                data = self.f.read_exact(e + inner, n, "data cluster")
                buf[pos - offset:pos - offset + n] = data
            pos += n
        return bytes(buf)

    def close(self):
        self.f.close()


class Qcow2Backend(Backend):
    name = "QCOW2"
    description = "QEMU copy-on-write image (qcow2 versions 2 and 3; qcow version 1 read-only)"
    aliases = ("QCOW", "qcow2", "qcow")
    caps = Cap.FILE | Cap.VFS | Cap.CREATE_DYNAMIC | Cap.DIFF | Cap.ASYNC
    extensions = (FileExtension("qcow2"), FileExtension("qcow"))
    config_keys = (
        ConfigKey("ClusterSize", "65536", ValueType.INTEGER, KeyFlag.CREATEONLY,
                  "the unit of allocation (vdgui's own key; qemu's cluster_size)",
                  minimum=512, maximum=2 << 20, power_of_two=True, label="Cluster size",
                  unit="bytes"),
        ConfigKey("Compat", "1.1", ValueType.STRING, KeyFlag.CREATEONLY | KeyFlag.EXPERT,
                  "qcow2 compatibility level: 1.1 (version 3) or 0.10 (version 2, for old qemu)",
                  label="Compatibility level", choices=("1.1", "0.10")),
        ConfigKey("RefcountBits", "16", ValueType.INTEGER, KeyFlag.CREATEONLY | KeyFlag.EXPERT,
                  "width of each reference count (1..64, version 3 only)", minimum=1,
                  maximum=64, power_of_two=True, label="Reference count width", unit="bits"),
        ConfigKey("Compress", "0", ValueType.INTEGER, KeyFlag.CREATEONLY | KeyFlag.EXPERT,
                  "store whole written clusters compressed (like qemu-img convert -c)",
                  minimum=0, maximum=1, label="Compress clusters"),
        ConfigKey("Snapshot", None, ValueType.STRING, KeyFlag.EXPERT,
                  "open an internal snapshot (ID or name) instead of the current state, "
                  "read-only", label="Internal snapshot"),
    )
    operations = frozenset({Operation.WRITE, Operation.CREATE, Operation.RESIZE, Operation.CHECK,
                            Operation.REPAIR, Operation.RELINK, Operation.DISCARD,
                            Operation.COMPACT})
    create_flags = ImageFlags.NONE
    max_size = qcow2_max_size(65536)            # 2 PiB with the default 64 KiB clusters
    size_granularity = 512
    can_shrink = True

    def max_size_for(self, config=None):
        return qcow2_max_size(self.config_value(config, "ClusterSize"))

    def limit_reason(self, config=None):
        return _limit_reason(self.config_value(config, "ClusterSize"))

    def probe(self, src: ProbeInput) -> int:
        if len(src.head) >= 8 and src.head[:4] == L.MAGIC:
            version = struct.unpack_from(">I", src.head, 4)[0]
            if version in (1, 2, 3):
                return 100
            return 60
        return 0

    def open(self, location, flags=OpenFlags.NORMAL, config=None):
        cfg = parse_config(self.config_keys, config, owner=self.name)
        ro = flags.read_only
        f = ImageFile(location, writable=not ro)
        try:
            head = f.read_exact(0, 8, "qcow header")
            if head[:4] != L.MAGIC:
                raise CorruptImage("not a qcow2 image (bad magic)", path=location, field="magic",
                                   offset=0, expected=L.MAGIC, found=head[:4])
            if struct.unpack_from(">I", head, 4)[0] == 1:
                if not ro:
                    raise NotSupported(f"{location}: qcow version 1 images can only be opened "
                                       "read-only (convert them to qcow2 to write)")
                return QcowV1Image(self, location, f, flags)
            return Qcow2Image(self, location, f, flags, snapshot=cfg.get("Snapshot"))
        except BaseException:
            f.close()
            raise

    def create(self, p: CreateParams):
        cfg = parse_config(self.config_keys, p.config, creating=True, owner=self.name)
        cs = cfg["ClusterSize"]
        compat = str(cfg["Compat"]).strip()
        if compat not in ("1.1", "0.10", "v3", "v2", "3", "2"):
            raise InvalidArgument(f"QCOW2: Compat must be 1.1 or 0.10, found {compat!r}")
        version = 2 if compat in ("0.10", "v2", "2") else 3
        rbits = cfg["RefcountBits"]
        if version == 2 and rbits != 16:
            raise InvalidArgument("QCOW2: version 2 (compat 0.10) images use 16-bit refcounts")
        if p.size % 512 or p.size <= 0:
            raise InvalidArgument(f"QCOW2: size must be a positive multiple of 512, found {p.size}")
        cb = cs.bit_length() - 1
        span = cs * (cs // 8)
        l1_size = -(-p.size // span)
        if l1_size * 8 > L.MAX_L1_BYTES or p.size > qcow2_max_size(cs):
            raise too_large("QCOW2", p.size, qcow2_max_size(cs), p.location, _limit_reason(cs))
        backing = fmt = None
        if p.parent is not None:
            backing = relative_name(p.location, p.parent.location)
            fmt = p.parent.backend.qemu_format
        order = rbits.bit_length() - 1
        hlen = 112 if version == 3 else 72
        hdr = bytearray(L.Qcow2HeaderV2.build(dict(
            version=version, backing_file_offset=0, backing_file_size=0, cluster_bits=cb,
            size=p.size, crypt_method=0, l1_size=l1_size, l1_table_offset=0,
            refcount_table_offset=cs, refcount_table_clusters=1, nb_snapshots=0,
            snapshots_offset=0)))
        if version == 3:
            hdr += L.Qcow2HeaderV3Tail.build(dict(
                incompatible_features=0, compatible_features=0, autoclear_features=0,
                refcount_order=order, header_length=hlen))
            hdr += bytes(hlen - len(hdr))   # compression_type 0 (zlib) + padding
        l1_clusters = max(1, -(-l1_size * 8 // cs))
        # clusters: 0 header, 1 refcount table, 2 refcount block, 3.. L1 table
        used = 3 + l1_clusters
        per_block = cs * 8 // rbits
        if used > per_block:
            raise InvalidArgument(f"QCOW2: {rbits}-bit refcounts with {cs}-byte clusters cannot "
                                  f"describe the initial {used} clusters in one block")
        struct.pack_into(">Q", hdr, L.OFF_L1_TABLE_OFFSET, 3 * cs)
        f = ImageFile.create_temp(p.location)
        try:
            f.truncate(used * cs)
            f.pwrite(0, bytes(hdr) + bytes(cs - len(hdr)))
            f.pwrite(cs, _BIG.pack(2 * cs))
            blk = bytearray(cs)
            for c in range(used):
                _rc_set(blk, c, 1, rbits)
            f.pwrite(2 * cs, blk)
            img = Qcow2Image(self, p.location, f, OpenFlags.NORMAL)
            if backing is not None or fmt:
                img._write_header_area(backing, fmt)
                img = Qcow2Image(self, p.location, f, OpenFlags.NORMAL)
            f.sync()
            f.commit()
            img.location = p.location
        except BaseException:
            f.abandon()
            raise
        img.parent_hint = None if backing is None else ParentHint(
            locations=[backing], format=p.parent.backend.name)
        img.compress_writes = bool(cfg["Compress"])
        if p.progress:
            p.progress(p.size, p.size)
        return img


BACKEND = Qcow2Backend()
