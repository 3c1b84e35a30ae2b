"""The backend table: lookup by name/alias/extension and scored probing.

The built-in table is the explicit list in :mod:`vdgui.vd.formats`; outside backends come only
through :func:`register_backend` (an explicit call) or the ``vdgui.backends`` entry-point group
loaded by :func:`load_plugins` (docs/plugins.md); :func:`backend_origin` says which.
"""
from __future__ import annotations

import os
import struct
import sys
from dataclasses import dataclass, field

from . import formats
from .backend import Backend, Cap, FileExtension, ImageFlags, OpenFlags, Operation, ProbeInput
from .config import ConfigKey
from .errors import (
    AmbiguousFormat,
    ImageNotFound,
    InvalidArgument,
    UnknownFormat,
    VDError,
    VDIOError,
)
from .fileio import open_image_path

PROBE_WINDOW = 64 * 1024
STRONG = 80   # two backends at or above this for one file: refuse to guess


def backends() -> tuple[Backend, ...]:
    return formats.all_backends()


PLUGIN_GROUP = "vdgui.backends"
NO_PLUGINS_ENV = "VDGUI_NO_PLUGINS"       # set (non-empty): entry points are not loaded


@dataclass(frozen=True)
class BackendOrigin:
    """Where a backend came from: the built-in table, a plugin distribution (its entry point),
    or a register_backend call of the program itself."""
    kind: str                           # "built-in", "plugin" or "registered"
    distribution: str | None = None
    version: str | None = None
    entry_point: str | None = None      # "name = module:attribute"

    def describe(self) -> str:
        if self.kind == "plugin":
            return f"plugin {self.distribution or '?'} {self.version or ''}".rstrip()
        return self.kind


@dataclass(frozen=True)
class PluginProblem:
    """A plugin that was skipped, and why."""
    entry_point: str
    distribution: str | None
    version: str | None
    message: str

    def __str__(self) -> str:
        origin = f" from {self.distribution} {self.version or ''}".rstrip() \
            if self.distribution else ""
        return f"plugin {self.entry_point}{origin} skipped: {self.message}"


@dataclass
class PluginReport:
    loaded: list[tuple[str, BackendOrigin]] = field(default_factory=list)   # backend names
    problems: list[PluginProblem] = field(default_factory=list)


_ORIGINS: dict[int, BackendOrigin] = {}       # id(backend) -> origin, for outside backends
_REGISTERED_AT = BackendOrigin("registered")
_BUILT_IN = BackendOrigin("built-in")
_SEEN_ENTRY_POINTS: set[tuple[str | None, str, str]] = set()
_REPORT = PluginReport()


def backend_origin(backend: Backend) -> BackendOrigin:
    if any(backend is b for b in formats.BACKENDS):
        return _BUILT_IN
    return _ORIGINS.get(id(backend), _REGISTERED_AT)


def _declaration_problem(backend: object) -> str | None:
    """Why ``backend`` cannot join the table (None: it can): the declarations the engine and
    the app read must have their types, and its names must be new."""
    if not isinstance(backend, Backend):
        return (f"the entry point gives {type(backend).__name__}, not a vdgui.vd.Backend "
                "(or a subclass of it)")
    b = backend
    if not isinstance(b.name, str) or not b.name.strip():
        return "the backend declares no name"
    checks = (
        (isinstance(b.caps, Cap), "caps is not a Cap"),
        (isinstance(b.aliases, tuple) and all(isinstance(a, str) for a in b.aliases),
         "aliases is not a tuple of strings"),
        (isinstance(b.extensions, tuple)
         and all(isinstance(e, FileExtension) for e in b.extensions),
         "extensions is not a tuple of FileExtension"),
        (isinstance(b.config_keys, tuple)
         and all(isinstance(k, ConfigKey) for k in b.config_keys),
         "config_keys is not a tuple of ConfigKey"),
        (isinstance(b.operations, (set, frozenset))
         and all(isinstance(o, Operation) for o in b.operations),
         "operations is not a set of Operation"),
        (isinstance(b.create_flags, ImageFlags), "create_flags is not an ImageFlags"),
        (b.max_size is None or isinstance(b.max_size, int), "max_size is not an integer"),
        (isinstance(b.size_granularity, int) and b.size_granularity > 0,
         "size_granularity is not a positive integer"),
    )
    for ok, why in checks:
        if not ok:
            return f"{b.name}: {why}"
    taken = {n.lower(): o.name for o in backends() for n in (o.name, *o.aliases)}
    for n in (b.name, *b.aliases):
        if n.lower() in taken:
            return f"{b.name}: the name {n!r} is already used by the {taken[n.lower()]} backend"
    try:
        b.probe(ProbeInput(path="", size=0, head=b"", tail=b""))
    except (VDError, struct.error, IndexError):
        pass
    except Exception as exc:
        return f"{b.name}: its probe fails on an empty file: {type(exc).__name__}: {exc}"
    return None


def register_backend(backend: Backend, origin: BackendOrigin | None = None) -> None:
    """Add an outside backend to the table (after the built-in ones); InvalidArgument when its
    declarations are wrong or its name is taken."""
    why = _declaration_problem(backend)
    if why is not None:
        raise InvalidArgument(f"cannot register the backend: {why}")
    formats.REGISTERED.append(backend)
    if origin is not None:
        _ORIGINS[id(backend)] = origin


def _declared_somewhere(group: str) -> bool:
    """A cheap look before importing importlib.metadata (a quarter of vdgui-img's start-up):
    does a distribution folder on sys.path (``*.dist-info``/``*.egg-info``) name ``group`` in
    its entry_points.txt? True when unsure (a sys.path entry that is a file, e.g. a zip)."""
    needle = f"[{group}]"
    for entry in sys.path:
        folder = entry or "."
        try:
            names = os.listdir(folder)
        except NotADirectoryError:
            return True
        except OSError:
            continue
        for name in names:
            if not name.endswith((".dist-info", ".egg-info")):
                continue
            try:
                with open(os.path.join(folder, name, "entry_points.txt"), "rb") as f:
                    if needle.encode() in f.read(1 << 20):
                        return True
            except OSError:
                continue
    return False


def load_plugins(group: str = PLUGIN_GROUP) -> PluginReport:
    """Load the backends that installed distributions declare in the entry-point ``group``
    (VirtualBox's VDPluginLoadFromPath). A plugin that cannot be imported, gives no Backend, or
    whose declarations are wrong or names taken is skipped and reported; nothing it does stops
    the others or the program. Calling again loads only entry points not seen before.
    Returns every outcome so far."""
    if os.environ.get(NO_PLUGINS_ENV) or not _declared_somewhere(group):
        return _REPORT
    from importlib.metadata import entry_points
    for ep in sorted(entry_points(group=group), key=lambda e: (e.name, e.value)):
        dist = getattr(ep, "dist", None)
        dname = dist.metadata["Name"] if dist is not None else None
        dver = dist.version if dist is not None else None
        key = (dname, ep.name, ep.value)
        if key in _SEEN_ENTRY_POINTS:
            continue
        _SEEN_ENTRY_POINTS.add(key)
        where = f"{ep.name} = {ep.value}"
        try:
            obj = ep.load()
            backend = obj() if isinstance(obj, type) else obj
        except Exception as exc:
            _REPORT.problems.append(PluginProblem(
                where, dname, dver, f"cannot be loaded: {type(exc).__name__}: {exc}"))
            continue
        why = _declaration_problem(backend)
        if why is not None:
            _REPORT.problems.append(PluginProblem(where, dname, dver, why))
            continue
        origin = BackendOrigin("plugin", dname, dver, where)
        register_backend(backend, origin)
        _REPORT.loaded.append((backend.name, origin))
    return _REPORT


def get_backend(name: str) -> Backend:
    """Find a backend by VirtualBox name or alias (qemu's names too), case-insensitive."""
    key = name.strip().lower()
    for b in backends():
        if b.name.lower() == key or key in (a.lower() for a in b.aliases):
            return b
    known = ", ".join(b.name for b in backends())
    raise UnknownFormat(f"unknown format '{name}' (known: {known})")


def backend_name_for(fmt: str | None) -> str | None:
    """Our backend name for a format name stored in an image (e.g. qemu's 'vpc' -> 'VHD');
    an unknown name is returned unchanged, None stays None."""
    if not fmt:
        return None
    try:
        return get_backend(fmt).name
    except UnknownFormat:
        return fmt


def backends_for_extension(ext: str) -> list[Backend]:
    ext = ext.lstrip(".").lower()
    return [b for b in backends() if any(fe.ext == ext for fe in b.extensions)]


def probe_input(path: str) -> ProbeInput:
    target = path
    if os.path.isdir(path):
        # a bundle folder (e.g. Parallels' name.hdd/) is probed through the descriptor file a
        # backend declares as ``bundle_descriptor``; ProbeInput.path stays the folder
        for b in backends():
            name = getattr(b, "bundle_descriptor", None)
            if name and os.path.isfile(os.path.join(path, name)):
                target = os.path.join(path, name)
                break
    fd = open_image_path(target)       # never blocks: FIFOs, sockets, char devices refused
    try:
        with open(fd, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(0)
            head = f.read(PROBE_WINDOW)
            f.seek(max(0, size - PROBE_WINDOW))
            tail = f.read(PROBE_WINDOW)
    except FileNotFoundError:
        raise ImageNotFound(f"{path}: file not found") from None
    except IsADirectoryError:
        raise ImageNotFound(f"{path}: is a directory, not an image file") from None
    except OSError as exc:
        raise VDIOError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return ProbeInput(path=path, size=size, head=head, tail=tail)


def probe_scores(path: str) -> list[tuple[int, Backend]]:
    src = probe_input(path)
    scores = []
    for b in backends():
        try:
            s = b.probe(src)
        except (VDError, struct.error, IndexError):
            # format-level failures only: the bytes are not this format (a damaged header,
            # a file too short for the structure). Anything else is a bug in the probe and
            # surfaces, naming the backend, instead of silently scoring 0.
            s = 0
        except Exception as exc:
            exc.add_note(f"raised by the {b.name} backend's probe of {path} "
                         f"({backend_origin(b).describe()})")
            raise
        if s > 0:
            scores.append((s, b))
    scores.sort(key=lambda t: -t[0])
    return scores


def backend_for_url(location: str) -> Backend | None:
    """The backend serving a URL location (``iscsi://...``), or None for a plain path."""
    scheme, sep, _ = location.partition("://")
    if not sep or "/" in scheme:
        return None
    for b in backends():
        if scheme.lower() in b.url_schemes:
            return b
    raise UnknownFormat(f"{location}: no backend handles '{scheme}://' locations")


def probe(path: str) -> Backend:
    """The backend that claims ``path`` most strongly. Two strong claims (both at or above
    STRONG, whatever their order) are an error: the file is validly two formats at once (e.g. a
    fixed VHD whose guest data begins with a QCOW2 header) and guessing could read, or write
    into, the wrong one."""
    by_url = backend_for_url(path)
    if by_url is not None:
        return by_url
    scores = probe_scores(path)
    if not scores:
        raise UnknownFormat(f"{path}: not a disk image of any known format")
    strong = [b for s, b in scores if s >= STRONG]
    if len(strong) > 1:
        names = ", ".join(b.name for b in strong)
        raise AmbiguousFormat(f"{path}: claimed by several formats ({names}); "
                              "name the format with -f")
    score, best = scores[0]
    if best.name == "RAW" and score < STRONG:
        _refuse_damaged_named(path)
    return best


def _refuse_damaged_named(path: str) -> None:
    """A file only the raw fallback claims, named for a format that owns its extension (a
    damaged VDI called x.vdi), is refused with that format's own reason: shown as raw data it
    would look healthy, and a write would go into the damaged image."""
    ext = os.path.splitext(path)[1]
    for owner in backends_for_extension(ext) if ext else ():
        if not owner.owns_extensions:
            continue
        try:
            owner.open(path, OpenFlags.READ_ONLY | OpenFlags.INFO).close()
        except VDError as exc:
            reason = str(exc).removeprefix(f"{path}: ")
            raise UnknownFormat(f"{path}: not a valid {owner.name} image ({reason}); if it holds "
                                "raw disk data, open it as RAW (-f RAW)") from None
        return      # it opens after all: the raw guess stands
