"""VHDX against qemu-img / qemu-io, both directions."""
from __future__ import annotations

import random

import pytest

from tests.conftest import read_all
from vdgui.vd import CorruptImage, Disk, ImageFlags, OpenFlags

MiB = 1 << 20

QEMU_VARIANTS = {
    "dynamic": [],
    "fixed": ["-o", "subformat=fixed"],
    "block1M": ["-o", "block_size=1M"],
    "log2M": ["-o", "log_size=2M"],
}


def _qemu_writes(size):
    return [
        "write -P 0x11 0 1M",
        "write -P 0x22 1536k 700k",
        f"write -P 0x33 {size - 65536} 65536",
        "write -z 1664k 64k",
        "write -P 0x44 9M 3M",
        "write -z 9M 1M",
        "discard 10M 1M",
        "write -P 0x55 20971520 512",
    ]


@pytest.mark.parametrize("variant", sorted(QEMU_VARIANTS))
def test_qemu_made_images_read_identically(qemu, tmp_path, variant):
    size = 24 * MiB
    p = tmp_path / f"q-{variant}.vhdx"
    qemu.img("create", "-f", "vhdx", *QEMU_VARIANTS[variant], p, size)
    args = []
    for c in _qemu_writes(size):
        args += ["-c", c]
    qemu.io("-f", "vhdx", *args, p)
    raw = qemu.to_raw(p, tmp_path / "q.raw", "vhdx").read_bytes()
    with Disk() as d:
        img = d.open(str(p), flags=OpenFlags.READ_ONLY)
        assert img.size == size
        assert read_all(d) == raw
        assert not img.check().problems
        if variant == "fixed":
            assert img.flags & ImageFlags.FIXED


@pytest.mark.parametrize("variant", ["dynamic", "fixed", "block1M"])
def test_our_writes_into_qemu_images(qemu, tmp_path, variant):
    size = 16 * MiB
    p = tmp_path / f"w-{variant}.vhdx"
    qemu.img("create", "-f", "vhdx", *QEMU_VARIANTS[variant], p, size)
    qemu.io("-f", "vhdx", "-c", "write -P 0x61 2M 1M", p)
    expect = bytearray(qemu.to_raw(p, tmp_path / "before.raw", "vhdx").read_bytes())
    rnd = random.Random(7)
    with Disk() as d:
        d.open(str(p))
        for i in range(20):
            n = rnd.choice([512, 4096, 70000, MiB + 512])
            off = rnd.randrange(0, size - n)
            data = bytes([i + 1]) * n if i % 4 else bytes(n)
            d.write(off, data)
            expect[off:off + n] = data
    assert qemu.check(p, "vhdx").returncode == 0, qemu.check(p, "vhdx").stdout
    model = tmp_path / "model.raw"
    model.write_bytes(bytes(expect))
    assert qemu.compare(p, model, "vhdx", "raw").returncode == 0


@pytest.mark.parametrize("variant,block", [(ImageFlags.NONE, 0), (ImageFlags.FIXED, 0),
                                           (ImageFlags.NONE, MiB), (ImageFlags.NONE, 32 * MiB)])
def test_our_images_pass_qemu_check_and_compare(qemu, tmp_path, variant, block):
    size = 20 * MiB + 512 * 3
    p = tmp_path / "ours.vhdx"
    expect = bytearray(size)
    rnd = random.Random(block + int(variant))
    with Disk() as d:
        d.create_base(str(p), size, "VHDX", flags=variant,
                      config={"BlockSize": block} if block else None)
        for i in range(25):
            n = rnd.choice([512, 4096, 65536, 3 * MiB])
            off = rnd.randrange(0, size - n)
            off -= off % 512
            data = bytes([(i * 13) % 255 + 1]) * n
            d.write(off, data)
            expect[off:off + n] = data
        d.write(size - 512, b"\xfe" * 512)
        expect[size - 512:] = b"\xfe" * 512
    r = qemu.check(p, "vhdx")
    assert r.returncode == 0, r.stdout + r.stderr
    info = qemu.img("info", "--output=json", p).stdout
    assert f'"virtual-size": {size}' in info
    model = tmp_path / "model.raw"
    model.write_bytes(bytes(expect))
    assert qemu.compare(p, model, "vhdx", "raw").returncode == 0
    # qemu writes into our image; we read them back
    qemu.io("-f", "vhdx", "-c", "write -P 0x77 5M 100k", "-c", "write -z 0 64k", p)
    expect[5 * MiB:5 * MiB + 100 * 1024] = b"\x77" * (100 * 1024)
    expect[:65536] = bytes(65536)
    with Disk() as d:
        d.open(str(p), flags=OpenFlags.READ_ONLY)
        assert read_all(d) == bytes(expect)


def test_qemu_killed_mid_session(qemu, tmp_path):
    """qemu-io killed with SIGKILL: whatever state it leaves, we agree with qemu about it."""
    p = tmp_path / "killed.vhdx"
    qemu.img("create", "-f", "vhdx", "-o", "block_size=1M", p, 8 * MiB)
    r = qemu.io("-f", "vhdx", "-c", "write -P 0x31 0 1536k", "-c", "write -P 0x32 6M 4k",
                "-c", "sigraise 9", p, check=False)
    assert r.returncode != 0
    qi = qemu.img("info", "-f", "vhdx", p, check=False)
    if qi.returncode != 0:
        assert "replayed" in qi.stderr
        with pytest.raises(CorruptImage, match="replayed"):
            Disk().open(str(p), flags=OpenFlags.READ_ONLY)
        theirs = tmp_path / "theirs.vhdx"
        theirs.write_bytes(p.read_bytes())
        qemu.img("check", "-r", "all", "-f", "vhdx", theirs, check=False)
        with Disk() as d:
            d.open(str(p))
        assert qemu.compare(p, theirs, "vhdx", "vhdx").returncode == 0
    else:
        raw = qemu.to_raw(p, tmp_path / "k.raw", "vhdx").read_bytes()
        assert raw[:1536 * 1024] == b"\x31" * (1536 * 1024)
        with Disk() as d:
            d.open(str(p), flags=OpenFlags.READ_ONLY)
            assert read_all(d) == raw


def test_diff_chain_flattened_by_us_reads_in_qemu(qemu, tmp_path):
    """qemu cannot open VHDX differencing images; check the parent stays valid for qemu and that
    the chain's content is what our model says."""
    base, child = tmp_path / "b.vhdx", tmp_path / "c.avhdx"
    with Disk() as d:
        d.create_base(str(base), 4 * MiB, "VHDX", config={"BlockSize": MiB})
        d.write(0, b"\x10" * (4 * MiB))
        d.create_diff(str(child))
        d.write(MiB + 512, b"\x20" * 1024)
        chain = read_all(d)
    assert qemu.check(base, "vhdx").returncode == 0
    r = qemu.img("info", "-f", "vhdx", child, check=False)
    assert r.returncode != 0       # qemu: differencing VHDX not supported
    expect = bytearray(b"\x10" * (4 * MiB))
    expect[MiB + 512:MiB + 1536] = b"\x20" * 1024
    assert chain == bytes(expect)


@pytest.mark.parametrize("variant", sorted(QEMU_VARIANTS))
def test_shrink_qemu_made_images(qemu, tmp_path, variant):
    """Shrinking over a tail that reads zero (data written as zeroes, zero and discarded blocks):
    qemu-img check clean, content identical to the first bytes, the file not longer; the tail
    holding data is refused; growing back reads zeroes."""
    from vdgui.vd import InvalidArgument, resize
    p = tmp_path / f"s-{variant}.vhdx"
    qemu.img("create", "-f", "vhdx", *QEMU_VARIANTS[variant], p, 64 * MiB)
    qemu.io("-f", "vhdx", "-c", "write -P 0x61 0 1M", "-c", "write -P 0x62 20M 3M",
            "-c", "write -z 40M 8M", "-c", "write -P 0 50M 1M", "-c", "discard 60M 1M", p)
    full = qemu.to_raw(p, tmp_path / "full.raw", "vhdx").read_bytes()
    size0 = p.stat().st_size
    with pytest.raises(InvalidArgument, match="holds data"):
        resize(str(p), 22 * MiB)
    for new in (24 * MiB, 23 * MiB + 512):
        resize(str(p), new)
        assert qemu.check(p, "vhdx").returncode == 0
        ref = tmp_path / "want.raw"
        ref.write_bytes(full[:new])
        r = qemu.compare(p, ref, "vhdx", "raw")
        assert r.returncode == 0, r.stdout + r.stderr
        assert p.stat().st_size <= size0
    resize(str(p), 64 * MiB)
    with Disk.open_chain(str(p), flags=OpenFlags.READ_ONLY) as d:
        assert read_all(d) == full[:23 * MiB + 512] + bytes(64 * MiB - 23 * MiB - 512)


def test_shrink_differencing_image(tmp_path):
    """A VHDX child shrinks over a tail where it and its parent read zero; the chain reads the
    first bytes as before (qemu cannot open VHDX children: checked against our model)."""
    from vdgui.vd import resize
    base, child = tmp_path / "b.vhdx", tmp_path / "c.avhdx"
    with Disk() as d:
        d.create_base(str(base), 16 * MiB, "VHDX", config={"BlockSize": MiB})
        d.write(0, b"\x10" * (3 * MiB))
        d.create_diff(str(child))
        d.write(MiB + 512, b"\x20" * 1024)
        d.write(10 * MiB, bytes(2 * MiB))          # allocated in the child, reads zero
        before = read_all(d)
    resize(str(child), 6 * MiB)
    with Disk.open_chain(str(child), flags=OpenFlags.READ_ONLY) as d:
        assert d.size == 6 * MiB
        assert read_all(d) == before[:6 * MiB]
        assert not d.top.check().problems


@pytest.mark.parametrize("block", [MiB, 8 * MiB])
def test_converted_blocks_appended_together_read_identically_in_qemu(qemu, tmp_path, block):
    """vdgui-img convert into a dynamic VHDX (new blocks appended several per write, only
    their non-zero 64 KiB pieces stored, the copy's own zero test skipped): qemu-img check and
    compare pass, and blocks qemu allocates afterwards land past ours."""
    from vdgui.vd import copy_image

    rnd = random.Random(18)
    size = 40 * MiB
    src = bytearray(size)
    for blk in rnd.sample(range(size // MiB), 8):                 # whole MiBs
        src[blk * MiB:(blk + 1) * MiB] = rnd.randbytes(MiB)
    src[24 * MiB:28 * MiB] = rnd.randbytes(4 * MiB)               # a window of 4 blocks
    for _ in range(30):                                          # specks, some unaligned
        off = rnd.randrange(0, size - 70000) // 512 * 512
        n = rnd.choice([512, 4096, 64 << 10, 65536 + 512])
        src[off:off + n] = rnd.randbytes(n)
    raw = tmp_path / "src.raw"
    raw.write_bytes(bytes(src))
    p = tmp_path / "out.vhdx"
    copy_image(str(raw), str(p), "VHDX", src_format="RAW", dst_config={"BlockSize": block})
    r = qemu.check(p, "vhdx")
    assert r.returncode == 0, r.stdout + r.stderr
    r = qemu.compare(p, raw, "vhdx", "raw")
    assert r.returncode == 0, r.stdout + r.stderr
    qemu.io("-f", "vhdx", "-c", "write -P 0x3c 38M 1M", p)
    src[38 * MiB:39 * MiB] = b"\x3c" * MiB
    with Disk() as d:
        d.open(str(p), flags=OpenFlags.READ_ONLY)
        assert bytes(read_all(d)[:size]) == bytes(src)
        assert d.top.check().exit_code == 0
