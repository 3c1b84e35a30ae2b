"""VdiState: the state a :class:`.image.VdiImage` holds, declared once for the maintenance
mixin that reads and updates it. :mod:`.image` sets every field on open."""
from __future__ import annotations

from array import array
from collections.abc import Iterable
from typing import TYPE_CHECKING

from ...fileimage import FileImage
from ...fileio import ImageFile
from ...geometry import Geometry
from ...tables import BlockTable

if TYPE_CHECKING:
    from ...image import FillFn
from .layout import Container


class VdiState(FileImage):
    f: ImageFile
    # header: as parsed, its fields' file offsets, the version it has
    _h: Container
    _offs: dict[str, int]
    _v0: bool                               # version 0 header
    _discarded = False                      # discard left blocks nothing names: pack them
    _plus: bool                             # version 1.1+ header (LCHS)
    _hdr_dirty: bool
    _modified: bool                         # modification UUID renewed this session
    _stored_pchs: Geometry | None
    header_disk_size: int                   # cbDisk as stored (may be unaligned)
    image_type: int
    offset_blocks: int                      # the block map
    offset_data: int                        # the first file block
    block_extra: int
    blocks: int                             # block map entries
    allocated: int                          # blocks allocated, as the header counts them
    _total: int                             # bytes a file block takes (extra + data)
    _next: int                              # next free file block
    _bad: set[int]                          # block map entries not to write through
    _map_arr: array[int] | None             # None until first needed (INFO opens skip it)

    if TYPE_CHECKING:                       # defined by VdiImage
        @property
        def max_size(self) -> int: ...
        @property
        def _table(self) -> BlockTable: ...
        @property
        def _map(self) -> array[int]: ...
        @_map.setter
        def _map(self, m: array[int]) -> None: ...

        def _header_bytes(self) -> bytes: ...
        def _write_header(self) -> None: ...
        def _data_pos(self, ptr: int) -> int: ...
        def _file_blocks(self) -> int: ...
        def _scan_map(self) -> None: ...
        def _write_map_entries(self, indices: Iterable[int]) -> None: ...
        def _touch(self) -> None: ...
        def _write(self, offset: int, mv: memoryview, fill: FillFn, honor: bool) -> None: ...
