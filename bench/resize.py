"""Benchmark (issue #18 goal 1): grow an image 4x in place, vdgui-img against qemu-img resize.

    python3 bench/resize.py [--runs 3] [--dir /tmp/vdgui-bench-resize] [--size 1G] [--data 256M]
                            [--only VDI --only VHD ...]

Every image is made by qemu-img (``create`` in the format, then ``--data`` of 1 MiB pieces
written by qemu-io at random places, the same places for every format), except "VDI (VirtualBox
layout)", made by ``vdgui-img create``. ``vdgui-img resize IMG 4*size`` is timed against
``qemu-img resize`` of a QCOW2 holding the same data (qemu cannot resize most of these formats),
from a fresh copy of the prepared image before every run (only a copy the last run changed is
made again), commands alternating, ``sync`` and ``echo 1 > /proc/sys/vm/drop_caches`` before each
run, best of N. Each result is checked once with ``qemu-img compare`` against the image before
(the grown area must read zeroes) and ``qemu-img check`` where qemu checks the format, and the
file must be the same file (inode) as before: grown in place, not copied.

Fixed formats grow by allocating the new area (``fallocate``): ``--size 16G`` skips "VHD fixed"
(48 GiB per run). "resize() alone": the same resize timed inside a process that has imported
vdgui already (what the operation costs without interpreter start and imports).
Disk space: about 2x the data per format at a time, plus 2x for the QCOW2.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import Command, compare_commands, print_table, ratio, remove, tool
from bench.ops import qemu_io, writes

MiB = 1 << 20
GiB = 1 << 30
# (label, our format, qemu format, qemu -o options, extension); None as qemu format: ours
CASES = [
    ("VDI", "VDI", "vdi", "", "vdi"),
    ("VDI (VirtualBox layout)", "VDI", None, "", "vdi"),
    ("VHD", "VHD", "vpc", "", "vhd"),
    ("VHD fixed", "VHD", "vpc", "subformat=fixed", "vhd"),
    ("VMDK", "VMDK", "vmdk", "", "vmdk"),
    ("VHDX", "VHDX", "vhdx", "", "vhdx"),
    ("QCOW2", "QCOW2", "qcow2", "", "qcow2"),
    ("QED", "QED", "qed", "", "qed"),
    ("Parallels", "Parallels", "parallels", "", "hdd"),
    ("RAW", "RAW", "raw", "", "img"),
]
QEMU_NO_CHECK = {"vpc", "raw"}
HEAD = ["case", "qemu-img resize qcow2 s", "vdgui-img s", "ratio", "resize() alone s", "check"]


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": MiB, "G": GiB, "T": 1 << 40}
    t = text.strip().upper().rstrip("B").rstrip("I")
    return int(float(t[:-1]) * units[t[-1]]) if t[-1] in units else int(t)


def make(path: str, fmt: str, q: str | None, opts: str, size: int, data: int) -> None:
    stamp = f"{path}.{size}.{data}.done"
    if os.path.exists(stamp):
        return
    remove(path)
    qi = tool("qemu-img")
    if q is None:
        subprocess.run([sys.executable, "-m", "vdgui.cli", "create", "-f", fmt, "--size",
                        str(size), path], check=True, stdout=subprocess.DEVNULL)
        q = fmt.lower()
    else:
        subprocess.run([qi, "create", "-q", "-f", q, *(["-o", opts] if opts else []), path,
                        str(size)], check=True)
    qemu_io(q, path, writes(size, data, 4))
    open(stamp, "w").close()


def fresh(saved: str, work: str) -> None:
    """``work`` as a sparse copy of ``saved``, unless an unchanged copy is already there."""
    s = os.stat(saved)
    try:
        w = os.stat(work)
        if (w.st_size, w.st_mtime_ns) == (s.st_size, s.st_mtime_ns):
            return
    except FileNotFoundError:
        pass
    remove(work)
    subprocess.run(["cp", "--sparse=always", "--preserve=timestamps", saved, work], check=True)


def inner(fmt: str, path: str, new: str, out: str) -> int:
    """The resize alone, timed inside the process (no interpreter start, no imports)."""
    import time

    from vdgui.vd import resize
    t0 = time.perf_counter()
    resize(path, int(new), format=fmt)
    with open(out, "a") as f:
        f.write(f"{time.perf_counter() - t0}\n")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--inner":
        return inner(*argv[1:5])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", default="/tmp/vdgui-bench-resize")
    ap.add_argument("--size", default="1G")
    ap.add_argument("--data", default="256M")
    ap.add_argument("--only", action="append", help="run only cases whose label starts so")
    ap.add_argument("--keep", action="store_true", help="keep the prepared images")
    ap.add_argument("--before", metavar="TREE",
                    help="also time vdgui-img from this source tree (PYTHONPATH=TREE) in the same "
                         "alternation (run from a folder holding no vdgui/)")
    args = ap.parse_args(argv)
    before_env = dict(os.environ, PYTHONPATH=os.path.abspath(args.before)) if args.before else None
    size, data = parse_size(args.size), parse_size(args.data)
    new = str(4 * size)
    os.makedirs(args.dir, exist_ok=True)
    qi = tool("qemu-img")
    vd = [sys.executable, "-m", "vdgui.cli"]
    work = os.path.join(args.dir, "work")
    os.makedirs(work, exist_ok=True)
    ref = os.path.join(args.dir, "ref.qcow2")          # qemu-img resize's image, same data
    make(ref, "QCOW2", "qcow2", "", size, data)
    qwork = os.path.join(work, "ref.qcow2")
    rows = []
    for label, fmt, q, opts, ext in CASES:
        if args.only and not any(label.startswith(o) for o in args.only):
            continue
        if "fixed" in label and size > 4 * GiB:
            rows.append([label, "-", "-", "-", "-", "skipped: a fixed image grows by 3x its size"])
            continue
        tag = label.split()[0] + ("-fixed" if "fixed" in label else "") + \
            ("-vbox" if q is None else "")
        img = os.path.join(args.dir, f"{tag}.{ext}")
        make(img, fmt, q, opts, size, data)
        vimg = os.path.join(work, os.path.basename(img))
        qf = q or fmt.lower()

        def prepare(img=img, vimg=vimg):
            fresh(ref, qwork)
            fresh(img, vimg)
        times = os.path.join(work, "inner.txt")
        remove(times)
        res = compare_commands([Command("qemu-img", [qi, "resize", "-q", "-f", "qcow2", qwork,
                                                     new]),
                                Command("vdgui-img", vd + ["resize", "-f", fmt, vimg, new]),
                                Command("in-process", [sys.executable, os.path.abspath(__file__),
                                                       "--inner", fmt, vimg, new, times]),
                                *([Command("before", vd + ["resize", "-f", fmt, vimg, new],
                                           env=before_env)] if before_env else [])],
                               runs=args.runs, cold=True, before_each=prepare)
        rq, rv = res[0], res[1]
        with open(times) as f:
            op = min(float(x) for x in f.read().split())
        failed = [f for r in res for f in r.failures]
        if failed:
            rows.append([label, f"{rq.best:.3f}", f"{rv.best:.3f}", "-", "-",
                         "FAILED: " + failed[0]])
        else:
            prepare()                            # once more, to look at the result
            ino = os.stat(vimg).st_ino
            subprocess.run(vd + ["resize", "-f", fmt, vimg, new], check=True)
            notes = ["in place" if os.stat(vimg).st_ino == ino else "COPIED"]
            r = subprocess.run([qi, "compare", "-f", qf, "-F", qf, vimg, img],
                               capture_output=True, text=True)
            notes.append("identical" if r.returncode == 0 else f"DIFFERENT: {r.stdout.strip()}")
            if qf not in QEMU_NO_CHECK:
                r = subprocess.run([qi, "check", "-f", qf, vimg], capture_output=True, text=True)
                notes.append("check clean" if r.returncode == 0 else f"check exit {r.returncode}")
            if before_env:
                rb = res[3]
                notes.append(f"before {rb.best:.3f} s (ratio {ratio(rb.best, rq.best):.2f})")
            rows.append([label, f"{rq.best:.3f}", f"{rv.best:.3f}",
                         f"{ratio(rv.best, rq.best):.2f}", f"{op:.3f}", "; ".join(notes)])
        print_table(HEAD, rows[-1:], out=sys.stderr)
        remove(vimg)
        if not args.keep:
            remove(img, f"{img}.{size}.{data}.done")
    print(f"\n{size // MiB} MiB images holding {data // MiB} MiB, grown to {4 * size // MiB} MiB,"
          f" best of {args.runs}, cold caches")
    print_table(HEAD, rows)
    shutil.rmtree(work, ignore_errors=True)
    if not args.keep:
        remove(ref, f"{ref}.{size}.{data}.done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
