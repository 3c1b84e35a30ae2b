"""VDI against qemu-img/qemu-io, in both directions (images made on the fly in tmp_path)."""
from __future__ import annotations

import os
import random
import shutil
import struct

import pytest

from tests.conftest import read_all
from tests.formats.conformance import scattered_writes
from vdgui.vd import Disk, ImageFlags, OpenFlags
from vdgui.vd.formats.vdi import layout as L

MiB = 1 << 20


def qemu_scatter(qemu, path, size, seed, count=20):
    """Write patterns and zeroes at scattered offsets with qemu-io; return the expected bytes."""
    rnd = random.Random(seed)
    expect = bytearray(size)
    cmds = []
    for i in range(count):
        ln = rnd.choice([512, 4096, 65536, 300 * 512, MiB, 2 * MiB + 1024])
        ln = min(ln, size)
        off = rnd.randrange(0, (size - ln) // 512 + 1) * 512
        if i % 4 == 3:
            cmds += ["-c", f"write -z {off} {ln}"]
            expect[off:off + ln] = bytes(ln)
        else:
            b = (i * 29 + seed) % 255 + 1
            cmds += ["-c", f"write -P {b} {off} {ln}"]
            expect[off:off + ln] = bytes([b]) * ln
    cmds += ["-c", f"write -P 0x5a {size - 512} 512"]
    expect[size - 512:] = b"\x5a" * 512
    qemu.io("-f", "vdi", *cmds, path)
    return bytes(expect)


def write_raw(path, data):
    """Write ``data`` leaving all-zero MiB chunks as holes (keeps big expected files cheap)."""
    mv = memoryview(data)
    with open(path, "wb") as f:
        for pos in range(0, len(mv), MiB):
            chunk = mv[pos:pos + MiB]
            if chunk.tobytes().count(0) != len(chunk):
                f.seek(pos)
                f.write(chunk)
        f.truncate(len(mv))
    return str(path)


def read_file(path):
    with open(path, "rb") as f:
        return f.read()


def our_full_read(path):
    with Disk() as d:
        d.open(str(path), "VDI", flags=OpenFlags.READ_ONLY)
        return read_all(d)


def assert_qemu_clean(qemu, path):
    r = qemu.check(path, "vdi")
    assert r.returncode == 0, f"qemu-img check {path}: {r.returncode} {r.stdout} {r.stderr}"


def assert_qemu_equals(qemu, path, expect, tmp_path):
    raw = write_raw(tmp_path / "expect.raw", expect)
    r = qemu.compare(path, raw, "vdi", "raw")
    assert r.returncode == 0, f"qemu-img compare: {r.stdout} {r.stderr}"


SIZES = [5 * MiB + 7 * 512, 3 * MiB + 512, 12 * MiB]


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("size", SIZES)
def test_qemu_made_images_read_identically(qemu, tmp_path, static, size):
    p = str(tmp_path / "q.vdi")
    qemu.img("create", "-f", "vdi", *(["-o", "static=on"] if static else []), p, size)
    expect = qemu_scatter(qemu, p, size, seed=size % 97 + static)
    ref = read_file(qemu.to_raw(p, tmp_path / "ref.raw", "vdi"))
    assert ref == expect
    assert our_full_read(p) == ref
    with Disk() as d:
        d.open(p, "VDI", flags=OpenFlags.READ_ONLY)
        assert bool(d.top.flags & ImageFlags.FIXED) == static
        assert d.size == size


@pytest.mark.parametrize("variant", [ImageFlags.NONE, ImageFlags.FIXED], ids=["dynamic", "fixed"])
@pytest.mark.parametrize("size", SIZES)
def test_our_images_pass_qemu_check_and_compare(qemu, tmp_path, variant, size):
    p = str(tmp_path / "ours.vdi")
    expect = bytearray(size)
    with Disk() as d:
        d.create_base(p, size, "VDI", flags=variant, comment="made by vdgui")
        for off, data in scattered_writes(size, seed=size % 13):
            d.write(off, data)
            expect[off:off + len(data)] = data
    assert_qemu_clean(qemu, p)
    assert_qemu_equals(qemu, p, bytes(expect), tmp_path)
    info = qemu.img("info", "--output=json", p).stdout
    assert f'"virtual-size": {size}' in info


def test_we_write_into_qemu_image_and_qemu_reads_it(qemu, tmp_path):
    size = 9 * MiB
    p = str(tmp_path / "q.vdi")
    qemu.img("create", "-f", "vdi", p, size)
    expect = bytearray(qemu_scatter(qemu, p, size, seed=5, count=8))
    with Disk() as d:
        d.open(p, "VDI")
        for off, data in scattered_writes(size, seed=77, count=12):
            d.write(off, data)
            expect[off:off + len(data)] = data
    assert_qemu_clean(qemu, p)
    assert_qemu_equals(qemu, p, bytes(expect), tmp_path)
    # and qemu writes again on top of ours
    qemu.io("-f", "vdi", "-c", "write -P 0x77 4096 8192", p)
    expect[4096:12288] = b"\x77" * 8192
    assert our_full_read(p) == bytes(expect)


def as_base_copy(path, dest):
    """A copy of a differencing image with the link cleared, so qemu (which refuses VDI diffs)
    can check the structure of its block map and data area."""
    shutil.copyfile(path, dest)
    with open(dest, "r+b") as f:
        f.seek(L.H1["image_type"])
        f.write(struct.pack("<I", L.TYPE_NORMAL))
        f.seek(L.H1["uuid_linkage"])
        f.write(bytes(32))
    return str(dest)


def test_diff_chain_flattened_and_each_file_checked(qemu, tmp_path):
    size = 6 * MiB + 512
    paths = [str(tmp_path / f"{n}.vdi") for n in ("base", "s1", "s2", "s3")]
    expect = bytearray(size)
    with Disk() as d:
        d.create_base(paths[0], size, "VDI")
        for level, p in enumerate(paths):
            if level:
                d.create_diff(p)
            for off, data in scattered_writes(size, seed=40 + level, count=10):
                d.write(off, data)
                expect[off:off + len(data)] = data
    with Disk.open_chain(paths[-1], flags=OpenFlags.READ_ONLY) as d:
        assert len(d) == 4
        assert read_all(d) == bytes(expect)
    assert_qemu_clean(qemu, paths[0])
    for i, p in enumerate(paths[1:]):
        r = qemu.check(p, "vdi")
        assert r.returncode != 0          # qemu refuses VDI differencing images ...
        copy = as_base_copy(p, tmp_path / f"copy{i}.vdi")
        assert_qemu_clean(qemu, copy)     # ... but their structure is sound
        # the diff's own allocated data as qemu sees it equals ours
        with Disk() as d:
            d.open(p, "VDI", flags=OpenFlags.INFO)
            mine = d.top.read(0, size)
        assert read_file(qemu.to_raw(copy, tmp_path / f"copy{i}.raw", "vdi")) == mine


def test_compact_shrinks_and_stays_clean(qemu, tmp_path):
    size = 10 * MiB
    p = str(tmp_path / "c.vdi")
    qemu.img("create", "-f", "vdi", p, size)
    cmds = []
    for i in range(10):
        cmds += ["-c", f"write -P {i + 1} {i * MiB} {MiB}"]
    qemu.io("-f", "vdi", *cmds, p)
    # qemu writes real zeroes (it allocates); three blocks become all-zero
    qemu.io("-f", "vdi", "-c", f"write -P 0 {2 * MiB} {MiB}", "-c", f"write -P 0 {5 * MiB} {MiB}",
            "-c", f"write -P 0 {9 * MiB} {MiB}", p)
    before = read_file(qemu.to_raw(p, tmp_path / "before.raw", "vdi"))
    fsize = os.path.getsize(p)
    with Disk() as d:
        d.open(p, "VDI")
        d.top.compact()
    assert os.path.getsize(p) == fsize - 3 * MiB
    assert_qemu_clean(qemu, p)
    assert read_file(qemu.to_raw(p, tmp_path / "after.raw", "vdi")) == before
    assert our_full_read(p) == before


@pytest.mark.parametrize("origin", ["ours", "qemu"])
def test_resize_grow(qemu, tmp_path, origin):
    size = 5 * MiB + 512
    p = str(tmp_path / "r.vdi")
    if origin == "qemu":     # qemu's map area holds 128 entries: growing relocates blocks
        qemu.img("create", "-f", "vdi", p, size)
        expect = bytearray(qemu_scatter(qemu, p, size, seed=3, count=8))
    else:
        expect = bytearray(size)
        with Disk() as d:
            d.create_base(p, size, "VDI")
            for off, data in scattered_writes(size, seed=9, count=8):
                d.write(off, data)
                expect[off:off + len(data)] = data
    new = 160 * MiB
    with Disk() as d:
        d.open(p, "VDI")
        off_data = d.top.offset_data
        d.top.resize(new)
        if origin == "qemu":
            assert d.top.offset_data > off_data >= d.top.offset_blocks   # blocks were moved
        assert d.size == new
        assert d.read(size, 2 * MiB) == bytes(2 * MiB)
        d.write(new - MiB, b"\x3c" * 4096)
    expect += bytes(new - size)
    expect[new - MiB:new - MiB + 4096] = b"\x3c" * 4096
    assert_qemu_clean(qemu, p)
    assert_qemu_equals(qemu, p, bytes(expect), tmp_path)
    assert f'"virtual-size": {new}' in qemu.img("info", "--output=json", p).stdout


def _damage(p, kind):
    with open(p, "r+b") as f:
        hdr = L.Header1.parse(f.read(L.PRE_HEADER_SIZE + L.HEADER1_SIZE)[L.PRE_HEADER_SIZE:])
        if kind == "crosslink":
            f.seek(hdr.offset_blocks + 3 * 4)
            f.write(struct.pack("<I", 1))
        elif kind == "pasteof":
            f.seek(hdr.offset_blocks + 2 * 4)
            f.write(struct.pack("<I", 5000))
        elif kind == "count":
            f.seek(L.H1["blocks_allocated"])
            f.write(struct.pack("<I", 2))


@pytest.mark.parametrize("kind", ["crosslink", "pasteof", "count"])
def test_repair_satisfies_qemu(qemu, tmp_path, kind):
    p = str(tmp_path / "d.vdi")
    qemu.img("create", "-f", "vdi", p, 6 * MiB)
    cmds = []
    for i in range(5):
        cmds += ["-c", f"write -P {i + 1} {i * MiB} {MiB}"]
    qemu.io("-f", "vdi", *cmds, p)
    _damage(p, kind)
    assert qemu.check(p, "vdi").returncode != 0
    with Disk() as d:
        d.open(p, "VDI", flags=OpenFlags.READ_ONLY)
        assert d.top.check().corrupt
    with Disk() as d:
        d.open(p, "VDI")
        rep = d.top.check(repair=True)
        assert rep.repaired
        assert d.top.check().problems == []
    assert_qemu_clean(qemu, p)
    got = our_full_read(p)
    assert got == read_file(qemu.to_raw(p, tmp_path / "after.raw", "vdi"))
    assert got[:MiB] == b"\x01" * MiB          # an undamaged block survives


def test_discard_stays_clean(qemu, tmp_path):
    size = 6 * MiB
    p = str(tmp_path / "x.vdi")
    with Disk() as d:
        d.create_base(p, size, "VDI")
        d.write(0, b"\x61" * size)
        d.discard(MiB, 2 * MiB)
        d.discard(4 * MiB + 512, 4096)
    expect = bytearray(b"\x61" * size)
    expect[MiB:3 * MiB] = bytes(2 * MiB)
    expect[4 * MiB + 512:4 * MiB + 4608] = bytes(4096)
    assert_qemu_clean(qemu, p)
    assert_qemu_equals(qemu, p, bytes(expect), tmp_path)
    assert os.path.getsize(p) == 2 * MiB + 4 * MiB      # map and data aligned to 1 MiB
