"""PartitionBar: the partitions of a disk drawn to scale, with unpartitioned space shown.

Each segment shows the partition's number, file system, label and size; clicking a partition
selects it. Extended (container) partitions are not drawn: their logical partitions are.
"""
from __future__ import annotations

from dataclasses import dataclass

from PySide6.QtCore import QRectF, QSize, Qt, Signal
from PySide6.QtGui import QBrush, QColor, QPainter, QPalette, QPen
from PySide6.QtWidgets import QSizePolicy, QWidget

from vdgui.vd import format_size

FS_COLORS = {"ext": "#2e9e4f", "fat": "#2a6fc9", "exfat": "#1b9aa0", "ntfs": "#7a4fc9",
             "iso9660": "#d9822b", "udf": "#d9822b"}
OTHER_COLOR = "#8a7f6a"
FREE_COLOR = "#d5d9de"
MIN_PX = 6


@dataclass
class Segment:
    start: int
    size: int
    number: int | None          # None: unpartitioned space
    text: str                   # what the segment says
    tip: str


def _is_container(p) -> bool:
    return p.type in ("0x05", "0x0f", "0x85")


def segments(layout) -> list[Segment]:
    """The layout as ordered segments covering the whole disk."""
    parts = sorted((p for p in layout.partitions if p.size > 0 and not _is_container(p)),
                   key=lambda p: p.start)
    out: list[Segment] = []
    pos = 0
    for p in parts:
        if p.start > pos:
            out.append(_free(pos, p.start - pos))
        fs = p.filesystem or "no file system"
        label = f" “{p.label}”" if p.label else ""
        head = f"{p.number}: " if p.number else ""
        text = f"{head}{fs}{label} · {format_size(p.size)}"
        tip = "\n".join(x for x in (
            f"Partition {p.number}" if p.number else "Whole disk (no partition table)",
            f"Type: {p.type_name} ({p.type})" if p.number else "",
            f"Name: {p.name}" if p.name else "",
            f"File system: {fs}", f"Label: {p.label}" if p.label else "",
            f"Start: {p.start:,} bytes", f"Size: {format_size(p.size)} ({p.size:,} bytes)") if x)
        out.append(Segment(p.start, p.size, p.number, text, tip))
        pos = max(pos, p.end)
    if layout.size > pos:
        out.append(_free(pos, layout.size - pos))
    return out


def _free(start: int, size: int) -> Segment:
    return Segment(start, size, None, f"Unpartitioned · {format_size(size)}",
                   f"Unpartitioned space\nStart: {start:,} bytes\nSize: {format_size(size)}")


def fs_color(fs: str) -> QColor:
    for key, c in FS_COLORS.items():
        if fs.startswith(key):
            return QColor(c)
    return QColor(OTHER_COLOR)


class PartitionBar(QWidget):
    partitionClicked = Signal(int)

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Fixed)
        self.setMouseTracking(True)
        self.layout_ = None
        self.segs: list[Segment] = []
        self.selected: int | None = None
        self._fs: dict[int, str] = {}
        self.setAccessibleName("Partitions")

    def sizeHint(self) -> QSize:
        return QSize(400, 44)

    def set_layout(self, layout) -> None:
        self.layout_ = layout
        self.segs = segments(layout) if layout is not None else []
        self._fs = {p.number: p.filesystem for p in (layout.partitions if layout else [])}
        self.setAccessibleDescription("; ".join(s.text for s in self.segs))
        self.update()

    def set_selected(self, number: int | None) -> None:
        self.selected = number
        self.update()

    def rects(self) -> list[QRectF]:
        """Each segment's rectangle: widths to scale, at least MIN_PX."""
        total = self.layout_.size if self.layout_ else 0
        w = self.width() - 2
        if not self.segs or total <= 0:
            return []
        widths = [max(MIN_PX, s.size * w / total) for s in self.segs]
        scale = w / sum(widths)
        x, out = 1.0, []
        for wd in widths:
            out.append(QRectF(x, 1, wd * scale, self.height() - 2))
            x += wd * scale
        return out

    def segment_at(self, x: float) -> Segment | None:
        for s, r in zip(self.segs, self.rects()):
            if r.left() <= x < r.right():
                return s
        return None

    def mouseMoveEvent(self, event):
        s = self.segment_at(event.position().x())
        self.setToolTip(s.tip if s else "")

    def mousePressEvent(self, event):
        s = self.segment_at(event.position().x())
        if s is not None and s.number is not None:
            self.partitionClicked.emit(s.number)

    def paintEvent(self, event):
        p = QPainter(self)
        p.setRenderHint(QPainter.Antialiasing)
        pal = self.palette()
        if not self.segs:
            p.setPen(pal.color(QPalette.PlaceholderText))
            p.drawText(self.rect(), Qt.AlignCenter, "No partitions read")
            return
        for s, r in zip(self.segs, self.rects()):
            if s.number is None:
                p.fillRect(r, QColor(FREE_COLOR))
                p.fillRect(r, QBrush(QColor("#b4bbc4"), Qt.BDiagPattern))
                p.setBrush(Qt.NoBrush)
                p.setPen(QPen(QColor("#9aa4b0")))
                p.drawRect(r)
                text_color = QColor("#3a4048")
            else:
                fill = fs_color(self._fs.get(s.number, ""))
                if self.selected is not None and s.number != self.selected:
                    fill = fill.lighter(150)
                p.fillRect(r, fill)
                p.setBrush(Qt.NoBrush)
                p.setPen(QPen(pal.color(QPalette.Highlight), 3) if s.number == self.selected
                         else QPen(fill.darker(130)))
                p.drawRect(r.adjusted(1, 1, -1, -1))
                text_color = QColor("white")
            p.setPen(text_color)
            text = p.fontMetrics().elidedText(s.text, Qt.ElideRight, int(r.width()) - 8)
            p.drawText(r.adjusted(4, 0, -4, 0), Qt.AlignVCenter | Qt.AlignLeft, text)
