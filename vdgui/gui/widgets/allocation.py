"""AllocationMap: a picture of which parts of the virtual disk each chain member holds.

One row per chain member (base at the top), drawn from Disk.allocation() extents binned into a
fixed number of buckets (the fraction of each bucket a member holds sets the colour's strength),
plus a legend with the bytes each member holds.
"""
from __future__ import annotations

import os

from PySide6.QtCore import QPointF, QRectF, QSize, Qt
from PySide6.QtGui import QAction, QColor, QFontMetrics, QPainter, QPalette, QPen
from PySide6.QtWidgets import QSizePolicy, QWidget

from vdgui.vd import Alloc, format_size

PALETTE = ("#2a6fc9", "#2e9e4f", "#d9822b", "#7a4fc9", "#c9372c", "#1b9aa0", "#b8860b", "#c2185b")
ZERO_COLOR = "#9aa4b0"


def level_color(level: int) -> QColor:
    return QColor(PALETTE[level % len(PALETTE)])


def bin_extents(size: int, extents, levels: int, buckets: int = 512):
    """Return (fractions[level][bucket], zero[bucket], held[level]) from Extent runs."""
    fr = [[0.0] * buckets for _ in range(levels)]
    zero = [0.0] * buckets
    held = [0] * levels
    if size <= 0:
        return fr, zero, held
    scale = buckets / size
    for e in extents:
        if e.level is None or e.status == Alloc.UNALLOCATED:
            continue
        if e.status == Alloc.DATA and 0 <= e.level < levels:
            held[e.level] += e.length
        target = fr[e.level] if (e.status == Alloc.DATA and 0 <= e.level < levels) else zero
        a = e.start * scale
        b = (e.start + e.length) * scale
        i = int(a)
        while i < b and i < buckets:
            lo = max(a, i)
            hi = min(b, i + 1)
            target[i] += hi - lo
            i += 1
    return fr, zero, held


class AllocationMap(QWidget):
    ROW_H = 16
    LABEL_W = 150

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Fixed)
        self.members: list[str] = []
        self.size = 0
        self.fractions: list[list[float]] = []
        self.zero: list[float] = []
        self.held: list[int] = []
        self.message = "No image selected"
        self.partitions: list[tuple[int, int, str]] = []     # (start, size, label) overlay
        self.show_partitions = True
        self.setContextMenuPolicy(Qt.ActionsContextMenu)
        self.partitions_action = QAction("Show partitions", self, checkable=True, checked=True)
        self.partitions_action.toggled.connect(self._toggle_partitions)
        self.addAction(self.partitions_action)
        self.setToolTip("Which parts of the virtual disk each image of the chain holds "
                        "(left = start of the disk)")

    def clear(self, message: str = "") -> None:
        self.members, self.fractions, self.zero, self.held = [], [], [], []
        self.size = 0
        self.partitions = []
        self.message = message
        self.updateGeometry()
        self.update()

    def set_data(self, size: int, extents, members: list[str]) -> None:
        self.size = size
        self.members = list(members)
        self.fractions, self.zero, self.held = bin_extents(size, extents, len(members))
        self.message = ""
        self.updateGeometry()
        self.update()

    def set_partitions(self, partitions) -> None:
        """Partitions to overlay: (start, size, label) in bytes; None or [] for none."""
        self.partitions = list(partitions or [])
        self.update()

    def _toggle_partitions(self, on: bool) -> None:
        self.show_partitions = on
        self.update()

    def _bar_geometry(self) -> tuple[float, float]:
        label_w = min(self.LABEL_W, self.width() // 3)
        bar_x = label_w + 6
        return bar_x, max(self.width() - bar_x - 2, 10)

    def partition_marks(self) -> list[tuple[float, float, str]]:
        """What the overlay draws: (x from, x to, label) per partition; [] when hidden."""
        if not (self.show_partitions and self.members and self.size > 0):
            return []
        bar_x, bar_w = self._bar_geometry()
        return [(bar_x + bar_w * start / self.size,
                 bar_x + bar_w * min(start + size, self.size) / self.size, label)
                for start, size, label in self.partitions if start < self.size]

    def sizeHint(self):
        rows = max(len(self.members), 1)
        return QSize(400, rows * (self.ROW_H + 4) + 24)

    def minimumSizeHint(self):
        return QSize(200, self.sizeHint().height())

    def paintEvent(self, event):
        p = QPainter(self)
        p.setRenderHint(QPainter.Antialiasing, False)
        pal = self.palette()
        fm = QFontMetrics(self.font())
        if not self.members:
            p.setPen(pal.color(QPalette.Disabled, QPalette.Text))
            p.drawText(self.rect(), Qt.AlignLeft | Qt.AlignVCenter, self.message)
            return
        label_w = min(self.LABEL_W, self.width() // 3)
        bar_x = label_w + 6
        bar_w = max(self.width() - bar_x - 2, 10)
        base = pal.color(QPalette.Base)
        border = pal.color(QPalette.Mid)
        for lv, name in enumerate(self.members):
            y = lv * (self.ROW_H + 4)
            color = level_color(lv)
            p.setPen(pal.color(QPalette.Text))
            text = fm.elidedText(os.path.basename(name), Qt.ElideMiddle, label_w - 16)
            p.fillRect(QRectF(0, y + 3, 10, 10), color)
            p.drawText(QRectF(14, y, label_w - 14, self.ROW_H), Qt.AlignLeft | Qt.AlignVCenter,
                       text)
            rect = QRectF(bar_x, y, bar_w, self.ROW_H)
            p.fillRect(rect, base)
            frs = self.fractions[lv]
            n = len(frs)
            for i, f in enumerate(frs):
                if f <= 0:
                    continue
                x0 = bar_x + bar_w * i / n
                x1 = bar_x + bar_w * (i + 1) / n
                c = QColor(color)
                c.setAlphaF(0.45 + 0.55 * min(f, 1.0))  # a little data stays visible
                p.fillRect(QRectF(x0, y + 1, max(x1 - x0, 2.0), self.ROW_H - 2), c)
            if lv == len(self.members) - 1:
                for i, f in enumerate(self.zero):
                    if f > 0:
                        x0 = bar_x + bar_w * i / len(self.zero)
                        c = QColor(ZERO_COLOR)
                        c.setAlphaF(0.5)
                        p.fillRect(
                            QRectF(x0, y + self.ROW_H - 4, max(bar_w / len(self.zero), 1.0), 3), c
                        )
            p.setPen(QPen(border))
            p.drawRect(rect)
        y = len(self.members) * (self.ROW_H + 4)
        marks = self.partition_marks()
        if marks:
            p.setPen(QPen(pal.color(QPalette.Text), 1, Qt.DashLine))
            for x0, x1, label in marks:
                for x in (x0, x1):
                    p.drawLine(QPointF(x, 0), QPointF(x, y - 2))
                if x1 - x0 > fm.horizontalAdvance(label) + 4:
                    p.drawText(QRectF(x0, y, x1 - x0, 18), Qt.AlignCenter, label)
        p.setPen(pal.color(QPalette.Disabled, QPalette.Text))
        p.drawText(QRectF(bar_x, y, bar_w, 18), Qt.AlignLeft | Qt.AlignVCenter, "0")
        p.drawText(
            QRectF(bar_x, y, bar_w, 18), Qt.AlignRight | Qt.AlignVCenter, format_size(self.size)
        )
        p.end()

    def summary(self) -> str:
        total = sum(self.held)
        if not self.size:
            return ""
        return (f"{format_size(total)} of {format_size(self.size)} allocated "
                f"({100 * total / self.size:.1f} %)")

    def legend(self) -> list[tuple[str, int]]:
        return list(zip(self.members, self.held))
