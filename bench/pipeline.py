"""Benchmark: iSCSI read throughput with pipelined SCSI READs vs one at a time (issue #19
part 6), tgt on loopback, in process.

    python3 bench/pipeline.py [--runs 3] [--size 256M] [--dir /tmp/vdgui-bench-pipeline]

Reads the whole LUN through ``Disk.read`` in 8 MiB calls (1 MiB per SCSI READ) with the
backend's pipeline depth set to 1 (the old path), 2, 4 (the default), 8 and 16; and through an
``IoQueue`` (8 MiB read requests, 4 workers). Page cache dropped before each run (tgt reads
its backing file cold). Checks the bytes against the backing file.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import DelayRelay, Tgt, best_of, drop_caches, ensure_bytecode, print_table
from vdgui.vd import Disk, OpenFlags

PIECE = 8 << 20


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--size", default="256M")
    ap.add_argument("--dir", default="/tmp/vdgui-bench-pipeline")
    ap.add_argument("--warm", action="store_true", help="keep the page cache (tgt reads memory)")
    ap.add_argument("--delay-ms", type=float, default=0.0,
                    help="latency added each way by a relay (a network instead of loopback)")
    args = ap.parse_args()
    ensure_bytecode()
    size = int(args.size[:-1]) << {"M": 20, "G": 30}[args.size[-1].upper()]
    os.makedirs(args.dir, exist_ok=True)
    backing = os.path.join(args.dir, "lun.img")
    if not os.path.exists(backing) or os.path.getsize(backing) != size:
        with open(backing, "wb") as f:
            for _ in range(size >> 20):
                f.write(os.urandom(1 << 20))
    with open(backing, "rb") as f:
        want = hashlib.sha256(f.read()).hexdigest()

    with Tgt(backing) as t, DelayRelay(t.port, args.delay_ms / 1000) as relay:
        url = t.url if not args.delay_ms else t.url.replace(f":{t.port}/", f":{relay.port}/")

        def direct(depth: int):
            def run():
                h = hashlib.sha256()
                with Disk() as d:
                    d.open(url, flags=OpenFlags.READ_ONLY)
                    d.top.pipeline = depth
                    for o in range(0, size, PIECE):
                        h.update(d.read(o, PIECE))
                assert h.hexdigest() == want, "bytes differ"
            return run

        def queued():
            h = hashlib.sha256()
            with Disk() as d:
                d.open(url, flags=OpenFlags.READ_ONLY)
                q = d.io_queue(workers=4, max_queued=8)
                reqs = [q.read(o, PIECE) for o in range(0, size, PIECE)]
                for r in reqs:
                    h.update(r.wait())
                q.close()
            assert h.hexdigest() == want, "bytes differ"

        cases = [(f"Disk.read, {n} READ(s) in flight", direct(n)) for n in (1, 2, 4, 8, 16)]
        cases.append(("IoQueue reads (depth 8), 4 workers", queued))
        best = {name: float("inf") for name, _fn in cases}
        for _ in range(args.runs):            # alternate the cases: drifts hit all alike
            for name, fn in cases:
                best[name] = min(best[name], best_of(1, fn, None if args.warm else drop_caches))
        base = best[cases[0][0]]
        rows = [(name, f"{s:.2f}", f"{size / s / (1 << 20):.0f}", f"{base / s:.2f}x")
                for name, s in best.items()]
        print_table(("reads", "s", "MiB/s", "vs one at a time"), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
