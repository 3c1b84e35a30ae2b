"""QCOW2 header: parsing and validation (qemu's limits), header extensions, the snapshot
table, feature bits, the backing file and format written into the first cluster, info."""
from __future__ import annotations

import struct
from array import array

from construct import ConstructError

from ...align import ceil_div
from ...backend import ImageFlags, OpenFlags
from ...errors import CorruptImage, InvalidArgument, NotSupported, UnsafePath
from ...fileio import ImageFile, resolve_stored_name
from ...image import ParentHint
from . import layout as L
from .clusters import be_array
from .state import Qcow2State


class HeaderMixin(Qcow2State):
    """Header, extensions, snapshots and feature bits of a :class:`.image.Qcow2Image`."""

    def _field_error(self, field: str, message: str, *, expected: object = None,
                     found: object = None) -> CorruptImage:
        """A CorruptImage naming a header field at its offset in the header."""
        return self._corrupt(message, field=field, offset=L.HEADER_OFFSETS[field],
                             expected=expected, found=found)

    def _parse_header(self) -> None:
        f = self.f
        self.fsize = f.size()
        head = f.read_exact(0, L.V2_HEADER_SIZE, "qcow2 header")
        try:
            h = L.Qcow2HeaderV2.parse(head)
        except ConstructError:
            raise self._field_error("magic", "not a qcow2 image (bad magic)", expected=L.MAGIC,
                                    found=head[:4]) from None
        self.version = h.version
        if h.version not in (2, 3):
            raise NotSupported(f"{self.location}: qcow2 version {h.version} is not supported "
                               "(versions 1, 2 and 3 are)")
        if not L.MIN_CLUSTER_BITS <= h.cluster_bits <= L.MAX_CLUSTER_BITS:
            raise self._field_error("cluster_bits", "cluster size out of range",
                                    expected=f"{L.MIN_CLUSTER_BITS}..{L.MAX_CLUSTER_BITS}",
                                    found=h.cluster_bits)
        self.cb = h.cluster_bits
        self.cs = cs = 1 << self.cb
        if self.version == 3:
            tail = f.read_exact(L.V2_HEADER_SIZE, 32, "qcow2 version 3 header")
            t = L.Qcow2HeaderV3Tail.parse(tail)
            if t.header_length < L.V3_HEADER_MIN or t.header_length % 8 or t.header_length > cs:
                raise self._field_error("header_length", "invalid header length",
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
        self._read_extensions(h.backing_file_offset)
        if unknown:
            names = [
                self.feature_names.get((0, b), f"bit {b}") for b in range(64) if unknown >> b & 1
            ]
            raise NotSupported(
                f"{self.location}: unsupported qcow2 incompatible features: {', '.join(names)}",
                field="incompatible_features",
                offset=72,
                found=hex(self.incompat),
            )
        if self.refcount_order > 6:
            raise self._field_error("refcount_order", "refcount width too large", expected="0..6",
                                    found=self.refcount_order)
        self.refcount_bits = 1 << self.refcount_order
        self.extended_l2 = bool(self.incompat & L.INCOMPAT_EXTL2)
        if self.extended_l2 and self.cb < 14:
            raise self._field_error("cluster_bits",
                                    "extended L2 entries need clusters of at least 16 KiB",
                                    expected=">= 14", found=self.cb)
        self.compression_type = 0
        if self.header_length > L.COMPRESSION_TYPE_OFFSET:
            self.compression_type = self.header_raw[L.COMPRESSION_TYPE_OFFSET]
        if bool(self.incompat & L.INCOMPAT_COMPRESSION) != (self.compression_type != 0):
            raise self._field_error("compression_type",
                                    "compression type field and feature bit disagree",
                                    expected="non-zero exactly when incompatible bit 3 is set",
                                    found=self.compression_type)
        if self.compression_type not in (0, 1):
            raise NotSupported(
                f"{self.location}: unsupported compression type "
                f"{self.compression_type} (known: 0 zlib, 1 zstd)",
                field="compression_type",
                offset=104,
            )
        self.size = h.size
        self.block_size = cs
        self.l2_entries = cs // (16 if self.extended_l2 else 8)
        self.sc_size = cs // 32 if self.extended_l2 else cs
        self.rb_entries = cs * 8 // self.refcount_bits
        # L1 table
        if h.l1_size * 8 > L.MAX_L1_BYTES:
            raise self._field_error("l1_size", "active L1 table too large",
                                    expected=f"at most {L.MAX_L1_BYTES // 8} entries (32 MiB)",
                                    found=h.l1_size)
        span = cs * self.l2_entries
        if h.size > (1 << 62) or ceil_div(h.size, span) > h.l1_size:
            need = ceil_div(h.size, span)
            raise self._field_error("l1_size", "L1 table too small for the virtual size",
                                    expected=f">= {need} entries for {h.size} bytes",
                                    found=h.l1_size)
        if h.l1_size and h.l1_table_offset % cs:
            raise self._field_error("l1_table_offset", "L1 table offset not cluster aligned",
                                    found=hex(h.l1_table_offset))
        self.l1_offset = h.l1_table_offset
        self.l1 = (
            be_array(f.read_exact(h.l1_table_offset, h.l1_size * 8, "active L1 table"))
            if h.l1_size
            else array("Q")
        )
        # refcount table (read lazily; validated now)
        if h.refcount_table_clusters * cs > L.MAX_REFTABLE_BYTES:
            raise self._field_error("refcount_table_clusters", "refcount table too large",
                                    expected=f"at most {L.MAX_REFTABLE_BYTES >> 20} MiB",
                                    found=h.refcount_table_clusters)
        if h.refcount_table_offset % cs:
            raise self._field_error("refcount_table_offset",
                                    "refcount table offset not cluster aligned",
                                    found=hex(h.refcount_table_offset))
        if h.refcount_table_clusters == 0 and not self.open_flags & OpenFlags.INFO:
            raise self._field_error("refcount_table_clusters", "image has no refcount table",
                                    expected="> 0", found=0)
        self.rt_offset = h.refcount_table_offset
        self.rt_clusters = h.refcount_table_clusters
        # snapshots
        if h.nb_snapshots > L.MAX_SNAPSHOTS:
            raise self._field_error("nb_snapshots", "too many snapshots",
                                    expected=f"at most {L.MAX_SNAPSHOTS}", found=h.nb_snapshots)
        if h.nb_snapshots and h.snapshots_offset % cs:
            raise self._field_error("snapshots_offset", "snapshot table offset not cluster aligned",
                                    found=hex(h.snapshots_offset))
        self.nb_snapshots = h.nb_snapshots
        self.snapshots_offset = h.snapshots_offset
        self._read_snapshots()
        # backing file
        self.backing_file = None
        if h.backing_file_offset:
            if h.backing_file_size > L.MAX_BACKING_NAME:
                raise self._field_error("backing_file_size", "backing file name too long",
                                        expected=f"at most {L.MAX_BACKING_NAME} bytes",
                                        found=h.backing_file_size)
            if h.backing_file_offset > cs:
                raise self._field_error("backing_file_offset",
                                        "backing file name outside the first cluster",
                                        expected=f"<= {cs}", found=h.backing_file_offset)
            raw = f.read_exact(h.backing_file_offset, h.backing_file_size, "backing file name")
            try:
                self.backing_file = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise self._corrupt(
                    "backing file name is not UTF-8",
                    field="backing file name",
                    offset=h.backing_file_offset,
                    found=raw[:64],
                ) from None
            if not self.backing_file:
                self.backing_file = None
        self.backing_file_offset = h.backing_file_offset
        if self.backing_file is not None:
            self.parent_hint = ParentHint(locations=[self.backing_file], format=self.backing_format)
            self.flags = ImageFlags.DIFF
        # external data file
        if self.incompat & L.INCOMPAT_DATA_FILE:
            if self.backing_file is not None and self.autoclear & L.AUTOCLEAR_DATA_FILE_RAW:
                raise self._field_error("autoclear_features",
                                        "a raw external data file cannot have a backing file")
            if not self.open_flags & OpenFlags.INFO:
                self._open_data_file()
        if self.incompat & L.INCOMPAT_CORRUPT:
            self.write_blocked = (
                "the image is marked corrupt; only a repair (check --repair) may write to it"
            )
        self.next_cluster = ceil_div(self.fsize, cs)
        key, self._given_key = self._given_key, None    # held by the cipher only
        self._setup_crypt(h.crypt_method, key)

    def _read_extensions(self, backing_offset: int) -> None:
        cs = self.cs
        end = backing_offset if backing_offset and backing_offset <= cs else cs
        end = min(end, self.fsize)
        self.extensions = []  # (type, data) in order, except END
        self.feature_names = {}
        self.backing_format = None
        pos = self.header_length
        seen = set()
        while pos + 8 <= end:
            e = L.HeaderExtension.parse(self.f.read_exact(pos, 8, "header extension"))
            if e.type == L.EXT_END:
                break
            if pos + 8 + e.length > end:
                raise self._corrupt(
                    "header extension runs past the extension area",
                    field=f"header extension {e.type:#x}",
                    offset=pos,
                    expected=f"end <= {end}",
                    found=pos + 8 + e.length,
                )
            data = self.f.read_exact(pos + 8, e.length, "header extension")
            if e.type in seen and e.type in (L.EXT_BACKING_FORMAT, L.EXT_DATA_FILE, L.EXT_BITMAPS):
                raise self._corrupt(
                    "header extension appears twice",
                    field=f"header extension {e.type:#x}",
                    offset=pos,
                )
            seen.add(e.type)
            self.extensions.append((e.type, data))
            if e.type == L.EXT_BACKING_FORMAT:
                self.backing_format = data.decode("utf-8", "replace")
            elif e.type == L.EXT_DATA_FILE:
                self.data_file_name = data.decode("utf-8", "replace")
            elif e.type == L.EXT_FEATURE_TABLE:
                for i in range(len(data) // 48):
                    fe = L.FeatureNameEntry.parse(data[i * 48 : (i + 1) * 48])
                    self.feature_names[(fe.type, fe.bit)] = fe.name.rstrip(b"\0").decode(
                        "utf-8", "replace"
                    )
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
                raise self._corrupt(
                    f"snapshot {i}: extra data too large",
                    field="extra_data_size",
                    offset=pos + 36,
                    expected=f"<= {L.MAX_SNAPSHOT_EXTRA}",
                    found=s.extra_data_size,
                )
            if s.l1_size * 8 > L.MAX_L1_BYTES:
                raise self._corrupt(
                    f"snapshot {i}: L1 table too large",
                    field="l1_size",
                    offset=pos + 8,
                    expected=f"at most {L.MAX_L1_BYTES // 8}",
                    found=s.l1_size,
                )
            if s.l1_size and s.l1_table_offset % self.cs:
                raise self._corrupt(
                    f"snapshot {i}: L1 table offset not cluster aligned",
                    field="l1_table_offset",
                    offset=pos,
                    found=hex(s.l1_table_offset),
                )
            var = s.extra_data_size + s.id_str_size + s.name_size
            rest = self.f.read_exact(pos + L.SNAPSHOT_FIXED_SIZE, var, f"snapshot table entry {i}")
            extra = rest[: s.extra_data_size]
            ident = rest[s.extra_data_size : s.extra_data_size + s.id_str_size].decode(
                "utf-8", "replace"
            )
            name = rest[s.extra_data_size + s.id_str_size :].decode("utf-8", "replace")
            vm_state = s.vm_state_size
            disk_size = self.size
            if len(extra) >= 8:
                vm_state = struct.unpack_from(">Q", extra, 0)[0]
            if len(extra) >= 16:
                disk_size = struct.unpack_from(">Q", extra, 8)[0]
            entry_size = (L.SNAPSHOT_FIXED_SIZE + var + 7) & ~7
            total += entry_size
            if total > L.MAX_SNAPSHOTS_BYTES:
                raise self._field_error("nb_snapshots", "snapshot table too large",
                                        expected=f"at most {L.MAX_SNAPSHOTS_BYTES >> 20} MiB")
            self.snapshots.append(
                {
                    "id": ident,
                    "name": name,
                    "date_sec": s.date_sec,
                    "date_nsec": s.date_nsec,
                    "vm_clock_nsec": s.vm_clock_nsec,
                    "vm_state_size": vm_state,
                    "disk_size": disk_size,
                    "l1_table_offset": s.l1_table_offset,
                    "l1_size": s.l1_size,
                }
            )
            pos += entry_size
        self.snapshot_table_size = total

    def _open_data_file(self) -> None:
        if not self.data_file_name:
            raise self._field_error("incompatible_features",
                                    "external data file bit set but no data file name stored")
        if not self.open_flags & OpenFlags.ALLOW_UNSAFE_PATHS:
            raise UnsafePath(
                f"{self.location}: the image keeps its data in an external data file "
                f"{self.data_file_name!r}; opening it is refused unless unsafe paths "
                "are allowed"
            )
        path = resolve_stored_name(
            self.location, self.data_file_name, allow_unsafe=True, what="external data file"
        )
        self.data_f = ImageFile(path, writable=False)
        self.extra_files.append(self.data_f)

    def _feature_list(self, bits: int, kind: int, names: dict[int, str]) -> list[str]:
        return [
            self.feature_names.get((kind, b)) or names.get(b, f"bit {b}")
            for b in range(64)
            if bits >> b & 1
        ]

    def info(self) -> dict[str, object]:
        d: dict[str, object] = {
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
            "snapshots": [
                {k: s[k] for k in ("id", "name", "date_sec", "vm_state_size", "disk_size")}
                for s in self.snapshots
            ],
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
            d["snapshot_view"] = {
                "id": self.snapshot_view["id"],
                "name": self.snapshot_view["name"],
            }
        return d

    def _write_feature_bits(self) -> None:
        if self.version < 3:
            return
        struct.pack_into(">Q", self.header_raw, L.OFF_INCOMPATIBLE, self.incompat)
        struct.pack_into(">Q", self.header_raw, L.OFF_AUTOCLEAR, self.autoclear)
        self.f.sync()
        self.f.pwrite(
            L.OFF_INCOMPATIBLE, self.header_raw[L.OFF_INCOMPATIBLE : L.OFF_INCOMPATIBLE + 24]
        )

    def _write_header_area(self, backing: str | None, fmt: str | None) -> None:
        exts = [(t, d) for t, d in self.extensions if t != L.EXT_BACKING_FORMAT]
        if fmt:
            exts.insert(0, (L.EXT_BACKING_FORMAT, fmt.encode()))
        area = bytearray(self.header_raw)
        for t, d in exts:
            area += L.HeaderExtension.build({"type": t, "length": len(d)})
            area += d + bytes(-len(d) % 8)
        area += bytes(8)  # end of the extension area
        name = backing.encode() if backing else b""
        if len(name) > L.MAX_BACKING_NAME:
            raise InvalidArgument(
                f"{self.location}: backing file name longer than "
                f"{L.MAX_BACKING_NAME} bytes: {backing!r}"
            )
        bf_off = len(area) if name else 0
        area += name
        if len(area) > self.cs:
            raise InvalidArgument(
                f"{self.location}: header, extensions and backing file name "
                f"({len(area)} bytes) do not fit in the first cluster "
                f"({self.cs} bytes)"
            )
        struct.pack_into(">QI", area, L.OFF_BACKING_FILE_OFFSET, bf_off, len(name))
        self.header_raw[:] = area[: self.header_length]
        # the rest of cluster 0 is reserved for this area: rewrite it whole
        self.f.pwrite(0, bytes(area) + bytes(self.cs - len(area)))
        self.f.sync()
        self.extensions = exts
        self.backing_file_offset = bf_off
