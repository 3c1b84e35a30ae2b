"""QCOW2 against qemu-img/qemu-io, both directions: qemu writes -> our reads byte-identical to
``qemu-img convert -O raw``; our writes -> ``qemu-img check`` clean and ``qemu-img compare``
identical to the expected bytes."""
from __future__ import annotations

import os
import random
import struct

import pytest

from tests.conftest import read_all
from vdgui.vd import Disk, ImageNotFound, InvalidArgument, OpenFlags, UnsafePath, get_backend

pytestmark = pytest.mark.interop

MiB = 1 << 20
SIZE = 8 * MiB


def qemu_writes(qemu, path, fmt="qcow2", size=SIZE):
    """A mix of data, partial-cluster, zero and discarded ranges written by qemu-io."""
    cmds = ["write -P 0x11 0 100k", "write -P 0x22 1M 64k", "write -P 0x23 1200k 3k",
            "write -z 2M 128k", "write -P 0x33 3M 1M", "discard 3136k 128k",
            "write -P 0x44 7340544 3k", "write -z 5M 4k", f"write -P 0x55 {size - 4096} 4096"]
    args = []
    for c in cmds:
        args += ["-c", c]
    qemu.io("-f", fmt, *args, path)


def our_scattered_writes(size, seed, count=20):
    rnd = random.Random(seed)
    out = []
    for i in range(count):
        ln = rnd.choice([512, 1024, 4096, 65536, 70000, 300000])
        off = rnd.randrange(0, size - ln) // 512 * 512
        data = bytes([(i * 29 + seed) % 255 + 1]) * ln if i % 6 != 5 else bytes(ln)
        out.append((off, data))
    out.append((size - 512, b"\xab" * 512))
    return out


def raw_bytes(qemu, path, tmp_path, fmt=None):
    out = tmp_path / f"{os.path.basename(path)}.raw"
    qemu.to_raw(path, out, fmt)
    data = out.read_bytes()
    out.unlink()
    return data


def assert_reads_like_qemu(qemu, path, tmp_path, fmt=None, flags=OpenFlags.READ_ONLY):
    expect = raw_bytes(qemu, path, tmp_path, fmt)
    with Disk.open_chain(path, flags=flags) as d:
        got = read_all(d)
    assert len(got) == len(expect)
    assert got == expect
    return expect


def assert_qemu_clean(qemu, path):
    r = qemu.check(path, "qcow2")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "No errors were found" in r.stdout, r.stdout


def assert_qemu_sees(qemu, path, expect: bytes, tmp_path, fmt="qcow2"):
    ref = tmp_path / "expected.raw"
    ref.write_bytes(expect)
    r = qemu.compare(path, str(ref), fmt, "raw")
    assert r.returncode == 0, r.stdout + r.stderr
    ref.unlink()


def write_ours(path, writes, expect: bytearray | None = None):
    with Disk.open_chain(path) as d:
        for off, data in writes:
            d.write(off, data)
            if expect is not None:
                expect[off:off + len(data)] = data
        d.flush()


# -- qemu writes, we read; then we write, qemu checks ----------------------------------------
QEMU_OPTIONS = [
    "compat=0.10",
    "compat=1.1",
    "cluster_size=512",
    "cluster_size=4096",
    "cluster_size=2M",
    "extended_l2=on",
    "extended_l2=on,cluster_size=16k",
    "lazy_refcounts=on",
    "refcount_bits=1",
    "refcount_bits=16",
    "refcount_bits=64",
    "refcount_bits=2",
    "refcount_bits=4,cluster_size=4096",
    "refcount_bits=32",
    "compression_type=zstd",
    "compat=0.10,cluster_size=4096,refcount_bits=16",
]


@pytest.mark.parametrize("opts", QEMU_OPTIONS)
def test_qemu_image_both_directions(qemu, tmp_path, opts):
    p = str(tmp_path / "q.qcow2")
    qemu.img("create", "-f", "qcow2", "-o", opts, p, SIZE)
    qemu_writes(qemu, p)
    expect = bytearray(assert_reads_like_qemu(qemu, p, tmp_path))
    write_ours(p, our_scattered_writes(SIZE, seed=len(opts)), expect)
    assert_qemu_clean(qemu, p)
    assert_qemu_sees(qemu, p, bytes(expect), tmp_path)
    assert_reads_like_qemu(qemu, p, tmp_path)


@pytest.mark.parametrize("opts", ["cluster_size=512,refcount_bits=1",
                                  "cluster_size=512,refcount_bits=4",
                                  "cluster_size=512,refcount_bits=64",
                                  "cluster_size=4096,refcount_bits=16"])
def test_long_writes_of_new_clusters(qemu, tmp_path, opts):
    """Long writes allocate runs of clusters together (refcounts, data and L2 entries in one
    write each): across refcount blocks and L2 tables, at every refcount width."""
    p = str(tmp_path / "l.qcow2")
    qemu.img("create", "-f", "qcow2", "-o", opts, p, SIZE)
    expect = bytearray(SIZE)
    rnd = random.Random(11)
    writes = [(3 * 512 + 100, os.urandom(2 * MiB)),            # partial head and tail clusters
              (4 * MiB, os.urandom(MiB)),
              (4 * MiB + 65536, bytes(65536) + os.urandom(200000)),   # over own clusters
              (SIZE - 300000, bytes([rnd.randrange(1, 255)]) * 300000)]
    write_ours(p, writes, expect)
    assert_qemu_clean(qemu, p)
    assert_qemu_sees(qemu, p, bytes(expect), tmp_path)


@pytest.mark.parametrize("opts", ["compat=1.1", "compat=0.10", "compression_type=zstd",
                                  "cluster_size=4096"])
def test_compressed_images(qemu, tmp_path, opts):
    src = tmp_path / "src.raw"
    rnd = random.Random(5)
    blob = bytearray(SIZE)
    for i in range(0, SIZE, 65536):
        if i % (3 * 65536):
            blob[i:i + 65536] = (bytes([rnd.randrange(1, 8)]) * 30000 + os.urandom(2000)
                                 + bytes(33536))
    src.write_bytes(bytes(blob))
    p = str(tmp_path / "c.qcow2")
    qemu.img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", opts, str(src), p)
    with Disk() as d:
        d.open(p, flags=OpenFlags.READ_ONLY)
        assert read_all(d) == bytes(blob)
        if "zstd" in opts:
            assert d.info()["details"]["compression_type"] == "zstd"
    expect = bytearray(blob)
    write_ours(p, our_scattered_writes(SIZE, seed=3), expect)
    assert_qemu_clean(qemu, p)
    assert_qemu_sees(qemu, p, bytes(expect), tmp_path)


def test_dirty_lazy_refcount_image_from_killed_qemu(qemu, tmp_path):
    p = str(tmp_path / "dirty.qcow2")
    qemu.img("create", "-f", "qcow2", "-o", "lazy_refcounts=on,cluster_size=4096", p, SIZE)
    qemu.io(
        "-c",
        "write -P 0x61 0 1M",
        "-c",
        "write -P 0x62 5M 300k",
        "-c",
        "sigraise 9",
        p,
        check=False,
    )
    with open(p, "rb") as f:
        f.seek(72)
        assert struct.unpack(">Q", f.read(8))[0] & 1, "qemu left the image clean"
    expect = bytearray(SIZE)
    expect[0:MiB] = b"\x61" * MiB
    expect[5 * MiB : 5 * MiB + 300 * 1024] = b"\x62" * (300 * 1024)
    with Disk() as d:  # read-only: fine as it is
        d.open(p, flags=OpenFlags.READ_ONLY)
        assert read_all(d) == bytes(expect)
        assert d.info()["details"]["dirty"]
    write_ours(p, [(2 * MiB, b"\x63" * 8192)], expect)  # read-write: refcounts rebuilt
    with open(p, "rb") as f:
        f.seek(72)
        assert struct.unpack(">Q", f.read(8))[0] & 1 == 0
    assert_qemu_clean(qemu, p)
    assert_qemu_sees(qemu, p, bytes(expect), tmp_path)


def test_internal_snapshots_cow(qemu, tmp_path):
    p = str(tmp_path / "snap.qcow2")
    qemu.img("create", "-f", "qcow2", p, SIZE)
    qemu.io("-c", "write -P 0x71 0 2M", p)
    qemu.img("snapshot", "-c", "first", p)
    qemu.io("-c", "write -P 0x72 1M 64k", p)
    qemu.img("snapshot", "-c", "second", p)
    snap1 = raw_bytes(qemu, p, tmp_path, "qcow2")
    with Disk() as d:
        d.open(p, flags=OpenFlags.READ_ONLY)
        assert [s["name"] for s in d.info()["details"]["snapshots"]] == ["first", "second"]
    expect = bytearray(assert_reads_like_qemu(qemu, p, tmp_path))
    write_ours(
        p, [(0, b"\x73" * 4096), (1 * MiB + 512, b"\x74" * 512), (6 * MiB, b"\x75" * 65536)], expect
    )
    assert_qemu_clean(qemu, p)
    assert_qemu_sees(qemu, p, bytes(expect), tmp_path)
    out = tmp_path / "snap2.raw"
    qemu.img("convert", "-l", "snapshot.name=second", "-O", "raw", p, str(out))
    assert out.read_bytes() == snap1
    qemu.img("snapshot", "-d", "first", p)
    assert_qemu_clean(qemu, p)


# -- chains -------------------------------------------------------------------------------------
@pytest.mark.parametrize("base_fmt", ["raw", "vdi", "qcow2"])
def test_qemu_chain_three_deep(qemu, tmp_path, base_fmt):
    base = str(tmp_path / f"base.{base_fmt}")
    mid = str(tmp_path / "mid.qcow2")
    top = str(tmp_path / "top.qcow2")
    qemu.img("create", "-f", base_fmt, base, SIZE)
    qemu.io("-f", base_fmt, "-c", "write -P 0x01 0 3M", base)
    qemu.img("create", "-f", "qcow2", "-b", "base." + base_fmt, "-F", base_fmt, mid)
    qemu.io("-c", "write -P 0x02 1M 70k", "-c", "write -z 2M 64k", mid)
    qemu.img("create", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", top)
    qemu.io("-c", "write -P 0x03 1500k 5k", "-c", "discard 0 64k", top)
    with Disk.open_chain(top, flags=OpenFlags.READ_ONLY) as d:
        assert len(d) == 3
        assert d.images[0].format == get_backend(base_fmt).name
        assert d.images[1].parent_hint.format == get_backend(base_fmt).name
    expect = bytearray(assert_reads_like_qemu(qemu, top, tmp_path))
    write_ours(top, our_scattered_writes(SIZE, seed=9), expect)
    assert_qemu_clean(qemu, top)
    assert_qemu_sees(qemu, top, bytes(expect), tmp_path)


@pytest.mark.parametrize("base_fmt", ["RAW", "VDI", "QCOW2", "VHD", "VMDK", "QED"])
def test_our_chain_read_by_qemu(qemu, tmp_path, base_fmt):
    ext = {
        "RAW": "img",
        "VDI": "vdi",
        "QCOW2": "qcow2",
        "VHD": "vhd",
        "VMDK": "vmdk",
        "QED": "qed",
    }[base_fmt]
    qname = {"img": "raw", "vhd": "vpc"}.get(ext, ext)
    paths = [str(tmp_path / f"base.{ext}"), str(tmp_path / "s1.qcow2"), str(tmp_path / "s2.qcow2")]
    with Disk() as d:
        d.create_base(paths[0], SIZE, base_fmt)
        expect = bytearray(d.size)
        for level, p in enumerate(paths):
            if level:
                d.create_diff(p, "QCOW2")
            for off, data in our_scattered_writes(SIZE, seed=level, count=10):
                d.write(off, data)
                expect[off : off + len(data)] = data
    for p in paths[1:]:
        assert_qemu_clean(qemu, p)
    info = qemu.img("info", "--backing-chain", paths[2]).stdout
    assert "backing file format: qcow2" in info
    assert f"backing file format: {qname}" in info
    assert_qemu_sees(qemu, paths[2], bytes(expect), tmp_path)


# -- our images -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "config",
    [
        {"ClusterSize": "512"},
        {"ClusterSize": "4096", "RefcountBits": "1"},
        {"ClusterSize": "65536", "RefcountBits": "64"},
        {"ClusterSize": str(2 * MiB)},
        {"ClusterSize": "65536", "Compat": "0.10"},
        {"ClusterSize": "512", "RefcountBits": "8"},
        {"ClusterSize": "4096", "RefcountBits": "2"},
        {"ClusterSize": "1024", "RefcountBits": "32"},
    ],
)
def test_our_create_and_writes_checked_by_qemu(qemu, tmp_path, config):
    p = str(tmp_path / "ours.qcow2")
    expect = bytearray(SIZE)
    with Disk() as d:
        d.create_base(p, SIZE, "QCOW2", config=config)
        for off, data in our_scattered_writes(SIZE, seed=int(config["ClusterSize"]) % 97, count=30):
            d.write(off, data)
            expect[off : off + len(data)] = data
    assert_qemu_clean(qemu, p)
    assert_qemu_sees(qemu, p, bytes(expect), tmp_path)
    info = qemu.img("info", "--output=json", p).stdout
    assert f'"cluster-size": {config["ClusterSize"]}' in info
    if "Compat" in config:
        assert '"compat": "0.10"' in info


def test_many_clusters_grow_refcount_table(qemu, tmp_path):
    """512-byte clusters with 64-bit refcounts: 64 clusters per refcount block, so the refcount
    table (one cluster = 64 blocks) has to grow several times."""
    p = str(tmp_path / "grow.qcow2")
    size = 6 * MiB
    expect = bytearray(size)
    with Disk() as d:
        d.create_base(p, size, "QCOW2", config={"ClusterSize": "512", "RefcountBits": "64"})
        for i in range(0, size, 3 * 4096):
            d.write(i, b"\x5a" * 2048)
            expect[i : i + 2048] = b"\x5a" * 2048
    assert_qemu_clean(qemu, p)
    assert_qemu_sees(qemu, p, bytes(expect), tmp_path)


def test_our_discards_and_resize(qemu, tmp_path):
    p = str(tmp_path / "d.qcow2")
    qemu.img("create", "-f", "qcow2", p, SIZE)
    qemu.io("-c", "write -P 0x41 0 8M", p)
    expect = bytearray(b"\x41" * SIZE)
    with Disk() as d:
        d.open(p)
        d.discard(MiB, 2 * MiB)
        d.discard(4 * MiB + 512, 4096)
        expect[MiB : 3 * MiB] = bytes(2 * MiB)
        expect[4 * MiB + 512 : 4 * MiB + 4608] = bytes(4096)
        d.top.resize(64 * MiB)
        expect += bytes(56 * MiB)
        d.write(60 * MiB, b"\x42" * 4096)
        expect[60 * MiB : 60 * MiB + 4096] = b"\x42" * 4096
    assert_qemu_clean(qemu, p)
    assert_qemu_sees(qemu, p, bytes(expect), tmp_path)
    assert '"virtual-size": 67108864' in qemu.img("info", "--output=json", p).stdout
    # a child: discarded clusters become zero clusters hiding the backing file
    c = str(tmp_path / "child.qcow2")
    with Disk.open_chain(p) as d:
        d.create_diff(c)
        d.discard(0, MiB)
        expect[0:MiB] = bytes(MiB)
    assert_qemu_clean(qemu, c)
    assert_qemu_sees(qemu, c, bytes(expect), tmp_path)
    r = qemu.img("map", "--output=json", c).stdout
    assert '"zero": true' in r


def test_our_relink_seen_by_qemu(qemu, tmp_path):
    a = str(tmp_path / "a.qcow2")
    b = str(tmp_path / "b.raw")
    c = str(tmp_path / "c.qcow2")
    qemu.img("create", "-f", "qcow2", a, SIZE)
    qemu.io("-c", "write -P 0x0a 0 1M", a)
    qemu.img("create", "-f", "raw", b, SIZE)
    qemu.io("-f", "raw", "-c", "write -P 0x0b 0 1M", b)
    qemu.img("create", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", c)
    qemu.io("-c", "write -P 0x0c 512k 4k", c)
    img = get_backend("QCOW2").open(c, OpenFlags.NORMAL)
    parent = get_backend("RAW").open(b, OpenFlags.READ_ONLY)
    try:
        img.set_parent(parent)
    finally:
        img.close()
        parent.close()
    info = qemu.img("info", "--output=json", c).stdout
    assert '"backing-filename": "b.raw"' in info and '"backing-filename-format": "raw"' in info
    expect = bytearray(SIZE)
    expect[0:MiB] = b"\x0b" * MiB
    # qemu copied the rest of the written cluster from the old backing file (64 KiB clusters)
    expect[512 * 1024 : 576 * 1024] = b"\x0a" * 65536
    expect[512 * 1024 : 516 * 1024] = b"\x0c" * 4096
    assert_qemu_clean(qemu, c)
    assert_qemu_sees(qemu, c, bytes(expect), tmp_path)


def test_check_agrees_with_qemu_and_repair_satisfies_it(qemu, tmp_path):
    p = str(tmp_path / "leak.qcow2")
    qemu.img("create", "-f", "qcow2", "-o", "cluster_size=4096", p, SIZE)
    qemu.io("-c", "write -P 0x31 0 100k", p)
    size = os.path.getsize(p)
    with open(p, "r+b") as f:
        f.seek(48)
        rt = struct.unpack(">Q", f.read(8))[0]
        f.seek(rt)
        rb = struct.unpack(">Q", f.read(8))[0]
        f.truncate(size + 2 * 4096)
        f.seek(rb + 2 * (size // 4096 + 1))
        f.write(struct.pack(">H", 1))
    assert qemu.check(p).returncode == 3
    with Disk() as d:
        d.open(p)
        assert d.top.check().exit_code == 3
        assert d.top.check(repair=True).repaired
    assert_qemu_clean(qemu, p)
    # and a corruption (refcount too low) qemu calls corruption too
    with open(p, "r+b") as f:
        f.seek(48)
        rt = struct.unpack(">Q", f.read(8))[0]
        f.seek(rt)
        rb = struct.unpack(">Q", f.read(8))[0]
        f.seek(rb)
        f.write(struct.pack(">H", 0))
    assert qemu.check(p).returncode == 2
    with Disk() as d:
        d.open(p)
        assert d.top.check().exit_code == 2
        assert d.top.check(repair=True).repaired
    assert_qemu_clean(qemu, p)


def test_qcow_version_1(qemu, tmp_path):
    p = str(tmp_path / "old.qcow")
    qemu.img("create", "-f", "qcow", p, SIZE)
    qemu.io("-f", "qcow", "-c", "write -P 0x19 0 100k", "-c", "write -P 0x1a 5M 4k", p)
    expect = raw_bytes(qemu, p, tmp_path, "qcow")
    with Disk() as d:
        d.open(p, flags=OpenFlags.READ_ONLY)
        assert d.info()["details"]["qcow_version"] == 1
        assert read_all(d) == expect
    # a compressed cluster (qemu-io writes whole compressed clusters: 4 KiB here)
    qemu.io("-f", "qcow", "-c", "write -c -P 0x1b 1M 4k", p)
    expect = raw_bytes(qemu, p, tmp_path, "qcow")
    assert expect[MiB : MiB + 4096] == b"\x1b" * 4096
    with Disk() as d:
        d.open(p, flags=OpenFlags.READ_ONLY)
        assert read_all(d) == expect


def test_external_data_file(qemu, tmp_path):
    p = str(tmp_path / "ext.qcow2")
    data = str(tmp_path / "ext.data")
    qemu.img("create", "-f", "qcow2", "-o", f"data_file={data}", p, SIZE)
    qemu.io("-c", "write -P 0x5e 1M 100k", p)
    with pytest.raises(UnsafePath, match="data file"):
        Disk().open(p, flags=OpenFlags.READ_ONLY)
    with Disk() as d:
        d.open(p, flags=OpenFlags.INFO)
        assert d.info()["details"]["data_file"] == data
    expect = raw_bytes(qemu, p, tmp_path)
    with Disk() as d:
        d.open(p, flags=OpenFlags.READ_ONLY | OpenFlags.ALLOW_UNSAFE_PATHS)
        assert read_all(d) == expect
        assert len(d.top.files()) == 2


# -- the real-image corpus ----------------------------------------------------------------------
CORPUS = [
    "dissect/basic.qcow2",
    "dissect/basic-zstd.qcow2",
    "dissect/snapshot.qcow2",
    "dissect/backing-chain-1.qcow2",
    "dfvfs/ext2.qcow2",
    "dfvfs/ext2.hdr104.qcow2",
    "dfvfs/image.qcow2",
    "dfvfs/vsstest.qcow2",
    "dfvfs/windows_volume.qcow2",
]


def _file_data_ranges(fd, size):
    out, pos = [], 0
    while pos < size:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:
            break
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), size)
        out.append((data, hole))
        pos = hole
    return out


def _merge_ranges(ranges):
    out = []
    for s, e in sorted(ranges):
        s, e = s // 512 * 512, -(-e // 512) * 512
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


@pytest.mark.corpus
@pytest.mark.parametrize("name", CORPUS)
def test_corpus_reads_like_qemu(qemu, corpus, tmp_path, name):
    p = str(corpus / "qcow2" / name)
    raw = tmp_path / "c.raw"
    qemu.to_raw(p, raw)
    with Disk.open_chain(p, flags=OpenFlags.READ_ONLY) as d, open(raw, "rb") as f:
        assert d.size == os.path.getsize(raw)
        # compare every range either side holds data in (qemu's output is sparse: its holes
        # read as zeroes, and so does every range our chain reports unallocated)
        ranges = _file_data_ranges(f.fileno(), d.size)
        ranges += [(e.start, e.end) for e in d.allocation() if e.level is not None]
        for start, end in _merge_ranges(ranges):
            pos = start
            while pos < end:
                n = min(16 * MiB, end - pos)
                assert d.read(pos, n) == os.pread(f.fileno(), n, pos), (
                    f"{name}: differs in [{pos}, {pos + n})"
                )
                pos += n
        for e in d.allocation():
            if e.level is None:
                assert d.read(e.start, min(e.length, 4096)) == bytes(min(e.length, 4096))
        if name.endswith("backing-chain-1.qcow2"):
            assert len(d) == 3
        if name.endswith("snapshot.qcow2"):
            snaps = d.info()["details"]["snapshots"]
            assert [(s["id"], s["name"]) for s in snaps] == [
                ("1", "you can't see me"),
                ("2", "confused"),
            ]


@pytest.mark.corpus
def test_corpus_external_data_file_missing(corpus):
    p = str(corpus / "qcow2" / "dissect" / "data-file.qcow2")
    with pytest.raises(UnsafePath, match="external data file"):
        Disk().open(p, flags=OpenFlags.READ_ONLY)
    with pytest.raises(ImageNotFound, match="data-file.bin"):
        Disk().open(p, flags=OpenFlags.READ_ONLY | OpenFlags.ALLOW_UNSAFE_PATHS)
    with Disk() as d:
        d.open(p, flags=OpenFlags.INFO)
        assert d.info()["details"]["data_file"] == "data-file.bin"


@pytest.mark.parametrize(
    "config", [{"ClusterSize": "512"}, {"ClusterSize": "65536", "Compat": "0.10"}]
)
def test_metadata_bit_flips_check_agrees_and_repair_satisfies_qemu(qemu, tmp_path, config):
    """Flip one bit in the refcount table/blocks, the L1 table or an L2 table: our check and
    qemu's agree on clean/leaks/corrupt, and after our repair qemu finds the image clean."""
    orig = str(tmp_path / "orig.qcow2")
    with Disk() as d:
        d.create_base(orig, 2 * MiB, "QCOW2", config=config)
        for off, data in our_scattered_writes(2 * MiB, seed=4, count=12):
            d.write(off, data)
        img = d.top
        cs = img.cs
        meta = [(img.rt_offset, 64), (img.l1_offset, len(img.l1) * 8)]
        meta += [(e, cs) for e in img.rt if e]
        meta += [(e & 0x00FFFFFFFFFFFE00, cs) for e in img.l1 if e]
    with open(orig, "rb") as f:
        data = f.read()
    rnd = random.Random(11)
    p = str(tmp_path / "flip.qcow2")
    for _ in range(12):
        b = bytearray(data)
        o, n = rnd.choice(meta)
        b[o + rnd.randrange(n)] ^= 1 << rnd.randrange(8)
        with open(p, "wb") as f:
            f.write(b)
        q = qemu.check(p).returncode
        with Disk() as d:
            d.open(p)
            assert d.top.check().exit_code == q
            d.top.check(repair=True)
        assert_qemu_clean(qemu, p)


def test_compact_base_and_child(qemu, tmp_path):
    from vdgui.vd.ops.compact import compact

    p = str(tmp_path / "base.qcow2")
    qemu.img("create", "-f", "qcow2", "-o", "cluster_size=4096", p, SIZE)
    qemu.io(
        "-c",
        "write -P 0x61 0 5M",
        "-c",
        "write -c -P 0 5M 4k",
        "-c",
        "write -c -P 0x61 5124k 60k",
        "-c",
        "write -P 0x61 5184k 3008k",
        "-c",
        "write -P 0 1M 3M",
        "-c",
        "write -P 0 7M 1M",
        p,
    )
    expect = raw_bytes(qemu, p, tmp_path)
    before = os.path.getsize(p)
    compact(p)
    assert os.path.getsize(p) < before - 3 * MiB
    assert_qemu_clean(qemu, p)
    assert_qemu_sees(qemu, p, expect, tmp_path)
    c = str(tmp_path / "child.qcow2")
    qemu.img(
        "create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "-o", "cluster_size=4096", c
    )
    # the child rewrites half of the base with the same bytes, and some zeroes over data
    qemu.io(
        "-c", "write -P 0x61 0 512k", "-c", "write -P 0 600k 64k", "-c", "write -P 0x62 6M 64k", c
    )
    expect = bytearray(expect)
    expect[600 * 1024 : 664 * 1024] = bytes(65536)
    expect[6 * MiB : 6 * MiB + 65536] = b"\x62" * 65536
    before = os.path.getsize(c)
    compact(c)
    assert os.path.getsize(c) < before - 400 * 1024
    assert_qemu_clean(qemu, c)
    assert_qemu_sees(qemu, c, bytes(expect), tmp_path)
    with Disk.open_chain(c, flags=OpenFlags.READ_ONLY) as d:
        assert read_all(d) == bytes(expect)


def test_compact_compressed_and_snapshot_images(qemu, tmp_path):
    from vdgui.vd.ops.compact import compact

    src = tmp_path / "src.raw"
    blob = bytearray(SIZE)
    for i in range(0, SIZE, 65536):
        blob[i : i + 1000] = bytes([i // 65536 % 200 + 1]) * 1000
    src.write_bytes(bytes(blob))
    p = str(tmp_path / "c.qcow2")
    qemu.img("convert", "-c", "-f", "raw", "-O", "qcow2", str(src), p)
    qemu.io("-c", "write -P 0 0 2M", p)  # zero data over compressed clusters
    expect = raw_bytes(qemu, p, tmp_path)
    compact(p)
    assert_qemu_clean(qemu, p)
    assert_qemu_sees(qemu, p, expect, tmp_path)
    s = str(tmp_path / "s.qcow2")
    qemu.img("create", "-f", "qcow2", s, SIZE)
    qemu.io("-c", "write -P 0x21 0 4M", s)
    qemu.img("snapshot", "-c", "keep", s)
    qemu.io("-c", "write -P 0 0 1M", "-c", "write -P 0x22 6M 1M", s)
    snap = raw_bytes(qemu, s, tmp_path)
    expect = bytearray(snap)
    compact(s)
    assert_qemu_clean(qemu, s)
    assert_qemu_sees(qemu, s, bytes(expect), tmp_path)
    out = tmp_path / "keep.raw"
    qemu.img("convert", "-l", "snapshot.name=keep", "-O", "raw", s, str(out))
    assert out.read_bytes()[: 4 * MiB] == b"\x21" * (4 * MiB)


def test_internal_snapshot_read_only_view(qemu, tmp_path):
    p = str(tmp_path / "v.qcow2")
    qemu.img("create", "-f", "qcow2", p, SIZE)
    qemu.io("-c", "write -P 0x31 0 1M", p)
    qemu.img("snapshot", "-c", "one", p)
    qemu.io("-c", "write -P 0x32 512k 1M", p)
    qemu.img("snapshot", "-c", "two", p)
    qemu.img("resize", p, str(2 * SIZE))
    qemu.io("-c", "write -P 0x33 0 4k", p)
    for which, name in (("one", "one"), ("2", "two")):
        out = tmp_path / f"{name}.raw"
        qemu.img("convert", "-l", f"snapshot.name={name}", "-O", "raw", p, str(out))
        with Disk() as d:
            d.open(p, flags=OpenFlags.READ_ONLY, config={"Snapshot": which})
            assert d.info()["details"]["snapshot_view"]["name"] == name
            assert d.size == SIZE  # the snapshot's own disk size
            ref = out.read_bytes()  # qemu reports the current size, zero-padded
            assert read_all(d) == ref[:SIZE] and not any(ref[SIZE:])
    with pytest.raises(InvalidArgument, match="no internal snapshot"):
        Disk().open(p, flags=OpenFlags.READ_ONLY, config={"Snapshot": "three"})
    with pytest.raises(InvalidArgument, match="read-only"):
        Disk().open(p, config={"Snapshot": "one"})
    with Disk() as d:
        d.open(p, flags=OpenFlags.READ_ONLY)
        assert d.size == 2 * SIZE and d.read(0, 4096) == b"\x33" * 4096


@pytest.mark.parametrize("opts", ["extended_l2=on", "compat=0.10", "compat=1.1,cluster_size=4096"])
def test_writes_and_discards_in_child_over_backing(qemu, tmp_path, opts):
    """Partial-cluster and partial-subcluster writes copy the rest from the backing file; zero
    writes and discards hide it (zero clusters/subclusters in v3, zero data in v2)."""
    base = str(tmp_path / "base.qcow2")
    child = str(tmp_path / "child.qcow2")
    qemu.img("create", "-f", "qcow2", base, SIZE)
    qemu.io("-c", "write -P 0x81 0 8M", base)
    qemu.img("create", "-f", "qcow2", "-o", opts, "-b", "base.qcow2", "-F", "qcow2", child)
    qemu.io("-c", "write -P 0x82 100k 3k", child)
    expect = bytearray(raw_bytes(qemu, child, tmp_path))
    cs = 4096 if "4096" in opts else 65536
    sub = cs // 32 if "extended" in opts else cs
    with Disk.open_chain(child) as d:
        for off, data in [
            (512, b"\x83" * 512),
            (70000 // 512 * 512, b"\x84" * 1536),
            (2 * MiB + 1024, bytes(4096)),
            (3 * MiB, bytes(cs)),
            (5 * MiB - 512, b"\x85" * 1024),
        ]:
            d.write(off, data)
            expect[off : off + len(data)] = data
        d.discard(4 * MiB, 2 * cs)
        expect[4 * MiB : 4 * MiB + 2 * cs] = bytes(2 * cs)
        d.discard(6 * MiB + sub, sub)
        expect[6 * MiB + sub : 6 * MiB + 2 * sub] = bytes(sub)
        assert read_all(d) == bytes(expect)
    assert_qemu_clean(qemu, child)
    assert_qemu_sees(qemu, child, bytes(expect), tmp_path)


def test_zstd_without_module_is_a_clear_error(qemu, tmp_path, monkeypatch):
    src = tmp_path / "s.raw"
    src.write_bytes(b"\x17" * MiB)
    p = str(tmp_path / "z.qcow2")
    qemu.img(
        "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "compression_type=zstd", str(src), p
    )
    import sys

    monkeypatch.setitem(sys.modules, "zstandard", None)
    from vdgui.vd import NotSupported

    with Disk() as d:
        d.open(p, flags=OpenFlags.READ_ONLY)
        with pytest.raises(NotSupported, match="unsupported compression type zstd"):
            d.read(0, 65536)


def _dirty_ranges(qemu, path, bitmap, tmp_path):
    """The dirty ranges of a persistent bitmap as qemu sees them (qemu-nbd's dirty-bitmap
    export read through qemu-img map, where dirty areas show as "data": false)."""
    import json
    import subprocess
    import tempfile
    import time

    sockdir = tempfile.mkdtemp(prefix="vdq")  # short path: unix socket names are limited
    sock = os.path.join(sockdir, "s")
    srv = subprocess.Popen(
        ["qemu-nbd", "-r", "-f", "qcow2", "-B", bitmap, f"--socket={sock}", path],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            if os.path.exists(sock):
                break
            time.sleep(0.05)
        out = qemu.img(
            "map",
            "--output=json",
            "--image-opts",
            f"driver=nbd,server.type=unix,server.path={sock},"
            f"x-dirty-bitmap=qemu:dirty-bitmap:{bitmap}",
        ).stdout
    finally:
        try:
            srv.wait(timeout=10)
        except subprocess.TimeoutExpired:
            srv.kill()
            srv.wait()
        if os.path.exists(sock):
            os.unlink(sock)
        os.rmdir(sockdir)
    return [(e["start"], e["length"]) for e in json.loads(out) if not e["data"]]


def test_persistent_bitmaps_kept_up_to_date(qemu, tmp_path):
    p = str(tmp_path / "bm.qcow2")
    qemu.img("create", "-f", "qcow2", p, SIZE)
    qemu.io("-c", "write -P 0x91 0 1M", p)
    qemu.img("bitmap", "--add", p, "b0")
    qemu.img("bitmap", "--add", "-g", "512k", p, "b1")
    qemu.img("bitmap", "--add", "--disable", p, "off")
    qemu.io("-c", "write -P 0x92 2M 64k", p)
    expect = bytearray(raw_bytes(qemu, p, tmp_path))
    with Disk() as d:
        d.open(p)
        assert d.info()["details"]["bitmaps"] == 3
        d.write(5 * MiB, b"\x93" * 70000)
        d.discard(7 * MiB, 65536)
        expect[5 * MiB : 5 * MiB + 70000] = b"\x93" * 70000
        expect[7 * MiB : 7 * MiB + 65536] = bytes(65536)
        assert d.top.check().exit_code == 0
    info = qemu.img("info", p)
    assert "b1" in info.stdout and "lacking bitmap support" not in info.stderr
    assert_qemu_clean(qemu, p)
    assert_qemu_sees(qemu, p, bytes(expect), tmp_path)
    assert _dirty_ranges(qemu, p, "b0", tmp_path) == [
        (2 * MiB, 65536),
        (5 * MiB, 131072),
        (7 * MiB, 65536),
    ]
    half = 512 * 1024
    assert _dirty_ranges(qemu, p, "b1", tmp_path) == [
        (2 * MiB, half),
        (5 * MiB, half),
        (7 * MiB, half),
    ]
    assert _dirty_ranges(qemu, p, "off", tmp_path) == []
    # a resize cannot keep the bitmaps: they are removed cleanly
    with Disk() as d:
        d.open(p)
        d.top.resize(2 * SIZE)
    info = qemu.img("info", p)
    assert "bitmaps:" not in info.stdout and "lacking bitmap support" not in info.stderr
    assert_qemu_clean(qemu, p)


@pytest.mark.parametrize("seed", range(6))
def test_random_operation_sequences_stay_clean_for_qemu(qemu, tmp_path, seed):
    """Random subformat (cluster size, refcount width, extended L2, v2), optional backing file
    and internal snapshot; then a random mix of our writes, zero writes, discards, resizes and
    compactions: after every step qemu-img check is clean and qemu reads the expected bytes."""
    from vdgui.vd.ops.compact import compact

    rnd = random.Random(1000 + seed)
    cs = rnd.choice([512, 4096, 16384, 65536])
    opts = [f"cluster_size={cs}", f"refcount_bits={rnd.choice([2, 16, 64])}"]
    if cs >= 16384 and seed % 3 == 0:
        opts.append("extended_l2=on")
    if seed % 4 == 1:
        opts = [f"cluster_size={cs}", "compat=0.10"]
    size = (seed % 3 + 1) * MiB + rnd.choice([0, 512, 4096])
    base = str(tmp_path / "base.qcow2")
    qemu.img("create", "-f", "qcow2", "-o", ",".join(opts), base, size)
    qemu.io("-c", f"write -P 0x11 0 {size // 2}", base)
    expect = bytearray(b"\x11" * (size // 2) + bytes(size - size // 2))
    top = base
    if seed % 2:
        top = str(tmp_path / "child.qcow2")
        qemu.img(
            "create", "-f", "qcow2", "-o", ",".join(opts), "-b", "base.qcow2", "-F", "qcow2", top
        )
    if seed % 3 == 2:
        qemu.img("snapshot", "-c", "s1", top)
    for _ in range(8):
        op = rnd.choice("wwwzdrc")
        if op == "c":
            compact(top)
        else:
            with Disk.open_chain(top) as d:
                size = d.size
                if op in "wz":
                    ln = min(rnd.choice([512, 1024, cs, cs + 512, 3 * cs, 100000]), size)
                    off = rnd.randrange(0, size - ln + 1) // 512 * 512
                    data = bytes([rnd.randrange(1, 255)]) * ln if op == "w" else bytes(ln)
                    d.write(off, data)
                    expect[off : off + ln] = data
                elif op == "d":
                    off = rnd.randrange(0, max(1, size - 4 * cs)) // cs * cs
                    ln = min(rnd.choice([cs, 2 * cs, 4 * cs]), size - off)
                    d.discard(off, ln)
                    expect[off : off + ln] = bytes(ln)
                else:
                    new = size + rnd.choice([512, cs, MiB])
                    d.top.resize(new)
                    expect += bytes(new - size)
        assert_qemu_clean(qemu, top)
        assert_qemu_sees(qemu, top, bytes(expect), tmp_path)


@pytest.mark.parametrize(
    "config",
    [
        {"ClusterSize": "65536"},
        {"ClusterSize": "4096", "RefcountBits": "2"},
        {"ClusterSize": "512"},
        {"ClusterSize": "65536", "Compat": "0.10"},
    ],
)
def test_our_compressed_writes(qemu, tmp_path, config):
    """Compress=1 (convert -c): whole clusters stored compressed, packed; qemu reads them and
    finds the refcounts exact; later partial writes decompress them again."""
    p = str(tmp_path / "c.qcow2")
    size = 4 * MiB + 512
    rnd = random.Random(3)
    expect = bytearray(size)
    with Disk() as d:
        d.create_base(p, size, "QCOW2", config={**config, "Compress": "1"})
        for pos in range(0, size, 256 * 1024):
            n = min(256 * 1024, size - pos)
            block = (
                bytes([rnd.randrange(1, 5)]) * (n // 2) + os.urandom(64) + bytes(n - n // 2 - 64)
            )
            d.write(pos, block)
            expect[pos : pos + n] = block
        assert read_all(d) == bytes(expect)
    assert_qemu_clean(qemu, p)
    assert_qemu_sees(qemu, p, bytes(expect), tmp_path)
    out = qemu.img("check", "--output=json", p).stdout
    assert '"compressed-clusters": 0' not in out
    assert os.path.getsize(p) < size // 2
    write_ours(p, [(1000 * 512, b"\x99" * 3000), (2 * MiB, b"\x98" * 70000)], expect)
    assert_qemu_clean(qemu, p)
    assert_qemu_sees(qemu, p, bytes(expect), tmp_path)


@pytest.mark.parametrize(
    "opts",
    [
        "cluster_size=65536",
        "cluster_size=512,refcount_bits=1",
        "cluster_size=4096,refcount_bits=64",
        "extended_l2=on",
        "compat=0.10",
    ],
)
def test_shrink_qemu_images(qemu, tmp_path, opts):
    """qemu-made images with data, zero, discarded and compressed clusters in the part cut off
    (all reading zero) shrink: qemu-img check clean (no leak: the clusters and L2 tables past the
    end were freed), content identical to the first bytes, the file no longer than before; a
    second shrink and a grow back behave; a tail holding data is refused."""
    from vdgui.vd import resize

    p = str(tmp_path / "s.qcow2")
    qemu.img("create", "-f", "qcow2", "-o", opts, p, 16 * MiB)
    qemu.io(
        "-c",
        "write -P 0x61 0 1M",
        "-c",
        "write -P 0x62 5M 2M",
        "-c",
        "write -z 9M 1M",
        "-c",
        "write -P 0 11M 1M",
        "-c",
        "write -P 0x63 13M 1M",
        "-c",
        "discard 13M 1M",
        "-c",
        "write -c -P 0 15M 64k" if "0.10" not in opts else "write -P 0 15M 64k",
        p,
    )
    full = raw_bytes(qemu, p, tmp_path)
    size0 = os.path.getsize(p)
    with pytest.raises(InvalidArgument, match="holds data"):
        resize(p, 6 * MiB)
    resize(p, 7 * MiB + 512)
    assert_qemu_clean(qemu, p)
    assert_qemu_sees(qemu, p, full[: 7 * MiB + 512], tmp_path)
    assert os.path.getsize(p) <= size0
    resize(p, 7 * MiB)
    assert_qemu_clean(qemu, p)
    assert_qemu_sees(qemu, p, full[: 7 * MiB], tmp_path)
    resize(p, 16 * MiB)
    assert_qemu_clean(qemu, p)
    assert_qemu_sees(qemu, p, full[: 7 * MiB] + bytes(9 * MiB), tmp_path)


def test_shrink_child_and_refusals(qemu, tmp_path):
    """A differencing image shrinks over its own and the parent's zero tail; an image with
    internal snapshots is refused (they keep the old size) and left unchanged."""
    from vdgui.vd import resize

    base, child = str(tmp_path / "b.qcow2"), str(tmp_path / "c.qcow2")
    qemu.img("create", "-f", "qcow2", base, 8 * MiB)
    qemu.io("-c", "write -P 0x71 0 2M", base)
    qemu.img("create", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", child)
    qemu.io("-c", "write -P 0x72 1M 2M", "-c", "write -z 6M 1M", child)
    full = raw_bytes(qemu, child, tmp_path)
    resize(child, 4 * MiB)
    assert_qemu_clean(qemu, child)
    assert_qemu_sees(qemu, child, full[: 4 * MiB], tmp_path)
    snap = str(tmp_path / "snap.qcow2")
    qemu.img("create", "-f", "qcow2", snap, 8 * MiB)
    qemu.io("-c", "write -P 0x73 0 1M", snap)
    qemu.img("snapshot", "-c", "s1", snap)
    before = (tmp_path / "snap.qcow2").read_bytes()
    with pytest.raises(InvalidArgument, match="internal snapshots"):
        resize(snap, 4 * MiB)
    assert (tmp_path / "snap.qcow2").read_bytes() == before


def test_grow_child_over_larger_backing(qemu, tmp_path):
    """An overlay smaller than its backing file grows: the new area reads zeroes, not the
    backing file's data there (qemu does the same); qemu-img check clean."""
    from vdgui.vd import resize

    base, child = str(tmp_path / "b.qcow2"), str(tmp_path / "c.qcow2")
    qemu.img("create", "-f", "qcow2", base, 8 * MiB)
    qemu.io("-c", "write -P 0x71 0 8M", base)
    qemu.img("create", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", child, 3 * MiB + 512)
    qemu.io("-c", "write -P 0x72 1M 64k", child)
    expect = bytearray(b"\x71" * (3 * MiB + 512))
    expect[MiB : MiB + 65536] = b"\x72" * 65536
    resize(child, 6 * MiB)
    assert_qemu_clean(qemu, child)
    assert_qemu_sees(qemu, child, bytes(expect) + bytes(6 * MiB - len(expect)), tmp_path)
    resize(child, 12 * MiB)  # past the backing file's end as well
    assert_qemu_clean(qemu, child)
    assert_qemu_sees(qemu, child, bytes(expect) + bytes(12 * MiB - len(expect)), tmp_path)
