"""Cache images for network disks (issue #19 part 2): "Attach Cache Image…" and "Detach Cache
Image" on a network medium. The library keeps the choice; every later open of the disk through
the library puts the cache in front of it (vd.Disk.open_chain(library=...))."""
from __future__ import annotations

import os

from PySide6.QtWidgets import QFileDialog

from vdgui.vd import DEFAULT_CACHE_SIZE, format_size

CACHE_FILTER = "VirtualBox cache images (*.vci);;All files (*)"


def attach_cache(w, path: str, cache_path: str | None = None) -> str | None:
    """Ask for a cache file (created at the first open, DEFAULT_CACHE_SIZE) and remember it."""
    if cache_path is None:
        name = "".join(c if c.isalnum() or c in "-_." else "_" for c in os.path.basename(path))
        start = os.path.join(w.last_folder(), f"{name.strip('._') or 'disk'}.vci")
        cache_path, _f = QFileDialog.getSaveFileName(
            w, f"Cache Image for {path}", start, CACHE_FILTER,
            options=QFileDialog.DontConfirmOverwrite)
        if not cache_path:
            return None
    w.library.set_cache(path, cache_path, DEFAULT_CACHE_SIZE)
    w.statusBar().showMessage(
        f"Cache image {cache_path} ({format_size(DEFAULT_CACHE_SIZE)}) attached to {path}", 5000)
    return cache_path


def detach_cache(w, path: str) -> None:
    w.library.set_cache(path, None)
    w.statusBar().showMessage(f"Cache image detached from {path} (its file is kept)", 5000)


def add_menu_actions(w, m, node) -> None:
    """The cache entries of a network medium's context menu."""
    kept = w.library.cache(node.path)
    if kept is None:
        a = m.addAction("Attach &Cache Image…")
        a.setToolTip("Keep a local copy of what is read from this network disk (a VCI file)")
        a.triggered.connect(lambda: attach_cache(w, node.path))
    else:
        a = m.addAction("Detach &Cache Image")
        a.setToolTip(f"Stop using {kept[0]} for this disk (the file is kept)")
        a.triggered.connect(lambda: detach_cache(w, node.path))
