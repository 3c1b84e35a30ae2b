"""QED discard (whole clusters leave their tables, their space punched) and the in-place
packing after it: :class:`.qed.QedImage`'s ``discard`` and ``close_holes``, kept in their own
module (qed.py's length) as functions of the image, ``self``, as a mixin's methods would be."""
from __future__ import annotations

from typing import TYPE_CHECKING

from ...compaction import punch_blocks
from ...image import FillFn
from ...progress import Progress, ProgressCallback
from ...sparse import split_blocks, zeroes
from .layout import CLUSTER_ZERO

if TYPE_CHECKING:  # pragma: no cover
    from .image import QedImage


def discard_clusters(self: QedImage, offset: int, length: int, fill: FillFn | None) -> None:
    """Whole clusters leave their tables (no backing file: unallocated; with one: zero
    clusters), tables synced, then their space punched, a run per call; parts of clusters are
    zeroed. The freed clusters are unreferenced space (QED has no refcounts: leaks) until
    :func:`close_holes` packs the file, at the latest when the image is closed; the
    need-check flag stays set meanwhile."""
    self.require_writable()
    if not self._xlinks_checked:
        self._find_cross_links()
    self._refuse_cross_linked()
    cs = self.cs
    has_backing = self.backing_file is not None
    self._set_need_check(True)
    gone: list[int] = []
    for ci, inner, pos, n in split_blocks(offset, length, cs):
        e = self._entry(ci)
        if e > CLUSTER_ZERO and not self._valid_cluster(e):
            raise self._corrupt("data cluster offset invalid", offset=e, found=hex(e),
                               field=f"L2 entry of guest offset {ci * cs:#x}")
        if inner == 0 and n >= min(cs, self.size - ci * cs):
            new = CLUSTER_ZERO if has_backing else 0
            if e == new or (e == CLUSTER_ZERO and not has_backing):
                continue
            tbl, l2off = self._l2_for_write(ci // self.entries)
            self._set_l2(tbl, l2off, ci % self.entries, new)
            if e > CLUSTER_ZERO:
                gone.append(e)
        elif e > CLUSTER_ZERO:
            self.f.pwrite(e + inner, zeroes(n))
        elif e == 0 and has_backing:                # over the backing file: zeroes stored
            saved = self.honor_zeroes
            self.honor_zeroes = True
            try:
                self.write(pos, zeroes(n), fill or (lambda o, k: zeroes(k)))
            finally:
                self.honor_zeroes = saved
    if gone:
        self.f.sync()                                # the tables stop naming the clusters first
        punch_blocks(self.f, gone, cs)
        self._discarded = True


def close_holes(self: QedImage, progress: ProgressCallback | None) -> bool:
    """After discards: tables and clusters from the end of the file move into the holes, in
    place (compact's second half), and the file is cut."""
    self.require_writable()
    prog = Progress(progress, 2)
    prog.start()
    self._pack(prog, 1)
    self._discarded = False
    self.flush()
    prog.finish()
    return True
