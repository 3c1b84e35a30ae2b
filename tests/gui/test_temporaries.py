"""Our own temporaries (vd.is_temp_name: ``.NAME.vdgui-tmp-PID`` files and folders) are never
offered by the Add Images picker nor added through it, by drag and drop or by add_paths."""
from __future__ import annotations

import shutil

import pytest
from PySide6.QtCore import QDir, QMimeData, QPoint, Qt, QUrl
from PySide6.QtGui import QDragEnterEvent, QDropEvent

from tests.gui.conftest import MiB
from vdgui.vd import Disk, is_temp_name

pytestmark = pytest.mark.gui


@pytest.fixture
def folder(tmp_path):
    """disk.vdi and .hidden.vdi (user images), a temporary copy of disk.vdi, and a temporary
    folder holding an image; every one a valid VDI."""
    f = tmp_path / "imgs"
    f.mkdir()
    real = f / "disk.vdi"
    with Disk() as d:
        d.create_base(str(real), 4 * MiB, "VDI")
    shutil.copy(real, f / ".hidden.vdi")
    shutil.copy(real, f / ".disk.vdi.vdgui-tmp-4242")
    (f / ".big.vdi.vdgui-tmp-4242-0123abcd").mkdir()
    shutil.copy(real, f / ".big.vdi.vdgui-tmp-4242-0123abcd" / "inner.vdi")
    assert is_temp_name(".disk.vdi.vdgui-tmp-4242")
    assert is_temp_name(".big.vdi.vdgui-tmp-4242-0123abcd")
    return f


def _temps(f):
    return [str(f / ".disk.vdi.vdgui-tmp-4242"),
            str(f / ".big.vdi.vdgui-tmp-4242-0123abcd" / "inner.vdi")]


def test_add_picker_never_offers_temporaries(qtbot, window, folder):
    from vdgui.gui.main_window import IMAGE_FILTER_ALL
    dlg = window.add_picker()
    qtbot.addWidget(dlg)
    dlg.setFilter(dlg.filter() | QDir.Hidden)       # even with hidden files shown
    dlg.selectNameFilter(IMAGE_FILTER_ALL)
    dlg.setDirectory(str(folder))
    proxy = dlg.proxyModel()
    assert proxy is not None, "the picker has no filter: a native dialog offers everything"
    fs = proxy.sourceModel()
    root = fs.index(str(folder))
    qtbot.waitUntil(lambda: fs.rowCount(root) >= 4, timeout=5000)   # the folder was read

    def shown():
        idx = proxy.mapFromSource(root)
        return sorted(proxy.index(r, 0, idx).data() for r in range(proxy.rowCount(idx)))
    assert fs.rowCount(root) == 4                    # the model sees them all ...
    assert shown() == [".hidden.vdi", "disk.vdi"]   # ... the picker offers only the user's


def test_picked_or_added_temporaries_are_not_added(qtbot, window, folder, monkeypatch):
    """A temporary named anyway (typed into the picker, on the command line) is not added."""
    from PySide6.QtWidgets import QDialog, QFileDialog
    picked = [str(folder / "disk.vdi")] + _temps(folder)
    monkeypatch.setattr(QFileDialog, "exec", lambda self: QDialog.Accepted)
    monkeypatch.setattr(QFileDialog, "selectedFiles", lambda self: picked)
    monkeypatch.setattr(QFileDialog, "getOpenFileNames",
                        staticmethod(lambda *a, **k: (picked, "")))
    window.add_dialog()
    qtbot.waitUntil(lambda: window.model.node(str(folder / "disk.vdi")) is not None, timeout=5000)
    window.add_paths(_temps(folder), sync=True)
    assert sorted(window.library.paths()) == [str(folder / "disk.vdi")]
    assert all(window.model.node(t) is None for t in _temps(folder))


def test_drag_and_drop_never_offers_or_adds_temporaries(qtbot, window, folder):
    only_temps = QMimeData()
    only_temps.setUrls([QUrl.fromLocalFile(t) for t in _temps(folder)])
    enter = QDragEnterEvent(QPoint(10, 10), Qt.CopyAction, only_temps, Qt.LeftButton,
                            Qt.NoModifier)
    window.dragEnterEvent(enter)
    assert not enter.isAccepted(), "a drag of temporaries only is offered as a drop"
    drop = QDropEvent(QPoint(10, 10), Qt.CopyAction, only_temps, Qt.LeftButton, Qt.NoModifier)
    window.dropEvent(drop)
    mixed = QMimeData()
    mixed.setUrls([QUrl.fromLocalFile(p) for p in [str(folder / "disk.vdi")] + _temps(folder)])
    enter = QDragEnterEvent(QPoint(10, 10), Qt.CopyAction, mixed, Qt.LeftButton, Qt.NoModifier)
    window.dragEnterEvent(enter)
    assert enter.isAccepted()
    assert "1 image file" in window.statusBar().currentMessage()
    window.dropEvent(QDropEvent(QPoint(10, 10), Qt.CopyAction, mixed, Qt.LeftButton,
                                Qt.NoModifier))
    qtbot.waitUntil(lambda: window.model.node(str(folder / "disk.vdi")) is not None, timeout=5000)
    qtbot.wait(200)
    assert sorted(window.library.paths()) == [str(folder / "disk.vdi")]
