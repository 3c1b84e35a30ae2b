"""OVA archives: the disks inside a tar, read in place and read-only; qemu-img judges the bytes."""
from __future__ import annotations

import io
import tarfile

import pytest

from tests.conftest import pattern, read_all, run_cli
from vdgui.vd import (
    CorruptImage,
    Disk,
    NotSupported,
    OpenFlags,
    ReadOnlyImage,
    VDError,
    get_backend,
    probe,
)

MiB = 1 << 20
OVF = b"""<?xml version="1.0"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1">
  <References><File ovf:id="file1" ovf:href="disk1.vmdk"/><File ovf:id="file2" ovf:href="disk2.img"/></References>
</Envelope>
"""


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    tf.addfile(ti, io.BytesIO(data))


@pytest.fixture
def ova(qemu, tmp_path):
    """vm.ova: the .ovf first, a streamOptimized VMDK made by qemu-img, a raw disk, a manifest."""
    raw1 = tmp_path / "d1.raw"
    data1 = bytearray(8 * MiB)
    data1[MiB : 3 * MiB] = pattern(2 * MiB, 5)
    data1[7 * MiB :] = b"\xe1" * MiB
    raw1.write_bytes(bytes(data1))
    vmdk = tmp_path / "disk1.vmdk"
    qemu.img("convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", raw1, vmdk)
    data2 = pattern(2 * MiB, 9)
    p = tmp_path / "vm.ova"
    with tarfile.open(p, "w", format=tarfile.USTAR_FORMAT) as tf:
        _add(tf, "vm.ovf", OVF)
        _add(tf, "disk1.vmdk", vmdk.read_bytes())
        _add(tf, "disk2.img", data2)
        _add(tf, "vm.mf", b"SHA256(vm.ovf)= 00\n")
    return p, bytes(data1), data2, vmdk


def test_ova_disks_read_in_place(ova, qemu, tmp_path):
    p, data1, data2, vmdk = ova
    assert probe(str(p)).name == "OVA"
    with Disk.open_chain(str(p), None, OpenFlags.READ_ONLY) as d:
        info = d.top.info()
        assert [(x["name"], x["format"], x["virtual_size"]) for x in info["disks"]] == [
            ("disk1.vmdk", "VMDK", 8 * MiB),
            ("disk2.img", "RAW", 2 * MiB),
        ]
        assert info["disk"] == "disk1.vmdk" and d.top.read_only
        assert read_all(d) == data1
    for key in ("2", "disk2.img"):
        with Disk.open_chain(str(p), "OVA", OpenFlags.READ_ONLY, {"Disk": key}) as d:
            assert read_all(d) == data2
    with pytest.raises(NotSupported, match="disk1.vmdk, disk2.img"):
        Disk.open_chain(str(p), "OVA", OpenFlags.READ_ONLY, {"Disk": "3"})
    # the copy of the first disk is what qemu reads from the extracted VMDK
    out = tmp_path / "out.qcow2"
    run_cli("convert", "-O", "QCOW2", str(p), str(out))
    assert qemu.compare(str(out), str(vmdk), "qcow2", "vmdk").returncode == 0


def test_ova_is_read_only(ova):
    p, *_ = ova
    with pytest.raises(NotSupported, match="read-only"):
        Disk.open_chain(str(p), None, OpenFlags.NORMAL)
    r = run_cli("write", str(p), "--offset", "0", "--input", "/dev/null", check=False)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
    assert not get_backend("OVA").creatable


@pytest.mark.parametrize("cut", [600, 4000, 70000])
def test_truncated_ova_is_a_clean_error(ova, tmp_path, cut):
    p, *_ = ova
    bad = tmp_path / "bad.ova"
    bad.write_bytes(p.read_bytes()[:cut])
    with pytest.raises(VDError):
        Disk.open_chain(str(bad), "OVA", OpenFlags.READ_ONLY)
    r = run_cli("info", str(bad), check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr


def test_member_window_stays_inside_the_member(ova):
    p, *_ = ova
    from vdgui.vd.fileio import ImageFile
    from vdgui.vd.formats.ova import MemberFile

    with ImageFile(str(p)) as f:
        m = MemberFile(f, 1024, 100, "x")
        assert m.pread(90, 50) == f.pread(1024 + 90, 10) and m.pread(100, 1) == b""
        with pytest.raises(ReadOnlyImage):
            m.pwrite(0, b"x")
        # each writer refuses with its own signature (sync, truncate, punch_hole were pwrite's
        # alias and raised TypeError)
        for call in (m.sync, lambda: m.truncate(0), lambda: m.punch_hole(0, 512)):
            with pytest.raises(ReadOnlyImage):
                call()


@pytest.mark.corpus
def test_corpus_ova(corpus, qemu):
    d = corpus / "ova" / "forklift"
    with Disk.open_chain(str(d / "2nd_disk_v3.ova"), None, OpenFlags.READ_ONLY) as disk:
        assert disk.top.format == "OVA" and disk.size == 1 << 30
        got = read_all(disk)
    want = qemu.to_raw(
        corpus / "vmdk" / "forklift" / "2nd_disk.vmdk", corpus / "ova-want.raw", "vmdk"
    ).read_bytes()
    assert got == want
    with pytest.raises(CorruptImage, match="grainSize"):
        Disk.open_chain(str(d / "2nd_disk.CORRUPT.ova"), None, OpenFlags.READ_ONLY)


def test_raw_disk_in_an_ova_copies_to_a_fixed_target(ova, tmp_path):
    """A RAW disk inside the archive is a window onto the tar file: a copy into a preallocated
    RAW or fixed VHD (filled by copy_file_range where the source allows) reads the member's
    bytes, not the archive's at the member's offsets."""
    from vdgui.vd import ImageFlags, copy_image
    from vdgui.vd.formats.ova import MemberFile

    p, _data1, data2, _vmdk = ova
    with Disk.open_chain(str(p), "OVA", OpenFlags.READ_ONLY, {"Disk": "2"}) as d:
        assert d.top.stored_runs(0, MiB) is None
    for fmt in ("RAW", "VHD"):
        out = tmp_path / f"fixed-{fmt}.img"
        copy_image(str(p), str(out), fmt, src_format="OVA", src_config={"Disk": "2"},
                   variant=ImageFlags.FIXED)
        with Disk.open_chain(str(out), fmt, OpenFlags.READ_ONLY) as d:
            assert read_all(d) == data2
    member = MemberFile(type("F", (), {"fd": -1})(), 512, MiB, "m")  # type: ignore[arg-type]
    assert get_backend("RAW").open_file(member, "m").stored_runs(0, 4096) is None
