"""VHD backend: conformance, on-disk structures, CHS geometry, size rules, metadata, corruption
handling and the compact/resize/check/relink hooks (engine-only; qemu interop lives in
tests/interop/test_vhd_interop.py)."""
from __future__ import annotations

import os
import random
import struct
import uuid
from pathlib import Path

import pytest

from tests.conftest import read_all
from tests.engine import kill_harness as kh
from tests.formats.conformance import FormatConformance
from vdgui.vd import (
    Alloc,
    Cap,
    CorruptImage,
    Disk,
    Geometry,
    ImageFlags,
    InvalidArgument,
    NotSupported,
    OpenFlags,
    Operation,
    ParentNotFound,
    VDError,
    get_backend,
    probe,
    vhd_chs,
)
from vdgui.vd.formats import vhd
from vdgui.vd.formats.vhd import (
    DYN_HEADER,
    FOOTER,
    PARENT_LOCATOR,
    bitmap_runs,
    checksum,
    round_size_to_chs,
    set_bits,
)

MiB = 1 << 20


class TestVhdConformance(FormatConformance):
    FORMAT = "VHD"
    EXT = "vhd"
    VARIANTS = (ImageFlags.NONE, ImageFlags.FIXED)
    DIFF = True
    UUID = True
    COMMENT = False


# -- declarations ---------------------------------------------------------------------------------
def test_declarations_as_virtualbox():
    b = get_backend("vpc")
    assert b.name == "VHD"
    assert b.caps == (Cap.UUID | Cap.DIFF | Cap.FILE | Cap.CREATE_FIXED | Cap.CREATE_DYNAMIC
                      | Cap.ASYNC | Cap.VFS | Cap.PREFERRED)
    assert [fe.ext for fe in b.extensions] == ["vhd"]
    assert b.create_flags == ImageFlags.FIXED
    for op in (Operation.WRITE, Operation.CREATE, Operation.COMPACT, Operation.RESIZE,
               Operation.CHECK, Operation.REPAIR, Operation.RELINK):
        assert b.can(op)


# -- structures -----------------------------------------------------------------------------------
def _made(tmp_path, name="s.vhd", size=3 * MiB, flags=ImageFlags.NONE):
    p = str(tmp_path / name)
    with Disk() as d:
        d.create_base(p, size, "VHD", flags=flags)
    return p


def test_struct_sizes_and_round_trips(tmp_path):
    assert FOOTER.sizeof() == 512 and DYN_HEADER.sizeof() == 1024 and PARENT_LOCATOR.sizeof() == 24
    p = _made(tmp_path)
    raw = Path(p).read_bytes()
    for struct_, blob in ((FOOTER, raw[:512]), (FOOTER, raw[-512:]), (DYN_HEADER, raw[512:1536]),
                          (PARENT_LOCATOR, raw[512 + 576:512 + 600])):
        assert struct_.build(struct_.parse(blob)) == blob
    rnd = random.Random(5)
    for struct_, n in ((FOOTER, 512), (DYN_HEADER, 1024), (PARENT_LOCATOR, 24)):
        blob = bytes(rnd.randrange(256) for _ in range(n))
        assert struct_.build(struct_.parse(blob)) == blob


def test_written_fields_and_checksums(tmp_path):
    p = _made(tmp_path, size=10 * MiB)
    raw = Path(p).read_bytes()
    foot = FOOTER.parse(raw[-512:])
    assert raw[:512] == raw[-512:]
    assert foot.cookie == b"conectix" and foot.features == 2 and foot.version == 0x10000
    assert foot.creator_app == b"vbox" and foot.creator_os == b"Wi2k"
    assert foot.disk_type == 3 and foot.data_offset == 512
    assert foot.checksum == checksum(raw[-512:], 64)
    hdr = DYN_HEADER.parse(raw[512:1536])
    assert hdr.cookie == b"cxsparse" and hdr.block_size == 2 * MiB and hdr.table_offset == 1536
    assert hdr.data_offset == 0xFFFFFFFFFFFFFFFF
    assert hdr.max_table_entries == -(-round_size_to_chs(10 * MiB)[0] // (2 * MiB)) == 6
    assert hdr.checksum == checksum(raw[512:1536], 36)
    # 10 MiB is CHS-exact? 10 MiB -> 301/4/17 = 10483712 (floor); rounding goes up
    assert (foot.cylinders, foot.heads, foot.sectors) == round_size_to_chs(10 * MiB)[1]
    assert foot.current_size == foot.cylinders * foot.heads * foot.sectors * 512 >= 10 * MiB


# -- geometry -------------------------------------------------------------------------------------
@pytest.mark.parametrize("size,chs", [
    # the specification's algorithm (Appendix "CHS Calculation"), checked against real images:
    (10 * MiB, (301, 4, 17)),            # Windows-made 10 MiB disks (dissect, node-vhd corpus)
    (4 * MiB, (120, 4, 17)),             # Windows-made fat-differential.vhd
    (4212736, (121, 4, 17)),             # qemu-made ext2.vhd
    (104448, (3, 4, 17)),                # qemu-made image.vhd
    (1 << 30, (2080, 16, 63)),           # spt 17 -> 31 -> 63 switch
    (127 * (1 << 30), (65278, 16, 255)),  # >= 65535*16*63 sectors: 255 sectors per track
    (65535 * 16 * 255 * 512, (65535, 16, 255)),
    (2040 * (1 << 30), (65535, 16, 255)),  # capped at the maximum geometry
    (512 * 17 * 4 * 1023, (1023, 4, 17)),
    (512 * 17 * 4 * 1024, (140, 16, 31)),   # cth == heads*1024 -> 31 spt, 16 heads
    (512 * 17 * 5 * 1024 - 512 * 17, (1023, 5, 17)),  # heads = ceil(5119/1024) = 5
    (512 * 17 * 16 * 1024, (561, 16, 31)),
])
def test_vhd_chs_specification(size, chs):
    assert tuple(vhd_chs(size)) == chs


def test_round_size_to_chs():
    for size in (512, 5 * MiB, 5 * MiB + 3584, 100 * MiB, 3 * (1 << 30) + 512):
        rounded, g = round_size_to_chs(size)
        assert rounded >= size and rounded == g.cylinders * g.heads * g.sectors * 512
        assert tuple(vhd_chs(rounded)) == tuple(g)
        # smallest such: one sector less is below the request or not CHS-exact
    big = 200 * (1 << 30)
    assert round_size_to_chs(big) == (big, Geometry(65535, 16, 255))


# -- bitmaps ----------------------------------------------------------------------------------
def test_bitmap_runs_and_set_bits():
    bm = bytearray(512)
    assert bitmap_runs(bm, 0, 4096) == [(0, 4096, False)]
    assert set_bits(bm, 3, 10) == (0, 2)
    assert bm[:2] == bytes([0b00011111, 0b11111000])
    assert set_bits(bm, 3, 10) is None
    assert bitmap_runs(bm, 0, 16) == [(0, 3, False), (3, 10, True), (13, 3, False)]
    assert bitmap_runs(bm, 5, 4) == [(5, 4, True)]
    set_bits(bm, 4090, 6)
    assert bitmap_runs(bm, 4080, 16) == [(4080, 10, False), (4090, 6, True)]
    rnd = random.Random(3)
    ref = [False] * 4096
    bm = bytearray(512)
    for _ in range(40):
        a = rnd.randrange(4096)
        n = rnd.randrange(1, 4096 - a + 1)
        set_bits(bm, a, n)
        ref[a:a + n] = [True] * n
    first, cnt = 100, 3000
    expanded = []
    for _s, k, on in bitmap_runs(bm, first, cnt):
        expanded += [on] * k
    assert expanded == ref[first:first + cnt]


def test_sector_granular_allocation(tmp_path):
    p = str(tmp_path / "bits.vhd")
    with Disk() as d:
        d.create_base(p, 4 * MiB, "VHD")
        d.write(1024, b"\x11" * 512)
        d.write(4096, b"\x22" * 1536)
        runs = d.top.block_status(0, 8192)
        assert runs == [(0, 1024, Alloc.UNALLOCATED), (1024, 512, Alloc.DATA),
                        (1536, 2560, Alloc.UNALLOCATED), (4096, 1536, Alloc.DATA),
                        (5632, 2560, Alloc.UNALLOCATED)]
        d.write(2 * MiB + 512, bytes(512))          # zeroes into an unallocated base block: skipped
        assert d.top.block_status(2 * MiB, 2 * MiB) == [(2 * MiB, 2 * MiB, Alloc.UNALLOCATED)]
    raw = Path(p).read_bytes()
    bat = struct.unpack(">I", raw[1536:1540])[0]
    assert raw[bat * 512:bat * 512 + 2] == bytes([0b00100000, 0b11100000])   # MSB = first sector
    bm = raw[bat * 512:bat * 512 + 512]
    assert bitmap_runs(bm, 0, 16) == [(0, 2, False), (2, 1, True), (3, 5, False), (8, 3, True),
                                     (11, 5, False)]


# -- size rules ----------------------------------------------------------------------------------
def _patch_footer(path, **fields):
    """Rewrite footer fields (both copies for dynamic disks) with a correct checksum."""
    b = bytearray(Path(path).read_bytes())
    offs = [len(b) - 512] + ([0] if b[:8] == b"conectix" else [])
    for off in offs:
        f = FOOTER.parse(bytes(b[off:off + 512]))
        for k, v in fields.items():
            f[k] = v
        raw = bytearray(FOOTER.build(f))
        raw[64:68] = checksum(raw, 64).to_bytes(4, "big")
        b[off:off + 512] = raw
    Path(path).write_bytes(bytes(b))


@pytest.mark.parametrize("creator,expect_current", [
    (b"win ", True), (b"qem2", True), (b"d2v ", True), (b"CTXS", True), (b"tap\x00", True),
    (b"vpc ", False), (b"vbox", False), (b"qemu", False), (b"xyz ", False)])
def test_size_rule_by_creator(tmp_path, creator, expect_current):
    p = _made(tmp_path, size=6 * MiB)
    # current size larger than the geometry says (within the BAT)
    _patch_footer(p, creator_app=creator, current_size=6 * MiB, cylinders=100, heads=4, sectors=17)
    with Disk() as d:
        d.open(p, flags=OpenFlags.READ_ONLY)
        assert d.size == (6 * MiB if expect_current else 100 * 4 * 17 * 512)
        want = "current size" if expect_current else "geometry"
        assert d.info()["details"]["size_source"] == want


def test_size_rule_fixed_and_max_geometry(tmp_path):
    p = _made(tmp_path, "f.vhd", size=5 * MiB, flags=ImageFlags.FIXED)
    _patch_footer(p, creator_app=b"vpc ", cylinders=10, heads=4, sectors=17)
    with Disk() as d:
        d.open(p, flags=OpenFlags.READ_ONLY)
        assert d.size == 5 * MiB  # fixed: the footer's current size
    q = _made(tmp_path, "m.vhd", size=6 * MiB)
    _patch_footer(
        q, creator_app=b"vbox", current_size=6 * MiB, cylinders=65535, heads=16, sectors=255
    )
    with Disk() as d:
        d.open(q, flags=OpenFlags.READ_ONLY)
        assert d.size == 6 * MiB  # maximum geometry: the current size


def test_fixed_keeps_exact_size_dynamic_rounds(tmp_path):
    with Disk() as d:
        img = d.create_base(str(tmp_path / "f.vhd"), 5 * MiB, "VHD", flags=ImageFlags.FIXED)
        assert d.size == 5 * MiB and "size_rounded_from" not in img.info()
        assert img.pchs == (65535, 16, 255)  # no CHS is exact: current size for everyone
    assert os.path.getsize(tmp_path / "f.vhd") == 5 * MiB + 512
    with Disk() as d:
        img = d.create_base(str(tmp_path / "d.vhd"), 5 * MiB, "VHD")
        assert d.size == 5257216 and img.info()["size_rounded_from"] == 5 * MiB


# -- metadata ------------------------------------------------------------------------------------
def test_uuid_mapping_and_unsupported_fields(tmp_path):
    p = _made(tmp_path)
    u = uuid.uuid4()
    with Disk() as d:
        img = d.open(p)
        d.set_uuid(0, u)
        for setter in (
            lambda: d.set_modification_uuid(0, uuid.uuid4()),
            lambda: d.set_parent_modification_uuid(0, uuid.uuid4()),
            lambda: d.set_comment(0, "x"),
            lambda: d.set_lchs(0, Geometry(1, 2, 3)),
            lambda: d.set_parent_uuid(0, uuid.uuid4()),
        ):
            with pytest.raises(NotSupported):
                setter()
        with pytest.raises(InvalidArgument):  # would change the size readers compute
            d.set_pchs(0, Geometry(10, 4, 17))
        assert img.pchs == vhd_chs(img.size)
    raw = Path(p).read_bytes()
    assert raw[-512 + 68 : -512 + 84] == u.bytes_le and raw[68:84] == u.bytes_le
    with Disk() as d:
        assert d.open(p, flags=OpenFlags.READ_ONLY).uuid == u


def test_diff_header_fields(tmp_path):
    base, child = str(tmp_path / "base.vhd"), str(tmp_path / "child.vhd")
    with Disk() as d:
        b = d.create_base(base, 4 * MiB, "VHD")
        d.write(0, b"\x01" * 4096)
        c = d.create_diff(child)
        assert c.parent_uuid == b.uuid and c.size == b.size
        info = d.info()
        assert info["details"]["disk_type"] == "differencing"
    raw = Path(child).read_bytes()
    foot = FOOTER.parse(raw[-512:])
    hdr = DYN_HEADER.parse(raw[512:1536])
    assert foot.disk_type == 4
    assert hdr.parent_name.decode("utf-16-be").rstrip("\0") == "base.vhd"
    assert hdr.parent_uuid == b.uuid.bytes_le
    assert abs(hdr.parent_timestamp + vhd.VHD_EPOCH - os.stat(base).st_mtime) < 5
    locs = {
        bytes(loc.code): raw[loc.data_offset : loc.data_offset + loc.data_length].decode(
            "utf-16-le"
        )
        for loc in hdr.locators
        if loc.data_length
    }
    assert locs[b"W2ru"] == ".\\base.vhd"
    assert locs[b"W2ku"] == os.path.abspath(base)
    assert all(loc.data_space >= loc.data_length for loc in hdr.locators)
    assert hdr.checksum == checksum(raw[512:1536], 36)
    # relative name first: the chain is found after moving both files
    os.mkdir(tmp_path / "moved")
    for n in ("base.vhd", "child.vhd"):
        os.rename(tmp_path / n, tmp_path / "moved" / n)
    with Disk.open_chain(str(tmp_path / "moved" / "child.vhd"), flags=OpenFlags.READ_ONLY) as d:
        assert len(d) == 2 and d.read(0, 4096) == b"\x01" * 4096


def test_diff_reads_parent_per_sector(tmp_path):
    base, child = str(tmp_path / "b.vhd"), str(tmp_path / "c.vhd")
    with Disk() as d:
        d.create_base(base, 4 * MiB, "VHD")
        d.write(0, b"\xaa" * (1 * MiB))
        d.create_diff(child)
        d.write(512, b"\xbb" * 512)
        d.write(2048, bytes(512))  # zeroes in a diff hide the parent
        exp = bytearray(b"\xaa" * 4096)
        exp[512:1024] = b"\xbb" * 512
        exp[2048:2560] = bytes(512)
        assert d.read(0, 4096) == bytes(exp)
        ext = d.allocation(0, 4096)
        assert [(e.start, e.length, e.level) for e in ext] == [
            (0, 512, 0),
            (512, 512, 1),
            (1024, 1024, 0),
            (2048, 512, 1),
            (2560, 1536, 0),
        ]


def test_set_parent_relink_and_make_base(tmp_path):
    a, b, c = (str(tmp_path / n) for n in ("a.vhd", "b.vhd", "c.vhd"))
    with Disk() as d:
        d.create_base(a, 4 * MiB, "VHD")
        d.write(0, b"\x01" * 8192)
        d.create_diff(b)
        d.write(4096, b"\x02" * 4096)
        d.create_diff(c)
        d.write(0, b"\x03" * 512)
        expect = d.read(0, d.size)
    # fold b into a by hand (copy b's sectors), then relink c onto a
    with Disk() as d:
        d.open(a)
        d.write(4096, b"\x02" * 4096)
    with Disk() as d:
        pa = d.open(a, flags=OpenFlags.READ_ONLY)
        d2 = Disk()
        img_c = get_backend("VHD").open(c, OpenFlags.NORMAL)
        img_c.set_parent(pa)
        assert img_c.parent_uuid == pa.uuid
        img_c.close()
        d2.close()
    os.unlink(b)
    with Disk.open_chain(c, flags=OpenFlags.READ_ONLY) as d:
        assert len(d) == 2 and read_all(d) == expect
    # None: c becomes a dynamic base disk (its own sectors only)
    img_c = get_backend("VHD").open(c, OpenFlags.NORMAL)
    img_c.set_parent(None)
    img_c.close()
    with Disk() as d:
        img = d.open(c, flags=OpenFlags.READ_ONLY)
        assert not img.is_diff and img.flags == ImageFlags.NONE
        assert d.read(0, 1024) == b"\x03" * 512 + bytes(512)
        assert d.top.check().exit_code == 0


def test_parent_not_found_names_what_was_looked_for(tmp_path):
    base, child = str(tmp_path / "gone.vhd"), str(tmp_path / "kid.vhd")
    with Disk() as d:
        d.create_base(base, 4 * MiB, "VHD")
        d.create_diff(child)
    os.unlink(base)
    with pytest.raises(ParentNotFound) as ei:
        Disk.open_chain(child, flags=OpenFlags.READ_ONLY)
    assert "gone.vhd" in str(ei.value)


# -- corruption ------------------------------------------------------------------------------------
def _bytes(p):
    return bytearray(Path(p).read_bytes())


def _put(p, b):
    Path(p).write_bytes(bytes(b))


def _open_read(p):
    with Disk() as d:
        d.open(p, "VHD", flags=OpenFlags.READ_ONLY)
        return read_all(d)


@pytest.fixture
def written(tmp_path):
    p = str(tmp_path / "w.vhd")
    with Disk() as d:
        d.create_base(p, 6 * MiB, "VHD")
        d.write(0, b"\x5a" * MiB)
        d.write(3 * MiB, b"\xa5" * MiB)
        content = read_all(d)
    return p, content


def test_bad_footer_uses_backup_copy_and_repair(written):
    p, content = written
    b = _bytes(p)
    b[-512 + 20] ^= 0xFF  # footer damaged (checksum no longer matches)
    _put(p, b)
    assert _open_read(p) == content
    with Disk() as d:
        img = d.open(p)
        assert img.info()["footer"] == "copy at offset 0"
        rep = img.check(repair=False)
        assert rep.exit_code == 2 and any("footer" in x.what for x in rep.problems)
        rep = img.check(repair=True)
        assert rep.repaired and all(x.repaired for x in rep.problems)
    with Disk() as d:
        img = d.open(p)
        assert img.check().exit_code == 0 and read_all(d) == content
    b = _bytes(p)
    assert b[:512] == b[-512:]


def test_missing_end_footer(written):
    p, content = written
    b = _bytes(p)
    b[-512:] = bytes(512)
    _put(p, b)
    assert _open_read(p) == content
    with Disk() as d:
        img = d.open(p)
        assert img.check().exit_code == 2
        img.check(repair=True)
    with Disk() as d:
        assert d.open(p).check().exit_code == 0 and read_all(d) == content


def test_header_checksum_reported_and_repaired(written):
    p, content = written
    b = _bytes(p)
    b[512 + 36] ^= 1
    _put(p, b)
    assert _open_read(p) == content
    with Disk() as d:
        img = d.open(p)
        rep = img.check(dry_run=True, repair=True)
        assert rep.exit_code == 2 and not rep.repaired
        assert "dynamic disk header checksum" in rep.problems[0].what
        img.check(repair=True)
    b2 = _bytes(p)
    assert b2[512 + 36 : 512 + 40] == checksum(b2[512:1536], 36).to_bytes(4, "big")


def test_bat_entry_past_end_and_overlapping(tmp_path):
    p = str(tmp_path / "bat.vhd")
    with Disk() as d:
        d.create_base(p, 10 * MiB, "VHD")
        d.write(0, b"\x5a" * MiB)
        d.write(4 * MiB, b"\xa5" * MiB)
        content = read_all(d)
    b = _bytes(p)
    e0 = struct.unpack(">I", b[1536:1540])[0]
    b[1536 + 4 : 1540 + 4] = struct.pack(">I", 0x00FFFFFF)  # block 1 points far past the end
    b[1536 + 12 : 1540 + 12] = struct.pack(">I", e0 + 8)  # block 3 overlaps block 0
    _put(p, b)
    with pytest.raises(CorruptImage) as ei:
        _open_read(p)
    assert "BAT entry" in str(ei.value) and p in str(ei.value)
    with Disk() as d:
        img = d.open(p)
        rep = img.check()
        whats = " | ".join(x.what for x in rep.problems)
        assert rep.exit_code == 2 and "past the end" in whats and "overlaps" in whats
        img.check(repair=True)
    with Disk() as d:
        img = d.open(p)
        assert img.check().exit_code == 0
        data = read_all(d)
    assert data == content


@pytest.mark.parametrize(
    "where,value,what",
    [
        (-512 + 60, struct.pack(">I", 9), "disk type"),
        (512 + 32, struct.pack(">I", 3000), "block size"),
        (512 + 28, struct.pack(">I", 1), "max table entries"),
        (512 + 16, struct.pack(">Q", 1 << 40), "table offset"),
        (512, b"xxxxxxxx", "cookie"),
    ],
)
def test_bad_fields_name_the_field(written, where, value, what):
    p, _ = written
    b = _bytes(p)
    for off in [where, where + len(b)] if where < 0 and what == "disk type" else [where]:
        if off < 0:
            off += len(b)
        b[off : off + len(value)] = value
    if what == "disk type":  # both footer copies, checksums fixed
        for off in (0, len(b) - 512):
            b[off + 64 : off + 68] = bytes(4)
            b[off + 64 : off + 68] = checksum(b[off : off + 512], 64).to_bytes(4, "big")
    _put(p, b)
    with pytest.raises(CorruptImage) as ei:
        _open_read(p)
    assert what in str(ei.value) and p in str(ei.value)


def test_fuzzed_images_only_raise_vderror(tmp_path, written):
    p, _ = written
    orig = bytes(_bytes(p))
    bad = str(tmp_path / "fuzz.vhd")
    rnd = random.Random(99)
    regions = [(0, 512), (512, 1536), (1536, 2048), (len(orig) - 512, len(orig))]
    for i in range(250):
        b = bytearray(orig)
        for _ in range(rnd.choice([1, 2, 4, 16])):
            a, e = rnd.choice(regions)
            b[rnd.randrange(a, e)] = rnd.randrange(256)
        if i % 3 == 0:  # keep checksums right so deeper fields get parsed
            for off in (0, len(b) - 512):
                b[off + 64 : off + 68] = bytes(4)
                b[off + 64 : off + 68] = checksum(b[off : off + 512], 64).to_bytes(4, "big")
            b[512 + 36 : 512 + 40] = bytes(4)
            b[512 + 36 : 512 + 40] = checksum(b[512:1536], 36).to_bytes(4, "big")
        _put(bad, b)
        try:
            with Disk() as d:
                img = d.open(bad, "VHD", flags=OpenFlags.READ_ONLY)
                read_all(d, chunk=2 * MiB)
                img.check()
                img.info()
        except VDError:
            pass


def test_probe(tmp_path, written):
    p, _ = written
    assert probe(p).name == "VHD"
    f = _made(tmp_path, "fx.vhd", size=MiB, flags=ImageFlags.FIXED)
    assert probe(f).name == "VHD"
    junk = tmp_path / "junk.vhd"
    junk.write_bytes(b"\0" * 4096)
    from vdgui.vd.registry import probe_input

    assert get_backend("VHD").probe(probe_input(str(junk))) == 0


# -- hooks ---------------------------------------------------------------------------------------
def test_compact_drops_zero_blocks_and_shrinks(tmp_path):
    p = str(tmp_path / "c.vhd")
    with Disk() as d:
        d.create_base(p, 12 * MiB, "VHD")
        for i in range(6):
            d.write(i * 2 * MiB, bytes([i + 1]) * 4096)
        d.top.honor_zeroes = True
        d.write(2 * MiB, bytes(4096))  # block 1 now all zero
        d.write(6 * MiB, bytes(4096))  # block 3 now all zero
        before = read_all(d)
    size_before = os.path.getsize(p)
    with Disk() as d:
        img = d.open(p)
        seen = []
        img.compact(lambda a, t: seen.append((a, t)))
        assert seen[0][0] == 0 and seen[-1][0] == seen[-1][1]
        assert read_all(d) == before
        assert sum(1 for e in img.bat if e != 0xFFFFFFFF) == 4
        assert img.check().exit_code == 0
    assert os.path.getsize(p) == size_before - 2 * (2 * MiB + 512)
    raw = Path(p).read_bytes()
    assert raw[:512] == raw[-512:]


def test_compact_diff_against_parent(tmp_path):
    base, child = str(tmp_path / "b.vhd"), str(tmp_path / "c.vhd")
    with Disk() as d:
        d.create_base(base, 8 * MiB, "VHD")
        d.write(0, b"\x07" * (4 * MiB))
        d.create_diff(child)
        d.write(0, b"\x07" * 4096)  # same as parent: redundant
        d.write(2 * MiB, b"\x09" * 4096)  # real change
        d.write(4 * MiB, bytes(4096))  # zeroes over zeroes: redundant with parent
        expect = read_all(d)
        top = d.top
        top.compact(None, lambda o, n: d.read_below(1, o, n))
        assert sum(1 for e in top.bat if e != 0xFFFFFFFF) == 1
        assert read_all(d) == expect
        assert top.check().exit_code == 0
    with Disk.open_chain(child, flags=OpenFlags.READ_ONLY) as d:
        assert read_all(d) == expect


def test_resize_dynamic_grow_relocates_blocks(tmp_path):
    p = str(tmp_path / "r.vhd")
    with Disk() as d:
        d.create_base(p, 3 * MiB, "VHD")  # BAT of 2 entries in one sector
        d.write(0, b"\x01" * MiB)
        d.write(2 * MiB, b"\x02" * 4096)
        before = read_all(d)
        img = d.top
        img.resize(400 * MiB)  # 200 entries: BAT grows past its sector
        assert d.size >= 400 * MiB and d.size == round_size_to_chs(400 * MiB)[0]
        assert img.info()["size_rounded_from"] == 400 * MiB
        assert d.read(0, len(before)) == before
        d.write(399 * MiB, b"\x03" * 4096)
        assert img.check().exit_code == 0
    with Disk() as d:
        img = d.open(p, flags=OpenFlags.READ_ONLY)
        assert d.read(0, len(before)) == before and d.read(399 * MiB, 4096) == b"\x03" * 4096
        assert img.pchs == vhd_chs(d.size) and img.check().exit_code == 0


def test_resize_fixed_grow_and_shrink(tmp_path):
    p = str(tmp_path / "f.vhd")
    with Disk() as d:
        d.create_base(p, 4 * MiB, "VHD", flags=ImageFlags.FIXED)
        d.write(0, b"\x01" * 4096)
        d.write(4 * MiB - 512, b"\x02" * 512)
        img = d.top
        img.resize(6 * MiB)
        assert d.size == 6 * MiB and d.read(4 * MiB, 2 * MiB) == bytes(2 * MiB)
        assert d.read(4 * MiB - 512, 512) == b"\x02" * 512
        with pytest.raises(InvalidArgument):
            img.resize(2 * MiB)  # the tail holds data
        img.resize(5 * MiB)
    assert os.path.getsize(p) == 5 * MiB + 512
    with Disk() as d:
        img = d.open(p, flags=OpenFlags.READ_ONLY)
        assert d.size == 5 * MiB and img.check().exit_code == 0


def test_resize_dynamic_shrink_refused_with_data(tmp_path):
    p = str(tmp_path / "s.vhd")
    with Disk() as d:
        d.create_base(p, 8 * MiB, "VHD")
        d.write(7 * MiB, b"\x01" * 512)
        with pytest.raises(InvalidArgument):
            d.top.resize(4 * MiB)
        d.top.honor_zeroes = True
        d.write(7 * MiB, bytes(512))
        d.top.resize(4 * MiB)
        assert d.size == round_size_to_chs(4 * MiB)[0]
        assert d.top.check().exit_code == 0


def test_leak_detected_and_repaired(tmp_path):
    p = str(tmp_path / "l.vhd")
    with Disk() as d:
        d.create_base(p, 8 * MiB, "VHD")
        for i in range(4):
            d.write(i * 2 * MiB, bytes([i + 1]) * 512)
        content = read_all(d)
    b = _bytes(p)
    b[1536 + 4 : 1540 + 4] = b"\xff\xff\xff\xff"  # drop block 1's entry: its space leaks
    for _ in (1,):
        content = content[: 2 * MiB] + bytes(2 * MiB) + content[4 * MiB :]
    _put(p, b)
    with Disk() as d:
        img = d.open(p)
        rep = img.check()
        assert rep.exit_code == 3 and rep.problems[0].severity == "leak"
        rep = img.check(repair=True)
        assert all(x.repaired for x in rep.problems)
        assert img.check().exit_code == 0 and read_all(d) == content
    assert os.path.getsize(p) < len(b)


def test_read_only_open_refuses_writes_and_repair(written):
    p, _ = written
    with Disk() as d:
        img = d.open(p, flags=OpenFlags.READ_ONLY)
        with pytest.raises(VDError):
            d.write(0, b"x" * 512)
        with pytest.raises(VDError):
            img.check(repair=True)


# -- more layouts ------------------------------------------------------------------------------
def test_511_byte_footer_of_old_virtual_pc(tmp_path):
    """Virtual PC before 2004 wrote a 511-byte footer (VHD specification)."""
    p = _made(tmp_path, "old.vhd", size=MiB, flags=ImageFlags.FIXED)
    b = _bytes(p)
    assert b[-1] == 0
    _put(p, b[:-1])
    assert probe(p).name == "VHD"
    with Disk() as d:
        img = d.open(p, flags=OpenFlags.READ_ONLY)
        assert d.size == MiB and img.check().exit_code == 0


def test_fixed_footer_checksum_repair(tmp_path):
    p = _made(tmp_path, "fc.vhd", size=MiB, flags=ImageFlags.FIXED)
    b = _bytes(p)
    b[-512 + 70] ^= 0x10  # unique id changed, checksum not updated
    _put(p, b)
    with Disk() as d:
        img = d.open(p)
        rep = img.check()
        assert rep.exit_code == 2 and "checksum" in rep.problems[0].what
        img.check(repair=True)
        assert img.check().exit_code == 0
    b = _bytes(p)
    assert b[-512 + 64 : -512 + 68] == checksum(b[-512:], 64).to_bytes(4, "big")


def test_table_over_header_refused(written):
    p, _ = written
    b = _bytes(p)
    b[512 + 16 : 512 + 24] = struct.pack(">Q", 0)  # BAT at offset 0: over the footer copy
    b[512 + 36 : 512 + 40] = bytes(4)
    b[512 + 36 : 512 + 40] = checksum(b[512:1536], 36).to_bytes(4, "big")
    _put(p, b)
    with pytest.raises(CorruptImage, match="table offset"):
        _open_read(p)


def test_mac_locator_and_large_table(tmp_path):
    """A differencing disk made elsewhere: MacX locator (file URL), W2ku only; a BAT declared
    much larger than the disk (as qemu and Windows write), whose unused tail holds block data."""
    base = str(tmp_path / "par ent.vhd")
    with Disk() as d:
        d.create_base(base, 2 * MiB, "VHD")
        d.write(0, b"\x31" * 4096)
        parent_uuid = d.top.uuid
    child = str(tmp_path / "mac.vhd")
    url = ("file://localhost" + os.path.abspath(base).replace(" ", "%20")).encode()
    size, g = round_size_to_chs(2 * MiB)
    foot = dict(
        cookie=b"conectix",
        features=2,
        version=0x10000,
        data_offset=512,
        timestamp=0,
        creator_app=b"vpc ",
        creator_version=0x50000,
        creator_os=b"Mac ",
        original_size=size,
        current_size=size,
        cylinders=g.cylinders,
        heads=g.heads,
        sectors=g.sectors,
        disk_type=4,
        checksum=0,
        unique_id=uuid.uuid4().bytes_le,
        saved_state=0,
        reserved=bytes(427),
    )
    fraw = bytearray(FOOTER.build(foot))
    fraw[64:68] = checksum(fraw, 64).to_bytes(4, "big")
    locs = [dict(code=b"MacX", data_space=512, data_length=len(url), reserved=0, data_offset=2048)]
    locs += [dict(code=bytes(4), data_space=0, data_length=0, reserved=0, data_offset=0)] * 7
    hdr = dict(
        cookie=b"cxsparse",
        data_offset=2**64 - 1,
        table_offset=1536,
        version=0x10000,
        max_table_entries=4096,
        block_size=2 * MiB,
        checksum=0,
        parent_uuid=parent_uuid.bytes_le,
        parent_timestamp=0,
        reserved1=0,
        parent_name="par ent.vhd".encode("utf-16-be").ljust(512, b"\0"),
        locators=locs,
        reserved2=bytes(256),
    )
    hraw = bytearray(DYN_HEADER.build(hdr))
    hraw[36:40] = checksum(hraw, 36).to_bytes(4, "big")
    img = bytearray(2560 + 512 + 2 * MiB + 512)
    img[0:512] = fraw
    img[512:1536] = hraw
    img[1536:2048] = b"\xff" * 512
    img[1536:1540] = struct.pack(">I", 5)  # block 0 at sector 5 (inside the "table")
    img[2048 : 2048 + len(url)] = url
    bm = bytearray(512)
    set_bits(bm, 8, 8)  # sectors 8..15 (4096..8191) are ours
    img[2560:3072] = bm
    img[3072 + 4096 : 3072 + 8192] = b"\x32" * 4096
    img[-512:] = fraw
    Path(child).write_bytes(bytes(img))
    img_ = get_backend("VHD").open(child, OpenFlags.INFO)
    assert img_.parent_hint.locations[0] == os.path.abspath(base)
    assert img_.check().exit_code == 0
    img_.close()
    with Disk.open_chain(child, flags=OpenFlags.READ_ONLY) as d:  # MacX path, then its basename
        assert d.read(0, 8192) == b"\x31" * 4096 + b"\x32" * 4096
        assert d.read(8192, 512) == bytes(512)
    # growing it moves the block out of the table's way
    with Disk() as d:
        d.open(base, flags=OpenFlags.READ_ONLY)
        top = d.open(child)
        top.resize(64 * MiB)
        assert top.check().exit_code == 0
        assert d.read(0, 8192) == b"\x31" * 4096 + b"\x32" * 4096
        assert d.read(8192, d.size - 8192 - 2 * MiB) == bytes(d.size - 8192 - 2 * MiB)
        d.write(40 * MiB, b"\x33" * 512)
        assert top.check().exit_code == 0


def test_relink_with_long_path_appends_locators(tmp_path):
    deep = tmp_path / ("d" * 120) / ("e" * 120) / ("f" * 120)
    deep.mkdir(parents=True)
    a = str(deep / "parent.vhd")
    c = str(tmp_path / "kid.vhd")
    with Disk() as d:
        d.create_base(str(tmp_path / "first.vhd"), MiB, "VHD")
        d.create_diff(c)
        d.write(0, b"\x01" * 512)
    with Disk() as d:
        d.create_base(a, MiB, "VHD")
    with Disk() as d:
        pa = d.open(a, flags=OpenFlags.READ_ONLY)
        kid = get_backend("VHD").open(c, OpenFlags.NORMAL)
        kid.set_parent(pa)
        assert kid.check().exit_code == 0
        kid.close()
    kid = get_backend("VHD").open(c, OpenFlags.INFO)
    assert kid.parent_hint.locations[1] == a
    assert kid.parent_hint.locations[0].count("..") == 0
    kid.close()
    with Disk.open_chain(c, flags=OpenFlags.READ_ONLY) as d:
        assert d.read(0, 1024) == b"\x01" * 512 + bytes(512)


def test_grow_diff_moves_locators_out_of_the_table(tmp_path):
    base, child = str(tmp_path / "b.vhd"), str(tmp_path / "c.vhd")
    with Disk() as d:
        d.create_base(base, 2 * MiB, "VHD")
        d.write(0, b"\x01" * 4096)
        d.create_diff(child)
        d.write(MiB, b"\x02" * 4096)
        before = read_all(d)
    with Disk() as d:
        d.open(base)
        d.top.resize(1 << 30)
        new = d.size
        d.open(child).resize(new)  # 513 entries: past both locators
        assert d.size == new
        assert d.top.check().exit_code == 0
        locs = list(d.top.parent_hint.locations)
        assert d.read(0, len(before)) == before
    with Disk.open_chain(child, flags=OpenFlags.READ_ONLY) as d:
        assert d.top.parent_hint.locations == locs
        assert locs[:2] == [".\\b.vhd", os.path.abspath(base)]
        assert d.size == round_size_to_chs(1 << 30)[0]
        assert d.read(0, len(before)) == before and d.read(500 * MiB, 4096) == bytes(4096)


def test_block_running_into_footer_is_repaired(written):
    p, content = written
    b = _bytes(p)
    last_end = len(b) - 512
    cut = b[: last_end - 256] + b[-512:]  # footer now overlaps the last block's tail
    _put(p, cut)
    with Disk() as d:
        img = d.open(p)
        rep = img.check()
        assert rep.exit_code == 2 and any("runs into the footer" in x.what for x in rep.problems)
        img.check(repair=True)
        assert img.check().exit_code == 0
        got = read_all(d)
    assert got[: 3 * MiB] == content[: 3 * MiB]


def test_compact_diff_without_parent_keeps_everything_written(tmp_path):
    base, child = str(tmp_path / "b.vhd"), str(tmp_path / "c.vhd")
    with Disk() as d:
        d.create_base(base, 4 * MiB, "VHD")
        d.write(0, b"\x01" * MiB)
        d.create_diff(child)
        d.write(0, bytes(4096))  # zeroes hiding parent data: must stay
        expect = read_all(d)
        d.top.compact()
        assert read_all(d) == expect
        assert sum(1 for e in d.top.bat if e != 0xFFFFFFFF) == 1


# -- interruption safety -----------------------------------------------------------------------
MODES = ["kill", "EIO"]
needs_strace = pytest.mark.skipif(not kh.have_strace(), reason="strace is not installed")


def _crash_each_write(tmp, folder, action, verify, mode):
    """Run ``action(work)`` on copies of ``folder`` through the kill harness, killed (mode
    "kill") or failing with EIO (mode "EIO": the error path, then the normal close) at every
    syscall that changes a file; ``verify(work, finished)`` checks the images afterwards."""

    def fn_for(work):
        def fn():
            try:
                action(work)
            except (VDError, OSError):
                return 1
            return 0

        return fn

    kh.every_point(
        tmp, folder, fn_for, verify, error=None if mode == "kill" else mode, min_writes=2
    )


def _consistent(path, allowed=("footer copy",)):
    """Opens; check finds only leaks (or a stale footer copy); repair leaves it clean."""
    img = get_backend("VHD").open(path, OpenFlags.NORMAL)
    try:
        rep = img.check()
        for pr in rep.problems:
            assert pr.severity == "leak" or any(a in pr.what for a in allowed), pr.what
        img.check(repair=True)
        assert img.check().exit_code == 0
    finally:
        img.close()


@needs_strace
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("diff", [False, True])
def test_interrupted_writes(tmp_path, diff, mode):
    tpl = tmp_path / "tpl"
    tpl.mkdir()
    base, child = tpl / "ib.vhd", tpl / "ic.vhd"
    with Disk() as d:
        d.create_base(str(base), 6 * MiB, "VHD")
        d.write(0, b"\x01" * MiB)
        old = read_all(d)
        if diff:
            d.create_diff(str(child))
    src = (child if diff else base).name
    writes = [
        (512, b"\x02" * 512),
        (2 * MiB + 4096, b"\x03" * MiB),
        (5 * MiB, b"\x04" * 4096),
        (0, bytes(4096)),
    ]
    states = [old]
    new = bytearray(old)
    for off, data in writes:
        new[off : off + len(data)] = data
        states.append(bytes(new))

    def action(work):
        with Disk() as d:
            if diff:
                d.open(str(work / base.name), flags=OpenFlags.READ_ONLY)
            d.open(str(work / src))
            for off, data in writes:
                d.write(off, data)

    def verify(work, finished):
        with Disk.open_chain(str(work / src), flags=OpenFlags.READ_ONLY) as d:
            got = read_all(d)
        for pos in range(0, len(got), 512):
            assert any(got[pos : pos + 512] == st[pos : pos + 512] for st in states), pos
        if finished:
            assert got == states[-1]
        _consistent(str(work / src))

    _crash_each_write(tmp_path, tpl, action, verify, mode)


@needs_strace
@pytest.mark.parametrize("mode", MODES)
def test_interrupted_compact_resize_relink(tmp_path, mode):
    tpl = tmp_path / "tpl"
    tpl.mkdir()
    p = tpl / "op.vhd"
    with Disk() as d:
        d.create_base(str(p), 10 * MiB, "VHD")
        for i in range(5):
            d.write(i * 2 * MiB, bytes([i + 1]) * 4096)
        d.top.honor_zeroes = True
        d.write(2 * MiB, bytes(4096))
        d.write(4 * MiB, bytes(4096))
        content = read_all(d)

    def verify(work, finished):
        with Disk() as d:
            d.open(str(work / p.name), flags=OpenFlags.READ_ONLY)
            assert d.read(0, len(content)) == content
            if d.size > len(content):  # grown: the new area holds nothing
                assert all(
                    e.status == Alloc.UNALLOCATED
                    for e in d.allocation(len(content), d.size - len(content))
                )
        _consistent(str(work / p.name))

    def compact(work):
        with Disk() as d:
            d.open(str(work / p.name)).compact()

    (tmp_path / "compact").mkdir()
    _crash_each_write(tmp_path / "compact", tpl, compact, verify, mode)

    def grow(work):
        with Disk() as d:
            d.open(str(work / p.name)).resize(700 * MiB)

    (tmp_path / "grow").mkdir()
    _crash_each_write(tmp_path / "grow", tpl, grow, verify, mode)

    other = tpl / "other.vhd"
    with Disk() as d:
        d.create_base(str(other), 10 * MiB, "VHD")
    kid = tpl / "kid.vhd"
    with Disk() as d:
        d.open(str(p), flags=OpenFlags.READ_ONLY)
        d.create_diff(str(kid))
        d.write(0, b"\x09" * 512)

    def relink(work):
        with Disk() as d:
            par = d.open(str(work / other.name), flags=OpenFlags.READ_ONLY)
            img = get_backend("VHD").open(str(work / kid.name), OpenFlags.NORMAL)
            try:
                img.set_parent(par)
            finally:
                img.close()

    def verify_link(work, finished):
        img = get_backend("VHD").open(str(work / kid.name), OpenFlags.INFO)
        try:
            target = os.path.basename(img.parent_hint.locations[0].replace("\\", "/"))
            assert target in ("op.vhd", "other.vhd")
            assert img.parent_uuid is not None
        finally:
            img.close()
        with Disk.open_chain(str(work / kid.name), flags=OpenFlags.READ_ONLY) as d:
            assert d.read(0, 512) == b"\x09" * 512
        if finished:
            assert target == "other.vhd"

    (tmp_path / "relink").mkdir()
    _crash_each_write(tmp_path / "relink", tpl, relink, verify_link, mode)


@pytest.mark.parametrize("diff", [False, True])
def test_grow_empty_disk_moves_the_footer(tmp_path, diff):
    p = str(tmp_path / "e.vhd")
    with Disk() as d:
        d.create_base(p, 3 * MiB, "VHD")
        if diff:
            p = str(tmp_path / "e2.vhd")
            d.create_diff(p)
    with Disk() as d:
        if diff:
            d.open(str(tmp_path / "e.vhd"))
            d.top.resize(900 * MiB)
        img = d.open(p)
        img.resize(900 * MiB if not diff else d.images[0].size)
        assert img.check().exit_code == 0
        d.write(800 * MiB, b"\x01" * 512)
    with Disk.open_chain(p, flags=OpenFlags.READ_ONLY) as d:
        assert d.read(800 * MiB, 1024) == b"\x01" * 512 + bytes(512)
        assert d.top.check().exit_code == 0
        raw = Path(p).read_bytes()
        assert raw[:512] == raw[-512:]


# -- a random model: every operation, content and consistency checked after each ------------------
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_operations_against_a_model(tmp_path, seed):
    rnd = random.Random(seed)
    b, c = str(tmp_path / "b.vhd"), str(tmp_path / "c.vhd")
    with Disk() as d:
        d.create_base(b, rnd.choice([3, 5]) * MiB + rnd.randrange(8) * 512, "VHD")
        d.write(0, b"\x01" * MiB)
        d.create_diff(c)
        model = bytearray(read_all(d))
    for step in range(25):
        op = rnd.choice(["w", "w", "z", "compact", "grow", "repair", "relink", "shrink"])
        with Disk() as d:
            d.open(b)
            top = d.open(c)
            if op in ("w", "z"):
                ln = min(rnd.choice([512, 4096, 65536, MiB, 3 * MiB]), d.size)
                off = rnd.randrange(0, (d.size - ln) // 512 + 1) * 512
                data = bytes(ln) if op == "z" else bytes([rnd.randrange(1, 256)]) * ln
                d.write(off, data)
                model[off : off + ln] = data
            elif op == "compact":
                top.compact(
                    None, (lambda o, n: d.read_below(1, o, n)) if rnd.random() < 0.7 else None
                )
            elif op == "grow":
                d.images[0].resize(d.images[0].size + rnd.choice([MiB, 9 * MiB, 40 * MiB]))
                top.resize(d.images[0].size)
                model += bytes(top.size - len(model))
            elif op == "shrink" and not any(model[-MiB:]) and len(model) > 2 * MiB:
                top.resize(len(model) - MiB)
                d.images[0].resize(top.size)
                del model[top.size :]
            elif op == "repair":
                top.check(repair=True)
            elif op == "relink":
                top.set_parent(d.images[0])
        with Disk.open_chain(c, flags=OpenFlags.READ_ONLY) as d:
            assert d.size == len(model) and read_all(d) == bytes(model), (step, op)
            assert d.top.check().exit_code == 0, (step, op)
            assert d.images[0].check().exit_code in (0, 3), (step, op)


def test_compact_copies_are_durable_before_the_bat_names_them(tmp_path, monkeypatch):
    # a block moved into a hole is synced before its BAT entry changes (issue #14: the shared
    # compaction mover), so a power cut never leaves an entry naming unwritten bytes
    p = str(tmp_path / "order.vhd")
    with Disk() as d:
        d.create_base(p, 8 * MiB, "VHD")
        for i in range(4):
            d.write(i * 2 * MiB, bytes([i + 1]) * 4096)
        d.top.honor_zeroes = True
        d.write(0, bytes(4096))  # block 0 all zero: block 3 moves there
        before = read_all(d)
    with Disk() as d:
        img = d.open(p)
        f = img.f
        log = []
        real_write, real_sync = f.pwrite, f.sync
        monkeypatch.setattr(
            f,
            "pwrite",
            lambda off, data: (log.append(("w", off, len(data))), real_write(off, data)),
        )
        monkeypatch.setattr(f, "sync", lambda: (log.append(("sync",)), real_sync()))
        bat_end = img.bat_offset + 4 * img.n_blocks
        img.compact()
        assert read_all(d) == before
        bat_writes = [
            k
            for k, e in enumerate(log)
            if e[0] == "w" and img.bat_offset <= e[1] < bat_end and e[2] < 512
        ]
        copies = [k for k, e in enumerate(log) if e[0] == "w" and e[2] >= 4096]
        assert bat_writes and copies
        first_repoint = min(k for k in bat_writes if k > min(copies))
        assert any(log[k] == ("sync",) for k in range(max(copies), first_repoint))


def _logged_file(monkeypatch, f):
    """Record the writes (offset, length, how) and size queries made through ``f``."""
    log = []
    real_pwrite, real_pwritev, real_size = f.pwrite, f.pwritev, f.size

    def pwrite(off, data):
        log.append((off, memoryview(data).nbytes, "pwrite"))
        real_pwrite(off, data)

    def pwritev(off, bufs):
        log.append((off, sum(memoryview(b).nbytes for b in bufs), "pwritev"))
        real_pwritev(off, bufs)

    def size():
        log.append((None, None, "size"))
        return real_size()

    monkeypatch.setattr(f, "pwrite", pwrite)
    monkeypatch.setattr(f, "pwritev", pwritev)
    monkeypatch.setattr(f, "size", size)
    return log


def test_new_blocks_of_one_write_go_out_in_three_writes(tmp_path, monkeypatch):
    """Blocks appended by one write: the footer at the new end first, then every bitmap and
    the data in one gather write, then the BAT entries in one write; no fstat per block."""
    p = str(tmp_path / "append.vhd")
    data = random.Random(5).randbytes(4 * MiB)
    with Disk() as d:
        d.create_base(p, 16 * MiB, "VHD")
        d.write(0, b"\x07" * 4096)                  # block 0: the file has grown once
        img = d.top
        end = img.footer_offset
        log = _logged_file(monkeypatch, img.f)
        d.write(2 * MiB, data)                      # blocks 1 and 2, one write
        bs, total = img.block_size, img.total
        assert [kind for _o, _n, kind in log] == ["pwrite", "pwritev", "pwrite"], log
        assert log[0] == (end + 2 * total, 512, "pwrite")          # footer first
        assert log[1] == (end, 2 * total, "pwritev")               # bitmaps and data
        assert log[2] == (img.bat_offset + 4, 8, "pwrite")         # then the BAT
        assert img.bat[1] * 512 == end and img.bat[2] * 512 == end + total
        log.clear()
        d.write(6 * MiB, data[:MiB])                # the next append asks no file size
        assert "size" not in [kind for _o, _n, kind in log]
        assert d.read(2 * MiB, 4 * MiB) == data
        assert bs == 2 * MiB
    with Disk() as d:
        d.open(p, flags=OpenFlags.READ_ONLY)
        assert d.read(0, 4096) == b"\x07" * 4096
        assert d.read(2 * MiB, 4 * MiB) == data
        assert d.read(6 * MiB, MiB) == data[:MiB]
        assert d.top.check().exit_code == 0


def _stored(path, a, b):
    """Bytes of the file's [a, b) that hold data (SEEK_DATA/SEEK_HOLE)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        n, pos = 0, a
        while pos < b:
            try:
                s = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            if s >= b:
                break
            e = min(os.lseek(fd, s, os.SEEK_HOLE), b)
            n += e - s
            pos = e
        return n
    finally:
        os.close(fd)


def test_copy_into_vhd_tests_zeroes_once_and_stays_sparse(tmp_path, monkeypatch):
    """A copy hands its windows to the VHD untested (the VHD's own 64 KiB scan is the only
    one) and a 64 KiB piece of data inside a new block is stored as 64 KiB, aligned as the
    disk's offsets are (not split over two file-aligned pieces)."""
    from vdgui.vd import copy_image
    from vdgui.vd.ops import pipeline

    src = str(tmp_path / "src.raw")
    speck = b"\x5a" * (64 << 10)
    full = random.Random(9).randbytes(2 * MiB)
    with open(src, "wb") as fh:
        fh.truncate(8 * MiB)
        fh.seek(2 * MiB + 5 * (64 << 10))
        fh.write(speck)                         # block 1: one 64 KiB piece
        fh.seek(4 * MiB)
        fh.write(full)                          # block 2: all data
    calls = []
    real = pipeline.zero_grain
    monkeypatch.setattr(pipeline, "zero_grain", lambda mv: (calls.append(len(mv)), real(mv))[1])
    dst = str(tmp_path / "dst.vhd")
    copy_image(src, dst, "VHD", src_format="RAW")
    assert calls == []
    with Disk() as d:
        d.open(dst, flags=OpenFlags.READ_ONLY)
        img = d.top
        assert img.bat[0] == 0xFFFFFFFF and img.bat[3] == 0xFFFFFFFF
        assert d.read(0, 8 * MiB) == Path(src).read_bytes()
        start = img.bat[1] * 512
        data_at = start + img.bm_size
        # past the bitmap's page: the piece's 64 KiB and the two pages it starts and ends in
        assert _stored(dst, data_at + 4096, data_at + 2 * MiB) <= (64 << 10) + 8192
        assert _stored(dst, img.bat[2] * 512, img.bat[2] * 512 + img.total) == img.total


def test_copy_into_vhd_keeps_unallocated_source_space_unallocated(tmp_path):
    """A copy's windows follow the source's data (not widened to whole 2 MiB VHD blocks): the
    parts of a new block the source does not hold stay unmarked in its bitmap (read zeroes,
    nothing stored), also where a source extent starts inside a block."""
    from vdgui.vd import copy_image

    src = str(tmp_path / "src.vdi")                  # 1 MiB blocks
    rnd = random.Random(3)
    run, speck = rnd.randbytes(4 * MiB), rnd.randbytes(64 << 10)
    with Disk() as d:
        d.create_base(src, 16 * MiB, "VDI")
        d.write(MiB, run)                            # [1, 5) MiB: starts inside VHD block 0
        d.write(9 * MiB + (64 << 10), speck)         # VDI block 9 only (VHD block 4 = 8..10)
        expect = read_all(d)
    dst = str(tmp_path / "dst.vhd")
    copy_image(src, dst, "VHD")
    with Disk() as d:
        d.open(dst, flags=OpenFlags.READ_ONLY)
        assert read_all(d)[:16 * MiB] == expect
        runs = d.top.block_status(0, 16 * MiB)

        def status(a, b):
            return {st for s, n, st in runs if s < b and a < s + n}

        assert status(0, MiB) == {Alloc.UNALLOCATED}
        assert status(MiB, 5 * MiB) == {Alloc.DATA}
        assert status(5 * MiB, 6 * MiB) == {Alloc.UNALLOCATED}   # rest of VHD block 2
        assert status(8 * MiB, 9 * MiB) == {Alloc.UNALLOCATED}   # VDI block 8: not held
        assert status(9 * MiB, 10 * MiB) == {Alloc.DATA}
