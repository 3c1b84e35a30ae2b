"""Issue #13: the app tells the truth — small things a user sees at once."""
from __future__ import annotations

import os
import threading

import pytest

from vdgui.jobs import Job
from vdgui.vd import Disk, OpenFlags

pytestmark = pytest.mark.gui


def test_window_title_names_the_app_once(window):
    title = window.windowTitle()
    assert title == "Virtual Media Manager"           # Qt adds " — vdgui" once
    assert "vdgui" not in title


def test_jobs_panel_shows_three_jobs_at_its_default_size(qtbot, window):
    window.show()
    qtbot.waitExposed(window)
    gate = threading.Event()

    def wait(progress):
        progress(0, 1)
        gate.wait(10)
        return None
    jobs = [window.start_job(Job(f"Job {i}", wait, paths=[f"/nowhere/{i}.vdi"]))
            for i in range(4)]
    try:
        qtbot.waitUntil(lambda: len(window.jobs_panel.rows) == 4, timeout=5000)
        qtbot.wait(50)
        panel = window.jobs_panel
        view = panel.rows[jobs[0].id].parentWidget()
        shown = [r for r in panel.rows.values()
                 if r.visibleRegion().boundingRect().height() >= r.height()]
        assert len(shown) >= 3, (f"{len(shown)} whole rows visible in {view.height()} px; "
                                 f"{[(r.y(), r.height()) for r in panel.rows.values()]}, "
                                 f"panel {panel.height()} dock {window.jobs_dock.height()}")
    finally:
        gate.set()
        for j in jobs:
            qtbot.waitUntil(lambda j=j: j.state in ("done", "failed", "cancelled"), timeout=10000)


def test_cue_variant_is_not_dynamic(tmp_path):
    (tmp_path / "disc.bin").write_bytes(bytes(8 * 2352))
    cue = tmp_path / "disc.cue"
    cue.write_text('FILE "disc.bin" BINARY\n  TRACK 01 MODE1/2352\n    INDEX 01 00:00:00\n')
    with Disk.open_chain(str(cue), None, OpenFlags.READ_ONLY) as d:
        assert d.info(0)["variant"] == "fixed"


def test_import_starts_in_virtualboxs_own_folder(tmp_path, monkeypatch):
    from vdgui.gui.main_window import virtualbox_settings_start
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("VBOX_USER_HOME", raising=False)
    assert virtualbox_settings_start() is None
    old = tmp_path / ".VirtualBox"
    old.mkdir()
    assert virtualbox_settings_start() == str(old)                  # the folder, older layout
    (old / "VirtualBox.xml").write_text("<VirtualBox/>")
    assert virtualbox_settings_start() == str(old / "VirtualBox.xml")
    new = tmp_path / ".config" / "VirtualBox"
    new.mkdir(parents=True)
    (new / "VirtualBox.xml").write_text("<VirtualBox/>")
    assert virtualbox_settings_start() == str(new / "VirtualBox.xml")   # the current layout first
    own = tmp_path / "vbhome"
    own.mkdir()
    (own / "VirtualBox.xml").write_text("<VirtualBox/>")
    monkeypatch.setenv("VBOX_USER_HOME", str(own))
    assert virtualbox_settings_start() == str(own / "VirtualBox.xml")


def test_merge_dialog_retargets_and_names_the_relinked(qtbot, window, vdi_chain):
    from vdgui.gui.dialogs.merge import MergeDialog
    window.add_paths([vdi_chain["snap2"], vdi_chain["branch"]], sync=True)
    dlg = MergeDialog(window.model.node(vdi_chain["snap2"]), window)
    qtbot.addWidget(dlg)
    assert (dlg.source.currentText(), dlg.target.currentText()) == ("snap2.vdi", "snap1.vdi")
    dlg.source.setCurrentIndex(dlg.source.findText("snap1.vdi"))     # the user picks a source
    assert dlg.target.currentText() == "base.vdi"                    # "into" follows it
    assert "snap2.vdi will then be a child of base.vdi" in dlg.summary.text()
    dlg.target.setCurrentIndex(dlg.target.findText("snap2.vdi"))     # forward instead
    assert "snap2.vdi will then be a child of base.vdi" in dlg.summary.text()
    dlg.source.setCurrentIndex(dlg.source.findText("base.vdi"))
    assert dlg.target.currentText() == "snap1.vdi"
    assert "snap1.vdi will then be a base image" in dlg.summary.text()


def test_help_menu_has_a_guide_and_the_real_shortcuts(qtbot, window):
    texts = [a.text() for a in window.menus["help"].actions()]
    assert "&Documentation" in texts and "&Keyboard Shortcuts" in texts
    dlg = window.help_dialog("shortcuts")
    qtbot.addWidget(dlg)
    assert dlg.tabs.currentIndex() == 1
    table = dlg.shortcuts.toPlainText()
    for a in window.actions.values():               # every shortcut the window has, listed
        for k in a.shortcuts():
            assert k.toString() in table, (a.text(), k.toString())
    assert "Merge" in dlg.guide.toPlainText()


def test_actions_follow_what_the_image_can_do(qtbot, window, tmp_path, qemu):
    """Issue #13 item 2: resize is not offered on a streamOptimized VMDK (the tooltip gives the
    way out), a RAW image's description is not editable, and counts agree with the details."""
    from vdgui.gui import actions
    raw = tmp_path / "r.raw"
    raw.write_bytes(bytes(1 << 20))
    stream = tmp_path / "s.vmdk"
    qemu.img("convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", raw, stream)
    base = tmp_path / "b.vdi"
    with Disk() as d:
        d.create_base(str(base), 4 << 20, "VDI")
        d.create_diff(str(tmp_path / "c1.vdi"))
        d.create_diff(str(tmp_path / "c2.vdi"))
    with Disk.open_chain(str(base), flags=OpenFlags.READ_ONLY) as d:
        d.create_diff(str(tmp_path / "c3.vdi"))
    window.add_paths([str(stream), str(raw), str(tmp_path / "c2.vdi"), str(tmp_path / "c3.vdi")],
                     sync=True)
    s = window.model.node(str(stream))
    r = actions.reason("resize", [s])
    assert r and "resizable variant" in r
    assert actions.way_out("resize", s) == "convert"
    window.select_paths([str(stream)])
    idx = window.proxy.mapFromSource(window.model.index_for(s))
    menu = window._context_menu(window.tree.visualRect(idx).center())
    conv = [a for a in menu.actions() if a.text() == "Convert to a &Resizable Copy…"]
    assert conv and "resizable variant" in conv[0].toolTip()
    menu.close()
    assert actions.reason("copy", [s]) is None
    rn = window.model.node(str(raw))
    assert "cannot store a description" in (actions.reason("comment", [rn]) or "")
    window.select_paths([str(raw)])
    qtbot.waitUntil(lambda: window.details.node is rn, timeout=3000)
    assert not window.details.comment.isEnabled()
    assert "cannot store a description" in window.details.comment.toolTip()
    b = window.model.node(str(base))
    assert "3 differencing images depend" in actions.reason("resize", [b])


def test_moving_a_chain_member_is_checked_before_anything_moves(qtbot, window, vdi_chain,
                                                                tmp_path):
    """Issue #13 item 2: a move that would cut the chain is refused at once, with the way out;
    one that keeps the links goes ahead."""
    from vdgui.vd import move_refusal
    window.add_paths([vdi_chain["snap2"], vdi_chain["branch"]], sync=True)
    other = tmp_path / "elsewhere"
    other.mkdir()
    shown = []
    window.error_message = lambda title, text: shown.append((title, text))
    snap1 = window.model.node(vdi_chain["snap1"])
    assert window.start_move(snap1, str(other / "snap1.vdi")) is None
    assert shown and "copy it as a chain" in shown[0][1]
    assert os.path.exists(vdi_chain["snap1"])                       # nothing moved
    why = move_refusal(vdi_chain["base"], str(other / "base.vdi"))
    assert why and "depends on base.vdi" in why
    # VirtualBox's layout: base.vdi beside Snapshots/, the child inside it: a rename works
    snaps = tmp_path / "vm" / "Snapshots"
    snaps.mkdir(parents=True)
    with Disk() as d:
        d.create_base(str(tmp_path / "vm" / "disk.vdi"), 1 << 20, "VDI")
        d.create_diff(str(snaps / "s1.vdi"))
    assert move_refusal(str(tmp_path / "vm" / "disk.vdi"), str(tmp_path / "vm" / "d2.vdi")) is None
    assert move_refusal(str(snaps / "s1.vdi"), str(tmp_path / "vm" / "s1.vdi")) is None
    # a QCOW2 base moved into a folder below its child's: the child still finds it
    q = tmp_path / "q"
    (q / "sub").mkdir(parents=True)
    with Disk() as d:
        d.create_base(str(q / "b.qcow2"), 1 << 20, "QCOW2")
        d.create_diff(str(q / "c.qcow2"))
    assert move_refusal(str(q / "b.qcow2"), str(q / "sub" / "b.qcow2")) is None


def test_dialogs_check_the_folder_before_closing(qtbot, window, tmp_path):
    """Issue #13 item 3: a folder where files cannot be made (/proc; a read-only folder) is an
    error in the dialog naming the user's folder, never a temporary name after OK."""
    from vdgui.gui.dialogs.create import CreateDialog
    dlg = CreateDialog(str(tmp_path), window, size=16 << 20)
    qtbot.addWidget(dlg)
    dlg.set_format("VDI")
    dlg.location.set_path("/proc/snap4.vdi")
    dlg.validate()
    assert not dlg.ok.isEnabled()
    assert any(e.startswith("Cannot create files in /proc") for e in dlg.messages.errors)
    assert not any("vdgui-tmp" in e for e in dlg.messages.errors)
    ok_dir = tmp_path / "fine"
    ok_dir.mkdir()
    dlg.location.set_path(str(ok_dir / "a.vdi"))
    dlg.validate()
    assert dlg.ok.isEnabled(), dlg.messages.errors
    assert os.listdir(ok_dir) == []                     # the probe left nothing behind


def test_panes_never_show_stale_data(qtbot, window, vdi_chain, tmp_path):
    """Issue #13 item 5: Remove from List empties the details pane; an inaccessible image shows
    no size carried over from the previous selection, and Reset stays disabled."""
    window.add_paths([vdi_chain["snap2"]], sync=True)
    window.select_paths([vdi_chain["base"]])
    qtbot.waitUntil(lambda: window.details.node is not None
                    and window.details.node.path == vdi_chain["base"], timeout=3000)
    assert window.details.size.value() == 8 << 20
    gone = tmp_path / "gone.vdi"
    with Disk() as d:
        d.create_base(str(gone), 3 << 30, "VDI")
    window.add_paths([str(gone)], sync=True)
    os.unlink(gone)
    window.refresh()
    qtbot.waitUntil(lambda: window.model.node(str(gone)) is not None
                    and not window.model.node(str(gone)).accessible, timeout=10000)
    window.select_paths([str(gone)])
    qtbot.waitUntil(lambda: window.details.node is not None
                    and window.details.node.path == str(gone), timeout=3000)
    assert window.details.size.value() is None
    assert not window.details.reset_button.isEnabled()
    window.select_paths([vdi_chain["snap2"]])
    qtbot.waitUntil(lambda: window.details.node is not None
                    and window.details.node.path == vdi_chain["snap2"], timeout=3000)
    window.remove_selected()
    assert window.details.node is None
    assert window.details.head_title.text() == "No image selected"


def test_compare_two_images_from_the_app(qtbot, window, vdi_chain, tmp_path):
    """Issue #13 item 7: the app compares two images (any formats) as the CLI does."""
    from vdgui.gui import actions
    from vdgui.vd import copy_image
    flat = str(tmp_path / "flat.qcow2")
    copy_image(vdi_chain["snap2"], flat, "QCOW2")
    window.add_paths([vdi_chain["snap2"], vdi_chain["branch"], flat], sync=True)
    a, b = window.model.node(vdi_chain["snap2"]), window.model.node(flat)
    assert "Select two images" in actions.reason("compare", [a])
    assert actions.reason("compare", [a, b]) is None
    window.select_paths([vdi_chain["snap2"], flat])
    assert window.actions["compare"].isEnabled()
    shown = []
    orig = window.ops.compare_done
    window.ops.compare_done = lambda *args: shown.append(orig(*args))
    job = window.compare_selected()
    qtbot.waitUntil(lambda: bool(shown), timeout=20000)
    assert job.result.identical and "read the same" in shown[0].text()
    window.select_paths([vdi_chain["snap2"], vdi_chain["branch"]])
    window.compare_selected()
    qtbot.waitUntil(lambda: len(shown) == 2, timeout=20000)
    assert "differ" in shown[1].text() and "offset 1,048,576" in shown[1].text()


def _crosslinked_vdi(path):
    import struct
    with Disk() as d:
        d.create_base(str(path), 4 << 20, "VDI")
        d.write(0, b"\x01" * (2 << 20))
    from vdgui.vd.formats.vdi import layout as L
    with open(path, "r+b") as f:
        f.seek(L.H1["offset_blocks"])
        off_blocks = struct.unpack("<I", f.read(4))[0]
        f.seek(off_blocks + 4)
        f.write(struct.pack("<I", 0))          # block 1 -> block 0's data: cross-linked
    return str(path)


def test_check_result_is_on_the_image(qtbot, window, tmp_path):
    """Issue #13 item 1: after Check finds damage the image says Corrupt (icon, tooltip), the job
    line has a warning icon, the result offers Repair…; the state lasts until the file changes."""
    from PySide6.QtCore import Qt

    from vdgui.gui.models.media import COL_STATE
    p = _crosslinked_vdi(tmp_path / "bad.vdi")
    window.add_paths([p], sync=True)
    node = window.model.node(p)
    assert node.state_text() == "Available"
    window.select_paths([p])
    boxes = []
    orig = window.ops.check_done
    window.ops.check_done = lambda *a: boxes.append(orig(*a))
    job = window.check_selected(False)[0]
    qtbot.waitUntil(lambda: bool(boxes), timeout=20000)
    node = window.model.node(p)
    assert node.state_text() == "Corrupt"
    idx = window.model.index_for(node, COL_STATE)
    assert "Corrupt" in window.model.data(idx, Qt.ToolTipRole)
    assert not window.model.data(idx, Qt.DecorationRole).isNull()
    row = window.jobs_panel.rows[job.id]
    assert row.icon.toolTip() == "Problems found"
    assert boxes[0].findChild(type(boxes[0].buttons()[0]), "repairButton") is not None
    # kept in the library while the file is unchanged; a change makes it unknown again
    assert window.library.scan(p).health == "corrupt"
    os.utime(p, ns=(1, 1))
    assert window.library.scan(p).health is None


def test_an_image_another_program_holds_is_locked(qtbot, window, tmp_path, qemu):
    import subprocess
    p = str(tmp_path / "held.qcow2")
    with Disk() as d:
        d.create_base(p, 4 << 20, "QCOW2")
    holder = subprocess.Popen(["qemu-io", "-f", "qcow2", p], stdin=subprocess.PIPE,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        qtbot.waitUntil(lambda: window.library.scan(p).held == "for writing", timeout=10000)
        window.add_paths([p], sync=True)
        node = window.model.node(p)
        assert node.state_text() == "Locked"
        from PySide6.QtCore import Qt

        from vdgui.gui.models.media import COL_STATE
        assert "another program" in window.model.data(window.model.index_for(node, COL_STATE),
                                                      Qt.ToolTipRole)
    finally:
        holder.stdin.close()
        holder.wait(10)
    assert window.library.scan(p).held is None


def test_a_failed_create_keeps_what_was_typed(qtbot, window, tmp_path):
    """Issue #13 item 3: the job failed after the dialog closed; the message offers the dialog
    again, filled with what was typed."""
    from vdgui.gui.dialogs.create import CreateDialog
    from vdgui.gui.dialogs.params import CreateParams
    from vdgui.vd import ImageFlags
    p = CreateParams(location=str(tmp_path / "gone" / "disk.qcow2"), size=64 << 20,
                     format="QCOW2", flags=ImageFlags.NONE, config={"ClusterSize": "131072"},
                     comment="my disk")
    boxes, reopened = [], []
    orig = window.ops.offer_retry
    window.ops.offer_retry = lambda *a: boxes.append(orig(*a))
    window.ops.create_dialog = lambda previous=None: reopened.append(previous)
    window.start_create(p)
    qtbot.waitUntil(lambda: bool(boxes), timeout=10000)
    box = boxes[0]
    assert "disk.qcow2" in box.windowTitle() and "vdgui-tmp" not in box.text()
    box.findChild(type(box.buttons()[0]), "retryButton").click()
    qtbot.waitUntil(lambda: bool(reopened), timeout=3000)
    assert reopened[0] == p
    dlg = CreateDialog(str(tmp_path), window)
    qtbot.addWidget(dlg)
    dlg.set_params(p)
    got = dlg.params()
    assert (got.location, got.size, got.format, got.comment) == (
        p.location, p.size, "QCOW2", "my disk")
    assert got.config["ClusterSize"] == "131072"


def _start_waiting_jobs(window, n, gate):
    def wait(progress):
        progress(0, 1)
        gate.wait(10)
        return None
    return [window.start_job(Job(f"Job {i}", wait, paths=[f"/nowhere/{i}.vdi"])) for i in range(n)]


def test_empty_jobs_dock_is_compact_and_grows_for_three_jobs(qtbot, window):
    window.resize(1240, 760)                    # the default window size
    window.show()
    qtbot.waitExposed(window)
    qtbot.wait(50)
    assert window.jobs_dock.height() < 0.15 * window.height(), window.jobs_dock.height()
    gate = threading.Event()
    jobs = _start_waiting_jobs(window, 3, gate)
    try:
        panel = window.jobs_panel
        qtbot.waitUntil(lambda: len(panel.rows) == 3, timeout=5000)
        qtbot.wait(50)
        view = panel.rows[jobs[0].id].parentWidget().parentWidget()     # the scroll viewport
        for r in panel.rows.values():
            top = r.mapTo(view, r.rect().topLeft())
            bottom = r.mapTo(view, r.rect().bottomRight())
            assert view.rect().contains(top) and view.rect().contains(bottom), \
                (r.job.title, top, bottom, view.rect())
        grown = window.jobs_dock.height()
        window.jobs_fit.fit()                   # listed jobs: the dock never shrinks
        assert window.jobs_dock.height() >= grown
    finally:
        gate.set()
        for j in jobs:
            qtbot.waitUntil(lambda j=j: j.state in ("done", "failed", "cancelled"), timeout=10000)


def test_jobs_dock_keeps_the_users_height(qtbot, window, data_dir):
    from PySide6.QtCore import QEvent, QPointF, Qt
    from PySide6.QtGui import QMouseEvent
    from PySide6.QtWidgets import QApplication
    window.show()
    qtbot.waitExposed(window)
    qtbot.wait(50)
    dock = window.jobs_dock
    before = dock.height()

    def send(kind, y, buttons):
        p = QPointF(window.width() // 2, y)
        button = Qt.NoButton if kind == QEvent.MouseMove else Qt.LeftButton
        QApplication.sendEvent(window, QMouseEvent(kind, p, window.mapToGlobal(p), button,
                                                   buttons, Qt.NoModifier))
    # drag the separator above the dock up by 120 px, as a user does
    y = dock.geometry().top() - 3
    send(QEvent.MouseMove, y, Qt.NoButton)
    send(QEvent.MouseButtonPress, y, Qt.LeftButton)
    for dy in range(10, 130, 10):
        send(QEvent.MouseMove, y - dy, Qt.LeftButton)
        qtbot.wait(5)
    send(QEvent.MouseButtonRelease, y - 120, Qt.NoButton)
    qtbot.wait(50)
    assert dock.height() > before + 60
    assert window.jobs_fit.user_sized
    sized = dock.height()
    gate = threading.Event()
    jobs = _start_waiting_jobs(window, 3, gate)
    try:
        qtbot.waitUntil(lambda: len(window.jobs_panel.rows) == 3, timeout=5000)
        qtbot.wait(50)
        assert dock.height() == sized             # their size, not ours
    finally:
        gate.set()
        for j in jobs:
            qtbot.waitUntil(lambda j=j: j.state in ("done", "failed", "cancelled"), timeout=10000)
    window.save_settings()
    from vdgui.gui.app import settings_for
    from vdgui.gui.view_settings import ViewSettings
    other = type(window)(window.library, settings=settings_for(str(data_dir)))
    qtbot.addWidget(other)
    assert other.jobs_fit.user_sized              # kept between runs with the window state
    assert ViewSettings(settings_for(str(data_dir))).has_window_state()


def test_compact_job_line_says_it_counts_work_not_data(qtbot, window, tmp_path):
    """Compact counts copy + compact + verify: the line says 'work', never 'X of Y' that reads
    as the image's data (3 MiB of data here, about three times that as work)."""
    import re

    from vdgui.jobs import tasks
    from vdgui.vd import format_size
    MiB = 1 << 20
    p = str(tmp_path / "solo.vdi")
    with Disk() as d:
        d.create_base(p, 8 * MiB, "VDI")
        d.write(0, b"\x5a" * MiB)
        d.write(2 * MiB, b"\x77" * (2 * MiB))          # 3 MiB of data
    job = tasks.compact_job(p)
    real, gate, held = job.fn, threading.Event(), []

    def fn(progress):
        def hold(done, total):
            r = progress(done, total)
            if total and not held:
                held.append(total)
                gate.wait(10)                        # the GUI reads the running line meanwhile
            return r
        return real(hold)
    job.fn = fn
    window.start_job(job)
    try:
        qtbot.waitUntil(lambda: job.total > 0 and window.jobs_panel.row_for(job) is not None,
                        timeout=5000)
        row = window.jobs_panel.row_for(job)
        row.refresh()
        text = row.detail.text()
        m = re.search(r"\bwork ([\d.]+) of ([\d.]+) MiB\b", text)
        assert m, text
        assert float(m.group(2)) > 2 * 3, text               # copy, compact and verify counted
        assert f"{format_size(job.done)} of {format_size(job.total)}" not in text
        assert "/s" not in text                               # no rate of 'work' posing as data
        assert "more than once" in row.detail.toolTip()
    finally:
        gate.set()
    qtbot.waitUntil(lambda: job.state in ("done", "failed", "cancelled"), timeout=10000)
    assert job.state == "done", job.error
    assert "/s" not in window.jobs_panel.row_for(job).detail.text()


def test_single_pass_job_line_keeps_its_bytes(qtbot):
    from vdgui.gui.widgets.jobs_panel import JobRow
    from vdgui.jobs import JobQueue, JobState
    job = Job("Copy a.vdi → b.vdi", lambda progress: None)
    job.state, job.started_at, job.done, job.total = JobState.RUNNING, 0.0, 1 << 20, 1 << 21
    row = JobRow(job, JobQueue())
    assert "1.00 MiB of 2.00 MiB" in row.detail.text() and "work" not in row.detail.text()


def test_no_rate_for_a_dynamic_create_or_a_count_of_files(qtbot, tmp_path):
    """'Done in 1 s · 26.82 GiB/s' for creating an empty 20 GiB dynamic VDI (its progress is the
    virtual size), '3 B/s' for deleting three files: a rate only where bytes were moved."""
    from vdgui.gui.widgets.jobs_panel import JobRow
    from vdgui.jobs import JobQueue, JobState, tasks
    from vdgui.vd import ImageFlags

    def finished(job, total):
        job.state = JobState.DONE
        job.done = job.total = total
        job.elapsed = lambda: 1.0
        return JobRow(job, JobQueue()).detail.text()

    dyn = tasks.create_job(str(tmp_path / "d.vdi"), 20 << 30, "VDI")
    assert "/s" not in finished(dyn, 20 << 30)
    fixed = tasks.create_job(str(tmp_path / "f.vdi"), 1 << 30, "VDI", flags=ImageFlags.FIXED)
    assert "1.00 GiB/s" in finished(fixed, 1 << 30)          # fixed: every byte written
    gone = tasks.delete_job([(str(tmp_path / n), []) for n in "abc"])
    assert "/s" not in finished(gone, 3)
    copy = tasks.copy_job(str(tmp_path / "a.vdi"), str(tmp_path / "b.vdi"), "VDI")
    assert "2.00 MiB/s" in finished(copy, 2 << 20)
