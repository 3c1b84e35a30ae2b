"""ConfigForm: a form generated from a backend's ConfigKeys (ARCHITECTURE.md rule 4).

INTEGER → validated line edit (64-bit safe, no QSpinBox), STRING → line edit, BYTES → masked
secret field with a show/hide toggle. MANDATORY keys are marked and required; EXPERT keys sit
behind "Show advanced"; CREATEONLY keys appear only in ``mode="create"``. Defaults are
pre-filled. Each value is validated with ``ConfigKey.convert`` and the reason shown next to the
field. Reusable: ``ConfigForm(keys, values=None, mode="create"|"edit")`` with ``.values()``,
``.is_valid()``, ``.errors()`` and the ``validChanged(bool)`` signal.
"""
from __future__ import annotations

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QAction
from PySide6.QtWidgets import (QCheckBox, QFormLayout, QLabel, QLineEdit, QVBoxLayout, QWidget)

from vdgui.vd import ConfigError, ConfigKey, ValueType

from ..icons import icon


class _Field:
    def __init__(self, key: ConfigKey, editor: QLineEdit, error: QLabel, label: QLabel):
        self.key = key
        self.editor = editor
        self.error = error
        self.label = label


class ConfigForm(QWidget):
    validChanged = Signal(bool)
    valuesChanged = Signal()

    def __init__(self, keys, values: dict | None = None, mode: str = "create", parent=None):
        super().__init__(parent)
        if mode not in ("create", "edit"):
            raise ValueError(f"mode must be 'create' or 'edit', not {mode!r}")
        self.mode = mode
        values = dict(values or {})
        self.keys = [k for k in keys if mode == "create" or not k.create_only]
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
        self.show_advanced.toggled.connect(self.advanced_box.setVisible)
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
            editor = QLineEdit()
            editor.setObjectName(f"config_{key.name}")
            text = key.name + (" *" if key.mandatory else "")
            label = QLabel(text)
            if key.mandatory:
                f = label.font()
                f.setBold(True)
                label.setFont(f)
            tip = key.description or ""
            hints = []
            if key.type is ValueType.INTEGER:
                hints.append("integer")
                if key.minimum is not None:
                    hints.append(f"≥ {key.minimum}")
                if key.maximum is not None:
                    hints.append(f"≤ {key.maximum}")
                if key.power_of_two:
                    hints.append("power of two")
                editor.setAlignment(Qt.AlignRight)
                editor.setInputMethodHints(Qt.ImhDigitsOnly)
            elif key.type is ValueType.BYTES:
                hints.append("secret")
                editor.setEchoMode(QLineEdit.Password)
                toggle = QAction(icon("properties"), "Show", editor)
                toggle.setCheckable(True)
                toggle.setToolTip("Show or hide the value")
                toggle.toggled.connect(lambda on, e=editor: e.setEchoMode(
                    QLineEdit.Normal if on else QLineEdit.Password))
                editor.addAction(toggle, QLineEdit.TrailingPosition)
            if key.default is not None:
                hints.append(f"default {key.default}")
            if key.create_only:
                hints.append("only when creating")
            tip = (tip + ("\n" if tip else "") + ", ".join(hints)).strip()
            editor.setToolTip(tip)
            label.setToolTip(tip)
            if key.name in values and values[key.name] is not None:
                v = values[key.name]
                editor.setText(v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v))
            elif key.default is not None:
                editor.setText(key.default)
            if key.default is not None:
                editor.setPlaceholderText(key.default)
            error = QLabel()
            error.setObjectName(f"error_{key.name}")
            error.setStyleSheet("color: #c9372c;")
            error.setWordWrap(True)
            error.setVisible(False)
            box = QWidget()
            lay = QVBoxLayout(box)
            lay.setContentsMargins(0, 0, 0, 0)
            lay.setSpacing(1)
            lay.addWidget(editor)
            lay.addWidget(error)
            (self.advanced if key.expert else self.basic).addRow(label, box)
            self.fields[key.name] = _Field(key, editor, error, label)
            editor.textChanged.connect(self._revalidate)
        self._revalidate()

    # -- values ---------------------------------------------------------------------------
    def _error_for(self, f: _Field) -> str | None:
        text = f.editor.text()
        if text.strip() == "":
            if f.key.mandatory:
                return "Required"
            return None
        try:
            f.key.convert(text if f.key.type is not ValueType.BYTES else text.encode())
        except ConfigError as exc:
            msg = exc.message
            prefix = f"key '{f.key.name}': "
            return msg[len(prefix):] if msg.startswith(prefix) else msg
        return None

    def errors(self) -> dict[str, str]:
        out = {}
        for name, f in self.fields.items():
            e = self._error_for(f)
            if e:
                out[name] = e
        return out

    def is_valid(self) -> bool:
        return not self.errors()

    def values(self) -> dict:
        """Non-empty values as strings (BYTES as bytes), ready for parse_config."""
        out: dict = {}
        for name, f in self.fields.items():
            text = f.editor.text()
            if text.strip() == "":
                continue
            out[name] = text.encode() if f.key.type is ValueType.BYTES else text.strip()
        return out

    def editor(self, name: str) -> QLineEdit:
        return self.fields[name].editor

    def set_values(self, values: dict) -> None:
        for name, v in values.items():
            if name in self.fields:
                self.fields[name].editor.setText(v.decode() if isinstance(v, bytes) else str(v))

    def _revalidate(self, *_):
        errs = self.errors()
        for name, f in self.fields.items():
            e = errs.get(name)
            # "Required" shows quietly until the user typed something elsewhere
            f.error.setText(e or "")
            f.error.setVisible(bool(e))
            f.editor.setProperty("invalid", bool(e))
            f.editor.setStyleSheet("QLineEdit { border: 1px solid #c9372c; }" if e and e != "Required" else "")
            if e and f.key.expert:
                self.show_advanced.setChecked(True)
        valid = not errs
        self.valuesChanged.emit()
        if valid != self._valid:
            self._valid = valid
            self.validChanged.emit(valid)

    def isEmpty(self) -> bool:
        return not self.fields
