"""Syscall-exact interruption: run an operation, SIGKILL it at chosen syscalls, judge what is left.

One harness for every test that kills an operation mid-way (tests/engine/test_interruption.py,
the crash tests of tests/formats/test_{vdi,vhd,vhdx,parallels}.py, the killed convert of
tests/engine/test_temps.py, the allocation and merge durability tests in
tests/formats/test_durability.py); it also injects errors (ENOSPC, EIO) at exact syscalls:

* The operation runs in a child forked from the test process (no interpreter start-up), which
  waits until ``strace`` has attached to it (its ``TracerPid``) and then runs a Python callable
  (usually ``vdgui-img``'s ``main(argv)``).
* A counting run (``strace -f -e trace=SYSCALLS``) lists, in order, every call of the syscalls
  that change a file or the folder (:data:`SYSCALLS`). Each call is named by its syscall and its
  number among that thread's calls of that syscall: strace counts ``when=N`` per syscall and per
  thread, so ``-e inject=pwrite64:signal=KILL:when=17`` kills the process on entering exactly the
  call that was the 17th pwrite64 of the counting run (the syscall never runs).
* :func:`spread` picks kill points spread evenly over the list, plus every rename/unlink/ftruncate
  (the structural steps), so a campaign lands in every phase of the operation.
* :func:`campaign` builds a template once, counts, then for each point copies the template,
  kills, and calls the scenario's judge; the problems of all points are collected and reported
  together (format, operation, point, symptom). ``select`` picks the points itself; ``error``
  makes the chosen syscall fail with that errno instead of killing (``on_exit`` then judges the
  exit code and output).
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

STRACE = shutil.which("strace") or "/usr/bin/strace"
SYSCALLS = ("pwrite64", "pwritev", "pwritev2", "write", "ftruncate", "fallocate", "fsync",
            "fdatasync", "rename", "renameat", "renameat2", "unlink", "unlinkat")
STRUCTURAL = {"rename", "renameat", "renameat2", "unlink", "unlinkat", "ftruncate"}
WRITES = {"pwrite64", "pwritev", "pwritev2", "ftruncate", "fallocate"}   # what changes a file
_LINE = re.compile(r"^(\d+)\s+(\w+)\(")


@dataclass(frozen=True)
class Point:
    """One syscall of the counting run: the ``nth`` call of ``name`` by its thread."""
    index: int          # position among all matching syscalls of the run (0-based)
    name: str
    nth: int

    def __str__(self) -> str:
        return f"#{self.index} {self.name}:when={self.nth}"


def have_strace() -> bool:
    return os.access(STRACE, os.X_OK)


def _wait_traced(timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("TracerPid:"):
                    if int(line.split()[1]) != 0:
                        return
                    break
        time.sleep(0.0005)
    raise RuntimeError("strace did not attach")


def _child(fn: Callable[[], int], cwd: str, log: str) -> None:
    code = 97
    try:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        sys.stdout = sys.stderr = open(1, "w", buffering=1, closefd=False)
        os.chdir(cwd)
        _wait_traced()
        code = fn() or 0
    except BaseException:
        try:
            sys.stderr.write(traceback.format_exc())
            sys.stderr.flush()
        except BaseException:
            pass
        code = 98
    finally:
        os._exit(code if isinstance(code, int) else 99)


def run(fn: Callable[[], int], cwd, *, kill_at: Point | None = None,
        trace_to: str | None = None, log: str | None = None,
        error: str | None = None) -> int | None:
    """Run ``fn`` in a forked child under strace. Returns its exit code, or None when it was
    killed at ``kill_at``. With ``error`` (an errno name) the syscall at ``kill_at`` fails with
    it instead, and the exit code is returned."""
    log = log or os.path.join(str(cwd), "..", f".kill-{os.getpid()}.log")
    sys.stdout.flush()
    sys.stderr.flush()
    with warnings.catch_warnings():   # Python >= 3.12 warns when other threads exist: the child
        warnings.simplefilter("ignore", DeprecationWarning)   # only runs engine code
        pid = os.fork()
    if pid == 0:
        _child(fn, str(cwd), log)
    cmd = [STRACE, "-f", "-qq", "-p", str(pid), "-o", trace_to or os.devnull,
           "-e", "trace=" + ",".join(SYSCALLS)]
    if kill_at is not None:
        what = f"error={error}" if error else "signal=KILL"
        cmd += ["-e", f"inject={kill_at.name}:{what}:when={kill_at.nth}"]
    tracer = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    try:
        _, status = os.waitpid(pid, 0)
    finally:
        try:
            _, err = tracer.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            tracer.kill()
            err = b""
    if os.WIFSIGNALED(status):
        if os.WTERMSIG(status) == signal.SIGKILL and kill_at is not None and not error:
            return None
        raise AssertionError(f"operation died of signal {os.WTERMSIG(status)}: "
                             f"{err.decode(errors='replace')}")
    code = os.WEXITSTATUS(status)
    if code in (97, 98, 99):
        with open(log, errors="replace") as f:
            raise AssertionError(f"the traced operation failed to run:\n{f.read()}"
                                 f"{err.decode(errors='replace')}")
    return code


def count(fn: Callable[[], int], cwd, scratch) -> tuple[int, list[Point]]:
    """A full run that lists every matching syscall. Returns (exit code, points in order)."""
    out = os.path.join(str(scratch), "count.trace")
    code = run(fn, cwd, trace_to=out)
    seen: dict[tuple[str, str], int] = {}
    points: list[Point] = []
    with open(out, errors="replace") as f:
        for line in f:
            m = _LINE.match(line)
            if not m:
                continue                              # '<... resumed>', signals, exits
            key = (m.group(1), m.group(2))
            seen[key] = seen.get(key, 0) + 1
            points.append(Point(len(points), m.group(2), seen[key]))
    return code, points


def _even(items: list, k: int) -> list:
    if len(items) <= k:
        return list(items)
    return [items[round(i * (len(items) - 1) / (k - 1))] for i in range(k)] if k > 1 else items[:k]


def spread(points: list[Point], n: int) -> list[Point]:
    """``n`` points over the run: up to a third of them the structural steps (renames, unlinks,
    truncations; spread evenly when there are more), the rest evenly over all the others
    (first and last included)."""
    if len(points) <= n:
        return list(points)
    chosen = {p.index for p in _even([p for p in points if p.name in STRUCTURAL], n // 3)}
    rest = [p for p in points if p.index not in chosen]
    chosen |= {p.index for p in _even(rest, n - len(chosen))}
    return [points[i] for i in sorted(chosen)]


def sample(points: list[Point], n: int, seed: str) -> list[Point]:
    """A small deterministic sample (the default run): one structural point when there is one,
    the rest spread by a seed derived from the case's name."""
    import random
    if len(points) <= n:
        return list(points)
    rnd = random.Random(seed)
    chosen = set()
    structural = [p for p in points if p.name in STRUCTURAL]
    if structural:
        chosen.add(rnd.choice(structural).index)
    while len(chosen) < n:
        chosen.add(rnd.randrange(len(points)))
    return [points[i] for i in sorted(chosen)]


@dataclass
class Outcome:
    point: Point
    killed: bool
    problems: list[str] = field(default_factory=list)


def campaign(tmp: Path, template: Path, fn_for: Callable[[Path], Callable[[], int]],
             judge: Callable[[Path, bool], list[str]], *, points: int | None = 22,
             sample_n: int | None = None, seed: str = "", after_full: Callable[[Path], None]
             | None = None, select: Callable[[list[Point]], list[Point]] | None = None,
             error: str | None = None,
             on_exit: Callable[[Point, int, str], list[str]] | None = None
             ) -> tuple[list[Point], list[Outcome]]:
    """Count on a copy of ``template``, then kill a copy at each chosen point and ``judge`` it
    (``judge(work, finished)`` returns the problems found; ``finished``: the operation ran to
    its end: the uninterrupted run, or a run whose syscall failed instead of being killed).
    ``points``: how many spread points (None: every syscall); ``sample_n``: a seeded sample of that
    many instead; ``select``: a function choosing them from all points. ``error``: fail the
    syscall with that errno instead of killing; ``on_exit(point, exit code,
    output)`` returns the problems of how it ended."""
    scratch = tmp / "scratch"
    scratch.mkdir(exist_ok=True)
    cal = tmp / "full"
    shutil.copytree(template, cal)
    code, all_points = count(fn_for(cal), cal, scratch)
    assert code == 0, f"the uninterrupted operation failed (exit {code})"
    assert all_points, "the operation made none of the traced syscalls"
    full_problems = judge(cal, True)
    assert not full_problems, f"the uninterrupted operation: {full_problems}"
    if after_full is not None:
        after_full(cal)
    shutil.rmtree(cal)
    if select is not None:
        chosen = select(all_points)
    elif sample_n is not None:
        chosen = sample(all_points, sample_n, seed)
    elif points is None:
        chosen = list(all_points)
    else:
        chosen = spread(all_points, points)
    global _JOB
    _JOB = (tmp, template, fn_for, judge, scratch, error, on_exit)
    try:
        if WORKERS > 1 and len(chosen) > 2:
            import multiprocessing

            # workers forked now (this process runs no other thread), each forking its runs
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                pool = multiprocessing.get_context("fork").Pool(WORKERS)
            with pool:
                outcomes = pool.map(_one_point, chosen, chunksize=1)
        else:
            outcomes = [_one_point(pt) for pt in chosen]
    finally:
        _JOB = None
    return all_points, outcomes


WORKERS = int(os.environ.get("VDGUI_KILL_WORKERS", "2"))  # kill points judged in parallel
_JOB = None


def _one_point(pt: Point) -> Outcome:
    tmp, template, fn_for, judge, scratch, error, on_exit = _JOB
    work = tmp / f"k{pt.index}"
    shutil.copytree(template, work)
    o = Outcome(pt, False)
    log = str(scratch / f"op{pt.index}.log")
    try:
        code = run(fn_for(work), work, kill_at=pt, log=log, error=error)
        o.killed = code is None
        if on_exit is not None and code is not None:
            with open(log, errors="replace") as f:
                o.problems += on_exit(pt, code, f.read())
        elif not o.killed and code != 0:
            o.problems.append(f"the operation exited {code} instead of being killed")
        o.problems += judge(work, code == 0)
    except Exception as exc:
        o.problems.append(f"{type(exc).__name__}: {exc}")
    shutil.rmtree(work, ignore_errors=True)
    return o


def every_point(
    tmp: Path,
    template: Path,
    fn_for: Callable[[Path], Callable[[], int]],
    judge: Callable[[Path, bool], list[str] | None],
    *,
    error: str | None = None,
    min_writes: int = 1,
) -> list[Point]:
    """Kill ``fn_for(work)`` at every traced syscall of its run (``error``: make that syscall
    fail with the errno instead; the callable then returns non-zero) and ``judge(work,
    finished)`` each copy (it may assert); fails with every problem found. The operation must
    make at least ``min_writes`` file writes. Returns the points."""
    all_points, outcomes = campaign(
        tmp,
        template,
        fn_for,
        lambda w, f: judge(w, f) or [],
        points=None,
        error=error,
        on_exit=(
            lambda pt, code, out: (
                [] if code in (0, 1) and "Traceback" not in out else [f"exit {code}: {out[-1500:]}"]
            )
        )
        if error
        else None,
    )
    bad = [f"at {o.point} of {len(all_points)}: {p}" for o in outcomes for p in o.problems]
    assert not bad, f"{len(bad)} problems:\n" + "\n".join(bad)
    writes = sum(p.name in WRITES for p in all_points)
    assert writes >= min_writes, f"only {writes} file writes"
    if error is None:
        assert sum(o.killed for o in outcomes) >= 0.9 * len(outcomes), "too few runs were killed"
    return all_points
