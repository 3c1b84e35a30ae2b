"""Finding an image's parent: by the image's own link, then by UUID nearby, then the library."""
from __future__ import annotations

import os
import stat
import threading
from typing import TYPE_CHECKING

from .backend import Backend, Cap, OpenFlags, ProbeInput
from .errors import (
    ImageNotFound,
    ParentMismatch,
    ParentNotFound,
    ScanIncomplete,
    UnsafePath,
    VDError,
)
from .fileio import is_temp_name, real_path, resolve_stored_name
from .registry import backend_name_for, backends, probe

if TYPE_CHECKING:  # pragma: no cover
    import uuid as uuidlib

    from .image import Image, ParentHint

MAX_CHAIN_DEPTH = 256
_SCAN_LIMIT = 2000   # files looked at per folder when searching by UUID
CHILD_SCAN_LIMIT = 100_000   # entries per folder the children scan looks at; more: refused
_HEAD = 4096                 # bytes read of each entry to see whether it may be an image


def _within(root_real: str, path: str) -> bool:
    """Does ``path`` resolve (symbolic links followed) inside the real folder ``root_real``?"""
    real = os.path.realpath(path)
    return os.path.commonpath([root_real, real]) == root_real


def _search_dirs(image_path: str) -> list[tuple[str, str]]:
    """The folders searched for an image's relatives (its own, its Snapshots/ subfolder, the
    folder above when it lives in a Snapshots folder), each with the real folder its entries
    must resolve into: a symbolic link leading out of there is not followed."""
    d = os.path.dirname(os.path.abspath(image_path))
    own = os.path.realpath(d)
    dirs = [(d, own), (os.path.join(d, "Snapshots"), own)]
    if os.path.basename(d) == "Snapshots":
        up = os.path.dirname(d)
        dirs.append((up, os.path.realpath(up)))
    return [(x, root) for x, root in dirs if os.path.isdir(x) and _within(root, x)]


def _candidate_dirs(image_path: str) -> list[str]:
    return [x for x, _root in _search_dirs(image_path)]


# (real path) -> (file signature, uuid, backend name): finding the parents of a deep chain asks
# each member's folder for a UUID, which opened every file of the folder once per member
# (quadratic: 200 members took 10-24 s). A file is opened again only when its signature
# (device, inode, size, mtime, ctime) changed.
_UUID_CACHE: dict[str, tuple] = {}
_UUID_CACHE_MAX = 8192
_UUID_LOCK = threading.Lock()


def _uuid_of(path: str, real: str | None = None) -> tuple[uuidlib.UUID | None, str | None]:
    try:
        st = os.stat(path)
        key = real or os.path.realpath(path)
        sig = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    except OSError:
        return None, None
    with _UUID_LOCK:
        hit = _UUID_CACHE.get(key)
    if hit is not None and hit[0] == sig:
        return hit[1], hit[2]
    try:
        backend = probe(path)
        img = backend.open(path, OpenFlags.INFO | OpenFlags.READ_ONLY, None)
    except VDError:
        result: tuple[uuidlib.UUID | None, str | None] = (None, None)
    else:
        try:
            result = (img.uuid, backend.name)
        finally:
            img.close()
    with _UUID_LOCK:
        if len(_UUID_CACHE) >= _UUID_CACHE_MAX:
            _UUID_CACHE.clear()
        _UUID_CACHE[key] = (sig,) + result
    return result


# (folder, root) -> (folder signature, extensions, [(path, real path or None)]): the files a
# UUID search looks at in a folder, kept while the folder's entries stay as they were (its
# signature: an entry added, removed or renamed changes its mtime/ctime); real path None marks
# a symbolic link, checked again at every search. Without it each search resolved every name of
# the folder again: 1,000 images in one folder took seconds to list.
_DIR_CACHE: dict[tuple[str, str], tuple] = {}


def _folder_files(d: str, root: str, exts: set[str]) -> list[tuple[str, str | None]]:
    """The files with an image extension in folder ``d`` (sorted, the first _SCAN_LIMIT
    names), each regular file with its real path when it resolves inside ``root``; OSError
    when the folder cannot be read."""
    st = os.stat(d)
    sig = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)
    with _UUID_LOCK:
        hit = _DIR_CACHE.get((d, root))
    if hit is not None and hit[0] == sig and hit[1] == exts:
        return hit[2]
    names = sorted(os.listdir(d))[:_SCAN_LIMIT]
    real_d = os.path.realpath(d)
    out: list[tuple[str, str | None]] = []
    for n in names:
        if os.path.splitext(n)[1].lstrip(".").lower() not in exts:
            continue
        p = os.path.join(d, n)
        try:
            mode = os.lstat(p).st_mode
        except OSError:
            continue
        if stat.S_ISLNK(mode):
            out.append((p, None))
        elif stat.S_ISREG(mode):
            real = os.path.join(real_d, n)
            if os.path.commonpath([root, real]) == root:
                out.append((p, real))
    with _UUID_LOCK:
        if len(_DIR_CACHE) >= _UUID_CACHE_MAX:
            _DIR_CACHE.clear()
        _DIR_CACHE[(d, root)] = (sig, exts, out)
    return out


def find_by_uuid(uuid, near: str, exclude: str | None = None) -> str | None:
    exts = {fe.ext for b in backends() for fe in b.extensions}
    skip = real_path(exclude) if exclude else None
    for d, root in _search_dirs(near):
        try:
            files = _folder_files(d, root, exts)
        except OSError:
            continue
        for p, real in files:
            if real is None:                  # a symbolic link: where it leads now
                if not os.path.isfile(p) or not _within(root, p):
                    continue                  # (a link leading out of the folder)
                real = real_path(p)
            if real == skip:
                continue
            u, _ = _uuid_of(p, real)
            if u is not None and u == uuid:
                return p
    return None


def parent_format(hint: ParentHint) -> str | None:
    """The backend name of the parent's format as ``hint`` records it: images store qemu's
    names too ('vpc' -> 'VHD'); an unknown name is returned unchanged."""
    return backend_name_for(hint.format)


def find_parent(image: Image, *, allow_unsafe: bool = False,
                library=None) -> tuple[str, str | None]:
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
            path = resolve_stored_name(
                image.location, loc, allow_unsafe=allow_unsafe, what="parent file"
            )
        except UnsafePath as exc:
            unsafe = unsafe or exc
            # an absolute locator (e.g. VHD W2ku) may still name a file beside the image; that
            # name gets the same checks (no device, no symbolic link leading out of the folder)
            base = os.path.basename(loc.replace("\\", "/"))
            if not base or base in ("..", "."):
                continue
            try:
                path = resolve_stored_name(
                    image.location, base, allow_unsafe=False, what="parent file"
                )
            except UnsafePath:
                continue
        tried.append(path)
        if os.path.isfile(path) and real_path(path) != real_path(image.location):
            return path, parent_format(hint)
    if hint.uuid is not None:
        found = find_by_uuid(hint.uuid, image.location, exclude=image.location)
        if found:
            return found, parent_format(hint)
        if library is not None:
            entry = library.find_by_uuid(hint.uuid)
            if entry and os.path.isfile(entry):
                return entry, parent_format(hint)
        tried.append(f"UUID {hint.uuid} in {', '.join(_candidate_dirs(image.location))}")
    if unsafe is not None and not any(os.path.isfile(t) for t in tried):
        raise ParentNotFound(
            f"{unsafe.message}; parent not found (looked for: "
            f"{'; '.join(tried) or 'no location stored'})"
        ) from None
    raise ParentNotFound(
        f"{image.location}: parent image not found (looked for: "
        f"{'; '.join(tried) or 'no location stored'})"
    )


# -- the other direction: the differencing images of an image --------------------------------------
def links_to(child: Image, parent: Image) -> bool:
    """Does ``child`` (a differencing image) name ``parent`` as its parent?"""
    if child.parent_uuid is not None and parent.uuid is not None:
        return child.parent_uuid == parent.uuid
    try:
        path, _fmt = find_parent(child)
    except VDError:
        return False
    return real_path(path) == real_path(parent.location)


def link_matches(child: Image, parent: Image) -> bool:
    """Does ``child``'s link accept ``parent`` as it stands (``check_parent_link``: UUIDs, and
    the identity a format's link names -- VHDX parent_linkage, VMDK parentCID, a backing file
    name)? Operations that rewrite links after changing a parent rewrite only the links that
    matched before they started: a link already broken (the parent was written since) stays
    broken rather than being silently pointed at changed content."""
    try:
        child.check_parent_link(parent)
    except ParentMismatch:
        return False
    return True


def _head(path: str) -> bytes:
    """The first bytes of a regular file (O_NONBLOCK: a FIFO swapped in meanwhile cannot hang)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return b""
        return os.pread(fd, _HEAD, 0)
    finally:
        os.close(fd)


def find_children(image: Image, exclude: set[str] | None = None) -> list[tuple[str, Backend]]:
    """Differencing images in ``image``'s folder (and Snapshots/, or the folder above a
    Snapshots folder) whose parent is ``image``: (path, backend) pairs. ``exclude`` holds
    real paths not to report (e.g. the chain being worked on).

    Every entry is looked at, whatever its name (dot-files, any extension): its first bytes
    tell whether a backend of differencing images may claim it, and only those are opened.
    Raises ScanIncomplete, naming each, when an entry could not be examined, a folder could not
    be listed or holds more than CHILD_SCAN_LIMIT entries, or a differencing image of
    ``image`` is reached through a symbolic link leading out of the folder (relinking it would
    write outside): an operation that would orphan a child it cannot see must not run."""
    exclude = exclude or set()
    own = {real_path(f) for f in image.files()} | {real_path(image.location)}
    diff_backends = [b for b in backends() if b.caps & Cap.DIFF]
    found: list[tuple[str, Backend]] = []
    seen: set[str] = set()
    problems: list[str] = []
    unopened: list[tuple[str, str]] = []  # (real path, why): unless a file of another image
    parts: set[str] = set(own)  # files of the images opened (e.g. VMDK extents)
    name = os.path.basename(image.location)
    for d, root in _search_dirs(image.location):
        names: list[str] = []
        try:
            with os.scandir(d) as it:
                for entry in it:
                    names.append(entry.name)
                    if len(names) > CHILD_SCAN_LIMIT:
                        break
        except OSError as exc:
            problems.append(f"{d}: the folder cannot be listed ({exc.strerror or exc})")
            continue
        if len(names) > CHILD_SCAN_LIMIT:
            problems.append(f"{d}: more than {CHILD_SCAN_LIMIT} entries; not all were examined")
            continue
        for n in sorted(names):
            if is_temp_name(n):  # our own temporaries, never user images
                continue
            p = os.path.join(d, n)
            try:
                st = os.stat(p)
                if not stat.S_ISREG(st.st_mode):
                    continue  # folders, devices, FIFOs: never images here
                rp = real_path(p)
                if rp in own or rp in seen:
                    continue
                head = _head(p)
            except FileNotFoundError:
                continue  # gone meanwhile, or a dangling symbolic link
            except OSError as exc:
                problems.append(f"{p}: cannot be read ({exc.strerror or exc})")
                continue
            src = ProbeInput(path=p, size=st.st_size, head=head, tail=b"")
            if not any(_claims(b, src) for b in diff_backends):
                continue
            try:
                be = probe(p)
                img = be.open(p, OpenFlags.INFO | OpenFlags.READ_ONLY, None)
            except ImageNotFound:
                continue
            except VDError as exc:
                unopened.append((rp, f"{p}: cannot be examined ({exc})"))
                continue
            try:
                parts.update(real_path(f) for f in img.files())
                if rp in exclude or not (img.is_diff and links_to(img, image)):
                    continue
            finally:
                img.close()
            if not _within(root, p):
                problems.append(
                    f"{p}: a differencing image of {name} reached through a symbolic "
                    f"link leading out of the folder (to {rp}); relinking it would "
                    "write outside the folder"
                )
                continue
            seen.add(rp)
            found.append((p, be))
    problems += [why for rp, why in unopened if rp not in parts and rp not in exclude]
    if problems:
        raise ScanIncomplete(
            f"{image.location}: cannot be sure which other differencing images "
            f"depend on it: {'; '.join(problems)}; nothing was changed"
        )
    return found


def _claims(backend, src) -> bool:
    try:
        return backend.probe(src) > 0
    except Exception:
        return True


def findable_from(child_path: str, parent_path: str, by_uuid: bool) -> bool:
    """Would a differencing image at ``child_path`` find its parent at ``parent_path``? By a
    stored name when the parent lies in the child's folder or below it; by UUID (``by_uuid``)
    when it lies in one of the folders find_by_uuid searches (the child's, its Snapshots/, the
    folder above a Snapshots folder). Paths need not exist yet (a move being planned)."""
    cdir = os.path.dirname(os.path.abspath(child_path))
    if _within(os.path.realpath(cdir), parent_path):
        return True
    if not by_uuid:
        return False
    dirs = [cdir, os.path.join(cdir, "Snapshots")]
    if os.path.basename(cdir) == "Snapshots":
        dirs.append(os.path.dirname(cdir))
    pdir = os.path.realpath(os.path.dirname(os.path.abspath(parent_path)))
    return pdir in {os.path.realpath(d) for d in dirs}
