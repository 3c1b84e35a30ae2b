"""FileImage: the base of images kept in one open :class:`~vdgui.vd.fileio.ImageFile`.

It owns the file: ``flush`` writes back what the format keeps in memory (:meth:`_write_back`)
and then syncs; ``close`` flushes a writable image (a failed flush is an error, never ignored)
and closes the file and any others the image holds (``extra_files``), even when the flush fails.
``_corrupt`` builds the format's CorruptImage naming the image's file.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import CorruptImage
from .fileio import ImageFile
from .image import Image

if TYPE_CHECKING:
    from .backend import Backend


class FileImage(Image):
    """An image whose bytes live in ``self.f`` (an open ImageFile)."""

    def __init__(self, backend: Backend, location: str, f: ImageFile, read_only: bool) -> None:
        super().__init__(backend, location, read_only)
        self.f = f
        self.extra_files: list[ImageFile] = []     # other ImageFiles closed with this image

    def _corrupt(self, message: str, *, field: str | None = None, offset: int | None = None,
                 expected: object = None, found: object = None) -> CorruptImage:
        """A CorruptImage naming this image's file."""
        return CorruptImage(message, path=self.location, field=field, offset=offset,
                            expected=expected, found=found)

    def _write_back(self) -> None:
        """Metadata kept in memory that a flush writes before its sync (header counts)."""

    def _after_sync(self) -> None:
        """What a flush does once the file is synced (clear a dirty flag in the header)."""

    def flush(self) -> None:
        if self.read_only:
            return
        self._write_back()
        self.f.sync()
        self._after_sync()

    def close(self) -> None:
        try:
            if self.f.fd >= 0 and not self.read_only:
                self.flush()            # a failed fsync is an error, never ignored
        finally:
            try:
                self.f.close()
            finally:
                for extra in self.extra_files:
                    extra.close()
