"""Qcow2State: what the concern mixins share (qemu's BDRVQcow2State). The attributes an open
sets (header fields, tables, caches), and the methods one mixin calls on another, declared
here so that each mixin is checked against the host it runs in."""
from __future__ import annotations

from array import array
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar, TypeAlias, TypedDict

from ...backend import OpenFlags
from ...fileimage import FileImage
from ...fileio import ImageFile

if TYPE_CHECKING:
    from ...image import FillFn, Problem

Bytes: TypeAlias = bytes | bytearray | memoryview
# add(offset, length, what) -> False when the range lies past the end of the file
RefCounter: TypeAlias = Callable[[int, int, str], bool]


class Snapshot(TypedDict):
    """One entry of the snapshot table, as read on open."""

    id: str
    name: str
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int
    disk_size: int
    l1_table_offset: int
    l1_size: int


class TrackedBitmap(TypedDict):
    """An enabled persistent dirty bitmap kept up to date on writes."""

    g: int                  # granularity bits
    table_offset: int
    table: array[int]       # bitmap table entries (host offsets of the bitmap clusters)


class Qcow2State(FileImage):
    """The state of one open qcow2 image, shared by the mixins of :class:`.image.Qcow2Image`."""

    L2_CACHE_BYTES: ClassVar[int] = 32 << 20

    f: ImageFile
    open_flags: OpenFlags
    fsize: int                          # file size as last seen or extended to
    next_cluster: int                   # first cluster past the end: where allocation goes
    # header (header.py)
    version: int
    cb: int                             # cluster bits
    cs: int                             # cluster size
    incompat: int
    compat: int
    autoclear: int
    refcount_order: int
    refcount_bits: int
    header_length: int
    header_raw: bytearray
    extended_l2: bool
    compression_type: int               # 0 zlib, 1 zstd
    l2_entries: int
    sc_size: int                        # subcluster size
    rb_entries: int                     # entries per refcount block
    extensions: list[tuple[int, bytes]]
    feature_names: dict[tuple[int, int], str]
    backing_file: str | None
    backing_format: str | None
    backing_file_offset: int
    data_file_name: str | None
    data_f: ImageFile | None
    bitmaps_ext: dict[str, int] | None
    nb_snapshots: int
    snapshots_offset: int
    snapshot_table_size: int
    snapshots: list[Snapshot]
    snapshot_view: Snapshot | None
    write_blocked: str | None
    # tables (clusters.py, refcount.py)
    l1: array[int]
    l1_offset: int
    rt: array[int] | None               # refcount table, loaded lazily
    rt_offset: int
    rt_clusters: int
    _l2_cache: OrderedDict[int, array[int]]
    _l2_cache_bytes: int
    _rb_cache: dict[int, bytearray]
    _punch_batch: list[list[int]] | None  # clusters a discard frees, punched together
    _punch_deferred: list[list[int]]    # freed by write_zeroes: punched at flush unless reused
    _freed: list[int]                   # clusters freed since the last sync (not reusable yet)
    _free: list[int]                    # freed before a sync: reusable (descending, no repeats)
    # writing
    compress_writes: bool
    _cfree: int | None                  # next free byte for packed compressed data
    _first_write_done: bool
    _tracked: list[TrackedBitmap]
    _orphans: list[tuple[str, int, int]]
    # encryption (crypt.py)
    _given_key: bytes | None            # a new encrypted image's key, known at create
    crypt_offset: int                   # the LUKS header's clusters (0, 0: none)
    crypt_length: int

    if TYPE_CHECKING:
        # defined by one mixin, called by another
        @property
        def max_size(self) -> int: ...
        def _check_write(self) -> None: ...
        # header.py
        def _write_feature_bits(self) -> None: ...
        def _write_header_area(self, backing: str | None, fmt: str | None) -> None: ...
        # clusters.py
        def _load_l2(self, off: int, where: str) -> array[int]: ...
        def _l2_of(self, l1_index: int) -> tuple[array[int] | None, int]: ...
        def _entry(self, ci: int) -> tuple[int, int]: ...
        def _compressed_range(self, e: int) -> tuple[int, int]: ...
        def _cluster_len(self, ci: int) -> int: ...
        def _data_file(self) -> ImageFile: ...
        def _own_view(self, start: int, n: int, fill: FillFn) -> bytearray: ...
        def _set_l1(self, l1i: int, value: int) -> None: ...
        def _replace_entry(self, ci: int, old: int, e: int, bm: int) -> None: ...
        # refcount.py
        def _load_rt(self) -> array[int]: ...
        def _refblock(self, rti: int) -> bytearray | None: ...
        def _rc_get_in(self, blk: bytearray, idx: int) -> int: ...
        def _rc_set_in(self, blk: bytearray, idx: int, value: int) -> tuple[int, int]: ...
        def refcount(self, ci: int) -> int: ...
        def _set_refcount(self, ci: int, value: int) -> None: ...
        def _alloc(self, n: int = 1, data: Bytes | None = None) -> int: ...
        def _unref(self, off: int, length: int, punch: bool = True) -> None: ...
        def _punch_batched(self) -> None: ...
        def _unref_entry(self, e: int) -> None: ...
        def _unref_clusters(self, clusters: list[int]) -> None: ...
        def _alloc_runs(self, n: int, data: Bytes) -> list[tuple[int, int]]: ...
        def _forget_free(self) -> None: ...
        # bitmaps.py
        def _settle_bitmaps(self) -> None: ...
        def _drop_bitmaps(self) -> None: ...
        def _mark_dirty(self, offset: int, length: int) -> None: ...
        def _count_bitmaps(self, add: RefCounter, problems: list[Problem]) -> None: ...
        # check.py
        def _check_cross_links(self) -> None: ...
        # crypt.py
        crypt_method: int
        def _setup_crypt(self, method: int, key: bytes | None = None) -> None: ...
        def _decrypt_host(self, host: int, data: Bytes, guest: int) -> bytes: ...
        def _write_data(self, host: int, data: Bytes) -> None: ...
        def _wipe_crypt(self) -> None: ...
