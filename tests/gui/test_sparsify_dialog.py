"""Compact / Sparsify (issue #16, the app): the dialog shows the dry run per partition,
computed in a job, before the user chooses; the job line says what was freed."""
from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.gui.test_operations import ok
from vdgui.gui.dialogs.sparsify import SparsifyDialog
from vdgui.gui.sparsify import compact_or_sparsify
from vdgui.vd import SparsifyReport

MiB = 1 << 20
pytestmark = pytest.mark.skipif(any(shutil.which(t) is None for t in ("sfdisk", "mkfs.ext4",
                                                                     "qemu-img")),
                                reason="needs util-linux, e2fsprogs, qemu-img")


def _disk(tmp_path):
    raw = tmp_path / "d.raw"
    with open(raw, "wb") as f:
        f.write(bytes(range(256)) * (48 * MiB // 256))     # not zeroes: compact cannot drop it
    subprocess.run(["sfdisk", "-q", str(raw)], input=b"label: dos\n,24M,L\n,8M,L\n", check=True)
    part = tmp_path / "p"
    subprocess.run(["dd", f"if={raw}", f"of={part}", "bs=512", "skip=2048", "count=49152",
                    "status=none"], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "nodiscard", str(part)], check=True)
    subprocess.run(["dd", f"if={part}", f"of={raw}", "bs=512", "seek=2048", "conv=notrunc",
                    "status=none"], check=True)
    vdi = tmp_path / "d.vdi"
    subprocess.run(["qemu-img", "convert", "-O", "vdi", str(raw), str(vdi)], check=True)
    return str(vdi)


def test_the_dialog_shows_the_dry_run_and_the_job_line_what_was_freed(qtbot, window, tmp_path,
                                                                       monkeypatch):
    p = _disk(tmp_path)
    window.add_paths([p], sync=True)
    window.select_paths([p])
    assert "Sparsify" in window.actions["compact"].text()
    seen = {}

    def run_dialog(dlg, previous=None):
        assert isinstance(dlg, SparsifyDialog)
        assert not dlg.sparsify_button.isEnabled()           # nothing measured yet
        ok(qtbot, dlg.measure_job)
        qtbot.waitUntil(lambda: dlg.report is not None, timeout=5000)
        seen["rows"] = [[dlg.table.item(r, c).text() for c in range(dlg.table.columnCount())]
                        for r in range(dlg.table.rowCount())]
        seen["status"] = dlg.status.text()
        assert dlg.sparsify_button.isEnabled()
        dlg.sparsify_button.click()
        return dlg.params()
    monkeypatch.setattr(window.ops, "run_dialog", run_dialog)
    before = __import__("os").stat(p).st_blocks * 512
    job = compact_or_sparsify(window.ops)
    ok(qtbot, job)
    rows = seen["rows"]
    assert rows[0][:2] == ["1", "ext4"] and rows[1][:2] == ["2", "unknown"]
    assert rows[1][5].startswith("skipped: no file system")
    assert "can give back up to" in seen["status"]
    assert isinstance(job.result, SparsifyReport) and job.result.after < before - 16 * MiB
    line = window.jobs_panel.row_for(job).detail.text()
    assert "freed " in line and "(from " in line, line


def test_a_refused_dry_run_says_why_and_offers_compact_only(qtbot, window, tmp_path,
                                                            monkeypatch):
    p = _disk(tmp_path)
    subprocess.run(["qemu-img", "convert", "-O", "raw", p, str(tmp_path / "x.raw")], check=True)
    part = tmp_path / "q"
    subprocess.run(["dd", f"if={tmp_path / 'x.raw'}", f"of={part}", "bs=512", "skip=2048",
                    "count=49152", "status=none"], check=True)
    subprocess.run(["debugfs", "-w", "-R", "feature needs_recovery", str(part)], check=True,
                   capture_output=True)
    subprocess.run(["dd", f"if={part}", f"of={tmp_path / 'x.raw'}", "bs=512", "seek=2048",
                    "conv=notrunc", "status=none"], check=True)
    dirty = str(tmp_path / "dirty.vdi")
    subprocess.run(["qemu-img", "convert", "-O", "vdi", str(tmp_path / "x.raw"), dirty],
                   check=True)
    window.add_paths([dirty], sync=True)
    window.select_paths([dirty])
    seen = {}

    def run_dialog(dlg, previous=None):
        qtbot.waitUntil(lambda: dlg.measure_job.finished, timeout=10000)
        qtbot.waitUntil(lambda: "not possible" in dlg.status.text(), timeout=5000)
        seen["status"] = dlg.status.text()
        assert not dlg.sparsify_button.isEnabled() and dlg.compact_button.isEnabled()
        dlg.compact_button.click()
        return dlg.params()
    monkeypatch.setattr(window.ops, "run_dialog", run_dialog)
    job = compact_or_sparsify(window.ops)
    ok(qtbot, job)
    assert "needs_recovery" in seen["status"]
    assert job.kind == "compact"


def test_a_fixed_image_is_offered_its_dynamic_variant(qtbot, window, tmp_path, monkeypatch):
    """A fixed VHD was sparsified in place: zeroes written over its free space, then the job
    failed (a fixed VHD cannot be compacted). The dialog now offers the dynamic variant."""
    vdi = _disk(tmp_path)
    p = str(tmp_path / "f.vhd")
    subprocess.run(["qemu-img", "convert", "-O", "vpc", "-o", "subformat=fixed", vdi, p],
                   check=True)
    window.add_paths([p], sync=True)
    window.select_paths([p])
    seen = {}

    def run_dialog(dlg, previous=None):
        ok(qtbot, dlg.measure_job)
        qtbot.waitUntil(lambda: dlg.report is not None, timeout=5000)
        seen["visible"] = not dlg.dynamic.isHidden() and dlg.dynamic.isChecked()
        dlg.sparsify_button.click()
        return dlg.params()
    monkeypatch.setattr(window.ops, "run_dialog", run_dialog)
    before = __import__("os").stat(p).st_blocks * 512
    job = compact_or_sparsify(window.ops)
    ok(qtbot, job)
    assert seen["visible"]
    from vdgui.vd import Disk, ImageFlags, OpenFlags
    with Disk.open_chain(p, None, OpenFlags.READ_ONLY) as d:
        assert not d.top.flags & ImageFlags.FIXED
    assert job.result.after < before - 16 * MiB
