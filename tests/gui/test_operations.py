"""Create, copy, merge, resize, compact, check run from their dialogs through the thread pool;
progress is observed (monotonic, ends at 100 %) and the result verified on disk."""
from __future__ import annotations

import itertools
import os
import threading
import time

import pytest
from PySide6.QtCore import Qt

from tests.conftest import read_all
from tests.gui.conftest import MiB, wait_job
from vdgui.gui.dialogs.copy import CopyDialog
from vdgui.gui.dialogs.create import CreateDialog, CreateDiffDialog
from vdgui.gui.dialogs.merge import MergeDialog
from vdgui.gui.dialogs.resize import ResizeDialog
from vdgui.jobs import Job, JobState
from vdgui.vd import CheckReport, Disk, ImageFlags, OpenFlags

pytestmark = pytest.mark.gui


class Recorder:
    """Hooks every job the window submits and records its progress signals."""

    def __init__(self, window):
        self.progress: dict[int, list] = {}
        window.queue.jobAdded.connect(self._added)

    def _added(self, job):
        seen = self.progress.setdefault(job.id, [])
        job.signals.progress.connect(lambda j, d, t: seen.append((d, t)))

    def check(self, job):
        seen = self.progress[job.id]
        assert seen, "no progress signal"
        assert seen[0][0] == 0, seen[:3]
        assert seen[-1][0] == seen[-1][1] > 0, seen[-3:]
        assert all(a[0] <= b[0] for a, b in itertools.pairwise(seen)), "progress went backwards"
        return seen


def chain_content(path):
    with Disk.open_chain(path, flags=OpenFlags.READ_ONLY) as d:
        return read_all(d)


def ok(qtbot, job, timeout=30000):
    wait_job(qtbot, job, timeout)
    assert job.state == JobState.DONE, job.error
    return job


def test_create_fixed_vdi_from_dialog(qtbot, window, tmp_path):
    rec = Recorder(window)
    dlg = CreateDialog(str(tmp_path), window, size=32 * MiB)
    qtbot.addWidget(dlg)
    dlg.set_format("VDI")
    assert dlg.location.path() == str(tmp_path / "NewVirtualDisk.vdi")
    dlg.variant.boxes[ImageFlags.FIXED].setChecked(True)
    dlg.comment.setText("made by the test")
    assert dlg.ok.isEnabled(), dlg.messages.errors
    job = ok(qtbot, window.start_create(dlg.params()))
    rec.check(job)
    path = str(tmp_path / "NewVirtualDisk.vdi")
    with Disk.open_chain(path, flags=OpenFlags.READ_ONLY) as d:
        assert d.size == 32 * MiB
        assert d.top.flags & ImageFlags.FIXED
        assert d.top.comment == "made by the test"
    qtbot.waitUntil(lambda: window.model.node(path) is not None, timeout=5000)
    qtbot.waitUntil(lambda: [n.path for n in window.selected_nodes()] == [path], timeout=5000)


def test_create_dialog_uses_config_keys_and_warns(qtbot, window, tmp_path):
    dlg = CreateDialog(str(tmp_path), window, size=16 * MiB)
    qtbot.addWidget(dlg)
    dlg.set_format("VDI")
    assert dlg.config is not None and "AllocationBlockSize" in dlg.config.fields
    dlg.config.editor("AllocationBlockSize").setText("3000")
    assert not dlg.ok.isEnabled()
    assert any("power of two" in e for e in dlg.messages.errors)
    dlg.config.editor("AllocationBlockSize").setText("2097152")
    assert dlg.ok.isEnabled()
    # existing file refused
    open(tmp_path / "taken.vdi", "wb").close()
    dlg.location.set_path(str(tmp_path / "taken.vdi"))
    assert not dlg.ok.isEnabled() and any("already exists" in e for e in dlg.messages.errors)
    dlg.location.set_path(str(tmp_path / "fresh.vdi"))
    assert dlg.ok.isEnabled()
    job = ok(qtbot, window.start_create(dlg.params()))
    assert job.result == [str(tmp_path / "fresh.vdi")]
    with Disk.open_chain(str(tmp_path / "fresh.vdi"), flags=OpenFlags.READ_ONLY) as d:
        assert d.top.block_size == 2 * MiB


def test_fat_size_limit_warning():
    from vdgui.gui.dialogs.common import room_problem, size_warnings
    w = size_warnings("/media/stick/big.vdi", 8 << 30, preallocate=False, fs_type="vfat")
    assert w and "FAT" in w[0]
    assert not size_warnings("/media/stick/big.vdi", 8 << 30, preallocate=False, fs_type="ext4")
    # a pre-allocated image that cannot fit is an error the dialog shows before it closes
    e = room_problem("/x/big.vdi", 8 << 30, preallocate=True, free=1 << 30)
    assert e and "1.00 GiB are free in /x" in e
    assert room_problem("/x/big.vdi", 8 << 30, preallocate=False, free=1 << 30) is None


def test_create_differencing_image(qtbot, window, vdi_chain):
    window.add_paths([vdi_chain["snap2"]], sync=True)
    node = window.model.node(vdi_chain["snap2"])
    dlg = CreateDiffDialog(node, window)
    qtbot.addWidget(dlg)
    assert dlg.ok.isEnabled()
    p = dlg.params()
    assert p.location.endswith("snap2-snapshot.vdi")
    window.select_paths([node.path])
    from vdgui.jobs import tasks
    job = ok(qtbot, window.start_job(tasks.create_diff_job(p.parent, p.location, p.format,
                                                           library=window.library),
                                     lambda res: window.ops.rescan(res)))
    qtbot.waitUntil(lambda: window.model.node(p.location) is not None, timeout=5000)
    assert window.model.node(p.location).parent is window.model.node(vdi_chain["snap2"])
    assert chain_content(p.location) == chain_content(vdi_chain["snap2"])
    assert job.finished


def test_copy_flattens_chain(qtbot, window, vdi_chain):
    rec = Recorder(window)
    window.add_paths([vdi_chain["snap2"]], sync=True)
    node = window.model.node(vdi_chain["snap2"])
    dlg = CopyDialog(node, window)
    qtbot.addWidget(dlg)
    dlg.set_format("VDI")
    assert dlg.location.path().endswith("snap2_copy.vdi")
    assert dlg.flatten.isChecked() and dlg.as_chain.isEnabled()
    assert dlg.ok.isEnabled(), dlg.messages.errors
    p = dlg.params()
    job = ok(qtbot, window.start_copy(node, p))
    rec.check(job)
    dst = p.dst
    with Disk.open_chain(dst, flags=OpenFlags.READ_ONLY) as d:
        assert len(d) == 1 and d.size == 8 * MiB
    assert chain_content(dst) == chain_content(vdi_chain["snap2"])
    qtbot.waitUntil(lambda: window.model.node(dst) is not None, timeout=5000)


def test_copy_refuses_existing_target(qtbot, window, vdi_chain):
    window.add_paths([vdi_chain["base"]], sync=True)
    dlg = CopyDialog(window.model.node(vdi_chain["base"]), window)
    qtbot.addWidget(dlg)
    dlg.location.set_path(vdi_chain["snap1"])
    assert not dlg.ok.isEnabled()
    assert any("already exists" in e for e in dlg.messages.errors)
    dlg.location.set_path(vdi_chain["base"])
    assert any("overwrite its source" in e for e in dlg.messages.errors)


def test_merge_from_dialog(qtbot, window, vdi_chain):
    rec = Recorder(window)
    window.add_paths([vdi_chain["snap2"], vdi_chain["branch"]], sync=True)
    before = chain_content(vdi_chain["snap2"])
    node = window.model.node(vdi_chain["snap2"])
    dlg = MergeDialog(node, window)
    qtbot.addWidget(dlg)
    assert [n.name for n in dlg.chain] == ["base.vdi", "snap1.vdi", "snap2.vdi"]
    # merging into base would break branch.vdi: refused with the reason
    dlg.set_source_target(vdi_chain["snap1"], vdi_chain["base"])
    assert not dlg.ok.isEnabled()
    assert any("branch.vdi" in e for e in dlg.messages.errors)
    # snap2 into snap1: snap2 is deleted
    dlg.set_source_target(vdi_chain["snap2"], vdi_chain["snap1"])
    assert dlg.ok.isEnabled(), dlg.messages.errors
    assert "snap2.vdi" in dlg.summary.text() and "deleted" in dlg.summary.text()
    p = dlg.params()
    assert p.deleted == [vdi_chain["snap2"]]
    job = ok(qtbot, window.start_merge(node, p))
    rec.check(job)
    assert not os.path.exists(vdi_chain["snap2"])
    assert chain_content(vdi_chain["snap1"]) == before
    qtbot.waitUntil(lambda: window.model.node(vdi_chain["snap2"]) is None, timeout=5000)
    assert window.model.node(vdi_chain["snap1"]).children == []


def _standalone_vdi(tmp_path, name="solo.vdi", size=8 * MiB):
    p = str(tmp_path / name)
    with Disk() as d:
        d.create_base(p, size, "VDI")
        d.write(0, b"\x5a" * MiB)
        d.write(2 * MiB, b"\x77" * (2 * MiB))
        d.write(2 * MiB, bytes(2 * MiB))      # allocated blocks of zeroes: compact drops them
    return p


def test_resize_from_dialog(qtbot, window, tmp_path):
    rec = Recorder(window)
    p = _standalone_vdi(tmp_path)
    window.add_paths([p], sync=True)
    node = window.model.node(p)
    dlg = ResizeDialog(node, window)
    qtbot.addWidget(dlg)
    assert dlg.used is not None and dlg.used >= MiB
    dlg.size.setValue(512 * 1024)                 # below the data: refused with the reason
    assert not dlg.ok.isEnabled()
    assert any("holds data up to" in e for e in dlg.messages.errors)
    dlg.size.setValue(16 * MiB)
    assert dlg.ok.isEnabled()
    job = ok(qtbot, window.start_resize(node, dlg.new_size()))
    rec.check(job)
    with Disk.open_chain(p, flags=OpenFlags.READ_ONLY) as d:
        assert d.size == 16 * MiB
        assert d.read(0, MiB) == b"\x5a" * MiB
    qtbot.waitUntil(lambda: window.model.node(p).record.virtual_size == 16 * MiB, timeout=5000)


def test_resize_dialog_refuses_shrink_where_the_format_cannot(qtbot, window, tmp_path):
    """A VMDK (declared: cannot shrink) is refused in the dialog with the way out; growing it is
    offered; a QCOW2 over an unused tail may shrink."""
    p = str(tmp_path / "solo.vmdk")
    q = str(tmp_path / "solo.qcow2")
    for path, fmt in ((p, "VMDK"), (q, "QCOW2")):
        with Disk() as d:
            d.create_base(path, 8 * MiB, fmt)
            d.write(0, b"\x5a" * MiB)
    window.add_paths([p, q], sync=True)
    dlg = ResizeDialog(window.model.node(p), window)
    qtbot.addWidget(dlg)
    dlg.size.setValue(4 * MiB)                    # above the data, but VMDK cannot shrink
    assert not dlg.ok.isEnabled()
    assert any("cannot be shrunk" in e and "Change the virtual size" in e
               for e in dlg.messages.errors)
    dlg.size.setValue(16 * MiB)
    assert dlg.ok.isEnabled()
    dlg2 = ResizeDialog(window.model.node(q), window)
    qtbot.addWidget(dlg2)
    dlg2.size.setValue(4 * MiB)
    assert dlg2.ok.isEnabled() and not dlg2.messages.errors


def test_compact_and_check(qtbot, window, tmp_path):
    rec = Recorder(window)
    p = _standalone_vdi(tmp_path)
    window.add_paths([p], sync=True)
    window.select_paths([p])
    size_before = os.path.getsize(p)
    assert window.actions["compact"].isEnabled(), window.actions["compact"].toolTip()
    (job,) = window.compact_selected()
    ok(qtbot, job)
    rec.check(job)
    assert os.path.getsize(p) < size_before
    with Disk.open_chain(p, flags=OpenFlags.READ_ONLY) as d:
        assert d.read(0, MiB) == b"\x5a" * MiB and d.read(2 * MiB, MiB) == bytes(MiB)
    window.select_paths([p])
    (job,) = window.check_selected()
    ok(qtbot, job)
    assert isinstance(job.result, CheckReport) and not job.result.problems
    assert "no problems found" in window.jobs_panel.row_for(job).detail.text()
    qtbot.waitUntil(lambda: any(getattr(b, "windowTitle", lambda: "")() == "Check result"
                                for b in window.messages), timeout=3000)


def test_details_apply_comment_and_size(qtbot, window, tmp_path):
    p = _standalone_vdi(tmp_path)
    window.add_paths([p], sync=True)
    window.select_paths([p])
    d = window.details
    assert d.node.path == p
    d.comment.setText("hello")
    d.size.setValue(12 * MiB)
    assert d.apply_button.isEnabled()
    assert d.changes() == {"comment": "hello", "size": 12 * MiB}
    jobs = window.apply_details(d.node, d.changes())
    for j in jobs:
        ok(qtbot, j)
    with Disk.open_chain(p, flags=OpenFlags.READ_ONLY) as disk:
        assert disk.top.comment == "hello" and disk.size == 12 * MiB


def test_move_from_details(qtbot, window, tmp_path):
    p = _standalone_vdi(tmp_path)
    window.add_paths([p], sync=True)
    window.select_paths([p])
    dst = str(tmp_path / "moved" / "solo.vdi")
    os.makedirs(os.path.dirname(dst))
    window.details.location.setText(dst)
    assert window.details.changes() == {"location": dst}
    (job,) = window.apply_details(window.details.node, window.details.changes())
    ok(qtbot, job)
    assert os.path.exists(dst) and not os.path.exists(p)
    qtbot.waitUntil(lambda: window.model.node(dst) is not None and window.model.node(p) is None,
                    timeout=5000)
    assert dst in window.library.paths() and p not in window.library.paths()


def test_cancel_from_jobs_panel(qtbot, window):
    started = threading.Event()

    def slow(progress):
        for i in range(10000):
            if progress(i, 10000) is False:
                from vdgui.vd import Cancelled
                raise Cancelled()
            started.set()
            time.sleep(0.002)
    job = window.start_job(Job("Slow test job", slow, paths=["/nowhere/a.vdi"]))
    assert started.wait(5)
    row = window.jobs_panel.row_for(job)
    assert row is not None and row.cancel_button.isEnabled()
    qtbot.waitUntil(lambda: row.cancel_button.isVisible() or not window.isVisible(), timeout=1000)
    qtbot.mouseClick(row.cancel_button, Qt.LeftButton)
    wait_job(qtbot, job)
    assert job.state == JobState.CANCELLED
    assert "Cancelled" in row.detail.text()
    assert "No jobs running" in window.status_jobs.text()


def test_delete_says_who_depends(qtbot, window, vdi_chain):
    window.add_paths([vdi_chain["snap2"], vdi_chain["branch"]], sync=True)
    asked = []

    def confirm(title, text, ok_text, checkbox):
        asked.append((text, checkbox))
        return (True, False)
    window.confirm = confirm
    window.select_paths([vdi_chain["snap1"]])
    job = window.delete_selected()
    assert asked and "snap2.vdi" in asked[0][0] and "depend" in asked[0][0] and asked[0][1]
    ok(qtbot, job)
    assert not os.path.exists(vdi_chain["snap1"]) and os.path.exists(vdi_chain["snap2"])
    qtbot.waitUntil(lambda: window.model.node(vdi_chain["snap1"]) is None, timeout=5000)
    qtbot.waitUntil(lambda: not window.model.node(vdi_chain["snap2"]).accessible, timeout=5000)
    # declining deletes nothing
    window.confirm = lambda *a: (False, False)
    window.select_paths([vdi_chain["branch"]])
    assert window.delete_selected() is None and os.path.exists(vdi_chain["branch"])


def test_remove_keeps_files(qtbot, window, vdi_chain):
    window.add_paths([vdi_chain["snap2"]], sync=True)
    window.select_paths([vdi_chain["snap1"]])
    removed = window.remove_selected()
    assert set(removed) == {vdi_chain["snap1"], vdi_chain["snap2"]}
    assert all(os.path.exists(p) for p in removed)
    assert window.model.node(vdi_chain["snap1"]) is None
    assert vdi_chain["base"] in window.library.paths()


def _drive_modal(qtbot, cls, action):
    """Run ``action`` (which opens a modal ``cls`` dialog) and let ``cls`` be driven by the
    returned callback list; the dialog is always closed so the test cannot hang."""
    from PySide6.QtCore import QTimer
    from PySide6.QtWidgets import QApplication
    seen = []

    def attempt(tries=[0]):  # noqa: B006 - the list counts calls across retries
        dlg = next(
            (w for w in QApplication.topLevelWidgets() if isinstance(w, cls) and w.isVisible()),
            None,
        )
        if dlg is None:
            tries[0] += 1
            if tries[0] < 200:
                QTimer.singleShot(10, attempt)
            return
        try:
            seen.append(dlg)
            seen_cb[0](dlg)
        finally:
            if dlg.isVisible():
                dlg.reject()

    seen_cb = [None]

    def run(cb):
        seen_cb[0] = cb
        QTimer.singleShot(0, attempt)
        action()
        return seen

    return run


def test_toolbar_actions_open_dialogs_and_run_jobs(qtbot, window, tmp_path, vdi_chain):
    """The real wiring: action → modal dialog → OK → job in the pool → tree updated."""
    window.settings.setValue("paths/last_folder", str(tmp_path))
    rec = Recorder(window)

    def fill_create(dlg):
        dlg.set_format("VDI")
        dlg.size.setValue(16 * MiB)
        dlg.location.set_path(str(tmp_path / "via-action.vdi"))
        qtbot.mouseClick(dlg.ok, Qt.LeftButton)

    seen = _drive_modal(qtbot, CreateDialog, window.actions["create"].trigger)(fill_create)
    assert seen
    job = window.queue.jobs[-1]
    ok(qtbot, job)
    rec.check(job)
    target = str(tmp_path / "via-action.vdi")
    qtbot.waitUntil(lambda: window.model.node(target) is not None, timeout=5000)

    window.add_paths([vdi_chain["snap2"]], sync=True)
    window.select_paths([vdi_chain["snap2"]])

    def fill_copy(dlg):
        dlg.set_format("VDI")
        dlg.location.set_path(str(tmp_path / "copied.vdi"))
        qtbot.mouseClick(dlg.ok, Qt.LeftButton)

    assert _drive_modal(qtbot, CopyDialog, window.actions["copy"].trigger)(fill_copy)
    job = window.queue.jobs[-1]
    assert job.kind == "copy"
    ok(qtbot, job)
    rec.check(job)
    assert chain_content(str(tmp_path / "copied.vdi")) == chain_content(vdi_chain["snap2"])


def test_real_copy_cancelled_from_panel_leaves_nothing(qtbot, window, tmp_path):
    from vdgui.vd import copy_image

    src = str(tmp_path / "data.vdi")
    with Disk() as d:
        d.create_base(src, 64 * MiB, "VDI")
        for i in range(0, 64 * MiB, 4 * MiB):
            d.write(i, bytes([i // MiB + 1]) * (4 * MiB))
    dst = str(tmp_path / "out" / "data.vmdk")
    os.makedirs(os.path.dirname(dst))
    mid = threading.Event()
    clicked = threading.Event()

    def fn(progress):
        def cb(done, total):
            r = progress(done, total)
            if done == 0:
                time.sleep(
                    0.08
                )  # outlast the engine's progress throttle: the next call is mid-copy
            elif done < total and not mid.is_set():
                mid.set()
                clicked.wait(10)
                r = progress(done, total)
            return r

        return copy_image(src, dst, "VMDK", progress=cb)

    job = window.start_job(Job("Copy data.vdi", fn, paths=[src, dst]))
    assert mid.wait(20)
    row = window.jobs_panel.row_for(job)
    qtbot.waitUntil(lambda: "of" in row.detail.text(), timeout=3000)  # progress shown
    qtbot.mouseClick(row.cancel_button, Qt.LeftButton)
    clicked.set()
    wait_job(qtbot, job)
    assert job.state == JobState.CANCELLED
    assert os.listdir(os.path.dirname(dst)) == [], "a cancelled copy leaves no file behind"


def test_failure_shows_engine_message(qtbot, window, tmp_path):
    from vdgui.jobs import tasks

    missing = str(tmp_path / "nothing.vdi")
    job = window.start_job(tasks.compact_job(missing))
    wait_job(qtbot, job)
    assert job.state == JobState.FAILED
    row = window.jobs_panel.row_for(job)
    assert "Failed" in row.detail.text() and "nothing.vdi" in row.detail.text()
    assert "nothing.vdi" in window.statusBar().currentMessage()
    assert not window.messages or all(
        "internal error" not in m.windowTitle() for m in window.messages
    )


def test_bug_in_a_job_shows_crash_dialog_with_traceback(qtbot, window):
    job = window.start_job(Job("Buggy", lambda progress: 1 / 0))
    wait_job(qtbot, job)
    assert job.state == JobState.FAILED
    qtbot.waitUntil(lambda: bool(window.messages), timeout=3000)
    box = window.messages[-1]
    assert "internal error" in box.windowTitle()
    assert "ZeroDivisionError" in box.detailedText() and "Traceback" in box.detailedText()
    box.close()


def test_details_edits_survive_a_refresh(qtbot, window, tmp_path):
    p = _standalone_vdi(tmp_path)
    window.add_paths([p], sync=True)
    window.select_paths([p])
    window.details.comment.setText("typing…")
    wait_job(qtbot, window.refresh())
    qtbot.waitUntil(
        lambda: window.details.node is not None and window.details.node.path == p, timeout=3000
    )
    assert window.details.comment.text() == "typing…"
    window.details.reset()
    assert window.details.comment.text() == ""


def test_create_dialog_follows_the_device_tab(qtbot, window, tmp_path):
    from vdgui.vd import backends

    dlg = CreateDialog(str(tmp_path), window, device="floppy")
    qtbot.addWidget(dlg)
    b = dlg.backend()
    assert any(fe.device.value == "floppy" for fe in b.extensions)
    ext = dlg.location.path().rsplit(".", 1)[1]
    assert any(fe.ext == ext and fe.device.value == "floppy" for fe in b.extensions)
    assert dlg.size.value() == 1440 * 1024
    hdd = CreateDialog(str(tmp_path), window, device="hdd")
    qtbot.addWidget(hdd)
    assert hdd.size.value() == 20 << 30
    assert hdd.backend() is next(x for x in backends() if x.name == hdd.backends[0].name)


def test_check_report_with_problems_is_explained(qtbot, window, tmp_path):
    from vdgui.vd import Problem

    p = _standalone_vdi(tmp_path)
    window.add_paths([p], sync=True)
    node = window.model.node(p)
    report = CheckReport(
        problems=[
            Problem("corrupt", "block map entry 7 points past the end", 4096),
            Problem("leak", "cluster 12 is not referenced"),
        ]
    )
    window.ops.check_done(node, report, repair=False)
    box = window.messages[-1]
    assert "corrupt" in box.text() and "block map entry 7" in box.text() and "Repair" in box.text()
    box.close()
    from vdgui.gui.widgets.jobs_panel import check_summary

    assert check_summary(report) == "2 problem(s) left (corrupt)"
    report.problems[0].repaired = True
    assert check_summary(report) == "1 problem(s) repaired, 1 problem(s) left (leaked blocks)"


def test_config_summary_follows_every_edit(qtbot, window, tmp_path):
    """Issue #13 item 4: type "abc" then "1000": the summary speaks of 1000, with the label."""
    dlg = CreateDialog(str(tmp_path), window, size=16 * MiB)
    qtbot.addWidget(dlg)
    dlg.set_format("QCOW2")
    ed = dlg.config.editor("ClusterSize")
    ed.clear()
    for ch in "abc":
        ed.insert(ch)
    assert dlg.messages.errors == ["Cluster size: expected an integer, found 'abc'"]
    ed.clear()
    for ch in "1000":
        ed.insert(ch)
    assert dlg.messages.errors == [
        "Cluster size: value 1000 is not a power of two"
    ] or dlg.messages.errors == ["Cluster size: expected a power of two, found 1000"]
    assert not dlg.ok.isEnabled()


def test_copy_to_vmdk_offers_no_raw_disk_keys(qtbot, window, vdi_chain):
    window.add_paths([vdi_chain["snap2"]], sync=True)
    dlg = CopyDialog(window.model.node(vdi_chain["snap2"]), window)
    qtbot.addWidget(dlg)
    dlg.set_format("VMDK")
    assert dlg.config is None or not {"RawDrive", "Partitions", "BootSector", "Relative"} & set(
        dlg.config.fields
    )
    assert not dlg.config_box.isVisibleTo(dlg)
