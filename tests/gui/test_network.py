"""Non-file images (network locations such as iscsi://…) in the library and the tree, with their
configuration kept as properties — what "Add network disk…" builds on."""
from __future__ import annotations

import pytest

import vdgui.vd.registry as registry
from vdgui.gui import actions
from vdgui.gui.widgets.config_form import ConfigForm
from vdgui.vd import (
    Alloc,
    Backend,
    Cap,
    ConfigKey,
    Image,
    KeyFlag,
    NetworkError,
    Operation,
    ValueType,
    parse_config,
)

pytestmark = pytest.mark.gui


class NetImage(Image):
    def block_status(self, offset, length):
        return [(offset, length, Alloc.DATA)]

    def read(self, offset, length):
        return bytes(length)


class FakeNet(Backend):
    name = "FAKENET"
    description = "test network backend"
    caps = Cap.CONFIG | Cap.TCPNET
    operations = frozenset({Operation.WRITE})
    config_keys = (ConfigKey("TargetName", None, ValueType.STRING, KeyFlag.MANDATORY),
                   ConfigKey("Secret", None, ValueType.BYTES),
                   ConfigKey("SizeMiB", "16", ValueType.INTEGER, KeyFlag.EXPERT, minimum=1))

    def open(self, location, flags, config=None):
        cfg = parse_config(self.config_keys, config, owner=self.name)
        if cfg["TargetName"] == "down":
            raise NetworkError(f"{location}: connection refused")
        img = NetImage(self, location, True)
        img.size = cfg["SizeMiB"] << 20
        return img


@pytest.fixture
def fakenet(monkeypatch):
    b = FakeNet()
    monkeypatch.setattr(registry.formats, "REGISTERED", [b])
    return b


def test_network_image_in_tree(qtbot, window, fakenet):
    form = ConfigForm(fakenet.config_keys, mode="create")
    qtbot.addWidget(form)
    assert not form.is_valid()
    form.editor("TargetName").setText("iqn.2024-01.test:disk")
    form.editor("Secret").setText("hunter2")
    assert form.is_valid()
    loc = "fakenet://user@host/iqn.2024-01.test:disk/0"
    job = window.add_network_image(loc, "FAKENET", form.values())
    assert window.library.properties(loc)["TargetName"] == "iqn.2024-01.test:disk"
    assert "file" in window.menus and "image" in window.menus
    qtbot.waitUntil(lambda: job.finished, timeout=5000)
    qtbot.waitUntil(lambda: window.model.node(loc) is not None, timeout=5000)
    node = window.model.node(loc)
    assert node.accessible, node.record.error
    assert node.record.virtual_size == 16 << 20
    assert node.name == "host/iqn.2024-01.test:disk/0"         # no credentials shown
    window.select_paths([loc])
    # declarations decide: not a file, so no move/delete; properties editable in the details
    assert "FILE" in (actions.reason("delete", [node], actions.Context()) or "")
    assert not window.actions["move"].isEnabled()
    assert window.details.props_form is not None
    assert window.details.props_form.editor("TargetName").text() == "iqn.2024-01.test:disk"


def test_unreachable_network_image_is_inaccessible(qtbot, window, fakenet):
    loc = "fakenet://host/down/0"
    window.library.add(loc, format="FAKENET")
    window.library.set_properties(loc, {"TargetName": "down"})
    window.add_paths([loc], sync=True)
    node = window.model.node(loc)
    assert not node.accessible and "connection refused" in node.record.error
