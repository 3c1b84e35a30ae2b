"""VhdxState: the state a :class:`.image.VhdxImage` holds, declared once for the mixins
(metadata, maintenance) that read and update it. :mod:`.image` sets every field on open."""
from __future__ import annotations

import uuid as uuidlib
from array import array
from typing import TYPE_CHECKING

from ...backend import OpenFlags
from ...fileimage import FileImage
from ...fileio import ImageFile
from .layout import Container


class VhdxState(FileImage):
    f: ImageFile
    open_flags: OpenFlags
    file_len: int                           # the file's length, kept as it grows and shrinks
    alloc_end: int                          # where the next block goes (1 MiB aligned)
    creator: str
    # headers (2.2): the current one and its slot; problems found in the other copy
    hdr: Container
    hdr_slot: int
    header_problems: list[str]
    log_replayed: bool
    log_pending: bool
    # region table (2.4): the valid copy's bytes and index, its entries, GUID -> (offset, length)
    region_raw: bytes
    region_table: int
    region_entries: list[Container]
    vregions: dict[uuidlib.UUID, tuple[int, int]]
    # BAT (2.5)
    bat_offset: int
    bat_length: int
    bat_count: int
    cr: int                                 # chunk ratio
    payload_blocks: int
    _bat: array[int] | None                 # None until first needed (INFO opens skip it)
    bat: array[int]
    _sb_cache: dict[int, bytearray]         # chunk -> its sector bitmap block
    _fresh: dict[int, tuple[int, int]]      # see VhdxImage.__init__
    _data_guid_updated: bool
    _xlinks_checked: bool
    # metadata (2.6): item GUID -> (offset in the region, length, flags, table index)
    md_offset: int
    md_length: int
    md_entries: dict[uuidlib.UUID, tuple[int, int, int, int]]
    fp_flags: int
    leave_allocated: bool
    has_parent: bool
    physical_sector_size: int
    parent_locator: dict[str, str]
    parent_linkage2: uuidlib.UUID | None

    if TYPE_CHECKING:                       # defined by VhdxImage and the mixins
        @property
        def max_size(self) -> int: ...

        def _update_header(self, **changes: object) -> None: ...
        def _entry(self, idx: int) -> tuple[int, int]: ...
        def _set_entry(self, idx: int, state: int, off: int) -> None: ...
        def _set_entries(self, values: dict[int, tuple[int, int]]) -> None: ...
        def _bat_index(self, block: int) -> int: ...
        def _sb_index(self, chunk: int) -> int: ...
        def _block_offset(self, block: int, what: str = ...) -> int: ...
        def _check_state(self, block: int) -> int: ...
        def _partial_runs(self, block: int, inner: int,
                          n: int) -> list[tuple[int, int, bool]]: ...
        def _allocate(self, length: int) -> int: ...
        def _begin_write(self) -> None: ...
        def _fixed_spans(self) -> list[tuple[int, int, str, int | None]]: ...
        def _write_metadata_item(self, g: uuidlib.UUID, payload: bytes) -> None: ...
