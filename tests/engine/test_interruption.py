"""SIGKILL every operation at exact syscalls; afterwards nothing may read differently or be corrupt.

Operations (as a user runs them, through ``vdgui-img``): merge (three directions), convert,
compact, resize, check --repair and write, and compact and resize of a parent with a child (its
link must hold), on every writable format:
VDI, VMDK (monolithicSparse and twoGbMaxExtentSparse), VHD, VHDX, QCOW2, QED and Parallels.
The harness (tests/engine/kill_harness.py) counts the syscalls of a full run that change a file
or the folder and kills a fresh copy at points spread over them (``slow``: 20 points, up to a third
of them renames/unlinks/truncations; the default run: a seeded sample of 3 points in one case per
operation). Merges: forward (the middle image into its parent, the top relinked), top (the top
and the image below it into their grandparent) and backward (an image into its child).

After each kill:
* the chain (the image a user opens: the top, or the converted copy) reads byte-identical to the
  content before or after the operation, through our engine and through qemu-img where qemu
  reads the format (``write``: every sector is either the old or the new one, as a disk's);
* every image still opens by itself;
* ``vdgui-img check`` calls no image corrupt (leaks are fine), and neither does qemu-img check
  where qemu checks the format.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from tests.engine import kill_harness as kh
from vdgui.vd import Disk, ImageFlags, OpenFlags, VDError, check, get_backend

MiB = 1 << 20
SIZE = 8 * MiB
GROWN = 20 * MiB
SPLIT = ImageFlags.SPLIT_2G

# (case id, backend name, creation flags, qemu's name)
FORMATS = [("VDI", "VDI", ImageFlags.NONE, "vdi"),
           ("VMDK", "VMDK", ImageFlags.NONE, "vmdk"),
           ("VMDK-split", "VMDK", SPLIT, "vmdk"),
           ("VHD", "VHD", ImageFlags.NONE, "vpc"),
           ("VHDX", "VHDX", ImageFlags.NONE, "vhdx"),
           ("QCOW2", "QCOW2", ImageFlags.NONE, "qcow2"),
           ("QED", "QED", ImageFlags.NONE, "qed"),
           ("Parallels", "Parallels", ImageFlags.NONE, "parallels")]
FMT = {f[0]: f for f in FORMATS}
QEMU_BACKING = {"qcow2", "qed", "vmdk"}          # qemu follows these formats' parent links
QEMU_NO_CHECK = {"vpc"}
OPS = ["merge-forward", "merge-top", "merge-backward", "convert", "compact", "resize", "repair",
       "write", "compact-parent", "resize-parent"]
NO_DIFF = {"Parallels"}                          # no differencing images: no merge

# Known defects still found by the suite, (case, op) -> reason. Strict xfails: they fail the run
# the moment they are fixed, so the list cannot go stale.
KNOWN: dict[tuple[str, str], str] = {}

pytestmark = pytest.mark.skipif(not kh.have_strace(), reason="strace is not installed "
                                "(bash scripts/bootstrap test installs it)")


def _ext(fmt: str) -> str:
    return get_backend(fmt).default_extension()


def _sha_files(folder: Path) -> dict[str, str]:
    out = {}
    for n in os.listdir(folder):
        p = folder / n
        if p.is_file():
            out[n] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _read_chain(path: Path) -> bytes:
    with Disk.open_chain(str(path), None, OpenFlags.READ_ONLY) as d:
        return d.read(0, d.size)


def _fill(level: int, i: int) -> bytes:
    return bytes([(level * 37 + i * 11) % 250 + 1])


def _level_writes(level: int, size: int) -> list[tuple[int, bytes]]:
    """Unaligned and whole-block data, and zeroes over the parent's data."""
    out = [(level * 3 * 65536 + 512 * level, _fill(level, 0) * (MiB + 3 * 4096)),
           ((2 + level) * MiB, _fill(level, 1) * 70000),
           (5 * MiB + level * 65536, _fill(level, 2) * (MiB // 2)),
           (size - 4096, _fill(level, 3) * 4096)]
    if level:
        out.append((MiB * 5 // 2, bytes(MiB)))
    return out


class Case:
    """One (format, operation): builds the template, names the argv, judges a killed copy."""

    def __init__(self, fid: str, op: str, qemu):
        self.fid, self.op, self.qemu = fid, op, qemu
        _, self.fmt, self.flags, self.qn = FMT[fid]
        self.ext = _ext(self.fmt)
        self.images: list[str] = []         # images that must open (when present)
        self.top = ""                       # the image whose chain a user reads
        self.before = self.after = b""
        self.template_sha: dict[str, str] = {}

    # -- building ------------------------------------------------------------------------------
    def _chain(self, folder: Path, depth: int) -> list[bytes]:
        names = [f"c{i}.{self.ext}" for i in range(depth + 1)]
        views = []
        with Disk() as d:
            d.create_base(str(folder / names[0]), SIZE, self.fmt, flags=self.flags)
            cur = bytearray(d.size)
            for lv in range(depth + 1):
                if lv:
                    d.create_diff(str(folder / names[lv]), self.fmt, flags=self.flags)
                for off, data in _level_writes(lv, SIZE):
                    d.write(off, data)
                    cur[off:off + len(data)] = data
                views.append(bytes(cur))
            d.flush()
        self.images = names
        return views

    def _base(self, folder: Path, name: str, holes: bool = False) -> bytes:
        with Disk() as d:
            d.create_base(str(folder / name), SIZE, self.fmt, flags=self.flags)
            for i in range(0, 8, 2 if holes else 1):
                d.write(i * MiB + 4096, _fill(i, 5) * (MiB - 8192))
            if not holes:
                d.write(2 * MiB, bytes(3 * MiB))         # blocks that compact drops
            d.flush()
        self.images = [name]
        return _read_chain(folder / name)

    def build(self, folder: Path) -> None:
        op = self.op
        if op.startswith("merge"):
            views = self._chain(folder, 3)
            self.top = self.images[-1]
            self.before = self.after = views[-1]
            self.argv = {"merge-forward": ["merge", self.images[2], self.images[1]],
                         "merge-top": ["merge", self.images[3], self.images[1]],
                         "merge-backward": ["merge", self.images[1], self.images[2]]}[op]
        elif op in ("compact-parent", "resize-parent"):     # the parent of a child, in its place
            views = self._chain(folder, 1)
            self.top = self.images[-1]
            self.before = self.after = views[-1]
            self.argv = (["compact", self.images[0]] if op == "compact-parent"
                         else ["resize", self.images[0], str(GROWN)])
        elif op == "convert":
            src = folder / "src.img"
            with Disk() as d:
                d.create_base(str(src), SIZE, "RAW")
                for i in range(0, 8, 2):
                    d.write(i * MiB + 512, _fill(i, 7) * (MiB + 1024))
            self.before = b""
            self.after = src.read_bytes()
            self.top = f"dst.{self.ext}"
            self.images = [self.top]
            self.argv = ["convert", "-f", "RAW", "-O", self.fmt] + \
                (["--variant", "split2g"] if self.flags & SPLIT else []) + ["src.img", self.top]
        elif op in ("compact", "resize", "repair"):
            self.top = f"img.{self.ext}"
            self.before = self._base(folder, self.top)
            self.after = self.before + (bytes(GROWN - SIZE) if op == "resize" else b"")
            if op == "compact":
                self.argv = ["compact", self.top]
            elif op == "resize":
                self.argv = ["resize", self.top, str(GROWN)]
            else:
                self._damage(folder / self.top)
                self.argv = ["check", "--repair", self.top]
        elif op == "write":
            if self.fid in NO_DIFF:         # a base with holes: the write allocates blocks too
                self.before = self._base(folder, f"w.{self.ext}", holes=True)
            else:
                self.before = self._chain(folder, 1)[-1]
            self.top = self.images[-1]
            data = bytes((i * 7 + 3) % 251 + 1 for i in range(4096)) * ((3 * MiB) // 4096 + 1)
            data = data[:3 * MiB + 1536]
            (folder / "input.bin").write_bytes(data)
            off = MiB + 1536
            self.after = self.before[:off] + data + self.before[off + len(data):]
            self.argv = ["write", self.top, "--offset", str(off), "--input", "input.bin"]
        self.template_sha = _sha_files(folder)

    def _damage(self, path: Path) -> None:
        """Something check finds and repair fixes, without changing the content."""
        if self.fmt == "QCOW2":         # a leaked cluster: one more at the end, refcount 1
            with open(path, "r+b") as f:
                hdr = f.read(104)
                cs = 1 << int.from_bytes(hdr[20:24], "big")
                rt = int.from_bytes(hdr[48:56], "big")
                order = int.from_bytes(hdr[96:100], "big") if len(hdr) >= 100 else 4
                assert order == 4, "the damage assumes 16-bit refcounts"
                f.seek(rt)
                rb = int.from_bytes(f.read(8), "big")
                end = f.seek(0, 2)
                c = -(-end // cs)
                assert c < cs // 2, "the damage assumes one refcount block covers the image"
                f.seek(c * cs)
                f.write(b"\xee" * cs)
                f.seek(rb + 2 * c)
                f.write((1).to_bytes(2, "big"))
        elif self.fmt == "VHDX":        # the older header copy damaged (its checksum fails)
            with open(path, "r+b") as f:
                seqs = []
                for off in (64 * 1024, 128 * 1024):
                    f.seek(off + 8)
                    seqs.append(int.from_bytes(f.read(8), "little"))
                off = (64 * 1024, 128 * 1024)[seqs.index(min(seqs))]
                f.seek(off + 100)
                f.write(b"\xff\xfe")
        else:                                         # junk at the end of the (last) file
            with Disk.open_chain(str(path), None, OpenFlags.READ_ONLY) as d:
                last = d.top.files()[-1]
            with open(last, "ab") as f:
                f.write(b"\xee" * MiB)
        assert check(str(path)).exit_code != 0, "the damage is not found by check"

    # -- running -------------------------------------------------------------------------------
    def fn_for(self, work: Path):
        argv = list(self.argv)

        def fn():
            from vdgui import cli
            return cli.main(argv)
        return fn

    # -- judging -------------------------------------------------------------------------------
    def _content_ok(self, got: bytes) -> bool:
        if got in (self.before, self.after):
            return True
        n = len(self.after)       # a size rounded up by the format (VHD: whole CHS geometry)
        if self.after and len(got) > n and got[:n] == self.after and not any(got[n:]):
            return True
        if self.op == "write" and len(got) == len(self.before):
            for s in range(0, len(got), 512):
                g = got[s:s + 512]
                if g != self.before[s:s + 512] and g != self.after[s:s + 512]:
                    return False
            return True
        return False

    def _qemu_reads(self, name: str, work: Path) -> bool:
        if self.fmt == "VMDK" or self.qn in QEMU_BACKING:
            return True
        img = get_backend(self.fmt).open(str(work / name), OpenFlags.READ_ONLY | OpenFlags.INFO,
                                         None)
        try:
            return not img.is_diff
        finally:
            img.close()

    def judge(self, work: Path, finished: bool) -> list[str]:
        out: list[str] = []
        now = _sha_files(work)
        if now == self.template_sha and not finished:
            return []                   # killed before it changed a byte: the template, judged
        top = work / self.top
        if self.op == "merge-top" and not top.exists():
            top = work / self.images[1]     # the top is deleted first: the target holds it all
        if self.op == "convert" and not top.exists():
            got = b""
        else:
            try:
                got = _read_chain(top)
            except VDError as exc:
                return [f"{top.name}'s chain does not open: {exc}"]
        if not self._content_ok(got):
            return [f"{top.name}'s chain reads neither the content before nor after"]
        if finished and got[:len(self.after)] != self.after:
            out.append(f"{top.name}: the finished operation left other content")
        if self.op == "convert" and now.get("src.img") != self.template_sha["src.img"]:
            out.append("the source of the convert changed")
        for name in self.images:
            p = work / name
            if not p.exists():
                continue
            changed = any(now.get(n) != self.template_sha.get(n) for n in now
                          if n.startswith(os.path.splitext(name)[0]))
            if not changed:
                continue                # byte-identical to the template, judged once before
            try:
                get_backend(self.fmt).open(str(p), OpenFlags.READ_ONLY, None).close()
            except VDError as exc:
                out.append(f"{name} does not open: {exc}")
                continue
            rep = check(str(p))
            if rep.corrupt:
                bad = [x.what for x in rep.problems if x.severity == "corrupt"][:2]
                out.append(f"vdgui-img check calls {name} corrupt: {bad}")
            if self.qn not in QEMU_NO_CHECK and self._qemu_reads(name, work):
                r = self.qemu.check(str(p), self.qn)
                if r.returncode not in (0, 3):
                    out.append(f"qemu-img check {name} exit {r.returncode}: "
                               f"{(r.stdout + r.stderr).strip()[:300]}")
        if got and self._qemu_reads(top.name, work):
            raw = work.parent / f"qemu-{work.name}.raw"
            r = subprocess.run(["qemu-img", "convert", "-f", self.qn, "-O", "raw", str(top),
                                str(raw)], capture_output=True, text=True)
            if r.returncode != 0:
                out.append(f"qemu-img cannot read {top.name}: {r.stderr.strip()[:300]}")
            else:
                q = raw.read_bytes()
                raw.unlink()
                if not self._content_ok(q):     # qemu may see the other of the two states
                    out.append(f"qemu-img reads {top.name} neither as before nor as after")
        return out


def _run_case(tmp_path, qemu, fid, op, *, points=None, sample_n=None):
    if fid in NO_DIFF and (op.startswith("merge") or op.endswith("-parent")):
        pytest.skip(f"{fid} has no differencing images: nothing to merge")
    case = Case(fid, op, qemu)
    tpl = tmp_path / "tpl"
    tpl.mkdir()
    case.build(tpl)
    for name in case.images:            # the template's images: opened and checked once
        if not (tpl / name).exists():
            continue
        get_backend(case.fmt).open(str(tpl / name), OpenFlags.READ_ONLY, None).close()
        assert op == "repair" or check(str(tpl / name)).exit_code == 0, name
    all_points, outcomes = kh.campaign(tmp_path, tpl, case.fn_for, case.judge, points=points,
                                       sample_n=sample_n, seed=f"{fid}-{op}")
    killed = sum(o.killed for o in outcomes)
    print(f"{fid} {op}: {len(all_points)} traced syscalls, {len(outcomes)} kill points, "
          f"{killed} killed")
    bad = [f"  {fid} {op} kill at {o.point} of {len(all_points)}: {p}"
           for o in outcomes for p in o.problems]
    assert not bad, f"{len(bad)} problems at {len(outcomes)} kill points:\n" + "\n".join(bad)
    assert killed >= min(len(all_points), sample_n or 20) * 0.9, \
        f"only {killed} of {len(outcomes)} runs were killed"
    return len(all_points), len(outcomes)


def _params(ops, fids):
    out = []
    for op in ops:
        for fid in fids:
            if fid in NO_DIFF and (op.startswith("merge") or op.endswith("-parent")):
                continue
            marks = []
            if (fid, op) in KNOWN:
                marks.append(pytest.mark.xfail(reason=KNOWN[(fid, op)], strict=True))
            out.append(pytest.param(fid, op, id=f"{op}-{fid}", marks=marks))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("fid,op", _params(OPS, [f[0] for f in FORMATS]))
def test_kill_everywhere(tmp_path, qemu, fid, op):
    """20 kill points over the operation (up to a third of them its renames, unlinks and
    truncations, the rest spread evenly); every syscall when it makes fewer."""
    _run_case(tmp_path, qemu, fid, op, points=20)


# the default run: a sample, each operation on a different format, 3 seeded points each
SAMPLE = [("merge-forward", "VMDK"), ("merge-backward", "VHDX"), ("merge-top", "VMDK-split"),
          ("convert", "VMDK-split"), ("compact", "QCOW2"), ("resize", "VDI"), ("repair", "VHD"),
          ("write", "QED")]


@pytest.mark.parametrize("fid,op", [p for op, fid in SAMPLE for p in _params([op], [fid])])
def test_kill_sample(tmp_path, qemu, fid, op):
    _run_case(tmp_path, qemu, fid, op, sample_n=3)


def _link_id(path: Path):
    img = get_backend(path.suffix.lstrip(".").upper()).open(
        str(path), OpenFlags.READ_ONLY | OpenFlags.INFO, None)
    try:
        return img.info().get("cid") or img.modification_uuid
    finally:
        img.close()


@pytest.mark.parametrize("fid", ["VMDK", "VHDX"])
def test_operations_keep_the_link_identity_children_name(tmp_path, fid):
    """Merge, resize and compact keep the identity a child's link names (VMDK CID, VHDX
    DataWriteGuid): no moment exists where the child's link check fails (docs/operations.md)."""
    from vdgui.vd import compact, merge, resize
    case = Case(fid, "merge-forward", None)
    views = case._chain(tmp_path, 3)
    c = [tmp_path / n for n in case.images]
    ids = [_link_id(p) for p in c]
    merge(str(c[2]), str(c[1]))                       # forward: c3 relinked to c1
    assert _link_id(c[1]) == ids[1]
    assert _read_chain(c[3]) == views[3]
    merge(str(c[0]), str(c[1]))                       # backward: c1 absorbs c0, becomes a base
    assert _link_id(c[1]) == ids[1]
    kid = hashlib.sha256(c[3].read_bytes()).hexdigest()
    resize(str(c[1]), GROWN)                          # a parent with a child: on a copy
    compact(str(c[1]))
    assert _link_id(c[1]) == ids[1]
    assert hashlib.sha256(c[3].read_bytes()).hexdigest() == kid, "the child was relinked"
    assert _read_chain(c[3]) == views[3]
