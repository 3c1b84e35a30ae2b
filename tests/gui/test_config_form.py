"""The config-key form builder: widgets and validation from a table of keys."""
from __future__ import annotations

import pytest
from PySide6.QtWidgets import QCheckBox, QComboBox, QLineEdit

from vdgui.gui.widgets.config_form import ConfigForm
from vdgui.vd import ConfigKey, ImageFlags, KeyFlag, ValueType, backends, get_backend

pytestmark = pytest.mark.gui

KEYS = (
    ConfigKey("TargetName", None, ValueType.STRING, KeyFlag.MANDATORY, "iSCSI target name"),
    ConfigKey("LUN", "0", ValueType.STRING, KeyFlag.MANDATORY),
    ConfigKey("InitiatorSecret", None, ValueType.BYTES),
    ConfigKey("TargetSecret", None, ValueType.BYTES, KeyFlag.EXPERT),
    ConfigKey("WriteSplit", "262144", ValueType.INTEGER, KeyFlag.EXPERT, minimum=512,
              maximum=262144),
    ConfigKey("AllocationBlockSize", "1048576", ValueType.INTEGER, KeyFlag.CREATEONLY,
              minimum=512, power_of_two=True),
    ConfigKey("BigNumber", "8589934592", ValueType.INTEGER),
)


def test_widgets_per_type(qtbot):
    form = ConfigForm(KEYS, mode="create")
    qtbot.addWidget(form)
    for k in KEYS:
        ed = form.editor(k.name)
        assert isinstance(ed, QLineEdit)          # 64-bit safe: no QSpinBox anywhere
        if k.type is ValueType.BYTES:
            assert ed.echoMode() == QLineEdit.Password
            assert ed.actions(), "a show/hide toggle"
        else:
            assert ed.echoMode() == QLineEdit.Normal
    # defaults pre-filled, big integers intact
    assert form.editor("LUN").text() == "0"
    assert form.editor("BigNumber").text() == "8589934592"
    assert form.values()["BigNumber"] == "8589934592"
    # mandatory keys are marked
    assert form.fields["TargetName"].label.text().endswith("*")
    assert form.fields["TargetName"].label.font().bold()
    assert not form.fields["InitiatorSecret"].label.text().endswith("*")


def test_mandatory_required_before_valid(qtbot):
    form = ConfigForm(KEYS, mode="create")
    qtbot.addWidget(form)
    assert not form.is_valid()
    assert form.errors() == {"TargetName": "Required"}
    with qtbot.waitSignal(form.validChanged, timeout=1000) as sig:
        form.editor("TargetName").setText("iqn.2008-01.org.example:disk1")
    assert sig.args == [True]
    assert form.is_valid()
    with qtbot.waitSignal(form.validChanged, timeout=1000) as sig:
        form.editor("LUN").setText("")
    assert sig.args == [False]


def test_invalid_values_explained_next_to_field(qtbot):
    form = ConfigForm(KEYS, {"TargetName": "t"}, mode="create")
    qtbot.addWidget(form)
    form.show()
    form.editor("AllocationBlockSize").setText("3000")
    err = form.fields["AllocationBlockSize"].error
    assert err.isVisible() and "power of two" in err.text()
    assert not form.is_valid()
    form.editor("AllocationBlockSize").setText("abc")
    assert "integer" in err.text()
    form.editor("AllocationBlockSize").setText("2097152")
    assert not err.isVisible() and form.is_valid()
    form.editor("WriteSplit").setText("999999")      # expert key: reveals the advanced part
    assert "maximum" in form.errors()["WriteSplit"]
    assert form.show_advanced.isChecked()


def test_expert_keys_hidden_until_asked(qtbot):
    form = ConfigForm(KEYS, mode="create")
    qtbot.addWidget(form)
    form.show()
    assert form.show_advanced.isVisible()
    assert not form.editor("TargetSecret").isVisible()
    assert not form.editor("WriteSplit").isVisible()
    assert form.editor("TargetName").isVisible()
    form.show_advanced.setChecked(True)
    assert form.editor("TargetSecret").isVisible()
    assert form.editor("WriteSplit").isVisible()


def test_createonly_keys_only_in_create_mode(qtbot):
    edit = ConfigForm(KEYS, {"TargetName": "t", "InitiatorSecret": b"s3cret"}, mode="edit")
    qtbot.addWidget(edit)
    assert "AllocationBlockSize" not in edit.fields
    assert "AllocationBlockSize" in ConfigForm(KEYS, mode="create").fields
    v = edit.values()
    assert v["TargetName"] == "t" and v["InitiatorSecret"] == b"s3cret"
    assert "AllocationBlockSize" not in v
    with pytest.raises(ValueError):
        ConfigForm(KEYS, mode="nonsense")


def test_no_expert_toggle_without_expert_keys(qtbot):
    form = ConfigForm(KEYS[:3], mode="create")
    qtbot.addWidget(form)
    form.show()
    assert not form.show_advanced.isVisible()


@pytest.mark.parametrize("backend", [b for b in backends() if b.config_keys],
                         ids=lambda b: b.name)
def test_registered_backends_build_forms(qtbot, backend):
    for mode in ("create", "edit"):
        form = ConfigForm(backend.config_keys, mode=mode)
        qtbot.addWidget(form)
        shown = {k.name for k in backend.config_keys
                 if (mode == "create" or not k.create_only) and not k.variant}
        assert set(form.fields) == shown
        for k in backend.config_keys:
            if k.name in form.fields and k.default is not None:
                assert form.fields[k.name].text() == k.default
            if k.name in form.fields:                  # a label a person reads, not the key
                assert k.label and form.fields[k.name].label.text().startswith(k.label)
                assert f"Key: {k.name}" in form.fields[k.name].editor.toolTip()


def test_rows_read_like_a_form(qtbot):
    """Issue #13 item 4: a label, a unit with the human size, the key name only in the tooltip."""
    form = ConfigForm(get_backend("VDI").config_keys, mode="create")
    qtbot.addWidget(form)
    f = form.fields["AllocationBlockSize"]
    assert f.label.text() == "Block size"
    assert f.unit.text() == "bytes = 1 MiB"
    assert "Key: AllocationBlockSize" in f.label.toolTip()
    f.editor.setText("2097152")
    assert f.unit.text() == "bytes = 2 MiB"
    q = ConfigForm(get_backend("QCOW2").config_keys, mode="create")
    qtbot.addWidget(q)
    assert isinstance(q.editor("Compress"), QCheckBox) and q.values()["Compress"] == "0"
    q.editor("Compress").setChecked(True)
    assert q.values()["Compress"] == "1"
    assert isinstance(q.editor("Compat"), QComboBox)
    q.editor("Compat").setCurrentText("0.10")
    assert q.values()["Compat"] == "0.10" and q.is_valid()


def test_raw_disk_keys_only_for_the_raw_disk_variant(qtbot):
    keys = get_backend("VMDK").config_keys
    assert ConfigForm(keys, mode="create").fields == {}
    raw = ConfigForm(keys, mode="create", variant=ImageFlags.RAWDISK)
    qtbot.addWidget(raw)
    assert set(raw.fields) == {"RawDrive", "Partitions", "BootSector", "Relative"}


def test_error_line_keeps_its_place(qtbot):
    form = ConfigForm(get_backend("QCOW2").config_keys, mode="create")
    qtbot.addWidget(form)
    form.show()
    qtbot.waitExposed(form)
    ed, below = form.editor("ClusterSize"), form.show_advanced

    def where():
        return below.mapTo(form, below.rect().topLeft()), form.sizeHint().height()
    before = where()
    ed.setText("3")
    assert form.fields["ClusterSize"].error.isVisible()
    qtbot.wait(10)
    assert where() == before
