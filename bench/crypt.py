"""Benchmark: converting a LUKS-encrypted QCOW2 to plain RAW, vdgui-img vs qemu-img (issue #17).

    python3 bench/crypt.py [--runs 3] [--dir /tmp/vdgui-bench] [--size N --data N]

The source is bench/convert.py's 4 GiB VDI with ~1 GiB of scattered data, converted once by
qemu-img into a QCOW2 with encrypt.format=luks (kept in --dir between runs). Both tools decrypt it
to RAW, alternately, cold caches before every run, best of N; like-for-like rows as convert.py
(qemu's default does not flush, vdgui's does: -t unsafe / -t writeback). Target: ratio <= 1.5.
vdgui decrypts in its read-ahead threads: one OpenSSL EVP context per buffer, a new IV (tweak)
per 512-byte sector (vd/crypto/primitives.py).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import Command, compare_commands, print_table, ratio, read_once, remove, tool
from bench.convert import GiB, make_source

SECRET = "bench-passphrase"


def encrypted_source(folder: str, vdi: str) -> str:
    path = os.path.join(folder, "src-luks.qcow2")
    stamp = path + ".done"
    if not (os.path.exists(stamp) and os.path.getmtime(stamp) >= os.path.getmtime(vdi)):
        remove(path, stamp)
        for _ in range(20):     # qemu's PBKDF2 timing can fail on a busy machine: retried
            r = subprocess.run([tool("qemu-img"), "convert", "--object",
                                f"secret,id=s0,data={SECRET}", "-f", "vdi", "-O", "qcow2", "-o",
                                "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=100",
                                vdi, path], capture_output=True, text=True)
            if r.returncode == 0 or "accurate CPU usage" not in r.stderr:
                break
        if r.returncode:
            raise SystemExit(f"qemu-img convert failed: {r.stderr}")
        open(stamp, "w").close()
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", default="/tmp/vdgui-bench")
    ap.add_argument("--size", type=int, default=4 * GiB)
    ap.add_argument("--data", type=int, default=1 * GiB)
    ap.add_argument("--warm", action="store_true", help="do not drop caches before each run")
    args = ap.parse_args(argv)
    os.makedirs(args.dir, exist_ok=True)
    src = encrypted_source(args.dir, make_source(args.dir, args.size, args.data))
    pw = os.path.join(args.dir, "passphrase")
    with open(pw, "w") as f:
        f.write(SECRET)
    read_once([src])
    qemu_img = tool("qemu-img")
    out_q, out_v = os.path.join(args.dir, "out-qemu.raw"), os.path.join(args.dir, "out-vdgui.raw")
    opts = f"driver=qcow2,file.filename={src},encrypt.key-secret=s0"
    qargs = [qemu_img, "convert", "--object", f"secret,id=s0,data={SECRET}", "--image-opts",
             opts, "-O", "raw"]
    vargs = [sys.executable, "-m", "vdgui.cli", "convert", "--passphrase-file", pw, "-O", "RAW"]
    cmds = [Command("qemu-img", [*qargs, out_q]),
            Command("qemu-img -t writeback", [*qargs[:2], "-t", "writeback", *qargs[2:], out_q]),
            Command("vdgui-img", [*vargs, src, out_v]),
            Command("vdgui-img -t unsafe", [*vargs, "-t", "unsafe", src, out_v])]
    res_q, res_qw, res_v, res_vu = compare_commands(cmds, runs=args.runs, cold=not args.warm,
                                                    before_each=lambda: remove(out_q, out_v))
    same = "?"
    if os.path.exists(out_v):
        r = subprocess.run([qemu_img, "compare", "--object", f"secret,id=s0,data={SECRET}",
                            "--image-opts", opts, f"driver=raw,file.filename={out_v}"],
                           capture_output=True, text=True)
        same = "identical" if r.returncode == 0 else f"DIFFERENT: {r.stdout.strip()}"
    remove(out_q, out_v)
    for res in (res_q, res_qw, res_v, res_vu):
        if res.failures:
            print(f"{res.name} FAILED: {res.failures[0]}")
            return 1
    rows = [["QCOW2 (LUKS) -> RAW", f"{res_q.best:.2f}", f"{res_qw.best:.2f}",
             f"{res_v.best:.2f}", f"{res_vu.best:.2f}", f"{ratio(res_v.best, res_q.best):.2f}",
             f"{ratio(res_v.best, res_qw.best):.2f}", f"{ratio(res_vu.best, res_q.best):.2f}",
             f"{res_v.peak_rss_kib / 1024:.0f}", same]]
    print_table(["case", "qemu s", "qemu -t wb s", "vdgui s", "vdgui -t unsafe s", "ratio",
                 "wb/wb", "unsafe/unsafe", "vdgui RSS MiB", "output"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
