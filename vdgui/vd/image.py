"""Image: one opened image of one backend (one chain member).

Contract every backend implements (offsets and lengths are multiples of ``sector_size`` and lie
inside ``[0, size)``; the Disk guarantees that):

* ``block_status(offset, length)`` -> list of ``(start, length, Alloc)`` covering exactly the range,
  adjacent runs of the same status merged. DATA: this image holds the bytes. ZERO: this image says
  "reads as zeroes" (hides the parent). UNALLOCATED: not here, look at the parent (zeroes for a
  base).
* ``read(offset, length)`` -> bytes of this image's own view (UNALLOCATED/ZERO parts read as zero).
* ``write(offset, data, fill)`` writes into this image. When it must allocate a block larger than
  the write, it asks ``fill(offset, length)`` for the content below it (parent chain, or zeroes)
  to complete the block (copy-on-write). ``write_zeroes(offset, length, fill)``: the range reads
  zeroes, as markers or holes where the format can (never written zeroes where it need not).
* metadata attributes below; ``set_*`` raise NotSupported unless the format can store the field.
* operation hooks (``compact``, ``resize``, ``check``, ``set_parent``, ``discard``) exist when the
  backend declares the matching :class:`~vdgui.vd.backend.Operation`.
"""

from __future__ import annotations

import os
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NoReturn

from .alloc import Alloc
from .backend import Backend, DeviceType, ImageFlags
from .errors import (
    CorruptImage,
    InvalidArgument,
    NotSupported,
    ParentMismatch,
    ReadOnlyImage,
    VDError,
)
from .fileio import ImageFile, real_path, resolve_stored_name
from .sparse import first_nonzero, zeroes

if TYPE_CHECKING:  # pragma: no cover
    from .geometry import Geometry
    from .progress import ProgressCallback

FillFn = Callable[[int, int], bytes]


@dataclass
class ParentHint:
    """How a differencing image names its parent, as stored in the image."""

    locations: list[str] = field(default_factory=list)  # as stored, most specific first
    uuid: uuidlib.UUID | None = None
    format: str | None = None  # as stored: backend or qemu name
    # (chain.parent_format maps it)


@dataclass(frozen=True)
class Region:
    """One region of a disk (VirtualBox's VDREGIONDESC): a CD track, or the whole disk."""

    start: int  # byte offset in the disk
    length: int  # bytes
    block_size: int  # bytes per block (512 disk, 2048 data CD, 2352 raw/audio CD)
    data_form: str  # RAW, MODE1_2048, MODE1_2352, MODE2_2336, MODE2_2352, CDDA
    metadata_form: str = "NONE"
    number: int = 1  # track number

    @property
    def blocks(self) -> int:
        return self.length // self.block_size if self.block_size else 0

    def as_dict(self) -> dict:
        return {
            "number": self.number,
            "start": self.start,
            "length": self.length,
            "block_size": self.block_size,
            "blocks": self.blocks,
            "data_form": self.data_form,
            "metadata_form": self.metadata_form,
        }


class ProblemCode:
    """Stable codes of check findings, shared by every format. Repair decides what to fix from
    the code (and the format's own record of where), never from the wording of ``what``, which
    is for people and may change."""

    OPEN_FAILED = "OPEN_FAILED"  # the image cannot be opened at all
    HEADER_FIELD = "HEADER_FIELD"  # a header field holds an invalid value
    HEADER_CHECKSUM = "HEADER_CHECKSUM"  # a header's checksum does not match its bytes
    HEADER_COPY = "HEADER_COPY"  # a header's second copy missing, damaged or different
    FOOTER = "FOOTER"  # a footer (or its copy) missing, damaged or different
    NOT_CLOSED = "NOT_CLOSED"  # the image was not closed cleanly (dirty/in-use flag)
    LOG_PENDING = "LOG_PENDING"  # a journal holds changes not yet applied
    PARENT_LOCATOR = "PARENT_LOCATOR"  # a parent locator's data is outside the file
    ENTRY_INVALID = "ENTRY_INVALID"  # a table entry has reserved bits/unknown state/bad alignment
    ENTRY_PAST_END = "ENTRY_PAST_END"  # a table entry points past the end of the file
    OVERLAP = "OVERLAP"  # data or a table overlaps metadata
    CROSS_LINKED = "CROSS_LINKED"  # two entries point at one block/cluster
    ALLOC_POINTER = "ALLOC_POINTER"  # the next-allocation count/offset lies below used data
    REFCOUNT = "REFCOUNT"  # a stored reference count differs from the references
    TABLE_MISMATCH = "TABLE_MISMATCH"  # two copies of a table (primary/redundant) disagree
    EXTENT = "EXTENT"  # an extent file is missing, short or aliases another
    SUBCLUSTER = "SUBCLUSTER"  # a subcluster bitmap holds an invalid combination
    LEAK = "LEAK"  # space that nothing references


@dataclass
class Problem:
    """One finding of a consistency check. ``code`` is one of :class:`ProblemCode`."""

    severity: str  # "corrupt" or "leak"
    what: str  # human readable, names the structure and the location
    offset: int | None = None
    repaired: bool = False
    code: str = ""

    def as_dict(self) -> dict:
        return {
            "severity": self.severity,
            "code": self.code,
            "what": self.what,
            "offset": self.offset,
            "repaired": self.repaired,
        }


@dataclass
class CheckReport:
    problems: list[Problem] = field(default_factory=list)
    repaired: bool = False
    # file areas (file, offset, length) that hold blocks no table references, which a repair
    # drops or reuses: CHECK hooks list them; ops.repair keeps those that hold data
    orphans: list[tuple[str, int, int]] = field(default_factory=list)
    orphans_file: str | None = None  # where a repair saved the orphans holding data
    backup: str | None = None  # the copy of the image made before repairing

    @property
    def corrupt(self) -> bool:
        return any(p.severity == "corrupt" and not p.repaired for p in self.problems)

    @property
    def leaks(self) -> bool:
        return any(p.severity == "leak" and not p.repaired for p in self.problems)

    @property
    def exit_code(self) -> int:
        return 2 if self.corrupt else 3 if self.leaks else 0


class Image:
    """Base class; backends subclass it. Attributes are filled by the backend on open."""

    backend: Backend
    sector_size: int = 512
    # a new image reads zeroes where nothing was written; False (raw LUKS, as qemu's) makes a
    # copy write the zeroes too
    zero_init: bool = True

    def __init__(self, backend: Backend, location: str, read_only: bool):
        self.backend = backend
        self.location = location
        self.read_only = read_only
        self.size: int = 0  # virtual size in bytes
        self.block_size: int = 512  # allocation granularity in bytes
        self.flags: ImageFlags = ImageFlags.NONE
        self.uuid: uuidlib.UUID | None = None
        self.modification_uuid: uuidlib.UUID | None = None
        self.parent_uuid: uuidlib.UUID | None = None
        self.parent_modification_uuid: uuidlib.UUID | None = None
        self.comment: str | None = None
        self.pchs: Geometry | None = None
        self.lchs: Geometry | None = None
        self.parent_hint: ParentHint | None = None  # None for a base image
        # set by an operation that relinks the children itself (merge): writes keep the identity
        # children link to (VMDK CID, VHDX DataWriteGuid), so the chain opens at every moment
        self.keep_link_identity: bool = False
        # set by Disk from OpenFlags.HONOR_ZEROES: written zero blocks stay allocated
        self.honor_zeroes: bool = False
        # encrypted images (issue #17): what `info` shows without a passphrase (format, cipher,
        # keyslots), None when the image is not encrypted
        self.encryption: dict | None = None

    # -- identity ------------------------------------------------------------------------
    @property
    def format(self) -> str:
        return self.backend.name

    @property
    def is_diff(self) -> bool:
        return self.parent_hint is not None

    @property
    def device_type(self) -> DeviceType:
        return self.backend.device_type_for(self.location)

    @property
    def max_size(self) -> int | None:
        """The largest virtual size this image can be resized to (formats whose limit depends
        on a block or cluster size fixed at creation override it)."""
        return self.backend.max_size

    def files(self) -> list[str]:
        """Every file that makes this image (descriptor and extents, data files...)."""
        return [self.location]

    @property
    def single_file(self) -> bool:
        """True when this image is exactly the one file at ``location`` (compared as real
        paths, whatever spelling -- relative, absolute, through a symbolic link -- either uses).
        Operations decide here between the copy-and-rename path and in-place work."""
        files = self.files()
        return len(files) == 1 and real_path(files[0]) == real_path(self.location)

    def open_files(self) -> list:
        """The :class:`~vdgui.vd.fileio.ImageFile` objects this image holds open (its own, and
        those of images or layers it holds), found among its attributes."""
        out: list = []
        seen: set[int] = set()

        def walk(v: object, depth: int) -> None:
            if id(v) in seen or depth > 3:
                return
            if isinstance(v, ImageFile):
                seen.add(id(v))
                out.append(v)
            elif isinstance(v, dict):
                for x in v.values():
                    walk(x, depth + 1)
            elif isinstance(v, (list, tuple)):
                for x in v:
                    walk(x, depth + 1)
            elif isinstance(v, Image) or (hasattr(v, "__dict__") and depth == 1):
                seen.add(id(v))
                for x in vars(v).values():
                    walk(x, depth + 1)

        for v in vars(self).values():
            walk(v, 1)
        return out

    def check_in_place(self, what: str = "the operation") -> None:
        """Raise ImageChanged unless every file this image holds open is still the file at its
        path (same device and inode): called before relinking or deleting anything."""
        for f in self.open_files():
            f.check_in_place(what)

    @property
    def allocated_size(self) -> int:
        """Bytes the image's files take on the storage (allocated blocks, not their length)."""
        total = 0
        for f in self.files():
            try:
                total += os.stat(f).st_blocks * 512
            except OSError:
                pass
        return total

    def info(self) -> dict:
        """Format-specific facts for `info` (subformat, cluster size, regions...)."""
        return {}

    def regions(self) -> list[Region]:
        """VDQueryRegions: the disk's regions. Default: one region covering the whole disk."""
        if self.device_type is DeviceType.OPTICAL:
            return [Region(0, self.size, 2048, "MODE1_2048")]
        return [Region(0, self.size, self.sector_size, "RAW")]

    def check_parent_link(self, parent: Image) -> None:
        """Raise ParentMismatch if ``parent`` is not this image's parent (default: UUIDs)."""
        if (
            self.parent_uuid is not None
            and parent.uuid is not None
            and self.parent_uuid != parent.uuid
        ):
            raise ParentMismatch(
                f"{self.location}: differencing image does not belong to {parent.location}",
                field="parent UUID",
                expected=parent.uuid,
                found=self.parent_uuid,
            )

    # -- data ----------------------------------------------------------------------------
    def block_status(self, offset: int, length: int) -> list[tuple[int, int, Alloc]]:
        raise NotImplementedError

    def read(self, offset: int, length: int) -> bytes:
        raise NotImplementedError

    def write(self, offset: int, data: bytes, fill: FillFn) -> None:
        raise ReadOnlyImage(f"{self.location}: {self.format} images cannot be written")

    def stored_runs(self, offset: int, length: int) -> list[tuple[ImageFile, int, int]] | None:
        """Where this image stores the range's bytes as they read (no table, compression or
        cipher between): ``(file, file offset, length)`` pieces in order, for copy_file_range.
        None when any part is stored otherwise or not at all. Default: None."""
        return None

    def flat_file(self) -> ImageFile | None:
        """The file that holds this image's bytes at their own offsets with nothing to update
        when they are written (RAW, fixed VHD): a copy may fill it with copy_file_range. None
        otherwise (default)."""
        return None

    @property
    def sparse_writes(self) -> bool:
        """True when ``write`` itself leaves the all-zero parts of data written to unallocated
        blocks unstored (they read zeroes), so a copy into this image need not test its data
        for zeroes first. Default: False."""
        return False

    def discard(self, offset: int, length: int, fill: FillFn | None = None) -> None:
        """The range reads as zeroes afterwards. ``fill`` gives the content below this image,
        for backends that must copy the rest of a partly discarded block."""
        raise NotSupported(f"{self.location}: discard is not supported for {self.format}")

    def close_holes(self, progress: ProgressCallback | None = None) -> bool:
        """After discards (part of DISCARD, optional): move the blocks lying above holes of the
        file down into them, in place, in compaction.move_blocks' crash-safe order, and shrink
        the file. Reads no guest data (no zero scan, no verification read). False: the format
        has no such step here (the caller may compact instead)."""
        return False

    def write_zeroes(self, offset: int, length: int, fill: FillFn) -> None:
        """The range reads as zeroes afterwards, stored as cheaply as the format can: zero
        markers (hiding a parent), blocks left or made unallocated where the image has no
        parent, holes; zero bytes are written only where none of these is possible. A range
        may come out UNALLOCATED only where this image reads zeroes there without a parent:
        an operation whose image has (or will have) a parent checks those ranges
        (``ops.pipeline.store_zeroes``). ``fill``: the content below, for partial blocks.
        Default: zero data through ``write`` with ``honor_zeroes`` off (markers where the
        format's write makes them)."""
        saved = self.honor_zeroes
        self.honor_zeroes = False
        try:
            pos, end = offset, offset + length
            while pos < end:
                n = min(end - pos, 4 << 20)
                self.write(pos, zeroes(n), fill)
                pos += n
        finally:
            self.honor_zeroes = saved

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def require_writable(self) -> None:
        if self.read_only:
            raise ReadOnlyImage(f"{self.location}: image is opened read-only")

    # set by a backend whose tables are cross-linked (two entries naming one block: a write
    # through one would change what the other reads); data writes are then refused
    write_refusal: str | None = None

    def _refuse_cross_linked(self) -> None:
        if self.write_refusal:
            raise CorruptImage(
                f"{self.write_refusal} (cross-linked): a write would change both; "
                "writes are refused until check --repair fixes it",
                path=self.location,
            )

    # -- metadata setters (vd.h VDSetUuid etc.) -------------------------------------------
    def _no_field(self, what: str) -> NoReturn:
        raise NotSupported(f"{self.location}: the {self.format} format cannot store {what}")

    def set_uuid(self, value: uuidlib.UUID) -> None:
        self._no_field("an image UUID")

    def set_modification_uuid(self, value: uuidlib.UUID) -> None:
        self._no_field("a modification UUID")

    def set_parent_uuid(self, value: uuidlib.UUID) -> None:
        self._no_field("a parent UUID")

    def set_parent_modification_uuid(self, value: uuidlib.UUID) -> None:
        self._no_field("a parent modification UUID")

    def set_comment(self, value: str) -> None:
        self._no_field("a comment")

    def set_pchs(self, value: Geometry) -> None:
        self._no_field("a physical geometry")

    def set_lchs(self, value: Geometry) -> None:
        self._no_field("a logical geometry")

    def change_passphrase(self, iter_time_ms: int | None = None) -> int:
        """Encrypted images (issue #17): add a keyslot for the current passphrase provider's
        new passphrase, then remove the keyslots its current passphrases open. Returns the new
        keyslot's number."""
        raise NotSupported(f"{self.location}: not an encrypted image (no passphrase to change)")

    # -- operation hooks (declared through Backend.operations) ------------------------------
    def relink_refusal(self, parent: Image | None) -> str | None:
        """Why ``set_parent(parent)`` would be refused, or None. Writes nothing: a merge asks
        before it writes a single byte."""
        return None

    def set_parent(self, parent: Image | None) -> None:
        """Rewrite every link field so that ``parent`` is this image's parent (None: make base)."""
        self._no_field("a new parent link")

    def resize(self, new_size: int, progress: ProgressCallback | None = None) -> None:
        raise NotSupported(f"{self.location}: resize is not supported for {self.format}")

    def _refuse_cut_data(self, new_size: int) -> None:
        """For RESIZE hooks that shrink: refuse when this image itself holds a non-zero byte at
        or after ``new_size`` (the operation checks the whole chain before that)."""
        at = first_nonzero(
            (
                (s, n)
                for s, n, st in self.block_status(new_size, self.size - new_size)
                if st == Alloc.DATA
            ),
            self.read,
        )
        if at is not None:
            raise InvalidArgument(
                f"{self.location}: cannot shrink to {new_size} bytes: the part "
                f"beyond the new end holds data (first non-zero byte at offset "
                f"{at:#x})"
            )

    def resizes_in_place(self, new_size: int) -> bool:
        """True when ``resize(new_size)`` on this very file is safe against interruption: every
        write before the last one goes to space nothing reads yet (or frees what nothing will
        read), and the last one makes the new size visible at once. The operation then resizes
        the file in place instead of working on a verified copy. Default: no."""
        return False

    def compact(
        self, progress: ProgressCallback | None = None, parent_read: FillFn | None = None
    ) -> None:
        """Drop zero blocks (and those matching ``parent_read``'s content if given), close holes."""
        raise NotSupported(f"{self.location}: compact is not supported for {self.format}")

    def check(
        self, repair: bool = False, dry_run: bool = False, progress: ProgressCallback | None = None
    ) -> CheckReport:
        raise NotSupported(f"{self.location}: check is not supported for {self.format}")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.location!r} size={self.size}>"


def check_backing_name(image: Image, stored: str | None, parent: Image) -> None:
    """For formats that link to their parent only by a stored file name (qcow2, QED): raise
    ParentMismatch unless ``stored`` names ``parent`` (same file, or the same base name)."""
    if stored is None:
        return
    try:
        path = resolve_stored_name(image.location, stored, allow_unsafe=True, what="backing file")
    except VDError:
        path = stored
    if os.path.realpath(path) == os.path.realpath(parent.location):
        return
    if os.path.basename(stored.replace("\\", "/")) == os.path.basename(parent.location):
        return
    raise ParentMismatch(
        f"{image.location}: backing file is not {parent.location}",
        field="backing file name",
        expected=stored,
        found=parent.location,
    )
