"""VMDK against qemu-img / qemu-io (the oracle), and the real images of the corpus."""
from __future__ import annotations

import tarfile

import pytest

from tests.conftest import pattern, read_all
from tests.formats.conformance import scattered_writes
from vdgui.vd import (
    Disk,
    ImageFlags,
    ImageNotFound,
    NotSupported,
    OpenFlags,
    VDError,
    copy_image,
    probe,
)

MiB = 1 << 20
GiB = 1 << 30

SUBFORMATS = ["monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat"]


def _write_pattern(qemu, path, regions):
    args = []
    for off, ln, byte in regions:
        args += ["-c", f"write -P {byte} {off} {ln}"]
    qemu.io("-f", "vmdk", *args, path)


def _expect_regions(d, regions, holes):
    for off, ln, byte in regions:
        assert d.read(off, ln) == bytes([byte]) * ln, f"region at {off}"
    for off, ln in holes:
        assert d.read(off, ln) == bytes(ln), f"hole at {off}"


# -- qemu writes, we read ----------------------------------------------------------------------
@pytest.mark.parametrize("sub", SUBFORMATS)
def test_qemu_small_images_read_identically(tmp_path, qemu, sub):
    p = str(tmp_path / "q.vmdk")
    qemu.img("create", "-f", "vmdk", "-o", f"subformat={sub}", p, "7M")
    _write_pattern(qemu, p, [(0, 4096, 1), (65536 - 512, 70000, 2), (5 * MiB + 3, 1000, 3),
                             (7 * MiB - 512, 512, 4)])
    raw = qemu.to_raw(p, tmp_path / "q.raw").read_bytes()
    assert probe(p).name == "VMDK"
    with Disk() as d:
        d.open(p, flags=OpenFlags.READ_ONLY)
        assert d.size == 7 * MiB
        assert read_all(d) == raw
        info = d.info()
        assert info["details"]["create_type"] == sub
        assert bool(d.top.flags & ImageFlags.SPLIT_2G) == sub.startswith("twoGb")
        assert bool(d.top.flags & ImageFlags.FIXED) == sub.endswith("Flat")
        assert len(d.top.files()) == (1 if sub == "monolithicSparse" else 2)


@pytest.mark.parametrize("sub", ["twoGbMaxExtentSparse", "twoGbMaxExtentFlat"])
def test_qemu_split_images_several_extents(tmp_path, qemu, sub):
    """5 GiB split images (sparse files), data written across the 2 GiB extent boundaries."""
    p = str(tmp_path / "big.vmdk")
    qemu.img("create", "-f", "vmdk", "-o", f"subformat={sub}", p, "5G")
    regions = [(2 * GiB - 6000, 12000, 0x21), (4 * GiB - 512, 1024, 0x42),
               (5 * GiB - 65536, 65536, 0x63), (123456 * 512, 3000, 0x7f)]
    _write_pattern(qemu, p, regions)
    with Disk() as d:
        img = d.open(p, flags=OpenFlags.READ_ONLY)
        assert d.size == 5 * GiB and len(img.extents) == 3
        _expect_regions(d, regions, [(0, 65536), (3 * GiB, MiB), (2 * GiB + 6000, 60000)])
        alloc = [e for e in d.allocation() if e.status.name == "DATA"]
        assert sum(e.length for e in alloc) < 64 * MiB


@pytest.mark.parametrize("opts", ["compat6=on", "adapter_type=ide", "adapter_type=lsilogic",
                                  "adapter_type=buslogic", "adapter_type=legacyESX",
                                  "zeroed_grain=on", "hwversion=7,toolsversion=1234"])
def test_qemu_options(tmp_path, qemu, opts):
    p = str(tmp_path / "o.vmdk")
    qemu.img("create", "-f", "vmdk", "-o", opts, p, "3M")
    _write_pattern(qemu, p, [(512, 100000, 9)])
    if opts == "zeroed_grain=on":
        qemu.io("-f", "vmdk", "-c", "write -z 0 65536", p)
    raw = qemu.to_raw(p, tmp_path / "o.raw").read_bytes()
    with Disk() as d:
        d.open(p, flags=OpenFlags.READ_ONLY)
        assert read_all(d) == raw
        det = d.info()["details"]
        if opts.startswith("adapter_type"):
            assert det["adapter_type"] == opts.split("=")[1]
        if opts == "compat6=on":
            assert det["virtual_hw_version"] == "6"
        if opts == "zeroed_grain=on":
            assert det["zeroed_grain"] and det["sparse_version"] == 2
            assert d.allocation()[0].status.name == "ZERO"
    if opts == "zeroed_grain=on":   # our writes keep zero grains working
        with Disk() as d:
            d.open(p)
            d.write(0, b"\x05" * 512)
            raw = bytearray(raw)
            raw[:512] = b"\x05" * 512
        assert qemu.check(p).returncode == 0
        assert qemu.to_raw(p, tmp_path / "o2.raw").read_bytes() == bytes(raw)


def test_qemu_stream_optimized_reads(tmp_path, qemu):
    src = tmp_path / "src.raw"
    data = bytearray(pattern(6 * MiB, seed=5))
    data[MiB:3 * MiB] = bytes(2 * MiB)
    src.write_bytes(bytes(data))
    p = str(tmp_path / "s.vmdk")
    qemu.img("convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", src, p)
    with Disk() as d:
        img = d.open(p, flags=OpenFlags.READ_ONLY)
        assert img.flags & ImageFlags.STREAM_OPTIMIZED
        assert read_all(d) == bytes(data)
        assert d.info()["details"]["compressed"]


# -- we write, qemu reads ----------------------------------------------------------------------
@pytest.mark.parametrize("flags", [ImageFlags.NONE, ImageFlags.FIXED, ImageFlags.SPLIT_2G,
                                   ImageFlags.SPLIT_2G | ImageFlags.FIXED, ImageFlags.ESX],
                         ids=["dynamic", "fixed", "split2g", "split2g-fixed", "esx"])
def test_our_images_check_and_compare_in_qemu(tmp_path, qemu, flags):
    size = 6 * MiB + 512 * 5
    p = str(tmp_path / "ours.vmdk")
    expect = bytearray(size)
    with Disk() as d:
        d.create_base(p, size, "VMDK", flags=flags)
        for off, data in scattered_writes(size, seed=int(flags) % 97):
            d.write(off, data)
            expect[off:off + len(data)] = data
    ref = tmp_path / "expect.raw"
    ref.write_bytes(bytes(expect))
    chk = qemu.check(p)
    assert chk.returncode == 0, chk.stdout + chk.stderr
    r = qemu.compare(p, ref, "vmdk", "raw")
    assert r.returncode == 0, r.stdout + r.stderr
    info = qemu.img("info", p).stdout
    assert "vmdk" in info


def test_our_split_sparse_5g_across_extents(tmp_path, qemu):
    p = str(tmp_path / "big.vmdk")
    regions = [(2047 * MiB - 3000, 8192, 0x11), (4094 * MiB - 512, 4096, 0x22),
               (5 * GiB - 4096, 4096, 0x33)]
    with Disk() as d:
        img = d.create_base(p, 5 * GiB, "VMDK", flags=ImageFlags.SPLIT_2G)
        assert len(img.extents) == 3
        for off, ln, b in regions:
            d.write(off, bytes([b]) * ln)
    assert qemu.check(p).returncode == 0
    args = []
    for off, ln, b in regions:
        args += ["-c", f"read -P {b} {off} {ln}"]
    args += ["-c", f"read -P 0 {3 * GiB} 65536"]
    out = qemu.io("-f", "vmdk", "-r", *args, p).stdout
    assert out.count("read ") == 4


def test_our_stream_optimized_through_qemu(tmp_path, qemu):
    size = 5 * MiB + 1024
    data = bytearray(pattern(size, seed=9))
    data[2 * MiB:3 * MiB] = bytes(MiB)
    p = str(tmp_path / "st.vmdk")
    with Disk() as d:       # sequential writes in odd-sized chunks, as a copy does
        d.create_base(p, size, "VMDK", flags=ImageFlags.STREAM_OPTIMIZED)
        pos = 0
        while pos < size:
            n = min(300000, size - pos)
            if any(data[pos:pos + n]):
                d.write(pos, bytes(data[pos:pos + n]))
            pos += n
    ref = tmp_path / "ref.raw"
    ref.write_bytes(bytes(data))
    assert qemu.check(p).returncode == 0
    assert qemu.compare(p, ref, "vmdk", "raw").returncode == 0
    assert "streamOptimized" in qemu.img("info", p).stdout
    # the copy operation writes stream images too
    q = str(tmp_path / "copy.vmdk")
    copy_image(str(ref), q, "VMDK", src_format="RAW", variant=ImageFlags.STREAM_OPTIMIZED)
    assert qemu.compare(q, ref, "vmdk", "raw").returncode == 0
    with Disk() as d:
        d.open(q, flags=OpenFlags.READ_ONLY)
        assert read_all(d) == bytes(data)


# -- chains ------------------------------------------------------------------------------------
def test_qemu_chain_reads_right(tmp_path, qemu):
    base, child = str(tmp_path / "base.vmdk"), str(tmp_path / "child.vmdk")
    qemu.img("create", "-f", "vmdk", base, "4M")
    _write_pattern(qemu, base, [(0, 2 * MiB, 0x10), (3 * MiB, 65536, 0x11)])
    qemu.img("create", "-f", "vmdk", "-b", "base.vmdk", "-F", "vmdk", child)
    _write_pattern(qemu, child, [(MiB - 512, 4096, 0x20), (3 * MiB + 100, 200, 0x21)])
    raw = qemu.to_raw(child, tmp_path / "c.raw").read_bytes()
    with Disk.open_chain(child, flags=OpenFlags.READ_ONLY) as d:
        assert len(d) == 2
        assert d.top.is_diff and d.top.parent_hint.locations == ["base.vmdk"]
        assert read_all(d) == raw
    # we write into qemu's child; qemu still reads the chain right
    with Disk.open_chain(child) as d:
        d.write(2 * MiB, b"\x77" * 70000)
    raw = bytearray(raw)
    raw[2 * MiB:2 * MiB + 70000] = b"\x77" * 70000
    assert qemu.check(child).returncode == 0
    assert qemu.to_raw(child, tmp_path / "c2.raw").read_bytes() == bytes(raw)


def test_our_chain_reads_right_in_qemu(tmp_path, qemu):
    size = 4 * MiB
    paths = [str(tmp_path / f"{n}.vmdk") for n in ("base", "s1", "s2", "s3")]
    expect = bytearray(size)
    with Disk() as d:
        d.create_base(paths[0], size, "VMDK")
        for level, p in enumerate(paths):
            if level:
                d.create_diff(p)
            for off, data in scattered_writes(size, seed=40 + level, count=8):
                d.write(off, data)
                expect[off:off + len(data)] = data
    ref = tmp_path / "ref.raw"
    ref.write_bytes(bytes(expect))
    for p in paths:
        assert qemu.check(p).returncode == 0
    r = qemu.compare(paths[-1], ref, "vmdk", "raw")
    assert r.returncode == 0, r.stdout + r.stderr
    info = qemu.img("info", "--backing-chain", paths[-1]).stdout
    assert info.count("\nfile format: vmdk") == 4


# -- the corpus --------------------------------------------------------------------------------
CORPUS_READABLE = ["vmdk/dfvfs/ext2.vmdk", "vmdk/dfvfs/image.vmdk", "vmdk/forklift/2nd_disk.vmdk",
                   "vmdk/vmdk-rs/monolithicSparse.vmdk", "vmdk/vmdk-rs/streamOptimized.vmdk",
                   "vmdk/vmdk-rs/streamOptimizedWithMarkers.vmdk",
                   "vmdk/vmdk-rs/twoGbMaxExtentSparse.vmdk", "vmdk/vmdk-rs/vmfs_thick.vmdk"]


@pytest.mark.parametrize("rel", CORPUS_READABLE)
def test_corpus_images_read_like_qemu(corpus, qemu, tmp_path, rel):
    p = str(corpus / rel)
    ref = qemu.to_raw(p, tmp_path / "ref.raw")
    size = ref.stat().st_size
    assert probe(p).name == "VMDK"
    with Disk() as d:
        img = d.open(p, flags=OpenFlags.READ_ONLY)
        assert d.size == size
        if size <= 64 * MiB:
            assert read_all(d) == ref.read_bytes()
        else:       # a big, mostly empty disk: every allocated run plus a sample of holes
            runs = d.allocation()
            assert sum(e.length for e in runs if e.status.name == "DATA") < 64 * MiB
            with open(ref, "rb") as f:
                for e in runs:
                    n = e.length if e.status.name == "DATA" else min(e.length, 65536)
                    f.seek(e.start)
                    assert d.read(e.start, n) == f.read(n), f"run at {e.start}"
        assert img.check().exit_code == 0
        assert d.info()["details"]["create_type"]
    with Disk() as d:
        d.open(p, flags=OpenFlags.INFO)
        assert d.info()["virtual_size"] == size


@pytest.mark.parametrize(
    "rel,missing",
    [
        ("vmdk/vmdk-rs/monolithicFlat.vmdk", "monolithicFlat-flat.vmdk"),
        ("vmdk/vmdk-rs/twoGbMaxExtentFlat.vmdk", "twoGbMaxExtentFlat-f001.vmdk"),
        ("vmdk/vmdk-rs/vmfs_thick-000001.vmdk", "vmfs_thick-000001-delta.vmdk"),
    ],
)
def test_corpus_descriptors_without_extents(corpus, rel, missing):
    p = str(corpus / rel)
    with pytest.raises(ImageNotFound, match=f"extent file '{missing}' not found"), Disk() as d:
        d.open(p, flags=OpenFlags.READ_ONLY)
    with Disk() as d:  # information comes from the descriptor alone
        img = d.open(p, flags=OpenFlags.INFO)
        assert img.size > 0 and img.files()[-1].endswith(missing)


def test_corpus_vmfs_sparse_child_is_linked_by_cid(corpus):
    with Disk() as d:
        img = d.open(str(corpus / "vmdk/vmdk-rs/vmfs_thick-000001.vmdk"), flags=OpenFlags.INFO)
        assert img.is_diff and img.parent_hint.locations == ["vmfs_thick.vmdk"]
        assert img.parent_cid == 0x0172E8A4
        assert img.flags & ImageFlags.ESX


def test_corpus_split_extent_alone(corpus):
    with pytest.raises(NotSupported, match="descriptor"), Disk() as d:
        d.open(
            str(corpus / "vmdk/vmdk-rs/twoGbMaxExtentSparse-s001.vmdk"), flags=OpenFlags.READ_ONLY
        )


def test_corpus_ova(corpus, qemu, tmp_path):
    with tarfile.open(corpus / "ova/forklift/2nd_disk_v3.ova") as t:
        member = t.getmember("2nd_disk.vmdk")
        (tmp_path / "2nd_disk.vmdk").write_bytes(t.extractfile(member).read())
    p = str(tmp_path / "2nd_disk.vmdk")
    ref = qemu.to_raw(str(corpus / "vmdk/forklift/2nd_disk.vmdk"), tmp_path / "ref.raw")
    with Disk() as d:
        d.open(p, flags=OpenFlags.READ_ONLY)
        assert d.size == 1 << 30
        data_runs = [e for e in d.allocation() if e.status.name == "DATA"]
        with open(ref, "rb") as f:
            for e in data_runs:
                f.seek(e.start)
                assert d.read(e.start, e.length) == f.read(e.length)
    assert qemu.compare(p, ref, "vmdk", "raw").returncode == 0


def test_corpus_corrupt_ova(corpus, tmp_path):
    with tarfile.open(corpus / "ova/forklift/2nd_disk.CORRUPT.ova") as t:
        names = t.getnames()
        inner = next(n for n in names if n.endswith(".vmdk"))
        (tmp_path / "bad.vmdk").write_bytes(t.extractfile(inner).read())
    with pytest.raises(VDError), Disk() as d:
        d.open(str(tmp_path / "bad.vmdk"), "VMDK", flags=OpenFlags.READ_ONLY)
        read_all(d)


def test_corpus_sesparse_extent(tmp_path, qemu):
    """dissect's ESXi seSparse extent (corpus 'large' file: unpacked here from its .gz)."""
    import gzip
    import shutil

    from tests.conftest import require_corpus

    ext = tmp_path / "sesparse.vmdk"
    with (
        gzip.open(require_corpus() / "vmdk/dissect/sesparse.vmdk.gz") as src,
        open(ext, "wb") as dst,
    ):
        shutil.copyfileobj(src, dst)
    with pytest.raises(NotSupported, match="seSparse"):  # an extent alone
        with Disk() as d:
            d.open(str(ext), "VMDK", flags=OpenFlags.READ_ONLY)
    desc = tmp_path / "disk.vmdk"
    desc.write_text(
        "# Disk DescriptorFile\nversion=1\nCID=11111111\nparentCID=ffffffff\n"
        'createType="seSparse"\nRW 1048576 SESPARSE "sesparse.vmdk"\n'
    )
    ref = qemu.to_raw(desc, tmp_path / "ref.raw")
    with Disk() as d:
        d.open(str(desc), flags=OpenFlags.READ_ONLY)
        assert d.size == ref.stat().st_size == 512 * MiB
        runs = d.allocation()
        assert any(e.status.name == "DATA" for e in runs)
        with open(ref, "rb") as f:
            for e in runs:
                n = e.length if e.status.name == "DATA" else min(e.length, MiB)
                f.seek(e.start)
                assert d.read(e.start, n) == f.read(n)
        with pytest.raises(VDError):
            d.top.resize(1 << 30)


def test_qemu_child_with_absolute_parent_hint(tmp_path, qemu):
    base, child = tmp_path / "base.vmdk", tmp_path / "child.vmdk"
    qemu.img("create", "-f", "vmdk", base, "2M")
    _write_pattern(qemu, str(base), [(0, 65536, 0x31)])
    qemu.img("create", "-f", "vmdk", "-b", str(base), "-F", "vmdk", child)
    _write_pattern(qemu, str(child), [(4096, 512, 0x32)])
    with Disk() as d:
        img = d.open(str(child), flags=OpenFlags.INFO)
        assert img.parent_hint.locations == [str(base)]  # stored as qemu was given it
    with Disk.open_chain(str(child), flags=OpenFlags.READ_ONLY) as d:  # found beside the child
        assert len(d) == 2
        assert d.read(0, 8192) == b"\x31" * 4096 + b"\x32" * 512 + b"\x31" * 3584
