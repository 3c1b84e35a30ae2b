"""Benchmark: the copy read-ahead as it was (a thread pool) vs an IoQueue with per-worker opens
(issue #19 part 6: replace Readers only if the queue is as fast or faster).

    python3 bench/readahead.py [--runs 5] [--size 1G] [--dir /tmp/vdgui-bench-readahead]

A VDI with data in every block is read in 1 MiB windows, 32 ahead (copy's READAHEAD), by 4
workers each with its own read-only open of the chain; cases alternated, page cache dropped
before each run, best of the runs.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import best_of, drop_caches, ensure_bytecode, print_table
from vdgui.vd import Disk, IoQueue, OpenFlags
from vdgui.vd.ops.pipeline import READAHEAD, READERS

WINDOW = 1 << 20
DEPTH = READAHEAD // WINDOW


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--size", default="1G")
    ap.add_argument("--dir", default="/tmp/vdgui-bench-readahead")
    args = ap.parse_args()
    ensure_bytecode()
    size = int(args.size[:-1]) << {"M": 20, "G": 30}[args.size[-1].upper()]
    os.makedirs(args.dir, exist_ok=True)
    img = os.path.join(args.dir, f"src-{size}.vdi")
    if not os.path.exists(img):
        with Disk() as d:
            d.create_base(img, size, "VDI")
            for o in range(0, size, 1 << 20):
                d.write(o, os.urandom(1 << 20))

    def opener():
        return Disk.open_chain(img, flags=OpenFlags.READ_ONLY)

    def with_readers():
        # the read-ahead as it was before (issue #19): a thread pool, one open per thread
        local = threading.local()
        disks = []

        def read(off):
            d = getattr(local, "disk", None)
            if d is None:
                d = local.disk = opener()
                disks.append(d)
            return d.read(off, WINDOW)
        pool = ThreadPoolExecutor(READERS)
        try:
            futs: collections.deque = collections.deque()
            pos = 0
            while pos < size or futs:
                while pos < size and len(futs) < DEPTH:
                    futs.append(pool.submit(read, pos))
                    pos += WINDOW
                futs.popleft().result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            for d in disks:
                d.close()

    def with_queue():
        with Disk.open_chain(img, flags=OpenFlags.READ_ONLY) as d:
            q = IoQueue(d, workers=READERS, max_queued=DEPTH + 1, opener=opener)
            reqs: collections.deque = collections.deque()
            pos = 0
            while pos < size or reqs:
                while pos < size and len(reqs) < DEPTH:
                    reqs.append(q.read(pos, WINDOW))
                    pos += WINDOW
                reqs.popleft().wait()
            q.close()

    cases = [("Readers (ThreadPoolExecutor)", with_readers), ("IoQueue(opener=...)", with_queue)]
    best = {n: float("inf") for n, _f in cases}
    for _ in range(args.runs):
        for n, f in cases:
            best[n] = min(best[n], best_of(1, f, drop_caches))
    base = best[cases[0][0]]
    print_table(("read-ahead", "s", "MiB/s", "vs Readers"),
                [(n, f"{s:.2f}", f"{size / s / (1 << 20):.0f}", f"{base / s:.2f}x")
                 for n, s in best.items()])
    return 0


if __name__ == "__main__":
    sys.exit(main())
