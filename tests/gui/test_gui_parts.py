"""The GUI as small parts (issue #14 item 5): the operations controller turns parameters into a
job and refreshes what the job touched; the window delegates to it."""
from __future__ import annotations

import pytest

from tests.gui.conftest import MiB, wait_job
from vdgui.jobs import JobState

pytestmark = pytest.mark.gui


def test_the_operations_controller_refreshes_what_a_job_touched(qtbot, window, vdi_chain):
    window.add_paths(list(vdi_chain.values()), sync=True)
    path = vdi_chain["branch"]
    window.select_paths([path])
    node = window.model.node(path)
    assert node.record.virtual_size == 8 * MiB
    job = window.ops.start_resize(node, 16 * MiB)
    wait_job(qtbot, job)
    assert job.state == JobState.DONE, job.error
    # the row and the details pane show the new size once the rescan lands
    qtbot.waitUntil(lambda: window.model.node(path).record.virtual_size == 16 * MiB,
                    timeout=5000)
    assert window.details.node is not None and window.details.node.path == path
    assert window.details.node.record.virtual_size == 16 * MiB
    assert window.start_resize.__doc__ == "Operations.start_resize"   # the window delegates


def test_dialogs_return_dataclasses(qtbot, window, vdi_chain, tmp_path):
    """Each dialog gives back its own dataclass (typed fields), not a dict."""
    import dataclasses

    from vdgui.gui.dialogs import params
    from vdgui.gui.dialogs.copy import CopyDialog
    from vdgui.gui.dialogs.create import CreateDialog, CreateDiffDialog
    from vdgui.gui.dialogs.merge import MergeDialog
    from vdgui.gui.dialogs.network_disk import NetworkDiskDialog
    from vdgui.gui.dialogs.resize import ResizeDialog
    window.add_paths(list(vdi_chain.values()), sync=True)
    node = window.model.node(vdi_chain["snap2"])
    dialogs = {params.CreateParams: CreateDialog(str(tmp_path), window, size=4 * MiB),
               params.SnapshotParams: CreateDiffDialog(node, window),
               params.CopyParams: CopyDialog(node, window),
               params.MergeParams: MergeDialog(node, window),
               params.ResizeParams: ResizeDialog(node, window),
               params.NetworkDiskParams: NetworkDiskDialog(window, queue=window.queue)}
    for cls, dlg in dialogs.items():
        qtbot.addWidget(dlg)
        got = dlg.params()
        assert type(got) is cls and dataclasses.is_dataclass(got), (cls, got)
        assert all(f.type for f in dataclasses.fields(got)), cls
        with pytest.raises(dataclasses.FrozenInstanceError):
            got.__setattr__(dataclasses.fields(got)[0].name, None)
    copy = dialogs[params.CopyParams].params()
    assert (copy.src, copy.src_format, copy.new_size) == (node.path, "VDI", None)
    assert set(copy.copy_kwargs()) == ({"src_format", "variant", "keep_uuid", "as_chain"}
                                       | ({"dst_config"} if copy.dst_config else set()))
    assert dialogs[params.ResizeParams].params().size == node.record.virtual_size
