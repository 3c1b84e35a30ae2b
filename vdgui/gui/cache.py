"""Cache images for network disks (issue #19 part 2): "Attach Cache Image…" and "Detach Cache
Image" on a network medium. The library keeps the choice; every later open of the disk through
the library puts the cache in front of it (vd.Disk.open_chain(library=...))."""
from __future__ import annotations

import os

from PySide6.QtWidgets import QFileDialog

from vdgui.vd import DEFAULT_CACHE_SIZE, VDError, cache_info, format_size

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
    _show(w, path)
    w.statusBar().showMessage(
        f"Cache image {cache_path} ({format_size(DEFAULT_CACHE_SIZE)}) attached to {path}", 5000)
    return cache_path


def detach_cache(w, path: str) -> None:
    w.library.set_cache(path, None)
    _show(w, path)
    w.statusBar().showMessage(f"Cache image detached from {path} (its file is kept)", 5000)


def _show(w, path: str) -> None:
    if w.details.node is not None and w.details.node.path == path:
        w.details.set_cache(details(w.library, path))


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


def details(library, path: str) -> dict | None:
    """What the details pane shows of ``path``'s cache image (DetailsPane.set_cache), or None
    when it has none. Reads the cache file's header and map (small) when it exists."""
    kept = library.cache(path)
    if kept is None:
        return None
    cache_path, size = kept
    hits, misses = library.cache_counts(cache_path)
    info: dict = {"path": cache_path, "size": size, "hits": hits, "misses": misses}
    if not os.path.exists(cache_path):
        info["state"] = "made at the first open of the disk"
        return info
    try:
        found = cache_info(cache_path)
    except VDError as exc:
        info["state"] = str(exc)
        return info
    info.update(size=found["size"], cached_bytes=found["cached_bytes"],
                file_size=found["file_size"])
    return info
