"""The children scan (the other differencing images of an image, found in its folder) and chain
discovery through symbolic links (issue #12 items 14 and 20).

* Every entry is examined, whatever its name: dot-files and unknown extensions are children too.
* An incomplete scan (an entry that cannot be examined, too many entries) refuses the merge.
* Symbolic links leading out of the image's folder are never followed by discovery: the UUID
  search does not find a parent through them, and a child reached through one is not rewritten.
"""
from __future__ import annotations

import os

import pytest

from tests.engine.ops_support import (
    MiB,
    build_chain,
    ext_of,
    fake_registered,  # noqa: F401 - fixture
    file_sha,
    formats_with,
    read_chain,
    snapshot,
)
from vdgui.vd import Disk, OpenFlags, Operation, ParentNotFound, VDError, compact, copy_image, merge
from vdgui.vd import chain as chain_mod
from vdgui.vd.errors import ScanIncomplete

FORMATS = formats_with(Operation.WRITE, Operation.RELINK, diff=True)
UUID_LINKED = ("VDI", "VHDX", "VMDK")       # the cases


def _child(parent: str, path: str, fmt: str, fill: int) -> bytes:
    with Disk.open_chain(parent, None, OpenFlags.READ_ONLY) as d:
        d.create_diff(path, fmt)
        d.write(MiB, bytes([fill]) * 4096)
        return d.read(0, d.size)


@pytest.mark.parametrize("fmt", FORMATS)
def test_merge_relinks_children_the_old_scan_did_not_see(tmp_path, fmt):
    """base <- mid <- {top, other.ovl, .hidden}: after merging mid into base, all three open and
    read as before (the old scan skipped dot-files and unknown extensions)."""
    paths, _views = build_chain(tmp_path, fmt, depth=1)
    mid = paths[1]
    kids = [str(tmp_path / f"top.{ext_of(fmt)}"), str(tmp_path / "other.ovl"),
            str(tmp_path / f".hidden.{ext_of(fmt)}")]
    want = {k: _child(mid, k, fmt, 0x40 + i) for i, k in enumerate(kids)}
    merge(mid, paths[0])
    assert not os.path.exists(mid)
    for k in kids:
        assert read_chain(k) == want[k], k


def test_merge_refused_when_the_scan_is_incomplete(tmp_path, monkeypatch):
    """More entries than the scan looks at, or an entry a differencing format claims but that
    cannot be examined: the merge refuses, naming why, and changes nothing."""
    paths, _views = build_chain(tmp_path, "VDI", depth=2)
    before = snapshot(paths)
    monkeypatch.setattr(chain_mod, "CHILD_SCAN_LIMIT", 2)
    with pytest.raises(ScanIncomplete, match="more than 2 entries"):
        merge(paths[1], paths[0])
    assert snapshot(paths) == before
    monkeypatch.undo()
    (tmp_path / "broken.img").write_bytes(b"QFI\xfb" + b"\xff" * 1020)   # a damaged qcow2
    with pytest.raises(ScanIncomplete, match="broken.img: cannot be examined"):
        merge(paths[1], paths[0])
    assert snapshot(paths) == before
    os.unlink(tmp_path / "broken.img")
    merge(paths[1], paths[0])
    assert not os.path.exists(paths[1])


def test_scan_skips_our_temporaries_and_special_files(tmp_path):
    paths, _views = build_chain(tmp_path, "VDI", depth=1)
    os.mkfifo(tmp_path / "fifo.vdi")                        # opening it would hang
    (tmp_path / f".{os.path.basename(paths[1])}.vdgui-tmp-999999").write_bytes(
        (tmp_path / os.path.basename(paths[1])).read_bytes())
    os.mkdir(tmp_path / "folder.vdi")
    top = str(tmp_path / "top.vdi")
    want = _child(paths[1], top, "VDI", 0x51)
    merge(paths[1], paths[0])
    assert read_chain(top) == want


@pytest.mark.parametrize("fmt", ["VDI", "VMDK"])       # parents found by UUID search
@pytest.mark.parametrize("how", ["file", "folder"])
def test_uuid_search_does_not_follow_links_out_of_the_folder(tmp_path, fmt, how):
    """A/child's parent lives outside A; A/evil.EXT -> ../outside/base.EXT (or A/Snapshots ->
    ../outside) must not make the chain open without unsafe paths being allowed."""
    a, out = tmp_path / "A", tmp_path / "outside"
    a.mkdir()
    out.mkdir()
    e = ext_of(fmt)
    base = str(out / f"base.{e}")
    with Disk() as d:
        d.create_base(base, 4 * MiB, fmt)
        d.write(0, b"\x77" * MiB)
    child = str(out / f"child.{e}")
    _child(base, child, fmt, 0x12)
    os.rename(child, a / f"child.{e}")
    for extra in os.listdir(out):          # a split child's extents go along
        if extra.startswith("child"):
            os.rename(out / extra, a / extra)
    child = str(a / f"child.{e}")
    if how == "file":
        os.symlink(f"../outside/base.{e}", a / f"evil.{e}")
    else:
        os.symlink("../outside", a / "Snapshots")
    with pytest.raises(ParentNotFound):
        Disk.open_chain(child, None, OpenFlags.READ_ONLY).close()
    with pytest.raises(VDError):
        copy_image(child, str(tmp_path / "out.raw"), "RAW")
    assert not os.path.exists(tmp_path / "out.raw")


@pytest.mark.parametrize("fmt", UUID_LINKED)
def test_merge_does_not_rewrite_a_child_reached_through_a_link_out(tmp_path, fmt):
    """A/c2.EXT -> ../outside/c2.EXT, a differencing image of A's image: a merge in A refuses
    (relinking would rewrite the outside file) and changes nothing; compact of the parent
    refuses likewise."""
    a, out = tmp_path / "A", tmp_path / "outside"
    a.mkdir()
    out.mkdir()
    e = ext_of(fmt)
    paths, _views = build_chain(a, fmt, depth=1)
    real_c2 = str(out / f"c2.{e}")
    _child(paths[1], str(a / f"c2.{e}"), fmt, 0x33)
    os.rename(a / f"c2.{e}", real_c2)
    os.symlink(f"../outside/c2.{e}", a / f"c2.{e}")
    before = snapshot(paths + [real_c2])
    with pytest.raises(ScanIncomplete, match="symbolic link leading out of the folder"):
        merge(paths[1], paths[0])
    assert snapshot(paths + [real_c2]) == before
    with pytest.raises(ScanIncomplete, match="symbolic link leading out of the folder"):
        compact(paths[1])
    assert file_sha(real_c2) == before[real_c2]
