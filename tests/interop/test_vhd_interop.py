"""VHD against qemu-img / qemu-io (qemu's "vpc" driver), both directions, and the real images of
the corpus.

qemu facts these tests rely on (qemu 7.2): the vpc driver has no check, no backing-file support
(``qemu-img create -f vpc -b base.vhd -F vpc child.vhd`` fails with "Backing file not supported
for file format 'vpc'", so chains are built through our Disk API), and its probe only looks at
offset 0, so fixed VHDs must be named with ``-f vpc``.
"""
from __future__ import annotations

import json
import os
import random
import shutil

import pytest

from tests.conftest import read_all
from vdgui.vd import Alloc, Disk, ImageFlags, OpenFlags, ParentNotFound, get_backend, vhd_chs
from vdgui.vd.formats.vhd import round_size_to_chs

MiB = 1 << 20


def _qemu_size(qemu, path) -> int:
    out = qemu.img("info", "-f", "vpc", "--output=json", path).stdout
    return json.loads(out)["virtual-size"]


def _qemu_io(qemu, path, cmds):
    args = []
    for c in cmds:
        args += ["-c", c]
    qemu.io("-f", "vpc", *args, path)


def _raw(qemu, path, tmp_path, name="q.raw") -> bytes:
    return qemu.to_raw(path, tmp_path / name, "vpc").read_bytes()


# -- qemu writes, we read ----------------------------------------------------------------------
@pytest.mark.parametrize("subformat,size", [
    ("dynamic", 12 * MiB + 5 * 512), ("dynamic", 7 * MiB), ("fixed", 9 * MiB + 512),
    ("fixed", 3 * MiB)])
def test_qemu_made_images_read_identically(qemu, tmp_path, subformat, size):
    p = tmp_path / "q.vhd"
    qemu.img("create", "-q", "-f", "vpc", "-o", f"subformat={subformat}", p, size)
    qsize = _qemu_size(qemu, p)
    assert qsize >= size
    mid = qsize // 2 // 4096 * 4096
    third = qsize // 3 // 4096 * 4096
    cmds = ["write -P 0x11 0 1M", "write -P 0x22 1536k 700k", "write -z 1600k 64k",
            f"write -P 0x33 {qsize - 4096} 4096", f"write -P 0x44 {mid} 100k", f"write -z {mid} 4k",
            f"write -z {third} 256k"]
    _qemu_io(qemu, p, cmds)
    raw = _raw(qemu, p, tmp_path)
    with Disk() as d:
        img = d.open(str(p), flags=OpenFlags.READ_ONLY)
        assert img.size == qsize == len(raw)
        assert img.flags == (ImageFlags.FIXED if subformat == "fixed" else ImageFlags.NONE)
        assert img.info()["creator_app"] == "qemu"
        assert img.pchs == vhd_chs(qsize)
        assert read_all(d) == raw
        assert not img.check().problems


@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
@pytest.mark.parametrize("size", [5 * MiB, 10 * MiB + 512, 100 * MiB + 3 * 512])
def test_qemu_force_size_not_chs_exact(qemu, tmp_path, subformat, size):
    """``force_size=on`` writes creator "qem2" and the maximum geometry: the footer's current
    size is the true size (Azure-style whole-MiB disks)."""
    assert vhd_chs(size).size != size
    p = tmp_path / "fs.vhd"
    qemu.img("create", "-q", "-f", "vpc", "-o", f"subformat={subformat},force_size=on", p, size)
    _qemu_io(qemu, p, [f"write -P 0x5c {size - 8192} 8192", "write -P 0x1d 0 512"])
    raw = _raw(qemu, p, tmp_path)
    assert _qemu_size(qemu, p) == size == len(raw)
    with Disk() as d:
        img = d.open(str(p), flags=OpenFlags.READ_ONLY)
        assert img.size == size
        assert img.info()["size_source"] == "current size"
        assert img.info()["creator_app"] == "qem2"
        assert read_all(d) == raw


# -- we write, qemu reads ------------------------------------------------------------------------
def _fill(d: Disk, seed: int, count: int = 12) -> bytearray:
    expect = bytearray(d.size)
    rnd = random.Random(seed)
    for i in range(count):
        ln = rnd.choice([512, 4096, 70000 // 512 * 512, MiB, 3 * MiB // 2])
        off = rnd.randrange(0, (d.size - ln) // 512) * 512
        data = bytes([i * 19 % 255 + 1]) * ln if i % 4 else bytes(ln)
        d.write(off, data)
        expect[off:off + ln] = data
    d.write(d.size - 512, b"\xee" * 512)
    expect[-512:] = b"\xee" * 512
    return expect


@pytest.mark.parametrize("variant,size", [
    (ImageFlags.NONE, 11 * MiB + 7 * 512), (ImageFlags.NONE, 64 * MiB),
    (ImageFlags.FIXED, round_size_to_chs(6 * MiB)[0])])
def test_our_images_compare_identical_in_qemu(qemu, tmp_path, variant, size):
    p = tmp_path / "ours.vhd"
    with Disk() as d:
        d.create_base(str(p), size, "VHD", flags=variant)
        assert d.size == round_size_to_chs(size)[0] if variant == ImageFlags.NONE else size
        expect = _fill(d, seed=size)
        d.flush()
    ref = tmp_path / "expect.raw"
    ref.write_bytes(bytes(expect))
    assert _qemu_size(qemu, p) == len(expect)
    r = qemu.compare(p, ref, "vpc", "raw")
    assert r.returncode == 0, r.stdout + r.stderr
    assert _raw(qemu, p, tmp_path, "back.raw") == bytes(expect)


def test_our_fixed_disk_keeps_exact_size(qemu, tmp_path):
    """A fixed disk of a size no CHS geometry describes (5 MiB, whole-MiB as Azure wants) keeps
    its exact size. qemu 7.2 sizes fixed disks of creators outside its current-size list by the
    geometry, so the footer carries the maximum geometry (qemu's force_size convention) and qemu
    sees the exact size too."""
    p = tmp_path / "azure.vhd"
    with Disk() as d:
        img = d.create_base(str(p), 5 * MiB, "VHD", flags=ImageFlags.FIXED)
        assert d.size == 5 * MiB and img.pchs == (65535, 16, 255)
        expect = _fill(d, seed=5)
    assert os.path.getsize(p) == 5 * MiB + 512
    assert _qemu_size(qemu, p) == 5 * MiB
    assert _raw(qemu, p, tmp_path) == bytes(expect)
    with Disk() as d:                               # growing to a CHS-exact size: spec geometry
        img = d.open(str(p))
        img.resize(round_size_to_chs(6 * MiB)[0])
        assert img.pchs == vhd_chs(img.size)
        expect += bytes(img.size - len(expect))
    assert _qemu_size(qemu, p) == len(expect)
    assert _raw(qemu, p, tmp_path, "r2.raw") == bytes(expect)


def test_sizes_agree_with_qemu_for_many_requests(qemu, tmp_path):
    """Our dynamic disks round up to a CHS-exact size exactly as qemu does."""
    for i, req in enumerate([512, 1000 * 512, 5 * MiB, 33 * MiB + 512, 1 << 30, 3 << 30]):
        ours = tmp_path / f"o{i}.vhd"
        theirs = tmp_path / f"t{i}.vhd"
        with Disk() as d:
            d.create_base(str(ours), req, "VHD")
        qemu.img("create", "-q", "-f", "vpc", theirs, req)
        assert _qemu_size(qemu, ours) == _qemu_size(qemu, theirs)
        with Disk() as d:
            assert d.open(str(ours), flags=OpenFlags.READ_ONLY).size == _qemu_size(qemu, theirs)


# -- chains ----------------------------------------------------------------------------------
def test_chain_of_four_through_disk_api(qemu, tmp_path):
    """Base + 3 differencing disks written through the Disk API. qemu 7.2 cannot make the top of
    a VHD chain (``qemu-img create -f vpc -b base.vhd -F vpc child.vhd`` fails: "Backing file not
    supported for file format 'vpc'") nor read one, so the chain is built and read by us and
    compared with the expected bytes; the base alone is compared with qemu."""
    paths = [str(tmp_path / n) for n in ("base.vhd", "s1.vhd", "s2.vhd", "s3.vhd")]
    levels = []
    with Disk() as d:
        d.create_base(paths[0], 9 * MiB, "VHD")
        expect = bytearray(d.size)
        for lv, p in enumerate(paths):
            if lv:
                d.create_diff(p)
            rnd = random.Random(lv)
            for i in range(6):
                off = rnd.randrange(0, d.size // 512 - 300) * 512
                n = rnd.choice([512, 3 * 512, 65536, 140000 // 512 * 512])
                data = bytes([lv * 40 + i + 1]) * n
                d.write(off, data)
                expect[off : off + len(data)] = data
            levels.append(bytes(expect))
    with Disk.open_chain(paths[-1], flags=OpenFlags.READ_ONLY) as d:
        assert len(d) == 4 and read_all(d) == levels[-1]
        for lv in range(4):
            assert d.read(0, d.size, top=lv) == levels[lv]
        for img in d.images:
            assert img.check().exit_code == 0
    (tmp_path / "l0.raw").write_bytes(levels[0])
    assert qemu.compare(paths[0], tmp_path / "l0.raw", "vpc", "raw").returncode == 0


def test_diff_over_qemu_made_base(qemu, tmp_path):
    base = tmp_path / "qbase.vhd"
    qemu.img("create", "-q", "-f", "vpc", base, 6 * MiB)
    _qemu_io(qemu, base, ["write -P 0x61 0 2M", "write -P 0x62 4M 512k"])
    raw = bytearray(_raw(qemu, base, tmp_path))
    child = str(tmp_path / "child.vhd")
    with Disk() as d:
        d.open(str(base), flags=OpenFlags.READ_ONLY)
        d.create_diff(child, "VHD")
        d.write(MiB, b"\x70" * 4096)
    raw[MiB : MiB + 4096] = b"\x70" * 4096
    with Disk.open_chain(child, flags=OpenFlags.READ_ONLY) as d:
        assert read_all(d) == bytes(raw)


# -- hooks checked by qemu -----------------------------------------------------------------------
def test_compact_resize_repair_then_qemu_compare(qemu, tmp_path):
    p = tmp_path / "h.vhd"
    with Disk() as d:
        d.create_base(str(p), 20 * MiB, "VHD")
        expect = _fill(d, seed=77)
        d.top.honor_zeroes = True
        d.write(6 * MiB, bytes(2 * MiB))  # a whole block of zeroes: compact drops it
        expect[6 * MiB : 8 * MiB] = bytes(2 * MiB)
    ref = tmp_path / "e.raw"

    def agree():
        ref.write_bytes(bytes(expect))
        assert _qemu_size(qemu, p) == len(expect)
        r = qemu.compare(p, ref, "vpc", "raw")
        assert r.returncode == 0, r.stdout + r.stderr

    agree()
    before = os.path.getsize(p)
    with Disk() as d:
        d.open(str(p)).compact()
    assert os.path.getsize(p) < before
    agree()
    with Disk() as d:
        img = d.open(str(p))
        img.resize(300 * MiB)  # the BAT grows: first blocks relocate
        expect += bytes(img.size - len(expect))
        d.write(299 * MiB, b"\x42" * 4096)
        expect[299 * MiB : 299 * MiB + 4096] = b"\x42" * 4096
    agree()
    b = bytearray(p.read_bytes())  # damage the end footer: repair from the copy
    b[-512 + 9] ^= 0x40
    p.write_bytes(bytes(b))
    with Disk() as d:
        img = d.open(str(p))
        assert img.check().exit_code == 2
        assert img.check(repair=True).repaired
    agree()


def test_fixed_resize_then_qemu(qemu, tmp_path):
    p = tmp_path / "fr.vhd"
    size = round_size_to_chs(4 * MiB)[0]
    new = round_size_to_chs(7 * MiB)[0]
    with Disk() as d:
        d.create_base(str(p), size, "VHD", flags=ImageFlags.FIXED)
        expect = _fill(d, seed=3, count=5)
        d.top.resize(new)
        expect += bytes(new - size)
    (tmp_path / "e.raw").write_bytes(bytes(expect))
    assert _qemu_size(qemu, p) == new
    assert qemu.compare(p, tmp_path / "e.raw", "vpc", "raw").returncode == 0


# -- the corpus ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,disk_type,creator",
    [
        ("vhd/dissect/dynamic.vhd", "dynamic", "win "),
        ("vhd/dissect/fixed.vhd", "fixed", "win "),
        ("vhd/node-vhd/fixed.vhd", "fixed", "win "),
        ("vhd/dfvfs/ext2.vhd", "dynamic", "qemu"),
    ],
)
def test_corpus_images_read_like_qemu(qemu, corpus, tmp_path, name, disk_type, creator):
    p = corpus / name
    raw = _raw(qemu, p, tmp_path)
    with Disk() as d:
        img = d.open(str(p), flags=OpenFlags.READ_ONLY)
        info = img.info()
        assert info["disk_type"] == disk_type and info["creator_app"] == creator
        assert img.size == len(raw)
        assert read_all(d) == raw
        assert img.check().exit_code == 0


def test_corpus_qemu_images_with_bad_checksums(qemu, corpus, tmp_path):
    """dfvfs's image.vhd / image-differential.vhd: qemu refuses them ("Incorrect header
    checksum"); the data is sound, so we read them, report the checksums in check, and after our
    repair qemu reads them too and agrees."""
    src = corpus / "vhd" / "dfvfs"
    work = tmp_path / "w"
    work.mkdir()
    for n in ("image.vhd", "image-differential.vhd"):
        shutil.copy(src / n, work / n)
    assert qemu.img("info", "-f", "vpc", work / "image.vhd", check=False).returncode != 0
    with Disk.open_chain(str(work / "image-differential.vhd"), flags=OpenFlags.READ_ONLY) as d:
        assert len(d) == 2 and d.size == 104448
        assert d.images[1].parent_uuid == d.images[0].uuid
        assert bytes(d.images[0].uuid.bytes_le).hex().startswith("d49c5c80")
        chain = read_all(d)
        base_only = d.read(0, d.size, top=0)
        own = [(e.start, e.length) for e in d.allocation() if e.level == 1]
        for img in d.images:
            rep = img.check()
            assert rep.exit_code == 2 and any("checksum" in x.what for x in rep.problems)
    for n in ("image.vhd", "image-differential.vhd"):
        with Disk() as d:
            img = d.open(
                str(work / n), flags=OpenFlags.NORMAL if n == "image.vhd" else OpenFlags.INFO
            )
            if n != "image.vhd":
                d.close()
                img = get_backend("VHD").open(str(work / n), OpenFlags.NORMAL)
            assert img.check(repair=True).repaired
            assert img.check().exit_code == 0
            if n != "image.vhd":
                img.close()
    assert _raw(qemu, work / "image.vhd", tmp_path, "b.raw") == base_only
    diff_raw = _raw(qemu, work / "image-differential.vhd", tmp_path, "d.raw")  # qemu: no parent
    expect = bytearray(base_only)
    for s, n in own:
        expect[s : s + n] = diff_raw[s : s + n]
    assert chain == bytes(expect)
    with Disk.open_chain(str(work / "image-differential.vhd"), flags=OpenFlags.READ_ONLY) as d:
        assert read_all(d) == chain


def test_corpus_windows_diff_with_missing_parent(corpus):
    p = corpus / "vhd" / "dfvfs" / "fat-differential.vhd"
    with Disk() as d:
        img = d.open(str(p), flags=OpenFlags.INFO)
        info = img.info()
        assert info["disk_type"] == "differencing" and info["creator_app"] == "win "
        assert info["parent_name"] == "C:\\Projects\\dfvfs\\test_data\\fat-parent.vhd"
        assert img.parent_hint.locations[0] == ".\\fat-parent.vhd"
        assert img.parent_hint.locations[1] == "C:\\Projects\\dfvfs\\test_data\\fat-parent.vhd"
        assert img.size == 4 * MiB and img.check().exit_code == 0
        runs = img.block_status(0, img.size)
        assert any(st == Alloc.DATA for _s, _n, st in runs)
        assert any(st == Alloc.UNALLOCATED for _s, _n, st in runs[:3])  # sector-granular
    with pytest.raises(ParentNotFound) as ei:
        Disk.open_chain(str(p), flags=OpenFlags.READ_ONLY)
    msg = str(ei.value)
    assert "fat-parent.vhd" in msg and str(p) in msg and "looked for" in msg and "UUID" in msg


def test_converted_blocks_appended_in_batches_read_identically_in_qemu(qemu, tmp_path):
    """vdgui-img convert into a dynamic VHD (new blocks appended several per write, only
    their non-zero 64 KiB pieces stored): qemu reads the source's bytes, and blocks qemu
    allocates afterwards land past ours."""
    from vdgui.vd import copy_image

    rnd = random.Random(18)
    size = 40 * MiB
    src = bytearray(size)
    for blk in rnd.sample(range(size // (2 * MiB)), 8):          # whole blocks
        src[blk * 2 * MiB:(blk + 1) * 2 * MiB] = rnd.randbytes(2 * MiB)
    for _ in range(30):                                          # specks, some unaligned
        off = rnd.randrange(0, size - 70000) // 512 * 512
        n = rnd.choice([512, 4096, 64 << 10, 65536 + 512])
        src[off:off + n] = rnd.randbytes(n)
    raw = tmp_path / "src.raw"
    raw.write_bytes(bytes(src))
    p = tmp_path / "out.vhd"
    copy_image(str(raw), str(p), "VHD", src_format="RAW")
    r = qemu.compare(p, raw, "vpc", "raw")
    assert r.returncode == 0, r.stdout + r.stderr
    qemu.io("-f", "vpc", "-c", "write -P 0x3c 38M 1M", p)
    src[38 * MiB:39 * MiB] = b"\x3c" * MiB
    with Disk() as d:
        d.open(str(p), flags=OpenFlags.READ_ONLY)
        assert bytes(read_all(d)[:size]) == bytes(src)
        assert d.top.check().exit_code == 0
