"""Cache images (VCI) in front of a disk: issue #19 part 2 (VDCacheOpen / VDCacheClose)."""
from __future__ import annotations

import os
import random
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vdgui.vd import CorruptImage, Disk, InvalidArgument, Refused, VDError
from vdgui.vd.formats import vci
from vdgui.vd.formats import vci_layout as L

MiB = 1 << 20


def _raw(tmp_path, size=8 * MiB, seed=1):
    rnd = random.Random(seed)
    data = rnd.randbytes(size)
    p = tmp_path / "disk.raw"
    p.write_bytes(data)
    return str(p), data


class CountingReads:
    """Counts the reads that reach the chain (the cache's misses)."""

    def __init__(self, disk):
        self.n = 0
        self.bytes = 0
        orig = disk._read_level

        def counted(level, offset, length, buf, fill=False):
            self.n += 1
            self.bytes += length
            return orig(level, offset, length, buf, fill)
        disk._read_level = counted


def test_struct_round_trips():
    hdr = L.VciHeader.build(dict(signature=L.SIGNATURE, version=1, blocks_cache=8192, unclean=1,
                                 cache_type=1, tree_root=8, blkmap=2, blkmap_blocks=3,
                                 uuid_image=bytes(range(16)), uuid_modification=bytes(16)))
    assert len(hdr) == L.HEADER_SIZE
    assert L.VciHeader.build(L.VciHeader.parse(hdr)) == hdr
    for st, size in ((L.VciBlockMap, 512), (L.VciExtent, 38), (L.VciInternal, 20)):
        raw = bytes(range(size)) if st is not L.VciBlockMap else (
            struct.pack("<II", L.BLKMAP_MAGIC, 1) + bytes(range(32)) + bytes(472))
        assert st.build(st.parse(raw)) == raw
    assert L.EXTENTS_PER_NODE == 107 and L.INTERNALS_PER_NODE == 204


def test_fill_then_hit_returns_the_disk_bytes(tmp_path):
    path, data = _raw(tmp_path)
    c = str(tmp_path / "c.vci")
    with Disk() as d:
        d.open(path)
        d.cache_open(c, size=16 * MiB)
        reads = CountingReads(d)
        assert d.read(12345, 3 * MiB) == data[12345:12345 + 3 * MiB]   # fill
        first = reads.n
        assert first >= 1
        assert d.read(12345, 3 * MiB) == data[12345:12345 + 3 * MiB]   # hit
        assert d.read(100000, 5000) == data[100000:105000]
        assert reads.n == first                    # nothing more read from the disk
        info = d.cache_info()
        assert info["hits"] > 0 and info["cached_bytes"] >= 3 * MiB
    # kept across a close: a new session reads it from the cache file alone
    os.truncate(path, 0)
    with open(path, "r+b") as f:
        f.truncate(8 * MiB)                        # the disk now reads zeroes
    with Disk() as d:
        d.open(path)
        d.cache_open(c)
        assert d.read(65536, MiB) == data[65536:65536 + MiB]       # served by the cache
        buf = bytearray(2 * MiB)
        d.read_into(0, buf)
        assert bytes(buf[65536:MiB]) == data[65536:MiB]


def test_writes_go_through_and_update_the_cache(tmp_path):
    path, data = _raw(tmp_path)
    c = str(tmp_path / "c.vci")
    with Disk() as d:
        d.open(path)
        d.cache_open(c, size=16 * MiB)
        d.read(0, 2 * MiB)
        d.write(70000, b"\xAB" * 1000)             # inside a cached chunk
        d.write(3 * MiB, b"\xCD" * 512)            # outside
        new = bytearray(data)
        new[70000:71000] = b"\xAB" * 1000
        new[3 * MiB:3 * MiB + 512] = b"\xCD" * 512
        assert d.read(0, 4 * MiB) == bytes(new[:4 * MiB])
    assert Path(path).read_bytes() == bytes(new)           # the image has the write
    with Disk() as d:
        d.open(path)
        d.cache_open(c)
        assert d.read(0, 4 * MiB) == bytes(new[:4 * MiB])


def test_a_failed_write_drops_the_cached_copy(tmp_path):
    path, _data = _raw(tmp_path)
    with Disk() as d:
        d.open(path)
        d.cache_open(str(tmp_path / "c.vci"), size=16 * MiB)
        d.read(0, MiB)
        assert d.cache.cache.find(0) is not None

        def broken(*a, **k):
            raise OSError("disk gone")
        d.top.write = broken
        with pytest.raises(OSError):
            d.write(0, b"x" * 512)
        assert d.cache.cache.find(0) is None        # the image's bytes there are unknown


def test_discard_invalidates(tmp_path):
    with Disk() as d:
        d.create_base(str(tmp_path / "a.vdi"), 8 * MiB, "VDI")
        d.write(0, b"\x11" * MiB)
        d.cache_open(str(tmp_path / "c.vci"), size=16 * MiB)
        assert d.read(0, 4096) == b"\x11" * 4096
        d.discard(0, MiB)
        assert d.read(0, MiB) == bytes(MiB)


def test_lru_eviction_keeps_the_cache_within_its_size(tmp_path):
    path, data = _raw(tmp_path, size=16 * MiB)
    c = str(tmp_path / "c.vci")
    with Disk() as d:
        d.open(path)
        d.cache_open(c, size=4 * MiB)
        for _ in range(2):
            assert d.read(0, 16 * MiB) == data
        assert d.read(15 * MiB, MiB) == data[15 * MiB:]
    assert os.path.getsize(c) <= 4 * MiB


def test_cache_belongs_to_one_disk(tmp_path):
    path, _data = _raw(tmp_path)
    other = tmp_path / "other.raw"
    other.write_bytes(bytes(8 * MiB))
    c = str(tmp_path / "c.vci")
    with Disk() as d:
        d.open(path)
        d.cache_open(c, size=8 * MiB)
        d.read(0, MiB)
    with Disk() as d:
        d.open(str(other))
        with pytest.raises(Refused, match="belongs to another disk"):
            d.cache_open(c)
        assert d.cache is None
        assert d.read(0, 4096) == bytes(4096)


def test_crash_leaves_a_cache_refused_with_a_clear_error_then_reset(tmp_path):
    """A process killed with the cache attached: the next open refuses it (its map may miss
    writes made since), reset empties it and it works again."""
    path, data = _raw(tmp_path)
    c = str(tmp_path / "c.vci")
    code = textwrap.dedent(f"""
        import os
        from vdgui.vd import Disk
        d = Disk(); d.open({path!r}); d.cache_open({c!r}, size={16 * MiB})
        d.read(0, 2 * {MiB}); d.write(0, b"z" * 512)
        os._exit(9)
    """)
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ}, timeout=60)
    assert r.returncode == 9
    with Disk() as d:
        d.open(path)
        with pytest.raises(Refused, match="not closed cleanly"):
            d.cache_open(c)
        d.cache_open(c, reset=True)
        assert d.cache_info()["cached_bytes"] == 0
        assert d.read(0, 2 * MiB) == b"z" * 512 + data[512:2 * MiB]
    with Disk() as d:                                # closed cleanly this time
        d.open(path)
        d.cache_open(c)
        assert d.read(0, 2 * MiB) == b"z" * 512 + data[512:2 * MiB]


def test_cancelled_read_leaves_a_valid_cache(tmp_path):
    path, data = _raw(tmp_path)
    c = str(tmp_path / "c.vci")
    with Disk() as d:
        d.open(path)
        d.cache_open(c, size=16 * MiB)
        calls = []
        orig = d._read_level

        def failing(*a, **k):
            calls.append(1)
            if len(calls) == 3:
                raise KeyboardInterrupt       # a cancel in the middle of a fill
            return orig(*a, **k)
        d._read_level = failing
        for i in range(4):
            try:
                d.read(i * MiB, MiB)
            except KeyboardInterrupt:
                pass
    with Disk() as d:
        d.open(path)
        d.cache_open(c)
        assert d.read(0, 4 * MiB) == data[:4 * MiB]


def test_create_refuses_bad_sizes_and_existing_files(tmp_path):
    with pytest.raises(InvalidArgument, match="cache size"):
        vci.VciCache.create(str(tmp_path / "a.vci"), 3 * MiB)
    with pytest.raises(InvalidArgument, match="cache size"):
        vci.VciCache.create(str(tmp_path / "a.vci"), 5 * MiB)
    assert not os.path.exists(tmp_path / "a.vci")
    vci.VciCache.create(str(tmp_path / "a.vci"), 4 * MiB).close()
    with pytest.raises(VDError, match="exists"):
        vci.VciCache.create(str(tmp_path / "a.vci"), 4 * MiB)


def _fresh(tmp_path, fill=True):
    path, _data = _raw(tmp_path)
    c = str(tmp_path / "c.vci")
    with Disk() as d:
        d.open(path)
        d.cache_open(c, size=8 * MiB)
        if fill:
            d.read(0, 2 * MiB)
    return path, c


def _patch(c, offset, data):
    with open(c, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _hdr(c):
    return L.VciHeader.parse(Path(c).read_bytes()[:L.HEADER_SIZE])


@pytest.mark.parametrize("what,patch,match", [
    ("signature", (0, b"QFI\xfb"), "not a VCI"),
    ("version", (4, struct.pack("<I", 7)), "unsupported VCI version"),
    ("cache size", (8, struct.pack("<Q", 1 << 60)), "cache size out of range"),
    ("cache type", (17, struct.pack("<I", 9)), "unknown cache type"),
    ("tree root", (21, struct.pack("<Q", 1 << 40)), "tree node lies outside"),
    ("block map", (29, struct.pack("<Q", 1 << 50)), "block map lies outside"),
    ("block map size", (37, struct.pack("<I", 0xFFFFFFFF)), "block map size"),
])
def test_hostile_headers_are_refused(tmp_path, what, patch, match):
    path, c = _fresh(tmp_path)
    _patch(c, *patch)
    with Disk() as d:
        d.open(path)
        with pytest.raises(CorruptImage, match=match):
            d.cache_open(c)
        assert d.cache is None


def test_short_file_is_refused(tmp_path):
    c = tmp_path / "c.vci"
    c.write_bytes(b"VCI\0" + bytes(100))
    with pytest.raises(CorruptImage, match="past the end"):
        vci.VciCache.open(str(c))


def test_hostile_tree_loop_and_overlapping_extents(tmp_path):
    _path, c = _fresh(tmp_path)
    root = _hdr(c).tree_root
    # an internal root pointing at itself
    node = bytes([L.NODE_INTERNAL]) + L.VciInternal.build(dict(disk_block=0, blocks=8, child=root))
    _patch(c, root * 512, node.ljust(L.NODE_SIZE, b"\0"))
    with pytest.raises(CorruptImage, match="loops"):
        vci.VciCache.open(c)
    # a leaf whose extents overlap on the disk
    (tmp_path / "x").mkdir()
    _path, c = _fresh(tmp_path / "x")
    root = _hdr(c).tree_root
    e = L.VciExtent.build(dict(lru_prev=0, lru_next=0, flags=0, reserved=0, disk_block=0,
                               blocks=128, file_block=16))
    e2 = L.VciExtent.build(dict(lru_prev=0, lru_next=0, flags=0, reserved=0, disk_block=64,
                                blocks=128, file_block=144))
    _patch(c, root * 512, (bytes([L.NODE_LEAF]) + e + e2).ljust(L.NODE_SIZE, b"\0"))
    with pytest.raises(CorruptImage, match="overlap"):
        vci.VciCache.open(c)


def test_extent_pointing_at_metadata_or_free_space_is_refused(tmp_path):
    _path, c = _fresh(tmp_path)
    root = _hdr(c).tree_root
    for file_block in (2, root, 16000):
        e = L.VciExtent.build(dict(lru_prev=0, lru_next=0, flags=0, reserved=0, disk_block=0,
                                   blocks=128, file_block=file_block))
        _patch(c, root * 512, (bytes([L.NODE_LEAF]) + e).ljust(L.NODE_SIZE, b"\0"))
        with pytest.raises(CorruptImage, match="outside the used data area"):
            vci.VciCache.open(c)


def test_many_extents_make_a_two_level_tree(tmp_path):
    """More extents than one leaf holds (107): internal nodes, read back the same."""
    path, data = _raw(tmp_path, size=16 * MiB)
    c = str(tmp_path / "c.vci")
    with Disk() as d:
        d.open(path)
        d.cache_open(c, size=32 * MiB)
        for off in range(0, 16 * MiB, 128 * 1024):     # 128 separate extents
            d.read(off, 4096)
        n = d.cache_info()["extents"]
    assert n == 128
    root = _hdr(c).tree_root
    assert Path(c).read_bytes()[root * 512] == L.NODE_INTERNAL
    with Disk() as d:
        d.open(path)
        d.cache_open(c)
        assert d.cache_info()["extents"] == 128
        reads = CountingReads(d)
        for off in range(0, 16 * MiB, 128 * 1024):
            assert d.read(off, 4096) == data[off:off + 4096]
        assert reads.n == 0


def test_cli_cache_image_on_read_write_and_info(tmp_path):
    from tests.conftest import run_cli
    path, data = _raw(tmp_path)
    c = tmp_path / "c.vci"
    out = tmp_path / "out"
    run_cli("read", path, "--offset", "0", "--length", "1M", "--output", out,
            "--cache-image", c, "--cache-size", "8M")
    assert out.read_bytes() == data[:MiB]
    (tmp_path / "in").write_bytes(b"\x42" * 4096)
    run_cli("write", path, "--offset", "4096", "--input", tmp_path / "in", "--cache-image", c)
    import json
    info = json.loads(run_cli("info", "--json", path, "--cache-image", c).stdout)
    assert info["cache"]["format"] == "VCI"
    assert info["cache"]["cached_bytes"] == MiB and info["cache"]["size"] == 8 * MiB
    run_cli("read", path, "--offset", "0", "--length", "1M", "--output", out, "--cache-image", c)
    assert out.read_bytes() == data[:4096] + b"\x42" * 4096 + data[8192:MiB]
    other = tmp_path / "other.raw"
    other.write_bytes(bytes(MiB))
    r = run_cli("info", other, "--cache-image", c, check=False)
    assert r.returncode == 1 and "belongs to another disk" in r.stderr
    assert "Traceback" not in r.stderr


def test_one_cache_file_serves_one_open_disk(tmp_path):
    from vdgui.vd import ImageInUse, OpenFlags
    path, data = _raw(tmp_path)
    c = str(tmp_path / "c.vci")
    with Disk() as a, Disk() as b:
        a.open(path)
        b.open(path, flags=OpenFlags.READ_ONLY)
        a.cache_open(c, size=8 * MiB)
        with pytest.raises(ImageInUse, match="in use by another open disk"):
            b.cache_open(c)
        a.cache_close()
        b.cache_open(c)
        assert b.read(0, 4096) == data[:4096]


def test_library_cache_attached_on_open_and_an_unclean_one_emptied(tmp_path):
    from vdgui.vd import Library, OpenFlags
    path, data = _raw(tmp_path)
    c = str(tmp_path / "c.vci")
    lib = Library(":memory:")
    try:
        lib.set_cache(path, c, 8 * MiB)
        with Disk.open_chain(path, flags=OpenFlags.READ_ONLY, library=lib) as d:
            assert d.cache is not None and os.path.exists(c)
            d.read(0, MiB)
        _patch(c, L.OFF_UNCLEAN, b"\x01")               # as after a crash
        with Disk.open_chain(path, flags=OpenFlags.READ_ONLY, library=lib) as d:
            assert d.cache_info()["cached_bytes"] == 0
            assert d.read(0, MiB) == data[:MiB]
        with Disk.open_chain(path, flags=OpenFlags.READ_ONLY, library=lib) as d, \
                Disk.open_chain(path, flags=OpenFlags.READ_ONLY, library=lib) as d2:
            assert d.cache is not None and d2.cache is None   # held by the first: skipped
            assert d2.read(0, 4096) == data[:4096]
        lib.set_cache(path, None)
        with Disk.open_chain(path, flags=OpenFlags.READ_ONLY, library=lib) as d:
            assert d.cache is None
    finally:
        lib.close()


def test_library_adds_up_the_hits_and_misses_of_its_opens(tmp_path):
    """The counts of every open through the library since the cache was attached (the details
    pane shows them); attaching again starts from zero; an explicit cache_open is not counted."""
    from vdgui.vd import Library, OpenFlags
    path, data = _raw(tmp_path)
    c = str(tmp_path / "c.vci")
    lib = Library(":memory:")
    try:
        lib.set_cache(path, c, 8 * MiB)
        assert lib.cache_counts(c) == (0, 0)
        with Disk.open_chain(path, flags=OpenFlags.READ_ONLY, library=lib) as d:
            assert d.read(0, 2 * MiB) == data[:2 * MiB]       # misses
            assert d.read(0, MiB) == data[:MiB]               # a hit
            first = d.cache_info()
        assert first["hits"] >= 1 and first["misses"] >= 1
        assert lib.cache_counts(c) == (first["hits"], first["misses"])
        with Disk.open_chain(path, flags=OpenFlags.READ_ONLY, library=lib) as d:
            d.read(0, 2 * MiB)
            second = d.cache_info()
        assert second["hits"] >= 1
        assert lib.cache_counts(c) == (first["hits"] + second["hits"],
                                       first["misses"] + second["misses"])
        with Disk.open_chain(path, flags=OpenFlags.READ_ONLY) as d:   # not through the library
            d.cache_open(c)
            d.read(0, MiB)
        assert lib.cache_counts(c) == (first["hits"] + second["hits"],
                                       first["misses"] + second["misses"])
        lib.set_cache(path, c, 8 * MiB)                     # attached again: from zero
        assert lib.cache_counts(c) == (0, 0)
    finally:
        lib.close()
