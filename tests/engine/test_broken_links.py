"""Operations that rewrite children's links after changing a parent (compact, resize, a backward
merge, move) rewrite only the links that matched before they started (issue #12 item 17).

After a write into a parent with children, a child whose link names the parent's modification
identity (VHDX parent_linkage = the parent's DataWriteGuid, VMDK parentCID = the parent's CID)
rightly no longer opens: it would read over changed content. A later operation on the parent
must not make it open again by rewriting that link."""
from __future__ import annotations

import os

import pytest

from tests.engine.ops_support import (
    MiB,
    ext_of,
    fake_registered,  # noqa: F401 - fixture
    file_sha,
    links_by_modification,
    read_chain,
)
from vdgui.vd import Disk, ParentMismatch, compact, merge, move_image, resize

# the formats whose link names the parent's modification identity (checked in each test)
MOD_LINKED = ["VHDX", "VMDK"]


def _broken_child(tmp_path, fmt, *, depth=0):
    """base (<- mid ...) <- top <- kid; then a write into top breaks kid's link."""
    e = ext_of(fmt)
    assert links_by_modification(fmt, tmp_path / "ml")
    names = [str(tmp_path / f"l{i}.{e}") for i in range(depth + 1)]
    kid = str(tmp_path / f"kid.{e}")
    with Disk() as d:
        d.create_base(names[0], 8 * MiB, fmt)
        d.write(0, b"\x11" * MiB)
        for n in names[1:]:
            d.create_diff(n, fmt)
            d.write(MiB, b"\x22" * MiB)
        d.create_diff(kid, fmt)
        d.write(2 * MiB, b"\x33" * 4096)
    with Disk.open_chain(names[-1], None) as d:
        d.write(0, b"\x44" * 4096)             # the parent changes under kid
    with pytest.raises(ParentMismatch):
        read_chain(kid)
    return names, kid


@pytest.mark.parametrize("fmt", MOD_LINKED)
@pytest.mark.parametrize("op", ["compact", "resize"])
def test_compact_and_resize_leave_a_broken_link_broken(tmp_path, fmt, op):
    names, kid = _broken_child(tmp_path, fmt)
    sha = file_sha(kid)
    if op == "compact":
        compact(names[-1])
    else:
        resize(names[-1], 16 * MiB)
    assert file_sha(kid) == sha
    with pytest.raises(ParentMismatch):
        read_chain(kid)


@pytest.mark.parametrize("fmt", MOD_LINKED)
def test_compact_still_relinks_a_matching_child(tmp_path, fmt):
    """The other side: a child whose link matched is rewritten and reads as before."""
    e = ext_of(fmt)
    base, kid = str(tmp_path / f"b.{e}"), str(tmp_path / f"k.{e}")
    with Disk() as d:
        d.create_base(base, 8 * MiB, fmt)
        d.write(0, b"\x11" * MiB)
        d.create_diff(kid, fmt)
        d.write(2 * MiB, b"\x33" * 4096)
    want = read_chain(kid)
    resize(base, 16 * MiB)
    assert read_chain(kid)[:8 * MiB] == want


@pytest.mark.parametrize("fmt", MOD_LINKED)
def test_backward_merge_leaves_a_broken_link_broken(tmp_path, fmt):
    (l0, l1), kid = _broken_child(tmp_path, fmt, depth=1)
    merge(l0, l1)                              # backward: l1 takes l0's data, becomes a base
    assert not os.path.exists(l0)
    with pytest.raises(ParentMismatch):
        read_chain(kid)


@pytest.mark.parametrize("fmt", MOD_LINKED)
def test_move_leaves_a_broken_link_broken(tmp_path, fmt):
    names, kid = _broken_child(tmp_path, fmt)
    sha = file_sha(kid)
    move_image(names[-1], str(tmp_path / f"moved.{ext_of(fmt)}"))
    assert file_sha(kid) == sha
