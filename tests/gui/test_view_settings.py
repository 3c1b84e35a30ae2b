"""Settings and view state live in gui/view_settings.py, under the keys vdgui always wrote, so a
user keeps their layout (issue #14 item 5)."""
from __future__ import annotations

import os

from PySide6.QtCore import QSettings


def test_view_settings_write_the_keys_users_have(qtbot, window, data_dir, tmp_path):
    from vdgui.gui import view_settings
    window.show()
    qtbot.waitExposed(window)
    window.tabs.setCurrentIndex(1)
    window.show_properties(False)
    window.remember_folder(str(tmp_path / "disk.vdi"))
    window.save_settings()
    raw = QSettings(os.path.join(data_dir, "settings.ini"), QSettings.IniFormat)
    assert set(raw.allKeys()) == {"window/geometry", "window/state", "window/splitter",
                                  "window/header", "window/tab", "window/details",
                                  "window/jobs_sized", "paths/last_folder"}
    assert set(raw.allKeys()) == set(view_settings.KEYS)
    assert int(raw.value("window/tab")) == 1
    assert raw.value("window/details") == "false"
    assert raw.value("paths/last_folder") == str(tmp_path)


def test_view_settings_read_what_an_older_vdgui_wrote(qtbot, library, data_dir, tmp_path):
    """A settings file as earlier versions wrote it (no window) is taken as it is."""
    from vdgui.gui.main_window import MainWindow
    from vdgui.gui.view_settings import ViewSettings
    path = os.path.join(data_dir, "settings.ini")
    old = QSettings(path, QSettings.IniFormat)
    old.setValue("window/tab", 2)
    old.setValue("window/details", "false")
    old.setValue("paths/last_folder", str(tmp_path))
    old.sync()
    w = MainWindow(library, settings=QSettings(path, QSettings.IniFormat))
    qtbot.addWidget(w)
    assert w.tabs.currentIndex() == 2
    assert not w.actions["properties"].isChecked()
    assert w.last_folder() == str(tmp_path)
    assert ViewSettings(QSettings(path, QSettings.IniFormat)).last_folder() == str(tmp_path)
    assert not ViewSettings(None).has_window_state() and ViewSettings(None).last_folder() is None
