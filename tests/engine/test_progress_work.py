"""Progress totals count the bytes an operation moves, not the virtual size (issue #13 item 6:
a time-left estimate is made from them)."""
from __future__ import annotations

import pytest

from vdgui.vd import Disk, copy_image
from vdgui.vd.ops.compact import compact
from vdgui.vd.ops.merge import merge
from vdgui.vd.ops.resize import resize
from vdgui.vd.progress import Progress, WorkMap

MiB = 1 << 20
GiB = 1 << 30
DATA = 8 * MiB


def _image(path, fmt="VDI"):
    """1 GiB virtual, 8 MiB of data in four 2 MiB pieces spread over the disk."""
    with Disk() as d:
        d.create_base(str(path), GiB, fmt)
        for i in range(4):
            d.write(i * 256 * MiB, bytes([i + 1]) * (2 * MiB))
    return str(path)


def _totals(fn):
    calls = []
    fn(lambda done, total: calls.append((done, total)))
    totals = {t for _d, t in calls}
    assert len(totals) == 1, totals
    assert calls[0][0] == 0 and calls[-1] == (calls[-1][1], calls[-1][1])
    return totals.pop()


def test_workmap_counts_ranges_below_a_position():
    w = WorkMap([(10, 20), (20, 30), (100, 110)])
    assert w.total == 30
    assert [w.at(p) for p in (0, 10, 15, 30, 50, 105, 110, 999)] == [0, 0, 5, 20, 20, 25, 30, 30]
    with pytest.raises(ValueError):
        w.add(0, 5)
    seen = []
    p = Progress(lambda d, t: seen.append((d, t)), work=w, interval=0)
    p.at(50)
    p.finish()
    assert seen == [(0, 30), (20, 30), (30, 30)]


@pytest.mark.parametrize("fmt", ["VDI", "QCOW2", "VHD"])
def test_copy_total_is_the_allocated_data(tmp_path, fmt):
    src = _image(tmp_path / f"a.{fmt.lower()}", fmt)
    total = _totals(lambda cb: copy_image(src, str(tmp_path / "b.vdi"), "VDI", progress=cb))
    assert total == DATA


def test_chain_copy_and_merge_totals(tmp_path):
    base = _image(tmp_path / "base.vdi")
    with Disk.open_chain(base) as d:
        d.create_diff(str(tmp_path / "diff.vdi"), "VDI")
        d.write(512 * MiB, b"\x09" * MiB)
    diff = str(tmp_path / "diff.vdi")
    total = _totals(lambda cb: copy_image(diff, str(tmp_path / "c.vdi"), "VDI", as_chain=True,
                                          progress=cb))
    assert total == DATA + MiB
    assert _totals(lambda cb: merge(diff, base, progress=cb)) == MiB


@pytest.mark.parametrize("fmt", ["VDI", "VHD"])
def test_compact_and_resize_totals(tmp_path, fmt):
    """Compact copies the file's data, runs the hook over it, verifies the data; a grow is in
    place, metadata only: one step (issue #18 goal 1). Never the virtual GiB."""
    src = _image(tmp_path / f"a.{fmt.lower()}", fmt)
    total = _totals(lambda cb: compact(src, progress=cb))
    assert DATA <= total <= 4 * DATA
    assert _totals(lambda cb: resize(src, 2 * GiB, progress=cb)) == 1
