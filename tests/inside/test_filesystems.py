"""File systems inside a disk through the CLI (issue #15 items 3 and the ls/cat/extract
contract): ext4, FAT, NTFS, ISO9660 built with their own tools, in several formats and chains;
compared with the source folders and with debugfs / mtools / ntfs-3g."""
from __future__ import annotations

import hashlib
import json
import os

import pytest

from tests.conftest import run_cli
from tests.inside.conftest import MiB, make_tree, sh


def _tree_of(folder) -> dict:
    out = {}
    for dirpath, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out["/" + os.path.relpath(p, folder)] = fh.read()
    return out


def _ls(img, spec="/", *extra):
    return json.loads(run_cli("ls", "--json", "-R", *extra, img, spec).stdout)["entries"]


def _files(img, spec_prefix="", *extra):
    return {e["path"]: e for e in _ls(img, spec_prefix + "/", *extra) if e["type"] == "file"}


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    d = tmp_path_factory.mktemp("vols")
    src = d / "src"
    files = make_tree(src)
    (src / "link").symlink_to("hello.txt")
    vols = {}
    vols["ext4"] = d / "ext4.img"
    sh("mkfs.ext4", "-q", "-L", "E", "-d", src, vols["ext4"], "16M")
    vols["fat"] = d / "fat.img"
    sh("mkfs.fat", "-C", "-n", "F", vols["fat"], 16384)
    env_files = [str(src / "hello.txt"), str(src / "dir"), str(src / "empty")]
    sh("mcopy", "-s", "-m", "-i", vols["fat"], *env_files, "::/")
    vols["ntfs"] = d / "ntfs.img"
    with open(vols["ntfs"], "wb") as f:
        f.truncate(16 * MiB)
    sh("mkntfs", "-q", "-F", "-f", "-L", "N", vols["ntfs"])
    sh("ntfscp", "-q", vols["ntfs"], src / "hello.txt", "hello.txt")
    sh("ntfscp", "-q", vols["ntfs"], src / "dir" / "a.bin", "a.bin")
    vols["iso"] = d / "x.iso"
    sh("genisoimage", "-quiet", "-J", "-R", "-V", "CD", "-o", vols["iso"], src)
    return src, files, vols


@pytest.mark.parametrize("kind", ["ext4", "fat", "iso"])
def test_listing_and_content_match_the_source(volumes, kind):
    _src, files, vols = volumes
    got = _files(vols[kind], "", "-f", "raw")
    assert sorted(got) == sorted("/" + k for k in files)
    for path, e in got.items():
        assert e["size"] == len(files[path[1:]])
        out = run_cli_bytes("cat", "-f", "raw", vols[kind], path)
        assert out == files[path[1:]]
    if kind != "fat":
        (link,) = [e for e in _ls(vols[kind], "/", "-f", "raw") if e["path"] == "/link"]
        assert link["type"] == "symlink" and link["target"] == "hello.txt"


def run_cli_bytes(*args) -> bytes:
    import subprocess
    import sys

    from tests.conftest import ROOT
    r = subprocess.run([sys.executable, "-m", "vdgui.cli", *map(str, args)], capture_output=True,
                       cwd=str(ROOT))
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_against_the_file_systems_own_tools(volumes):
    _, _, vols = volumes
    dbg = sh("debugfs", "-R", "ls -p /dir", vols["ext4"])
    names = {line.split("/")[5] for line in dbg.splitlines() if line.count("/") >= 6}
    assert {e["path"].rsplit("/", 1)[1] for e in _ls(vols["ext4"], "/dir", "-f", "raw")
            if "/" not in e["path"][5:]} == names - {".", ".."}
    mdir = sh("mdir", "-b", "-i", vols["fat"], "::/dir")
    assert {ln.rstrip("/").rsplit("/", 1)[1] for ln in mdir.split()} == \
        {e["path"].rsplit("/", 1)[1] for e in _ls(vols["fat"], "/dir", "-f", "raw")
         if e["path"].count("/") == 2}
    assert run_cli_bytes("cat", "-f", "raw", vols["ntfs"], "/a.bin") == \
        sh_bytes("ntfscat", vols["ntfs"], "a.bin")
    assert {e["path"] for e in _ls(vols["ntfs"], "/", "-f", "raw")} == {"/a.bin", "/hello.txt"}


def sh_bytes(*args) -> bytes:
    import subprocess

    from tests.inside.conftest import tool
    return subprocess.run([tool(args[0]), *map(str, args[1:])], capture_output=True,
                          check=True).stdout


@pytest.mark.parametrize("fmt", ["vdi", "vmdk", "vhdx", "qcow2"])
def test_partitioned_disk_in_every_format(mbr_disk, tmp_path, qemu, fmt):
    out = tmp_path / f"d.{fmt}"
    qemu.img("convert", "-f", "raw", "-O", fmt, mbr_disk, out)
    files = make_tree(tmp_path / "want")
    got = _files(out, "1:")
    assert sorted(got) == sorted("/" + k for k in files)
    assert run_cli_bytes("cat", out, "1:/dir/a.bin") == files["dir/a.bin"]
    assert _files(out, "5:") == {}
    r = run_cli("ls", out, "/", check=False)
    assert r.returncode == 1 and "name one as N:PATH" in r.stderr


def test_chain_members_and_extract(tmp_path, qemu):
    src = tmp_path / "src"
    make_tree(src)
    raw = tmp_path / "base.raw"
    sh("mkfs.ext4", "-q", "-d", src, raw, "16M")
    base = tmp_path / "base.vhdx"
    qemu.img("convert", "-f", "raw", "-O", "vhdx", raw, base)
    sh("debugfs", "-w", "-R", "rm /hello.txt", raw)
    (tmp_path / "new.txt").write_bytes(b"new file\n")
    sh("debugfs", "-w", "-R", f"write {tmp_path / 'new.txt'} /new.txt", raw)
    top = tmp_path / "top.qcow2"
    qemu.img("convert", "-f", "raw", "-O", "qcow2", "-B", base, "-F", "vhdx", raw, top)
    now = set(_files(top))
    then = set(_files(top, "", "--top", "0"))
    assert now - then == {"/new.txt"} and then - now == {"/hello.txt"}
    assert set(_files(top, "", "--top", str(base))) == then
    dest = tmp_path / "out"
    dest.mkdir()
    run_cli("extract", top, "/", dest)
    got = _tree_of(dest / "root")
    want = {k: v for k, v in _tree_of(src).items() if k != "/hello.txt"}
    want["/new.txt"] = b"new file\n"
    assert got == want
    st = os.stat(dest / "root" / "dir" / "a.bin")
    assert int(st.st_mtime) == int(os.stat(src / "dir" / "a.bin").st_mtime)
    run_cli("extract", top, "/dir/a.bin", tmp_path / "single.bin")
    assert hashlib.sha256((tmp_path / "single.bin").read_bytes()).digest() == \
        hashlib.sha256(want["/dir/a.bin"]).digest()
    r = run_cli("extract", top, "/dir/a.bin", tmp_path / "single.bin", check=False)
    assert r.returncode == 1 and "already exists" in r.stderr


def test_unsafe_names_are_refused():
    from vdgui.vd import InvalidArgument, safe_extract_parts
    for bad in ("../x", "a/../../x", "a/./b", "a\0b", "x" * 256):
        with pytest.raises(InvalidArgument, match="refusing"):
            safe_extract_parts(bad, "/dest")
    assert safe_extract_parts("a/b c/d", "/dest") == ["a", "b c", "d"]


def test_damaged_file_system_is_one_line_error(tmp_path, volumes):
    _, _, vols = volumes
    bad = tmp_path / "bad.img"
    data = bytearray(vols["ext4"].read_bytes())
    data[1024 + 4:1024 + 8] = b"\xff\xff\xff\x7f"        # s_blocks_count: far too many
    data[1024 + 40:1024 + 44] = b"\0\0\0\0"              # s_inodes_per_group = 0
    bad.write_bytes(bytes(data))
    r = run_cli("ls", "-R", "-f", "raw", bad, "/", check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "ext" in r.stderr
    r = run_cli("cat", "-f", "raw", vols["ext4"], "/nope", check=False)
    assert r.returncode == 1 and "no such file" in r.stderr


def test_fat_chain_stepping_backwards(tmp_path):
    """dissect.fat 3.13 merges cluster X-1 after X into one run and reads X, X+1 instead: a
    fragmented file whose chain steps back must read as mtools reads it."""
    import struct
    img = tmp_path / "fr.img"
    sh("mkfs.fat", "-C", "-F", "16", "-s", "1", "-n", "FR", img, 8192)
    src = tmp_path / "ab.bin"
    src.write_bytes(b"A" * 512 + b"B" * 512 + b"C" * 512)
    sh("mcopy", "-i", img, src, "::/AB.BIN")
    assert sh("mshowfat", "-i", img, "::/AB.BIN").split()[-1] == "<2-4>"
    data = bytearray(img.read_bytes())
    bps, reserved, nfats = struct.unpack_from("<H", data, 11)[0], \
        struct.unpack_from("<H", data, 14)[0], data[16]
    fatsz = struct.unpack_from("<H", data, 22)[0]
    for k in range(nfats):       # chain 4 -> 3 -> 2 (mtools, the oracle, reads C, B, A)
        fat = (reserved + k * fatsz) * bps
        struct.pack_into("<HHH", data, fat + 4, 0xFFFF, 2, 3)
    root = (reserved + nfats * fatsz) * bps
    i = data.index(b"AB      BIN", root)
    struct.pack_into("<H", data, i + 26, 4)
    img.write_bytes(bytes(data))
    want = sh_bytes("mtype", "-i", img, "::/AB.BIN")
    assert want == b"C" * 512 + b"B" * 512 + b"A" * 512
    assert run_cli_bytes("cat", "-f", "raw", img, "/ab.bin") == want


def test_folder_loop_is_a_clear_error(volumes, tmp_path):
    _, _, vols = volumes
    img = tmp_path / "loop.img"
    img.write_bytes(vols["ext4"].read_bytes())
    sh("debugfs", "-w", "-R", "ln /dir /dir/sub/loop", img)     # a hard-linked folder
    for cmd in (("ls", "-R"), ("extract",)):
        args = [*cmd, "-f", "raw", img, "/"] + ([tmp_path / "out"] if cmd[0] == "extract" else [])
        r = run_cli(*args, check=False)
        assert r.returncode == 1 and "Traceback" not in r.stderr
        assert r.stderr.strip() == (f"vdgui-img: {img}: ext volume: folder /dir/sub/loop "
                                    "contains itself (a loop in the file system)")
