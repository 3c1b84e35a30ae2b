"""The main window: media tree (tabs per device type, search), details pane, jobs panel. What its
actions do is the operations controller's (operations.py); its menus are menus.py's; its settings
view_settings.py's."""
from __future__ import annotations

import html
import os

from PySide6.QtCore import QSettings, QSize, Qt, QTimer, Signal
from PySide6.QtGui import QKeySequence
from PySide6.QtWidgets import (
    QAbstractItemView,
    QApplication,
    QCheckBox,
    QDialog,
    QDockWidget,
    QFileDialog,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QMainWindow,
    QMessageBox,
    QProgressBar,
    QSplitter,
    QTabBar,
    QTabWidget,
    QToolBar,
    QTreeView,
    QVBoxLayout,
    QWidget,
)

import vdgui
from vdgui.jobs import JobQueue, tasks
from vdgui.vd import DeviceType, Library, backend_origin, backends, is_network_location

from . import actions, cache, menus
from .actions import SPECS, Context
from .crash import install_excepthook, show_crash
from .files import (
    IMAGE_FILTER_ALL,
    image_file_filter,
    image_picker,
    is_ours_temporary,
    is_vbox_registry,
    location,
    mtime,
    virtualbox_settings_start,
)
from .icons import app_icon, format_icon
from .models.media import COL_ASIZE, COL_NAME, COL_VSIZE, MediaFilterProxy, MediaModel
from .operations import Operations
from .passphrases import Passphrases
from .view_settings import ViewSettings
from .widgets.contents import ContentsPane
from .widgets.details import DetailsPane
from .widgets.jobs_panel import DockFit, JobsPanel

# names other modules and tests take from here
__all__ = ["DEVICE_TABS", "IMAGE_FILTER_ALL", "MainWindow", "image_file_filter", "image_picker",
           "install_excepthook", "is_ours_temporary", "is_vbox_registry", "location",
           "show_crash", "virtualbox_settings_start"]

DEVICE_TABS = ((DeviceType.HARD_DISK, "&Hard disks", "hdd"),
               (DeviceType.OPTICAL, "&Optical disks", "optical"),
               (DeviceType.FLOPPY, "&Floppy disks", "floppy"))


def _to_ops(name: str):
    """A MainWindow method that is the operations controller's ``name``."""
    def call(self, *args, **kwargs):
        return getattr(self.ops, name)(*args, **kwargs)
    call.__name__ = name
    call.__doc__ = f"Operations.{name}"
    return call


class MainWindow(QMainWindow):
    recordsChanged = Signal()

    # -- what the operations controller does (operations.Operations) --------------------
    load_library = _to_ops("load_library")
    add_paths = _to_ops("add_paths")
    add_network_image = _to_ops("add_network_image")
    network_disk_dialog = _to_ops("network_disk_dialog")
    ask_secrets = _to_ops("ask_secrets")
    refresh = _to_ops("refresh")
    start_job = _to_ops("start_job")
    chain_key = _to_ops("chain_key")
    import_virtualbox = _to_ops("import_virtualbox")
    create_dialog = _to_ops("create_dialog")
    start_create = _to_ops("start_create")
    run_dialog = _to_ops("run_dialog")
    retry_on_failure = _to_ops("retry_on_failure")
    offer_retry = _to_ops("offer_retry")
    snapshot_dialog = _to_ops("snapshot_dialog")
    start_snapshot = _to_ops("start_snapshot")
    copy_dialog = _to_ops("copy_dialog")
    start_copy = _to_ops("start_copy")
    move_dialog = _to_ops("move_dialog")
    start_move = _to_ops("start_move")
    merge_dialog = _to_ops("merge_dialog")
    start_merge = _to_ops("start_merge")
    resize_dialog = _to_ops("resize_dialog")
    confirm_resize = _to_ops("confirm_resize")
    start_resize = _to_ops("start_resize")
    compact_selected = _to_ops("compact_selected")
    compare_selected = _to_ops("compare_selected")
    check_selected = _to_ops("check_selected")
    remove_selected = _to_ops("remove_selected")
    remove_inaccessible = _to_ops("remove_inaccessible")
    delete_plan = _to_ops("delete_plan")
    delete_selected = _to_ops("delete_selected")
    apply_details = _to_ops("apply_details")
    new_uuid = _to_ops("new_uuid")
    save_properties = _to_ops("save_properties")

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
        self.skipped_plugins: list[str] = []   # backend plugins not loaded, and why
        self._alloc_path: str | None = None
        self.alloc_cache: dict[str, dict] = {}     # path -> allocation job result (+ mtime)
        self.confirm = self._confirm_box   # overridable in tests
        self.repair_confirm = self._repair_dialog    # RepairParams or None; overridable in tests
        self.ops = Operations(self)
        self.secret_prompts = self.ops.secret_prompts
        # an encrypted image a job opens asks its passphrase here (issue #17)
        self.passphrases = Passphrases(self)
        self.queue.passphrases = self.passphrases.provider_for

        self.model = MediaModel(self)
        self.proxy = MediaFilterProxy(self)
        self.proxy.setSourceModel(self.model)
        menus.build_actions(self)
        self._build_ui()
        menus.build_menus(self)
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

    def _build_ui(self) -> None:
        self.toolbar = QToolBar("Actions")
        self.toolbar.setObjectName("mainToolbar")
        self.toolbar.setToolButtonStyle(Qt.ToolButtonTextUnderIcon)
        self.toolbar.setIconSize(QSize(28, 28))
        self.toolbar.setMovable(False)
        groups = (
            ("add", "network", "create", "snapshot"),
            ("copy", "move", "merge", "resize", "compact"),
            ("check", "repair", "compare"),
            ("remove", "delete"),
            ("refresh", "properties"),
        )
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
        for _dev, text, ic in DEVICE_TABS:
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
        self.tree.setAccessibleDescription(
            "Disk images; differencing images are nested under their parent"
        )
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
        h.resizeSection(5, 124)  # the State column fits "Duplicate UUID"
        h.setDefaultAlignment(Qt.AlignLeft | Qt.AlignVCenter)
        self.tree.selectionModel().selectionChanged.connect(self._selection_changed)
        self.empty_hint = QLabel(
            "No images yet. Use <b>Add</b> (Ctrl+Shift+A), <b>Create</b>, "
            "<b>File ▸ Import from VirtualBox</b>, or drop image files here."
        )
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
        self.contents = ContentsPane(self.queue, self.library)  # issue #15
        self.contents.message.connect(lambda m: self.statusBar().showMessage(m, 8000))
        self.side = QTabWidget()
        self.side.setObjectName("sideTabs")
        self.side.setDocumentMode(True)
        self.side.addTab(self.details, "Details")
        self.side.addTab(self.contents, "Contents")
        self.side.currentChanged.connect(self._side_tab_changed)
        self.splitter.addWidget(self.side)
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
        self.jobs_fit = DockFit(self, self.jobs_dock, self.jobs_panel)  # compact while empty
        self.jobs_fit.fit()

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

    def refresh_view(self) -> None:
        """The records changed: tab counts, busy marks, details, the empty-list hint."""
        self._update_tab_counts()
        self._busy_changed()
        n = self.current_node()
        if n is not None:
            self.details.set_node(n, self.library.properties(n.path))
            self.details.set_cache(cache.details(self.library, n.path))
            self.contents.set_node(n)          # clears it when the image became unreadable
            self._request_allocation(n)
        elif self.details.node is not None and self.model.node(self.details.node.path) is None:
            self._selection_changed()  # rows removed: Qt sends no selectionChanged for that
        self.empty_hint.setVisible(not self.model.nodes())
        self.recordsChanged.emit()

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
        sel, _expanded = self._view_state
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
            flags = sm.SelectionFlag.Rows | (
                sm.SelectionFlag.ClearAndSelect if first else sm.SelectionFlag.Select
            )
            sm.select(idx, flags)
            if first:
                sm.setCurrentIndex(idx, sm.SelectionFlag.NoUpdate)
                self.tree.scrollTo(idx)
            first = False

    def current_device(self) -> str | None:
        """The device type of the shown tab (DeviceType value)."""
        tab = self.tabs.currentIndex()
        return DEVICE_TABS[tab][0].value if 0 <= tab < len(DEVICE_TABS) else None

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
        self.status_images.setText(
            f"{len(nodes)} image(s)" + (f", {bad} inaccessible" if bad else "")
        )

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
            self.contents.set_node(None)
            if n > 1:
                self.details.head_title.setText(f"{n} images selected")
                self.details.head_sub.setText(
                    "Compact, check, repair, remove and delete work on several images at once."
                )
            return
        self.details.set_node(node, self.library.properties(node.path))
        self.details.set_cache(cache.details(self.library, node.path))
        self.contents.set_node(node)
        self._request_allocation(node)

    def _side_tab_changed(self, i: int) -> None:
        n = self.current_node()
        if i == 0 and n is not None:
            self._request_allocation(n)

    def _request_allocation(self, node) -> None:
        if not node.accessible or not self.details.isVisible():
            return
        cached = self.alloc_cache.get(node.path)
        if cached and cached.get("mtime") == mtime(node.path):
            self.details.set_allocation(
                node.path,
                cached["size"],
                cached["extents"],
                cached["members"],
                cached.get("partitions"),
            )
            return
        self._alloc_path = node.path
        job = tasks.allocation_job(
            node.path,
            library=self.library,
            format=node.record.format,
            config=(self.library.properties(node.path) or None)
            if is_network_location(node.path)
            else None,
        )
        job.signals.finished.connect(self.show_allocation)
        job.signals.failed.connect(
            lambda j, msg, tb: self.details.set_allocation_error(
                node.path, f"Cannot read the allocation map: {msg}"
            )
        )
        self.queue.submit(job)

    def show_allocation(self, job, res) -> None:
        """An allocation job's result: cached and shown in the details."""
        res["mtime"] = mtime(res["path"])
        self.alloc_cache[res["path"]] = res
        self.details.set_allocation(
            res["path"], res["size"], res["extents"], res["members"], res.get("partitions")
        )

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

    def _context_menu(self, pos):
        return menus.context_menu(self, pos)

    def _fill_recent(self) -> None:
        menus.fill_recent(self)

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
        path, _ = QFileDialog.getOpenFileName(
            self,
            "Import from VirtualBox",
            start,
            "VirtualBox settings (VirtualBox.xml *.vbox *.xml);;" + IMAGE_FILTER_ALL,
        )
        if path:
            self.import_virtualbox(path)

    def _repair_dialog(self, node, report):
        """The Repair dialog: its RepairParams when accepted, else None."""
        from .dialogs.repair import RepairDialog

        dlg = RepairDialog(node, report, self)
        p = dlg.params() if dlg.exec() == QDialog.Accepted else None
        dlg.deleteLater()
        return p

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
        self.show_properties(not self.side.isVisible())

    def show_properties(self, on: bool) -> None:
        self.side.setVisible(on)
        self.actions["properties"].setChecked(on)
        if on:
            n = self.current_node()
            if n is not None:
                self._request_allocation(n)

    def help_dialog(self, page: str = "guide"):
        from .dialogs.help import HelpDialog

        acts = list(self.actions.values()) + [
            self.action_import,
            self.action_search,
            self.action_expand,
            self.action_help,
            self.jobs_dock.toggleViewAction(),
            self.action_quit,
        ]
        dlg = HelpDialog(acts, self, page)
        dlg.setAttribute(Qt.WA_DeleteOnClose)
        dlg.show()
        return dlg

    def about_text(self) -> str:
        """Formats (plugins named with their distribution), skipped plugins, the library."""
        names = ", ".join(
            b.name if backend_origin(b).kind == "built-in"
            else f"{b.name} ({backend_origin(b).describe()})" for b in backends())
        skipped = "".join(f"<p>⚠ {html.escape(t)}</p>" for t in self.skipped_plugins)
        return (f"<h3>vdgui {vdgui.__version__}</h3>"
                "<p>A desktop manager for virtual disk images, with a pure-Python engine "
                "modelled on VirtualBox's VD container API.</p>"
                f"<p>Formats: {html.escape(names)}</p>{skipped}"
                f"<p>Library: {html.escape(self.library.path)}</p>"
                "<p>License: GPL-3.0-or-later</p>")

    def about(self) -> None:
        QMessageBox.about(self, "About vdgui", self.about_text())

    def plugin_problems(self, problems: list[str]) -> None:
        """Backend plugins that were skipped: said in the status bar, kept for About."""
        self.skipped_plugins = list(problems)
        if problems:
            more = f" (and {len(problems) - 1} more: Help → About)" if len(problems) > 1 else ""
            self.statusBar().showMessage(f"{problems[0]}{more}", 30000)

    # -- drag and drop --------------------------------------------------------------------
    @staticmethod
    def _dropped_files(md) -> list[str]:
        """The local files of a drag that may be added (never our temporaries)."""
        if not md.hasUrls():
            return []
        return [
            u.toLocalFile()
            for u in md.urls()
            if u.isLocalFile() and not is_ours_temporary(u.toLocalFile())
        ]

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
            QTimer.singleShot(0, self.jobs_fit.fit)  # unless the user sized the dock

    # -- closing --------------------------------------------------------------------------
    def closeEvent(self, event):
        running = self.queue.visible_active()
        if running:
            r = QMessageBox.question(
                self,
                "Jobs are running",
                f"{len(running)} job(s) are still running:<br>"
                + "<br>".join(html.escape(j.title) for j in running[:8])
                + "<br><br>Cancel them and quit? Cancelled operations leave no half-written files.",
                QMessageBox.Yes | QMessageBox.No,
                QMessageBox.No,
            )
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
