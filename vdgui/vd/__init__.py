"""The VD engine's public API. The GUI, jobs and CLI import from here only.

No Qt anywhere below this package.
"""
from typing import TYPE_CHECKING

from .align import align_up, ceil_div
from .backend import (
    Backend,
    Cap,
    CreateParams,
    DeviceType,
    FileExtension,
    ImageFlags,
    OpenFlags,
    Operation,
    ProbeInput,
    Refusal,
    is_network_location,
    parse_variant,
    variant_words,
)
from .config import ConfigKey, KeyFlag, ValueType, applicable_keys, parse_config
from .disk import Disk, Extent, open_image
from .errors import (
    AmbiguousFormat,
    AuthenticationError,
    CacheNotClean,
    Cancelled,
    ConfigError,
    CorruptImage,
    FileExists,
    ImageChanged,
    ImageInUse,
    ImageNotFound,
    InvalidArgument,
    NetworkError,
    NotSupported,
    ParentMismatch,
    ParentNotFound,
    PassphraseRequired,
    ReadOnlyImage,
    Refused,
    ScanIncomplete,
    UnknownFormat,
    UnsafePath,
    VDError,
    VDIOError,
    VDTimeoutError,
    WrongPassphrase,
    printable,
    user_path,
)
from .fileimage import FileImage
from .fileio import ImageFile, is_temp_name, read_small_file
from .filter import Filter, FilterBackend, FilterCap, FilterUse
from .filters import filters, get_filter
from .filters.keyfile import find_keystore, read_keystore_file, sidecar_path, write_sidecar
from .geometry import Geometry, vbox_lchs, vbox_pchs, vhd_chs
from .image import Alloc, CheckReport, Image, ParentHint, Problem, ProblemCode, Region
from .progress import Progress, ProgressCallback
from .registry import (
    NO_PLUGINS_ENV,
    PLUGIN_GROUP,
    BackendOrigin,
    PluginProblem,
    PluginReport,
    backend_origin,
    backends,
    backends_for_extension,
    get_backend,
    load_plugins,
    probe,
    probe_scores,
    register_backend,
)
from .secrets import Passphrase, PassphraseProvider, SecretRequest, read_passphrase_file
from .secrets import using as using_passphrases
from .sizes import describe_size, format_size, parse_size
from .temps import temp_name

if TYPE_CHECKING:  # the names below are imported on first use (__getattr__)
    from .cache import DEFAULT_SIZE as DEFAULT_CACHE_SIZE
    from .cache import cache_info
    from .filters.keystore import KeyStore
    from .inside import (
        ChangeReport,
        DiskFile,
        Entry,
        Layout,
        Partition,
        SliceFile,
        changed,
        disk_layout,
        extract_tree,
        extract_trees,
        open_volume,
        safe_extract_parts,
    )
    from .inside.volumes import volumes
    from .ioqueue import IoKind, IoQueue, IoRequest, IoState
    from .media import (
        DEFAULT_FLOPPY,
        FLOPPY_FORMATS,
        FloppyFormat,
        create_floppy,
        create_iso,
        create_raw_vmdk,
        floppy_format,
        folder_contents,
    )
    from .ops.compact import compact
    from .ops.compare import CompareResult, compare, compare_disks
    from .ops.copy import chain_target_names, copy_image, move_image, move_refusal
    from .ops.identity import give_new_uuid
    from .ops.merge import merge, merge_disk
    from .ops.repair import check, describe_effects
    from .ops.resize import resize
    from .ops.sparsify import SparsifyReport, VolumeResult, sparsify
    from .ops.sparsify import plan as sparsify_plan
    from .rawdisk import TEST_ENV as RAW_TEST_ENV
    from .rawdisk import RawDrive, host_drives, inspect_drive, parse_partitions

# imported on first use: a command imports only what it uses (vdgui-img's start-up, issue #18):
# the media library (sqlite3, XML), looking inside disks, media creation, the operations,
# host drives, the cache image (VCI), the request queue, the CRYPT key store's code
_LAZY: dict[str, str] = {"ImageRecord": "library", "Library": "library", "data_dir": "library",
                         "mark_duplicates": "library", "read_virtualbox_registry": "library"}
for _mod, _names in (
        ("cache", "DEFAULT_CACHE_SIZE:DEFAULT_SIZE cache_info"),
        ("filters.keystore", "KeyStore"),
        ("ioqueue", "IoKind IoQueue IoRequest IoState"),
        ("inside", "ChangeReport DiskFile Entry Layout Partition SliceFile changed disk_layout "
                   "extract_tree extract_trees open_volume safe_extract_parts volumes"),
        ("media", "DEFAULT_FLOPPY FLOPPY_FORMATS FloppyFormat create_floppy create_iso "
                  "create_raw_vmdk floppy_format folder_contents"),
        ("ops.compact", "compact"),
        ("ops.compare", "CompareResult compare compare_disks"),
        ("ops.copy", "chain_target_names copy_image move_image move_refusal"),
        ("ops.identity", "give_new_uuid"),
        ("ops.merge", "merge merge_disk"),
        ("ops.repair", "check describe_effects"),
        ("ops.resize", "resize resize_target"),
        ("ops.sparsify", "SparsifyReport VolumeResult sparsify sparsify_plan:plan"),
        ("rawdisk", "RawDrive host_drives inspect_drive parse_partitions RAW_TEST_ENV:TEST_ENV")):
    for _n in _names.split():
        _LAZY[_n.partition(":")[0]] = f"{_mod}:{_n.partition(':')[2] or _n.partition(':')[0]}"
del _mod, _names, _n

# the public API, named (the lazy names of the library included)
__all__ = [
    "DEFAULT_CACHE_SIZE",
    "DEFAULT_FLOPPY",
    "FLOPPY_FORMATS",
    "NO_PLUGINS_ENV",
    "PLUGIN_GROUP",
    "RAW_TEST_ENV",
    "Alloc",
    "AmbiguousFormat",
    "AuthenticationError",
    "Backend",
    "BackendOrigin",
    "CacheNotClean",
    "Cancelled",
    "Cap",
    "ChangeReport",
    "CheckReport",
    "CompareResult",
    "ConfigError",
    "ConfigKey",
    "CorruptImage",
    "CreateParams",
    "DeviceType",
    "Disk",
    "DiskFile",
    "Entry",
    "Extent",
    "FileExists",
    "FileExtension",
    "FileImage",
    "Filter",
    "FilterBackend",
    "FilterCap",
    "FilterUse",
    "FloppyFormat",
    "Geometry",
    "Image",
    "ImageChanged",
    "ImageFile",
    "ImageFlags",
    "ImageInUse",
    "ImageNotFound",
    "ImageRecord",
    "InvalidArgument",
    "IoKind",
    "IoQueue",
    "IoRequest",
    "IoState",
    "KeyFlag",
    "KeyStore",
    "Layout",
    "Library",
    "NetworkError",
    "NotSupported",
    "OpenFlags",
    "Operation",
    "ParentHint",
    "ParentMismatch",
    "ParentNotFound",
    "Partition",
    "Passphrase",
    "PassphraseProvider",
    "PassphraseRequired",
    "PluginProblem",
    "PluginReport",
    "ProbeInput",
    "Problem",
    "ProblemCode",
    "Progress",
    "ProgressCallback",
    "RawDrive",
    "ReadOnlyImage",
    "Refusal",
    "Refused",
    "Region",
    "ScanIncomplete",
    "SecretRequest",
    "SliceFile",
    "SparsifyReport",
    "UnknownFormat",
    "UnsafePath",
    "VDError",
    "VDIOError",
    "VDTimeoutError",
    "ValueType",
    "VolumeResult",
    "WrongPassphrase",
    "align_up",
    "applicable_keys",
    "backend_origin",
    "backends",
    "backends_for_extension",
    "cache_info",
    "ceil_div",
    "chain_target_names",
    "changed",
    "check",
    "compact",
    "compare",
    "compare_disks",
    "copy_image",
    "create_floppy",
    "create_iso",
    "create_raw_vmdk",
    "data_dir",
    "describe_effects",
    "describe_size",
    "disk_layout",
    "extract_tree",
    "extract_trees",
    "filters",
    "find_keystore",
    "floppy_format",
    "folder_contents",
    "format_size",
    "get_backend",
    "get_filter",
    "give_new_uuid",
    "host_drives",
    "inspect_drive",
    "is_network_location",
    "is_temp_name",
    "load_plugins",
    "mark_duplicates",
    "merge",
    "merge_disk",
    "move_image",
    "move_refusal",
    "open_image",
    "open_volume",
    "parse_config",
    "parse_partitions",
    "parse_size",
    "parse_variant",
    "printable",
    "probe",
    "probe_scores",
    "read_keystore_file",
    "read_passphrase_file",
    "read_small_file",
    "read_virtualbox_registry",
    "register_backend",
    "resize",
    "resize_target",
    "safe_extract_parts",
    "sidecar_path",
    "sparsify",
    "sparsify_plan",
    "temp_name",
    "user_path",
    "using_passphrases",
    "variant_words",
    "vbox_lchs",
    "vbox_pchs",
    "vhd_chs",
    "volumes",
    "write_sidecar",
]


def __getattr__(name: str):
    where = _LAZY.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib
    mod, _, attr = where.partition(":")
    value = getattr(importlib.import_module(f".{mod}", __name__), attr or name)
    globals()[name] = value
    return value
