"""Issue #12's trust items in the app: the details pane never resizes behind the user's back,
chain copies name the copy of the selected image as typed, repair asks first and keeps data,
duplicate UUIDs are marked and can be fixed."""
from __future__ import annotations

import os

import pytest

from tests.gui.conftest import MiB, wait_job
from vdgui.gui.dialogs.copy import CopyDialog
from vdgui.jobs import JobState
from vdgui.vd import Disk, OpenFlags, resize

pytestmark = pytest.mark.gui


def ok(qtbot, job, timeout=30000):
    wait_job(qtbot, job, timeout)
    assert job.state == JobState.DONE, job.error
    return job


# -- item 5: copy as a chain -------------------------------------------------------------------
def test_copy_as_chain_names_the_selected_image_and_keeps_sizes(qtbot, window, vdi_chain, tmp_path):
    resize(vdi_chain["snap2"], 12 * MiB)          # the top is larger than the images below it
    window.add_paths([vdi_chain["snap2"]], sync=True)
    node = window.model.node(vdi_chain["snap2"])
    dlg = CopyDialog(node, window)
    qtbot.addWidget(dlg)
    dlg.set_format("QCOW2")
    out = tmp_path / "out"
    out.mkdir()
    dst = str(out / "snap2_copy.qcow2")
    dlg.location.set_path(dst)
    dlg.as_chain.setChecked(True)
    assert dlg.ok.isEnabled(), dlg.messages.errors
    # every file name is shown before the copy starts; the typed name is snap2's copy
    names = [(os.path.basename(p), n.name) for p, n in dlg.targets()]
    assert names == [("snap2_copy-base.qcow2", "base.vdi"), ("snap2_copy-snap1.qcow2", "snap1.vdi"),
                     ("snap2_copy.qcow2", "snap2.vdi")]
    text = dlg.preview.text()
    for f, src in names:
        assert f in text and f"copy of {src}" in text
    # a name below the top that is taken is refused before starting
    (out / "snap2_copy-snap1.qcow2").write_bytes(b"")
    dlg.validate()
    assert not dlg.ok.isEnabled() and any("snap2_copy-snap1.qcow2" in e for e in dlg.messages.errors)
    os.unlink(out / "snap2_copy-snap1.qcow2")
    dlg.validate()
    job = ok(qtbot, window.start_copy(node, dlg.params()))
    assert job.result[-1] == dst
    with Disk.open_chain(dst, flags=OpenFlags.READ_ONLY) as t, \
            Disk.open_chain(vdi_chain["snap2"], flags=OpenFlags.READ_ONLY) as s:
        assert [os.path.basename(i.location) for i in t.images] == [n for n, _ in names]
        assert [i.size for i in t.images] == [8 * MiB, 8 * MiB, 12 * MiB]
        for lv in range(3):
            assert t.read(0, t.image(lv).size, top=lv) == s.read(0, s.image(lv).size, top=lv)
    qtbot.waitUntil(lambda: [n.path for n in window.selected_nodes()] == [dst], timeout=5000)
