"""A VCI cache in front of an iSCSI disk (issue #19 part 2), against tgt on loopback: fill and
hit compared byte for byte, writes through to the LUN, and the app's "Attach Cache Image…"."""
from __future__ import annotations

import os

import pytest

from tests.gui import conftest as gui
from vdgui.vd import Disk, OpenFlags

pytestmark = pytest.mark.iscsi
IQN = "iqn.2026-11.org.vdgui.test:cached"
LUN_SIZE = 8 << 20
data_dir, library, window = gui.data_dir, gui.library, gui.window


def _backing(tmp_path):
    p = tmp_path / "lun.img"
    p.write_bytes(b"".join(bytes([i % 251 + 1]) * 4096 for i in range(LUN_SIZE // 4096)))
    return p


def _count_network_reads(d):
    top = d.images[-1]
    calls = []
    orig = top.read

    def counted(offset, length):
        calls.append((offset, length))
        return orig(offset, length)
    top.read = counted
    return calls


def test_cache_fill_hit_and_write_through(tgt_factory, tmp_path):
    t = tgt_factory()
    backing = _backing(tmp_path)
    t.add_target(IQN, str(backing))
    url = f"iscsi://127.0.0.1:{t.port}/{IQN}/1"
    c = str(tmp_path / "lun.vci")
    want = backing.read_bytes()
    with Disk() as d:
        d.open(url)
        d.cache_open(c, size=16 << 20)
        calls = _count_network_reads(d)
        assert d.read(0, LUN_SIZE) == want                       # fill
        assert calls
        n = len(calls)
        assert d.read(12345, 3 << 20) == want[12345:12345 + (3 << 20)]   # hit
        assert len(calls) == n
        d.write(1 << 20, b"\xEE" * 8192)                          # through to the LUN
        want = want[:1 << 20] + b"\xEE" * 8192 + want[(1 << 20) + 8192:]
        assert d.read(0, LUN_SIZE) == want
        assert len(calls) == n
    assert backing.read_bytes() == want
    with Disk() as d:                                              # a later session: all hits
        d.open(url, flags=OpenFlags.READ_ONLY)
        d.cache_open(c)
        calls = _count_network_reads(d)
        assert d.read(0, LUN_SIZE) == want
        assert calls == []


@pytest.mark.gui
def test_app_attaches_a_cache_to_a_network_disk(qtbot, window, tgt_factory, tmp_path,
                                                monkeypatch):
    from PySide6.QtWidgets import QFileDialog
    t = tgt_factory()
    backing = _backing(tmp_path)
    t.add_target(IQN, str(backing))
    loc = f"iscsi://127.0.0.1:{t.port}/{IQN}/1"
    window.add_network_image(loc, "iSCSI", {"TargetName": IQN, "LUN": "1",
                                            "TargetAddress": f"127.0.0.1:{t.port}"})
    qtbot.waitUntil(lambda: window.model.node(loc) is not None, timeout=10000)
    c = str(tmp_path / "chosen.vci")
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: (c, ""))
    window.select_paths([loc])
    idx = window.proxy.index_for_path(loc)
    menu = window._context_menu(window.tree.visualRect(idx).center())
    entry = [a for a in menu.actions() if a.text() == "Attach &Cache Image…"]
    menu.close()
    assert entry
    entry[0].trigger()
    assert window.library.cache(loc)[0] == c
    # every open through the library puts the cache in front
    with Disk.open_chain(loc, "iSCSI", OpenFlags.READ_ONLY, library=window.library) as d:
        assert d.cache is not None and d.cache.path == c
        assert d.read(0, LUN_SIZE) == backing.read_bytes()
    with Disk.open_chain(loc, "iSCSI", OpenFlags.READ_ONLY, library=window.library) as d:
        calls = _count_network_reads(d)
        assert d.read(0, 1 << 20) == backing.read_bytes()[:1 << 20]
        assert calls == []
    menu = window._context_menu(window.tree.visualRect(idx).center())
    entry = [a for a in menu.actions() if a.text() == "Detach &Cache Image"]
    menu.close()
    assert entry
    entry[0].trigger()
    assert window.library.cache(loc) is None
    with Disk.open_chain(loc, "iSCSI", OpenFlags.READ_ONLY, library=window.library) as d:
        assert d.cache is None


@pytest.mark.gui
def test_details_pane_shows_the_cache(qtbot, window, tgt_factory, tmp_path):
    """A network disk with a cache image: the details pane shows the cache file, its capacity,
    what it holds, its file size and the hits and misses of the opens since it was attached;
    nothing once detached, and nothing for a disk without one."""
    from vdgui.gui import cache as gui_cache
    from vdgui.vd import format_size
    t = tgt_factory()
    backing = _backing(tmp_path)
    t.add_target(IQN, str(backing))
    loc = f"iscsi://127.0.0.1:{t.port}/{IQN}/1"
    window.add_network_image(loc, "iSCSI", {"TargetName": IQN, "LUN": "1",
                                            "TargetAddress": f"127.0.0.1:{t.port}"})
    qtbot.waitUntil(lambda: window.model.node(loc) is not None, timeout=10000)
    window.select_paths([loc])
    pane = window.details
    qtbot.waitUntil(lambda: pane.node is not None and pane.node.path == loc, timeout=5000)
    assert not pane.cache_box.isVisibleTo(window)
    c = str(tmp_path / "lun.vci")
    gui_cache.attach_cache(window, loc, c)                  # what the menu entry does
    f = pane.cache_fields
    assert pane.cache_box.isVisibleTo(window)
    assert f["path"].text() == c
    assert "made at the first open" in f["state"].text()
    with Disk.open_chain(loc, "iSCSI", OpenFlags.READ_ONLY, library=window.library) as d:
        assert d.read(0, 4 << 20) == backing.read_bytes()[:4 << 20]     # misses: the fill
        assert d.read(0, 2 << 20) == backing.read_bytes()[:2 << 20]     # hits
        counts = d.cache_info()
    assert counts["hits"] and counts["misses"]
    window.refresh_view()                                   # as when a job's records arrive
    info = gui_cache.details(window.library, loc)
    assert info["cached_bytes"] >= 4 << 20
    assert f["path"].text() == c and f["state"].text() == "ready"
    assert f["size"].text().startswith(format_size(info["size"]))
    assert f["cached"].text().startswith(format_size(info["cached_bytes"]))
    assert f["file_size"].text().startswith(format_size(os.path.getsize(c)))
    hits, misses = window.library.cache_counts(c)
    assert hits >= counts["hits"] and misses >= counts["misses"]   # + the pane's own opens
    assert f["counts"].text().startswith(f"{hits:,} / {misses:,}".replace(",", "\u2009"))
    gui_cache.detach_cache(window, loc)
    assert not pane.cache_box.isVisibleTo(window)
