"""ContentsPane: what is inside the selected image (issue #15).

A partition bar, a volume chooser, then a file browser of the chosen volume (folder tree, file
list with size and date, a filter box) and, on a differencing image, the Changes view: what this
snapshot changed. Every read runs as a job in the pool; a listing fills the list in slices so a
large folder never blocks the event loop. Extract… runs as a visible job with progress and
Cancel. Only the public engine API is used (through vdgui.jobs.tasks).

Listings keep the volume open (vd.volumes), with qemu's shared lock on the image: a timer closes
volumes left unused for vd.volumes.idle seconds, and hiding the tab closes this image's, so a VM
can start on it. A later listing that finds the image's files changed reads it all again.
"""
from __future__ import annotations

import posixpath
import time

from PySide6.QtCore import (
    QAbstractTableModel,
    QModelIndex,
    QSortFilterProxyModel,
    Qt,
    QTimer,
    Signal,
)
from PySide6.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QFileDialog,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QPushButton,
    QSplitter,
    QTabWidget,
    QTreeView,
    QTreeWidget,
    QTreeWidgetItem,
    QVBoxLayout,
    QWidget,
)

from vdgui.jobs import tasks
from vdgui.vd import format_size, volumes

from .partition_bar import PartitionBar

SLICE = 2000            # rows added to the list per event-loop turn
IDLE_CHECK_MS = 5000    # how often volumes unused for vd.volumes.idle seconds are closed
PATH_ROLE = Qt.UserRole + 1


class EntryModel(QAbstractTableModel):
    """The entries of one folder: Name, Size, Modified, Type."""
    HEADERS = ("Name", "Size", "Modified", "Type")

    def __init__(self, parent=None):
        super().__init__(parent)
        self.entries: list = []

    def rowCount(self, parent=QModelIndex()):
        return 0 if parent.isValid() else len(self.entries)

    def columnCount(self, parent=QModelIndex()):
        return 0 if parent.isValid() else len(self.HEADERS)

    def headerData(self, section, orientation, role=Qt.DisplayRole):
        if orientation == Qt.Horizontal and role == Qt.DisplayRole:
            return self.HEADERS[section]
        return None

    def data(self, index, role=Qt.DisplayRole):
        e = self.entries[index.row()]
        col = index.column()
        if role == Qt.DisplayRole:
            if col == 0:
                name = posixpath.basename(e.path) or "/"
                return name + (f" → {e.target}" if e.type == "symlink" else "")
            if col == 1:
                return "" if e.type == "dir" else format_size(e.size)
            if col == 2:
                return time.strftime("%Y-%m-%d %H:%M", time.localtime(e.mtime)) \
                    if e.mtime is not None else ""
            return {"dir": "Folder", "file": "File", "symlink": "Link"}.get(e.type, "Other")
        if role == Qt.UserRole:          # sort key
            return ((0 if e.type == "dir" else 1, posixpath.basename(e.path).lower()),
                    e.size, e.mtime or 0, e.type)[col]
        if role == PATH_ROLE:
            return e.path
        if role == Qt.TextAlignmentRole and col == 1:
            return int(Qt.AlignRight | Qt.AlignVCenter)
        return None

    def clear(self):
        self.beginResetModel()
        self.entries = []
        self.endResetModel()

    def append(self, entries) -> None:
        if not entries:
            return
        n = len(self.entries)
        self.beginInsertRows(QModelIndex(), n, n + len(entries) - 1)
        self.entries.extend(entries)
        self.endInsertRows()


class _Filter(QSortFilterProxyModel):
    def lessThan(self, a, b):
        return a.data(Qt.UserRole) < b.data(Qt.UserRole)


class ContentsPane(QWidget):
    """The Contents tab. ``queue`` is the window's JobQueue."""
    message = Signal(str)               # errors the window may show in its status bar

    def __init__(self, queue, library=None, parent=None):
        super().__init__(parent)
        self.queue = queue
        self.library = library
        self.path: str | None = None
        self.format: str | None = None
        self.layout_ = None
        self.differencing = False
        self.number: int | None = None       # the volume shown (0: the whole disk)
        self.folder = "/"
        self._loaded_for: str | None = None
        self._gen = 0                        # bumped on every reset: late job results are dropped
        self._restore = None                 # (volume, folder, changes shown) wanted after reload
        self._pending: list = []
        self._feeder = QTimer(self)
        self._feeder.setInterval(0)
        self._feeder.timeout.connect(self._feed)
        self._stamp = None                   # the image's files as the first listing saw them
        self.idle_timer = QTimer(self)
        self.idle_timer.setInterval(IDLE_CHECK_MS)
        self.idle_timer.timeout.connect(lambda: volumes.close_idle())
        self.idle_timer.start()
        self.pick_folder = self._pick_folder         # overridable in tests
        self.extract_jobs: list = []

        v = QVBoxLayout(self)
        v.setContentsMargins(6, 6, 6, 6)
        self.status = QLabel()
        self.status.setWordWrap(True)
        self.status.setObjectName("contentsStatus")
        self.bar = PartitionBar()
        self.bar.partitionClicked.connect(self.select_volume)
        row = QHBoxLayout()
        row.addWidget(QLabel("Volume:"))
        self.volume_box = QComboBox()
        self.volume_box.setAccessibleName("Volume")
        self.volume_box.activated.connect(
            lambda i: self.select_volume(self.volume_box.itemData(i)))
        row.addWidget(self.volume_box, 1)
        v.addWidget(self.bar)
        v.addLayout(row)
        v.addWidget(self.status)

        self.views = QTabWidget()
        v.addWidget(self.views, 1)
        files = QWidget()
        fv = QVBoxLayout(files)
        fv.setContentsMargins(0, 4, 0, 0)
        top = QHBoxLayout()
        self.filter = QLineEdit()
        self.filter.setPlaceholderText("Filter names")
        self.filter.setClearButtonEnabled(True)
        self.filter.setAccessibleName("Filter names")
        self.extract_button = QPushButton("Extract…")
        self.extract_button.setToolTip("Copy the selected files and folders out of the image")
        self.extract_button.clicked.connect(self.extract_selected)
        top.addWidget(self.filter, 1)
        top.addWidget(self.extract_button)
        fv.addLayout(top)
        split = QSplitter(Qt.Horizontal)
        self.folders = QTreeWidget()
        self.folders.setHeaderHidden(True)
        self.folders.setAccessibleName("Folders")
        self.folders.currentItemChanged.connect(self._folder_chosen)
        self.folders.itemExpanded.connect(self._expanded)
        self.model = EntryModel(self)
        self.proxy = _Filter(self)
        self.proxy.setSourceModel(self.model)
        self.proxy.setFilterCaseSensitivity(Qt.CaseInsensitive)
        self.proxy.setFilterKeyColumn(0)
        self.proxy.setSortRole(Qt.UserRole)
        self.filter.textChanged.connect(self.proxy.setFilterFixedString)
        self.files = QTreeView()
        self.files.setAccessibleName("Files")
        self.files.setRootIsDecorated(False)
        self.files.setUniformRowHeights(True)
        self.files.setSortingEnabled(True)
        self.files.sortByColumn(0, Qt.AscendingOrder)
        self.files.setSelectionMode(QAbstractItemView.ExtendedSelection)
        self.files.setModel(self.proxy)
        self.files.doubleClicked.connect(self._open_index)
        hdr = self.files.header()
        hdr.setStretchLastSection(False)
        hdr.setSectionResizeMode(0, QHeaderView.Stretch)
        for col in (1, 2, 3):
            hdr.setSectionResizeMode(col, QHeaderView.ResizeToContents)
        split.addWidget(self.folders)
        split.addWidget(self.files)
        split.setStretchFactor(1, 3)
        split.setSizes([140, 360])
        fv.addWidget(split, 1)
        self.views.addTab(files, "Files")

        changes = QWidget()
        cv = QVBoxLayout(changes)
        cv.setContentsMargins(0, 4, 0, 0)
        self.changes_note = QLabel("What this snapshot changed compared with its parent.")
        self.changes_note.setWordWrap(True)
        self.changes_extract = QPushButton("Extract…")
        self.changes_extract.clicked.connect(self.extract_changes)
        crow = QHBoxLayout()
        crow.addWidget(self.changes_note, 1)
        crow.addWidget(self.changes_extract)
        cv.addLayout(crow)
        self.changes = QTreeWidget()
        self.changes.setAccessibleName("Changes")
        self.changes.setRootIsDecorated(False)
        self.changes.setHeaderLabels(["Change", "Path"])
        self.changes.setSelectionMode(QAbstractItemView.ExtendedSelection)
        self.changes.setSortingEnabled(True)
        cv.addWidget(self.changes, 1)
        self.changes_page = changes
        self._changes_job = None
        self.views.currentChanged.connect(lambda _i: self._tab_shown())
        self.set_node(None)

    # -- what is shown ----------------------------------------------------------------------
    def set_node(self, node) -> None:
        path = node.path if node is not None and getattr(node, "accessible", True) else None
        if path == self.path and path is not None:
            return
        if self.path is not None:
            volumes.close(self.path)        # the volumes kept open for listing go with it
        self.path = path
        self.format = node.record.format if path and getattr(node, "record", None) else None
        self._loaded_for = None
        self._restore = None
        self.folder = "/"
        self._reset()
        if path is None:
            self.status.setText("Select an image to see what is inside it." if node is None
                                else "The image cannot be read.")
        elif self.isVisible():
            self.load()

    def reload(self) -> None:
        """Read the image again (a job changed it), keeping the volume and folder shown when
        they still exist."""
        if not self.path:
            return
        volumes.close(self.path)            # a job changed it: listings open it again
        if not isinstance(self._restore, tuple):      # else the layout is still being read
            folder = self._restore if isinstance(self._restore, str) else self.folder
            self._restore = (self.number, folder, self.views.currentWidget() is self.changes_page)
        self._loaded_for = None
        self._reset()
        if self.isVisible():
            self.load()

    def showEvent(self, event):
        super().showEvent(event)
        if self.path and self._loaded_for != self.path:
            self.load()
        elif self.path and self.number is not None and self._stamp is not None:
            self._list(self.folder, fill_list=False)     # changed while hidden? (then reload)

    def hideEvent(self, event):
        super().hideEvent(event)
        if self.path:
            volumes.close(self.path)        # not shown: no lock kept on it

    def _reset(self) -> None:
        self._gen += 1
        self._stamp = None
        self.layout_ = None
        self.number = None
        self.differencing = False
        self.bar.set_layout(None)
        self.volume_box.clear()
        self.folders.clear()
        self._pending = []
        self._feeder.stop()
        self.model.clear()
        self.changes.clear()
        self._changes_job = None
        i = self.views.indexOf(self.changes_page)
        if i >= 0:
            self.views.removeTab(i)

    def load(self) -> None:
        """Read the partitions of the current image (in a job)."""
        if not self.path:
            return
        self._loaded_for = self.path
        self.status.setText("Reading the partitions…")
        job = tasks.layout_job(self.path, library=self.library, format=self.format)
        gen = self._gen
        job.signals.finished.connect(lambda j, res: gen == self._gen and self._layout_read(j, res))
        job.signals.failed.connect(lambda j, msg, tb, p=self.path: gen == self._gen
                                   and self._failed(p, msg))
        self.queue.submit(job)

    def _failed(self, path, msg) -> None:
        if path == self.path:
            self.status.setText(msg)
            self.message.emit(msg)

    def _layout_read(self, job, res) -> None:
        if res["path"] != self.path:
            return
        lay = res["layout"]
        self.layout_ = lay
        self.differencing = res["differencing"]
        self.bar.set_layout(lay)
        vols = [p for p in lay.partitions if p.size > 0 and p.type not in ("0x05", "0x0f", "0x85")]
        for p in vols:
            head = f"{p.number}: " if p.number else "Whole disk: "
            label = f" “{p.label}”" if p.label else ""
            self.volume_box.addItem(f"{head}{p.filesystem or 'no file system'}{label} "
                                    f"({format_size(p.size)})", p.number)
        scheme = {"gpt": "GPT", "mbr": "MBR", "hybrid": "GPT with a hybrid MBR",
                  "none": "no partition table"}.get(lay.scheme, lay.scheme)
        text = f"{len(vols)} volume(s), {scheme}."
        if lay.problems:
            text += "\nProblems with the partition table:\n• " + "\n• ".join(lay.problems)
        self.status.setText(text)
        if self.differencing:
            self.views.addTab(self.changes_page, "Changes")
        restore, self._restore = self._restore, None
        first = next((p for p in vols if p.filesystem), None)
        if restore is not None:
            number, folder, changes = restore
            if self.differencing and changes:
                self.views.setCurrentWidget(self.changes_page)
            kept = next((p for p in vols if p.number == number and p.filesystem), None)
            if kept is not None:
                first = kept
                if folder and folder != "/":
                    self._restore = folder       # walked down in _listed
        if first is not None:
            self.select_volume(first.number)

    def select_volume(self, number) -> None:
        if number is None or self.layout_ is None:
            return
        self.number = number
        self.bar.set_selected(number)
        i = self.volume_box.findData(number)
        if i >= 0:
            self.volume_box.setCurrentIndex(i)
        self.folders.clear()
        self.model.clear()
        part = next((p for p in self.layout_.partitions if p.number == number), None)
        if part is not None and not part.filesystem:
            self.status.setText(f"Partition {number} holds no file system that vdgui reads.")
            return
        root = QTreeWidgetItem(["/"])
        root.setData(0, PATH_ROLE, "/")
        root.setChildIndicatorPolicy(QTreeWidgetItem.ShowIndicator)
        self.folders.addTopLevelItem(root)
        self.folders.setCurrentItem(root)
        root.setExpanded(True)

    def _item_for(self, folder: str):
        it = self.folders.topLevelItem(0)
        if it is None:
            return None
        for name in [p for p in folder.split("/") if p]:
            nxt = None
            for i in range(it.childCount()):
                if it.child(i).text(0) == name:
                    nxt = it.child(i)
                    break
            if nxt is None:
                return None
            it = nxt
        return it

    def _folder_chosen(self, item, _prev=None) -> None:
        if item is None:
            return
        self.list_folder(item.data(0, PATH_ROLE))

    def _expanded(self, item) -> None:
        if item.childCount() == 0 and item.data(0, PATH_ROLE + 1) is None:
            self._list(item.data(0, PATH_ROLE), fill_list=False)

    def list_folder(self, folder: str) -> None:
        """List ``folder`` of the current volume into the file list (in a job)."""
        self.folder = folder
        self._pending = []
        self._feeder.stop()
        self.model.clear()
        self._list(folder, fill_list=True)

    def _list(self, folder: str, fill_list: bool) -> None:
        if not self.path or self.number is None:
            return
        job = tasks.list_job(self.path, self.number, folder, library=self.library,
                             format=self.format)
        key = (self.path, self.number, self._gen)
        base = self._stamp                  # None: asked before the first listing came back
        job.signals.finished.connect(lambda j, res: self._listed(res, key, fill_list, base))
        job.signals.failed.connect(lambda j, msg, tb, p=self.path: key[2] == self._gen
                                   and self._failed(p, msg))
        self.queue.submit(job)

    def _listed(self, res, key, fill_list, base) -> None:
        if key != (self.path, self.number, self._gen):
            return
        if self._stamp is None:
            self._stamp = res["stamp"]
        elif base is not None and res["stamp"] != base:
            self.status.setText("The image changed since it was read; reading it again…")
            self.reload()                   # what is shown (tree, partitions) is stale
            return
        entries = res["entries"]
        item = self._item_for(res["folder"])
        if item is not None and item.data(0, PATH_ROLE + 1) is None:
            item.setData(0, PATH_ROLE + 1, True)          # children known
            dirs = sorted((e for e in entries if e.type == "dir"),
                          key=lambda e: posixpath.basename(e.path).lower())
            for e in dirs:
                child = QTreeWidgetItem([posixpath.basename(e.path)])
                child.setData(0, PATH_ROLE, e.path)
                child.setChildIndicatorPolicy(QTreeWidgetItem.ShowIndicator)
                item.addChild(child)
            if not dirs:
                item.setChildIndicatorPolicy(QTreeWidgetItem.DontShowIndicator)
        if fill_list and res["folder"] == self.folder:
            self._pending = list(entries)
            self._feed()
            if self._pending:
                self._feeder.start()
            n = len(entries)
            self.status.setText(f"{res['folder']}: {n} item(s)")
            self._walk_on(res["folder"], item)

    def _walk_on(self, folder: str, item) -> None:
        """After a reload: go one folder further towards the one shown before, if it exists."""
        target = self._restore
        if not isinstance(target, str) or item is None:
            return
        base = folder.rstrip("/") + "/"
        if target == folder or not target.startswith(base):
            self._restore = None
            return
        name = target[len(base):].split("/")[0]
        child = next((item.child(i) for i in range(item.childCount())
                      if item.child(i).text(0) == name), None)
        if child is None:                       # gone: stay in the deepest folder that is left
            self._restore = None
            return
        item.setExpanded(True)
        self.folders.setCurrentItem(child)

    def _feed(self) -> None:
        chunk, self._pending = self._pending[:SLICE], self._pending[SLICE:]
        self.model.append(chunk)
        if not self._pending:
            self._feeder.stop()

    @property
    def loading(self) -> bool:
        return bool(self._pending)

    def _open_index(self, index) -> None:
        src = self.proxy.mapToSource(index)
        e = self.model.entries[src.row()]
        if e.type == "dir":
            parent = self._item_for(self.folder)
            if parent is not None:
                parent.setExpanded(True)
                for i in range(parent.childCount()):
                    if parent.child(i).data(0, PATH_ROLE) == e.path:
                        self.folders.setCurrentItem(parent.child(i))
                        return
            self.list_folder(e.path)

    # -- changes ------------------------------------------------------------------------------
    def _tab_shown(self) -> None:
        if self.views.currentWidget() is self.changes_page and self._changes_job is None \
                and self.path:
            self.load_changes()

    def load_changes(self) -> None:
        self.changes.clear()
        self.changes_note.setText("Comparing this snapshot with its parent…")
        job = tasks.changed_job(self.path, library=self.library, format=self.format)
        self._changes_job = job
        p, gen = self.path, self._gen
        job.signals.finished.connect(lambda j, rep: gen == self._gen and self._changes_read(p, rep))
        job.signals.failed.connect(lambda j, msg, tb: p == self.path and gen == self._gen
                                   and self.changes_note.setText(msg))
        self.queue.submit(job)

    def _changes_read(self, path, rep) -> None:
        if path != self.path:
            return
        for c in rep.files:
            QTreeWidgetItem(self.changes, [c.change, c.path])
        for c in rep.metadata:
            QTreeWidgetItem(self.changes, [f"{c.change} (metadata only)", c.path])
        self.changes.sortItems(1, Qt.AscendingOrder)
        self.changes.resizeColumnToContents(0)
        notes = rep.problems + rep.not_covered
        self.changes_note.setText(
            f"{len(rep.files)} file(s) changed, {len(rep.metadata)} with metadata changes only."
            + ("\n" + "\n".join(notes) if notes else ""))

    def change_paths(self) -> list[tuple[str, str]]:
        return [(self.changes.topLevelItem(i).text(0), self.changes.topLevelItem(i).text(1))
                for i in range(self.changes.topLevelItemCount())]

    # -- extract --------------------------------------------------------------------------------
    def _pick_folder(self) -> str:
        return QFileDialog.getExistingDirectory(self, "Extract to folder")

    def selected_paths(self) -> list[str]:
        rows = self.files.selectionModel().selectedRows()
        return [self.proxy.data(r, PATH_ROLE) for r in rows]

    def extract_selected(self) -> None:
        paths = self.selected_paths() or [self.folder]
        if self.number is None:
            return
        self._extract([(self.number, p) for p in paths])

    def extract_changes(self) -> None:
        items = []
        for it in self.changes.selectedItems():
            if it.text(0).startswith("removed"):
                continue
            spec = it.text(1)
            num, _, rest = spec.partition(":") if spec[:1].isdigit() else ("0", "", spec)
            items.append((int(num), rest or "/"))
        if items:
            self._extract(items)

    def _extract(self, items) -> None:
        dest = self.pick_folder()
        if not dest or not self.path:
            return
        job = tasks.extract_job(self.path, items, dest, library=self.library,
                                format=self.format)
        job.signals.failed.connect(lambda j, msg, tb: self.message.emit(msg))
        self.extract_jobs.append(job)
        self.queue.submit(job)
