"""DMG (UDIF) reading: real hdiutil images, every chunk type, and hostile inputs."""
from __future__ import annotations

import hashlib
import plistlib
import struct
import zlib

import pytest

from tests.conftest import read_all
from vdgui.vd import CorruptImage, Disk, NotSupported, OpenFlags, VDError, probe
from vdgui.vd.formats import dmg  # tests may look inside a format module

COMPRESSION_SAMPLES = ["compression-raw", "compression-zlib", "compression-bz2",
                       "compression-adc", "compression-lzfse"]


def _open(path) -> Disk:
    d = Disk()
    d.open(str(path), flags=OpenFlags.READ_ONLY)
    return d


@pytest.mark.corpus
def test_every_chunk_type_gives_the_same_disk(corpus):
    """hdiutil wrote one disk as UDRO, UDZO, UDBZ, UDCO (ADC) and ULFO: all must read the same."""
    digests = {}
    for name in COMPRESSION_SAMPLES:
        with _open(corpus / "dmg" / "node-udif" / f"{name}.dmg") as d:
            assert d.top.format == "DMG"
            digests[name] = hashlib.sha256(read_all(d)).hexdigest()
    assert len(set(digests.values())) == 1, digests


@pytest.mark.corpus
@pytest.mark.parametrize("name", ["dfvfs/hfsplus_zlib.dmg", "dfvfs/hfsplus_zlib.v1.dmg",
                                  "node-udif/compression-zlib.dmg", "node-udif/gpt.dmg",
                                  "node-udif/raw.dmg", "node-udif/zlib-compressed.dmg",
                                  "node-udif/encrypted.dmg"])
def test_reads_like_qemu(corpus, qemu, tmp_path, name):
    path = corpus / "dmg" / name
    ref = qemu.to_raw(path, tmp_path / "ref.raw", fmt="dmg").read_bytes()
    with _open(path) as d:
        assert probe(str(path)).name == "DMG"
        assert d.size == len(ref)
        assert read_all(d, chunk=300 * 1024) == ref
        info = d.info()
        assert info["device_type"] == "optical"
        assert info["details"]["chunk_types"]


def test_adc_decoder():
    # literal "abc", then a 2-byte back-reference: length 3+3=6, distance 3 -> "abcabcabc"
    src = bytes([0x82]) + b"abc" + bytes([(3 << 2) | 0, 2])
    assert dmg.adc_decompress(src, 9) == b"abcabcabc"
    # 3-byte form: length 0+4, distance 0x0002+1
    src = bytes([0x82]) + b"xyz" + bytes([0x40, 0x00, 0x02])
    assert dmg.adc_decompress(src, 7) == b"xyzxyzx"
    with pytest.raises(ValueError):
        dmg.adc_decompress(bytes([0x00, 0x10]), 10)   # distance before the start


def test_trailer_round_trip(corpus):
    raw = (corpus / "dmg" / "node-udif" / "raw.dmg").read_bytes()[-512:]
    assert dmg.KolyTrailer.build(dmg.KolyTrailer.parse(raw)) == raw


# -- hostile inputs: a tiny DMG built here, then damaged ------------------------------------
def make_dmg(chunks, sector_count=None, xml_length_override=None):
    """chunks: list of (type, sectors, payload). Returns the bytes of a UDIF image."""
    data = bytearray()
    entries = []
    sector = 0
    for ctype, sectors, payload in chunks:
        entries.append((ctype, sector, sectors, len(data), len(payload)))
        data += payload
        sector += sectors
    entries.append((dmg.CHUNK_END, sector, 0, len(data), 0))
    mish = dmg.MishHeader.build(dict(version=1, first_sector=0, sector_count=sector, data_offset=0,
                                     buffers_needed=0, block_descriptors=0, reserved=bytes(24),
                                     checksum_type=0, checksum_size=0, checksum=bytes(128),
                                     chunk_count=len(entries)))
    for ctype, sec, cnt, off, ln in entries:
        mish += struct.pack(">IIQQQQ", ctype, 0, sec, cnt, off, ln)
    xml = plistlib.dumps({"resource-fork": {"blkx": [{"Data": mish, "Name": "disk", "ID": "0"}]}})
    xml_off = len(data)
    koly = dmg.KolyTrailer.build(dict(
        version=4, header_size=512, flags=1, running_data_fork_offset=0, data_fork_offset=0,
        data_fork_length=len(data), rsrc_fork_offset=0, rsrc_fork_length=0, segment_number=1,
        segment_count=1, segment_id=bytes(16), data_checksum_type=0, data_checksum_size=0,
        data_checksum=bytes(128), xml_offset=xml_off,
        xml_length=xml_length_override if xml_length_override is not None else len(xml),
        reserved1=bytes(120), checksum_type=0, checksum_size=0, checksum=bytes(128),
        image_variant=1, sector_count=sector if sector_count is None else sector_count,
        reserved2=bytes(12)))
    return bytes(data) + xml + koly


def test_synthetic_dmg_reads(tmp_path):
    payload = bytes(range(256)) * 4
    p = tmp_path / "ok.dmg"
    p.write_bytes(make_dmg([(dmg.CHUNK_ZLIB, 2, zlib.compress(payload)),
                            (dmg.CHUNK_ZERO, 3, b""), (dmg.CHUNK_RAW, 2, payload)]))
    with _open(p) as d:
        assert read_all(d) == payload + bytes(3 * 512) + payload


@pytest.mark.parametrize("case,what", [
    ("bomb", "too large"),
    ("past_end", "past the end"),
    ("plist_huge", "too large"),
    ("bad_zlib", "does not decompress"),
    ("short_raw", "shorter"),
    ("truncated", "trailer"),
])
def test_hostile_dmg(tmp_path, case, what):
    payload = bytes(1024)
    if case == "bomb":
        blob = make_dmg([(dmg.CHUNK_ZLIB, (dmg.MAX_CHUNK // 512) + 1, zlib.compress(b"\0" * 100))])
    elif case == "past_end":
        good = make_dmg([(dmg.CHUNK_RAW, 2, payload)])
        # rebuild the plist with the chunk's compressed length running far past the file's end
        ent = bytearray(plistlib.loads(good[1024:-512])["resource-fork"]["blkx"][0]["Data"])
        struct.pack_into(">Q", ent, dmg.MISH_HEADER_SIZE + 32, 1 << 30)
        xml = plistlib.dumps({"resource-fork": {"blkx": [{"Data": bytes(ent), "Name": "d"}]}})
        koly = dmg.KolyTrailer.parse(good[-512:])
        koly.xml_length = len(xml)
        blob = good[:1024] + xml + dmg.KolyTrailer.build(koly)
    elif case == "plist_huge":
        blob = make_dmg([(dmg.CHUNK_RAW, 2, payload)], xml_length_override=dmg.MAX_PLIST + 1)
    elif case == "bad_zlib":
        blob = make_dmg([(dmg.CHUNK_ZLIB, 2, b"not zlib at all")])
    elif case == "short_raw":
        blob = make_dmg([(dmg.CHUNK_RAW, 4, payload)])
    else:
        blob = make_dmg([(dmg.CHUNK_RAW, 2, payload)])[:-100]
    p = tmp_path / f"{case}.dmg"
    p.write_bytes(blob)
    with pytest.raises(VDError) as exc, Disk() as d:
        d.open(str(p), "DMG", flags=OpenFlags.READ_ONLY)
        read_all(d)
    assert what in str(exc.value)
    assert isinstance(exc.value, (CorruptImage, NotSupported))


def test_dmg_is_read_only(tmp_path):
    p = tmp_path / "ro.dmg"
    p.write_bytes(make_dmg([(dmg.CHUNK_RAW, 2, bytes(1024))]))
    with pytest.raises(NotSupported):
        Disk().open(str(p))
