"""A Disk as an io.RawIOBase (issue #15 item 1)."""
from __future__ import annotations

import io
import os
import random

import pytest

from vdgui import vd


@pytest.fixture
def chain(tmp_path, qemu):
    base = tmp_path / "base.qcow2"
    top = tmp_path / "top.qcow2"
    qemu.img("create", "-f", "qcow2", base, "8M")
    qemu.io("-c", "write -P 0x11 0 3M", "-c", "write -P 0x22 5M 1M", base)
    raw = tmp_path / "top.raw"
    qemu.img("convert", "-O", "raw", base, raw)
    with open(raw, "r+b") as f:
        f.seek(2 * 1024 * 1024 + 77)
        f.write(os.urandom(300000))
    qemu.img("convert", "-f", "raw", "-O", "qcow2", "-B", base, "-F", "qcow2", raw, top)
    return base, top, raw.read_bytes(), tmp_path


def test_reads_match_the_chain_and_the_parent(chain):
    _base, top, want, _ = chain
    with vd.Disk.open_chain(str(top), flags=vd.OpenFlags.READ_ONLY) as d:
        f = vd.DiskFile(d, cache_bytes=256 * 1024)
        assert f.readable() and f.seekable() and not f.writable()
        rnd = random.Random(1)
        for _ in range(300):
            off = rnd.randrange(0, len(want) + 100)
            n = rnd.choice([1, 7, 512, 4095, 70000, 200000])
            f.seek(off)
            assert f.read(n) == want[off:off + n]
        f.seek(0)
        assert io.BufferedReader(vd.DiskFile(d)).read() == want
        f.seek(0, io.SEEK_END)
        assert f.read(10) == b""
        f.seek(len(want) - 3)
        assert f.read(10) == want[-3:]
        assert f.seek(-5, io.SEEK_END) == len(want) - 5
        parent = vd.DiskFile(d, top=0)
        parent.seek(2 * 1024 * 1024 + 77)
        assert parent.read(4) == b"\x11" * 4     # the base, not the top's random bytes
        parent.seek(0)
        assert parent.read(3) == b"\x11" * 3
        with pytest.raises(vd.ReadOnlyImage):
            f.write(b"x")


def test_write_only_when_opened_for_writing(chain, qemu):
    _, top, want, _tmp = chain
    with vd.Disk.open_chain(str(top)) as d:
        f = vd.DiskFile(d)
        assert f.writable()
        f.seek(100)
        f.read(10)                       # cached, then overwritten: the cache must not lie
        f.seek(100)
        assert f.write(b"ABCDEFGHIJ") == 10
        f.seek(95)
        assert f.read(20) == want[95:100] + b"ABCDEFGHIJ" + want[110:115]
        f.flush()
    out = qemu.io("-r", "-c", "read -v 100 10", top).stdout
    assert "ABCDEFGHIJ" in out
