"""The Contents tab (issue #15): partition bar, file browser, Extract… as a job, Changes view.
Disks are built with the file systems' own tools (sfdisk, mkfs.ext4 -d, mkfs.fat + mcopy,
qemu-img convert)."""
from __future__ import annotations

import os

import pytest
from PySide6.QtCore import QItemSelectionModel, Qt

from tests.gui.conftest import wait_job
from tests.inside.conftest import MiB, make_tree, sh
from vdgui.jobs import JobState, tasks


def _disk(tmp_path, name="disk"):
    """32 MiB MBR disk: 1 ext4 “ROOTFS” (tree + big.bin + many/ with 2500 files), 2 FAT16
    “DATA”, then 8 MiB unpartitioned. Returns (vdi path, files, big bytes)."""
    img = tmp_path / f"{name}.img"
    with open(img, "wb") as f:
        f.truncate(32 * MiB)
    sh("sfdisk", "-q", img, input="label: dos\nstart=2048, size=26624, type=83\n"
       "start=30720, size=18432, type=e\n")
    src = tmp_path / f"{name}-src"
    files = make_tree(src)
    big = os.urandom(3 * MiB)
    (src / "big.bin").write_bytes(big)
    (src / "many").mkdir()
    for i in range(2500):
        (src / "many" / f"f{i:04d}").write_bytes(b"x" * (i % 7))
    sh("mkfs.ext4", "-q", "-F", "-L", "ROOTFS", "-d", src, "-E", f"offset={2048 * 512}", img,
       "13M")
    sh("mkfs.fat", "-F", "16", "-s", "1", "-n", "DATA", "--offset", "30720", img, 18432 // 2)
    sh("mcopy", "-s", "-i", f"{img}@@{30720 * 512}", src / "hello.txt", src / "dir",
       src / "empty", "::/")
    out = tmp_path / f"{name}.vdi"
    sh("qemu-img", "convert", "-f", "raw", "-O", "vdi", img, out)
    return str(out), files, big


@pytest.fixture
def disk(tmp_path):
    return _disk(tmp_path)


def _open_contents(qtbot, window, path):
    window.show()
    window.ops.add_paths([path], sync=True)
    window.select_paths([path])
    window.side.setCurrentWidget(window.contents)
    pane = window.contents
    qtbot.waitUntil(lambda: pane.model.rowCount() > 0, timeout=15000)
    return pane


def _names(pane):
    return {pane.model.entries[r].path: pane.model.entries[r] for r in
            range(pane.model.rowCount())}


def test_partition_bar_and_file_list_show_what_is_on_the_disk(qtbot, window, disk):
    path, files, big = disk
    pane = _open_contents(qtbot, window, path)
    texts = [s.text for s in pane.bar.segs]
    assert texts[0].startswith("Unpartitioned")               # the first MiB
    assert texts[1].startswith("1: ext4 “ROOTFS” · 13")
    assert texts[2] == "Unpartitioned · 1.00 MiB"
    assert texts[3].startswith("2: fat16 “DATA” · 9")
    assert texts[4].startswith("Unpartitioned · 8")
    assert [s.number for s in pane.bar.segs] == [None, 1, None, 2, None]
    assert sum(s.size for s in pane.bar.segs) == 32 * MiB
    assert pane.number == 1 and pane.volume_box.count() == 2
    listed = _names(pane)
    assert listed["/hello.txt"].size == len(files["hello.txt"])
    assert listed["/big.bin"].size == len(big)
    assert listed["/dir"].type == "dir" and listed["/empty"].size == 0
    # the folder tree knows the sub-folders; the filter narrows the list
    root = pane.folders.topLevelItem(0)
    assert {root.child(i).text(0) for i in range(root.childCount())} >= {"dir", "many"}
    pane.filter.setText("HELLO")
    assert pane.proxy.rowCount() == 1
    pane.filter.setText("")
    # the FAT volume
    pane.select_volume(2)
    assert pane.bar.selected == 2 and pane.volume_box.currentData() == 2
    qtbot.waitUntil(lambda: pane.model.rowCount() > 0, timeout=15000)
    assert {e.path for e in pane.model.entries} == {"/hello.txt", "/dir", "/empty"}


def test_a_large_folder_fills_in_slices(qtbot, window, disk):
    path, _, _ = disk
    pane = _open_contents(qtbot, window, path)
    root = pane.folders.topLevelItem(0)
    many = next(root.child(i) for i in range(root.childCount()) if root.child(i).text(0) == "many")
    seen = []
    pane.model.rowsInserted.connect(lambda *a: seen.append(pane.model.rowCount()))
    pane.folders.setCurrentItem(many)
    qtbot.waitUntil(lambda: pane.model.rowCount() == 2500 and not pane.loading, timeout=15000)
    assert seen[0] <= 2000 and len(seen) >= 2         # not all in one event-loop turn
    assert _names(pane)["/many/f0006"].size == 6


def test_extract_copies_bytes_and_trees_and_cancel_leaves_nothing(qtbot, window, disk, tmp_path,
                                                                    monkeypatch):
    path, files, _big = disk
    pane = _open_contents(qtbot, window, path)
    dest = tmp_path / "out"
    dest.mkdir()
    pane.pick_folder = lambda: str(dest)

    def select(*names):
        pane.files.clearSelection()
        sm = pane.files.selectionModel()
        for r in range(pane.proxy.rowCount()):
            if os.path.basename(pane.proxy.data(pane.proxy.index(r, 0), Qt.UserRole + 1)) \
                    in names:
                sm.select(pane.proxy.index(r, 0),
                          QItemSelectionModel.Select | QItemSelectionModel.Rows)

    select("hello.txt", "dir")
    pane.extract_button.click()
    job = wait_job(qtbot, pane.extract_jobs[-1])
    assert job.state == JobState.DONE, job.error
    assert (dest / "hello.txt").read_bytes() == files["hello.txt"]
    for rel in ("dir/a.bin", "dir/sub/b.txt"):
        assert (dest / rel).read_bytes() == files[rel]

    # Cancel after the first MiB: no partial file, no temporary folder left behind
    orig = tasks.extract_job

    def slow(*a, **k):
        job = orig(*a, **k)
        fn = job.fn

        def run(progress):
            def p(done, total):
                if done >= MiB:
                    job.cancel()
                return progress(done, total)

            return fn(p)

        job.fn = run
        return job

    monkeypatch.setattr(tasks, "extract_job", slow)
    dest2 = tmp_path / "out2"
    dest2.mkdir()
    pane.pick_folder = lambda: str(dest2)
    select("big.bin")
    pane.extract_button.click()
    job = wait_job(qtbot, pane.extract_jobs[-1])
    assert job.state == JobState.CANCELLED
    assert os.listdir(dest2) == []
    assert job in window.queue.jobs  # visible in the Jobs panel


def test_changes_view_lists_exactly_the_touched_files(qtbot, window, tmp_path):
    img = tmp_path / "fat.img"
    src = tmp_path / "src"
    make_tree(src)
    sh("mkfs.fat", "-F", "16", "-s", "1", "-n", "SNAP", "-C", img, 16 * 1024)
    env_files = ["hello.txt", "empty"]
    for name in env_files:
        sh("mcopy", "-i", img, src / name, f"::/{name}")
    base = tmp_path / "base.qcow2"
    sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", img, base)
    (src / "new.txt").write_bytes(b"new file\n")
    (src / "hello.txt").write_bytes(b"changed hello\n")
    sh("mcopy", "-o", "-i", img, src / "hello.txt", "::/hello.txt")
    sh("mcopy", "-i", img, src / "new.txt", "::/new.txt")
    snap = tmp_path / "snap.qcow2"
    sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-B", base, "-F", "qcow2", img, snap)
    window.show()
    window.ops.add_paths([str(snap)], sync=True)
    window.select_paths([str(snap)])
    window.side.setCurrentWidget(window.contents)
    pane = window.contents
    qtbot.waitUntil(lambda: pane.views.count() == 2, timeout=15000)
    pane.views.setCurrentWidget(pane.changes_page)
    qtbot.waitUntil(lambda: pane.changes.topLevelItemCount() > 0, timeout=15000)
    data = {p: c for c, p in pane.change_paths() if "metadata" not in c}
    assert data == {"/hello.txt": "modified", "/new.txt": "added"}
    # the same Extract action
    dest = tmp_path / "out"
    dest.mkdir()
    pane.pick_folder = lambda: str(dest)
    for i in range(pane.changes.topLevelItemCount()):
        it = pane.changes.topLevelItem(i)
        it.setSelected(it.text(1) == "/hello.txt")
    pane.changes_extract.click()
    job = wait_job(qtbot, pane.extract_jobs[-1])
    assert job.state == JobState.DONE, job.error
    assert (dest / "hello.txt").read_bytes() == b"changed hello\n"


def test_a_damaged_table_shows_a_readable_message(qtbot, window, tmp_path):
    img = tmp_path / "bad.img"
    with open(img, "wb") as f:
        f.truncate(8 * MiB)
    sh(
        "sfdisk",
        "-q",
        img,
        input="label: dos\nstart=2048, size=4096, type=83\nstart=8192, size=4096, type=83\n",
    )
    with open(img, "r+b") as f:  # partition 2 now runs far past the end
        f.seek(446 + 16 + 12)
        f.write((1 << 22).to_bytes(4, "little"))
    window.show()
    window.ops.add_paths([str(img)], sync=True)
    window.select_paths([str(img)])
    window.side.setCurrentWidget(window.contents)
    pane = window.contents
    qtbot.waitUntil(lambda: "Problems" in pane.status.text(), timeout=15000)
    assert "past the end" in pane.status.text()
    assert "Traceback" not in pane.status.text()


def test_allocation_picture_overlays_the_partitions(qtbot, window, disk):
    path, _, _ = disk
    window.show()
    window.ops.add_paths([path], sync=True)
    window.select_paths([path])
    amap = window.details.allocation
    qtbot.waitUntil(lambda: amap.partition_marks() != [], timeout=15000)
    marks = amap.partition_marks()
    assert [m[2] for m in marks] == ["1 ext4", "2 fat16"]
    (a0, a1, _), (b0, b1, _) = marks
    bar_x, bar_w = amap._bar_geometry()
    assert abs(a0 - (bar_x + bar_w / 32)) < 1 and abs(b1 - (bar_x + bar_w * 24 / 32)) < 1
    assert a0 < a1 < b0 < b1
    amap.partitions_action.setChecked(False)  # the overlay is optional
    assert amap.partition_marks() == []


def _enter(qtbot, pane, name):
    parent = pane.folders.currentItem()
    qtbot.waitUntil(lambda: parent.childCount() > 0, timeout=15000)
    child = next(parent.child(i) for i in range(parent.childCount())
                 if parent.child(i).text(0) == name)
    pane.folders.setCurrentItem(child)
    qtbot.waitUntil(lambda: pane.folder == child.data(0, Qt.UserRole + 1)
                    and pane.model.rowCount() > 0, timeout=15000)


def test_contents_follow_a_resize_and_clear_on_remove(qtbot, window, disk):
    """Issue #13 item 5 on the Contents tab: a job that changes the shown image reloads it,
    keeping the volume and folder; removing the image clears the tab."""
    path, _, _ = disk
    pane = _open_contents(qtbot, window, path)
    pane.select_volume(2)
    qtbot.waitUntil(lambda: pane.model.rowCount() > 0, timeout=15000)
    _enter(qtbot, pane, "dir")
    shown = {e.path for e in pane.model.entries}
    assert pane.bar.segs[-1].text.startswith("Unpartitioned · 8")
    job = wait_job(qtbot, window.ops.start_resize(window.model.node(path), 40 * MiB))
    assert job.state == JobState.DONE, job.error
    qtbot.waitUntil(lambda: bool(pane.bar.segs) and pane.bar.segs[-1].text.startswith(
        "Unpartitioned · 16"), timeout=15000)
    qtbot.waitUntil(lambda: pane.folder == "/dir" and not pane.loading
                    and {e.path for e in pane.model.entries} == shown, timeout=15000)
    assert pane.number == 2 and pane.volume_box.currentData() == 2
    assert pane.folders.currentItem().data(0, Qt.UserRole + 1) == "/dir"
    window.select_paths([path])
    window.ops.remove_selected()
    assert pane.path is None and pane.bar.segs == [] and pane.model.rowCount() == 0


def test_contents_show_a_file_merged_into_the_shown_parent(qtbot, window, tmp_path):
    from vdgui.gui.dialogs.params import MergeParams
    img = tmp_path / "fat.img"
    src = tmp_path / "src"
    make_tree(src)
    sh("mkfs.fat", "-F", "16", "-s", "1", "-n", "MRG", "-C", img, 16 * 1024)
    sh("mcopy", "-s", "-i", img, src / "hello.txt", src / "dir", "::/")
    base = tmp_path / "base.qcow2"
    sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", img, base)
    (src / "new.txt").write_bytes(b"new file\n")
    sh("mcopy", "-i", img, src / "new.txt", "::/dir/new.txt")
    snap = tmp_path / "snap.qcow2"
    sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-B", base, "-F", "qcow2", img, snap)
    window.show()
    window.ops.add_paths([str(snap)], sync=True)
    window.select_paths([str(base)])
    window.side.setCurrentWidget(window.contents)
    pane = window.contents
    qtbot.waitUntil(lambda: pane.model.rowCount() > 0, timeout=15000)
    _enter(qtbot, pane, "dir")
    assert "/dir/new.txt" not in _names(pane)
    node = window.model.node(str(snap))
    p = MergeParams(str(snap), str(base), deleted=[str(snap)], paths=[str(base), str(snap)])
    job = wait_job(qtbot, window.ops.start_merge(node, p))
    assert job.state == JobState.DONE, job.error
    qtbot.waitUntil(lambda: "/dir/new.txt" in _names(pane), timeout=15000)
    assert pane.folder == "/dir" and pane.path == str(base)


def test_contents_clear_when_the_shown_image_becomes_unreadable(qtbot, window, tmp_path):
    img = tmp_path / "fat.img"
    src = tmp_path / "src"
    make_tree(src)
    sh("mkfs.fat", "-F", "16", "-s", "1", "-n", "GONE", "-C", img, 16 * 1024)
    sh("mcopy", "-i", img, src / "hello.txt", "::/")
    path = tmp_path / "gone.qcow2"
    sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", img, path)
    pane = _open_contents(qtbot, window, str(path))
    os.remove(path)                       # e.g. deleted outside while a job ran on it
    wait_job(qtbot, window.ops.rescan([str(path)]))
    qtbot.waitUntil(lambda: not window.model.node(str(path)).accessible, timeout=15000)
    assert pane.path is None and pane.bar.segs == [] and pane.model.rowCount() == 0
    assert "cannot be read" in pane.status.text()


def test_idle_and_hidden_volumes_are_let_go_and_a_change_meanwhile_reloads(
        qtbot, window, tmp_path, qemu, monkeypatch):
    """The Contents tab keeps the listed volume open with qemu's shared lock; its timer closes it
    after vd.volumes.idle seconds unused, hiding the tab closes it at once, and a listing that
    finds the image changed meanwhile reads it all again (the folder tree was stale)."""
    from tests.inside.test_volumes import make_image, rewrite_in_place
    from tests.interop.test_locks import _lock_byte_taken
    from vdgui.vd import volumes

    t = [1000.0]
    monkeypatch.setattr(volumes, "clock", lambda: t[0])
    path = make_image(tmp_path, qemu)
    pane = _open_contents(qtbot, window, path)
    assert pane.idle_timer.isActive()
    pane.idle_timer.setInterval(20)
    qtbot.waitUntil(lambda: len(volumes) > 0 and pane.folders.topLevelItem(0).childCount() == 4)
    qtbot.wait(100)                                   # the timer ran: not idle yet
    assert len(volumes) > 0 and _lock_byte_taken(path)
    t[0] += volumes.idle
    qtbot.waitUntil(lambda: len(volumes) == 0, timeout=5000)
    assert not _lock_byte_taken(path)                 # a VM may start on it now

    # another program adds a folder meanwhile; choosing a folder notices and reads it again
    rewrite_in_place(path, make_image(tmp_path, qemu, "v2", extra=("new",)))
    root = pane.folders.topLevelItem(0)
    a = next(root.child(i) for i in range(root.childCount()) if root.child(i).text(0) == "a")
    pane.folders.setCurrentItem(a)

    def shown():
        r = pane.folders.topLevelItem(0)
        return r is not None and {r.child(i).text(0) for i in range(r.childCount())}
    qtbot.waitUntil(lambda: "new" in (shown() or ()) and pane.folder == "/a"
                    and pane.model.rowCount() == 1, timeout=15000)

    # hiding the tab lets the image go at once
    qtbot.waitUntil(lambda: len(volumes) > 0)
    window.side.setCurrentWidget(window.details)
    assert len(volumes) == 0                          # (the details' own jobs lock it a moment)
    qtbot.waitUntil(lambda: not _lock_byte_taken(path), timeout=5000)
    window.side.setCurrentWidget(window.contents)
    qtbot.waitUntil(lambda: len(volumes) > 0)        # the check listing on show
    volumes.close()
