"""Issue #19 part 3: formatted FAT12 floppies (create_floppy, vdgui-img create-floppy), checked
by dosfstools (fsck.fat), mtools (minfo, mdir, mtype) and our own reader (vdgui-img ls/cat)."""
from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import run_cli, sha
from tests.inside.conftest import sh
from vdgui.vd import (
    FLOPPY_FORMATS,
    Cancelled,
    Disk,
    FileExists,
    InvalidArgument,
    OpenFlags,
    VDIOError,
    create_floppy,
    open_volume,
)
from vdgui.vd.media import fat_layout as L
from vdgui.vd.media.floppy import boot_sector, floppy_format

TREE = {
    "README.TXT": b"plain 8.3 name\n",
    "hello.txt": b"hello world\n",
    "A rather long file name, with spaces.text": bytes(range(256)) * 9,
    "Ünïcödé ☃.txt": b"snow\n",
    ".hidden": b"dot file\n",
    "empty": b"",
    "docs/Nested Folder/deep file.bin": bytes(7000),
    "docs/x.bin": b"x" * 513,
}


def make_tree(root) -> dict:
    for rel, data in TREE.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return TREE


def mtype(img, rel) -> bytes:
    r = subprocess.run(["mtype", "-i", str(img), f"::/{rel}"], capture_output=True, check=True)
    return r.stdout


def fsck(path) -> str:
    out = sh("fsck.fat", "-n", "-v", path)
    assert "Performing changes" not in out and "differ" not in out, out
    return out


@pytest.mark.parametrize("name", list(FLOPPY_FORMATS))
def test_blank_floppies_are_standard(tmp_path, name):
    """Each size is the layout DOS makes: fsck.fat finds nothing and minfo reads the geometry."""
    fmt = FLOPPY_FORMATS[name]
    path = tmp_path / f"{name}.img"
    create_floppy(str(path), name, label="blank")
    assert path.stat().st_size == fmt.size
    fsck(path)
    info = sh("minfo", "-i", path, "::")
    assert f"sectors per track: {fmt.sectors_per_track}" in info
    assert f"heads: {fmt.heads}" in info
    assert f"media descriptor byte: 0x{fmt.media:x}" in info
    assert f"max available root directory slots: {fmt.root_entries}" in info
    assert 'label="BLANK      "' in info
    # mtools' own geometry check passes (the tests' conftest skips it for mkfs.fat images)
    env = {k: v for k, v in os.environ.items() if k != "MTOOLS_SKIP_CHECK"}
    listing = subprocess.run(["mdir", "-i", str(path), "::"], capture_output=True, text=True,
                             env=env, check=True).stdout
    assert "Volume in drive : is BLANK" in listing
    free = f"{fmt.clusters * fmt.cluster_bytes:,}".replace(",", " ")
    assert f"{free} bytes free" in listing


def test_filled_floppy_reads_back_everywhere(tmp_path):
    src = tmp_path / "src"
    files = make_tree(src)
    img = tmp_path / "f.img"
    seen = []
    create_floppy(str(img), "1.44M", label="My Files", sources=sorted(
        str(p) for p in src.iterdir()), progress=lambda d, t: seen.append((d, t)))
    assert seen[0][0] == 0 and seen[-1][0] == seen[-1][1] > 0
    assert all(a[0] <= b[0] for a, b in itertools.pairwise(seen))
    fsck(img)
    listed = set(sh("mdir", "-/", "-b", "-i", img, "::").splitlines())
    assert {f"::/{rel}" for rel in files} <= listed, listed
    short = sh("mdir", "-i", img, "::")
    assert "README   TXT" in short          # a plain 8.3 name keeps itself, no tail
    assert "HELLO    TXT" in short          # lower case: same short name, long name for case
    for rel, data in files.items():
        assert mtype(img, rel) == data, rel
    # our own reader: vdgui-img ls and cat, and the engine's volume
    listed_json = {e["path"]: e for e in
                   json.loads(run_cli("ls", "-R", "--json", img).stdout)["entries"]}
    for rel, data in files.items():
        assert listed_json["/" + rel]["size"] == len(data)
    cat = subprocess.run([sys.executable, "-m", "vdgui.cli", "cat", str(img),
                          "/A rather long file name, with spaces.text"], capture_output=True)
    assert sha(cat.stdout) == sha(files["A rather long file name, with spaces.text"])
    with Disk.open_chain(str(img), flags=OpenFlags.READ_ONLY) as d:
        _, fs = open_volume(d, None)
        for rel, data in files.items():
            with fs.open("/" + rel) as f:
                assert f.read() == data, rel
    assert "MY FILES" in run_cli("partitions", img).stdout


def test_lfn_entries_and_short_names(tmp_path):
    """The long-name entries carry the checksum of their short name and the order bits."""
    src = tmp_path / "s"
    src.mkdir()
    for n in ("Long Name Number One.txt", "Long Name Number Two.txt"):
        (src / n).write_bytes(b"1")
    img = tmp_path / "f.img"
    create_floppy(str(img), "720K", sources=sorted(str(p) for p in src.iterdir()))
    fmt = floppy_format("720K")
    raw = img.read_bytes()
    root = (1 + 2 * fmt.sectors_per_fat) * 512
    entries = [raw[root + i * 32: root + (i + 1) * 32] for i in range(8)]
    lfn = [L.LfnEntry.parse(e) for e in entries[:2]]
    short = L.DirEntry.parse(entries[2])
    assert lfn[0].order == 0x42 and lfn[1].order == 0x01
    assert short.name == b"LONGNA~1TXT"
    csum = 0
    for b in short.name:
        csum = (((csum & 1) << 7) + (csum >> 1) + b) & 0xFF
    assert lfn[0].checksum == lfn[1].checksum == csum
    assert L.DirEntry.parse(entries[5]).name == b"LONGNA~2TXT"
    fsck(img)


def test_structs_round_trip():
    sector = boot_sector(floppy_format("1.44M"), b"LABEL      ", 0x12345678)
    head = sector[:L.BOOT_CODE_OFFSET]
    assert L.BootSector.build(L.BootSector.parse(head)) == head
    assert sector[510:] == b"\x55\xaa"
    entry = bytes(range(32))
    assert L.DirEntry.build(L.DirEntry.parse(entry)) == entry
    lfn = bytes([0x41]) + bytes(10) + b"\x0f\x00\x99" + bytes(12) + b"\0\0" + bytes(4)
    assert L.LfnEntry.build(L.LfnEntry.parse(lfn)) == lfn


@pytest.mark.parametrize("text,name", [("1.44M", "1.44M"), ("1440K", "1.44M"), ("720k", "720K"),
                                       ("2.88MB", "2.88M"), ("1474560", "1.44M"),
                                       ("2880KiB", "2.88M")])
def test_size_names(text, name):
    assert floppy_format(text).name == name


def test_refusals_leave_nothing(tmp_path):
    big = tmp_path / "big.bin"
    big.write_bytes(b"\1" * (1500 << 10))
    out = tmp_path / "f.img"
    with pytest.raises(InvalidArgument, match="do not fit on a 1.44M floppy"):
        create_floppy(str(out), sources=[str(big)])
    with pytest.raises(InvalidArgument, match="unknown floppy size"):
        create_floppy(str(out), "3M")
    with pytest.raises(InvalidArgument, match="volume label"):
        create_floppy(str(out), label="far too long a label")
    with pytest.raises(InvalidArgument, match="volume label"):
        create_floppy(str(out), label="a*b")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "what?.txt").write_bytes(b"")
    with pytest.raises(InvalidArgument, match="FAT names cannot contain '\\?'"):
        create_floppy(str(out), sources=[str(bad / "what?.txt")])
    case = tmp_path / "case"
    case.mkdir()
    (case / "A.txt").write_bytes(b"")
    (case / "a.TXT").write_bytes(b"")
    with pytest.raises(InvalidArgument, match="differ only in case"):
        create_floppy(str(out), sources=[str(case)])
    (tmp_path / "link").symlink_to(big)
    with pytest.raises(InvalidArgument, match="symbolic link"):
        create_floppy(str(out), sources=[str(tmp_path / "link")])
    many = tmp_path / "many"
    many.mkdir()
    for i in range(120):
        (many / f"a long name {i}.txt").write_bytes(b"")
    with pytest.raises(InvalidArgument, match="too many items at the root"):
        create_floppy(str(out), sources=sorted(str(p) for p in many.iterdir()))
    create_floppy(str(out), sources=[str(many)])          # in a folder they fit
    fsck(out)
    with pytest.raises(FileExists):
        create_floppy(str(out))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "bad", "big.bin", "case", "f.img", "link", "many"]


def test_cancel_leaves_nothing(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"a" * 300_000)
    with pytest.raises(Cancelled):
        create_floppy(str(tmp_path / "f.img"), sources=[str(tmp_path / "a.bin")],
                      progress=lambda d, t: False if d else None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]


def test_cli_create_floppy(tmp_path):
    src = tmp_path / "src"
    files = make_tree(src)
    img = tmp_path / "cli.img"
    run_cli("create-floppy", "--size", "2.88M", "--label", "cli test", "--from", src, img)
    fsck(img)
    assert img.stat().st_size == 2880 * 1024
    assert "CLI TEST" in sh("mlabel", "-s", "-i", img, "::")
    out = json.loads(run_cli("ls", "-R", "--json", img).stdout)["entries"]
    assert {e["path"] for e in out if e["type"] == "file"} == {"/" + r for r in files}
    r = run_cli("create-floppy", img, check=False)
    assert r.returncode == 1 and "already exists" in r.stderr
    r = run_cli("create-floppy", "--size", "5M", tmp_path / "x.img", check=False)
    assert r.returncode == 1 and "unknown floppy size" in r.stderr and "Traceback" not in r.stderr


def test_exactly_full_and_one_byte_more(tmp_path):
    fmt = floppy_format("720K")
    room = fmt.clusters * fmt.cluster_bytes
    full = tmp_path / "full.bin"
    full.write_bytes(b"\x5a" * room)
    create_floppy(str(tmp_path / "f.img"), "720K", sources=[str(full)])
    fsck(tmp_path / "f.img")
    assert mtype(tmp_path / "f.img", "full.bin") == full.read_bytes()
    assert "0 bytes free" in sh("mdir", "-i", tmp_path / "f.img", "::")
    full.write_bytes(b"\x5a" * (room + 1))
    with pytest.raises(InvalidArgument, match="do not fit"):
        create_floppy(str(tmp_path / "g.img"), "720K", sources=[str(full)])


def test_a_file_that_shrinks_while_copied(tmp_path, monkeypatch):
    """The sizes are planned first; a file found shorter when copied is an error naming it,
    and nothing is left behind."""
    import io

    from vdgui.vd.media import floppy
    src = tmp_path / "a.bin"
    src.write_bytes(b"a" * 5000)
    monkeypatch.setattr(floppy, "open_source", lambda s: io.BytesIO(b"a" * 100))
    with pytest.raises(VDIOError, match=r"a.bin: the file became shorter .*5000 bytes, found 100"):
        create_floppy(str(tmp_path / "f.img"), sources=[str(src)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]
