"""Job factories: one per engine operation. Each returns a :class:`~vdgui.jobs.Job` whose function
calls the public engine API (``vdgui.vd``) with the job's progress callback.
"""
from __future__ import annotations

import contextlib
import os

import vdgui.vd as vd
from vdgui.vd import Disk, ImageFlags, OpenFlags, get_backend

from . import Job


def create_job(
    location: str,
    size: int,
    format: str,
    *,
    flags: ImageFlags = ImageFlags.NONE,
    config: dict | None = None,
    comment: str | None = None,
    key: str | None = None,
    encrypt: str | None = None,
) -> Job:
    """A new base image; ``encrypt`` (a name of :func:`encryptions`, the job's new_passphrase)
    encrypts it: the format's own (LUKS) through its config, VirtualBox's as a new key store
    beside it, written first and removed again if the create fails."""
    backend = get_backend(format)

    def fn(progress):
        progress(0, size)
        cfg = dict(config or {})
        side = None
        if encrypt in VBOX:
            side = _new_keystore(location, encrypt)[1]
        elif encrypt is not None:
            cfg.update(_own_encryption(backend, encrypt))
        try:
            with Disk() as d:
                d.create_base(
                    location,
                    size,
                    backend,
                    flags=flags,
                    config=cfg or None,
                    comment=comment or None,
                    progress=progress,
                )
        except BaseException:
            if side is not None:
                os.unlink(side)
            raise
        progress(size, size)
        return [location]

    what = "fixed-size" if flags & ImageFlags.FIXED else "dynamic"
    return Job(
        f"Create {what} {backend.name} image {os.path.basename(location)}",
        fn,
        keys=[key or location],
        paths=[location],
        kind="create",
        rate=bool(flags & ImageFlags.FIXED),     # a dynamic image's progress is its virtual size
    )


def floppy_job(location: str, size: str, *, label: str = "", sources=()) -> Job:
    """A formatted FAT12 floppy holding ``sources``; the result is [location]."""
    def fn(progress):
        return [vd.create_floppy(location, size, label=label or None, sources=list(sources),
                                 progress=progress)]

    return Job(f"Create {size} floppy {os.path.basename(location)}", fn, keys=[location],
               paths=[location], kind="create_floppy")


def iso_job(location: str, *, label: str = "", sources=()) -> Job:
    """An ISO9660 image (Joliet, Rock Ridge) of ``sources``; the result is [location]."""
    def fn(progress):
        return [vd.create_iso(location, list(sources), label=label or None, progress=progress)]

    return Job(f"Create disc image {os.path.basename(location)}", fn, keys=[location],
               paths=[location], kind="create_iso")


def rawvmdk_job(location: str, drive: str, partitions=None, *, relative: bool = False) -> Job:
    """A raw host-disk VMDK over ``drive`` (the whole drive, or ``partitions``); the result is
    [location]."""
    def fn(progress):
        return [vd.create_raw_vmdk(location, drive, list(partitions) if partitions else None,
                                   relative=relative, progress=progress)]

    return Job(f"Create raw disk VMDK {os.path.basename(location)} of {drive}", fn,
               keys=[location], paths=[location], kind="create_rawvmdk")


def create_diff_job(
    parent: str,
    location: str,
    format: str | None = None,
    *,
    library=None,
    comment: str | None = None,
    key: str | None = None,
) -> Job:
    def fn(progress):
        progress(0, 1)
        with Disk.open_chain(parent, flags=OpenFlags.READ_ONLY, library=library) as d:
            d.create_diff(location, format or None, comment=comment or None)
        progress(1, 1)
        return [location]

    return Job(
        f"Create differencing image {os.path.basename(location)}",
        fn,
        keys=[key or parent],
        paths=[parent, location],
        kind="create_diff",
    )


def copy_job(src: str, dst: str, dst_format: str, *, key: str | None = None, paths=(),
             library=None, encrypt: str | None = None, **kw) -> Job:
    """A copy; an encrypted source (VirtualBox key store) is read through its filter, and
    ``encrypt`` (an ENCRYPTIONS name, the job's new_passphrase) encrypts the target."""
    def fn(progress):
        return _copy(src, dst, dst_format, progress, library=library, encrypt=encrypt, **kw)

    verb = "Convert" if kw.get("src_format") and kw["src_format"] != dst_format else "Copy"
    return Job(
        f"{verb} {os.path.basename(src)} → {os.path.basename(dst)}",
        fn,
        keys=[key or src, dst],
        paths=[src, dst, *paths],
        kind="copy",
    )


# -- encryption (issue #17): docs/design-encryption.md ------------------------------------------
VBOX = {"vbox-aes-xts256": "AES-XTS256-PLAIN64", "vbox-aes-xts128": "AES-XTS128-PLAIN64"}


def encryptions(format: str | None) -> list[str]:
    """The encryption names a new image of ``format`` can have ("luks" for formats holding it
    themselves, VirtualBox's CRYPT for VDI, VMDK and VHD)."""
    if not format:
        return []
    out = list(get_backend(format).encryptions)
    if get_backend(format).name in ("VDI", "VMDK", "VHD"):
        out += list(VBOX)
    return out


def chain_paths(d: Disk) -> list[str]:
    return [img.location for img in reversed(d.images)]


def crypt_filter(paths: list[str], library=None):
    """The CRYPT filter (unlocked through the current provider) for a chain whose files are
    ``paths`` (top first) when it has a VirtualBox key store; else None."""
    found = vd.find_keystore(paths, library=library)
    if found is None:
        return None
    cfg, _src = found
    return vd.get_filter("CRYPT").open(
        {"KeyStore": cfg["KeyStore"], "KeyId": cfg.get("KeyId") or ""}, paths[0])


def open_chain(path: str, format: str | None = None, flags=OpenFlags.READ_ONLY, *,
               library=None, config: dict | None = None) -> Disk:
    """Open ``path``'s chain for its data: through its CRYPT filter when it has a key store."""
    d = Disk.open_chain(path, format or None, flags=flags, config=config, library=library)
    try:
        f = crypt_filter(chain_paths(d), library)
        if f is not None:
            d.add_filter(f)
    except BaseException:
        d.close()
        raise
    return d


def _copy(src: str, dst: str, dst_format: str, progress, *, library=None,
          encrypt: str | None = None, **kw) -> list[str]:
    if not vd.is_network_location(src):     # key stores sit beside files
        flags = OpenFlags.READ_ONLY | (OpenFlags.FORCE_SHARE if kw.get("force_share") else 0)
        with Disk.open_chain(src, kw.get("src_format") or None, flags, kw.get("src_config"),
                             library=library) as d:
            paths = chain_paths(d)
        f = crypt_filter(paths, library)
        if f is not None:
            kw["src_filters"] = [f]
    if encrypt is None:
        return vd.copy_image(src, dst, dst_format, progress=progress, **kw)
    if encrypt not in VBOX:
        kw["dst_config"] = {**(kw.get("dst_config") or {}),
                            **_own_encryption(get_backend(dst_format), encrypt)}
        return vd.copy_image(src, dst, dst_format, progress=progress, **kw)
    new, side = _new_keystore(dst, encrypt)
    try:
        return vd.copy_image(src, dst, dst_format, progress=progress, dst_filters=[new], **kw)
    except BaseException:
        os.unlink(side)
        raise


def _own_encryption(b, encrypt: str) -> dict:
    """The config keys that make a new ``b`` image hold encryption ``encrypt`` (LUKS)."""
    if encrypt not in b.encryptions:
        raise vd.NotSupported(f"{b.name} images cannot be encrypted with {encrypt}")
    return dict(b.encryptions[encrypt])


def _new_keystore(dst: str, encrypt: str):
    """A CRYPT filter with a new key for ``dst`` and its key store written beside it (first:
    never an image without its key); (filter, key store path)."""
    if os.path.lexists(vd.sidecar_path(dst)):
        raise vd.FileExists(f"{vd.sidecar_path(dst)}: file already exists (the new key store "
                            "goes there)")
    stem = os.path.splitext(os.path.basename(dst))[0]
    new = vd.get_filter("CRYPT").open(
        {"CreateKeyStore": 1, "Algorithm": VBOX[encrypt], "KeyId": stem}, dst)
    return new, vd.write_sidecar(dst, new.properties())


def crypt_job(path: str, *, format: str, encrypt: str | None, into: str | None = None,
              into_format: str | None = None, library=None, key: str | None = None) -> Job:
    """Encrypt (``encrypt`` a name of :func:`encryptions`) or decrypt (None) ``path``: a copy
    with the encryption added or dropped, into ``into`` or, without, made beside under a
    temporary name and renamed over the image (its UUID kept). The result: [the image]."""
    def fn(progress):
        if into is not None:
            return _copy(path, into, into_format or format, progress, library=library,
                         encrypt=encrypt, src_format=format)
        real = os.path.realpath(path)
        st = os.stat(real)
        tmp = vd.temp_name(real)
        old_side = vd.sidecar_path(real)
        had_side = os.path.isfile(old_side)
        made_side = None
        try:
            if encrypt in VBOX and had_side:
                raise vd.FileExists(f"{old_side}: the image already has a key store")
            _copy(path, tmp, format, progress, library=library, encrypt=encrypt,
                  src_format=format, keep_uuid=True)
            if encrypt in VBOX:
                # the key store beside the image before the image is replaced: a crash between
                # the two leaves a key too many (delete it), never an image without its key
                made_side = vd.sidecar_path(tmp)
                os.replace(made_side, old_side)
                made_side = old_side
            now = os.stat(real)
            if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                raise vd.VDError(f"{path}: the image was replaced meanwhile; it is left alone")
            os.replace(tmp, real)              # the commit point
        except BaseException:
            for f in (tmp, vd.sidecar_path(tmp), made_side):
                if f:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(f)
            raise
        if encrypt is None:
            if had_side:
                os.unlink(old_side)
            if library is not None and library.filter_properties(path).get("CRYPT"):
                library.set_filter_properties(path, "CRYPT", {})
        return [path]

    name = os.path.basename(path)
    title = (f"Decrypt {name}" if encrypt is None else f"Encrypt {name} ({encrypt})")
    if into is not None:
        title += f" → {os.path.basename(into)}"
    return Job(title, fn, keys=[key or path] + ([into] if into else []),
               paths=[path] + ([into] if into else []), kind="crypt")


def change_passphrase_job(path: str, *, format: str | None = None, library=None,
                          key: str | None = None) -> Job:
    """A new passphrase (the job's new_passphrase; the old one is asked): LUKS changes its
    keyslots, a VirtualBox key store is rewrapped (same key, the data is not rewritten) and
    written to its sidecar, or beside the image when it came from a registry."""
    def fn(progress):
        progress(0, 1)
        with Disk.open_chain(path, format or None, flags=OpenFlags.READ_ONLY | OpenFlags.INFO,
                             library=library) as d:
            luks = d.top.encryption is not None
            paths = chain_paths(d)
        if luks:
            with Disk() as d:
                d.open(path, format or None, OpenFlags.NORMAL)
                d.top.change_passphrase()
                d.top.flush()
        else:
            found = vd.find_keystore(paths, library=library)
            if found is None:
                raise vd.NotSupported(f"{path}: not encrypted (no passphrase to change)")
            f = crypt_filter(paths, library)
            f.rewrap(path)
            _cfg, src = found
            suffix = vd.sidecar_path("")
            owner = (src[:-len(suffix)] if src.endswith(suffix) and src[:-len(suffix)] in paths
                     else path)
            vd.write_sidecar(owner, f.properties(), replace=True)
        progress(1, 1)
        return [path]

    return Job(f"Change the passphrase of {os.path.basename(path)}", fn, keys=[key or path],
               paths=[path], kind="passphrase")


def move_job(src: str, dst: str, *, key: str | None = None) -> Job:
    def fn(progress):
        vd.move_image(src, dst, progress=progress)
        return [dst]

    return Job(
        f"Move {os.path.basename(src)} → {dst}",
        fn,
        keys=[key or src],
        paths=[src, dst],
        kind="move",
    )


def merge_job(source: str, target: str, *, key: str | None = None, paths=()) -> Job:
    def fn(progress):
        return vd.merge(source, target, progress=progress)

    return Job(
        f"Merge {os.path.basename(source)} into {os.path.basename(target)}",
        fn,
        keys=[key or source],
        paths=[source, target, *paths],
        kind="merge",
    )


def resize_job(
    path: str, new_size: int, *, format: str | None = None, key: str | None = None
) -> Job:
    def fn(progress):
        return vd.resize(path, new_size, format=format, progress=progress)

    return Job(
        f"Resize {os.path.basename(path)} to {vd.format_size(new_size)}",
        fn,
        keys=[key or path],
        paths=[path],
        kind="resize",
        passes=True,
    )


def compact_job(path: str, *, format: str | None = None, key: str | None = None) -> Job:
    def fn(progress):
        return vd.compact(path, format=format, progress=progress)

    return Job(
        f"Compact {os.path.basename(path)}",
        fn,
        keys=[key or path],
        paths=[path],
        kind="compact",
        passes=True,
    )


def sparsify_job(
    path: str, *, format: str | None = None, key: str | None = None, dry_run: bool = False,
    dynamic: bool = False,
) -> Job:
    """Sparsify in place (or, ``dry_run``, only measure; ``dynamic``: a fixed image becomes
    its dynamic variant); the result is a vd.SparsifyReport."""

    def fn(progress):
        return vd.sparsify(path, format=format, dry_run=dry_run, progress=progress,
                           dynamic=dynamic)

    title = ("Measure free space in " if dry_run else "Sparsify ") + os.path.basename(path)
    return Job(
        title,
        fn,
        keys=[key or path],
        paths=[path],
        kind="sparsify_plan" if dry_run else "sparsify",
        passes=not dry_run,
    )


def compare_job(a: str, b: str, *, formats=(None, None), keys=()) -> Job:
    """Compare what two images read; the result is a vd.CompareResult."""

    def fn(progress):
        return vd.compare(a, b, a_format=formats[0], b_format=formats[1], progress=progress)

    return Job(
        f"Compare {os.path.basename(a)} with {os.path.basename(b)}",
        fn,
        keys=list(keys) or [a, b],
        paths=[a, b],
        kind="compare",
    )


def check_job(
    path: str, *, repair: bool = False, format: str | None = None, key: str | None = None
) -> Job:
    def fn(progress):
        return vd.check(path, format=format, repair=repair, progress=progress)

    verb = "Repair" if repair else "Check"
    return Job(
        f"{verb} {os.path.basename(path)}",
        fn,
        keys=[key or path],
        paths=[path],
        kind="repair" if repair else "check",
        passes=repair,
    )


def set_comment_job(path: str, comment: str, *, library=None, key: str | None = None) -> Job:
    def fn(progress):
        progress(0, 1)
        with Disk.open_chain(path, library=library) as d:
            d.set_comment(-1, comment)
            d.flush()
        progress(1, 1)
        return path

    return Job(
        f"Set the comment of {os.path.basename(path)}",
        fn,
        keys=[key or path],
        paths=[path],
        kind="set_comment",
    )


def allocation_job(
    path: str, *, library=None, format: str | None = None, config: dict | None = None
) -> Job:
    """Reads the chain's allocation map (for the details picture); invisible in the panel."""

    def fn(progress):
        flags = OpenFlags.READ_ONLY | OpenFlags.SKIP_CONSISTENCY_CHECKS
        locked = False
        try:
            d = open_chain(path, format, flags, config=config or None, library=library)
        except (vd.PassphraseRequired, vd.WrongPassphrase):
            locked = True
            # encrypted and not unlocked yet: the map from the headers, no partitions
            d = Disk.open_chain(path, format or None, flags=flags | OpenFlags.INFO,
                                library=library)
        with d:
            size = d.size
            extents = d.allocation()
            members = [img.location for img in d.images]
            partitions = [] if locked else _partition_marks(d)
        return {
            "path": path,
            "size": size,
            "extents": extents,
            "members": members,
            "partitions": partitions,
        }

    return Job(f"Read allocation of {os.path.basename(path)}", fn, kind="allocation",
               visible=False, asks=False)


def _partition_marks(d) -> list:
    """(start, size, label) of the partitions, for the allocation picture's overlay; [] for a
    disk without a table or one that cannot be read."""
    try:
        lay = vd.disk_layout(d)
    except vd.VDError:
        return []
    if lay.scheme == "none":
        return []
    return [
        (p.start, p.size, f"{p.number}" + (f" {p.filesystem}" if p.filesystem else ""))
        for p in lay.partitions
        if p.size > 0 and p.type not in ("0x05", "0x0f", "0x85")
    ]


def key_stores(recs: list, library=None) -> list:
    """Records of images with a VirtualBox key store (a sidecar, or kept from an imported
    registry) get its summary as their ``encryption`` ("key_store": where it was found); a
    damaged one says so. Returns ``recs``."""
    for rec in recs:
        if rec.encryption is not None or rec.error is not None \
                or vd.is_network_location(rec.path):
            continue
        try:
            found = vd.find_keystore([rec.path], library=library)
            if found is None:
                continue
            cfg, src = found
            rec.encryption = {**vd.KeyStore.decode(cfg["KeyStore"], src).summary(),
                              "key_id": cfg.get("KeyId") or "", "key_store": src}
        except vd.VDError as exc:
            rec.encryption = {"format": "vbox-crypt", "error": exc.message}
    return recs


def scan_job(library, paths: list[str] | None = None) -> Job:
    """Add ``paths`` (with their parents) to the library, or re-read everything when None."""

    def fn(progress):
        if paths is None:
            return key_stores(library.scan_all(progress), library)
        out = []
        for i, p in enumerate(paths):
            if progress(i, len(paths)) is False:
                raise vd.Cancelled()
            out += library.add_with_parents(p)
        progress(len(paths), len(paths))
        return key_stores(out, library)

    title = (
        "Refresh the media list"
        if paths is None
        else f"Add {os.path.basename(paths[0])}"
        + (f" and {len(paths) - 1} more" if len(paths) > 1 else "")
    )
    return Job(title, fn, kind="scan", visible=False)


def delete_job(images: list[tuple[str, list[str]]], library=None) -> Job:
    """Delete image files from disk: ``images`` is [(path, files)]; forgets them in the library."""

    def fn(progress):
        total = len(images)
        progress(0, total)
        deleted = []
        for i, (path, files) in enumerate(images):
            for f in files or [path]:
                try:
                    os.remove(f)
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    raise vd.VDIOError(f"{f}: cannot delete: {exc.strerror or exc}") from None
            if library is not None:
                library.remove(path)
            deleted.append(path)
            progress(i + 1, total)
        return deleted

    return Job(
        f"Delete {len(images)} image file(s)",
        fn,
        paths=[p for p, _ in images],
        keys=[p for p, _ in images],
        kind="delete",
        rate=False,                              # counts files
    )


# -- looking inside a disk (issue #15) ---------------------------------------------------------
def _open_ro(path: str, library=None, format: str | None = None):
    return open_chain(path, format, OpenFlags.READ_ONLY, library=library)


def layout_job(path: str, *, library=None, format: str | None = None) -> Job:
    """The partition layout; the result is {"path", "layout", "differencing"}."""

    def fn(progress):
        with _open_ro(path, library, format) as d:
            return {"path": path, "layout": vd.disk_layout(d), "differencing": len(d.images) > 1}

    return Job(f"Read the partitions of {os.path.basename(path)}", fn, kind="layout", visible=False)


def list_job(
    path: str, number: int, folder: str, *, library=None, format: str | None = None
) -> Job:
    """The entries of ``folder`` in volume ``number`` (0: the whole disk), in a pool thread;
    the result is {"path", "number", "folder", "entries", "stamp"}."""

    def fn(progress):
        # the volume stays open between listings (vd.volumes: bounded, reopened when the
        # chain's files change or after an idle close; the contents view closes it when the
        # shown image changes). "stamp": the chain's files this listing saw
        with vd.volumes.use(path, number, format=format, library=library,
                            opener=lambda: _open_ro(path, library, format)) as fs:
            return {"path": path, "number": number, "folder": folder, "entries": fs.listdir(folder),
                    "stamp": vd.volumes.stamp(path)}

    return Job(f"List {folder} in {os.path.basename(path)}", fn, kind="list", visible=False)


def changed_job(path: str, *, library=None, format: str | None = None) -> Job:
    """What the top image of a differencing chain changed (a vd.ChangeReport)."""

    def fn(progress):
        progress(0, 1)
        with _open_ro(path, library, format) as d:
            return vd.changed(d)

    return Job(f"Find what {os.path.basename(path)} changed", fn, kind="changed")


def extract_job(
    path: str,
    items: list[tuple[int, str]],
    dest_dir: str,
    *,
    library=None,
    format: str | None = None,
) -> Job:
    """Copy files or folder trees (``(volume number, path)`` pairs) into ``dest_dir``. Each item
    is written under a temporary name and renamed when complete; a cancelled or failed job leaves
    nothing behind. The result is the list of created paths."""
    def fn(progress):
        with _open_ro(path, library, format) as d:
            trees = [(vd.open_volume(d, number or None)[1], vpath, dest_dir)
                     for number, vpath in items]
            return vd.extract_trees(trees, progress, into=True)

    what = items[0][1] if len(items) == 1 else f"{len(items)} items"
    return Job(
        f"Extract {what} from {os.path.basename(path)}",
        fn,
        keys=[path],
        paths=[path],
        kind="extract",
    )
