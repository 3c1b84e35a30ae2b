"""Shared helpers for the benchmarks (not tests): cold caches, alternating runs, best of N,
peak RSS of each child, ratio tables.

Typical use::

    from bench.common import Command, compare_commands, print_table
    rows = compare_commands([Command("qemu-img", [...]), Command("vdgui-img", [...])],
                            runs=5, before_each=lambda: remove(target))

Each run starts with ``sync`` and ``echo 1 > /proc/sys/vm/drop_caches`` (page cache dropped; needs
root — without it a warning is printed once and caches stay warm). Commands alternate (A B A B
...) so slow drifts of the machine hit both alike; the best (minimum) wall time of each is kept.
Peak RSS comes from GNU time's %M (KiB): the command's own, not this process's.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

_WARNED = []


def drop_caches() -> bool:
    """sync, then drop the page cache. Returns False (and warns once) when not allowed."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return True
    except OSError as exc:
        if not _WARNED:
            print(f"warning: cannot drop caches ({exc.strerror}); timings use warm caches",
                  file=sys.stderr)
            _WARNED.append(True)
        return False


def read_once(paths: Sequence[str], chunk: int = 8 << 20) -> None:
    """Read files once end to end (warm-up: the data really exists on disk before timing)."""
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.read(chunk):
                pass


@dataclass
class Command:
    name: str
    argv: list[str]
    env: dict | None = None
    remove_after: tuple[str, ...] = ()   # files deleted once it exits, inside the timed run


@dataclass
class Result:
    name: str
    times: list[float] = field(default_factory=list)
    peak_rss_kib: int = 0
    failures: list[str] = field(default_factory=list)

    @property
    def best(self) -> float:
        return min(self.times) if self.times else float("nan")


TIME = "/usr/bin/time"          # GNU time (Debian: time)
RSS_TAG = "\nvdgui-bench-maxrss-KiB "


def run_measured(cmd: Command, timeout: float | None = None) -> tuple[float, int, int, str]:
    """Run one command; returns (wall seconds, peak RSS KiB, exit status, stderr tail)."""
    # the peak RSS comes from GNU time's own wait on the command: Linux carries the forking
    # process's peak across exec, so wait4 here would report at least this bench's own RSS
    t0 = time.perf_counter()
    p = subprocess.Popen([TIME, "-f", f"{RSS_TAG}%M", *cmd.argv], stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, env=cmd.env)
    err = p.stderr.read() if p.stderr else b""
    _pid, status, _usage = os.wait4(p.pid, 0)
    text, _, rss = err.decode(errors="replace").rpartition(RSS_TAG)
    if status == 0:
        remove(*cmd.remove_after)
    elapsed = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.stderr:
        p.stderr.close()
    return elapsed, int(rss.split()[0]) if rss.strip() else 0, p.returncode, text[-500:]


def ensure_bytecode(trees: Sequence[str] = ()) -> None:
    """Compile vdgui's modules once, as an installed package has them: with
    PYTHONDONTWRITEBYTECODE set (as on our machines) every run would otherwise recompile the
    modules it imports (~0.1 s of each vdgui-img start-up). ``trees``: other source trees run
    (a ``--before`` tree, named by a command's PYTHONPATH), compiled too."""
    import compileall
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for tree in dict.fromkeys([here, *trees]):
        pkg = os.path.join(tree, "vdgui")
        if os.path.isdir(pkg):
            compileall.compile_dir(pkg, quiet=1)


def compare_commands(commands: Sequence[Command], *, runs: int = 5,
                     before_each: Callable[[], None] | None = None,
                     cold: bool = True) -> list[Result]:
    """Alternate the commands ``runs`` times; best time and peak RSS of each."""
    ensure_bytecode([t for c in commands if c.env and c.env.get("PYTHONPATH")
                     for t in c.env["PYTHONPATH"].split(os.pathsep) if t])
    results = [Result(c.name) for c in commands]
    for _ in range(runs):
        for cmd, res in zip(commands, results):
            if before_each:
                before_each()
            if cold:
                drop_caches()
            elapsed, rss, code, err = run_measured(cmd)
            if code != 0:
                res.failures.append(f"exit {code}: {err.strip()}")
                continue
            res.times.append(elapsed)
            res.peak_rss_kib = max(res.peak_rss_kib, rss)
    return results


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def print_table(header: Sequence[str], rows: Sequence[Sequence[object]], out=None) -> None:
    out = out or sys.stdout
    cells = [[str(h) for h in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells if i < len(r)) for i in range(len(header))]
    for k, r in enumerate(cells):
        out.write("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() + "\n")
        if k == 0:
            out.write("  ".join("-" * w for w in widths) + "\n")
    out.flush()


def tool(name: str) -> str:
    path = shutil.which(name)
    if not path:
        raise SystemExit(f"{name} is not installed (Debian: qemu-utils for qemu-img/qemu-io)")
    return path


def remove(*paths: str) -> None:
    for p in paths:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass


class Tgt:
    """tgtd on loopback exporting one LUN (root; Debian's tgt): ``url`` names it. A context
    manager: the target and the daemon go away on exit."""

    IQN = "iqn.2026-11.org.vdgui.bench:lun"

    def __init__(self, backing: str):
        import random
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.adm = ["tgtadm", "-C", str(random.randrange(100, 30000)), "--lld", "iscsi"]
        self.proc = subprocess.Popen(
            ["tgtd", "-f", "-C", self.adm[2], "--iscsi", f"portal=127.0.0.1:{self.port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(100):
            if subprocess.run(self.adm + ["--op", "show", "--mode", "system"],
                              capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        for args in (["--op", "new", "--mode", "target", "--tid", "1", "-T", self.IQN],
                     ["--op", "new", "--mode", "logicalunit", "--tid", "1", "--lun", "1",
                      "-b", backing],
                     ["--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL"]):
            subprocess.run(self.adm + args, check=True)
        self.url = f"iscsi://127.0.0.1:{self.port}/{self.IQN}/1"

    def set(self, name: str, value: str) -> None:
        """An iSCSI parameter of the target (e.g. InitialR2T), for logins from now on."""
        subprocess.run(self.adm + ["--op", "update", "--mode", "target", "--tid", "1",
                                   "--name", name, "--value", value], check=True)

    def __enter__(self) -> Tgt:
        return self

    def __exit__(self, *exc) -> None:
        subprocess.run(self.adm + ["--op", "delete", "--mode", "target", "--tid", "1", "--force"],
                       capture_output=True)
        subprocess.run(self.adm + ["--op", "delete", "--mode", "system"], capture_output=True)
        self.proc.wait(timeout=10)


def best_of(runs: int, fn: Callable[[], object], before: Callable[[], object] | None = None
            ) -> float:
    """The best wall time of ``runs`` calls of ``fn`` (``before`` runs untimed first)."""
    best = float("inf")
    for _ in range(runs):
        if before is not None:
            before()
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


class DelayRelay:
    """A TCP relay on loopback that holds every chunk ``delay`` seconds each way, to stand in
    for a network's latency (no netem on our machines). ``port`` accepts connections and
    forwards them to ``target_port``. A context manager."""

    def __init__(self, target_port: int, delay: float):
        import socket
        import threading
        self.target_port = target_port
        self.delay = delay
        self.srv = socket.socket()
        self.srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.srv.bind(("127.0.0.1", 0))
        self.srv.listen(8)
        self.port = self.srv.getsockname()[1]
        self.threads: list = []
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()

    def _accept(self) -> None:
        import socket
        import threading
        while True:
            try:
                a, _ = self.srv.accept()
            except OSError:
                return
            b = socket.create_connection(("127.0.0.1", self.target_port))
            for s in (a, b):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for src, dst in ((a, b), (b, a)):
                t = threading.Thread(target=self._pump, args=(src, dst), daemon=True)
                t.start()

    def _pump(self, src, dst) -> None:
        import queue
        import threading
        q: queue.SimpleQueue = queue.SimpleQueue()

        def send() -> None:
            while True:
                due, data = q.get()
                if data is None:
                    dst.close()
                    return
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                try:
                    dst.sendall(data)
                except OSError:
                    return
        t = threading.Thread(target=send, daemon=True)
        t.start()
        while True:
            try:
                data = src.recv(1 << 20)
            except OSError:
                data = b""
            q.put((time.monotonic() + self.delay, data or None))
            if not data:
                return

    def __enter__(self) -> DelayRelay:
        return self

    def __exit__(self, *exc) -> None:
        self.srv.close()
