""""Add network disk…" against a real iSCSI target (tgt on loopback, CHAP required): the
connection test, the authentication error, adding the disk to the media tree, copying it to a
VDI with the copy dialog, and secrets kept out of the library file unless remembered."""
from __future__ import annotations

import glob

import pytest
from PySide6.QtCore import Qt, QTimer
from PySide6.QtWidgets import QApplication, QDialog

from tests.gui import conftest as gui
from tests.gui.conftest import wait_job
from vdgui.gui.dialogs.copy import CopyDialog
from vdgui.gui.dialogs.network_disk import NetworkDiskDialog
from vdgui.gui.models.media import COL_FORMAT
from vdgui.vd import Library, get_backend

pytestmark = [pytest.mark.iscsi, pytest.mark.gui]

# the GUI tests' fixtures: an isolated data dir (autouse), the library, the main window
data_dir, library, window = gui.data_dir, gui.library, gui.window

IQN = "iqn.2026-11.org.vdgui.test:gui-disk"
IQN_REMEMBERED = "iqn.2026-11.org.vdgui.test:gui-remembered"
USER = "alice"
USERS = {IQN: USER, IQN_REMEMBERED: "bob"}
SECRET = "Gui-s3cret-Passw0rd"
LUN_SIZE = 8 << 20


def _backing(path, seed):
    with open(path, "wb") as f:
        for i in range(LUN_SIZE // 65536):
            f.write(bytes([(i * 5 + seed) % 251 + 1]) * 65536 if i % 4 else bytes(65536))
    return str(path)


@pytest.fixture(scope="module")
def target(tgt, tmp_path_factory):
    """Two CHAP-protected LUNs on one tgt: {iqn: backing file}."""
    d = tmp_path_factory.mktemp("luns")
    out = {}
    for n, iqn in enumerate((IQN, IQN_REMEMBERED)):
        out[iqn] = _backing(d / f"lun{n}.img", seed=n)
        tgt.add_target(iqn, out[iqn], user=USERS[iqn], password=SECRET)   # tgt accounts are global
    return out


def _url(tgt, iqn=IQN):
    return f"iscsi://{USERS[iqn]}@127.0.0.1:{tgt.port}/{iqn}/1"


def _fill(qtbot, dlg, tgt, secret, iqn=IQN):
    qtbot.keyClicks(dlg.url, _url(tgt, iqn))
    dlg.form.editor("InitiatorSecret").setText(secret)
    dlg.form.editor("Timeout").setText("5000")


def _dialog(qtbot, window):
    dlg = NetworkDiskDialog(window, queue=window.queue)
    qtbot.addWidget(dlg)
    dlg.show()
    qtbot.waitExposed(dlg)
    return dlg


def run_modal(qtbot, cls, drive, start, timeout=30000):
    """Call ``start()`` (which runs a modal dialog of type ``cls``) and ``drive(dialog)`` once
    the dialog shows; the dialog is rejected after ``timeout`` ms so a test cannot hang."""
    state = {}

    def poll():
        for w in QApplication.topLevelWidgets():
            if isinstance(w, cls) and w.isVisible():
                guard = QTimer(w)                     # dies with the dialog
                guard.setSingleShot(True)
                guard.timeout.connect(w.reject)
                guard.start(timeout)
                try:
                    drive(w)
                except BaseException as exc:          # report it after exec() returns
                    state["error"] = exc
                    w.reject()
                return
        QTimer.singleShot(20, poll)
    QTimer.singleShot(0, poll)
    result = start()
    if "error" in state:
        raise state["error"]
    return result


def _db_bytes(path) -> bytes:
    out = b""
    for f in sorted(glob.glob(str(path) + "*")):
        with open(f, "rb") as fh:
            out += fh.read()
    return out


def test_connection_test_shows_size(qtbot, window, tgt, target):
    dlg = _dialog(qtbot, window)
    _fill(qtbot, dlg, tgt, SECRET)
    assert dlg.form.editor("TargetAddress").text() == f"127.0.0.1:{tgt.port}"
    assert dlg.form.editor("InitiatorUsername").text() == USER
    job = dlg.test_connection()
    assert job is not None and not dlg.ok.isEnabled() and "Connecting" in dlg.status.text()
    wait_job(qtbot, job)
    qtbot.waitUntil(lambda: "Connected" in dlg.status.text(), timeout=5000)
    text = dlg.status.text()
    assert "8.00 MiB (8,388,608 bytes)" in text
    det = dlg.result_info["details"]
    assert det["vendor"] and det["vendor"] in text and det["product"] in text
    assert dlg.ok.isEnabled()
    dlg.reject()


def test_wrong_chap_secret_is_shown(qtbot, window, tgt, target):
    dlg = _dialog(qtbot, window)
    _fill(qtbot, dlg, tgt, "not-the-secret")
    dlg.ok.click()                                       # OK tests first: it must not accept
    qtbot.waitUntil(lambda: "Connection failed" in dlg.status.text(), timeout=15000)
    assert "authentication failure (check InitiatorUsername / InitiatorSecret)" in dlg.status.text()
    assert dlg.isVisible() and dlg.result() != QDialog.Accepted
    # no credentials at all: refused too, and said so
    dlg.form.editor("InitiatorSecret").clear()
    dlg.form.editor("InitiatorUsername").clear()
    assert dlg.status.text() == ""                       # the old verdict was about other settings
    wait_job(qtbot, dlg.test_connection())
    qtbot.waitUntil(lambda: "Connection failed" in dlg.status.text(), timeout=15000)
    assert "authentication" in dlg.status.text()
    dlg.reject()


def test_add_copy_to_vdi_and_secrets(qtbot, window, tgt, target, qemu, tmp_path):
    loc = _url(tgt)

    def add(dlg):
        _fill(qtbot, dlg, tgt, SECRET)
        assert not dlg.remember.isChecked()
        dlg.ok.click()
    run_modal(qtbot, NetworkDiskDialog, add, window.network_disk_dialog)
    qtbot.waitUntil(lambda: window.model.node(loc) is not None, timeout=15000)
    node = window.model.node(loc)
    assert node.accessible, node.record.error
    assert node.record.format == "iSCSI" and node.record.virtual_size == LUN_SIZE
    idx = window.proxy.index_for_path(loc)
    assert idx.isValid()
    assert idx.siblingAtColumn(COL_FORMAT).data(Qt.DisplayRole) == "iSCSI"
    assert SECRET not in node.name and USER not in node.name
    # the secret is not in the library file (only in memory for this session)
    assert SECRET.encode() not in _db_bytes(window.library.path)
    assert window.library.properties(loc)["InitiatorSecret"] == SECRET.encode()
    lib2 = Library(window.library.path)
    try:
        assert lib2.missing_secrets(loc) == ["InitiatorSecret"]
    finally:
        lib2.close()

    # file actions are off, and say why
    window.select_paths([loc])
    for key in ("move", "delete", "compact", "resize"):
        assert not window.actions[key].isEnabled(), key
        tip = window.actions[key].toolTip()
        assert "FILE" in tip or "not files" in tip
    assert window.actions["copy"].isEnabled()

    # copy it to a VDI with the copy dialog, in a job with progress
    folder = tmp_path / "copies"
    folder.mkdir()
    window.settings.setValue("paths/last_folder", str(folder))
    progress = []

    def copy(dlg):
        dlg.set_format("VDI")
        assert dlg.location.path().startswith(str(folder)) and dlg.location.path().endswith(".vdi")
        assert dlg.ok.isEnabled(), dlg.messages.errors
        dlg.ok.click()

    job = run_modal(qtbot, CopyDialog, copy, window.copy_dialog)
    assert job is not None
    assert job.title.startswith("Convert 127.0.0.1:") and job.title.endswith(".vdi")
    assert USER not in job.title
    job.signals.progress.connect(lambda j, done, total: progress.append((done, total)))
    wait_job(qtbot, job, timeout=60000)
    assert job.state == "done", job.error
    dst = job.result[0]
    assert dst.endswith(".vdi")
    assert progress and progress[-1][0] == progress[-1][1]
    r = qemu.compare(target[IQN], dst, fa="raw", fb="vdi")
    assert r.returncode == 0, r.stdout + r.stderr
    qtbot.waitUntil(lambda: window.model.node(dst) is not None, timeout=10000)


def test_remembered_secret_is_stored(qtbot, window, tgt, target):
    loc = _url(tgt, IQN_REMEMBERED)

    def add(dlg):
        _fill(qtbot, dlg, tgt, SECRET, iqn=IQN_REMEMBERED)
        dlg.remember.setChecked(True)
        dlg.ok.click()

    run_modal(qtbot, NetworkDiskDialog, add, window.network_disk_dialog)
    qtbot.waitUntil(lambda: window.model.node(loc) is not None, timeout=15000)
    assert window.model.node(loc).accessible
    assert SECRET.encode() in _db_bytes(window.library.path)
    lib2 = Library(window.library.path)
    try:
        assert lib2.properties(loc)["InitiatorSecret"] == SECRET.encode()
        rec = lib2.scan(loc)  # a later session opens it without asking
        assert rec.accessible and rec.format == get_backend("iscsi").name
    finally:
        lib2.close()
