"""Issue #17, the app: the lock on encrypted images and their encryption in the details, the
passphrase prompt (answered, wrong then retried, cancelled), Encrypt… / Decrypt… / Change
passphrase… as jobs, encryption in the copy dialog, VirtualBox registries with a key store, the
keyring as opt-in, and no passphrase in any log or status text. Oracles: qemu-img makes the
LUKS QCOW2 (``--object secret``), our CLI the VirtualBox-encrypted VDI."""
from __future__ import annotations

import logging
import os
import shutil
import subprocess

import pytest
from PySide6.QtCore import Qt

import vdgui.vd as vd
from tests.conftest import run_cli
from tests.gui.conftest import wait_job
from vdgui.gui.dialogs.params import ChangePassphraseParams, EncryptParams
from vdgui.gui.icons import format_icon
from vdgui.gui.models.media import COL_NAME
from vdgui.jobs import JobState

MiB = 1 << 20
TEXT = b"hello from inside an encrypted disk\n" * 20
MARK = b"PLAINTEXT-MARKER-17" * 50


def _floppy(tmp_path, name: str) -> str:
    src = tmp_path / "hello.txt"
    src.write_bytes(TEXT)
    out = str(tmp_path / f"{name}-floppy.img")
    vd.create_floppy(out, "1.44M", label="SECRET", sources=[str(src)])
    with open(out, "r+b") as f:          # a marker in free space: must not show in ciphertext
        f.seek(1024 * 1024)
        f.write(MARK)
    return out


def _make_luks(qemu, folder, pw="qemu-pass") -> str:
    out = str(folder / "luks.qcow2")
    src = _floppy(folder, "luks")
    for _ in range(40):     # qemu's PBKDF2 timing fails now and then on a coarse clock: retried
        r = qemu.img("convert", "--object", f"secret,id=s0,data={pw}", "-f", "raw", "-O",
                     "qcow2", "-o", "encrypt.format=luks,encrypt.key-secret=s0,"
                     "encrypt.iter-time=100", src, out, check=False)
        if r.returncode == 0 or "accurate CPU usage" not in r.stderr:
            break
    assert r.returncode == 0, r.stderr
    return out


def _make_vbox(folder, pw="vbox-pass") -> str:
    pwf = folder / "vbox.pw"
    pwf.write_text(pw + "\n")
    out = str(folder / "vbox.vdi")
    run_cli("convert", "-O", "VDI", "--encrypt", "vbox-aes-xts256", "--new-passphrase-file",
            pwf, _floppy(folder, "vbox"), out)
    pwf.unlink()
    return out


@pytest.fixture(scope="module")
def masters(qemu, tmp_path_factory):
    """One LUKS QCOW2 (qemu-img) and one VirtualBox-encrypted VDI (our CLI) per module; each
    test gets copies (making them costs seconds of PBKDF2 on a busy machine)."""
    folder = tmp_path_factory.mktemp("masters")
    return {"luks": _make_luks(qemu, folder), "vbox": _make_vbox(folder)}


@pytest.fixture
def copies(masters, tmp_path):
    def make(kind: str, folder=None, name: str | None = None) -> str:
        folder = folder or tmp_path
        src = masters[kind]
        dst = str(folder / (name or os.path.basename(src)))
        shutil.copyfile(src, dst)
        if os.path.exists(vd.sidecar_path(src)):
            shutil.copyfile(vd.sidecar_path(src), vd.sidecar_path(dst))
        return dst
    return make


def _bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _plain(path: str, pw: str, library=None) -> bytes:
    """What the image reads decrypted (the engine, not the app)."""
    with vd.PassphraseProvider([pw]) as pp, vd.using_passphrases(pp):
        from vdgui.jobs.tasks import open_chain
        with open_chain(path, library=library) as d:
            return d.read(0, d.size)


def _answer(qtbot, window, text: str | None, *, expect_error: str | None = None):
    """Answer the next passphrase prompt (None: cancel); returns the dialog's error text."""
    qtbot.waitUntil(lambda: bool(window.passphrases.dialogs), timeout=20000)
    dlg = window.passphrases.dialogs[0]
    shown = dlg.error.text() if dlg.error.isVisibleTo(dlg) else ""
    if expect_error is not None:
        assert expect_error in shown
    if text is None:
        dlg.reject()
    else:
        dlg.edit.setText(text)
        dlg.accept()
    qtbot.waitUntil(lambda: dlg not in window.passphrases.dialogs)
    return shown


def _open_contents(qtbot, window, path):
    window.show()
    window.ops.add_paths([path], sync=True)
    window.select_paths([path])
    window.side.setCurrentWidget(window.contents)
    return window.contents


def _listed(pane) -> set[str]:
    return {pane.model.entries[r].path for r in range(pane.model.rowCount())}


# -- the lock and the details ----------------------------------------------------------------
def test_encrypted_images_show_a_lock_and_their_encryption(qtbot, window, copies, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    luks = copies("luks", tmp_path / "a")
    vbox = copies("vbox", tmp_path / "b")
    plain = str(tmp_path / "plain.vdi")
    with vd.Disk() as d:
        d.create_base(plain, 4 * MiB, "VDI")
    window.show()
    window.ops.add_paths([luks, vbox, plain], sync=True)
    for path, want in ((luks, ["LUKS1", "aes-xts-plain64", "512-bit key", "1 keyslot"]),
                       (vbox, ["VirtualBox CRYPT", "AES-XTS256-PLAIN64", "512-bit key",
                               "vbox.vdi.keystore"])):
        node = window.model.node(path)
        assert node.record.encryption is not None
        assert node.state_text() == "Encrypted"
        window.select_paths([path])
        qtbot.waitUntil(lambda p=path: window.details.node is not None
                        and window.details.node.path == p)
        text = window.details.info["encryption"].text()
        for w in want:
            assert w in text, (w, text)
    # the name column's icon is the locked one for both, the plain one for the plain image
    icons = {}
    for r in range(window.proxy.rowCount()):
        i = window.proxy.index(r, COL_NAME)
        n = window.proxy.node_from_index(i)
        icons[n.path] = window.proxy.data(i, Qt.DecorationRole).cacheKey()
    assert icons[luks] == format_icon("hdd", "QCOW2", True).cacheKey()
    assert icons[vbox] == format_icon("hdd", "VDI", True).cacheKey()
    assert icons[plain] == format_icon("hdd", "VDI", False).cacheKey()
    assert window.details.info["encryption"].text() != "none"
    window.select_paths([plain])
    qtbot.waitUntil(lambda: window.details.info["encryption"].text() == "none")


# -- the prompt --------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["luks", "vbox"])
def test_answered_prompt_opens_the_contents(qtbot, window, copies, tmp_path, kind):
    path = copies(kind)
    pane = _open_contents(qtbot, window, path)
    _answer(qtbot, window, "qemu-pass" if kind == "luks" else "vbox-pass")
    qtbot.waitUntil(lambda: "/hello.txt" in _listed(pane), timeout=20000)
    # the session keeps it: the next read does not ask again
    pane.reload()
    qtbot.waitUntil(lambda: "/hello.txt" in _listed(pane), timeout=20000)
    assert not window.passphrases.dialogs


def test_wrong_passphrase_says_so_and_asks_again(qtbot, window, copies, tmp_path):
    path = copies("luks")
    pane = _open_contents(qtbot, window, path)
    assert _answer(qtbot, window, "not-it") == ""
    _answer(qtbot, window, "qemu-pass", expect_error="Wrong passphrase")
    qtbot.waitUntil(lambda: "/hello.txt" in _listed(pane), timeout=20000)


def test_cancelling_the_prompt_cancels_the_job_and_writes_nothing(qtbot, window, copies, tmp_path):
    path = copies("vbox")
    window.ops.add_paths([path], sync=True)
    node = window.model.node(path)
    before = sorted(os.listdir(tmp_path))
    into = str(tmp_path / "plain-copy.vdi")
    job = window.ops.start_crypt(node, EncryptParams(path, None, into, "VDI"))
    _answer(qtbot, window, None)
    wait_job(qtbot, job)
    assert job.state == JobState.CANCELLED
    assert sorted(os.listdir(tmp_path)) == before


# -- Encrypt…, Decrypt…, Change passphrase… ---------------------------------------------------
@pytest.mark.parametrize("fmt,kind", [("VDI", "vbox-aes-xts128"), ("QCOW2", "luks")])
def test_encrypt_then_decrypt_in_place_reads_identically(qtbot, window, tmp_path, fmt, kind,
                                                         monkeypatch):
    if kind == "luks":   # a cheap keyslot (the default costs 2 s of PBKDF2 to make and to open)
        monkeypatch.setitem(vd.get_backend(fmt).encryptions, "luks",
                            {"Encryption": "luks", "EncryptIterTime": "50"})
    path = str(tmp_path / f"disk.{fmt.lower()}")
    with vd.Disk() as d:
        d.create_base(path, 4 * MiB, fmt)
        d.write(MiB, MARK)
        d.write(3 * MiB, os.urandom(65536))
        want = d.read(0, d.size)
        uuid = d.top.uuid
    window.ops.add_paths([path], sync=True)
    node = window.model.node(path)
    window.select_paths([path])
    assert window.actions["encrypt"].isEnabled() and not window.actions["decrypt"].isEnabled()
    job = window.ops.start_crypt(node, EncryptParams(path, kind, passphrase=vd.Passphrase("s3")))
    wait_job(qtbot, job, timeout=60000)
    assert job.state == JobState.DONE, job.error
    qtbot.waitUntil(lambda: window.model.node(path).record.encryption is not None)
    assert MARK not in _bytes(path)
    assert _plain(path, "s3") == want
    with vd.Disk() as d:
        d.open(path, None, vd.OpenFlags.INFO | vd.OpenFlags.READ_ONLY)
        assert d.top.uuid == uuid                       # the same disk, replaced in place
    window.select_paths([path])
    assert window.actions["decrypt"].isEnabled() and window.actions["passphrase"].isEnabled()
    node = window.model.node(path)
    job = window.ops.start_crypt(node, EncryptParams(path, None))
    _answer(qtbot, window, "s3")
    wait_job(qtbot, job, timeout=60000)
    assert job.state == JobState.DONE, job.error
    qtbot.waitUntil(lambda: window.model.node(path).record.encryption is None)
    assert not os.path.exists(vd.sidecar_path(path))
    with vd.Disk.open_chain(path) as d:
        assert d.read(0, d.size) == want
    assert sorted(os.listdir(tmp_path)) == ["data", os.path.basename(path)]


@pytest.mark.parametrize("kind", ["luks", "vbox"])
def test_change_passphrase(qtbot, window, copies, tmp_path, kind):
    path = copies(kind)
    old = "qemu-pass" if kind == "luks" else "vbox-pass"
    want = _plain(path, old)
    window.ops.add_paths([path], sync=True)
    node = window.model.node(path)
    job = window.ops.start_change_passphrase(
        node, ChangePassphraseParams(path, vd.Passphrase("brand-new")))
    _answer(qtbot, window, old)
    wait_job(qtbot, job, timeout=60000)
    assert job.state == JobState.DONE, job.error
    assert _plain(path, "brand-new") == want
    with pytest.raises(vd.WrongPassphrase):
        _plain(path, old)


def test_change_passphrase_of_a_luks2_container(qtbot, window, qemu, tmp_path):
    """LUKS2 (cryptsetup makes it): the action is enabled and the job replaces the keyslot."""
    tool = shutil.which("cryptsetup")
    if tool is None:
        pytest.fail("cryptsetup is not installed: install Debian's cryptsetup-bin "
                    "(bash scripts/bootstrap test does)", pytrace=False)
    path = str(tmp_path / "c2.luks")
    key = tmp_path / "key"
    key.write_bytes(b"old-pass")
    with open(path, "wb") as f:
        f.truncate(20 * MiB)
    subprocess.run([tool, "luksFormat", "-q", "--type", "luks2", "--pbkdf", "pbkdf2",
                    "--pbkdf-force-iterations", "1000", "--key-file", str(key), path],
                   check=True, capture_output=True)
    with vd.PassphraseProvider(["old-pass"]) as pp, vd.using_passphrases(pp), \
            vd.Disk.open_chain(path) as d:
        d.write(MiB, MARK)
    want = _plain(path, "old-pass")
    window.ops.add_paths([path], sync=True)
    window.select_paths([path])
    assert window.model.node(path).record.encryption["format"] == "luks2"
    assert window.actions["passphrase"].isEnabled(), window.actions["passphrase"].toolTip()
    job = window.ops.start_change_passphrase(
        window.model.node(path), ChangePassphraseParams(path, vd.Passphrase("brand-new")))
    _answer(qtbot, window, "old-pass")
    wait_job(qtbot, job, timeout=60000)
    assert job.state == JobState.DONE, job.error
    assert _plain(path, "brand-new") == want
    with pytest.raises(vd.WrongPassphrase):
        _plain(path, "old-pass")
    r = subprocess.run([tool, "luksOpen", "--test-passphrase", "--key-file", "-", path],
                       input=b"brand-new", capture_output=True)
    assert r.returncode == 0, r.stderr
    # legacy QCOW2 AES (qemu-img makes it): read-only, so no change of passphrase
    aes = str(tmp_path / "aes.qcow2")
    qemu.img("create", "--object", "secret,id=s0,data=legacy", "-f", "qcow2", "-o",
             "encrypt.format=aes,encrypt.key-secret=s0", aes, "4M")
    window.ops.add_paths([aes], sync=True)
    window.select_paths([aes])
    assert not window.actions["passphrase"].isEnabled()
    assert "legacy QCOW2 AES" in window.actions["passphrase"].toolTip()


# -- the copy dialog ---------------------------------------------------------------------------
def test_copy_dialog_offers_encryption_and_copies_encrypted(qtbot, window, tmp_path):
    from vdgui.gui.dialogs.copy import CopyDialog
    src = str(tmp_path / "src.vdi")
    with vd.Disk() as d:
        d.create_base(src, 4 * MiB, "VDI")
        d.write(2 * MiB, MARK)
        want = d.read(0, d.size)
    window.ops.add_paths([src], sync=True)
    dlg = CopyDialog(window.model.node(src), window)
    qtbot.addWidget(dlg)
    items = [dlg.encryption.itemData(i) for i in range(dlg.encryption.count())]
    assert items == [None, "vbox-aes-xts256", "vbox-aes-xts128"]
    dlg.set_format("QCOW2")
    assert [dlg.encryption.itemData(i) for i in range(dlg.encryption.count())] == [None, "luks"]
    assert "Encryption" not in [k.name for k in (dlg.config.keys if dlg.config else [])]
    dlg.set_format("RAW")
    assert dlg.encryption.count() == 1                  # none only
    dlg.set_format("VDI")
    assert dlg.passphrase.isHidden()
    dlg.encryption.setCurrentIndex(dlg.encryption.findData("vbox-aes-xts256"))
    assert not dlg.passphrase.isHidden() and not dlg.ok.isEnabled()
    dlg.passphrase.first.setText("copy-pw")
    dlg.passphrase.second.setText("copy-px")
    assert dlg.passphrase.error.isVisibleTo(dlg) and "do not match" in dlg.passphrase.error.text()
    assert not dlg.ok.isEnabled()
    dlg.passphrase.second.setText("copy-pw")
    assert not dlg.passphrase.error.isVisibleTo(dlg) and dlg.ok.isEnabled()
    p = dlg.params()
    assert p.encrypt == "vbox-aes-xts256" and "copy-pw" not in repr(p)
    assert dlg.passphrase.first.text() == ""            # the field does not keep it
    job = window.ops.start_copy(window.model.node(src), p)
    wait_job(qtbot, job, timeout=60000)
    assert job.state == JobState.DONE, job.error
    assert os.path.isfile(vd.sidecar_path(p.dst))
    assert MARK not in _bytes(p.dst)
    assert _plain(p.dst, "copy-pw") == want


# -- the create dialog -------------------------------------------------------------------------
def test_create_dialog_offers_encryption_and_creates_encrypted(qtbot, window, qemu, tmp_path):
    """The Create dialog has the copy dialog's encryption choices and the passphrase typed
    twice; the jobs make a LUKS QCOW2 (qemu-img opens it with the passphrase) and a VDI with a
    VirtualBox key store beside it, both reading zeroes with their passphrase only."""
    from vdgui.gui.dialogs.create import CreateDialog

    def dialog(fmt, name):
        dlg = CreateDialog(str(tmp_path), window, size=4 * MiB)
        qtbot.addWidget(dlg)
        dlg.set_format(fmt)
        dlg.location.set_path(str(tmp_path / name))
        return dlg

    def choices(dlg):
        return [dlg.encryption.itemData(i) for i in range(dlg.encryption.count())]
    dlg = dialog("VDI", "v.vdi")
    assert choices(dlg) == [None, "vbox-aes-xts256", "vbox-aes-xts128"]
    assert dlg.passphrase.isHidden() and dlg.ok.isEnabled() and dlg.params().encrypt is None
    dlg.set_format("RAW")
    assert choices(dlg) == [None]
    dlg.set_format("LUKS")              # always encrypted: starts on LUKS, None is an error
    assert dlg.encryption.currentData() == "luks" and not dlg.passphrase.isHidden()
    dlg.encryption.setCurrentIndex(0)
    assert not dlg.ok.isEnabled() and any("always encrypted" in e
                                          for e in dlg.messages.errors)
    dlg.set_format("QCOW2")
    assert choices(dlg) == [None, "luks"]
    assert "Encryption" not in [k.name for k in (dlg.config.keys if dlg.config else [])]
    dlg.encryption.setCurrentIndex(dlg.encryption.findData("luks"))
    assert not dlg.passphrase.isHidden() and not dlg.ok.isEnabled()
    dlg.passphrase.first.setText("new-pw")
    dlg.passphrase.second.setText("new-px")
    assert dlg.passphrase.error.isVisibleTo(dlg) and not dlg.ok.isEnabled()
    dlg.passphrase.second.setText("new-pw")
    assert dlg.ok.isEnabled()
    dlg.location.set_path(str(tmp_path / "l.qcow2"))
    p = dlg.params()
    assert (p.format, p.encrypt) == ("QCOW2", "luks") and "new-pw" not in repr(p)
    assert dlg.passphrase.first.text() == ""
    job = window.ops.start_create(p)
    wait_job(qtbot, job, timeout=60000)
    assert job.state == JobState.DONE, job.error
    assert _plain(p.location, "new-pw") == bytes(4 * MiB)
    with pytest.raises(vd.WrongPassphrase):
        _plain(p.location, "other")
    zero = tmp_path / "zero.raw"
    zero.write_bytes(bytes(4 * MiB))
    qemu.img("compare", "--object", "secret,id=s0,data=new-pw", "--image-opts",
             f"driver=qcow2,file.filename={p.location},encrypt.key-secret=s0",
             f"driver=raw,file.filename={zero}")
    # a VirtualBox-encrypted VDI: its key store written beside it
    dlg = dialog("VDI", "v.vdi")
    dlg.encryption.setCurrentIndex(dlg.encryption.findData("vbox-aes-xts128"))
    dlg.passphrase.first.setText("vb-pw")
    dlg.passphrase.second.setText("vb-pw")
    p = dlg.params()
    job = window.ops.start_create(p)
    wait_job(qtbot, job, timeout=60000)
    assert job.state == JobState.DONE, job.error
    assert os.path.isfile(vd.sidecar_path(p.location))
    assert _plain(p.location, "vb-pw") == bytes(4 * MiB)
    with pytest.raises(vd.WrongPassphrase):
        _plain(p.location, "other")


# -- VirtualBox registries ---------------------------------------------------------------------
def test_imported_registry_key_store_shows_the_lock_and_asks(qtbot, window, copies, tmp_path):
    path = copies("vbox", name="2019.vdi")
    store = vd.read_keystore_file(vd.sidecar_path(path))["KeyStore"]
    os.unlink(vd.sidecar_path(path))
    vbox = tmp_path / "vm.vbox"
    vbox.write_text(f"""<?xml version="1.0"?>
<VirtualBox xmlns="http://www.virtualbox.org/" version="1.16-linux">
  <Machine uuid="{{528b3540-b8be-4677-b43f-7f4969137747}}" name="VM">
    <MediaRegistry><HardDisks>
      <HardDisk uuid="{{12b147da-5b2d-471f-9e32-a32b1517ff4b}}" location="2019.vdi" format="VDI">
        <Property name="CRYPT/KeyId" value="VM"/>
        <Property name="CRYPT/KeyStore" value="{store.replace(chr(10), '&#13;&#10;')}"/>
      </HardDisk>
    </HardDisks></MediaRegistry>
  </Machine>
</VirtualBox>
""")
    window.show()
    window.ops.add_paths([str(vbox)], sync=True)
    node = window.model.node(path)
    assert node.record.encryption["key_store"] == "library"
    window.select_paths([path])
    window.side.setCurrentWidget(window.contents)
    _answer(qtbot, window, "vbox-pass")
    qtbot.waitUntil(lambda: "/hello.txt" in _listed(window.contents), timeout=20000)


# -- remembering, and secrets staying out of text ---------------------------------------------
class _FakeKeyring:
    def __init__(self):
        self.store = {}

    def get_password(self, service, name):
        return self.store.get((service, name))

    def set_password(self, service, name, value):
        self.store[(service, name)] = value

    def delete_password(self, service, name):
        self.store.pop((service, name), None)


def test_remembering_is_opt_in_through_the_keyring(qtbot, window, copies, tmp_path):
    path = copies("luks")
    if window.passphrases.keyring is None:
        pane = _open_contents(qtbot, window, path)
        qtbot.waitUntil(lambda: bool(window.passphrases.dialogs), timeout=20000)
        assert not window.passphrases.dialogs[0].remember.isVisibleTo(
            window.passphrases.dialogs[0])          # no keyring: not offered
        window.passphrases.dialogs[0].reject()
        qtbot.waitUntil(lambda: not window.passphrases.dialogs)
    ring = _FakeKeyring()
    window.passphrases.keyring = ring
    pane = _open_contents(qtbot, window, path)
    pane.reload()
    qtbot.waitUntil(lambda: bool(window.passphrases.dialogs), timeout=20000)
    dlg = window.passphrases.dialogs[0]
    assert dlg.remember.isVisibleTo(dlg) and not dlg.remember.isChecked()
    dlg.edit.setText("qemu-pass")
    dlg.remember.setChecked(True)
    dlg.accept()
    qtbot.waitUntil(lambda: "/hello.txt" in _listed(pane), timeout=20000)
    assert ring.store == {("vdgui", path): "qemu-pass"}
    assert "qemu-pass" not in _bytes(window.library.path).decode("latin-1")
    # a new session: no prompt, the keyring's passphrase opens it
    window.passphrases._session.clear()
    pane.reload()
    qtbot.waitUntil(lambda: "/hello.txt" in _listed(pane) and pane.model.rowCount(),
                    timeout=20000)
    qtbot.wait(300)
    assert not window.passphrases.dialogs


def test_no_passphrase_in_logs_status_or_job_text(qtbot, window, copies, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    said: list[str] = []
    window.statusBar().messageChanged.connect(said.append)
    path = copies("vbox")
    window.ops.add_paths([path], sync=True)
    node = window.model.node(path)
    into = str(tmp_path / "enc2.vdi")
    job = window.ops.start_crypt(node, EncryptParams(path, None, into, "VDI"))
    _answer(qtbot, window, "Wrong-2")
    _answer(qtbot, window, "vbox-pass", expect_error="Wrong passphrase")
    wait_job(qtbot, job, timeout=60000)
    assert job.state == JobState.DONE, job.error
    job2 = window.ops.start_change_passphrase(window.model.node(path), ChangePassphraseParams(
        path, vd.Passphrase("Newer-3")))
    wait_job(qtbot, job2, timeout=60000)
    assert job2.state == JobState.DONE, job2.error
    texts = said + [r.getMessage() for r in caplog.records] + [
        f"{j.title} {j.error} {j.result}" for j in window.queue.jobs]
    texts += [window.details.info[k].text() for k in window.details.info]
    blob = "\n".join(map(str, texts))
    assert said                                      # something was said
    for secret in ("vbox-pass", "Wrong-2", "Newer-3"):
        assert secret not in blob
        assert secret.encode() not in _bytes(window.library.path)


def test_switching_images_leaves_no_stray_properties_form(qtbot, window, tmp_path):
    """The details pane's properties form of the image shown before (QCOW2: only expert keys)
    was reparented to nothing while visible: a window of its own at (0, 0) until deleted (in
    the screenshot scripts, which run no event loop, it stayed)."""
    from PySide6.QtWidgets import QApplication
    a, b = str(tmp_path / "a.qcow2"), str(tmp_path / "b.vdi")
    for p, fmt in ((a, "QCOW2"), (b, "VDI")):
        with vd.Disk() as d:
            d.create_base(p, MiB, fmt)
    window.show()
    window.ops.add_paths([a, b], sync=True)
    window.select_paths([a])
    qtbot.waitUntil(lambda: window.details.props_form is not None)
    window.select_paths([b])
    for _ in range(20):        # events, but no return to the event loop: nothing deleted yet
        QApplication.processEvents()
    assert [w for w in QApplication.topLevelWidgets() if w.isVisible()] == [window]


def test_encrypt_and_decrypt_dialogs_and_menus(qtbot, window, copies, tmp_path):
    from PySide6.QtWidgets import QMenu

    from vdgui.gui import menus
    from vdgui.gui.dialogs.passphrase import ChangePassphraseDialog, EncryptDialog
    plain = str(tmp_path / "plain.vdi")
    with vd.Disk() as d:
        d.create_base(plain, 4 * MiB, "VDI")
    vbox = copies("vbox")
    window.ops.add_paths([plain, vbox], sync=True)
    image_menu = [a.objectName() for a in window.menus["image"].actions()]
    for key in ("encrypt", "decrypt", "passphrase"):
        assert f"action_{key}" in image_menu
    window.show()
    window.select_paths([vbox])
    rect = window.tree.visualRect(window.tree.currentIndex())
    m = menus.context_menu(window, rect.center())
    assert {"action_encrypt", "action_decrypt", "action_passphrase"} <= {
        a.objectName() for a in m.actions()}
    assert isinstance(m, QMenu) and not window.actions["encrypt"].isEnabled()
    assert "is encrypted already" in window.actions["encrypt"].toolTip()
    m.close()
    # Encrypt…: in place by default; the VDI's encryptions; a mismatch blocks OK
    dlg = EncryptDialog(window.model.node(plain), window)
    qtbot.addWidget(dlg)
    assert dlg.replace.isChecked()
    assert [dlg.encryption.itemData(i) for i in range(dlg.encryption.count())] == [
        "vbox-aes-xts256", "vbox-aes-xts128"]
    dlg.fields.first.setText("a")
    dlg.fields.second.setText("b")
    assert not dlg.ok.isEnabled() and "do not match" in " ".join(dlg.messages.errors)
    dlg.fields.second.setText("a")
    assert dlg.ok.isEnabled()
    p = dlg.params()
    assert (p.encrypt, p.into, p.passphrase.reveal()) == ("vbox-aes-xts256", None, b"a")
    # into a new QCOW2: LUKS is its encryption
    dlg.into.setChecked(True)
    dlg.format.setCurrentIndex(dlg.format.findData("QCOW2"))
    assert [dlg.encryption.itemData(i) for i in range(dlg.encryption.count())] == ["luks"]
    assert dlg.location.path().endswith(".qcow2")
    # Decrypt… of a raw LUKS container: never in place, a format that is not always encrypted
    raw_luks = str(tmp_path / "c.luks")
    with vd.PassphraseProvider(new="pw") as pp, vd.using_passphrases(pp), vd.Disk() as d:
        d.create_base(raw_luks, MiB, "LUKS", config={"IterTime": "10"})
    window.ops.add_paths([raw_luks], sync=True)
    dec = EncryptDialog(window.model.node(raw_luks), window, decrypt=True)
    qtbot.addWidget(dec)
    assert not dec.replace.isEnabled() and dec.into.isChecked()
    assert not vd.get_backend(dec.format.currentData()).needs_passphrase and dec.ok.isEnabled()
    ch = ChangePassphraseDialog(window.model.node(vbox), window)
    qtbot.addWidget(ch)
    assert not ch.ok.isEnabled()
    ch.fields.first.setText("n")
    ch.fields.second.setText("n")
    assert ch.ok.isEnabled() and ch.params().passphrase.reveal() == b"n"
