"""VhdState: the state a :class:`.image.VhdImage` holds, declared once for the maintenance
mixin that reads and updates it. :mod:`.image` sets every field on open."""
from __future__ import annotations

from array import array
from typing import TYPE_CHECKING

from ...backend import OpenFlags
from ...errors import NotSupported
from ...fileimage import FileImage
from ...fileio import ImageFile
from ...image import Problem
from .layout import Container


class VhdState(FileImage):
    f: ImageFile
    open_flags: OpenFlags
    fsize: int                              # the file's length
    # footer: the one in use, where it was found, where it is written
    footer: Container
    footer_from: str
    footer_offset: int
    disk_type: int
    size_source: str                        # "current size" or "geometry"
    size_rounded_from: int | None
    # dynamic and differencing disks: header (None on a fixed disk), BAT, blocks
    header: Container | None
    header_offset: int
    spb: int                                # sectors per block
    bm_size: int                            # sector bitmap, padded to a sector
    total: int                              # bytes a block takes: bitmap and data
    n_blocks: int
    bat_offset: int
    bat: array[int]
    used_end: int                           # end of the last metadata or block
    _bitmaps: dict[int, bytearray]          # block -> its sector bitmap
    _alloc_cache: tuple[tuple[int, int], list[int]] | None
    _footer_cache: tuple[tuple, bytes] | None
    # found on open: bad BAT entries (why, problem code), blocks running into the footer,
    # locators outside the file, other problems
    _bad: dict[int, str]
    _bad_code: dict[int, str]
    _intersects_footer: list[int]
    _bad_locators: set[int]
    _problems: list[Problem]
    # parent: (locator code, path) as stored, and the header's parent name
    locators: list[tuple[str, str]]
    parent_name: str

    @property
    def dyn_header(self) -> Container:
        """The dynamic disk header (dynamic and differencing disks)."""
        if self.header is None:
            raise NotSupported(f"{self.location}: a fixed VHD has no dynamic disk header")
        return self.header

    if TYPE_CHECKING:                       # defined by VhdImage
        @property
        def is_fixed(self) -> bool: ...

        def _parse_parent(self, hdr: Container, fsize: int) -> None: ...
        def _meta_regions(self) -> list[tuple[int, int, str]]: ...
        def _block_start(self, idx: int) -> int | None: ...
        def _bitmap(self, idx: int, start: int) -> bytearray: ...
        def _set_bat(self, idx: int, value: int) -> None: ...
        def _set_bats(self, values: dict[int, int]) -> None: ...
        def _footer_bytes(self) -> bytes: ...
        def _write_footer_at(self, offset: int) -> None: ...
        def _store_footer(self) -> None: ...
        def _store_header(self) -> None: ...
        def _rescan(self) -> None: ...
