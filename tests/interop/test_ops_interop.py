"""Operations on images that qemu made, checked by qemu: merge of qemu backing chains, compact and
resize of qemu-created images, check of a qemu-damaged image."""
from __future__ import annotations

import json
import os

import pytest

from tests.conftest import read_all
from tests.interop.qemu_formats import qemu_name
from vdgui.vd import (
    Alloc,
    Cap,
    Disk,
    OpenFlags,
    Operation,
    backends,
    check,
    compact,
    get_backend,
    merge,
    resize,
)

MiB = 1 << 20
QEMU_BACKING = {"qcow2", "qed", "vmdk"}


def _ours(qfmt: str):
    for b in backends():
        if qfmt == b.name.lower() or qfmt in (a.lower() for a in b.aliases):
            return b
    return None


def _qemu_formats(*ops, backing=False):
    out = []
    for q in ("vdi", "vmdk", "vpc", "vhdx", "qcow2", "qed", "parallels"):
        b = _ours(q)
        if b is not None and all(b.can(o) for o in ops) and (not backing or q in QEMU_BACKING):
            out.append(q)
    return out


def _qemu_chain(qemu, tmp_path, q, depth=3):
    ext = get_backend(_ours(q).name).default_extension()
    paths = [str(tmp_path / f"q{i}.{ext}") for i in range(depth + 1)]
    qemu.img("create", "-f", q, paths[0], "8M")
    qemu.io("-f", q, "-c", "write -P 0x11 0 6M", paths[0])
    for i in range(1, depth + 1):
        qemu.img("create", "-f", q, "-b", os.path.basename(paths[i - 1]), "-F", q, paths[i])
        qemu.io("-f", q, "-c", f"write -P {0x20 + i} {i}M 1M", "-c", f"write -z {i + 3}M 512k",
                "-c", f"write -P {0x40 + i} {i * 1536}k 100k", paths[i])
    return paths


def _raw_of(qemu, path, q, tmp_path, name):
    out = str(tmp_path / f"{name}.raw")
    qemu.img("convert", "-f", q, "-O", "raw", path, out)
    return out


@pytest.mark.parametrize("q", _qemu_formats(Operation.WRITE, Operation.RELINK, backing=True))
@pytest.mark.parametrize("s,t", [(3, 0), (2, 1), (0, 3), (1, 2)])
def test_merge_qemu_chain(qemu, tmp_path, q, s, t):
    paths = _qemu_chain(qemu, tmp_path, q)
    want_top = _raw_of(qemu, paths[-1], q, tmp_path, "top")
    merge(paths[s], paths[t])
    lo, hi = (t + 1, s) if s > t else (s, t - 1)
    kept = [p for i, p in enumerate(paths) if not lo <= i <= hi]
    assert all(not os.path.exists(p) for p in paths[lo:hi + 1])
    top = kept[-1]
    r = qemu.compare(top, want_top, q, "raw")
    assert r.returncode == 0, r.stdout + r.stderr
    for p in kept:
        r = qemu.check(p, q)
        assert r.returncode == 0, f"{p}: {r.stdout} {r.stderr}"
    info = json.loads(qemu.img("info", "--backing-chain", "--output=json", top).stdout)
    assert [os.path.basename(i["filename"]) for i in info] == \
        [os.path.basename(p) for p in reversed(kept)]


@pytest.mark.parametrize("q", _qemu_formats(Operation.COMPACT))
def test_compact_qemu_image(qemu, tmp_path, q):
    ext = get_backend(_ours(q).name).default_extension()
    path = str(tmp_path / f"c.{ext}")
    qemu.img("create", "-f", q, path, "16M")
    qemu.io("-f", q, "-c", "write -P 0x5a 0 12M", "-c", "write -P 0 2M 8M", path)
    want = _raw_of(qemu, path, q, tmp_path, "want")
    before = os.path.getsize(path)
    compact(path)
    r = qemu.compare(path, want, q, "raw")
    assert r.returncode == 0, r.stdout + r.stderr
    if q != "vpc":
        assert qemu.check(path, q).returncode == 0
    assert os.path.getsize(path) <= before


@pytest.mark.parametrize("q", _qemu_formats(Operation.RESIZE))
def test_resize_qemu_image(qemu, tmp_path, q):
    ext = get_backend(_ours(q).name).default_extension()
    path = str(tmp_path / f"r.{ext}")
    qemu.img("create", "-f", q, path, "8M")
    qemu.io("-f", q, "-c", "write -P 0x33 1M 2M", path)
    want = _raw_of(qemu, path, q, tmp_path, "want")
    resize(path, 32 * MiB)
    info = json.loads(qemu.img("info", "-f", q, "--output=json", path).stdout)
    assert info["virtual-size"] >= 32 * MiB
    # compare (without -s) treats the extra zero area as equal
    r = qemu.compare(path, want, q, "raw")
    assert r.returncode == 0, r.stdout + r.stderr
    if q != "vpc":
        assert qemu.check(path, q).returncode == 0


@pytest.mark.parametrize("q", [q for q in _qemu_formats(Operation.CHECK) if q in ("vdi", "qcow2")])
def test_check_agrees_with_qemu(qemu, tmp_path, q):
    ext = get_backend(_ours(q).name).default_extension()
    path = str(tmp_path / f"k.{ext}")
    qemu.img("create", "-f", q, path, "8M")
    qemu.io("-f", q, "-c", "write -P 0x44 0 3M", path)
    assert check(path).exit_code == 0 and qemu.check(path, q).returncode == 0
    with open(path, "ab") as f:          # trailing junk: a leak for both
        f.write(b"\xee" * (2 * MiB))
    ours = check(path).exit_code
    theirs = qemu.check(path, q).returncode
    assert ours in (0, 3) and theirs in (0, 3)
    if ours == 3:
        rep = check(path, repair=True)
        assert rep.exit_code == 0
        assert check(path).exit_code == 0
        assert qemu.check(path, q).returncode == 0


def _diff_formats():
    return [b.name for b in backends()
            if b.can(Operation.RESIZE) and b.can(Operation.WRITE) and b.can(Operation.CREATE)
            and b.caps & Cap.DIFF and b.caps & Cap.FILE]


@pytest.mark.parametrize("fmt", _diff_formats())
@pytest.mark.parametrize("base_size", [4 * MiB, 3 * MiB + 512])
def test_child_grown_past_its_parent_stores_the_tail(qemu, tmp_path, fmt, base_size):
    """Independent readers (VirtualBox, libyal, dissect) never read past a parent's end: a child
    grown past its parent holds the new tail itself (zero markers or zero blocks)."""
    b = get_backend(fmt)
    ext = b.default_extension()
    base, child = str(tmp_path / f"b.{ext}"), str(tmp_path / f"c.{ext}")
    with Disk() as d:
        d.create_base(base, base_size, fmt)
        d.write(0, b"\x5c" * d.size)
        d.create_diff(child, fmt)
        d.write(MiB, b"\x6d" * 4096)
        before = read_all(d)
        psize = d.images[0].size
    resize(child, 9 * MiB)
    with Disk.open_chain(child, fmt, OpenFlags.READ_ONLY) as d:
        top = d.images[-1]
        assert top.size >= 9 * MiB
        holes = [(s, n) for s, n, st in top.block_status(psize, top.size - psize)
                 if st == Alloc.UNALLOCATED]
        assert holes == [], f"the tail past the parent's end ({psize}) is left to the parent"
        got = read_all(d)
    assert got == before + bytes(len(got) - len(before))
    q = qemu_name(b)
    if q in QEMU_BACKING:                      # qemu opens no VDI, VHD or VHDX children
        assert qemu.check(child, q).returncode == 0
        raw = tmp_path / "want.raw"
        raw.write_bytes(got)
        assert qemu.compare(child, str(raw), q, "raw").returncode == 0


@pytest.mark.parametrize("dst_fmt", _diff_formats())
def test_chain_copy_of_a_child_larger_than_its_parent_stores_the_tail(qemu, tmp_path, dst_fmt):
    from vdgui.vd import copy_image
    base, child = str(tmp_path / "b.vdi"), str(tmp_path / "c.vdi")
    with Disk() as d:
        d.create_base(base, 4 * MiB, "VDI")
        d.write(0, b"\x5c" * d.size)
        d.create_diff(child, "VDI")
        d.write(MiB, b"\x6d" * 4096)
    resize(child, 9 * MiB)
    with Disk.open_chain(child, "VDI", OpenFlags.READ_ONLY) as d:
        want = read_all(d)
    b = get_backend(dst_fmt)
    dst = str(tmp_path / f"copy.{b.default_extension()}")
    copy_image(child, dst, dst_fmt, as_chain=True)
    with Disk.open_chain(dst, dst_fmt, OpenFlags.READ_ONLY) as d:
        top, psize = d.images[-1], d.images[-2].size
        assert [(s, n) for s, n, st in top.block_status(psize, top.size - psize)
                if st == Alloc.UNALLOCATED] == []
        assert read_all(d)[:len(want)] == want
    q = qemu_name(b)
    if q in QEMU_BACKING:
        raw = tmp_path / "want.raw"
        raw.write_bytes(want)
        assert qemu.compare(dst, str(raw), q, "raw").returncode == 0
