"""The window's settings and view state over QSettings, apart from the window.

The keys are those vdgui has always written, so a user keeps their layout across versions:
window/geometry, window/state (docks, toolbar), window/splitter, window/header (column widths and
order, sort column), window/tab, window/details, window/jobs_sized (the user sized the Jobs dock)
and paths/last_folder. The recent images live in
the library file (Library.recent), not here."""
from __future__ import annotations

import os

from PySide6.QtCore import QByteArray, QSettings

GEOMETRY = "window/geometry"
STATE = "window/state"
SPLITTER = "window/splitter"
HEADER = "window/header"
TAB = "window/tab"
DETAILS = "window/details"
LAST_FOLDER = "paths/last_folder"
JOBS_SIZED = "window/jobs_sized"     # the user sized the Jobs dock: keep its height
KEYS = (GEOMETRY, STATE, SPLITTER, HEADER, TAB, DETAILS, LAST_FOLDER, JOBS_SIZED)

DEFAULT_SIZE = (1240, 760)


def _blob(value) -> QByteArray | None:
    return value if isinstance(value, QByteArray) and not value.isEmpty() else None


class ViewSettings:
    """What the window looks like between runs; ``settings`` None keeps nothing (tests,
    --screenshot)."""

    def __init__(self, settings: QSettings | None):
        self.settings = settings

    def has_window_state(self) -> bool:
        return self.settings is not None and self.settings.contains(STATE)

    def restore(self, window) -> None:
        """Geometry, docks, splitter, columns, device tab and details pane of ``window``."""
        s = self.settings
        geo = _blob(s.value(GEOMETRY)) if s is not None else None
        if geo is not None:
            window.restoreGeometry(geo)
        else:
            window.resize(*DEFAULT_SIZE)
        if s is None:
            return
        if (st := _blob(s.value(STATE))) is not None:
            window.restoreState(st)
        if (sp := _blob(s.value(SPLITTER))) is not None:
            window.splitter.restoreState(sp)
        if (hd := _blob(s.value(HEADER))) is not None:
            window.tree.header().restoreState(hd)
        try:
            window.tabs.setCurrentIndex(int(s.value(TAB, 0)))
        except (TypeError, ValueError):
            pass
        window.show_properties(str(s.value(DETAILS, "true")).lower() != "false")
        if hasattr(window, "jobs_fit"):
            window.jobs_fit.user_sized = str(s.value(JOBS_SIZED, "false")).lower() == "true"

    def save(self, window) -> None:
        s = self.settings
        if s is None:
            return
        s.setValue(GEOMETRY, window.saveGeometry())
        s.setValue(STATE, window.saveState())
        s.setValue(SPLITTER, window.splitter.saveState())
        s.setValue(HEADER, window.tree.header().saveState())
        s.setValue(TAB, window.tabs.currentIndex())
        s.setValue(DETAILS, "true" if window.side.isVisible() else "false")
        if hasattr(window, "jobs_fit"):
            s.setValue(JOBS_SIZED, "true" if window.jobs_fit.user_sized else "false")
        s.sync()

    def last_folder(self) -> str | None:
        """The folder a file was last chosen in, while it exists."""
        if self.settings is None:
            return None
        f = self.settings.value(LAST_FOLDER, "")
        return f if f and os.path.isdir(f) else None

    def remember_folder(self, path: str) -> None:
        """Remember the folder of ``path`` (a file just chosen or created)."""
        if self.settings is not None and path:
            self.settings.setValue(LAST_FOLDER, os.path.dirname(os.path.abspath(path)))
