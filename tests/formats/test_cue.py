"""CUE/BIN: cue sheets with one or more BIN files, every track mode, regions, hostile sheets."""
from __future__ import annotations

import pytest

from tests.conftest import read_all
from vdgui.vd import CorruptImage, Disk, NotSupported, OpenFlags, UnsafePath, VDError, probe


def _write(tmp_path, name, data):
    p = tmp_path / name
    p.write_bytes(data)
    return p


def test_single_bin_mixed_tracks(tmp_path):
    data = bytes([1]) * (10 * 2352) + bytes([2]) * (20 * 2352)
    _write(tmp_path, "disc.bin", data)
    cue = _write(tmp_path, "disc.cue", b'REM made by hand\nFILE "disc.bin" BINARY\n'
                 b"  TRACK 01 MODE1/2352\n    INDEX 01 00:00:00\n"
                 b"  TRACK 02 AUDIO\n    INDEX 00 00:00:10\n    INDEX 01 00:00:12\n")
    assert probe(str(cue)).name == "CUE"
    with Disk() as d:
        d.open(str(cue), flags=OpenFlags.READ_ONLY)
        assert d.size == len(data)
        assert read_all(d) == data
        info = d.info()
    regions = info["regions"]
    assert [r["number"] for r in regions] == [1, 2]
    assert regions[0] == {"number": 1, "start": 0, "length": 10 * 2352, "block_size": 2352,
                          "blocks": 10, "data_form": "MODE1_2352", "metadata_form": "NONE"}
    assert regions[1]["start"] == 12 * 2352 and regions[1]["data_form"] == "CDDA"
    assert regions[1]["blocks"] == 18
    assert info["device_type"] == "optical"
    assert len(info["files"]) == 2


def test_two_bin_files(tmp_path):
    a = bytes([7]) * (4 * 2048)
    b = bytes([9]) * (3 * 2352)
    _write(tmp_path, "a.bin", a)
    _write(tmp_path, "b.bin", b)
    cue = _write(tmp_path, "x.cue", b'FILE "a.bin" BINARY\nTRACK 1 MODE1/2048\nINDEX 01 00:00:00\n'
                 b'FILE "b.bin" BINARY\nTRACK 2 MODE2/2352\nINDEX 01 00:00:00\n')
    with Disk() as d:
        d.open(str(cue), flags=OpenFlags.READ_ONLY)
        assert read_all(d) == a + b
        regs = d.info()["regions"]
    assert regs[0]["block_size"] == 2048 and regs[0]["blocks"] == 4
    assert regs[1]["start"] == len(a) and regs[1]["data_form"] == "MODE2_2352"


@pytest.mark.parametrize("sheet,exc", [
    (b'FILE "../etc/passwd" BINARY\nTRACK 01 MODE1/2048\nINDEX 01 00:00:00\n', UnsafePath),
    (b'FILE "/dev/zero" BINARY\nTRACK 01 MODE1/2048\nINDEX 01 00:00:00\n', UnsafePath),
    (b'FILE "missing.bin" BINARY\nTRACK 01 MODE1/2048\nINDEX 01 00:00:00\n', VDError),
    (b'FILE "d.bin" BINARY\nTRACK 01 MODE9/9999\nINDEX 01 00:00:00\n', NotSupported),
    (b'FILE "d.bin" BINARY\nTRACK 01 MODE1/2048\nINDEX 01 00:99:00\n', CorruptImage),
    (b'FILE "d.bin" BINARY\nTRACK 01 MODE1/2048\n', CorruptImage),
    (b'TRACK 01 MODE1/2048\nINDEX 01 00:00:00\n', CorruptImage),
    (b'FILE "d.bin" BINARY\nTRACK 01 MODE1/2048\nINDEX 01 10:00:00\n', CorruptImage),
    (b'FILE "d.bin BINARY\n', CorruptImage),
    (b'FILE "d.bin" BINARY\nBOGUS\n', CorruptImage),
])
def test_hostile_cue(tmp_path, sheet, exc):
    _write(tmp_path, "d.bin", bytes(2048 * 4))
    cue = _write(tmp_path, "h.cue", sheet)
    with pytest.raises(exc):
        Disk().open(str(cue), "CUE", flags=OpenFlags.READ_ONLY)


def test_oversized_cue_refused(tmp_path):
    cue = _write(tmp_path, "big.cue", b"REM x\n" * 200000)
    with pytest.raises(CorruptImage, match="too large"):
        Disk().open(str(cue), "CUE", flags=OpenFlags.READ_ONLY)


def test_raw_iso_regions(tmp_path):
    iso = _write(tmp_path, "d.iso", bytes(2048 * 10))
    with Disk() as d:
        d.open(str(iso), flags=OpenFlags.READ_ONLY)
        regs = d.info()["regions"]
    assert regs == [{"number": 1, "start": 0, "length": 20480, "block_size": 2048, "blocks": 10,
                     "data_form": "MODE1_2048", "metadata_form": "NONE"}]
