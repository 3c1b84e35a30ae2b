"""Small widgets: 64-bit sizes, the allocation map's binning, the jobs panel rows."""
from __future__ import annotations

import pytest

from vdgui.gui.widgets.allocation import AllocationMap, bin_extents
from vdgui.gui.widgets.jobs_panel import fmt_duration
from vdgui.gui.widgets.size_edit import SizeEdit
from vdgui.vd import Alloc, Extent

pytestmark = pytest.mark.gui


def test_size_edit_is_64_bit_safe(qtbot):
    e = SizeEdit(8 << 40, maximum=64 << 40)
    qtbot.addWidget(e)
    assert e.value() == 8 << 40 and e.unit.currentText() == "TiB" and e.edit.text() == "8"
    got = []
    e.valueChanged.connect(got.append)
    e.edit.setText("1.5")
    assert got[-1] == 3 << 39
    e.unit.setCurrentIndex(0)                       # MiB
    assert e.value() == int(1.5 * (1 << 20))
    e.setValue(100 << 40)
    assert "at most" in e.error()
    e.edit.setText("")
    assert e.value() is None and e.error()


def test_size_edit_rounds_to_granularity_and_slider_moves(qtbot):
    e = SizeEdit(1 << 30, granularity=1 << 20)
    qtbot.addWidget(e)
    e.edit.setText("1.0001")
    e.unit.setCurrentIndex(1)
    assert e.value() % (1 << 20) == 0 and e.value() >= 1 << 30
    e.slider.setValue(1000)
    assert e.value() == 2 << 40
    e.slider.setValue(0)
    assert e.value() == 1 << 20


def test_bin_extents():
    size = 1000
    ext = [Extent(0, 100, 0, Alloc.DATA), Extent(100, 400, None, Alloc.UNALLOCATED),
           Extent(500, 250, 1, Alloc.DATA), Extent(750, 250, 1, Alloc.ZERO)]
    fr, zero, held = bin_extents(size, ext, 2, buckets=10)
    assert held == [100, 250]
    assert fr[0][0] == pytest.approx(1.0) and sum(fr[0]) == pytest.approx(1.0)
    assert fr[1][5:8] == [pytest.approx(1.0), pytest.approx(1.0), pytest.approx(0.5)]
    assert sum(zero) == pytest.approx(2.5)


def test_allocation_map_paints(qtbot):
    m = AllocationMap()
    qtbot.addWidget(m)
    m.resize(500, 80)
    m.set_data(1 << 30, [Extent(0, 1 << 20, 0, Alloc.DATA)], ["/a/base.vdi", "/a/snap.vdi"])
    assert m.legend() == [("/a/base.vdi", 1 << 20), ("/a/snap.vdi", 0)]
    assert "0.1 %" in m.summary()
    img = m.grab()
    assert not img.isNull()
    m.clear("nothing")
    assert m.members == []


def test_durations():
    assert fmt_duration(None) == "—"
    assert fmt_duration(5) == "5 s"
    assert fmt_duration(125) == "2 min 05 s"
    assert fmt_duration(7260) == "2 h 01 min"
