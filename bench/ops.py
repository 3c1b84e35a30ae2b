"""Benchmark: merge, compact and resize, vdgui-img side by side with qemu-img.

    python3 bench/ops.py [--runs 5] [--dir /tmp/vdgui-bench-ops] [--size 1G] [--data 256M]

Cases (a row whose backend is not registered prints "skipped"):
* startup: ``vdgui-img info`` against ``qemu-img info`` on a VDI, warm caches, best of 10.
* merge zero QCOW2: the issue #18 child, made by ``qemu-img convert -B base`` from a raw disk
  (``--data`` x 277/256 of data clusters, the rest zero clusters, over a base holding ``--data``).
* merge FMT: a base with ``--data`` of scattered data and one child holding a quarter of that
  (scattered, partly overlapping). ``vdgui-img merge child base`` (folds the child in, deletes it)
  against ``qemu-img commit -d child`` followed by deleting the child inside the timed run (the
  same end state; commit alone is shown too) on the same chain in the same format (QCOW2,
  VMDK). For VDI, whose differencing images qemu cannot open, our VDI merge is compared with
  qemu-img commit on a qcow2 chain holding the same data (the label says so).
* compact FMT: an image whose data was half overwritten with zeroes. ``vdgui-img compact`` against
  qemu's way to compact, ``qemu-img convert -O FMT`` to a new file.
* resize FMT: grow by 4x. ``vdgui-img resize`` against ``qemu-img resize`` (where qemu can resize
  that format; otherwise qcow2, and the label says so).
Every run starts from a fresh copy of the prepared images (made before timing); commands
alternate (A B A B ...), caches are dropped before each run when allowed, best of N. Each result
is checked once with ``qemu-img compare`` against the content before the operation.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import Command, compare_commands, print_table, ratio, remove, tool

MiB = 1 << 20
QEMU = {"VDI": "vdi", "VMDK": "vmdk", "QCOW2": "qcow2", "VHD": "vpc", "VHDX": "vhdx",
        "QED": "qed", "Parallels": "parallels"}
EXT = {"VDI": "vdi", "VMDK": "vmdk", "QCOW2": "qcow2", "VHD": "vhd", "VHDX": "vhdx", "QED": "qed",
       "Parallels": "hdd"}
QEMU_BACKING = {"qcow2", "vmdk", "qed"}
QEMU_RESIZE = {"qcow2", "qed", "raw"}   # qemu cannot resize dynamic vpc


def backends() -> dict:
    r = subprocess.run([sys.executable, "-m", "vdgui.cli", "backends", "--json"],
                       capture_output=True, text=True, check=True)
    return {b["name"]: b for b in json.loads(r.stdout)}


def qemu_io(q: str, path: str, cmds: list[str]) -> None:
    for k in range(0, len(cmds), 200):
        argv = [tool("qemu-io"), "-f", q]
        for c in cmds[k:k + 200]:
            argv += ["-c", c]
        subprocess.run(argv + [path], check=True, stdout=subprocess.DEVNULL)


def writes(size: int, data: int, seed: int, piece: int = 1 * MiB) -> list[str]:
    rnd = random.Random(seed)
    slots = rnd.sample(range(size // piece), min(size // piece, data // piece))
    return [f"write -P {(seed * 31 + i) % 250 + 1} {s * piece} {piece}"
            for i, s in enumerate(slots)]


def make_chain(folder: str, q: str, ext: str, size: int, data: int,
               cluster: int | None = None) -> tuple[str, str]:
    """base + child made by qemu (backing by relative name). Reused between invocations.
    ``cluster``: qcow2 cluster size (default qemu's)."""
    tag = f"-c{cluster}" if cluster else ""
    base = os.path.join(folder, f"mbase{tag}.{ext}")
    child = os.path.join(folder, f"mchild{tag}.{ext}")
    stamp = os.path.join(folder, f"chain{tag}.{ext}.{size}.{data}.done")
    if os.path.exists(stamp):
        return base, child
    remove(base, child)
    qi = tool("qemu-img")
    opts = ["-o", f"cluster_size={cluster}"] if cluster else []
    subprocess.run([qi, "create", "-q", "-f", q, *opts, base, str(size)], check=True)
    qemu_io(q, base, writes(size, data, 1))
    subprocess.run([qi, "create", "-q", "-f", q, *opts, "-b", os.path.basename(base), "-F", q,
                    child], check=True)
    qemu_io(q, child, writes(size, data // 4, 2, piece=256 * 1024))
    open(stamp, "w").close()
    return base, child


def make_vdi_chain(folder: str, size: int, data: int) -> tuple[str, str]:
    """VDI base (qemu) + VDI child (ours: qemu cannot create VDI diffs) with the same writes."""
    base, child = os.path.join(folder, "mbase.vdi"), os.path.join(folder, "mchild.vdi")
    stamp = os.path.join(folder, f"chain.vdi.{size}.{data}.done")
    if os.path.exists(stamp):
        return base, child
    remove(base, child)
    subprocess.run([tool("qemu-img"), "create", "-q", "-f", "vdi", base, str(size)], check=True)
    qemu_io("vdi", base, writes(size, data, 1))
    from vdgui.vd import Disk, OpenFlags
    with Disk() as d:
        d.open(base, "VDI", OpenFlags.READ_ONLY)
        d.create_diff(child, "VDI")
        for c in writes(size, data // 4, 2, piece=256 * 1024):
            _, pat, off, ln = c.split()[0], int(c.split()[2]), int(c.split()[3]), int(c.split()[4])
            d.write(off, bytes([pat]) * ln)
    open(stamp, "w").close()
    return base, child


def make_zero_child(folder: str, size: int, data: int) -> tuple[str, str]:
    """The issue #18 case: a qcow2 base with ``data`` of scattered data, and a child made by
    ``qemu-img convert -B base`` from a raw disk holding 277/256 of that: qemu stores the raw
    disk's data as data clusters and every zero range as zero clusters (over base data or not).
    """
    base = os.path.join(folder, "zbase.qcow2")
    child = os.path.join(folder, "zchild.qcow2")
    stamp = os.path.join(folder, f"zchain.{size}.{data}.done")
    if os.path.exists(stamp):
        return base, child
    remove(base, child)
    qi = tool("qemu-img")
    subprocess.run([qi, "create", "-q", "-f", "qcow2", base, str(size)], check=True)
    qemu_io("qcow2", base, writes(size, data, 1))
    raw = os.path.join(folder, "zsource.raw")
    with open(raw, "wb") as f:
        f.truncate(size)
        rnd = random.Random(5)
        for i, s in enumerate(rnd.sample(range(size // MiB), data * 277 // 256 // MiB)):
            f.seek(s * MiB)
            f.write(bytes([i % 250 + 1]) * MiB)
    subprocess.run([qi, "convert", "-q", "-O", "qcow2", "-B", os.path.basename(base), "-F",
                    "qcow2", raw, child], check=True, cwd=folder)
    remove(raw)
    open(stamp, "w").close()
    return base, child


def snapshot(paths: list[str], dest: str) -> list[str]:
    os.makedirs(dest, exist_ok=True)
    out = []
    for p in paths:
        q = os.path.join(dest, os.path.basename(p))
        subprocess.run(["cp", "--sparse=always", p, q], check=True)
        out.append(q)
    return out


def restore(saved: list[str], work: str) -> None:
    shutil.rmtree(work, ignore_errors=True)
    snapshot(saved, work)


def compare(a: str, fa: str, b: str, fb: str) -> str:
    r = subprocess.run([tool("qemu-img"), "compare", "-f", fa, "-F", fb, a, b],
                       capture_output=True, text=True)
    return "identical" if r.returncode == 0 else f"DIFFERENT: {r.stdout.strip()} {r.stderr.strip()}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--dir", default="/tmp/vdgui-bench-ops")
    ap.add_argument("--size", type=int, default=1024 * MiB)
    ap.add_argument("--data", type=int, default=256 * MiB)
    ap.add_argument("--warm", action="store_true", help="do not drop caches before each run")
    ap.add_argument("--only", action="append", help="run only cases starting with this label")
    ap.add_argument("--before", metavar="TREE",
                    help="also time vdgui-img from this source tree (PYTHONPATH=TREE) in the same "
                         "alternation: before/after under the same load (run from a folder "
                         "holding no vdgui/)")
    args = ap.parse_args(argv)
    before_env = dict(os.environ, PYTHONPATH=os.path.abspath(args.before)) if args.before else None
    os.makedirs(args.dir, exist_ok=True)
    have = backends()
    qi = tool("qemu-img")
    vd = [sys.executable, "-m", "vdgui.cli"]
    rows = []

    def can(name, op):
        b = have.get(name)
        return b is not None and op in [o.lower() for o in b.get("operations", [])]

    def wanted(label):
        return not args.only or any(label.startswith(o) for o in args.only)

    def run_case(label, qcmd, vcmd, prepare, check, also=None):
        """``also``: a second qemu command shown for reference in the check column."""
        if not wanted(label):
            return
        # vdgui-img runs last in each round: ``check`` looks at its output
        before = [Command("before", vcmd.argv, env=before_env)] if before_env else []
        cmds = [qcmd] + ([also] if also else []) + before + [vcmd]
        res = compare_commands(cmds, runs=args.runs, cold=not args.warm, before_each=prepare)
        rq, rv = res[0], res[-1]
        failed = [f for r in res for f in r.failures]
        if failed:
            rows.append([label, f"{rq.best:.2f}", f"{rv.best:.2f}", "-", "FAILED: " + failed[0]])
        else:
            note = check()
            if also:
                ra = res[1]
                note += (f"; {also.name} {ra.best:.2f} s (ratio {ratio(rv.best, ra.best):.2f})")
            if before:
                rb = res[-2]
                note += f"; before {rb.best:.2f} s (ratio {ratio(rb.best, rq.best):.2f})"
            rows.append([label, f"{rq.best:.2f}", f"{rv.best:.2f}",
                         f"{ratio(rv.best, rq.best):.2f}", note])
        print_table(["case", "qemu s", "vdgui s", "ratio", "check"], rows[-1:], out=sys.stderr)

    # -- start-up: info of a VDI, warm caches (what every small command pays first) -----------
    if wanted("startup"):
        img = os.path.join(args.dir, "startup.vdi")
        if not os.path.exists(img):
            subprocess.run([qi, "create", "-q", "-f", "vdi", img, str(args.size)], check=True)
        before = [Command("before", vd + ["info", img], env=before_env)] if before_env else []
        res = compare_commands([Command("qemu-img", [qi, "info", img]), *before,
                                Command("vdgui-img", vd + ["info", img])],
                               runs=max(args.runs, 10), cold=False)
        rq, rv = res[0], res[-1]
        notes = [f for r in res for f in r.failures]
        if before:
            notes.append(f"before {res[1].best:.3f} s (ratio {ratio(res[1].best, rq.best):.2f})")
        note = "; ".join(notes)
        rows.append(["startup: info VDI (warm)", f"{rq.best:.3f}", f"{rv.best:.3f}",
                     f"{ratio(rv.best, rq.best):.2f}", note])
        print_table(["case", "qemu s", "vdgui s", "ratio", "check"], rows[-1:], out=sys.stderr)

    # -- merge of a child holding zero clusters (issue #18) -----------------------------------
    if wanted("merge zero"):
        src = make_zero_child(args.dir, args.size, args.data)
        saved = snapshot(list(src), os.path.join(args.dir, "saved-zero"))
        qsaved = snapshot(list(src), os.path.join(args.dir, "qsaved-zero"))
        want = os.path.join(args.dir, "want-zero.raw")
        if not os.path.exists(want):
            subprocess.run(vd + ["convert", "-O", "RAW", saved[1], want], check=True)
        vw, qw = os.path.join(args.dir, "vwork"), os.path.join(args.dir, "qwork")

        def prepare_zero(saved=saved, qsaved=qsaved, vw=vw, qw=qw):
            restore(saved, vw)
            restore(qsaved, qw)
        vb, vc = (os.path.join(vw, os.path.basename(p)) for p in saved)
        qc = os.path.join(qw, os.path.basename(qsaved[1]))
        commit = [qi, "commit", "-q", "-d", "-f", "qcow2", qc]
        run_case("merge zero QCOW2 (child from convert -B: data + zero clusters)",
                 Command("qemu-img", commit, remove_after=(qc,)),
                 Command("vdgui-img", vd + ["merge", vc, vb]),
                 prepare_zero, lambda vb=vb: compare(vb, "qcow2", want, "raw")
                 + f"; base {os.stat(vb).st_blocks // 2048} MiB allocated",
                 also=Command("commit without rm", commit))

    # -- merge ---------------------------------------------------------------------------------
    for name in ("QCOW2", "VMDK", "VDI"):
        if not wanted(f"merge {name}"):
            continue        # nothing prepared either: a 4 GiB case's files take gigabytes
        if not (can(name, "relink") and can(name, "write")):
            rows.append([f"merge {name}", "-", "-", "-", f"skipped: backend {name} cannot merge"])
            continue
        q = QEMU[name]
        if q in QEMU_BACKING:
            src = make_chain(args.dir, q, EXT[name], args.size, args.data)
            qsrc, qq, label = src, q, f"merge {name} (vs qemu-img commit, {name})"
        else:
            # qemu cannot open VDI diffs: its reference is a qcow2 chain with the same writes and
            # clusters as large as VDI's blocks, so both children hold the same bytes (a 256 KiB
            # write into a 1 MiB block/cluster copies the whole unit into the child)
            src = make_vdi_chain(args.dir, args.size, args.data)
            qsrc = make_chain(args.dir, "qcow2", "qcow2", args.size, args.data, cluster=MiB)
            qq = "qcow2"
            label = f"merge {name} (vs qemu-img commit, qcow2 chain, same data, 1 MiB clusters)"
        saved = snapshot(list(src), os.path.join(args.dir, f"saved-{name}"))
        qsaved = snapshot(list(qsrc), os.path.join(args.dir, f"qsaved-{name}"))
        want = os.path.join(args.dir, f"want-{name}.raw")
        if not os.path.exists(want):
            subprocess.run(vd + ["convert", "-O", "RAW", saved[1], want], check=True)
        vw, qw = os.path.join(args.dir, "vwork"), os.path.join(args.dir, "qwork")

        def prepare(saved=saved, qsaved=qsaved, vw=vw, qw=qw):
            restore(saved, vw)
            restore(qsaved, qw)
        vb, vc = (os.path.join(vw, os.path.basename(p)) for p in saved)
        _qb, qc = (os.path.join(qw, os.path.basename(p)) for p in qsaved)
        # the same end state as ours: the child folded in and deleted (qemu's commit -d keeps
        # it, so the bench deletes it right after, inside the timed run); commit alone is shown
        commit = [qi, "commit", "-q", "-d", "-f", qq, qc]
        run_case(label,
                 Command("qemu-img", commit, remove_after=(qc,)),
                 Command("vdgui-img", vd + ["merge", vc, vb]),
                 prepare, lambda vb=vb, q=q: compare(vb, q, want, "raw"),
                 also=Command("commit without rm", commit))

    # -- compact -------------------------------------------------------------------------------
    for name in ("VDI", "VHD", "VMDK", "VHDX"):
        if not wanted(f"compact {name}") or not can(name, "compact"):
            continue
        q, ext = QEMU[name], EXT[name]
        img = os.path.join(args.dir, f"zeroed.{ext}")
        stamp = img + f".{args.size}.{args.data}.done"
        if not os.path.exists(stamp):
            remove(img)
            subprocess.run([qi, "create", "-q", "-f", q, img, str(args.size)], check=True)
            w = writes(args.size, args.data, 3)
            zero = [f"write -P 0 {c.split()[3]} {c.split()[4]}" for c in w[::2]]
            qemu_io(q, img, w + zero)             # half the data overwritten by zero bytes
            open(stamp, "w").close()
        saved = snapshot([img], os.path.join(args.dir, f"csaved-{name}"))
        want = os.path.join(args.dir, f"cwant-{name}.raw")
        if not os.path.exists(want):
            subprocess.run([qi, "convert", "-f", q, "-O", "raw", saved[0], want], check=True)
        vw = os.path.join(args.dir, "cwork")
        work = os.path.join(vw, os.path.basename(img))
        qout = os.path.join(args.dir, f"qcompact.{ext}")

        def prepare(saved=saved, vw=vw, qout=qout):
            restore(saved, vw)
            remove(qout)
        run_case(f"compact {name} (vs qemu-img convert -O {q})",
                 Command("qemu-img", [qi, "convert", "-f", q, "-O", q, saved[0], qout]),
                 Command("vdgui-img", vd + ["compact", work]),
                 prepare, lambda work=work, q=q, want=want: compare(work, q, want, "raw")
                 + f"; {os.path.getsize(saved[0]) // MiB} -> {os.path.getsize(work) // MiB} MiB")

    # -- resize --------------------------------------------------------------------------------
    # "VDI (VirtualBox layout)": made by vdgui-img create, whose block map has room to grow
    # as VirtualBox's has (data aligned to 1 MiB); qemu packs the map against the data
    for name, fmt, ours in (("VDI", "VDI", False), ("VDI (VirtualBox layout)", "VDI", True),
                            ("QCOW2", "QCOW2", False), ("VHD", "VHD", False),
                            ("VMDK", "VMDK", False)):
        if not wanted(f"resize {name}") or not can(fmt, "resize"):
            continue
        tag = fmt + ("-vbox" if ours else "")
        q, ext = QEMU[fmt], EXT[fmt]
        img = os.path.join(args.dir, f"rs-{tag}.{ext}")
        stamp = img + f".{args.size}.{args.data}.done"
        if not os.path.exists(stamp):
            remove(img)
            if ours:
                subprocess.run(vd + ["create", "-f", fmt, "--size", str(args.size), img],
                               check=True, stdout=subprocess.DEVNULL)
            else:
                subprocess.run([qi, "create", "-q", "-f", q, img, str(args.size)], check=True)
            qemu_io(q, img, writes(args.size, args.data, 4))
            open(stamp, "w").close()
        qq = q if q in QEMU_RESIZE else "qcow2"
        qimg = img
        if qq != q:
            qimg = os.path.join(args.dir, "rs-q.qcow2")
            if not os.path.exists(qimg + ".done"):
                subprocess.run([qi, "convert", "-f", q, "-O", "qcow2", img, qimg], check=True)
                open(qimg + ".done", "w").close()
        saved = snapshot([img, qimg] if qimg != img else [img],
                         os.path.join(args.dir, f"rsaved-{tag}"))
        want = os.path.join(args.dir, f"rwant-{tag}.raw")
        if not os.path.exists(want):
            subprocess.run([qi, "convert", "-f", q, "-O", "raw", saved[0], want], check=True)
        vw = os.path.join(args.dir, "rwork")
        vimg = os.path.join(vw, os.path.basename(saved[0]))
        qwork = os.path.join(vw, os.path.basename(saved[-1]))
        new = str(4 * args.size)
        label = f"resize {name} x4" + (" (vs qemu-img resize on qcow2)" if qq != q else "")

        def prepare(saved=saved, vw=vw):
            restore(saved, vw)
        run_case(label,
                 Command("qemu-img", [qi, "resize", "-q", "-f", qq, qwork, new]),
                 Command("vdgui-img", vd + ["resize", vimg, new]),
                 prepare, lambda vimg=vimg, q=q, want=want: compare(vimg, q, want, "raw"))

    print_table(["case", "qemu s", "vdgui s", "ratio", "check"], rows)
    for work in ("vwork", "qwork", "cwork", "rwork"):      # the prepared images stay for reuse
        shutil.rmtree(os.path.join(args.dir, work), ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
