"""Test disks for issue #15, built with the file systems' and partitioners' own tools."""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time

import pytest

MiB = 1024 * 1024
os.environ.setdefault("MTOOLS_SKIP_CHECK", "1")     # mkfs.fat -C images have no geometry


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed (scripts/bootstrap test installs it)", pytrace=False)
    return path


def sh(*args, input=None) -> str:
    r = subprocess.run([tool(str(args[0])), *map(str, args[1:])], capture_output=True, text=True,
                       input=input)
    if r.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} failed ({r.returncode}): {r.stderr}")
    return r.stdout


def make_tree(root) -> dict:
    """A small folder tree; returns {relative path: bytes}."""
    files = {"hello.txt": b"hello world\n", "dir/a.bin": bytes(range(256)) * 300,
             "dir/sub/b.txt": b"b" * 5000, "empty": b""}
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return files


@pytest.fixture(scope="session")
def mbr_disk(tmp_path_factory):
    """64 MiB raw disk, MBR: 1 ext4 (label ROOTFS), extended 2 with logical 5 (FAT16, label
    DATA) and 6 (no file system)."""
    d = tmp_path_factory.mktemp("mbr")
    img = d / "disk.img"
    with open(img, "wb") as f:
        f.truncate(64 * MiB)
    sh("sfdisk", "-q", img, input="label: dos\nstart=2048, size=20480, type=83\n"
       "start=22528, size=40960, type=5\nstart=24576, size=16384, type=e\n"
       "start=43008, size=8192, type=83\n")
    src = d / "src"
    make_tree(src)
    sh("mkfs.ext4", "-q", "-F", "-L", "ROOTFS", "-d", src, "-E", f"offset={2048 * 512}", img,
       "10M")
    sh("mkfs.fat", "-F", "16", "-s", "1", "-n", "DATA", "--offset", "24576", img, 16384 // 2)
    return img



@contextlib.contextmanager
def exfat_mounted(img, readonly=False):
    """The exFAT volume file ``img`` mounted by exFAT's own FUSE driver (exfat-fuse) on a loop
    device; yields the folder. No loop device here (not root, none free): the test is skipped,
    saying so."""
    fuse = tool("mount.exfat-fuse")
    r = subprocess.run([tool("losetup"), "-f", "--show", *(["-r"] if readonly else []),
                        str(img)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot attach a loop device for exfat-fuse here: {r.stderr.strip()}")
    loop = r.stdout.strip()
    mnt = f"{img}.mnt"
    os.mkdir(mnt)
    try:
        sh(fuse, "-o", "ro" if readonly else "noatime", loop, mnt)
        try:
            yield mnt
        finally:
            for _ in range(50):                       # busy for a moment after a copy
                if subprocess.run([tool("fusermount"), "-u", mnt]).returncode == 0:
                    break
                time.sleep(0.1)
    finally:
        subprocess.run([tool("losetup"), "-d", loop], check=True)
        os.rmdir(mnt)


def fill_exfat(img, src, then=None) -> None:
    """Copy the tree ``src`` (times kept) into the exFAT volume file ``img`` (made by
    mkfs.exfat) through exfat-fuse, then call ``then(folder)``; fsck.exfat must find the
    volume clean."""
    with exfat_mounted(img) as mnt:
        sh("cp", "-a", f"{src}/.", f"{mnt}/")
        if then is not None:
            then(mnt)
    sh("fsck.exfat", "-n", img)


def read_exfat(img) -> dict:
    """{relative path: bytes} of every file of the exFAT volume file ``img``, read through
    exfat-fuse (the check that does not use our reader)."""
    out = {}
    with exfat_mounted(img, readonly=True) as mnt:
        for root, _dirs, names in os.walk(mnt):
            for n in names:
                p = os.path.join(root, n)
                with open(p, "rb") as f:
                    out[os.path.relpath(p, mnt)] = f.read()
    return out
