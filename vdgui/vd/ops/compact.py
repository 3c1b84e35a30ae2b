"""Compact an image (vd.h VDCompact): drop blocks that read as zeroes (or, for a differencing
image, that read the same as the parent), close the holes, shrink the file.

Safety: the COMPACT hook moves blocks around inside the file. So that a crash, a kill or a cancel
can never leave a damaged image, a single-file image is compacted in a copy beside it
(``.<name>.vdgui-tmp-<pid>``, sparse, with copy_file_range), the copy is checked to read exactly
as the original, flushed, and then renamed over the original in one atomic step. Until the rename
the original is untouched (and locked against writers); after it, the compacted image is complete.
Images made of several files are compacted in place by the hook (the backend orders its writes
data -> tables -> header). docs/operations.md has the step-by-step reasoning.

:func:`~.rewrite.rewrite_in_copy` is the machinery (shared with resize and repair).
"""
from __future__ import annotations

from ..backend import OpenFlags, Operation
from ..disk import Disk
from ..errors import CorruptImage
from ..image import Image
from ..progress import Progress, ProgressCallback, sub_progress
from .rewrite import (
    backend_for,
    compare_views,
    data_bytes,
    finish,
    require_op,
    rewrite_in_copy,
    view_read,
)


def compact(path: str, *, format: str | None = None,
            progress: ProgressCallback | None = None) -> None:
    """Compact ``path`` with its backend's COMPACT hook.

    A base image drops its all-zero blocks. A differencing image is always compared with its
    parent's content (a zero block over non-zero parent data is data and is kept); blocks reading
    the same as the parent are dropped, which keeps the content.
    """
    backend = backend_for(path, format)
    require_op(backend, Operation.COMPACT, path, "compact")
    with Disk.open_chain(path, backend.name, OpenFlags.READ_ONLY) as chain:
        top = len(chain.images) - 1
        orig = chain.images[top]
        below = (lambda o, n: chain.read_below(top, o, n)) if top > 0 else None

        def work(img: Image, cb) -> bool:
            img.compact(cb, below)
            return True

        def verify(img: Image, advance) -> None:
            if img.size != orig.size:
                raise CorruptImage(f"{path}: compact changed the virtual size; original kept",
                                   expected=orig.size, found=img.size)
            bad = compare_views(orig, lambda o, n: chain.read(o, n), img,
                                lambda o, n: view_read(img, below, o, n), 0, orig.size, advance)
            if bad is not None:
                raise CorruptImage(f"{path}: the compacted copy reads differently at offset "
                                   f"{bad:#x}; the original is kept unchanged")

        if not orig.single_file:
            _compact_in_place(path, backend, progress, below, chain)
            return
        rewrite_in_copy(path, backend, progress, work, verify,
                        verify_bytes=data_bytes(orig, 0, orig.size))


def _compact_in_place(path, backend, progress, below, chain: Disk) -> None:
    """Images of several files: run the hook on the image itself (backend write ordering)."""
    img = backend.open(path, OpenFlags.NORMAL, None)
    try:
        prog = Progress(progress, data_bytes(img, 0, img.size))
        prog.start()
        img.compact(sub_progress(prog, 0, prog.total), below)
        img.flush()
        finish(prog)
    finally:
        img.close()


__all__ = ["compact"]
