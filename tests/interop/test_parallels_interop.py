"""Parallels against qemu-img / qemu-io, both directions."""
from __future__ import annotations

import random

import pytest

from tests.conftest import read_all
from vdgui.vd import Disk, OpenFlags

MiB = 1 << 20


@pytest.mark.parametrize("opts", [[], ["-o", "cluster_size=64k"], ["-o", "cluster_size=256k"]])
def test_qemu_made_images_read_identically(qemu, tmp_path, opts):
    size = 12 * MiB + 512 * 5
    p = tmp_path / "q.hdd"
    qemu.img("create", "-f", "parallels", *opts, p, size)
    cmds = ["write -P 0x11 0 1M", "write -P 0x22 1536k 700k", "write -z 1600k 64k",
            f"write -P 0x33 {size - 4096} 4096", "write -P 0x44 7M 100k", "write -z 7M 4k"]
    args = []
    for c in cmds:
        args += ["-c", c]
    qemu.io("-f", "parallels", *args, p)
    raw = qemu.to_raw(p, tmp_path / "q.raw", "parallels").read_bytes()
    with Disk() as d:
        img = d.open(str(p), flags=OpenFlags.READ_ONLY)
        assert img.size == size
        assert read_all(d) == raw
        assert not img.check().problems


@pytest.mark.parametrize("cluster", [MiB, 64 * 1024, 1536 * 1024])
def test_our_images_pass_qemu_check_and_compare(qemu, tmp_path, cluster):
    size = 10 * MiB + 512 * 3
    p = tmp_path / "ours.hdd"
    expect = bytearray(size)
    rnd = random.Random(cluster)
    with Disk() as d:
        d.create_base(str(p), size, "Parallels", config={"ClusterSize": cluster})
        for i in range(25):
            n = rnd.choice([512, 4096, 70000, 2 * MiB])
            off = rnd.randrange(0, size - n)
            off -= off % 512
            data = bytes([(i * 7) % 255 + 1]) * n if i % 6 else bytes(n)
            d.write(off, data)
            expect[off:off + n] = data
    r = qemu.check(p, "parallels")
    assert r.returncode == 0, r.stdout + r.stderr
    model = tmp_path / "model.raw"
    model.write_bytes(bytes(expect))
    assert qemu.compare(p, model, "parallels", "raw").returncode == 0
    # qemu writes into our image, we read them
    qemu.io("-f", "parallels", "-c", "write -P 0x66 3M 10k", p)
    expect[3 * MiB:3 * MiB + 10240] = b"\x66" * 10240
    with Disk() as d:
        d.open(str(p), flags=OpenFlags.READ_ONLY)
        assert read_all(d) == bytes(expect)


def test_our_writes_into_qemu_image(qemu, tmp_path):
    p = tmp_path / "w.hdd"
    qemu.img("create", "-f", "parallels", p, 8 * MiB)
    qemu.io("-f", "parallels", "-c", "write -P 0x61 2M 1M", p)
    expect = bytearray(qemu.to_raw(p, tmp_path / "b.raw", "parallels").read_bytes())
    with Disk() as d:
        d.open(str(p))
        for off, n, v in ((0, 512, 1), (2 * MiB + 100 * 512, 4096, 2), (7 * MiB, MiB, 3)):
            d.write(off, bytes([v]) * n)
            expect[off:off + n] = bytes([v]) * n
    assert qemu.check(p, "parallels").returncode == 0
    model = tmp_path / "m.raw"
    model.write_bytes(bytes(expect))
    assert qemu.compare(p, model, "parallels", "raw").returncode == 0


def test_qemu_killed_leaves_dirty_flag(qemu, tmp_path):
    """qemu-io killed mid-session leaves in_use set: we read it read-only as it is, and a
    read-write open repairs it so qemu-img check is clean again."""
    p = tmp_path / "k.hdd"
    qemu.img("create", "-f", "parallels", p, 8 * MiB)
    qemu.io("-f", "parallels", "-c", "write -P 0x31 0 1536k", "-c", "sigraise 9", p, check=False)
    dirty = qemu.check(p, "parallels").returncode != 0
    with Disk() as d:
        img = d.open(str(p), flags=OpenFlags.READ_ONLY)
        assert img.info()["dirty"] == dirty
        assert d.read(0, 1536 * 1024) == b"\x31" * (1536 * 1024)
    with Disk() as d:
        d.open(str(p))
    r = qemu.check(p, "parallels")
    assert r.returncode == 0, r.stdout
    raw = qemu.to_raw(p, tmp_path / "k.raw", "parallels").read_bytes()
    assert raw[:1536 * 1024] == b"\x31" * (1536 * 1024) and not any(raw[1536 * 1024:])


def test_check_repair_of_a_killed_qemu_session(qemu, tmp_path):
    from vdgui.vd.ops.repair import check
    p = tmp_path / "r.hdd"
    qemu.img("create", "-f", "parallels", p, 8 * MiB)
    qemu.io("-f", "parallels", "-c", "write -P 0x31 0 1536k", "-c", "sigraise 9", p, check=False)
    assert qemu.check(p, "parallels").returncode == 2
    rep = check(str(p), format="Parallels")
    assert rep.exit_code == 2 and "not closed cleanly" in rep.problems[0].what
    rep = check(str(p), format="Parallels", repair=True)
    assert rep.repaired and rep.exit_code == 0
    assert check(str(p), format="Parallels").exit_code == 0
    assert qemu.check(p, "parallels").returncode == 0
    raw = qemu.to_raw(p, tmp_path / "r.raw", "parallels").read_bytes()
    assert raw[:1536 * 1024] == b"\x31" * (1536 * 1024)
