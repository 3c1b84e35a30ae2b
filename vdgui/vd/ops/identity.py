"""Give an image a new UUID and keep its children linked to it.

Byte copies of one image share its UUID: VirtualBox registers only one of them, and a child's
parent search by UUID may find either. ``give_new_uuid`` makes one of them distinct:

1. open the image and every child named (read-write, so each is locked); each child must link to
   this very file (its parent search resolves to it) and accept the image as its parent
   (``relink_refusal``) — otherwise nothing is written;
2. write the new UUID into the image (flushed);
3. rewrite each child's parent link to it (``set_parent``, flushed), one after another.

An interruption between 2 and 3 leaves children whose parent UUID is the old one: they then fail
their link check until ``vdgui-img set CHILD --parent-uuid NEW`` (the new UUID is returned, and
written before any child is touched). The data of every image is unchanged.
"""
from __future__ import annotations

import uuid as uuidlib

from ..backend import Cap, OpenFlags, Operation
from ..chain import find_parent
from ..errors import NotSupported, ParentMismatch
from ..fileio import real_path
from ..registry import get_backend, probe


def give_new_uuid(path: str, *, children=(), format: str | None = None, library=None,
                  new: uuidlib.UUID | None = None) -> uuidlib.UUID:
    """Write a new UUID (``new`` or a random one) into the image at ``path`` and relink the
    differencing images ``children`` (paths) that depend on it. Returns the new UUID."""
    backend = get_backend(format) if format else probe(path)
    if not backend.caps & Cap.UUID:
        raise NotSupported(f"{path}: {backend.name} images have no UUID")
    new = new or uuidlib.uuid4()
    opened = []
    try:
        img = backend.open(path, OpenFlags.NORMAL, None)
        opened.append(img)
        kids = []
        for c in children:
            cb = probe(c)
            ci = cb.open(c, OpenFlags.NORMAL, None)
            opened.append(ci)
            if not cb.can(Operation.RELINK):
                raise NotSupported(f"{c}: {cb.name} images cannot change their parent link, so "
                                   f"{path} cannot get a new UUID without breaking it")
            ppath, _fmt = find_parent(ci, library=library)
            if real_path(ppath) != real_path(path):
                raise ParentMismatch(f"{c}: its parent is {ppath}, not {path}")
            why = ci.relink_refusal(img)
            if why:
                raise NotSupported(f"{c}: cannot relink it to {path}: {why}")
            kids.append(ci)
        for im in opened:             # every file is still the one opened
            im.check_in_place("giving a new UUID")
        img.set_uuid(new)
        img.flush()
        for ci in kids:
            ci.set_parent(img)
            ci.flush()
        return new
    finally:
        for im in reversed(opened):
            im.close()


__all__ = ["give_new_uuid"]
