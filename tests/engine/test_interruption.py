"""SIGKILL each operation at random moments; afterwards the chain must open and read exactly as
before (merged-away images may still be present, a hidden temp file may be left over and is
removed by the next operation on that image).

Each operation runs in a forked subprocess (no interpreter start-up per run, so many kills stay
cheap). A calibration run measures how
long it takes; kills then land uniformly over that time. Formats alternate between the backends
whose parent links survive a write into the parent (VDI, the test-only FAKEDIFF ...).
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import time
from pathlib import Path

import pytest

from tests.engine.ops_support import (MiB, build_chain, ext_of, fake_registered,  # noqa: F401
                                      file_sha, formats_with, links_by_modification, read_chain,
                                      temps_in)
from tests.engine.test_check import DAMAGE
from vdgui.vd import Disk, Operation, check, compact, resize

KILLS = 20
SIZE = 8 * MiB


def _formats(tmp_root: Path, *ops, diff=False) -> list[str]:
    out = [f for f in formats_with(*ops, diff=diff)
           if not (diff and links_by_modification(f, tmp_root / "ml"))]
    preferred = [f for f in ("VDI", "FAKEDIFF") if f in out]
    return preferred or out[:2]


def _child(op: str, args: dict, w: int) -> None:
    """In the forked child: run the operation with small steps, report "go" and "done"."""
    import vdgui.vd.ops.compact as compact_mod
    import vdgui.vd.ops.merge as merge_mod
    from vdgui.vd import merge
    import vdgui.vd.ops.repair as repair_mod
    import vdgui.vd.ops.resize as resize_mod
    from vdgui.vd.progress import Progress

    class Every(Progress):                     # report every step: the sleeping callback below
        def __init__(self, cb, total, interval=0.0):   # then stretches every phase evenly
            super().__init__(cb, total, 0.0)
    for mod in (merge_mod, compact_mod, repair_mod, resize_mod):
        mod.Progress = Every
    merge_mod.CHUNK = 64 * 1024                # many small steps: more moments to be killed in
    compact_mod.COPY_CHUNK = 256 * 1024
    compact_mod.VERIFY_CHUNK = 256 * 1024
    rnd = random.Random(os.getpid())

    def cb(done, total):
        time.sleep(rnd.uniform(0, 0.004))
    os.write(w, b"go\n")
    t0 = time.monotonic()
    if op == "merge":
        merge(args["source"], args["target"], progress=cb)
    elif op == "compact":
        compact(args["path"], progress=cb)
    elif op == "resize":
        resize(args["path"], args["size"], progress=cb)
    elif op == "repair":
        check(args["path"], repair=True, progress=cb)
    os.write(w, f"done {time.monotonic() - t0:.4f}\n".encode())


def _run(op: str, args: dict, kill_after: float | None) -> tuple[bool, float | None]:
    """Run the operation in a forked subprocess (no interpreter start-up per run); SIGKILL it
    ``kill_after`` seconds after it said "go". Returns (finished, seconds it took)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                 # the child
        code = 0
        try:
            os.close(r)
            _child(op, args, w)
        except BaseException:
            import traceback
            os.write(w, traceback.format_exc().encode())
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "r") as rf:
        line = rf.readline()
        assert line.strip() == "go", f"worker failed to start: {line}{rf.read()}"
        if kill_after is not None:
            time.sleep(kill_after)
            os.kill(pid, signal.SIGKILL)
        rest = rf.read()
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
        return False, None
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"{op} failed: {rest}"
    return True, float(rest.split()[1])


def _fresh(template: Path, dest: Path) -> Path:
    shutil.copytree(template, dest)
    return dest


def _campaign(tmp_path, op, setup, args_of, verify):
    """Calibrate, then KILLS killed runs, alternating formats."""
    fmts = _formats(tmp_path, *setup["ops"], diff=setup.get("diff", False))
    assert fmts, f"no backend implements {op}"
    templates, est = {}, {}
    for f in fmts:
        tdir = tmp_path / f"tpl-{f}"
        tdir.mkdir()
        state = setup["build"](tdir, f)
        templates[f] = (tdir, state)
        cal = _fresh(tdir, tmp_path / f"cal-{f}")
        finished, secs = _run(op, args_of(cal, state), None)
        assert finished
        verify(cal, state, finished=True)
        est[f] = max(secs, 0.01)
    rnd = random.Random(1234)
    killed = midway = runs = 0
    while killed < KILLS:                 # KILLS runs killed before they finished
        assert runs < 3 * KILLS, f"only {killed} of {runs} runs were killed before finishing"
        f = fmts[runs % len(fmts)]
        tdir, state = templates[f]
        before = {n: file_sha(tdir / n) for n in os.listdir(tdir)}
        work = _fresh(tdir, tmp_path / f"k{runs}")
        finished, secs = _run(op, args_of(work, state), rnd.uniform(0.0, est[f]))
        runs += 1
        killed += not finished
        if finished:                      # the machine got faster: aim earlier
            est[f] = min(est[f], max(secs, 0.005))
        else:                             # evidence the kill landed inside the operation's work
            now = {n: file_sha(work / n) for n in os.listdir(work) if "vdgui-tmp" not in n}
            midway += bool(temps_in(work)) or now != before
        verify(work, state, finished=finished)
        if runs % 5 == 0:
            setup.get("after", lambda w, s: None)(work, state)
        shutil.rmtree(work)
    assert midway >= 3, f"only {midway} of {killed} kills landed after the operation had started"


# -- merge ---------------------------------------------------------------------------------------
def _chain_setup(tdir, fmt):
    paths, views = build_chain(tdir, fmt, size=SIZE)
    return {"names": [os.path.basename(p) for p in paths], "views": views}


def _merge_verify(s, t):
    def verify(work, state, finished):
        names, views = state["names"], state["views"]
        paths = [str(work / n) for n in names]
        forward = s > t
        top = paths[-1]
        if forward and s == len(paths) - 1 and not os.path.exists(paths[s]):
            top = paths[t]                       # the source (top) was merged away already
        assert read_chain(top) == views[-1 if top == paths[-1] else s], f"{top} reads differently"
        if finished:
            lo, hi = (t + 1, s) if forward else (s, t - 1)
            assert not any(os.path.exists(p) for p in paths[lo:hi + 1])
    return verify


@pytest.mark.parametrize("s,t", [(3, 0), (2, 1), (0, 3), (1, 2)],
                         ids=["forward-all", "forward-middle", "backward-all", "backward-middle"])
def test_kill_merge(tmp_path, s, t):
    setup = {"ops": (Operation.WRITE, Operation.RELINK), "diff": True, "build": _chain_setup}

    def args_of(work, state):
        return {"source": str(work / state["names"][s]), "target": str(work / state["names"][t])}
    _campaign(tmp_path, "merge", setup, args_of, _merge_verify(s, t))


# -- compact / resize / repair -------------------------------------------------------------------
def _zeroed_setup(tdir, fmt):
    path = tdir / f"img.{ext_of(fmt)}"
    with Disk() as d:
        d.create_base(str(path), SIZE, fmt)
        for i in range(8):
            d.write(i * MiB, bytes([i + 1]) * MiB)
        d.write(2 * MiB, bytes(4 * MiB))
    return {"name": path.name, "expect": read_chain(path), "sha": file_sha(path)}


def _single_args(work, state):
    return {"path": str(work / state["name"])}


def _after_clean(op):
    def after(work, state):
        path = str(work / state["name"])
        op(path)
        assert not temps_in(work), "leftover temp files were not cleaned up by the next run"
    return after


def test_kill_compact(tmp_path):
    def verify(work, state, finished):
        assert read_chain(work / state["name"]) == state["expect"]
    setup = {"ops": (Operation.COMPACT, Operation.WRITE), "build": _zeroed_setup,
             "after": _after_clean(compact)}
    _campaign(tmp_path, "compact", setup, _single_args, verify)


def test_kill_resize(tmp_path):
    new = 3 * SIZE

    def verify(work, state, finished):
        got = read_chain(work / state["name"])
        exp = state["expect"]
        assert len(got) in (len(exp), new) or (finished and len(got) >= new)
        assert got[:len(exp)] == exp and not any(got[len(exp):])
        if finished:
            assert len(got) >= new

    def args_of(work, state):
        return {"path": str(work / state["name"]), "size": new}
    setup = {"ops": (Operation.RESIZE, Operation.WRITE), "build": _zeroed_setup,
             "after": _after_clean(lambda p: resize(p, new + SIZE))}
    _campaign(tmp_path, "resize", setup, args_of, verify)


def test_kill_repair(tmp_path):
    def build(tdir, fmt):
        st = _zeroed_setup(tdir, fmt)
        DAMAGE[fmt][0](str(tdir / st["name"]))
        st["sha"] = file_sha(tdir / st["name"])
        return st

    def verify(work, state, finished):
        path = str(work / state["name"])
        if file_sha(path) != state["sha"]:       # replaced: then completely repaired
            assert check(path).exit_code == 0
        else:
            assert not finished
    setup = {"ops": (Operation.CHECK, Operation.REPAIR), "build": build,
             "after": _after_clean(lambda p: check(p, repair=True))}
    orig = _formats
    try:
        globals()["_formats"] = lambda root, *ops, diff=False: [
            f for f in orig(root, *ops, diff=diff) if f in DAMAGE] or ["FAKEDIFF"]
        _campaign(tmp_path, "repair", setup, _single_args, verify)
    finally:
        globals()["_formats"] = orig
