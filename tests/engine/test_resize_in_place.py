"""Growing an image rewrites only metadata, in place, on images qemu-img made (issue #18 goal 1).

For each case: qemu-img creates the image, qemu-io writes data into the blocks a larger table
must displace (the first ones) and elsewhere, and ``vdgui-img resize`` grows it past what its
table area holds (VDI block map, VHD BAT, VMDK grain directory) or past its footer (fixed VHD),
or adds extents (split VMDK); VHDX, QCOW2, QED, Parallels and RAW, which grow by a header
write (and new tables), are checked the same way.

* The file is the same file afterwards (same inode: no copy renamed over it), qemu-img check
  finds nothing and qemu-img compare reads the old content followed by zeroes.
* SIGKILL at the traced syscalls of the resize (tests/engine/kill_harness.py): every killed
  copy opens at the old size or the new one (through our engine and qemu-img), reads the old
  content followed by zeroes, and neither check calls it corrupt (leaks are fine).
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.engine import kill_harness as kh
from vdgui.vd import Disk, OpenFlags, VDError, check
from vdgui.vd.image import Alloc
from vdgui.vd.sparse import is_zero

MiB = 1 << 20
OLD = 8 * MiB

# (id, qemu format, qemu -o options, our format, file name, new size, old size)
CASES = [
    ("vdi", "vdi", "", "VDI", "a.vdi", 200 * MiB, OLD),         # map outgrows its sector
    # a map area without spare entries (128 entries, one sector): see _vdi_hole_only
    ("vdi-full-map", "vdi", "", "VDI", "a.vdi", 200 * MiB, 128 * MiB),
    ("vdi-static", "vdi", "static=on", "VDI", "a.vdi", 200 * MiB, OLD),
    ("vhd", "vpc", "", "VHD", "a.vhd", 400 * MiB, OLD),          # BAT outgrows its sector
    ("vhd-fixed", "vpc", "subformat=fixed", "VHD", "a.vhd", 20 * MiB, OLD),
    ("vmdk", "vmdk", "", "VMDK", "a.vmdk", 100 * MiB, OLD),
    ("vmdk-gd", "vmdk", "", "VMDK", "a.vmdk", 5 << 30, OLD),     # grain directory moves
    ("vmdk-split", "vmdk", "subformat=twoGbMaxExtentSparse", "VMDK", "a.vmdk", 3 << 30, OLD),
    ("vmdk-flat", "vmdk", "subformat=monolithicFlat", "VMDK", "a.vmdk", 20 * MiB, OLD),
    ("qcow2", "qcow2", "", "QCOW2", "a.qcow2", 5 << 30, OLD),    # a new, larger L1 table
    ("vhdx", "vhdx", "", "VHDX", "a.vhdx", 5 << 30, OLD),
    ("qed", "qed", "", "QED", "a.qed", 5 << 30, OLD),
    ("parallels", "parallels", "", "Parallels", "a.hdd", 5 << 30, OLD),
    ("raw", "raw", "", "RAW", "a.img", 5 << 30, OLD),
]
IDS = [c[0] for c in CASES]
BY_ID = {c[0]: c for c in CASES}
# data in the first blocks (what a longer table displaces), mid-disk and in the last sector
def _writes(old: int) -> list[tuple[int, int, int]]:
    return [(0x11, 0, 3 * MiB // 2), (0x22, 5 * MiB + 4096, 65536), (0x33, old - 512, 512)]
QEMU_NO_CHECK = {"vpc", "raw"}


def _make(qemu, folder: Path, cid: str) -> tuple[Path, int]:
    _, qf, opts, _fmt, name, _new, old = BY_ID[cid]
    path = folder / name
    qemu.img("create", "-q", "-f", qf, *(["-o", opts] if opts else []), path, old)
    qemu.io("-f", qf, *[a for p, off, n in _writes(old)
                        for a in ("-c", f"write -P {p:#x} {off} {n}")], path)
    return path, _qemu_size(path, qf)


def _qemu_size(path: Path, qf: str) -> int:
    r = subprocess.run(["qemu-img", "info", "--output=json", "-f", qf, str(path)],
                       capture_output=True, text=True, check=True)
    return json.loads(r.stdout)["virtual-size"]


def _reference(folder: Path, cid: str, size: int) -> Path:
    ref = folder.parent / f"ref-{folder.name}.raw"
    with open(ref, "wb") as f:
        f.truncate(size)
        for p, off, n in _writes(BY_ID[cid][6]):
            f.seek(off)
            f.write(bytes([p]) * n)
    return ref


def _vdi_hole_only(r) -> bool:
    """qemu-img check's one finding on a VDI between a moved block's repointing and the new
    header: qemu wants every file block up to cBlocksAllocated in use, and the moved block's
    old place is free then (it becomes the new map). Reads are unaffected."""
    errs = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith("ERROR")]
    return len(errs) == 1 and errs[0].startswith("ERROR: allocated blocks mismatch")


def _problems(path: Path, cid: str, old: int, new: int, ref: Path, qemu,
              allow_vdi_hole: bool = False) -> list[str]:
    """What is wrong with ``path``: it must read the old content and then zeroes at the old size
    or at (at least) the new one, for us and for qemu, and check clean (leaks allowed)."""
    _, qf, _o, fmt, _n, _new, _old = BY_ID[cid]
    out = []
    try:
        with Disk.open_chain(str(path), fmt, OpenFlags.READ_ONLY) as d:
            size = d.size
            if size != old and size < new:
                out.append(f"size {size}: neither the old {old} nor the new {new}")
            with open(ref, "rb") as rf:
                for e in d.allocation(0, old):      # unallocated ranges read zeroes
                    for pos in range(e.start, e.start + e.length, 4 * MiB):
                        n = min(4 * MiB, e.start + e.length - pos)
                        want = rf.read(n) if rf.seek(pos) == pos else b""
                        got = d.read(pos, n) if e.status == Alloc.DATA else bytes(n)
                        if got != want:
                            out.append(f"the old content reads differently at {pos:#x}")
                            break
            for e in d.allocation(old, size - old):
                if e.status == Alloc.DATA and any(
                        not is_zero(d.read(p, min(4 * MiB, e.start + e.length - p)))
                        for p in range(e.start, e.start + e.length, 4 * MiB)):
                    out.append(f"the new area holds data at {e.start:#x}")
                    break
    except VDError as exc:
        return [f"does not open: {exc}"]
    rep = check(str(path)) if fmt != "RAW" else None        # RAW has nothing to check
    if rep is not None and rep.corrupt:
        out.append(f"vdgui-img check: {[p.what for p in rep.problems if p.severity == 'corrupt']}")
    if qf not in QEMU_NO_CHECK:
        r = qemu.check(str(path), qf)
        if r.returncode not in (0, 3) and not (allow_vdi_hole and _vdi_hole_only(r)):
            out.append(f"qemu-img check exit {r.returncode}: {(r.stdout + r.stderr)[:300]}")
    qsize = _qemu_size(path, qf)
    if qsize != old and qsize < new:
        out.append(f"qemu-img sees size {qsize}")
    r = qemu.compare(str(path), str(ref), qf, "raw")
    if r.returncode != 0:
        out.append(f"qemu-img compare exit {r.returncode}: {(r.stdout + r.stderr)[:300]}")
    return out


@pytest.mark.parametrize("cid", IDS)
def test_grow_is_in_place_and_qemu_reads_it(tmp_path, qemu, cid):
    from vdgui.vd import resize
    path, old = _make(qemu, tmp_path, cid)
    new = BY_ID[cid][5]
    ino = os.stat(path).st_ino
    resize(str(path), new, format=BY_ID[cid][3])
    assert os.stat(path).st_ino == ino, "the image was copied and renamed, not grown in place"
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".") or "tmp" in n.lower()]
    assert not _problems(path, cid, old, new, _reference(tmp_path, cid, old), qemu)
    with Disk.open_chain(str(path), BY_ID[cid][3], OpenFlags.READ_ONLY) as d:
        assert d.size >= new
    r = qemu.check(str(path), BY_ID[cid][1])
    assert BY_ID[cid][1] in QEMU_NO_CHECK or r.returncode == 0, r.stdout + r.stderr
    # qemu writes into the grown area (new VMDK grain tables must exist: qemu allocates none)
    at = new - MiB
    qemu.io("-f", BY_ID[cid][1], "-c", f"write -P 0x5a {at} 65536", path)
    r = qemu.io("-f", BY_ID[cid][1], "-c", f"read -P 0x5a {at} 65536", "-c",
                "read -P 0x11 0 65536", path)
    assert r.stdout.count("read ") == 2, r.stdout
    r = qemu.check(str(path), BY_ID[cid][1])
    assert BY_ID[cid][1] in QEMU_NO_CHECK or r.returncode == 0, r.stdout + r.stderr


@pytest.mark.skipif(not kh.have_strace(), reason="strace is not installed "
                    "(bash scripts/bootstrap test installs it)")
@pytest.mark.parametrize("cid", IDS)
def test_kill_grow_in_place(tmp_path, qemu, cid):
    """SIGKILL at up to 14 points spread over the resize's writes, syncs and truncations."""
    tpl = tmp_path / "tpl"
    tpl.mkdir()
    path, old = _make(qemu, tpl, cid)
    new = BY_ID[cid][5]
    ref = _reference(tpl, cid, old)
    argv = ["resize", "-f", BY_ID[cid][3], path.name, str(new)]

    def fn_for(work: Path):
        def fn():
            from vdgui import cli
            return cli.main(argv)
        return fn

    def judge(work: Path, finished: bool) -> list[str]:
        out = _problems(work / path.name, cid, old, new, ref, qemu,
                        allow_vdi_hole=not finished and cid == "vdi-full-map")
        if finished:
            with Disk.open_chain(str(work / path.name), BY_ID[cid][3], OpenFlags.READ_ONLY) as d:
                if d.size < new:
                    out.append(f"the finished resize left size {d.size}")
        return out

    all_points, outcomes = kh.campaign(tmp_path, tpl, fn_for, judge, points=14)
    bad = [f"kill at {o.point} of {len(all_points)}: {p}" for o in outcomes for p in o.problems]
    assert not bad, "\n".join(bad)
    assert sum(o.killed for o in outcomes) >= min(len(all_points), 14) * 0.9


@pytest.mark.parametrize("cid", ["vhd", "vdi", "vmdk", "qcow2"])
def test_grow_in_place_reads_no_allocation(tmp_path, qemu, monkeypatch, cid):
    """A one-file grow in place is one step: it never asks for the allocation of the data
    (for VHD that reads every block's sector bitmap, a time growing with the data held)."""
    from vdgui.vd import get_backend, resize
    path, _old = _make(qemu, tmp_path, cid)
    fmt = BY_ID[cid][3]
    img = get_backend(fmt).open(str(path), OpenFlags.READ_ONLY, None)
    cls = type(img)
    img.close()

    def refuse(self, offset, length):
        raise AssertionError("block_status called during an in-place grow")
    monkeypatch.setattr(cls, "block_status", refuse)
    ino = os.stat(path).st_ino
    resize(str(path), BY_ID[cid][5], format=fmt)
    assert os.stat(path).st_ino == ino


def test_vdi_without_room_to_count_a_moved_block_is_grown_on_a_copy(tmp_path, qemu):
    """A fixed qemu VDI whose map fills its sectors exactly (128 MiB: 128 entries) has every
    block in use and no spare entry: a moved block could not be counted under the old header
    (cBlocksAllocated <= cBlocks), so the grow runs on a verified copy, and is right."""
    from vdgui.vd import resize
    path = tmp_path / "f.vdi"
    qemu.img("create", "-q", "-f", "vdi", "-o", "static=on", path, 128 * MiB)
    qemu.io("-f", "vdi", "-c", "write -P 0x11 0 1M", "-c", f"write -P 0x22 {127 * MiB} 1M", path)
    ino = os.stat(path).st_ino
    resize(str(path), 200 * MiB, format="VDI")
    assert os.stat(path).st_ino != ino
    r = qemu.io("-f", "vdi", "-c", "read -P 0x11 0 1M", "-c", f"read -P 0x22 {127 * MiB} 1M",
                "-c", f"read -P 0 {128 * MiB} {72 * MiB}", path)
    assert r.stdout.count("read ") == 3, r.stdout
    assert qemu.check(str(path), "vdi").returncode == 0
    assert _qemu_size(path, "vdi") == 200 * MiB
