"""Hostile inputs built in the test (issue #12 items 21, 22, 25): decompression bombs, sizes
that are declared but not present, repetition that multiplies work, corruption check must see.
Every case asserts the engine's own error (a VDError subclass with a clear message) or a bounded
cost, never a traceback, a hang or a huge allocation."""
from __future__ import annotations

import os
import struct

import pytest

from tests.formats.test_vhdx import _dirty, _log_entry
from vdgui.vd import CorruptImage, Disk, VDError

MiB = 1 << 20
GiB = 1 << 30


def _disk_bytes(p) -> int:
    return os.stat(p).st_blocks * 512


# -- VHDX log replay: zero descriptors as long as the attacker's LastFileOffset -----------------

def test_vhdx_log_zero_descriptor_writes_no_zeroes_past_the_data(tmp_path):
    """A 1 GiB zero descriptor over the data block and past the end of a ~5 MiB file: replay
    zeroes the data it covers and extends the file as a hole; it used to write 1 GiB of
    zeroes (and as many as LastFileOffset allows: a 4 MiB image filled the disk)."""
    def entries(guid, bat_off, data_off, flen):
        return _log_entry(5, guid, 0, [("zero", data_off, GiB)], data_off + GiB)
    p = _dirty(tmp_path, entries)
    before = _disk_bytes(p)
    with Disk() as d:
        d.open(str(p))                           # read-write open replays the log
        assert d.read(0, MiB) == bytes(MiB)      # the zeroed data block
    assert _disk_bytes(p) < before + 16 * MiB
    assert os.path.getsize(p) >= GiB


def test_vhdx_log_last_file_offset_past_the_format_limit(tmp_path):
    def entries(guid, bat_off, data_off, flen):
        return _log_entry(5, guid, 0, [("zero", data_off, 4096)], 1 << 62)
    p = _dirty(tmp_path, entries)
    size = os.path.getsize(p)
    with pytest.raises(CorruptImage, match="LastFileOffset"):
        Disk().open(str(p))
    assert os.path.getsize(p) == size


def test_vhdx_log_bomb_through_check_repair(tmp_path):
    from vdgui.vd import check

    def entries(guid, bat_off, data_off, flen):
        return _log_entry(5, guid, 0, [("zero", data_off + MiB, GiB)], data_off + MiB + GiB)
    p = _dirty(tmp_path, entries)
    before = _disk_bytes(p)
    rep = check(str(p), repair=True)
    assert not rep.corrupt
    assert _disk_bytes(p) < before + 16 * MiB


# -- DMG: LZFSE bombs, the chunk cache, virtual size, chunks sharing data -----------------------

import plistlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
import zlib  # noqa: E402

from tests.formats.test_dmg import make_dmg  # noqa: E402
from vdgui.vd.formats import dmg  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _limited(code: str, limit: int, timeout: int = 120) -> str:
    """Run ``code`` in a child Python whose address space is capped at ``limit`` bytes; return
    its stdout (the child prints what happened)."""
    pre = ("import resource\n"
           f"resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))\n")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", pre + textwrap.dedent(code)], capture_output=True,
                       text=True, timeout=timeout, env=env, cwd=ROOT)
    return r.stdout + r.stderr


_OPEN_READ = """
    from vdgui.vd import Disk, OpenFlags, VDError
    try:
        with Disk() as d:
            d.open({path!r}, "DMG", flags=OpenFlags.READ_ONLY)
            pos = 0
            while pos < d.size:
                d.read(pos, min(1 << 20, d.size - pos))
                pos += 1 << 20
        print("OK")
    except VDError as exc:
        print("VDERROR", type(exc).__name__, exc)
"""


def _lzfse_bomb(n_blocks: int) -> bytes:
    lzfse = pytest.importorskip("lzfse")
    one = lzfse.compress(bytes(1 << 20))          # 1 MiB of zeroes in under 1 KiB
    assert one.endswith(b"bvx$")
    return one[:-4] * n_blocks + b"bvx$"


def test_dmg_lzfse_bomb_is_refused_within_memory(tmp_path):
    """A 2-sector chunk whose 6 MB LZFSE stream decodes to 8 GiB: refused from its block
    headers, inside a 1.5 GiB address space (lzfse.decompress grew to the whole 8 GiB)."""
    p = tmp_path / "bomb.dmg"
    p.write_bytes(make_dmg([(dmg.CHUNK_LZFSE, 2, _lzfse_bomb(8192))]))
    out = _limited(_OPEN_READ.format(path=str(p)), 1536 << 20)
    assert "VDERROR CorruptImage" in out and "lzfse" in out, out


def test_dmg_lzfse_still_reads(tmp_path):
    lzfse = pytest.importorskip("lzfse")
    payload = bytes(range(256)) * 64 + bytes(8192)
    p = tmp_path / "ok.dmg"
    p.write_bytes(make_dmg([(dmg.CHUNK_LZFSE, len(payload) // 512, lzfse.compress(payload)),
                            (dmg.CHUNK_RAW, 2, b"\x07" * 1024)]))
    with Disk() as d:
        d.open(str(p), "DMG", flags=dmg.OpenFlags.READ_ONLY)
        assert d.read(0, len(payload) + 1024) == payload + b"\x07" * 1024


def test_dmg_chunk_cache_is_one_budget_for_all_opens(tmp_path, monkeypatch):
    """Eight 1 MiB chunks read through four opens of one file, with the budget set to 3 MiB:
    the cache kept 8 chunks per open (2 GiB for 64 MiB chunks and 4 opens: convert opens an
    image several times); now one budget for the process, and nothing left after close."""
    import tracemalloc
    monkeypatch.setattr(dmg.image, "_CACHE", dmg._ChunkCache(3 * MiB))
    p = tmp_path / "many.dmg"
    p.write_bytes(make_dmg([(dmg.CHUNK_ZLIB, 2048, zlib.compress(bytes([i]) * MiB))
                            for i in range(8)]))
    disks = []
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for _ in range(4):
            d = Disk()
            d.open(str(p), "DMG", flags=dmg.OpenFlags.READ_ONLY)
            disks.append(d)
        for d in disks:
            for c in range(8):
                assert d.read(c * MiB + 100, 10) == bytes([c]) * 10
        held = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
        for d in disks:
            d.close()
    assert held < 6 * MiB, held
    assert dmg._CACHE.bytes == 0


def test_dmg_virtual_size_is_bounded(tmp_path):
    p = tmp_path / "huge.dmg"
    p.write_bytes(make_dmg([(dmg.CHUNK_RAW, 2, bytes(1024))], sector_count=(1 << 64) - 1))
    with pytest.raises(CorruptImage, match="sector_count|virtual size"):
        Disk().open(str(p), "DMG", flags=dmg.OpenFlags.READ_ONLY)


def _dmg_with_entries(data: bytes, entries) -> bytes:
    """A UDIF image whose one block table lists ``entries`` (type, sector, count, off, len)."""
    total = max((s + c for _t, s, c, _o, _l in entries), default=0)
    ents = list(entries) + [(dmg.CHUNK_END, total, 0, len(data), 0)]
    mish = dmg.MishHeader.build(dict(version=1, first_sector=0, sector_count=total, data_offset=0,
                                     buffers_needed=0, block_descriptors=0, reserved=bytes(24),
                                     checksum_type=0, checksum_size=0, checksum=bytes(128),
                                     chunk_count=len(ents)))
    mish += b"".join(struct.pack(">IIQQQQ", t, 0, s, c, o, ln) for t, s, c, o, ln in ents)
    xml = plistlib.dumps({"resource-fork": {"blkx": [{"Data": mish, "Name": "d", "ID": "0"}]}})
    koly = dmg.KolyTrailer.build(dict(
        version=4, header_size=512, flags=1, running_data_fork_offset=0, data_fork_offset=0,
        data_fork_length=len(data), rsrc_fork_offset=0, rsrc_fork_length=0, segment_number=1,
        segment_count=1, segment_id=bytes(16), data_checksum_type=0, data_checksum_size=0,
        data_checksum=bytes(128), xml_offset=len(data), xml_length=len(xml),
        reserved1=bytes(120), checksum_type=0, checksum_size=0, checksum=bytes(128),
        image_variant=1, sector_count=total, reserved2=bytes(12)))
    return data + xml + koly


def test_dmg_chunks_sharing_compressed_data_are_refused(tmp_path):
    """20,000 chunks naming one compressed chunk: reading them read and inflated it 20,000
    times (past 20 s). Refused at open, naming the overlap."""
    z = zlib.compress(os.urandom(512 * 2048) , 1)      # 1 MiB that does not compress
    ents = [(dmg.CHUNK_ZLIB, i * 2048, 2048, 0, len(z)) for i in range(20000)]
    p = tmp_path / "alias.dmg"
    p.write_bytes(_dmg_with_entries(z, ents))
    with pytest.raises(CorruptImage, match="share compressed data"):
        Disk().open(str(p), "DMG", flags=dmg.OpenFlags.READ_ONLY)


# -- item 25: check sees what qemu-img check sees (and what reading refuses) --------------------

def _qcow2_l2_of_first_cluster(path) -> int:
    from vdgui.vd import OpenFlags, get_backend
    img = get_backend("QCOW2").open(str(path), OpenFlags.READ_ONLY, None)
    try:
        return img.l1[0] & ((1 << 56) - 512)
    finally:
        img.close()


def test_qcow2_subcluster_allocated_and_zero(tmp_path, qemu):
    from vdgui.vd import ProblemCode, check
    p = tmp_path / "x.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=64k", p, "1M")
    qemu.io("-f", "qcow2", "-c", "write -P 0x11 0 64k", p)
    l2 = _qcow2_l2_of_first_cluster(p)
    with open(p, "r+b") as f:
        f.seek(l2 + 8)
        bm = struct.unpack(">Q", f.read(8))[0]
        f.seek(l2 + 8)
        f.write(struct.pack(">Q", bm | 1 << 32))       # subcluster 0: allocated and zero
    assert qemu.check(p, "qcow2").returncode == 2       # qemu sees it
    with pytest.raises(CorruptImage, match="both allocated and zero"):
        with Disk.open_chain(str(p)) as d:
            d.read(0, 4096)
    rep = check(str(p))
    assert rep.exit_code == 2
    assert [pr.code for pr in rep.problems] == [ProblemCode.SUBCLUSTER]
    rep = check(str(p), repair=True)
    assert rep.repaired and not rep.corrupt
    assert check(str(p)).exit_code == 0
    assert qemu.check(p, "qcow2").returncode == 0
    with Disk.open_chain(str(p)) as d:                  # the data was kept
        assert d.read(0, 65536) == b"\x11" * 65536


@pytest.mark.parametrize("cut", [1, 4096])
def test_qed_truncated_inside_a_data_cluster(tmp_path, qemu, cut):
    from vdgui.vd import ProblemCode, check
    p = tmp_path / "t.qed"
    qemu.img("create", "-q", "-f", "qed", p, "4M")
    qemu.io("-f", "qed", "-c", "write -P 0x22 0 1M", "-c", "write -P 0x33 2M 1M", p)
    size = os.path.getsize(p)
    os.truncate(p, size - cut)
    if cut >= 4096:
        assert qemu.check(p, "qed").returncode == 2     # qemu sees it
    with pytest.raises(CorruptImage, match="past the end"), Disk.open_chain(str(p)) as d:
        d.read(0, 4 * MiB)
    rep = check(str(p))
    assert rep.exit_code == 2
    assert ProblemCode.ENTRY_PAST_END in [pr.code for pr in rep.problems]
    rep = check(str(p), repair=True)
    assert rep.repaired and check(str(p)).exit_code == 0
    assert qemu.check(p, "qed").returncode == 0
    with Disk.open_chain(str(p)) as d:                  # the bytes present were kept
        data = d.read(0, 4 * MiB)
    assert data[:MiB] == b"\x22" * MiB
    assert data[2 * MiB:3 * MiB - 65536] == b"\x33" * (MiB - 65536)
    last = data[3 * MiB - 65536:3 * MiB]
    assert last == b"\x33" * (65536 - cut) + bytes(cut)


# -- VMDK: extent lines aliasing one file ---------------------------------------------------------

_VMDK_HEAD = ('# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n'
              'createType="monolithicFlat"\n\n# Extent description\n')
_VMDK_DDB = '\n# The Disk Data Base\n#DDB\nddb.adapterType = "ide"\n'


def _flat_vmdk(tmp_path, lines, name="a.vmdk") -> str:
    (tmp_path / "f-flat.vmdk").write_bytes(bytes(4 * MiB))
    p = tmp_path / name
    p.write_text(_VMDK_HEAD + "".join(lines) + _VMDK_DDB)
    return str(p)


@pytest.mark.parametrize("lines", [
    ['RW 2048 FLAT "f-flat.vmdk" 0\n', 'RW 2048 FLAT "f-flat.vmdk" 0\n'],        # the same bytes
    ['RW 4096 FLAT "f-flat.vmdk" 0\n', 'RW 2048 FLAT "f-flat.vmdk" 2048\n'],     # overlapping
    ['RW 2048 FLAT "f-flat.vmdk" 0\n', 'RW 2048 FLAT "hard.vmdk" 1024\n'],       # a hard link
], ids=["same", "overlap", "hardlink"])
def test_vmdk_flat_extents_aliasing_one_file(tmp_path, lines):
    """Two extent lines over the same bytes of one file: a write through one changed the
    other, and check said nothing. Refused at open; check reports it."""
    from vdgui.vd import check
    p = _flat_vmdk(tmp_path, lines)
    os.link(tmp_path / "f-flat.vmdk", tmp_path / "hard.vmdk")
    from vdgui.vd import OpenFlags
    with pytest.raises(CorruptImage, match="overlaps extent"):
        Disk.open_chain(p, None, OpenFlags.READ_ONLY)
    with pytest.raises(VDError):               # for writing: refused too (or found in use)
        with Disk.open_chain(p) as d:
            d.write(0, b"\x42" * 512)
    assert (tmp_path / "f-flat.vmdk").read_bytes()[:512] == bytes(512)
    rep = check(p)
    assert rep.exit_code == 2 and "overlaps extent" in rep.problems[0].what


def test_vmdk_flat_extents_over_disjoint_parts_are_fine(tmp_path):
    p = _flat_vmdk(tmp_path, ['RW 2048 FLAT "f-flat.vmdk" 0\n',
                              'RW 2048 FLAT "f-flat.vmdk" 2048\n'])
    with Disk.open_chain(p) as d:
        d.write(MiB, b"\x42" * 512)
        assert d.read(0, 512) == bytes(512) and d.read(MiB, 512) == b"\x42" * 512


def test_vmdk_one_extent_repeated_5000_times(tmp_path):
    """A descriptor naming one flat file 5,000 times (each a 64 MiB view of it): reading the
    disk read the file 5,000 times over (~312 GiB). Refused at open, after two lines."""
    import time

    p = _flat_vmdk(tmp_path, ['RW 8192 FLAT "f-flat.vmdk" 0\n'] * 5000)
    t = time.monotonic()
    with pytest.raises(CorruptImage, match="overlaps extent"):
        Disk.open_chain(p)
    assert time.monotonic() - t < 30  # a generous guard, not a benchmark


# -- item 22: compact walks the tables present, not the virtual size -----------------------------


@pytest.mark.parametrize("fmt", ["qcow2", "qed"])
def test_compact_of_an_almost_empty_1tib_image_follows_the_tables(tmp_path, qemu, monkeypatch, fmt):
    """compact of a 1 TiB image holding 2 MiB asked the entry of every cluster (16 M calls,
    39 s for QCOW2, 20 s for QED); now only clusters under the L2 tables present."""
    from vdgui.vd import compact
    from vdgui.vd.formats import qcow2, qed

    cls = {"qcow2": qcow2.Qcow2Image, "qed": qed.QedImage}[fmt]
    p = tmp_path / f"c.{fmt}"
    qemu.img("create", "-q", "-f", fmt, p, "1T")
    qemu.io("-f", fmt, "-c", "write -P 0x11 100M 1M", "-c", "write -P 0 300M 1M", p)
    ref = tmp_path / f"ref.{fmt}"
    ref.write_bytes(p.read_bytes())
    calls = [0]
    real = cls._entry

    def counting(self, *a, **k):
        calls[0] += 1
        return real(self, *a, **k)

    monkeypatch.setattr(cls, "_entry", counting)
    compact(str(p))
    assert calls[0] <= 100_000, calls[0]
    assert qemu.compare(p, ref, fmt, fmt).returncode == 0
    assert qemu.check(p, fmt).returncode == 0


def test_vhdx_log_data_descriptor_past_last_file_offset(tmp_path):
    """A data descriptor far past the file's declared end made a sparse file of that size."""

    def entries(guid, bat_off, data_off, flen):
        return _log_entry(5, guid, 0, [("data", 1 << 44, b"\x07" * 4096)], flen)

    p = _dirty(tmp_path, entries)
    size = os.path.getsize(p)
    with pytest.raises(CorruptImage, match="data descriptor"):
        Disk().open(str(p))
    assert os.path.getsize(p) == size
