"""Looking inside a disk (issue #15): listing a 10,000-file ext4 volume in a QCOW2 chain
(target < 2 s, start-up included) and extracting ~256 MiB of files vs `qemu-img convert` reading
the same disk (target: at least half its throughput).

    python3 bench/inside.py [--dir /tmp/vdgui-bench-inside] [--runs 3] [--mib 256]
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import Command, compare_commands, print_table, remove, tool

PY = sys.executable


def _sh(*args):
    subprocess.run([shutil.which(args[0]) or args[0], *map(str, args[1:])], check=True,
                   capture_output=True)


def _chain(work, name, src, fs_mib):
    raw = os.path.join(work, f"{name}.raw")
    base = os.path.join(work, f"{name}-base.qcow2")
    top = os.path.join(work, f"{name}-top.qcow2")
    if os.path.exists(top):
        return top
    remove(raw, base, top)
    _sh("mkfs.ext4", "-q", "-d", src, raw, f"{fs_mib}M")
    _sh(tool("qemu-img"), "convert", "-f", "raw", "-O", "qcow2", raw, base)
    note = os.path.join(work, "note.txt")
    with open(note, "w") as f:
        f.write("snapshot\n")
    _sh("debugfs", "-w", "-R", f"write {note} /snapshot-note.txt", raw)
    _sh(tool("qemu-img"), "convert", "-f", "raw", "-O", "qcow2", "-B", base, "-F", "qcow2",
        raw, top)
    os.remove(raw)
    return top


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/vdgui-bench-inside")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--mib", type=int, default=256)
    a = ap.parse_args()
    os.makedirs(a.dir, exist_ok=True)
    vd_img = [PY, "-m", "vdgui.cli"]

    many = os.path.join(a.dir, "src10k")
    if not os.path.isdir(many):
        for d in range(100):
            os.makedirs(os.path.join(many, f"d{d:03}"))
            for i in range(100):
                with open(os.path.join(many, f"d{d:03}", f"f{i:03}.txt"), "w") as f:
                    f.write(f"{d} {i}\n" * 10)
    top10k = _chain(a.dir, "ls10k", many, 128)
    rows = []
    res = compare_commands([Command("vdgui-img ls -R --json (10,000 files)",
                                    [*vd_img, "ls", "-R", "--json", top10k, "/"])],
                           runs=a.runs)
    for r in res:
        rows.append((r.name, f"{min(r.times):.2f} s" if r.times else r.failures,
                     f"{r.peak_rss_kib // 1024} MiB"))

    big = os.path.join(a.dir, f"src{a.mib}")
    if not os.path.isdir(big):
        os.makedirs(big)
        for i in range(a.mib // 4):
            with open(os.path.join(big, f"b{i:03}.bin"), "wb") as f:
                f.write(os.urandom(4 << 20))
    topbig = _chain(a.dir, f"x{a.mib}", big, a.mib + a.mib // 4 + 16)
    dest = os.path.join(a.dir, "out")
    rawout = os.path.join(a.dir, "out.raw")
    res = compare_commands([
        Command("vdgui-img extract", [*vd_img, "extract", topbig, "/", dest]),
        Command("qemu-img convert -O raw", [tool("qemu-img"), "convert", "-O", "raw", topbig,
                                            rawout])],
        runs=a.runs, before_each=lambda: (shutil.rmtree(dest, ignore_errors=True),
                                          remove(rawout)))
    disk_mib = int(subprocess.run([tool("qemu-img"), "info", "--output=json", topbig],
                                  capture_output=True, text=True, check=True).stdout
                   .split('"virtual-size":')[1].split(",")[0]) / (1 << 20)
    for r, mib in zip(res, (a.mib, disk_mib)):
        t = min(r.times) if r.times else float("nan")
        rows.append((r.name, f"{t:.2f} s, {mib / t:.0f} MiB/s ({mib:.0f} MiB)",
                     f"{r.peak_rss_kib // 1024} MiB"))
    shutil.rmtree(dest, ignore_errors=True)
    remove(rawout)
    print_table(("case", "best time / throughput", "peak RSS"), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
