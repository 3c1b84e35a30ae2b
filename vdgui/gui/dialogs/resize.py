"""Resize: current and new size; refuses shrinking below the used content with a clear reason."""
from __future__ import annotations

from PySide6.QtWidgets import QDialog, QDialogButtonBox, QFormLayout, QLabel, QVBoxLayout

from vdgui.vd import Alloc, Disk, OpenFlags, VDError, format_size

from ..icons import icon
from ..widgets.size_edit import SizeEdit
from .common import MessageArea


def used_end(path: str, library=None) -> tuple[int | None, str | None]:
    """End of the last byte any chain member holds (or None), and an error message."""
    try:
        with Disk.open_chain(path, flags=OpenFlags.READ_ONLY, library=library) as d:
            last = 0
            for e in d.allocation():
                if e.status == Alloc.DATA:
                    last = e.end
            return last, None
    except VDError as exc:
        return None, exc.message


class ResizeDialog(QDialog):
    def __init__(self, node, parent=None, *, used: int | None = None, library=None):
        super().__init__(parent)
        self.node = node
        rec = node.record
        self.setWindowTitle(f"Resize {node.name}")
        self.setWindowIcon(icon("resize"))
        self.current = rec.virtual_size or 0
        err = None
        if used is None:
            used, err = used_end(node.path, library)
        self.used = used
        b = node.backend
        self.size = SizeEdit(self.current, minimum=512, maximum=b.max_size if b else None)
        self.size.setObjectName("newSize")
        if b is not None:
            self.size.setGranularity(b.size_granularity)
        self.messages = MessageArea()
        form = QFormLayout()
        form.addRow("Current size:", QLabel(f"{format_size(self.current)} ({self.current:,} bytes)"))
        form.addRow("Data ends at:", QLabel(
            f"{format_size(used)}" if used is not None else f"unknown ({err})"))
        form.addRow("&New size:", self.size)
        self.buttons = QDialogButtonBox(QDialogButtonBox.Ok | QDialogButtonBox.Cancel)
        self.ok = self.buttons.button(QDialogButtonBox.Ok)
        self.ok.setText("Resize")
        self.buttons.accepted.connect(self.accept)
        self.buttons.rejected.connect(self.reject)
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addWidget(self.messages)
        lay.addWidget(self.buttons)
        self.size.valueChanged.connect(self.validate)
        self.validate()
        self.resize(520, self.sizeHint().height())

    def problems(self) -> tuple[list[str], list[str]]:
        errors, warnings = [], []
        err = self.size.error()
        v = self.size.value()
        if err:
            return [err], []
        if v == self.current:
            errors.append("The new size is the current size")
        elif v < self.current:
            b = self.node.backend
            if b is not None and not b.can_shrink:
                errors.append(f"{b.name} images cannot be shrunk in place, only grown. To make "
                              "the disk smaller, copy it with \"Change the virtual size\" set.")
            elif self.used is None:
                errors.append("Cannot shrink: the used part of the disk could not be read")
            elif v < self.used:
                errors.append(f"Cannot shrink to {format_size(v)}: the disk holds data up to "
                              f"{format_size(self.used)}. Shrink the partitions inside the guest "
                              "and compact the image first.")
            else:
                warnings.append(f"Shrinking cuts off the last {format_size(self.current - v)}; "
                                "they hold no data now, but the guest's partition table may "
                                "still reference them.")
        return errors, warnings

    def validate(self, *_):
        errors, warnings = self.problems()
        self.messages.show_messages(errors, warnings)
        self.ok.setEnabled(not errors)

    def new_size(self) -> int:
        return self.size.value()
