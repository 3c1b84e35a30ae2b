"""Disk: the container — an ordered chain of opened images (0 = base), read and written as one
device. Modelled on VirtualBox's VD API (VDOpen, VDCreateBase, VDCreateDiff, VDRead, VDWrite,
VDFlush, VDDiscardRanges, VDGet*/VDSet*, VDFilterAdd/Remove/Info)."""
from __future__ import annotations

import os
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .align import align_up
from .backend import Backend, CreateParams, ImageFlags, OpenFlags, Operation
from .errors import (
    CacheNotClean,
    ImageInUse,
    InvalidArgument,
    NotSupported,
    ParentMismatch,
    ParentNotFound,
    ReadOnlyImage,
    VDError,
)
from .filter import Filter, FilterUse
from .geometry import Geometry
from .image import Alloc, Image
from .registry import get_backend, probe
from .secrets import PassphraseProvider, using

if TYPE_CHECKING:  # pragma: no cover
    from .cache import DiskCache
    from .ioqueue import IoQueue
    from .library import Library
    from .progress import ProgressCallback


@dataclass(frozen=True)
class Extent:
    """One run of the allocation map: which chain member (index, or None) holds it."""
    start: int
    length: int
    level: int | None       # chain index of the image holding the run; None: nobody
    status: Alloc           # DATA, ZERO (explicit zeroes) or UNALLOCATED (reads zeroes)

    @property
    def end(self) -> int:
        return self.start + self.length


def _merge(runs: list, key: Callable[[tuple], object]) -> list:
    out: list = []
    for r in runs:
        if out and key(out[-1]) == key(r) and out[-1][0] + out[-1][1] == r[0]:
            last = out[-1]
            out[-1] = (last[0], last[1] + r[1]) + tuple(last[2:])
        else:
            out.append(r)
    return out


class Disk:
    """A chain of images. Use as a context manager to close everything."""

    def __init__(self) -> None:
        self.images: list[Image] = []
        self._flags: list[OpenFlags] = []
        # the filter chain (VDFilterAdd): reads pass the read filters last-added first,
        # writes the write filters in the order they were added
        self.filters: list[tuple[Filter, FilterUse]] = []
        self.cache: DiskCache | None = None     # VDCacheOpen: in front of the whole chain
        self._cache_library: Library | None = None
        self.queues: list[IoQueue] = []

    # -- chain management ----------------------------------------------------------------
    def __enter__(self) -> Disk:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            self.close()
        except BaseException:
            if exc_type is None:
                raise           # a failed final flush is the error of this block
            # an error is already on its way out (e.g. ENOSPC): it names the cause; the close
            # (every file is closed anyway) failing after it adds nothing

    def __len__(self) -> int:
        return len(self.images)

    @property
    def top(self) -> Image:
        if not self.images:
            raise InvalidArgument("no image opened in this disk")
        return self.images[-1]

    @property
    def size(self) -> int:
        return self.top.size

    @property
    def sector_size(self) -> int:
        return max((i.sector_size for i in self.images), default=512)

    def open(self, location: str, format: str | Backend | None = None,
             flags: OpenFlags = OpenFlags.NORMAL, config: dict | None = None, *,
             passphrases: PassphraseProvider | None = None) -> Image:
        """Open ``location`` as the new top of the chain (VDOpen). An encrypted image asks
        ``passphrases`` (default: the provider of :func:`vdgui.vd.secrets.using`)."""
        with using(passphrases):
            return self._open(location, format, flags, config)

    def _open(self, location: str, format: str | Backend | None,
              flags: OpenFlags, config: dict | None) -> Image:
        if flags & OpenFlags.SKIP_CONSISTENCY_CHECKS and not flags.read_only:
            raise InvalidArgument("skip-consistency-checks is only allowed for read-only opens")
        backend = (
            format
            if isinstance(format, Backend)
            else get_backend(format)
            if format
            else probe(location)
        )
        img = backend.open(location, flags, config)
        try:
            if img.parent_hint is not None:  # stored names become backend names
                from .chain import parent_format  # parent discovery: differencing images only
                img.parent_hint.format = parent_format(img.parent_hint)
            img.honor_zeroes = bool(flags & OpenFlags.HONOR_ZEROES)
            if not flags & OpenFlags.INFO:
                if self.images:
                    below = self.images[-1]
                    if not img.is_diff:
                        raise ParentMismatch(
                            f"{location}: is not a differencing image and cannot be "
                            f"opened above {below.location}"
                        )
                    img.check_parent_link(below)
                elif img.is_diff:
                    raise ParentNotFound(
                        f"{location}: differencing image opened without its parent "
                        "(open the chain from its base, or use open_chain)"
                    )
        except BaseException:
            img.close()
            raise
        self.images.append(img)
        self._flags.append(flags)
        return img

    @classmethod
    def open_chain(
        cls,
        location: str,
        format: str | None = None,
        flags: OpenFlags = OpenFlags.NORMAL,
        config: dict | None = None,
        *,
        parent_flags: OpenFlags | None = None,
        library: Library | None = None,
        passphrases: PassphraseProvider | None = None,
        cache: str | None = None,
    ) -> Disk:
        """Open ``location`` and every parent it names, base first. Parents open read-only
        unless ``parent_flags`` says otherwise; read-only opens take the shared lock (a parent
        of an image opened for writing, too: nobody may write or resize it meanwhile), unless
        FORCE_SHARE. Encrypted members ask ``passphrases`` (default: the current provider).
        ``cache``: a VCI cache file put in front (:meth:`cache_open`); without one, the cache
        ``library`` keeps for ``location`` (one that was not closed cleanly is emptied; one
        another process holds is skipped)."""
        with using(passphrases):
            disk = cls._open_chain(location, format, flags, config, parent_flags, library)
        try:
            if cache:
                disk.cache_open(cache)
            elif library is not None and (kept := library.cache(location)) is not None:
                disk._library_cache(*kept, library)
        except BaseException:
            disk.close()
            raise
        return disk

    def _library_cache(self, path: str, size: int | None, library: Library) -> None:
        try:
            self.cache_open(path, size=size)
        except ImageInUse:
            return                      # another open of this disk uses it now
        except CacheNotClean:
            self.cache_open(path, reset=True)
        self._cache_library = library   # it adds up the cache's hits and misses

    @classmethod
    def _open_chain(cls, location: str, format: str | None, flags: OpenFlags,
                    config: dict | None, parent_flags: OpenFlags | None,
                    library: Library | None) -> Disk:
        allow_unsafe = bool(flags & OpenFlags.ALLOW_UNSAFE_PATHS)
        if parent_flags is None:
            parent_flags = OpenFlags.READ_ONLY | (
                flags
                & (
                    OpenFlags.ALLOW_UNSAFE_PATHS
                    | OpenFlags.SKIP_CONSISTENCY_CHECKS
                    | OpenFlags.FORCE_SHARE
                )
            )
        # walk up with INFO opens to find the paths, then open for real base-first
        probe_flags = OpenFlags.INFO | OpenFlags.READ_ONLY | (flags & OpenFlags.ALLOW_UNSAFE_PATHS)
        backend = get_backend(format) if format else probe(location)
        entries: list[tuple[str, Backend]] = [(location, backend)]
        seen = {os.path.realpath(location)}
        while True:
            path, be = entries[-1]
            img = be.open(path, probe_flags, config if len(entries) == 1 else None)
            try:
                if not img.is_diff:
                    break
                from .chain import MAX_CHAIN_DEPTH, find_parent  # differencing images only
                ppath, pfmt = find_parent(img, allow_unsafe=allow_unsafe, library=library)
            finally:
                img.close()
            real = os.path.realpath(ppath)
            if real in seen:
                raise ParentMismatch(f"{path}: parent link loops back to {ppath}")
            if len(entries) >= MAX_CHAIN_DEPTH:
                raise InvalidArgument(f"{location}: chain deeper than {MAX_CHAIN_DEPTH} images")
            seen.add(real)
            entries.append((ppath, get_backend(pfmt) if pfmt else probe(ppath)))
        disk = cls()
        try:
            for i, (path, be) in enumerate(reversed(entries)):
                top = i == len(entries) - 1
                disk.open(path, be, flags if top else parent_flags, config if top else None)
        except BaseException:
            disk.close()
            raise
        return disk

    def close_top(self) -> None:
        img = self.images.pop()
        self._flags.pop()
        img.close()

    def detach(self, indices: list[int]) -> list[Image]:
        """Take the images at ``indices`` out of the chain without closing them (a merge that
        deletes them): returned highest index first."""
        removed = []
        for i in sorted(indices, reverse=True):
            removed.append(self.images.pop(i))
            self._flags.pop(i)
        return removed

    def close(self) -> None:
        """Close the cache and every image, top first; the first error (e.g. a failed final
        flush) is raised after all of them are closed."""
        first = None
        while self.queues:
            try:
                self.queues.pop().close()
            except BaseException as exc:
                first = first or exc
        try:
            self.cache_close()
        except BaseException as exc:
            first = exc
        while self.images:
            try:
                self.close_top()
            except BaseException as exc:
                first = first or exc
        if first is not None:
            raise first

    def io_queue(self, *, workers: int = 4, max_queued: int = 64) -> IoQueue:
        """An asynchronous request queue on this disk (VDAsyncRead/Write/Flush; see
        :mod:`vdgui.vd.ioqueue`); closed (queued requests run first) when the disk closes."""
        from .ioqueue import IoQueue
        q = IoQueue(self, workers=workers, max_queued=max_queued)
        self.queues.append(q)
        return q

    # -- cache image (VDCacheOpen / VDCacheClose) -------------------------------------------
    def cache_open(self, path: str, *, size: int | None = None, reset: bool = False) -> dict:
        """VDCacheOpen: put the VCI cache ``path`` in front of the chain (created with ``size``
        bytes when absent and ``size`` is given). Reads fill it, writes go through to the top
        image and then to the cached copies. A cache made for another disk, or not closed
        cleanly, is refused (``reset`` empties the latter). Returns its info."""
        if self.cache is not None:
            raise InvalidArgument(f"a cache is already attached ({self.cache.path})")
        from .cache import DiskCache  # the VCI format: loaded when a cache is used
        top = self.top
        self.cache = DiskCache.attach(path, top.location, top.size, create_size=size, reset=reset)
        return self.cache.info()

    def cache_close(self) -> None:
        """VDCacheClose: write the cache's map and mark it clean; the disk stays open."""
        c, self.cache = self.cache, None
        lib, self._cache_library = self._cache_library, None
        if c is not None:
            try:
                if lib is not None:
                    info = c.info()
                    if info["hits"] or info["misses"]:
                        lib.add_cache_counts(c.path, info["hits"], info["misses"])
            finally:
                c.close()

    def cache_info(self) -> dict | None:
        return self.cache.info() if self.cache is not None else None

    def _read_top(self, level: int, offset: int, length: int, buf: memoryview,
                  fill: bool) -> None:
        if self.cache is not None and level == len(self.images) - 1:
            self.cache.read(offset, length, buf,
                            lambda o, n, b: self._read_level(level, o, n, b, fill=True))
        else:
            self._read_level(level, offset, length, buf, fill)

    def image(self, index: int = -1) -> Image:
        try:
            return self.images[index]
        except IndexError:
            raise InvalidArgument(
                f"no image number {index} in a chain of {len(self.images)}"
            ) from None

    # -- creation ------------------------------------------------------------------------
    def create_base(
        self,
        location: str,
        size: int,
        format: str | Backend = "VDI",
        *,
        flags: ImageFlags = ImageFlags.NONE,
        comment: str | None = None,
        uuid: uuidlib.UUID | None = None,
        pchs: Geometry | None = None,
        lchs: Geometry | None = None,
        config: dict | None = None,
        progress: ProgressCallback | None = None,
        allow_unsafe_paths: bool = False,
    ) -> Image:
        """VDCreateBase: create a new base image and open it (read-write) as the only image."""
        if self.images:
            raise InvalidArgument("create_base needs an empty disk")
        backend = format if isinstance(format, Backend) else get_backend(format)
        if not backend.can(Operation.CREATE):
            raise NotSupported(f"creating images is not supported for {backend.name}")
        _check_create(backend, size, flags, config, location)
        img = backend.create(
            CreateParams(
                location=location,
                size=size,
                flags=flags,
                uuid=uuid,
                comment=comment,
                pchs=pchs,
                lchs=lchs,
                config=config,
                progress=progress,
                allow_unsafe_paths=allow_unsafe_paths,
            )
        )
        img.honor_zeroes = False
        self.images.append(img)
        self._flags.append(OpenFlags.NORMAL)
        return img

    def create_diff(
        self,
        location: str,
        format: str | Backend | None = None,
        *,
        flags: ImageFlags = ImageFlags.NONE,
        comment: str | None = None,
        uuid: uuidlib.UUID | None = None,
        config: dict | None = None,
        allow_unsafe_paths: bool = False,
        size: int | None = None,
    ) -> Image:
        """VDCreateDiff: create a child of the current top and open it as the new top (of the
        parent's size unless ``size`` is given)."""
        parent = self.top
        backend = (
            format
            if isinstance(format, Backend)
            else get_backend(format)
            if format
            else parent.backend
        )
        from .backend import Cap

        if not backend.caps & Cap.DIFF or not backend.can(Operation.CREATE):
            raise NotSupported(f"differencing images are not supported for {backend.name}")
        img = backend.create(
            CreateParams(
                location=location,
                size=parent.size if size is None else size,
                flags=flags | ImageFlags.DIFF,
                uuid=uuid,
                comment=comment,
                pchs=parent.pchs,
                lchs=parent.lchs,
                config=config,
                parent=parent,
                allow_unsafe_paths=allow_unsafe_paths,
            )
        )
        img.honor_zeroes = False
        self.images.append(img)
        self._flags.append(OpenFlags.NORMAL)
        return img

    # -- I/O -----------------------------------------------------------------------------
    def _read_level(
        self, level: int, offset: int, length: int, buf: memoryview, fill: bool = False
    ) -> None:
        """Fill ``buf`` (len == length) with the content seen at chain ``level``. ``buf`` must be
        pre-zeroed unless ``fill``, which writes the zeroes too."""
        while level >= 0:
            img = self.images[level]
            if offset >= img.size:
                break
            avail = min(length, img.size - offset)
            if fill and avail < length:
                buf[avail:] = bytes(length - avail)
            runs = img.block_status(offset, avail)
            if len(runs) == 1 and runs[0][2] == Alloc.UNALLOCATED:
                level -= 1  # common case: nothing here, look one lower without recursion
                length = avail
                buf = buf[:avail]
                continue
            for start, ln, st in runs:
                pos = start - offset
                if st == Alloc.DATA:
                    buf[pos : pos + ln] = img.read(start, ln)
                elif st == Alloc.UNALLOCATED:
                    self._read_level(level - 1, start, ln, buf[pos : pos + ln], fill)
                elif fill:
                    buf[pos : pos + ln] = bytes(ln)
            return
        if fill:
            buf[:] = bytes(len(buf))

    def read_below(self, level: int, offset: int, length: int) -> bytes:
        """What the images below image ``level`` read at ``offset`` (zeroes under the base)."""
        buf = bytearray(length)
        self._read_level(level - 1, offset, length, memoryview(buf))
        return bytes(buf)

    def read(self, offset: int, length: int, top: int | None = None, *,
             as_buffer: bool = False) -> bytes:
        """VDRead: ``length`` bytes at ``offset`` seen through the chain (up to image ``top``).
        ``as_buffer``: the bytearray filled is returned as it is (no copy into bytes)."""
        level = len(self.images) - 1 if top is None else top
        if level < 0 or level >= len(self.images):
            raise InvalidArgument(f"no image number {level} in the chain")
        size = self.images[level].size
        if offset < 0 or length < 0 or offset + length > size:
            raise InvalidArgument(
                f"read of {length} bytes at {offset} is outside the disk (size {size})"
            )
        if length == 0:
            return b""
        ss = self.unit
        a_start = offset - offset % ss
        a_end = min(align_up(offset + length, ss), size)
        buf = bytearray(a_end - a_start)
        self._read_top(level, a_start, a_end - a_start, memoryview(buf), False)
        if self.filters:
            self.decode(a_start, memoryview(buf))
        if a_start == offset and a_end == offset + length:
            return buf if as_buffer else bytes(buf)  # type: ignore[return-value]
        return bytes(buf[offset - a_start : offset - a_start + length])

    def read_many(self, ranges: list[tuple[int, int]]) -> list[bytes]:
        """Several reads at once: handed to the image together when the chain is one image
        that takes them so (iSCSI: its READs in flight together), with no cache or filter and
        every range whole blocks inside the disk; else one :meth:`read` after another."""
        img = self.top
        many = getattr(img, "read_many", None)
        bs = img.sector_size
        if (many is None or len(self.images) != 1 or self.cache is not None or self.filters
                or any(o < 0 or n <= 0 or o + n > img.size or o % bs or n % bs
                       for o, n in ranges)):
            return [self.read(o, n) for o, n in ranges]
        result: list[bytes] = many(ranges)
        return result

    def read_into(self, offset: int, out: bytearray | memoryview, top: int | None = None) -> None:
        """Like :meth:`read`, straight into the writable buffer ``out`` (len(out) bytes)."""
        out = memoryview(out).cast("B")
        length = len(out)
        ss = self.unit
        if offset % ss or (
            length % ss
            and offset + length != self.images[len(self.images) - 1 if top is None else top].size
        ):
            out[:] = self.read(offset, length, top)  # unaligned: through a copy
            return
        level = len(self.images) - 1 if top is None else top
        if level < 0 or level >= len(self.images):
            raise InvalidArgument(f"no image number {level} in the chain")
        size = self.images[level].size
        if offset < 0 or offset + length > size:
            raise InvalidArgument(
                f"read of {length} bytes at {offset} is outside the disk (size {size})"
            )
        if length:
            self._read_top(level, offset, length, out, True)
            if self.filters:
                self.decode(offset, out)

    def write(self, offset: int, data: bytes) -> None:
        """VDWrite: write through to the top image (copy-on-write handled by the backend)."""
        img = self.top
        if img.read_only:
            raise ReadOnlyImage(f"{img.location}: image is opened read-only")
        length = len(data)
        if offset < 0 or offset + length > img.size:
            raise InvalidArgument(
                f"write of {length} bytes at {offset} is outside the disk (size {img.size})"
            )
        if length == 0:
            return
        ss = self.unit
        a_start = offset - offset % ss
        a_end = min(align_up(offset + length, ss), img.size)
        if a_start != offset or a_end != offset + length:
            buf = bytearray(self.read(a_start, a_end - a_start))
            buf[offset - a_start : offset - a_start + length] = data
            data = bytes(buf)
            offset = a_start
        if self.filters:
            data = self.encode(offset, data)
        level = len(self.images) - 1
        try:
            img.write(offset, data, lambda o, n: self.read_below(level, o, n))
        except BaseException:
            if self.cache is not None:
                self.cache.invalidate(offset, len(data))   # what the image holds is unknown
            raise
        if self.cache is not None:
            self.cache.wrote(offset, data)

    # -- filters (VDFilterAdd / VDFilterRemove / VDFilterInfo) -------------------------------
    @property
    def unit(self) -> int:
        """The smallest I/O the chain and its filters take whole (bytes)."""
        return max([self.sector_size] + [f.data_unit for f, _u in self.filters])

    def add_filter(self, f: Filter, use: FilterUse = FilterUse.BOTH) -> None:
        """VDFilterAdd: ``f`` joins the read chain, the write chain or both."""
        if self.images and self.size % f.data_unit:
            raise InvalidArgument(
                f"filter {f.backend.name}: the disk's size {self.size} is not a multiple of its "
                f"{f.data_unit}-byte data unit"
            )
        self.filters.append((f, FilterUse(use)))

    def remove_filter(self, use: FilterUse = FilterUse.BOTH) -> Filter:
        """VDFilterRemove: the filter added last to the chain(s) ``use`` leaves them."""
        for i in range(len(self.filters) - 1, -1, -1):
            f, u = self.filters[i]
            if u & use:
                left = FilterUse(u & ~use)
                if left:
                    self.filters[i] = (f, left)
                else:
                    del self.filters[i]
                return f
        raise InvalidArgument("no filter to remove from this disk")

    def filter_info(self) -> list[dict]:
        """VDFilterInfo: each filter (never a secret) and the chains it is in."""
        return [
            {**f.info(), "read": bool(u & FilterUse.READ), "write": bool(u & FilterUse.WRITE)}
            for f, u in self.filters
        ]

    def decode(self, offset: int, buf: memoryview) -> None:
        """Stored bytes of whole units at ``offset`` -> what the user reads, in place."""
        for f, u in reversed(self.filters):
            if u & FilterUse.READ:
                f.decode(offset, buf)

    def encode(self, offset: int, data: bytes) -> bytes:
        """What the user writes -> the bytes stored (a new buffer; ``data`` is untouched)."""
        buf = bytearray(data)
        mv = memoryview(buf)
        for f, u in self.filters:
            if u & FilterUse.WRITE:
                f.encode(offset, mv)
        return bytes(buf)

    def flush(self) -> None:
        for img in self.images:
            if not img.read_only:
                img.flush()
        if self.cache is not None:
            self.cache.flush()

    def discard(self, offset: int, length: int) -> None:
        """VDDiscardRanges: the range reads as zeroes afterwards; space is freed where possible."""
        img = self.top
        if not img.backend.can(Operation.DISCARD):
            raise NotSupported(f"{img.location}: discard is not supported for {img.format}")
        img.require_writable()
        ss = self.sector_size
        if offset % ss or length % ss or offset < 0 or offset + length > img.size:
            raise InvalidArgument(
                f"discard range {offset}+{length} must be {ss}-byte aligned and inside the disk"
            )
        level = len(self.images) - 1
        if self.cache is not None:
            self.cache.invalidate(offset, length)
        img.discard(offset, length, fill=lambda o, n: self.read_below(level, o, n))

    # -- allocation query ----------------------------------------------------------------
    def allocation(
        self, offset: int = 0, length: int | None = None, *, top: int | None = None, bottom: int = 0
    ) -> list[Extent]:
        """Which chain member holds each range (between ``bottom`` and ``top``, inclusive).
        Runs below ``bottom`` are reported as UNALLOCATED with level None."""
        level = len(self.images) - 1 if top is None else top
        size = self.images[level].size
        if length is None:
            length = size - offset
        raw: list = []
        self._alloc_level_bounded(level, bottom, offset, length, raw)
        merged = _merge(raw, key=lambda r: (r[2], r[3]))
        return [Extent(s, n, lv, st) for s, n, lv, st in merged]

    def _alloc_level_bounded(self, level: int, bottom: int, offset: int, length: int,
                             out: list) -> None:
        if level < bottom:
            out.append((offset, length, None, Alloc.UNALLOCATED))
            return
        img = self.images[level]
        if offset >= img.size:
            out.append((offset, length, None, Alloc.UNALLOCATED))
            return
        avail = min(length, img.size - offset)
        for start, ln, st in img.block_status(offset, avail):
            if st == Alloc.UNALLOCATED:
                self._alloc_level_bounded(level - 1, bottom, start, ln, out)
            else:
                out.append((start, ln, level, st))
        if avail < length:
            out.append((offset + avail, length - avail, None, Alloc.UNALLOCATED))

    # -- metadata (VDGet*/VDSet*) --------------------------------------------------------
    def info(self, index: int = -1) -> dict:
        """Metadata of one chain member as plain data (used by the CLI and the GUI)."""
        from .backend import variant_words

        img = self.image(index)
        d = {
            "location": img.location,
            "format": img.format,
            "variant": variant_words(img.flags),
            "image_flags": int(img.flags),
            "virtual_size": img.size,
            "file_size": img.allocated_size,  # the key scripts read (allocated bytes)
            "uuid": str(img.uuid) if img.uuid else None,
            "modification_uuid": str(img.modification_uuid) if img.modification_uuid else None,
            "parent_uuid": str(img.parent_uuid) if img.parent_uuid else None,
            "parent_modification_uuid": (
                str(img.parent_modification_uuid) if img.parent_modification_uuid else None
            ),
            "comment": img.comment,
            "pchs": list(img.pchs) if img.pchs else None,
            "lchs": list(img.lchs) if img.lchs else None,
            "block_size": img.block_size,
            "device_type": img.device_type.value,
            "files": img.files(),
            "read_only": img.read_only,
        }
        if img.parent_hint is not None:
            d["parent_locations"] = list(img.parent_hint.locations)
            d["parent_format"] = img.parent_hint.format
        d["regions"] = [r.as_dict() for r in img.regions()]
        if img.encryption is not None:
            d["encryption"] = img.encryption
        extra = img.info()
        if extra:
            d["details"] = extra
        return d

    def set_uuid(self, index: int, value: uuidlib.UUID | None = None) -> None:
        self.image(index).set_uuid(value or uuidlib.uuid4())

    def set_modification_uuid(self, index: int, value: uuidlib.UUID | None = None) -> None:
        self.image(index).set_modification_uuid(value or uuidlib.uuid4())

    def set_parent_uuid(self, index: int, value: uuidlib.UUID) -> None:
        self.image(index).set_parent_uuid(value)

    def set_parent_modification_uuid(self, index: int, value: uuidlib.UUID) -> None:
        self.image(index).set_parent_modification_uuid(value)

    def set_comment(self, index: int, value: str) -> None:
        self.image(index).set_comment(value)

    def set_pchs(self, index: int, value: Geometry) -> None:
        self.image(index).set_pchs(value)

    def set_lchs(self, index: int, value: Geometry) -> None:
        self.image(index).set_lchs(value)


def _check_create(
    backend: Backend, size: int, flags: ImageFlags, config: dict | None = None, location: str = ""
) -> None:
    if size <= 0:
        raise InvalidArgument(f"image size must be positive, found {size}")
    if size % backend.size_granularity:
        raise InvalidArgument(
            f"{backend.name} image size must be a multiple of "
            f"{backend.size_granularity} bytes, found {size}"
        )
    backend.check_size(size, config, location)
    if flags & ImageFlags.FIXED and location:  # before anything is written
        from .space import require_space

        require_space(location, size, f"a fixed {backend.name} image")
    unsupported = (flags & ~ImageFlags.DIFF) & ~backend.create_flags
    if unsupported:
        from .backend import variant_words

        raise NotSupported(
            f"{backend.name} cannot create the variant '{variant_words(ImageFlags(unsupported))}'"
        )


def open_image(
    location: str,
    format: str | None = None,
    flags: OpenFlags = OpenFlags.NORMAL,
    config: dict | None = None,
    *,
    passphrases: PassphraseProvider | None = None,
) -> Disk:
    """Open one image alone (no parents; diffs need INFO). Convenience for tools."""
    d = Disk()
    d.open(location, format, flags, config, passphrases=passphrases)
    return d


__all__ = ["Disk", "Extent", "VDError", "open_image"]
