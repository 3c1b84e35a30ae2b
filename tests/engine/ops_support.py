"""Shared helpers of the operation tests (merge, compact, resize, check, interruption).

Formats are taken from the registry by what they declare, plus the test-only FAKEDIFF backend
(tests/engine/fake_backend.py), so backends landing later are tested automatically.
"""
from __future__ import annotations

import hashlib
import os
import random
import shutil
from pathlib import Path

import pytest

from tests.engine import fake_backend
from vdgui.vd import Cap, Disk, OpenFlags, Operation, backends, get_backend

MiB = 1 << 20
SIZE = 8 * MiB
QEMU_NAMES = {"vdi", "vmdk", "vpc", "vhdx", "qcow2", "qed", "parallels", "raw"}
QEMU_BACKING = {"qcow2", "qed", "vmdk"}   # qemu follows these formats' parent links


def formats_with(*ops: Operation, diff: bool = False) -> list[str]:
    names = []
    for b in backends():
        if (all(b.can(o) for o in ops) and (not diff or b.caps & Cap.DIFF)
                and b.can(Operation.CREATE)):
            names.append(b.name)
    fake = fake_backend.BACKEND
    if all(fake.can(o) for o in ops) and fake.name not in names:
        names.append(fake.name)
    return names


@pytest.fixture(autouse=True)
def fake_registered():
    undo = fake_backend.register()
    yield
    undo()


def ext_of(fmt: str) -> str:
    return get_backend(fmt).default_extension()


def qemu_name(fmt: str) -> str | None:
    b = get_backend(fmt)
    for n in (b.name.lower(), *[a.lower() for a in b.aliases]):
        if n in QEMU_NAMES:
            return n
    return None


def file_sha(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_chain(path, fmt=None) -> bytes:
    with Disk.open_chain(str(path), fmt, OpenFlags.READ_ONLY) as d:
        out = bytearray()
        pos = 0
        while pos < d.size:
            n = min(4 * MiB, d.size - pos)
            out += d.read(pos, n)
            pos += n
        return bytes(out)


def _writes(level: int, size: int, seed: int):
    """Writes for one chain level: unaligned data, full blocks, zeroes over parent data."""
    rnd = random.Random(seed * 7919 + level)
    out = []
    for i in range(5):
        ln = rnd.choice([512, 4096, 70000, 300 * 1024, MiB, 3 * MiB // 2])
        off = rnd.randrange(0, size - ln) // 512 * 512
        fill = 0 if (level and i == 2) else (level * 40 + i * 7 + seed) % 250 + 1
        out.append((off, bytes([fill]) * ln))
    if level:
        out.append((size - 4096, bytes([level + 100]) * 4096))
    return out


def build_chain(folder: Path, fmt: str, depth: int = 3, size: int = SIZE, seed: int = 0,
                fmts: list[str] | None = None):
    """base + ``depth`` diffs. Returns (paths, views): views[i] = content seen through image i."""
    fmts = fmts or [fmt] * (depth + 1)
    paths = [str(folder / f"c{i}.{ext_of(fmts[i])}") for i in range(depth + 1)]
    views = []
    with Disk() as d:
        d.create_base(paths[0], size, fmts[0])
        expect = bytearray(d.size)          # some formats round the size up (VHD: CHS)
        for lv in range(depth + 1):
            if lv:
                d.create_diff(paths[lv], fmts[lv])
            for off, data in _writes(lv, size, seed):
                d.write(off, data)
                expect[off:off + len(data)] = data
            views.append(bytes(expect))
        d.flush()
    return paths, views


def snapshot(paths) -> dict:
    return {p: file_sha(p) for p in paths if os.path.exists(p)}


def temps_in(folder) -> list[str]:
    return [n for n in os.listdir(folder) if "vdgui-tmp" in n]


def copy_set(paths, dest: Path) -> list[str]:
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for p in paths:
        q = str(dest / os.path.basename(p))
        shutil.copyfile(p, q)
        out.append(q)
    return out


def qemu_verify(qemu, path, fmt, expected: bytes, tmp: Path, *, is_base: bool) -> None:
    """qemu-img check and compare against the expected bytes, for formats qemu reads."""
    qn = qemu_name(fmt)
    if qn is None or (not is_base and qn not in QEMU_BACKING):
        return
    if qn != "raw":
        r = qemu.check(path, qn)
        unsupported = r.returncode == 63 and "does not support checks" in r.stderr   # e.g. vpc
        assert r.returncode == 0 or unsupported, f"qemu-img check {path}: {r.stdout} {r.stderr}"
    ref = tmp / f"expected-{os.path.basename(path)}.raw"
    ref.write_bytes(expected)
    r = qemu.compare(path, str(ref), qn, "raw")
    assert r.returncode == 0, f"qemu-img compare {path}: {r.stdout} {r.stderr}"


_MOD_LINKED: dict[str, bool] = {}


def links_by_modification(fmt: str, folder: Path) -> bool:
    """Does a write into a parent invalidate its child's link (VMDK parentCID, VHDX
    parent_linkage)? Then a merge must rewrite the link of the target's child."""
    if fmt not in _MOD_LINKED:
        folder.mkdir(parents=True, exist_ok=True)
        a, b = str(folder / f"ml0.{ext_of(fmt)}"), str(folder / f"ml1.{ext_of(fmt)}")
        with Disk() as d:
            d.create_base(a, 1 << 20, fmt)
            d.create_diff(b, fmt)
        with Disk() as d:
            d.open(a, fmt, OpenFlags.NORMAL)
            d.write(0, b"x" * 512)
        from vdgui.vd import ParentMismatch
        try:
            read_chain(b)
            _MOD_LINKED[fmt] = False
        except ParentMismatch:
            _MOD_LINKED[fmt] = True
        os.unlink(a)
        os.unlink(b)
    return _MOD_LINKED[fmt]


class ProgressLog:
    """A progress callback recording calls; cancels on call number ``cancel_at`` (1-based)."""

    def __init__(self, cancel_at: int | None = None, sleep: float = 0.0):
        self.calls: list[tuple[int, int]] = []
        self.cancel_at = cancel_at
        self.sleep = sleep

    def __call__(self, done, total):
        self.calls.append((done, total))
        if self.sleep:
            import time
            time.sleep(self.sleep)
        if self.cancel_at is not None and len(self.calls) >= self.cancel_at:
            return False
        return None

    def assert_well_formed(self):
        assert self.calls, "no progress reported"
        assert self.calls[0][0] == 0, self.calls[:3]
        dones = [d for d, _ in self.calls]
        assert dones == sorted(dones), f"not monotonic: {dones}"
        totals = {t for _, t in self.calls}
        assert len(totals) == 1, totals
        assert self.calls[-1][0] == self.calls[-1][1], self.calls[-3:]


@pytest.fixture
def unthrottled(monkeypatch):
    """Progress reports every step (no 50 ms throttle) in every operation and format, whatever
    their timing: cancels land in every phase, no sleeps, the same count on every run."""
    import vdgui.vd.ops.merge as merge_mod
    import vdgui.vd.ops.rewrite as rewrite_mod
    import vdgui.vd.progress as progress_mod
    monkeypatch.setattr(progress_mod, "INTERVAL", 0.0)
    monkeypatch.setattr(merge_mod, "CHUNK", 256 * 1024)
    monkeypatch.setattr(rewrite_mod, "COPY_CHUNK", 1 << 20)
    monkeypatch.setattr(rewrite_mod, "VERIFY_CHUNK", 1 << 20)


def sparse_clone(src, dst) -> None:
    """Copy a file keeping exactly its holes (written zeroes stay written)."""
    from vdgui.vd.ops.rewrite import copy_range, data_ranges
    size = os.path.getsize(src)
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        for start, end in data_ranges(fi.fileno(), size):
            copy_range(fi.fileno(), fo.fileno(), start, end, lambda n: None)
        fo.truncate(size)


def cancel_everywhere(path: str, run, scratch: Path) -> list[int]:
    """Count the progress calls of a whole run on a copy, then cancel the run on ``path`` at the
    first call, at 1/4, 1/2 and 3/4 of them and just before the commit: each must raise
    Cancelled and leave ``path`` byte-identical with no temporary left. Returns the points."""
    from vdgui.vd import Cancelled
    scratch.mkdir(parents=True, exist_ok=True)
    twin = scratch / os.path.basename(path)
    sparse_clone(path, twin)                 # same holes: the same number of progress steps
    log = ProgressLog()
    run(str(twin), log)
    log.assert_well_formed()
    n = len(log.calls)
    # the last one or two calls report the end after the commit point (a late cancel is ignored)
    points = sorted({1, max(1, n // 4), max(1, n // 2), max(1, 3 * n // 4), max(1, n - 2)})
    sha = file_sha(path)
    for k in points:
        try:
            run(path, ProgressLog(cancel_at=k))
        except Cancelled:
            pass
        else:
            raise AssertionError(f"cancel at call {k} of {n} was not honoured")
        assert file_sha(path) == sha, f"cancel at call {k} of {n} changed {path}"
        assert not temps_in(os.path.dirname(path)), f"cancel at call {k} left a temporary"
    return points
