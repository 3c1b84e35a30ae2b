"""exFAT inside a disk (issues #15 and #16): volumes made by mkfs.exfat (exfatprogs) and filled
through exFAT's FUSE driver (exfat-fuse) on a loop device, converted by qemu-img; listings, times
and contents compared with the source folder, labels with blkid, sparsify checked with
fsck.exfat and by reading every file back through exfat-fuse."""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli
from tests.inside.conftest import MiB, exfat_mounted, fill_exfat, make_tree, read_exfat, sh

FORMATS = ["raw", "vdi", "qcow2", "vmdk", "vhdx"]


def _source(root: Path) -> None:
    make_tree(root)                               # hello.txt, dir/a.bin, dir/sub/b.txt, empty
    (root / "a long folder name with spaces é").mkdir()
    (root / "a long folder name with spaces é" / "Ünïcode name longer than fifteen.txt") \
        .write_text("ü" * 40)
    many = root / "many"                          # a folder of several clusters
    many.mkdir()
    for i in range(300):
        (many / f"file_number_{i:03d}.txt").write_text(str(i) * (i % 5))
    empties = root / "empties"                    # several clusters with no data between
    empties.mkdir()
    for i in range(200):
        (empties / f"empty_file_{i:03d}").touch()
    (root / "big.bin").write_bytes(random.Random(15).randbytes(3 * MiB))


def _fragment(mnt: str) -> None:
    """frag.bin ends up in two pieces (a FAT chain): a file is written after its first piece."""
    with open(os.path.join(mnt, "frag.bin"), "wb") as f:
        f.write(b"F" * 4096)
    with open(os.path.join(mnt, "after.bin"), "wb") as f:
        f.write(b"A" * 4096)
    with open(os.path.join(mnt, "frag.bin"), "ab") as f:
        f.write(bytes(range(256)) * 800)


def _tree(folder: Path) -> dict:
    out = {}
    for dirpath, dirs, files in os.walk(folder):
        for n in dirs + files:
            p = Path(dirpath) / n
            out["/" + str(p.relative_to(folder))] = p
    return out


@pytest.fixture(scope="module")
def exfat(tmp_path_factory):
    d = tmp_path_factory.mktemp("exfat")
    src = d / "src"
    _source(src)
    vol = d / "vol.raw"
    with open(vol, "wb") as f:
        f.truncate(64 * MiB)
    sh("mkfs.exfat", "-L", "EXDATA", vol)
    fill_exfat(vol, src, then=_fragment)
    (src / "frag.bin").write_bytes(b"F" * 4096 + bytes(range(256)) * 800)
    (src / "after.bin").write_bytes(b"A" * 4096)
    # the times of the two written through the mount are theirs; the rest keep the source's
    imgs = {"raw": vol}
    for fmt in FORMATS[1:]:
        imgs[fmt] = d / f"vol.{fmt}"
        sh("qemu-img", "convert", "-f", "raw", "-O", fmt, vol, imgs[fmt])
    disk = d / "disk.raw"                         # MBR, partition 1 (type 7) at 1 MiB
    with open(disk, "wb") as f:
        f.truncate(80 * MiB)
    sh("sfdisk", "-q", disk, input="label: dos\nstart=2048, size=131072, type=7\n")
    sh("dd", f"if={vol}", f"of={disk}", "bs=1M", "seek=1", "conv=notrunc", "status=none")
    imgs["disk"] = d / "disk.vdi"
    sh("qemu-img", "convert", "-f", "raw", "-O", "vdi", disk, imgs["disk"])
    return src, imgs


@pytest.mark.parametrize("fmt", FORMATS)
def test_listing_times_and_content_match_the_source(exfat, fmt):
    src, imgs = exfat
    img = imgs[fmt]
    listed = {e["path"]: e for e in
              json.loads(run_cli("ls", "--json", "-R", img, "/").stdout)["entries"]}
    want = _tree(src)
    assert set(listed) == set(want)
    from vdgui.vd import Disk, OpenFlags, open_volume
    with Disk.open_chain(str(img), None, OpenFlags.READ_ONLY) as disk:
        _, fs = open_volume(disk)
        for path, p in want.items():
            e = listed[path]
            assert e["type"] == ("dir" if p.is_dir() else "file"), path
            if p.is_dir():
                continue
            assert e["size"] == p.stat().st_size, path
            if p.name not in ("frag.bin", "after.bin"):
                assert abs(e["mtime"] - p.stat().st_mtime) < 2, path      # 2 s, 10 ms steps
            with fs.open(path) as f:
                assert hashlib.sha256(f.read()).digest() == \
                    hashlib.sha256(p.read_bytes()).digest(), path
    out = subprocess.run([sys.executable, "-m", "vdgui.cli", "cat", str(img),
                          "/a long folder name with spaces é/Ünïcode name longer than "
                          "fifteen.txt"], capture_output=True, cwd=str(ROOT), check=True)
    assert out.stdout == ("ü" * 40).encode()


def test_chains_and_big_folders_are_read_through_the_fat(exfat):
    """frag.bin and the folder many/ are FAT chains (not NoFatChain): both paths are read."""
    src, imgs = exfat
    from vdgui.vd import Disk, OpenFlags, open_volume
    with Disk.open_chain(str(imgs["qcow2"]), None, OpenFlags.READ_ONLY) as disk:
        _, fs = open_volume(disk)
        frag, many = fs._node("/frag.bin")[0], fs._node("/MANY")[0]      # names: case-blind
        assert not frag.stream.flags.not_fragmented and len(fs.allocation("/frag.bin")) == 2
        assert not many.stream.flags.not_fragmented and many.stream.data_length > \
            fs.fs.cluster_size
        assert len(fs.listdir("/many")) == 300
        with fs.open("/frag.bin") as f:
            assert f.read() == (src / "frag.bin").read_bytes()


def test_partition_label_uuid_and_extract(exfat, tmp_path):
    src, imgs = exfat
    parts = json.loads(run_cli("partitions", "--json", imgs["disk"]).stdout)["partitions"]
    blkid = sh("blkid", "-p", "-o", "export", imgs["raw"])
    want = dict(line.split("=", 1) for line in blkid.split())
    assert [(p["number"], p["filesystem"], p["label"], p["uuid"]) for p in parts] == \
        [(1, "exfat", want["LABEL"], want["UUID"])]
    dest = tmp_path / "out"
    run_cli("extract", imgs["disk"], "1:/dir", dest)
    for rel in ("a.bin", "sub/b.txt"):
        assert (dest / rel).read_bytes() == (src / "dir" / rel).read_bytes()
        assert abs((dest / rel).stat().st_mtime - (src / "dir" / rel).stat().st_mtime) < 2


def _set_checksum(entries: bytearray) -> None:
    """exFAT's entry set checksum (bytes 2-3 of the first entry left out)."""
    c = 0
    for i, b in enumerate(entries):
        if i in (2, 3):
            continue
        c = (((c << 15) | (c >> 1)) + b) & 0xFFFF
    struct.pack_into("<H", entries, 2, c)


def _entry_set(raw: bytes, name: str) -> int:
    """Offset of the file entry (0x85) of the set whose name is ``name`` (a short name)."""
    needle = name.encode("utf-16-le")
    i = raw.index(needle)
    at = i - 2 - 64                               # name entry -> stream -> file entry
    assert raw[at] == 0x85 and raw[at + 32] == 0xC0 and raw[at + 64] == 0xC1, hex(at)
    return at


def test_bytes_past_valid_data_length_read_zero(exfat, tmp_path):
    """A file extended without its new bytes written (Windows' SetEndOfFile, Linux's exfat
    truncate) has ValidDataLength below DataLength: the rest reads zeroes, whatever the
    clusters hold. Made by lowering it in big.bin's entry set (checksum updated; fsck.exfat
    accepts the volume)."""
    src, imgs = exfat
    vol = tmp_path / "vdl.raw"
    shutil.copyfile(imgs["raw"], vol)
    raw = bytearray(vol.read_bytes())
    at = _entry_set(raw, "big.bin")
    struct.pack_into("<Q", raw, at + 32 + 8, 1000)
    _set_checksum(memoryview(raw)[at:at + 32 * (1 + raw[at + 1])])
    vol.write_bytes(raw)
    sh("fsck.exfat", "-n", vol)
    got = run_cli_bytes("cat", vol, "/big.bin")
    big = (src / "big.bin").read_bytes()
    assert len(got) == len(big) and got[:1000] == big[:1000] and not any(got[1000:])


def test_a_contiguous_folder_of_several_clusters(exfat):
    """A folder in one run of clusters is marked NoFatChain (exfat-fuse does so for empties/):
    it is read whole (dissect.fat 3.13 alone reads its first cluster only, and fails)."""
    _src, imgs = exfat
    from dissect.fat.exfat import ExFAT
    with open(imgs["raw"], "rb") as f, pytest.raises(EOFError):
        ExFAT(f)
    from vdgui.vd import Disk, OpenFlags, open_volume
    with Disk.open_chain(str(imgs["vhdx"]), None, OpenFlags.READ_ONLY) as disk:
        _, fs = open_volume(disk)
        st = fs._node("/empties")[0].stream
        assert st.flags.not_fragmented and st.data_length > fs.fs.cluster_size
    listed = json.loads(run_cli("ls", "--json", imgs["vhdx"], "/empties").stdout)["entries"]
    assert sorted(e["path"] for e in listed) == [f"/empties/empty_file_{i:03d}"
                                                 for i in range(200)]


def run_cli_bytes(*args) -> bytes:
    return subprocess.run([sys.executable, "-m", "vdgui.cli", *map(str, args)],
                          capture_output=True, cwd=str(ROOT), check=True).stdout


def test_a_looping_cluster_chain_is_an_error_not_a_hang(exfat, tmp_path):
    _src, imgs = exfat
    from vdgui.vd import Disk, OpenFlags, open_volume
    vol = tmp_path / "loop.raw"
    shutil.copyfile(imgs["raw"], vol)
    with Disk.open_chain(str(vol), None, OpenFlags.READ_ONLY) as disk:
        _, fs = open_volume(disk)
        first = fs._node("/many")[0].stream.location
        fat = fs.fs.fat_sector * fs.fs.sector_size
    with open(vol, "r+b") as f:                   # the folder's second cluster leads back
        f.seek(fat + first * 4)
        second = struct.unpack("<I", f.read(4))[0]
        f.seek(fat + second * 4)
        f.write(struct.pack("<I", first))
    r = subprocess.run([sys.executable, "-m", "vdgui.cli", "ls", str(vol), "/many"],
                       capture_output=True, text=True, cwd=str(ROOT), timeout=120)
    assert r.returncode == 1 and "loops" in r.stderr and len(r.stderr.splitlines()) == 1, r
    assert "dir" in run_cli("ls", vol, "/").stdout  # the other folders still read


# -- sparsify (issue #16): the allocation bitmap ------------------------------------------------
def _exfat_over_garbage(folder: Path, src: Path) -> Path:
    vol = folder / "g.raw"
    vol.write_bytes(random.Random(16).randbytes(64 * MiB))
    sh("mkfs.exfat", "-L", "G", vol)
    fill_exfat(vol, src)
    return vol


@pytest.mark.parametrize("fmt", ["qcow2", "vdi", "vhdx", "vmdk"])
def test_sparsify_gives_back_the_free_clusters(exfat, tmp_path, fmt, qemu):
    src, _ = exfat
    vol = _exfat_over_garbage(tmp_path, src)
    img = tmp_path / f"g.{fmt}"
    qemu.img("convert", "-f", "raw", "-O", fmt, vol, img)
    before = img.stat().st_blocks * 512
    rep = json.loads(run_cli("sparsify", "--json", img).stdout)
    (part,) = rep["partitions"]
    assert part["filesystem"] == "exfat" and part["skipped"] is None
    qemu.img("check", img)
    back = tmp_path / "back.raw"
    qemu.img("convert", "-O", "raw", img, back)
    sh("fsck.exfat", "-n", back)
    files = read_exfat(back)
    want = {str(p.relative_to(src)): p.read_bytes() for p in src.rglob("*") if p.is_file()}
    assert files == want
    in_use = part["used"]
    after = img.stat().st_blocks * 512
    assert after <= in_use * 1.1 + 16 * MiB < before, (before, after, in_use)


def test_sparsify_refuses_a_dirty_exfat_volume(exfat, tmp_path):
    _src, imgs = exfat
    vol = tmp_path / "dirty.raw"
    shutil.copyfile(imgs["raw"], vol)
    with open(vol, "r+b") as f:                   # VolumeFlags: VolumeDirty (bit 1)
        f.seek(0x6A)
        flags = struct.unpack("<H", f.read(2))[0]
        f.seek(0x6A)
        f.write(struct.pack("<H", flags | 2))
    sums = hashlib.sha256(vol.read_bytes()).digest()
    r = run_cli("sparsify", vol, check=False)
    assert r.returncode == 2 and "VolumeDirty" in r.stderr and "fsck.exfat" in r.stderr, r
    assert hashlib.sha256(vol.read_bytes()).digest() == sums


def test_changed_lists_exactly_the_files_a_snapshot_touched(exfat, tmp_path, qemu):
    """The snapshot is made as the issue says: the volume changed by exFAT's own driver on a
    copy, then qemu-img convert -B."""
    _src, imgs = exfat
    base = tmp_path / "base.qcow2"
    qemu.img("convert", "-f", "raw", "-O", "qcow2", imgs["raw"], base)
    mod = tmp_path / "mod.raw"
    shutil.copyfile(imgs["raw"], mod)
    with exfat_mounted(mod) as mnt:
        with open(os.path.join(mnt, "hello.txt"), "r+b") as f:       # same size, new bytes
            f.write(b"HELLO")
        with open(os.path.join(mnt, "many", "file_number_004.txt"), "ab") as f:
            f.write(b"more")
        with open(os.path.join(mnt, "new.txt"), "wb") as f:
            f.write(b"new")
        os.unlink(os.path.join(mnt, "dir", "sub", "b.txt"))
    sh("fsck.exfat", "-n", mod)
    child = tmp_path / "child.qcow2"
    qemu.img("convert", "-f", "raw", "-O", "qcow2", "-B", base, "-F", "qcow2", mod, child)
    rep = json.loads(run_cli("changed", "--json", child).stdout)
    assert sorted((c["path"], c["change"]) for c in rep["files"]) == [
        ("/dir/sub/b.txt", "removed"), ("/hello.txt", "modified"),
        ("/many/file_number_004.txt", "modified"), ("/new.txt", "added")]
