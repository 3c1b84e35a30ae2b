"""A bug escaped: show it with its traceback, never lose the app over it."""
from __future__ import annotations

import html
import sys
import traceback

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QMessageBox


def show_crash(parent, title: str, tb: str) -> QMessageBox:
    """A bug escaped: show it with the traceback (non-modal, the app keeps running)."""
    box = QMessageBox(parent)
    box.setIcon(QMessageBox.Critical)
    box.setWindowTitle("vdgui — internal error")
    box.setText(f"<b>{html.escape(title)}</b><br><br>This is a bug in vdgui. The details below "
                "help to fix it; please report them. Your images were not changed by this dialog.")
    box.setDetailedText(tb)
    box.setStandardButtons(QMessageBox.Close)
    box.setAttribute(Qt.WA_DeleteOnClose)
    box.setModal(False)
    box.show()
    return box


def install_excepthook(window_getter) -> None:
    """Anything escaping into the Qt event loop is a bug: show it with the traceback."""
    def hook(etype, value, tb):
        text = "".join(traceback.format_exception(etype, value, tb))
        sys.stderr.write(text)
        try:
            w = window_getter()
            show_crash(w, f"{etype.__name__}: {value}", text)
        except Exception:  # never let the hook itself fail
            pass
    sys.excepthook = hook
