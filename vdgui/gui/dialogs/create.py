"""Create a new base image; create a differencing image (snapshot) on top of one."""
from __future__ import annotations

import os

from PySide6.QtWidgets import (
    QButtonGroup,
    QCheckBox,
    QComboBox,
    QDialog,
    QFormLayout,
    QGroupBox,
    QLabel,
    QLineEdit,
    QRadioButton,
    QVBoxLayout,
    QWidget,
)

from vdgui.vd import DeviceType, ImageFlags, applicable_keys, format_size, get_backend

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
from .params import CreateParams, SnapshotParams
from .passphrase import NewPassphraseFields, encryption_problems, target_encryptions

DEFAULT_SIZE = 20 << 30
FLOPPY_SIZE = 1440 * 1024
MAX_SLIDER = 2 << 40


class CreateDialog(QDialog):
    """Format (default first, preferred next, others under "More formats"), variant, size with
    units and a slider, location, backend create keys; warns on existing files and FS limits."""

    def __init__(self, folder: str | None = None, parent=None, *, size: int | None = None,
                 device: str | None = None):
        super().__init__(parent)
        self.device = device
        if size is None:
            size = FLOPPY_SIZE if device == "floppy" else DEFAULT_SIZE
        self.setWindowTitle("Create Virtual Disk Image")
        self.setWindowIcon(icon("create"))
        self.folder = folder or os.path.expanduser("~")
        self._name_touched = False
        main, more = creatable_backends()
        self.backends = main + more

        self.format_box = QGroupBox("Format")
        fl = QVBoxLayout(self.format_box)
        self.format_group = QButtonGroup(self)
        self.format_buttons: dict[str, QRadioButton] = {}
        self.more_widget = QWidget()
        ml = QVBoxLayout(self.more_widget)
        ml.setContentsMargins(0, 0, 0, 0)
        for b in self.backends:
            rb = QRadioButton(f"{b.name} — {b.description}" if b.description else b.name)
            rb.setIcon(format_icon(b.extensions[0].device.value if b.extensions else "hdd", b.name))
            rb.setProperty("backend", b.name)
            rb.setObjectName(f"format_{b.name}")
            self.format_group.addButton(rb)
            self.format_buttons[b.name] = rb
            (fl if b in main else ml).addWidget(rb)
        self.more = QCheckBox("Show &more formats")
        self.more.setVisible(bool(more))
        self.more.toggled.connect(self.more_widget.setVisible)
        fl.addWidget(self.more)
        fl.addWidget(self.more_widget)
        self.more_widget.setVisible(not main)
        if not main:
            self.more.setChecked(True)
        if not self.backends:
            fl.addWidget(QLabel("No registered format can create images."))

        self.variant = VariantBoxes()
        self.size = SizeEdit(size)
        self.size.setObjectName("size")
        self.location = LocationRow("", "Create image at")
        self.comment = QLineEdit()
        self.comment.setPlaceholderText("Optional description stored in the image")
        self.config_box = QGroupBox("Format options")
        self.config_layout = QVBoxLayout(self.config_box)
        self.config: ConfigForm | None = None
        self.encryption = QComboBox()
        self.encryption.setObjectName("encryption")
        self.passphrase = NewPassphraseFields()
        self.passphrase.setVisible(False)
        self.messages = MessageArea()

        form = QFormLayout()
        form.addRow("Variant:", self.variant)
        form.addRow("&Size:", self.size)
        form.addRow("&Location:", self.location)
        form.addRow("&Description:", self.comment)
        form.addRow("&Encryption:", self.encryption)
        form.addRow(self.passphrase)
        self.buttons, self.ok = ok_cancel(self, "Create")
        lay = QVBoxLayout(self)
        lay.addWidget(self.format_box)
        lay.addLayout(form)
        lay.addWidget(self.config_box)
        lay.addWidget(self.messages)
        lay.addWidget(self.buttons)

        self.format_group.buttonToggled.connect(self._format_changed)
        self.variant.changed.connect(self.validate)
        self.size.valueChanged.connect(self.validate)
        self.location.changed.connect(self._location_edited)
        self.encryption.currentIndexChanged.connect(self._encryption_changed)
        self.passphrase.changed.connect(self.validate)
        if self.backends:
            first = next((b for b in self.backends if device and
                          any(fe.device.value == device for fe in b.extensions)), self.backends[0])
            self.set_format(first.name)
        self.validate()
        self.resize(620, self.sizeHint().height())

    # -- state ----------------------------------------------------------------------------
    def backend(self):
        b = self.format_group.checkedButton()
        return get_backend(b.property("backend")) if b is not None else None

    def set_format(self, name: str) -> None:
        b = get_backend(name)
        if b in self.backends[len(creatable_backends()[0]):]:
            self.more.setChecked(True)
        self.format_buttons[b.name].setChecked(True)

    def _format_changed(self, button, checked) -> None:
        if not checked:
            return
        b = self.backend()
        self.variant.set_backend(b)
        self.size.setRange(1 << 20, b.max_size or MAX_SLIDER, f"{b.name} images")
        self.size.setGranularity(b.size_granularity)
        ext = self.extension_for(b)
        self._updating_loc = True
        if not self._name_touched or not self.location.path():
            self.location.set_path(unique_path(self.folder, "NewVirtualDisk", ext))
        else:
            self.location.set_path(with_extension(self.location.path(), ext))
        self._updating_loc = False
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

    _updating_loc = False

    def extension_for(self, b) -> str:
        """The backend's first extension declared for the device type being created (a hard
        disk unless the dialog was opened for another tab): RAW gives .raw on the hard-disk
        tab, .iso on the optical tab, .img on the floppy tab. A backend with no extension for
        that device type falls back to its default one."""
        device = self.device or DeviceType.HARD_DISK.value
        for fe in b.extensions:
            if fe.device.value == device:
                return fe.ext
        return b.default_extension()

    def _location_edited(self, *_):
        if not self._updating_loc:
            self._name_touched = True
        self.validate()

    def problems(self) -> tuple[list[str], list[str]]:
        errors, warnings = [], []
        b = self.backend()
        if b is None:
            return ["Choose a format"], []
        # the limit the backend declares for these settings (block/cluster sizes change it)
        cfg = self.config.values() if self.config is not None else None
        self.size.setRange(1 << 20, b.max_size_for(cfg) or MAX_SLIDER, f"{b.name} images")
        err = self.size.error()
        if err:
            errors.append(err)
        loc = self.location.path()
        if not loc:
            errors.append("Choose where to create the image")
        elif os.path.isdir(loc):
            errors.append(f"{loc} is a folder; add a file name")
        elif (why := new_file_problem(loc)) is not None:
            errors.append(why)
        if self.config is not None:
            errors += self.config.messages()
        errors += encryption_problems(b, self.encryption.currentData(), self.passphrase)
        size = self.size.value()
        if loc and size:
            flags = self.variant.flags()
            warnings += size_warnings(loc, size, preallocate=bool(flags & ImageFlags.FIXED),
                                      split=bool(flags & ImageFlags.SPLIT_2G))
            room = room_problem(loc, size, preallocate=bool(flags & ImageFlags.FIXED))
            if room:
                errors.append(room)
        return errors, warnings

    def validate(self, *_):
        errors, warnings = self.problems()
        self.messages.show_messages(errors, warnings)
        self.ok.setEnabled(not errors)

    def set_params(self, p: CreateParams) -> None:
        """Fill the dialog with what was typed before (a create that failed: change, retry)."""
        self.set_format(p.format)
        self.variant.set_flags(p.flags or ImageFlags.NONE)
        if p.size:
            self.size.setValue(p.size)
        self._name_touched = True
        self.location.set_path(p.location)
        if self.config is not None and p.config:
            self.config.set_values(p.config)
        self.comment.setText(p.comment or "")
        if p.encrypt:
            self.encryption.setCurrentIndex(max(self.encryption.findData(p.encrypt), 0))
        self.validate()

    def params(self) -> CreateParams:
        enc = self.encryption.currentData()
        return CreateParams(location=self.location.path(), size=self.size.value(),
                            format=self.backend().name, flags=self.variant.flags(),
                            config=self.config.values() if self.config is not None else {},
                            comment=self.comment.text().strip() or None, encrypt=enc,
                            passphrase=self.passphrase.take() if enc is not None else None)


class CreateDiffDialog(QDialog):
    """A differencing image on top of ``node``: format (with DIFF), location, description."""

    def __init__(self, node, parent=None):
        super().__init__(parent)
        self.node = node
        self.setWindowTitle(f"Create Differencing Image of {node.name}")
        self.setWindowIcon(icon("snapshot"))
        main, more = creatable_backends(diff=True)
        self.backends = main + more
        self.format = QComboBox()
        for b in self.backends:
            self.format.addItem(format_icon("hdd", b.name), b.name, b.name)
        pb = node.backend
        if pb is not None and pb in self.backends:
            self.format.setCurrentIndex(self.backends.index(pb))
        self.location = LocationRow("", "Create differencing image at")
        self.comment = QLineEdit()
        self.messages = MessageArea()
        info = QLabel(f"The new image records only the changes made on top of "
                      f"<b>{node.name}</b> ({format_size(node.record.virtual_size or 0)}). "
                      f"{node.name} is not changed.")
        info.setWordWrap(True)
        form = QFormLayout()
        form.addRow("&Format:", self.format)
        form.addRow("&Location:", self.location)
        form.addRow("&Description:", self.comment)
        self.buttons, self.ok = ok_cancel(self, "Create")
        lay = QVBoxLayout(self)
        lay.addWidget(info)
        lay.addLayout(form)
        lay.addWidget(self.messages)
        lay.addWidget(self.buttons)
        self.format.currentIndexChanged.connect(self._format_changed)
        self.location.changed.connect(self.validate)
        self._format_changed()
        self.resize(560, self.sizeHint().height())

    def _format_changed(self, *_):
        b = get_backend(self.format.currentData()) if self.format.count() else None
        if b is None:
            self.validate()
            return
        folder = os.path.dirname(self.node.path)
        stem = os.path.splitext(self.node.name)[0]
        cur = self.location.path()
        if not cur:
            self.location.set_path(unique_path(folder, f"{stem}-snapshot", b.default_extension()))
        else:
            self.location.set_path(with_extension(cur, b.default_extension()))
        self.validate()

    def validate(self, *_):
        errors = []
        if not self.backends:
            errors.append("No registered format can create differencing images")
        loc = self.location.path()
        if not loc:
            errors.append("Choose where to create the image")
        elif (why := new_file_problem(loc)) is not None:
            errors.append(why)
        self.messages.show_messages(errors, [])
        self.ok.setEnabled(not errors)

    def set_params(self, p: SnapshotParams) -> None:
        """Fill the dialog with what was chosen before (its job failed: change, retry)."""
        i = self.format.findData(p.format)
        if i >= 0:
            self.format.setCurrentIndex(i)
        self.location.set_path(p.location)
        self.comment.setText(p.comment or "")
        self.validate()

    def params(self) -> SnapshotParams:
        return SnapshotParams(parent=self.node.path, location=self.location.path(),
                              format=self.format.currentData(),
                              comment=self.comment.text().strip() or None)
