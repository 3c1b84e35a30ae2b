"""Parallels backend: conformance, structures, dirty flag, check/repair, bundles, hostile input."""
from __future__ import annotations

import hashlib
import os
import struct
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.conftest import read_all
from tests.engine import kill_harness as kh
from tests.formats.conformance import FormatConformance
from tests.formats.test_vhdx import _unpack
from vdgui.vd import (
    Alloc,
    CorruptImage,
    Disk,
    ImageFlags,
    NotSupported,
    OpenFlags,
    UnsafePath,
    VDError,
    check,
    get_backend,
    probe,
)
from vdgui.vd.formats import parallels as prl

MiB = 1 << 20
SPLIT = "parallels/dissect/split.hdd"
SPLIT_FILES = ["DiskDescriptor.xml", "split.hdd"] + [
    f"split.hdd.{i}.{{5fbaabe3-6958-40ff-92a7-860e329aab41}}.hds" for i in range(6)]


class TestParallelsConformance(FormatConformance):
    FORMAT = "Parallels"
    EXT = "hdd"
    VARIANTS = (ImageFlags.NONE,)
    DIFF = False        # a lone .hdd has no parent link; snapshots live in bundles (read below)
    UUID = False
    CREATE_CONFIG = {"ClusterSize": 256 * 1024}


class TestParallelsBundleConformance(FormatConformance):
    """The same contract for Parallels Desktop bundles (name.hdd folders) we create."""
    FORMAT = "Parallels"
    EXT = "hdd"
    VARIANTS = (ImageFlags.NONE,)
    DIFF = False
    UUID = False
    CREATE_CONFIG = {"ClusterSize": 256 * 1024, "Bundle": 1}

    def test_truncated_and_corrupted_headers_give_vderror(self, tmp_path):
        """The folder's descriptor and extent, damaged: a VDError or a clean read."""
        import random
        path = self._path(tmp_path, "victim")
        with Disk() as d:
            d.create_base(path, self._size(), self.FORMAT, config=self.CREATE_CONFIG)
            d.write(0, b"\x01" * 4096)
        desc = os.path.join(path, "DiskDescriptor.xml")
        hds = next(n for n in os.listdir(path) if n.endswith(".hds"))
        originals = {f: Path(f).read_bytes() for f in (desc, os.path.join(path, hds))}
        rnd = random.Random(77)
        for n in range(80):
            victim = list(originals)[n % 2]
            b = bytearray(originals[victim])
            for _ in range(rnd.choice([1, 3])):
                i = rnd.randrange(0, min(len(b), 4096))
                b[i] = rnd.randrange(256)
            if n % 11 == 0:
                b = b[:rnd.randrange(len(b))]
            for f, data in originals.items():
                with open(f, "wb") as fh:
                    fh.write(bytes(b) if f == victim else data)
            try:
                with Disk() as d:
                    d.open(path, self.FORMAT, flags=OpenFlags.READ_ONLY)
                    read_all(d, chunk=1 << 20)
            except VDError:
                pass


def test_bundle_create_layout(tmp_path, qemu):
    p = tmp_path / "vm.hdd"
    with Disk() as d:
        img = d.create_base(str(p), 8 * MiB, "Parallels", config={"Bundle": 1})
        d.write(MiB, b"\x07" * 4096)
        assert img.info()["subformat"] == "bundle"
    names = sorted(os.listdir(p))
    assert names[0] == "DiskDescriptor.xml" and "vm.hdd" in names
    hds = [n for n in names if n.endswith(".hds")]
    assert hds == ["vm.hdd.0.{5fbaabe3-6958-40ff-92a7-860e329aab41}.hds"]
    # the predefined base GUID, named as the top snapshot: what ploop and dissect look for
    snaps = ET.parse(p / "DiskDescriptor.xml").getroot().find("Snapshots")
    assert snaps.findtext("TopGUID") == "{5fbaabe3-6958-40ff-92a7-860e329aab41}"
    assert [s.findtext("GUID") for s in snaps.findall("Shot")] == [snaps.findtext("TopGUID")]
    assert (p / hds[0]).read_bytes()[:16] == prl.MAGIC_V2
    assert qemu.check(p / hds[0], "parallels").returncode == 0
    raw = qemu.to_raw(p / hds[0], tmp_path / "b.raw", "parallels").read_bytes()
    assert raw[MiB:MiB + 4096] == b"\x07" * 4096 and len(raw) == 8 * MiB
    assert probe(str(p)).name == "Parallels"
    with pytest.raises(VDError), Disk() as d:
        d.create_base(str(p), MiB, "Parallels", config={"Bundle": 1})


@pytest.mark.parametrize("name", sorted(prl.STRUCTS))
def test_struct_round_trip(name):
    st = prl.STRUCTS[name]
    raw = bytes((i * 11 + 5) % 256 for i in range(st.sizeof()))
    assert st.build(st.parse(raw)) == raw
    assert prl.Header.sizeof() == 64


def _make(path, size=4 * MiB, cluster=MiB):
    d = Disk()
    d.create_base(str(path), size, "Parallels", config={"ClusterSize": cluster})
    return d


def test_dirty_flag_never_set_by_us_and_repaired(tmp_path, qemu):
    """Our writes are ordered crash-safe, so in_use is never set on disk while we hold the image
    (a kill must not make it look corrupt); a flag qemu left set is reported and repaired."""
    p = tmp_path / "d.hdd"
    with _make(p) as d:
        d.write(0, b"\x01" * 4096)
        d.write(3 * MiB, b"\x03" * 4096)
        assert struct.unpack_from("<I", p.read_bytes(), 44)[0] == 0
        d.top.resize(8 * MiB)
        d.top.compact()
        assert struct.unpack_from("<I", p.read_bytes(), 44)[0] == 0
        snap = tmp_path / "snap.hdd"           # the file as a kill now would leave it
        snap.write_bytes(p.read_bytes())
        assert qemu.check(snap, "parallels").returncode == 0
        assert not check(str(snap)).problems
    assert struct.unpack_from("<I", p.read_bytes(), 44)[0] == 0
    # simulate a crash: in_use left set, and a leaked cluster at the end
    b = bytearray(p.read_bytes())
    struct.pack_into("<I", b, 44, prl.INUSE_MAGIC)
    b += b"\x99" * MiB
    p.write_bytes(bytes(b))
    with Disk() as d:                       # read-only: read as it is
        img = d.open(str(p), flags=OpenFlags.READ_ONLY)
        assert img.info()["dirty"]
        assert d.read(0, 4) == b"\x01" * 4
        rep = img.check()
        assert rep.corrupt and rep.leaks
    with Disk() as d:                       # read-write: checked and repaired on open
        img = d.open(str(p))
        assert img.info()["repaired_on_open"]
        assert struct.unpack_from("<I", p.read_bytes(), 44)[0] == 0
        assert d.read(0, 4) == b"\x01" * 4
    assert qemu.check(p, "parallels").returncode == 0
    assert os.path.getsize(p) == 3 * MiB


def test_foreign_in_use_value_is_kept(tmp_path):
    """Parallels Desktop's own closed values ("pd17") stay as they are after our writes."""
    p = tmp_path / "f.hdd"
    _make(p).close()
    b = bytearray(p.read_bytes())
    struct.pack_into("<I", b, 44, 0x37316470)
    p.write_bytes(bytes(b))
    with Disk() as d:
        d.open(str(p))
        d.write(0, b"\x02" * 4096)
    assert struct.unpack_from("<I", p.read_bytes(), 44)[0] == 0x37316470
    assert not check(str(p)).problems


def test_check_repair_duplicates_and_past_eof(tmp_path, qemu):
    p = tmp_path / "c.hdd"
    with _make(p) as d:
        d.write(0, b"\x0a" * MiB)
        d.write(MiB, b"\x0b" * MiB)
    b = bytearray(p.read_bytes())
    first = struct.unpack_from("<I", b, 64)[0]
    struct.pack_into("<I", b, 64 + 4 * 2, first)          # BAT[2] duplicates BAT[0]
    struct.pack_into("<I", b, 64 + 4 * 3, 1000)           # BAT[3] past EOF
    p.write_bytes(bytes(b))
    with Disk() as d:
        img = d.open(str(p), flags=OpenFlags.READ_ONLY)
        rep = img.check()
        whats = " ".join(x.what for x in rep.problems)
        assert rep.corrupt and "also used by BAT[0]" in whats and "past the end" in whats
        with pytest.raises(CorruptImage, match=r"BAT\[3\]"):
            d.read(3 * MiB, 512)
    assert qemu.check(p, "parallels").returncode == 2
    img = get_backend("Parallels").open(str(p), OpenFlags.NORMAL)
    try:
        rep = img.check(repair=True)
        assert rep.repaired and not rep.corrupt
    finally:
        img.close()
    r = qemu.check(p, "parallels")
    assert r.returncode == 0, r.stdout
    with Disk() as d:
        d.open(str(p), flags=OpenFlags.READ_ONLY)
        data = read_all(d)
    assert data == b"\x0a" * MiB + b"\x0b" * MiB + b"\x0a" * MiB + bytes(MiB)
    # the copies are independent now
    with Disk() as d:
        d.open(str(p))
        d.write(2 * MiB, b"\x0c" * 512)
        assert d.read(0, 1) == b"\x0a"


def test_resize_grow(tmp_path, qemu):
    p = tmp_path / "r.hdd"
    with _make(p, 2 * MiB) as d:
        d.write(MiB, b"\x11" * 512)
        d.top.resize(6 * MiB)
        d.write(5 * MiB, b"\x22" * 512)
        with pytest.raises(VDError):
            d.top.resize(MiB)
    assert qemu.check(p, "parallels").returncode == 0
    raw = qemu.to_raw(p, tmp_path / "r.raw", "parallels").read_bytes()
    assert len(raw) == 6 * MiB
    assert raw[MiB:MiB + 512] == b"\x11" * 512 and raw[5 * MiB:5 * MiB + 512] == b"\x22" * 512


def test_old_signature_images(tmp_path, qemu):
    """'WithoutFreeSpace' images: BAT in sectors, data_off 0 means right after the BAT."""
    p = tmp_path / "v2.hds"
    cl = 64 * 1024
    entries = 8
    hdr = prl.Header.build(dict(magic=prl.MAGIC_V2, version=2, heads=16, cylinders=1,
                                tracks=cl // 512,
                                bat_entries=entries, nb_sectors=(entries * cl // 512) | (7 << 32),
                                inuse=0x37316470, data_off=0, flags=0, ext_off=0))
    data_off = 512   # 64 + 32 bytes rounded up to a sector
    bat = [0] * entries
    bat[1] = data_off // 512
    bat[5] = (data_off + cl) // 512
    body = bytearray(hdr + struct.pack(f"<{entries}I", *bat)).ljust(data_off, b"\0")
    body += b"\x51" * cl + b"\x55" * cl
    p.write_bytes(bytes(body))
    with Disk() as d:
        img = d.open(str(p), "Parallels", flags=OpenFlags.READ_ONLY)
        assert img.size == entries * cl          # the high 32 bits of nb_sectors are ignored
        data = read_all(d)
        assert img.info()["subformat"] == "WithoutFreeSpace"
    assert data == bytes(cl) + b"\x51" * cl + bytes(3 * cl) + b"\x55" * cl + bytes(2 * cl)
    assert data == qemu.to_raw(p, tmp_path / "v2.raw", "parallels").read_bytes()
    with Disk() as d:                            # writes allocate in sectors units
        d.open(str(p), "Parallels")
        d.write(7 * cl, b"\x77" * 512)
    assert qemu.check(p, "parallels").returncode == 0
    assert qemu.to_raw(p, tmp_path / "v2b.raw", "parallels").read_bytes()[7 * cl:7 * cl + 512] \
        == b"\x77" * 512


# -- corpus --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def prl_corpus(tmp_path_factory):
    dest = tmp_path_factory.mktemp("prlcorpus")
    for n in SPLIT_FILES:
        _unpack(dest, f"{SPLIT}/{n}")
    _unpack(dest, "parallels/dissect/expanding.hdd/"
                  "expanding.hdd.0.{5fbaabe3-6958-40ff-92a7-860e329aab41}.hds")
    return dest


def test_corpus_split_bundle(prl_corpus, qemu, tmp_path):
    bundle = prl_corpus / SPLIT
    with Disk() as d:
        img = d.open(str(bundle), "Parallels", flags=OpenFlags.READ_ONLY)
        assert img.size == 10 << 30
        info = img.info()
        assert len(info["extents"]) == 6 and info["snapshots"] == 1
        assert info["state"].startswith("current state")
        assert str(img.uuid) == "d6e2bfb7-109e-4f6b-954c-6e2e7ae60d5a"
        assert len(img.files()) == 7
        alloc = [e for e in d.allocation() if e.status == Alloc.DATA]
        assert alloc
        # every extent's content equals qemu's reading of that .hds
        for ext in info["extents"]:
            hds = bundle / ext["files"][0]
            raw = qemu.to_raw(hds, tmp_path / "x.raw", "parallels")
            with open(raw, "rb") as fh:
                for e in alloc:
                    s, t = max(e.start, ext["start"]), min(e.end, ext["end"])
                    if s < t:
                        fh.seek(s - ext["start"])
                        assert d.read(s, t - s) == fh.read(t - s)
            assert os.path.getsize(raw) == ext["end"] - ext["start"]
    # the folder and the descriptor file itself probe and open the same way
    assert probe(str(bundle)).name == "Parallels"
    assert probe(str(bundle / "DiskDescriptor.xml")).name == "Parallels"
    with Disk() as d:
        d.open(str(bundle / "DiskDescriptor.xml"), flags=OpenFlags.READ_ONLY)
        assert d.size == 10 << 30


def test_corpus_expanding_hds(prl_corpus, qemu, tmp_path):
    p = next((prl_corpus / "parallels/dissect/expanding.hdd").iterdir())
    raw = qemu.to_raw(p, tmp_path / "e.raw", "parallels").read_bytes()
    with Disk() as d:
        img = d.open(str(p), flags=OpenFlags.READ_ONLY)
        assert not img.check().corrupt
        assert read_all(d) == raw


# -- bundles we make ---------------------------------------------------------------------------
DESC = """<?xml version='1.0' encoding='UTF-8'?>
<Parallels_disk_image Version="1.0">
  <Disk_Parameters><Disk_size>{total}</Disk_size><Cylinders>1</Cylinders><Heads>16</Heads>
    <Sectors>32</Sectors><LogicSectorSize>512</LogicSectorSize>
    <UID>{{11111111-2222-3333-4444-555555555555}}</UID></Disk_Parameters>
  <StorageData>{storages}</StorageData>
  <Snapshots>{top}{shots}</Snapshots>
</Parallels_disk_image>
"""


def _bundle(tmp_path, name="b.hdd", extents=2, ext_sectors=4096, snaps=("{aaaa}",), files=None,
            top=None):
    root = tmp_path / name
    root.mkdir()
    storages = ""
    for i in range(extents):
        imgs = ""
        for s in snaps:
            fn = files[i] if files else f"{name}.{i}.{s}.hds"
            if not files:
                with Disk() as d:
                    d.create_base(str(root / fn), ext_sectors * 512, "Parallels",
                                  config={"ClusterSize": 64 * 1024})
            imgs += f"<Image><GUID>{s}</GUID><Type>Compressed</Type><File>{fn}</File></Image>"
        storages += (f"<Storage><Start>{i * ext_sectors}</Start><End>{(i + 1) * ext_sectors}</End>"
                     f"<Blocksize>128</Blocksize>{imgs}</Storage>")
    parent = "{00000000-0000-0000-0000-000000000000}"
    shots = ""
    for s in snaps:
        shots += f"<Shot><GUID>{s}</GUID><ParentGUID>{parent}</ParentGUID></Shot>"
        parent = s
    (root / "DiskDescriptor.xml").write_text(DESC.format(
        total=extents * ext_sectors, storages=storages, shots=shots,
        top=f"<TopGUID>{top}</TopGUID>" if top else ""))
    return root


def test_bundle_snapshots_current_state_and_writes(tmp_path, qemu):
    snaps = ("{aaaa}", "{bbbb}")
    root = _bundle(tmp_path, snaps=snaps)
    ext = 4096 * 512
    # base layer content, then snapshot layer content, written to the .hds files directly
    with Disk() as d:
        d.open(str(root / "b.hdd.0.{aaaa}.hds"))
        d.write(0, b"\x01" * 200000)
    with Disk() as d:       # into the snapshot layer through the bundle (cluster completed below)
        d.open(str(root), "Parallels")
        d.write(4096, b"\x02" * 512)
    with Disk() as d:
        d.open(str(root / "b.hdd.1.{aaaa}.hds"))
        d.write(ext - 512, b"\x03" * 512)
    expect = bytearray(2 * ext)
    expect[0:200000] = b"\x01" * 200000
    expect[4096:4608] = b"\x02" * 512
    expect[2 * ext - 512:] = b"\x03" * 512
    with Disk() as d:
        img = d.open(str(root), "Parallels", flags=OpenFlags.READ_ONLY)
        assert img.info()["snapshot_chain"] == list(snaps)
        assert "{bbbb}" in img.info()["state"]
        assert read_all(d) == bytes(expect)
    # writing through the bundle goes into the top snapshot, completing clusters from below
    with Disk() as d:
        d.open(str(root), "Parallels")
        d.write(65536 + 100 * 512, b"\x04" * 512)
        d.write(ext + 512, b"\x05" * 512)
    expect[65536 + 51200:65536 + 51712] = b"\x04" * 512
    expect[ext + 512:ext + 1024] = b"\x05" * 512
    with Disk() as d:
        d.open(str(root / "DiskDescriptor.xml"), flags=OpenFlags.READ_ONLY)
        assert read_all(d) == bytes(expect)
    base = qemu.to_raw(root / "b.hdd.0.{aaaa}.hds", tmp_path / "base.raw", "parallels").read_bytes()
    assert base[:200000] == b"\x01" * 200000 and base[65536 + 51200] == 1   # base untouched
    for n in os.listdir(root):
        if n.endswith(".hds"):
            assert qemu.check(root / n, "parallels").returncode == 0
    # TopGUID selects an older state: the base
    desc = (root / "DiskDescriptor.xml").read_text()
    (root / "DiskDescriptor.xml").write_text(desc.replace("<Snapshots>",
                                                          "<Snapshots><TopGUID>{aaaa}</TopGUID>"))
    with Disk() as d:
        d.open(str(root), "Parallels", flags=OpenFlags.READ_ONLY)
        assert d.read(4096, 4) == b"\x01" * 4


def test_hostile_descriptors(tmp_path):
    def write(root, text):
        (root / "DiskDescriptor.xml").write_text(text)

    root = _bundle(tmp_path, name="h.hdd", extents=1)
    good = (root / "DiskDescriptor.xml").read_text()
    fn = "h.hdd.0.{aaaa}.hds"
    for bad, err in ((f"/etc/{fn}", UnsafePath), (f"../{fn}", UnsafePath),
                     (f"..\\{fn}", UnsafePath), ("C:\\x.hds", UnsafePath),
                     ("missing.hds", VDError)):
        write(root, good.replace(f"<File>{fn}</File>", f"<File>{bad}</File>"))
        with pytest.raises(err):
            Disk().open(str(root), "Parallels", flags=OpenFlags.READ_ONLY)
    write(root, good.replace("</Parallels_disk_image>",
                             "<!--" + "x" * (2 << 20) + "--></Parallels_disk_image>"))
    with pytest.raises(CorruptImage, match="too large"):
        Disk().open(str(root), "Parallels", flags=OpenFlags.READ_ONLY)
    write(root, '<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaa">]>' + good.split("?>", 1)[1])
    with pytest.raises(CorruptImage, match="DTD"):
        Disk().open(str(root), "Parallels", flags=OpenFlags.READ_ONLY)
    write(root, good.replace("</Disk_Parameters>", ""))
    with pytest.raises(CorruptImage, match="well-formed"):
        Disk().open(str(root), "Parallels", flags=OpenFlags.READ_ONLY)
    write(root, good.replace("<End>4096</End>", "<End>99999999</End>"))
    with pytest.raises(CorruptImage):
        Disk().open(str(root), "Parallels", flags=OpenFlags.READ_ONLY)
    write(root, good.replace("<Start>0</Start>", "<Start>-5</Start>"))
    with pytest.raises(CorruptImage):
        Disk().open(str(root), "Parallels", flags=OpenFlags.READ_ONLY)
    write(root, good.replace("<Disk_size>4096</Disk_size>", "<Disk_size>8192</Disk_size>"))
    with pytest.raises(CorruptImage, match="cover"):
        Disk().open(str(root), "Parallels", flags=OpenFlags.READ_ONLY)
    write(root, good.replace("<Storage>", "<Storage>" * 1).replace(
        "<StorageData>",
        "<StorageData>" + "<Storage><Start>0</Start><End>1</End></Storage>" * 5000))
    with pytest.raises(CorruptImage, match="too many"):
        Disk().open(str(root), "Parallels", flags=OpenFlags.READ_ONLY)
    write(root, good.replace("<ParentGUID>{00000000-0000-0000-0000-000000000000}</ParentGUID>",
                             "<ParentGUID>{aaaa}</ParentGUID>"))
    with pytest.raises(VDError):
        Disk().open(str(root), "Parallels", flags=OpenFlags.READ_ONLY)


def _hdd_bytes(tmp_path) -> bytearray:
    p = tmp_path / "src.hdd"
    with _make(p, 4 * MiB) as d:
        d.write(0, b"\x5a" * 4096)
    return bytearray(p.read_bytes())


def _open_bytes(tmp_path, b):
    p = tmp_path / "hostile.hdd"
    p.write_bytes(bytes(b))
    with Disk() as d:
        d.open(str(p), "Parallels", flags=OpenFlags.READ_ONLY)
        return read_all(d)


def test_hostile_headers(tmp_path):
    b = _hdd_bytes(tmp_path)
    cases = [
        (32, 0x7FFFFFFF, "BAT too large"),                # bat_entries huge
        (32, 0x100000, "BAT lies past the end"),          # more entries than the file holds
        (32, 1, "BAT too small"),                          # fewer entries than the disk needs
        (28, 0, "cluster size"),                           # tracks 0 (a divisor)
        (28, 0x7FFFFFFF, "cluster size"),                  # absurd cluster
        (48, 0, "data_off must be set"),
        (48, 3, "cluster aligned"),
        (16, 3, "version"),
    ]
    for off, value, msg in cases:
        bad = bytearray(b)
        struct.pack_into("<I", bad, off, value)
        with pytest.raises(CorruptImage, match=msg):
            _open_bytes(tmp_path, bad)
    bad = bytearray(b)
    struct.pack_into("<I", bad, 64, 0xFFFFFF)                # BAT[0] far past EOF
    with pytest.raises(CorruptImage, match=r"BAT\[0\].*outside"):
        _open_bytes(tmp_path, bad)
    with pytest.raises(CorruptImage):
        _open_bytes(tmp_path, b[:40])


def test_backend_declarations(tmp_path):
    b = get_backend("parallels")
    assert b.name == "Parallels" and b.default_extension() == "hdd"
    with Disk() as d:
        d.create_base(str(tmp_path / "x.hdd"), MiB, "Parallels")
        with pytest.raises(NotSupported):
            d.create_diff(str(tmp_path / "y.hdd"))


def test_compact(tmp_path, qemu):
    from vdgui.vd.ops.compact import compact
    p = tmp_path / "cp.hdd"
    with _make(p, 6 * MiB) as d:
        for i in range(6):
            d.write(i * MiB, bytes([i + 1]) * MiB)
        for i in (0, 3):
            d.write(i * MiB, bytes(MiB))
        expect = read_all(d)
    before = os.path.getsize(p)
    compact(str(p), format="Parallels")
    assert os.path.getsize(p) == before - 2 * MiB
    assert qemu.check(p, "parallels").returncode == 0
    assert qemu.to_raw(p, tmp_path / "c.raw", "parallels").read_bytes() == expect
    with Disk() as d:
        img = d.open(str(p), flags=OpenFlags.READ_ONLY)
        assert read_all(d) == expect
        assert list(img.bat[:6]).count(0) == 2


def test_format_extension_read_only(tmp_path, qemu):
    """An image with a format extension cluster (dirty bitmaps) reads normally, checks clean,
    and is refused for writing (its bitmaps would go stale)."""
    p = tmp_path / "ext.hdd"
    with _make(p, 4 * MiB) as d:
        d.write(0, b"\x42" * 4096)
    b = bytearray(p.read_bytes())
    eo = len(b)
    body = bytes(MiB - 24)                     # "end of features" (all zero), then padding
    b += struct.pack("<Q", prl.EXT_MAGIC) + hashlib.md5(body).digest() + body
    struct.pack_into("<Q", b, 56, eo // 512)
    p.write_bytes(bytes(b))
    # qemu 7.2 accepts the extension (magic, MD5) but counts its cluster as leaked (exit 3)
    assert qemu.check(p, "parallels").returncode in (0, 3)
    assert qemu.to_raw(p, tmp_path / "e.raw", "parallels").read_bytes()[:4] == b"\x42" * 4
    with Disk() as d:
        img = d.open(str(p), flags=OpenFlags.READ_ONLY)
        assert d.read(0, 4) == b"\x42" * 4
        assert not img.check().problems
        assert img.info()["format_extension_offset"] == eo
    with pytest.raises(NotSupported, match="format extension"):
        Disk().open(str(p))
    struct.pack_into("<Q", b, eo, 1234)
    p.write_bytes(bytes(b))
    with pytest.raises(CorruptImage, match="magic"):
        Disk().open(str(p), flags=OpenFlags.READ_ONLY)


def test_bundle_with_plain_extent(tmp_path):
    root = tmp_path / "pl.hdd"
    root.mkdir()
    (root / "pl.0.hds").write_bytes(b"\x61" * 8192 + bytes(8192))
    with Disk() as d:
        d.create_base(str(root / "pl.1.hds"), 16384, "Parallels", config={"ClusterSize": 4096})
        d.write(4096, b"\x62" * 512)
    storages = ("<Storage><Start>0</Start><End>32</End><Image><GUID>{a}</GUID><Type>Plain</Type>"
                "<File>pl.0.hds</File></Image></Storage>"
                "<Storage><Start>32</Start><End>64</End><Image><GUID>{a}</GUID>"
                "<Type>Compressed</Type><File>pl.1.hds</File></Image></Storage>")
    (root / "DiskDescriptor.xml").write_text(DESC.format(
        total=64, storages=storages, top="",
        shots="<Shot><GUID>{a}</GUID><ParentGUID>{00000000-0000-0000-0000-000000000000}"
              "</ParentGUID></Shot>"))
    with Disk() as d:
        img = d.open(str(root))
        assert img.size == 64 * 512
        d.write(8192 + 100, b"\x63" * 10)          # into the flat extent
        d.write(16384 + 8192, b"\x64" * 512)        # into the expanding extent
        data = read_all(d)
    expect = bytearray(b"\x61" * 8192 + bytes(8192) + bytes(16384))
    expect[8292:8302] = b"\x63" * 10
    expect[16384 + 4096:16384 + 4608] = b"\x62" * 512
    expect[16384 + 8192:16384 + 8704] = b"\x64" * 512
    assert data == bytes(expect)
    assert (root / "pl.0.hds").read_bytes()[8292:8302] == b"\x63" * 10
    (root / "DiskDescriptor.xml").write_text(
        (root / "DiskDescriptor.xml").read_text().replace("<Type>Plain</Type>",
                                                          "<Type>Weird</Type>"))
    with pytest.raises(NotSupported, match="Weird"):
        Disk().open(str(root), flags=OpenFlags.READ_ONLY)


@pytest.mark.skipif(not kh.have_strace(), reason="strace is not installed")
def test_interrupted_writes_leave_readable_image(tmp_path, qemu):
    """A write session killed at every syscall that changes the file (tests/engine/
    kill_harness.py): the image reads old-or-new data per sector, and neither our check nor
    qemu-img check calls it corrupt, before or after a read-write open (no in_use left set)."""
    tpl = tmp_path / "tpl"
    tpl.mkdir()
    with _make(tpl / "i.hdd", 3 * MiB) as d:
        d.write(MiB, b"\x01" * MiB)
    writes = [(512, b"\x02" * 512), (MiB + 4096, b"\x03" * MiB), (0, bytes(MiB))]
    new = bytearray(bytes(MiB) + b"\x01" * MiB + bytes(MiB))
    states = [bytes(new)]
    for off, data in writes:
        new[off:off + len(data)] = data
        states.append(bytes(new))

    def fn_for(work):
        def fn():
            img = get_backend("Parallels").open(str(work / "i.hdd"), OpenFlags.NORMAL)
            try:
                for off, data in writes:
                    img.write(off, data, None)
            finally:
                img.close()
            return 0
        return fn

    def judge(work, finished):
        p = work / "i.hdd"
        with Disk() as d:
            d.open(str(p), flags=OpenFlags.READ_ONLY)
            got = read_all(d)
        for pos in range(0, 3 * MiB, 512):
            assert any(got[pos:pos + 512] == st[pos:pos + 512] for st in states), pos
        assert not finished or got == states[-1]
        for _ in range(2):                          # as the kill left it, then opened read-write
            r = qemu.check(p, "parallels")
            assert r.returncode in (0, 3), r.stdout + r.stderr      # 3: a leaked cluster only
            assert not check(str(p)).corrupt
            with Disk() as d:
                d.open(str(p))
        return []
    all_points, outcomes = kh.campaign(tmp_path, tpl, fn_for, judge, points=None)
    bad = [f"kill at {o.point}: {p}" for o in outcomes for p in o.problems]
    assert not bad, "\n".join(bad)
    assert sum(p.name in kh.WRITES for p in all_points) >= 5
    assert sum(o.killed for o in outcomes) >= 0.9 * len(outcomes)


def test_bundle_compact_and_check_through_ops(tmp_path, qemu):
    from vdgui.vd.ops.compact import compact
    from vdgui.vd.ops.repair import check
    p = tmp_path / "c.hdd"
    with Disk() as d:
        d.create_base(str(p), 4 * MiB, "Parallels", config={"Bundle": 1})
        d.write(0, b"\x01" * (3 * MiB))
        d.write(MiB, bytes(MiB))
        expect = read_all(d)
    hds = next(p.glob("*.hds"))
    before = os.path.getsize(hds)
    compact(str(p), format="Parallels")
    assert os.path.getsize(hds) == before - MiB
    assert check(str(p), format="Parallels").exit_code == 0
    with Disk() as d:
        d.open(str(p), flags=OpenFlags.READ_ONLY)
        assert read_all(d) == expect
    assert qemu.check(hds, "parallels").returncode == 0
    with pytest.raises(NotSupported), Disk() as d:
        d.open(str(p))
        d.top.resize(8 * MiB)
