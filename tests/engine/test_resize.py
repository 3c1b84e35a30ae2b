"""resize(): grow (new area zero, geometry updated), shrink of an unused tail, refusals,
cancellation leaves the file byte-identical."""
from __future__ import annotations

import os

import pytest

from tests.engine.ops_support import (  # noqa: F401 - fixtures
    MiB,
    ProgressLog,
    cancel_everywhere,
    ext_of,
    fake_registered,
    file_sha,
    formats_with,
    qemu_verify,
    read_chain,
    temps_in,
    unthrottled,
)
from vdgui.vd import (
    Disk,
    ImageFlags,
    InvalidArgument,
    NotSupported,
    OpenFlags,
    Operation,
    get_backend,
    resize,
)

FORMATS = formats_with(Operation.RESIZE, Operation.WRITE)
SIZE = 8 * MiB


def _make(path, fmt, data_end=5 * MiB):
    with Disk() as d:
        d.create_base(path, SIZE, fmt)
        size = d.size
        d.write(0, b"\x11" * MiB)
        d.write(2 * MiB + 4096, b"\x22" * (data_end - 2 * MiB - 4096))
        d.flush()
    expect = bytearray(size)
    expect[0:MiB] = b"\x11" * MiB
    expect[2 * MiB + 4096:data_end] = b"\x22" * (data_end - 2 * MiB - 4096)
    return bytes(expect)


def _info(path):
    with Disk.open_chain(path, None, OpenFlags.READ_ONLY) as d:
        return d.size, d.top.pchs


@pytest.mark.parametrize("fmt", FORMATS)
def test_resize_grow(tmp_path, qemu, fmt):
    path = str(tmp_path / f"g.{ext_of(fmt)}")
    expect = _make(path, fmt)
    _, pchs0 = _info(path)
    new = 40 * MiB
    log = ProgressLog()
    resize(path, new, progress=log)
    log.assert_well_formed()
    size, pchs = _info(path)
    assert size >= new
    want = expect + bytes(size - len(expect))
    assert read_chain(path) == want
    if pchs0 is not None and pchs is not None:
        assert pchs.cylinders > pchs0.cylinders, f"geometry not updated: {pchs0} -> {pchs}"
    assert not temps_in(tmp_path)
    qemu_verify(qemu, path, fmt, want, tmp_path, is_base=True)


@pytest.mark.parametrize("fmt", FORMATS)
def test_resize_shrink(tmp_path, qemu, fmt):
    path = str(tmp_path / f"s.{ext_of(fmt)}")
    expect = _make(path, fmt)
    sha = file_sha(path)
    if not get_backend(fmt).can_shrink:
        # declared: refused before any work, whatever the tail holds; nothing changes
        for new in (4 * MiB, 6 * MiB):
            with pytest.raises(NotSupported, match="cannot be shrunk"):
                resize(path, new)
        assert file_sha(path) == sha and not temps_in(tmp_path)
        return
    # the tail holds data: refused, nothing changes
    with pytest.raises(InvalidArgument, match="holds data"):
        resize(path, 4 * MiB)
    assert file_sha(path) == sha
    resize(path, 6 * MiB)                     # the tail is unused: fine
    size, _ = _info(path)
    assert 6 * MiB <= size < SIZE             # VHD rounds up to whole CHS geometry
    assert read_chain(path) == expect[:size]
    qemu_verify(qemu, path, fmt, expect[:size], tmp_path, is_base=True)
    # growing again: the cut-off area comes back as zeroes
    resize(path, SIZE)
    got = read_chain(path)
    assert got[:size] == expect[:size] and not any(got[size:])


@pytest.mark.parametrize("fmt", FORMATS)
def test_resize_bad_sizes(tmp_path, fmt):
    path = str(tmp_path / f"x.{ext_of(fmt)}")
    _make(path, fmt)
    sha = file_sha(path)
    for bad in (0, -512, SIZE + 100, 1.5):
        with pytest.raises(InvalidArgument):
            resize(path, bad)
    assert file_sha(path) == sha


@pytest.mark.parametrize("fmt", FORMATS)
def test_resize_cancel(tmp_path, fmt, unthrottled):
    (tmp_path / "img").mkdir()
    path = str(tmp_path / "img" / f"c.{ext_of(fmt)}")
    expect = _make(path, fmt)
    with Disk.open_chain(path, flags=OpenFlags.READ_ONLY) as d:
        in_place = d.top.resizes_in_place(24 * MiB)
    points = cancel_everywhere(path, lambda p, cb: resize(p, 24 * MiB, progress=cb),
                               tmp_path / "count")
    # in place the resize is one visible step: a cancel is honoured before it, never during
    assert len(points) >= (1 if in_place else 3)
    assert read_chain(path) == expect
    if in_place and get_backend(fmt).can_shrink and fmt != "RAW":
        # the same format's copy path: a shrink works on a verified copy, cancellable throughout
        with Disk.open_chain(path, flags=OpenFlags.READ_ONLY) as d:
            assert not d.top.resizes_in_place(6 * MiB)
        points = cancel_everywhere(path, lambda p, cb: resize(p, 6 * MiB, progress=cb),
                                   tmp_path / "count2")
        assert len(points) >= 3
        assert read_chain(path) == expect


def test_resize_diff_top(tmp_path):
    """Growing the top of a chain: the parent is untouched, the new area reads zeroes."""
    base, diff = str(tmp_path / "b.fkd"), str(tmp_path / "d.fkd")
    with Disk() as d:
        d.create_base(base, SIZE, "FAKEDIFF")
        d.write(0, b"\x01" * SIZE)
        d.create_diff(diff)
        d.write(MiB, b"\x02" * MiB)
    expect = read_chain(diff)
    sha = file_sha(base)
    resize(diff, 12 * MiB)
    assert read_chain(diff) == expect + bytes(4 * MiB)
    assert file_sha(base) == sha
    # shrinking the top refuses when the parent's data would be cut off
    with pytest.raises(InvalidArgument, match="holds data"):
        resize(diff, 4 * MiB)
    assert os.path.exists(diff)


def test_resize_refusal_without_hook(tmp_path):
    p = tmp_path / "x.dmg"
    p.write_bytes(bytes(4096))
    with pytest.raises(NotSupported, match="resize is not supported for DMG"):
        resize(str(p), 8192, format="DMG")


@pytest.mark.parametrize("fmt", formats_with(Operation.RESIZE, Operation.WRITE, diff=True))
def test_resize_parent_keeps_children_linked(tmp_path, fmt):
    """Growing a parent: its differencing image still opens (links naming the parent's
    modification id are rewritten after the rename) and reads the same."""
    base, child = str(tmp_path / f"b.{ext_of(fmt)}"), str(tmp_path / f"c.{ext_of(fmt)}")
    with Disk() as d:
        d.create_base(base, SIZE, fmt)
        d.write(0, b"\x0a" * (2 * MiB))
        d.create_diff(child, fmt)
        d.write(MiB, b"\x0b" * 4096)
    expect = read_chain(child)
    resize(base, 2 * SIZE)
    assert read_chain(child) == expect


@pytest.mark.parametrize("who", ["qemu", "vdgui"])
def test_resize_multi_file_child_over_larger_parent(tmp_path, qemu, who):
    """A differencing image of several files (twoGbMaxExtentSparse), grown over a parent larger
    than its old size, reads zeroes in the new area (the parent's tail is hidden there), through
    vdgui and through qemu; the old content is kept."""
    base, child = str(tmp_path / "base.vmdk"), str(tmp_path / "c.vmdk")
    with Disk() as d:
        d.create_base(base, 2 * MiB, "VMDK")
        d.write(0, b"\xaa" * (2 * MiB))
    if who == "qemu":
        qemu.img("create", "-q", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentSparse",
                 "-b", "base.vmdk", "-F", "vmdk", child, "1M")
    else:                           # our own split child, then the parent grows under it
        with Disk() as d:
            d.open(base, None, OpenFlags.READ_ONLY)
            d.create_diff(child, "VMDK", flags=ImageFlags.SPLIT_2G)
        resize(base, 4 * MiB)
        with Disk() as d:
            d.open(base)
            d.write(2 * MiB, b"\xaa" * (2 * MiB))
            kid = get_backend("VMDK").open(child, OpenFlags.NORMAL)
            kid.set_parent(d.top)               # the parent's new data is meant to be seen
            kid.close()
    with Disk.open_chain(child, None, OpenFlags.READ_ONLY) as d:
        assert len(d.top.files()) > 1
        old = d.size
        with Disk.open_chain(child, None) as w:
            w.write(0, b"\x5c" * 4096)
    resize(child, old + 2 * MiB)
    got = read_chain(child)
    assert got[:4096] == b"\x5c" * 4096 and got[4096:old] == b"\xaa" * (old - 4096)
    assert got[old:] == bytes(2 * MiB)
    r = qemu.io("-r", "-c", f"read -P 0 {old} {2 * MiB}", child)
    assert "Pattern verification failed" not in r.stdout, r.stdout
