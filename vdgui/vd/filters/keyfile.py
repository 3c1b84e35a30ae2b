"""Where a CRYPT key store lives outside VirtualBox's media registry.

VirtualBox keeps ``CRYPT/KeyId`` and ``CRYPT/KeyStore`` as ``<Property>`` elements of the
medium's ``<HardDisk>`` in VirtualBox.xml or the VM's .vbox; the image file holds nothing.
vdgui never edits those files. Outside a registry it uses a *sidecar* beside the image,
``<image file>.keystore``: a small XML file with the same two ``<Property>`` lines, ready to be
pasted under the medium's ``<HardDisk>`` element. :func:`read_keystore_file` reads a sidecar, a
VirtualBox.xml/.vbox (the medium whose location or UUID matches the image) or a bare base64
key store.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ..errors import CorruptImage, FileExists, ImageNotFound, InvalidArgument
from ..paths import read_small_file
from ..temps import atomic_files

if TYPE_CHECKING:  # pragma: no cover
    import xml.etree.ElementTree as ET

    from ..library import Library

SUFFIX = ".keystore"
PREFIX = "CRYPT/"
MAX_FILE = 16 << 20          # a VirtualBox.xml with many media is still small


def sidecar_path(image_path: str) -> str:
    return image_path + SUFFIX


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _props_of(elem: ET.Element) -> dict[str, str]:
    out = {}
    for child in elem:
        if _local(child.tag) == "Property":
            name = child.get("name") or ""
            if name.startswith(PREFIX):
                out[name[len(PREFIX):]] = child.get("value") or ""
    return out


def read_keystore_file(path: str, image_path: str | None = None,
                       image_uuid: str | None = None) -> dict[str, str]:
    """The CRYPT configuration (``KeyStore``, ``KeyId`` when known) that ``path`` holds for the
    image at ``image_path`` (or with ``image_uuid``)."""
    data = read_small_file(path, "key store file", limit=MAX_FILE)
    text = data.lstrip()
    if not text.startswith(b"<"):
        return {"KeyStore": data.decode("ascii", "replace")}
    import xml.etree.ElementTree as ET  # on first use: info and open need no XML
    try:
        root = ET.fromstring(data)
    except ET.ParseError as exc:
        raise CorruptImage(f"not a key store file: {exc}", path=path) from None
    if _local(root.tag) != "VirtualBox":
        props = _props_of(root)
        if "KeyStore" not in props:
            raise CorruptImage("no CRYPT/KeyStore property", path=path)
        return props
    return _from_registry(path, image_path, image_uuid)


def _from_registry(path: str, image_path: str | None, image_uuid: str | None) -> dict[str, str]:
    from ..library import read_virtualbox_registry

    media = [m for m in read_virtualbox_registry(path) if "KeyStore" in _crypt(m)]
    want = os.path.realpath(image_path) if image_path else None
    for m in media:
        if (want and os.path.realpath(m["path"]) == want) or (
                image_uuid and m["uuid"] == str(image_uuid).lower()):
            return _crypt(m)
    if len(media) == 1 and want is None and image_uuid is None:
        return _crypt(media[0])
    name = os.path.basename(image_path) if image_path else str(image_uuid)
    raise ImageNotFound(f"{path}: no encrypted medium matches {name} "
                        f"({len(media)} encrypted media listed)")


def _crypt(medium: dict) -> dict[str, str]:
    props = medium.get("properties") or {}
    return {k[len(PREFIX):]: v for k, v in props.items() if k.startswith(PREFIX)}


def write_sidecar(image_path: str, props: dict[str, str], *, replace: bool = False) -> str:
    """Write the sidecar of ``image_path`` (under a temporary name, then renamed). Refuses to
    replace an existing one unless ``replace``."""
    target = sidecar_path(image_path)
    if os.path.lexists(target) and not replace:
        raise FileExists(f"{target}: file already exists")
    if "KeyStore" not in props:
        raise InvalidArgument("no key store to write")
    import xml.etree.ElementTree as ET
    root = ET.Element("CryptProperties")
    root.text = "\n  "
    items = [("KeyId", props.get("KeyId") or ""), ("KeyStore", props["KeyStore"])]
    for i, (k, v) in enumerate(items):
        e = ET.SubElement(root, "Property", {"name": PREFIX + k, "value": v})
        e.tail = "\n  " if i < len(items) - 1 else "\n"
    body = ET.tostring(root, encoding="unicode")
    note = (f"<!-- VirtualBox CRYPT key store of {os.path.basename(image_path)} (vdgui). "
            "To use the image in VirtualBox, put the two Property lines under its <HardDisk> "
            "in the VM's .vbox. Not a secret; the passphrase is. -->\n")
    with atomic_files([target], overwrite=replace) as (tmp,), \
            open(tmp, "w", encoding="utf-8") as fh:
        fh.write(note + body + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    return target


def copy_sidecar(side: str, image_path: str) -> str:
    """Copy the key store file ``side`` to ``image_path``'s sidecar (never replacing one)."""
    data = read_small_file(side, "key store file", limit=MAX_FILE)
    target = sidecar_path(image_path)
    with atomic_files([target]) as (tmp,), open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    return target


def find_keystore(paths: list[str], files: list[str] | tuple[str, ...] = (),
                  library: Library | None = None) -> tuple[dict[str, str], str] | None:
    """(CRYPT configuration, where it came from) for a chain whose image files are ``paths``
    (top first), or None: the first of ``files`` (registries, sidecars, bare key stores) that
    has one for a member, else the sidecar of the first member that has one, else what
    ``library`` kept from an imported VirtualBox registry ("library")."""
    for f in files:
        for p in paths:
            try:
                return read_keystore_file(f, p), f
            except ImageNotFound:
                continue
    for p in paths:
        side = sidecar_path(p)
        if os.path.isfile(side):
            return read_keystore_file(side, p), side
    if library is not None:
        for p in paths:
            props = library.filter_properties(p).get("CRYPT") or {}
            if props.get("KeyStore"):
                return dict(props), "library"
    return None


__all__ = ["SUFFIX", "copy_sidecar", "find_keystore", "read_keystore_file", "sidecar_path",
           "write_sidecar"]
