"""Every vdgui-img command that takes a path, given a relative one (run from the images' folder).

A path named relatively must behave exactly as the absolute one: in particular resize, compact
and check --repair of a single-file image take their safe path (work on a copy, rename it over
the original: the file's inode changes), whatever spelling the image's backend uses for its
files (VMDK reports absolute paths)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.cli.test_cli import inproc
from tests.conftest import ROOT
from vdgui.vd import Disk, OpenFlags

MiB = 1 << 20


@pytest.fixture
def folder(tmp_path, monkeypatch, qemu):
    """base.vmdk (2 MiB of 0xaa) <- c.vmdk (1 MiB, made by qemu-img); mono.vmdk with a leaked
    tail; cwd is the folder."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "aa").write_bytes(b"\xaa" * 2 * MiB)
    inproc("create", "-f", "VMDK", "--size", "2M", "base.vmdk")
    inproc("write", "base.vmdk", "--offset", "0", "--input", "aa")
    qemu.img("create", "-q", "-f", "vmdk", "-b", "base.vmdk", "-F", "vmdk", "c.vmdk", "1M")
    (tmp_path / "aa1").write_bytes(b"\xaa" * MiB)
    inproc("create", "-f", "VMDK", "--size", "2M", "mono.vmdk")
    inproc("write", "mono.vmdk", "--offset", "0", "--input", "aa1")
    return tmp_path


def _ino(p):
    return os.stat(p).st_ino


def _read(path, off, n):
    with Disk.open_chain(str(path), None, OpenFlags.READ_ONLY) as d:
        return d.read(off, n)


def _resize(folder, qemu):
    before = _ino("c.vmdk")
    inproc("resize", "c.vmdk", "2M")
    assert _ino("c.vmdk") != before, "a single-file image is resized in a copy"
    assert _read(folder / "c.vmdk", MiB, MiB) == bytes(MiB)
    r = qemu.io("-r", "-c", "read -P 0 1M 1M", "c.vmdk")
    assert "Pattern verification failed" not in r.stdout, r.stdout


def _compact(folder, qemu):
    before = _ino("mono.vmdk")
    inproc("compact", "mono.vmdk")
    assert _ino("mono.vmdk") != before, "a single-file image is compacted in a copy"
    assert _read(folder / "mono.vmdk", 0, MiB) == b"\xaa" * MiB


def _repair(folder, qemu):
    with open("mono.vmdk", "ab") as f:        # a grain written but never linked (a crash)
        f.write(b"\x33" * 65536)
    assert inproc("check", "mono.vmdk", check=False).returncode == 3
    before = _ino("mono.vmdk")
    inproc("check", "--repair", "mono.vmdk")
    assert _ino("mono.vmdk") != before, "a single-file image is repaired in a copy"
    assert inproc("check", "mono.vmdk").returncode == 0
    assert qemu.check("mono.vmdk").returncode == 0


def _info(folder, qemu):
    data = json.loads(inproc("info", "--json", "--chain", "c.vmdk").stdout)
    assert len(data["chain"]) == 2


def _create_parent(folder, qemu):
    inproc("create", "-f", "VMDK", "--parent", "base.vmdk", "kid.vmdk")
    assert _read(folder / "kid.vmdk", 0, 16) == b"\xaa" * 16
    qemu.img("info", "--backing-chain", "kid.vmdk")


def _convert_compare(folder, qemu):
    inproc("convert", "-O", "VDI", "c.vmdk", "out.vdi")
    assert inproc("compare", "c.vmdk", "out.vdi").returncode == 0
    assert qemu.compare("c.vmdk", "out.vdi").returncode == 0


def _merge(folder, qemu):
    inproc("merge", "c.vmdk", "base.vmdk")
    assert not os.path.exists("c.vmdk")
    assert _read(folder / "base.vmdk", 0, 16) == b"\xaa" * 16


def _map_read_write_set(folder, qemu):
    (folder / "five").write_bytes(b"\x55" * 4096)
    inproc("write", "c.vmdk", "--offset", "4096", "--input", "five")
    inproc("read", "c.vmdk", "--offset", "0", "--length", "8192", "--output", "got")
    assert (folder / "got").read_bytes() == b"\xaa" * 4096 + b"\x55" * 4096
    runs = json.loads(inproc("map", "--json", "c.vmdk").stdout)
    assert runs
    u = "12345678-1234-5678-1234-567812345678"
    inproc("set", "mono.vmdk", "--uuid", u)
    assert json.loads(inproc("info", "--json", "mono.vmdk").stdout)["uuid"] == u


CASES = {f.__name__.lstrip("_"): f for f in (
    _resize, _compact, _repair, _info, _create_parent, _convert_compare, _merge,
    _map_read_write_set)}


@pytest.mark.parametrize("case", list(CASES))
def test_relative_path(folder, qemu, case):
    CASES[case](folder, qemu)


def test_relative_path_in_a_subprocess(folder, qemu):
    """The same through a real process started in the folder (the resize case of issue #12)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "vdgui.cli", "resize", "c.vmdk", "2M"],
                       cwd=str(folder), capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    r = qemu.io("-r", "-c", "read -P 0 1M 1M", str(folder / "c.vmdk"))
    assert "Pattern verification failed" not in r.stdout, r.stdout
