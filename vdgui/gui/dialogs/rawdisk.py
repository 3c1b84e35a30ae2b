"""New Raw Disk VMDK: a VMDK that gives a VM a host drive or some of its partitions
(VirtualBox's RawDisk variant, issue #19 part 1, docs/raw-disk-vmdk.md). The dialog reads the
drive's partitions, shows what is mounted, says plainly what the VM will do to the disk, and
enables Create only once the user has ticked that they understand."""
from __future__ import annotations

import html
import os

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDialog,
    QFormLayout,
    QLabel,
    QRadioButton,
    QTreeWidget,
    QTreeWidgetItem,
    QVBoxLayout,
)

from vdgui.vd import RawDrive, VDError, format_size, host_drives, inspect_drive

from ..icons import icon
from .common import (
    LocationRow,
    MessageArea,
    new_file_problem,
    ok_cancel,
    unique_path,
)
from .params import RawDiskParams

WARNING = ("The virtual machine will read and WRITE the real disk {drive}, not a copy. "
           "Never expose a partition the running host has mounted: both systems would write "
           "to it at once and destroy its files. Shut the other system down fully (no "
           "hibernation or Windows fast start-up) and back up first.")


class RawDiskDialog(QDialog):
    title = "New Raw Disk VMDK"

    def __init__(self, folder: str | None = None, parent=None, drives: list[str] | None = None):
        super().__init__(parent)
        self.setWindowTitle(self.title)
        self.setWindowIcon(icon("create"))
        folder = folder or os.path.expanduser("~")
        self.drive_info: RawDrive | None = None
        self.drive_error = ""
        self.location = LocationRow(unique_path(folder, "RawDisk", "vmdk"), self.title)
        self.drive = QComboBox()
        self.drive.setObjectName("drive")
        self.drive.setEditable(True)
        self.drive.setInsertPolicy(QComboBox.NoInsert)
        self.drive.addItems(host_drives() if drives is None else drives)
        self.drive.setCurrentIndex(-1)
        self.drive.lineEdit().setPlaceholderText("a host drive such as /dev/sdb")
        self.whole = QRadioButton("The &whole drive")
        self.whole.setObjectName("whole")
        self.some = QRadioButton("Only the &partitions ticked below (the others read as zeroes)")
        self.some.setObjectName("some")
        self.some.setChecked(True)
        self.parts = QTreeWidget()
        self.parts.setObjectName("partitions")
        self.parts.setHeaderLabels(["#", "Start", "Size", "Type", "File system", "Label",
                                    "On this host"])
        self.parts.setRootIsDecorated(False)
        self.relative = QCheckBox("Map partitions through their own &devices (/dev/sdb2)")
        self.relative.setObjectName("relative")
        self.warning = QLabel()
        self.warning.setObjectName("warning")
        self.warning.setWordWrap(True)
        self.warning.setTextFormat(Qt.RichText)
        self.consent = QCheckBox("I understand: the VM will &write to this real disk")
        self.consent.setObjectName("consent")
        self.messages = MessageArea()
        self.buttons, self.ok = ok_cancel(self, "C&reate")
        form = QFormLayout()
        form.addRow("&Location:", self.location)
        form.addRow("&Host drive:", self.drive)
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addWidget(self.whole)
        lay.addWidget(self.some)
        lay.addWidget(self.parts, 1)
        lay.addWidget(self.relative)
        lay.addWidget(self.warning)
        lay.addWidget(self.consent)
        lay.addWidget(self.messages)
        lay.addWidget(self.buttons)
        self.location.changed.connect(self.validate)
        self.drive.currentTextChanged.connect(self.read_drive)
        self.whole.toggled.connect(self.validate)
        self.parts.itemChanged.connect(self.validate)
        self.consent.toggled.connect(self.validate)
        self.resize(720, 520)
        self.read_drive("")

    # -- the drive -----------------------------------------------------------------------------
    def read_drive(self, text: str) -> None:
        """Read the partitions of the drive named (a few sectors: done here, not in a job)."""
        self.drive_info, self.drive_error = None, ""
        self.parts.clear()
        path = text.strip()
        if path:
            try:
                self.drive_info = inspect_drive(path)
            except VDError as exc:
                self.drive_error = exc.message
        info = self.drive_info
        if info is not None:
            self.parts.blockSignals(True)
            for p in info.layout.partitions:
                if not p.number:
                    continue
                busy = info.in_use.get(p.number, "")
                item = QTreeWidgetItem([str(p.number), format_size(p.start),
                                        format_size(p.size), p.type_name, p.filesystem,
                                        p.label or p.name, busy])
                item.setData(0, Qt.UserRole, p.number)
                flags = item.flags() | Qt.ItemIsUserCheckable
                if busy:       # a partition in use cannot be chosen
                    flags &= ~Qt.ItemIsEnabled
                item.setFlags(flags)
                item.setCheckState(0, Qt.Unchecked)
                self.parts.addTopLevelItem(item)
            self.parts.blockSignals(False)
            for i in range(self.parts.columnCount()):
                self.parts.resizeColumnToContents(i)
        shown = html.escape(info.path if info else (path or "the chosen drive"))
        self.warning.setText("<b>⚠ " + WARNING.format(drive=shown) + "</b>")
        self.consent.setChecked(False)     # a new drive needs a new consent
        self.validate()

    def set_drive(self, path: str) -> None:
        self.drive.setEditText(path)

    def check_partition(self, number: int, on: bool = True) -> None:
        for i in range(self.parts.topLevelItemCount()):
            item = self.parts.topLevelItem(i)
            if item.data(0, Qt.UserRole) == number:
                item.setCheckState(0, Qt.Checked if on else Qt.Unchecked)

    def chosen(self) -> list[int]:
        out = []
        for i in range(self.parts.topLevelItemCount()):
            item = self.parts.topLevelItem(i)
            if item.checkState(0) == Qt.Checked and item.flags() & Qt.ItemIsEnabled:
                out.append(int(item.data(0, Qt.UserRole)))
        return sorted(out)

    # -- checks --------------------------------------------------------------------------------
    def problems(self) -> tuple[list[str], list[str]]:
        errors: list[str] = []
        warnings: list[str] = []
        path = self.location.path()
        if not path:
            errors.append("Choose where to create the VMDK")
        elif (why := new_file_problem(path)) is not None:
            errors.append(why)
        info = self.drive_info
        if self.drive_error:
            errors.append(self.drive_error)
        elif info is None:
            errors.append("Choose the host drive")
        else:
            busy = dict(info.in_use)
            if self.whole.isChecked():
                if busy:
                    errors.append(f"{info.path} is in use on this host (" + "; ".join(
                        f"{'the drive' if n == 0 else f'partition {n}'} {w}"
                        for n, w in sorted(busy.items())) + "): expose only partitions "
                        "that are not")
            elif info.layout.scheme == "none":
                errors.append(f"{info.path} has no partition table: choose the whole drive")
            elif not self.chosen():
                errors.append("Tick the partitions the VM may use")
            if busy and not self.whole.isChecked():
                warnings.append("Partitions in use on this host cannot be chosen: "
                                + ", ".join(str(n) for n in sorted(busy) if n))
            if info.layout.problems:
                warnings.append("The partition table has problems: "
                                + "; ".join(info.layout.problems))
        if not self.consent.isChecked():
            errors.append("Tick “I understand” to confirm the VM may write to this disk")
        return errors, warnings

    def validate(self) -> None:
        self.parts.setEnabled(not self.whole.isChecked())
        self.relative.setEnabled(not self.whole.isChecked())
        errors, warnings = self.problems()
        self.messages.show_messages(errors, warnings)
        self.ok.setEnabled(not errors)

    # -- result --------------------------------------------------------------------------------
    def params(self) -> RawDiskParams:
        drive = self.drive_info.path if self.drive_info else self.drive.currentText().strip()
        whole = self.whole.isChecked()
        return RawDiskParams(self.location.path(), drive,
                             None if whole else tuple(self.chosen()),
                             False if whole else self.relative.isChecked())

    def set_params(self, p: RawDiskParams) -> None:
        """Fill in earlier choices (Change and Retry); the consent is always asked again."""
        self.location.set_path(p.location)
        self.set_drive(p.drive)
        (self.whole if p.partitions is None else self.some).setChecked(True)
        for n in p.partitions or ():
            self.check_partition(n)
        self.relative.setChecked(p.relative)
        self.validate()
