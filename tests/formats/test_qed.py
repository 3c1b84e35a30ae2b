"""QED backend: conformance, header round trip, hostile headers, need-check, resize, relink."""
from __future__ import annotations

import os
import struct

import pytest

from tests.conftest import read_all
from tests.formats.conformance import FormatConformance
from vdgui.vd import (
    CorruptImage,
    Disk,
    ImageFlags,
    InvalidArgument,
    NotSupported,
    OpenFlags,
    ParentNotFound,
    UnsafePath,
    VDError,
    get_backend,
    probe,
)
from vdgui.vd.formats import qed as Q

MiB = 1 << 20


class TestQedConformance(FormatConformance):
    FORMAT = "QED"
    EXT = "qed"
    VARIANTS = (ImageFlags.NONE,)
    DIFF = True
    UUID = False


class TestQedSmallClusterConformance(FormatConformance):
    FORMAT = "QED"
    EXT = "qed"
    DIFF = True
    UUID = False
    CREATE_CONFIG = {"ClusterSize": "4096", "TableSize": "2"}


def _make(tmp_path, name="img.qed", size=4 * MiB, config=None, writes=((0, b"\x11" * 70000),)):
    p = str(tmp_path / name)
    with Disk() as d:
        d.create_base(p, size, "QED", config=config)
        for off, data in writes:
            d.write(off, data)
    return p


def _patch(path, offset, fmt, value):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))


def _field(path, offset, fmt):
    with open(path, "rb") as f:
        f.seek(offset)
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]


def _read(path, flags=OpenFlags.READ_ONLY):
    with Disk() as d:
        d.open(path, "QED", flags=flags)
        return read_all(d)


def test_header_round_trip_and_probe(tmp_path):
    p = _make(tmp_path)
    with open(p, "rb") as f:
        raw = f.read(64)
    assert Q.QedHeader.build(Q.QedHeader.parse(raw)) == raw
    assert Q.QedHeader.sizeof() == Q.HEADER_SIZE
    assert probe(p).name == "QED"
    assert get_backend("qed").name == "QED"


@pytest.mark.parametrize("offset,fmt,value,exc,needle", [
    (4, "<I", 2048, CorruptImage, "cluster_size"),
    (4, "<I", 65537, CorruptImage, "cluster_size"),
    (4, "<I", 128 << 20, CorruptImage, "cluster_size"),
    (8, "<I", 3, CorruptImage, "table_size"),
    (8, "<I", 32, CorruptImage, "table_size"),
    (12, "<I", 0, CorruptImage, "header_size"),
    (16, "<Q", 1 << 9, NotSupported, "feature"),
    (40, "<Q", 65536 + 512, CorruptImage, "l1_table_offset"),
    (40, "<Q", 1 << 40, CorruptImage, "l1_table_offset"),
    (48, "<Q", 1 << 60, CorruptImage, "image_size"),
    (48, "<Q", 1000, CorruptImage, "image_size"),
])
def test_hostile_header_fields(tmp_path, offset, fmt, value, exc, needle):
    p = _make(tmp_path)
    _patch(p, offset, fmt, value)
    with pytest.raises(exc) as ei:
        _read(p)
    assert needle in str(ei.value) and p in str(ei.value)


def test_huge_tables_refused_without_allocation(tmp_path):
    p = _make(tmp_path)
    _patch(p, 4, "<I", 64 << 20)
    _patch(p, 8, "<I", 16)
    with pytest.raises(NotSupported, match="tables"):
        _read(p)


def test_bad_table_and_cluster_offsets(tmp_path):
    p = _make(tmp_path)
    l1 = _field(p, 40, "<Q")
    l2 = _field(p, l1, "<Q")
    _patch(p, l2, "<Q", 65536 * 1000)           # data cluster past the end
    with pytest.raises(CorruptImage, match="data cluster"):
        _read(p)
    _patch(p, l2, "<Q", 65536 * 5 + 512)        # unaligned
    with pytest.raises(CorruptImage, match="data cluster"):
        _read(p)
    _patch(p, l1, "<Q", os.path.getsize(p))     # L2 table past the end
    with pytest.raises(CorruptImage, match="L2 table"):
        _read(p)


def test_backing_name_checks(tmp_path):
    p = _make(tmp_path)
    _patch(p, 16, "<Q", Q.F_BACKING_FILE)
    _patch(p, 56, "<I", 64)
    _patch(p, 60, "<I", 70000)
    with pytest.raises(CorruptImage, match="backing file name"):
        _read(p)


@pytest.mark.parametrize("name", ["/etc/passwd", "../outside.qed", "json:{}"])
def test_backing_outside_folder_refused(tmp_path, name):
    (tmp_path / "outside.qed").write_bytes(b"")
    inner = tmp_path / "in"
    inner.mkdir()
    base = _make(inner, "base.qed")
    child = str(inner / "child.qed")
    with Disk() as d:
        d.open(base)
        d.create_diff(child)
    img = get_backend("QED").open(child, OpenFlags.NORMAL)
    try:
        img._write_backing(name, False)
    finally:
        img.close()
    with pytest.raises((UnsafePath, ParentNotFound)):
        Disk.open_chain(child, flags=OpenFlags.READ_ONLY)


def test_truncated(tmp_path):
    p = _make(tmp_path)
    with open(p, "rb") as f:
        raw = f.read()
    for n in (0, 3, 63, 64, 65536, 65536 * 2):
        q = tmp_path / f"t{n}.qed"
        q.write_bytes(raw[:n])
        with pytest.raises(VDError):
            _read(str(q))


def test_need_check_set_while_writing_cleared_on_close(tmp_path):
    p = _make(tmp_path)
    with Disk() as d:
        d.open(p)
        assert not _field(p, 16, "<Q") & Q.F_NEED_CHECK
        d.write(2 * MiB, b"\x22" * 512)            # allocating write
        assert _field(p, 16, "<Q") & Q.F_NEED_CHECK
        d.flush()
        assert not _field(p, 16, "<Q") & Q.F_NEED_CHECK
        d.write(2 * MiB, b"\x23" * 512)            # in place: no flag needed
        assert not _field(p, 16, "<Q") & Q.F_NEED_CHECK
        d.write(3 * MiB, b"\x24" * 512)
    assert not _field(p, 16, "<Q") & Q.F_NEED_CHECK


def test_need_check_image_repaired_on_read_write_open(tmp_path):
    p = _make(tmp_path)
    l1 = _field(p, 40, "<Q")
    l2 = _field(p, l1, "<Q")
    _patch(p, l2 + 8, "<Q", 65536 * 999)     # a bogus entry left by a crash
    _patch(p, 16, "<Q", Q.F_NEED_CHECK)
    with pytest.raises(CorruptImage):
        _read(p)
    with Disk() as d:
        d.open(p)
        assert d.read(0, 65536) == b"\x11" * 65536
        assert d.read(65536, 65536) == bytes(65536)   # the bogus entry was cleared
        assert d.top.check().exit_code == 0
    assert not _field(p, 16, "<Q") & Q.F_NEED_CHECK


def test_check_finds_duplicates_and_leaks(tmp_path):
    p = _make(tmp_path, writes=[(0, b"\x11" * 65536), (MiB, b"\x12" * 65536)])
    l1 = _field(p, 40, "<Q")
    l2 = _field(p, l1, "<Q")
    first = _field(p, l2, "<Q")
    with open(p, "r+b") as f:
        f.truncate(os.path.getsize(p) + 65536)     # a leaked cluster at the end
    with Disk() as d:
        d.open(p)
        rep = d.top.check()
        assert rep.exit_code == 3
        rep = d.top.check(repair=True)
        assert rep.repaired and d.top.check().exit_code == 0
    _patch(p, l2 + 16 * 8, "<Q", first)             # cluster used twice
    with Disk() as d:
        d.open(p, flags=OpenFlags.READ_ONLY)
        assert d.top.check().exit_code == 2


def test_resize_and_relink(tmp_path):
    base = _make(tmp_path, "base.qed")
    raw = str(tmp_path / "flat.img")
    with Disk() as d:
        d.create_base(raw, 4 * MiB, "RAW")
        d.write(0, b"\x99" * MiB)
    child = str(tmp_path / "child.qed")
    with Disk() as d:
        d.open(base)
        d.create_diff(child)
        d.write(MiB, b"\x33" * 4096)
        d.top.resize(16 * MiB)
        d.write(15 * MiB, b"\x34" * 4096)
        with pytest.raises(InvalidArgument):
            d.top.resize(MiB)
    img = get_backend("QED").open(child, OpenFlags.NORMAL)
    par = get_backend("RAW").open(raw, OpenFlags.READ_ONLY)
    try:
        img.set_parent(par)
    finally:
        img.close()
        par.close()
    with Disk.open_chain(child, flags=OpenFlags.READ_ONLY) as d:
        assert d.images[0].format == "RAW"
        assert d.top.parent_hint.format == "RAW"
        assert d.size == 16 * MiB
        assert d.read(0, 512) == b"\x99" * 512
        assert d.read(MiB, 4096) == b"\x33" * 4096
        assert d.read(15 * MiB, 4096) == b"\x34" * 4096


def test_truncation_anywhere_check_repair_write_compact(tmp_path):
    p = _make(tmp_path, config={"ClusterSize": "4096"},
              writes=[(i // 512 * 512, b"\x07" * 70000) for i in range(0, 4 * MiB - 70000, 300000)])
    with open(p, "rb") as fh:
        data = fh.read()
    q = str(tmp_path / "t.qed")
    step = max(1, len(data) // 60)
    for n in list(range(0, len(data), step)) + [len(data) - 1, len(data) - 513]:
        for mode in ("check", "repair", "write", "compact"):
            with open(q, "wb") as fh:
                fh.write(data[:n])
            try:
                with Disk() as d:
                    d.open(q, "QED",
                           flags=OpenFlags.READ_ONLY if mode == "check" else OpenFlags.NORMAL)
                    if mode == "check":
                        d.top.check()
                    elif mode == "repair":
                        d.top.check(repair=True)
                    elif mode == "write":
                        d.write(MiB, b"\x01" * 5000)
                    else:
                        d.top.compact()
            except VDError:
                pass
