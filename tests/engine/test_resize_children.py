"""Resize in place and differencing images (issue #18 goal 3): where an in-place resize changes
nothing a child's link names (Backend.resize_keeps_child_links), resize reads no other file of
the folder; everywhere, a child still opens and reads the same after its parent is resized."""
from __future__ import annotations

import builtins
import os

import pytest

from vdgui.vd import Disk, get_backend, resize

EXT = {"VDI": "vdi", "VMDK": "vmdk", "VHD": "vhd", "VHDX": "vhdx", "QCOW2": "qcow2",
       "QED": "qed"}
MiB = 1 << 20


@pytest.mark.parametrize("fmt", sorted(EXT))
def test_a_child_reads_the_same_after_its_parent_is_resized(tmp_path, fmt):
    base, child = str(tmp_path / f"b.{EXT[fmt]}"), str(tmp_path / f"c.{EXT[fmt]}")
    with Disk() as d:
        d.create_base(base, 64 * MiB, fmt)
        d.write(MiB, b"\x5a" * 65536)
        d.create_diff(child, fmt)
        d.write(4 * MiB, b"\xa5" * 65536)
    with Disk.open_chain(child) as d:
        before = d.read(0, 8 * MiB)
        linked = d.images[1].parent_modification_uuid == d.images[0].modification_uuid
    inode = os.stat(base).st_ino
    resize(base, 128 * MiB)
    with Disk.open_chain(base) as d:
        assert d.size >= 128 * MiB
    if get_backend(fmt).resize_keeps_child_links:     # resized in place, child or not
        assert os.stat(base).st_ino == inode
    with Disk.open_chain(child) as d:
        assert len(d.images) == 2
        assert d.read(0, 8 * MiB) == before
        # a link naming the parent's modification UUID (VDI) still names it
        assert (d.images[1].parent_modification_uuid == d.images[0].modification_uuid) == linked


@pytest.mark.parametrize("fmt", ["QCOW2", "QED", "VMDK", "VDI"])
def test_resize_in_place_reads_no_stray_file_of_the_folder(tmp_path, monkeypatch, fmt):
    assert get_backend(fmt).resize_keeps_child_links
    img = str(tmp_path / f"a.{EXT[fmt]}")
    with Disk() as d:
        d.create_base(img, 64 * MiB, fmt)
        d.write(MiB, b"\x5a" * 65536)
    for i in range(40):     # other images' names and plain files: none may be opened
        (tmp_path / f"stray{i}.{EXT[fmt] if i % 2 else 'bin'}").write_bytes(b"\0" * 4096)
    opened: list[str] = []
    real_open, real_os_open = builtins.open, os.open

    def spy_open(file, *a, **kw):
        opened.append(os.fspath(file) if not isinstance(file, int) else "")
        return real_open(file, *a, **kw)

    def spy_os_open(path, *a, **kw):
        opened.append(os.fspath(path))
        return real_os_open(path, *a, **kw)

    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(os, "open", spy_os_open)
    resize(img, 128 * MiB)
    monkeypatch.undo()
    assert [p for p in opened if "stray" in p] == []
    assert any(p.endswith(f"a.{EXT[fmt]}") for p in opened)
    with Disk.open_chain(img) as d:
        assert d.size == 128 * MiB
        assert d.read(MiB, 65536) == b"\x5a" * 65536
