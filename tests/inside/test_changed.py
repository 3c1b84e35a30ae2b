"""What a snapshot changed (issue #15 item 4): snapshots made with qemu-img convert -B from a
copy modified with the file systems' own tools (debugfs -w, mcopy); the reported set must be
exactly the files touched — neighbours sharing an image cluster are not reported."""
from __future__ import annotations

import json
import shutil

from tests.conftest import run_cli
from tests.inside.conftest import sh


def _changed(img, *extra):
    r = json.loads(run_cli("changed", "--json", *extra, img).stdout)
    return {f["path"]: f["change"] for f in r["files"]}, r


def test_ext4_and_fat_partitions_in_a_chain(mbr_disk, tmp_path, qemu):
    work = tmp_path / "work.img"
    shutil.copy(mbr_disk, work)
    # many small neighbours: they share the snapshot's 64 KiB clusters with the touched files
    small = tmp_path / "small"
    small.mkdir()
    for i in range(40):
        (small / f"s{i:02}").write_bytes(b"%d\n" % i * 50)
    fat = f"{work}@@{24576 * 512}"
    sh("mcopy", "-s", "-i", fat, small, "::/")
    base = tmp_path / "base.vhdx"
    qemu.img("convert", "-f", "raw", "-O", "vhdx", work, base)
    # snapshot 1 (mid): ext4 changes via debugfs on partition 1 (through a raw copy of it)
    p1 = tmp_path / "p1.raw"
    sh("dd", f"if={work}", f"of={p1}", "bs=512", "skip=2048", "count=20480", "status=none")
    (tmp_path / "new.txt").write_bytes(b"brand new\n")
    (tmp_path / "b2.txt").write_bytes(b"c" * 5000)
    sh("debugfs", "-w", "-f", "-", p1, input=f"rm /hello.txt\nwrite {tmp_path / 'new.txt'} "
       f"/dir/new.txt\nrm /dir/sub/b.txt\nwrite {tmp_path / 'b2.txt'} /dir/sub/b.txt\n")
    sh("dd", f"if={p1}", f"of={work}", "bs=512", "seek=2048", "conv=notrunc", "status=none")
    mid = tmp_path / "mid.qcow2"
    qemu.img("convert", "-f", "raw", "-O", "qcow2", "-B", base, "-F", "vhdx", work, mid)
    # snapshot 2 (top): FAT changes via mcopy on partition 5
    (tmp_path / "s07").write_bytes(b"changed seven\n")
    sh("mcopy", "-o", "-i", fat, tmp_path / "s07", "::/small/s07")
    sh("mdel", "-i", fat, "::/small/s30")
    top = tmp_path / "top.qcow2"
    qemu.img("convert", "-f", "raw", "-O", "qcow2", "-B", mid, "-F", "qcow2", work, top)

    files, rep = _changed(top)
    assert files == {"5:/small/s07": "modified", "5:/small/s30": "removed"}
    assert rep["problems"] == [] and rep["not_covered"] == []
    files, _ = _changed(top, "--top", "1")
    assert files == {"1:/hello.txt": "removed", "1:/dir/new.txt": "added",
                     "1:/dir/sub/b.txt": "modified"}
    r = run_cli("changed", base, check=False)
    assert r.returncode == 1 and "not a differencing image" in r.stderr


def test_unpartitioned_ext4_content_vs_metadata(tmp_path, qemu):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(30):
        (src / f"f{i}").write_bytes(b"x" * 3000)
    raw = tmp_path / "v.raw"
    sh("mkfs.ext4", "-q", "-d", src, raw, "8M")
    base = tmp_path / "base.qcow2"
    qemu.img("convert", "-f", "raw", "-O", "qcow2", raw, base)
    same = tmp_path / "same"
    same.write_bytes(b"y" * 3000)
    sh("debugfs", "-w", "-f", "-", raw, input=f"rm /f3\nwrite {same} /f3\n"
       "set_inode_field /f5 mtime 20200101000000\n")
    top = tmp_path / "top.qcow2"
    qemu.img("convert", "-f", "raw", "-O", "qcow2", "-B", base, "-F", "qcow2", raw, top)
    files, rep = _changed(top)
    assert files == {"/f3": "modified"}
    assert {m["path"]: m["change"] for m in rep["metadata"]} == {"/f5": "modified"}


def test_commands_never_write_the_images(tmp_path, qemu):
    import hashlib
    import os
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"a" * 10000)
    raw = tmp_path / "v.raw"
    sh("mkfs.ext4", "-q", "-d", src, raw, "8M")
    base = tmp_path / "base.vmdk"
    qemu.img("convert", "-f", "raw", "-O", "vmdk", raw, base)
    sh("debugfs", "-w", "-R", f"write {src / 'a'} /b", raw)
    top = tmp_path / "top.qcow2"
    qemu.img("convert", "-f", "raw", "-O", "qcow2", "-B", base, "-F", "vmdk", raw, top)

    def state():
        return [(hashlib.sha256(p.read_bytes()).hexdigest(), os.stat(p).st_mtime_ns)
                for p in (base, top)]
    before = state()
    run_cli("partitions", top)
    run_cli("ls", "-R", top, "/")
    run_cli("cat", top, "/b")
    run_cli("extract", top, "/", tmp_path / "out")
    assert _changed(top)[0] == {"/b": "added"}
    assert state() == before
