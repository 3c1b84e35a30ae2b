"""VHDX backend: conformance, structures, CRC-32C, the real images of the corpus, hostile input."""
from __future__ import annotations

import gzip
import os
import shutil
import struct
import uuid
import zipfile
from pathlib import Path

import pytest

from tests.conftest import read_all, require_corpus
from tests.engine import kill_harness as kh
from tests.formats.conformance import FormatConformance
from vdgui.vd import (
    Alloc,
    CorruptImage,
    Disk,
    ImageFlags,
    NotSupported,
    OpenFlags,
    ParentMismatch,
    VDError,
    get_backend,
)
from vdgui.vd.crc32c import crc32c
from vdgui.vd.formats import vhdx

MiB = 1 << 20


class TestVhdxConformance(FormatConformance):
    FORMAT = "VHDX"
    EXT = "vhdx"
    VARIANTS = (ImageFlags.NONE, ImageFlags.FIXED)
    DIFF = True
    UUID = False          # a VHDX child links to its parent's DataWriteGuid, not to its UUID
    CREATE_CONFIG = {"BlockSize": MiB}


def test_crc32c_known_vectors():
    # RFC 3720 B.4 test vectors and the common check value
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(bytes(32)) == 0x8A9136AA
    assert crc32c(b"\xff" * 32) == 0x62A8AB43
    assert crc32c(bytes(range(32))) == 0x46DD794E
    assert crc32c(bytes(range(31, -1, -1))) == 0x113FDB5C
    assert crc32c(b"") == 0
    assert crc32c(b"6789", crc32c(b"12345")) == 0xE3069283
    # the zero-run shortcut agrees with the plain byte loop
    from vdgui.vd.crc32c import _TABLE

    def plain(d):
        c = 0xFFFFFFFF
        for b in d:
            c = _TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
        return c ^ 0xFFFFFFFF
    for n in (511, 512, 513, 1536, 5000):
        for d in (bytes(n), bytes(range(256)) * (n // 256) + bytes(n % 256),
                  b"\x01" + bytes(n - 2) + b"\x02"):
            assert crc32c(d) == plain(d), n


@pytest.mark.parametrize("name", sorted(vhdx.STRUCTS))
def test_struct_round_trip(name):
    st = vhdx.STRUCTS[name]
    size = st.sizeof()
    raw = bytes((i * 7 + 3) % 256 for i in range(size))
    assert st.build(st.parse(raw)) == raw


def test_struct_sizes_match_spec():
    sizes = {"Header": 4096, "RegionTableHeader": 16, "RegionTableEntry": 32,
             "LogEntryHeader": 64, "ZeroDescriptor": 32, "DataDescriptor": 32, "DataSector": 4096,
             "MetadataTableHeader": 32, "MetadataTableEntry": 32, "FileParameters": 8,
             "ParentLocatorHeader": 20, "ParentLocatorEntry": 12}
    for name, n in sizes.items():
        assert vhdx.STRUCTS[name].sizeof() == n, name


def test_chunk_ratio_and_bat_counts():
    assert vhdx.chunk_ratio(512, 32 * MiB) == 128
    assert vhdx.chunk_ratio(512, MiB) == 4096
    assert vhdx.chunk_ratio(4096, MiB) == 32768
    # 10 MiB, 2 MiB blocks: 5 payload entries, no bitmap entry needed before the last
    assert vhdx.bat_entry_count(10 * MiB, 2 * MiB, 512, False) == 5
    # 8 GiB, 2 MiB blocks, differencing: 4096 payload blocks, chunk ratio 2048 -> 2 * 2049
    assert vhdx.bat_entry_count(8 << 30, 2 * MiB, 512, True) == 4098
    # base image crossing a chunk boundary gets an interleaved bitmap entry
    assert vhdx.bat_entry_count(4097 * MiB, MiB, 512, False) == 4097 + 1


# -- corpus ------------------------------------------------------------------------------------
def _unpack(dest: Path, rel: str) -> Path:
    """Unpack one corpus file (also the 'large when unpacked' ones) into ``dest``, sparse."""
    out = dest / rel
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    for suffix in (".gz", ".xz", ".zip"):
        src = require_corpus() / (rel + suffix)
        if src.exists():
            break
    else:
        pytest.fail(f"corpus file {rel} is missing")
    if suffix == ".zip":
        with zipfile.ZipFile(src) as z:
            name = next(n for n in z.namelist() if not n.endswith("/"))
            fin = z.open(name)
    elif suffix == ".xz":
        import lzma
        fin = lzma.open(src, "rb")
    else:
        fin = gzip.open(src, "rb")
    with fin, open(out, "wb") as fout:
        while chunk := fin.read(1 << 20):
            if chunk.count(0) == len(chunk):
                fout.seek(len(chunk), 1)
            else:
                fout.write(chunk)
        fout.truncate()
    return out


@pytest.fixture(scope="module")
def vhdx_corpus(tmp_path_factory):
    dest = tmp_path_factory.mktemp("vhdxcorpus")
    for rel in ("vhdx/dissect/fixed.vhdx", "vhdx/dissect/dynamic.vhdx",
                "vhdx/dissect/differencing.avhdx", "vhdx/discutils/vhdx-log-replay.vhdx"):
        _unpack(dest, rel)
    return dest


@pytest.mark.parametrize("name,subformat,block", [("fixed.vhdx", "fixed", 2 * MiB),
                                                  ("dynamic.vhdx", "dynamic", 32 * MiB)])
def test_corpus_windows_images_match_qemu(vhdx_corpus, qemu, tmp_path, name, subformat, block):
    p = vhdx_corpus / "vhdx" / "dissect" / name
    raw = qemu.to_raw(p, tmp_path / "q.raw", fmt="vhdx")
    with Disk() as d:
        img = d.open(str(p), flags=OpenFlags.READ_ONLY)
        assert img.size == 10 * MiB
        assert img.block_size == block
        info = img.info()
        assert info["subformat"] == subformat
        assert info["creator"].startswith("Microsoft Windows")
        assert info["physical_sector_size"] == 4096
        assert img.uuid is not None
        data = read_all(d)
        assert any(data)
        assert data == raw.read_bytes()
        assert not img.check().problems


def test_corpus_differencing_without_parent(vhdx_corpus):
    p = vhdx_corpus / "vhdx" / "dissect" / "differencing.avhdx"
    with Disk() as d:
        img = d.open(str(p), flags=OpenFlags.READ_ONLY | OpenFlags.INFO)
        assert img.is_diff and img.flags & ImageFlags.DIFF
        assert img.size == 8 << 30
        hint = img.parent_hint
        assert hint.locations[0] == "Generation 1_49C4BAF3-4B25-4406-8C4B-D39E65C32385.avhdx"
        assert img.parent_locator["parent_linkage"] == "{ff34003b-11ed-4cf8-a166-b2be05e20b80}"
        assert img.parent_modification_uuid == uuid.UUID("ff34003b-11ed-4cf8-a166-b2be05e20b80")
        runs = img.block_status(0, img.size)
        assert sum(n for _s, n, _st in runs) == img.size
        data_runs = [(s, n) for s, n, st in runs if st == Alloc.DATA]
        assert data_runs and sum(n for _s, n in data_runs) < img.size
        # partially present blocks: data sectors read from the file, the rest reads as zero here
        s, n = data_runs[0]
        assert len(img.read(s, min(n, MiB))) == min(n, MiB)
        assert not img.check().problems
    with pytest.raises(VDError, match="parent"):
        Disk.open_chain(str(p), flags=OpenFlags.READ_ONLY)


def test_corpus_log_replay(vhdx_corpus, qemu, tmp_path):
    src = vhdx_corpus / "vhdx" / "discutils" / "vhdx-log-replay.vhdx"
    ours, theirs = tmp_path / "ours.vhdx", tmp_path / "theirs.vhdx"
    shutil.copy(src, ours)
    shutil.copy(src, theirs)
    with pytest.raises(vhdx.LogReplayNeeded, match="replayed"), Disk() as d:
        d.open(str(ours), flags=OpenFlags.READ_ONLY)
    with Disk() as d:     # info opens report the pending log without replaying
        assert d.open(str(ours), flags=OpenFlags.READ_ONLY | OpenFlags.INFO).info()["log_pending"]
    with Disk() as d:
        img = d.open(str(ours))
        assert img.info()["log_replayed"]
    qemu.img("check", "-r", "all", "-f", "vhdx", theirs, check=False)
    assert qemu.check(ours, "vhdx").returncode == 0
    assert qemu.compare(ours, theirs, "vhdx", "vhdx").returncode == 0
    # everything past the headers is byte-identical to qemu's replay
    a, b = ours.read_bytes(), theirs.read_bytes()
    assert len(a) == len(b) and a[vhdx.REGION_OFFSETS[0]:] == b[vhdx.REGION_OFFSETS[0]:]
    with Disk() as d:            # readable read-only now; the payload shows through
        d.open(str(ours), flags=OpenFlags.READ_ONLY)
        ext = [e for e in d.allocation() if e.status == Alloc.DATA]
        assert ext and any(d.read(ext[0].start, min(ext[0].length, MiB)))


# -- our own images --------------------------------------------------------------------------
def _create(path, size=4 * MiB, **kw):
    d = Disk()
    d.create_base(str(path), size, "VHDX", config=kw.pop("config", {"BlockSize": MiB}), **kw)
    return d


def test_uuid_and_data_write_guid(tmp_path):
    p = tmp_path / "u.vhdx"
    u = uuid.uuid4()
    with _create(p, uuid=u) as d:
        img = d.top
        assert img.uuid == u
        before = img.modification_uuid
        d.write(0, b"x" * 512)
        assert img.modification_uuid != before     # DataWriteGuid changes on the first write
        after = img.modification_uuid
        d.write(512, b"y" * 512)
        assert img.modification_uuid == after      # ... once per session
        u2 = uuid.uuid4()
        d.set_uuid(0, u2)
    with Disk() as d:
        img = d.open(str(p), flags=OpenFlags.READ_ONLY)
        assert img.uuid == u2 and img.modification_uuid == after


def test_diff_links_to_data_write_guid_and_partial_blocks(tmp_path, qemu):
    base, child = tmp_path / "base.vhdx", tmp_path / "child.avhdx"
    with _create(base, 3 * MiB) as d:
        d.write(0, b"\xaa" * (3 * MiB))
        d.create_diff(str(child), config={"BlockSize": MiB})
        d.write(4096, b"\xbb" * 512)               # a partial block: bitmap, no copy of the parent
        d.write(2 * MiB, b"\xcc" * MiB)            # a whole block
        d.write(MiB, bytes(MiB))                   # zeroes over a whole block: ZERO state
        top = d.top
        assert top.parent_modification_uuid == d.images[0].modification_uuid
        st = [top._state(b) for b in range(3)]
        assert st == [vhdx.PAYLOAD_PARTIALLY_PRESENT, vhdx.PAYLOAD_ZERO,
                      vhdx.PAYLOAD_FULLY_PRESENT]
        assert top.block_status(0, 8192) == [(0, 4096, Alloc.UNALLOCATED), (4096, 512, Alloc.DATA),
                                             (4608, 3584, Alloc.UNALLOCATED)]
    # the child file did not copy the parent's first block
    assert os.stat(child).st_blocks * 512 < 6 * MiB
    expect = b"\xaa" * 4096 + b"\xbb" * 512 + b"\xaa" * (MiB - 4608) + bytes(MiB) + b"\xcc" * MiB
    with Disk.open_chain(str(child), flags=OpenFlags.READ_ONLY) as d:
        assert len(d) == 2
        assert read_all(d) == expect
        loc = d.top.info()["parent_locator"]
        assert loc["relative_path"] == ".\\base.vhdx"
        assert set(loc) >= {"parent_linkage", "relative_path"}
        assert loc["parent_linkage"] == "{" + str(d.images[0].modification_uuid) + "}"
    # writing the parent afterwards changes its DataWriteGuid: the child no longer matches
    with Disk() as d:
        d.open(str(base))
        d.write(0, b"z" * 512)
    with pytest.raises(ParentMismatch):
        Disk.open_chain(str(child), flags=OpenFlags.READ_ONLY)
    assert qemu.check(base, "vhdx").returncode == 0


def test_4k_logical_sectors(tmp_path, qemu):
    """qemu 7.2 refuses VHDX with 4 KiB logical sectors (only 512 supported), so the check is
    against an in-memory model, including a differencing child (bitmap bits of 4 KiB sectors)."""
    p, c = tmp_path / "4k.vhdx", tmp_path / "4k-child.avhdx"
    expect = bytearray(8 * MiB)
    with _create(p, 8 * MiB, config={"BlockSize": MiB, "LogicalSectorSize": 4096}) as d:
        assert d.top.sector_size == 4096 and d.sector_size == 4096
        assert d.top.cr == 32768
        for off, data in ((100, b"\x42" * 10), (5 * MiB, b"\x43" * 8192)):
            d.write(off, data)                    # the Disk aligns to 4 KiB
            expect[off:off + len(data)] = data
        d.create_diff(str(c), config={"BlockSize": MiB})
        assert d.top.sector_size == 4096
        for off, data in ((5 * MiB + 4096, b"\x44" * 100), (7 * MiB, b"\x45" * 4096)):
            d.write(off, data)
            expect[off:off + len(data)] = data
        assert d.top.block_status(5 * MiB, MiB)[:2] == [(5 * MiB, 4096, Alloc.UNALLOCATED),
                                                       (5 * MiB + 4096, 4096, Alloc.DATA)]
    with Disk.open_chain(str(c), flags=OpenFlags.READ_ONLY) as d:
        assert read_all(d) == bytes(expect)
    r = qemu.img("info", "-f", "vhdx", p, check=False)
    assert r.returncode != 0 and "not supported" in r.stderr
    with pytest.raises(VDError), Disk() as d:
        d.create_base(str(tmp_path / "odd.vhdx"), 8 * MiB + 512, "VHDX",
                      config={"LogicalSectorSize": 4096})


def test_resize_grow(tmp_path, qemu):
    for variant in (ImageFlags.NONE, ImageFlags.FIXED):
        p = tmp_path / f"r{int(variant)}.vhdx"
        with _create(p, 2 * MiB, flags=variant) as d:
            d.write(MiB, b"\x11" * MiB)
            d.top.resize(5 * MiB)
            assert d.size == 5 * MiB
            d.write(4 * MiB, b"\x22" * 4096)
            with pytest.raises(VDError):
                d.top.resize(MiB)
        assert qemu.check(p, "vhdx").returncode == 0
        raw = qemu.to_raw(p, tmp_path / "r.raw", "vhdx").read_bytes()
        assert len(raw) == 5 * MiB
        assert raw == (bytes(MiB) + b"\x11" * MiB + bytes(2 * MiB) + b"\x22" * 4096
                       + bytes(MiB - 4096))


def test_relink(tmp_path):
    a, b, c = (tmp_path / n for n in ("a.vhdx", "b.vhdx", "c.avhdx"))
    with _create(a, 2 * MiB) as d:
        d.write(0, b"A" * MiB)
    shutil.copy(a, b)
    with Disk() as d:
        d.open(str(a), flags=OpenFlags.READ_ONLY)
        d.create_diff(str(c))
        d.write(MiB, b"C" * 512)
    with Disk() as d:
        pb = d.open(str(b), flags=OpenFlags.READ_ONLY)
        img = get_backend("VHDX").open(str(c), OpenFlags.NORMAL)
        try:
            img.set_parent(pb)
        finally:
            img.close()
    with Disk.open_chain(str(c), flags=OpenFlags.READ_ONLY) as d:
        assert os.path.basename(d.images[0].location) == "b.vhdx"
        assert d.read(0, 4) == b"AAAA" and d.read(MiB, 4) == b"CCCC"


# -- hostile input ---------------------------------------------------------------------------
def _image_bytes(tmp_path, size=4 * MiB) -> bytearray:
    p = tmp_path / "src.vhdx"
    with _create(p, size) as d:
        d.write(0, b"\x5a" * MiB)
    return bytearray(p.read_bytes())


def _fix_region_checksum(b: bytearray, off: int) -> None:
    rt = vhdx.with_checksum(bytearray(b[off:off + vhdx.REGION_SIZE]))
    b[off:off + vhdx.REGION_SIZE] = rt


def _open_bytes(tmp_path, b, flags=OpenFlags.READ_ONLY):
    p = tmp_path / "hostile.vhdx"
    p.write_bytes(bytes(b))
    with Disk() as d:
        d.open(str(p), "VHDX", flags=flags)
        return read_all(d)


def _layout(b):
    rt = vhdx.RegionTableHeader.parse(bytes(b[vhdx.REGION_OFFSETS[0]:vhdx.REGION_OFFSETS[0] + 16]))
    entries = {}
    for k in range(rt.entry_count):
        o = vhdx.REGION_OFFSETS[0] + 16 + 32 * k
        e = vhdx.RegionTableEntry.parse(bytes(b[o:o + 32]))
        entries[vhdx.guid_from_bytes(e.guid)] = (e.file_offset, e.length, o)
    return entries


def test_hostile_region_count(tmp_path):
    b = _image_bytes(tmp_path)
    for off in vhdx.REGION_OFFSETS:
        struct.pack_into("<I", b, off + 8, 100000)
        _fix_region_checksum(b, off)
    with pytest.raises(CorruptImage, match="EntryCount.*2047.*100000"):
        _open_bytes(tmp_path, b)


def test_hostile_unknown_required_region(tmp_path):
    b = _image_bytes(tmp_path)
    for off in vhdx.REGION_OFFSETS:
        struct.pack_into("<I", b, off + 8, 3)
        b[off + 80:off + 112] = vhdx.RegionTableEntry.build(dict(
            guid=uuid.uuid4().bytes_le, file_offset=8 * MiB, length=MiB, required=1))
        _fix_region_checksum(b, off)
    with pytest.raises(NotSupported, match="required"):
        _open_bytes(tmp_path, b)


def test_hostile_region_past_eof(tmp_path):
    b = _image_bytes(tmp_path)
    for off in vhdx.REGION_OFFSETS:
        e = vhdx.RegionTableEntry.parse(bytes(b[off + 16:off + 48]))
        e.length = 1 << 31
        b[off + 16:off + 48] = vhdx.RegionTableEntry.build(e)
        _fix_region_checksum(b, off)
    with pytest.raises(CorruptImage, match="past the end"):
        _open_bytes(tmp_path, b)


def test_hostile_metadata_count_and_items(tmp_path):
    b = _image_bytes(tmp_path)
    md_off = _layout(b)[vhdx.METADATA_GUID][0]
    bad = bytearray(b)
    struct.pack_into("<H", bad, md_off + 10, 65535)
    with pytest.raises(CorruptImage, match="EntryCount.*2047.*65535"):
        _open_bytes(tmp_path, bad)
    bad = bytearray(b)       # an item pointing outside the region
    struct.pack_into("<I", bad, md_off + 32 + 16, 0xFFFF0000)
    with pytest.raises(CorruptImage, match="outside the metadata region"):
        _open_bytes(tmp_path, bad)
    bad = bytearray(b)       # an unknown required item
    bad[md_off + 32:md_off + 48] = uuid.uuid4().bytes_le
    with pytest.raises(NotSupported, match="required"):
        _open_bytes(tmp_path, bad)
    bad = bytearray(b)       # block size not a power of two
    fp = vhdx.MetadataTableEntry.parse(bytes(b[md_off + 32:md_off + 64]))
    struct.pack_into("<I", bad, md_off + fp.offset, 3 * MiB)
    with pytest.raises(CorruptImage, match="BlockSize"):
        _open_bytes(tmp_path, bad)


def test_hostile_bat_entry_past_eof(tmp_path):
    b = _image_bytes(tmp_path)
    bat_off = _layout(b)[vhdx.BAT_GUID][0]
    struct.pack_into("<Q", b, bat_off, (1 << 30) << 20 | vhdx.PAYLOAD_FULLY_PRESENT)
    with pytest.raises(CorruptImage, match=r"BAT\[0\].*outside the file"):
        _open_bytes(tmp_path, b)
    p = tmp_path / "hostile.vhdx"
    with Disk() as d:
        img = d.open(str(p), "VHDX", flags=OpenFlags.READ_ONLY)
        rep = img.check()
        assert rep.corrupt and "outside the file" in rep.problems[0].what
    struct.pack_into("<Q", b, bat_off, 5)      # an undefined state
    with pytest.raises(CorruptImage, match="state"):
        _open_bytes(tmp_path, b)


def test_hostile_headers(tmp_path):
    b = _image_bytes(tmp_path)
    bad = bytearray(b)
    for off in vhdx.HEADER_OFFSETS:
        bad[off + 20] ^= 0xFF                   # checksum mismatch in both
    with pytest.raises(CorruptImage, match="no valid VHDX header"):
        _open_bytes(tmp_path, bad)
    bad = bytearray(b)                           # one good header is enough
    bad[vhdx.HEADER_OFFSETS[1] + 20] ^= 0xFF
    assert _open_bytes(tmp_path, bad)[:4] == b"\x5a" * 4


def _log_entry(seq, guid, tail, descs_sectors, last_file_offset, entry_length=None):
    """Build one log entry (MS-VHDX 2.3.1) for tests."""
    descs, sectors = b"", b""
    for kind, file_offset, payload in descs_sectors:
        if kind == "zero":
            descs += vhdx.ZeroDescriptor.build(dict(signature=b"zero", reserved=0,
                                                    zero_length=payload, file_offset=file_offset,
                                                    sequence_number=seq))
        else:
            descs += vhdx.DataDescriptor.build(dict(signature=b"desc",
                                                    trailing_bytes=payload[4092:],
                                                    leading_bytes=payload[:8],
                                                    file_offset=file_offset, sequence_number=seq))
            sectors += vhdx.DataSector.build(dict(signature=b"data", sequence_high=seq >> 32,
                                                  data=payload[8:4092],
                                                  sequence_low=seq & 0xFFFFFFFF))
    n = len(descs_sectors)
    area = -(-(64 + 32 * n) // 4096) * 4096
    length = entry_length or area + len(sectors)
    hdr = vhdx.LogEntryHeader.build(dict(signature=b"loge", checksum=0, entry_length=length,
                                         tail=tail, sequence_number=seq, descriptor_count=n,
                                         reserved=0, log_guid=guid, flushed_file_offset=0,
                                         last_file_offset=last_file_offset))
    e = bytearray((hdr + descs).ljust(area, b"\0") + sectors)
    return bytes(vhdx.with_checksum(e))


def _dirty(tmp_path, entries_fn):
    """An image of ours with a hand-made log (written by ``entries_fn``); returns its path."""
    p = tmp_path / f"log-{entries_fn.__name__}.vhdx"
    with _create(p, 4 * MiB) as d:
        d.write(0, b"\x01" * MiB)
        img = d.top
        bat_off = img.bat_offset
        data_off = img._block_offset(0)
        log_off = img.hdr.log_offset
        guid = uuid.uuid4().bytes_le
        img._update_header(log_guid=guid)
        flen = img.file_len
    b = bytearray(p.read_bytes())
    log = entries_fn(guid, bat_off, data_off, flen)
    b[log_off:log_off + len(log)] = log
    p.write_bytes(bytes(b))
    return p


def test_log_replay_hand_made(tmp_path, qemu):
    def entries(guid, bat_off, data_off, flen):
        page = bytearray(b"\x07" * 4096)
        e1 = _log_entry(5, guid, 0, [("data", data_off, bytes(page)),
                                     ("zero", data_off + 8192, 8192)], flen)
        e2 = _log_entry(6, guid, 0, [("data", data_off + 4096, b"\x09" * 4096)], flen)
        return e1 + e2
    p = _dirty(tmp_path, entries)
    theirs = tmp_path / "theirs.vhdx"
    shutil.copy(p, theirs)
    with pytest.raises(vhdx.LogReplayNeeded):
        _open_bytes(tmp_path, p.read_bytes())
    with Disk() as d:
        d.open(str(p))
        data = d.read(0, 5 * 4096)
        assert data == b"\x07" * 4096 + b"\x09" * 4096 + bytes(8192) + b"\x01" * 4096
    qemu.img("check", "-r", "all", "-f", "vhdx", theirs, check=False)
    assert qemu.compare(p, theirs, "vhdx", "vhdx").returncode == 0


def test_log_replay_skips_invalid_entries(tmp_path):
    def entries(guid, bat_off, data_off, flen):
        good = _log_entry(5, guid, 0, [("data", data_off, b"\x07" * 4096)], flen)
        other = _log_entry(6, uuid.uuid4().bytes_le, 0, [("data", data_off, b"\x08" * 4096)], flen)
        broken = bytearray(_log_entry(7, guid, 0, [("data", data_off, b"\x09" * 4096)], flen))
        broken[5000] ^= 1                         # checksum mismatch
        return good + other + bytes(broken)
    p = _dirty(tmp_path, entries)
    with Disk() as d:
        d.open(str(p))
        assert d.read(0, 4) == b"\x07" * 4


def test_hostile_log(tmp_path):
    def huge_zero(guid, bat_off, data_off, flen):
        return _log_entry(5, guid, 0, [("zero", data_off, 1 << 40)], flen)
    p = _dirty(tmp_path, huge_zero)
    with pytest.raises(CorruptImage, match="ZeroLength"):
        Disk().open(str(p))

    def into_headers(guid, bat_off, data_off, flen):
        return _log_entry(5, guid, 0, [("data", 64 * 1024, b"\x00" * 4096)], flen)
    p = _dirty(tmp_path, into_headers)
    with pytest.raises(CorruptImage, match="headers"):
        Disk().open(str(p))

    def bad_length(guid, bat_off, data_off, flen):   # entry longer than the log: ignored
        return _log_entry(5, guid, 0, [("data", data_off, b"\x07" * 4096)], flen,
                          entry_length=1 << 30)
    p = _dirty(tmp_path, bad_length)
    with Disk() as d:
        d.open(str(p))
        assert d.read(0, 4) == b"\x01" * 4
    # log length beyond the cap / past the file
    with Disk() as d:
        img = d.open(str(p))
        img._update_header(log_guid=uuid.uuid4().bytes_le, log_length=1 << 31)
    with pytest.raises(CorruptImage, match="log"):
        Disk().open(str(p))


def test_backend_declarations():
    b = get_backend("vhdx")
    assert b.name == "VHDX" and b.can(vhdx.Operation.WRITE) and b.can(vhdx.Operation.RESIZE)


def test_check_and_repair_through_ops(vhdx_corpus, tmp_path, qemu):
    from vdgui.vd.ops.repair import check
    # a pending log: check reports it, check --repair replays it (like qemu-img check -r all)
    p = tmp_path / "replay.vhdx"
    shutil.copy(vhdx_corpus / "vhdx" / "discutils" / "vhdx-log-replay.vhdx", p)
    rep = check(str(p), format="VHDX")
    assert rep.corrupt and "replay" in rep.problems[0].what
    rep = check(str(p), format="VHDX", repair=True)
    assert rep.repaired and not rep.corrupt
    assert check(str(p), format="VHDX").exit_code == 0
    assert qemu.check(p, "vhdx").returncode == 0
    # a BAT entry past the end of the file and one with an undefined state
    b = _image_bytes(tmp_path)
    bat_off = _layout(b)[vhdx.BAT_GUID][0]
    struct.pack_into("<Q", b, bat_off + 8, (1 << 30) << 20 | vhdx.PAYLOAD_FULLY_PRESENT)
    struct.pack_into("<Q", b, bat_off + 16, 4)
    q = tmp_path / "badbat.vhdx"
    q.write_bytes(bytes(b))
    rep = check(str(q), format="VHDX")
    assert rep.exit_code == 2 and len(rep.problems) == 2
    rep = check(str(q), format="VHDX", repair=True)
    assert rep.repaired and not rep.corrupt
    assert check(str(q), format="VHDX").exit_code == 0
    assert qemu.check(q, "vhdx").returncode == 0
    with Disk() as d:
        d.open(str(q), flags=OpenFlags.READ_ONLY)
        assert d.read(0, 4) == b"\x5a" * 4 and d.read(MiB, 4) == bytes(4)


def test_fuzz_structures_give_vderror(tmp_path):
    """Random damage to headers, region tables, metadata, BAT and log: a VDError or a clean
    read, never another exception (the conformance fuzz only reaches the file identifier)."""
    import random
    p = tmp_path / "f.vhdx"
    with _create(p, 4 * MiB) as d:
        d.write(0, b"\x5a" * MiB)
        d.create_diff(str(tmp_path / "f-child.avhdx"))
        d.write(2 * MiB + 512, b"\x6b" * 4096)
    sources = [p.read_bytes(), (tmp_path / "f-child.avhdx").read_bytes()]
    lay = _layout(bytearray(sources[1]))
    md_off, bat_off = lay[vhdx.METADATA_GUID][0], lay[vhdx.BAT_GUID][0]
    areas = [(vhdx.HEADER_OFFSETS[0], 80), (vhdx.HEADER_OFFSETS[1], 80),
             (vhdx.REGION_OFFSETS[0], 80), (vhdx.REGION_OFFSETS[1], 80),
             (md_off, 256), (md_off + 65536, 512), (bat_off, 64)]
    rnd = random.Random(99)
    bad = tmp_path / "fz.vhdx"
    for n in range(250):
        b = bytearray(sources[n % 2])
        for _ in range(rnd.choice([1, 2, 4])):
            start, ln = rnd.choice(areas)
            b[start + rnd.randrange(ln)] = rnd.randrange(256)
        if n % 3 == 0:   # keep the damaged structures' checksums valid so parsing goes deeper
            for off in vhdx.REGION_OFFSETS:
                _fix_region_checksum(b, off)
            for off in vhdx.HEADER_OFFSETS:
                b[off:off + 4096] = vhdx.with_checksum(bytearray(b[off:off + 4096]))
        bad.write_bytes(bytes(b))
        try:
            img = get_backend("VHDX").open(str(bad), OpenFlags.READ_ONLY)
            try:
                img.read(0, min(img.size, 4 * MiB))
                img.block_status(0, img.size)
                img.check()
                img.info()
            finally:
                img.close()
        except VDError:
            pass


def test_discard(tmp_path, qemu):
    for variant in (ImageFlags.NONE, ImageFlags.FIXED):
        p = tmp_path / f"disc{int(variant)}.vhdx"
        with _create(p, 4 * MiB, flags=variant) as d:
            d.write(0, b"\x11" * (4 * MiB))
            before = os.stat(p).st_blocks
            d.discard(MiB, MiB)                 # a whole block
            d.discard(2 * MiB + 512, 4096)      # part of a block
            st = d.top._state(1)
            assert st == (vhdx.PAYLOAD_FULLY_PRESENT if variant else vhdx.PAYLOAD_UNMAPPED)
            expect = b"\x11" * MiB + bytes(MiB) + b"\x11" * 512 + bytes(4096) \
                + b"\x11" * (2 * MiB - 4608)
            assert read_all(d) == expect
        if not variant:
            assert os.stat(p).st_blocks < before   # the block's space went back
        assert qemu.check(p, "vhdx").returncode == 0
        assert qemu.to_raw(p, tmp_path / "d.raw", "vhdx").read_bytes() == expect
    # in a differencing image, discarded ranges hide the parent
    base, child = tmp_path / "db.vhdx", tmp_path / "dc.avhdx"
    with _create(base, 3 * MiB) as d:
        d.write(0, b"\x22" * (3 * MiB))
        d.create_diff(str(child), config={"BlockSize": MiB})
        d.write(2 * MiB, b"\x33" * 1024)
        d.discard(0, MiB)
        d.discard(MiB + 4096, 512)
        d.discard(2 * MiB, 512)
        assert d.top._state(0) == vhdx.PAYLOAD_ZERO
        expect = bytes(MiB) + b"\x22" * 4096 + bytes(512) + b"\x22" * (MiB - 4608) \
            + bytes(512) + b"\x33" * 512 + b"\x22" * (MiB - 1024)
        assert read_all(d) == expect
    with Disk.open_chain(str(child), flags=OpenFlags.READ_ONLY) as d:
        assert read_all(d) == expect


def test_compact(tmp_path, qemu):
    from vdgui.vd.ops.compact import compact
    p = tmp_path / "cp.vhdx"
    with _create(p, 8 * MiB) as d:
        for i in range(8):
            d.write(i * MiB, bytes([i + 1]) * MiB)
        for i in (1, 2, 5):
            d.write(i * MiB, bytes(MiB))        # whole blocks of zeroes, still allocated
        expect = read_all(d)
        uid = d.top.uuid
    size_before = os.path.getsize(p)
    compact(str(p), format="VHDX")
    assert os.path.getsize(p) == size_before - 3 * MiB
    assert qemu.check(p, "vhdx").returncode == 0
    with Disk() as d:
        img = d.open(str(p), flags=OpenFlags.READ_ONLY)
        assert read_all(d) == expect and img.uuid == uid
        assert [img._state(b) for b in range(8)].count(vhdx.PAYLOAD_NOT_PRESENT) == 3
    # a child: blocks equal to the parent go, a zero block over parent data becomes ZERO
    child = tmp_path / "cp.avhdx"
    with Disk() as d:
        d.open(str(p), flags=OpenFlags.READ_ONLY)
        d.create_diff(str(child), config={"BlockSize": MiB})
        d.write(0, b"\x01" * MiB)               # same as the parent
        d.write(3 * MiB, bytes(MiB))            # zeroes over data
        d.write(6 * MiB, b"\x99" * MiB)         # real change
        d.write(7 * MiB + 512, b"\x98" * 512)   # a partial block
        expect = read_all(d)
        link = d.top.parent_modification_uuid
    compact(str(child), format="VHDX")
    with Disk.open_chain(str(child), flags=OpenFlags.READ_ONLY) as d:
        assert read_all(d) == expect
        top = d.top
        assert top.parent_modification_uuid == link
        assert top._state(0) == vhdx.PAYLOAD_NOT_PRESENT and top._state(3) == vhdx.PAYLOAD_ZERO
        assert top._state(6) == vhdx.PAYLOAD_FULLY_PRESENT
        assert top._state(7) == vhdx.PAYLOAD_PARTIALLY_PRESENT


def test_merge_into_child_makes_base(tmp_path, qemu):
    """Backward merge (parent folded into its child): the child becomes a base image that qemu
    reads identically (set_parent(None))."""
    from vdgui.vd.ops.merge import merge
    base, child = tmp_path / "mb.vhdx", tmp_path / "mc.avhdx"
    with _create(base, 3 * MiB + 4096) as d:
        d.write(0, b"\x01" * (2 * MiB))
        d.write(3 * MiB, b"\x03" * 4096)
        d.create_diff(str(child), config={"BlockSize": MiB})
        d.write(512, b"\x02" * 512)            # partial block over parent data
        d.write(2 * MiB + 4096, b"\x04" * 512)  # partial block over parent zeroes
        expect = read_all(d)
    merge(str(base), str(child))
    assert not base.exists()
    r = qemu.check(child, "vhdx")
    assert r.returncode == 0, r.stdout + r.stderr
    assert qemu.to_raw(child, tmp_path / "m.raw", "vhdx").read_bytes() == expect
    with Disk() as d:
        img = d.open(str(child), flags=OpenFlags.READ_ONLY)
        assert not img.is_diff and read_all(d) == expect
        assert not img.check().problems


def test_forward_merge_relinks_grandchild(tmp_path, qemu):
    from vdgui.vd.ops.merge import merge
    paths = [tmp_path / n for n in ("fb.vhdx", "f1.avhdx", "f2.avhdx")]
    with _create(paths[0], 2 * MiB) as d:
        d.write(0, b"\x01" * (2 * MiB))
        d.create_diff(str(paths[1]), config={"BlockSize": MiB})
        d.write(4096, b"\x02" * 4096)
        d.create_diff(str(paths[2]), config={"BlockSize": MiB})
        d.write(MiB, b"\x03" * 512)
        expect = read_all(d)
        mid = d.read(0, d.size, top=1)
    merge(str(paths[1]), str(paths[0]))
    assert not paths[1].exists()
    with Disk.open_chain(str(paths[2]), flags=OpenFlags.READ_ONLY) as d:
        assert len(d) == 2 and read_all(d) == expect
    assert qemu.to_raw(paths[0], tmp_path / "fb.raw", "vhdx").read_bytes() == mid
    assert qemu.check(paths[0], "vhdx").returncode == 0


def test_resize_relocates_bat(tmp_path, qemu):
    p = tmp_path / "big.vhdx"
    new = 200 << 30
    with _create(p, 4 * MiB) as d:
        d.write(0, b"\x01" * MiB)
        old_bat = d.top.bat_offset
        d.top.resize(new)
        assert d.top.bat_offset != old_bat and d.top.bat_length >= d.top.bat_count * 8
        d.write(new - 4096, b"\x02" * 4096)
        d.write(100 << 30, b"\x03" * 512)
    assert qemu.check(p, "vhdx").returncode == 0
    qemu.io("-f", "vhdx", "-r", "-c", f"read -P 2 {new - 4096} 4096", "-c", "read -P 1 0 1M",
            "-c", f"read -P 3 {100 << 30} 512", "-c", f"read -P 0 {150 << 30} 1M", p)
    with Disk() as d:
        d.open(str(p), flags=OpenFlags.READ_ONLY)
        assert d.size == new and d.read(new - 4096, 4096) == b"\x02" * 4096
        assert d.read(0, 4) == b"\x01" * 4
    assert os.stat(p).st_blocks * 512 < 16 * MiB


def test_log_guid_without_valid_sequence_opens(tmp_path, qemu):
    """A LogGuid with no valid entry sequence has nothing to replay: read-only opens work (as in
    qemu) and a read-write open clears the GUID."""
    p = tmp_path / "lg.vhdx"
    with _create(p, 4 * MiB) as d:
        d.write(0, b"\x01" * 512)
        d.top._update_header(log_guid=uuid.uuid4().bytes_le)
    qemu.img("info", "-f", "vhdx", p)
    with Disk() as d:
        img = d.open(str(p), flags=OpenFlags.READ_ONLY)
        assert d.read(0, 4) == b"\x01" * 4 and not img.info()["log_pending"]
    with Disk() as d:
        img = d.open(str(p))
        assert img.hdr.log_guid == bytes(16)


def test_unmapped_in_differencing_reads_zero(tmp_path):
    base, child = tmp_path / "ub.vhdx", tmp_path / "uc.avhdx"
    with _create(base, 2 * MiB) as d:
        d.write(0, b"\x01" * (2 * MiB))
        d.create_diff(str(child), config={"BlockSize": MiB})
        top = d.top
        top._set_entry(top._bat_index(0), vhdx.PAYLOAD_UNMAPPED, 0)
        assert d.read(0, 4) == bytes(4) and d.read(MiB, 4) == b"\x01" * 4
        d.write(512, b"\x02" * 512)            # the rest of the block stays zero
        assert d.read(0, 1024) == bytes(512) + b"\x02" * 512
        assert top._state(0) == vhdx.PAYLOAD_FULLY_PRESENT


def test_parent_linkage2_accepted(tmp_path):
    base, child = tmp_path / "l2b.vhdx", tmp_path / "l2c.avhdx"
    with _create(base, 2 * MiB) as d:
        d.write(0, b"\x01" * 512)
        d.create_diff(str(child))
        dwg = d.images[0].modification_uuid
    img = get_backend("VHDX").open(str(child), OpenFlags.NORMAL)
    try:
        kv = dict(img.parent_locator, parent_linkage="{" + str(uuid.uuid4()) + "}",
                  parent_linkage2="{" + str(dwg) + "}")
        img._write_metadata_item(vhdx.PARENT_LOCATOR, vhdx.build_locator(kv))
    finally:
        img.close()
    with Disk.open_chain(str(child), flags=OpenFlags.READ_ONLY) as d:
        assert d.read(0, 4) == b"\x01" * 4


@pytest.mark.skipif(not kh.have_strace(), reason="strace is not installed")
@pytest.mark.parametrize("mode", ["kill", "EIO"])
@pytest.mark.parametrize("diff", [False, True])
def test_interrupted_writes_leave_readable_image(tmp_path, qemu, diff, mode):
    """A write session killed (or failing with EIO) at every syscall that changes a file
    (tests/engine/kill_harness.py): the image still opens, passes qemu-img check (base images)
    and reads, sector by sector, the data of some prefix of the writes."""
    tpl = tmp_path / "tpl"
    tpl.mkdir()
    base = tpl / "ib.vhdx"
    with _create(base, 3 * MiB) as d:
        d.write(0, b"\x01" * (3 * MiB))
    src = base.name
    if diff:
        with Disk() as d:
            d.open(str(base), flags=OpenFlags.READ_ONLY)
            d.create_diff(str(tpl / "ic.avhdx"), config={"BlockSize": MiB})
        src = "ic.avhdx"
    writes = [(512, b"\x02" * 512), (MiB + 4096, b"\x03" * MiB), (0, bytes(MiB))]
    new = bytearray(b"\x01" * (3 * MiB))
    states = [bytes(new)]                       # the content after 0, 1, 2, 3 writes
    for off, data in writes:
        new[off:off + len(data)] = data
        states.append(bytes(new))

    def fn_for(work):
        def fn():
            try:
                with Disk() as d:
                    if diff:
                        d.open(str(work / base.name), flags=OpenFlags.READ_ONLY)
                    d.open(str(work / src))
                    for off, data in writes:
                        d.write(off, data)
            except (VDError, OSError):
                return 1
            return 0
        return fn

    def judge(work, finished):
        with Disk.open_chain(str(work / src), flags=OpenFlags.READ_ONLY) as d:
            got = read_all(d)
        for pos in range(0, 3 * MiB, 512):
            assert any(got[pos:pos + 512] == st[pos:pos + 512] for st in states), pos
        if not diff:
            assert qemu.check(work / src, "vhdx").returncode == 0
        if finished:
            assert got == bytes(new)
    kh.every_point(tmp_path, tpl, fn_for, judge, error=None if mode == "kill" else mode,
                   min_writes=3)


def test_short_last_block_in_file(tmp_path):
    """A disk ending inside its last block may store only that part of the block."""
    p = tmp_path / "short.vhdx"
    with _create(p, 2 * MiB + 512 * 1024) as d:
        d.write(2 * MiB, b"\x09" * (512 * 1024))
        off = d.top._block_offset(2)
    with open(p, "r+b") as fh:
        fh.truncate(off + 512 * 1024)
    with Disk() as d:
        img = d.open(str(p), flags=OpenFlags.READ_ONLY)
        assert d.read(2 * MiB, 512 * 1024) == b"\x09" * (512 * 1024)
        assert not img.check().problems


def test_check_reports_overlaps(tmp_path):
    b = _image_bytes(tmp_path)
    lay = _layout(b)
    bat_off, md_off = lay[vhdx.BAT_GUID][0], lay[vhdx.METADATA_GUID][0]
    first = struct.unpack_from("<Q", b, bat_off)[0]
    struct.pack_into("<Q", b, bat_off + 8, first)                         # two blocks, one place
    struct.pack_into("<Q", b, bat_off + 16, (md_off >> 20) << 20 | 6)     # a block on metadata
    p = tmp_path / "ov.vhdx"
    p.write_bytes(bytes(b))
    with Disk() as d:
        img = d.open(str(p), flags=OpenFlags.READ_ONLY)
        whats = [x.what for x in img.check().problems]
    assert any("BAT[1]" in w and "overlaps payload block 0" in w for w in whats), whats
    assert any("BAT[2]" in w and "overlaps the metadata region" in w for w in whats), whats


def test_stale_relative_path_updated_on_read_write_open(tmp_path):
    base, child = tmp_path / "sp.vhdx", tmp_path / "sp.avhdx"
    with _create(base, 2 * MiB) as d:
        d.write(0, b"\x01" * 512)
        d.create_diff(str(child))
    (tmp_path / "moved").mkdir()
    newbase = tmp_path / "moved" / "sp.vhdx"
    os.rename(base, newbase)
    with Disk() as d:                           # the user points at the parent by hand
        d.open(str(newbase), flags=OpenFlags.READ_ONLY)
        d.open(str(child))
        assert d.top.parent_locator["relative_path"] == ".\\moved\\sp.vhdx"
    with Disk.open_chain(str(child), flags=OpenFlags.READ_ONLY) as d:
        assert d.read(0, 4) == b"\x01" * 4


def test_block_status_of_a_huge_sparse_child_visits_only_used_blocks(tmp_path, monkeypatch):
    """Issue #18 goal 5: a 2 TiB child with a few pieces of data. Its map is read in O(used
    blocks) steps (was one Python step per block: ~1 M for 2 TiB), and each partly written
    block's runs come from its own sector bits (was a 1 MiB bitmap read per chunk)."""
    size = 2 << 40
    base, child = str(tmp_path / "b.vhdx"), str(tmp_path / "c.vhdx")
    pieces = [(5 * MiB + 4096, 8192), (700 << 30, 65536), (size - 3 * 512, 512),
              ((1 << 40) + 3 * MiB - 512, 1024)]     # the last one spans two blocks
    with Disk() as d:
        d.create_base(base, size, "VHDX")
        d.write(64 << 30, b"\1" * 4096)
        d.create_diff(child)
        for off, n in pieces:
            d.write(off, b"\2" * n)
    seen = []
    real = vhdx.VhdxImage._check_state
    monkeypatch.setattr(vhdx.VhdxImage, "_check_state",
                        lambda self, b: seen.append(b) or real(self, b))
    with Disk.open_chain(child, flags=OpenFlags.READ_ONLY) as d:
        top = d.images[1]
        got = top.block_status(0, size)
        assert len(seen) < 20
        data = [(s, n) for s, n, st in got if st == Alloc.DATA]
        assert data == sorted(pieces)
        assert all(st in (Alloc.DATA, Alloc.UNALLOCATED) for _s, _n, st in got)
        assert sum(n for _s, n, _st in got) == size
        # a range inside one partly written block, not sector-aligned at its start
        assert top.block_status(5 * MiB + 4000, 300) == [
            (5 * MiB + 4000, 96, Alloc.UNALLOCATED), (5 * MiB + 4096, 204, Alloc.DATA)]
        ext = d.allocation()
        assert [(e.start, e.length, e.level) for e in ext if e.level is not None] == sorted(
            [(64 << 30, d.images[0].block_size, 0)] + [(o, n, 1) for o, n in pieces])


def _logged_file(monkeypatch, f):
    """Record the writes (offset, length, how), truncates, syncs and size queries through ``f``."""
    log = []
    real = {k: getattr(f, k) for k in ("pwrite", "pwritev", "truncate", "sync", "size")}
    inner = []                                  # pwritev of one buffer calls pwrite

    def pwrite(off, data):
        if not inner:
            log.append(("pwrite", off, memoryview(data).nbytes))
        real["pwrite"](off, data)

    def pwritev(off, bufs):
        log.append(("pwritev", off, sum(memoryview(b).nbytes for b in bufs)))
        inner.append(1)
        try:
            real["pwritev"](off, bufs)
        finally:
            inner.pop()

    def truncate(n):
        log.append(("truncate", n, 0))
        real["truncate"](n)

    def sync():
        log.append(("sync", 0, 0))
        real["sync"]()

    def size():
        log.append(("size", 0, 0))
        return real["size"]()

    for k, fn in (("pwrite", pwrite), ("pwritev", pwritev), ("truncate", truncate),
                  ("sync", sync), ("size", size)):
        monkeypatch.setattr(f, k, fn)
    return log


def test_new_blocks_of_one_write_go_out_together(tmp_path, monkeypatch):
    """Blocks appended by one write of a base image: the data of neighbouring blocks in one
    gather write, the file extended only when the data does not reach the last block's end,
    then the BAT entries in one write; no sync, no size query, zero 64 KiB pieces not written."""
    import random

    p = tmp_path / "append.vhdx"
    data = random.Random(5).randbytes(3 * MiB)
    with _create(p, 16 * MiB) as d:
        d.write(0, b"\x07" * 4096)                  # block 0: the header GUIDs are updated
        img = d.top
        end = img.file_len
        log = _logged_file(monkeypatch, img.f)
        d.write(MiB, data)                          # blocks 1, 2 and 3 in one write
        assert log == [("pwritev", end, 3 * MiB), ("pwrite", img.bat_offset + 8, 24)], log
        assert [img._block_offset(b) for b in (1, 2, 3)] == [end + k * MiB for k in range(3)]
        log.clear()
        tail = bytearray(2 * MiB)                   # block 4 all data, block 5 a 64 KiB piece
        tail[:MiB] = data[:MiB]
        tail[MiB + 128 * 1024:MiB + 192 * 1024] = b"\x0b" * (64 * 1024)
        d.write(4 * MiB, bytes(tail))
        e2 = end + 3 * MiB
        assert log == [("pwritev", e2, MiB), ("pwritev", e2 + MiB + 128 * 1024, 64 * 1024),
                       ("truncate", e2 + 2 * MiB, 0), ("pwrite", img.bat_offset + 32, 16)], log
        log.clear()
        d.write(8 * MiB, bytes(2 * MiB))            # zeroes: nothing allocated, nothing written
        assert log == [] and img._state(8) == img._state(9) == 0
    with Disk() as d:
        d.open(str(p), flags=OpenFlags.READ_ONLY)
        assert d.read(0, 4096) == b"\x07" * 4096
        assert d.read(MiB, 3 * MiB) == data
        assert d.read(4 * MiB, 2 * MiB) == bytes(tail)
        assert not d.top.check().problems


def test_sparse_writes_only_on_dynamic_base_images(tmp_path):
    with _create(tmp_path / "dyn.vhdx") as d:
        assert d.top.sparse_writes
        d.top.honor_zeroes = True
        assert not d.top.sparse_writes
        d.top.honor_zeroes = False
        d.create_diff(str(tmp_path / "child.avhdx"), config={"BlockSize": MiB})
        assert not d.top.sparse_writes
    with _create(tmp_path / "fixed.vhdx", flags=ImageFlags.FIXED) as d:
        assert not d.top.sparse_writes


def test_copy_into_vhdx_tests_zeroes_once(tmp_path, monkeypatch):
    """A copy hands its windows to a dynamic VHDX untested: the VHDX's own 64 KiB scan of new
    blocks is the only zero test; zero pieces stay holes, all-zero blocks unallocated."""
    import random

    from vdgui.vd import copy_image
    from vdgui.vd.formats.vhdx import image as vimage
    from vdgui.vd.ops import pipeline

    src = tmp_path / "src.raw"
    speck = b"\x5a" * (64 << 10)
    full = random.Random(9).randbytes(3 * MiB)
    with open(src, "wb") as fh:
        fh.truncate(12 * MiB)
        fh.seek(MiB + 5 * (64 << 10))
        fh.write(speck)                         # block 1: one 64 KiB piece
        fh.seek(4 * MiB)
        fh.write(full)                          # blocks 4-6: all data
    calls = []
    real = pipeline.zero_grain
    monkeypatch.setattr(pipeline, "zero_grain", lambda mv: (calls.append(len(mv)), real(mv))[1])
    real_is_zero = vimage.is_zero
    monkeypatch.setattr(vimage, "is_zero", lambda mv: (calls.append(-1), real_is_zero(mv))[1])
    dst = tmp_path / "dst.vhdx"
    copy_image(str(src), str(dst), "VHDX", src_format="RAW", dst_config={"BlockSize": MiB})
    assert calls == []
    with Disk() as d:
        d.open(str(dst), flags=OpenFlags.READ_ONLY)
        img = d.top
        assert [img._state(b) != 0 for b in range(12)] == [
            b in (1, 4, 5, 6) for b in range(12)]
        assert d.read(0, 12 * MiB) == src.read_bytes()
        assert not img.check().problems
        at = img._block_offset(1)
    fd = os.open(dst, os.O_RDONLY)
    try:                                        # block 1 stores its 64 KiB piece only
        first = os.lseek(fd, at, os.SEEK_DATA)
        assert first == at + 5 * (64 << 10)
        assert os.lseek(fd, first, os.SEEK_HOLE) == first + (64 << 10)
    finally:
        os.close(fd)


@pytest.mark.skipif(not kh.have_strace(), reason="strace is not installed")
def test_interrupted_appends_leave_readable_image(tmp_path, qemu):
    """Writes appending several new blocks each (data pieces, the file extended, then the
    BAT entries) killed at every syscall: the image opens, passes qemu-img check and reads
    the data of some prefix of the writes."""
    tpl = tmp_path / "tpl"
    tpl.mkdir()
    base = tpl / "ap.vhdx"
    with _create(base, 6 * MiB):
        pass
    two = bytearray(2 * MiB)
    two[64 * 1024:MiB + 4096] = b"\x04" * (MiB + 4096 - 64 * 1024)
    writes = [(MiB, b"\x02" * (2 * MiB)), (3 * MiB + 512, bytes(two[:2 * MiB - 512])),
              (0, b"\x05" * 4096)]
    new = bytearray(6 * MiB)
    states = [bytes(new)]
    for off, data in writes:
        new[off:off + len(data)] = data
        states.append(bytes(new))

    def fn_for(work):
        def fn():
            try:
                with Disk() as d:
                    d.open(str(work / base.name))
                    for off, data in writes:
                        d.write(off, data)
            except (VDError, OSError):
                return 1
            return 0
        return fn

    def judge(work, finished):
        with Disk() as d:
            d.open(str(work / base.name), flags=OpenFlags.READ_ONLY)
            got = read_all(d)
        for pos in range(0, 6 * MiB, 512):
            assert any(got[pos:pos + 512] == s[pos:pos + 512] for s in states), pos
        assert qemu.check(work / base.name, "vhdx").returncode == 0
        if finished:
            assert got == bytes(new)
    kh.every_point(tmp_path, tpl, fn_for, judge, min_writes=3)
