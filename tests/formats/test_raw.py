import os

import pytest

from tests.formats.conformance import FormatConformance
from vdgui.vd import Disk, ImageFlags, InvalidArgument, OpenFlags, probe


class TestRawConformance(FormatConformance):
    FORMAT = "RAW"
    EXT = "img"
    VARIANTS = (ImageFlags.NONE, ImageFlags.FIXED)
    DIFF = False
    UUID = False

    def test_truncated_and_corrupted_headers_give_vderror(self, tmp_path):
        """RAW has no header: any bytes are a valid image."""
        p = tmp_path / "x.img"
        p.write_bytes(b"\x00" * 1000)
        with Disk() as d:
            d.open(str(p), "RAW", flags=OpenFlags.READ_ONLY)
            assert d.read(0, 1000) == bytes(1000)


def test_iso_label_and_device_type(tmp_path):
    iso = bytearray(20 * 2048)
    iso[16 * 2048] = 1
    iso[16 * 2048 + 1:16 * 2048 + 6] = b"CD001"
    iso[16 * 2048 + 40:16 * 2048 + 72] = b"MY_LABEL".ljust(32)
    p = tmp_path / "disc.iso"
    p.write_bytes(bytes(iso))
    assert probe(str(p)).name == "RAW"
    with Disk() as d:
        d.open(str(p), flags=OpenFlags.READ_ONLY)
        info = d.info()
    assert info["details"]["iso_volume_label"] == "MY_LABEL"
    assert info["device_type"] == "optical"


def test_resize_grow_and_refused_shrink(tmp_path):
    p = str(tmp_path / "r.img")
    with Disk() as d:
        d.create_base(p, 1 << 20, "RAW")
        d.write((1 << 20) - 512, b"\x07" * 512)
        d.top.resize(2 << 20)
        assert d.size == 2 << 20
        assert d.read(1 << 20, 4096) == bytes(4096)
        with pytest.raises(InvalidArgument):
            d.top.resize(512 * 1024)
    assert os.path.getsize(p) == 2 << 20
