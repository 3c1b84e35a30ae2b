"""Benchmark: iSCSI throughput with pipelined SCSI READs / WRITEs vs one at a time (issue #19
part 6), tgt on loopback, in process.

    python3 bench/pipeline.py [--runs 3] [--size 256M] [--dir /tmp/vdgui-bench-pipeline]
    python3 bench/pipeline.py --write [--initial-r2t No] [--delay-ms 2]

Reads the whole LUN through ``Disk.read`` in 8 MiB calls (1 MiB per SCSI READ) with the
backend's pipeline depth set to 1 (the old path), 2, 4 (the default), 8 and 16; and through an
``IoQueue`` (8 MiB read requests, 4 workers). Page cache dropped before each run (tgt reads
its backing file cold). Checks the bytes against the backing file.

``--write``: the same with ``Disk.write`` (256 KiB per SCSI WRITE, the WriteSplit default) and a
SYNCHRONIZE CACHE at the end, timed together; every run writes different bytes, checked in
the backing file afterwards. ``--initial-r2t No`` sets tgt's InitialR2T (unsolicited Data-Out
up to FirstBurstLength); ``--first-burst N`` its FirstBurstLength.

``--small N``: N random 4 KiB reads, one ``Disk.read`` after another vs all submitted to an
``IoQueue`` (whose worker hands the ready ones to the backend together: READs in flight at once).
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
    ap.add_argument("--write", action="store_true", help="time writes instead of reads")
    ap.add_argument("--small", type=int, default=0, help="time N random 4 KiB reads")
    ap.add_argument("--initial-r2t", choices=("Yes", "No"), help="tgt's InitialR2T")
    ap.add_argument("--first-burst", type=int, help="tgt's FirstBurstLength")
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
        if args.initial_r2t:
            t.set("InitialR2T", args.initial_r2t)
        if args.first_burst:
            t.set("FirstBurstLength", str(args.first_burst))
        if args.write:
            return writes(url, backing, size, args)
        if args.small:
            return small_reads(url, backing, size, args)

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


def small_reads(url: str, backing: str, size: int, args: argparse.Namespace) -> int:
    import random
    rnd = random.Random(1)
    offsets = [rnd.randrange(size // 4096) * 4096 for _ in range(args.small)]
    with open(backing, "rb") as f:
        want = [(f.seek(o), f.read(4096))[1] for o in offsets]

    def one_by_one():
        with Disk() as d:
            d.open(url, flags=OpenFlags.READ_ONLY)
            got = [d.read(o, 4096) for o in offsets]
        assert got == want, "bytes differ"

    def queued(workers: int):
        def run():
            with Disk() as d:
                d.open(url, flags=OpenFlags.READ_ONLY)
                q = d.io_queue(workers=workers, max_queued=64)
                reqs = [q.read(o, 4096) for o in offsets]
                got = [r.wait() for r in reqs]
                q.close()
            assert got == want, "bytes differ"
        return run

    cases = [("Disk.read one after another", one_by_one),
             ("IoQueue, 1 worker (ready reads batched)", queued(1)),
             ("IoQueue, 4 workers (ready reads batched)", queued(4))]
    best = {name: float("inf") for name, _fn in cases}
    for _ in range(args.runs):
        for name, fn in cases:
            best[name] = min(best[name], best_of(1, fn, None if args.warm else drop_caches))
    base = best[cases[0][0]]
    print_table((f"{args.small} random 4 KiB reads", "s", "reads/s", "vs one at a time"),
                [(name, f"{s:.2f}", f"{args.small / s:.0f}", f"{base / s:.2f}x")
                 for name, s in best.items()])
    return 0


def writes(url: str, backing: str, size: int, args: argparse.Namespace) -> int:
    base = os.urandom(PIECE)
    stamp = [0]

    def chunk(i: int) -> bytes:            # different bytes in every run
        return stamp[0].to_bytes(8, "little") + i.to_bytes(8, "little") + base[16:]

    def check() -> None:
        with open(backing, "rb") as f:
            for i in range(size // PIECE):
                assert f.read(PIECE) == chunk(i), f"bytes differ in piece {i}"

    def direct(depth: int):
        def run():
            stamp[0] += 1
            with Disk() as d:
                d.open(url)
                d.top.write_pipeline = depth
                for i in range(size // PIECE):
                    d.write(i * PIECE, chunk(i))
                d.flush()
        return run

    def queued():
        stamp[0] += 1
        with Disk() as d:
            d.open(url)
            q = d.io_queue(workers=4, max_queued=8)
            reqs = [q.write(i * PIECE, chunk(i)) for i in range(size // PIECE)]
            q.flush().wait()
            for r in reqs:
                r.wait()
            q.close()

    cases = [(f"Disk.write, {n} WRITE(s) in flight", direct(n)) for n in (1, 2, 4, 8, 16)]
    cases.append(("IoQueue writes (queue depth 8, 8 WRITEs in flight), 4 workers", queued))
    best = {name: float("inf") for name, _fn in cases}
    for _ in range(args.runs):
        for name, fn in cases:
            best[name] = min(best[name], best_of(1, fn, None if args.warm else drop_caches))
            check()
    base_s = best[cases[0][0]]
    rows = [(name, f"{s:.2f}", f"{size / s / (1 << 20):.0f}", f"{base_s / s:.2f}x")
            for name, s in best.items()]
    print_table(("writes + SYNCHRONIZE CACHE", "s", "MiB/s", "vs one at a time"), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
