"""The VD engine's public API. The GUI, jobs and CLI import from here only.

No Qt anywhere below this package.
"""
from .align import align_up, ceil_div
from .backend import (Backend, Cap, CreateParams, DeviceType, FileExtension, ImageFlags,
                      OpenFlags, Operation, ProbeInput, Refusal, is_network_location,
                      parse_variant, variant_words)
from .config import ConfigKey, KeyFlag, ValueType, applicable_keys, parse_config
from .disk import Disk, Extent, open_image
from .errors import (AmbiguousFormat, AuthenticationError, Cancelled, ConfigError, CorruptImage,
                     FileExists, ImageChanged, ImageInUse, ImageNotFound, InvalidArgument,
                     NetworkError, NotSupported, ParentMismatch, ParentNotFound, ReadOnlyImage, Refused,
                     ScanIncomplete, UnknownFormat, UnsafePath, VDError, VDIOError, VDTimeoutError,
                     printable, user_path)
from .fileio import is_temp_name, read_small_file
from .geometry import Geometry, vbox_lchs, vbox_pchs, vhd_chs
from .inside import (ChangeReport, DiskFile, Entry, Layout, Partition, SliceFile, changed,
                     disk_layout, open_volume)
from .image import Alloc, CheckReport, Image, ParentHint, Problem, ProblemCode, Region
from .progress import Progress, ProgressCallback
from .ops.compare import CompareResult, compare, compare_disks
from .ops.copy import chain_target_names, copy_image, move_image, move_refusal
from .ops.compact import compact
from .ops.identity import give_new_uuid
from .ops.merge import merge, merge_disk
from .ops.repair import check, describe_effects
from .ops.resize import resize
from .ops.sparsify import SparsifyReport, VolumeResult, plan as sparsify_plan, sparsify
from .registry import (backends, backends_for_extension, get_backend, load_entry_point_backends,
                       probe, probe_scores, register_backend)
from .sizes import describe_size, format_size, parse_size

# the media library (sqlite3, XML) is imported on first use: vdgui-img rarely needs it
_LAZY = {"ImageRecord": "library", "Library": "library", "data_dir": "library",
         "mark_duplicates": "library",
         "read_virtualbox_registry": "library"}

# the public API, named (the lazy names of the library included)
__all__ = [
    "align_up", "Alloc", "AmbiguousFormat", "applicable_keys", "AuthenticationError", "Backend",
    "backends", "backends_for_extension", "Cancelled", "Cap", "chain_target_names", "changed",
    "ChangeReport", "check", "CheckReport", "ceil_div", "compact", "compare", "compare_disks",
    "CompareResult", "ConfigError", "ConfigKey", "copy_image", "CorruptImage", "CreateParams",
    "data_dir", "describe_effects", "describe_size", "DeviceType", "Disk", "disk_layout",
    "DiskFile", "Entry", "Extent", "FileExists", "FileExtension", "format_size", "Geometry",
    "get_backend", "give_new_uuid", "Image", "ImageChanged", "ImageFlags", "ImageInUse",
    "ImageNotFound", "ImageRecord", "InvalidArgument", "is_network_location", "is_temp_name",
    "KeyFlag", "Layout", "Library", "load_entry_point_backends", "mark_duplicates", "merge",
    "merge_disk", "move_image", "move_refusal", "NetworkError", "NotSupported", "open_image",
    "open_volume", "OpenFlags", "Operation", "ParentHint", "ParentMismatch", "ParentNotFound",
    "parse_config", "parse_size", "parse_variant", "Partition", "printable", "probe",
    "probe_scores", "ProbeInput", "Problem", "ProblemCode", "Progress", "ProgressCallback",
    "read_small_file", "read_virtualbox_registry", "ReadOnlyImage", "Refusal", "Refused", "Region",
    "register_backend", "resize", "ScanIncomplete", "SliceFile", "sparsify", "sparsify_plan",
    "SparsifyReport", "UnknownFormat", "UnsafePath", "VolumeResult",
    "user_path", "ValueType", "variant_words", "vbox_lchs", "vbox_pchs", "VDError", "VDIOError",
    "VDTimeoutError", "vhd_chs",
]


def __getattr__(name: str):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value
