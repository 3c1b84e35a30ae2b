"""Event-loop stall of the GUI during a big copy job.

A QTimer heartbeat fires every 10 ms while the main window runs a copy/convert job (RAW → VDI by
default) in the thread pool; the longest gap between heartbeats, minus the interval, is the worst
stall the user could feel. The target is < 100 ms.

    python3 bench/gui_stall.py [--size 512M] [--format VDI] [--source-format RAW] [--keep DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="512M", help="source size (default 512M)")
    ap.add_argument("--format", default="VDI", help="target format (default VDI)")
    ap.add_argument("--source-format", default="RAW",
                    help="convert the source to this format first (not timed), default RAW")
    ap.add_argument("--interval", type=int, default=10, help="heartbeat in ms (default 10)")
    ap.add_argument("--keep", help="work in this folder and keep the files")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args = ap.parse_args(argv)

    from PySide6.QtCore import QElapsedTimer, QTimer
    from vdgui.gui.app import make_app
    from vdgui.gui.main_window import MainWindow
    from vdgui.jobs import JobState, tasks
    from vdgui.vd import Library, format_size, get_backend, parse_size

    size = parse_size(args.size)
    work = args.keep or tempfile.mkdtemp(prefix="vdgui-stall-")
    os.makedirs(work, exist_ok=True)
    src = os.path.join(work, "source.img")
    dst = os.path.join(work, "target." + get_backend(args.format).default_extension())
    for p in (dst,):
        if os.path.exists(p):
            os.remove(p)
    t0 = time.monotonic()
    make_source(src, size)
    if args.source_format.upper() != "RAW":
        from vdgui.vd import copy_image
        conv = os.path.join(work, "source." + get_backend(args.source_format).default_extension())
        if os.path.exists(conv):
            os.remove(conv)
        copy_image(src, conv, get_backend(args.source_format).name, src_format="RAW")
        os.remove(src)
        src = conv
    prep = time.monotonic() - t0

    app = make_app()
    lib = Library(":memory:")
    win = MainWindow(lib)
    win.resize(1200, 760)
    win.show()
    win.add_paths([src], sync=True)
    app.processEvents()

    gaps: list[float] = []
    clock = QElapsedTimer()
    clock.start()
    last = [clock.nsecsElapsed()]

    def beat():
        now = clock.nsecsElapsed()
        gaps.append((now - last[0]) / 1e6)
        last[0] = now
    timer = QTimer()
    timer.setInterval(args.interval)
    timer.timeout.connect(beat)
    progress_signals = []

    # baseline: the same heartbeat with nothing running (the machine's own scheduling noise)
    timer.start()
    t_idle = time.monotonic()
    while time.monotonic() - t_idle < 1.0:
        app.processEvents()
        time.sleep(0.001)
    timer.stop()
    idle = [max(g - args.interval, 0.0) for g in gaps[1:]]
    gaps.clear()
    beat_times: list[float] = []
    _beat = beat

    def beat():  # noqa: F811 - also remember when each beat happened
        _beat()
        beat_times.append(time.monotonic())
    timer.timeout.disconnect()
    timer.timeout.connect(beat)
    last[0] = clock.nsecsElapsed()

    node = win.model.node(src)
    job = tasks.copy_job(src, dst, get_backend(args.format).name, key=node.path)
    job.signals.progress.connect(lambda j, d, t: progress_signals.append((time.monotonic(), d, t)))
    timer.start()
    started = time.monotonic()
    win.start_job(job)
    while not job.finished:
        app.processEvents()
        time.sleep(0.001)
    elapsed = time.monotonic() - started
    for _ in range(20):
        app.processEvents()
        time.sleep(0.002)
    timer.stop()
    win.queue.wait()
    if job.state != JobState.DONE:
        print(f"copy failed: {job.state}: {job.error}", file=sys.stderr)
        return 1
    stalls = [max(g - args.interval, 0.0) for g in gaps[1:]]
    worst_at = None
    if stalls:
        i = max(range(len(stalls)), key=stalls.__getitem__) + 1
        worst_at = round(beat_times[i] - started, 3) if i < len(beat_times) else None
    rates = [b[0] - a[0] for a, b in zip(progress_signals, progress_signals[1:])]
    result = {
        "source_bytes": size,
        "target_format": args.format,
        "copy_seconds": round(elapsed, 3),
        "throughput_mib_s": round(size / (1 << 20) / elapsed, 1),
        "heartbeats": len(gaps),
        "max_stall_ms": round(max(stalls), 1) if stalls else None,
        "p99_stall_ms": round(sorted(stalls)[int(len(stalls) * 0.99) - 1], 1) if stalls else None,
        "median_gap_ms": round(statistics.median(gaps), 2) if gaps else None,
        "progress_signals": len(progress_signals),
        "min_progress_gap_ms": round(min(rates) * 1000, 1) if rates else None,
        "preparation_seconds": round(prep, 2),
        "worst_stall_at_s": worst_at,
        "idle_max_stall_ms": round(max(idle), 1) if idle else None,
    }
    win.close()
    if not args.keep:
        for p in (src, dst):
            try:
                os.remove(p)
            except OSError:
                pass
        try:
            os.rmdir(work)
        except OSError:
            pass
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"copy {format_size(size)} {args.source_format.upper()} → {args.format}: {result['copy_seconds']} s "
              f"({result['throughput_mib_s']} MiB/s)")
        print(f"event-loop heartbeat every {args.interval} ms: {result['heartbeats']} beats, "
              f"median gap {result['median_gap_ms']} ms")
        print(f"worst stall {result['max_stall_ms']} ms, p99 {result['p99_stall_ms']} ms "
              f"(target < 100 ms) — {'OK' if (result['max_stall_ms'] or 0) < 100 else 'TOO SLOW'}")
        print(f"worst stall at {result['worst_stall_at_s']} s into the job; the idle baseline "
              f"(no job, same heartbeat) had a worst stall of {result['idle_max_stall_ms']} ms")
        print(f"progress signals: {result['progress_signals']} "
              f"(closest two {result['min_progress_gap_ms']} ms apart)")
    return 0 if (result["max_stall_ms"] or 0) < 100 else 2


if __name__ == "__main__":
    raise SystemExit(main())
