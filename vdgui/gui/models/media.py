"""The media tree: base images at the top level, differencing images nested under their parent.

``MediaModel`` is a QAbstractItemModel over :class:`MediaNode` objects built from the library's
:class:`~vdgui.vd.ImageRecord` list. ``MediaFilterProxy`` filters by device type (the tabs) and by
a search text (name, UUID, path) and sorts by the raw values (sizes sort as numbers).
"""
from __future__ import annotations

import os

from PySide6.QtCore import QAbstractItemModel, QModelIndex, QSortFilterProxyModel, Qt
from PySide6.QtGui import QColor, QFont, QPalette
from PySide6.QtWidgets import QApplication

from vdgui.vd import ImageRecord, UnknownFormat, format_size, get_backend, is_network_location

from ..icons import format_icon, icon

COLUMNS = ("Name", "Virtual size", "Actual size", "Format", "Variant", "State")
COL_NAME, COL_VSIZE, COL_ASIZE, COL_FORMAT, COL_VARIANT, COL_STATE = range(6)

_ROW_FLAGS = Qt.ItemIsEnabled | Qt.ItemIsSelectable   # made once: the view asks per cell
NODE_ROLE = Qt.UserRole + 1
SORT_ROLE = Qt.UserRole + 2
PATH_ROLE = Qt.UserRole + 3


class MediaNode:
    """One image in the tree."""

    __slots__ = ("__weakref__", "busy", "children", "parent", "record", "sort_name")

    def __init__(self, record: ImageRecord, parent: MediaNode | None = None):
        self.record = record
        self.sort_name = record.name.lower()   # the proxy asks for it at every comparison
        self.parent = parent
        self.children: list[MediaNode] = []
        self.busy: str | None = None      # title of the job using it, or None

    @property
    def path(self) -> str:
        return self.record.path

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def accessible(self) -> bool:
        return self.record.error is None

    @property
    def backend(self):
        if not self.record.format:
            return None
        try:
            return get_backend(self.record.format)
        except UnknownFormat:
            return None

    def root(self) -> MediaNode:
        n = self
        while n.parent is not None:
            n = n.parent
        return n

    def ancestors(self) -> list[MediaNode]:
        """From the base image down to (excluding) this node."""
        out = []
        n = self.parent
        while n is not None:
            out.append(n)
            n = n.parent
        return out[::-1]

    def descendants(self) -> list[MediaNode]:
        out = []
        stack = list(self.children)
        while stack:
            n = stack.pop()
            out.append(n)
            stack.extend(n.children)
        return out

    def broken_ancestor(self) -> MediaNode | None:
        """The nearest inaccessible image this one depends on, if any."""
        n = self.parent
        while n is not None:
            if not n.accessible:
                return n
            n = n.parent
        return None

    @property
    def depth(self) -> int:
        """Chain depth: 1 for a base image."""
        return len(self.ancestors()) + 1

    def state_text(self) -> str:
        if self.busy:
            return "Busy"
        if not self.accessible:
            return "Inaccessible"
        if self.record.held:
            return "Locked"
        if self.broken_ancestor() is not None:
            return "Parent inaccessible"
        if self.record.health == "corrupt":
            return "Corrupt"
        if self.record.health == "leaks":
            return "Leaks"
        if self.record.duplicates:
            return "Duplicate UUID"
        if self.record.encryption:
            return "Encrypted"
        if self.record.is_diff:
            return "Differencing"
        return "Available"

    def __repr__(self) -> str:
        return f"<MediaNode {self.path}>"


def build_forest(records: list[ImageRecord]) -> list[MediaNode]:
    """Nodes linked by parent_path; records whose parent is unknown are roots."""
    nodes: dict[str, MediaNode] = {}
    for r in records:
        nodes.setdefault(r.path, MediaNode(r))
    roots = []
    for n in nodes.values():
        p = nodes.get(n.record.parent_path) if n.record.parent_path else None
        # refuse cycles: walk up from the candidate parent
        q = p
        while q is not None and q is not n:
            q = nodes.get(q.record.parent_path) if q.record.parent_path else None
        if p is not None and q is None:
            n.parent = p
            p.children.append(n)
        else:
            roots.append(n)
    for n in nodes.values():
        n.children.sort(key=lambda c: c.name.lower())
    roots.sort(key=lambda c: c.name.lower())
    return roots


class MediaModel(QAbstractItemModel):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.roots: list[MediaNode] = []
        self._by_path: dict[str, MediaNode] = {}

    # -- content --------------------------------------------------------------------------
    def set_records(self, records: list[ImageRecord]) -> None:
        busy = {p: n.busy for p, n in self._by_path.items() if n.busy}
        self.beginResetModel()
        self.roots = build_forest(records)
        self._by_path = {}
        for r in self.roots:
            for n in [r, *r.descendants()]:
                self._by_path[n.path] = n
                n.busy = busy.get(n.path)
        self.endResetModel()

    def records(self) -> list[ImageRecord]:
        return [n.record for n in self._by_path.values()]

    def update_records(self, records: list[ImageRecord]) -> None:
        """Replace or add records; rebuild only when the tree's shape changes."""
        current = {p: n.record for p, n in self._by_path.items()}
        shape_changed = False
        for r in records:
            old = current.get(r.path)
            if old is None or old.parent_path != r.parent_path:
                shape_changed = True
            current[r.path] = r
        if shape_changed:
            self.set_records(list(current.values()))
            return
        for r in records:
            node = self._by_path[r.path]
            node.record = r
            idx = self.index_for(node)
            self.dataChanged.emit(idx, idx.siblingAtColumn(len(COLUMNS) - 1))

    def refresh_paths(self, paths) -> None:
        """Their records changed in place (e.g. duplicate marks): repaint their rows."""
        for p in paths:
            node = self._by_path.get(p)
            if node is not None:
                idx = self.index_for(node)
                self.dataChanged.emit(idx, idx.siblingAtColumn(len(COLUMNS) - 1))

    def remove_paths(self, paths) -> None:
        paths = set(paths)
        keep = [r for p, r in ((p, n.record) for p, n in self._by_path.items()) if p not in paths]
        self.set_records(keep)

    def node(self, path: str) -> MediaNode | None:
        key = path.strip() if is_network_location(path) else os.path.abspath(path)
        return self._by_path.get(key)

    def nodes(self) -> list[MediaNode]:
        return list(self._by_path.values())

    def set_busy(self, busy: dict[str, str]) -> None:
        """``busy``: path -> job title. Emits dataChanged only where the state changes."""
        for p, n in self._by_path.items():
            b = busy.get(p)
            if b != n.busy:
                n.busy = b
                idx = self.index_for(n)
                self.dataChanged.emit(idx, idx.siblingAtColumn(len(COLUMNS) - 1))

    def index_for(self, node: MediaNode, column: int = 0) -> QModelIndex:
        siblings = node.parent.children if node.parent is not None else self.roots
        try:
            row = siblings.index(node)
        except ValueError:
            return QModelIndex()
        return self.createIndex(row, column, node)

    def node_from_index(self, index: QModelIndex) -> MediaNode | None:
        return index.internalPointer() if index.isValid() else None

    # -- QAbstractItemModel ---------------------------------------------------------------
    def index(self, row, column, parent=QModelIndex()):
        if column < 0 or column >= len(COLUMNS) or row < 0:
            return QModelIndex()
        if parent.isValid():
            if parent.column() != 0:
                return QModelIndex()
            children = parent.internalPointer().children
        else:
            children = self.roots
        if row >= len(children):
            return QModelIndex()
        return self.createIndex(row, column, children[row])

    def parent(self, index=QModelIndex()):
        if not index.isValid():
            return QModelIndex()
        node: MediaNode = index.internalPointer()
        p = node.parent
        if p is None:
            return QModelIndex()
        siblings = p.parent.children if p.parent else self.roots
        return self.createIndex(siblings.index(p), 0, p)

    def rowCount(self, parent=QModelIndex()):
        if parent.isValid():
            if parent.column() != 0:
                return 0
            return len(parent.internalPointer().children)
        return len(self.roots)

    def columnCount(self, parent=QModelIndex()):
        return len(COLUMNS)

    def hasChildren(self, parent=QModelIndex()):
        return self.rowCount(parent) > 0

    def headerData(self, section, orientation, role=Qt.DisplayRole):
        if orientation == Qt.Horizontal and 0 <= section < len(COLUMNS):
            if role == Qt.DisplayRole:
                return COLUMNS[section]
            if role == Qt.TextAlignmentRole and section in (COL_VSIZE, COL_ASIZE):
                return int(Qt.AlignRight | Qt.AlignVCenter)
        return None

    def flags(self, index):
        if not index.isValid():
            return Qt.NoItemFlags
        return _ROW_FLAGS

    def sort_key(self, index: QModelIndex):
        """What the proxy sorts by: the displayed text in lower case, sizes as numbers."""
        node: MediaNode = index.internalPointer()
        rec = node.record
        col = index.column()
        # sizes sort as floats: PySide6 6.11 orders some ints above 2**31 wrongly in the
        # proxy's sort (10 GiB before 2 MiB); a double orders every size right
        if col == COL_VSIZE:
            return float(rec.virtual_size if rec.virtual_size is not None else -1)
        if col == COL_ASIZE:
            return float(rec.file_size if rec.file_size is not None else -1)
        if col == COL_NAME:
            return node.sort_name       # a sort of 1,000 rows asks ~20,000 times
        return str(self.data(index, Qt.DisplayRole)).lower()

    def data(self, index, role=Qt.DisplayRole):
        if not index.isValid():
            return None
        node: MediaNode = index.internalPointer()
        rec = node.record
        col = index.column()
        if role == SORT_ROLE:
            return self.sort_key(index)
        if role == Qt.DisplayRole:
            if col == COL_NAME:
                return node.name
            if col == COL_VSIZE:
                return format_size(rec.virtual_size) if rec.virtual_size is not None else "—"
            if col == COL_ASIZE:
                return format_size(rec.file_size) if rec.file_size is not None else "—"
            if col == COL_FORMAT:
                return rec.format or "—"
            if col == COL_VARIANT:
                return rec.variant.replace(",", ", ") if rec.variant else "—"
            if col == COL_STATE:
                return node.state_text()
        elif role == Qt.DecorationRole:
            if col == COL_NAME:
                if not node.accessible:
                    return icon("warning")
                return format_icon(rec.device_type, rec.format, bool(rec.encryption))
            if col == COL_STATE and node.busy:
                return icon("busy")
            if col == COL_STATE and not node.accessible:
                return icon("error")
            if col == COL_STATE and rec.held:
                return icon("lock")
            if col == COL_STATE and rec.health == "corrupt":
                return icon("error")
            if col == COL_STATE and node.accessible and (node.broken_ancestor() is not None
                                                         or rec.duplicates
                                                         or rec.health == "leaks"):
                return icon("warning")
        elif role == Qt.ToolTipRole:
            if not node.accessible:
                return f"<b>Inaccessible</b><br>{_html(rec.error)}"
            if node.busy:
                return f"<b>Busy</b>: {_html(node.busy)}<br>{_html(rec.path)}"
            if rec.held:
                return (f"<b>Locked</b>: another program (a running VM, qemu) holds it "
                        f"{_html(rec.held)}; vdgui will not change it until that program lets "
                        "it go" + (" (reading and copying still work)."
                                   if rec.held == "for reading" else "."))
            bad = node.broken_ancestor()
            if bad is not None:
                return (f"<b>Unusable</b>: it depends on {_html(bad.name)}, which is inaccessible:"
                        f"<br>{_html(bad.record.error)}")
            if rec.health in ("corrupt", "leaks"):
                head = ("<b>Corrupt</b>: the last check found damage" if rec.health == "corrupt"
                        else "<b>Leaks</b>: the last check found unused space still allocated "
                             "(harmless; Repair or Compact gives it back)")
                return f"{head}<br>{_html(rec.health_note)}"
            if rec.duplicates:
                return duplicate_text(rec)
            if col == COL_NAME:
                tip = f"{_html(rec.path)}<br>UUID: {rec.uuid or '—'}"
                if rec.parent_path:
                    tip += f"<br>Parent: {_html(os.path.basename(rec.parent_path))}"
                return tip
        elif role == Qt.TextAlignmentRole:
            if col in (COL_VSIZE, COL_ASIZE):
                return int(Qt.AlignRight | Qt.AlignVCenter)
        elif role == Qt.ForegroundRole:
            if not node.accessible and col != COL_NAME:
                app = QApplication.instance()
                if app is not None:
                    return app.palette().color(QPalette.Disabled, QPalette.Text)
                return QColor("#888")
        elif role == Qt.FontRole:
            if node.busy and col == COL_STATE:
                f = QFont()
                f.setItalic(True)
                return f
        elif role == NODE_ROLE:
            return node
        elif role == PATH_ROLE:
            return rec.path
        return None


def duplicate_text(rec, advice: str = "Select one and use <b>Give a new UUID</b> in the "
                                      "details pane.") -> str:
    """What a duplicate UUID means, for a tooltip and the details pane (``advice`` last)."""
    others = (", ".join(_html(p) for p in rec.duplicates[:5])
              + (" …" if len(rec.duplicates) > 5 else ""))
    return (
        f"<b>Duplicate UUID</b> {_html(rec.uuid)}: also the UUID of {others}. VirtualBox "
        "registers only one of them, and a differencing image may find the wrong one as its "
        f"parent. {advice}"
    )


def _html(text) -> str:
    import html

    return html.escape(str(text or ""))


class MediaFilterProxy(QSortFilterProxyModel):
    """Device-type tab + search text filter, numeric sorting."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self._device: str | None = None
        self._text = ""
        self.setSortRole(SORT_ROLE)
        self.setRecursiveFilteringEnabled(True)
        self.setAutoAcceptChildRows(True)
        self.setSortCaseSensitivity(Qt.CaseInsensitive)

    def _change_filter(self, attr: str, value) -> None:
        if hasattr(self, "beginFilterChange"):  # Qt >= 6.9
            self.beginFilterChange()
            setattr(self, attr, value)
            self.endFilterChange(QSortFilterProxyModel.Direction.Rows)
        else:
            setattr(self, attr, value)
            self.invalidateRowsFilter()

    def set_device(self, device: str | None) -> None:
        self._change_filter("_device", device)

    def set_search(self, text: str) -> None:
        self._change_filter("_text", text.strip().lower())

    def filterAcceptsRow(self, row, parent):
        model = self.sourceModel()
        idx = model.index(row, 0, parent)
        node: MediaNode = idx.internalPointer()
        if node is None:
            return False
        if self._device and node.root().record.device_type != self._device:
            return False
        if not self._text:
            return True
        rec = node.record
        hay = " ".join(
            x for x in (node.name, rec.path, rec.uuid or "", rec.comment or "") if x
        ).lower()
        return all(word in hay for word in self._text.split())

    def node_from_index(self, index) -> MediaNode | None:
        if not index.isValid():
            return None
        return self.mapToSource(index).internalPointer()

    def index_for_path(self, path: str) -> QModelIndex:
        src = self.sourceModel()
        node = src.node(path)
        if node is None:
            return QModelIndex()
        return self.mapFromSource(src.index_for(node))
