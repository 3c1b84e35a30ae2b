"""Partition tables and file-system detection (issue #15 item 2), every format, CLI contract."""
from __future__ import annotations

import json
import os
import struct
import zlib

import pytest

from tests.conftest import run_cli
from tests.inside.conftest import MiB, sh


def _parts(path, *extra):
    return json.loads(run_cli("partitions", "--json", *extra, path).stdout)


def _blkid(img, offset, size):
    out = sh("blkid", "-p", "-O", offset, "-S", size, "-o", "export", img)
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def test_mbr_logical_partitions_and_filesystems(mbr_disk):
    r = _parts(mbr_disk, "-f", "raw")
    assert r["scheme"] == "mbr" and r["problems"] == []
    got = [(p["number"], p["start"], p["size"], p["type"]) for p in r["partitions"]]
    dump = sh("sfdisk", "-J", mbr_disk)
    want = [(int(p["node"].rsplit("img", 1)[1]), p["start"] * 512, p["size"] * 512,
             "0x%02x" % int(p["type"], 16))
            for p in json.loads(dump)["partitiontable"]["partitions"] if p["type"] != "5"]
    assert got == want
    by = {p["number"]: p for p in r["partitions"]}
    for n in (1, 5):
        b = _blkid(mbr_disk, by[n]["start"], by[n]["size"])
        assert by[n]["filesystem"] == b["TYPE"].replace("vfat", "fat16")
        assert by[n]["label"] == b["LABEL"] and by[n]["uuid"] == b["UUID"]
    assert by[6]["filesystem"] == ""


@pytest.mark.parametrize("fmt", ["vdi", "vmdk", "vhdx", "qcow2"])
def test_same_layout_in_every_format(mbr_disk, tmp_path, qemu, fmt):
    out = tmp_path / f"disk.{fmt}"
    qemu.img("convert", "-f", "raw", "-O", fmt, mbr_disk, out)
    assert _parts(out)["partitions"] == _parts(mbr_disk, "-f", "raw")["partitions"]


def _gpt(tmp_path, size=64 * MiB):
    img = tmp_path / "gpt.img"
    with open(img, "wb") as f:
        f.truncate(size)
    sh("sgdisk", "-o", "-n1:2048:+8M", "-t1:ef00", "-c1:EFI system", "-n2:0:+16M", "-t2:8300",
       "-c2:root", "-A2:set:2", img)
    return img


def test_gpt(tmp_path):
    img = _gpt(tmp_path)
    r = _parts(img, "-f", "raw")
    assert r["scheme"] == "gpt" and r["problems"] == []
    info = sh("sgdisk", "-i2", img)
    assert r["disk_guid"].upper() in sh("sgdisk", "-p", img)
    p1, p2 = r["partitions"]
    assert (p1["number"], p1["start"], p1["size"], p1["name"]) == (1, MiB, 8 * MiB, "EFI system")
    assert p1["type"] == "c12a7328-f81f-11d2-ba4b-00a0c93ec93b" and p1["type_name"] == "EFI System"
    assert (p2["start"], p2["size"], p2["name"], p2["attributes"]) == (9 * MiB, 16 * MiB, "root", 4)
    assert p2["guid"].upper() in info


def test_gpt_damage_is_diagnosed(tmp_path):
    img = _gpt(tmp_path)
    with open(img, "r+b") as f:              # break the primary header's CRC
        f.seek(512 + 16)
        f.write(b"\xde\xad\xbe\xef")
    r = _parts(img, "-f", "raw")
    assert any("primary GPT header: bad CRC32" in p for p in r["problems"])
    assert any("read from the backup" in p for p in r["problems"])
    assert [p["name"] for p in r["partitions"]] == ["EFI system", "root"]
    # a backup that disagrees: change a name in the backup entries and fix its CRCs
    img2 = _gpt(tmp_path / "b" if os.makedirs(tmp_path / "b") is None else None)
    size = os.path.getsize(img2)
    with open(img2, "r+b") as f:
        f.seek(size - 512)
        hdr = bytearray(f.read(512))
        entries_lba, count, esize = struct.unpack_from("<QII", hdr, 72)
        f.seek(entries_lba * 512)
        table = bytearray(f.read(count * esize))
        table[56:58] = b"X\0"
        f.seek(entries_lba * 512)
        f.write(table)
        struct.pack_into("<I", hdr, 88, zlib.crc32(table))
        struct.pack_into("<I", hdr, 16, 0)
        struct.pack_into("<I", hdr, 16, zlib.crc32(hdr[:92]))
        f.seek(size - 512)
        f.write(hdr)
    r = _parts(img2, "-f", "raw")
    assert "the backup GPT disagrees with the primary GPT" in r["problems"]


def test_mbr_damage_is_diagnosed(tmp_path):
    img = tmp_path / "bad.img"
    with open(img, "wb") as f:
        f.truncate(32 * MiB)
    sh("sfdisk", "-q", img, input="label: dos\nstart=2048, size=20480, type=83\n"
       "start=30000, size=10000, type=83\n")
    with open(img, "r+b") as f:      # entry 2 now overlaps entry 1 and runs past the end
        f.seek(446 + 16 + 8)
        f.write(struct.pack("<II", 10000, 80000))
    r = run_cli("partitions", "-f", "raw", img)
    assert "partitions 1 and 2 overlap" in r.stdout
    assert "partition 2 ends past the end of the disk" in r.stdout


def test_unpartitioned_and_iso(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "x").write_text("x")
    ext = tmp_path / "ext.img"
    sh("mkfs.ext4", "-q", "-L", "plain", "-d", src, ext, "8M")
    (p,) = _parts(ext, "-f", "raw")["partitions"]
    assert (p["number"], p["start"], p["filesystem"], p["label"]) == (0, 0, "ext4", "plain")
    iso = tmp_path / "x.iso"
    sh("genisoimage", "-quiet", "-V", "MYCD", "-J", "-R", "-o", iso, src)
    (p,) = _parts(iso, "-f", "raw")["partitions"]
    assert (p["filesystem"], p["label"]) == ("iso9660", "MYCD")
    assert p["uuid"] == _blkid(iso, 0, os.path.getsize(iso))["UUID"]


def test_nothing_readable_is_one_line_error(tmp_path):
    img = tmp_path / "tiny.img"
    img.write_bytes(b"\0" * 100)
    r = run_cli("partitions", "-f", "raw", img, check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr and len(r.stderr.splitlines()) == 1


def test_logical_partition_chain_loop_is_diagnosed(mbr_disk, tmp_path):
    img = tmp_path / "loop.img"
    img.write_bytes(mbr_disk.read_bytes())
    ext_lba = 22528                     # the extended partition; its first EBR is here
    with open(img, "r+b") as f:        # the first EBR's link now points back at itself
        f.seek(ext_lba * 512 + 446 + 16)
        entry = bytearray(f.read(16))
        struct.pack_into("<II", entry, 8, 0, 2048)
        entry[4] = 0x05
        f.seek(ext_lba * 512 + 446 + 16)
        f.write(entry)
    r = _parts(img, "-f", "raw")
    assert [p["number"] for p in r["partitions"]] == [1, 5]
    assert r["problems"] == ["extended partition: the chain of logical partitions loops back "
                             f"to sector {ext_lba}"]


def test_ntfs_label_as_blkid_reads_it(tmp_path, qemu):
    """NTFS keeps its label in $Volume (VOLUME_NAME), not in the boot sector."""
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(40 * MiB)
    sh("sfdisk", "-q", img, input="label: dos\nstart=2048, size=65536, type=7\n")
    vol = tmp_path / "vol.img"
    with open(vol, "wb") as f:
        f.truncate(32 * MiB)
    sh("mkntfs", "-q", "-F", "-f", "-L", "WINDATA", vol)
    sh("dd", f"if={vol}", f"of={img}", "bs=1M", "seek=1", "conv=notrunc", "status=none")
    out = tmp_path / "disk.vhdx"
    qemu.img("convert", "-f", "raw", "-O", "vhdx", img, out)
    (p,) = _parts(out)["partitions"]
    b = _blkid(img, p["start"], p["size"])
    assert (p["filesystem"], p["label"], p["uuid"]) == ("ntfs", b["LABEL"], b["UUID"])
    assert p["label"] == "WINDATA"
    with open(img, "r+b") as f:                   # $MFT unreadable: detected, label unknown
        f.seek(MiB + 0x30)
        f.write(struct.pack("<Q", 10**9))
    (p,) = _parts(img, "-f", "raw")["partitions"]
    assert (p["filesystem"], p["label"]) == ("ntfs", "")
