"""Issue #12's trust items in the app: the details pane never resizes behind the user's back,
chain copies name the copy of the selected image as typed, repair asks first and keeps data,
duplicate UUIDs are marked and can be fixed."""
from __future__ import annotations

import os

import pytest

from tests.gui.conftest import MiB, wait_job
from vdgui.gui.dialogs.copy import CopyDialog
from vdgui.gui.dialogs.params import RepairParams
from vdgui.jobs import JobState
from vdgui.vd import Disk, OpenFlags, resize

pytestmark = pytest.mark.gui


def ok(qtbot, job, timeout=30000):
    wait_job(qtbot, job, timeout)
    assert job.state == JobState.DONE, job.error
    return job


# -- item 5: copy as a chain -------------------------------------------------------------------
def test_copy_as_chain_names_the_selected_image_and_keeps_sizes(qtbot, window, vdi_chain, tmp_path):
    resize(vdi_chain["snap2"], 12 * MiB)          # the top is larger than the images below it
    window.add_paths([vdi_chain["snap2"]], sync=True)
    node = window.model.node(vdi_chain["snap2"])
    dlg = CopyDialog(node, window)
    qtbot.addWidget(dlg)
    dlg.set_format("QCOW2")
    out = tmp_path / "out"
    out.mkdir()
    dst = str(out / "snap2_copy.qcow2")
    dlg.location.set_path(dst)
    dlg.as_chain.setChecked(True)
    assert dlg.ok.isEnabled(), dlg.messages.errors
    # every file name is shown before the copy starts; the typed name is snap2's copy
    names = [(os.path.basename(p), n.name) for p, n in dlg.targets()]
    assert names == [("snap2_copy-base.qcow2", "base.vdi"), ("snap2_copy-snap1.qcow2", "snap1.vdi"),
                     ("snap2_copy.qcow2", "snap2.vdi")]
    text = dlg.preview.text()
    for f, src in names:
        assert f in text and f"copy of {src}" in text
    # the size shown is the virtual size, said so (a dynamic copy writes only the data)
    assert text.count(" virtual</td>") == 3 and "12.00 MiB virtual" in text
    # a name below the top that is taken is refused before starting
    (out / "snap2_copy-snap1.qcow2").write_bytes(b"")
    dlg.validate()
    assert not dlg.ok.isEnabled() and any(
        "snap2_copy-snap1.qcow2" in e for e in dlg.messages.errors
    )
    os.unlink(out / "snap2_copy-snap1.qcow2")
    dlg.validate()
    job = ok(qtbot, window.start_copy(node, dlg.params()))
    assert job.result[-1] == dst
    with (
        Disk.open_chain(dst, flags=OpenFlags.READ_ONLY) as t,
        Disk.open_chain(vdi_chain["snap2"], flags=OpenFlags.READ_ONLY) as s,
    ):
        assert [os.path.basename(i.location) for i in t.images] == [n for n, _ in names]
        assert [i.size for i in t.images] == [8 * MiB, 8 * MiB, 12 * MiB]
        for lv in range(3):
            assert t.read(0, t.image(lv).size, top=lv) == s.read(0, s.image(lv).size, top=lv)
    qtbot.waitUntil(lambda: [n.path for n in window.selected_nodes()] == [dst], timeout=5000)


# -- item 4: the details pane ------------------------------------------------------------------
def _vdi(tmp_path, name="disk.vdi", size=8 * MiB):
    p = str(tmp_path / name)
    with Disk() as d:
        d.create_base(p, size, "VDI")
        d.write(0, b"\x5a" * MiB)
    return p


def test_details_pane_follows_a_resize_and_apply_never_shrinks_silently(qtbot, window, tmp_path):
    p = _vdi(tmp_path)
    window.show()  # the allocation picture is read only while shown
    window.add_paths([p], sync=True)
    window.select_paths([p])
    d = window.details
    qtbot.waitUntil(lambda: d.allocation.size == 8 * MiB, timeout=5000)
    asked, started = [], []
    window.queue.jobAdded.connect(lambda j: started.append(j))
    # grow with a job (as the Resize dialog does): every view follows
    ok(qtbot, window.start_resize(window.model.node(p), 12 * MiB))
    qtbot.waitUntil(lambda: window.model.node(p).record.virtual_size == 12 * MiB, timeout=5000)
    qtbot.waitUntil(lambda: d.size.value() == 12 * MiB, timeout=5000)
    assert d.changes() == {} and not d.apply_button.isEnabled() and not d.reset_button.isEnabled()
    qtbot.waitUntil(lambda: d.allocation.size == 12 * MiB, timeout=5000)
    wait_job(qtbot, window.refresh())
    qtbot.wait(50)
    assert d.size.value() == 12 * MiB
    assert d.changes() == {} and not d.apply_button.isEnabled() and not d.reset_button.isEnabled()

    # a shrink typed into the pane asks first, naming what is cut; declining changes nothing
    def decline(title, text, ok_text, checkbox):
        asked.append(text)
        return (False, False)

    window.confirm = decline
    started.clear()
    d.size.setValue(8 * MiB)
    assert d.apply_button.isEnabled()
    d.apply_button.click()
    assert len(asked) == 1
    text = asked[0]
    assert "cuts off" in text and "4.00 MiB" in text and f"{4 * MiB:,}" in text
    assert "No data lies there" in text
    assert not [j for j in started if j.kind == "resize"]
    with Disk.open_chain(p, flags=OpenFlags.READ_ONLY) as disk:
        assert disk.size == 12 * MiB
    assert d.size.value() == 12 * MiB and not d.apply_button.isEnabled()

    # below the data: the pane says why as it is typed (the Resize dialog's rules), and Apply
    # from anywhere is refused with the reason, no question, no job
    asked.clear()
    d.size.setValue(MiB // 2)
    assert not d.apply_button.isEnabled() and "holds data up to" in d.edit_hint.text()
    assert window.apply_details(d.node, {"size": MiB // 2}) == []
    assert not asked and not [j for j in started if j.kind == "resize"]
    assert any("holds data up to" in m.text() for m in window.messages)
    d.reset()

    # accepted: the shrink runs
    window.confirm = lambda *a: (asked.append(a[1]), (True, False))[1]
    d.size.setValue(8 * MiB)
    d.apply_button.click()
    assert len(asked) == 1
    (job,) = [j for j in started if j.kind == "resize"]
    ok(qtbot, job)
    with Disk.open_chain(p, flags=OpenFlags.READ_ONLY) as disk:
        assert disk.size == 8 * MiB and disk.read(0, MiB) == b"\x5a" * MiB
    qtbot.waitUntil(
        lambda: d.size.value() == 8 * MiB and not d.reset_button.isEnabled(), timeout=5000
    )


def test_resize_dialog_shrink_asks_too(qtbot, window, tmp_path, monkeypatch):
    from PySide6.QtWidgets import QDialog

    from vdgui.gui.dialogs import resize as rdlg

    p = _vdi(tmp_path)
    window.add_paths([p], sync=True)
    window.select_paths([p])
    asked = []
    window.confirm = lambda *a: (asked.append(a[1]), (False, False))[1]
    monkeypatch.setattr(rdlg.ResizeDialog, "exec", lambda self: QDialog.Accepted)
    monkeypatch.setattr(rdlg.ResizeDialog, "new_size", lambda self: 4 * MiB)
    assert window.resize_dialog() is None
    assert asked and "cuts off" in asked[0]


# -- item 9: duplicate UUIDs -------------------------------------------------------------------
def _twin(vdi_chain, tmp_path):
    """A byte copy of base.vdi (which has children) in another folder."""
    import shutil

    other = tmp_path / "copied"
    other.mkdir()
    twin = str(other / "base.vdi")
    shutil.copyfile(vdi_chain["base"], twin)
    return twin


def test_library_marks_duplicate_uuids(library, vdi_chain, tmp_path):
    from vdgui.vd import mark_duplicates

    twin = _twin(vdi_chain, tmp_path)
    recs = library.add_with_parents(vdi_chain["snap2"]) + library.add_with_parents(twin)
    by = {r.path: r for r in recs}
    assert by[twin].duplicates == [vdi_chain["base"]]  # the library knew the original
    assert mark_duplicates(recs, library) == [vdi_chain["base"]]  # the original learns it
    assert by[vdi_chain["base"]].duplicates == [twin]
    assert by[vdi_chain["snap1"]].duplicates == [] and by[vdi_chain["snap2"]].duplicates == []
    full = {r.path: r for r in library.scan_all()}
    assert full[vdi_chain["base"]].duplicates == [twin] and full[twin].duplicates == [
        vdi_chain["base"]
    ]
    # one file under two names is not a duplicate of itself
    link = str(tmp_path / "link.vdi")
    os.symlink(vdi_chain["branch"], link)
    a, b = library.scan(vdi_chain["branch"]), library.scan(link)
    mark_duplicates([a, b])
    assert a.duplicates == [] and b.duplicates == []


def test_give_new_uuid_relinks_children_and_refuses_a_stranger(library, vdi_chain, tmp_path):
    from vdgui.vd import ParentMismatch, give_new_uuid

    twin = _twin(vdi_chain, tmp_path)
    with Disk.open_chain(vdi_chain["snap2"], flags=OpenFlags.READ_ONLY) as d:
        content = d.read(0, d.size)
        old = d.image(0).uuid
    # the twin does not own snap1: refused before anything is written
    with open(twin, "rb") as f:
        before = f.read()
    with pytest.raises(ParentMismatch):
        give_new_uuid(twin, children=[vdi_chain["snap1"]])
    with open(twin, "rb") as f:
        assert f.read() == before
    new = give_new_uuid(vdi_chain["base"], children=[vdi_chain["snap1"], vdi_chain["branch"]])
    assert new != old
    with Disk.open_chain(vdi_chain["snap2"], flags=OpenFlags.READ_ONLY) as d:
        assert d.image(0).uuid == new and d.image(1).parent_uuid == new
        assert d.image(0).location == vdi_chain["base"]
        assert d.read(0, d.size) == content
    with Disk.open_chain(vdi_chain["branch"], flags=OpenFlags.READ_ONLY) as d:
        assert d.image(1).parent_uuid == new and d.image(0).location == vdi_chain["base"]
    with Disk.open_chain(twin, flags=OpenFlags.READ_ONLY) as d:
        assert d.image(0).uuid == old


def test_duplicate_shown_in_tree_and_fixed_from_details(qtbot, window, vdi_chain, tmp_path):
    from PySide6.QtCore import Qt

    from vdgui.gui.models.media import COL_STATE

    twin = _twin(vdi_chain, tmp_path)
    window.add_paths([vdi_chain["snap2"], vdi_chain["branch"]], sync=True)
    base = window.model.node(vdi_chain["base"])
    assert base.state_text() == "Available"
    window.add_paths([twin], sync=True)  # the copy marks the original too
    base, copy = window.model.node(vdi_chain["base"]), window.model.node(twin)
    assert base.state_text() == copy.state_text() == "Duplicate UUID"
    idx = window.model.index_for(copy, COL_STATE)
    tip = window.model.data(idx, Qt.ToolTipRole)
    assert "Duplicate UUID" in tip and vdi_chain["base"] in tip and "Give a new UUID" in tip
    assert window.model.node(vdi_chain["snap1"]).state_text() == "Differencing"
    window.select_paths([vdi_chain["base"]])
    d = window.details
    assert not d.dup_box.isHidden() and d.new_uuid_button.isEnabled()
    asked = []
    window.confirm = lambda *a: (asked.append(a[1]), (True, False))[1]
    started = []
    window.queue.jobAdded.connect(started.append)
    d.new_uuid_button.click()
    assert asked and "snap1.vdi" in asked[0] and "branch.vdi" in asked[0]
    (job,) = [j for j in started if j.kind == "new_uuid"]
    ok(qtbot, job)
    qtbot.waitUntil(lambda: window.model.node(twin).state_text() == "Available", timeout=5000)
    assert window.model.node(vdi_chain["base"]).record.uuid == job.result
    assert window.model.node(vdi_chain["base"]).state_text() == "Available"
    for p in ("snap1", "snap2", "branch"):
        n = window.model.node(vdi_chain[p])
        assert n.accessible and n.state_text() == "Differencing", n.record.error
    with Disk.open_chain(vdi_chain["snap2"], flags=OpenFlags.READ_ONLY) as disk:
        assert str(disk.image(1).parent_uuid) == job.result
    window.select_paths([vdi_chain["base"]])
    assert d.dup_box.isHidden()


# -- item 6: repair asks first and keeps data --------------------------------------------------
def _vdi_lost_entry(tmp_path):
    from tests.engine.test_repair_keeps import _lose_vdi_entry, _make

    p = _make(tmp_path, "VDI")
    _lose_vdi_entry(p, 1)
    return p


def test_repair_shows_findings_first_and_keeps_a_backup_and_the_data(qtbot, window, tmp_path):
    p = _vdi_lost_entry(tmp_path)
    with open(p, "rb") as f:
        before = f.read()
    window.add_paths([p], sync=True)
    window.select_paths([p])
    asked = []
    window.repair_confirm = lambda node, report: (asked.append(report), None)[1]
    started = []
    window.queue.jobAdded.connect(started.append)
    (dry,) = window.check_selected(repair=True)
    ok(qtbot, dry)
    qtbot.wait(20)
    assert len(asked) == 1 and asked[0].problems and asked[0].orphans
    assert not [j for j in started if j.kind == "repair"], "declined: no repair"
    with open(p, "rb") as f:
        assert f.read() == before, "nothing changes before the user confirms"
    # the dialog the user sees: findings, effects, where the data goes, backup on by default
    from vdgui.gui.dialogs.repair import RepairDialog

    dlg = RepairDialog(window.model.node(p), asked[0], window)
    qtbot.addWidget(dlg)
    assert "not referenced" in dlg.findings.text()
    assert "hold data" in dlg.effects.text() and "saved first" in dlg.effects.text()
    assert "disk.vdi.orphans-DATE.bin" in dlg.kept.text() and not dlg.kept.isHidden()
    assert dlg.backup.isChecked() and dlg.keep_backup()
    assert dlg.params() == RepairParams(backup=True)
    assert not dlg.ok.isDefault()
    # confirmed with a backup
    window.repair_confirm = lambda node, report: RepairParams(backup=True)
    window.select_paths([p])
    (dry,) = window.check_selected(repair=True)
    ok(qtbot, dry)
    qtbot.waitUntil(lambda: any(j.kind == "repair" for j in started), timeout=3000)
    (job,) = [j for j in started if j.kind == "repair"]
    ok(qtbot, job)
    rep = job.result
    assert rep.repaired and rep.backup and rep.orphans_file
    with open(os.path.join(rep.backup, "disk.vdi"), "rb") as f:
        assert f.read() == before
    with open(rep.orphans_file, "rb") as f:
        assert b"\x22" * MiB in f.read()
    qtbot.waitUntil(
        lambda: any(m.windowTitle() == "Repair result" for m in window.messages), timeout=3000
    )
    box = [m for m in window.messages if m.windowTitle() == "Repair result"][-1]
    assert rep.orphans_file in box.text() and rep.backup in box.text()


def test_details_pane_applies_the_resize_dialogs_rules(qtbot, window, tmp_path):
    """A VMDK cannot shrink in place: the pane says so as the size is typed, like the dialog."""
    p = str(tmp_path / "solo.vmdk")
    with Disk() as disk:
        disk.create_base(p, 8 * MiB, "VMDK")
    window.add_paths([p], sync=True)
    window.select_paths([p])
    d = window.details
    d.size.setValue(4 * MiB)
    assert not d.apply_button.isEnabled() and "cannot be shrunk" in d.edit_hint.text()
    d.size.setValue(16 * MiB)
    assert d.apply_button.isEnabled() and not d.edit_hint.text()
