"""QED against qemu-img/qemu-io, both directions."""
from __future__ import annotations

import os
import random
import struct

import pytest

from tests.conftest import read_all
from vdgui.vd import Disk, OpenFlags, get_backend

pytestmark = pytest.mark.interop

MiB = 1 << 20
SIZE = 8 * MiB


def scattered(size, seed, count=20):
    rnd = random.Random(seed)
    out = []
    for i in range(count):
        ln = rnd.choice([512, 4096, 65536, 70000, 300000])
        off = rnd.randrange(0, size - ln) // 512 * 512
        out.append((off, bytes([(i * 13 + seed) % 255 + 1]) * ln if i % 5 != 4 else bytes(ln)))
    out.append((size - 512, b"\xcd" * 512))
    return out


def raw_of(qemu, path, tmp_path, fmt=None):
    out = tmp_path / "conv.raw"
    qemu.to_raw(path, out, fmt)
    data = out.read_bytes()
    out.unlink()
    return data


def qemu_clean(qemu, path):
    r = qemu.check(path, "qed")
    assert r.returncode == 0 and "No errors were found" in r.stdout, r.stdout + r.stderr


def qemu_sees(qemu, path, expect, tmp_path):
    ref = tmp_path / "expect.raw"
    ref.write_bytes(bytes(expect))
    r = qemu.compare(path, str(ref), "qed", "raw")
    assert r.returncode == 0, r.stdout + r.stderr
    ref.unlink()


def our_writes(path, writes, expect):
    with Disk.open_chain(path) as d:
        for off, data in writes:
            d.write(off, data)
            expect[off:off + len(data)] = data


@pytest.mark.parametrize("opts", ["cluster_size=65536", "cluster_size=4096,table_size=2",
                                  "cluster_size=1M,table_size=16"])
def test_qemu_qed_both_directions(qemu, tmp_path, opts):
    p = str(tmp_path / "q.qed")
    qemu.img("create", "-f", "qed", "-o", opts, p, SIZE)
    qemu.io(
        "-f",
        "qed",
        "-c",
        "write -P 0x11 0 100k",
        "-c",
        "write -P 0x12 1200k 3k",
        "-c",
        "write -z 2M 1M",
        "-c",
        "write -P 0x13 5M 1M",
        "-c",
        f"write -P 0x14 {SIZE - 4096} 4k",
        p,
    )
    expect = bytearray(raw_of(qemu, p, tmp_path))
    with Disk() as d:
        d.open(p, flags=OpenFlags.READ_ONLY)
        assert read_all(d) == bytes(expect)
    our_writes(p, scattered(SIZE, 1), expect)
    qemu_clean(qemu, p)
    qemu_sees(qemu, p, expect, tmp_path)


@pytest.mark.parametrize("base_fmt", ["raw", "qcow2", "qed"])
def test_qemu_qed_with_backing_file(qemu, tmp_path, base_fmt):
    base = str(tmp_path / f"base.{base_fmt}")
    qemu.img("create", "-f", base_fmt, base, SIZE)
    qemu.io("-f", base_fmt, "-c", "write -P 0x21 0 4M", base)
    p = str(tmp_path / "child.qed")
    qemu.img("create", "-f", "qed", "-b", f"base.{base_fmt}", "-F", base_fmt, p)
    qemu.io("-f", "qed", "-c", "write -P 0x22 1M 5k", "-c", "write -z 3M 64k", p)
    with Disk.open_chain(p, flags=OpenFlags.READ_ONLY) as d:
        assert len(d) == 2
        if base_fmt == "raw":
            assert d.top.parent_hint.format == "RAW"
        expect = bytearray(raw_of(qemu, p, tmp_path))
        assert read_all(d) == bytes(expect)
    our_writes(p, scattered(SIZE, 2), expect)
    qemu_clean(qemu, p)
    qemu_sees(qemu, p, expect, tmp_path)


@pytest.mark.parametrize("base_fmt", ["RAW", "QED", "QCOW2"])
def test_our_qed_chain_read_by_qemu(qemu, tmp_path, base_fmt):
    ext = {"RAW": "img", "QED": "qed", "QCOW2": "qcow2"}[base_fmt]
    base = str(tmp_path / f"base.{ext}")
    paths = [base, str(tmp_path / "c1.qed"), str(tmp_path / "c2.qed")]
    expect = bytearray(SIZE)
    with Disk() as d:
        d.create_base(base, SIZE, base_fmt)
        for level, p in enumerate(paths):
            if level:
                d.create_diff(p, "QED")
            for off, data in scattered(SIZE, 10 + level, count=10):
                d.write(off, data)
                expect[off : off + len(data)] = data
    for p in paths[1:]:
        qemu_clean(qemu, p)
    if base_fmt == "RAW":
        assert "backing file format: raw" in qemu.img("info", paths[1]).stdout
    qemu_sees(qemu, paths[2], expect, tmp_path)


def test_our_create_sizes_and_resize(qemu, tmp_path):
    p = str(tmp_path / "r.qed")
    expect = bytearray(SIZE)
    with Disk() as d:
        d.create_base(p, SIZE, "QED", config={"ClusterSize": "4096", "TableSize": "2"})
        for off, data in scattered(SIZE, 7, count=30):
            d.write(off, data)
            expect[off : off + len(data)] = data
        d.top.resize(32 * MiB)
        expect += bytes(24 * MiB)
        d.write(30 * MiB, b"\x77" * 8192)
        expect[30 * MiB : 30 * MiB + 8192] = b"\x77" * 8192
    qemu_clean(qemu, p)
    qemu_sees(qemu, p, expect, tmp_path)
    info = qemu.img("info", "--output=json", p).stdout
    assert '"virtual-size": 33554432' in info and '"cluster-size": 4096' in info


def test_our_relink_seen_by_qemu(qemu, tmp_path):
    a = str(tmp_path / "a.qed")
    b = str(tmp_path / "b.img")
    c = str(tmp_path / "c.qed")
    qemu.img("create", "-f", "qed", a, SIZE)
    qemu.img("create", "-f", "raw", b, SIZE)
    qemu.io("-f", "raw", "-c", "write -P 0x0b 0 1M", b)
    qemu.img("create", "-f", "qed", "-b", "a.qed", "-F", "qed", c)
    img = get_backend("QED").open(c, OpenFlags.NORMAL)
    par = get_backend("RAW").open(b, OpenFlags.READ_ONLY)
    try:
        img.set_parent(par)
    finally:
        img.close()
        par.close()
    info = qemu.img("info", "--output=json", c).stdout
    assert '"backing-filename": "b.img"' in info and '"backing-filename-format": "raw"' in info
    expect = bytearray(SIZE)
    expect[:MiB] = b"\x0b" * MiB
    qemu_clean(qemu, c)
    qemu_sees(qemu, c, expect, tmp_path)


def test_need_check_after_killed_qemu(qemu, tmp_path):
    p = str(tmp_path / "k.qed")
    qemu.img("create", "-f", "qed", p, SIZE)
    qemu.io("-f", "qed", "-c", "write -P 0x41 0 1M", "-c", "sigraise 9", p, check=False)
    with open(p, "rb") as f:
        f.seek(16)
        assert struct.unpack("<Q", f.read(8))[0] & 2, "qemu left need-check clear"
    expect = bytearray(SIZE)
    expect[:MiB] = b"\x41" * MiB
    with Disk() as d:
        d.open(p, flags=OpenFlags.READ_ONLY)
        assert read_all(d) == bytes(expect)
        assert d.info()["details"]["need_check"]
    our_writes(p, [(4 * MiB, b"\x42" * 4096)], expect)
    with open(p, "rb") as f:
        f.seek(16)
        assert not struct.unpack("<Q", f.read(8))[0] & 2
    qemu_clean(qemu, p)
    qemu_sees(qemu, p, expect, tmp_path)


def test_check_agrees_with_qemu(qemu, tmp_path):
    p = str(tmp_path / "l.qed")
    qemu.img("create", "-f", "qed", p, SIZE)
    qemu.io("-f", "qed", "-c", "write -P 0x51 0 100k", p)
    with open(p, "r+b") as f:
        f.truncate(os.path.getsize(p) + 65536)
    assert qemu.check(p, "qed").returncode == 3
    with Disk() as d:
        d.open(p)
        assert d.top.check().exit_code == 3
        assert d.top.check(repair=True).repaired
    qemu_clean(qemu, p)


@pytest.mark.parametrize("seed", range(6))
def test_random_operation_sequences_stay_clean_for_qemu(qemu, tmp_path, seed):
    rnd = random.Random(500 + seed)
    cs = rnd.choice([4096, 65536])
    size = (seed % 3 + 1) * MiB + rnd.choice([0, 512])
    base = str(tmp_path / "base.qed")
    qemu.img("create", "-f", "qed", "-o", f"cluster_size={cs}", base, size)
    qemu.io("-f", "qed", "-c", f"write -P 0x11 0 {size // 2}", base)
    expect = bytearray(b"\x11" * (size // 2) + bytes(size - size // 2))
    top = base
    if seed % 2:
        top = str(tmp_path / "child.qed")
        qemu.img(
            "create", "-f", "qed", "-o", f"cluster_size={cs}", "-b", "base.qed", "-F", "qed", top
        )
    from vdgui.vd.ops.compact import compact

    for _ in range(8):
        op = rnd.choice("wwwzrc")
        if op == "c":
            compact(top)
            qemu_clean(qemu, top)
            qemu_sees(qemu, top, expect, tmp_path)
            continue
        with Disk.open_chain(top) as d:
            size = d.size
            if op in "wz":
                ln = min(rnd.choice([512, 1024, cs, cs + 512, 3 * cs, 100000]), size)
                off = rnd.randrange(0, size - ln + 1) // 512 * 512
                data = bytes([rnd.randrange(1, 255)]) * ln if op == "w" else bytes(ln)
                d.write(off, data)
                expect[off : off + ln] = data
            else:
                new = size + rnd.choice([512, cs, MiB])
                d.top.resize(new)
                expect += bytes(new - size)
        qemu_clean(qemu, top)
        qemu_sees(qemu, top, expect, tmp_path)


@pytest.mark.parametrize("cs", [4096, 65536])
def test_compact_base_and_child(qemu, tmp_path, cs):
    from vdgui.vd.ops.compact import compact

    p = str(tmp_path / "base.qed")
    qemu.img("create", "-f", "qed", "-o", f"cluster_size={cs},table_size=2", p, SIZE)
    qemu.io(
        "-f",
        "qed",
        "-c",
        "write -P 0x61 0 8M",
        "-c",
        "write -P 0 1M 3M",
        "-c",
        "write -P 0 7M 1M",
        p,
    )
    expect = raw_of(qemu, p, tmp_path)
    before = os.path.getsize(p)
    compact(p)
    assert os.path.getsize(p) < before - 3 * MiB
    qemu_clean(qemu, p)
    qemu_sees(qemu, p, expect, tmp_path)
    c = str(tmp_path / "child.qed")
    qemu.img("create", "-f", "qed", "-o", f"cluster_size={cs}", "-b", "base.qed", "-F", "qed", c)
    qemu.io(
        "-f",
        "qed",
        "-c",
        "write -P 0x61 0 512k",
        "-c",
        "write -P 0 600k 64k",
        "-c",
        "write -P 0x62 6M 64k",
        c,
    )
    expect = bytearray(expect)
    expect[600 * 1024 : 664 * 1024] = bytes(65536)
    expect[6 * MiB : 6 * MiB + 65536] = b"\x62" * 65536
    before = os.path.getsize(c)
    compact(c)
    assert os.path.getsize(c) < before - 400 * 1024
    qemu_clean(qemu, c)
    qemu_sees(qemu, c, expect, tmp_path)


def test_compact_repacks_when_tables_do_not_fit_the_holes(qemu, tmp_path, monkeypatch):
    from vdgui.vd.formats import qed as Q
    from vdgui.vd.ops.compact import compact

    p = str(tmp_path / "frag.qed")
    with Disk() as d:
        d.create_base(p, 16 * MiB, "QED", config={"ClusterSize": "4096", "TableSize": "4"})
        d.write(0, b"\x01" * 4096)  # L2 table 0 (clusters 5-8) + data (9)
        d.write(8 * MiB, b"\x02" * 4096)  # L2 table 1 (10-13) + data (14)
        d.write(0, bytes(4096))  # zero data, dropped by compact: hole at 9,
        d.write(8 * MiB, bytes(4096))  # and 14; table 1 does not fit in one cluster
    calls = []
    orig = Q.QedImage._repack_all

    def spy(self, end):
        calls.append(end)
        return orig(self, end)

    monkeypatch.setattr(Q.QedImage, "_repack_all", spy)
    compact(p)
    assert calls, "the fragmented layout should have been repacked"
    qemu_clean(qemu, p)
    qemu_sees(qemu, p, bytearray(16 * MiB), tmp_path)
    assert os.path.getsize(p) == (1 + 4 + 4 + 4) * 4096
