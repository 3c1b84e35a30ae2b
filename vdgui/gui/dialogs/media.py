"""Create Floppy Image and Create Optical Disc Image: a new FAT12 floppy (size, label, files to
put in) or an ISO9660 disc with Joliet and Rock Ridge (label, files and folders), made by a job
(jobs/tasks.py) with its progress bar in the jobs panel (issue #19, docs/media.md)."""
from __future__ import annotations

import os

from PySide6.QtWidgets import (
    QComboBox,
    QDialog,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLineEdit,
    QListWidget,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from vdgui.vd import DEFAULT_FLOPPY, FLOPPY_FORMATS, format_size, is_temp_name

from ..icons import icon
from .common import (
    LocationRow,
    MessageArea,
    new_file_problem,
    ok_cancel,
    unique_path,
)
from .params import FloppyParams, IsoParams

FAT_LABEL_CHARS = set("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'()-@^_`{}~ ")


class SourceList(QWidget):
    """The files and folders to put at the image's root: each under its own name ("Add
    Files…", "Add Folder…"), or a folder's items ("Add Folder Contents…")."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.list = QListWidget()
        self.list.setObjectName("sources")
        self.list.setSelectionMode(QListWidget.ExtendedSelection)
        self.add_files_button = QPushButton("Add &Files…")
        self.add_folder_button = QPushButton("Add F&older…")
        self.add_contents_button = QPushButton("Add Folder &Contents…")
        self.add_contents_button.setToolTip("Put the items of a folder at the image's root")
        self.remove_button = QPushButton("&Remove")
        buttons = QVBoxLayout()
        for b in (self.add_files_button, self.add_folder_button, self.add_contents_button,
                  self.remove_button):
            buttons.addWidget(b)
        buttons.addStretch(1)
        lay = QHBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.list, 1)
        lay.addLayout(buttons)
        self.add_files_button.clicked.connect(self._add_files)
        self.add_folder_button.clicked.connect(self._add_folder)
        self.add_contents_button.clicked.connect(self._add_contents)
        self.remove_button.clicked.connect(self._remove)
        self.changed = self.list.model().rowsInserted   # any change to the list
        self.removed = self.list.model().rowsRemoved

    def paths(self) -> list[str]:
        return [self.list.item(i).text() for i in range(self.list.count())]

    def add(self, paths) -> None:
        have = set(self.paths())
        for p in paths:
            p = os.path.abspath(p)
            if p not in have and not is_temp_name(os.path.basename(p)):
                self.list.addItem(p)
                have.add(p)

    def add_contents(self, folder: str) -> None:
        try:
            names = sorted(os.listdir(folder))
        except OSError:
            return
        self.add(os.path.join(folder, n) for n in names)

    def _add_files(self) -> None:
        paths, _ = QFileDialog.getOpenFileNames(self, "Add Files")
        self.add(paths)

    def _add_folder(self) -> None:
        p = QFileDialog.getExistingDirectory(self, "Add Folder")
        if p:
            self.add([p])

    def _add_contents(self) -> None:
        p = QFileDialog.getExistingDirectory(self, "Add Folder Contents")
        if p:
            self.add_contents(p)

    def _remove(self) -> None:
        for item in self.list.selectedItems():
            self.list.takeItem(self.list.row(item))


def _tree_bytes(paths: list[str], limit: int) -> int:
    """Bytes of the files under ``paths``, counted up to a little past ``limit`` (a floppy's
    few MB: the walk stops early in a large folder)."""
    total = 0
    for p in paths:
        if os.path.isfile(p) and not os.path.islink(p):
            total += os.path.getsize(p)
        for root, _dirs, files in os.walk(p) if os.path.isdir(p) else ():
            for f in files:
                fp = os.path.join(root, f)
                if not os.path.islink(fp):
                    total += os.path.getsize(fp)
                if total > limit:
                    return total
    return total


class _MediaDialog(QDialog):
    title = ""
    stem = ""
    ext = ""

    def __init__(self, folder: str | None, parent=None):
        super().__init__(parent)
        self.setWindowTitle(self.title)
        self.setWindowIcon(icon("create"))
        folder = folder or os.path.expanduser("~")
        self.location = LocationRow(unique_path(folder, self.stem, self.ext), self.title)
        self.label = QLineEdit()
        self.label.setObjectName("label")
        self.sources = SourceList()
        self.form = QFormLayout()
        self.form.addRow("&Location:", self.location)
        self.form.addRow("&Label:", self.label)
        self.messages = MessageArea()
        self.buttons, self.ok = ok_cancel(self, "C&reate")
        lay = QVBoxLayout(self)
        lay.addLayout(self.form)
        lay.addWidget(self.sources, 1)
        lay.addWidget(self.messages)
        lay.addWidget(self.buttons)
        self.location.changed.connect(self.validate)
        self.label.textChanged.connect(self.validate)
        self.sources.changed.connect(self.validate)
        self.sources.removed.connect(self.validate)
        self.resize(620, 420)

    def problems(self) -> tuple[list[str], list[str]]:
        errors: list[str] = []
        path = self.location.path()
        if not path:
            errors.append("Choose where to create the image")
        elif (why := new_file_problem(path)) is not None:
            errors.append(why)
        return errors, []

    def validate(self) -> None:
        errors, warnings = self.problems()
        self.messages.show_messages(errors, warnings)
        self.ok.setEnabled(not errors)


class FloppyDialog(_MediaDialog):
    title = "Create Floppy Image"
    stem = "NewFloppy"
    ext = "img"

    def __init__(self, folder: str | None = None, parent=None):
        self._measured: dict[tuple, int] = {}
        super().__init__(folder, parent)
        self.size = QComboBox()
        self.size.setObjectName("size")
        for name, fmt in FLOPPY_FORMATS.items():
            self.size.addItem(f"{name} ({format_size(fmt.size)})", name)
        self.size.setCurrentIndex(self.size.findData(DEFAULT_FLOPPY))
        self.form.insertRow(1, "&Size:", self.size)
        self.label.setMaxLength(11)
        self.label.setPlaceholderText("up to 11 characters (none: NO NAME)")
        self.size.currentIndexChanged.connect(self.validate)
        self.validate()

    def set_size(self, name: str) -> None:
        self.size.setCurrentIndex(self.size.findData(name))

    def problems(self):
        errors, warnings = super().problems()
        bad = sorted({c for c in self.label.text().upper() if c not in FAT_LABEL_CHARS})
        if bad:
            errors.append(f"A FAT label cannot contain {' '.join(bad)}")
        fmt = FLOPPY_FORMATS[self.size.currentData()]
        room = fmt.clusters * fmt.cluster_bytes
        key = (tuple(self.sources.paths()), room)
        if key not in self._measured:          # walked once per choice, not per keystroke
            self._measured = {key: _tree_bytes(list(key[0]), room)}
        used = self._measured[key]
        if used > room:
            errors.append(f"The chosen files need more than {format_size(room)}, what a "
                          f"{fmt.name} floppy holds")
        return errors, warnings

    def params(self) -> FloppyParams:
        return FloppyParams(self.location.path(), self.size.currentData(),
                            self.label.text().strip(), tuple(self.sources.paths()))

    def set_params(self, p: FloppyParams) -> None:
        self.location.set_path(p.location)
        self.set_size(p.size)
        self.label.setText(p.label)
        self.sources.list.clear()
        self.sources.add(p.sources)


class IsoDialog(_MediaDialog):
    title = "Create Optical Disc Image"
    stem = "NewDisc"
    ext = "iso"

    def __init__(self, folder: str | None = None, parent=None):
        super().__init__(folder, parent)
        self.label.setMaxLength(32)
        self.label.setPlaceholderText("up to 32 characters (none: CDROM)")
        self.validate()

    def params(self) -> IsoParams:
        return IsoParams(self.location.path(), self.label.text().strip(),
                         tuple(self.sources.paths()))

    def set_params(self, p: IsoParams) -> None:
        self.location.set_path(p.location)
        self.label.setText(p.label)
        self.sources.list.clear()
        self.sources.add(p.sources)
