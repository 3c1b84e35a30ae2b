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
