"""Help ▸ Documentation and Help ▸ Keyboard Shortcuts: a short guide that ships with the app
(no network needed) and the shortcut table built from the window's own actions, so it can never
disagree with what the keys do."""
from __future__ import annotations

import html
import os

from PySide6.QtGui import QKeySequence
from PySide6.QtWidgets import QDialog, QDialogButtonBox, QTabWidget, QTextBrowser, QVBoxLayout

from ..icons import icon

GUIDE = """
<h3>vdgui — the virtual media manager</h3>
<p>vdgui lists the disk images of your virtual machines (VirtualBox, QEMU/KVM, VMware, Hyper-V,
Parallels) with their snapshot chains drawn as a tree, and changes them with a progress bar and
Cancel. Nothing is changed until you confirm, and a change that is interrupted leaves the image
readable.</p>
<h4>Getting images into the list</h4>
<ul>
<li><b>Add</b> (or drop files on the list) adds image files; their parents and children in the
same folder are found by their links.</li>
<li><b>File ▸ Import from VirtualBox</b> reads VirtualBox.xml or a .vbox file.</li>
<li><b>Create</b> makes a new image; <b>Snapshot</b> a differencing image on the selected one.</li>
<li>Removing an image from the list never deletes its file; <b>Delete</b> does, after asking.</li>
</ul>
<h4>Operations</h4>
<ul>
<li><b>Copy</b> converts to another format (flattened, or as a chain: the name you type is the
copy of the image you selected).</li>
<li><b>Merge</b> folds a snapshot into its parent (or the parent into the snapshot).</li>
<li><b>Resize</b> grows an image (shrinks where the format allows and the cut part is empty);
<b>Compact</b> gives back space the image does not use.</li>
<li><b>Check</b> looks for damage without changing anything; <b>Repair</b> fixes what it
found.</li>
</ul>
<h4>States</h4>
<p>An image that is missing or unreadable is shown as inaccessible, with the reason in its
tooltip. Operations are refused on images another program (a running VM, qemu) holds.</p>
<h4>The command line</h4>
<p><code>vdgui-img</code> does everything the app does, for scripts: <code>vdgui-img --help</code>
lists the commands.</p>
"""


def _docs_folder() -> str | None:
    """The project's docs/ folder, when this is a source checkout."""
    here = os.path.dirname(os.path.abspath(__file__))
    d = os.path.normpath(os.path.join(here, "..", "..", "..", "docs"))
    return d if os.path.isfile(os.path.join(d, "architecture.md")) else None


def shortcut_rows(actions) -> list[tuple[str, str]]:
    """(what, keys) for every action with a shortcut, in the order given."""
    rows = []
    for a in actions:
        keys = [k.toString(QKeySequence.NativeText) for k in a.shortcuts() if not k.isEmpty()]
        if keys:
            rows.append((a.text().replace("&", "").rstrip("…"), ", ".join(keys)))
    return rows


class HelpDialog(QDialog):
    def __init__(self, actions, parent=None, page: str = "guide"):
        super().__init__(parent)
        self.setWindowTitle("Help")
        self.setWindowIcon(icon("properties"))
        self.tabs = QTabWidget()
        self.guide = QTextBrowser()
        self.guide.setObjectName("guide")
        self.guide.setOpenExternalLinks(True)
        docs = _docs_folder()
        extra = (f"<p>More: the documents in <a href='file://{html.escape(docs)}'>"
                 f"{html.escape(docs)}</a>.</p>" if docs else "")
        self.guide.setHtml(GUIDE + extra)
        self.shortcuts = QTextBrowser()
        self.shortcuts.setObjectName("shortcuts")
        rows = shortcut_rows(actions)
        self.shortcuts.setHtml(
            "<table cellpadding='4'>"
            + "".join(f"<tr><td>{html.escape(w)}</td><td><b>{html.escape(k)}</b></td></tr>"
                      for w, k in rows)
            + "</table>")
        self.tabs.addTab(self.guide, "Guide")
        self.tabs.addTab(self.shortcuts, "Keyboard Shortcuts")
        self.tabs.setCurrentIndex(1 if page == "shortcuts" else 0)
        buttons = QDialogButtonBox(QDialogButtonBox.Close)
        buttons.rejected.connect(self.reject)
        lay = QVBoxLayout(self)
        lay.addWidget(self.tabs)
        lay.addWidget(buttons)
        self.resize(620, 560)
