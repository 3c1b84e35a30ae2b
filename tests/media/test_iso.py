"""Issue #19 part 4: ISO9660 images with Joliet and Rock Ridge from host files (create_iso,
vdgui-img create-iso), checked by isoinfo (genisoimage) and our own reader (vdgui-img ls/cat)."""
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
    Cancelled,
    Disk,
    FileExists,
    InvalidArgument,
    OpenFlags,
    VDIOError,
    create_iso,
    folder_contents,
    open_volume,
)
from vdgui.vd.media import iso as iso_mod

TREE = {
    "README.TXT": b"plain\n",
    "hello world.txt": b"hello world\n",
    "Ünïcödé ☃ name.txt": b"snow\n",
    "n" * 120 + ".txt": b"long name\n",
    "same-start-of-a-very-long-name-1.txt": b"1",
    "same-start-of-a-very-long-name-2.txt": b"2",
    "empty": b"",
    "big/data.bin": os.urandom(3 << 20),
    "a/b/c/d/e/f/g/h/i/deep.txt": b"nine folders deep\n",
}


OLD = 1551675968                       # 2019-03-04 05:06:08 UTC: sources' mtimes are kept


def make_tree(root) -> dict:
    for rel, data in TREE.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    (root / "hello world.txt").chmod(0o640)
    for rel in ("hello world.txt", "a/b/c/d/e/f/g/h/i/deep.txt", "a/b/c/d/e/f/g/h"):
        os.utime(root / rel, (OLD, OLD))
    (root / "link").symlink_to("hello world.txt")
    return TREE


def isoinfo(*args) -> str:
    return sh("isoinfo", *args)


def joliet_names(img) -> set[str]:
    """The Joliet paths; isoinfo prints them in ISO 8859-1 (other characters as '_')."""
    r = subprocess.run(["isoinfo", "-J", "-f", "-i", str(img)], capture_output=True, check=True)
    return set(r.stdout.decode("latin-1").splitlines())


def extract(img, path, *opts) -> bytes:
    r = subprocess.run(["isoinfo", "-i", str(img), *opts, "-x", path], capture_output=True,
                       check=True)
    return r.stdout


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    d = tmp_path_factory.mktemp("iso")
    files = make_tree(d / "src")
    img = d / "disc.iso"
    seen = []
    create_iso(str(img), folder_contents(str(d / "src")), label="My Disc 1",
               progress=lambda done, total: seen.append((done, total)))
    return img, files, seen


def test_progress_and_volume(made):
    img, _, seen = made
    assert seen[0][0] == 0 and seen[-1][0] == seen[-1][1] == img.stat().st_size
    assert all(a[0] <= b[0] for a, b in itertools.pairwise(seen))
    desc = isoinfo("-d", "-i", img)
    assert "Volume id: MY_DISC_1" in desc
    assert "Joliet with UCS level 3 found" in desc
    assert "Rock Ridge signatures version 1 found" in desc


def test_rock_ridge_names_modes_links(made):
    img, files, _ = made
    listing = isoinfo("-R", "-l", "-i", img)
    for rel in files:
        assert rel.rsplit("/", 1)[-1] in listing, rel
    assert "link -> hello world.txt" in listing
    line = next(ln for ln in listing.splitlines() if ln.endswith("hello world.txt "))
    assert line.startswith("-rw-r-----") and " 2019 " in line, line
    joliet = subprocess.run(["isoinfo", "-J", "-l", "-i", str(img)], capture_output=True,
                            check=True).stdout.decode("latin-1")
    jline = next(ln for ln in joliet.splitlines() if ln.endswith("hello world.txt "))
    assert " 2019 " in jline, jline
    for rel, data in files.items():
        # isoinfo -R -x cannot follow Rock Ridge relocations (nor for genisoimage's images)
        opt = "-J" if rel.count("/") >= 7 else "-R"
        assert sha(extract(img, "/" + rel, opt)) == sha(data), rel


def test_joliet_names(made):
    img, files, _ = made
    names = joliet_names(img)
    for rel in files:
        if len(rel.rsplit("/", 1)[-1]) <= 64:
            latin = "".join(c if ord(c) < 256 else "_" for c in rel)
            assert "/" + latin in names, rel
    long = [n for n in names if n.startswith("/nnnn")]
    assert len(long) == 1 and len(long[0]) - 1 <= 64 and long[0].endswith(".txt")
    assert extract(img, "/hello world.txt", "-J") == files["hello world.txt"]


def test_iso9660_names_are_unique_d_characters(made):
    img, _, _ = made
    names = isoinfo("-f", "-i", img).splitlines()
    assert len(names) == len(set(names))
    for n in names:
        leaf = n.rsplit("/", 1)[-1].split(";")[0]
        assert len(leaf) <= 31 and set(leaf) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_."), n


def test_our_reader_sees_every_file(made):
    img, files, _ = made
    entries = json.loads(run_cli("ls", "-R", "--json", img).stdout)["entries"]
    got = {e["path"]: e for e in entries}
    for rel, data in files.items():
        assert got["/" + rel]["size"] == len(data), rel
    with Disk.open_chain(str(img), flags=OpenFlags.READ_ONLY) as d:
        _, fs = open_volume(d, None)
        for rel, data in files.items():
            with fs.open("/" + rel) as f:
                assert sha(f.read()) == sha(data), rel
    for rel in ("hello world.txt", "a/b/c/d/e/f/g/h/i/deep.txt", "a/b/c/d/e/f/g/h"):
        assert got["/" + rel]["mtime"] == OLD, rel
    cat = subprocess.run([sys.executable, "-m", "vdgui.cli", "cat", str(img), "/big/data.bin"],
                         capture_output=True, check=True)
    assert sha(cat.stdout) == sha(files["big/data.bin"])


def test_files_are_streamed_not_held(tmp_path, monkeypatch):
    """Each source is opened only while it is copied, read in pieces, and closed after."""
    src = tmp_path / "s"
    src.mkdir()
    for i in range(5):
        (src / f"f{i}.bin").write_bytes(bytes([i]) * (200 << 10))
    (src / "big.bin").write_bytes(b"\xbb" * (3 << 20))
    reads, open_now, most_open = [], [0], [0]
    real_open = iso_mod.open_source

    def counting_open(s):
        f = real_open(s)
        open_now[0] += 1
        most_open[0] = max(most_open[0], open_now[0])
        real_read, real_close = f.read, f.close

        def read(n=-1):
            data = real_read(n)
            reads.append(len(data))
            return data

        def close():
            open_now[0] -= 1
            real_close()
        return _Wrap(read, close, f)
    monkeypatch.setattr(iso_mod, "open_source", counting_open)
    create_iso(str(tmp_path / "o.iso"), folder_contents(str(src)))
    assert most_open[0] == 1 and open_now[0] == 0
    assert max(reads) <= iso_mod.COPY_PIECE and sum(reads) == 5 * (200 << 10) + (3 << 20)
    assert len(reads) >= 5 + 3                       # the 3 MiB file in pieces


class _Wrap:
    def __init__(self, read, close, f):
        self.read, self.close, self.seek = read, close, f.seek


def test_refusals_and_cancel_leave_nothing(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"a" * (1 << 20))
    out = tmp_path / "o.iso"
    with pytest.raises(Cancelled):
        create_iso(str(out), [str(tmp_path / "a.bin")], progress=lambda d, t: False if d else None)
    with pytest.raises(InvalidArgument, match="longer than 32"):
        create_iso(str(out), [], label="x" * 33)
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(InvalidArgument, match="not a regular file or folder"):
        create_iso(str(out), [str(tmp_path / "fifo")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "fifo"]
    out.write_bytes(b"mine")
    with pytest.raises(FileExists):
        create_iso(str(out), [])
    assert out.read_bytes() == b"mine"


def test_cli_create_iso(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "x.txt").write_bytes(b"x\n")
    (tmp_path / "extra file.txt").write_bytes(b"extra\n")
    img = tmp_path / "cli.iso"
    run_cli("create-iso", "--label", "cli", "--from", src, "--add", tmp_path / "extra file.txt",
            img)
    assert "Volume id: CLI" in isoinfo("-d", "-i", img)
    assert joliet_names(img) == {
        "/sub", "/sub/x.txt", "/extra file.txt"}
    r = run_cli("create-iso", "--from", tmp_path / "nowhere", tmp_path / "n.iso", check=False)
    assert r.returncode == 1 and "not a folder" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_file_of_4_gib_and_more(tmp_path):
    """Interchange level 3: a file past 4 GiB is stored as two extents; isoinfo and our reader
    see all of it (our reader used to report only the first extent's size)."""
    src = tmp_path / "src"
    src.mkdir()
    size = (4 << 30) + 4096
    with open(src / "huge.bin", "wb") as f:          # sparse, with a mark at its end
        f.truncate(size)
        f.seek(size - 4096)
        f.write(b"TAIL")
    img = tmp_path / "h.iso"
    create_iso(str(img), [str(src / "huge.bin")])
    records = [ln for ln in isoinfo("-R", "-l", "-i", img).splitlines()
               if ln.endswith("huge.bin ")]
    assert len(records) == 2 and sum(int(ln.split()[4]) for ln in records) == size
    entries = json.loads(run_cli("ls", "--json", img).stdout)["entries"]
    assert entries == [{"path": "/huge.bin", "type": "file", "size": size,
                        "mtime": entries[0]["mtime"]}]
    with Disk.open_chain(str(img), flags=OpenFlags.READ_ONLY) as d:
        _, fs = open_volume(d, None)
        buf, total, tail = bytearray(1 << 20), 0, b""
        with fs.open("/huge.bin") as f:              # a stream: read through to its end
            while n := f.readinto(buf):
                total += n
                tail = (tail + bytes(buf[:n]))[-4096:]
        assert total == size and tail == b"TAIL" + bytes(4092)


def test_a_file_that_shrinks_while_copied(tmp_path, monkeypatch):
    import io
    src = tmp_path / "a.bin"
    src.write_bytes(b"a" * 5000)
    monkeypatch.setattr(iso_mod, "open_source", lambda s: io.BytesIO(b"a" * 100))
    with pytest.raises(VDIOError, match=r"a.bin: the file became shorter .*5000 bytes, found 100"):
        create_iso(str(tmp_path / "o.iso"), [str(src)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]


def test_layout_is_computed_once_not_per_file(tmp_path, monkeypatch):
    """pycdlib lays the whole image out again on a lookup after an add: dating records while
    adding made 10 000 files take 4 minutes (each lookup O(files)); now the dates are set after
    every add (10 000 files: 3 s)."""
    import pycdlib
    src = tmp_path / "s"
    src.mkdir()
    for i in range(60):
        (src / f"file {i}.txt").write_bytes(b"x")
    calls = []
    real = pycdlib.PyCdlib._reshuffle_extents

    def counting(self, *a, **kw):
        calls.append(1)
        return real(self, *a, **kw)
    monkeypatch.setattr(pycdlib.PyCdlib, "_reshuffle_extents", counting)
    create_iso(str(tmp_path / "o.iso"), folder_contents(str(src)))
    assert len(calls) <= 2, len(calls)
