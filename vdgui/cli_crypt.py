"""vdgui-img and filters: the filter table's listing, and VirtualBox's disk encryption (the
CRYPT filter, issue #17).

The key store is not in the image: vdgui-img finds it in ``--keystore FILE`` (a VirtualBox.xml
or .vbox, whose medium matching a chain member is used; a key store sidecar; a bare base64 key
store) or in the sidecar ``<image file>.keystore`` of a chain member (top first). An image with
a key store is read and written through the filter, which asks for the passphrase
(``--passphrase-file``). ``--encrypt vbox-aes-xts256|vbox-aes-xts128`` writes a new key store
to the target's sidecar first (removed again if the command fails)."""
from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

import vdgui.vd as vd

from .cli_parser import CLIError

VBOX = {"vbox-aes-xts256": "AES-XTS256-PLAIN64", "vbox-aes-xts128": "AES-XTS128-PLAIN64"}


# -- passphrases and the encryption formats hold themselves (LUKS) ------------------------------
def passphrases(args) -> vd.PassphraseProvider:
    """--passphrase-file (each tried per encrypted member), --new-passphrase-file: cli.main()
    sets this provider around every command, the one place passphrases enter."""
    given = [vd.read_passphrase_file(p) for p in getattr(args, "passphrase_file", None) or []]
    new_file = getattr(args, "new_passphrase_file", None)
    return vd.PassphraseProvider(given, new=vd.read_passphrase_file(new_file) if new_file
                                 else None)


def encryption_config(args, be: vd.Backend, props: dict) -> dict:
    """--encrypt KIND: the config keys that ask the target's backend for encryption it holds
    itself (LUKS: ``Backend.encryptions``); VirtualBox's kinds are a filter (below)."""
    kind = getattr(args, "encrypt", None)
    if kind is None:
        if getattr(args, "new_passphrase_file", None):
            raise CLIError("--new-passphrase-file needs --encrypt KIND")
        return props
    if kind in VBOX:
        return props
    known = sorted({k for b in vd.backends() for k in b.encryptions} | set(VBOX))
    if kind not in known:
        raise vd.NotSupported(f"--encrypt {kind}: unknown encryption (known: "
                              f"{', '.join(known)})")
    if not getattr(args, "new_passphrase_file", None):
        raise CLIError("--encrypt needs a new passphrase: --new-passphrase-file FILE")
    if kind not in be.encryptions:
        able = sorted(b.name for b in vd.backends() if kind in b.encryptions)
        raise vd.NotSupported(f"{be.name} images cannot be encrypted with '{kind}' (formats "
                              f"that can: {', '.join(able)})")
    return {**props, **be.encryptions[kind]}


def rewrapped(args, be: vd.Backend, cfg: dict | None, flags: vd.OpenFlags) -> bool:
    """``set --new-passphrase-file`` of an image that does not hold its encryption itself (no
    LUKS header): a new VirtualBox key store (change_passphrase below); True when done."""
    if not getattr(args, "new_passphrase_file", None):
        return False
    img = be.open(args.image, flags | vd.OpenFlags.INFO | vd.OpenFlags.READ_ONLY, cfg)
    try:
        if img.encryption is not None:
            return False        # LUKS: the image changes its own keyslots (cmd_set)
    finally:
        img.close()
    change_passphrase(args, args.image, be.name, flags)
    return True


def chain_paths(d: vd.Disk) -> list[str]:
    """The chain's image files, top first (where a key store is looked for)."""
    return [img.location for img in reversed(d.images)]


def keystore_for(args, paths: list[str]) -> tuple[dict, str] | None:
    """(CRYPT configuration, the file it came from) for the chain ``paths``, or None. When
    ``--keystore`` was given, a chain it has nothing for (and no sidecar) is an error: reading
    ciphertext as if it were plain would be silent garbage."""
    given = getattr(args, "keystore", None) or []
    found = vd.find_keystore(paths, given)
    if found is None and given:
        raise vd.ImageNotFound(f"{paths[0]}: no key store for this image in "
                               f"{', '.join(given)} (nor a {vd.sidecar_path('')} beside it)")
    return found


def _open_filter(found: tuple[dict, str], location: str) -> vd.Filter:
    cfg, _src = found
    return vd.get_filter("CRYPT").open(
        {"KeyStore": cfg["KeyStore"], "KeyId": cfg.get("KeyId") or ""}, location)


def add_filters(args, d: vd.Disk) -> None:
    """Put the CRYPT filter on ``d`` when its chain has a key store."""
    found = keystore_for(args, chain_paths(d))
    if found is not None:
        d.add_filter(_open_filter(found, d.top.location))


def source_chain(args, path: str, fmt: str | None,
                 flags: vd.OpenFlags) -> tuple[list[vd.Filter], list[str]]:
    """The filters a copy reads ``path``'s chain through (unlocked before anything is made) and
    the chain's files, top first."""
    with vd.Disk.open_chain(path, fmt, flags | vd.OpenFlags.READ_ONLY) as d:
        paths = chain_paths(d)
    found = keystore_for(args, paths)
    return ([] if found is None else [_open_filter(found, path)]), paths


def info(args, paths: list[str]) -> dict | None:
    """What ``info`` shows of a chain's CRYPT key store, without a passphrase."""
    found = keystore_for(args, paths)
    if found is None:
        return None
    cfg, src = found
    ks = vd.KeyStore.decode(cfg["KeyStore"], src)
    return {**ks.summary(), "key_id": cfg.get("KeyId") or "", "key_store": src}


def new_filter(args, dsts: list[str]) -> vd.Filter | None:
    """A CRYPT filter with a new key and key store for ``--encrypt vbox-…`` (the images to make
    ``dsts``, the top last); None without."""
    kind = getattr(args, "encrypt", None)
    if kind not in VBOX:
        return None             # none, or one the format holds itself (cli._encryption)
    for dst in dsts:
        side = vd.sidecar_path(dst)
        if os.path.lexists(side):
            raise vd.FileExists(f"{side}: file already exists (the new key store goes there)")
    stem = os.path.splitext(os.path.basename(dsts[-1]))[0]
    return vd.get_filter("CRYPT").open(
        {"CreateKeyStore": 1, "Algorithm": VBOX[kind], "KeyId": stem}, dsts[-1])


@contextlib.contextmanager
def keystore_written(dsts: list[str], f: vd.Filter | None) -> Iterator[None]:
    """Write ``f``'s key store beside each of ``dsts`` (every member of a chain copy) before
    the block makes them; if the block fails, they go again (no image is left without its key,
    nor a key without its image)."""
    sides: list[str] = []
    try:
        for dst in dsts if f is not None else ():
            sides.append(vd.write_sidecar(dst, f.properties()))
        yield
    except BaseException:
        for side in sides:
            with contextlib.suppress(OSError):
                os.unlink(side)
        raise


def change_passphrase(args, image: str, fmt: str | None, flags: vd.OpenFlags) -> int:
    """``set IMAGE --passphrase-file OLD --new-passphrase-file NEW``: a new key store for the
    same key (the image is not rewritten), written to the sidecar it came from, or beside the
    image when it came from a VirtualBox registry (which vdgui never edits)."""
    with vd.Disk.open_chain(image, fmt, flags | vd.OpenFlags.READ_ONLY) as d:
        paths = chain_paths(d)
    found = keystore_for(args, paths)
    if found is None:
        raise vd.NotSupported(f"{image}: no VirtualBox key store found (looked for "
                              f"{os.path.basename(vd.sidecar_path(image))} beside each image of "
                              "the chain; give the registry with --keystore FILE)")
    f = _open_filter(found, image)
    f.rewrap(image)
    _cfg, src = found
    suffix = vd.sidecar_path("")
    owner = src[:-len(suffix)] if src.endswith(suffix) and src[:-len(suffix)] in paths else image
    target = vd.write_sidecar(owner, f.properties(), replace=True)
    if target != src:
        sys.stderr.write(f"new key store written to {target}; {src} still holds the old one "
                         "(copy the two Property lines into it for VirtualBox)\n")
    return 0


def key_row(k: vd.ConfigKey) -> dict:
    """A configuration key as ``backends --json`` shows it (formats and filters alike)."""
    return {"name": k.name, "type": k.type.name.lower(), "default": k.default,
            "flags": [f.name.lower() for f in vd.KeyFlag if f and f.name and k.flags & f],
            "description": k.description, "label": k.title, "unit": k.unit,
            "choices": list(k.choices) or None,
            "variant": [f.name.lower() for f in vd.ImageFlags
                        if f and f.name and k.variant & f] or None}


def filter_rows() -> list[dict]:
    """``backends --json`` rows of the filters: a format row's keys, those a filter has not
    empty (no extensions, operations, sizes or variants)."""
    return [{"kind": "filter", "name": f.name, "description": f.description,
             "origin": {"kind": "built-in", "distribution": None, "version": None,
                        "entry_point": None},
             "aliases": [],
             "capabilities": [c.name for c in vd.FilterCap if c and c.name and f.caps & c],
             "extensions": [],
             "config_keys": [key_row(k) for k in f.config_keys],
             "operations": [], "can_shrink": False, "max_size": None, "variants": None}
            for f in vd.filters()]


def print_filters(rows: list[dict], out) -> None:
    for r in rows:
        out(f"filter {r['name']}: {r['description']}")
        out(f"  capabilities: {', '.join(r['capabilities'])}")
        for k in r["config_keys"]:
            out(f"  key {k['name']} ({k['label']}): {k['type']}")
