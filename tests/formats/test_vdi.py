"""VDI backend: conformance, structures, header checks, hooks (without qemu)."""
from __future__ import annotations

import os
import shutil
import struct
import uuid

import pytest

from tests.conftest import pattern, read_all, sha
from tests.engine import kill_harness as kh
from tests.formats.conformance import FormatConformance
from vdgui.vd import (
    Alloc,
    Cap,
    ConfigError,
    CorruptImage,
    Disk,
    Geometry,
    ImageFlags,
    InvalidArgument,
    NotSupported,
    OpenFlags,
    Operation,
    ParentMismatch,
    VDError,
    get_backend,
    probe,
)
from vdgui.vd.formats.vdi import layout as L

MiB = 1 << 20


class TestVdiConformance(FormatConformance):
    FORMAT = "VDI"
    EXT = "vdi"
    VARIANTS = (ImageFlags.NONE, ImageFlags.FIXED)
    DIFF = True
    COMMENT = True
    UUID = True


class TestVdiSmallBlocksConformance(FormatConformance):
    """Same suite with 64 KiB allocation blocks (AllocationBlockSize)."""
    FORMAT = "VDI"
    EXT = "vdi"
    VARIANTS = (ImageFlags.NONE,)
    COMMENT = True
    CREATE_CONFIG = {"AllocationBlockSize": "65536"}


# -- helpers -------------------------------------------------------------------------------
def make(path, size=4 * MiB, data=(), flags=ImageFlags.NONE, config=None, **kw):
    with Disk() as d:
        d.create_base(str(path), size, "VDI", flags=flags, config=config, **kw)
        for off, buf in data:
            d.write(off, buf)
    return str(path)


def head(path, n):
    with open(path, "rb") as f:
        return f.read(n)


def hdr(path):
    raw = head(path, L.PRE_HEADER_SIZE + L.HEADER1PLUS_SIZE)
    return L.PreHeader.parse(raw), L.Header1Plus.parse(raw[L.PRE_HEADER_SIZE:])


def patch(path, offset, fmt, value):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))


def map_entries(path):
    _, h = hdr(path)
    with open(path, "rb") as f:
        f.seek(h.offset_blocks)
        return list(struct.unpack(f"<{h.blocks}I", f.read(h.blocks * 4)))


def open_ro(path):
    d = Disk()
    d.open(str(path), "VDI", flags=OpenFlags.READ_ONLY)
    return d


# -- declarations & structures ---------------------------------------------------------------
def test_declarations_match_virtualbox():
    b = get_backend("vdi")
    assert b.name == "VDI"
    assert b.caps == (Cap.UUID | Cap.CREATE_FIXED | Cap.CREATE_DYNAMIC | Cap.DIFF | Cap.FILE
                      | Cap.ASYNC | Cap.VFS | Cap.DISCARD | Cap.PREFERRED)
    assert [e.ext for e in b.extensions] == ["vdi"]
    (key,) = b.config_keys
    assert (key.name, key.default, int(key.type), key.create_only) == \
        ("AllocationBlockSize", "1048576", 1, True)
    assert b.operations == {Operation.WRITE, Operation.CREATE, Operation.COMPACT, Operation.RESIZE,
                            Operation.CHECK, Operation.REPAIR, Operation.RELINK, Operation.DISCARD,
                            Operation.COMMENT}
    assert b.create_flags & ImageFlags.FIXED


@pytest.mark.parametrize("struct_, size", [(L.PreHeader, 72), (L.Header0, 348),
                                           (L.Header1, 384), (L.Header1Plus, 400),
                                           (L.DiskGeometry, 16)])
def test_struct_roundtrip(struct_, size):
    import random
    rnd = random.Random(size)
    for _ in range(20):
        b = bytes(rnd.randrange(256) for _ in range(size))
        assert struct_.build(struct_.parse(b)) == b
    assert struct_.sizeof() == size


def test_struct_roundtrip_of_written_header(tmp_path):
    p = make(tmp_path / "a.vdi", comment="round trip")
    raw = head(p, 472)
    assert L.PreHeader.build(L.PreHeader.parse(raw[:72])) == raw[:72]
    assert L.Header1Plus.build(L.Header1Plus.parse(raw[72:])) == raw[72:]


def test_created_header_fields(tmp_path):
    u = uuid.uuid4()
    p = make(tmp_path / "a.vdi", size=3 * MiB + 512, uuid=u, comment="hi there",
             lchs=Geometry(6, 16, 63))
    pre, h = hdr(p)
    assert pre.signature == 0xBEDA107F and pre.version == 0x00010001
    assert pre.file_info.startswith(b"<<< Oracle VM VirtualBox Disk Image >>>\n")
    assert h.header_size == 400 and h.image_type == 1
    assert h.disk_size == 3 * MiB + 512 and h.block_size == MiB and h.blocks == 4
    assert h.blocks_allocated == 0 and h.block_extra == 0
    assert h.offset_blocks == MiB and h.offset_data == 2 * MiB      # VirtualBox's layout
    assert uuid.UUID(bytes_le=h.uuid_create) == u
    assert h.uuid_modify != bytes(16) and h.uuid_linkage == bytes(16)
    assert h.comment.rstrip(b"\0") == b"hi there"
    assert (h.lchs.cylinders, h.lchs.heads, h.lchs.sectors, h.lchs.sector_size) == (6, 16, 63, 512)
    assert map_entries(p) == [0xFFFFFFFF] * 4
    assert os.path.getsize(p) == 2 * MiB


def test_probe(tmp_path):
    p = make(tmp_path / "a.vdi")
    assert probe(p).name == "VDI"
    other = tmp_path / "x.vdi"
    other.write_bytes(bytes(4096))
    assert get_backend("VDI").probe(__import__("vdgui.vd.registry", fromlist=["x"])
                                    .probe_input(str(other))) == 0


# -- write semantics ---------------------------------------------------------------------------
def test_append_order_and_zero_blocks_not_allocated(tmp_path):
    p = make(tmp_path / "a.vdi", size=6 * MiB, data=[
        (3 * MiB, b"\x03" * MiB),             # first allocation -> file block 0
        (1 * MiB, bytes(MiB)),                # full zero block: nothing allocated
        (5 * MiB + 4096, b"\x05" * 512),      # partial -> file block 1
        (0, b"\x09" * 512),                   # partial -> file block 2
    ])
    assert map_entries(p) == [2, 0xFFFFFFFF, 0xFFFFFFFF, 0, 0xFFFFFFFF, 1]
    _, h = hdr(p)
    assert h.blocks_allocated == 3
    assert os.path.getsize(p) == h.offset_data + 3 * MiB
    with open_ro(p) as d:
        assert d.read(5 * MiB, 8192) == bytes(4096) + b"\x05" * 512 + bytes(3584)
        assert d.read(3 * MiB, MiB) == b"\x03" * MiB


def test_partial_write_to_new_block_stays_sparse(tmp_path):
    p = make(tmp_path / "a.vdi", size=8 * MiB, data=[(3 * MiB + 4096, b"\x07" * 512)])
    _, h = hdr(p)
    assert os.path.getsize(p) == h.offset_data + MiB
    assert os.stat(p).st_blocks * 512 < h.offset_data // 2 + 256 * 1024   # a hole, not 1 MiB
    with open_ro(p) as d:
        assert d.read(3 * MiB, MiB) == bytes(4096) + b"\x07" * 512 + bytes(MiB - 4608)


def test_honor_zeroes_allocates(tmp_path):
    p = make(tmp_path / "a.vdi")
    with Disk() as d:
        d.open(p, flags=OpenFlags.HONOR_ZEROES)
        d.write(MiB, bytes(MiB))
        assert [e.status for e in d.allocation(MiB, MiB)] == [Alloc.DATA]


def test_modification_uuid_changes_on_first_write_only(tmp_path):
    p = make(tmp_path / "a.vdi")
    _, h0 = hdr(p)
    with Disk() as d:
        img = d.open(p)
        d.write(0, b"\x01" * 512)
        m1 = img.modification_uuid
        d.write(MiB, b"\x02" * 512)
        assert img.modification_uuid == m1
    _, h1 = hdr(p)
    assert h1.uuid_modify != h0.uuid_modify
    assert uuid.UUID(bytes_le=h1.uuid_modify) == m1
    assert h1.uuid_create == h0.uuid_create


def test_fixed_is_preallocated(tmp_path):
    p = make(tmp_path / "f.vdi", size=3 * MiB, flags=ImageFlags.FIXED)
    _, h = hdr(p)
    assert h.image_type == 2 and h.blocks_allocated == 3
    assert map_entries(p) == [0, 1, 2]
    assert os.path.getsize(p) == h.offset_data + 3 * MiB
    with open_ro(p) as d:
        assert d.top.flags & ImageFlags.FIXED
        assert read_all(d) == bytes(3 * MiB)


def test_bad_allocation_block_size_refused(tmp_path):
    for bad in ("3000", "0", "256", str(512 << 20)):
        with pytest.raises(ConfigError):
            make(tmp_path / f"b{bad}.vdi", config={"AllocationBlockSize": bad})
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".vdi") or "tmp" in n]


def test_comment_too_long(tmp_path):
    with pytest.raises(InvalidArgument):
        make(tmp_path / "c.vdi", comment="x" * 256)
    p = make(tmp_path / "d.vdi", comment="x" * 255)
    with open_ro(p) as d:
        assert d.top.comment == "x" * 255


def test_setters_persist(tmp_path):
    p = make(tmp_path / "a.vdi")
    u, pu, mu, pmu = (uuid.uuid4() for _ in range(4))
    with Disk() as d:
        d.open(p)
        d.set_uuid(0, u)
        d.set_parent_uuid(0, pu)
        d.set_modification_uuid(0, mu)
        d.set_parent_modification_uuid(0, pmu)
        d.set_comment(0, "über")
        d.set_pchs(0, Geometry(100, 16, 63))
        d.set_lchs(0, Geometry(50, 32, 63))
    _, h = hdr(p)
    assert [uuid.UUID(bytes_le=x) for x in (h.uuid_create, h.uuid_linkage, h.uuid_modify,
                                           h.uuid_parent_modify)] == [u, pu, mu, pmu]
    assert h.comment.rstrip(b"\0").decode() == "über"
    assert (h.legacy_geometry.cylinders, h.legacy_geometry.heads) == (100, 16)
    assert (h.lchs.cylinders, h.lchs.heads, h.lchs.sectors) == (50, 32, 63)
    with open_ro(p) as d:
        img = d.top
        assert (img.uuid, img.parent_uuid, img.modification_uuid,
                img.parent_modification_uuid) == (u, pu, mu, pmu)
        assert img.pchs == Geometry(100, 16, 63) and img.lchs == Geometry(50, 32, 63)


# -- differencing images -------------------------------------------------------------------------
def test_diff_links_by_uuid_and_zero_hides_parent(tmp_path):
    base = str(tmp_path / "base.vdi")
    snap = str(tmp_path / "Snapshots" / ("{%s}.vdi" % uuid.uuid4()))
    os.makedirs(os.path.dirname(snap))
    with Disk() as d:
        b = d.create_base(base, 4 * MiB, "VDI")
        d.write(0, b"\xaa" * (4 * MiB))
        diff = d.create_diff(snap)
        assert diff.parent_uuid == b.uuid
        assert diff.parent_modification_uuid == b.modification_uuid
        d.write(MiB, bytes(MiB))                  # whole zero block -> ZERO entry
        d.write(2 * MiB + 512, bytes(512))        # partial zero -> copy-on-write
    _, h = hdr(snap)
    assert h.image_type == 4
    assert map_entries(snap) == [0xFFFFFFFF, 0xFFFFFFFE, 0, 0xFFFFFFFF]
    with Disk.open_chain(snap, flags=OpenFlags.READ_ONLY) as d:
        assert len(d) == 2
        got = read_all(d)
        exp = bytearray(b"\xaa" * (4 * MiB))
        exp[MiB:2 * MiB] = bytes(MiB)
        exp[2 * MiB + 512:2 * MiB + 1024] = bytes(512)
        assert got == bytes(exp)
        assert [e.status for e in d.allocation()] == [Alloc.DATA, Alloc.ZERO, Alloc.DATA,
                                                      Alloc.DATA]
        assert [e.level for e in d.allocation()] == [0, 1, 1, 0]
    other = make(tmp_path / "other.vdi")
    with Disk() as d:
        d.open(other, flags=OpenFlags.READ_ONLY)
        with pytest.raises(ParentMismatch):
            d.open(snap, flags=OpenFlags.READ_ONLY)


def test_set_parent_relinks_and_unlinks(tmp_path):
    with Disk() as d:
        d.create_base(str(tmp_path / "a.vdi"), 2 * MiB, "VDI")
        d.create_diff(str(tmp_path / "b.vdi"))
        d.write(0, b"\x01" * 512)
    c = make(tmp_path / "c.vdi", size=2 * MiB)
    with Disk() as d:
        other = d.open(c, flags=OpenFlags.READ_ONLY)
        img = get_backend("VDI").open(str(tmp_path / "b.vdi"), OpenFlags.NORMAL)
        try:
            img.set_parent(other)
        finally:
            img.close()
    with Disk.open_chain(str(tmp_path / "b.vdi"), flags=OpenFlags.READ_ONLY) as d:
        assert os.path.basename(d.images[0].location) == "c.vdi"
        assert d.top.parent_uuid == d.images[0].uuid
    img = get_backend("VDI").open(str(tmp_path / "b.vdi"), OpenFlags.NORMAL)
    try:
        img.set_parent(None)
    finally:
        img.close()
    _, h = hdr(str(tmp_path / "b.vdi"))
    assert h.image_type == 1 and h.uuid_linkage == bytes(16) and h.uuid_parent_modify == bytes(16)
    with open_ro(tmp_path / "b.vdi") as d:
        assert not d.top.is_diff
        assert d.read(0, 1024) == b"\x01" * 512 + bytes(512)


# -- hooks -------------------------------------------------------------------------------------
def test_compact_drops_zero_and_parent_equal_blocks(tmp_path):
    bs = MiB
    p = make(
        tmp_path / "a.vdi", size=6 * MiB, data=[(i * bs, bytes([i + 1]) * bs) for i in range(6)]
    )
    with Disk() as d:
        d.open(p, flags=OpenFlags.HONOR_ZEROES)
        d.write(1 * bs, bytes(bs))
        d.write(4 * bs, bytes(bs))
        expect = read_all(d)
    size_before = os.path.getsize(p)
    with Disk() as d:
        d.open(p)
        calls = []
        d.top.compact(progress=lambda a, b: calls.append((a, b)))
        assert read_all(d) == expect
    assert calls[0][0] == 0 and calls[-1][0] == calls[-1][1]
    assert os.path.getsize(p) == size_before - 2 * bs
    assert sorted(x for x in map_entries(p) if x < 0xFFFFFFFE) == [0, 1, 2, 3]
    _, h = hdr(p)
    assert h.blocks_allocated == 4
    with open_ro(p) as d:
        assert read_all(d) == expect
        assert d.top.check().problems == []


def test_compact_cancel_leaves_image_unchanged(tmp_path):
    from vdgui.vd import Cancelled

    p = make(tmp_path / "a.vdi", size=4 * MiB, data=[(0, bytes(MiB) + b"\x01" * MiB)])
    with Disk() as d:
        d.open(p, flags=OpenFlags.HONOR_ZEROES)
        d.write(2 * MiB, bytes(MiB))
    before = map_entries(p)
    assert before == [0xFFFFFFFF, 0, 1, 0xFFFFFFFF]
    size = os.path.getsize(p)
    with Disk() as d:
        d.open(p)
        with pytest.raises(Cancelled):
            d.top.compact(progress=lambda a, b: False)
    with open_ro(p) as d:
        assert d.read(MiB, MiB) == b"\x01" * MiB
    # the map and the data are untouched
    assert map_entries(p) == before and os.path.getsize(p) == size


def test_compact_diff_with_parent(tmp_path):
    with Disk() as d:
        d.create_base(str(tmp_path / "a.vdi"), 4 * MiB, "VDI")
        d.write(0, b"\x11" * (2 * MiB))
        d.create_diff(str(tmp_path / "b.vdi"))
        d.open  # noqa
        d.images[-1].honor_zeroes = True
        d.write(0, b"\x11" * MiB)  # same as parent -> dropped
        d.write(MiB, bytes(MiB))  # zero over data -> kept as ZERO
        d.write(2 * MiB, b"\x22" * MiB)  # real data -> kept
        expect = read_all(d)
        d.top.compact(parent_read=lambda o, n: d.read(o, n, top=0))
        assert read_all(d) == expect
    assert map_entries(str(tmp_path / "b.vdi")) == [0xFFFFFFFF, 0xFFFFFFFE, 0, 0xFFFFFFFF]


def test_resize_grow_shrink(tmp_path):
    p = make(tmp_path / "a.vdi", size=3 * MiB + 512, data=[(3 * MiB, b"\x07" * 512)])
    with Disk() as d:
        d.open(p)
        d.top.resize(9 * MiB)
        assert d.size == 9 * MiB
        assert d.read(3 * MiB, 1024) == b"\x07" * 512 + bytes(512)
        assert d.read(3 * MiB + 512, 6 * MiB - 512) == bytes(6 * MiB - 512)
        d.write(8 * MiB, b"\x08" * 512)
        with pytest.raises(InvalidArgument):
            d.top.resize(4 * MiB)  # tail holds data
        d.discard(8 * MiB, MiB)
        d.top.resize(4 * MiB)
        assert d.size == 4 * MiB
        assert d.top.pchs == Geometry(8, 16, 63)
    _, h = hdr(p)
    assert (h.disk_size, h.blocks, h.blocks_allocated) == (4 * MiB, 4, 1)
    with open_ro(p) as d:
        assert d.read(3 * MiB, 1024) == b"\x07" * 512 + bytes(512)
        assert d.top.check().problems == []


def test_resize_grow_relocates_when_map_is_full(tmp_path):
    # 64 KiB blocks: the map area (1 MiB - 512) holds 262016 entries; 20 GiB needs more
    cfg = {"AllocationBlockSize": "65536"}
    data = [(i * 65536 * 3, bytes([i + 1]) * 65536) for i in range(40)]
    p = make(tmp_path / "a.vdi", size=8 * MiB, data=data, config=cfg)
    with open_ro(p) as d:
        expect = read_all(d)
    with Disk() as d:
        d.open(p)
        d.top.resize(20 << 30)
        assert d.read(0, 8 * MiB) == expect
        d.write((20 << 30) - 512, b"\xee" * 512)
    _, h = hdr(p)
    assert h.offset_data >= h.offset_blocks + h.blocks * 4
    assert h.blocks == (20 << 30) // 65536
    with open_ro(p) as d:
        assert d.read(0, 8 * MiB) == expect
        assert d.read((20 << 30) - 1024, 1024) == bytes(512) + b"\xee" * 512
        assert d.top.check().problems == []


def test_resize_fixed_grows_by_allocating(tmp_path):
    p = make(tmp_path / "f.vdi", size=2 * MiB, flags=ImageFlags.FIXED, data=[(0, b"\x01" * 1024)])
    with Disk() as d:
        d.open(p)
        d.top.resize(4 * MiB)
    assert map_entries(p) == [0, 1, 2, 3]
    _, h = hdr(p)
    assert h.blocks_allocated == 4
    with open_ro(p) as d:
        assert d.read(0, 4 * MiB) == b"\x01" * 1024 + bytes(4 * MiB - 1024)


def test_discard(tmp_path):
    p = make(tmp_path / "a.vdi", size=4 * MiB, data=[(0, b"\x01" * (4 * MiB))])
    with Disk() as d:
        d.open(p)
        d.discard(MiB, MiB)  # whole block: unallocated, file shrinks
        d.discard(2 * MiB + 4096, 8192)  # partial: zeroed in place
        exp = bytearray(b"\x01" * (4 * MiB))
        exp[MiB : 2 * MiB] = bytes(MiB)
        exp[2 * MiB + 4096 : 2 * MiB + 12288] = bytes(8192)
        assert read_all(d) == bytes(exp)
    _, h = hdr(p)
    assert h.blocks_allocated == 3 and os.path.getsize(p) == h.offset_data + 3 * MiB
    assert map_entries(p)[1] == 0xFFFFFFFF
    with open_ro(p) as d:
        assert read_all(d) == bytes(exp)
        assert d.top.check().problems == []


def test_discard_in_diff_hides_parent(tmp_path):
    with Disk() as d:
        d.create_base(str(tmp_path / "a.vdi"), 3 * MiB, "VDI")
        d.write(0, b"\x01" * (3 * MiB))
        d.create_diff(str(tmp_path / "b.vdi"))
        d.write(2 * MiB, b"\x02" * MiB)
        d.discard(0, MiB)  # free in the diff: ZERO entry
        d.discard(MiB + 512, 1024)  # partial, held by the parent: copy-on-write
        d.discard(2 * MiB, MiB)  # allocated in the diff: ZERO entry, block freed
        exp = bytearray(b"\x01" * (3 * MiB))
        exp[0:MiB] = bytes(MiB)
        exp[MiB + 512 : MiB + 1536] = bytes(1024)
        exp[2 * MiB :] = bytes(MiB)
        assert read_all(d) == bytes(exp)
    assert map_entries(str(tmp_path / "b.vdi")) == [0xFFFFFFFE, 0, 0xFFFFFFFE]


# -- check / repair ---------------------------------------------------------------------------
def _damaged(tmp_path, kind):
    p = make(
        tmp_path / f"{kind}.vdi",
        size=4 * MiB,
        data=[(i * MiB, bytes([i + 1]) * MiB) for i in range(3)],
    )
    _, h = hdr(p)
    if kind == "crosslink":
        patch(p, h.offset_blocks + 2 * 4, "<I", 0)  # block 2 -> file block 0 (block 0's)
    elif kind == "pasteof":
        patch(p, h.offset_blocks + 1 * 4, "<I", 1000)
    elif kind == "count_low":
        patch(p, L.H1["blocks_allocated"], "<I", 1)
    elif kind == "count_high":
        patch(p, L.H1["blocks_allocated"], "<I", 4)
    return p


@pytest.mark.parametrize(
    "kind,severity",
    [
        ("crosslink", "corrupt"),
        ("pasteof", "corrupt"),
        ("count_low", "corrupt"),
        ("count_high", "leak"),
    ],
)
def test_check_and_repair(tmp_path, kind, severity):
    p = _damaged(tmp_path, kind)
    with open_ro(p) as d:
        rep = d.top.check()
    assert rep.problems and any(pr.severity == severity for pr in rep.problems)
    assert rep.exit_code == (2 if severity == "corrupt" else 3)
    assert all(p_.what for p_ in rep.problems)
    before = sha(p)
    with Disk() as d:
        d.open(p)
        dry = d.top.check(repair=True, dry_run=True)
        assert dry.problems and not dry.repaired
    assert sha(p) == before
    with Disk() as d:
        d.open(p)
        if kind in ("crosslink", "pasteof"):
            with pytest.raises(CorruptImage):  # no allocation over a damaged map
                d.write(3 * MiB, b"\x01" * 512)
        rep = d.top.check(repair=True)
        assert rep.repaired and all(x.repaired for x in rep.problems)
        assert d.top.check().problems == []
        d.write(3 * MiB, b"\x09" * 512)  # writable again afterwards
    with open_ro(p) as d:
        assert d.top.check().problems == []
        assert d.read(0, MiB) == b"\x01" * MiB
        assert d.read(3 * MiB, 512) == b"\x09" * 512
    _, h = hdr(p)
    used = [x for x in map_entries(p) if x < 0xFFFFFFFE]
    assert sorted(used) == list(range(h.blocks_allocated))
    assert os.path.getsize(p) == h.offset_data + h.blocks_allocated * MiB


def test_count_low_writes_never_overwrite_data(tmp_path):
    """A header count below the used blocks (a crash between map and header) must not make
    new blocks land on existing data."""
    p = _damaged(tmp_path, "count_low")
    with Disk() as d:
        d.open(p)
        d.write(3 * MiB, b"\x04" * MiB)
        assert [d.read(i * MiB, 1)[0] for i in range(4)] == [1, 2, 3, 4]


def test_unaligned_disk_size_rounded_and_repaired(tmp_path):
    p = make(tmp_path / "a.vdi", size=2 * MiB)
    patch(p, L.H1["disk_size"], "<Q", 2 * MiB - 100)
    with open_ro(p) as d:
        assert d.size == 2 * MiB - 512
        assert d.top.check().corrupt
    with Disk() as d:
        d.open(p)
        d.top.check(repair=True)
    _, h = hdr(p)
    assert h.disk_size == 2 * MiB - 512


# -- old header versions, extra data ------------------------------------------------------------
def _v0_image(path, blocks_data, bs=MiB, size=3 * MiB):
    nblocks = -(-size // bs)
    m = [0xFFFFFFFF] * nblocks
    data = b""
    for i, (idx, content) in enumerate(blocks_data):
        m[idx] = i
        data += content
    pre = L.PreHeader.build(
        dict(
            file_info=b"<<< innotek VirtualBox Disk Image >>>\n".ljust(64, b"\0"),
            signature=L.SIGNATURE,
            version=0x00000002,
        )
    )
    h = L.Header0.build(
        dict(
            image_type=1,
            flags=0,
            comment=b"old".ljust(256, b"\0"),
            legacy_geometry=dict(cylinders=6, heads=16, sectors=63, sector_size=512),
            disk_size=size,
            block_size=bs,
            blocks=nblocks,
            blocks_allocated=len(blocks_data),
            uuid_create=uuid.uuid4().bytes_le,
            uuid_modify=uuid.uuid4().bytes_le,
            uuid_linkage=bytes(16),
        )
    )
    blob = pre + h + struct.pack(f"<{nblocks}I", *m) + data
    with open(path, "wb") as f:
        f.write(blob)
    return str(path)


def test_read_v0_header(tmp_path):
    p = _v0_image(tmp_path / "old.vdi", [(2, b"\x02" * MiB), (0, b"\x01" * MiB)])
    with open_ro(p) as d:
        assert d.top.comment == "old"
        assert d.top.pchs == Geometry(6, 16, 63)
        assert d.info()["details"]["header_version"] == "0.2"
        assert read_all(d) == b"\x01" * MiB + bytes(MiB) + b"\x02" * MiB
    with Disk() as d:  # and writable
        d.open(p)
        d.write(MiB, b"\x03" * 4096)
    with open_ro(p) as d:
        assert d.read(MiB, 4097) == b"\x03" * 4096 + b"\0"
        assert d.top.check().problems == []


def test_v0_header_errors_name_fields(tmp_path):
    p = _v0_image(tmp_path / "old.vdi", [(0, b"\x01" * MiB)])
    patch(p, L.H0["blocks"], "<I", 400000)  # covers the size, map past the end
    with pytest.raises(CorruptImage, match="cBlocks.*past the end"):
        Disk().open(p, "VDI", flags=OpenFlags.READ_ONLY)
    patch(p, L.H0["blocks"], "<I", 3)
    patch(p, L.H0["block_size"], "<I", 1000)
    with pytest.raises(CorruptImage, match="cbBlock"):
        Disk().open(p, "VDI", flags=OpenFlags.READ_ONLY)


def test_read_v1_0_header_and_block_extra(tmp_path):
    """Version 1.0, 384-byte header, 64 KiB blocks, 512 bytes of extra data per block."""
    bs, extra = 65536, 512
    size = 4 * bs
    m = [1, 0xFFFFFFFF, 0, 0xFFFFFFFE]
    pre = L.PreHeader.build(
        dict(
            file_info=b"<<< Sun xVM VirtualBox Disk Image >>>\n".ljust(64, b"\0"),
            signature=L.SIGNATURE,
            version=0x00010000,
        )
    )
    off_blocks, off_data = 512, 1024
    h = L.Header1.build(
        dict(
            header_size=384,
            image_type=1,
            flags=0,
            comment=bytes(256),
            offset_blocks=off_blocks,
            offset_data=off_data,
            legacy_geometry=dict(cylinders=0, heads=0, sectors=0, sector_size=512),
            dummy=0,
            disk_size=size,
            block_size=bs,
            block_extra=extra,
            blocks=4,
            blocks_allocated=2,
            uuid_create=uuid.uuid4().bytes_le,
            uuid_modify=uuid.uuid4().bytes_le,
            uuid_linkage=bytes(16),
            uuid_parent_modify=bytes(16),
        )
    )
    blob = bytearray(off_data + 2 * (bs + extra))
    blob[: 72 + 384] = pre + h
    blob[off_blocks : off_blocks + 16] = struct.pack("<4I", *m)
    blob[off_data : off_data + extra] = b"\xee" * extra  # extra data, never visible
    blob[off_data + extra : off_data + extra + bs] = b"\xb0" * bs  # file block 0 = block 2
    blob[off_data + bs + extra : off_data + bs + 2 * extra] = b"\xef" * extra
    blob[off_data + bs + 2 * extra :] = b"\xb1" * bs  # file block 1 = block 0
    p = tmp_path / "v10.vdi"
    p.write_bytes(bytes(blob))
    with open_ro(p) as d:
        assert d.top.lchs is None
        assert read_all(d) == b"\xb1" * bs + bytes(bs) + b"\xb0" * bs + bytes(bs)
        st = [e.status for e in d.allocation()]
        assert st == [Alloc.DATA, Alloc.UNALLOCATED, Alloc.DATA, Alloc.ZERO]
    with Disk() as d:
        d.open(str(p))
        d.write(bs + 512, b"\x42" * 512)  # allocates with extra data
        d.set_lchs(0, Geometry(1, 2, 3))  # upgrades the header to 1.1+
    with open_ro(p) as d:
        assert d.read(bs, 1536) == bytes(512) + b"\x42" * 512 + bytes(512)
        assert d.read(0, bs) == b"\xb1" * bs
        assert d.top.lchs == Geometry(1, 2, 3)
        assert d.top.check().problems == []
    assert os.path.getsize(p) == off_data + 3 * (bs + extra)


# -- bad headers: each field check ----------------------------------------------------------------
BAD_FIELDS = [
    # (what, offset, struct fmt, value, error class, text expected in the message)
    ("signature", L.OFF_SIGNATURE, "<I", 0x12345678, CorruptImage, "u32Signature"),
    ("version", L.OFF_VERSION, "<I", 0x00020000, NotSupported, "u32Version"),
    ("header size", L.H1["header_size"], "<I", 100, CorruptImage, "cbHeader"),
    ("image type", L.H1["image_type"], "<I", 9, CorruptImage, "u32Type"),
    ("block size zero", L.H1["block_size"], "<I", 0, CorruptImage, "cbBlock"),
    ("block size not pow2", L.H1["block_size"], "<I", 3000, CorruptImage, "cbBlock"),
    ("block size huge", L.H1["block_size"], "<I", 1 << 31, NotSupported, "cbBlock"),
    ("block extra", L.H1["block_extra"], "<I", 3, CorruptImage, "cbBlockExtra"),
    ("disk size zero", L.H1["disk_size"], "<Q", 0, CorruptImage, "cbDisk"),
    ("size vs blocks", L.H1["disk_size"], "<Q", 1 << 40, CorruptImage, "cBlocks"),
    ("blocks zero", L.H1["blocks"], "<I", 0, CorruptImage, "cBlocks"),
    ("blocks absurd", L.H1["blocks"], "<I", 0xFFFFFFF0, CorruptImage, "cBlocks"),
    ("allocated > blocks", L.H1["blocks_allocated"], "<I", 99, CorruptImage, "cBlocksAllocated"),
    ("map in header", L.H1["offset_blocks"], "<I", 100, CorruptImage, "offBlocks"),
    ("data over map", L.H1["offset_data"], "<I", 520, CorruptImage, "offData"),
    ("map past eof", L.H1["offset_blocks"], "<I", 0x7FFFFF00, CorruptImage, "offBlocks"),
]


@pytest.mark.parametrize("what,off,fmt,value,cls,text", BAD_FIELDS, ids=[b[0] for b in BAD_FIELDS])
def test_bad_header_field(tmp_path, what, off, fmt, value, cls, text):
    p = make(tmp_path / "a.vdi", size=4 * MiB, data=[(0, b"\x01" * 512)])
    if what == "map past eof":
        patch(p, L.H1["offset_data"], "<I", 0x7FFFFF00 + 64)
    if what == "blocks absurd":
        patch(p, L.H1["offset_data"], "<I", 0xFFFFFFFF)
    patch(p, off, fmt, value)
    with pytest.raises(cls) as ei:
        Disk().open(p, "VDI", flags=OpenFlags.READ_ONLY)
    msg = str(ei.value)
    assert text in msg and p in msg and "expected" in msg and "found" in msg, msg


@pytest.mark.parametrize("n", [0, 10, 71, 72, 100, 455, 520])
def test_truncated_files(tmp_path, n):
    p = make(tmp_path / "a.vdi", size=4 * MiB)
    with open(p, "r+b") as f:
        f.truncate(n)
    with pytest.raises(VDError) as ei:
        Disk().open(p, "VDI", flags=OpenFlags.READ_ONLY)
    assert p in str(ei.value)


def test_block_past_eof_reads_zero_and_is_reported(tmp_path):
    p = make(tmp_path / "a.vdi", size=2 * MiB, data=[(0, b"\x01" * MiB)])
    _, h = hdr(p)
    patch(p, h.offset_blocks + 4, "<I", 0xFFFFFF00)
    with open_ro(p) as d:
        assert d.read(MiB, MiB) == bytes(MiB)
        assert d.top.check().corrupt


def test_diff_cannot_be_fixed_and_needs_parent_uuid(tmp_path):
    with Disk() as d:
        d.create_base(str(tmp_path / "r.img"), MiB, "RAW")
        with pytest.raises(NotSupported):
            d.create_diff(str(tmp_path / "d.vdi"), "VDI")
    with Disk() as d:
        d.create_base(str(tmp_path / "a.vdi"), MiB, "VDI")
        with pytest.raises(NotSupported):
            d.create_diff(str(tmp_path / "b.vdi"), flags=ImageFlags.FIXED)
    assert sorted(os.listdir(tmp_path)) == ["a.vdi", "r.img"]


def test_read_coalesces_contiguous_blocks(tmp_path, monkeypatch):
    data = pattern(8 * MiB)
    order = [0, 1, 2, 3, 6, 7, 4, 5]  # file order: blocks 0-3, 6-7, 4-5
    p = make(
        tmp_path / "a.vdi",
        size=8 * MiB,
        data=[(i * MiB, data[i * MiB : (i + 1) * MiB]) for i in order],
    )
    calls = []
    real_pread, real_preadv = os.pread, os.preadv

    def spy_pread(fd, n, off):
        calls.append(off)
        return real_pread(fd, n, off)

    def spy_preadv(fd, bufs, off):
        calls.append(off)
        return real_preadv(fd, bufs, off)

    with open_ro(p) as d:
        monkeypatch.setattr(os, "pread", spy_pread)
        monkeypatch.setattr(os, "preadv", spy_preadv)
        assert d.top.read(0, 4 * MiB) == data[: 4 * MiB]
        assert len(calls) == 1  # one contiguous run: one read
        calls.clear()
        assert d.top.read(0, 8 * MiB) == data
        assert len(calls) == 3  # three file-contiguous runs
        calls.clear()
        assert d.top.block_status(0, 8 * MiB) == [(0, 8 * MiB, Alloc.DATA)]
        assert not calls


def test_set_parent_turns_base_into_diff(tmp_path):
    a = make(tmp_path / "a.vdi", size=2 * MiB, data=[(0, b"\x01" * (2 * MiB))])
    b = make(tmp_path / "b.vdi", size=2 * MiB, data=[(MiB, b"\x02" * 512)])
    with Disk() as d:
        parent = d.open(a, flags=OpenFlags.READ_ONLY)
        img = get_backend("VDI").open(b, OpenFlags.NORMAL)
        try:
            img.set_parent(parent)
            assert img.is_diff and img.flags & ImageFlags.DIFF
        finally:
            img.close()
    with Disk.open_chain(b, flags=OpenFlags.READ_ONLY) as d:
        assert len(d) == 2
        assert d.read(0, 4096) == b"\x01" * 4096  # from the new parent
        assert d.read(MiB, 1024) == b"\x02" * 512 + bytes(512)  # own block (zeroes included)
    f = make(tmp_path / "f.vdi", size=2 * MiB, flags=ImageFlags.FIXED)
    img = get_backend("VDI").open(f, OpenFlags.NORMAL)
    try:
        with Disk() as d, pytest.raises(NotSupported):
            img.set_parent(d.open(a, flags=OpenFlags.READ_ONLY))
    finally:
        img.close()


def test_resize_shrink_fixed(tmp_path):
    p = make(tmp_path / "f.vdi", size=4 * MiB, flags=ImageFlags.FIXED, data=[(0, b"\x01" * 512)])
    with Disk() as d:
        d.open(p)
        d.top.resize(2 * MiB)
    _, h = hdr(p)
    assert (h.blocks, h.blocks_allocated) == (2, 2)
    assert os.path.getsize(p) == h.offset_data + 2 * MiB
    with open_ro(p) as d:
        assert d.read(0, 1024) == b"\x01" * 512 + bytes(512)
        assert d.top.check().problems == []


def test_damaged_map_refuses_structural_changes(tmp_path):
    p = _damaged(tmp_path, "pasteof")
    with Disk() as d:
        d.open(p)
        for op in (
            lambda: d.top.compact(),
            lambda: d.top.resize(8 * MiB),
            lambda: d.discard(0, MiB),
        ):
            with pytest.raises(CorruptImage, match="repair"):
                op()
        d.write(0, b"\x05" * 512)  # a healthy allocated block stays writable
    with open_ro(p) as d:
        assert d.read(0, 512) == b"\x05" * 512


def test_untouched_header_fields_keep_their_bytes(tmp_path):
    p = make(tmp_path / "a.vdi", size=2 * MiB)
    with open(p, "r+b") as f:
        f.seek(L.H1["comment"])
        f.write(b"caf\xe9 latin-1\0junk after the terminator")
        f.seek(L.H1["legacy_geometry"])
        f.write(struct.pack("<4I", 5, 0, 0, 512))
        f.seek(L.H1["dummy"])
        f.write(struct.pack("<I", 0x1234))
    before = head(p, 512)
    with Disk() as d:
        img = d.open(p)
        assert img.comment.startswith("caf\ufffd latin-1")
        d.write(0, b"\x01" * 512)
    after = head(p, 512)
    changed = [i for i in range(512) if before[i] != after[i]]
    allowed = set(range(L.H1["blocks_allocated"], L.H1["blocks_allocated"] + 4)) | set(
        range(L.H1["uuid_modify"], L.H1["uuid_modify"] + 16)
    )
    assert changed and set(changed) <= allowed


needs_strace = pytest.mark.skipif(
    not kh.have_strace(), reason="strace is not installed (bash scripts/bootstrap test installs it)"
)


def _kill_runs(tmp_path, setup, action, judge) -> int:
    """SIGKILL ``action(image)`` (in a child, through tests/engine/kill_harness.py) at every
    syscall that changes the file; ``judge(path, finished)`` asserts on what is left. Returns
    how many file writes the uninterrupted action makes."""
    tpl = tmp_path / "tpl"
    tpl.mkdir()
    setup(tpl / "img.vdi")

    def fn_for(work):
        def fn():
            img = get_backend("VDI").open(str(work / "img.vdi"), OpenFlags.NORMAL)
            try:
                action(img)
            finally:
                img.close()
            return 0

        return fn

    def judge_(work, finished):
        judge(str(work / "img.vdi"), finished)
        return []

    all_points, outcomes = kh.campaign(tmp_path, tpl, fn_for, judge_, points=None)
    bad = [f"kill at {o.point} of {len(all_points)}: {p}" for o in outcomes for p in o.problems]
    assert not bad, "\n".join(bad)
    assert sum(o.killed for o in outcomes) >= 0.9 * len(outcomes)
    return sum(p.name in kh.WRITES for p in all_points)


def _crash_runs(tmp_path, setup, action, allowed, no_new_corruption=True):
    """Kill ``action`` on copies of an image at every file write (and sync, truncation): the
    image must stay readable with the expected content every time."""
    src = setup(tmp_path / "orig.vdi")
    with open_ro(src) as d:
        before = read_all(d)

    def judge(p, finished):
        with open_ro(p) as d:
            got = read_all(d)
            assert got in allowed(before), "content neither before nor after"
            if finished:
                assert got == allowed(before)[-1], "the finished action left other content"
            if no_new_corruption:
                assert not d.top.check().corrupt, "check calls it corrupt"

    return _kill_runs(tmp_path, lambda path: shutil.copy(src, path), action, judge)


@needs_strace
def test_compact_survives_interruption_at_every_write(tmp_path):
    def setup(path):
        data = [(i * MiB, bytes([i + 1]) * MiB) for i in range(6)]
        p = make(path, size=6 * MiB, data=data)
        with Disk() as d:
            d.open(p, flags=OpenFlags.HONOR_ZEROES)
            d.write(0, bytes(MiB))
            d.write(3 * MiB, bytes(MiB))
        return p

    n = _crash_runs(tmp_path, setup, lambda img: img.compact(), lambda b: [b])
    assert n > 3


@needs_strace
def test_repair_survives_interruption_at_every_write(tmp_path):
    def setup(path):
        p = make(path, size=4 * MiB, data=[(i * MiB, bytes([i + 1]) * MiB) for i in range(4)])
        _, h = hdr(p)
        patch(p, h.offset_blocks + 4, "<I", 0)  # block 1 cross-linked to block 0's data
        return p

    n = _crash_runs(
        tmp_path,
        setup,
        lambda img: img.check(repair=True),
        lambda b: [b, b[:MiB] + bytes(MiB) + b[2 * MiB :]],
        no_new_corruption=False,
    )
    assert n > 2


@needs_strace
def test_grow_with_relocation_survives_interruption_at_every_write(tmp_path):
    new = 20 << 30

    def setup(path):
        cfg = {"AllocationBlockSize": "65536"}
        return make(
            path,
            size=4 * MiB,
            config=cfg,
            data=[(i * 65536 * 5, bytes([i + 1]) * 65536) for i in range(12)],
        )

    # (not _crash_runs: the grown image is 20 GiB, so only its first 4 MiB are compared)
    src = setup(tmp_path / "o.vdi")
    with open_ro(src) as d:
        want = read_all(d)

    def judge(p, finished):
        with open_ro(p) as d:
            assert d.size in (4 * MiB, new)
            assert not finished or d.size == new
            assert d.read(0, 4 * MiB) == want
            assert not d.top.check().corrupt
            if d.size == new:
                assert d.read(new - MiB, MiB) == bytes(MiB)

    n = _kill_runs(
        tmp_path, lambda path: shutil.copy(src, path), lambda img: img.resize(new), judge
    )
    assert n > 3


@needs_strace
def test_discard_survives_interruption_at_every_write(tmp_path):
    def setup(path):
        return make(path, size=4 * MiB, data=[(0, b"\x01" * (4 * MiB))])

    def act(img):
        img.discard(0, MiB)
        img.discard(2 * MiB + 512, 1024)

    def allowed(b):
        one = bytes(MiB) + b[MiB:]
        two = one[: 2 * MiB + 512] + bytes(1024) + one[2 * MiB + 1536 :]
        return [b, one, two]

    assert _crash_runs(tmp_path, setup, act, allowed) > 2


def test_new_full_block_stores_only_its_nonzero_pieces(tmp_path):
    """A whole block written past the end of the file: zero pieces stay holes in the file."""
    blk = bytearray(MiB)
    blk[0:65536] = b"\x5a" * 65536
    blk[MiB - 4096 :] = b"\xa5" * 4096
    p = make(tmp_path / "s.vdi", 8 * MiB, [(2 * MiB, bytes(blk)), (5 * MiB, pattern(MiB, 3))])
    st = os.stat(p)
    # header + map + 128 KiB + 1 MiB of data; far less than the two whole blocks
    assert st.st_blocks * 512 < MiB + 512 * 1024
    assert st.st_size >= 2 * MiB
    with open_ro(p) as d:
        assert d.read(2 * MiB, MiB) == bytes(blk)
        assert d.read(5 * MiB, MiB) == pattern(MiB, 3)
        assert d.read(0, 2 * MiB) == bytes(2 * MiB)


def test_differencing_image_legacy_geometry_is_not_calculated(tmp_path):
    # VirtualBox writes 0/0/0 as a child's legacy geometry; the disk's geometry is the base's
    base = make(tmp_path / "base.vdi", size=64 * MiB, pchs=Geometry(130, 16, 63))
    with Disk.open_chain(base, "VDI") as d:
        d.create_diff(str(tmp_path / "child.vdi"), "VDI")
    _, h = hdr(tmp_path / "child.vdi")
    g = h.legacy_geometry
    assert (g.cylinders, g.heads, g.sectors, g.sector_size) == (0, 0, 0, 512)
    assert h.offset_blocks == MiB and h.offset_data == 2 * MiB
    _, hb = hdr(base)
    assert (hb.legacy_geometry.cylinders, hb.legacy_geometry.heads) == (130, 16)  # asked for
