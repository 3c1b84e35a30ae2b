"""DetailsPane: everything about the selected image; comment, size and location editable with
Apply/Reset; backend properties through the generated ConfigForm; the allocation picture."""
from __future__ import annotations

import html
import os

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QDialogButtonBox,
    QFileDialog,
    QFormLayout,
    QFrame,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QScrollArea,
    QSizePolicy,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from vdgui.vd import Alloc, Cap, format_size, is_network_location

from .. import actions
from ..dialogs.passphrase import describe_encryption
from ..dialogs.resize import resize_problems
from ..icons import format_icon, icon
from ..models.media import duplicate_text
from .allocation import AllocationMap, level_color
from .config_form import ConfigForm
from .size_edit import SizeEdit


def _sel_label(text: str = "") -> QLabel:
    lab = QLabel(text)
    lab.setTextInteractionFlags(Qt.TextSelectableByMouse | Qt.TextSelectableByKeyboard)
    lab.setWordWrap(True)
    lab.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Preferred)
    return lab


INFO_FIELDS = (
    ("format", "Format"), ("variant", "Variant"), ("device", "Type"),
    ("vsize", "Virtual size"), ("asize", "Actual size"), ("uuid", "UUID"),
    ("parent_uuid", "Parent UUID"), ("mod_uuid", "Modification UUID"),
    ("parent_mod_uuid", "Parent modification UUID"), ("geometry", "Geometry"),
    ("block", "Block size"), ("encryption", "Encryption"), ("depth", "Chain depth"),
    ("children", "Depends on it"),
    ("extra", "Format details"),
)
CACHE_FIELDS = (
    ("path", "File"), ("size", "Capacity"), ("cached", "Holds"), ("file_size", "File size"),
    ("counts", "Hits / misses"), ("state", "State"),
)
DEVICE_NAMES = {"hdd": "Hard disk", "optical": "Optical disc", "floppy": "Floppy disk"}


class DetailsPane(QScrollArea):
    applyRequested = Signal(object, object)       # node, {"location"|"size"|"comment": value}
    propertiesSaved = Signal(object, object)      # node, {key: value}
    newUuidRequested = Signal(object)             # node

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setWidgetResizable(True)
        self.setFrameShape(QFrame.NoFrame)
        self.node = None
        self._shown: dict = {}          # the values the editors were last reset to
        self._used_end: int | None = None
        self.properties: dict = {}
        self.ctx = actions.Context()
        body = QWidget()
        self.setWidget(body)
        lay = QVBoxLayout(body)
        lay.setContentsMargins(10, 8, 10, 8)

        # header
        head = QHBoxLayout()
        self.head_icon = QLabel()
        self.head_icon.setFixedSize(40, 40)
        self.head_title = QLabel()
        f = self.head_title.font()
        f.setPointSizeF(f.pointSizeF() * 1.35)
        f.setBold(True)
        self.head_title.setFont(f)
        self.head_title.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.head_sub = _sel_label()
        col = QVBoxLayout()
        col.setSpacing(0)
        col.addWidget(self.head_title)
        col.addWidget(self.head_sub)
        head.addWidget(self.head_icon)
        head.addLayout(col, 1)
        lay.addLayout(head)

        self.error_box = QLabel()
        self.error_box.setWordWrap(True)
        self.error_box.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.error_box.setStyleSheet(
            "QLabel { background: #fff4d6; color: #5a3d00; border: 1px solid "
            "#e0b64a; border-radius: 4px; padding: 6px; }"
        )
        lay.addWidget(self.error_box)

        # duplicate UUID: say so, offer the way out
        self.dup_box = QFrame()
        self.dup_box.setObjectName("duplicateUuid")
        self.dup_box.setStyleSheet(
            "#duplicateUuid { background: #fff4d6; border: 1px solid "
            "#e0b64a; border-radius: 4px; } QLabel { color: #5a3d00; }"
        )
        dl = QVBoxLayout(self.dup_box)
        self.dup_text = QLabel()
        self.dup_text.setWordWrap(True)
        self.dup_text.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.new_uuid_button = QPushButton("Give a new UUID…")
        self.new_uuid_button.setObjectName("newUuid")
        self.new_uuid_button.clicked.connect(
            lambda: self.node is not None and self.newUuidRequested.emit(self.node)
        )
        dl.addWidget(self.dup_text)
        dl.addWidget(self.new_uuid_button, 0, Qt.AlignLeft)
        lay.addWidget(self.dup_box)

        # editable attributes
        self.attr_box = QGroupBox("Attributes")
        form = QFormLayout(self.attr_box)
        form.setFieldGrowthPolicy(QFormLayout.ExpandingFieldsGrow)
        self.location = QLineEdit()
        self.location.setObjectName("detailsLocation")
        self.browse = QToolButton()
        self.browse.setText("…")
        self.browse.setToolTip("Choose a new location")
        self.browse.clicked.connect(self._browse)
        row = QHBoxLayout()
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.location, 1)
        row.addWidget(self.browse)
        loc_w = QWidget()
        loc_w.setLayout(row)
        form.addRow("&Location:", loc_w)
        self.size = SizeEdit(slider=False)
        self.size.setObjectName("detailsSize")
        form.addRow("&Size:", self.size)
        self.comment = QLineEdit()
        self.comment.setObjectName("detailsComment")
        self.comment.setPlaceholderText("Description stored in the image")
        form.addRow("&Description:", self.comment)
        self.edit_buttons = QDialogButtonBox(QDialogButtonBox.Apply | QDialogButtonBox.Reset)
        self.apply_button = self.edit_buttons.button(QDialogButtonBox.Apply)
        self.reset_button = self.edit_buttons.button(QDialogButtonBox.Reset)
        self.apply_button.clicked.connect(self._apply)
        self.reset_button.clicked.connect(self.reset)
        self.edit_hint = QLabel()
        self.edit_hint.setWordWrap(True)
        self.edit_hint.setStyleSheet("color: #c9372c;")
        form.addRow(self.edit_hint)
        form.addRow(self.edit_buttons)
        for w in (self.location, self.comment):
            w.textChanged.connect(self._edited)
        self.size.valueChanged.connect(self._edited)
        lay.addWidget(self.attr_box)

        # allocation
        self.alloc_box = QGroupBox("Allocation")
        al = QVBoxLayout(self.alloc_box)
        self.allocation = AllocationMap()
        self.alloc_legend = _sel_label()
        al.addWidget(self.allocation)
        al.addWidget(self.alloc_legend)
        lay.addWidget(self.alloc_box)

        # information
        self.info_box = QGroupBox("Information")
        self.info_form = QFormLayout(self.info_box)
        self.info_form.setFieldGrowthPolicy(QFormLayout.ExpandingFieldsGrow)
        self.info: dict[str, QLabel] = {}
        for key, title in INFO_FIELDS:
            lab = _sel_label()
            lab.setObjectName(f"info_{key}")
            self.info[key] = lab
            self.info_form.addRow(title + ":", lab)
        lay.addWidget(self.info_box)

        # files
        self.files_box = QGroupBox("Files")
        fl = QVBoxLayout(self.files_box)
        self.files = _sel_label()
        self.files.setObjectName("detailsFiles")
        fl.addWidget(self.files)
        lay.addWidget(self.files_box)

        # cache image (issue #19 part 2): a network disk's VCI cache, kept by the library
        self.cache_box = QGroupBox("Cache image")
        self.cache_box.setObjectName("detailsCache")
        cf = QFormLayout(self.cache_box)
        cf.setFieldGrowthPolicy(QFormLayout.ExpandingFieldsGrow)
        self.cache_fields: dict[str, QLabel] = {}
        for key, title in CACHE_FIELDS:
            lab = _sel_label()
            lab.setObjectName(f"cache_{key}")
            self.cache_fields[key] = lab
            cf.addRow(title + ":", lab)
        lay.addWidget(self.cache_box)

        # backend properties
        self.props_box = QGroupBox("Backend properties")
        self.props_layout = QVBoxLayout(self.props_box)
        self.props_form: ConfigForm | None = None
        self.props_save = QPushButton("Save properties")
        self.props_save.clicked.connect(self._save_props)
        self.props_layout.addWidget(self.props_save, 0, Qt.AlignRight)
        lay.addWidget(self.props_box)
        lay.addStretch(1)
        self.set_node(None)

    # -- content --------------------------------------------------------------------------
    def set_context(self, ctx: actions.Context) -> None:
        self.ctx = ctx
        if self.node is not None:
            self._update_edit_state()

    def set_node(self, node, properties: dict | None = None) -> None:
        """Show ``node``. Edits in progress survive a refresh of the same image, but only those
        the user typed (a field that differs from what the pane last showed), and only while the
        image's own value is still the one shown: a job that changed the image (e.g. a resize)
        replaces the shown value, it never turns the old one into an edit."""
        pending = {}
        if node is not None and self.node is not None and self.node.path == node.path:
            shown = self._shown
            new = self._values(node)
            pending = {
                k: v for k, v in self._typed().items() if k in shown and shown[k] == new.get(k)
            }
        self._set_node(node, properties)
        if pending:
            if "location" in pending and self.location.isEnabled():
                self.location.setText(pending["location"])
            if "size" in pending and self.size.isEnabled():
                self.size.setValue(pending["size"])
            if "comment" in pending and self.comment.isEnabled():
                self.comment.setText(pending["comment"])

    @staticmethod
    def _values(node) -> dict:
        return {
            "location": node.path,
            "size": node.record.virtual_size,
            "comment": node.record.comment or "",
        }

    def _typed(self) -> dict:
        """The fields whose widget differs from what the pane last showed (the user's edits)."""
        shown = self._shown
        out = {}
        loc = self.location.text().strip()
        if loc and not is_network_location(loc):
            loc = os.path.abspath(os.path.expanduser(loc))
        if loc and loc != shown.get("location"):
            out["location"] = loc
        v = self.size.value()
        if v is not None and v != shown.get("size"):
            out["size"] = v
        if self.comment.text() != shown.get("comment"):
            out["comment"] = self.comment.text()
        return out

    def _set_node(self, node, properties: dict | None = None) -> None:
        self.node = node
        self.properties = dict(properties or {})
        has = node is not None
        for w in (self.attr_box, self.info_box, self.files_box, self.alloc_box):
            w.setVisible(has)
        self.set_cache(None)
        if not has:
            self.head_icon.setPixmap(icon("properties").pixmap(36, 36))
            self.head_title.setText("No image selected")
            self.head_sub.setText(
                "Select an image in the list to see its details, or drop image "
                "files onto the window to add them."
            )
            self.error_box.setVisible(False)
            self.dup_box.setVisible(False)
            self.props_box.setVisible(False)
            return
        rec = node.record
        self.head_icon.setPixmap(
            (
                icon("warning") if not node.accessible
                else format_icon(rec.device_type, rec.format, locked=bool(rec.encryption))
            ).pixmap(36, 36)
        )
        self.head_title.setText(node.name)
        self.head_sub.setText(html.escape(os.path.dirname(rec.path)))
        self.error_box.setVisible(not node.accessible)
        if not node.accessible:
            self.error_box.setText(f"<b>Inaccessible.</b> {html.escape(rec.error or '')}")
        self.dup_box.setVisible(bool(node.accessible and rec.duplicates))
        if rec.duplicates:
            self.dup_text.setText(
                duplicate_text(
                    rec,
                    "Give this one a new UUID to tell them apart"
                    + (
                        " (the images that depend on it are relinked to it)."
                        if node.children
                        else "."
                    ),
                )
            )
        v = self.info
        v["format"].setText(rec.format or "unknown")
        v["variant"].setText(rec.variant.replace(",", ", ") or "—")
        v["device"].setText(DEVICE_NAMES.get(rec.device_type, rec.device_type))
        v["vsize"].setText(_bytes(rec.virtual_size))
        v["asize"].setText(_bytes(rec.file_size))
        v["uuid"].setText(rec.uuid or "—")
        v["parent_uuid"].setText(rec.parent_uuid or ("— (base image)" if not rec.is_diff else "—"))
        v["mod_uuid"].setText(rec.modification_uuid or "—")
        v["parent_mod_uuid"].setText(rec.parent_modification_uuid or "—")
        geo = []
        if rec.pchs:
            geo.append("physical C/H/S " + "/".join(map(str, rec.pchs)))
        if rec.lchs:
            geo.append("logical C/H/S " + "/".join(map(str, rec.lchs)))
        v["geometry"].setText(", ".join(geo) or "—")
        v["block"].setText(_bytes(rec.block_size) if rec.block_size else "—")
        v["encryption"].setText(html.escape(describe_encryption(rec.encryption)))
        anc = node.ancestors()
        chain = " → ".join(n.name for n in anc + [node])
        v["depth"].setText(
            f"{node.depth}" + (f"  ({html.escape(chain)})" if anc else " (base image)")
        )
        kids = node.descendants()
        v["children"].setText(
            f"{len(kids)} differencing image(s): "
            + ", ".join(n.name for n in kids[:6])
            + (" …" if len(kids) > 6 else "")
            if kids
            else "nothing"
        )
        extra = "; ".join(f"{k}: {val}" for k, val in (rec.details or {}).items())
        v["extra"].setText(html.escape(extra) or "—")
        self.files.setText("<br>".join(html.escape(f) for f in (rec.files or [rec.path])))
        self._used_end = None
        self.allocation.clear(
            "Reading the allocation map…"
            if node.accessible
            else "Not available for an inaccessible image"
        )
        self.alloc_legend.setText("")
        self._build_props(node)
        self.reset()

    def _build_props(self, node) -> None:
        if self.props_form is not None:
            self.props_form.hide()             # else a window of its own until deleted
            self.props_form.setParent(None)
            self.props_form.deleteLater()
            self.props_form = None
        b = node.backend
        keys = [k for k in (b.config_keys if b else ()) if not k.create_only]
        self.props_box.setVisible(bool(keys))
        if not keys:
            return
        self.props_form = ConfigForm(keys, self.properties, mode="edit")
        self.props_form.validChanged.connect(self.props_save.setEnabled)
        self.props_save.setEnabled(self.props_form.is_valid())
        self.props_layout.insertWidget(0, self.props_form)
        if b is not None and not b.caps & Cap.CONFIG:
            self.props_box.setTitle(f"{b.name} properties")
        else:
            self.props_box.setTitle("Backend properties")

    def set_cache(self, info: dict | None) -> None:
        """Show the shown disk's cache image: ``info`` has its ``path``, ``size`` (capacity),
        ``hits`` and ``misses`` (opens through the library since attached), and from the file
        when it could be read: ``cached_bytes``, ``file_size``; or ``state``, why not."""
        self.cache_box.setVisible(info is not None)
        if info is None:
            return
        f = self.cache_fields
        f["path"].setText(html.escape(info["path"]))
        f["size"].setText(_bytes(info.get("size")))
        cached = info.get("cached_bytes")
        f["cached"].setText("—" if cached is None else (
            f"{format_size(cached)} of the disk"
            + (f" ({cached * 100 // info['size']} % full)" if info.get("size") else "")))
        f["file_size"].setText(_bytes(info.get("file_size")))
        hits, misses = info.get("hits", 0), info.get("misses", 0)
        ratio = f" ({hits * 100 // (hits + misses)} % hits)" if hits + misses else ""
        f["counts"].setText(f"{hits:,} / {misses:,}{ratio}".replace(",", "\u2009"))
        f["counts"].setToolTip("Reads served from the cache / from the disk (runs of "
                               "cached chunks), in the opens of this disk since the cache "
                               "was attached")
        f["state"].setText(html.escape(info.get("state") or "ready"))

    def set_allocation(self, path: str, size: int, extents, members: list[str],
                       partitions=None) -> None:
        if self.node is None or self.node.path != path:
            return
        self.allocation.set_data(size, extents, members)
        self.allocation.set_partitions(partitions)
        self._used_end = max((e.end for e in extents if e.status == Alloc.DATA), default=0)
        rows = []
        for lv, (m, held) in enumerate(self.allocation.legend()):
            c = level_color(lv).name()
            rows.append(
                f"<tr><td style='color:{c}'>■</td><td>{html.escape(os.path.basename(m))}"
                f"</td><td align='right'>&nbsp;&nbsp;{format_size(held)}</td></tr>"
            )
        self.alloc_legend.setText(
            "<table cellspacing='0' cellpadding='1'>"
            + "".join(rows)
            + "</table>"
            + html.escape(self.allocation.summary())
        )

    def set_allocation_error(self, path: str, message: str) -> None:
        if self.node is not None and self.node.path == path:
            self.allocation.clear(message)

    def used_end(self) -> int | None:
        """End of the last allocated byte of the shown image, when its allocation map is known."""
        return self._used_end

    # -- editing --------------------------------------------------------------------------
    def reset(self) -> None:
        n = self.node
        if n is None:
            return
        for w in (self.location, self.comment, self.size):
            w.blockSignals(True)
        self.location.setText(n.path)
        self.comment.setText(n.record.comment or "")
        if n.record.virtual_size:
            self.size.setValue(n.record.virtual_size)
        else:  # unknown (an inaccessible image): nothing carried over
            self.size.edit.clear()
        self._shown = self._values(n)
        b = n.backend
        if b is not None:
            self.size.setGranularity(b.size_granularity)
        for w in (self.location, self.comment, self.size):
            w.blockSignals(False)
        self._update_edit_state()

    def reset_field(self, key: str) -> None:
        """Put one editor back to the image's value (an edit the user declined to apply)."""
        n = self.node
        if n is None:
            return
        if key == "size" and n.record.virtual_size:
            self.size.setValue(n.record.virtual_size)
        elif key == "comment":
            self.comment.setText(n.record.comment or "")
        elif key == "location":
            self.location.setText(n.path)
        self._edited()

    def _update_edit_state(self) -> None:
        n = self.node
        if n is None:
            return
        move_r = actions.reason("move", [n], self.ctx)
        resize_r = actions.reason("resize", [n], self.ctx)
        comment_r = actions.reason("comment", [n], self.ctx)
        for w, r, tip in (
            (self.location, move_r, "Type a new path and Apply to move the image"),
            (self.browse, move_r, "Choose a new location"),
            (self.size, resize_r, "Enter a new size and Apply to resize the image"),
            (self.comment, comment_r, "Description stored in the image"),
        ):
            w.setEnabled(r is None)
            w.setToolTip(r or tip)
        uuid_r = comment_r
        if uuid_r is None and n.busy is None and any(c.path in self.ctx.busy for c in n.children):
            uuid_r = "An image that depends on it is busy"
        self.new_uuid_button.setEnabled(uuid_r is None)
        self.new_uuid_button.setToolTip(uuid_r or "Write a new random UUID into this image")
        self._edited()

    def changes(self) -> dict:
        n = self.node
        if n is None:
            return {}
        out = {}
        loc = (
            os.path.abspath(os.path.expanduser(self.location.text().strip()))
            if self.location.text().strip()
            else ""
        )
        if self.location.isEnabled() and loc and loc != n.path:
            out["location"] = loc
        if self.size.isEnabled():
            v = self.size.value()
            if v is not None and v != n.record.virtual_size:
                out["size"] = v
        if self.comment.isEnabled() and self.comment.text() != (n.record.comment or ""):
            out["comment"] = self.comment.text()
        return out

    def _edit_error(self) -> str | None:
        ch = self.changes()
        if "location" in ch and os.path.exists(ch["location"]):
            return f"{ch['location']} already exists"
        if "size" in ch:
            err = self.size.error()
            if err:
                return err
            # the Resize dialog's rules (the data's end is checked again on Apply when unknown)
            used = self.used_end()
            errors, _w = resize_problems(self.node, ch["size"], used if used is not None else 0)
            if errors:
                return errors[0]
        return None

    def _edited(self, *_):
        ch = self.changes()
        err = self._edit_error() if ch else None
        self.edit_hint.setText(err or "")
        self.edit_hint.setVisible(bool(err))
        self.apply_button.setEnabled(bool(ch) and err is None)
        self.reset_button.setEnabled(
            bool(ch) or self.size.value() != (self.node.record.virtual_size if self.node else None)
        )

    def _apply(self) -> None:
        ch = self.changes()
        if ch and self._edit_error() is None:
            self.applyRequested.emit(self.node, ch)

    def _browse(self) -> None:
        if self.node is None:
            return
        path, _ = QFileDialog.getSaveFileName(self, "Move image to", self.location.text())
        if path:
            self.location.setText(path)

    def _save_props(self) -> None:
        if self.node is not None and self.props_form is not None and self.props_form.is_valid():
            self.propertiesSaved.emit(self.node, self.props_form.values())


def _bytes(n) -> str:
    if n is None:
        return "—"
    return f"{format_size(n)} ({n:,} bytes)".replace(",", "\u2009")
