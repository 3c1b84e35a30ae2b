"""Zero-aware merge and copy (issue #18 goal 2): ranges a child marks as zero (QCOW2 zero
clusters made by qemu) become zero markers or holes in the target, never written zeroes, and
read zero where the base held data. Checked with qemu-img compare, check and map."""
from __future__ import annotations

import json
import os

import pytest

from vdgui.vd import Alloc, Disk, OpenFlags, merge

MiB = 1 << 20
# (qemu format, create options): the merge target, under a qcow2 child
TARGETS = [("qcow2", []), ("vhdx", ["-o", "block_size=1M"]), ("vdi", []), ("vmdk", []),
           ("raw", [])]
QEMU_CHECKS = {"qcow2", "vhdx", "vdi", "vmdk"}


def _chain(qemu, tmp_path, q, opts):
    base = str(tmp_path / f"base.{q}")
    child = str(tmp_path / "child.qcow2")
    qemu.img("create", "-f", q, *opts, base, "64M")
    qemu.io("-f", q, "-c", "write -P 0x11 0 24M", base)
    qemu.img("create", "-f", "qcow2", "-b", os.path.basename(base), "-F", q, child)
    # zero clusters over base data (8M..24M) and over nothing (24M..56M), data inside them,
    # and a zero range that covers only part of a 1 MiB target block over base data
    qemu.io("-f", "qcow2", "-c", "write -z 8M 48M", "-c", "write -P 0x22 30M 1M",
            "-c", "write -z 4160k 192k", child)
    return base, child


def _map(qemu, path, q):
    if q == "vhdx":          # qemu's vhdx driver reports every block as data: ask ours
        with Disk.open_chain(path, None, OpenFlags.READ_ONLY) as d:
            return [{"start": e.start, "length": e.length, "data": e.status == Alloc.DATA}
                    for e in d.allocation()]
    return json.loads(qemu.img("map", "--output=json", "-f", q, path).stdout)


def _data_in(entries, start, end):
    return [e for e in entries if e["data"] and e["start"] < end and e["start"] + e["length"]
            > start]


@pytest.mark.parametrize("q,opts", TARGETS, ids=[t[0] for t in TARGETS])
def test_merge_stores_zero_clusters_as_markers_or_holes(qemu, tmp_path, q, opts):
    base, child = _chain(qemu, tmp_path, q, opts)
    m = _map(qemu, child, "qcow2")
    assert any(e["zero"] and not e["data"] and e["depth"] == 0 for e in m)   # zero clusters
    want = str(tmp_path / "want.raw")
    qemu.img("convert", "-f", "qcow2", "-O", "raw", child, want)
    before = os.stat(base).st_blocks * 512

    merge(child, base)

    assert not os.path.exists(child)
    r = qemu.img("compare", "-f", q, "-F", "raw", base, want, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    if q in QEMU_CHECKS:
        qemu.img("check", "-f", q, base)
    # zeroes over nothing: still nothing (no block allocated, no zeroes written)
    m = _map(qemu, base, q)
    assert _data_in(m, 24 * MiB, 30 * MiB) == []
    assert _data_in(m, 31 * MiB, 56 * MiB) == []
    # zeroes over the base's 16 MiB of data: that space is given back, not overwritten
    after = os.stat(base).st_blocks * 512
    assert after < before - 12 * MiB, (before, after)


@pytest.mark.parametrize("q", ["qcow2", "qed"])
def test_backward_merge_keeps_zeroes_over_the_new_parent(qemu, tmp_path, q):
    """Backward: the middle image's zero clusters hide the base's data; once the target is
    relinked to the base they must still hide it (markers or zeroes, never nothing)."""
    paths = [str(tmp_path / f"{n}.{q}") for n in ("base", "mid", "top")]
    qemu.img("create", "-f", q, paths[0], "16M")
    qemu.io("-f", q, "-c", "write -P 0x11 0 16M", paths[0])
    for i in (1, 2):
        qemu.img("create", "-f", q, "-b", os.path.basename(paths[i - 1]), "-F", q, paths[i])
    qemu.io("-f", q, "-c", "write -z 2M 8M", "-c", "write -P 0x33 5M 64k", paths[1])
    qemu.io("-f", q, "-c", "write -P 0x44 12M 64k", paths[2])
    want = str(tmp_path / "want.raw")
    qemu.img("convert", "-f", q, "-O", "raw", paths[2], want)

    merge(paths[1], paths[2])

    assert not os.path.exists(paths[1])
    r = qemu.img("compare", "-f", q, "-F", "raw", paths[2], want, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    qemu.img("check", "-f", q, paths[2])
    m = _map(qemu, paths[2], q)
    assert _data_in(m, 2 * MiB, 5 * MiB) == []              # zero markers, not written zeroes
    assert all(e["zero"] for e in m if e["start"] < 5 * MiB and e["start"] + e["length"]
               > 2 * MiB)
