"""ConfigForm: a form generated from a backend's ConfigKeys (ARCHITECTURE.md rule 4).

Each row reads like a form: the key's label, its unit beside the value (byte counts also in
KiB/MiB/GiB), its description and the CLI key name in the tooltip. INTEGER → validated line edit
(64-bit safe, no QSpinBox), an on/off key (0/1) → check box, a pick-list → combo box, STRING →
line edit, BYTES → masked secret field with a show/hide toggle. MANDATORY keys are marked and
required; EXPERT keys sit behind "Show advanced"; which keys show at all (CREATEONLY, keys tied
to a variant) is ``vdgui.vd.applicable_keys``. Defaults are pre-filled. Each value is validated
with ``ConfigKey.convert`` and the reason shown under the field, in a line that keeps its place.
Reusable: ``ConfigForm(keys, values=None, mode="create"|"edit")`` with ``.values()``,
``.is_valid()``, ``.errors()`` and the ``validChanged(bool)`` signal.
"""

from __future__ import annotations

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QAction, QColor, QPalette
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QSizePolicy,
    QVBoxLayout,
    QWidget,
)

from vdgui.vd import ConfigError, ConfigKey, ValueType, applicable_keys

from ..icons import icon


class _Field:
    def __init__(self, key: ConfigKey, editor, error: QLabel, label: QLabel):
        self.key = key
        self.editor = editor  # QLineEdit, or QCheckBox (switch) / QComboBox (choices)
        self.error = error
        self.label = label

    def text(self) -> str:
        e = self.editor
        if isinstance(e, QCheckBox):
            return "1" if e.isChecked() else "0"
        if isinstance(e, QComboBox):
            return e.currentText()
        return e.text()

    def set_text(self, text: str) -> None:
        e = self.editor
        if isinstance(e, QCheckBox):
            e.setChecked(text.strip() not in ("", "0"))
        elif isinstance(e, QComboBox):
            i = e.findText(text)
            if i < 0:  # a stored value outside the list: shown, then flagged
                e.addItem(text)
                i = e.findText(text)
            e.setCurrentIndex(i)
        else:
            e.setText(text)


def _human_bytes(text: str) -> str:
    """'= 1 MiB' for a byte count of a KiB or more (what a person reads beside 1048576)."""
    try:
        v = int(text.strip(), 0)
    except ValueError:
        return ""
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if v >= 1 << shift:
            q = v / (1 << shift)
            return f"= {q:g} {unit}" if q == int(q) else f"= {q:.2f} {unit}"
    return ""


class ConfigForm(QWidget):
    validChanged = Signal(bool)
    valuesChanged = Signal()

    def __init__(
        self,
        keys,
        values: dict | None = None,
        mode: str = "create",
        parent=None,
        *,
        variant: int = 0,
    ):
        super().__init__(parent)
        self.mode = mode
        values = dict(values or {})
        self.keys = applicable_keys(keys, mode=mode, variant=variant)
        self.fields: dict[str, _Field] = {}
        self._valid: bool | None = None

        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        self.basic = QFormLayout()
        self.basic.setFieldGrowthPolicy(QFormLayout.ExpandingFieldsGrow)
        outer.addLayout(self.basic)
        self.advanced_box = QWidget()
        self.advanced = QFormLayout(self.advanced_box)
        self.advanced.setContentsMargins(0, 0, 0, 0)
        self.advanced.setFieldGrowthPolicy(QFormLayout.ExpandingFieldsGrow)
        self.show_advanced = QCheckBox("Show advanced settings")
        self.show_advanced.toggled.connect(self._toggle_advanced)
        has_expert = any(k.expert for k in self.keys)
        self.show_advanced.setVisible(has_expert)
        outer.addWidget(self.show_advanced)
        outer.addWidget(self.advanced_box)
        self.advanced_box.setVisible(False)
        if self.keys and any(k.mandatory for k in self.keys):
            note = QLabel("<small>* required</small>")
            note.setEnabled(False)
            outer.addWidget(note)

        for key in self.keys:
            label = QLabel(key.title + (" *" if key.mandatory else ""))
            if key.mandatory:
                f = label.font()
                f.setBold(True)
                label.setFont(f)
            hints = []
            unit_text = key.unit
            if key.is_switch:
                editor = QCheckBox()
                label.setBuddy(editor)
            elif key.choices:
                editor = QComboBox()
                editor.addItems(list(key.choices))
            else:
                editor = QLineEdit()
                if key.type is ValueType.INTEGER:
                    if key.minimum is not None:
                        hints.append(f"≥ {key.minimum}")
                    if key.maximum is not None:
                        hints.append(f"≤ {key.maximum}")
                    if key.power_of_two:
                        hints.append("a power of two")
                    editor.setAlignment(Qt.AlignRight)
                    editor.setInputMethodHints(Qt.ImhDigitsOnly)
                elif key.type is ValueType.BYTES:
                    hints.append("secret")
                    editor.setEchoMode(QLineEdit.Password)
                    toggle = QAction(icon("properties"), "Show", editor)
                    toggle.setCheckable(True)
                    toggle.setToolTip("Show or hide the value")
                    toggle.toggled.connect(
                        lambda on, e=editor: e.setEchoMode(
                            QLineEdit.Normal if on else QLineEdit.Password
                        )
                    )
                    editor.addAction(toggle, QLineEdit.TrailingPosition)
                if key.default is not None:
                    editor.setPlaceholderText(key.default)
            editor.setObjectName(f"config_{key.name}")
            if key.default is not None and not key.is_switch:
                hints.append(f"default {key.default}" + (f" {key.unit}" if key.unit else ""))
            if key.create_only:
                hints.append("set when the image is created")
            desc = key.description[:1].upper() + key.description[1:] if key.description else ""
            tip = "\n".join(
                t
                for t in (
                    desc,
                    "; ".join(hints),
                    f"Key: {key.name} (vdgui-img --property {key.name}=…)",
                )
                if t
            )
            editor.setToolTip(tip)
            label.setToolTip(tip)
            field = _Field(key, editor, QLabel(), label)
            if key.name in values and values[key.name] is not None:
                v = values[key.name]
                field.set_text(v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v))
            elif key.default is not None:
                field.set_text(key.default)
            error = field.error
            error.setObjectName(f"error_{key.name}")
            error.setStyleSheet("color: #c9372c;")
            error.setWordWrap(True)
            error.setMinimumHeight(error.fontMetrics().lineSpacing())
            # an error line keeps its place when hidden: rows never jump under the pointer
            sp = error.sizePolicy()
            sp.setRetainSizeWhenHidden(True)
            error.setSizePolicy(sp)
            error.setVisible(False)
            box = QWidget()
            row = QHBoxLayout(box)
            row.setContentsMargins(0, 0, 0, 0)
            row.addWidget(editor, 1)
            unit = QLabel(unit_text)
            unit.setObjectName(f"unit_{key.name}")
            unit.setMinimumWidth(
                unit.fontMetrics().horizontalAdvance("bytes = 256 MiB")
                if key.unit == "bytes"
                else 0
            )
            unit.setVisible(bool(unit_text))
            row.addWidget(unit)
            if key.is_switch:
                row.addStretch(1)
            box.setSizePolicy(QSizePolicy.Preferred, QSizePolicy.Fixed)
            form = self.advanced if key.expert else self.basic
            form.addRow(label, box)
            form.addRow(QLabel(), error)  # the error line under the field, in its own row
            self.fields[key.name] = field
            field.unit = unit
            if isinstance(editor, QCheckBox):
                editor.toggled.connect(self._revalidate)
            elif isinstance(editor, QComboBox):
                editor.currentTextChanged.connect(self._revalidate)
            else:
                editor.textChanged.connect(self._revalidate)
        # labels line up with their field (not with field + error line), in one column across
        # the basic and the advanced part
        width = max((f.label.sizeHint().width() for f in self.fields.values()), default=0)
        for f in self.fields.values():
            f.label.setMinimumWidth(width)
        for lay in (self.basic, self.advanced):
            lay.setVerticalSpacing(1)
        self._revalidate()

    def _toggle_advanced(self, on: bool) -> None:
        self.advanced_box.setVisible(on)
        self.updateGeometry()
        w = self.window()
        if w is not None and w is not self and w.isVisible():
            w.adjustSize()  # the dialog grows; required fields keep their height

    # -- values ---------------------------------------------------------------------------
    def _error_for(self, f: _Field) -> str | None:
        text = f.text()
        if text.strip() == "":
            if f.key.mandatory:
                return "Required"
            return None
        try:
            f.key.convert(text if f.key.type is not ValueType.BYTES else text.encode())
        except ConfigError as exc:
            msg = exc.message
            prefix = f"key '{f.key.name}': "
            return msg[len(prefix) :] if msg.startswith(prefix) else msg
        return None

    def errors(self) -> dict[str, str]:
        out = {}
        for name, f in self.fields.items():
            e = self._error_for(f)
            if e:
                out[name] = e
        return out

    def messages(self) -> list[str]:
        """The errors as a person reads them: "Cluster size: expected a power of two, ..."."""
        return [f"{self.fields[name].key.title}: {e}" for name, e in self.errors().items()]

    def is_valid(self) -> bool:
        return not self.errors()

    def values(self) -> dict:
        """Non-empty values as strings (BYTES as bytes), ready for parse_config."""
        out: dict = {}
        for name, f in self.fields.items():
            text = f.text()
            if text.strip() == "":
                continue
            out[name] = text.encode() if f.key.type is ValueType.BYTES else text.strip()
        return out

    def editor(self, name: str):
        return self.fields[name].editor

    def set_values(self, values: dict) -> None:
        for name, v in values.items():
            if name in self.fields:
                self.fields[name].set_text(v.decode() if isinstance(v, bytes) else str(v))

    def _revalidate(self, *_):
        errs = self.errors()
        for name, f in self.fields.items():
            e = errs.get(name)
            # "Required" shows quietly until the user typed something elsewhere
            f.error.setText(e or "")
            f.error.setVisible(bool(e))
            f.editor.setProperty("invalid", bool(e))
            if isinstance(f.editor, QLineEdit):
                # tinted through the palette: a style sheet would change the field's size
                pal = self.palette()
                if e and e != "Required":
                    pal.setColor(QPalette.Base, QColor("#fbe3e1"))
                f.editor.setPalette(pal)
            if f.key.unit == "bytes":
                f.unit.setText("bytes " + ("" if e else _human_bytes(f.text())))
            if e and f.key.expert:
                self.show_advanced.setChecked(True)
        valid = not errs
        self.valuesChanged.emit()
        if valid != self._valid:
            self._valid = valid
            self.validChanged.emit(valid)

    def isEmpty(self) -> bool:
        return not self.fields
