"""Which action is enabled for a selection, and why not — decided only from backend declarations
(Cap bits, Operation set, create_flags) and the availability of engine operations. No format
names are compared anywhere. ``reason(key, nodes, ctx)`` returns None when enabled, otherwise the
sentence shown in the disabled action's tooltip.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from vdgui.vd import Cap, ImageFlags, Operation, backends


@dataclass(frozen=True)
class ActionSpec:
    key: str
    text: str
    icon: str
    shortcut: str = ""
    tip: str = ""
    toolbar: bool = True
    short: str = ""          # toolbar label


SPECS = (
    ActionSpec("add", "&Add…", "add", "Ctrl+Shift+A", "Add existing image files to the list"),
    ActionSpec("create", "&Create…", "create", "Ctrl+Shift+N", "Create a new disk image"),
    ActionSpec("snapshot", "Create &Differencing Image…", "snapshot", "Ctrl+Shift+D",
               "Create a differencing image (snapshot) on top of the selected image",
               short="Snapshot"),
    ActionSpec("copy", "&Copy / Convert…", "copy", "Ctrl+Shift+C",
               "Copy the selected image, optionally into another format", short="Copy"),
    ActionSpec("move", "&Move…", "move", "Ctrl+Shift+M", "Move the selected image's files"),
    ActionSpec("merge", "Mer&ge…", "merge", "Ctrl+Shift+G", "Merge images of a snapshot chain"),
    ActionSpec("resize", "Resi&ze…", "resize", "Ctrl+Shift+Z", "Change the virtual size"),
    ActionSpec("compact", "Com&pact / Sparsify…", "compact", "",
               "Give unused space back to the host: blocks of zeroes, or the free space of "
               "the guest's file systems", short="Compact"),
    ActionSpec("compare", "Com&pare", "compare", "Ctrl+Shift+O",
               "Compare what two selected images read (any formats, any chains)"),
    ActionSpec("check", "C&heck", "check", "Ctrl+Shift+K", "Check the image for consistency"),
    ActionSpec("repair", "Rep&air…", "repair", "", "Check the image, show what a repair would "
               "change, and repair after you confirm (offers a backup; unreferenced data is kept)"),
    ActionSpec("encrypt", "&Encrypt…", "lock", "", "Encrypt the image (LUKS, or VirtualBox's "
               "AES-XTS) with a passphrase: in place, or into a new file", toolbar=False),
    ActionSpec("decrypt", "Decr&ypt…", "lock", "", "Write the image without its encryption: "
               "in place, or into a new file", toolbar=False),
    ActionSpec("passphrase", "Change Pa&ssphrase…", "lock", "",
               "Change the passphrase of an encrypted image (the data is not rewritten)",
               toolbar=False),
    ActionSpec("remove", "&Remove from List", "remove", "Ctrl+Shift+R",
               "Forget the selected images (files stay on disk)", short="Remove"),
    ActionSpec("delete", "&Delete from Disk…", "delete", "Shift+Del",
               "Delete the selected images' files (asks first)", short="Delete"),
    ActionSpec("refresh", "Re&fresh", "refresh", "Ctrl+Shift+F", "Re-read every image"),
    ActionSpec("properties", "&Properties", "properties", "Ctrl+Shift+P",
               "Show or hide the details of the selected image"),
)
# not a selection action (kept out of SPECS, which the window walks on every selection change)
NETWORK = ActionSpec("network", "Add &Network Disk…", "network", "Ctrl+Shift+I",
                     "Add a disk that is not a file, e.g. a LUN on an iSCSI target",
                     short="Network")
SPEC = {s.key: s for s in SPECS + (NETWORK,)}

# actions that need every selected image to be idle, and the operation each needs from the engine
_MULTI = {"compact", "check", "repair", "remove", "delete", "compare"}
_VERB = {"snapshot": "create a differencing image of", "copy": "copy", "move": "move",
         "merge": "merge", "resize": "resize", "compact": "compact", "check": "check",
         "repair": "repair", "remove": "remove", "delete": "delete",
         "comment": "change the description of", "compare": "compare", "encrypt": "encrypt",
         "decrypt": "decrypt", "passphrase": "change the passphrase of"}


@dataclass
class Context:
    """What besides the selection decides an action's state."""
    busy: set = field(default_factory=set)                 # paths used by running jobs


def _label(node) -> str:
    return node.name


def reason(key: str, nodes: list, ctx: Context | None = None) -> str | None:
    """None when the action is enabled for ``nodes``; otherwise why it is not."""
    ctx = ctx or Context()
    if key == "add" or key == "refresh":
        return None
    if key == "network":
        if network_backends():
            return None
        return "No registered backend opens network disks (none has CONFIG without FILE)"
    if key == "create":
        if any(b.creatable for b in backends()):
            return None
        return "No registered format can create images"
    if not nodes:
        return "Select an image first" if key != "compare" else "Select two images to compare"
    if key == "compare" and len(nodes) != 2:
        return "Select two images to compare (Ctrl+click the second)"
    if key not in _MULTI and len(nodes) > 1:
        return f"Select a single image to {_VERB.get(key, 'use this action on')} it"
    if key == "properties":
        return None
    for n in nodes:
        if n.path in ctx.busy:
            return f"{_label(n)} is busy: a running job is using it"
    if key == "remove":
        return None
    if key == "delete":
        for n in nodes:
            b = n.backend
            if b is not None and not b.caps & Cap.FILE:
                return f"{_label(n)} is not stored in a file ({b.name} has no FILE capability)"
            if not any(os.path.lexists(f) for f in (n.record.files or [n.path])):
                return f"The file of {_label(n)} does not exist: use Remove from List instead"
        return None
    for n in nodes:
        if not n.accessible:
            return f"{_label(n)} is inaccessible: {n.record.error}"
        if n.backend is None:
            return f"{_label(n)}: its format is unknown"
        bad = n.broken_ancestor()
        if bad is not None:
            return (f"{_label(n)} depends on {_label(bad)}, which is inaccessible: "
                    f"{bad.record.error}")
    for n in nodes:
        r = _one(key, n)
        if r:
            return r
    return None


def _descendants(n) -> int:
    """Every image below ``n`` (children, their children...), as the details pane counts."""
    return sum(1 + _descendants(c) for c in n.children)


def _refusal(n, op) -> str | None:
    """The backend's own word on ``op`` for this image's variant (one place: the engine)."""
    r = n.backend.refusal(op, ImageFlags(n.record.image_flags or 0))
    return f"{_label(n)}: {r}" if r and not r.startswith("The ") else r


def way_out(key: str, n) -> str | None:
    """The operation that gets round a refused ``key`` on ``n`` ("convert"), or None."""
    op = {"resize": Operation.RESIZE, "compact": Operation.COMPACT}.get(key)
    if op is None or n.backend is None:
        return None
    r = n.backend.refusal(op, ImageFlags(n.record.image_flags or 0))
    return getattr(r, "way_out", None)


def _one(key: str, n) -> str | None:
    b = n.backend
    fmt = b.name
    if key == "snapshot":
        if not b.caps & Cap.DIFF:
            return f"The {fmt} format cannot have differencing images (no DIFF capability)"
        if not b.can(Operation.CREATE):
            return f"The {fmt} backend cannot create images"
        return None
    if key == "copy":
        if not any(x.creatable for x in backends()):
            return "No registered format can create images"
        return None
    if key == "move":
        if not b.caps & Cap.FILE:
            return f"{fmt} images are not files (no FILE capability) and cannot be moved"
        return None
    if key == "merge":
        if n.parent is None and not n.children:
            return f"{_label(n)} is not part of a chain: there is nothing to merge"
        if not b.caps & Cap.DIFF:
            return f"The {fmt} format has no differencing images to merge (no DIFF capability)"
        return None
    if key == "resize":
        if not b.caps & Cap.FILE:
            return (
                f"{fmt} images are not files (no FILE capability): their size is set on the server"
            )
        r = _refusal(n, Operation.RESIZE)
        if r:
            return r
        if n.children:
            k = _descendants(n)
            return (
                f"{k} differencing image{'s' if k != 1 else ''} depend{'' if k != 1 else 's'} "
                f"on {_label(n)}: resize the top of the chain instead"
            )
        return None
    if key == "compact":
        if not b.caps & Cap.FILE:
            return f"{fmt} images are not files (no FILE capability): there is no file to compact"
        r = _refusal(n, Operation.COMPACT)
        if r:
            return r
        if n.children:
            k = _descendants(n)
            return (
                f"{k} differencing image{'s' if k != 1 else ''} depend{'' if k != 1 else 's'} "
                f"on {_label(n)}; compacting it could change what they read"
            )
        return None
    if key in ("encrypt", "decrypt", "passphrase"):
        return _crypt_reason(key, n)
    if key == "check":
        if not b.can(Operation.CHECK):
            return f"The {fmt} format has no consistency check"
        return None
    if key == "repair":
        return _refusal(n, Operation.REPAIR)
    if key == "comment":
        return _refusal(n, Operation.COMMENT)
    return None


def _crypt_reason(key: str, n) -> str | None:
    enc = n.record.encryption
    if not n.backend.caps & Cap.FILE:
        return f"{n.backend.name} images are not files: vdgui encrypts image files only"
    if key == "encrypt":
        return f"{_label(n)} is encrypted already" if enc else None
    if not enc:
        return f"{_label(n)} is not encrypted"
    if enc.get("error"):
        return f"{_label(n)}: its key store cannot be read: {enc['error']}"
    if key == "passphrase" and enc.get("format") == "aes":
        return f"{_label(n)} has legacy QCOW2 AES encryption: read-only here"
    return None


def network_backends() -> list:
    """Backends configured by keys rather than stored in files (CONFIG without FILE)."""
    return [b for b in backends() if b.caps & Cap.CONFIG and not b.caps & Cap.FILE]


def all_keys() -> list[str]:
    return [s.key for s in SPECS]
