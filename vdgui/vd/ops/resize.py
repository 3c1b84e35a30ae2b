"""Resize an image (vd.h VDResize): grow, or shrink where the part cut off holds nothing.

The RESIZE hook does the format work (block map growth, footer/header sizes, geometry by
VirtualBox's PCHS/LCHS rules). The operation validates the size, refuses a shrink that would cut
off data (as seen through the chain: a zero tail is fine), and for a single-file image runs the
hook on a copy that is verified (old content unchanged, new area zero) and then renamed over the
original in one atomic step, so a crash or a cancel can never leave a half-resized image
(docs/operations.md).
"""
from __future__ import annotations

from ..backend import OpenFlags, Operation, too_large
from ..disk import Disk
from ..errors import CorruptImage, InvalidArgument, NotSupported
from ..geometry import vbox_pchs
from ..image import Alloc, Image
from ..progress import Progress, ProgressCallback, sub_progress
from ..sizes import format_size, parse_size
from ..sparse import first_nonzero, is_zero, zeroes
from .rewrite import (
    VERIFY_CHUNK,
    backend_for,
    compare_views,
    data_bytes,
    finish,
    require_op,
    rewrite_in_copy,
    view_read,
)


def _check_size(backend, path: str, new_size) -> int:
    if isinstance(new_size, bool) or not isinstance(new_size, int):
        raise InvalidArgument(f"{path}: new size must be a whole number of bytes, "
                              f"found {new_size!r}")
    if new_size <= 0:
        raise InvalidArgument(f"{path}: new size must be positive, found {new_size}")
    g = backend.size_granularity
    if new_size % g:
        raise InvalidArgument(f"{path}: {backend.name} sizes must be a multiple of {g} bytes, "
                              f"found {new_size}")
    return new_size


def first_data_beyond(chain: Disk, new_size: int) -> int | None:
    """Offset of the first non-zero byte at or after ``new_size`` (through the chain), or None."""
    return first_nonzero(((e.start, e.length) for e in chain.allocation(new_size,
                                                                        chain.size - new_size)
                          if e.level is not None and e.status == Alloc.DATA),
                         chain.read, VERIFY_CHUNK)


def _hide_parent_tail(img: Image, below, start: int, end: int) -> None:
    """A differencing image grown over a parent larger than its old size would show the
    parent's data in the new area: store zeroes there, where the parent's content is not zero
    (as qemu does). The copy is verified afterwards like any other resize."""
    old_hz = getattr(img, "honor_zeroes", False)
    img.honor_zeroes = True
    try:
        pos = start
        while pos < end:
            n = min(VERIFY_CHUNK, end - pos)
            if not is_zero(below(pos, n)):
                img.write(pos, zeroes(n), below)
            pos += n
    finally:
        img.honor_zeroes = old_hz


TAIL_CHUNK = 8 << 20


def store_tail_over_parent(img: Image, parent_size: int, fill) -> None:
    """A differencing image larger than its parent stores the part past the parent's end
    explicitly: zero markers where the format has them (VDI zero blocks, QCOW2/QED zero clusters,
    VHDX PAYLOAD_BLOCK_ZERO, VMDK zeroed grains), zero blocks where it has not (VHD). Readers
    that never look past a parent's end (VirtualBox, libyal, dissect) then read zeroes there.
    ``fill`` gives the content below, for a block that straddles the parent's end."""
    if img.size <= parent_size:
        return
    old_hz = getattr(img, "honor_zeroes", False)
    img.honor_zeroes = False          # zeroes become markers where the format has them
    try:
        for s, n, st in img.block_status(parent_size, img.size - parent_size):
            if st != Alloc.UNALLOCATED:
                continue
            pos, end = s, s + n
            while pos < end:
                k = min(TAIL_CHUNK, end - pos)
                img.write(pos, zeroes(k), fill)
                pos += k
    finally:
        img.honor_zeroes = old_hz


def resize_target(path: str, spec: str, *, format: str | None = None) -> int:
    """The new size a user means: SIZE, or +SIZE / -SIZE from the virtual size now (as
    qemu-img resize)."""
    text = spec.strip()
    if not text or text[0] not in "+-":
        return parse_size(text)
    delta = parse_size(text[1:])
    with Disk() as d:
        d.open(path, backend_for(path, format),
               OpenFlags.INFO | OpenFlags.READ_ONLY | OpenFlags.LOCK_SHARED)
        now = d.size
    if text[0] == "+":
        return now + delta
    if delta > now:
        raise InvalidArgument(f"cannot shrink {path} by {text[1:]}: its virtual size is only "
                              f"{now} bytes ({format_size(now)})")
    return now - delta


def _children(img: Image) -> bool:
    from ..chain import find_children  # only where a resize changes what children's links name
    return bool(find_children(img))


def _resize_hook(img: Image, new_size: int, cb) -> None:
    """The RESIZE hook, then VirtualBox's generic rule (VDResize): a physical geometry that
    followed the default 16 heads / 63 sectors rule for the old size follows it for the new one
    when the backend left it as it was."""
    old_size, old_pchs = img.size, img.pchs
    img.resize(new_size, cb)
    if (old_pchs is not None and img.pchs == old_pchs and old_pchs == vbox_pchs(old_size)
            and vbox_pchs(img.size) != old_pchs):
        try:
            img.set_pchs(vbox_pchs(img.size))
        except NotSupported:
            pass


def resize(path: str, new_size: int, *, format: str | None = None,
           progress: ProgressCallback | None = None) -> None:
    """Change the virtual size of ``path`` to ``new_size`` bytes (the new area reads zeroes)."""
    backend = backend_for(path, format)
    require_op(backend, Operation.RESIZE, path, "resize")
    new_size = _check_size(backend, path, new_size)
    with Disk.open_chain(path, backend.name, OpenFlags.READ_ONLY) as chain:
        top = len(chain.images) - 1
        orig = chain.images[top]
        old = orig.size
        if orig.max_size is not None and new_size > orig.max_size:      # before any work
            raise too_large(backend.name, new_size, orig.max_size, path)
        if new_size == old:
            p = Progress(progress, 1)
            p.start()
            finish(p)
            return
        if new_size < old:
            if not backend.can_shrink:
                raise NotSupported(f"{path}: {backend.name} images cannot be shrunk in place, only "
                                   "grown; copy the image with a smaller size instead "
                                   "(convert --size)")
            bad = first_data_beyond(chain, new_size)
            if bad is not None:
                raise InvalidArgument(
                    f"{path}: cannot shrink to {new_size} bytes: the part that would be cut off "
                    f"holds data (first non-zero byte at offset {bad:#x}); shrink the partitions "
                    f"inside the disk first")
        below = (lambda o, n: chain.read_below(top, o, n)) if top > 0 else None

        parent_size = chain.images[top - 1].size if top > 0 else None

        def grown_over_parent(img: Image) -> None:
            if below is not None and parent_size is not None and new_size > old:
                store_tail_over_parent(img, parent_size, below)

        def work(img: Image, cb) -> bool:
            _resize_hook(img, new_size, cb)
            if below is not None and new_size > old:
                _hide_parent_tail(img, below, old, img.size)
            grown_over_parent(img)
            return True

        keep = min(old, new_size)

        def verify(img: Image, advance) -> None:
            # a backend may round up (VHD: whole CHS geometry); never below, never past the old
            # size when shrinking
            if img.size < new_size or (new_size < old and img.size >= old):
                raise CorruptImage(f"{path}: resize left the size at {img.size}; original kept",
                                   expected=new_size, found=img.size)
            end = img.size
            bad = compare_views(orig, lambda o, n: chain.read(o, n), img,     # old content kept
                                lambda o, n: view_read(img, below, o, n), 0, keep, advance)
            if bad is not None:
                raise CorruptImage(f"{path}: the resized copy reads differently at offset "
                                   f"{bad:#x}; the original is kept unchanged")
            if end > keep:                          # the new area reads zeroes
                for s, n, st in img.block_status(keep, end - keep):
                    if st == Alloc.ZERO or (st == Alloc.UNALLOCATED and below is None):
                        continue
                    q = s
                    while q < s + n:
                        m = min(VERIFY_CHUNK, s + n - q)
                        if not is_zero(view_read(img, below, q, m)):
                            raise CorruptImage(f"{path}: the new area of the resized copy does not "
                                               f"read zeroes at offset {q:#x}; original kept")
                        q += m

        several = not orig.single_file
        # in place: a file whose resize is one visible step and that no other differencing
        # image names (a link naming the parent's modification id would need rewriting: the
        # copy path does that after its commit point). The folder is scanned for such children
        # only where an in-place resize changes what a link names.
        parent_fits = all(im.size <= old for im in chain.images[:top])
        if several or (orig.resizes_in_place(new_size) and parent_fits
                       and (backend.resize_keeps_child_links or not _children(orig))):
            hide = several and below is not None and new_size > old and not parent_fits
            # several files: the hook's own fraction, weighted by the data the image holds (not
            # the new size); one file: one step (the scan would read every block's bitmap: VHD)
            prog = Progress(progress, max(data_bytes(orig, 0, keep), 1) if several else 1)
            prog.start()              # a cancel here leaves the file untouched
            img = backend.open(path, OpenFlags.NORMAL, None)
            try:
                if several:           # the hook orders its writes over the files
                    _resize_hook(img, new_size,
                                 sub_progress(prog, 0, prog.total))
                    if hide:          # the parent's tail must not show in the new area
                        img.flush()
                        _hide_parent_tail(img, below, old, img.size)
                elif img.resizes_in_place(new_size):
                    _resize_hook(img, new_size, None)    # one visible step: not cancellable
                else:
                    raise InvalidArgument(f"{path}: the image changed while it was being "
                                          "resized; nothing was written")
                grown_over_parent(img)      # after the size step: markers in the new area
                img.flush()
                finish(prog)
            finally:
                img.close()
            return
        rewrite_in_copy(path, backend, progress, work, verify,
                        verify_bytes=data_bytes(orig, 0, keep))


__all__ = ["first_data_beyond", "resize", "resize_target", "store_tail_over_parent"]
