"""Benchmark: clone a 1 GiB iSCSI LUN into a VDI, vdgui-img vs qemu-img (issue 6).

    python3 bench/iscsi.py [--runs 5] [--size 1G] [--dir /tmp/vdgui-bench-iscsi]

Starts tgt on loopback (root), exports a 1 GiB LUN holding ~256 MiB of scattered data, and
converts it to VDI with ``qemu-img convert iscsi://127.0.0.1:PORT/IQN/1`` (qemu-block-extra) and
``vdgui-img convert -f iSCSI --property ... - out.vdi`` alternately, cold caches, best of N.
Prints the time ratio (vdgui / qemu) and checks the outputs are identical.
"""
from __future__ import annotations

import argparse
import os
import random
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import Command, compare_commands, print_table, ratio, remove, tool

IQN = "iqn.2026-11.org.vdgui.bench:lun"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--size", default="1G")
    ap.add_argument("--dir", default="/tmp/vdgui-bench-iscsi")
    args = ap.parse_args()
    size = int(args.size[:-1]) << {"M": 20, "G": 30}[args.size[-1].upper()]
    os.makedirs(args.dir, exist_ok=True)
    backing = os.path.join(args.dir, "lun.img")
    if not os.path.exists(backing) or os.path.getsize(backing) != size:
        rnd = random.Random(1)
        with open(backing, "wb") as f:
            f.truncate(size)
            for _ in range(size // (4 << 20)):          # ~25% of 1 MiB pieces hold data
                off = rnd.randrange(0, size // (1 << 20)) << 20
                f.seek(off)
                f.write(os.urandom(1 << 20))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctl = str(random.randrange(100, 30000))
    tgtd = subprocess.Popen(["tgtd", "-f", "-C", ctl, "--iscsi", f"portal=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    adm = ["tgtadm", "-C", ctl, "--lld", "iscsi"]
    try:
        for _ in range(100):
            if subprocess.run(adm + ["--op", "show", "--mode", "system"],
                              capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        subprocess.run(
            adm + ["--op", "new", "--mode", "target", "--tid", "1", "-T", IQN], check=True
        )
        subprocess.run(
            adm
            + ["--op", "new", "--mode", "logicalunit", "--tid", "1", "--lun", "1", "-b", backing],
            check=True,
        )
        subprocess.run(
            adm + ["--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL"], check=True
        )
        url = f"iscsi://127.0.0.1:{port}/{IQN}/1"
        q_out = os.path.join(args.dir, "qemu.vdi")
        v_out = os.path.join(args.dir, "vdgui.vdi")
        cmds = [
            Command("qemu-img", [tool("qemu-img"), "convert", "-O", "vdi", url, q_out]),
            Command(
                "vdgui-img",
                [
                    sys.executable,
                    "-m",
                    "vdgui.cli",
                    "convert",
                    "-f",
                    "iSCSI",
                    "--property",
                    f"TargetName={IQN}",
                    "--property",
                    "LUN=1",
                    "--property",
                    f"TargetAddress=127.0.0.1:{port}",
                    "-O",
                    "VDI",
                    "-",
                    v_out,
                ],
            ),
        ]
        res = compare_commands(cmds, runs=args.runs, before_each=lambda: remove(q_out, v_out))
        q, v = res
        for r in res:
            if r.failures:
                print(f"{r.name} failed: {r.failures[0]}")
        rows = [
            (
                f"LUN {args.size} -> VDI",
                f"{q.best:.2f}",
                f"{v.best:.2f}",
                f"{ratio(v.best, q.best):.2f}",
                f"{v.peak_rss_kib // 1024}",
            )
        ]
        print_table(("case", "qemu s", "vdgui s", "ratio", "vdgui MiB"), rows)
        # runs alternate and each removes the previous outputs: check the last one (vdgui's)
        same = subprocess.run(
            [tool("qemu-img"), "compare", "-f", "vdi", "-F", "raw", v_out, backing],
            capture_output=True,
        )
        print(
            "vdgui's VDI is identical to the LUN"
            if same.returncode == 0
            else f"VDGUI'S VDI DIFFERS FROM THE LUN: {same.stdout.decode()}{same.stderr.decode()}"
        )
    finally:
        subprocess.run(
            adm + ["--op", "delete", "--mode", "target", "--tid", "1", "--force"],
            capture_output=True,
        )
        subprocess.run(adm + ["--op", "delete", "--mode", "system"], capture_output=True)
        tgtd.wait(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
