"""Test disks for issue #15, built with the file systems' and partitioners' own tools."""
from __future__ import annotations

import os
import shutil
import subprocess

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
