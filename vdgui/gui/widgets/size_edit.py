"""SizeEdit: a byte size typed as a number with a unit, with an optional logarithmic slider.

Values are Python ints (64-bit safe; no QSpinBox). ``valueChanged(object)`` carries the bytes,
or None while the text is not a valid size.
"""
from __future__ import annotations

import math

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QValidator
from PySide6.QtWidgets import (
    QComboBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QSlider,
    QVBoxLayout,
    QWidget,
)

from vdgui.vd import align_up

UNITS = (("MiB", 1 << 20), ("GiB", 1 << 30), ("TiB", 1 << 40))
SLIDER_MAX = 2 << 40      # the slider covers 1 MiB … 2 TiB; larger sizes are typed


class _NumberValidator(QValidator):
    def validate(self, text, pos):
        t = text.strip()
        if t == "":
            return QValidator.Intermediate, text, pos
        try:
            v = float(t)
        except ValueError:
            if t.endswith(".") and t[:-1].isdigit():
                return QValidator.Intermediate, text, pos
            return QValidator.Invalid, text, pos
        return (QValidator.Acceptable if v >= 0 else QValidator.Invalid), text, pos


class SizeEdit(QWidget):
    valueChanged = Signal(object)

    def __init__(self, value: int = 0, *, minimum: int = 0, maximum: int | None = None,
                 granularity: int = 512, slider: bool = True, limit_name: str | None = None,
                 parent=None):
        super().__init__(parent)
        self._min = minimum
        self._max = maximum
        self._limit_name = limit_name       # e.g. "VDI images": named in the "at most" message
        self._gran = max(granularity, 1)
        self.edit = QLineEdit()
        self.edit.setValidator(_NumberValidator(self))
        self.edit.setAlignment(Qt.AlignRight)
        self.edit.setMaximumWidth(140)
        self.unit = QComboBox()
        for name, _ in UNITS:
            self.unit.addItem(name)
        self.slider = QSlider(Qt.Horizontal) if slider else None
        self.range_label = QLabel() if slider else None
        row = QHBoxLayout()
        row.setContentsMargins(0, 0, 0, 0)
        if self.slider:
            self.slider.setRange(0, 1000)
            row.addWidget(self.slider, 1)
        row.addWidget(self.edit)
        row.addWidget(self.unit)
        if not self.slider:
            row.addStretch(1)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.setSpacing(2)
        outer.addLayout(row)
        if self.range_label:
            self.range_label.setEnabled(False)
            outer.addWidget(self.range_label)
        self._updating = False
        self._exact: tuple | None = None
        self.edit.textChanged.connect(self._text_changed)
        self.unit.currentIndexChanged.connect(self._text_changed)
        if self.slider:
            self.slider.valueChanged.connect(self._slider_moved)
        self.setValue(value)
        self._update_range_label()

    # -- range ----------------------------------------------------------------------------
    def setRange(self, minimum: int, maximum: int | None, limit_name: str | None = None) -> None:
        """``maximum``: a backend's declared limit (``Backend.max_size_for``); ``limit_name``
        what it limits, e.g. "VDI images", for the message."""
        self._min, self._max = minimum, maximum
        if limit_name is not None:
            self._limit_name = limit_name
        self._update_range_label()
        self._sync_slider(self.value())

    def setGranularity(self, g: int) -> None:
        self._gran = max(int(g), 1)

    def _slider_bounds(self) -> tuple[float, float]:
        lo = max(self._min, 1 << 20)
        hi = min(self._max, SLIDER_MAX) if self._max else SLIDER_MAX
        hi = max(hi, lo * 2)
        return math.log2(lo), math.log2(hi)

    def _update_range_label(self) -> None:
        if self.range_label is None:
            return
        from vdgui.vd import format_size
        lo, hi = (int(2 ** x) for x in self._slider_bounds())
        text = f"{format_size(lo)} … {format_size(hi)}"
        if self._max and self._max > hi:
            text += f" (up to {format_size(self._max)} when typed)"
        self.range_label.setText(text)

    # -- value ----------------------------------------------------------------------------
    def value(self) -> int | None:
        text = self.edit.text().strip()
        if self._exact is not None and self._exact[:2] == (text, self.unit.currentIndex()):
            return self._exact[2]          # as set, not as rounded for display
        try:
            number = float(text)
        except ValueError:
            return None
        mult = UNITS[self.unit.currentIndex()][1]
        v = round(number * mult)
        v = align_up(v, self._gran)               # round up to the granularity
        return v

    def error(self) -> str | None:
        from vdgui.vd import format_size
        v = self.value()
        if v is None:
            return "Enter a size, e.g. 20 GiB"
        if v <= 0:
            return "The size must be larger than zero"
        if v < self._min:
            return f"The size must be at least {format_size(self._min)}"
        if self._max is not None and v > self._max:
            from vdgui.vd import describe_size
            return f"{self._limit_name or 'The size'} can be at most {describe_size(self._max)}"
        return None

    def setValue(self, v: int) -> None:
        v = int(v)
        idx = 0
        for i, (_, m) in enumerate(UNITS):
            if v >= m:
                idx = i
        mult = UNITS[idx][1]
        number = v / mult
        text = (f"{number:.0f}" if abs(number - round(number)) < 1e-9
                else f"{number:.2f}".rstrip("0").rstrip("."))
        self._updating = True
        try:
            self.unit.setCurrentIndex(idx)
            self.edit.setText(text)
        finally:
            self._updating = False
        self._exact = (text, idx, align_up(v, self._gran))
        self._sync_slider(v)
        self.valueChanged.emit(self.value())

    def _sync_slider(self, v: int | None) -> None:
        if not self.slider or v is None:
            return
        lo, hi = self._slider_bounds()
        # a size below the slider's range (0 included) puts it at its start, never left stale
        pos = round((math.log2(max(v, 1)) - lo) / (hi - lo) * 1000)
        self.slider.blockSignals(True)
        self.slider.setValue(max(0, min(1000, pos)))
        self.slider.blockSignals(False)

    def _text_changed(self, *_):
        if self._updating:
            return
        v = self.value()
        self._sync_slider(v)
        self.valueChanged.emit(v)

    def _slider_moved(self, pos: int) -> None:
        lo, hi = self._slider_bounds()
        v = 2 ** (lo + (hi - lo) * pos / 1000)
        # snap to a round number of MiB / GiB
        step = 1 << 30 if v >= 8 << 30 else 1 << 20
        v = max(round(v / step) * step, step)
        self.setValue(v)
