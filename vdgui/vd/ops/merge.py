"""Merge images of one chain (vd.h VDMerge), with an order that never breaks the chain.

Forward merge (``source`` is a descendant of ``target``): the blocks that the images from
``source`` down to ``target + 1`` hold are written into ``target``; the children of ``source``
are relinked to ``target``; the merged-away images are deleted.

Backward merge (``source`` is an ancestor of ``target``): the blocks that the images from
``source`` up to ``target - 1`` hold and ``target`` does not are copied into ``target``; then
``target`` is relinked to the parent of ``source`` (or made a base image); the merged-away images
are deleted.

Why an interruption at any point leaves a chain that opens and reads the same content is written
down step by step in docs/operations.md. In short: data first (flushed), one link rewrite (the
commit point), deletions last, deletions from the top down.

The operation never names a format; it uses the WRITE and RELINK declarations and hooks.
"""
from __future__ import annotations

import contextlib
import os
from collections import deque
from collections.abc import Callable

from ..backend import Backend, Cap, OpenFlags, Operation
from ..chain import find_children, link_matches  # find_children: also imported from here
from ..disk import Disk
from ..errors import (
    Cancelled,
    ImageChanged,
    InvalidArgument,
    NotSupported,
    ParentMismatch,
    ReadOnlyImage,
    VDError,
)
from ..fileio import LockMode, lock_files
from ..filters.keyfile import copy_sidecar, sidecar_path
from ..image import Alloc, FillFn, Image
from ..progress import Progress, ProgressCallback
from ..sparse import is_zero
from .pipeline import READAHEAD, Readers, Writeback, store_zeroes

CHUNK = 1 << 20           # bytes copied per step (progress and cancellation granularity)
ZERO_STEP = 256 << 20     # bytes of a zero run marked per step


def _real(path: str) -> str:
    return os.path.realpath(os.path.abspath(path))


# -- the merge itself ---------------------------------------------------------------------------
def _require(img: Image, op: Operation, why: str) -> None:
    if not img.backend.can(op):
        raise NotSupported(f"{img.location}: cannot merge: the {img.format} backend does not "
                           f"support {op.value} ({why})")


def _copy_runs(disk: Disk, runs: list[tuple[int, int, Alloc, int]], level: int, read_top: int,
               prog: Progress, readers: Readers | None = None, reader_top: int = 0,
               below: FillFn | None = None) -> None:
    """Write ``runs`` (start, length, status, the image holding them; as seen through image
    ``read_top``) into image ``level`` of ``disk``. ``readers``: read-ahead threads with their
    own read-only opens of the chain, reading through ``reader_top`` (an image that is not
    written during the copy) straight from the holder; a window they could not read is read
    again here, where an error is reported as usual. ZERO runs become zero markers or holes
    (``store_zeroes``), zeroes written only where the target cannot say "zero" and ``below``
    (what lies under the target once the merge is done; None: nothing) shows through."""
    img = disk.images[level]
    fill = lambda o, n: disk.read_below(level, o, n)  # noqa: E731 - content under the target
    pending: deque = deque()
    wb = Writeback(img)

    def settle() -> None:
        pos, n, fut = pending.popleft()
        if fut is not None and fut.exception() is None:
            data = fut.result()
        else:
            data = disk.read(pos, n, top=read_top)
        img.write(pos, data, fill)
        wb.add(n)
        if below is not None and is_zero(data):
            # a zero write the backend chose not to allocate would show the parent: verify
            for s, ln, st in img.block_status(pos, n):
                if st == Alloc.UNALLOCATED and not is_zero(below(s, ln)):
                    raise NotSupported(
                        f"{img.location}: cannot merge: the {img.format} backend did not store "
                        f"zeroes written at offset {s:#x}; nothing was relinked or deleted and "
                        "the chain reads as before")
        prog.advance(n)

    depth = READAHEAD // CHUNK if readers is not None else 0
    # zero runs first (the runs do not overlap): the space they free in the target is then
    # free before the data comes, for a target that reuses freed space (QCOW2)
    runs = sorted(runs, key=lambda r: r[2] != Alloc.ZERO)
    try:
        for start, length, status, holder in runs:
            if status == Alloc.ZERO:
                pos, end = start, start + length
                while pos < end:        # in steps: progress and cancellation
                    n = min(ZERO_STEP - pos % ZERO_STEP, end - pos)
                    store_zeroes(img, pos, n, fill, below)
                    prog.advance(n)
                    pos += n
                continue
            pos, end = start, start + length
            while pos < end:
                n = min(CHUNK - pos % CHUNK, end - pos)
                fut = readers.submit(pos, n, reader_top, holder) if readers is not None else None
                pending.append((pos, n, fut))
                while len(pending) > depth:
                    settle()
                pos += n
        while pending:
            settle()
    finally:
        wb.close()


def _merge_readers(disk: Disk, top: int) -> Readers | None:
    """Read-ahead for a merge of a chain of files: each reader thread opens the chain from
    image ``top`` down read-only (no lock) and must find the same files."""
    if not all(img.backend.caps & Cap.FILE for img in disk.images[:top + 1]):
        return None
    want = [_real(img.location) for img in disk.images[:top + 1]]
    top_img = disk.images[top]

    def opener() -> Disk:
        d = Disk.open_chain(top_img.location, top_img.backend.name, OpenFlags.READ_ONLY)
        if [_real(img.location) for img in d.images] != want:
            d.close()
            raise InvalidArgument("the chain opened for reading ahead differs")
        return d
    return Readers(opener)


def _runs_to_copy(disk: Disk, top: int, bottom: int, want: Callable[[int], bool]):
    runs = []
    for e in disk.allocation(0, disk.images[top].size, top=top, bottom=bottom):
        if e.level is not None and want(e.level) and e.status != Alloc.UNALLOCATED:
            runs.append((e.start, e.length, e.status, e.level))
    return runs


def _delete_image(img: Image) -> None:
    files = img.files()
    held = {_real(f.path): f for f in img.open_files()}
    keep = set()
    for f in files:                   # a file replaced or removed meanwhile is not ours to delete
        try:
            if _real(f) in held:
                held[_real(f)].check_in_place("the merge")
        except ImageChanged:
            keep.add(f)
    try:      # the exclusive lock is held until the names are gone: no one opens them between
        hold = lock_files([f for f in files if f not in keep], LockMode.EXCLUSIVE)
    except VDError:
        hold = None
    try:
        img.close()
        for f in files:
            if f in keep:
                continue
            try:
                os.unlink(f)
            except FileNotFoundError:
                pass
    finally:
        if hold is not None:
            hold.close()


def _keep_key_store(target: str, gone: list[str]) -> str | None:
    """A VirtualBox key store sidecar (issue #17) of an image about to be merged away is copied
    beside the target when it has none, so the chain keeps its key. Returns the sidecar to
    remove once its image is deleted."""
    if os.path.lexists(sidecar_path(target)):
        return None
    for loc in gone:
        side = sidecar_path(loc)
        if os.path.isfile(side):
            copy_sidecar(side, target)
            return side
    return None


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(os.path.dirname(os.path.abspath(path)) or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _preflight(disk: Disk, s: int, t: int, extra_children: list[tuple[str, Backend]]) -> None:
    """Every refusal happens here, before any byte is written (works on a read-only disk)."""
    n = len(disk.images)
    if not (0 <= s < n and 0 <= t < n):
        raise InvalidArgument(f"merge: image numbers {s} and {t} must lie in a chain of {n} images")
    if s == t:
        raise InvalidArgument("merge: source and target are the same image")
    target = disk.images[t]
    _require(target, Operation.WRITE, "the merge writes into it")
    forward = s > t
    if forward:
        above = ([(disk.images[s + 1].location, disk.images[s + 1].backend)] if s + 1 < n
                 else []) + list(extra_children)
        for path, be in above:
            if not be.can(Operation.RELINK):
                raise NotSupported(f"cannot merge: {path} must be linked to the target, but the "
                                   f"{be.name} backend does not support relink")
        if disk.images[s].size > target.size:
            _require(target, Operation.RESIZE, "it is smaller than the source")
        if s + 1 < n:
            why = disk.images[s + 1].relink_refusal(target)
            if why:
                raise NotSupported(f"cannot merge: {why}")
        for path, be in extra_children:
            child = be.open(path, OpenFlags.INFO | OpenFlags.READ_ONLY, None)
            try:
                why = child.relink_refusal(target)
            finally:
                child.close()
            if why:
                raise NotSupported(f"cannot merge: {why}")
    else:
        _require(target, Operation.RELINK, "it is linked to the parent of the source")
        why = target.relink_refusal(disk.images[s - 1] if s > 0 else None)
        if why:
            raise NotSupported(f"cannot merge: {why}")
    _refuse_outside_children(disk, s, t, [p for p, _ in extra_children])


def _merge(disk: Disk, s: int, t: int, progress: ProgressCallback | None,
           children: list[Image], refresh: list[Image]) -> None:
    """The merge proper. ``children``: images to relink to the target (forward: the children of
    the source). ``refresh``: children of the target whose link may name the target's
    modification id (backward) and is rewritten after the target was written."""
    target = disk.images[t]
    if target.read_only:
        raise ReadOnlyImage(f"{target.location}: the merge target must be opened read-write")
    for c in children:
        if c.read_only:
            raise ReadOnlyImage(f"{c.location}: must be opened read-write to relink it")
    forward = s > t
    lo, hi = (t + 1, s) if forward else (s, t - 1)      # the merged-away images
    refresh = [c for c in refresh if link_matches(c, target)]   # a broken link stays broken

    # the children's links (VMDK parentCID, VHDX parent_linkage) keep matching the target while
    # it is written: the chain opens at every moment, and the relink names the same identity
    target.keep_link_identity = True

    # grow a smaller forward target first (the new area reads zeroes: nothing changes above)
    if forward and disk.images[s].size > target.size:
        target.resize(disk.images[s].size)
        target.flush()

    if forward:
        runs = _runs_to_copy(disk, s, t + 1, lambda lv: t < lv <= s)
        read_top = s
    else:
        # what the images source..target-1 hold and the target does not
        runs = _runs_to_copy(disk, t, s, lambda lv: s <= lv < t)
        read_top = t
    total = sum(r[1] for r in runs)
    prog = Progress(progress, total)
    prog.start()
    old_hz = getattr(target, "honor_zeroes", False)
    target.honor_zeroes = True        # data that reads zero is stored as data, not skipped
    # read-ahead through images the copy does not write: forward, the source itself; backward,
    # the image below the target (the runs are where the target holds nothing)
    reader_top = read_top if forward else t - 1
    readers = _merge_readers(disk, reader_top) if runs else None
    # what lies under the target once the merge is done: forward its own parent, backward the
    # parent of the source (the images between are merged away)
    new_below = t if forward else s
    below = None if new_below == 0 else (lambda o, n: disk.read_below(new_below, o, n))
    try:
        try:
            _copy_runs(disk, runs, t, read_top, prog, readers, reader_top, below)
        finally:
            if readers is not None:
                readers.close()
        target.flush()
        # every file is still the one opened (not deleted, renamed or replaced meanwhile)
        for img in [*disk.images, *children, *refresh]:
            img.check_in_place("the merge")
        if not forward:               # the target's children: links naming its modification id
            _restore_links(disk, t, refresh)
        prog.poll()                  # last chance to cancel: nothing has been relinked yet
    except BaseException as exc:
        try:
            target.flush()     # what was copied is complete on disk; the chain reads as before
            if not isinstance(exc, ImageChanged):
                _restore_links(disk, t, refresh)
        except VDError:
            pass
        raise
    finally:
        target.honor_zeroes = old_hz

    # a key store beside an image that goes is copied beside the target first
    moved_key = _keep_key_store(target.location, [im.location for im in disk.images[lo:hi + 1]])
    # the commit point: one link rewrite per child (forward) or of the target (backward)
    if forward:
        for c in children:
            c.set_parent(target)
            c.flush()
    else:
        new_parent = disk.images[s - 1] if s > 0 else None
        target.set_parent(new_parent)
        target.flush()

    # only now delete the merged-away images, top down (a leftover is an unreferenced prefix)
    removed = disk.detach(list(range(lo, hi + 1)))   # returned top first
    for img in removed:
        _delete_image(img)
    if moved_key is not None:
        with contextlib.suppress(OSError):
            os.unlink(moved_key)
    _fsync_dir(target.location)
    try:
        prog.finish()
    except Cancelled:
        pass                          # too late to cancel: the merge is complete


def _restore_links(disk: Disk, t: int, refresh: list[Image]) -> None:
    """After writing into the target (done or cancelled): formats whose link names the parent's
    modification id (a write into the target changed it) get the link of the target's children
    rewritten, so the chain opens again. UUID-linked formats need nothing here."""
    target = disk.images[t]
    kids = list(refresh)
    if t + 1 < len(disk.images) and not any(k is disk.images[t + 1] for k in kids):
        kids.append(disk.images[t + 1])
    for c in kids:
        try:
            c.check_parent_link(target)
            continue
        except ParentMismatch:
            pass
        if not c.backend.can(Operation.RELINK):
            continue
        if c.read_only:
            w = c.backend.open(c.location, OpenFlags.NORMAL, None)
            try:
                w.set_parent(target)
                w.flush()
            finally:
                w.close()
        else:
            c.set_parent(target)
            c.flush()


def _refuse_outside_children(disk: Disk, s: int, t: int, known: list[str]) -> None:
    """Refuse when a differencing image outside the chain would lose its parent or see
    different content after the merge."""
    chain_paths = {_real(f) for img in disk.images for f in img.files()}
    chain_paths |= {_real(p) for p in known}
    forward = s > t
    watch = list(range(t, s)) if forward else list(range(s, t))
    # forward: target..source-1 (target's content changes; the others are deleted)
    # backward: source..target-1 (all deleted)
    for i in watch:
        others = find_children(disk.images[i], exclude=chain_paths)
        if others:
            names = ", ".join(os.path.basename(p) for p, _ in others)
            what = ("would read different content" if forward and i == t
                    else "would lose its parent")
            raise InvalidArgument(
                f"cannot merge: {names} is another differencing image of "
                f"{os.path.basename(disk.images[i].location)} and {what}; merge or remove it first")


def merge_disk(disk: Disk, source_index: int, target_index: int,
               progress: ProgressCallback | None = None) -> None:
    """VDMerge on an open Disk: fold image ``source_index`` (and every image between) into image
    ``target_index``. The target (and, forward, the image above the source) must be opened
    read-write. On success the merged-away images are closed, removed from ``disk`` and deleted."""
    s, t = source_index, target_index
    _preflight(disk, s, t, [])
    n = len(disk.images)
    above = [disk.images[max(s, t) + 1]] if max(s, t) + 1 < n else []
    if s > t:
        _merge(disk, s, t, progress, above, [])
    else:
        _merge(disk, s, t, progress, [], above)


def _chain_entries(path: str, format: str | None) -> list[tuple[str, Backend]]:
    with Disk.open_chain(path, format, OpenFlags.READ_ONLY) as d:
        return [(img.location, img.backend) for img in d.images]


def merge(source_path: str, target_path: str, *, progress: ProgressCallback | None = None,
          format: str | None = None) -> None:
    """Merge ``source_path`` into ``target_path`` (both in one chain; images between are folded
    in too). ``format`` names the source's format (probed when absent)."""
    for p in (source_path, target_path):
        if not os.path.exists(p):
            from ..errors import ImageNotFound
            raise ImageNotFound(f"{p}: file not found")
    if _real(source_path) == _real(target_path):
        raise InvalidArgument(f"{source_path}: source and target are the same image")
    src_chain = _chain_entries(source_path, format)
    src_paths = [_real(p) for p, _ in src_chain]
    if _real(target_path) in src_paths:
        entries = src_chain                          # forward: the target is an ancestor
        s, t = len(entries) - 1, src_paths.index(_real(target_path))
    else:
        tgt_chain = _chain_entries(target_path, None)
        tgt_paths = [_real(p) for p, _ in tgt_chain]
        if _real(source_path) not in tgt_paths:
            raise ParentMismatch(f"cannot merge {source_path} into {target_path}: the two images "
                                 "are not in one chain (neither is an ancestor of the other)")
        entries = tgt_chain                          # backward: the target is a descendant
        s, t = tgt_paths.index(_real(source_path)), len(entries) - 1
    forward = s > t
    chain_paths = {_real(p) for p, _ in entries}

    # the top of the opened chain may have children outside it: forward they are relinked to
    # the target, backward (the top is the target) their link is refreshed after the writes
    with Disk() as ro:
        for p, be in entries:
            ro.open(p, be, OpenFlags.READ_ONLY)
        outside = find_children(ro.images[-1], exclude=chain_paths)
        _preflight(ro, s, t, outside if forward else [])
    disk = Disk()
    opened: list[Image] = []
    try:
        lo, hi = (t + 1, s) if forward else (s, t - 1)
        for i, (p, be) in enumerate(entries):
            # locks: the target WRITE, the images merged away (deleted) EXCLUSIVE, the rest
            # (parents of the target) SHARED - every one refused if another program holds it
            disk.open(p, be, OpenFlags.NORMAL if i == t else
                      OpenFlags.READ_ONLY | OpenFlags.LOCK_EXCLUSIVE if lo <= i <= hi else
                      OpenFlags.READ_ONLY)
        for p, be in outside:
            c = be.open(p, OpenFlags.NORMAL, None)
            opened.append(c)
        if forward:
            for c in opened:
                c.check_parent_link(disk.images[s])
            _merge(disk, s, t, progress, opened, [])
        else:
            _merge(disk, s, t, progress, [], opened)
    finally:
        for c in opened:
            c.close()
        disk.close()
