"""The backend table: lookup by name/alias/extension and scored probing.

The built-in table is the explicit list in :mod:`vdgui.vd.formats`; outside backends come only
through :func:`register_backend` (an explicit call) or the ``vdgui.backends`` entry-point group
loaded by :func:`load_entry_point_backends`.
"""
from __future__ import annotations

import os
import struct

from . import formats
from .backend import Backend, ProbeInput
from .errors import AmbiguousFormat, ImageNotFound, UnknownFormat, VDError, VDIOError
from .fileio import open_image_path

PROBE_WINDOW = 64 * 1024
STRONG = 80   # two backends at or above this for one file: refuse to guess


def backends() -> tuple[Backend, ...]:
    return formats.all_backends()


def register_backend(backend: Backend) -> None:
    if any(b.name.lower() == backend.name.lower() for b in backends()):
        raise ValueError(f"a backend named {backend.name} is already registered")
    formats.REGISTERED.append(backend)


def load_entry_point_backends(group: str = "vdgui.backends") -> list[str]:
    from importlib.metadata import entry_points
    loaded = []
    for ep in entry_points(group=group):
        obj = ep.load()
        register_backend(obj() if isinstance(obj, type) else obj)
        loaded.append(ep.name)
    return loaded


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
            exc.add_note(f"raised by the {b.name} backend's probe of {path}")
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
    return scores[0][1]
