"""Qcow2Image (one opened version 2 or 3 image, put together from the concern mixins) and
the QCOW2 backend's open and create (its declaration and probe are the package's)."""
from __future__ import annotations

import struct
from collections import OrderedDict
from typing import TYPE_CHECKING

from ...align import ceil_div
from ...backend import (
    Backend,
    CreateParams,
    OpenFlags,
    too_large,
)
from ...config import parse_config
from ...errors import CorruptImage, InvalidArgument, NotSupported, ReadOnlyImage
from ...fileio import ImageFile, relative_name
from ...image import Image, ParentHint, check_backing_name
from ...secrets import SecretRequest, new_passphrase
from . import Qcow2Backend, limit_reason, qcow2_max_size
from . import layout as L
from .clusters import BE_U64, ClustersMixin, be_array
from .crypt import CRYPT_LUKS, CryptMixin, crypt_extension
from .header import HeaderMixin
from .refcount import RefcountsMixin, rc_set

if TYPE_CHECKING:
    from .bitmaps import BitmapsMixin
    from .check import CheckMixin
    from .maintenance import MaintenanceMixin
else:   # loaded on first use: most commands never check, compact, resize or keep bitmaps
    from ...later import later
    BitmapsMixin = later(f"{__package__}.bitmaps", "BitmapsMixin",
                         "_settle_bitmaps _drop_bitmaps _maintainable_bitmaps _mark_dirty "
                         "_count_bitmaps")
    CheckMixin = later(f"{__package__}.check", "CheckMixin",
                       "_xlinks_checked _check_cross_links _count_refs _check_subclusters "
                       "_stored_problems _copied_problems check _apply_fixes _rebuild_refcounts")
    MaintenanceMixin = later(f"{__package__}.maintenance", "MaintenanceMixin",
                             "compact close_holes _close_holes _repoint_clusters "
                             "resizes_in_place resize _shrink _cut_free_tail set_parent")


class Qcow2Image(HeaderMixin, ClustersMixin, RefcountsMixin, BitmapsMixin,
                 MaintenanceMixin, CheckMixin, CryptMixin):
    """One opened qcow2 (version 2 or 3) image (its state declared in :mod:`.state`)."""

    @property
    def max_size(self) -> int:
        return qcow2_max_size(self.cs)

    def __init__(self, backend: Backend, location: str, f: ImageFile, flags: OpenFlags,
                 snapshot: str | None = None, crypt_key: bytes | None = None) -> None:
        super().__init__(backend, location, f, flags.read_only)
        self._given_key = crypt_key             # a new encrypted image's key (create)
        self.open_flags = flags
        self.snapshot_view = None
        self._first_write_done = False
        self._tracked = []
        self.compress_writes = False            # set by create(Compress=1): convert -c
        self._cfree = None
        self.data_f = None
        self.data_file_name = None
        self._l2_cache = OrderedDict()
        self._l2_cache_bytes = 0
        self._rb_cache = {}
        self._punch_batch = None
        self._punch_deferred = []
        self._freed = []
        self._free = []
        self.rt = None
        self.snapshots = []
        self.bitmaps_ext = None
        self.write_blocked = None
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
        if ceil_div(snap["disk_size"], span) > snap["l1_size"] or snap["disk_size"] > (1 << 62):
            raise self._corrupt(f"snapshot {snap['id']}: L1 table too small for its disk size",
                                field="l1_size", expected=f">= {ceil_div(snap['disk_size'], span)}",
                                found=snap["l1_size"])
        self.l1 = be_array(self.f.read_exact(snap["l1_table_offset"], snap["l1_size"] * 8,
                                              f"snapshot {snap['id']} L1 table"))
        self.size = snap["disk_size"]
        self.snapshot_view = snap

    # ------------------------------------------------------------------ identity / info
    def files(self) -> list[str]:
        out = [self.location]
        if self.data_f is not None:
            out.append(self.data_f.path)
        return out

    def check_parent_link(self, parent: Image) -> None:
        check_backing_name(self, self.backing_file, parent)

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

    def _check_write(self) -> None:
        self.require_writable()
        if self.write_blocked:
            raise ReadOnlyImage(f"{self.location}: {self.write_blocked}")
        if not self._first_write_done:
            self._first_write_done = True
            self._tracked = []
            if self.version >= 3 and self.autoclear & ~L.AUTOCLEAR_DATA_FILE_RAW:
                self._settle_bitmaps()      # bitmaps.py: keep and track them, or drop them

    def close(self) -> None:
        # FileImage's (the external data file is one of its extra_files), then the key goes
        try:
            super().close()
        finally:
            self._wipe_crypt()


def open_image(backend: Qcow2Backend, location: str, flags: OpenFlags = OpenFlags.NORMAL,
           config: dict | None = None) -> Image:
    cfg = parse_config(backend.config_keys, config, owner=backend.name)
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
            from .v1 import QcowV1Image
            return QcowV1Image(backend, location, f, flags)
        return Qcow2Image(backend, location, f, flags, snapshot=cfg.get("Snapshot"))
    except BaseException:
        f.close()
        raise

def create_image(backend: Qcow2Backend, p: CreateParams) -> Qcow2Image:
    cfg = parse_config(backend.config_keys, p.config, creating=True, owner=backend.name)
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
    l1_size = ceil_div(p.size, span)
    if l1_size * 8 > L.MAX_L1_BYTES or p.size > qcow2_max_size(cs):
        raise too_large("QCOW2", p.size, qcow2_max_size(cs), p.location, limit_reason(cs))
    backing = fmt = None
    hint = None
    if p.parent is not None:
        backing = relative_name(p.location, p.parent.location)
        fmt = p.parent.backend.qemu_format
        hint = ParentHint(locations=[backing], format=p.parent.backend.name)
    order = rbits.bit_length() - 1
    hlen = 112 if version == 3 else 72
    encrypt = cfg["Encryption"] == "luks"
    if encrypt and cfg["Compress"]:
        raise InvalidArgument("QCOW2: compressed clusters cannot be encrypted (as qemu)")
    hdr = bytearray(L.Qcow2HeaderV2.build(dict(
        version=version, backing_file_offset=0, backing_file_size=0, cluster_bits=cb,
        size=p.size, crypt_method=CRYPT_LUKS if encrypt else 0, l1_size=l1_size,
        l1_table_offset=0,
        refcount_table_offset=cs, refcount_table_clusters=1, nb_snapshots=0,
        snapshots_offset=0)))
    if version == 3:
        hdr += L.Qcow2HeaderV3Tail.build(dict(
            incompatible_features=0, compatible_features=0, autoclear_features=0,
            refcount_order=order, header_length=hlen))
        hdr += bytes(hlen - len(hdr))   # compression_type 0 (zlib) + padding
    l1_clusters = max(1, ceil_div(l1_size * 8, cs))
    # clusters: 0 header, 1 refcount table, 2 refcount block, 3.. L1 table, then the LUKS
    # header and key material (encrypted images), as qemu places them
    used = 3 + l1_clusters
    area, key = b"", None
    if encrypt:
        from ...crypto import luks
        pw = new_passphrase(SecretRequest(p.location, "luks1", "new passphrase"))
        area, key = luks.create1(pw.reveal(), iter_time_ms=cfg["EncryptIterTime"],
                                 where=p.location)
        ext = crypt_extension(used * cs, len(area))
        hdr += L.HeaderExtension.build({"type": L.EXT_CRYPTO, "length": len(ext)}) + ext
        hdr += bytes(8)             # end of the extensions
        crypt_at = used * cs
        used += ceil_div(len(area), cs)
    per_block = cs * 8 // rbits
    if used > per_block:
        raise InvalidArgument(f"QCOW2: {rbits}-bit refcounts with {cs}-byte clusters cannot "
                              f"describe the initial {used} clusters in one block")
    struct.pack_into(">Q", hdr, L.OFF_L1_TABLE_OFFSET, 3 * cs)
    f = ImageFile.create_temp(p.location)
    try:
        f.truncate(used * cs)
        f.pwrite(0, bytes(hdr) + bytes(cs - len(hdr)))
        f.pwrite(cs, BE_U64.pack(2 * cs))
        blk = bytearray(cs)
        for c in range(used):
            rc_set(blk, c, 1, rbits)
        f.pwrite(2 * cs, blk)
        if area:
            f.pwrite(crypt_at, area)
        img = Qcow2Image(backend, p.location, f, OpenFlags.NORMAL, crypt_key=key)
        if backing is not None or fmt:
            img._write_header_area(backing, fmt)
            img = Qcow2Image(backend, p.location, f, OpenFlags.NORMAL, crypt_key=key)
        f.sync()
        f.commit()
        img.location = p.location
    except BaseException:
        f.abandon()
        raise
    img.parent_hint = hint
    img.compress_writes = bool(cfg["Compress"])
    if p.progress:
        p.progress(p.size, p.size)
    return img
