"""Every dialog's size edit stops at the format's declared maximum (Backend.max_size_for, through
vdgui.vd) and names it (issue #12 item 8: the Resize dialog accepted 999 TiB for a VDI)."""
from __future__ import annotations

import pytest

from tests.gui.conftest import MiB
from vdgui.gui.dialogs.create import CreateDialog
from vdgui.gui.dialogs.resize import ResizeDialog
from vdgui.gui.widgets.size_edit import SizeEdit
from vdgui.vd import Disk, get_backend

pytestmark = pytest.mark.gui
TiB = 1 << 40


def test_size_edit_names_the_limit(qtbot):
    e = SizeEdit(1 << 30, maximum=2 * TiB, limit_name="VMDK images")
    qtbot.addWidget(e)
    e.setValue(3 * TiB)
    assert e.error() == "VMDK images can be at most 2 TiB (2199023255552 bytes)"


@pytest.mark.parametrize("fmt", ["VDI", "VMDK", "VHD", "VHDX", "QCOW2", "QED", "Parallels"])
def test_create_dialog_stops_at_the_declared_maximum(qtbot, window, tmp_path, fmt):
    dlg = CreateDialog(str(tmp_path), window, size=16 * MiB)
    qtbot.addWidget(dlg)
    dlg.set_format(fmt)
    limit = get_backend(fmt).max_size
    dlg.size.setValue(limit)
    assert dlg.ok.isEnabled(), dlg.messages.errors
    dlg.size.setValue(limit + (1 << 30))
    assert not dlg.ok.isEnabled()
    assert any(f"{fmt} images can be at most" in e for e in dlg.messages.errors)


def test_create_dialog_limit_follows_the_block_size(qtbot, window, tmp_path):
    dlg = CreateDialog(str(tmp_path), window, size=16 * MiB)
    qtbot.addWidget(dlg)
    dlg.set_format("VDI")
    dlg.size.setValue(20 * TiB)
    dlg.validate()
    assert not dlg.ok.isEnabled()
    dlg.config.editor("AllocationBlockSize").setText(str(2 << 20))
    dlg.validate()
    assert dlg.ok.isEnabled(), dlg.messages.errors


def test_resize_dialog_refuses_999_tib_for_a_vdi(qtbot, window, tmp_path):
    p = str(tmp_path / "r.vdi")
    with Disk() as d:
        d.create_base(p, 8 * MiB, "VDI")
    window.add_paths([p], sync=True)
    dlg = ResizeDialog(window.model.node(p), window)
    qtbot.addWidget(dlg)
    dlg.size.setValue(999 * TiB)
    assert not dlg.ok.isEnabled()
    assert any("VDI images can be at most 16 TiB" in e for e in dlg.messages.errors)
    dlg.size.setValue(16 * TiB)
    assert dlg.ok.isEnabled(), dlg.messages.errors
