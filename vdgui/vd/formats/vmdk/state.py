"""VmdkState: the state a :class:`.image.VmdkImage` holds, declared once for the mixins
(maintenance, check) that read and update it. :mod:`.image` and the backend's open set every
field."""
from __future__ import annotations

from typing import TYPE_CHECKING

from ...fileio import ImageFile
from ...image import Image
from .descriptor import Descriptor
from .extents import Extent

if TYPE_CHECKING:
    from collections.abc import Iterator

    from ...image import FillFn
    from . import VmdkBackend
    from .opener import ExtentOpener


class VmdkState(Image):
    backend: VmdkBackend
    desc: Descriptor
    desc_file: ImageFile | None             # the descriptor's file (None until opened)
    embedded: tuple[int, int] | None        # (offset, capacity) of an embedded descriptor
    extents: list[Extent]
    _starts: list[int]                      # each extent's first byte in the disk
    _files: dict[str, ImageFile]            # absolute path -> the file extents share
    extent_paths: list[str | None]          # as resolved (None for ZERO extents)
    cid: int
    parent_cid: int
    create_type: str
    info_only: bool                         # extent files not opened
    allow_unsafe: bool
    _cid_bumped: bool
    _desc_dirty: bool
    _stream_temp: ImageFile | None          # a streamOptimized image being written
    _closed: bool
    opener: ExtentOpener

    if TYPE_CHECKING:                       # defined by VmdkImage
        def _file(self, path: str, writable: bool) -> ImageFile: ...
        def _pieces(self, offset: int, length: int) -> Iterator[tuple[Extent, int, int]]: ...
        def write(self, offset: int, data: bytes, fill: FillFn | None) -> None: ...
        def _write_descriptor(self) -> None: ...
