"""Hostile inputs built in the test (issue #12 items 21, 22, 25): decompression bombs, sizes
that are declared but not present, repetition that multiplies work, corruption check must see.
Every case asserts the engine's own error (a VDError subclass with a clear message) or a bounded
cost, never a traceback, a hang or a huge allocation."""
from __future__ import annotations

import os
import struct

import pytest

from vdgui.vd import CorruptImage, Disk, VDError
from vdgui.vd.formats import vhdx

from tests.formats.test_vhdx import _dirty, _log_entry

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
