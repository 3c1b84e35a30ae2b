"""Issue #19 parts 3 and 4 in the app: File → Create Floppy Image… / Create Optical Disc
Image…: the dialog's choices become a job with progress (its bar in the jobs panel), the new
image is added to the list and selected; refusals keep OK disabled; a failure offers the
dialog again."""
from __future__ import annotations

import itertools

import pytest

from tests.gui.conftest import wait_job
from tests.inside.conftest import sh
from vdgui.gui.dialogs.media import FloppyDialog, IsoDialog
from vdgui.jobs import JobState
from vdgui.vd import Disk, OpenFlags, open_volume

pytestmark = pytest.mark.gui


def tree(root):
    (root / "docs").mkdir(parents=True)
    (root / "docs" / "Read Me First.txt").write_bytes(b"first\n")
    (root / "data.bin").write_bytes(bytes(range(256)) * 64)
    return root


def watch(job):
    seen = []
    job.signals.progress.connect(lambda j, d, t: seen.append((d, t)))
    return seen


def files_in(path) -> dict:
    with Disk.open_chain(str(path), flags=OpenFlags.READ_ONLY) as d:
        _, fs = open_volume(d, None)
        out = {}
        for e in fs.walk("/"):
            if e.type == "file":
                with fs.open(e.path) as f:
                    out[e.path] = f.read()
        return out


def test_file_menu_has_both_entries(window, monkeypatch):
    texts = [a.text() for a in window.menus["file"].actions()]
    assert "Create F&loppy Image…" in texts and "Create &Optical Disc Image…" in texts
    opened = []
    monkeypatch.setattr(FloppyDialog, "exec", lambda self: opened.append("floppy") or 0)
    monkeypatch.setattr(IsoDialog, "exec", lambda self: opened.append("iso") or 0)
    window.action_floppy.trigger()
    window.action_iso.trigger()
    assert opened == ["floppy", "iso"]


def test_create_on_the_floppy_tab_opens_the_floppy_dialog(window, monkeypatch):
    from vdgui.gui.dialogs.create import CreateDialog
    from vdgui.gui.main_window import DEVICE_TABS

    opened = []
    monkeypatch.setattr(FloppyDialog, "exec", lambda self: opened.append("floppy") or 0)
    monkeypatch.setattr(CreateDialog, "exec",
                        lambda self: opened.append(f"create {self.device}") or 0)
    tab = {t[2]: i for i, t in enumerate(DEVICE_TABS)}
    window.tabs.setCurrentIndex(tab["floppy"])
    window.actions["create"].trigger()
    window.tabs.setCurrentIndex(tab["hdd"])
    window.actions["create"].trigger()
    assert opened == ["floppy", "create hdd"]


def test_create_floppy_from_dialog(qtbot, window, tmp_path):
    src = tree(tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    dlg = FloppyDialog(str(out), window)
    qtbot.addWidget(dlg)
    assert dlg.location.path() == str(out / "NewFloppy.img")
    assert dlg.size.currentData() == "1.44M"
    dlg.set_size("720K")
    dlg.label.setText("Tools")
    dlg.sources.add_contents(str(src))
    assert dlg.sources.paths() == [str(src / "data.bin"), str(src / "docs")]
    assert dlg.ok.isEnabled(), dlg.messages.errors
    job = window.ops.start_create_floppy(dlg.params())
    seen = watch(job)
    wait_job(qtbot, job)
    assert job.state == JobState.DONE, job.error
    path = out / "NewFloppy.img"
    assert path.stat().st_size == 720 * 1024
    sh("fsck.fat", "-n", path)
    assert files_in(path) == {"/data.bin": bytes(range(256)) * 64,
                              "/docs/Read Me First.txt": b"first\n"}
    assert seen and seen[-1][0] == seen[-1][1] > 0
    assert all(a[0] <= b[0] for a, b in itertools.pairwise(seen))
    qtbot.waitUntil(lambda: window.model.node(str(path)) is not None, timeout=5000)
    node = window.model.node(str(path))
    assert node.accessible and node.record.format == "RAW"
    qtbot.waitUntil(lambda: [n.path for n in window.selected_nodes()] == [str(path)],
                    timeout=5000)
    row = window.jobs_panel.row_for(job)
    assert row is not None and row.bar.value() == 1000


def test_floppy_dialog_refusals(qtbot, window, tmp_path):
    dlg = FloppyDialog(str(tmp_path), window)
    qtbot.addWidget(dlg)
    dlg.label.setText("a*b")
    assert not dlg.ok.isEnabled() and any("label" in e for e in dlg.messages.errors)
    dlg.label.setText("ok")
    big = tmp_path / "big.bin"
    big.write_bytes(bytes(800 << 10))
    dlg.set_size("720K")
    dlg.sources.add([str(big)])
    assert not dlg.ok.isEnabled() and any("720K floppy holds" in e for e in dlg.messages.errors)
    dlg.set_size("1.44M")
    assert dlg.ok.isEnabled(), dlg.messages.errors
    (tmp_path / "taken.img").write_bytes(b"")
    dlg.location.set_path(str(tmp_path / "taken.img"))
    assert not dlg.ok.isEnabled() and any("already exists" in e for e in dlg.messages.errors)


def test_create_iso_from_dialog_with_progress(qtbot, window, tmp_path):
    src = tree(tmp_path / "src")
    extra = tmp_path / "notes.txt"
    extra.write_bytes(b"notes\n")
    dlg = IsoDialog(str(tmp_path), window)
    qtbot.addWidget(dlg)
    assert dlg.location.path() == str(tmp_path / "NewDisc.iso")
    dlg.label.setText("Backup 1")
    dlg.sources.add([str(src / "docs"), str(extra)])
    dlg.sources.list.item(0).setSelected(True)
    dlg.sources.remove_button.click()
    dlg.sources.add([str(src)])
    assert dlg.sources.paths() == [str(extra), str(src)]
    assert dlg.ok.isEnabled(), dlg.messages.errors
    job = window.ops.start_create_iso(dlg.params())
    seen = watch(job)
    wait_job(qtbot, job)
    assert job.state == JobState.DONE, job.error
    path = tmp_path / "NewDisc.iso"
    assert "Volume id: BACKUP_1" in sh("isoinfo", "-d", "-i", path)
    assert files_in(path) == {"/notes.txt": b"notes\n", "/src/data.bin": bytes(range(256)) * 64,
                              "/src/docs/Read Me First.txt": b"first\n"}
    assert seen[-1][0] == seen[-1][1] == path.stat().st_size
    qtbot.waitUntil(lambda: window.model.node(str(path)) is not None, timeout=5000)
    assert window.model.node(str(path)).record.format == "RAW"


def test_failed_iso_offers_the_dialog_again(qtbot, window, tmp_path, monkeypatch):
    gone = tmp_path / "gone.txt"
    gone.write_bytes(b"x")
    dlg = IsoDialog(str(tmp_path), window)
    qtbot.addWidget(dlg)
    dlg.sources.add([str(gone)])
    p = dlg.params()
    gone.unlink()                                   # vanishes before the job runs
    job = wait_job(qtbot, window.ops.start_create_iso(p))
    assert job.state == JobState.FAILED and "no such file" in job.error
    assert not (tmp_path / "NewDisc.iso").exists()
    box = next(m for m in window.messages if m.objectName() == "retryBox")
    reopened = []
    monkeypatch.setattr(IsoDialog, "exec", lambda self: reopened.append(self.params()) or 0)
    box.findChild(type(box.buttons()[0]), "retryButton").click()
    qtbot.waitUntil(lambda: bool(reopened), timeout=3000)
    assert reopened[0] == p


def test_cancel_from_the_jobs_panel_leaves_nothing(qtbot, window, tmp_path):
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:
        f.truncate(2 << 30)                      # sparse: seconds to copy, cancelled at once
    out = tmp_path / "out"
    out.mkdir()
    dlg = IsoDialog(str(out), window)
    qtbot.addWidget(dlg)
    dlg.sources.add([str(big)])
    job = window.ops.start_create_iso(dlg.params())
    qtbot.waitUntil(lambda: job.fraction > 0, timeout=10000)
    window.jobs_panel.row_for(job).cancel_button.click()
    wait_job(qtbot, job)
    assert job.state == JobState.CANCELLED
    assert list(out.iterdir()) == []            # neither the image nor its temporary
