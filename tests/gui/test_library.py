"""The media library: persistence across restarts, VirtualBox registry import, properties,
recent files; and the window's use of it (restart, drag and drop, command line, closing)."""
from __future__ import annotations

import os
import threading

import pytest
from PySide6.QtCore import QMimeData, QPoint, Qt, QUrl
from PySide6.QtGui import QDropEvent
from PySide6.QtWidgets import QMessageBox

from tests.gui.conftest import MiB, wait_job
from vdgui.jobs import Job, JobState
from vdgui.vd import Disk, InvalidArgument, Library, read_virtualbox_registry

pytestmark = pytest.mark.gui


def test_library_survives_restart(data_dir, vdi_chain):
    lib = Library()                                   # under $VDGUI_DATA_DIR
    assert lib.path.startswith(str(data_dir))
    lib.add_with_parents(vdi_chain["snap2"])
    lib.set_properties(vdi_chain["base"], {"Key": "value", "Secret": "pässwörd".encode()})
    lib.touch_recent(vdi_chain["snap2"])
    lib.close()
    lib = Library()
    assert set(lib.paths()) == {vdi_chain["base"], vdi_chain["snap1"], vdi_chain["snap2"]}
    assert lib.properties(vdi_chain["base"]) == {"Key": "value", "Secret": "pässwörd".encode()}
    assert lib.recent() == [vdi_chain["snap2"]]
    base_uuid = lib.scan(vdi_chain["base"]).uuid
    assert lib.find_by_uuid(base_uuid) == vdi_chain["base"]
    assert lib.entry(vdi_chain["snap1"])["parent_path"] == vdi_chain["base"]
    lib.close()


def test_parent_found_through_the_library(library, vdi_chain, tmp_path):
    """A child whose stored parent name no longer resolves finds it by UUID in the library."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    moved = str(elsewhere / "renamed-base.vdi")
    os.rename(vdi_chain["base"], moved)
    library.add_with_parents(moved)
    rec = library.scan(vdi_chain["snap1"])
    assert rec.error is None, rec.error
    assert rec.parent_path == moved


def test_window_restart_shows_same_images(qtbot, data_dir, vdi_chain):
    from vdgui.gui.app import settings_for
    from vdgui.gui.main_window import MainWindow
    lib = Library()
    w = MainWindow(lib, settings=settings_for(str(data_dir)))
    qtbot.addWidget(w)
    w.add_paths([vdi_chain["snap2"], vdi_chain["branch"]], sync=True)
    w.show()
    qtbot.waitExposed(w)
    w.resize(780, 520)
    w.splitter.setSizes([450, 330])
    qtbot.wait(20)
    sizes = w.splitter.sizes()
    w.close()
    lib.close()
    lib2 = Library()
    w2 = MainWindow(lib2, settings=settings_for(str(data_dir)))
    qtbot.addWidget(w2)
    job = w2.load_library()
    wait_job(qtbot, job)
    qtbot.waitUntil(lambda: len(w2.model.nodes()) == 4, timeout=5000)
    assert w2.model.node(vdi_chain["snap2"]).parent.path == vdi_chain["snap1"]
    w2.show()
    qtbot.waitExposed(w2)
    assert (w2.size().width(), w2.size().height()) == (780, 520)
    assert w2.splitter.sizes() == sizes
    w2.close()
    lib2.close()


VBOX_XML = """<?xml version="1.0"?>
<VirtualBox xmlns="http://www.virtualbox.org/" version="1.19-linux">
  <Global>
    <MediaRegistry>
      <HardDisks>
        <HardDisk uuid="{{{base_uuid}}}" location="VMs/win/base.vdi" format="VDI" type="Normal">
          <HardDisk uuid="{{11111111-2222-3333-4444-555555555555}}" location="VMs/win/Snapshots/{{11111111-2222-3333-4444-555555555555}}.vdi" format="VDI"/>
        </HardDisk>
        <HardDisk uuid="{{22222222-2222-3333-4444-555555555555}}" location="{absolute}" format="VMDK" type="Normal"/>
        <HardDisk uuid="{{33333333-2222-3333-4444-555555555555}}" location="iqn.2008-01.org.example:disk" format="iSCSI" type="Normal"/>
      </HardDisks>
      <DVDImages>
        <Image uuid="{{44444444-2222-3333-4444-555555555555}}" location="isos/install.iso"/>
      </DVDImages>
      <FloppyImages>
        <Image uuid="{{55555555-2222-3333-4444-555555555555}}" location="boot.img"/>
      </FloppyImages>
    </MediaRegistry>
  </Global>
</VirtualBox>
"""


def _write_vbox(tmp_path, base_uuid="66666666-2222-3333-4444-555555555555"):
    root = tmp_path / "VirtualBox"
    (root / "VMs" / "win").mkdir(parents=True)
    absolute = str(tmp_path / "abs" / "data.vmdk")
    xml = root / "VirtualBox.xml"
    xml.write_text(VBOX_XML.format(base_uuid=base_uuid, absolute=absolute))
    return root, xml, absolute


def test_read_virtualbox_registry(tmp_path):
    root, xml, absolute = _write_vbox(tmp_path)
    media = read_virtualbox_registry(str(xml))
    by_path = {m["path"]: m for m in media}
    base = str(root / "VMs" / "win" / "base.vdi")
    snap = str(root / "VMs" / "win" / "Snapshots" / "{11111111-2222-3333-4444-555555555555}.vdi")
    assert list(by_path) == [
        base,
        snap,
        absolute,
        str(root / "isos" / "install.iso"),
        str(root / "boot.img"),
    ]  # iSCSI skipped
    assert by_path[snap]["parent_uuid"] == "66666666-2222-3333-4444-555555555555"
    assert by_path[snap]["uuid"] == "11111111-2222-3333-4444-555555555555"
    assert by_path[absolute]["format"] == "VMDK"
    assert by_path[str(root / "isos" / "install.iso")]["device"] == "optical"
    assert by_path[str(root / "boot.img")]["device"] == "floppy"
    bad = tmp_path / "bad.xml"
    bad.write_text("<notvbox/>")
    with pytest.raises(InvalidArgument):
        read_virtualbox_registry(str(bad))
    bad.write_text("<<<")
    with pytest.raises(InvalidArgument):
        read_virtualbox_registry(str(bad))


def test_import_from_virtualbox_in_window(qtbot, window, tmp_path):
    root, xml, _ = _write_vbox(tmp_path)
    base = str(root / "VMs" / "win" / "base.vdi")
    with Disk() as d:  # one real image; the others are missing
        d.create_base(base, 4 * MiB, "VDI")
    job = window.import_virtualbox(str(xml))
    wait_job(qtbot, job)
    qtbot.waitUntil(lambda: window.model.node(base) is not None, timeout=5000)
    assert window.model.node(base).accessible
    assert len(window.library.paths()) == 5
    missing = [n for n in window.model.nodes() if not n.accessible]
    assert len(missing) == 4 and all("not found" in n.record.error for n in missing)
    # an optical image went to the optical tab
    iso = window.model.node(str(root / "isos" / "install.iso"))
    assert iso.record.device_type == "optical"


def test_drop_and_command_line_add(qtbot, window, tmp_path):
    p = str(tmp_path / "dropped.vdi")
    with Disk() as d:
        d.create_base(p, 4 * MiB, "VDI")
    md = QMimeData()
    md.setUrls([QUrl.fromLocalFile(p)])
    ev = QDropEvent(QPoint(10, 10), Qt.CopyAction, md, Qt.LeftButton, Qt.NoModifier)
    window.dropEvent(ev)
    qtbot.waitUntil(lambda: window.model.node(p) is not None, timeout=5000)
    assert p in window.library.recent()
    recent_actions = []
    window._fill_recent()
    recent_actions = [a.text() for a in window.recent_menu.actions()]
    assert p in recent_actions


def test_close_with_running_jobs_asks_then_cancels(qtbot, window, monkeypatch):
    started = threading.Event()

    def slow(progress):
        for i in range(100000):
            started.set()
            if progress(i, 100000) is False:
                from vdgui.vd import Cancelled

                raise Cancelled()
            threading.Event().wait(0.001)

    job = window.start_job(Job("Long job", slow))
    assert started.wait(5)
    qtbot.waitUntil(lambda: job.state == JobState.RUNNING, timeout=5000)  # the GUI heard it
    asked = []
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: asked.append(a) or QMessageBox.No)
    assert not window.close()
    assert asked and job.state == JobState.RUNNING
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: QMessageBox.Yes)
    assert window.close()
    assert job.state == JobState.CANCELLED


def test_screenshot_command(qtbot, tmp_path, vdi_chain):
    from vdgui.gui.app import main

    out = str(tmp_path / "shot.png")
    assert (
        main(["--screenshot", out, "--size", "900x600", vdi_chain["snap2"], vdi_chain["branch"]])
        == 0
    )
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_dropped_xml_is_a_registry_only_when_it_is_one(qtbot, window, tmp_path):
    from vdgui.gui.files import is_vbox_registry

    _root, xml, _ = _write_vbox(tmp_path)
    other = tmp_path / "DiskDescriptor.xml"
    other.write_text('<?xml version="1.0"?><Parallels_disk_image Version="1.0"/>')
    assert is_vbox_registry(str(xml))
    assert not is_vbox_registry(str(other))
    assert not is_vbox_registry(str(tmp_path / "x.vdi"))
    job = window.add_paths([str(xml)])
    wait_job(qtbot, job)
    qtbot.waitUntil(lambda: len(window.model.nodes()) == 5, timeout=5000)
