"""Benchmark: sparsify in place against qemu-img convert of the same image (issue #16).

    python3 bench/sparsify.py [--size 16G] [--used 4G] [--format VDI] [--runs 3] [--dir D]

The image: one ext4 volume over a whole disk first filled with non-zero garbage (so neither
tool can drop its free space by zero detection), ``--used`` bytes of files in it
(mkfs.ext4 -d), converted to FORMAT. Timed: ``vdgui-img sparsify IMAGE`` on a fresh copy
(in place: map, discard, compact) against ``qemu-img convert -O FMT IMAGE OUT`` (what users run
to shrink an image; it keeps the garbage). Also printed: the allocated size of each result,
and ``virt-sparsify --in-place`` when it is installed and works here.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import Command, compare_commands, print_table, ratio, remove, tool
from vdgui.vd import format_size, parse_size

MiB = 1 << 20
QEMU = {"VDI": "vdi", "VMDK": "vmdk", "QCOW2": "qcow2", "VHDX": "vhdx", "VHD": "vpc",
        "QED": "qed", "Parallels": "parallels"}


def garbage(path: str, size: int) -> None:
    block = bytearray(os.urandom(64 * MiB))
    with open(path, "wb") as f:
        done = 0
        while done < size:
            n = min(len(block), size - done)
            block[:8] = done.to_bytes(8, "little")
            f.write(block[:n])
            done += n


def build(folder: str, size: int, used: int, fmt: str) -> str:
    files = os.path.join(folder, "files")
    os.makedirs(files, exist_ok=True)
    piece = 256 * MiB
    for i in range(max(used // piece, 1)):
        garbage(os.path.join(files, f"f{i:03d}.bin"), min(piece, used))
    raw = os.path.join(folder, "disk.raw")
    garbage(raw, size)
    subprocess.run([tool("mkfs.ext4"), "-q", "-F", "-E", "nodiscard", "-d", files, raw],
                   check=True)
    shutil.rmtree(files)
    img = os.path.join(folder, f"disk.{QEMU[fmt]}")
    subprocess.run([tool("qemu-img"), "convert", "-O", QEMU[fmt], raw, img], check=True)
    os.unlink(raw)
    return img


def allocated(path: str) -> int:
    return os.stat(path).st_blocks * 512


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="16G")
    ap.add_argument("--used", default="4G")
    ap.add_argument("--format", default="VDI", choices=sorted(QEMU))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", default="/tmp/vdgui-bench-sparsify")
    a = ap.parse_args()
    size, used = parse_size(a.size), parse_size(a.used)
    os.makedirs(a.dir, exist_ok=True)
    q = QEMU[a.format]
    tpl = build(a.dir, size, used, a.format)
    work = os.path.join(a.dir, f"work.{q}")
    out = os.path.join(a.dir, f"out.{q}")

    turn = [0]

    def fresh() -> None:
        # the runs alternate sparsify, convert: the work copy is made only before sparsify's,
        # so the template, a work copy and convert's output never take space at once
        remove(work, out)
        if turn[0] % 2 == 0:
            subprocess.run(["cp", "--sparse=always", tpl, work], check=True)
        turn[0] += 1

    cmds = [Command("vdgui-img sparsify", [sys.executable, "-m", "vdgui.cli", "sparsify", work]),
            Command(f"qemu-img convert -O {q}", [tool("qemu-img"), "convert", "-O", q, tpl,
                                                 out])]
    res = compare_commands(cmds, runs=a.runs, before_each=fresh)
    sizes = {}
    turn[0] = 0
    fresh()
    subprocess.run(cmds[0].argv, check=True, stdout=subprocess.DEVNULL)
    sizes[cmds[0].name] = allocated(work)
    remove(work)
    subprocess.run(cmds[1].argv, check=True)
    sizes[cmds[1].name] = allocated(out)
    remove(out)
    rows = [[r.name, f"{r.best:.2f} s" if r.times else "failed", f"{r.peak_rss_kib // 1024} MiB",
             format_size(sizes[r.name])] for r in res]
    virt = shutil.which("virt-sparsify")
    if virt:
        turn[0] = 0
        fresh()
        r = subprocess.run(["/usr/bin/time", "-f", "%e", virt, "--in-place", work],
                           capture_output=True, text=True)
        rows.append(["virt-sparsify --in-place",
                     f"{r.stderr.strip().splitlines()[-1]} s" if r.returncode == 0
                     else f"failed ({r.returncode})", "", format_size(allocated(work))])
    else:
        rows.append(["virt-sparsify --in-place", "not installed", "", ""])
    print(f"{a.format} {format_size(size)}, {format_size(used)} of files in ext4, "
          f"image {format_size(allocated(tpl))} allocated; best of {a.runs}")
    print_table(["command", "time", "peak RSS", "result allocated"], rows)
    if all(r.times for r in res):
        print(f"sparsify / convert time: {ratio(res[0].best, res[1].best):.2f}")
    remove(work, out, tpl)


if __name__ == "__main__":
    main()
