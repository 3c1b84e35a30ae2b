"""Repair never drops data silently (issue #12 item 6): unreferenced blocks holding data are
listed by a dry run and saved beside the image before a repair frees them; a backup copy of the
image can be made first."""
from __future__ import annotations

import json
import os
import struct

import pytest

from vdgui.vd import Disk, OpenFlags, check, describe_effects, get_backend

MiB = 1 << 20


def _make(tmp_path, fmt, blocks=(0x11, 0x22, 0x33)):
    b = get_backend(fmt)
    p = str(tmp_path / f"disk.{b.default_extension()}")
    with Disk() as d:
        d.create_base(p, 8 * MiB, fmt)
        for i, v in enumerate(blocks):
            d.write(i * MiB, bytes([v]) * MiB)
    return p


def _lose_vdi_entry(p, idx):
    """The block map loses entry ``idx`` (set to 'not allocated'); its block stays in the file."""
    img = get_backend("VDI").open(p, OpenFlags.READ_ONLY | OpenFlags.INFO, None)
    try:
        at = img.offset_blocks + 4 * idx
    finally:
        img.close()
    with open(p, "r+b") as f:
        f.seek(at)
        f.write(struct.pack("<I", 0xFFFFFFFF))


def _lose_qcow2_entry(p):
    """The L2 entry of guest cluster 0 is cleared; the cluster keeps its data and refcount."""
    with open(p, "r+b") as f:
        hdr = f.read(104)
        l1_off = struct.unpack(">Q", hdr[40:48])[0]
        f.seek(l1_off)
        l2 = struct.unpack(">Q", f.read(8))[0] & 0x00FFFFFFFFFFFE00
        f.seek(l2)
        f.write(bytes(8))


def _lose_vhd_entry(p, idx):
    with open(p, "r+b") as f:
        f.seek(512 + 16)
        bat = struct.unpack(">Q", f.read(8))[0]
        f.seek(bat + 4 * idx)
        f.write(b"\xff\xff\xff\xff")


def _append(p, data):
    with open(p, "ab") as f:
        f.write(data)


def _saved_blocks(report):
    with open(report.orphans_file, "rb") as f:
        data = f.read()
    with open(report.orphans_file[:-4] + ".json", encoding="utf-8") as f:
        index = json.load(f)
    return data, index


def test_vdi_lost_map_entry_block_is_saved_not_dropped(tmp_path):
    p = _make(tmp_path, "VDI")
    _lose_vdi_entry(p, 1)
    with open(p, "rb") as f:
        before = f.read()
    dry = check(p, repair=True, dry_run=True)
    assert dry.problems and len(dry.orphans) == 1
    f, off, n = dry.orphans[0]
    assert f == p and n >= MiB
    with open(p, "rb") as fh:
        fh.seek(off)
        assert b"\x22" * MiB in fh.read(n)
    effects = " ".join(describe_effects(dry))
    assert "hold data" in effects and "saved first" in effects
    with open(p, "rb") as fh:
        assert fh.read() == before, "a dry run changes nothing"
    rep = check(p, repair=True, backup=True)
    assert rep.repaired and rep.orphans_file and os.path.dirname(rep.orphans_file) == str(tmp_path)
    assert os.path.basename(rep.orphans_file).startswith("disk.vdi.orphans-")
    data, index = _saved_blocks(rep)
    assert b"\x22" * MiB in data
    (entry,) = index["blocks"]
    assert entry["file"] == p and entry["offset"] == off and entry["at"] == 0
    assert index["image"] == p
    # the backup is the image as it was before the repair
    assert rep.backup and os.path.isdir(rep.backup)
    assert os.listdir(rep.backup) == ["disk.vdi"]
    with open(os.path.join(rep.backup, "disk.vdi"), "rb") as fh:
        assert fh.read() == before
    assert check(p).exit_code == 0
    with Disk.open_chain(p, flags=OpenFlags.READ_ONLY) as d:
        assert d.read(0, MiB) == b"\x11" * MiB and d.read(2 * MiB, MiB) == b"\x33" * MiB


def test_zero_orphans_are_not_saved(tmp_path):
    p = _make(tmp_path, "VDI")
    _append(p, bytes(MiB))                 # an unreferenced block of zeroes at the end
    dry = check(p, repair=True, dry_run=True)
    assert dry.problems and dry.orphans == []
    rep = check(p, repair=True)
    assert rep.repaired and rep.orphans_file is None and rep.backup is None
    assert not [n for n in os.listdir(tmp_path) if ".orphans-" in n or ".backup-" in n]


@pytest.mark.parametrize("fmt,damage", [
    ("QCOW2", lambda p: _lose_qcow2_entry(p)),
    ("VHD", lambda p: _lose_vhd_entry(p, 1)),
    ("VMDK", lambda p: _append(p, b"\x77" * MiB)),
    ("QED", lambda p: _append(p, b"\x77" * MiB)),
    ("Parallels", lambda p: _append(p, b"\x77" * MiB)),
])
def test_every_format_saves_what_its_repair_drops(tmp_path, fmt, damage):
    p = _make(tmp_path, fmt)
    damage(p)
    dry = check(p, repair=True, dry_run=True)
    assert dry.problems and dry.orphans, [x.what for x in dry.problems]
    rep = check(p, repair=True)
    assert rep.orphans_file, "the repair saved the unreferenced data"
    data, index = _saved_blocks(rep)
    assert index["blocks"] and sum(e["length"] for e in index["blocks"]) == len(data)
    assert any(v * 4096 in data for v in (b"\x11", b"\x22", b"\x33", b"\x77"))


def test_cli_check_repair_says_what_was_saved_where(tmp_path, capsys):
    from vdgui import cli
    p = _make(tmp_path, "VDI")
    _lose_vdi_entry(p, 1)
    assert cli.main(["check", "--repair", "--dry-run", p]) == 3
    out = capsys.readouterr().out
    assert "hold data (1048576 bytes)" in out and "saves them beside the image first" in out
    assert "repair would:" in out and "no data is lost" not in out
    assert cli.main(["check", "--repair", "--backup", "--json", p]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["orphans_file"] and os.path.exists(rep["orphans_file"])
    assert rep["backup"] and os.path.isdir(rep["backup"]) and rep["orphans"][0]["length"] >= MiB
    p2 = _make(tmp_path / "x" if os.mkdir(tmp_path / "x") is None else None, "VDI")
    _lose_vdi_entry(p2, 2)
    assert cli.main(["check", "--repair", p2]) == 0
    out = capsys.readouterr().out
    saved = [n for n in os.listdir(tmp_path / "x") if n.endswith(".bin")]
    assert len(saved) == 1 and f"Unreferenced data saved to {tmp_path / 'x' / saved[0]}" in out
    assert "index:" in out and ".json" in out


def test_parallels_bundle_saves_what_its_repair_drops(tmp_path):
    p = str(tmp_path / "disk.hdd")
    with Disk() as d:
        d.create_base(p, 8 * MiB, "Parallels", config={"Bundle": 1})
        d.write(0, b"\x11" * MiB)
    (hds,) = [os.path.join(p, n) for n in os.listdir(p) if n.endswith(".hds")]
    _append(hds, b"\x77" * MiB)
    dry = check(p, repair=True, dry_run=True)
    assert dry.orphans and dry.orphans[0][0] == hds
    with open(hds, "rb") as f:
        before = f.read()
    rep = check(p, repair=True, backup=True)
    assert rep.orphans_file and os.path.dirname(rep.orphans_file) == str(tmp_path)
    data, index = _saved_blocks(rep)
    assert b"\x77" * MiB in data and index["blocks"][0]["file"] == hds
    # the backup keeps the bundle's layout (descriptor and extent inside disk.hdd/)
    inside = os.path.join(rep.backup, "disk.hdd")
    assert sorted(os.listdir(inside)) == sorted(os.listdir(p))
    with open(os.path.join(inside, os.path.basename(hds)), "rb") as f:
        assert f.read() == before
