"""Where images come from: file filters and the picker (never offering our temporaries), dropped
or typed locations, VirtualBox registries."""
from __future__ import annotations

import os

from PySide6.QtCore import QSortFilterProxyModel
from PySide6.QtWidgets import QFileDialog

from vdgui.vd import backends, is_network_location, is_temp_name

IMAGE_FILTER_ALL = "All files (*)"


def image_file_filter() -> str:
    groups: dict[str, set[str]] = {}
    for b in backends():
        for fe in b.extensions:
            groups.setdefault(fe.device.value, set()).add(fe.ext)
    allx = sorted({e for s in groups.values() for e in s})
    parts = ["Disk images (" + " ".join(f"*.{e} *.{e.upper()}" for e in allx) + ")"] if allx else []
    names = {"hdd": "Hard disk images", "optical": "Optical disc images", "floppy": "Floppy images"}
    for dev, exts in groups.items():
        parts.append(f"{names.get(dev, dev)} (" + " ".join(f"*.{e}" for e in sorted(exts)) + ")")
    parts.append(IMAGE_FILTER_ALL)
    return ";;".join(parts)


def is_ours_temporary(path: str) -> bool:
    """Is ``path`` one of our temporaries, or inside one of our temporary folders?"""
    if is_network_location(path):
        return False
    return any(is_temp_name(part) for part in os.path.abspath(path).split(os.sep) if part)


class _NoTemporaries(QSortFilterProxyModel):
    """A file picker's view without our temporaries (even with hidden files shown)."""

    def filterAcceptsRow(self, row, parent):
        src = self.sourceModel()
        return not is_temp_name(src.fileName(src.index(row, 0, parent)))


def image_picker(parent, title: str, folder: str, name_filter: str) -> QFileDialog:
    """An "open existing files" dialog that never offers our temporaries (Qt's own dialog: a
    native one cannot be filtered)."""
    dlg = QFileDialog(parent, title, folder, name_filter)
    dlg.setOption(QFileDialog.DontUseNativeDialog, True)
    dlg.setProxyModel(_NoTemporaries(dlg))
    dlg.setFileMode(QFileDialog.ExistingFiles)
    dlg.setAcceptMode(QFileDialog.AcceptOpen)
    return dlg


def location(p: str) -> str:
    """Absolute path of a file image; network locations (scheme://…) unchanged."""
    return p.strip() if is_network_location(p) else os.path.abspath(os.path.expanduser(p))


def is_vbox_registry(path: str) -> bool:
    """A VirtualBox.xml / .vbox settings file (not, e.g., a Parallels DiskDescriptor.xml)."""
    if not path.lower().endswith((".xml", ".vbox")):
        return False
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    return b"<VirtualBox" in head


def mtime(path: str):
    try:
        st = os.stat(path)
        return (st.st_mtime_ns, st.st_size)
    except OSError:
        return None


def virtualbox_settings_start() -> str | None:
    """Where Import from VirtualBox starts: VirtualBox's own settings, wherever this VirtualBox
    keeps them ($VBOX_USER_HOME, ~/.config/VirtualBox, the older ~/.VirtualBox): the file when
    it is there, else the folder; None when there is no VirtualBox here."""
    homes = [os.environ.get("VBOX_USER_HOME", ""), "~/.config/VirtualBox", "~/.VirtualBox"]
    folders = [os.path.expanduser(h) for h in homes if h]
    for d in folders:
        if os.path.isfile(os.path.join(d, "VirtualBox.xml")):
            return os.path.join(d, "VirtualBox.xml")
    return next((d for d in folders if os.path.isdir(d)), None)
