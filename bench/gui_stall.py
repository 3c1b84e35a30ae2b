"""Event-loop stall of the GUI while jobs run: create, copy, merge, compact, check.

A QTimer heartbeat fires every 10 ms while the main window runs one job at a time in the thread
pool; the longest gap between heartbeats, minus the interval, is the worst stall the user could
feel during that job. The target is < 50 ms (issue #13). Jobs, in order (each on the files the
one before left):

- create:  a fixed-size image of --size (dynamic where the format has no fixed variant)
- copy:    the RAW source (non-zero data, --size) converted to --format
- merge:   a differencing image over that copy, holding a quarter of --size, merged into it
- compact: the merged image (a copy of its data, the hook, a verify)
- check:   the compacted image

    python3 bench/gui_stall.py [--size 512M] [--format VDI] [--jobs create,copy,...] [--json]
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import tempfile
import time

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

TARGET_MS = 50
JOBS = ("create", "copy", "merge", "compact", "check")


def make_source(path: str, size: int) -> None:
    """A raw image full of non-zero data (so the copy has real work to do)."""
    block = bytes(range(1, 256)) * 4112                 # ~1 MiB of varied bytes
    block = block[: 1 << 20]
    with open(path, "wb") as f:
        left = size
        i = 0
        while left:
            n = min(left, len(block))
            f.write(bytes([i % 251 + 1]) + block[1:n] if n > 1 else block[:n])
            left -= n
            i += 1


class Heartbeat:
    """A QTimer every ``interval`` ms; gaps between its beats while ``run`` waits for a job."""

    def __init__(self, app, interval: int):
        from PySide6.QtCore import QElapsedTimer, QTimer
        self.app, self.interval = app, interval
        self.clock = QElapsedTimer()
        self.clock.start()
        self.timer = QTimer()
        self.timer.setInterval(interval)
        self.timer.timeout.connect(self._beat)
        self.gaps: list[float] = []
        self.times: list[float] = []
        self._last = 0

    def _beat(self):
        now = self.clock.nsecsElapsed()
        self.gaps.append((now - self._last) / 1e6)
        self.times.append(time.monotonic())
        self._last = now

    def measure(self, done, settle: float = 0.05) -> dict:
        """Beat until ``done()``; the stalls (gap - interval) and when the worst was."""
        self.gaps, self.times = [], []
        self._last = self.clock.nsecsElapsed()
        self.timer.start()
        started = time.monotonic()
        while not done():
            self.app.processEvents()
            time.sleep(0.001)
        elapsed = time.monotonic() - started
        end = time.monotonic() + settle
        while time.monotonic() < end:
            self.app.processEvents()
            time.sleep(0.001)
        self.timer.stop()
        stalls = [max(g - self.interval, 0.0) for g in self.gaps[1:]]
        out = {"seconds": round(elapsed, 3), "heartbeats": len(self.gaps),
               "max_stall_ms": round(max(stalls), 1) if stalls else None,
               "p99_stall_ms": (round(sorted(stalls)[max(int(len(stalls) * 0.99) - 1, 0)], 1)
                                if stalls else None),
               "median_gap_ms": round(statistics.median(self.gaps), 2) if self.gaps else None}
        if stalls:
            i = max(range(len(stalls)), key=stalls.__getitem__) + 1
            out["worst_stall_at_s"] = round(self.times[i] - started, 3)
        return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="512M", help="data size (default 512M)")
    ap.add_argument("--format", default="VDI", help="format of the images (default VDI)")
    ap.add_argument("--jobs", default=",".join(JOBS), help="jobs to run, in this order")
    ap.add_argument("--interval", type=int, default=10, help="heartbeat in ms (default 10)")
    ap.add_argument("--idle", type=float, default=5.0,
                    help="seconds of the idle baseline (no job; default 5)")
    ap.add_argument("--keep", help="work in this folder and keep the files")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args = ap.parse_args(argv)

    from vdgui.gui.app import make_app
    from vdgui.gui.main_window import MainWindow
    from vdgui.jobs import JobState, tasks
    from vdgui.vd import (
        Cap,
        Disk,
        ImageFlags,
        Library,
        OpenFlags,
        format_size,
        get_backend,
        parse_size,
    )

    size = parse_size(args.size)
    fmt = get_backend(args.format)
    ext = fmt.default_extension()
    work = args.keep or tempfile.mkdtemp(prefix="vdgui-stall-")
    os.makedirs(work, exist_ok=True)
    src = os.path.join(work, "source.img")
    files = {
        "created": os.path.join(work, f"created.{ext}"),
        "copy": os.path.join(work, f"copy.{ext}"),
        "diff": os.path.join(work, f"diff.{ext}"),
    }
    for p in files.values():
        if os.path.exists(p):
            os.remove(p)
    make_source(src, size)

    app = make_app()
    lib = Library(":memory:")
    win = MainWindow(lib)
    win.resize(1200, 760)
    win.show()
    win.add_paths([src], sync=True)
    app.processEvents()
    beat = Heartbeat(app, args.interval)
    results: dict[str, dict] = {}
    # baseline: the same heartbeat with nothing running (the machine's own scheduling noise)
    t_idle = time.monotonic() + args.idle
    results["idle"] = beat.measure(lambda: time.monotonic() >= t_idle, settle=0)

    def make_diff():
        """A differencing image over the copy holding a quarter of the size (not timed)."""
        with Disk.open_chain(files["copy"], flags=OpenFlags.READ_ONLY) as d:
            d.create_diff(files["diff"])
            chunk = bytes([0x5C]) * (1 << 20)
            for off in range(0, size // 4, 1 << 20):
                d.write(off * 4 % max(size, 1), chunk)

    def job_for(kind: str):
        if kind == "create":
            fixed = ImageFlags.FIXED if fmt.caps & Cap.CREATE_FIXED else ImageFlags.NONE
            return tasks.create_job(files["created"], size, fmt.name, flags=fixed)
        if kind == "copy":
            return tasks.copy_job(src, files["copy"], fmt.name, src_format="RAW")
        if kind == "merge":
            make_diff()
            return tasks.merge_job(files["diff"], files["copy"], key=files["copy"])
        if kind == "compact":
            return tasks.compact_job(files["copy"], format=fmt.name)
        if kind == "check":
            return tasks.check_job(files["copy"], format=fmt.name)
        raise SystemExit(f"unknown job {kind!r}; known: {', '.join(JOBS)}")

    failed = False
    for kind in [k.strip() for k in args.jobs.split(",") if k.strip()]:
        job = job_for(kind)
        signals: list[float] = []
        job.signals.progress.connect(lambda j, d, t: signals.append(time.monotonic()))
        win.start_job(job)
        r = beat.measure(lambda: job.finished)
        win.queue.wait()
        r["state"] = job.state
        r["progress_signals"] = len(signals)
        gaps = [b - a for a, b in itertools.pairwise(signals)]
        r["min_progress_gap_ms"] = round(min(gaps) * 1000, 1) if gaps else None
        if job.state != JobState.DONE:
            r["error"] = job.error
            failed = True
        results[kind] = r
    win.close()
    if not args.keep:
        for p in [src, *files.values()]:
            try:
                os.remove(p)
            except OSError:
                pass
        try:
            os.rmdir(work)
        except OSError:
            pass
    worst = max((r["max_stall_ms"] or 0) for k, r in results.items() if k != "idle")
    if args.json:
        print(
            json.dumps(
                {"size": size, "format": fmt.name, "target_ms": TARGET_MS, "jobs": results},
                indent=2,
            )
        )
    else:
        print(
            f"{format_size(size)} {fmt.name}, heartbeat every {args.interval} ms, "
            f"target: no stall over {TARGET_MS} ms"
        )
        for kind, r in results.items():
            print(
                f"  {kind:8} {r['seconds']:7.2f} s  worst stall {r['max_stall_ms']} ms "
                f"(p99 {r['p99_stall_ms']} ms, median gap {r['median_gap_ms']} ms"
                + (f", at {r.get('worst_stall_at_s')} s" if r.get("worst_stall_at_s") else "")
                + (f", {r['progress_signals']} progress signals" if "progress_signals" in r else "")
                + ")"
                + (f"  {r['state']}: {r.get('error')}" if r.get("error") else "")
            )
        print("OK" if worst < TARGET_MS and not failed else "TOO SLOW" if not failed else "FAILED")
    return 1 if failed else (0 if worst < TARGET_MS else 2)


if __name__ == "__main__":
    raise SystemExit(main())
