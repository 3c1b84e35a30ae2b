"""The shared layer of block-mapped formats (issue #14 item 1): rounding, run lists, block
tables, vectored I/O, the compaction planner and mover, FileImage."""
from array import array

import pytest

from vdgui.vd.align import align_down, align_up, ceil_div
from vdgui.vd.compaction import (
    Move,
    holes_between,
    move_blocks,
    overlapping,
    plan_moves,
    slot_holes,
)
from vdgui.vd.errors import CorruptImage, VDIOError
from vdgui.vd.fileimage import FileImage
from vdgui.vd.fileio import ImageFile
from vdgui.vd.runs import RunList, merge_runs
from vdgui.vd.tables import BlockTable, arithmetic_run, first_nonzero, read_table


@pytest.fixture
def f(tmp_path):
    p = tmp_path / "t.img"
    p.write_bytes(bytes(1 << 16))
    with ImageFile(str(p), writable=True, lock=False) as fh:
        yield fh


def test_rounding():
    assert [ceil_div(a, 512) for a in (0, 1, 512, 513)] == [0, 1, 1, 2]
    assert [align_up(a, 4096) for a in (0, 1, 4096, 4097)] == [0, 4096, 4096, 8192]
    assert align_down(4097, 4096) == 4096


def test_run_list_merges_touching_runs_of_one_state():
    r = RunList()
    r.add(0, 10, "a")
    r.add(10, 5, "a")
    r.add(15, 0, "b")           # empty: dropped
    r.add(15, 5, "b")
    r.add(30, 5, "b")           # not touching: a new run
    assert r.runs == [(0, 15, "a"), (15, 5, "b"), (30, 5, "b")]
    assert merge_runs([(0, 1, 1), (1, 1, 1), (2, 1, 2)]) == [(0, 2, 1), (2, 1, 2)]


@pytest.mark.parametrize("big", [False, True])
def test_block_table_byte_order_and_write_back(f, big):
    t = BlockTable(f, 1024, array("I", range(100)), big_endian=big)
    t.write_range(0, 100)
    order = "big" if big else "little"
    raw = f.pread(1024, 400)
    assert [int.from_bytes(raw[i:i + 4], order) for i in range(0, 400, 4)] == list(range(100))
    assert list(read_table(f, 1024, 100, "I", big)) == list(range(100))
    t[3] = 0xDEADBEEF
    t[90] = 7
    f.pwrite(1024 + 50 * 4, b"\xee" * 4)    # not a changed entry: must stay as it is on disk
    t.write_back()
    assert t.changed == set()
    raw = f.pread(1024, 400)
    assert int.from_bytes(raw[12:16], order) == 0xDEADBEEF
    assert int.from_bytes(raw[360:364], order) == 7
    assert raw[200:204] == b"\xee" * 4


def test_block_table_coalesces_neighbouring_entries(f, monkeypatch):
    t = BlockTable(f, 0, array("Q", [0]) * 1000)
    writes = []
    real = f.pwrite
    monkeypatch.setattr(f, "pwrite", lambda off, data: (writes.append((off, len(data))),
                                                        real(off, data)))
    t.write_entries([5, 7, 9, 500, 501])
    assert writes == [(40, 40), (4000, 16)]     # 5..9 joined, 500..501 joined
    writes.clear()
    t.write_entries(range(0, 1000, 10))          # many: one write of the span
    assert writes == [(0, 991 * 8)]


def test_read_table_names_a_short_table(f):
    with pytest.raises(CorruptImage, match="block map"):
        read_table(f, (1 << 16) - 8, 4, "I", False, "block map")


def test_pwritev_and_preadv_into(f):
    f.pwritev(100, [b"abc", bytearray(b"de"), memoryview(b"fgh")])
    buf = bytearray(8)
    assert f.preadv_into(100, buf) == 8 and bytes(buf) == b"abcdefgh"
    tail = bytearray(16)
    assert f.preadv_into((1 << 16) - 4, tail) == 4        # short only at the end of the file
    many = [bytes([i % 251]) for i in range(3000)]          # more buffers than one call takes
    f.pwritev(0, many)
    assert f.pread(0, 3000) == b"".join(many)
    with pytest.raises(VDIOError):
        f.pwritev((1 << 63) - 2, [b"ab", b"cd"])


def test_data_ranges(tmp_path):
    p = tmp_path / "sparse.img"
    with open(p, "wb") as fh:
        fh.truncate(8 << 20)
        fh.seek(4 << 20)
        fh.write(b"x" * 4096)
    with ImageFile(str(p), lock=False) as fh:
        ranges = fh.data_ranges(0, 8 << 20)
    assert ranges and all(a <= 4 << 20 < b for a, b in ranges)      # the one written piece
    assert sum(b - a for a, b in ranges) < 8 << 20


def test_holes():
    assert holes_between([(10, 20), (0, 5), (18, 30)]) == [[5, 10]]
    assert holes_between([(0, 5)], end=9) == [[5, 9]]
    assert slot_holes([1, None, None, 1, None], 10, base=100) == [[110, 130], [140, 150]]
    assert slot_holes([7, -1, 3], 10, free=-1) == [[10, 20]]


def test_plan_moves_fills_lowest_holes_with_highest_blocks():
    blocks = [(0, 10, "a"), (30, 10, "b"), (50, 10, "c"), (70, 10, "d")]
    holes = holes_between([(o, o + n) for o, n, _k in blocks])
    moves = plan_moves(blocks, holes)
    assert moves == [Move("d", 70, 10, 10), Move("c", 50, 20, 10)]
    # alignment: a block only goes where an aligned start fits below itself
    assert plan_moves([(0, 8, "a"), (64, 8, "b")], [[9, 30]], align=16) == [Move("b", 64, 16, 8)]
    # a large block that fits nowhere stays; a smaller one below it still moves
    mv = plan_moves([(0, 4, "x"), (100, 40, "big"), (60, 4, "small")], [[4, 20]])
    assert mv == [Move("small", 60, 4, 4)]
    assert plan_moves([(0, 4, "x")], [[4, 20]]) == []       # nothing above the hole


def test_overlapping_blocks_are_found():
    assert overlapping([(0, 10, "a"), (20, 10, "b"), (25, 10, "c"), (40, 5, "d")]) == {"b", "c"}
    assert overlapping([(0, 100, "big"), (50, 10, "in"), (200, 1, "x")]) == {"big", "in"}
    assert overlapping([(0, 10, "a"), (10, 10, "b")]) == set()


def test_move_blocks_order(f, monkeypatch):
    f.pwrite(40000, b"B" * 1000)
    log = []
    real_write, real_sync = f.pwrite, f.sync
    monkeypatch.setattr(f, "pwrite", lambda off, d: (log.append(("write", off)),
                                                     real_write(off, d)))
    monkeypatch.setattr(f, "sync", lambda: (log.append(("sync",)), real_sync()))
    moves = [Move(7, 40000, 1000, 1000)]
    done = []
    move_blocks(f, moves, lambda ms: log.append(("repoint", [m.key for m in ms])),
                header=lambda: log.append(("header",)), advance=done.append)
    assert log == [("write", 1000), ("sync",), ("repoint", [7]), ("sync",), ("header",),
                   ("sync",)]
    assert f.pread(1000, 1000) == b"B" * 1000 and done == [1000]
    log.clear()
    move_blocks(f, [], lambda ms: log.append("repoint"), header=lambda: log.append(("header",)))
    assert log == [("header",), ("sync",)]        # nothing moved: the header is still written


class _Img(FileImage):
    pass


def test_file_image_close_closes_even_when_flush_fails(tmp_path):
    p = tmp_path / "x.img"
    p.write_bytes(bytes(512))
    img = _Img(None, str(p), ImageFile(str(p), writable=True, lock=False), read_only=False)
    extra_path = tmp_path / "y.img"
    extra_path.write_bytes(b"")
    extra = ImageFile(str(extra_path), lock=False)
    img.extra_files.append(extra)

    def boom():
        raise VDIOError("flush failed")
    img._write_back = boom
    with pytest.raises(VDIOError):
        img.close()
    assert img.f.fd < 0 and extra.fd < 0
    err = img._corrupt("bad", field="x", offset=4, expected=1, found=2)
    assert isinstance(err, CorruptImage) and str(p) in str(err) and "0x4" in str(err)


def test_hand_to_closes_the_file_only_when_the_owner_fails(tmp_path):
    p = tmp_path / "img"
    p.write_bytes(b"\0" * 512)
    f = ImageFile(str(p))
    with pytest.raises(CorruptImage):
        f.hand_to(lambda f: (_ for _ in ()).throw(CorruptImage("bad header", path=str(p))))
    assert f.fd < 0
    kept = ImageFile(str(p)).hand_to(lambda f: f)
    assert kept.fd >= 0
    kept.close()


@pytest.mark.parametrize("typecode", ["I", "Q"])
def test_first_nonzero_finds_the_first_used_entry(typecode):
    """The skip over empty table entries (VHDX BAT, QCOW2 L2) at memcmp speed (issue #18)."""
    n = 300_000                                  # more than one 1 MiB window of zeroes
    t = array(typecode, bytes(n * array(typecode).itemsize))
    assert first_nonzero(t, 0, n) == n
    assert first_nonzero(t, 5, n + 100) == n     # clamped to the table
    assert first_nonzero(t, 7, 7) == 7 and first_nonzero(t, n + 3, n + 9) == n + 3
    for used in (0, 1, 63, 64, 65, 1000, 131_071, 131_072, 299_999):
        t[used] = 1 << (8 * t.itemsize - 1)      # only the top byte set
        assert first_nonzero(t, 0, n) == used
        assert first_nonzero(t, used, n) == used
        assert first_nonzero(t, used + 1, n) == n
        assert first_nonzero(t, 0, used) == used
        t[used] = 0


@pytest.mark.parametrize("typecode", ["I", "Q"])
def test_arithmetic_run_ends_where_the_progression_does(typecode):
    """The host-contiguous clusters of a QCOW2 L2 table found at C speed (issue #18 goal 4):
    the end of the run of entries first, first + step, ... equals the one found entry by entry,
    for runs ending anywhere, at the range's end, at the table's end, near the top of the
    entry's range (no overflow), and with the top bit set (the COPIED flag)."""
    import random

    rnd = random.Random(3)
    bits = 8 * array(typecode).itemsize
    for base in (5 << 16, (1 << (bits - 1)) | (5 << 16), (1 << bits) - (70 << 16)):
        for _ in range(300):
            n = rnd.choice([1, 2, 15, 16, 17, 63, 64, 65, 200, 1000])
            step = 1 << 16
            vals = [base + k * step for k in range(n)]
            vals = [v if v < 1 << bits else 0 for v in vals]
            if rnd.random() < 0.7:                       # break it somewhere
                vals[rnd.randrange(n)] ^= 1 << 16
            t = array(typecode, [7] + vals + [base])
            start, stop = 1, rnd.choice([n + 1, n + 2, rnd.randrange(1, n + 2)])
            want = start
            while want < min(stop, len(t)) and t[want] == base + (want - start) * step:
                want += 1
            assert arithmetic_run(t, start, stop, base, step) == want, (n, stop)
