"""Issue #19 part 1 in the app: File → New Raw Disk VMDK…: the dialog lists the drive's
partitions (those mounted on the host cannot be ticked), warns in plain words, and keeps Create
disabled until the user ticks that they understand; the job makes the VMDK, which is listed."""
from __future__ import annotations

import pytest

from tests.formats.test_vmdk_rawdisk import mbr_disk
from tests.gui.conftest import wait_job
from vdgui.gui.dialogs.rawdisk import RawDiskDialog
from vdgui.jobs import JobState
from vdgui.vd import RAW_TEST_ENV
from vdgui.vd import rawdisk as rawdisk_mod

pytestmark = pytest.mark.gui


@pytest.fixture
def mounts(monkeypatch, tmp_path):
    monkeypatch.setenv(RAW_TEST_ENV, "1")
    m = tmp_path / "mounts"
    m.write_text("")
    monkeypatch.setattr(rawdisk_mod, "MOUNTS", str(m))
    return m


def _rows(dlg):
    t = dlg.parts
    return [[t.topLevelItem(i).text(c) for c in (0, 3, 6)] for i in range(t.topLevelItemCount())]


def test_file_menu_entry_opens_the_dialog(window, monkeypatch):
    assert "New Ra&w Disk VMDK…" in [a.text() for a in window.menus["file"].actions()]
    opened = []
    monkeypatch.setattr(RawDiskDialog, "exec", lambda self: opened.append(self) or 0)
    window.action_rawdisk.trigger()
    assert len(opened) == 1 and not opened[0].ok.isEnabled()


def test_create_stays_disabled_until_the_tick(qtbot, window, tmp_path, mounts):
    drive = mbr_disk(tmp_path)
    dlg = RawDiskDialog(str(tmp_path), window, drives=[])
    qtbot.addWidget(dlg)
    assert not dlg.ok.isEnabled()
    dlg.set_drive(str(drive))
    assert _rows(dlg) == [["1", "Linux", ""], ["5", "Linux", ""],
                          ["6", "NTFS/exFAT/HPFS", ""], ["3", "W95 FAT32 (LBA)", ""]]
    assert "WRITE the real disk " + str(drive) in dlg.warning.text()
    assert "Never expose a partition the running host has mounted" in dlg.warning.text()
    dlg.check_partition(1)
    dlg.check_partition(6)
    assert dlg.chosen() == [1, 6]
    assert not dlg.ok.isEnabled()                     # everything chosen but the consent
    assert dlg.messages.errors == ["Tick “I understand” to confirm the VM may write to this "
                                   "disk"]
    dlg.consent.setChecked(True)
    assert dlg.ok.isEnabled(), dlg.messages.errors
    dlg.consent.setChecked(False)
    assert not dlg.ok.isEnabled()
    dlg.consent.setChecked(True)
    dlg.check_partition(1, False)
    dlg.check_partition(6, False)
    assert not dlg.ok.isEnabled() and "Tick the partitions the VM may use" in dlg.messages.errors
    dlg.check_partition(6)
    dlg.set_drive(str(drive) + "x")                    # another drive: asked again
    assert not dlg.consent.isChecked() and not dlg.ok.isEnabled()
    assert any("raw drive not found" in e for e in dlg.messages.errors)
    dlg.set_drive(str(drive))
    dlg.check_partition(1)
    dlg.consent.setChecked(True)
    assert dlg.ok.isEnabled(), dlg.messages.errors
    p = dlg.params()
    assert (p.drive, p.partitions, p.relative) == (str(drive), (1,), False)
    job = wait_job(qtbot, window.ops.start_create_rawdisk(p))
    assert job.state == JobState.DONE, job.error
    out = tmp_path / "RawDisk.vmdk"
    assert 'createType="partitionedDevice"' in out.read_text()
    qtbot.waitUntil(lambda: window.model.node(str(out)) is not None, timeout=5000)
    node = window.model.node(str(out))
    assert node.accessible, node.record.error
    assert node.record.format == "VMDK" and node.record.virtual_size == 16 << 20
    assert node.record.files == [str(out), str(tmp_path / "RawDisk-pt.vmdk")]


def test_partitions_in_use_cannot_be_chosen(qtbot, window, tmp_path, mounts):
    drive = mbr_disk(tmp_path)
    (drive.parent / "disk.img5").write_bytes(b"")
    mounts.write_text(f"{drive}5 /mnt/data\\040disk ext4 rw 0 0\n")
    dlg = RawDiskDialog(str(tmp_path), window, drives=[])
    qtbot.addWidget(dlg)
    dlg.set_drive(str(drive))
    assert _rows(dlg)[1] == ["5", "Linux", "mounted at /mnt/data disk"]
    dlg.check_partition(5)
    assert dlg.chosen() == []                          # disabled: not chosen even if ticked
    dlg.check_partition(1)
    dlg.consent.setChecked(True)
    assert dlg.ok.isEnabled(), dlg.messages.errors
    assert any("cannot be chosen: 5" in w for w in dlg.messages.warnings)
    dlg.whole.setChecked(True)
    assert not dlg.ok.isEnabled()
    assert any("partition 5 mounted at /mnt/data disk" in e for e in dlg.messages.errors)


def test_a_regular_file_is_refused_without_the_tests_flag(qtbot, window, tmp_path, mounts,
                                                          monkeypatch):
    drive = mbr_disk(tmp_path)
    monkeypatch.delenv(RAW_TEST_ENV)
    dlg = RawDiskDialog(str(tmp_path), window, drives=[])
    qtbot.addWidget(dlg)
    dlg.set_drive(str(drive))
    dlg.consent.setChecked(True)
    assert not dlg.ok.isEnabled() and dlg.parts.topLevelItemCount() == 0
    assert any("is a regular file, not a host drive" in e for e in dlg.messages.errors)
