"""Helpers shared by the dialogs: file-system limits of a folder, default names, format lists,
a warnings box, a location row, the check of a new file's place and the OK/Cancel buttons."""
from __future__ import annotations

import html
import os

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QCheckBox,
    QDialog,
    QDialogButtonBox,
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QToolButton,
    QWidget,
)

from vdgui.vd import Cap, ImageFlags, backends, format_size

# The format offered first in create dialogs: a user preference (as VirtualBox's default
# hard-disk format), not a capability decision.
DEFAULT_FORMAT = "VDI"

FAT_TYPES = {"vfat", "msdos", "fat", "umsdos", "fat32"}
FAT_LIMIT = 4 * (1 << 30) - 1


def mount_of(path: str) -> tuple[str, str]:
    """(mount point, file-system type) of the folder holding ``path``, from /proc/mounts."""
    folder = os.path.abspath(path)
    while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    best = ("/", "")
    try:
        real = os.path.realpath(folder)
        with open("/proc/mounts", encoding="utf-8", errors="replace") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mnt = parts[1].replace("\\040", " ")
                if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(
                    best[0]
                ):
                    best = (mnt, parts[2])
    except OSError:
        pass
    return best


def free_space(path: str) -> int | None:
    folder = os.path.abspath(path)
    while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    try:
        st = os.statvfs(folder)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


_FOLDER_VERDICTS: dict[str, tuple[float, str | None]] = {}


def folder_problem(folder: str) -> str | None:
    """Why new files cannot be made in ``folder`` (None: they can), found by making and removing
    a tiny file of our own there (access() says yes to root in /proc), remembered for 2 s so a
    dialog can ask on every keystroke. The message names the user's folder and the cause."""
    import errno
    import tempfile
    import time

    folder = os.path.abspath(folder)
    now = time.monotonic()
    hit = _FOLDER_VERDICTS.get(folder)
    if hit is not None and now - hit[0] < 2.0:
        return hit[1]
    verdict = None
    if not os.path.isdir(folder):
        verdict = f"The folder {folder} does not exist"
    else:
        try:
            fd, probe = tempfile.mkstemp(prefix=".vdgui-probe-", dir=folder)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            why = {
                errno.EACCES: "permission denied",
                errno.EPERM: "permission denied",
                errno.EROFS: "the file system is read-only",
                errno.ENOSPC: "the disk is full",
                # an existing folder that says "no such file": /proc, /sys and the like
                errno.ENOENT: "it is a system folder that does not take new files",
            }.get(exc.errno, exc.strerror or str(exc))
            verdict = f"Cannot create files in {folder}: {why}"
    _FOLDER_VERDICTS[folder] = (now, verdict)
    return verdict


def new_file_problem(path: str) -> str | None:
    """Why a new file cannot be written at ``path``: it exists, or its folder is unusable."""
    if os.path.lexists(path):
        return f"{path} already exists; choose another name"
    return folder_problem(os.path.dirname(path))


def ok_cancel(dialog: QDialog, text: str) -> tuple[QDialogButtonBox, QPushButton]:
    """OK and Cancel wired to the dialog's accept and reject, OK labelled ``text``."""
    buttons = QDialogButtonBox(QDialogButtonBox.Ok | QDialogButtonBox.Cancel)
    ok = buttons.button(QDialogButtonBox.Ok)
    ok.setText(text)
    buttons.accepted.connect(dialog.accept)
    buttons.rejected.connect(dialog.reject)
    return buttons, ok


def size_warnings(
    location: str, size: int, *, preallocate: bool, split: bool = False, fs_type: str | None = None
) -> list[str]:
    """Warnings about the target folder's file system for an image of ``size`` bytes."""
    out = []
    fs = fs_type if fs_type is not None else mount_of(location)[1]
    if fs.lower() in FAT_TYPES and size > FAT_LIMIT and not split:
        out.append(
            f"The target folder is on a FAT file system ({fs}), where a file can be at most "
            f"4 GiB; an image of {format_size(size)} may not fit. Choose another folder"
            + " or split the image into 2 GB parts."
        )
    return out


def room_problem(
    location: str, size: int, *, preallocate: bool, free: int | None = None
) -> str | None:
    """A pre-allocated image that cannot fit: an error the dialog shows before it closes."""
    free = free if free is not None else free_space(location)
    if free is not None and preallocate and size > free:
        return (
            f"Only {format_size(free)} are free in {os.path.dirname(os.path.abspath(location))}; "
            f"pre-allocating {format_size(size)} will not fit"
        )
    return None


def creatable_backends(*, file_only: bool = True, diff: bool = False):
    """Backends that can create images, ordered: the default format, preferred ones, others."""
    out = []
    for b in backends():
        if not b.creatable or not b.caps & (Cap.CREATE_FIXED | Cap.CREATE_DYNAMIC):
            continue
        if file_only and not b.caps & Cap.FILE:
            continue
        if diff and not b.caps & Cap.DIFF:
            continue
        out.append(b)
    first = [b for b in out if b.name.upper() == DEFAULT_FORMAT]
    preferred = [b for b in out if b.caps & Cap.PREFERRED and b not in first]
    others = [b for b in out if b not in first and b not in preferred]
    return first + preferred, others


def with_extension(path: str, ext: str) -> str:
    stem, _ = os.path.splitext(path)
    return f"{stem}.{ext}" if ext else stem


def unique_path(folder: str, stem: str, ext: str) -> str:
    cand = os.path.join(folder, f"{stem}.{ext}" if ext else stem)
    i = 2
    while os.path.exists(cand):
        cand = os.path.join(folder, f"{stem}{i}.{ext}" if ext else f"{stem}{i}")
        i += 1
    return cand


VARIANT_BOXES = (
    (
        ImageFlags.FIXED,
        "Pre-allocate &full size",
        "Reserve the whole size on the host now (faster in use, slower to create)",
    ),
    (ImageFlags.SPLIT_2G, "&Split into 2 GB parts", "Store the image in files of at most 2 GB"),
    (
        ImageFlags.STREAM_OPTIMIZED,
        "S&tream-optimized",
        "Compressed, append-only layout for distribution (OVA/ESXi)",
    ),
)


class VariantBoxes(QWidget):
    """Checkboxes for the variant bits a backend's create_flags allows."""

    changed = Signal()

    def __init__(self, parent=None):
        super().__init__(parent)
        lay = QHBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        self.boxes: dict[ImageFlags, QCheckBox] = {}
        for flag, text, tip in VARIANT_BOXES:
            cb = QCheckBox(text)
            cb.setToolTip(tip)
            cb.setProperty("tip", tip)
            cb.toggled.connect(self.changed)
            self.boxes[flag] = cb
            lay.addWidget(cb)
        lay.addStretch(1)

    def set_backend(self, b) -> None:
        for flag, cb in self.boxes.items():
            ok = bool(b is not None and b.create_flags & flag)
            if flag == ImageFlags.FIXED and b is not None and not b.caps & Cap.CREATE_FIXED:
                ok = False
            cb.setEnabled(ok)
            if not ok:
                cb.setChecked(False)
                name = b.name if b is not None else "this format"
                cb.setToolTip(f"{name} cannot create this variant")
            else:
                cb.setToolTip(cb.property("tip"))
        if b is not None and not b.caps & Cap.CREATE_DYNAMIC and b.caps & Cap.CREATE_FIXED:
            cb = self.boxes[ImageFlags.FIXED]
            cb.setToolTip(
                f"{b.name} images are always fixed-size; without pre-allocation the file "
                "is created sparse"
            )

    def set_flags(self, flags: ImageFlags) -> None:
        for flag, cb in self.boxes.items():
            if cb.isEnabled():
                cb.setChecked(bool(flags & flag))

    def flags(self) -> ImageFlags:
        f = ImageFlags.NONE
        for flag, cb in self.boxes.items():
            if cb.isEnabled() and cb.isChecked():
                f |= flag
        return f


class LocationRow(QWidget):
    changed = Signal(str)

    def __init__(self, path: str = "", title: str = "Image location", parent=None):
        super().__init__(parent)
        self.title = title
        self.edit = QLineEdit(path)
        self.edit.setObjectName("location")
        self.button = QToolButton()
        self.button.setText("…")
        self.button.setToolTip("Choose the file")
        lay = QHBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.edit, 1)
        lay.addWidget(self.button)
        self.button.clicked.connect(self._browse)
        self.edit.textChanged.connect(self.changed)

    def path(self) -> str:
        t = self.edit.text().strip()
        return os.path.abspath(os.path.expanduser(t)) if t else ""

    def set_path(self, p: str) -> None:
        self.edit.setText(p)

    def _browse(self) -> None:
        p, _ = QFileDialog.getSaveFileName(
            self, self.title, self.edit.text(), options=QFileDialog.DontConfirmOverwrite
        )
        if p:
            self.edit.setText(p)


class MessageArea(QLabel):
    """Errors (block OK) and warnings, shown as a list."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setWordWrap(True)
        self.setTextFormat(Qt.RichText)
        self.setObjectName("messages")
        self.errors: list[str] = []
        self.warnings: list[str] = []
        self.setVisible(False)

    def show_messages(self, errors: list[str], warnings: list[str]) -> None:
        self.errors, self.warnings = list(errors), list(warnings)
        lines = [f"<span style='color:#c9372c'>✖ {html.escape(e)}</span>" for e in errors]
        lines += [f"<span style='color:#8a5a00'>⚠ {html.escape(w)}</span>" for w in warnings]
        w = self.window()
        was_shown = not self.isHidden()
        before = w.height()
        self.setText("<br>".join(lines))
        self.setVisible(bool(lines))
        grown = getattr(w, "_grown_from", None)
        if not lines:
            # the lines that made the window grow are gone: give the height back, or the
            # other rows (a group box) take up the empty space
            if grown and w.height() == grown[1]:
                if w.layout() is not None:
                    w.layout().activate()  # its minimum without the lines first
                w.resize(w.width(), grown[0])
            w._grown_from = None
            return
        grow_to_fit(w)
        if not was_shown and w.height() > before:
            w._grown_from = (before, w.height())
        elif grown:
            w._grown_from = (grown[0], w.height())


def grow_to_fit(window) -> None:
    """Make ``window`` tall enough for its layout at its present width. A word-wrapped line
    that appears (a warning) needs more height than the window had; without this the layout
    squeezes the rows above it into each other."""
    lay = window.layout() if window is not None else None
    if lay is None:
        return
    lay.activate()
    need = lay.totalMinimumSize().height()
    if lay.hasHeightForWidth():
        need = max(need, lay.totalHeightForWidth(window.width()))
    if window.height() < need:
        window.resize(window.width(), need)
