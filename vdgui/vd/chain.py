"""Finding an image's parent: by the image's own link, then by UUID nearby, then the library."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .errors import ParentMismatch, ParentNotFound, UnsafePath, VDError
from .fileio import resolve_stored_name

if TYPE_CHECKING:  # pragma: no cover
    from .image import Image

MAX_CHAIN_DEPTH = 256
_SCAN_LIMIT = 2000   # files looked at per folder when searching by UUID


def _candidate_dirs(image_path: str) -> list[str]:
    d = os.path.dirname(os.path.abspath(image_path))
    dirs = [d, os.path.join(d, "Snapshots")]
    if os.path.basename(d) == "Snapshots":
        dirs.append(os.path.dirname(d))
    return [x for x in dirs if os.path.isdir(x)]


def _uuid_of(path: str):
    from .backend import OpenFlags
    from .registry import probe
    try:
        backend = probe(path)
        img = backend.open(path, OpenFlags.INFO | OpenFlags.READ_ONLY, None)
    except VDError:
        return None, None
    try:
        return img.uuid, backend.name
    finally:
        img.close()


def find_by_uuid(uuid, near: str, exclude: str | None = None) -> str | None:
    from .registry import backends
    exts = {fe.ext for b in backends() for fe in b.extensions}
    for d in _candidate_dirs(near):
        try:
            names = sorted(os.listdir(d))[:_SCAN_LIMIT]
        except OSError:
            continue
        for n in names:
            p = os.path.join(d, n)
            if os.path.splitext(n)[1].lstrip(".").lower() not in exts or not os.path.isfile(p):
                continue
            if exclude and os.path.abspath(p) == os.path.abspath(exclude):
                continue
            u, _ = _uuid_of(p)
            if u is not None and u == uuid:
                return p
    return None


def find_parent(image: "Image", *, allow_unsafe: bool = False, library=None) -> tuple[str, str | None]:
    """Return (path, format name or None) of ``image``'s parent, or raise ParentNotFound."""
    hint = image.parent_hint
    if hint is None:
        raise ParentNotFound(f"{image.location}: not a differencing image")
    tried: list[str] = []
    unsafe: UnsafePath | None = None
    for loc in hint.locations:
        if not loc:
            continue
        try:
            path = resolve_stored_name(image.location, loc, allow_unsafe=allow_unsafe,
                                       what="parent file")
        except UnsafePath as exc:
            unsafe = unsafe or exc
            # an absolute locator (e.g. VHD W2ku) may still name a file beside the image; that
            # name gets the same checks (no device, no symbolic link leading out of the folder)
            base = os.path.basename(loc.replace("\\", "/"))
            if not base or base in ("..", "."):
                continue
            try:
                path = resolve_stored_name(image.location, base, allow_unsafe=False,
                                           what="parent file")
            except UnsafePath:
                continue
        tried.append(path)
        if os.path.isfile(path) and os.path.abspath(path) != os.path.abspath(image.location):
            return path, hint.format
    if hint.uuid is not None:
        found = find_by_uuid(hint.uuid, image.location, exclude=image.location)
        if found:
            return found, hint.format
        if library is not None:
            entry = library.find_by_uuid(hint.uuid)
            if entry and os.path.isfile(entry):
                return entry, hint.format
        tried.append(f"UUID {hint.uuid} in {', '.join(_candidate_dirs(image.location))}")
    if unsafe is not None and not any(os.path.isfile(t) for t in tried):
        raise ParentNotFound(f"{unsafe.message}; parent not found (looked for: "
                             f"{'; '.join(tried) or 'no location stored'})") from None
    raise ParentNotFound(f"{image.location}: parent image not found (looked for: "
                         f"{'; '.join(tried) or 'no location stored'})")


def check_backing_name(image: "Image", stored: str | None, parent: "Image") -> None:
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
    raise ParentMismatch(f"{image.location}: backing file is not {parent.location}",
                         field="backing file name", expected=stored, found=parent.location)
