"""The "Add network disk…" dialog without a network: the form generated from the iSCSI backend's
declarations, URL paste, the action's state from capabilities, secrets kept out of the library
file unless remembered (and asked for again), and the create dialog's per-tab extension."""
from __future__ import annotations

import glob

import pytest
from PySide6.QtWidgets import QCheckBox, QLineEdit

import vdgui.vd.registry as registry
from tests.gui.conftest import wait_job
from vdgui.gui import actions
from vdgui.gui.dialogs.create import CreateDialog
from vdgui.gui.dialogs.network_disk import NetworkDiskDialog, SecretsDialog
from vdgui.vd import (
    Alloc,
    AuthenticationError,
    Backend,
    Cap,
    ConfigKey,
    Image,
    KeyFlag,
    Library,
    Operation,
    ValueType,
    backends,
    get_backend,
    parse_config,
)

pytestmark = pytest.mark.gui

SECRET = b"s3cr3t-Chap-Pa55"


class _NetImage(Image):
    def block_status(self, offset, length):
        return [(offset, length, Alloc.DATA)]

    def read(self, offset, length):
        return bytes(length)


class LockedNet(Backend):
    """A network backend that needs its secret, and claims operations that need files."""
    name = "LOCKEDNET"
    description = "test network backend with a secret"
    caps = Cap.CONFIG | Cap.TCPNET
    operations = frozenset({Operation.WRITE, Operation.COMPACT, Operation.RESIZE})
    url_schemes = ("lockednet",)
    config_keys = (ConfigKey("Host", None, ValueType.STRING, KeyFlag.MANDATORY),
                   ConfigKey("Secret", None, ValueType.BYTES),
                   ConfigKey("PeerSecret", None, ValueType.BYTES, KeyFlag.EXPERT))

    def compose_location(self, config):
        return f"lockednet://{config.get('Host', '')}/disk"

    def open(self, location, flags, config=None):
        cfg = parse_config(self.config_keys, config, owner=self.name)
        if cfg.get("Secret") != SECRET:
            raise AuthenticationError(f"{location}: authentication failed (wrong or no Secret)")
        img = _NetImage(self, location, True)
        img.size = 4 << 20
        return img


@pytest.fixture
def lockednet(monkeypatch):
    b = LockedNet()
    monkeypatch.setattr(registry.formats, "REGISTERED", [b])
    return b


def _dialog(qtbot, **kw) -> NetworkDiskDialog:
    dlg = NetworkDiskDialog(**kw)
    qtbot.addWidget(dlg)
    dlg.show()
    qtbot.waitExposed(dlg)
    return dlg


def test_form_from_iscsi_declarations(qtbot):
    dlg = _dialog(qtbot, backends=[get_backend("iSCSI")])
    form = dlg.form
    keys = {k.name: k for k in get_backend("iSCSI").config_keys}
    assert set(form.fields) == set(keys)                 # only the backend's keys, all of them
    assert not dlg.backend_box.isVisible()               # one backend: nothing to pick
    for name, key in keys.items():
        f = form.fields[name]
        if key.is_switch:                               # on/off keys are check boxes
            assert isinstance(f.editor, QCheckBox)
            assert f.editor.isChecked() == (key.default == "1")
            assert f.editor.isVisible() == (not key.expert), name
            continue
        assert isinstance(f.editor, QLineEdit)
        assert f.label.text().endswith(" *") == key.mandatory, name
        assert f.label.font().bold() == key.mandatory, name
        # secrets masked
        want = QLineEdit.Password if key.type is ValueType.BYTES else QLineEdit.Normal
        assert f.editor.echoMode() == want, name
        # expert keys hidden until "Show advanced"
        assert f.editor.isVisible() == (not key.expert), name
        if key.default is not None:
            assert f.editor.text() == key.default, name
    assert {n for n, k in keys.items() if k.type is ValueType.BYTES} == {"InitiatorSecret",
                                                                         "TargetSecret"}
    form.show_advanced.setChecked(True)
    assert form.editor("TargetSecret").isVisible() and form.editor("Timeout").isVisible()
    # the remember checkbox tells where secrets would go
    assert dlg.remember.isVisible() and not dlg.remember.isChecked()
    tip = dlg.remember.toolTip()
    assert "unencrypted" in tip and "library file" in tip and "user account" in tip


def test_ok_needs_the_mandatory_keys(qtbot):
    dlg = _dialog(qtbot, backends=[get_backend("iSCSI")])
    form = dlg.form
    assert not dlg.ok.isEnabled() and not dlg.test_button.isEnabled()
    form.editor("TargetName").setText("iqn.2026-11.org.example:disk")
    assert not dlg.ok.isEnabled()
    form.editor("TargetAddress").setText("192.0.2.7")
    assert dlg.ok.isEnabled() and dlg.test_button.isEnabled()
    assert "iscsi://192.0.2.7/iqn.2026-11.org.example:disk/0" in dlg.location_label.text()
    form.editor("LUN").setText("")
    assert not dlg.ok.isEnabled()
    assert form.fields["LUN"].error.text() == "Required"
    form.editor("LUN").setText("1")
    # an invalid value is explained next to its field and blocks OK
    form.editor("Timeout").setText("soon")
    assert not dlg.ok.isEnabled()
    err = form.fields["Timeout"].error
    assert err.isVisible() and err.text()
    assert form.editor("Timeout").isVisible()           # expert field shown because it is wrong
    form.editor("Timeout").setText("5")
    assert "100" in err.text() and not dlg.ok.isEnabled()   # below the declared minimum
    form.editor("Timeout").setText("2000")
    assert dlg.ok.isEnabled()


def test_url_paste_fills_keys(qtbot):
    dlg = _dialog(qtbot, backends=[get_backend("iSCSI")])
    qtbot.keyClicks(dlg.url, "iscsi://alice@10.1.2.3:3261/iqn.2026-11.org.example:store/2")
    form = dlg.form
    assert form.editor("TargetAddress").text() == "10.1.2.3:3261"
    assert form.editor("TargetName").text() == "iqn.2026-11.org.example:store"
    assert form.editor("LUN").text() == "2"
    assert form.editor("InitiatorUsername").text() == "alice"
    assert not dlg.url_error.isVisible()
    assert dlg.ok.isEnabled()
    assert dlg.location() == "iscsi://alice@10.1.2.3:3261/iqn.2026-11.org.example:store/2"
    # a URL that is not one is explained; the fields keep what they had
    dlg.url.clear()
    qtbot.keyClicks(dlg.url, "iscsi://host-only")
    assert dlg.url_error.isVisible() and "expected iscsi://" in dlg.url_error.text()
    assert form.editor("TargetName").text() == "iqn.2026-11.org.example:store"
    # secrets never travel in URLs
    dlg.url.clear()
    qtbot.keyClicks(dlg.url, "iscsi://alice:pw@10.1.2.3/iqn.2026-11.org.example:store/2")
    assert dlg.url_error.isVisible() and "InitiatorSecret" in dlg.url_error.text()


def test_action_follows_declarations(qtbot, window, monkeypatch):
    a = window.actions["network"]
    assert a.isEnabled()
    assert a in window.menus["file"].actions()
    assert a in window.toolbar.actions()
    # network backends are found by capabilities: CONFIG without FILE
    assert get_backend("iSCSI") in actions.network_backends()
    assert all(b.caps & Cap.CONFIG and not b.caps & Cap.FILE for b in actions.network_backends())
    files_only = [b for b in backends() if b.caps & Cap.FILE]
    monkeypatch.setattr(actions, "backends", lambda: tuple(files_only))
    why = actions.reason("network", [])
    assert why and "CONFIG without FILE" in why
    window.update_actions()
    assert not a.isEnabled() and "CONFIG without FILE" in a.toolTip()


def test_several_network_backends_let_the_user_pick(qtbot, lockednet):
    dlg = _dialog(qtbot)
    names = [dlg.backend_box.itemData(i) for i in range(dlg.backend_box.count())]
    assert "iSCSI" in names and "LOCKEDNET" in names
    assert dlg.backend_box.isVisible()
    dlg.set_backend("LOCKEDNET")
    assert set(dlg.form.fields) == {"Host", "Secret", "PeerSecret"}
    assert dlg.form.editor("Secret").echoMode() == QLineEdit.Password
    dlg.set_backend("iSCSI")
    assert "TargetName" in dlg.form.fields


def _add_locked(qtbot, window, lockednet, remember: bool):
    dlg = _dialog(qtbot, backends=[lockednet], queue=window.queue)
    dlg.form.editor("Host").setText("nas.example")
    dlg.form.editor("Secret").setText(SECRET.decode())
    dlg.remember.setChecked(remember)
    dlg.ok.click()                                        # tests the connection first
    qtbot.waitUntil(lambda: dlg.result() == NetworkDiskDialog.Accepted, timeout=10000)
    assert "Connected: 4.00 MiB (4,194,304 bytes)" in dlg.status.text()
    p = dlg.params()
    assert p.properties["Secret"] == SECRET and p.remember_secrets is remember
    job = window.add_network_image(p.location, p.format, p.properties,
                                   remember_secrets=p.remember_secrets)
    wait_job(qtbot, job)
    qtbot.waitUntil(lambda: window.model.node(p.location) is not None, timeout=5000)
    node = window.model.node(p.location)
    assert node.accessible, node.record.error
    return node


def _db_bytes(path) -> bytes:
    """Everything SQLite has on disk for the library: the file, its WAL and shared memory."""
    out = b""
    for f in sorted(glob.glob(str(path) + "*")):
        with open(f, "rb") as fh:
            out += fh.read()
    return out


def test_secrets_not_in_library_file_unless_remembered(qtbot, window, lockednet, data_dir):
    node = _add_locked(qtbot, window, lockednet, remember=False)
    assert node.record.format == "LOCKEDNET"
    window.select_paths([node.path])
    # not a file: file actions are off and say why, from the capabilities
    for key in ("move", "delete", "compact", "resize"):
        assert not window.actions[key].isEnabled(), key
        assert "FILE" in window.actions[key].toolTip(), (key, window.actions[key].toolTip())
    assert window.library.properties(node.path)["Secret"] == SECRET       # this session
    assert SECRET not in _db_bytes(window.library.path)
    assert window.library.missing_secrets(node.path) == []
    # a new session (a new Library on the same file) knows the disk but not its secret
    lib2 = Library(window.library.path)
    try:
        assert "Secret" not in lib2.properties(node.path)
        assert lib2.properties(node.path)["Host"] == "nas.example"
        assert lib2.missing_secrets(node.path) == ["Secret"]
    finally:
        lib2.close()


def test_remembered_secrets_are_stored(qtbot, window, lockednet):
    node = _add_locked(qtbot, window, lockednet, remember=True)
    assert SECRET in _db_bytes(window.library.path)
    lib2 = Library(window.library.path)
    try:
        assert lib2.properties(node.path)["Secret"] == SECRET
        assert lib2.missing_secrets(node.path) == []
    finally:
        lib2.close()


def test_forgotten_secrets_are_asked_for(qtbot, window, lockednet, library):
    loc = "lockednet://nas.example/disk"
    window.add_network_image(loc, "LOCKEDNET", {"Host": "nas.example", "Secret": SECRET})
    qtbot.waitUntil(lambda: window.model.node(loc) is not None, timeout=5000)
    # simulate the next session: the in-memory secret is gone
    library._session_secrets.clear()
    window.refresh()
    qtbot.waitUntil(lambda: loc in window.secret_prompts, timeout=5000)
    dlg = window.secret_prompts[loc]
    assert isinstance(dlg, SecretsDialog)
    assert not window.model.node(loc).accessible
    assert "authentication failed" in window.model.node(loc).record.error
    # cancelled: asked once per session; the context menu offers it again
    dlg.reject()
    qtbot.waitUntil(lambda: loc not in window.secret_prompts, timeout=2000)
    wait_job(qtbot, window.refresh())
    assert loc not in window.secret_prompts
    window.select_paths([loc])
    idx = window.proxy.index_for_path(loc)
    menu = window._context_menu(window.tree.visualRect(idx).center())
    entry = [a for a in menu.actions() if a.text() == "Enter &Secrets…"]
    assert entry
    menu.close()
    entry[0].trigger()
    assert loc in window.secret_prompts
    dlg = window.secret_prompts[loc]
    assert dlg.remember.toolTip() and "unencrypted" in dlg.remember.toolTip()
    # the prompt is built from the backend's BYTES keys; the missing one is required
    assert set(dlg.form.fields) == {"Secret", "PeerSecret"}
    assert dlg.form.editor("Secret").echoMode() == QLineEdit.Password
    assert dlg.form.fields["Secret"].label.text() == "Secret *"
    assert not dlg.ok.isEnabled()
    dlg.form.editor("Secret").setText(SECRET.decode())
    assert dlg.ok.isEnabled()
    dlg.ok.click()
    qtbot.waitUntil(lambda: window.model.node(loc).accessible, timeout=5000)
    assert SECRET not in _db_bytes(library.path)
    assert loc not in window.secret_prompts


def test_wrong_secret_is_explained(qtbot, window, lockednet):
    dlg = _dialog(qtbot, backends=[lockednet], queue=window.queue)
    dlg.form.editor("Host").setText("nas.example")
    dlg.form.editor("Secret").setText("wrong")
    dlg.ok.click()
    qtbot.waitUntil(lambda: "Connection failed" in dlg.status.text(), timeout=10000)
    assert "authentication failed" in dlg.status.text()
    assert dlg.result() != NetworkDiskDialog.Accepted and dlg.isVisible()
    assert dlg.ok.isEnabled()
    # changing a value clears the old verdict
    dlg.form.editor("Secret").setText(SECRET.decode())
    assert dlg.status.text() == ""
    job = dlg.test_connection()
    assert not dlg.ok.isEnabled()                        # while testing
    wait_job(qtbot, job)
    qtbot.waitUntil(lambda: "Connected" in dlg.status.text(), timeout=5000)


@pytest.mark.parametrize("device, ext", [("hdd", ".raw"), ("optical", ".iso"),
                                         ("floppy", ".img"), (None, ".raw")])
def test_create_raw_extension_follows_tab(qtbot, tmp_path, device, ext):
    dlg = CreateDialog(str(tmp_path), device=device)
    qtbot.addWidget(dlg)
    dlg.set_format("RAW")
    assert dlg.location.path().endswith(ext), dlg.location.path()


def test_create_from_hard_disk_tab_gives_raw(qtbot, window, monkeypatch):
    """The window opens the create dialog for its current tab (hard disks first)."""
    window.tabs.setCurrentIndex(0)
    got = {}

    def fake_exec(self):
        self.set_format("RAW")
        got["path"] = self.location.path()
        return 0
    monkeypatch.setattr(CreateDialog, "exec", fake_exec)
    assert window.create_dialog() is None
    assert got["path"].endswith(".raw")


def test_silent_target_times_out_without_blocking(qtbot, window):
    """The connection test runs in a job: the dialog stays live, and the backend's Timeout key
    bounds the wait for a target that accepts the connection but never answers."""
    import socket
    import time

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)                          # the kernel completes the handshake; nobody reads
    try:
        port = server.getsockname()[1]
        dlg = _dialog(qtbot, backends=[get_backend("iSCSI")], queue=window.queue)
        dlg.url.setText(f"iscsi://127.0.0.1:{port}/iqn.2026-11.org.example:silent/1")
        dlg._url_edited(dlg.url.text())
        dlg.form.show_advanced.setChecked(True)
        dlg.form.editor("Timeout").setText("400")
        start = time.monotonic()
        job = dlg.test_connection()
        returned = time.monotonic() - start
        assert returned < 0.3 and not job.finished     # the GUI thread did not wait
        assert "Connecting" in dlg.status.text()
        assert not dlg.ok.isEnabled() and not dlg.test_button.isEnabled()
        assert not dlg.form.isEnabled()
        ticks = []
        from PySide6.QtCore import QTimer
        timer = QTimer(dlg)
        timer.timeout.connect(lambda: ticks.append(1))
        timer.start(20)
        wait_job(qtbot, job, timeout=10000)
        timer.stop()
        elapsed = time.monotonic() - start
        qtbot.waitUntil(lambda: "Connection failed" in dlg.status.text(), timeout=5000)
        assert "400 ms" in dlg.status.text()
        assert elapsed < 5                          # bounded by Timeout, not the 10 s default
        assert ticks                                # the event loop ran while it waited
        assert dlg.ok.isEnabled() and dlg.form.isEnabled()
    finally:
        server.close()


def test_library_secret_bookkeeping(library, lockednet):
    loc = "lockednet://nas.example/disk"
    library.add(loc, format="LOCKEDNET")
    # remembered, then forgotten: no copy stays in the file (nor in its WAL)
    library.set_properties(loc, {"Host": "nas.example", "Secret": SECRET}, remember_secrets=True)
    assert SECRET in _db_bytes(library.path)
    library.set_secrets(loc, {"Secret": SECRET}, remember=False)
    assert not library.remembers_secrets(loc)
    assert library.properties(loc)["Secret"] == SECRET          # still known this session
    assert SECRET not in _db_bytes(library.path)
    # a string value of a key the backend declares BYTES is a secret too
    library.set_properties(loc, {"Host": "nas.example", "Secret": SECRET.decode()})
    assert SECRET not in _db_bytes(library.path)
    # next session: saving the other settings without the secret keeps it wanted
    lib2 = Library(library.path)
    try:
        assert lib2.missing_secrets(loc) == ["Secret"]
        lib2.set_properties(loc, {"Host": "nas2.example"})
        assert lib2.missing_secrets(loc) == ["Secret"]
        assert lib2.properties(loc) == {"Host": "nas2.example"}
        lib2.set_secrets(loc, {"Secret": SECRET})
        assert lib2.missing_secrets(loc) == [] and lib2.properties(loc)["Secret"] == SECRET
        assert SECRET not in _db_bytes(library.path)
        lib2.remove(loc)
        assert lib2.missing_secrets(loc) == [] and lib2.properties(loc) == {}
    finally:
        lib2.close()


def test_form_flags_a_bad_port_and_the_url_follows_the_fields(qtbot):
    """Issue #13 item 3: port 99999 is flagged in the form (not only by the CLI), and the URL
    field never goes stale when the settings below it change."""
    dlg = _dialog(qtbot, backends=[get_backend("iSCSI")])
    form = dlg.form
    form.editor("TargetName").setText("iqn.2026-01.example:disk")
    form.editor("TargetAddress").setText("san.example:99999")
    assert "99999 is out of range" in form.errors().get("TargetAddress", "")
    assert not dlg.ok.isEnabled()
    form.editor("TargetAddress").setText("san.example:3260")
    assert dlg.ok.isEnabled()
    assert dlg.url.text() == "iscsi://san.example:3260/iqn.2026-01.example:disk/0"
    form.editor("LUN").setText("2")
    assert dlg.url.text().endswith("/2")
    form.editor("LUN").setText("99999")
    assert "LUN" in form.errors() and not dlg.ok.isEnabled()


def test_connecting_status_says_when_it_gives_up(qtbot):
    import socket
    with socket.socket() as s:                       # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dlg = _dialog(qtbot, backends=[get_backend("iSCSI")])
    dlg.form.editor("TargetName").setText("iqn.2026-01.example:disk")
    dlg.form.editor("TargetAddress").setText(f"127.0.0.1:{port}")
    dlg.accept()
    assert "gives up after 10 s" in dlg.status.text()
    qtbot.waitUntil(lambda: dlg.job is None, timeout=15000)
    assert dlg.status.text().startswith("Connection failed: cannot connect")
    assert dlg.isVisible()                           # the dialog stays, with what was typed
    assert dlg.form.editor("TargetAddress").text() == f"127.0.0.1:{port}"
