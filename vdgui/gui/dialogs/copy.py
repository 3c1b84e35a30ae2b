"""Copy / Convert: target format, variant, location (default ``<name>_copy.<ext>`` beside the
source), optional new size, flatten the chain or copy it as a chain, keep the UUID."""
from __future__ import annotations

import html
import os

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDialog,
    QFormLayout,
    QGroupBox,
    QLabel,
    QRadioButton,
    QVBoxLayout,
)

from vdgui.vd import (
    Cap,
    ImageFlags,
    applicable_keys,
    chain_target_names,
    describe_size,
    format_size,
    get_backend,
)

from ..icons import format_icon, icon
from ..widgets.config_form import ConfigForm
from ..widgets.size_edit import SizeEdit
from .common import (
    LocationRow,
    MessageArea,
    VariantBoxes,
    creatable_backends,
    new_file_problem,
    ok_cancel,
    room_problem,
    size_warnings,
    unique_path,
    with_extension,
)
from .params import CopyParams
from .passphrase import NewPassphraseFields, encryption_problems, target_encryptions


class CopyDialog(QDialog):
    def __init__(self, node, parent=None):
        super().__init__(parent)
        self.node = node
        rec = node.record
        self.setWindowTitle(f"Copy or Convert {node.name}")
        self.setWindowIcon(icon("copy"))
        main, more = creatable_backends()
        self.backends = main + more
        self.format = QComboBox()
        self.format.setObjectName("format")
        for b in self.backends:
            self.format.addItem(format_icon(b.extensions[0].device.value if b.extensions else "hdd",
                                            b.name), f"{b.name} — {b.description}" if b.description
                                else b.name, b.name)
        src_b = node.backend
        if src_b is not None and src_b in self.backends:
            self.format.setCurrentIndex(self.backends.index(src_b))
        self.variant = VariantBoxes()
        self.location = LocationRow("", "Copy to")
        self.resize_box = QCheckBox("&Change the virtual size to")
        self.new_size = SizeEdit(rec.virtual_size or (1 << 30), slider=False)
        self.new_size.setEnabled(False)
        self.resize_box.toggled.connect(self.new_size.setEnabled)
        self.resize_box.toggled.connect(self.validate)
        self.flatten = QRadioButton("&Flatten: one image with the content of the whole chain")
        self.as_chain = QRadioButton(f"Copy as a &chain: one image per chain member; the name "
                                     f"above is the copy of {node.name}")
        self.flatten.setChecked(True)
        self.keep_uuid = QCheckBox("&Keep the UUID (the copy is meant to replace the original)")
        self.encryption = QComboBox()
        self.encryption.setObjectName("encryption")
        self.passphrase = NewPassphraseFields()
        self.passphrase.setVisible(False)
        chain_box = QGroupBox("Chain")
        cl = QVBoxLayout(chain_box)
        depth = node.depth
        chain_label = QLabel(f"{node.name} is a differencing image at depth {depth}: "
                             + " → ".join(n.name for n in node.ancestors() + [node])
                             if depth > 1 else f"{node.name} is a base image.")
        chain_label.setWordWrap(True)
        cl.addWidget(chain_label)
        cl.addWidget(self.flatten)
        cl.addWidget(self.as_chain)
        chain_box.setVisible(depth > 1)
        self.preview = QLabel()
        self.preview.setObjectName("copyPreview")
        self.preview.setWordWrap(True)
        self.preview.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.config_box = QGroupBox("Target format options")
        self.config_layout = QVBoxLayout(self.config_box)
        self.config: ConfigForm | None = None
        self.messages = MessageArea()
        src = QLabel(f"Source: <b>{node.name}</b> — {rec.format}, "
                     f"{(rec.variant or '—').replace(',', ', ')}, "
                     f"{format_size(rec.virtual_size or 0)} virtual, "
                     f"{format_size(rec.file_size or 0)} on disk")
        src.setObjectName("copySource")
        src.setWordWrap(True)
        form = QFormLayout()
        form.addRow("Target &format:", self.format)
        form.addRow("Variant:", self.variant)
        form.addRow("&Location:", self.location)
        form.addRow(self.resize_box, self.new_size)
        form.addRow(self.keep_uuid)
        form.addRow("&Encryption:", self.encryption)
        form.addRow(self.passphrase)
        self.buttons, self.ok = ok_cancel(self, "Copy")
        lay = QVBoxLayout(self)
        lay.addWidget(src)
        lay.addLayout(form)
        lay.addWidget(chain_box)
        lay.addWidget(self.preview)
        lay.addWidget(self.config_box)
        lay.addWidget(self.messages)
        lay.addWidget(self.buttons)
        self.format.currentIndexChanged.connect(self._format_changed)
        self.variant.changed.connect(self.validate)
        self.location.changed.connect(self.validate)
        self.new_size.valueChanged.connect(self.validate)
        self.as_chain.toggled.connect(self.validate)
        self.encryption.currentIndexChanged.connect(self._encryption_changed)
        self.passphrase.changed.connect(self.validate)
        self._format_changed()
        self.resize(640, self.sizeHint().height())

    def backend(self):
        return get_backend(self.format.currentData()) if self.format.count() else None

    def set_format(self, name: str) -> None:
        self.format.setCurrentIndex(self.format.findData(get_backend(name).name))

    def _format_changed(self, *_):
        b = self.backend()
        if b is None:
            self.validate()
            return
        self.variant.set_backend(b)
        self.new_size.setGranularity(b.size_granularity)
        stem = os.path.splitext(self.node.name)[0]
        cur = self.location.path()
        if not cur:
            self.location.set_path(unique_path(os.path.dirname(self.node.path), f"{stem}_copy",
                                               b.default_extension()))
        else:
            self.location.set_path(with_extension(cur, b.default_extension()))
        can_chain = bool(b.caps & Cap.DIFF) and self.node.depth > 1
        self.as_chain.setEnabled(can_chain)
        self.as_chain.setToolTip("" if can_chain else f"{b.name} has no differencing images")
        if not can_chain:
            self.flatten.setChecked(True)
        self.keep_uuid.setEnabled(bool(b.caps & Cap.UUID))
        self.keep_uuid.setToolTip("" if b.caps & Cap.UUID else f"{b.name} images have no UUID")
        if self.config is not None:
            self.config.setParent(None)
            self.config.deleteLater()
        keys = applicable_keys(b.config_keys, mode="create", variant=self.variant.flags())
        # encryption is chosen below (with its passphrase), not in the format's options
        crypt_keys = target_encryptions(self.encryption, b)
        keys = [k for k in keys if k.name not in crypt_keys]
        self.config = ConfigForm(keys, mode="create") if keys else None
        if self.config is not None:
            self.config_layout.addWidget(self.config)
            self.config.valuesChanged.connect(self.validate)     # every edit: no stale summary
        self.config_box.setVisible(self.config is not None)
        self._encryption_changed()

    def _encryption_changed(self, *_):
        self.passphrase.setVisible(self.encryption.currentData() is not None)
        self.validate()

    def chain_copy(self) -> bool:
        return self.as_chain.isEnabled() and self.as_chain.isChecked()

    def targets(self) -> list[tuple[str, object]]:
        """(file to be written, source node) for every image the copy makes, base first; the
        location typed is the copy of the selected image."""
        loc = self.location.path()
        if not loc:
            return []
        if not self.chain_copy():
            return [(loc, self.node)]
        members = self.node.ancestors() + [self.node]
        return list(zip(chain_target_names(loc, [n.path for n in members]), members))

    def _show_preview(self) -> None:
        rows = []
        for path, n in self.targets():
            size = n.record.virtual_size or 0
            if n is self.node and self.resize_box.isChecked() and self.new_size.value():
                size = self.new_size.value()
            what = "copy of the whole chain" if not self.chain_copy() and self.node.depth > 1 \
                else f"copy of {html.escape(n.name)}"
            rows.append(f"<tr><td>{html.escape(os.path.basename(path))}</td><td>&nbsp;&nbsp;{what}"
                        f"</td><td align='right'>&nbsp;&nbsp;{format_size(size)} virtual</td></tr>")
        folder = os.path.dirname(self.location.path()) if self.location.path() else ""
        self.preview.setText(f"<b>Files to be written</b> in {html.escape(folder)}:"
                             "<table cellspacing='0' cellpadding='1'>" + "".join(rows) + "</table>"
                             if rows else "")

    def validate(self, *_):
        errors, warnings = [], []
        b = self.backend()
        loc = self.location.path()
        self._show_preview()
        if b is None:
            errors.append("No registered format can create images")
        if not loc:
            errors.append("Choose where to write the copy")
        elif os.path.abspath(loc) in {os.path.abspath(f)
                                      for f in (self.node.record.files or [self.node.path])}:
            errors.append("The copy cannot overwrite its source")
        elif (why := new_file_problem(loc)) is not None:
            errors.append(why)
        if loc and self.chain_copy():
            srcs = {
                os.path.abspath(f)
                for n in self.node.ancestors() + [self.node]
                for f in (n.record.files or [n.path])
            }
            for path, _n in self.targets()[:-1]:
                if os.path.abspath(path) in srcs:
                    errors.append(f"{path} would overwrite a source image; choose another name")
                elif os.path.lexists(path):
                    errors.append(f"{path} already exists; choose another name")
        size = self.node.record.virtual_size or 0
        if self.resize_box.isChecked():
            err = self.new_size.error()
            v = self.new_size.value()
            if err:
                errors.append(err)
            elif v is not None and v < size:
                errors.append(
                    f"A copy cannot be smaller than the source ({format_size(size)}); "
                    "shrink with Resize after checking the content"
                )
            else:
                size = v or size
        limit = (
            b.max_size_for(self.config.values() if self.config is not None else None)
            if b is not None
            else None
        )
        if limit is not None and size > limit:
            errors.append(f"{b.name} images can be at most {describe_size(limit)}")
        if self.config is not None:
            errors += self.config.messages()
        enc = self.encryption.currentData()
        if b is not None:
            errors += encryption_problems(b, enc, self.passphrase)
        if enc is not None and self.chain_copy():
            errors.append("An encrypted copy is one image: flatten the chain")
        if loc and size:
            flags = self.variant.flags()
            warnings += size_warnings(
                loc,
                size,
                preallocate=bool(flags & ImageFlags.FIXED),
                split=bool(flags & ImageFlags.SPLIT_2G),
            )
            room = room_problem(loc, size, preallocate=bool(flags & ImageFlags.FIXED))
            if room:
                errors.append(room)
        self.messages.show_messages(errors, warnings)
        self.ok.setEnabled(not errors)

    def set_params(self, p: CopyParams) -> None:
        """Fill the dialog with what was chosen before (its job failed: change, retry)."""
        self.set_format(p.dst_format)
        self.variant.set_flags(p.variant or ImageFlags.NONE)
        self.location.set_path(p.dst)
        if p.as_chain and self.as_chain.isEnabled():
            self.as_chain.setChecked(True)
        self.keep_uuid.setChecked(p.keep_uuid)
        if p.new_size:
            self.resize_box.setChecked(True)
            self.new_size.setValue(p.new_size)
        if self.config is not None and p.dst_config:
            self.config.set_values(p.dst_config)
        if p.encrypt:
            self.encryption.setCurrentIndex(max(self.encryption.findData(p.encrypt), 0))
        self.validate()

    def params(self) -> CopyParams:
        """Arguments for copy_image(src, dst, dst_format, **copy_kwargs())."""
        rec = self.node.record
        resized = self.resize_box.isChecked() and self.new_size.value() != rec.virtual_size
        return CopyParams(
            src=self.node.path,
            dst=self.location.path(),
            dst_format=self.backend().name,
            src_format=rec.format,
            variant=self.variant.flags(),
            keep_uuid=self.keep_uuid.isEnabled() and self.keep_uuid.isChecked(),
            as_chain=self.chain_copy(),
            # with a chain copy the new size applies to the copy of the selected image only
            new_size=self.new_size.value() if resized else None,
            dst_config=(self.config.values() or None) if self.config is not None else None,
            encrypt=self.encryption.currentData(),
            passphrase=(self.passphrase.take() if self.encryption.currentData() is not None
                        else None),
        )
