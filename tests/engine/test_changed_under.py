"""A file deleted, renamed or replaced while an operation runs (issue #12 item 15): before it
relinks or deletes anything, every operation checks that each file is still the one it opened
(same device and inode); otherwise it stops with ImageChanged and relinks and deletes nothing."""
from __future__ import annotations

import os
import shutil

import pytest

from tests.engine.ops_support import (  # noqa: F401 - fixtures
    MiB,
    build_chain,
    fake_registered,
    file_sha,
    formats_with,
    read_chain,
    snapshot,
    unthrottled,
)
from vdgui.vd import Operation, compact, merge
from vdgui.vd.errors import ImageChanged
from vdgui.vd.fileio import ImageFile, check_same_file

FORMATS = formats_with(Operation.WRITE, Operation.RELINK, diff=True)


def _link_of(path):
    """What ``path`` says about its parent (a relink changes at least one of these)."""
    from vdgui.vd import OpenFlags, probe
    img = probe(path).open(path, OpenFlags.INFO | OpenFlags.READ_ONLY, None)
    try:
        h = img.parent_hint
        return (img.parent_uuid, img.parent_modification_uuid, tuple(h.locations),
                img.info().get("parent_cid"))
    finally:
        img.close()


def _once(action):
    done = []

    def cb(d, t):
        if d > 0 and not done:
            done.append(1)
            action()
    return cb


def _replace_with_copy(path):
    tmp = path + ".copy"
    shutil.copyfile(path, tmp)
    os.replace(tmp, path)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_merge_target_changed_while_merging(tmp_path, fmt, how, unthrottled):
    """merge s base with base deleted (or replaced by a copy) mid-way: ImageChanged; the
    source is not deleted and its child not relinked (with base replaced by a copy of itself
    made before the merge, the chain still reads as before)."""
    paths, views = build_chain(tmp_path, fmt, depth=2, size=4 * MiB)
    base, s, top = paths
    kept, link = snapshot([s]), _link_of(top)
    shutil.copyfile(base, base + ".orig")
    act = ((lambda: os.unlink(base)) if how == "deleted"
           else (lambda: os.replace(base + ".orig", base)))     # the base as it was before
    with pytest.raises(ImageChanged, match="while the merge ran"):
        merge(s, base, progress=_once(act))
    assert snapshot([s]) == kept and _link_of(top) == link   # not deleted, not relinked
    if how == "replaced":
        assert read_chain(top) == views[2]


@pytest.mark.parametrize("fmt", ["VDI", "QCOW2"])
def test_merge_source_replaced_is_not_deleted(tmp_path, fmt, unthrottled):
    """The image to be merged away replaced mid-way: the merge refuses before relinking."""
    paths, _views = build_chain(tmp_path, fmt, depth=2, size=4 * MiB)
    base, s, top = paths
    with pytest.raises(ImageChanged):
        merge(s, base, progress=_once(lambda: _replace_with_copy(s)))
    assert os.path.exists(s) and os.path.exists(top)


@pytest.mark.parametrize("fmt", ["VDI", "VHDX"])
def test_compact_original_replaced_is_kept(tmp_path, fmt, unthrottled):
    """compact whose original is replaced by another file mid-way: the other file is not
    overwritten by the compacted copy."""
    paths, _views = build_chain(tmp_path, fmt, depth=0, size=4 * MiB)
    p = paths[0]
    other = tmp_path / "other"

    def swap():
        shutil.copyfile(p, other)
        with open(other, "r+b") as f:
            f.seek(0, 2)
            f.write(b"\x01" * 512)             # a different file, same format
        os.replace(other, p)
    sha = []
    with pytest.raises(ImageChanged):
        compact(p, progress=_once(lambda: (swap(), sha.append(file_sha(p)))))
    assert file_sha(p) == sha[0]


def test_check_same_file(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"x")
    f = ImageFile(str(p))
    try:
        check_same_file(str(p), f.fd)
        os.rename(p, tmp_path / "g")
        with pytest.raises(ImageChanged, match="deleted or renamed"):
            f.check_in_place()
        p.write_bytes(b"y")
        with pytest.raises(ImageChanged, match="replaced"):
            f.check_in_place()
    finally:
        f.close()


def test_move_across_file_systems_source_replaced(tmp_path, monkeypatch):
    """A move that copies (another file system) whose source is replaced meanwhile: ImageChanged,
    the copy is removed, the file now at the source path is neither deleted nor changed."""
    import vdgui.vd.ops.copy as copy_mod
    import vdgui.vd.progress as progress_mod
    from vdgui.vd import move_image
    monkeypatch.setattr(copy_mod, "_same_fs", lambda a, b: False)
    monkeypatch.setattr(progress_mod, "INTERVAL", 0.0)
    paths, _views = build_chain(tmp_path, "VDI", depth=0, size=4 * MiB)
    p = paths[0]
    (tmp_path / "dst").mkdir()
    dst = str(tmp_path / "dst" / "moved.vdi")
    shutil.copyfile(p, tmp_path / "orig")
    with pytest.raises(ImageChanged, match="while the move ran"):
        move_image(p, dst, progress=_once(lambda: os.replace(tmp_path / "orig", p)))
    assert os.path.exists(p) and not os.path.exists(dst)
