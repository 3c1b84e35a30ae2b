"""Resize: current and new size; refuses shrinking below the used content with a clear reason."""
from __future__ import annotations

import html

from PySide6.QtWidgets import QDialog, QFormLayout, QLabel, QVBoxLayout

from vdgui.vd import Alloc, Disk, OpenFlags, VDError, format_size

from ..icons import icon
from ..widgets.size_edit import SizeEdit
from .common import MessageArea, grow_to_fit, ok_cancel
from .params import ResizeParams


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


def resize_problems(node, v: int | None, used: int | None) -> tuple[list[str], list[str]]:
    """(errors, warnings) for resizing ``node`` to ``v`` bytes when its data ends at ``used``
    (None: unknown). One set of rules for the Resize dialog and the details pane."""
    errors, warnings = [], []
    current = node.record.virtual_size or 0
    b = node.backend
    if v is None or v <= 0:
        return ["Enter the new size"], []
    if v == current:
        errors.append("The new size is the current size")
    elif b is not None and b.max_size is not None and v > b.max_size:
        errors.append(f"{b.name} images can be at most {format_size(b.max_size)}")
    elif v < current:
        if b is not None and not b.can_shrink:
            errors.append(f"{b.name} images cannot be shrunk in place, only grown. To make "
                          "the disk smaller, copy it with \"Change the virtual size\" set.")
        elif used is None:
            errors.append("Cannot shrink: the used part of the disk could not be read")
        elif v < used:
            errors.append(f"Cannot shrink to {format_size(v)}: the disk holds data up to "
                          f"{format_size(used)}. Shrink the partitions inside the guest "
                          "and compact the image first.")
        else:
            warnings.append(f"Shrinking cuts off the last {format_size(current - v)}; "
                            "they hold no data now, but the guest's partition table may "
                            "still reference them.")
    return errors, warnings


def shrink_text(node, v: int, used: int | None) -> str:
    """What a shrink of ``node`` to ``v`` bytes cuts off, for the confirmation."""
    current = node.record.virtual_size or 0
    cut = current - v
    if used is None:
        data = "Whether data lies there is unknown: the allocation could not be read."
    elif used > v:
        data = (f"<b>Data lies there</b>: the disk holds data up to {format_size(used)} "
                f"({used:,} bytes).")
    else:
        data = (f"No data lies there: the disk's data ends at {format_size(used)} "
                f"({used:,} bytes).")
    return (f"Shrink <b>{html.escape(node.name)}</b> from {format_size(current)} to "
            f"{format_size(v)}?<br><br>This cuts off the last <b>{format_size(cut)} ({cut:,} "
            f"bytes)</b>, from offset {v:,} to {current:,}. {data}<br><br>A guest whose partition "
            "table still reaches into that part will see a damaged disk. This cannot be undone.")


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
        self.size = SizeEdit(self.current, minimum=512, maximum=b.max_size if b else None,
                             limit_name=f"{b.name} images" if b else None)
        self.size.setObjectName("newSize")
        if b is not None:
            self.size.setGranularity(b.size_granularity)
        self.messages = MessageArea()
        form = QFormLayout()
        form.addRow(
            "Current size:", QLabel(f"{format_size(self.current)} ({self.current:,} bytes)")
        )
        form.addRow(
            "Data ends at:",
            QLabel(f"{format_size(used)}" if used is not None else f"unknown ({err})"),
        )
        form.addRow("&New size:", self.size)
        self.buttons, self.ok = ok_cancel(self, "Resize")
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addWidget(self.messages)
        lay.addWidget(self.buttons)
        self.size.valueChanged.connect(self.validate)
        self.validate()
        self.resize(520, self.sizeHint().height())
        grow_to_fit(self)

    def problems(self) -> tuple[list[str], list[str]]:
        err = self.size.error()
        if err:
            return [err], []
        return resize_problems(self.node, self.size.value(), self.used)

    def validate(self, *_):
        errors, warnings = self.problems()
        self.messages.show_messages(errors, warnings)
        self.ok.setEnabled(not errors)

    def new_size(self) -> int:
        return self.size.value()

    def set_params(self, p: ResizeParams) -> None:
        """What was typed before (its job failed: change, retry)."""
        self.size.setValue(p.size)

    def params(self) -> ResizeParams:
        return ResizeParams(size=self.new_size())
