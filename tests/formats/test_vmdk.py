"""VMDK backend: conformance, structures, descriptors, hostile input, hooks."""
from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from tests.conftest import read_all
from tests.formats.conformance import FormatConformance, scattered_writes
from vdgui.vd import (
    RAW_TEST_ENV,
    Alloc,
    ConfigError,
    CorruptImage,
    Disk,
    Geometry,
    ImageFlags,
    ImageNotFound,
    InvalidArgument,
    NotSupported,
    OpenFlags,
    ParentMismatch,
    UnsafePath,
    VDError,
    check,
    get_backend,
    probe,
)
from vdgui.vd.formats import vmdk
from vdgui.vd.formats.vmdk.descriptor import Descriptor

MiB = 1 << 20


def _head(path, n: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


class TestVmdkConformance(FormatConformance):
    FORMAT = "VMDK"
    EXT = "vmdk"
    VARIANTS = (ImageFlags.NONE, ImageFlags.FIXED, ImageFlags.SPLIT_2G,
                ImageFlags.SPLIT_2G | ImageFlags.FIXED)
    DIFF = True
    UUID = True
    COMMENT = False


# -- declarations ---------------------------------------------------------------------------
def test_declarations_match_virtualbox():
    from vdgui.vd import Cap, Operation, ValueType
    b = get_backend("vmdk")
    assert b.name == "VMDK" and "vmdk" in b.aliases
    assert b.caps == (Cap.UUID | Cap.CREATE_FIXED | Cap.CREATE_DYNAMIC | Cap.CREATE_SPLIT_2G |
                      Cap.DIFF | Cap.FILE | Cap.ASYNC | Cap.VFS | Cap.PREFERRED)
    assert b.create_flags == (ImageFlags.FIXED | ImageFlags.SPLIT_2G |
                              ImageFlags.STREAM_OPTIMIZED | ImageFlags.ESX)
    keys = {k.name: k.type for k in b.config_keys}
    assert keys == {"RawDrive": ValueType.STRING, "Partitions": ValueType.STRING,
                    "BootSector": ValueType.BYTES, "Relative": ValueType.INTEGER}
    for op in (Operation.WRITE, Operation.CREATE, Operation.RESIZE, Operation.CHECK,
               Operation.REPAIR, Operation.RELINK):
        assert b.can(op)


def test_raw_disk_creation_refused(tmp_path):
    with pytest.raises(UnsafePath), Disk() as d:
        d.create_base(str(tmp_path / "raw.vmdk"), MiB, "VMDK", config={"RawDrive": "/dev/sda"})
    with pytest.raises(InvalidArgument, match="need RawDrive"), Disk() as d:
        d.create_base(str(tmp_path / "raw.vmdk"), MiB, "VMDK", config={"Partitions": "1,2"},
                      allow_unsafe_paths=True)
    stand_in = tmp_path.parent / f"{tmp_path.name}-drive.img"   # not in tmp_path: listed below
    stand_in.write_bytes(bytes(MiB))
    with pytest.raises(NotSupported, match="a regular file, not a host drive"), Disk() as d:
        d.create_base(str(tmp_path / "raw.vmdk"), MiB, "VMDK",
                      config={"RawDrive": str(stand_in), "Partitions": "1,2"},
                      allow_unsafe_paths=True)
    with pytest.raises(NotSupported), Disk() as d:
        d.create_base(str(tmp_path / "raw.vmdk"), MiB, "VMDK",
                      config={"RawDrive": "/dev/null"}, allow_unsafe_paths=True)
    with pytest.raises(ConfigError), Disk() as d:
        d.create_base(str(tmp_path / "raw.vmdk"), MiB, "VMDK", config={"Bogus": "1"})
    assert not os.listdir(tmp_path)


# -- structures -----------------------------------------------------------------------------
def test_struct_round_trips(tmp_path):
    p = str(tmp_path / "s.vmdk")
    with Disk() as d:
        d.create_base(p, 3 * MiB, "VMDK")
    raw = _head(p, 512)
    assert vmdk.SparseHeader.build(vmdk.SparseHeader.parse(raw)) == raw
    h = vmdk.SparseHeader.parse(raw)
    assert h.magic == b"KDMV" and h.version == 1 and h.grain_size == 128
    gm = vmdk.GrainMarker.build(dict(lba=1234, size=99))
    assert vmdk.GrainMarker.build(vmdk.GrainMarker.parse(gm)) == gm
    assert vmdk.MARKER.pack(1234, 99) == gm          # the per-grain fast path's layout
    mm = vmdk.MetaMarker.build(dict(num_sectors=4, size=0, type=1, pad=bytes(496)))
    assert len(mm) == 512 and vmdk.MetaMarker.build(vmdk.MetaMarker.parse(mm)) == mm
    cw = vmdk.CowdHeader.build(dict(magic=b"COWD", version=1, flags=3, num_sectors=4096,
                                    grain_size=1, gd_offset=4, num_gd_entries=1, free_sector=8,
                                    cylinders=0, heads=0, sectors=0))
    assert vmdk.CowdHeader.build(vmdk.CowdHeader.parse(cw)) == cw
    se = bytes(range(1, 209)) + bytes(304)
    assert (
        len(se) == 512 and vmdk.SESparseConstHeader.build(vmdk.SESparseConstHeader.parse(se)) == se
    )
    vol = (0xCAFECAFE).to_bytes(8, "little") + bytes(range(24)) + bytes(480)
    assert vmdk.SESparseVolatileHeader.build(vmdk.SESparseVolatileHeader.parse(vol)) == vol


# -- descriptor -----------------------------------------------------------------------------
DESC = """# Disk DescriptorFile
version=1
encoding="UTF-8"
CID=12345678
parentCID=ffffffff
isNativeSnapshot="no"
createType="twoGbMaxExtentSparse"

# Extent description
RW 20480 SPARSE "disk-s001.vmdk"
RDONLY 100 FLAT "disk-f.vmdk" 7
RW 8 ZERO

# a comment kept verbatim
# The Disk Data Base
#DDB

ddb.virtualHWVersion = "7"
ddb.unknownThing = "keep me"
ddb.geometry.cylinders = "20"
"""


def test_descriptor_round_trip_keeps_unknown_lines():
    d = Descriptor.parse(DESC.encode(), "x.vmdk")
    assert d.text() == DESC
    assert [e.type for e in d.extents] == ["SPARSE", "FLAT", "ZERO"]
    assert d.extents[1].offset == 7 and d.extents[1].access == "RDONLY"
    assert d.get("isNativeSnapshot") == "no"
    assert d.get_int("CID", 16) == 0x12345678
    d.set("CID", "deadbeef")
    d.set("ddb.uuid.image", "11111111-2222-3333-4444-555555555555")
    d.set("parentFileNameHint", "base.vmdk", quoted=True)
    out = d.text()
    assert "CID=deadbeef\n" in out and 'ddb.unknownThing = "keep me"' in out
    assert "# a comment kept verbatim" in out and 'isNativeSnapshot="no"' in out
    assert out.index('parentFileNameHint="base.vmdk"') < out.index("# Extent description")
    again = Descriptor.parse(out.encode())
    assert again.get("ddb.uuid.image") == "11111111-2222-3333-4444-555555555555"
    assert again.text() == out


@pytest.mark.parametrize(
    "text",
    [
        b"# Disk DescriptorFile\nversion=1\n",  # no extents
        b'# Disk DescriptorFile\nRW abc SPARSE "x"\n',  # bad size
        b'# Disk DescriptorFile\nRW 10 BOGUS "x"\n',  # bad type
        b"# Disk DescriptorFile\nRW 10 FLAT\n",  # flat without name
        b"# Disk DescriptorFile\nthis is not a key value line\nRW 10 ZERO\n",  # junk line
        b"# Disk DescriptorFile\nRW 10 ZERO\n\xff\xfe\n",  # not UTF-8
        b"# Disk DescriptorFile\nRW 10 ZERO\nCID=zzzz\n",  # bad CID
        b'# Disk DescriptorFile\nRW 10 ZERO\nddb.uuid.image = "nope"\n',  # bad UUID
        b'# Disk DescriptorFile\nRW 10 ZERO\nddb.geometry.cylinders = "x"\n'
        b'ddb.geometry.heads = "16"\nddb.geometry.sectors = "63"\n',  # bad geometry
        b'# Disk DescriptorFile\nRW 10 ZERO\ncreateType="nonsense"\n',  # unknown type
        b'# Disk DescriptorFile\nRW 10 SESPARSE "x.vmdk"\n',  # not seSparse
    ],
)
def test_malformed_descriptors_give_vderror(tmp_path, text):
    p = tmp_path / "bad.vmdk"
    p.write_bytes(text)
    (tmp_path / "x").write_bytes(bytes(5120))
    (tmp_path / "x.vmdk").write_bytes(bytes(5120))
    with pytest.raises(VDError), Disk() as d:
        d.open(str(p), "VMDK", flags=OpenFlags.READ_ONLY)
        read_all(d)


def _desc(extent_lines: str, ctype="monolithicFlat") -> bytes:
    return (
        f"# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n"
        f'createType="{ctype}"\n\n# Extent description\n{extent_lines}\n'
    ).encode()


@pytest.mark.parametrize(
    "name",
    [
        "/etc/passwd",
        "../outside.vmdk",
        "sub/../../x",
        "/dev/zero",
        "json:{file.filename:x}",
        "nbd:host:10809",
    ],
)
def test_hostile_extent_paths_refused(tmp_path, name):
    inner = tmp_path / "inner"
    inner.mkdir()
    (tmp_path / "outside.vmdk").write_bytes(bytes(5120))
    p = inner / "evil.vmdk"
    p.write_bytes(_desc(f'RW 10 FLAT "{name}" 0'))
    with pytest.raises(UnsafePath), Disk() as d:
        d.open(str(p), "VMDK", flags=OpenFlags.READ_ONLY)
    with pytest.raises(UnsafePath):  # INFO opens validate names too
        with Disk() as d:
            d.open(str(p), "VMDK", flags=OpenFlags.INFO)


def test_device_extent_refused_even_by_relative_symlink(tmp_path):
    os.symlink("/dev/zero", tmp_path / "zero.bin")
    p = tmp_path / "dev.vmdk"
    p.write_bytes(_desc('RW 10 FLAT "zero.bin" 0'))
    with pytest.raises(UnsafePath), Disk() as d:
        d.open(str(p), "VMDK", flags=OpenFlags.READ_ONLY)


def test_unsafe_paths_allowed_when_asked(tmp_path):
    inner = tmp_path / "inner"
    inner.mkdir()
    (tmp_path / "outside.bin").write_bytes(b"\x42" * 5120)
    p = inner / "ok.vmdk"
    p.write_bytes(_desc('RW 10 FLAT "../outside.bin" 0'))
    with Disk() as d:
        d.open(str(p), "VMDK", flags=OpenFlags.READ_ONLY | OpenFlags.ALLOW_UNSAFE_PATHS)
        assert d.read(0, 5120) == b"\x42" * 5120


def test_huge_descriptor_and_absurd_extent_count_refused(tmp_path):
    p = tmp_path / "big.vmdk"
    p.write_bytes(_desc("RW 10 ZERO") + b"# " + b"x" * (1 << 20) + b"\n")
    with pytest.raises(VDError), Disk() as d:
        d.open(str(p), "VMDK", flags=OpenFlags.READ_ONLY)
    many = "\n".join("RW 1 ZERO" for _ in range(100000))
    p.write_bytes(_desc(many))
    with pytest.raises(CorruptImage), Disk() as d:
        d.open(str(p), "VMDK", flags=OpenFlags.READ_ONLY)
    # under 1 MiB but too many extents
    many = "\n".join("RW 1 ZERO" for _ in range(40000))
    p.write_bytes(_desc(many))
    assert p.stat().st_size < 1 << 20
    with pytest.raises(CorruptImage, match="too many extents"), Disk() as d:
        d.open(str(p), "VMDK", flags=OpenFlags.READ_ONLY)


def test_missing_extent_is_clear_error_and_info_opens_nothing(tmp_path):
    p = tmp_path / "m.vmdk"
    p.write_bytes(_desc('RW 2048 FLAT "m-flat.vmdk" 0'))
    with pytest.raises(ImageNotFound, match="extent file 'm-flat.vmdk' not found"), Disk() as d:
        d.open(str(p), "VMDK", flags=OpenFlags.READ_ONLY)
    with Disk() as d:
        img = d.open(str(p), "VMDK", flags=OpenFlags.INFO)
        assert img.size == 2048 * 512
        assert img.files()[1].endswith("m-flat.vmdk")
        assert d.info()["details"]["create_type"] == "monolithicFlat"


def test_zero_extents_and_mixed_extents(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"\x07" * 4096)
    p = tmp_path / "mix.vmdk"
    # two views of one file over disjoint bytes (overlapping ones alias: refused, see
    # test_hostile_formats.py)
    p.write_bytes(_desc('RW 4 FLAT "a.bin" 2\nRW 16 ZERO\nRDONLY 2 FLAT "a.bin" 6'))
    with Disk() as d:
        d.open(str(p), flags=OpenFlags.READ_ONLY)
        assert d.size == 22 * 512
        assert d.read(0, d.size) == b"\x07" * 2048 + bytes(8192) + b"\x07" * 1024
        assert any(e.status == Alloc.ZERO for e in d.allocation())
    with Disk() as d:
        d.open(str(p))
        d.write(0, b"\x01" * 512)  # RW flat extent
        with pytest.raises(VDError):
            d.write(2048, b"\x01" * 512)  # ZERO extent
        with pytest.raises(VDError):
            d.write(20 * 512, b"\x01" * 512)  # RDONLY extent


# -- hostile sparse headers / tables --------------------------------------------------------
def _mono(tmp_path, name="v.vmdk", size=3 * MiB, data=True):
    p = str(tmp_path / name)
    with Disk() as d:
        d.create_base(p, size, "VMDK")
        if data:
            d.write(0, b"\x5a" * 200000)
    return p


@pytest.mark.parametrize(
    "field,offset,value",
    [
        ("version", 4, (99).to_bytes(4, "little")),
        ("grainSize", 0x14, (3).to_bytes(8, "little")),
        ("grainSize", 0x14, (0).to_bytes(8, "little")),
        ("descriptorSize", 0x24, (1 << 40).to_bytes(8, "little")),
        ("numGTEsPerGT", 0x2C, (0).to_bytes(4, "little")),
        ("numGTEsPerGT", 0x2C, (1 << 30).to_bytes(4, "little")),
        ("gdOffset", 0x38, (1 << 40).to_bytes(8, "little")),
        ("rgdOffset", 0x30, (1 << 40).to_bytes(8, "little")),
        ("capacity", 0xC, (1 << 60).to_bytes(8, "little")),
        ("capacity", 0xC, (1).to_bytes(8, "little")),
        ("descriptorOffset", 0x1C, (0).to_bytes(8, "little")),
        ("descriptorOffset", 0x1C, (1 << 60).to_bytes(8, "little")),
        ("descriptorOffset", 0x1C, (5000).to_bytes(8, "little")),
        ("gdOffset", 0x38, (0xFFFFFFFFFFFFFFFF).to_bytes(8, "little")),
    ],
)
def test_corrupted_header_fields(tmp_path, field, offset, value):
    p = _mono(tmp_path)
    with open(p, "r+b") as f:
        f.seek(offset)
        f.write(value)
    with pytest.raises(VDError), Disk() as d:
        d.open(p, "VMDK", flags=OpenFlags.READ_ONLY)
        read_all(d)


def test_grain_table_entry_past_eof_is_corrupt_and_repairable(tmp_path):
    p = _mono(tmp_path)
    with Disk() as d:
        img = d.open(p, flags=OpenFlags.READ_ONLY)
        ext = img.extents[0]
        gt_sector = ext.gd[0]
        rgt_sector = ext.rgd[0]
        good = ext._gte(1)
        assert img.check().exit_code == 0
    with open(p, "r+b") as f:  # primary GT entry 1 -> far past EOF
        f.seek(gt_sector * 512 + 4)
        f.write((10**8).to_bytes(4, "little"))
    with Disk() as d:
        d.open(p, flags=OpenFlags.READ_ONLY)
        with pytest.raises(CorruptImage, match="past the end"):
            d.read(0, 200000)
        rep = d.top.check()
        assert rep.corrupt and rep.exit_code == 2
        assert any("grain table 0 entry 1" in pr.what for pr in rep.problems)
    with Disk() as d:
        d.open(p)
        rep = d.top.check(repair=True, dry_run=True)
        assert rep.corrupt
    with Disk() as d:
        d.open(p)
        rep = d.top.check(repair=True)
        assert rep.problems and all(pr.repaired for pr in rep.problems)
    with Disk() as d:
        img = d.open(p, flags=OpenFlags.READ_ONLY)
        assert img.check().exit_code == 0
        assert img.extents[0]._gte(1) == good
        assert d.read(0, 200000) == b"\x5a" * 200000
    # redundant table damaged: primary wins
    with open(p, "r+b") as f:
        f.seek(rgt_sector * 512 + 8)
        f.write((200).to_bytes(4, "little"))
    with Disk() as d:
        d.open(p)
        rep = d.top.check()
        assert rep.corrupt and "differs from the redundant" in rep.problems[0].what
        d.top.check(repair=True)
        assert d.top.check().exit_code == 0


def test_grain_directory_damage_repaired_from_redundant(tmp_path, qemu):
    p = _mono(tmp_path)
    with Disk() as d:
        img = d.open(p, flags=OpenFlags.READ_ONLY)
        gd_off = img.extents[0].gd_sector * 512
    with open(p, "r+b") as f:
        f.seek(gd_off)
        f.write((10**8).to_bytes(4, "little"))
    with Disk() as d:
        d.open(p)
        rep = d.top.check()
        assert rep.corrupt and "grain directory entry 0" in rep.problems[0].what
        rep = d.top.check(repair=True)
        assert not rep.corrupt
        assert d.read(0, 200000) == b"\x5a" * 200000
    assert qemu.check(p).returncode == 0
    with Disk() as d:
        d.open(p, flags=OpenFlags.READ_ONLY)
        assert d.top.check().exit_code == 0


def test_split_extent_alone_and_cowd_alone_give_clear_errors(tmp_path):
    p = str(tmp_path / "sp.vmdk")
    with Disk() as d:
        d.create_base(p, 3 * MiB, "VMDK", flags=ImageFlags.SPLIT_2G)
    with pytest.raises(NotSupported, match="descriptor"):
        Disk().open(str(tmp_path / "sp-s001.vmdk"), "VMDK", flags=OpenFlags.READ_ONLY)
    c = tmp_path / "c.vmdk"
    c.write_bytes(b"COWD" + bytes(4092))
    assert probe(str(c)).name == "VMDK"
    with pytest.raises(NotSupported):
        Disk().open(str(c), "VMDK", flags=OpenFlags.READ_ONLY)


def test_cowd_vmfssparse_extent_reads(tmp_path):
    """An ESX vmfsSparse child (COWD extent) over a vmfs flat base."""
    base_flat = tmp_path / "b-flat.vmdk"
    base_flat.write_bytes(b"\x11" * (64 * 512))
    (tmp_path / "b.vmdk").write_bytes(
        b"# Disk DescriptorFile\nversion=1\nCID=0172e8a4\nparentCID=ffffffff\n"
        b'createType="vmfs"\nRW 64 VMFS "b-flat.vmdk"\n'
    )
    # COWD: 2048-byte header, GD at sector 4 (1 entry), GT at sector 5 (4096 entries = 32 sectors)
    gs = 4
    cow = bytearray(37 * 512 + 2 * gs * 512)
    cow[:44] = vmdk.CowdHeader.build(
        dict(
            magic=b"COWD",
            version=1,
            flags=3,
            num_sectors=64,
            grain_size=gs,
            gd_offset=4,
            num_gd_entries=1,
            free_sector=37 + 2 * gs,
            cylinders=0,
            heads=0,
            sectors=0,
        )
    )
    cow[4 * 512 : 4 * 512 + 4] = (5).to_bytes(4, "little")
    cow[5 * 512 + 4 * 2 : 5 * 512 + 4 * 3] = (37).to_bytes(4, "little")  # grain 2
    cow[5 * 512 + 4 * 15 : 5 * 512 + 4 * 16] = (37 + gs).to_bytes(4, "little")  # grain 15
    cow[37 * 512 : (37 + gs) * 512] = b"\x22" * (gs * 512)
    cow[(37 + gs) * 512 :] = b"\x33" * (gs * 512)
    (tmp_path / "c-delta.vmdk").write_bytes(bytes(cow))
    (tmp_path / "c.vmdk").write_bytes(
        b"# Disk DescriptorFile\nversion=1\nCID=8f67ca74\nparentCID=0172e8a4\n"
        b'createType="vmfsSparse"\nparentFileNameHint="b.vmdk"\n'
        b'RW 64 VMFSSPARSE "c-delta.vmdk"\n'
    )
    expect = bytearray(b"\x11" * (64 * 512))
    expect[2 * gs * 512 : 3 * gs * 512] = b"\x22" * (gs * 512)
    expect[15 * gs * 512 : 16 * gs * 512] = b"\x33" * (gs * 512)
    with Disk.open_chain(str(tmp_path / "c.vmdk"), flags=OpenFlags.READ_ONLY) as d:
        assert len(d) == 2
        assert d.top.flags & ImageFlags.ESX and d.top.flags & ImageFlags.DIFF
        assert read_all(d) == bytes(expect)
    with Disk() as d:  # COWD extents are read-only
        d.open(str(tmp_path / "b.vmdk"), flags=OpenFlags.READ_ONLY)
        d.open(str(tmp_path / "c.vmdk"))
        with pytest.raises(VDError):
            d.write(0, b"\x01" * 512)


# -- metadata, relink, CID ------------------------------------------------------------------
def test_metadata_ddb_entries(tmp_path):
    from vdgui.vd import Geometry

    p = str(tmp_path / "m.vmdk")
    u = uuid.uuid4()
    with Disk() as d:
        d.create_base(p, 10 * MiB, "VMDK", uuid=u, lchs=Geometry(20, 16, 63))
        img = d.top
        assert img.uuid == u and img.lchs == Geometry(20, 16, 63)
        mu = uuid.uuid4()
        d.set_modification_uuid(0, mu)
        d.set_pchs(0, Geometry(100, 4, 50))
    text = _head(p, 21 * 512).decode("latin-1")
    assert f'ddb.uuid.image = "{u}"' in text and f'ddb.uuid.modification = "{mu}"' in text
    assert 'ddb.geometry.cylinders = "100"' in text and 'ddb.geometry.biosHeads = "16"' in text
    with Disk() as d:
        img = d.open(p, flags=OpenFlags.READ_ONLY)
        assert img.pchs == Geometry(100, 4, 50) and img.modification_uuid == mu
        info = d.info()["details"]
        assert info["create_type"] == "monolithicSparse" and info["adapter_type"] == "ide"
        with pytest.raises(NotSupported):
            img.set_comment("x")


def test_cid_changes_on_first_write_and_child_link(tmp_path):
    base, child = str(tmp_path / "b.vmdk"), str(tmp_path / "c.vmdk")
    with Disk() as d:
        d.create_base(base, 2 * MiB, "VMDK")
        cid0 = d.top.cid
        d.write(0, b"\x01" * 512)
        cid1 = d.top.cid
        assert cid1 != cid0
        d.write(4096, b"\x01" * 512)
        assert d.top.cid == cid1  # once per session
        d.create_diff(child)
        assert d.top.parent_cid == cid1
    with Disk() as d:
        assert d.open(base, flags=OpenFlags.READ_ONLY).cid == cid1
        c = d.open(child, flags=OpenFlags.READ_ONLY)
        assert c.parent_hint.locations == ["b.vmdk"] and c.parent_cid == cid1
    with Disk() as d:  # writing the base again breaks the link (as VMware intends)
        d.open(base)
        d.write(0, b"\x02" * 512)
    with Disk() as d:
        d.open(base, flags=OpenFlags.READ_ONLY)
        with pytest.raises(ParentMismatch, match="parentCID"):
            d.open(child, flags=OpenFlags.READ_ONLY)
    with Disk() as d:  # INFO skips the check
        d.open(base, flags=OpenFlags.READ_ONLY)
        d.open(child, flags=OpenFlags.INFO)


def test_relink_and_make_base(tmp_path):
    a, b, c = (str(tmp_path / n) for n in ("a.vmdk", "b.vmdk", "c.vmdk"))
    with Disk() as d:
        d.create_base(a, 2 * MiB, "VMDK")
        d.write(0, b"\x0a" * 65536)
        d.create_diff(b)
        d.write(65536, b"\x0b" * 65536)
        d.create_diff(c)
        d.write(131072, b"\x0c" * 65536)
    # relink c directly onto a (as merge would after folding b into a)
    pa = vmdk.BACKEND.open(a, OpenFlags.READ_ONLY)
    cimg = vmdk.BACKEND.open(c, OpenFlags.NORMAL)
    cimg.set_parent(pa)
    cimg.close()
    pa.close()
    with Disk.open_chain(c, flags=OpenFlags.READ_ONLY) as d:
        assert len(d) == 2
        assert d.read(0, 196608) == b"\x0a" * 65536 + bytes(65536) + b"\x0c" * 65536
    cimg = vmdk.BACKEND.open(c, OpenFlags.NORMAL)
    cimg.set_parent(None)
    cimg.close()
    with Disk() as d:
        img = d.open(c, flags=OpenFlags.READ_ONLY)
        assert not img.is_diff and img.parent_uuid is None
        assert d.read(0, 196608) == bytes(131072) + b"\x0c" * 65536


# -- resize ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "flags",
    [
        ImageFlags.NONE,
        ImageFlags.FIXED,
        ImageFlags.SPLIT_2G,
        ImageFlags.SPLIT_2G | ImageFlags.FIXED,
    ],
)
def test_resize_grow(tmp_path, flags, qemu):
    p = str(tmp_path / "r.vmdk")
    with Disk() as d:
        d.create_base(p, 3 * MiB, "VMDK", flags=flags)
        d.write(3 * MiB - 512, b"\x07" * 512)
        d.top.resize(50 * MiB)
        assert d.size == 50 * MiB
        d.write(40 * MiB, b"\x08" * 70000)
        with pytest.raises(InvalidArgument):
            d.top.resize(MiB)
    with Disk() as d:
        d.open(p, flags=OpenFlags.READ_ONLY)
        assert d.size == 50 * MiB
        assert d.read(3 * MiB - 512, 1024) == b"\x07" * 512 + bytes(512)
        assert d.read(40 * MiB, 70000) == b"\x08" * 70000
    assert qemu.check(p).returncode in (0, 63)
    out = tmp_path / "r.raw"
    qemu.to_raw(p, out)
    raw = out.read_bytes()
    assert len(raw) == 50 * MiB and raw[40 * MiB : 40 * MiB + 70000] == b"\x08" * 70000


def test_resize_sparse_moves_grain_directory(tmp_path, qemu):
    """Growing past what the directory's sectors hold relocates GD and RGD (sparse file)."""
    p = str(tmp_path / "g.vmdk")
    with Disk() as d:
        d.create_base(p, 8 * MiB, "VMDK")
        d.write(0, b"\x01" * 65536)
        old = d.top.extents[0].gd_sector
        d.top.resize(200 << 30)  # 200 GiB: 6400 tables, the GD moves
        assert d.top.extents[0].gd_sector != old
        d.write((200 << 30) - 65536, b"\x02" * 65536)
    with Disk() as d:
        d.open(p, flags=OpenFlags.READ_ONLY)
        assert d.read(0, 65536) == b"\x01" * 65536
        assert d.read((200 << 30) - 65536, 65536) == b"\x02" * 65536
        assert d.top.check().exit_code == 0
    assert qemu.check(p).returncode == 0
    r = qemu.io("-c", f"read -P 2 {(200 << 30) - 65536} 65536", "-c", "read -P 1 0 65536", "-r", p)
    assert "read 65536/65536" in r.stdout


def test_stream_write_sequential_only(tmp_path):
    p = str(tmp_path / "s.vmdk")
    with Disk() as d:
        d.create_base(p, 4 * MiB, "VMDK", flags=ImageFlags.STREAM_OPTIMIZED)
        d.write(0, b"\x01" * 100000)
        d.write(100000, b"\x02" * 1000)  # same grain continues: fine
        d.write(2 * MiB, b"\x03" * 512)
        assert d.read(0, 100000) == b"\x01" * 100000
        with pytest.raises(NotSupported, match="sequentially"):
            d.write(65536, b"\x04" * 512)
        assert not os.path.exists(p)  # still under its temporary name
    assert os.path.exists(p) and not [n for n in os.listdir(tmp_path) if "tmp" in n]
    with Disk() as d:
        img = d.open(p)
        assert img.flags & ImageFlags.STREAM_OPTIMIZED
        assert d.read(0, 101000) == b"\x01" * 100000 + b"\x02" * 1000
        assert d.read(2 * MiB, 1024) == b"\x03" * 512 + bytes(512)
        with pytest.raises(NotSupported):
            d.write(0, b"\x09" * 512)
        with pytest.raises(NotSupported):
            img.resize(8 * MiB)
    for bad in (
        ImageFlags.STREAM_OPTIMIZED | ImageFlags.FIXED,
        ImageFlags.STREAM_OPTIMIZED | ImageFlags.SPLIT_2G,
    ):
        with pytest.raises(NotSupported), Disk() as d:
            d.create_base(str(tmp_path / "x.vmdk"), MiB, "VMDK", flags=bad)


def test_probe(tmp_path):
    p = _mono(tmp_path, data=False)
    assert probe(p).name == "VMDK"
    q = str(tmp_path / "f.vmdk")
    with Disk() as d:
        d.create_base(q, MiB, "VMDK", flags=ImageFlags.FIXED)
    assert probe(q).name == "VMDK"
    assert probe(str(tmp_path / "f-flat.vmdk")).name != "VMDK"


def test_discard_without_fill_over_the_parent_is_refused(tmp_path, qemu):
    # Image.discard's fill is optional: part of a grain the parent holds cannot be zeroed
    # without it (this raised TypeError: 'NoneType' object is not callable)
    base = tmp_path / "b.vmdk"
    qemu.img("create", "-f", "vmdk", base, "4M")
    qemu.io("-f", "vmdk", "-c", "write -P 0x55 0 1M", base)
    kid = tmp_path / "k.vmdk"
    qemu.img("create", "-f", "vmdk", "-o", "zeroed_grain=on", "-b", base.name, "-F", "vmdk", kid)
    with Disk.open_chain(str(kid), "VMDK", OpenFlags.NORMAL) as d:
        with pytest.raises(NotSupported, match="parent's content"):
            d.top.discard(4096, 4096)
        d.discard(4096, 4096)                     # through the disk: the parent's data below
        assert d.read(0, 12288) == b"\x55" * 4096 + bytes(4096) + b"\x55" * 4096


# -- compact --------------------------------------------------------------------------------
def test_compact_base_drops_zero_grains_and_shrinks(tmp_path, qemu):
    from vdgui.vd import compact

    p = str(tmp_path / "c.vmdk")
    size = 8 * MiB
    expect = bytearray(size)
    with Disk() as d:
        d.create_base(p, size, "VMDK")
        for i in range(0, size, 65536):
            d.write(i, bytes([i // 65536 % 250 + 1]) * 65536)
            expect[i : i + 65536] = bytes([i // 65536 % 250 + 1]) * 65536
        for i in range(0, size, 3 * 65536):  # zero every third grain (stays allocated)
            d.write(i, bytes(65536))
            expect[i : i + 65536] = bytes(65536)
        d.top.resize(size)  # no-op
    before = os.path.getsize(p)
    compact(p)
    after = os.path.getsize(p)
    assert after <= before - 40 * 65536
    with Disk() as d:
        img = d.open(p, flags=OpenFlags.READ_ONLY)
        assert read_all(d) == bytes(expect)
        assert img.check().exit_code == 0
    assert qemu.check(p).returncode == 0
    ref = tmp_path / "ref.raw"
    ref.write_bytes(bytes(expect))
    assert qemu.compare(p, ref, "vmdk", "raw").returncode == 0


def test_compact_hook_in_place_split_and_diff(tmp_path, qemu):
    from vdgui.vd import compact

    base, child = str(tmp_path / "b.vmdk"), str(tmp_path / "c.vmdk")
    with Disk() as d:
        d.create_base(base, 4 * MiB, "VMDK", flags=ImageFlags.SPLIT_2G)
        d.write(0, b"\x01" * (2 * MiB))
        d.write(MiB, bytes(65536 * 2))
        d.create_diff(child, flags=ImageFlags.SPLIT_2G)
        d.write(0, b"\x01" * 65536)  # same as the parent: dropped by compact
        d.write(65536, bytes(65536))  # zero over parent data: kept
        d.write(3 * MiB, b"\x02" * 65536)  # new data: kept
        expect = read_all(d)
    compact(base)
    compact(child)
    with Disk.open_chain(child, flags=OpenFlags.READ_ONLY) as d:
        assert read_all(d) == expect
        c = d.top
        assert [c.extents[0]._gte(i) > 1 for i in (0, 1)] == [False, True]
        assert d.image(0).extents[0]._gte(16) == 0  # the zeroed base grain went away
    ref = tmp_path / "ref.raw"
    ref.write_bytes(expect)
    assert qemu.compare(child, ref, "vmdk", "raw").returncode == 0
    assert qemu.check(child).returncode == 0 and qemu.check(base).returncode == 0


def test_compact_refused_for_flat(tmp_path):
    p = str(tmp_path / "f.vmdk")
    with Disk() as d:
        d.create_base(p, MiB, "VMDK", flags=ImageFlags.FIXED)
        with pytest.raises(NotSupported):
            d.top.compact()


def test_descriptor_in_a_declared_code_page(tmp_path):
    (tmp_path / "d-flat.vmdk").write_bytes(b"\x01" * 1024)
    text = (
        '# Disk DescriptorFile\nversion=1\nencoding="windows-1252"\nCID=fffffffe\n'
        'parentCID=ffffffff\ncreateType="monolithicFlat"\n# caf\u00e9 cr\u00e8me\n'
        'RW 2 FLAT "d-flat.vmdk" 0\nddb.comment = "\u00e9t\u00e9"\n'
    )
    p = tmp_path / "d.vmdk"
    p.write_bytes(text.encode("cp1252"))
    with Disk() as d:
        img = d.open(str(p))
        assert d.read(0, 1024) == b"\x01" * 1024
        assert img.desc.get("ddb.comment") == "\u00e9t\u00e9"
        d.write(0, b"\x02" * 512)  # rewrites the descriptor (CID, UUID)
    raw = p.read_bytes()
    assert "caf\u00e9 cr\u00e8me".encode("cp1252") in raw
    with Disk() as d:
        img = d.open(str(p), flags=OpenFlags.READ_ONLY)
        assert img.desc.encoding == "cp1252" and img.uuid is not None
    p.write_bytes(text.replace("windows-1252", "no-such-codec").encode("cp1252"))
    with pytest.raises(CorruptImage, match="encoding"):
        Disk().open(str(p), flags=OpenFlags.READ_ONLY)


def test_uuid_assigned_on_first_read_write_open_only(tmp_path, qemu):
    p = str(tmp_path / "q.vmdk")
    qemu.img("create", "-f", "vmdk", p, "1M")
    with Disk() as d:
        assert d.open(p, flags=OpenFlags.READ_ONLY).uuid is None
    with Disk() as d:
        u = d.open(p).uuid
        assert u is not None
    with Disk() as d:
        assert d.open(p, flags=OpenFlags.READ_ONLY).uuid == u
    assert qemu.check(p).returncode == 0
    text = _head(p, 21 * 512)[512:].split(b"\0")[0].decode()
    for kept in (
        'ddb.toolsVersion = "2147483647"',
        'ddb.adapterType = "ide"',
        'ddb.virtualHWVersion = "4"',
        "# The Disk Data Base",
        'createType="monolithicSparse"',
    ):
        assert kept in text, kept  # qemu's lines survive our rewrite


def test_leaked_tail_reported_and_repaired(tmp_path, qemu):
    p = _mono(tmp_path)
    good = os.path.getsize(p)
    with open(p, "ab") as f:  # a grain written but never linked (a crash)
        f.write(b"\x33" * 65536)
    with Disk() as d:
        img = d.open(p, flags=OpenFlags.READ_ONLY)
        rep = img.check()
        assert rep.leaks and not rep.corrupt and rep.exit_code == 3
        assert rep.problems[0].severity == "leak" and rep.problems[0].offset == good
    with Disk() as d:
        img = d.open(p)
        rep = img.check(repair=True)
        assert rep.problems[0].repaired and rep.exit_code == 0
        assert d.read(0, 200000) == b"\x5a" * 200000
    assert os.path.getsize(p) == good
    assert qemu.check(p).returncode == 0


def test_sparse_extent_listed_twice_refused(tmp_path):
    p = str(tmp_path / "sp.vmdk")
    with Disk() as d:
        d.create_base(p, 3 * MiB, "VMDK", flags=ImageFlags.SPLIT_2G)
    text = (
        Path(p)
        .read_text()
        .replace(
            'RW 6144 SPARSE "sp-s001.vmdk"',
            'RW 6144 SPARSE "sp-s001.vmdk"\nRW 6144 SPARSE "sp-s001.vmdk"',
        )
    )
    assert text.count("sp-s001") == 2
    with open(p, "w") as f:
        f.write(text)
    with pytest.raises(CorruptImage, match="more than once"):
        Disk().open(p, flags=OpenFlags.READ_ONLY)


def test_stream_being_written_takes_identity_and_geometry(tmp_path):
    # the new streamOptimized image's descriptor is embedded in its temporary file: setting the
    # UUID or geometry before close writes it there (it used to fail with an AttributeError)
    p = str(tmp_path / "s.vmdk")
    u = uuid.UUID("12345678-1234-5678-1234-567812345678")
    with Disk() as d:
        img = d.create_base(p, 4 * MiB, "VMDK", flags=ImageFlags.STREAM_OPTIMIZED)
        img.set_uuid(u)
        img.set_pchs(Geometry(8, 16, 63))
        d.write(0, b"\x01" * 65536)
    with Disk() as d:
        img = d.open(p, flags=OpenFlags.READ_ONLY)
        assert img.flags & ImageFlags.STREAM_OPTIMIZED
        assert img.uuid == u and img.pchs == Geometry(8, 16, 63)
        assert d.read(0, 65536) == b"\x01" * 65536
        assert img.check().exit_code == 0


def test_compressed_grain_bomb_and_garbage_refused(tmp_path):
    import zlib

    p = str(tmp_path / "s.vmdk")
    with Disk() as d:
        d.create_base(p, 2 * MiB, "VMDK", flags=ImageFlags.STREAM_OPTIMIZED)
        d.write(0, b"\x01" * 65536)
        d.write(65536, b"\x02" * 65536)
    with Disk() as d:
        img = d.open(p, flags=OpenFlags.READ_ONLY)
        ext = img.extents[0]
        g0, g1 = ext._gte(0), ext._gte(1)
        gt_sector = ext.gd[0]
    bomb = zlib.compress(bytes(64 * MiB))  # inflates to 1024 grains
    data = Path(p).read_bytes()  # the bomb goes before the footer (found from the end)
    rec = vmdk.GrainMarker.build(dict(lba=0, size=len(bomb))) + bomb
    rec += bytes(-len(rec) % 512)
    end = len(data) - 1536
    Path(p).write_bytes(data[:end] + rec + data[end:])
    with open(p, "r+b") as f:
        f.seek(gt_sector * 512)
        f.write((end // 512).to_bytes(4, "little"))
        f.seek(g1 * 512 + 12)
        f.write(b"garbage!" * 4)
    with Disk() as d:
        d.open(p, flags=OpenFlags.READ_ONLY)
        with pytest.raises(CorruptImage, match="more than a grain"):
            d.read(0, 65536)
        with pytest.raises(CorruptImage, match="does not inflate"):
            d.read(65536, 65536)
    assert g0 != g1


def test_check_directory_disagreement_and_metadata_pointer(tmp_path, qemu):
    p = _mono(tmp_path)
    with Disk() as d:
        img = d.open(p, flags=OpenFlags.READ_ONLY)
        ext = img.extents[0]
        gd_off, rgt_sector = ext.gd_sector * 512, ext.rgd[0]
    with open(p, "r+b") as f:
        f.seek(gd_off)  # primary directory entry 0 emptied
        f.write(bytes(4))
        f.seek(rgt_sector * 512 + 4 * 3)  # redundant entry for grain 3 -> the header
        f.write((0).to_bytes(4, "little"))
    with Disk() as d:
        d.open(p, flags=OpenFlags.READ_ONLY)
        assert d.read(0, 65536) == bytes(65536)  # the primary says: unallocated
        rep = d.top.check()
        assert rep.corrupt and "primary copy is empty" in rep.problems[0].what
    with Disk() as d:
        d.open(p)
        rep = d.top.check(repair=True)
        assert not rep.corrupt and all(pr.repaired for pr in rep.problems)
        assert d.read(0, 200000)[: 3 * 65536] == b"\x5a" * (3 * 65536)
    with Disk() as d:
        d.open(p, flags=OpenFlags.READ_ONLY)
        assert d.top.check().exit_code == 0
    assert qemu.check(p).returncode == 0
    with open(p, "r+b") as f:  # a grain table entry pointing at the header
        f.seek(rgt_sector * 512 + 4)
        f.write((0 + 2).to_bytes(4, "little"))
    with Disk() as d:
        d.open(p, flags=OpenFlags.READ_ONLY)
        rep = d.top.check()
        assert rep.corrupt and "into metadata" in rep.problems[0].what


@pytest.mark.parametrize(
    "flags", [ImageFlags.SPLIT_2G, ImageFlags.SPLIT_2G | ImageFlags.FIXED], ids=["sparse", "flat"]
)
def test_resize_split_adds_extents(tmp_path, qemu, flags):
    p = str(tmp_path / "r.vmdk")
    GiB = 1 << 30
    with Disk() as d:
        d.create_base(p, 3 * MiB, "VMDK", flags=flags)
        d.write(0, b"\x01" * 4096)
        d.top.resize(5 * GiB)
        # a flat last extent fills up to 2 GiB first; a sparse one keeps its size (its header
        # names it too, so growing it and adding extents could not switch at once)
        n = 3 if flags & ImageFlags.FIXED else 4
        assert len(d.top.extents) == n and len(d.top.files()) == n + 1
        d.write(4 * GiB + 12345 * 512, b"\x02" * 8192)
        d.write(2047 * MiB - 4096, b"\x03" * 8192)  # across 2 GiB - 1 MiB (flat: a boundary)
    names = sorted(os.listdir(tmp_path))
    suffix = "s" if not flags & ImageFlags.FIXED else "f"
    assert names == ["r-%s%03d.vmdk" % (suffix, i) for i in range(1, n + 1)] + ["r.vmdk"]
    r = qemu.io(
        "-f",
        "vmdk",
        "-r",
        "-c",
        "read -P 1 0 4096",
        "-c",
        f"read -P 2 {4 * GiB + 12345 * 512} 8192",
        "-c",
        f"read -P 3 {2047 * MiB - 4096} 8192",
        p,
    )
    assert r.stdout.count("read ") == 3
    assert qemu.check(p).returncode == 0
    assert "virtual size: 5 GiB" in qemu.img("info", p).stdout


def test_write_allocates_missing_grain_tables(tmp_path, qemu):
    p = _mono(tmp_path, data=False)
    with Disk() as d:
        img = d.open(p, flags=OpenFlags.READ_ONLY)
        gd_off, rgd_off = img.extents[0].gd_sector * 512, img.extents[0].rgd_sector * 512
    with open(p, "r+b") as f:  # a VMware-style image without preallocated tables
        f.seek(gd_off)
        f.write(bytes(4))
        f.seek(rgd_off)
        f.write(bytes(4))
    with Disk() as d:
        d.open(p)
        assert d.allocation()[0].status == Alloc.UNALLOCATED
        d.write(70000, b"\x09" * 1000)
        assert d.top.check().exit_code == 0
    with Disk() as d:
        img = d.open(p, flags=OpenFlags.READ_ONLY)
        assert img.extents[0].gd[0] != 0 and img.extents[0].rgd[0] != 0
        assert d.read(70000, 1000) == b"\x09" * 1000
    assert qemu.check(p).returncode == 0
    assert "read 1000/1000" in qemu.io("-f", "vmdk", "-r", "-c", "read -P 9 70000 1000", p).stdout


def test_raw_disk_vmdk_for_a_drive_file(tmp_path, monkeypatch):
    """VirtualBox's 'fullDevice' raw disk VMDK (qemu does not open that createType); a regular
    file stands in for the drive under the tests' flag."""
    monkeypatch.setenv(RAW_TEST_ENV, "1")
    drive_dir = tmp_path / "host"
    drive_dir.mkdir()
    drive = drive_dir / "disk.img"
    drive.write_bytes(b"\x11" * MiB + b"\x22" * MiB)
    p = str(tmp_path / "vm" / "raw.vmdk")
    os.mkdir(tmp_path / "vm")
    with Disk() as d:
        img = d.create_base(
            p, 2 * MiB, "VMDK", config={"RawDrive": str(drive)}, allow_unsafe_paths=True
        )
        assert img.flags & ImageFlags.RAWDISK and d.size == 2 * MiB
        assert img.files() == [os.path.abspath(p)]  # the drive is not part of the image
        d.write(0, b"\x33" * 512)  # writes go to the drive
    assert drive.read_bytes()[:513] == b"\x33" * 512 + b"\x11"
    with pytest.raises(UnsafePath):  # the absolute drive path needs permission
        Disk().open(p, flags=OpenFlags.READ_ONLY)
    with Disk() as d:
        d.open(p, flags=OpenFlags.READ_ONLY | OpenFlags.ALLOW_UNSAFE_PATHS)
        assert d.read(MiB, 4) == b"\x22" * 4
        assert d.info()["details"]["create_type"] == "fullDevice"
        assert read_all(d) == drive.read_bytes()


def test_cross_linked_grains_found_and_unshared(tmp_path, qemu):
    p = _mono(tmp_path)
    with Disk() as d:
        img = d.open(p, flags=OpenFlags.READ_ONLY)
        ext = img.extents[0]
        g0 = ext._gte(0)
        gt, rgt = ext.gd[0], ext.rgd[0]
    with open(p, "r+b") as f:  # grain 5 points at grain 0's data, in both tables
        for sec in (gt, rgt):
            f.seek(sec * 512 + 4 * 5)
            f.write(g0.to_bytes(4, "little"))
    with Disk() as d:
        d.open(p, flags=OpenFlags.READ_ONLY)
        rep = d.top.check()
        assert rep.corrupt and "cross-linked" in rep.problems[0].what
    with Disk() as d:
        d.open(p)
        assert d.top.check(repair=True).problems[0].repaired
        d.write(5 * 65536, b"\x44" * 512)  # grain 5 no longer overwrites grain 0
        assert d.read(0, 512) == b"\x5a" * 512
        assert d.top.check().exit_code == 0
    assert qemu.check(p).returncode == 0


def test_descriptor_with_bom_and_crlf_round_trips(tmp_path):
    text = (
        "\ufeff# Disk DescriptorFile\r\nversion=1\r\nCID=fffffffe\r\nparentCID=ffffffff\r\n"
        'createType="monolithicFlat"\r\nRW 2 FLAT "b-flat.vmdk" 0\r\n'
    )
    d = Descriptor.parse(text.encode("utf-8"))
    assert d.text() == text and d.newline == "\r\n"
    (tmp_path / "b-flat.vmdk").write_bytes(b"\x05" * 1024)
    p = tmp_path / "b.vmdk"
    p.write_bytes(text.encode("utf-8"))
    assert probe(str(p)).name == "VMDK"
    with Disk() as disk:
        disk.open(str(p))
        disk.write(0, b"\x06" * 512)
    out = p.read_bytes().decode("utf-8")
    assert out.startswith("\ufeff# Disk DescriptorFile\r\n") and "\r\nCID=" in out


@pytest.mark.parametrize(
    "grain,gtes,flags",
    [(8, 512, 3), (256, 128, 3), (16, 512, 1 | 4)],
    ids=["4k-grains", "128k-grains-small-tables", "no-rgd-zeroed-grain"],
)
def test_other_grain_geometries(tmp_path, qemu, grain, gtes, flags):
    """Grain sizes, table sizes and flags qemu-img cannot create, written by us, checked by qemu."""
    from vdgui.vd.fileio import ImageFile
    from vdgui.vd.formats.vmdk.descriptor import ExtentLine, build

    p = str(tmp_path / "g.vmdk")
    size = 3 * MiB + 1536
    desc = build(
        [
            ("version", "1", False),
            ("CID", "12345678", False),
            ("parentCID", "ffffffff", False),
            ("createType", "monolithicSparse", True),
        ],
        [ExtentLine("RW", size // 512, "SPARSE", "g.vmdk")],
        [("ddb.adapterType", "ide")],
    )
    f = ImageFile(p, create=True)
    vmdk.write_sparse_extent(f, size // 512, desc.to_bytes(), grain=grain, gtes=gtes, flags=flags)
    f.close()
    expect = bytearray(size)
    with Disk() as d:
        img = d.open(p)
        assert img.block_size == grain * 512
        for off, data in scattered_writes(size, seed=grain):
            d.write(off, data)
            expect[off : off + len(data)] = data
        assert read_all(d) == bytes(expect)
        assert img.check().exit_code == 0
    ref = tmp_path / "ref.raw"
    ref.write_bytes(bytes(expect))
    assert qemu.check(p).returncode == 0
    assert qemu.compare(p, ref, "vmdk", "raw").returncode == 0


def test_unclean_shutdown_flag_while_writing(tmp_path, qemu):
    p = _mono(tmp_path, data=False)
    assert _head(p, 512)[0x48] == 0
    d = Disk()
    d.open(p)
    d.write(0, b"\x01" * 512)
    assert _head(p, 512)[0x48] == 1  # set while the session writes
    assert d.info()["details"]["unclean_shutdown"]
    d.close()
    assert _head(p, 512)[0x48] == 0  # cleared by a clean close
    assert qemu.check(p).returncode == 0
    with Disk() as d:  # a read-write open without writes: untouched
        d.open(p)
    assert _head(p, 512)[0x48] == 0


def test_info_open_reads_only_the_descriptor(tmp_path, monkeypatch):
    p = str(tmp_path / "sp.vmdk")
    with Disk() as d:
        d.create_base(p, 5 * MiB, "VMDK", flags=ImageFlags.SPLIT_2G)
    opened = []
    real = vmdk.ImageFile

    class Spy(real):
        def __init__(self, path, *a, **kw):
            opened.append(os.path.basename(path))
            super().__init__(path, *a, **kw)

    monkeypatch.setattr(vmdk, "ImageFile", Spy)          # extents (VmdkBackend.extent_file)
    monkeypatch.setattr(vmdk.impl, "ImageFile", Spy)     # the descriptor (open)
    with Disk() as d:
        img = d.open(p, flags=OpenFlags.INFO)
        assert img.size == 5 * MiB and len(img.files()) == 2
        assert d.info()["details"]["extents"][0]["file"] == "sp-s001.vmdk"
    assert opened == ["sp.vmdk"]
    opened.clear()
    with Disk() as d:
        d.open(p, flags=OpenFlags.READ_ONLY)
    assert opened == ["sp.vmdk", "sp-s001.vmdk"]


def test_redundant_table_one_update_behind_after_a_crash_is_a_leak(tmp_path, qemu):
    """A crash between the primary and the redundant grain table write (uncleanShutdown set
    before the first table update) leaves the redundant copy one update behind: check calls
    that a leak, not corruption, and repair copies the primary. Without the flag it is corrupt."""
    p = _mono(tmp_path)
    with Disk() as d:
        ext = d.open(p, flags=OpenFlags.READ_ONLY).extents[0]
        rgt, used = ext.rgd[0], [i for i in range(ext.gtes) if ext._gte(i) > 1]
    assert used
    with open(p, "r+b") as f:  # the redundant entry not yet written
        f.seek(rgt * 512 + 4 * used[-1])
        f.write(bytes(4))
        f.seek(0x48)
        f.write(b"\x01")  # uncleanShutdown: a writer was stopped
    rep = check(p)
    assert rep.exit_code == 3 and not rep.corrupt, rep.problems
    assert "interrupted update" in rep.problems[0].what
    assert qemu.check(p).returncode == 0
    with Disk() as d:
        d.open(p, flags=OpenFlags.READ_ONLY)
        assert d.read(0, 200000) == b"\x5a" * 200000
    rep = check(p, repair=True)
    assert rep.repaired and check(p).exit_code == 0
    assert _head(p, 512)[0x48] == 0  # the copies agree again: flag cleared
    with open(p, "r+b") as f:  # the same disagreement, no flag: corrupt
        f.seek(rgt * 512 + 4 * used[-1])
        f.write(bytes(4))
    assert check(p).exit_code == 2


def test_table_updates_set_unclean_shutdown_first(tmp_path, monkeypatch):
    """Every path that changes a grain table (write, compact, repair) sets uncleanShutdown,
    synced, before its first table write; a clean close clears it."""
    p = str(tmp_path / "s.vmdk")
    with Disk() as d:
        d.create_base(p, 4 * MiB, "VMDK", flags=ImageFlags.SPLIT_2G)
        d.write(0, b"\x11" * MiB)
        d.write(2 * MiB, b"\x22" * MiB)
    with Disk() as d:
        d.open(p, flags=OpenFlags.HONOR_ZEROES)
        d.write(0, bytes(MiB))  # zero grains over data: compact drops them
    seen = []
    real = vmdk.SparseExtent._set_gte

    def spy(self, idx, value):
        real(self, idx, value)  # (begin_update runs before its writes)
        seen.append(_head(self.f.path, 512)[0x48])

    monkeypatch.setattr(vmdk.SparseExtent, "_set_gte", spy)
    with Disk() as d:  # a session that only compacts (in place)
        d.open(p)
        d.top.compact()
    assert seen and all(seen)
    with Disk() as d:
        assert not d.open(p, flags=OpenFlags.READ_ONLY).info()["unclean_shutdown"]


def test_writes_over_allocated_adjacent_grains_are_one_write(tmp_path, qemu):
    """Overwriting 1 MiB of grains a sparse VMDK holds side by side in the file: one write
    (it was one per 64 KiB grain: 16 system calls per MiB of a merge into a VMDK base)."""
    path = str(tmp_path / "a.vmdk")
    qemu.img("create", "-f", "vmdk", path, "16M")
    qemu.io("-f", "vmdk", "-c", "write -P 0x11 0 2M", path)
    with Disk() as d:
        d.open(path, "VMDK", OpenFlags.NORMAL)
        d.write(0, b"\x11" * 65536)          # the first write updates the CID: not counted
        f = d.top.extents[0].f
        calls = []
        pwrite, pwritev = f.pwrite, f.pwritev
        f.pwrite = lambda off, data: (calls.append(off), pwrite(off, data))[1]
        f.pwritev = lambda off, bufs: (calls.append(off), pwritev(off, bufs))[1]
        d.write(MiB // 2, b"\x22" * MiB)
        assert len(calls) == 1, calls
    assert qemu.check(path).returncode == 0
    r = qemu.io("-f", "vmdk", "-c", "read -P 0x11 0 512k", "-c", "read -P 0x22 512k 1M",
                "-c", "read -P 0x11 1536k 512k", path)
    assert "Pattern verification failed" not in r.stdout


def test_file_contiguous_grains_read_in_one_step_match_grain_by_grain(tmp_path):
    """Issue #18 goal 4: a read's pieces step over grains that follow each other in the file in
    one comparison at C speed. On random grain tables (runs of every length, broken by jumps,
    zeroed and unallocated grains, entries near the top of 32 bits) the pieces must equal those
    built one grain at a time, for reads starting and ending anywhere."""
    import random

    rnd = random.Random(5)
    p = str(tmp_path / "a.vmdk")
    with Disk() as d:
        d.create_base(p, 64 * MiB, "VMDK")
        d.write(0, b"\1" * 65536)
    with Disk() as d:
        d.open(p, "VMDK", flags=OpenFlags.READ_ONLY)
        ext = d.top.extents[0]
        assert ext.plain_gtes and not ext.compressed
        gt = ext._gt(0)
        ext.file_size = 1 << 60                 # the entries below point anywhere
        gs, n = ext.grain // 512, len(gt)
        for _ in range(30):
            i = 0
            while i < n:
                k = min(n - i, rnd.choice([1, 2, 15, 16, 17, 33, 64, 65, 200]))
                what = rnd.choice(["run", "run", "run", "zero", "none", "top"])
                sec = rnd.randrange(2, 1 << 24) if what != "top" else (1 << 32) - 40 * gs
                for j in range(k):
                    if what in ("run", "top"):
                        e = sec + j * gs
                        if e >= 1 << 32 or rnd.random() < 0.05:   # past 32 bits, or a jump
                            e = rnd.randrange(2, 1 << 24)
                    else:
                        e = 1 if what == "zero" else 0
                    gt[i + j] = e
                i += k
            for _ in range(40):
                a = rnd.randrange(n * gs) * 512
                b = rnd.randrange(a // 512 + 1, n * gs + 1) * 512
                assert ext._parts(a, b - a) == ext._parts_by_grain(a, b - a), (a, b)
