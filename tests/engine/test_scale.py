"""The library at scale (issue #18 goal 5): what a load of many images costs, as counts."""
from __future__ import annotations

import os

from vdgui.vd import Disk, Library
from vdgui.vd import chain as chain_mod

MiB = 1 << 20


def _chain(folder, name, depth):
    paths = []
    with Disk() as d:
        base = os.path.join(folder, f"{name}-0.vdi")
        d.create_base(base, 4 * MiB, "VDI")
        paths.append(base)
        for k in range(1, depth):
            p = os.path.join(folder, f"{name}-{k}.vdi")
            d.create_diff(p)
            paths.append(p)
    return paths


def test_scanning_an_unchanged_library_writes_nothing(tmp_path):
    """A second load of the same images makes no library writes (each was a synced commit)."""
    paths = _chain(str(tmp_path), "c", 3)
    with Library(str(tmp_path / "lib.sqlite3")) as lib:
        for p in paths:
            lib.add(p)
        first = lib.scan_all()
        before = lib._db.total_changes
        again = lib.scan_all()
        assert lib._db.total_changes == before
        assert [(r.path, r.uuid, r.parent_path) for r in again] == \
               [(r.path, r.uuid, r.parent_path) for r in first]
        assert lib.entry(paths[2])["parent_path"] == paths[1]
        # a change is still written
        os.remove(paths[0])
        lib.scan_all()
        assert lib._db.total_changes > before


def test_uuid_search_lists_a_folder_once_while_it_is_unchanged(tmp_path, monkeypatch):
    """VDI children find their parent by UUID in the folder; N children in one folder
    resolved every name of it N times (quadratic). Now the folder is read again only after
    an entry is added, removed or renamed."""
    folder = str(tmp_path)
    paths = _chain(folder, "c", 4)
    for i in range(20):
        with Disk() as d:
            d.create_base(os.path.join(folder, f"other{i:02d}.vdi"), MiB, "VDI")
    listed = []
    real_listdir = os.listdir
    monkeypatch.setattr(chain_mod.os, "listdir",
                        lambda d: listed.append(d) or real_listdir(d))
    with Library(str(tmp_path / "lib.sqlite3")) as lib:
        for p in paths:
            lib.add(p)
        recs = lib.scan_all()
        parents = {r.path: r.parent_path for r in recs}
        assert parents[paths[3]] == paths[2] and parents[paths[1]] == paths[0]
        assert listed.count(folder) <= 1
        # a renamed parent is found under its new name (the folder changed)
        os.rename(paths[1], os.path.join(folder, "moved.vdi"))
        rec = lib.scan(paths[2])
        assert rec.parent_path == os.path.join(folder, "moved.vdi")
        assert listed.count(folder) == 2


def test_uuid_search_follows_a_link_swapped_in_place(tmp_path):
    """Symbolic links are checked at every search, not remembered with the folder."""
    folder = tmp_path / "f"
    out = tmp_path / "out"
    folder.mkdir()
    out.mkdir()
    base, _child = _chain(str(out), "c", 2)
    with Disk.open_chain(base) as d:
        uuid = d.images[0].uuid
    link = folder / "a.vdi"
    link.symlink_to(base)                       # leads out of the folder: never followed
    assert chain_mod.find_by_uuid(uuid, str(folder / "x.vdi")) is None
    inside = folder / "b.vdi"
    os.link(base, inside)                       # same file, inside the folder (a hard link)
    assert chain_mod.find_by_uuid(uuid, str(folder / "x.vdi")) == str(inside)
