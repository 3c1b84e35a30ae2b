"""Repair: the dry run's findings first, what the repair does to the data, where unreferenced
data is kept, and a "keep a backup" choice (checked by default). Nothing is changed until the
user presses Repair."""
from __future__ import annotations

import html
import os

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QCheckBox, QDialog, QDialogButtonBox, QLabel, QScrollArea, QVBoxLayout

from vdgui.vd import describe_effects, format_size

from ..icons import icon
from .params import RepairParams


def _files_size(node) -> int:
    total = 0
    for f in node.record.files or [node.path]:
        try:
            total += os.stat(f).st_blocks * 512
        except OSError:
            pass
    return total


class RepairDialog(QDialog):
    def __init__(self, node, report, parent=None):
        super().__init__(parent)
        self.node, self.report = node, report
        self.setWindowTitle(f"Repair {node.name}")
        self.setWindowIcon(icon("repair"))
        probs = report.problems
        corrupt = sum(1 for p in probs if p.severity == "corrupt")
        head = QLabel(f"<b>A check of {html.escape(node.name)} found {len(probs)} problem(s)</b>"
                      f" ({corrupt} damaged structure(s), {len(probs) - corrupt} leak(s)). "
                      "Nothing has been changed yet.")
        head.setWordWrap(True)
        rows = "".join(f"<li><b>{html.escape(p.severity)}</b>: {html.escape(p.what)}</li>"
                       for p in probs[:200])
        if len(probs) > 200:
            rows += f"<li>… and {len(probs) - 200} more</li>"
        self.findings = QLabel(f"<ul style='margin-left:-20px'>{rows}</ul>")
        self.findings.setObjectName("repairFindings")
        self.findings.setWordWrap(True)
        self.findings.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.findings.setAlignment(Qt.AlignTop | Qt.AlignLeft)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setWidget(self.findings)
        scroll.setMinimumHeight(90)
        scroll.setMaximumHeight(180)
        effects = describe_effects(report)
        self.effects = QLabel("<b>What the repair does to the data</b><ul style='margin-left:"
                              "-20px'>" + "".join(f"<li>{html.escape(e)}</li>" for e in effects)
                              + "</ul>")
        self.effects.setObjectName("repairEffects")
        self.effects.setWordWrap(True)
        kept = ""
        if report.orphans:
            data = sum(n for _f, _o, n in report.orphans)
            kept = (f"<b>Kept:</b> the {format_size(data)} of unreferenced data go to "
                    f"<b>{html.escape(node.name)}.orphans-DATE.bin</b> and its index (.json) in "
                    f"{html.escape(os.path.dirname(node.path))} before anything is repaired.")
        self.kept = QLabel(kept)
        self.kept.setObjectName("repairKept")
        self.kept.setWordWrap(True)
        self.kept.setVisible(bool(kept))
        self.backup = QCheckBox(f"&Keep a backup copy of the image first "
                                f"({html.escape(node.name)}.backup-DATE, "
                                f"{format_size(_files_size(node))})")
        self.backup.setObjectName("repairBackup")
        self.backup.setChecked(True)
        self.backup.setToolTip("Copies the image's file(s) into a folder beside it before the "
                               "repair writes anything")
        self.buttons = QDialogButtonBox(QDialogButtonBox.Cancel)
        self.ok = self.buttons.addButton("Repair", QDialogButtonBox.DestructiveRole)
        self.ok.setIcon(icon("repair"))
        self.ok.clicked.connect(self.accept)
        self.buttons.rejected.connect(self.reject)
        self.buttons.button(QDialogButtonBox.Cancel).setDefault(True)
        lay = QVBoxLayout(self)
        lay.addWidget(head)
        lay.addWidget(scroll)
        lay.addWidget(self.effects)
        lay.addWidget(self.kept)
        lay.addWidget(self.backup)
        lay.addWidget(self.buttons)
        self.resize(620, self.sizeHint().height())

    def keep_backup(self) -> bool:
        return self.backup.isChecked()

    def params(self) -> RepairParams:
        return RepairParams(backup=self.keep_backup())
