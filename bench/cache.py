"""Benchmark: reads of an iSCSI LUN (tgt on loopback) with and without a VCI cache (issue #19
part 2), in process.

    python3 bench/cache.py [--runs 3] [--size 256M] [--dir /tmp/vdgui-bench-cache]

Rows: the whole LUN read in 1 MiB pieces, and 4096 random 4 KiB reads; each without a cache,
with an empty cache (the fill), and with the filled cache (the hit path: page cache dropped
first, so the cache file is read from the local disk). Checks the bytes against the backing file.
"""
from __future__ import annotations

import argparse
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import Tgt, best_of, drop_caches, ensure_bytecode, print_table, remove
from vdgui.vd import Disk, OpenFlags


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--size", default="256M")
    ap.add_argument("--dir", default="/tmp/vdgui-bench-cache")
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
        want = f.read()
    cache = os.path.join(args.dir, "lun.vci")
    rnd = random.Random(7)
    offsets = [rnd.randrange(size >> 12) << 12 for _ in range(4096)]

    with Tgt(backing) as t:
        def seq(c: str | None, check: bool = False):
            def run():
                with Disk() as d:
                    d.open(t.url, flags=OpenFlags.READ_ONLY)
                    if c:
                        d.cache_open(c, size=max(size * 2, 8 << 20))
                    got = [d.read(o, 1 << 20) for o in range(0, size, 1 << 20)]
                if check:
                    assert b"".join(got) == want, "bytes differ"
            return run

        def rand(c: str | None):
            def run():
                with Disk() as d:
                    d.open(t.url, flags=OpenFlags.READ_ONLY)
                    if c:
                        d.cache_open(c, size=max(size * 2, 8 << 20))
                    for o in offsets:
                        assert d.read(o, 4096) == want[o:o + 4096]
            return run

        seq(cache, check=True)()                 # correctness of fill and hit, once
        seq(cache, check=True)()
        rows = []
        for name, mk in (("sequential 1 MiB", seq), ("random 4 KiB x4096", rand)):
            none = best_of(args.runs, mk(None), drop_caches)
            fill = best_of(args.runs, mk(cache), lambda: (remove(cache), drop_caches()))
            mk(cache)()
            hit = best_of(args.runs, mk(cache), drop_caches)
            rows.append((name, f"{none:.2f}", f"{fill:.2f}", f"{hit:.2f}",
                         f"{none / hit:.1f}x"))
        print_table(("reads", "no cache s", "fill s", "hit s", "hit speed-up"), rows)
    remove(cache)
    return 0


if __name__ == "__main__":
    sys.exit(main())
