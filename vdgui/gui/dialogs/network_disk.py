"""Add network disk…: a disk that is not a file (e.g. a LUN on an iSCSI target), described by its
backend's configuration keys; and the prompt for secrets that were not remembered.

Everything here comes from declarations: the backends offered are those with Cap.CONFIG and no
Cap.FILE, the form is a :class:`ConfigForm` over the chosen backend's config keys, a pasted URL is
decoded by ``backend.parse_location`` and the disk's location is ``backend.compose_location``.
Secrets are the BYTES-typed keys. "Test connection" (and OK) opens the disk read-only in a job on
the job queue's thread pool; the backend's own network timeout bounds it.
"""
from __future__ import annotations

import dataclasses
import html

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QVBoxLayout,
)

from vdgui.jobs import Job, JobQueue
from vdgui.vd import Disk, KeyFlag, OpenFlags, ValueType, VDError, format_size

from ..actions import network_backends
from ..icons import format_icon, icon
from ..widgets.config_form import ConfigForm
from .common import ok_cancel
from .params import NetworkDiskParams, SecretsParams

ERROR_STYLE = "color: #c9372c;"
OK_STYLE = "color: #1e7b3a;"


def secret_keys(backend) -> list:
    return [k for k in backend.config_keys if k.type is ValueType.BYTES]


def remember_tooltip(backend) -> str:
    names = ", ".join(k.name for k in secret_keys(backend))
    return (f"Store the secrets ({names}) in the library file so the disk opens without asking. "
            "They are stored unencrypted in the library file, readable by your user account "
            "(and by anyone who can read your files). Without this, vdgui keeps them in memory "
            "until it quits and asks for them the next time.")


def open_job(backend, location: str, config: dict) -> Job:
    """Open the disk read-only (as a connection test) and return what it reports."""
    def fn(progress):
        progress(0, 1)
        with Disk() as d:
            d.open(location, backend, OpenFlags.READ_ONLY, dict(config))
            info = d.info(0)
        progress(1, 1)
        return {"size": info["virtual_size"], "details": dict(info.get("details") or {}),
                "location": location}

    return Job(f"Test connection to {location.split('@', 1)[-1]}", fn, kind="connect",
               visible=False)


def describe(info: dict) -> str:
    """'8 MiB (8,388,608 bytes), IET VIRTUAL-DISK' from an open_job result."""
    size = info.get("size") or 0
    text = f"{format_size(size)} ({size:,} bytes)"
    det = info.get("details") or {}
    who = " ".join(str(det[k]) for k in ("vendor", "product") if det.get(k))
    return text + (f", {who}" if who else "")


class NetworkDiskDialog(QDialog):
    """Backend (when several), URL paste field, generated form, remember-secrets, test."""

    def __init__(self, parent=None, *, queue: JobQueue | None = None, backends=None):
        super().__init__(parent)
        self.setWindowTitle("Add Network Disk")
        self.setWindowIcon(icon("network"))
        self.queue = queue if queue is not None else JobQueue(self)
        self.backends = list(backends if backends is not None else network_backends())
        self.form: ConfigForm | None = None
        self.job: Job | None = None
        self._accept_after_test = False
        self._tested: tuple | None = None        # (backend name, values) that connected
        self._shown_for: tuple | None = None     # the settings the shown verdict is about
        self.result_info: dict | None = None

        intro = QLabel("Describe the disk by its settings, or paste its URL. The disk is opened "
                       "read-only to test the connection before it is added.")
        intro.setWordWrap(True)
        self.backend_box = QComboBox()
        self.backend_box.setObjectName("backend")
        for b in self.backends:
            self.backend_box.addItem(format_icon("hdd", b.name),
                                     f"{b.name} — {b.description}" if b.description else b.name,
                                     b.name)
        self.url = QLineEdit()
        self.url.setObjectName("url")
        self.url.setClearButtonEnabled(True)
        self.url_error = QLabel()
        self.url_error.setObjectName("url_error")
        self.url_error.setStyleSheet(ERROR_STYLE)
        self.url_error.setWordWrap(True)
        self.url_error.setVisible(False)
        top = QFormLayout()
        self.backend_label = QLabel("&Type:")
        self.backend_label.setBuddy(self.backend_box)
        top.addRow(self.backend_label, self.backend_box)
        url_label = QLabel("&URL (optional):")
        url_label.setBuddy(self.url)
        top.addRow(url_label, self.url)
        top.addRow("", self.url_error)
        self.backend_label.setVisible(len(self.backends) > 1)
        self.backend_box.setVisible(len(self.backends) > 1)

        self.settings_box = QGroupBox("Settings")
        self.settings_layout = QVBoxLayout(self.settings_box)
        self.location_label = QLabel()
        self.location_label.setObjectName("location")
        self.location_label.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.location_label.setWordWrap(True)
        self.remember = QCheckBox("&Remember secrets")
        self.remember.setObjectName("remember_secrets")

        self.test_button = QPushButton(icon("refresh"), "&Test Connection")
        self.test_button.setObjectName("test_connection")
        self.test_button.clicked.connect(self._test_clicked)
        self.status = QLabel()
        self.status.setObjectName("status")
        self.status.setWordWrap(True)
        self.status.setTextInteractionFlags(Qt.TextSelectableByMouse)
        test_row = QHBoxLayout()
        test_row.addWidget(self.test_button, 0, Qt.AlignTop)
        test_row.addWidget(self.status, 1)

        self.buttons, self.ok = ok_cancel(self, "&Add")

        lay = QVBoxLayout(self)
        lay.addWidget(intro)
        lay.addLayout(top)
        lay.addWidget(self.settings_box)
        lay.addWidget(self.location_label)
        lay.addWidget(self.remember)
        lay.addLayout(test_row)
        lay.addStretch(1)
        lay.addWidget(self.buttons)

        self.backend_box.currentIndexChanged.connect(self._backend_changed)
        self.url.textEdited.connect(self._url_edited)
        if not self.backends:
            self.settings_box.setVisible(False)
            self._set_status("No registered backend opens network disks.", error=True)
        self._backend_changed()
        self.resize(600, self.sizeHint().height())

    # -- state ----------------------------------------------------------------------------
    def backend(self):
        i = self.backend_box.currentIndex()
        return self.backends[i] if 0 <= i < len(self.backends) else None

    def set_backend(self, name: str) -> None:
        self.backend_box.setCurrentIndex(self.backend_box.findData(name))

    def values(self) -> dict:
        return self.form.values() if self.form is not None else {}

    def location(self) -> str:
        b = self.backend()
        return b.compose_location(self.values()) if b is not None else ""

    def _snapshot(self) -> tuple:
        b = self.backend()
        return (b.name if b else None, tuple(sorted(self.values().items())))

    def _backend_changed(self, *_):
        b = self.backend()
        if self.form is not None:
            self.form.setParent(None)
            self.form.deleteLater()
            self.form = None
        if b is None:
            self._validate()
            return
        self.form = ConfigForm(b.config_keys, mode="edit")
        self.form.setObjectName("config_form")
        self.settings_layout.addWidget(self.form)
        self.form.valuesChanged.connect(self._validate)
        schemes = getattr(b, "url_schemes", ()) or ()
        self.url.setEnabled(bool(schemes))
        self.url.setPlaceholderText(f"Paste a {schemes[0]}:// URL to fill in the settings"
                                    if schemes else f"{b.name} disks have no URL form")
        self.settings_box.setTitle(f"{b.name} settings")
        has_secrets = bool(secret_keys(b))
        self.remember.setVisible(has_secrets)
        self.remember.setToolTip(remember_tooltip(b) if has_secrets else "")
        self._validate()

    def _url_edited(self, text: str) -> None:
        b = self.backend()
        text = text.strip()
        if b is None or not text:
            self.url_error.setVisible(False)
            return
        try:
            keys = b.parse_location(text)
        except VDError as exc:
            self.url_error.setText(exc.message)
            self.url_error.setVisible(True)
            return
        self.url_error.setVisible(False)
        self._from_url = True
        try:
            self.form.set_values(keys)
        finally:
            self._from_url = False

    _from_url = False

    def _validate(self, *_):
        valid = self.form is not None and self.form.is_valid()
        testing = self.job is not None
        self.ok.setEnabled(valid and not testing)
        self.test_button.setEnabled(valid and not testing)
        loc = self.location() if valid else ""
        if not self._from_url and self.url.isEnabled() and not self.url_error.isVisible():
            self.url.setText(loc)          # the URL follows the settings: never stale
        self.location_label.setText(f"Location: <b>{html.escape(loc)}</b>" if loc else
                                    "<i>Fill in the required settings (marked *).</i>")
        if not testing and self._shown_for is not None and self._shown_for != self._snapshot():
            self._tested = self._shown_for = None          # the verdict was about other settings
            self._set_status("")

    def _set_status(self, text: str, *, error: bool = False, ok: bool = False) -> None:
        self.status.setStyleSheet(ERROR_STYLE if error else OK_STYLE if ok else "")
        self.status.setText(text)
        if not error:
            self.status.setToolTip("")

    # -- testing --------------------------------------------------------------------------
    def _test_clicked(self, checked: bool = False) -> None:
        # a bound method, not a lambda holding the dialog: such a lambda on a child's signal
        # made PySide report "shared QObject was deleted directly" when the dialog went away
        self.test_connection()

    def test_connection(self, accept_after: bool = False) -> Job | None:
        b = self.backend()
        if b is None or self.form is None or not self.form.is_valid() or self.job is not None:
            return None
        self._accept_after_test = accept_after
        loc = self.location()
        job = open_job(b, loc, self.values())
        job.snapshot = self._snapshot()
        self.job = job
        job.signals.finished.connect(self._test_finished)
        job.signals.failed.connect(self._test_failed)
        job.signals.cancelled.connect(self._test_cancelled)
        self.form.setEnabled(False)
        self.url.setEnabled(False)
        self.backend_box.setEnabled(False)
        timeout = self.values().get("Timeout") or next(
            (k.default for k in b.config_keys if k.name == "Timeout"), None)
        limit = f" (gives up after {int(timeout) / 1000:g} s)" if timeout else ""
        self._set_status(f"Connecting to {html.escape(loc.split('@', 1)[-1])}…{limit}")
        self._validate()
        self.queue.submit(job)
        return job

    def _test_done(self, job) -> bool:
        if job is not self.job:
            return False                       # a test this dialog no longer waits for
        self.job = None
        self.form.setEnabled(True)
        self.backend_box.setEnabled(True)
        self.url.setEnabled(bool(getattr(self.backend(), "url_schemes", ())))
        return True

    def _test_finished(self, job, info) -> None:
        if not self._test_done(job):
            return
        self.result_info = info
        self._tested = self._shown_for = job.snapshot
        self._set_status(f"Connected: {html.escape(describe(info))}", ok=True)
        self._validate()
        if self._accept_after_test and self._tested == self._snapshot():
            super().accept()

    def _test_failed(self, job, message, tb) -> None:
        if not self._test_done(job):
            return
        self._tested = None
        self._shown_for = job.snapshot
        text = f"Connection failed: {message}"
        if tb:
            text = f"Internal error while connecting (a bug, please report it): {message}"
        self._set_status(html.escape(text), error=True)
        self.status.setToolTip(tb or "")
        self._validate()

    def _test_cancelled(self, job) -> None:
        if self._test_done(job):
            self._set_status("Connection test cancelled.")
            self._validate()

    # -- closing --------------------------------------------------------------------------
    def accept(self) -> None:
        """OK tests the connection first (unless these very settings just connected)."""
        if self.form is None or not self.form.is_valid() or self.job is not None:
            return
        if self._tested is not None and self._tested == self._snapshot():
            super().accept()
            return
        self.test_connection(accept_after=True)

    def reject(self) -> None:
        if self.job is not None:
            self.job.cancel()                 # the engine stops at its timeout; result ignored
            self.job = None
        super().reject()

    def params(self) -> NetworkDiskParams:
        b = self.backend()
        return NetworkDiskParams(
            format=b.name,
            location=self.location(),
            properties=self.values(),
            remember_secrets=bool(secret_keys(b)) and self.remember.isChecked(),
            info=self.result_info,
        )


class SecretsDialog(QDialog):
    """Ask for the secrets of a disk whose secrets were not remembered (built from the backend's
    BYTES keys; the ones the disk was configured with are required)."""

    def __init__(self, name: str, backend, missing: list[str], parent=None, *, path: str = ""):
        super().__init__(parent)
        self.backend = backend
        self.path = path
        self.setWindowTitle(f"Secrets for {name}")
        self.setWindowIcon(icon("network"))
        keys = []
        for k in secret_keys(backend):
            if k.name in missing:
                k = dataclasses.replace(k, flags=(k.flags | KeyFlag.MANDATORY) & ~KeyFlag.EXPERT)
            keys.append(k)
        text = QLabel(
            f"<b>{html.escape(name)}</b> needs its secrets "
            f"({html.escape(', '.join(missing))}) to be opened. They were not "
            "remembered in the library."
        )
        text.setWordWrap(True)
        self.form = ConfigForm(keys, mode="edit")
        self.remember = QCheckBox("&Remember secrets")
        self.remember.setObjectName("remember_secrets")
        self.remember.setToolTip(remember_tooltip(backend))
        self.buttons, self.ok = ok_cancel(self, "&Open")
        self.form.validChanged.connect(self.ok.setEnabled)
        self.ok.setEnabled(self.form.is_valid())
        lay = QVBoxLayout(self)
        lay.addWidget(text)
        lay.addWidget(self.form)
        lay.addWidget(self.remember)
        lay.addWidget(self.buttons)
        self.resize(460, self.sizeHint().height())

    def secrets(self) -> dict:
        return self.form.values()

    def params(self) -> SecretsParams:
        return SecretsParams(
            path=self.path, secrets=self.secrets(), remember=self.remember.isChecked()
        )
