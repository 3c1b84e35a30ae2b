"""Extraction's read path (issue #15, speed): Disk.read_into fills the caller's buffer, and a
file's runs (the library's own runlist) are read straight into it, bypassing dissect's stream
copies. Checked against Disk.read, the source files and the library's own stream."""
from __future__ import annotations

import os

from tests.inside.conftest import MiB, make_tree, sh
from vdgui.vd import Disk, OpenFlags, open_volume
from vdgui.vd.inside.filesystems import _RunReader


def test_disk_read_into_matches_read_through_a_chain(tmp_path):
    base, top = str(tmp_path / "base.vdi"), str(tmp_path / "top.vdi")
    with Disk() as d:
        d.create_base(base, 8 * MiB, "VDI")
        d.write(0, os.urandom(MiB))
        d.write(3 * MiB, os.urandom(512 * 1024))
        d.create_diff(top)
        d.write(MiB - 4096, os.urandom(8192))         # over the base's data and past it
        d.write(5 * MiB, os.urandom(MiB))
    with Disk.open_chain(top, flags=OpenFlags.READ_ONLY) as d:
        cases = [(0, 8 * MiB), (MiB - 8192, 3 * MiB), (4 * MiB, 512), (6 * MiB, 2 * MiB),
                 (7, 1000), (MiB + 3, 4093)]            # the last two are unaligned
        for level in (0, 1):
            for off, n in cases:
                buf = bytearray(b"\xaa" * n)           # stale bytes must not show through
                d.read_into(off, buf, level)
                assert bytes(buf) == d.read(off, n, level), (level, off, n)


def test_files_read_straight_from_their_runs_match_the_sources(tmp_path):
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(40 * MiB)
    sh("sfdisk", "-q", img, input="label: dos\nstart=2048, size=32768, type=83\n"
       "start=36864, size=40960, type=e\n")
    src = tmp_path / "src"
    files = make_tree(src)
    files["big.bin"] = os.urandom(3 * MiB + 123)
    (src / "big.bin").write_bytes(files["big.bin"])
    with open(src / "holes.bin", "wb") as f:            # sparse: a hole between two pieces
        f.write(b"A" * 5000)
        f.seek(2 * MiB)
        f.write(b"B" * 7000)
    files["holes.bin"] = (src / "holes.bin").read_bytes()
    sh("mkfs.ext4", "-q", "-F", "-d", src, "-E", f"offset={2048 * 512}", img, "16M")
    sh("mkfs.fat", "-F", "16", "-s", "1", "--offset", "36864", img, 40960 // 2)
    for name in ("big.bin", "hello.txt", "dir"):
        sh("mcopy", "-s", "-i", f"{img}@@{36864 * 512}", src / name, "::/")
    with Disk.open_chain(str(img), flags=OpenFlags.READ_ONLY) as d:
        for number, names in ((1, files), (2, ["big.bin", "hello.txt", "dir/a.bin"])):
            _, fs = open_volume(d, number)
            for name in names:
                with fs.open("/" + name) as f:
                    if len(files[name]) > 4096:
                        assert isinstance(f._inner, _RunReader), (number, name)
                    got = bytearray()
                    chunk = bytearray(77_777)            # odd sizes cross every run edge
                    while n := f.readinto(chunk):
                        got += chunk[:n]
                assert bytes(got) == files[name], (number, name)
                if isinstance(f._inner, _RunReader):     # the library's stream agrees
                    lib = fs._open(fs._node("/" + name))
                    assert lib.read() == files[name]
