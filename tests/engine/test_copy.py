"""copy_image / move_image: flattening, chain copies, sizes, sparseness, UUIDs, cancellation."""
from __future__ import annotations

import itertools
import os
import time

import pytest

from tests.conftest import pattern, read_all, sha
from tests.engine import fake_backend
from vdgui.vd import (
    Alloc,
    Backend,
    Cancelled,
    Cap,
    ConfigError,
    ConfigKey,
    Disk,
    FileExists,
    Image,
    ImageFlags,
    InvalidArgument,
    KeyFlag,
    NotSupported,
    OpenFlags,
    Operation,
    ValueType,
    backends,
    chain_target_names,
    copy_image,
    move_image,
    open_image,
    parse_config,
)
from vdgui.vd import registry as _registry
from vdgui.vd.fileio import ImageFile

MiB = 1 << 20
BLK = fake_backend.BLOCK
FAKE = fake_backend.NAME


@pytest.fixture
def fake():
    undo = fake_backend.register()
    yield fake_backend.BACKEND
    undo()


def _bytes(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _listing(folder) -> list[str]:
    return sorted(os.listdir(folder))


def _raw(path, size, writes):
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in writes:
            f.seek(off)
            f.write(data)
    return str(path)


def make_chain(tmp_path, size=4 * MiB):
    """base.fkd <- d1.fkd <- d2.fkd; returns (paths, expected content of each level)."""
    paths = [str(tmp_path / n) for n in ("base.fkd", "d1.fkd", "d2.fkd")]
    views = []
    with Disk() as d:
        d.create_base(paths[0], size, FAKE)
        buf = bytearray(size)
        for off, data in [(0, pattern(BLK, 1)), (3 * BLK, pattern(2 * BLK, 2)),
                          (10 * BLK, bytes(BLK)),            # an all-zero block, allocated
                          (size - 1000, b"\x7f" * 1000)]:
            d.write(off, data)
            buf[off:off + len(data)] = data
        views.append(bytes(buf))
        d.create_diff(paths[1], FAKE)
        for off, data in [(3 * BLK, pattern(BLK, 9)), (20 * BLK + 512, b"\x42" * 700)]:
            d.write(off, data)
            buf[off:off + len(data)] = data
        views.append(bytes(buf))
        d.create_diff(paths[2], FAKE)
        for off, data in [(0, bytes(BLK)),                # zeroes hiding the base's data
                          (30 * BLK, pattern(BLK, 5))]:
            d.write(off, data)
            buf[off:off + len(data)] = data
        views.append(bytes(buf))
        assert read_all(d) == views[-1]
    return paths, views


def own_runs(disk, level):
    return [(e.start, e.length) for e in disk.allocation(top=level, bottom=level)
            if e.level == level]


# ---------------------------------------------------------------------------------------------
def test_flatten_chain_to_raw_and_fake(tmp_path, fake):
    paths, views = make_chain(tmp_path)
    before = [sha(p) for p in paths]
    out = copy_image(paths[2], str(tmp_path / "flat.img"), "raw")
    assert out == [str(tmp_path / "flat.img")]
    assert _bytes(out[0]) == views[2]
    out2 = copy_image(paths[2], str(tmp_path / "flat.fkd"), FAKE)
    with open_image(out2[0]) as d:
        assert not d.top.is_diff
        assert read_all(d) == views[2]
    assert [sha(p) for p in paths] == before
    assert not [n for n in _listing(tmp_path) if "vdgui-tmp" in n]


def test_src_top_copies_one_member_view(tmp_path, fake):
    paths, views = make_chain(tmp_path)
    out = copy_image(paths[2], str(tmp_path / "upto1.img"), "RAW", src_top=1)
    assert _bytes(out[0]) == views[1]
    with pytest.raises(InvalidArgument):
        copy_image(paths[2], str(tmp_path / "bad.img"), "RAW", src_top=7)


def test_as_chain_each_diff_holds_only_its_own_blocks(tmp_path, fake):
    paths, views = make_chain(tmp_path)
    dst = str(tmp_path / "out" / "copy.fkd")
    os.mkdir(tmp_path / "out")
    out = copy_image(paths[2], dst, FAKE, as_chain=True)
    assert out == chain_target_names(dst, paths)
    # DST is the copy of the top (what a VM attaches); the members below are named after theirs
    assert [os.path.basename(p) for p in out] == ["copy-base.fkd", "copy-d1.fkd", "copy.fkd"]
    assert _listing(tmp_path / "out") == sorted(os.path.basename(p) for p in out)
    with Disk.open_chain(out[2], flags=OpenFlags.READ_ONLY) as t, \
            Disk.open_chain(paths[2], flags=OpenFlags.READ_ONLY) as s:
        assert len(t) == 3
        for lv in range(3):
            assert t.read(0, t.size, top=lv) == views[lv]
            # same block size on both sides: the target member holds exactly the source's blocks
            assert own_runs(t, lv) == own_runs(s, lv)
        # new UUIDs, consistent links
        assert {str(i.uuid) for i in t.images}.isdisjoint({str(i.uuid) for i in s.images})
        for lv in (1, 2):
            assert t.image(lv).parent_uuid == t.image(lv - 1).uuid


def test_as_chain_with_kept_uuids(tmp_path, fake):
    paths, _ = make_chain(tmp_path)
    dst = str(tmp_path / "k.fkd")
    out = copy_image(paths[2], dst, FAKE, as_chain=True, keep_uuid=True)
    with Disk.open_chain(out[2], flags=OpenFlags.READ_ONLY) as t, \
            Disk.open_chain(paths[2], flags=OpenFlags.READ_ONLY) as s:
        assert [i.uuid for i in t.images] == [i.uuid for i in s.images]
        assert t.image(2).parent_uuid == s.image(2).parent_uuid


def test_keep_uuid_flat(tmp_path, fake):
    paths, _ = make_chain(tmp_path)
    with open_image(paths[0], flags=OpenFlags.INFO) as s:
        src_uuid = s.top.uuid
    a = copy_image(paths[0], str(tmp_path / "a.fkd"), FAKE)[0]
    b = copy_image(paths[0], str(tmp_path / "b.fkd"), FAKE, keep_uuid=True)[0]
    with open_image(a, flags=OpenFlags.INFO) as da, open_image(b, flags=OpenFlags.INFO) as db:
        assert da.top.uuid != src_uuid
        assert db.top.uuid == src_uuid


def test_as_chain_refused_for_format_without_diffs(tmp_path, fake):
    paths, _ = make_chain(tmp_path)
    before = _listing(tmp_path)
    with pytest.raises(NotSupported, match="flatten"):
        copy_image(paths[2], str(tmp_path / "c.img"), "RAW", as_chain=True)
    assert _listing(tmp_path) == before


def test_chain_target_names_top_is_dst_and_names_stay_apart(tmp_path):
    assert chain_target_names(
        "/v/top_copy.qcow2", ["/a/base.vdi", "/a/snap1.vdi", "/a/snap4.vdi"]
    ) == ["/v/top_copy-base.qcow2", "/v/top_copy-snap1.qcow2", "/v/top_copy.qcow2"]
    # two members with one stem, odd characters, a network location
    names = chain_target_names("/v/c.vdi", ["/a/x.vdi", "/b/x.vmdk", "iscsi://h/iqn:1/0", "/t.vdi"])
    assert names[-1] == "/v/c.vdi" and len(set(names)) == 4
    assert names[:3] == ["/v/c-x.vdi", "/v/c-x-1.vdi", "/v/c-0.vdi"]


def test_as_chain_top_gets_dst_and_members_keep_their_sizes(tmp_path):
    """base (2 MiB) <- snap1 <- snap2 <- snap4 grown to 3 MiB, copied as a chain to
    snap4_copy.qcow2: that name holds snap4's copy (3 MiB, the whole view), the base's copy is
    2 MiB; every level reads as the source's level."""
    from vdgui.vd import resize

    d = tmp_path / "vm"
    d.mkdir()
    names = ["base", "snap1", "snap2", "snap4"]
    paths = [str(d / f"{n}.vdi") for n in names]
    with Disk() as disk:
        disk.create_base(paths[0], 2 * MiB, "VDI")
        disk.write(0, b"\x11" * MiB)
        for i, p in enumerate(paths[1:], 1):
            disk.create_diff(p)
            disk.write(i * 256 * 1024, bytes([0x20 + i]) * 4096)
    resize(paths[3], 3 * MiB)
    with Disk.open_chain(paths[3]) as disk:
        disk.write(2 * MiB + 4096, b"\x44" * 4096)
    with Disk.open_chain(paths[3], flags=OpenFlags.READ_ONLY) as s:
        views = [s.read(0, s.image(lv).size, top=lv) for lv in range(4)]
        sizes = [s.image(lv).size for lv in range(4)]
    assert sizes == [2 * MiB, 2 * MiB, 2 * MiB, 3 * MiB]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    dst = str(out_dir / "snap4_copy.qcow2")
    out = copy_image(paths[3], dst, "QCOW2", as_chain=True)
    assert out[-1] == dst
    assert [os.path.basename(p) for p in out] == [
        "snap4_copy-base.qcow2",
        "snap4_copy-snap1.qcow2",
        "snap4_copy-snap2.qcow2",
        "snap4_copy.qcow2",
    ]
    assert _listing(out_dir) == sorted(os.path.basename(p) for p in out)
    with Disk.open_chain(dst, flags=OpenFlags.READ_ONLY) as t:
        assert [os.path.basename(i.location) for i in t.images] == [
            os.path.basename(p) for p in out
        ]
        assert [t.image(lv).size for lv in range(4)] == sizes
        for lv in range(4):
            assert t.read(0, t.image(lv).size, top=lv) == views[lv], f"level {lv}"


# -- sizes -------------------------------------------------------------------------------------
def test_grow(tmp_path, fake):
    src = _raw(tmp_path / "s.img", 2 * MiB, [(5000, b"abc"), (2 * MiB - 3, b"xyz")])
    out = copy_image(src, str(tmp_path / "g.fkd"), FAKE, new_size=3 * MiB)[0]
    with open_image(out) as d:
        assert d.size == 3 * MiB
        assert read_all(d) == _bytes(src) + bytes(MiB)


def test_shrink_over_zeroes(tmp_path):
    src = _raw(tmp_path / "s.img", 4 * MiB, [(100, b"abc"), (3 * MiB, bytes(4096))])
    out = copy_image(src, str(tmp_path / "small.img"), "RAW", new_size=MiB)[0]
    assert os.path.getsize(out) == MiB
    assert _bytes(out) == _bytes(src)[:MiB]


def test_shrink_refused_when_data_beyond(tmp_path):
    src = _raw(tmp_path / "s.img", 4 * MiB, [(3 * MiB + 77, b"!")])
    before = _listing(tmp_path)
    with pytest.raises(InvalidArgument, match=f"offset {3 * MiB + 77}"):
        copy_image(src, str(tmp_path / "small.img"), "RAW", new_size=2 * MiB)
    assert _listing(tmp_path) == before


# -- sparseness --------------------------------------------------------------------------------
def test_sparse_target_skips_unallocated_and_zero_blocks(tmp_path, fake):
    size = 8 * MiB
    writes = [
        (0, pattern(BLK, 3)),
        (2 * BLK, bytes(3 * BLK)),  # all-zero data: not written
        (7 * BLK, pattern(2 * BLK, 4)),
        (40 * BLK, bytes(BLK)),
        (41 * BLK + 4096, b"\x01"),
        (100 * BLK, pattern(BLK, 8)),
    ]
    src = _raw(tmp_path / "s.img", size, writes)
    with open_image(src, flags=OpenFlags.READ_ONLY) as s:
        src_data = [(e.start, e.length) for e in s.allocation() if e.status == Alloc.DATA]
        assert (2 * BLK, 3 * BLK) in src_data or any(a <= 2 * BLK < a + n for a, n in src_data)
    out = copy_image(src, str(tmp_path / "t.fkd"), FAKE)[0]
    with open_image(out, flags=OpenFlags.READ_ONLY) as t:
        runs = [(e.start, e.length) for e in t.allocation() if e.status != Alloc.UNALLOCATED]
        assert read_all(t) == _bytes(src)
    assert runs == [(0, BLK), (7 * BLK, 2 * BLK), (41 * BLK, BLK), (100 * BLK, BLK)]
    # a RAW target keeps the holes as holes too (4 KiB granularity)
    out2 = copy_image(src, str(tmp_path / "t.img"), "RAW")[0]
    with open_image(out2, flags=OpenFlags.READ_ONLY) as t:
        data = [(e.start, e.length) for e in t.allocation() if e.status == Alloc.DATA]
    assert data == [(0, BLK), (7 * BLK, 2 * BLK), (41 * BLK + 4096, 4096), (100 * BLK, BLK)]


# -- progress and cancellation ------------------------------------------------------------------
def test_progress_monotonic_from_zero_to_total(tmp_path, fake):
    paths, _ = make_chain(tmp_path)
    calls = []

    def cb(done, total):
        calls.append((done, total))
        time.sleep(0.055)  # let the throttled reporter pass every step through

    copy_image(paths[2], str(tmp_path / "p.fkd"), FAKE, as_chain=True, progress=cb)
    total = calls[0][1]
    assert calls[0] == (0, total) and calls[-1] == (total, total)
    # the bytes the copy moves: the base's data, then what each differencing image holds itself
    with Disk.open_chain(paths[2], FAKE, OpenFlags.READ_ONLY) as d:
        moved = sum(e.length for e in d.allocation(top=0) if e.status == Alloc.DATA)
        moved += sum(n for lv in (1, 2) for _s, n in own_runs(d, lv))
    assert total == moved < 3 * 4 * MiB
    assert all(t == total for _, t in calls)
    assert all(a[0] <= b[0] for a, b in itertools.pairwise(calls))
    assert len(calls) >= 4


@pytest.mark.parametrize("as_chain", [False, True])
def test_cancel_at_several_points_leaves_nothing(tmp_path, fake, as_chain):
    paths, _ = make_chain(tmp_path)
    before_hash = [sha(p) for p in paths]
    before = _listing(tmp_path)
    # count the calls of a full run first
    n_calls = []

    def count(d, t):
        n_calls.append(d)
        time.sleep(0.055)

    copy_image(paths[2], str(tmp_path / "full.fkd"), FAKE, as_chain=as_chain, progress=count)
    for f in (
        chain_target_names(str(tmp_path / "full.fkd"), paths)
        if as_chain
        else [str(tmp_path / "full.fkd")]
    ):
        os.unlink(f)
    points = sorted({1, 2, len(n_calls) // 2, len(n_calls)})
    assert len(points) >= 3
    for k in points:
        seen = []

        def cb(done, total, k=k):
            seen.append(done)
            time.sleep(0.055)
            return len(seen) < k

        with pytest.raises(Cancelled):
            copy_image(paths[2], str(tmp_path / "c.fkd"), FAKE, as_chain=as_chain, progress=cb)
        assert len(seen) == k
        assert _listing(tmp_path) == before, f"cancel at call {k} left files"
        assert [sha(p) for p in paths] == before_hash


def test_failure_in_backend_leaves_nothing(tmp_path, fake, monkeypatch):
    paths, _ = make_chain(tmp_path)
    before = _listing(tmp_path)
    calls = []
    orig = fake_backend.FakeImage.write

    def failing(self, offset, data, fill):
        calls.append(offset)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return orig(self, offset, data, fill)

    monkeypatch.setattr(fake_backend.FakeImage, "write", failing)
    with pytest.raises(OSError):
        copy_image(paths[2], str(tmp_path / "f.fkd"), FAKE)
    assert _listing(tmp_path) == before


def test_existing_target_refused_and_overwrite(tmp_path):
    src = _raw(tmp_path / "s.img", MiB, [(0, b"new")])
    dst = _raw(tmp_path / "d.img", MiB, [(0, b"old")])
    with pytest.raises(FileExists):
        copy_image(src, dst, "RAW")
    assert _bytes(dst)[:3] == b"old"
    copy_image(src, dst, "RAW", overwrite=True)
    assert _bytes(dst)[:3] == b"new"
    with pytest.raises(InvalidArgument, match="source"):
        copy_image(src, src, "RAW", overwrite=True)


def test_variant_refused_cleanly(tmp_path):
    src = _raw(tmp_path / "s.img", MiB, [(0, b"x")])
    before = _listing(tmp_path)
    with pytest.raises(NotSupported):
        copy_image(src, str(tmp_path / "v.img"), "RAW", variant=ImageFlags.STREAM_OPTIMIZED)
    assert _listing(tmp_path) == before


# -- non-file targets ----------------------------------------------------------------------------
class _DevImage(Image):
    def __init__(self, backend, path, ro):
        super().__init__(backend, "-", ro)
        self.f = ImageFile(path, writable=not ro)
        self.size = self.f.size()
        self.block_size = 512

    def block_status(self, offset, length):
        return [(offset, length, Alloc.DATA)]

    def read(self, offset, length):
        return self.f.pread(offset, length)

    def write(self, offset, data, fill):
        self.f.pwrite(offset, data)

    def close(self):
        self.f.close()


class _DevBackend(Backend):
    name = "TESTDEV"
    caps = Cap.CONFIG
    config_keys = (ConfigKey("Target", None, ValueType.STRING, KeyFlag.MANDATORY),)
    operations = frozenset({Operation.WRITE})

    def open(self, location, flags=OpenFlags.NORMAL, config=None):
        cfg = parse_config(self.config_keys, config, owner=self.name)
        return _DevImage(self, cfg["Target"], flags.read_only)


@pytest.fixture
def dev(monkeypatch):
    monkeypatch.setattr(
        _registry.formats, "REGISTERED", [*_registry.formats.REGISTERED, _DevBackend()]
    )


def test_copy_onto_non_file_target(tmp_path, dev):
    src = _raw(tmp_path / "s.img", MiB, [(4096, b"hello")])
    device = _raw(tmp_path / "device.bin", 2 * MiB, [(0, b"\xff" * (2 * MiB))])
    before = _listing(tmp_path)
    assert copy_image(src, "-", "TESTDEV", dst_config={"Target": device}) == ["-"]
    got = _bytes(device)
    assert got[:MiB] == _bytes(src)  # zero ranges were written as zeroes
    assert got[MiB:] == b"\xff" * MiB  # beyond the copy: untouched
    assert _listing(tmp_path) == before
    small = _raw(tmp_path / "small.bin", 4096, [])
    with pytest.raises(InvalidArgument, match="too small"):
        copy_image(src, "-", "TESTDEV", dst_config={"Target": small})
    with pytest.raises(ConfigError, match="Target"):
        copy_image(src, "-", "TESTDEV", dst_config={})


# -- move --------------------------------------------------------------------------------------
def test_move_renames_and_keeps_content(tmp_path, fake):
    paths, views = make_chain(tmp_path)
    h = sha(paths[0])
    os.mkdir(tmp_path / "else")
    # the top moved within its folder
    assert move_image(paths[2], str(tmp_path / "top2.fkd"))[0] == str(tmp_path / "top2.fkd")
    assert not os.path.exists(paths[2])
    with Disk.open_chain(str(tmp_path / "top2.fkd"), flags=OpenFlags.READ_ONLY) as d:
        assert read_all(d) == views[2]
    # a diff moved into a Snapshots subfolder still finds its parent (link rewritten)
    os.mkdir(tmp_path / "Snapshots")
    moved = str(tmp_path / "Snapshots" / "d1.fkd")
    move_image(paths[1], moved)
    with Disk.open_chain(moved, flags=OpenFlags.READ_ONLY) as d:
        assert read_all(d) == views[1]
    # into an unrelated folder the parent could only be named with '..': refused and undone
    h1 = sha(moved)
    with pytest.raises(NotSupported, match="parent"):
        move_image(moved, str(tmp_path / "else" / "d1.fkd"))
    assert _listing(tmp_path / "else") == []
    with Disk.open_chain(moved, flags=OpenFlags.READ_ONLY) as d:
        assert read_all(d) == views[1]
    assert sha(moved) == h1
    with pytest.raises(FileExists):
        move_image(paths[0], moved)
    assert sha(paths[0]) == h


def test_move_across_file_systems_copies_then_deletes(tmp_path, fake, monkeypatch):
    from vdgui.vd.ops import copy as copymod

    monkeypatch.setattr(copymod, "_same_fs", lambda a, b: False)
    src = _raw(tmp_path / "s.img", 3 * MiB, [(MiB, pattern(BLK, 1))])
    h = sha(src)
    calls = []
    out = move_image(src, str(tmp_path / "m.img"), progress=lambda d, t: calls.append((d, t)))
    assert out == [str(tmp_path / "m.img")] and not os.path.exists(src)
    assert sha(out[0]) == h
    assert os.stat(out[0]).st_blocks * 512 < MiB  # still sparse
    assert calls[0][0] == 0 and calls[-1][0] == calls[-1][1]


# -- every creatable file backend of the table ---------------------------------------------------
def _creatable():
    # encrypted-only formats (raw LUKS) need a passphrase: tests/interop/test_luks_interop.py
    return [b.name for b in backends() if b.creatable and b.writable and b.caps & Cap.FILE
            and not b.needs_passphrase]


@pytest.mark.parametrize("fmt", _creatable())
def test_copy_to_every_registered_backend(tmp_path, fmt):
    size = 3 * MiB
    src = _raw(
        tmp_path / "s.img",
        size,
        [(0, pattern(BLK, 2)), (MiB + 512, b"\x33" * 5000), (size - 512, b"\x44" * 512)],
    )
    be = next(b for b in backends() if b.name == fmt)
    out = copy_image(src, str(tmp_path / f"t.{be.default_extension() or 'img'}"), fmt)[0]
    with open_image(out, flags=OpenFlags.READ_ONLY) as d:
        got = read_all(d)
    assert got[:size] == _bytes(src) and not any(got[size:])


def _multi_file_variants(tmp_path):
    """(backend, variant) pairs of the table whose images are several files."""
    found = []
    for b in backends():
        if not (b.creatable and b.caps & Cap.FILE):
            continue
        for v in (ImageFlags.SPLIT_2G, ImageFlags.ESX, ImageFlags.SPLIT_2G | ImageFlags.FIXED):
            if v & ~b.create_flags:
                continue
            p = str(tmp_path / f"probe-{b.name}-{int(v)}.{b.default_extension()}")
            with Disk() as d:
                d.create_base(p, MiB, b, flags=v)
                files = d.top.files()
            for f in files:
                os.unlink(f)
            if len(files) > 1:
                found.append((b, v))
    return found


def test_move_multi_file_images(tmp_path):
    cases = _multi_file_variants(tmp_path)
    assert cases, "no backend in the table creates multi-file images"
    for b, v in cases:
        folder = tmp_path / f"{b.name}{int(v)}"
        (folder / "there").mkdir(parents=True)
        src = str(folder / f"m.{b.default_extension()}")
        with Disk() as d:
            d.create_base(src, MiB, b, flags=v)
            d.write(4096, b"multi" * 100)
        want = None
        with open_image(src, flags=OpenFlags.READ_ONLY) as d:
            want = read_all(d)
        renamed = str(folder / f"n.{b.default_extension()}")
        move_image(src, renamed)  # same folder, new name
        assert not os.path.exists(src)
        moved = move_image(renamed, str(folder / "there" / f"n.{b.default_extension()}"))
        assert _listing(folder) == ["there"]
        with open_image(moved[0], flags=OpenFlags.READ_ONLY) as d:
            assert read_all(d) == want
            assert sorted(d.top.files()) == sorted(moved)


def test_move_parent_keeps_children_linked_or_refuses(tmp_path, fake):
    (tmp_path / "c").mkdir()
    paths, views = make_chain(tmp_path / "c")
    hashes = {p: sha(p) for p in paths}
    # renamed in its folder: the child is relinked to the new name
    new_base = str(tmp_path / "c" / "base2.fkd")
    move_image(paths[0], new_base)
    with Disk.open_chain(paths[2], flags=OpenFlags.READ_ONLY) as d:
        assert d.image(0).location.endswith("base2.fkd")
        assert read_all(d) == views[2]
    sub_base = new_base
    # to a sibling folder: the child could only name it with '..' -> refused, all undone
    os.mkdir(tmp_path / "far")
    before = sha(sub_base)
    with pytest.raises(NotSupported, match="parent"):
        move_image(sub_base, str(tmp_path / "far" / "base.fkd"))
    assert os.listdir(tmp_path / "far") == [] and sha(sub_base) == before
    with Disk.open_chain(paths[2], flags=OpenFlags.READ_ONLY) as d:
        assert read_all(d) == views[2]
    assert sha(paths[2]) == hashes[paths[2]]


@pytest.mark.parametrize("fmt", ["VDI", "QCOW2", "VHDX", "RAW"])
def test_sync_false_skips_only_the_fsync(tmp_path, monkeypatch, fmt):
    """sync=True (the default) waits for the disk before the rename; sync=False (qemu's
    cache=unsafe) makes the same complete image and renames it into place, without fsync."""
    src = tmp_path / "src.raw"
    _raw(src, 8 * MiB, [(0, pattern(MiB, 1)), (5 * MiB + 4096, pattern(70000, 2))])
    calls = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd))[1])
    copy_image(str(src), str(tmp_path / "durable.img"), fmt)
    assert calls, "a durable copy fsyncs its target"
    calls.clear()
    copy_image(str(src), str(tmp_path / "fast.img"), fmt, sync=False)
    assert calls == []
    for name in ("durable.img", "fast.img"):
        with Disk.open_chain(str(tmp_path / name), fmt, OpenFlags.READ_ONLY) as d:
            assert read_all(d) == _bytes(src)
    assert sorted(os.listdir(tmp_path)) == ["durable.img", "fast.img", "src.raw"]
