"""Issue #13, the rest: estimates from the data a job moves (item 6), the Resize dialog's layout
(item 4) and dialogs that keep what was typed when their job fails (item 3)."""
from __future__ import annotations

import threading
import time

import pytest

from vdgui.jobs import tasks
from vdgui.vd import Disk, format_size

pytestmark = pytest.mark.gui

MiB = 1 << 20
GiB = 1 << 30


def test_time_left_counts_the_data_not_the_virtual_size(qtbot, window, tmp_path):
    """A 1 GiB image holding 8 MiB: the copy's total is 8 MiB and the panel's estimate is made
    from it (the virtual size would say half an hour)."""
    src = str(tmp_path / "big.vdi")
    with Disk() as d:
        d.create_base(src, GiB, "VDI")
        for i in range(4):
            d.write(i * 256 * MiB, bytes([i + 1]) * (2 * MiB))
    job = tasks.copy_job(src, str(tmp_path / "copy.vdi"), "VDI")
    inner, gate, paused = job.fn, threading.Event(), []

    def fn(progress):
        def cb(done, total):
            r = progress(done, total)
            if 0 < done < total and not paused:
                paused.append(done)
                job.signals.progress.emit(job, done, total)     # this exact point, unthrottled
                gate.wait(10)
            elif not paused:
                time.sleep(0.06)            # let the engine's throttled reporter pass a step
            return r
        return inner(cb)
    job.fn = fn
    window.start_job(job)
    try:
        qtbot.waitUntil(lambda: bool(paused) and job.done == paused[0], timeout=10000)
        done = paused[0]
        assert job.total == 8 * MiB
        job.started_at = time.monotonic() - 2.0         # 2 s for `done` bytes
        row = window.jobs_panel.rows[job.id]
        row.refresh()
        expect = (8 * MiB - done) / (done / 2.0)
        text = row.detail.text()
        assert f"{format_size(done)} of {format_size(8 * MiB)}" in text
        assert any(f"about {s} s left" in text for s in (int(expect) - 1, int(expect),
                                                         int(expect) + 1)), (expect, text)
    finally:
        gate.set()
    qtbot.waitUntil(lambda: job.finished, timeout=20000)
    assert job.state == "done"
