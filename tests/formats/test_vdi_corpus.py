"""The real VDI images of the corpus: made by qemu, VirtualBox 4 and Sun VirtualBox 3."""
from __future__ import annotations

import uuid

from tests.conftest import read_all
from vdgui.vd import Alloc, Disk, OpenFlags, probe

MiB = 1 << 20


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def test_basic_vdi_matches_qemu(corpus, qemu, tmp_path):
    p = corpus / "vdi" / "dissect" / "basic.vdi"
    ref = _read(qemu.to_raw(p, tmp_path / "basic.raw", "vdi"))
    assert probe(str(p)).name == "VDI"
    with Disk() as d:
        d.open(str(p), flags=OpenFlags.READ_ONLY)
        assert d.size == 10 * MiB
        assert read_all(d) == ref
        ext = d.allocation()
        assert ext[0].status == Alloc.UNALLOCATED and ext[0].length == MiB   # the hole
        assert all(e.status == Alloc.DATA for e in ext[1:])
        info = d.info()
        assert info["details"]["file_info"] == "<<< QEMU VM Virtual Disk Image >>>"
        assert info["details"]["blocks_allocated"] == 9
        assert d.top.check().problems == []
    assert ref[:MiB] == bytes(MiB) and ref[MiB:] != bytes(9 * MiB)


def test_virtualbox4_empty_8g(corpus):
    p = corpus / "vdi" / "pyVBox" / "TestHD.vdi"
    with Disk() as d:
        d.open(str(p), flags=OpenFlags.READ_ONLY)
        img = d.top
        assert d.size == 8 << 30
        assert img.uuid == uuid.UUID("c92b558e-eba5-43e8-a8b3-984f946db1b2")
        assert img.uuid.version == 4
        assert not img.is_diff
        assert d.allocation() == [d.allocation()[0]]
        assert d.allocation()[0].status == Alloc.UNALLOCATED
        assert d.read(0, MiB) == bytes(MiB) and d.read((8 << 30) - 4096, 4096) == bytes(4096)
        det = d.info()["details"]
        assert det["file_info"] == "<<< Oracle VM VirtualBox Disk Image >>>"
        assert (det["header_size"], det["offset_blocks"], det["offset_data"]) == (400, 4096, 36864)
        assert img.check().problems == []


def test_sun_header_only(corpus, tmp_path):
    p = corpus / "vdi" / "pyVBox" / "TestHD.sun.vdi"
    with Disk() as d:
        d.open(str(p), flags=OpenFlags.READ_ONLY)
        assert d.size == 4 * MiB
        assert read_all(d) == bytes(4 * MiB)
        assert d.info()["details"]["file_info"] == "<<< Sun VirtualBox Disk Image >>>"
        assert d.top.check().problems == []
    # a copy stays writable: data lands after the (1 KiB) header and map
    q = tmp_path / "sun.vdi"
    q.write_bytes(_read(p))
    with Disk() as d:
        d.open(str(q))
        d.write(3 * MiB, b"\x42" * 512)
    with Disk() as d:
        d.open(str(q), flags=OpenFlags.READ_ONLY)
        assert d.read(3 * MiB, 1024) == b"\x42" * 512 + bytes(512)
        assert d.top.check().problems == []
    assert q.stat().st_size == 1024 + MiB
