"""merge(): forward and backward, any distance, middle of the chain, cancellation, refusals."""
from __future__ import annotations

import os

import pytest

from tests.engine.ops_support import (
    ProgressLog,
    build_chain,
    copy_set,
    fake_registered,  # noqa: F401 - autouse fixture
    file_sha,
    formats_with,
    links_by_modification,
    qemu_verify,
    read_chain,
    snapshot,
    temps_in,
)
from vdgui.vd import (
    Cancelled,
    Disk,
    InvalidArgument,
    NotSupported,
    OpenFlags,
    Operation,
    ParentMismatch,
    get_backend,
    merge,
    merge_disk,
    probe,
)

FORMATS = formats_with(Operation.WRITE, Operation.RELINK, diff=True)

# (source, target) on a chain c0 (base) .. c3; every case keeps c3's view (or the target's)
CASES = [
    (3, 0), (3, 1), (2, 1), (3, 2), (1, 0),      # forward: whole, middle, top, bottom
    (0, 3), (1, 2), (0, 2), (1, 3), (2, 3),      # backward
]


def _check_result(qemu, tmp_path, fmt, paths, views, s, t, before):
    forward = s > t
    lo, hi = (t + 1, s) if forward else (s, t - 1)
    gone = paths[lo:hi + 1]
    for p in gone:
        assert not os.path.exists(p), f"{p} should have been deleted"
    kept = [p for p in paths if p not in gone]
    top = kept[-1]
    assert read_chain(top) == views[-1]
    # the target reads what the source (forward) / itself (backward) read before
    assert read_chain(paths[t]) == views[s if forward else t]
    # images not involved are byte-identical
    above = (s if forward else t) + 1       # relinked (forward) / link refreshed (backward)
    involved = {paths[t]} | ({paths[above]} if above < len(paths) else set())
    for p in kept:
        if p not in involved:
            assert file_sha(p) == before[p], f"{p} changed"
    with Disk.open_chain(top, None, OpenFlags.READ_ONLY) as d:
        names = [os.path.basename(i.location) for i in d.images]
        assert names == [os.path.basename(p) for p in kept]
    assert not temps_in(tmp_path)
    for i, p in enumerate(kept):
        idx = paths.index(p)
        want = views[s] if forward and idx == t else views[idx]
        qemu_verify(qemu, p, probe(p).name, want, tmp_path, is_base=(i == 0))


SHORT = [(3, 0), (2, 1), (0, 3), (1, 2)]
FULL_FORMATS = ("VDI", "FAKEDIFF")      # every case; the other backends run the short list
MATRIX = [(f, s, t) for f in FORMATS for s, t in (CASES if f in FULL_FORMATS else SHORT)]


@pytest.mark.parametrize("fmt,s,t", MATRIX, ids=[f"{f}-{s}to{t}" for f, s, t in MATRIX])
def test_merge(tmp_path, qemu, fmt, s, t):
    paths, views = build_chain(tmp_path, fmt)
    before = snapshot(paths)
    log = ProgressLog()
    try:
        merge(paths[s], paths[t], progress=log)
    except NotSupported as exc:
        # a backend that cannot turn a differencing image into a base refuses at the relink;
        # nothing was relinked or deleted and the chain reads as before
        assert s == 0 and "base" in str(exc), exc
        assert all(os.path.exists(p) for p in paths)
        assert read_chain(paths[-1]) == views[-1]
        assert read_chain(paths[t]) == views[t]
        return
    log.assert_well_formed()
    _check_result(qemu, tmp_path, fmt, paths, views, s, t, before)


def _mixed_chain(folder, fmt):
    """A chain mixing ``fmt`` with another backend, in the first order both accept."""
    others = [f for f in FORMATS if f != fmt] or [fmt]
    other = "FAKEDIFF" if fmt != "FAKEDIFF" else others[0]
    for n, fmts in enumerate([[fmt, other, fmt, other], [fmt, other, other, other],
                              [other, fmt, fmt, fmt]]):
        d = folder / f"try{n}"
        d.mkdir()
        try:
            return d, build_chain(d, fmt, fmts=fmts)
        except NotSupported:
            continue
    raise AssertionError(f"no mixed chain with {fmt} and {other} can be built")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("s,t", [(2, 0), (1, 3)])
def test_merge_mixed_formats(tmp_path, qemu, fmt, s, t):
    """Chain of two formats: merge across the boundary both ways."""
    d, (paths, views) = _mixed_chain(tmp_path, fmt)
    before = snapshot(paths)
    merge(paths[s], paths[t])
    _check_result(qemu, d, fmt, paths, views, s, t, before)


@pytest.mark.parametrize("fmt", FORMATS)
def test_merge_disk_api(tmp_path, fmt):
    paths, views = build_chain(tmp_path, fmt)
    d = Disk()
    for i, p in enumerate(paths):
        d.open(p, None, OpenFlags.NORMAL if i in (1, 3) else OpenFlags.READ_ONLY)
    try:
        merge_disk(d, 2, 1)
        assert len(d) == 3
        out = d.read(0, d.size)
        assert out == views[3]
    finally:
        d.close()
    assert not os.path.exists(paths[2])
    assert read_chain(paths[3]) == views[3]


@pytest.fixture
def unthrottled(monkeypatch):
    """Progress reports every step (no 50 ms throttle), so cancels land mid-copy without sleeps."""
    import vdgui.vd.ops.merge as m
    import vdgui.vd.progress as progress_mod
    monkeypatch.setattr(progress_mod, "INTERVAL", 0.0)
    monkeypatch.setattr(m, "CHUNK", 256 * 1024)


CANCEL = [(f, s, t) for f in FORMATS
          for s, t in ([(3, 0), (2, 1), (0, 3), (1, 2)] if f in FULL_FORMATS else [(2, 1), (1, 2)])]


@pytest.mark.parametrize("fmt,s,t", CANCEL, ids=[f"{f}-{s}to{t}" for f, s, t in CANCEL])
def test_merge_cancel(tmp_path, fmt, s, t, unthrottled):
    (tmp_path / "orig").mkdir()
    paths, views = build_chain(tmp_path / "orig", fmt)
    cancelled = 0
    for k in (1, 2, 5, 11):
        work = copy_set(paths, tmp_path / f"k{k}")
        before = snapshot(work)
        log = ProgressLog(cancel_at=k)
        try:
            merge(work[s], work[t], progress=log)
        except Cancelled:
            cancelled += 1
            if not (s == t + 1 and links_by_modification(fmt, tmp_path / "ml")):
                assert file_sha(work[s]) == before[work[s]], "source changed"
            assert all(os.path.exists(p) for p in work)
            top = work[-1]
            assert read_chain(top) == views[-1]
            if s < t:
                assert read_chain(work[t]) == views[t]    # backward: the target reads as before
            assert not temps_in(tmp_path / f"k{k}")
            dones = [c[0] for c in log.calls]
            assert dones == sorted(dones) and dones[0] == 0
        else:
            _check_result_simple(work, views, s, t)
    assert cancelled >= 2


def _check_result_simple(paths, views, s, t):
    lo, hi = (t + 1, s) if s > t else (s, t - 1)
    assert all(not os.path.exists(p) for p in paths[lo:hi + 1])
    kept = [p for i, p in enumerate(paths) if not lo <= i <= hi]
    assert read_chain(kept[-1]) == views[-1]


@pytest.mark.parametrize("fmt", FORMATS)
def test_merge_refusals(tmp_path, fmt):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    paths, _views = build_chain(tmp_path / "a", fmt, depth=2)
    before = snapshot(paths)
    with pytest.raises(InvalidArgument):
        merge(paths[1], paths[1])
    # a separate chain: not related
    other, _ = build_chain(tmp_path / "b", fmt, depth=1)
    with pytest.raises(ParentMismatch, match="not in one chain"):
        merge(paths[2], other[1])
    # a sibling of c1 (another child of c0): merging c2 into c0 would change what it reads
    with Disk.open_chain(paths[0], None, OpenFlags.READ_ONLY) as d:
        d.create_diff(str(tmp_path / "a" / f"sib.{os.path.splitext(paths[0])[1][1:]}"), fmt)
    with pytest.raises(InvalidArgument, match="another differencing image"):
        merge(paths[2], paths[0])
    # backward 0 -> 2 would delete c0, the sibling's parent
    with pytest.raises(InvalidArgument, match="lose its parent"):
        merge(paths[0], paths[2])
    assert snapshot(paths) == before


def test_merge_refuses_without_relink(tmp_path):
    """A backend with diffs but no RELINK: forward merge of the top is fine (nothing to relink),
    backward merge is refused before any byte changes."""
    from tests.engine import fake_backend

    class NoRelink(fake_backend.FakeBackend):
        name = "FAKENORELINK"
        operations = fake_backend.FakeBackend.operations - {Operation.RELINK}

    be = NoRelink()
    from vdgui.vd import registry
    registry.formats.REGISTERED.remove(fake_backend.BACKEND)     # its files would probe as FAKEDIFF
    registry.formats.REGISTERED.append(be)
    try:
        paths, views = build_chain(tmp_path, "FAKENORELINK", depth=2)
        before = snapshot(paths)
        with pytest.raises(NotSupported, match="relink"):
            merge(paths[0], paths[2])
        with pytest.raises(NotSupported, match="relink"):
            merge(paths[1], paths[0])            # c2 above c1 would need relinking
        assert snapshot(paths) == before
        merge(paths[2], paths[1])                # top into its parent: no relink needed
        assert read_chain(paths[1]) == views[2]
        assert get_backend("FAKENORELINK") is be
    finally:
        registry.formats.REGISTERED.remove(be)
        registry.formats.REGISTERED.append(fake_backend.BACKEND)


def test_merge_refuses_image_in_use(tmp_path):
    """A target opened for writing elsewhere (a running VM, qemu): refused before any write."""
    from vdgui.vd import ImageInUse
    paths, views = build_chain(tmp_path, "FAKEDIFF", depth=2)
    before = snapshot(paths)
    with Disk.open_chain(paths[0], None, OpenFlags.NORMAL), pytest.raises(ImageInUse):
        merge(paths[2], paths[0])
    assert snapshot(paths) == before
    merge(paths[2], paths[0], format="FAKEDIFF")
    assert read_chain(paths[0]) == views[2]


@pytest.mark.parametrize("fmt", [f for f in FORMATS if f in FULL_FORMATS or f == "QCOW2"])
@pytest.mark.parametrize("forward", [True, False], ids=["forward", "backward"])
def test_merge_grown_chain(tmp_path, fmt, forward):
    """A middle image was grown after the base was made: forward merge grows the base first
    (RESIZE), backward merge keeps the target's size; content identical."""
    from tests.engine.ops_support import ext_of
    from vdgui.vd import resize
    b, c, g = (str(tmp_path / f"{n}.{ext_of(fmt)}") for n in "bcg")
    with Disk() as d:
        d.create_base(b, 8 << 20, fmt)
        d.write(0, b"a" * (8 << 20))
        d.create_diff(c, fmt)
        d.write(1 << 20, b"b" * 4096)
    resize(c, 12 << 20)
    with Disk.open_chain(c, None, OpenFlags.NORMAL) as d:
        d.write(10 << 20, b"c" * (1 << 20))
        d.create_diff(g, fmt)
        d.write(11 << 20, b"d" * 4096)
    want = read_chain(g)
    if forward:
        merge(g, b)
        assert read_chain(b) == want and not os.path.exists(c)
    else:
        merge(b, g)
        assert read_chain(g) == want and not os.path.exists(b)


@pytest.mark.parametrize("fmt", [f for f in FORMATS if f in FULL_FORMATS])
def test_merge_relinks_every_child_of_the_source(tmp_path, fmt):
    """Two differencing images on top of the source (a snapshot tree): both are relinked."""
    from tests.engine.ops_support import ext_of
    paths, views = build_chain(tmp_path, fmt, depth=2)
    other = str(tmp_path / f"branch.{ext_of(fmt)}")
    with Disk.open_chain(paths[2], None, OpenFlags.READ_ONLY) as d:
        d.create_diff(other, fmt)
        d.write(0, b"\x99" * 4096)
        branch_view = d.read(0, d.size)
    top = str(tmp_path / f"top.{ext_of(fmt)}")
    with Disk.open_chain(paths[2], None, OpenFlags.READ_ONLY) as d:
        d.create_diff(top, fmt)
    merge(paths[2], paths[1])
    assert not os.path.exists(paths[2])
    assert read_chain(other) == branch_view
    assert read_chain(top) == views[2]
