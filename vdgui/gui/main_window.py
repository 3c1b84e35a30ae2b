"""The main window: media tree (tabs per device type, search), details pane, jobs panel, actions."""
from __future__ import annotations

import html
import os
import traceback

from PySide6.QtCore import (QSettings, QSize, QSortFilterProxyModel, Qt, QTimer, QUrl,
                            Signal)
from PySide6.QtGui import QAction, QDesktopServices, QKeySequence
from PySide6.QtWidgets import (QAbstractItemView, QApplication, QCheckBox, QDialog, QDockWidget,
                               QFileDialog, QHBoxLayout, QHeaderView, QLabel, QLineEdit,
                               QMainWindow, QMenu, QMessageBox, QProgressBar, QSplitter, QTabBar,
                               QToolBar, QTreeView, QVBoxLayout, QWidget)

import vdgui
from vdgui.jobs import Job, JobQueue
from vdgui.jobs import tasks
from vdgui.vd import (CheckReport, DeviceType, Library, VDError, backends, format_size,
                      get_backend, give_new_uuid, is_network_location, is_temp_name,
                      mark_duplicates, move_refusal)

from . import actions
from .actions import SPECS, Context
from .icons import app_icon, format_icon, icon
from .models.media import (COL_ASIZE, COL_NAME, COL_VSIZE, MediaFilterProxy, MediaModel)
from .view_settings import ViewSettings
from .widgets.details import DetailsPane
from .widgets.jobs_panel import JobsPanel, check_summary

DEVICE_TABS = ((DeviceType.HARD_DISK, "&Hard disks", "hdd"),
               (DeviceType.OPTICAL, "&Optical disks", "optical"),
               (DeviceType.FLOPPY, "&Floppy disks", "floppy"))

IMAGE_FILTER_ALL = "All files (*)"


def image_file_filter() -> str:
    groups: dict[str, set[str]] = {}
    for b in backends():
        for fe in b.extensions:
            groups.setdefault(fe.device.value, set()).add(fe.ext)
    allx = sorted({e for s in groups.values() for e in s})
    parts = ["Disk images (" + " ".join(f"*.{e} *.{e.upper()}" for e in allx) + ")"] if allx else []
    names = {"hdd": "Hard disk images", "optical": "Optical disc images", "floppy": "Floppy images"}
    for dev, exts in groups.items():
        parts.append(f"{names.get(dev, dev)} (" + " ".join(f"*.{e}" for e in sorted(exts)) + ")")
    parts.append(IMAGE_FILTER_ALL)
    return ";;".join(parts)


def is_ours_temporary(path: str) -> bool:
    """Is ``path`` one of our temporaries, or inside one of our temporary folders?"""
    if is_network_location(path):
        return False
    return any(is_temp_name(part) for part in os.path.abspath(path).split(os.sep) if part)


class _NoTemporaries(QSortFilterProxyModel):
    """A file picker's view without our temporaries (even with hidden files shown)."""

    def filterAcceptsRow(self, row, parent):
        src = self.sourceModel()
        return not is_temp_name(src.fileName(src.index(row, 0, parent)))


def image_picker(parent, title: str, folder: str, name_filter: str) -> QFileDialog:
    """An "open existing files" dialog that never offers our temporaries (Qt's own dialog: a
    native one cannot be filtered)."""
    dlg = QFileDialog(parent, title, folder, name_filter)
    dlg.setOption(QFileDialog.DontUseNativeDialog, True)
    dlg.setProxyModel(_NoTemporaries(dlg))
    dlg.setFileMode(QFileDialog.ExistingFiles)
    dlg.setAcceptMode(QFileDialog.AcceptOpen)
    return dlg


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


class MainWindow(QMainWindow):
    recordsChanged = Signal()

    def __init__(self, library: Library, settings: QSettings | None = None,
                 queue: JobQueue | None = None, parent=None):
        super().__init__(parent)
        self.library = library
        self.settings = settings
        self.view_settings = ViewSettings(settings)
        self.queue = queue or JobQueue(self)
        # Qt appends the application's display name ("… — vdgui"); the version is in About
        self.setWindowTitle("Virtual Media Manager")
        self.setWindowIcon(app_icon())
        self.setAcceptDrops(True)
        self.messages: list = []           # non-modal boxes kept alive
        self._alloc_path: str | None = None
        self._alloc_cache: dict[str, dict] = {}
        self._pending_select: list[str] = []
        self.confirm = self._confirm_box   # overridable in tests
        self.repair_confirm = self._repair_dialog    # (ok, keep a backup); overridable in tests
        self.secret_prompts: dict = {}     # path -> open SecretsDialog
        self._secrets_asked: set[str] = set()

        self.model = MediaModel(self)
        self.proxy = MediaFilterProxy(self)
        self.proxy.setSourceModel(self.model)
        self._build_actions()
        self._build_ui()
        self._build_menus()
        self.queue.busyChanged.connect(self._busy_changed)
        self.queue.jobChanged.connect(self._update_status)
        self.model.modelAboutToBeReset.connect(self._save_view_state)
        self.model.modelReset.connect(self._restore_view_state)
        self._view_state = ([], [])
        self.view_settings.restore(self)
        self.update_actions()
        self._update_status()
        self._update_tab_counts()
        self.empty_hint.setVisible(True)

    # -- construction ---------------------------------------------------------------------
    def _build_actions(self) -> None:
        self.actions: dict[str, QAction] = {}
        handlers = {"add": self.add_dialog, "network": self.network_disk_dialog,
                    "create": self.create_dialog,
                    "snapshot": self.snapshot_dialog, "copy": self.copy_dialog,
                    "move": self.move_dialog, "merge": self.merge_dialog,
                    "resize": self.resize_dialog, "compact": self.compact_selected,
                    "check": lambda: self.check_selected(False),
                    "compare": self.compare_selected,
                    "repair": lambda: self.check_selected(True),
                    "remove": self.remove_selected, "delete": self.delete_selected,
                    "refresh": self.refresh, "properties": self.toggle_properties}
        for spec in SPECS + (actions.NETWORK,):
            a = QAction(icon(spec.icon), spec.text, self)
            a.setObjectName(f"action_{spec.key}")
            if spec.shortcut:
                a.setShortcut(QKeySequence(spec.shortcut))
            a.setToolTip(spec.tip)
            a.setStatusTip(spec.tip)
            a.setIconText(spec.short or spec.text.replace("&", "").rstrip("…"))
            a.triggered.connect(handlers[spec.key])
            self.actions[spec.key] = a
        self.actions["properties"].setCheckable(True)
        self.actions["refresh"].setShortcuts([QKeySequence("Ctrl+Shift+F"), QKeySequence.Refresh])
        self.action_import = QAction(icon("import"), "&Import from VirtualBox…", self)
        self.action_import.setToolTip("Add the images listed in a VirtualBox.xml or .vbox file")
        self.action_import.triggered.connect(self.import_dialog)
        self.action_quit = QAction("&Quit", self)
        self.action_quit.setShortcut(QKeySequence.Quit)
        self.action_quit.triggered.connect(self.close)
        self.action_about = QAction(app_icon(), "&About vdgui", self)
        self.action_about.triggered.connect(self.about)
        self.action_help = QAction(icon("properties"), "&Documentation", self)
        self.action_help.setShortcut(QKeySequence.HelpContents)
        self.action_help.triggered.connect(lambda: self.help_dialog("guide"))
        self.action_shortcuts = QAction("&Keyboard Shortcuts", self)
        self.action_shortcuts.triggered.connect(lambda: self.help_dialog("shortcuts"))
        self.action_clear_bad = QAction(icon("warning"), "Remove &Inaccessible Images", self)
        self.action_clear_bad.setToolTip("Forget every image whose file is missing or unreadable "
                                         "(no file is deleted)")
        self.action_clear_bad.triggered.connect(self.remove_inaccessible)
        self.action_expand = QAction("&Expand All", self)
        self.action_expand.setShortcut(QKeySequence("Ctrl+E"))
        self.action_expand.triggered.connect(lambda: self.tree.expandAll())
        self.action_search = QAction("&Search", self)
        self.action_search.setShortcut(QKeySequence.Find)
        self.action_search.triggered.connect(lambda: (self.search.setFocus(), self.search.selectAll()))
        self.addAction(self.action_search)

    def _build_ui(self) -> None:
        self.toolbar = QToolBar("Actions")
        self.toolbar.setObjectName("mainToolbar")
        self.toolbar.setToolButtonStyle(Qt.ToolButtonTextUnderIcon)
        self.toolbar.setIconSize(QSize(28, 28))
        self.toolbar.setMovable(False)
        groups = (("add", "network", "create", "snapshot"), ("copy", "move", "merge", "resize", "compact"),
                  ("check", "repair", "compare"), ("remove", "delete"), ("refresh", "properties"))
        for gi, g in enumerate(groups):
            if gi:
                self.toolbar.addSeparator()
            for k in g:
                self.toolbar.addAction(self.actions[k])
        self.addToolBar(self.toolbar)

        # left: tabs + search + tree
        self.tabs = QTabBar()
        self.tabs.setObjectName("deviceTabs")
        self.tabs.setDrawBase(False)
        self.tabs.setExpanding(False)
        for dev, text, ic in DEVICE_TABS:
            self.tabs.addTab(format_icon(ic, None), text)
        self.tabs.currentChanged.connect(self._tab_changed)
        self.proxy.set_device(DEVICE_TABS[0][0].value)
        self.search = QLineEdit()
        self.search.setObjectName("search")
        self.search.setPlaceholderText("Search by name, UUID or path  (Ctrl+F)")
        self.search.setClearButtonEnabled(True)
        self.search.setAccessibleName("Search images")
        self.search.setMinimumWidth(260)
        self.search.setMaximumWidth(360)
        self.search.textChanged.connect(self._search_changed)
        top = QHBoxLayout()
        top.setContentsMargins(0, 0, 0, 0)
        top.addWidget(self.tabs, 1)
        top.addWidget(self.search)

        self.tree = QTreeView()
        self.tree.setObjectName("mediaTree")
        self.tree.setModel(self.proxy)
        self.tree.setSortingEnabled(True)
        self.tree.sortByColumn(COL_NAME, Qt.AscendingOrder)
        self.tree.setSelectionMode(QAbstractItemView.ExtendedSelection)
        self.tree.setSelectionBehavior(QAbstractItemView.SelectRows)
        self.tree.setUniformRowHeights(True)
        self.tree.setAlternatingRowColors(True)
        self.tree.setAllColumnsShowFocus(True)
        self.tree.setContextMenuPolicy(Qt.CustomContextMenu)
        self.tree.customContextMenuRequested.connect(self._context_menu)
        self.tree.activated.connect(lambda *_: self.show_properties(True))
        self.tree.setIconSize(QSize(20, 20))
        self.tree.setAccessibleName("Media list")
        self.tree.setAccessibleDescription("Disk images; differencing images are nested under "
                                           "their parent")
        self.tree.setDragDropMode(QAbstractItemView.NoDragDrop)
        h = self.tree.header()
        h.setStretchLastSection(False)
        h.setSectionResizeMode(COL_NAME, QHeaderView.Stretch)
        for c in range(1, self.model.columnCount()):
            h.setSectionResizeMode(c, QHeaderView.Interactive)
            h.resizeSection(c, 96)
        h.resizeSection(COL_VSIZE, 92)
        h.resizeSection(COL_ASIZE, 92)
        h.resizeSection(4, 110)
        h.resizeSection(5, 124)          # the State column fits "Duplicate UUID"
        h.setDefaultAlignment(Qt.AlignLeft | Qt.AlignVCenter)
        self.tree.selectionModel().selectionChanged.connect(self._selection_changed)
        self.empty_hint = QLabel("No images yet. Use <b>Add</b> (Ctrl+Shift+A), <b>Create</b>, "
                                 "<b>File ▸ Import from VirtualBox</b>, or drop image files here.")
        self.empty_hint.setAlignment(Qt.AlignCenter)
        self.empty_hint.setWordWrap(True)
        self.empty_hint.setEnabled(False)

        left = QWidget()
        ll = QVBoxLayout(left)
        ll.setContentsMargins(6, 6, 0, 6)
        ll.setSpacing(4)
        ll.addLayout(top)
        ll.addWidget(self.tree, 1)
        ll.addWidget(self.empty_hint)

        self.details = DetailsPane()
        self.details.setObjectName("details")
        self.details.setAccessibleName("Image details")
        self.details.applyRequested.connect(self.apply_details)
        self.details.newUuidRequested.connect(self.new_uuid)
        self.details.propertiesSaved.connect(self.save_properties)
        self.splitter = QSplitter(Qt.Horizontal)
        self.splitter.setObjectName("mainSplitter")
        self.splitter.addWidget(left)
        self.splitter.addWidget(self.details)
        self.splitter.setStretchFactor(0, 3)
        self.splitter.setStretchFactor(1, 2)
        self.splitter.setChildrenCollapsible(False)
        self.splitter.setSizes([720, 460])
        self.setCentralWidget(self.splitter)

        self.jobs_panel = JobsPanel(self.queue)
        self.jobs_dock = QDockWidget("Jobs", self)
        self.jobs_dock.setObjectName("jobsDock")
        self.jobs_dock.setWidget(self.jobs_panel)
        self.jobs_dock.setFeatures(QDockWidget.DockWidgetClosable | QDockWidget.DockWidgetMovable)
        self.addDockWidget(Qt.BottomDockWidgetArea, self.jobs_dock)
        self.jobs_panel.showRequested.connect(self.jobs_dock.show)
        self.resizeDocks([self.jobs_dock], [self.jobs_panel.sizeHint().height()], Qt.Vertical)

        self.status_images = QLabel()
        self.status_jobs = QLabel()
        self.status_bar = QProgressBar()
        self.status_bar.setMaximumWidth(160)
        self.status_bar.setMaximumHeight(14)
        self.status_bar.setRange(0, 1000)
        self.status_bar.setTextVisible(False)
        self.statusBar().addWidget(self.status_images, 1)
        self.statusBar().addPermanentWidget(self.status_jobs)
        self.statusBar().addPermanentWidget(self.status_bar)
        self.show_properties(True)

    def _build_menus(self) -> None:
        mb = self.menuBar()
        self.menus: dict[str, QMenu] = {}
        m = self.menus["file"] = mb.addMenu("&File")
        m.addAction(self.actions["add"])
        m.addAction(self.actions["network"])
        m.addAction(self.actions["create"])
        m.addAction(self.action_import)
        self.recent_menu = m.addMenu("Open &Recent")
        self.recent_menu.aboutToShow.connect(self._fill_recent)
        m.addSeparator()
        m.addAction(self.action_quit)
        m = self.menus["image"] = mb.addMenu("&Image")
        for k in ("snapshot", "copy", "move", "merge", "resize", "compact", None, "check", "repair",
                  "compare", None, "remove", "delete", None, "properties"):
            if k is None:
                m.addSeparator()
            else:
                m.addAction(self.actions[k])
        m.addSeparator()
        m.addAction(self.action_clear_bad)
        for menu in mb.findChildren(QMenu):
            menu.setToolTipsVisible(True)
        m = self.menus["view"] = mb.addMenu("&View")
        m.addAction(self.actions["refresh"])
        m.addAction(self.action_expand)
        m.addAction(self.action_search)
        m.addSeparator()
        ja = self.jobs_dock.toggleViewAction()
        ja.setText("&Jobs Panel")
        ja.setShortcut(QKeySequence("Ctrl+J"))
        m.addAction(ja)
        m = self.menus["help"] = mb.addMenu("&Help")
        m.addAction(self.action_help)
        m.addAction(self.action_shortcuts)
        m.addSeparator()
        m.addAction(self.action_about)

    # -- settings (view_settings.ViewSettings keeps them) ------------------------------------
    def save_settings(self) -> None:
        self.view_settings.save(self)

    def last_folder(self) -> str:
        f = self.view_settings.last_folder()
        if f:
            return f
        node = self.current_node()
        if node is not None:
            return os.path.dirname(node.path)
        return os.path.expanduser("~")

    def remember_folder(self, path: str) -> None:
        self.view_settings.remember_folder(path)

    # -- loading --------------------------------------------------------------------------
    def load_library(self, sync: bool = False) -> Job | None:
        """Show the library's images: read them all (in the background unless ``sync``)."""
        if sync:
            recs = self.library.scan_all()
            self.model.set_records(recs)
            self._after_records()
            return None
        return self._run_scan(None)

    def add_paths(self, paths: list[str], *, sync: bool = False, select: bool = True) -> Job | None:
        """Add image files (and their parents); XML files are VirtualBox registries."""
        images, registries = [], []
        skipped = [p for p in paths if is_ours_temporary(p)]
        for p in paths:
            if p not in skipped:
                (registries if _is_vbox_registry(p) else images).append(location(p))
        if skipped:
            self.statusBar().showMessage(f"Not added: {len(skipped)} temporary file(s) of vdgui",
                                         5000)
        for r in registries:
            try:
                images += self.library.import_virtualbox(r)
            except VDError as exc:
                self.error_message("Cannot import from VirtualBox", exc.message)
        if not images:
            return None
        for p in images:
            self.library.touch_recent(p)
        if not is_network_location(images[0]):
            self.remember_folder(images[0])
        if select:
            self._pending_select = [images[0]]
        if sync:
            recs = []
            for p in images:
                recs += self.library.add_with_parents(p)
            self._records_arrived(recs)
            return None
        return self._run_scan(images)

    def add_network_image(self, location: str, format: str, properties: dict, *,
                          remember_secrets: bool = False) -> Job | None:
        """Add a non-file image (``scheme://…`` location) opened with ``properties`` as its
        backend configuration (e.g. the values of a ConfigForm). For "Add network disk…".
        Secrets (BYTES values) reach the library file only with ``remember_secrets``; otherwise
        they are kept in memory for this session."""
        self.library.add(location, format=format)
        self.library.set_properties(location, properties, remember_secrets=remember_secrets)
        self._secrets_asked.discard(location)
        return self.add_paths([location])

    def network_disk_dialog(self):
        from .dialogs.network_disk import NetworkDiskDialog
        dlg = NetworkDiskDialog(self, queue=self.queue)
        accepted = dlg.exec() == QDialog.Accepted
        p = dlg.params() if accepted else None
        dlg.deleteLater()          # a connection test still running reports to nobody
        if p is None:
            return None
        return self.add_network_image(p["location"], p["format"], p["properties"],
                                      remember_secrets=p["remember_secrets"])

    def ask_secrets(self, path: str):
        """Prompt (non-modal) for the secrets of a network image that were not remembered."""
        from .dialogs.network_disk import SecretsDialog
        if path in self.secret_prompts:
            self.secret_prompts[path].raise_()
            return self.secret_prompts[path]
        node = self.model.node(path)
        rec = node.record if node is not None else None
        missing = self.library.missing_secrets(path)
        if rec is None or not rec.format or not missing:
            return None
        try:
            backend = get_backend(rec.format)
        except VDError:
            return None
        self._secrets_asked.add(path)
        dlg = SecretsDialog(rec.name, backend, missing, self, path=path)
        dlg.setAttribute(Qt.WA_DeleteOnClose)
        self.secret_prompts[path] = dlg
        dlg.finished.connect(self._secrets_entered)
        dlg.open()
        return dlg

    def _secrets_entered(self, result) -> None:
        dlg = self.sender()
        path = dlg.path
        self.secret_prompts.pop(path, None)
        if result == QDialog.Accepted:
            self.library.set_secrets(path, dlg.secrets(), remember=dlg.remember.isChecked())
            self._rescan([path])

    def _prompt_missing_secrets(self, recs) -> None:
        for rec in recs:
            if (not rec.accessible and is_network_location(rec.path)
                    and rec.path not in self._secrets_asked
                    and self.library.missing_secrets(rec.path)):
                self.ask_secrets(rec.path)

    def _run_scan(self, paths) -> Job:
        job = tasks.scan_job(self.library, paths)
        job.signals.finished.connect(lambda j, recs: self._records_arrived(recs, full=paths is None))
        job.signals.failed.connect(self._job_failed)
        self.statusBar().showMessage("Reading images…", 2000)
        return self.queue.submit(job)

    def _records_arrived(self, recs, full: bool = False) -> None:
        if full:
            self.model.set_records(recs)
        else:
            self.model.update_records(recs)
        # duplicate UUIDs across everything listed (a new copy also marks the image it copies)
        self.model.refresh_paths(mark_duplicates(self.model.records(), self.library))
        self._after_records()
        self._prompt_missing_secrets(recs)

    def _after_records(self) -> None:
        if self._pending_select:
            # select what a job created once it is listed (another scan may land first)
            present = [p for p in self._pending_select if self.model.node(p) is not None]
            if present:
                self._pending_select = []
                self.select_paths(present)
        self._update_tab_counts()
        self._busy_changed()
        n = self.current_node()
        if n is not None:
            self.details.set_node(n, self.library.properties(n.path))
            self._request_allocation(n)
        elif self.details.node is not None and self.model.node(self.details.node.path) is None:
            self._selection_changed()   # rows removed: Qt sends no selectionChanged for that
        self.empty_hint.setVisible(not self.model.nodes())
        self.recordsChanged.emit()

    def refresh(self) -> Job:
        self._alloc_cache.clear()
        return self.load_library()

    # -- view state -----------------------------------------------------------------------
    def _save_view_state(self) -> None:
        sel = [n.path for n in self.selected_nodes()]
        expanded = []
        for n in self.model.nodes():
            idx = self.proxy.mapFromSource(self.model.index_for(n))
            if idx.isValid() and self.tree.isExpanded(idx):
                expanded.append(n.path)
        self._view_state = (sel, expanded)

    def _restore_view_state(self) -> None:
        sel, expanded = self._view_state
        # new chains open expanded; known ones keep their state
        for n in self.model.nodes():
            if n.children:
                idx = self.proxy.mapFromSource(self.model.index_for(n))
                self.tree.setExpanded(idx, True)
        if sel:
            self.select_paths(sel)

    def select_paths(self, paths: list[str]) -> None:
        sm = self.tree.selectionModel()
        first = True
        for p in paths:
            node = self.model.node(p)
            if node is None:
                continue
            dev = node.root().record.device_type
            for i, (d, _, _) in enumerate(DEVICE_TABS):
                if d.value == dev and self.tabs.currentIndex() != i and first:
                    self.tabs.setCurrentIndex(i)
            idx = self.proxy.index_for_path(p)
            if not idx.isValid():
                continue
            parent = idx.parent()
            while parent.isValid():
                self.tree.expand(parent)
                parent = parent.parent()
            flags = sm.SelectionFlag.Rows | (sm.SelectionFlag.ClearAndSelect if first else sm.SelectionFlag.Select)
            sm.select(idx, flags)
            if first:
                sm.setCurrentIndex(idx, sm.SelectionFlag.NoUpdate)
                self.tree.scrollTo(idx)
            first = False

    def _tab_changed(self, i: int) -> None:
        self.proxy.set_device(DEVICE_TABS[i][0].value if 0 <= i < len(DEVICE_TABS) else None)
        self.tree.expandAll()
        self._selection_changed()

    def _search_changed(self, text: str) -> None:
        self.proxy.set_search(text)
        self.tree.expandAll()

    def _update_tab_counts(self) -> None:
        counts = {d.value: 0 for d, _, _ in DEVICE_TABS}
        for n in self.model.nodes():
            dev = n.root().record.device_type
            counts[dev] = counts.get(dev, 0) + 1
        for i, (d, text, _) in enumerate(DEVICE_TABS):
            c = counts.get(d.value, 0)
            self.tabs.setTabText(i, f"{text} ({c})" if c else text)
        nodes = self.model.nodes()
        bad = sum(1 for n in nodes if not n.accessible)
        self.action_clear_bad.setEnabled(bad > 0)
        self.status_images.setText(f"{len(nodes)} image(s)" + (f", {bad} inaccessible" if bad else ""))

    # -- selection and actions ------------------------------------------------------------
    def selected_nodes(self) -> list:
        rows = self.tree.selectionModel().selectedRows(0)
        out = []
        for idx in rows:
            n = self.proxy.node_from_index(idx)
            if n is not None:
                out.append(n)
        return out

    def current_node(self):
        nodes = self.selected_nodes()
        return nodes[0] if len(nodes) == 1 else None

    def context(self) -> Context:
        return Context(busy=self.queue.busy_paths())

    def update_actions(self) -> None:
        nodes = self.selected_nodes()
        ctx = self.context()
        for spec in SPECS:
            a = self.actions[spec.key]
            r = actions.reason(spec.key, nodes, ctx)
            a.setEnabled(r is None)
            tip = spec.tip if r is None else f"{spec.tip}. Unavailable: {r}"
            shortcut = a.shortcut().toString(QKeySequence.NativeText)
            a.setToolTip(f"{tip} ({shortcut})" if shortcut and r is None else tip)
            a.setStatusTip(tip)
        self._update_network_action()
        self.details.set_context(ctx)

    def _update_network_action(self) -> None:
        spec = actions.NETWORK
        a = self.actions[spec.key]
        r = actions.reason(spec.key, [])
        a.setEnabled(r is None)
        a.setToolTip(spec.tip if r is None else f"{spec.tip}. Unavailable: {r}")
        a.setStatusTip(a.toolTip())

    def _selection_changed(self, *_):
        self.update_actions()
        node = self.current_node()
        if node is None:
            n = len(self.selected_nodes())
            self.details.set_node(None)
            if n > 1:
                self.details.head_title.setText(f"{n} images selected")
                self.details.head_sub.setText("Compact, check, repair, remove and delete work on "
                                              "several images at once.")
            return
        self.details.set_node(node, self.library.properties(node.path))
        self._request_allocation(node)

    def _request_allocation(self, node) -> None:
        if not node.accessible or not self.details.isVisible():
            return
        cached = self._alloc_cache.get(node.path)
        if cached and cached.get("mtime") == _mtime(node.path):
            self.details.set_allocation(node.path, cached["size"], cached["extents"], cached["members"])
            return
        self._alloc_path = node.path
        job = tasks.allocation_job(node.path, library=self.library, format=node.record.format,
                                   config=(self.library.properties(node.path) or None)
                                   if is_network_location(node.path) else None)
        job.signals.finished.connect(self.show_allocation)
        job.signals.failed.connect(lambda j, msg, tb: self.details.set_allocation_error(
            node.path, f"Cannot read the allocation map: {msg}"))
        self.queue.submit(job)

    def show_allocation(self, job, res) -> None:
        """An allocation job's result: cached and shown in the details."""
        res["mtime"] = _mtime(res["path"])
        self._alloc_cache[res["path"]] = res
        self.details.set_allocation(res["path"], res["size"], res["extents"], res["members"])

    def _busy_changed(self) -> None:
        busy: dict[str, str] = {}
        for j in self.queue.active():
            if j.visible:
                for p in j.paths:
                    busy.setdefault(p, j.title)
        self.model.set_busy(busy)
        self.update_actions()
        self._update_status()

    def _update_status(self, *_):
        running = self.queue.visible_active()
        if not running:
            self.status_jobs.setText("No jobs running")
            self.status_bar.setVisible(False)
            return
        total = sum(j.total for j in running)
        done = sum(j.done for j in running)
        frac = done / total if total else 0.0
        self.status_jobs.setText(f"{len(running)} job(s) running — {int(frac * 100)} %")
        self.status_bar.setVisible(True)
        self.status_bar.setValue(int(frac * 1000))

    def _context_menu(self, pos) -> None:
        idx = self.tree.indexAt(pos)
        m = QMenu(self)
        if idx.isValid():
            for k in ("properties", None, "snapshot", "copy", "move", "merge", "resize", "compact",
                      None, "check", "repair", "compare", None, "remove", "delete"):
                if k is None:
                    m.addSeparator()
                else:
                    m.addAction(self.actions[k])
            m.addSeparator()
            node = self.proxy.node_from_index(idx)
            if node is not None:
                if not is_network_location(node.path):
                    folder = m.addAction("Open Containing &Folder")
                    folder.triggered.connect(lambda: QDesktopServices.openUrl(
                        QUrl.fromLocalFile(os.path.dirname(node.path))))
                if is_network_location(node.path) and self.library.missing_secrets(node.path):
                    secrets = m.addAction(icon("network"), "Enter &Secrets…")
                    secrets.triggered.connect(lambda: self.ask_secrets(node.path))
                if actions.way_out("resize", node) == "convert":
                    conv = m.addAction(icon("copy"), "Convert to a &Resizable Copy…")
                    conv.setToolTip(actions.reason("resize", [node], self.context()) or "")
                    conv.triggered.connect(self.copy_dialog)
                copy_path = m.addAction("Copy &Path")
                copy_path.triggered.connect(lambda: QApplication.clipboard().setText(node.path))
                if node.record.uuid:
                    copy_uuid = m.addAction("Copy &UUID")
                    copy_uuid.triggered.connect(lambda: QApplication.clipboard().setText(node.record.uuid))
        else:
            for k in ("add", "create", "refresh"):
                m.addAction(self.actions[k])
        m.setToolTipsVisible(True)
        m.popup(self.tree.viewport().mapToGlobal(pos))
        return m

    def _fill_recent(self) -> None:
        self.recent_menu.clear()
        recent = self.library.recent()
        if not recent:
            a = self.recent_menu.addAction("No recent images")
            a.setEnabled(False)
            return
        for p in recent:
            a = self.recent_menu.addAction(p)
            a.setEnabled(os.path.exists(p))
            a.triggered.connect(lambda checked=False, p=p: self.add_paths([p]))
        self.recent_menu.addSeparator()
        self.recent_menu.addAction("Clear List", self.library.clear_recent)

    # -- jobs -----------------------------------------------------------------------------
    def start_job(self, job: Job, on_done=None) -> Job:
        job.signals.failed.connect(self._job_failed)
        if on_done is not None:
            job.signals.finished.connect(lambda j, res: on_done(res))
        job.signals.cancelled.connect(lambda j: self.statusBar().showMessage(f"Cancelled: {j.title}", 5000))
        self.jobs_dock.show()
        return self.queue.submit(job)

    def _job_failed(self, job: Job, message, tb) -> None:
        if tb:
            self.messages.append(show_crash(self, f"{job.title} failed unexpectedly: {message}", tb))
        else:
            self.statusBar().showMessage(f"Failed: {job.title}: {message}", 10000)
        # what was touched may have changed
        paths = [p for p in job.paths if self.model.node(p) is not None]
        if paths and job.kind not in ("scan", "allocation"):
            self._rescan(paths)

    def _rescan(self, paths) -> Job | None:
        """Re-read images after a job; never brings back an image that is gone and forgotten."""
        known = set(self.library.paths())
        paths = [p for p in paths if p and (p in known or os.path.lexists(p))]
        if not paths:
            return None
        for p in paths:
            self._alloc_cache.pop(p, None)
            node = self.model.node(p)
            for c in node.descendants() if node is not None else ():
                self._alloc_cache.pop(c.path, None)     # their pictures show this image too
        return self._run_scan(list(dict.fromkeys(paths)))

    def chain_key(self, node) -> str:
        return node.root().path

    def error_message(self, title: str, text: str) -> None:
        box = QMessageBox(QMessageBox.Warning, title, text, QMessageBox.Ok, self)
        box.setAttribute(Qt.WA_DeleteOnClose)
        box.setModal(False)
        box.show()
        self.messages.append(box)

    # -- action handlers ------------------------------------------------------------------
    def add_picker(self) -> QFileDialog:
        return image_picker(self, "Add Disk Images", self.last_folder(), image_file_filter())

    def add_dialog(self) -> None:
        dlg = self.add_picker()
        try:
            paths = dlg.selectedFiles() if dlg.exec() == QDialog.Accepted else []
        finally:
            dlg.deleteLater()
        if paths:
            self.add_paths(paths)

    def import_dialog(self) -> None:
        start = virtualbox_settings_start() or self.last_folder()
        path, _ = QFileDialog.getOpenFileName(self, "Import from VirtualBox", start,
                                              "VirtualBox settings (VirtualBox.xml *.vbox *.xml);;"
                                              + IMAGE_FILTER_ALL)
        if path:
            self.import_virtualbox(path)

    def import_virtualbox(self, path: str) -> Job | None:
        try:
            paths = self.library.import_virtualbox(path)
        except VDError as exc:
            self.error_message("Cannot import from VirtualBox", exc.message)
            return None
        self.statusBar().showMessage(f"Imported {len(paths)} image(s) from {path}", 5000)
        return self._run_scan(None)

    def create_dialog(self, *, previous: dict | None = None):
        from .dialogs.create import CreateDialog
        tab = self.tabs.currentIndex()
        device = DEVICE_TABS[tab][0].value if 0 <= tab < len(DEVICE_TABS) else None
        dlg = CreateDialog(self.last_folder(), self, device=device)
        p = self.run_dialog(dlg, previous)
        return None if p is None else self.start_create(p)

    def start_create(self, p: dict) -> Job:
        job = tasks.create_job(p["location"], p["size"], p["format"], flags=p["flags"],
                               config=p.get("config"), comment=p.get("comment"))
        self.remember_folder(p["location"])
        self._pending_select = [p["location"]]
        self.retry_on_failure(job, f"Creating {os.path.basename(p['location'])} failed",
                              lambda: self.create_dialog(previous=p))
        return self.start_job(job, lambda res: self._rescan(res))

    # A job started from a dialog can fail after the dialog closed. Every such dialog has
    # set_params (and params), its x_dialog(previous=...) fills it with what was chosen, and
    # its start_x registers the way back with retry_on_failure: one mechanism for all.
    def run_dialog(self, dlg, previous: dict | None = None) -> dict | None:
        """Show ``dlg`` filled with ``previous`` (if any); its params when accepted."""
        if previous is not None:
            dlg.set_params(previous)
        if dlg.exec() != QDialog.Accepted:
            return None
        return dlg.params()

    def retry_on_failure(self, job: Job, title: str, reopen) -> None:
        """When ``job`` fails with an engine error (not a bug), offer "Change and Retry…",
        which calls ``reopen()``: the dialog again, filled with the same choices."""
        job.signals.failed.connect(
            lambda j, msg, tb: None if tb else self.offer_retry(title, msg, reopen))

    def _dialog_node(self, path: str | None):
        """The image a dialog is for: the one at ``path`` (a retry: looked up again, the list
        may have been refreshed meanwhile), else the current one."""
        if path is None:
            return self.current_node()
        node = self.model.node(path)
        if node is None:
            self.error_message("Cannot retry", f"{path} is no longer in the list.")
        return node

    def offer_retry(self, title: str, message: str, reopen) -> QMessageBox:
        """A job from a dialog failed: say why, and offer the dialog again with what was
        typed, so nothing has to be entered twice."""
        box = QMessageBox(QMessageBox.Warning, title, html.escape(str(message)),
                          QMessageBox.Close, self)
        box.setObjectName("retryBox")
        again = box.addButton("Change and Retry…", QMessageBox.AcceptRole)
        again.setObjectName("retryButton")
        again.clicked.connect(lambda _=False: QTimer.singleShot(0, reopen))
        box.setAttribute(Qt.WA_DeleteOnClose)
        box.setModal(False)
        box.show()
        self.messages.append(box)
        return box

    def snapshot_dialog(self, *, path: str | None = None, previous: dict | None = None):
        from .dialogs.create import CreateDiffDialog
        node = self._dialog_node(path)
        if node is None:
            return None
        p = self.run_dialog(CreateDiffDialog(node, self), previous)
        return None if p is None else self.start_snapshot(node, p)

    def start_snapshot(self, node, p: dict) -> Job:
        job = tasks.create_diff_job(p["parent"], p["location"], p["format"], library=self.library,
                                    comment=p["comment"], key=self.chain_key(node))
        self._pending_select = [p["location"]]
        self.retry_on_failure(job, f"Creating {os.path.basename(p['location'])} failed",
                              lambda: self.snapshot_dialog(path=node.path, previous=p))
        return self.start_job(job, lambda res: self._rescan(res))

    def copy_dialog(self, *, path: str | None = None, previous: dict | None = None):
        from .dialogs.copy import CopyDialog
        node = self._dialog_node(path)
        if node is None:
            return None
        dlg = CopyDialog(node, self)
        if is_network_location(node.path):
            # a network disk has no folder: copy into the last folder used, named after it
            from .dialogs.common import unique_path
            b = dlg.backend()
            stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in node.name).strip("._")
            dlg.location.set_path(unique_path(self.last_folder(), f"{stem or 'disk'}_copy",
                                              b.default_extension() if b else ""))
        p = self.run_dialog(dlg, previous)
        return None if p is None else self.start_copy(node, p)

    def start_copy(self, node, p: dict) -> Job:
        chain = [n.path for n in node.ancestors()]
        kw = dict(p["kwargs"])
        if is_network_location(node.path) and "src_config" not in kw:
            kw["src_config"] = self.library.properties(node.path) or None   # network disk
        job = tasks.copy_job(p["src"], p["dst"], p["dst_format"], key=self.chain_key(node),
                             paths=chain, **kw)
        if is_network_location(node.path):   # name a network source by its shown name, not its LUN
            job.title = f"{job.title.split(' ', 1)[0]} {node.name} → {os.path.basename(p['dst'])}"
        self._pending_select = [p["dst"]]
        self.retry_on_failure(job, f"Copying {node.name} failed",
                              lambda: self.copy_dialog(path=node.path, previous=p))
        return self.start_job(job, lambda res: self._rescan(list(res or [p["dst"]])))

    def move_dialog(self, *, path: str | None = None, previous: dict | None = None):
        node = self._dialog_node(path)
        if node is None:
            return None
        dst, _ = QFileDialog.getSaveFileName(self, f"Move {node.name}",
                                             (previous or {}).get("dst") or node.path)
        if not dst or os.path.abspath(dst) == node.path:
            return None
        return self.start_move(node, dst)

    def start_move(self, node, dst: str) -> Job | None:
        """Move after checking that the chain keeps its links there (nothing is touched when
        not: the reason and what to do instead are shown)."""
        src = node.path
        dst = os.path.abspath(dst)
        try:
            why = move_refusal(src, dst, format=node.record.format or None)
        except VDError as exc:
            why = exc.message
        if why:
            self.error_message(f"Cannot move {node.name} there", why)
            return None
        deps = [c.path for c in node.descendants()]

        def moved(res):
            self.library.rename(src, dst)
            self.model.remove_paths([src])
            self._pending_select = [dst]
            self._rescan([dst] + deps)
        job = tasks.move_job(src, dst, key=self.chain_key(node))
        self.retry_on_failure(job, f"Moving {node.name} failed",
                              lambda: self.move_dialog(path=src, previous={"dst": dst}))
        return self.start_job(job, moved)

    def merge_dialog(self, *, path: str | None = None, previous: dict | None = None):
        from .dialogs.merge import MergeDialog
        node = self._dialog_node(path)
        if node is None:
            return None
        p = self.run_dialog(MergeDialog(node, self, busy=self.queue.busy_paths()), previous)
        return None if p is None else self.start_merge(node, p)

    def start_merge(self, node, p: dict) -> Job:
        deleted = p["deleted"]
        others = [x for x in p["paths"] if x not in deleted]
        deps = [c.path for n in p["paths"] if self.model.node(n) for c in self.model.node(n).descendants()
                if c.path not in deleted]

        def merged(res):
            for d in deleted:
                if not os.path.exists(d):
                    self.library.remove(d)
            self.model.remove_paths([d for d in deleted if not os.path.exists(d)])
            self._pending_select = [p["target"]]
            self._rescan(list(dict.fromkeys(others + deps + [d for d in deleted if os.path.exists(d)])))
        job = tasks.merge_job(p["source"], p["target"], key=self.chain_key(node), paths=p["paths"])
        self.retry_on_failure(job, f"Merging {os.path.basename(p['source'])} failed",
                              lambda: self.merge_dialog(path=node.path, previous=p))
        return self.start_job(job, merged)

    def resize_dialog(self, *, path: str | None = None, previous: dict | None = None):
        from .dialogs.resize import ResizeDialog
        node = self._dialog_node(path)
        if node is None:
            return None
        dlg = ResizeDialog(node, self, used=self._used_end(node), library=self.library)
        p = self.run_dialog(dlg, previous)
        if p is None or not self.confirm_resize(node, p["size"], dlg.used):
            return None
        return self.start_resize(node, p["size"])

    def confirm_resize(self, node, size: int, used: int | None = None) -> bool:
        """The checks of the Resize dialog for a size from anywhere (dialog, details pane); a
        shrink always asks, naming what is cut and whether data lies there."""
        from .dialogs.resize import resize_problems, shrink_text, used_end
        current = node.record.virtual_size or 0
        if used is None:
            used = self._used_end(node)
        if used is None and size < current:
            used, _err = used_end(node.path, self.library)
        errors, _warnings = resize_problems(node, size, used)
        if errors:
            self.error_message(f"Cannot resize {node.name}", "<br>".join(html.escape(e) for e in errors))
            return False
        if size < current:
            ok, _ = self.confirm(f"Shrink {node.name}", shrink_text(node, size, used),
                                 f"Shrink to {format_size(size)}", None)
            return ok
        return True

    def _used_end(self, node) -> int | None:
        from vdgui.vd import Alloc
        c = self._alloc_cache.get(node.path)
        if not c or c.get("mtime") != _mtime(node.path):
            return None
        last = 0
        for e in c["extents"]:
            if e.status == Alloc.DATA:
                last = e.end
        return last

    def start_resize(self, node, size: int) -> Job:
        job = tasks.resize_job(node.path, size, format=node.record.format, key=self.chain_key(node))
        self.retry_on_failure(job, f"Resizing {node.name} failed",
                              lambda: self.resize_dialog(path=node.path, previous={"size": size}))
        return self.start_job(job, lambda res: self._rescan([node.path]))

    def compact_selected(self) -> list[Job]:
        out = []
        for node in self.selected_nodes():
            job = tasks.compact_job(node.path, format=node.record.format, key=self.chain_key(node))
            out.append(self.start_job(job, lambda res, p=node.path: self._rescan([p])))
        return out

    def compare_selected(self) -> Job | None:
        nodes = self.selected_nodes()
        if len(nodes) != 2:
            return None
        a, b = nodes
        job = tasks.compare_job(a.path, b.path, formats=(a.record.format, b.record.format),
                                keys=[self.chain_key(a), self.chain_key(b)])
        return self.start_job(job, lambda res: self._compare_done(a.name, b.name, res))

    def _compare_done(self, a: str, b: str, res) -> QMessageBox:
        if res.identical:
            text = f"<b>{html.escape(a)}</b> and <b>{html.escape(b)}</b> read the same."
            if res.size_mismatch:
                text += (f"<br>Their sizes differ ({format_size(res.sizes[0])} and "
                         f"{format_size(res.sizes[1])}); the larger one reads zeroes past the "
                         "end of the smaller.")
            ic = QMessageBox.Information
        else:
            text = (f"<b>{html.escape(a)}</b> and <b>{html.escape(b)}</b> differ. The first "
                    f"difference is at offset {res.offset:,} ({format_size(res.offset)} into "
                    "the disk).")
            ic = QMessageBox.Warning
        box = QMessageBox(ic, "Compare result", text, QMessageBox.Ok, self)
        box.setObjectName("compareResult")
        box.setAttribute(Qt.WA_DeleteOnClose)
        box.setModal(False)
        box.show()
        self.messages.append(box)
        return box

    def check_selected(self, repair: bool = False) -> list[Job]:
        """Check; or, for a repair, a dry run first whose findings the user confirms."""
        out = []
        for node in self.selected_nodes():
            if repair:
                job = self._repair_job(node, dry_run=True)
                out.append(self.start_job(job, lambda res, n=node: self._repair_findings(n, res)))
                continue
            job = tasks.check_job(node.path, repair=repair, format=node.record.format,
                                  key=self.chain_key(node))
            out.append(self.start_job(job, lambda res, n=node, j=job: self._check_done(n, res, repair)))
        return out

    def _repair_job(self, node, *, dry_run: bool, backup: bool = False) -> Job:
        from vdgui.vd import check
        path, fmt = node.path, node.record.format

        def fn(progress):
            return check(path, format=fmt, repair=True, dry_run=dry_run, backup=backup,
                         progress=progress)
        title = (f"Check {node.name} before repairing" if dry_run else f"Repair {node.name}"
                 + (" (with a backup)" if backup else ""))
        return Job(title, fn, keys=[self.chain_key(node)], paths=[path],
                   kind="check" if dry_run else "repair")

    def _repair_findings(self, node, report) -> Job | None:
        """The dry run's findings: nothing to do, or ask (findings, effects, backup) first."""
        if not isinstance(report, CheckReport):
            return None
        if not report.problems:
            self._check_done(node, report, False)
            return None
        answer = self.repair_confirm(node, report)
        if not answer or not answer[0]:
            self.statusBar().showMessage(f"Repair of {node.name} cancelled; nothing was changed", 8000)
            return None
        job = self._repair_job(node, dry_run=False, backup=answer[1])
        return self.start_job(job, lambda res, n=node: self._check_done(n, res, True))

    def _repair_dialog(self, node, report) -> tuple[bool, bool]:
        from .dialogs.repair import RepairDialog
        dlg = RepairDialog(node, report, self)
        ok = dlg.exec() == QDialog.Accepted
        backup = dlg.keep_backup()
        dlg.deleteLater()
        return ok, backup

    def _check_done(self, node, report, repair: bool) -> QMessageBox | None:
        if not isinstance(report, CheckReport):
            if repair:
                self._rescan([node.path])
            return None
        # the result is on the image: its state column says Corrupt / Leaks until it changes
        left = [p for p in report.problems if not p.repaired]
        state = ("corrupt" if report.corrupt and left else
                 "leaks" if report.leaks and left else None)
        note = check_summary(report) if state else ""
        self.library.set_health(node.path, state, note)
        if repair:
            self._rescan([node.path])
        elif self.model.node(node.path) is not None:
            rec = self.model.node(node.path).record
            rec.health, rec.health_note = state, note
            self.model.update_records([rec])
            self._after_records()
        if not report.problems:
            self.statusBar().showMessage(f"{node.name}: no problems found", 8000)
            text = f"<b>{html.escape(node.name)}</b>: no problems found."
            ic = QMessageBox.Information
        else:
            lines = [f"{'✔ repaired: ' if p.repaired else ''}{p.severity}: {html.escape(p.what)}"
                     for p in report.problems[:50]]
            more = len(report.problems) - 50
            state = ("corrupt" if report.corrupt else "has leaked blocks" if report.leaks
                     else "repaired")
            text = (f"<b>{html.escape(node.name)}</b> {state}.<br><br>" + "<br>".join(lines)
                    + (f"<br>… and {more} more" if more > 0 else ""))
            if report.corrupt and not repair and actions.reason("repair", [node], self.context()) is None:
                text += "<br><br><b>Repair…</b> shows what each fix does before anything changes."
            ic = QMessageBox.Warning if report.corrupt else QMessageBox.Information
        if repair and report.backup:
            text += f"<br><br>Backup of the image before the repair: {html.escape(report.backup)}"
        if repair and report.orphans_file:
            text += (f"<br><br>Unreferenced data saved to {html.escape(report.orphans_file)} "
                     "(index: the .json beside it)")
        box = QMessageBox(ic, "Repair result" if repair else "Check result", text, QMessageBox.Ok, self)
        box.setObjectName("checkResult")
        if (not repair and state is not None
                and actions.reason("repair", [node], self.context()) is None):
            fix = box.addButton("Repair…", QMessageBox.ActionRole)
            fix.setObjectName("repairButton")
            fix.clicked.connect(lambda _=False, p=node.path: self._repair_path(p))
        box.setAttribute(Qt.WA_DeleteOnClose)
        box.setModal(False)
        box.show()
        self.messages.append(box)
        return box

    def _repair_path(self, path: str):
        """Repair… from a check result: the same confirmation as the Repair action."""
        if self.model.node(path) is None:
            return None
        self.select_paths([path])
        return self.check_selected(True)

    def remove_selected(self) -> list[str]:
        nodes = self.selected_nodes()
        paths = []
        for n in nodes:
            paths += [n.path] + [c.path for c in n.descendants()]
        paths = list(dict.fromkeys(paths))
        for p in paths:
            self.library.remove(p)
        self.model.remove_paths(paths)
        self._after_records()
        extra = len(paths) - len(nodes)
        self.statusBar().showMessage(
            f"Removed {len(nodes)} image(s) from the list"
            + (f" with {extra} differencing image(s) that depend on them" if extra else "")
            + "; the files stay on disk", 8000)
        return paths

    def remove_inaccessible(self) -> list[str]:
        bad = [n.path for n in self.model.nodes() if not n.accessible and not n.busy]
        for p in bad:
            self.library.remove(p)
        self.model.remove_paths(bad)
        self._after_records()
        self.statusBar().showMessage(f"Removed {len(bad)} inaccessible image(s) from the list", 8000)
        return bad

    def delete_plan(self, nodes) -> tuple[list, list]:
        """(images to delete, images that depend on them but are not selected)."""
        sel = {n.path for n in nodes}
        dependents = []
        for n in nodes:
            for c in n.descendants():
                if c.path not in sel and c not in dependents:
                    dependents.append(c)
        return list(nodes), dependents

    def delete_selected(self) -> Job | None:
        nodes, dependents = self.delete_plan(self.selected_nodes())
        if not nodes:
            return None
        files = [f for n in nodes for f in (n.record.files or [n.path]) if os.path.lexists(f)]
        text = (f"Delete {len(nodes)} image(s) from disk? This removes these files permanently:<br>"
                + "<br>".join(f"&nbsp;&nbsp;• {html.escape(f)}" for f in files[:20])
                + ("<br>&nbsp;&nbsp;…" if len(files) > 20 else ""))
        also = None
        if dependents:
            text += (f"<br><br><b>{len(dependents)} other image(s) depend on "
                     f"{'it' if len(nodes) == 1 else 'them'}</b> and would become unusable: "
                     + ", ".join(html.escape(d.name) for d in dependents[:10])
                     + (" …" if len(dependents) > 10 else "") + ".")
            also = f"Also delete the {len(dependents)} dependent image(s)"
        answer = self.confirm("Delete from Disk", text, f"Delete {len(files)} file(s)", also)
        if not answer:
            return None
        ok, also_delete = answer
        if not ok:
            return None
        victims = nodes + (dependents if also_delete else [])
        job = tasks.delete_job([(n.path, list(n.record.files or [n.path])) for n in victims],
                               library=self.library)
        survivors = [d.path for d in dependents] if not also_delete else []

        def deleted(res):
            self.model.remove_paths(res)
            self._after_records()
            if survivors:
                self._rescan(survivors)
        return self.start_job(job, deleted)

    def _confirm_box(self, title: str, text: str, ok_text: str, checkbox: str | None):
        box = QMessageBox(QMessageBox.Warning, title, text, QMessageBox.Cancel, self)
        ok = box.addButton(ok_text, QMessageBox.DestructiveRole)
        box.setDefaultButton(QMessageBox.Cancel)
        cb = None
        if checkbox:
            cb = QCheckBox(checkbox)
            box.setCheckBox(cb)
        box.exec()
        return (box.clickedButton() is ok, bool(cb and cb.isChecked()))

    def toggle_properties(self) -> None:
        self.show_properties(not self.details.isVisible())

    def show_properties(self, on: bool) -> None:
        self.details.setVisible(on)
        self.actions["properties"].setChecked(on)
        if on:
            n = self.current_node()
            if n is not None:
                self._request_allocation(n)

    def apply_details(self, node, changes: dict) -> list[Job]:
        out = []
        if "comment" in changes:
            out.append(self.start_job(tasks.set_comment_job(node.path, changes["comment"],
                                                            library=self.library,
                                                            key=self.chain_key(node)),
                                      lambda res: self._rescan([node.path])))
        if "size" in changes:
            if self.confirm_resize(node, changes["size"]):
                out.append(self.start_resize(node, changes["size"]))
            else:
                self.details.reset_field("size")
        if "location" in changes:
            out.append(self.start_move(node, changes["location"]))
        return [j for j in out if j is not None]

    def new_uuid(self, node) -> Job | None:
        """Give ``node`` (one of several images sharing a UUID) a new UUID; the images that
        depend on it are relinked to it."""
        kids = [c.path for c in node.children]
        rec = node.record
        text = (f"Give <b>{html.escape(node.name)}</b> a new UUID?<br><br>Its UUID {rec.uuid} is "
                "also the UUID of:<br>" + "<br>".join(f"&nbsp;&nbsp;• {html.escape(p)}"
                                                      for p in rec.duplicates[:10])
                + "<br><br>Those keep it. The data of every image stays as it is.")
        if kids:
            text += (f"<br><br>{len(kids)} differencing image(s) depend on {html.escape(node.name)}"
                     " and get their parent link updated: "
                     + ", ".join(html.escape(c.name) for c in node.children[:10]) + ".")
        text += ("<br><br>A virtual machine that attaches this image by its UUID must attach it "
                 "again.")
        ok, _ = self.confirm("Give a New UUID", text, "Give a new UUID", None)
        if not ok:
            return None
        path, fmt, lib = node.path, rec.format, self.library
        twins = list(rec.duplicates)

        def fn(progress):
            progress(0, 1)
            new = give_new_uuid(path, children=kids, format=fmt, library=lib)
            progress(1, 1)
            return str(new)
        job = Job(f"Give {node.name} a new UUID", fn, keys=[self.chain_key(node)],
                  paths=[path, *kids], kind="new_uuid")
        return self.start_job(job, lambda res: self._rescan([path, *kids, *twins]))

    def save_properties(self, node, values: dict) -> None:
        self.library.set_properties(node.path, values)
        self.statusBar().showMessage(f"Saved the properties of {node.name}", 5000)

    def help_dialog(self, page: str = "guide"):
        from .dialogs.help import HelpDialog
        acts = (list(self.actions.values()) + [self.action_import, self.action_search,
                                               self.action_expand, self.action_help,
                                               self.jobs_dock.toggleViewAction(),
                                               self.action_quit])
        dlg = HelpDialog(acts, self, page)
        dlg.setAttribute(Qt.WA_DeleteOnClose)
        dlg.show()
        return dlg

    def about(self) -> None:
        names = ", ".join(b.name for b in backends())
        QMessageBox.about(self, "About vdgui",
                          f"<h3>vdgui {vdgui.__version__}</h3>"
                          "<p>A desktop manager for virtual disk images, with a pure-Python engine "
                          "modelled on VirtualBox's VD container API.</p>"
                          f"<p>Formats: {html.escape(names)}</p>"
                          f"<p>Library: {html.escape(self.library.path)}</p>"
                          "<p>License: GPL-3.0-or-later</p>")

    # -- drag and drop --------------------------------------------------------------------
    @staticmethod
    def _dropped_files(md) -> list[str]:
        """The local files of a drag that may be added (never our temporaries)."""
        if not md.hasUrls():
            return []
        return [u.toLocalFile() for u in md.urls()
                if u.isLocalFile() and not is_ours_temporary(u.toLocalFile())]

    def dragEnterEvent(self, event):
        files = self._dropped_files(event.mimeData())
        if files:
            event.acceptProposedAction()
            self.statusBar().showMessage(f"Drop to add {len(files)} image file(s)", 3000)
        else:
            event.ignore()

    def dragMoveEvent(self, event):
        if self._dropped_files(event.mimeData()):
            event.acceptProposedAction()
        else:
            event.ignore()

    def dragLeaveEvent(self, event):
        self.statusBar().clearMessage()

    def dropEvent(self, event):
        paths = [p for p in self._dropped_files(event.mimeData()) if os.path.isfile(p)]
        if paths:
            event.acceptProposedAction()
            self.add_paths(paths)

    def showEvent(self, event):
        super().showEvent(event)
        if not getattr(self, "_shown_once", False):
            self._shown_once = True
            if not self.view_settings.has_window_state():
                QTimer.singleShot(0, lambda: self.resizeDocks(
                    [self.jobs_dock], [self.jobs_panel.sizeHint().height()], Qt.Vertical))

    # -- closing --------------------------------------------------------------------------
    def closeEvent(self, event):
        running = self.queue.visible_active()
        if running:
            r = QMessageBox.question(
                self, "Jobs are running",
                f"{len(running)} job(s) are still running:<br>"
                + "<br>".join(html.escape(j.title) for j in running[:8])
                + "<br><br>Cancel them and quit? Cancelled operations leave no half-written files.",
                QMessageBox.Yes | QMessageBox.No, QMessageBox.No)
            if r != QMessageBox.Yes:
                event.ignore()
                return
        self.queue.cancel_all()
        QApplication.setOverrideCursor(Qt.WaitCursor)
        try:
            self.queue.wait()
        finally:
            QApplication.restoreOverrideCursor()
        self.save_settings()
        event.accept()


def location(p: str) -> str:
    """Absolute path of a file image; network locations (scheme://…) unchanged."""
    return p.strip() if is_network_location(p) else os.path.abspath(os.path.expanduser(p))


def _is_vbox_registry(path: str) -> bool:
    """A VirtualBox.xml / .vbox settings file (not, e.g., a Parallels DiskDescriptor.xml)."""
    if not path.lower().endswith((".xml", ".vbox")):
        return False
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    return b"<VirtualBox" in head


def _mtime(path: str):
    try:
        st = os.stat(path)
        return (st.st_mtime_ns, st.st_size)
    except OSError:
        return None


def install_excepthook(window_getter) -> None:
    """Anything escaping into the Qt event loop is a bug: show it with the traceback."""
    import sys

    def hook(etype, value, tb):
        text = "".join(traceback.format_exception(etype, value, tb))
        sys.stderr.write(text)
        try:
            w = window_getter()
            show_crash(w, f"{etype.__name__}: {value}", text)
        except Exception:  # never let the hook itself fail
            pass
    sys.excepthook = hook


def virtualbox_settings_start() -> str | None:
    """Where Import from VirtualBox starts: VirtualBox's own settings, wherever this VirtualBox
    keeps them ($VBOX_USER_HOME, ~/.config/VirtualBox, the older ~/.VirtualBox): the file when
    it is there, else the folder; None when there is no VirtualBox here."""
    homes = [os.environ.get("VBOX_USER_HOME", ""), "~/.config/VirtualBox", "~/.VirtualBox"]
    folders = [os.path.expanduser(h) for h in homes if h]
    for d in folders:
        if os.path.isfile(os.path.join(d, "VirtualBox.xml")):
            return os.path.join(d, "VirtualBox.xml")
    return next((d for d in folders if os.path.isdir(d)), None)
