"""Writing a volume's file or folder tree to the host (vd.extract_tree, shared by the CLI's
extract and the GUI's extract job): names checked first, the tree built in a temporary folder
and renamed, so a cancel or failure leaves nothing."""
from __future__ import annotations

import os

import pytest

import vdgui.vd as vd
from tests.inside.conftest import MiB, make_tree, sh
from vdgui.vd.inside.filesystems import Entry, FileSystem


@pytest.fixture(scope="module")
def ext4(tmp_path_factory):
    d = tmp_path_factory.mktemp("ext")
    src = d / "src"
    files = make_tree(src)
    (src / "dir" / "big.bin").write_bytes(os.urandom(3 * MiB))
    files["dir/big.bin"] = (src / "dir" / "big.bin").read_bytes()
    (src / "link").symlink_to("hello.txt")
    os.utime(src / "dir", (1_500_000_000, 1_500_000_000))
    img = d / "ext4.img"
    sh("mkfs.ext4", "-q", "-d", src, img, "16M")
    return img, files


def _fs(img):
    d = vd.Disk.open_chain(str(img), "raw", flags=vd.OpenFlags.READ_ONLY)
    return d, vd.open_volume(d)[1]


def test_tree_links_times_and_progress(ext4, tmp_path):
    img, files = ext4
    d, fs = _fs(img)
    calls = []
    with d:
        made = vd.extract_tree(fs, "/", str(tmp_path), lambda n, t: calls.append((n, t)),
                               into=True)
    assert made == str(tmp_path / "root")
    for rel, data in files.items():
        assert (tmp_path / "root" / rel).read_bytes() == data
    assert os.readlink(tmp_path / "root" / "link") == "hello.txt"
    assert int(os.stat(tmp_path / "root" / "dir").st_mtime) == 1_500_000_000
    total = sum(map(len, files.values()))
    assert calls[0] == (0, total) and calls[-1] == (total, total)
    assert [n for n, _ in calls] == sorted(n for n, _ in calls)
    assert sorted(os.listdir(tmp_path)) == ["root"]


def test_cancel_leaves_nothing(ext4, tmp_path):
    img, _ = ext4
    d, fs = _fs(img)
    with d, pytest.raises(vd.Cancelled):
        vd.extract_tree(fs, "/dir", str(tmp_path / "out"), lambda n, t: n < MiB)
    assert os.listdir(tmp_path) == []


def test_cli_failure_midway_leaves_nothing(ext4, tmp_path, monkeypatch, capsys):
    """A read failure after some files were written: the CLI used to leave a partial tree."""
    from vdgui import cli
    img, _ = ext4
    orig = FileSystem.open

    def failing(self, path):
        if path == "/dir/sub/b.txt":
            raise vd.CorruptImage("test: cannot read /dir/sub/b.txt")
        return orig(self, path)

    monkeypatch.setattr(FileSystem, "open", failing)
    assert cli.main(["extract", "-f", "raw", str(img), "/", str(tmp_path / "out")]) == 1
    assert "cannot read /dir/sub/b.txt" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


class _Fake:
    """A volume holding names a real file system could hold but the host must refuse."""

    def __init__(self, names):
        self.entries = [Entry(f"/t/{n}", "file", 1, None) for n in names]

    def stat(self, path):
        return Entry("/t", "dir", 0, None)

    def walk(self, path):
        return iter(self.entries)

    def open(self, path):
        raise AssertionError("nothing may be written before every name is checked")


@pytest.mark.parametrize("bad", ["..\\x", "a/../../x", "x" * 256])
def test_unsafe_names_are_refused_before_writing(tmp_path, bad, monkeypatch):
    if "\\" in bad:
        monkeypatch.setattr(os, "altsep", "\\")       # as on Windows
    with pytest.raises(vd.InvalidArgument, match="refusing to extract"):
        vd.extract_tree(_Fake(["ok.txt", bad]), "/t", str(tmp_path), into=True)
    assert os.listdir(tmp_path) == []
    assert vd.safe_extract_parts("a/b c", "/d") == ["a", "b c"]
