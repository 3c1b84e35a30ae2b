"""Compact / Sparsify: before the user chooses, what each partition would give back (a dry run
computed in a job: :meth:`SparsifyDialog.set_report`) and which are skipped, and why."""
from __future__ import annotations

import html

from PySide6.QtWidgets import (
    QCheckBox,
    QDialog,
    QDialogButtonBox,
    QLabel,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
)

from vdgui.vd import SparsifyReport, format_size

from .params import SparsifyParams

COLUMNS = ("Partition", "File system", "Size", "Used", "Free", "Gives back")


class SparsifyDialog(QDialog):
    def __init__(self, name: str, parent=None):
        super().__init__(parent)
        self.setWindowTitle(f"Compact / Sparsify {name}")
        self.report: SparsifyReport | None = None
        self._mode = "sparsify"
        lay = QVBoxLayout(self)
        self.intro = QLabel(
            "<b>Sparsify</b> gives back the space the guest's file systems do not use, read from "
            "their own allocation maps (no guest boot). <b>Compact</b> drops only blocks that "
            "are all zeroes.")
        self.intro.setWordWrap(True)
        lay.addWidget(self.intro)
        self.status = QLabel("Reading the partitions and file systems…")
        self.status.setWordWrap(True)
        lay.addWidget(self.status)
        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(COLUMNS)
        self.table.verticalHeader().setVisible(False)
        self.table.setEditTriggers(QTableWidget.NoEditTriggers)
        lay.addWidget(self.table)
        # a fixed image keeps its length: offered its dynamic variant (shown when it is fixed)
        self.dynamic = QCheckBox("Make it a dynamic image (a sparsified copy replaces the file, "
                                 "so the space leaves it)")
        self.dynamic.setVisible(False)
        lay.addWidget(self.dynamic)
        box = QDialogButtonBox(QDialogButtonBox.Cancel)
        self.sparsify_button = QPushButton("Sparsify")
        self.sparsify_button.setEnabled(False)
        self.compact_button = QPushButton("Compact only")
        box.addButton(self.sparsify_button, QDialogButtonBox.AcceptRole)
        box.addButton(self.compact_button, QDialogButtonBox.AcceptRole)
        self.sparsify_button.clicked.connect(lambda: self._choose("sparsify"))
        self.compact_button.clicked.connect(lambda: self._choose("compact"))
        box.rejected.connect(self.reject)
        lay.addWidget(box)
        self.resize(640, 360)

    def _choose(self, mode: str) -> None:
        self._mode = mode
        self.accept()

    def set_report(self, report: SparsifyReport) -> None:
        """The dry run's result: one row per partition (skipped ones say why)."""
        self.report = report
        self.table.setRowCount(len(report.partitions))
        for r, v in enumerate(report.partitions):
            name = "outside partitions" if v.number < 0 else \
                ("whole disk" if v.number == 0 else str(v.number))
            cells = [name, v.filesystem or "unknown", format_size(v.size)]
            if v.skipped:
                cells += ["—", "—", f"skipped: {v.skipped}"]
            else:
                cells += [format_size(v.used), format_size(v.free), format_size(v.reclaimable)]
            for c, text in enumerate(cells):
                self.table.setItem(r, c, QTableWidgetItem(text))
        self.table.resizeColumnsToContents()
        self.status.setText(f"Sparsify can give back up to <b>{format_size(report.reclaimable)}"
                            f"</b> (the image files take {format_size(report.before)} now).")
        self.sparsify_button.setEnabled(report.reclaimable > 0)
        if report.offer:
            self.dynamic.setVisible(True)
            self.dynamic.setChecked(True)
            self.dynamic.setToolTip(report.offer)

    def set_error(self, message: str) -> None:
        """The dry run refused or failed: say why; compacting stays possible."""
        self.status.setText(f"<span style='color:#c9372c'>Sparsify is not possible: "
                            f"{html.escape(str(message))}</span>")
        self.sparsify_button.setEnabled(False)

    def params(self) -> SparsifyParams:
        return SparsifyParams(self._mode, not self.dynamic.isHidden() and self.dynamic.isChecked())

    def set_params(self, p: SparsifyParams) -> None:
        self._mode = p.mode
        self.dynamic.setChecked(p.dynamic)
