"""Passphrases of encrypted images (issue #17): the prompt a job's open asks through
(gui/passphrases.py), the new-passphrase fields of the copy, Encrypt… and Change passphrase…
dialogs, and those dialogs. A typed passphrase leaves its field as a ``vd.Passphrase`` (the
field is cleared) and never reaches a label, a tooltip or the library."""
from __future__ import annotations

import html
import os

from PySide6.QtCore import Signal
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDialog,
    QFormLayout,
    QLabel,
    QLineEdit,
    QRadioButton,
    QVBoxLayout,
    QWidget,
)

from vdgui.jobs.tasks import encryptions
from vdgui.vd import Passphrase, get_backend

from ..icons import icon
from .common import (
    LocationRow,
    MessageArea,
    creatable_backends,
    new_file_problem,
    ok_cancel,
    unique_path,
)
from .params import ChangePassphraseParams, EncryptParams, PassphraseParams

ERROR_STYLE = "color: #c9372c;"
LABELS = {"luks": "LUKS (AES-XTS-256, as qemu)",
          "vbox-aes-xts256": "VirtualBox AES-XTS-256 (key store beside the image)",
          "vbox-aes-xts128": "VirtualBox AES-XTS-128 (key store beside the image)"}
KINDS = {"luks1": "LUKS1", "luks2": "LUKS2", "qcow2-aes": "legacy QCOW2 AES",
         "vbox-crypt": "VirtualBox CRYPT"}
REMEMBER_TIP = ("Keep the passphrase in the desktop keyring (Secret Service, KWallet, …) so "
                "the image opens without asking. Never stored in vdgui's library file.")


def describe_encryption(enc: dict | None) -> str:
    """'LUKS1, aes-xts-plain64, 512-bit key, 1 keyslot' from a record's encryption."""
    if not enc:
        return "none"
    if enc.get("error"):
        return f"{KINDS.get(enc.get('format'), enc.get('format'))}: {enc['error']}"
    parts = [KINDS.get(enc.get("format"), str(enc.get("format")))]
    if enc.get("cipher"):
        parts.append(str(enc["cipher"]))
    if enc.get("key_bits"):
        parts.append(f"{enc['key_bits']}-bit key")
    slots = enc.get("keyslots") or []
    parts.append(f"{len(slots)} keyslot{'s' if len(slots) != 1 else ''}")
    text = ", ".join(parts)
    if enc.get("key_store"):
        src = enc["key_store"]
        text += "; key store: " + ("imported VirtualBox registry" if src == "library"
                                   else os.path.basename(src))
    if enc.get("warning"):
        text += f" ({enc['warning']})"
    return text


def target_encryptions(combo: QComboBox, b) -> list[str]:
    """Fill ``combo`` (copy and create dialogs) with "None" and the encryptions a new ``b``
    image can have, keeping the choice where it still applies; an always-encrypted format (raw
    LUKS) starts on its first. Returns the names of ``b``'s config keys that choosing an
    encryption sets (kept out of its options form)."""
    have = combo.currentData()
    combo.blockSignals(True)
    combo.clear()
    combo.addItem("None", None)
    for name in encryptions(b.name):
        combo.addItem(LABELS.get(name, name), name)
    i = combo.findData(have)
    if b.needs_passphrase and i <= 0 and combo.count() > 1:
        i = 1
    combo.setCurrentIndex(max(i, 0))
    combo.blockSignals(False)
    return sorted({k for cfg in b.encryptions.values() for k in cfg})


def encryption_problems(b, enc: str | None, fields: NewPassphraseFields) -> list[str]:
    if enc is None:
        return [f"{b.name} images are always encrypted: choose an encryption"] \
            if b.needs_passphrase else []
    return [p for p in (fields.problem(),) if p]


class NewPassphraseFields(QWidget):
    """A new passphrase typed twice; a mismatch is an inline error."""

    changed = Signal()

    def __init__(self, parent=None):
        super().__init__(parent)
        self.first = QLineEdit()
        self.first.setObjectName("new_passphrase")
        self.first.setEchoMode(QLineEdit.Password)
        self.second = QLineEdit()
        self.second.setObjectName("confirm_passphrase")
        self.second.setEchoMode(QLineEdit.Password)
        self.error = QLabel()
        self.error.setObjectName("passphraseError")
        self.error.setStyleSheet(ERROR_STYLE)
        self.error.setVisible(False)
        form = QFormLayout(self)
        form.setContentsMargins(0, 0, 0, 0)
        form.addRow("New &passphrase:", self.first)
        form.addRow("&Confirm:", self.second)
        form.addRow(self.error)
        self.first.textChanged.connect(self._changed)
        self.second.textChanged.connect(self._changed)

    def problem(self) -> str | None:
        if not self.first.text():
            return "Type the new passphrase"
        if self.first.text() != self.second.text():
            return "The passphrases do not match"
        return None

    def _changed(self, *_):
        p = self.problem()
        shown = p == "The passphrases do not match" and bool(self.second.text())
        self.error.setText(p if shown else "")
        self.error.setVisible(shown)
        self.changed.emit()

    def take(self) -> Passphrase | None:
        """The passphrase (the fields are cleared); None when not valid."""
        if self.problem():
            return None
        p = Passphrase(self.first.text())
        self.first.clear()
        self.second.clear()
        return p


class PassphraseDialog(QDialog):
    """Asks the passphrase of one encrypted image; ``error`` (a retry) is shown above."""

    def __init__(self, name: str, path: str, kind: str, *, purpose: str = "open",
                 error: str | None = None, can_remember: bool = False, parent=None):
        super().__init__(parent)
        self.path = path
        self.setObjectName("passphraseDialog")
        self.setWindowTitle(f"Passphrase for {name}")
        self.setWindowIcon(icon("lock"))
        what = KINDS.get(kind, kind)
        text = QLabel(f"<b>{html.escape(name)}</b> is encrypted ({html.escape(what)}). Enter "
                      f"its passphrase to {html.escape(purpose)} it.")
        text.setWordWrap(True)
        self.error = QLabel(html.escape(error or ""))
        self.error.setObjectName("passphraseError")
        self.error.setStyleSheet(ERROR_STYLE)
        self.error.setVisible(bool(error))
        self.edit = QLineEdit()
        self.edit.setObjectName("passphrase")
        self.edit.setEchoMode(QLineEdit.Password)
        self.remember = QCheckBox("&Remember in the desktop keyring")
        self.remember.setObjectName("remember_passphrase")
        self.remember.setToolTip(REMEMBER_TIP)
        self.remember.setVisible(can_remember)
        self.buttons, self.ok = ok_cancel(self, "&Open")
        self.ok.setEnabled(False)
        self.edit.textChanged.connect(lambda t: self.ok.setEnabled(bool(t)))
        lay = QVBoxLayout(self)
        lay.addWidget(text)
        lay.addWidget(self.error)
        lay.addWidget(self.edit)
        lay.addWidget(self.remember)
        lay.addWidget(self.buttons)
        self.resize(440, self.sizeHint().height())

    def params(self) -> PassphraseParams:
        """The answer; the field is cleared."""
        p = Passphrase(self.edit.text())
        self.edit.clear()
        return PassphraseParams(self.path, p, not self.remember.isHidden()
                                and self.remember.isChecked())


class EncryptDialog(QDialog):
    """Encrypt… (``decrypt`` False) or Decrypt…: replace the image, or write a new file."""

    def __init__(self, node, parent=None, *, decrypt: bool = False):
        super().__init__(parent)
        self.node = node
        self.decrypt = decrypt
        verb = "Decrypt" if decrypt else "Encrypt"
        self.setObjectName("decryptDialog" if decrypt else "encryptDialog")
        self.setWindowTitle(f"{verb} {node.name}")
        self.setWindowIcon(icon("lock"))
        self.replace = QRadioButton(f"&Replace {node.name} (a copy made beside it, then "
                                    "renamed over it; its UUID is kept)")
        self.replace.setObjectName("replace")
        self.into = QRadioButton("Write a &new file:")
        self.into.setObjectName("into")
        self.backends = creatable_backends()[0] + creatable_backends()[1]
        self.format = QComboBox()
        self.format.setObjectName("format")
        for b in self.backends:
            self.format.addItem(b.name, b.name)
        if node.backend is not None and node.backend in self.backends:
            self.format.setCurrentIndex(self.backends.index(node.backend))
        stem = os.path.splitext(node.name)[0]
        self.location = LocationRow("", "New file")
        self.location.set_path(unique_path(os.path.dirname(node.path),
                                           f"{stem}_{'plain' if decrypt else 'encrypted'}",
                                           self._ext()))
        self.encryption = QComboBox()
        self.encryption.setObjectName("encryption")
        self.fields = NewPassphraseFields()
        self.messages = MessageArea()
        chained = node.parent is not None or bool(node.children)
        # a format that is always encrypted (raw LUKS) cannot be decrypted in place
        always = decrypt and node.backend is not None and node.backend.needs_passphrase
        self.replace.setEnabled(not chained and not always)
        if chained:
            self.replace.setToolTip(f"{node.name} is part of a chain: write a new file (the "
                                    "whole chain's content)")
        elif always:
            self.replace.setToolTip(f"{node.backend.name} images are always encrypted: write "
                                    "a new file of another format")
            plain = next((i for i, b in enumerate(self.backends) if not b.needs_passphrase), -1)
            if plain >= 0:
                self.format.setCurrentIndex(plain)
        (self.into if chained or always else self.replace).setChecked(True)
        form = QFormLayout()
        form.addRow(self.replace)
        form.addRow(self.into)
        form.addRow("&Format:", self.format)
        form.addRow("&Location:", self.location)
        if not decrypt:
            form.addRow("&Encryption:", self.encryption)
        self.buttons, self.ok = ok_cancel(self, verb)
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        if not decrypt:
            lay.addWidget(self.fields)
        else:
            note = QLabel("The passphrase is asked when the image is opened.")
            note.setWordWrap(True)
            lay.addWidget(note)
        lay.addWidget(self.messages)
        lay.addWidget(self.buttons)
        self.replace.toggled.connect(self._changed)
        self.format.currentIndexChanged.connect(self._format_changed)
        self.location.changed.connect(self._changed)
        self.fields.changed.connect(self._changed)
        self._format_changed()
        self.resize(560, self.sizeHint().height())

    def _ext(self) -> str:
        b = self.target_backend()
        return b.default_extension() if b is not None else ""

    def target_backend(self):
        if self.replace.isChecked() and self.node.backend is not None:
            return self.node.backend
        return get_backend(self.format.currentData()) if self.format.count() else None

    def _format_changed(self, *_):
        cur = self.location.path()
        if cur and self.format.count():
            root = os.path.splitext(cur)[0]
            self.location.set_path(root + "." + get_backend(self.format.currentData())
                                   .default_extension())
        self._changed()

    def _changed(self, *_):
        into = self.into.isChecked()
        self.format.setEnabled(into)
        self.location.setEnabled(into)
        b = self.target_backend()
        have = self.encryption.currentData()
        self.encryption.blockSignals(True)
        self.encryption.clear()
        for name in encryptions(b.name if b is not None else None):
            self.encryption.addItem(LABELS.get(name, name), name)
        i = self.encryption.findData(have)
        self.encryption.setCurrentIndex(max(i, 0))
        self.encryption.blockSignals(False)
        self.validate()

    def validate(self) -> None:
        errors = []
        b = self.target_backend()
        if self.decrypt and b is not None and b.needs_passphrase:
            errors.append(f"{b.name} images are always encrypted: choose another format")
        if not self.decrypt:
            if not self.encryption.count():
                errors.append(f"{b.name if b else 'This format'} images cannot be encrypted "
                              "here (LUKS: QCOW2, luks; VirtualBox: VDI, VMDK, VHD)")
            p = self.fields.problem()
            if p:
                errors.append(p)
        if self.into.isChecked():
            loc = self.location.path()
            if not loc:
                errors.append("Choose where to write the new file")
            elif (why := new_file_problem(loc)) is not None:
                errors.append(why)
        self.messages.show_messages(errors, [])
        self.ok.setEnabled(not errors)

    def set_params(self, p: EncryptParams) -> None:
        if p.into:
            self.into.setChecked(True)
            self.format.setCurrentIndex(max(self.format.findData(p.into_format), 0))
            self.location.set_path(p.into)
        i = self.encryption.findData(p.encrypt)
        if i >= 0:
            self.encryption.setCurrentIndex(i)
        self.validate()

    def params(self) -> EncryptParams:
        into = self.into.isChecked()
        return EncryptParams(
            path=self.node.path,
            encrypt=None if self.decrypt else self.encryption.currentData(),
            into=self.location.path() if into else None,
            into_format=self.format.currentData() if into else None,
            passphrase=None if self.decrypt else self.fields.take())


class ChangePassphraseDialog(QDialog):
    """Change passphrase…: the new one twice (the current one is asked by the job)."""

    def __init__(self, node, parent=None):
        super().__init__(parent)
        self.node = node
        self.setObjectName("changePassphraseDialog")
        self.setWindowTitle(f"Change the Passphrase of {node.name}")
        self.setWindowIcon(icon("lock"))
        enc = node.record.encryption or {}
        how = ("A new keyslot holds the new passphrase; the keyslots the current one opens are "
               "removed." if str(enc.get("format", "")).startswith("luks") else
               "The key store is rewritten for the new passphrase; the data stays as it is.")
        text = QLabel(f"<b>{html.escape(node.name)}</b>: {html.escape(describe_encryption(enc))}"
                      f".<br>{html.escape(how)} The current passphrase is asked next.")
        text.setWordWrap(True)
        self.fields = NewPassphraseFields()
        self.buttons, self.ok = ok_cancel(self, "&Change")
        self.ok.setEnabled(False)
        self.fields.changed.connect(lambda: self.ok.setEnabled(self.fields.problem() is None))
        lay = QVBoxLayout(self)
        lay.addWidget(text)
        lay.addWidget(self.fields)
        lay.addWidget(self.buttons)
        self.resize(480, self.sizeHint().height())

    def set_params(self, p: ChangePassphraseParams) -> None:
        pass                                   # nothing kept: the passphrase is typed again

    def params(self) -> ChangePassphraseParams:
        return ChangePassphraseParams(self.node.path, self.fields.take())
