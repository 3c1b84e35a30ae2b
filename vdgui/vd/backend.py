"""Backend declarations, modelled on VirtualBox's VDBACKEND / VD_CAP_* tables.

A Backend is one format plugin: it declares its name, capabilities, file extensions, config keys
and the operations it implements, scores a probe, and opens/creates :class:`~vdgui.vd.image.Image`
objects. The GUI and CLI decide everything from these declarations, never from format names.
"""
from __future__ import annotations

import enum
import functools
import importlib
import importlib.util
import os
import sys
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any, ClassVar, Self

from .config import ConfigKey
from .errors import InvalidArgument, NotSupported, require_text

if TYPE_CHECKING:  # pragma: no cover
    from .fileio import LockMode
    from .geometry import Geometry
    from .image import Image
    from .progress import ProgressCallback


class Cap(enum.IntFlag):
    """VD_CAP_* bits, same numbering as VirtualBox."""
    NONE = 0
    UUID = 1 << 0
    CREATE_FIXED = 1 << 1
    CREATE_DYNAMIC = 1 << 2
    CREATE_SPLIT_2G = 1 << 3
    DIFF = 1 << 4
    ASYNC = 1 << 5
    FILE = 1 << 6
    CONFIG = 1 << 7
    TCPNET = 1 << 8
    VFS = 1 << 9
    DISCARD = 1 << 10
    PREFERRED = 1 << 11


class ImageFlags(enum.IntFlag):
    """VD_IMAGE_FLAGS_* / VD_VMDK_IMAGE_FLAGS_* / VD_VDI_IMAGE_FLAGS_*: the image variant."""
    NONE = 0
    SPLIT_2G = 0x1            # VMDK: split into 2 GB extents
    RAWDISK = 0x2             # VMDK: raw host disk
    STREAM_OPTIMIZED = 0x4    # VMDK: streamOptimized
    ESX = 0x8                 # VMDK: ESX (vmfs)
    ZERO_EXPAND = 0x100       # VDI: zero-expand
    FIXED = 0x10000
    DIFF = 0x20000


VARIANT_WORDS = {
    "dynamic": ImageFlags.NONE,
    "standard": ImageFlags.NONE,
    "fixed": ImageFlags.FIXED,
    "split2g": ImageFlags.SPLIT_2G,
    "stream": ImageFlags.STREAM_OPTIMIZED,
    "esx": ImageFlags.ESX,
    "rawdisk": ImageFlags.RAWDISK,    # shown for raw disk VMDKs; made by create_raw_vmdk
}


def parse_variant(text: str | None) -> ImageFlags:
    """'fixed,split2g' -> ImageFlags; raises InvalidArgument on an unknown word."""
    flags = ImageFlags.NONE
    for word in (text or "").replace(" ", "").lower().split(","):
        if not word:
            continue
        if word not in VARIANT_WORDS:
            raise InvalidArgument(f"unknown variant '{word}' (known: {', '.join(VARIANT_WORDS)})")
        flags |= VARIANT_WORDS[word]
    return flags


def variant_words(flags: ImageFlags) -> str:
    """ImageFlags -> 'fixed,split2g' (the inverse of parse_variant; 'dynamic' when none)."""
    words = [w for w, f in VARIANT_WORDS.items() if f and flags & f and w != "standard"]
    if flags & ImageFlags.DIFF:
        words.append("diff")
    if not words or words == ["diff"]:
        words.insert(0, "dynamic")
    return ",".join(words)


class OpenFlags(enum.IntFlag):
    """VD_OPEN_FLAGS_* equivalents."""
    NORMAL = 0
    READ_ONLY = 1 << 0
    INFO = 1 << 1                      # metadata only: no parent check, nothing written
    HONOR_ZEROES = 1 << 2              # allocate blocks for all-zero writes too
    SKIP_CONSISTENCY_CHECKS = 1 << 3   # read-only opens only
    ALLOW_UNSAFE_PATHS = 1 << 4        # absolute / '..' / device names stored in images allowed
    # locks (locks.py's module docstring): read-write opens lock WRITE, read-only opens SHARED,
    # INFO opens nothing - unless one of these says otherwise
    FORCE_SHARE = 1 << 5               # qemu's -U: a read-only open that takes no lock
    LOCK_EXCLUSIVE = 1 << 6            # hold and share nothing (the image is deleted/replaced)
    LOCK_SHARED = 1 << 7               # an INFO open that still takes the SHARED lock

    @property
    def lock_mode(self) -> LockMode:
        from .fileio import LockMode
        if self & OpenFlags.LOCK_EXCLUSIVE:
            return LockMode.EXCLUSIVE
        if not self.read_only:
            return LockMode.WRITE
        if self & OpenFlags.FORCE_SHARE:
            return LockMode.NONE
        if self & OpenFlags.INFO and not self & OpenFlags.LOCK_SHARED:
            return LockMode.NONE
        return LockMode.SHARED

    @property
    def read_only(self) -> bool:
        return bool(self & (OpenFlags.READ_ONLY | OpenFlags.INFO))


class DeviceType(enum.Enum):
    HARD_DISK = "hdd"
    OPTICAL = "optical"
    FLOPPY = "floppy"


class Operation(enum.Enum):
    """Operations a backend implements through hooks on its Image class."""
    WRITE = "write"
    CREATE = "create"
    COMPACT = "compact"      # Image.compact(progress, parent_read)
    RESIZE = "resize"        # Image.resize(new_size, progress)
    CHECK = "check"          # Image.check(repair, dry_run, progress) -> CheckReport
    REPAIR = "repair"        # check(repair=True) can fix problems
    RELINK = "relink"        # Image.set_parent(parent_image | None), used by merge
    DISCARD = "discard"      # Image.discard(offset, length)
    COMMENT = "comment"      # Image.set_comment(text): the format stores a description


class Refusal(str):
    """Why an operation is refused; ``way_out`` names the operation that gets round it
    ("convert": a copy into another variant can), or is None."""
    way_out: str | None

    def __new__(cls, text: str, way_out: str | None = None) -> Self:
        self = super().__new__(cls, text)
        self.way_out = way_out
        return self


_OP_VERBS = {Operation.WRITE: "be written", Operation.CREATE: "be created here",
             Operation.COMPACT: "be compacted", Operation.RESIZE: "be resized",
             Operation.CHECK: "be checked", Operation.REPAIR: "be repaired",
             Operation.RELINK: "be relinked to another parent",
             Operation.DISCARD: "discard ranges", Operation.COMMENT: "store a description"}


@dataclass(frozen=True)
class FileExtension:
    ext: str
    device: DeviceType = DeviceType.HARD_DISK


@dataclass(frozen=True)
class ProbeInput:
    """What probing sees of a file: its name, size, first and last 64 KiB."""
    path: str
    size: int
    head: bytes
    tail: bytes

    @property
    def ext(self) -> str:
        return os.path.splitext(self.path)[1].lstrip(".").lower()


@dataclass
class CreateParams:
    """Everything a backend needs to create an image (base or differencing)."""
    location: str
    size: int
    flags: ImageFlags = ImageFlags.NONE
    uuid: uuidlib.UUID | None = None
    comment: str | None = None
    pchs: Geometry | None = None
    lchs: Geometry | None = None
    config: dict | None = None
    parent: Image | None = None   # set for a differencing image
    progress: ProgressCallback | None = None
    allow_unsafe_paths: bool = False

    def __post_init__(self) -> None:
        if self.comment is not None:
            require_text(self.comment, "the comment", self.location)


def too_large(fmt: str, size: int, limit: int, where: str = "", why: str = "") -> InvalidArgument:
    """The one message for a size above a format's limit: names the limit and the size asked."""
    from .sizes import describe_size
    return InvalidArgument(f"{where + ': ' if where else ''}{fmt} images can be at most "
                           f"{describe_size(limit)}{why}; asked for {describe_size(size)}")


def lazy_exports(package: str, *modules: str) -> Callable[[str], Any]:
    """A format package's module ``__getattr__`` (PEP 562): a name its declaration does not
    define is found in ``modules`` (relative names, tried in order, imported on first use), so
    ``vhd.VhdImage`` keeps working while importing ``vhd`` loads its declaration only."""
    def __getattr__(name: str) -> Any:
        if not name.startswith("__"):
            if importlib.util.find_spec(f"{package}.{name}") is not None:
                return importlib.import_module(f"{package}.{name}")    # a submodule: itself
            for rel in modules:
                mod = importlib.import_module(f"{package}.{rel}")
                if hasattr(mod, name):
                    return getattr(mod, name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    return __getattr__


def is_network_location(path: str) -> bool:
    """``scheme://…`` locations (e.g. iscsi://host/iqn/lun) name non-file images."""
    return "://" in path


class Backend:
    """Base class of all format backends. Subclasses set the class attributes and implement
    ``probe``, ``open`` and (when creatable) ``create``."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()          # e.g. qemu's name ('vpc' for VHD)
    qemu_name: ClassVar[str] = ""                    # qemu's name, when not name.lower() ('vpc')
    caps: ClassVar[Cap] = Cap.NONE
    extensions: ClassVar[tuple[FileExtension, ...]] = ()
    config_keys: ClassVar[tuple[ConfigKey, ...]] = ()
    operations: ClassVar[frozenset[Operation]] = frozenset()
    create_flags: ClassVar[ImageFlags] = ImageFlags.NONE  # variant bits create() accepts
    max_size: ClassVar[int | None] = None            # largest virtual size, default config keys
    size_granularity: ClassVar[int] = 512            # virtual sizes are multiples of this
    can_shrink: ClassVar[bool] = False               # RESIZE also to a smaller size
    url_schemes: ClassVar[tuple[str, ...]] = ()      # e.g. ("iscsi",) for network backends
    # encryption the format holds itself (issue #17): name (as `--encrypt` spells it) -> the
    # config keys that ask create() for it, e.g. {"luks": {"Encryption": "luks"}}
    encryptions: ClassVar[dict[str, dict[str, str]]] = {}
    # every image of this format is encrypted: creating and opening one for its data always
    # needs a passphrase (the raw LUKS container)
    needs_passphrase: ClassVar[bool] = False
    # a file named with one of its extensions that it cannot open is a damaged image of this
    # format, never raw data to guess at (a VDI's name; not a VMDK's: flat extents are raw)
    owns_extensions: ClassVar[bool] = False
    # an in-place resize changes nothing a differencing image's link to this image names (its
    # UUIDs, modification UUID, VMDK CID; links by file name only are not changed): resize then
    # never looks for children in the folder. False where it does: VHDX renews the
    # DataWriteGuid, a VHD child names the parent file's modification time.
    resize_keeps_child_links: ClassVar[bool] = False
    # the module holding the rest of the backend (open, create, its image classes), imported on
    # first use: a declaration and its probe stay cheap, so every backend probes (rule 6)
    # without loading the others' code (issue #18 goal 3). It imports the declaration, never
    # the other way round. Its ``open_image(backend, location, flags, config)`` and
    # ``create_image(backend, params)`` are open() and create() unless the backend overrides them.
    impl_module: ClassVar[str] = ""

    def __init_subclass__(cls, **kw: object) -> None:
        """Every backend's ``open`` runs inside the lock context its flags ask for, so each file
        it opens for the image is locked the same way (the one place locks are decided)."""
        super().__init_subclass__(**kw)
        op = cls.__dict__.get("open")
        if op is None or getattr(op, "_locks_applied", False):
            return

        @functools.wraps(op)
        def open(self: Backend, location: str, flags: OpenFlags = OpenFlags.NORMAL,
                 *args: object, **kwargs: object) -> Image:
            from .fileio import lock_context
            with lock_context(OpenFlags(flags).lock_mode):
                image: Image = op(self, location, flags, *args, **kwargs)
                return image
        # a mark on the wrapper, and the subclass's own open replaced by it: what this hook does
        open._locks_applied = True  # type: ignore[attr-defined]
        cls.open = open  # type: ignore[method-assign]

    # -- declarations -----------------------------------------------------------------------
    @property
    def qemu_format(self) -> str:
        """The name qemu knows this format by (a qcow2/QED child records its parent's so)."""
        return self.qemu_name or self.name.lower()

    def refusal(self, op: Operation, flags: ImageFlags | None = None) -> str | None:
        """Why an image of this backend, of the variant ``flags``, cannot do ``op``, with the way
        out when there is one; None when it can. The app offers actions from this alone."""
        if not self.can(op):
            return f"The {self.name} format cannot {_OP_VERBS.get(op, op.value)}"
        return None

    def can(self, op: Operation) -> bool:
        return op in self.operations

    @property
    def writable(self) -> bool:
        return Operation.WRITE in self.operations

    @property
    def creatable(self) -> bool:
        return Operation.CREATE in self.operations

    def device_type_for(self, path: str) -> DeviceType:
        ext = os.path.splitext(path)[1].lstrip(".").lower()
        for fe in self.extensions:
            if fe.ext == ext:
                return fe.device
        return self.extensions[0].device if self.extensions else DeviceType.HARD_DISK

    def default_extension(self) -> str:
        return self.extensions[0].ext if self.extensions else ""

    def compose_location(self, config: dict) -> str:
        """For CONFIG backends: the location string (URL) their keys describe."""
        return ""

    def parse_location(self, location: str) -> dict:
        """For CONFIG backends: decode a location (URL) into configuration keys."""
        return {}

    def max_size_for(self, config: dict | None = None) -> int | None:
        """The largest virtual size create() accepts with these configuration keys (block or
        cluster sizes change it in some formats); ``max_size`` is the answer for the defaults."""
        return self.max_size

    def config_value(self, config: dict | None, key: str) -> int | str | bytes:
        """A creation key's value from ``config``, or its default when absent or invalid
        (create() itself reports invalid values)."""
        from .config import parse_config
        from .errors import VDError
        try:
            value: int | str | bytes = parse_config(self.config_keys, config, creating=True,
                                                    owner=self.name)[key]
        except VDError:
            value = parse_config(self.config_keys, None, creating=True, owner=self.name)[key]
        return value

    def config_int(self, config: dict | None, key: str) -> int:
        """:meth:`config_value` of a key declared ``ValueType.INTEGER``."""
        value = self.config_value(config, key)
        if not isinstance(value, int):
            raise TypeError(f"{self.name}: configuration key {key} is not an integer key")
        return value

    def check_size(self, size: int, config: dict | None = None, where: str = "") -> None:
        """Refuse a virtual size above the limit for ``config`` (InvalidArgument naming it)."""
        limit = self.max_size_for(config)
        if limit is not None and size > limit:
            raise too_large(self.name, size, limit, where, self.limit_reason(config))

    def limit_reason(self, config: dict | None = None) -> str:
        """What makes the limit (appended to the message), e.g. ' with 64 KiB clusters ...'."""
        return ""

    # -- behaviour --------------------------------------------------------------------------
    def probe(self, src: ProbeInput) -> int:
        """Score 0..100: how sure this backend is that ``src`` is its format."""
        return 0

    def implementation(self) -> ModuleType:
        """The module named by ``impl_module``, imported now if it was not yet."""
        if not self.impl_module:
            raise NotSupported(f"{self.name}: this backend declares no implementation")
        mod = sys.modules.get(self.impl_module)
        return mod if mod is not None else importlib.import_module(self.impl_module)

    def open(self, location: str, flags: OpenFlags = OpenFlags.NORMAL,
             config: dict | None = None) -> Image:
        if not self.impl_module:
            raise NotSupported(f"{self.name}: opening images is not supported")
        from .fileio import lock_context
        with lock_context(OpenFlags(flags).lock_mode):
            image: Image = self.implementation().open_image(self, location, flags, config)
            return image

    def create(self, params: CreateParams) -> Image:
        make = getattr(self.implementation(), "create_image", None) if self.impl_module else None
        if make is None:
            raise NotSupported(f"creating images is not supported for {self.name}")
        image: Image = make(self, params)
        return image

    def __repr__(self) -> str:
        return f"<Backend {self.name}>"
