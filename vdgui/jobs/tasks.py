"""Job factories: one per engine operation. Each returns a :class:`~vdgui.jobs.Job` whose function
calls the public engine API (``vdgui.vd``) with the job's progress callback.
"""
from __future__ import annotations

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
) -> Job:
    backend = get_backend(format)

    def fn(progress):
        progress(0, size)
        with Disk() as d:
            d.create_base(
                location,
                size,
                backend,
                flags=flags,
                config=config or None,
                comment=comment or None,
                progress=progress,
            )
        progress(size, size)
        return [location]

    what = "fixed-size" if flags & ImageFlags.FIXED else "dynamic"
    return Job(
        f"Create {what} {backend.name} image {os.path.basename(location)}",
        fn,
        keys=[key or location],
        paths=[location],
        kind="create",
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


def copy_job(src: str, dst: str, dst_format: str, *, key: str | None = None, paths=(), **kw) -> Job:
    def fn(progress):
        return vd.copy_image(src, dst, dst_format, progress=progress, **kw)

    verb = "Convert" if kw.get("src_format") and kw["src_format"] != dst_format else "Copy"
    return Job(
        f"{verb} {os.path.basename(src)} → {os.path.basename(dst)}",
        fn,
        keys=[key or src, dst],
        paths=[src, dst, *paths],
        kind="copy",
    )


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
        with Disk.open_chain(
            path,
            format or None,
            flags=OpenFlags.READ_ONLY | OpenFlags.SKIP_CONSISTENCY_CHECKS,
            config=config or None,
            library=library,
        ) as d:
            size = d.size
            extents = d.allocation()
            members = [img.location for img in d.images]
            partitions = _partition_marks(d)
        return {
            "path": path,
            "size": size,
            "extents": extents,
            "members": members,
            "partitions": partitions,
        }

    return Job(f"Read allocation of {os.path.basename(path)}", fn, kind="allocation", visible=False)


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


def scan_job(library, paths: list[str] | None = None) -> Job:
    """Add ``paths`` (with their parents) to the library, or re-read everything when None."""

    def fn(progress):
        if paths is None:
            return library.scan_all(progress)
        out = []
        for i, p in enumerate(paths):
            if progress(i, len(paths)) is False:
                raise vd.Cancelled()
            out += library.add_with_parents(p)
        progress(len(paths), len(paths))
        return out

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
    )


# -- looking inside a disk (issue #15) ---------------------------------------------------------
def _open_ro(path: str, library=None, format: str | None = None):
    return Disk.open_chain(path, format or None, flags=OpenFlags.READ_ONLY, library=library)


def layout_job(path: str, *, library=None, format: str | None = None) -> Job:
    """The partition layout; the result is {"path", "layout", "differencing"}."""

    def fn(progress):
        with _open_ro(path, library, format) as d:
            return {"path": path, "layout": vd.disk_layout(d), "differencing": len(d.images) > 1}

    return Job(f"Read the partitions of {os.path.basename(path)}", fn, kind="layout", visible=False)


def list_job(
    path: str, number: int, folder: str, *, library=None, format: str | None = None
) -> Job:
    """The entries of ``folder`` in volume ``number`` (0: the whole disk), in a pool thread."""

    def fn(progress):
        # the volume stays open between listings (vd.volumes: bounded, reopened when the
        # chain's files change; the contents view closes it when the shown image changes)
        with vd.volumes.use(path, number, format=format, library=library) as fs:
            return {"path": path, "number": number, "folder": folder, "entries": fs.listdir(folder)}

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
