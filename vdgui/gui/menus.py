"""The window's actions, menus, context menu and recent-images menu (wired to MainWindow and its
operations controller)."""
from __future__ import annotations

import os

from PySide6.QtCore import QUrl
from PySide6.QtGui import QAction, QDesktopServices, QKeySequence
from PySide6.QtWidgets import QApplication, QMenu

from vdgui.vd import is_network_location

from . import actions, cache
from .actions import SPECS
from .icons import app_icon, icon
from .sparsify import compact_or_sparsify


def build_actions(w) -> None:
    w.actions: dict[str, QAction] = {}
    handlers = {"add": w.add_dialog, "network": w.network_disk_dialog,
                "create": w.create_dialog,
                "snapshot": w.snapshot_dialog, "copy": w.copy_dialog,
                "move": w.move_dialog, "merge": w.merge_dialog,
                "resize": w.resize_dialog, "compact": lambda: compact_or_sparsify(w.ops),
                "check": lambda: w.check_selected(False),
                "compare": w.compare_selected,
                "repair": lambda: w.check_selected(True),
                "remove": w.remove_selected, "delete": w.delete_selected,
                "refresh": w.refresh, "properties": w.toggle_properties,
                "encrypt": lambda: w.ops.encrypt_dialog(),
                "decrypt": lambda: w.ops.encrypt_dialog(decrypt=True),
                "passphrase": lambda: w.ops.passphrase_dialog()}
    for spec in SPECS + (actions.NETWORK,):
        a = QAction(icon(spec.icon), spec.text, w)
        a.setObjectName(f"action_{spec.key}")
        if spec.shortcut:
            a.setShortcut(QKeySequence(spec.shortcut))
        a.setToolTip(spec.tip)
        a.setStatusTip(spec.tip)
        a.setIconText(spec.short or spec.text.replace("&", "").rstrip("…"))
        a.triggered.connect(handlers[spec.key])
        w.actions[spec.key] = a
    w.actions["properties"].setCheckable(True)
    w.actions["refresh"].setShortcuts([QKeySequence("Ctrl+Shift+F"), QKeySequence.Refresh])
    w.action_floppy = QAction(icon("create"), "Create F&loppy Image…", w)
    w.action_floppy.setObjectName("action_create_floppy")
    w.action_floppy.setToolTip("Create a formatted floppy image (FAT12), optionally with files")
    w.action_floppy.triggered.connect(lambda: w.ops.create_floppy_dialog())
    w.action_iso = QAction(icon("create"), "Create &Optical Disc Image…", w)
    w.action_iso.setObjectName("action_create_iso")
    w.action_iso.setToolTip("Create an ISO image (Joliet, Rock Ridge) from files and folders")
    w.action_iso.triggered.connect(lambda: w.ops.create_iso_dialog())
    w.action_rawdisk = QAction(icon("create"), "New Ra&w Disk VMDK…", w)
    w.action_rawdisk.setObjectName("action_create_rawdisk")
    w.action_rawdisk.setToolTip("Create a VMDK that gives a VM a real host disk or some of its "
                                "partitions (VirtualBox's raw disk access)")
    w.action_rawdisk.triggered.connect(lambda: w.ops.create_rawdisk_dialog())
    w.action_import = QAction(icon("import"), "&Import from VirtualBox…", w)
    w.action_import.setToolTip("Add the images listed in a VirtualBox.xml or .vbox file")
    w.action_import.triggered.connect(w.import_dialog)
    w.action_quit = QAction("&Quit", w)
    w.action_quit.setShortcut(QKeySequence.Quit)
    w.action_quit.triggered.connect(w.close)
    w.action_about = QAction(app_icon(), "&About vdgui", w)
    w.action_about.triggered.connect(w.about)
    w.action_help = QAction(icon("properties"), "&Documentation", w)
    w.action_help.setShortcut(QKeySequence.HelpContents)
    w.action_help.triggered.connect(lambda: w.help_dialog("guide"))
    w.action_shortcuts = QAction("&Keyboard Shortcuts", w)
    w.action_shortcuts.triggered.connect(lambda: w.help_dialog("shortcuts"))
    w.action_clear_bad = QAction(icon("warning"), "Remove &Inaccessible Images", w)
    w.action_clear_bad.setToolTip("Forget every image whose file is missing or unreadable "
                                  "(no file is deleted)")
    w.action_clear_bad.triggered.connect(w.remove_inaccessible)
    w.action_expand = QAction("&Expand All", w)
    w.action_expand.setShortcut(QKeySequence("Ctrl+E"))
    w.action_expand.triggered.connect(lambda: w.tree.expandAll())
    w.action_search = QAction("&Search", w)
    w.action_search.setShortcut(QKeySequence.Find)
    w.action_search.triggered.connect(lambda: (w.search.setFocus(), w.search.selectAll()))
    w.addAction(w.action_search)


def build_menus(w) -> None:
    mb = w.menuBar()
    w.menus: dict[str, QMenu] = {}
    m = w.menus["file"] = mb.addMenu("&File")
    m.addAction(w.actions["add"])
    m.addAction(w.actions["network"])
    m.addAction(w.actions["create"])
    m.addAction(w.action_floppy)
    m.addAction(w.action_iso)
    m.addAction(w.action_rawdisk)
    m.addAction(w.action_import)
    w.recent_menu = m.addMenu("Open &Recent")
    w.recent_menu.aboutToShow.connect(lambda: fill_recent(w))
    m.addSeparator()
    m.addAction(w.action_quit)
    m = w.menus["image"] = mb.addMenu("&Image")
    for k in ("snapshot", "copy", "move", "merge", "resize", "compact", None, "check", "repair",
              "compare", None, "encrypt", "decrypt", "passphrase", None, "remove", "delete",
              None, "properties"):
        if k is None:
            m.addSeparator()
        else:
            m.addAction(w.actions[k])
    m.addSeparator()
    m.addAction(w.action_clear_bad)
    for menu in mb.findChildren(QMenu):
        menu.setToolTipsVisible(True)
    m = w.menus["view"] = mb.addMenu("&View")
    m.addAction(w.actions["refresh"])
    m.addAction(w.action_expand)
    m.addAction(w.action_search)
    m.addSeparator()
    ja = w.jobs_dock.toggleViewAction()
    ja.setText("&Jobs Panel")
    ja.setShortcut(QKeySequence("Ctrl+J"))
    m.addAction(ja)
    m = w.menus["help"] = mb.addMenu("&Help")
    m.addAction(w.action_help)
    m.addAction(w.action_shortcuts)
    m.addSeparator()
    m.addAction(w.action_about)


def context_menu(w, pos) -> QMenu:
    idx = w.tree.indexAt(pos)
    m = QMenu(w)
    if idx.isValid():
        for k in ("properties", None, "snapshot", "copy", "move", "merge", "resize", "compact",
                  None, "check", "repair", "compare", None, "encrypt", "decrypt", "passphrase",
                  None, "remove", "delete"):
            if k is None:
                m.addSeparator()
            else:
                m.addAction(w.actions[k])
        m.addSeparator()
        node = w.proxy.node_from_index(idx)
        if node is not None:
            if not is_network_location(node.path):
                folder = m.addAction("Open Containing &Folder")
                folder.triggered.connect(lambda: QDesktopServices.openUrl(
                    QUrl.fromLocalFile(os.path.dirname(node.path))))
            if is_network_location(node.path):
                cache.add_menu_actions(w, m, node)
            if is_network_location(node.path) and w.library.missing_secrets(node.path):
                secrets = m.addAction(icon("network"), "Enter &Secrets…")
                secrets.triggered.connect(lambda: w.ask_secrets(node.path))
            if actions.way_out("resize", node) == "convert":
                conv = m.addAction(icon("copy"), "Convert to a &Resizable Copy…")
                conv.setToolTip(actions.reason("resize", [node], w.context()) or "")
                conv.triggered.connect(w.copy_dialog)
            copy_path = m.addAction("Copy &Path")
            copy_path.triggered.connect(lambda: QApplication.clipboard().setText(node.path))
            if node.record.uuid:
                copy_uuid = m.addAction("Copy &UUID")
                copy_uuid.triggered.connect(
                    lambda: QApplication.clipboard().setText(node.record.uuid))
    else:
        for k in ("add", "create", "refresh"):
            m.addAction(w.actions[k])
    m.setToolTipsVisible(True)
    m.popup(w.tree.viewport().mapToGlobal(pos))
    return m


def fill_recent(w) -> None:
    w.recent_menu.clear()
    recent = w.library.recent()
    if not recent:
        a = w.recent_menu.addAction("No recent images")
        a.setEnabled(False)
        return
    for p in recent:
        a = w.recent_menu.addAction(p)
        a.setEnabled(os.path.exists(p))
        a.triggered.connect(lambda checked=False, p=p: w.add_paths([p]))
    w.recent_menu.addSeparator()
    w.recent_menu.addAction("Clear List", w.library.clear_recent)
