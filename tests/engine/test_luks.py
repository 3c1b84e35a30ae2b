"""LUKS engine (issue #17, vdgui/vd/crypto): vectors, anti-forensic split, LUKS1 create /
unlock / keyslots, LUKS2 headers made by cryptsetup (pbkdf2 and argon2id), and hostile headers
(each a clear error, fast, without a large allocation)."""
from __future__ import annotations

import hashlib
import json
import shutil
import struct
import subprocess
import time

import pytest

from vdgui.vd import (
    CorruptImage,
    Disk,
    NotSupported,
    OpenFlags,
    PassphraseProvider,
    VDError,
    WrongPassphrase,
    using_passphrases,
)
from vdgui.vd.crypto import luks
from vdgui.vd.crypto import luks_layout as L
from vdgui.vd.crypto import primitives as P
from vdgui.vd.crypto.cipher import SectorCipher


def _reader(buf):
    return lambda off, n: bytes(buf[off:off + n])


def _writer(buf):
    def write(off, data):
        buf[off:off + len(data)] = data
    return write


# -- primitives ---------------------------------------------------------------------------------
def test_xts_ieee1619_vector_through_sector_cipher():
    # IEEE P1619/D16 annex B, XTS-AES-128 vectors 2 and 3 (one 32-byte data unit each);
    # vector 1's equal key halves are refused (OpenSSL refuses them too)
    with pytest.raises(NotSupported, match="halves"):
        SectorCipher("aes", "xts-plain64", bytes(32), unit=32)
    c3 = SectorCipher("aes", "xts-plain64", bytes.fromhex("fffefdfcfbfaf9f8f7f6f5f4f3f2f1f0")
                      + b"\x22" * 16, unit=32)
    assert c3.encrypt(b"\x44" * 32, 0x3333333333).hex() == (
        "af85336b597afc1a900b2eb21ec949d292df4c047e0b21532186a5971a227a89")
    c2 = SectorCipher("aes", "xts-plain64", b"\x11" * 16 + b"\x22" * 16, unit=32)
    ct = c2.encrypt(b"\x44" * 32, 0x3333333333)
    assert ct.hex() == "c454185e6a16936e39334038acef838bfb186fff7480adc4289382ecd6d394f0"
    assert c2.decrypt(ct, 0x3333333333) == b"\x44" * 32


def test_essiv_and_plain_ivs_as_dm_crypt_defines_them():
    key = bytes(range(32))
    c = SectorCipher("aes", "cbc-essiv:sha256", key)
    data = bytes(range(256)) * 4                      # two sectors
    ct = c.encrypt(data, 7)
    # by hand: IV = AES-ECB(sha256(key), le64(sector)), CBC per sector
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    salt = hashlib.sha256(key).digest()
    for i in range(2):
        iv = P.ecb_encrypt(salt, struct.pack("<Q", 7 + i) + bytes(8))
        e = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
        assert ct[512 * i:512 * (i + 1)] == e.update(data[512 * i:512 * (i + 1)])
    assert c.decrypt(ct, 7) == data


def test_pbkdf2_rfc6070_vector():
    assert P.pbkdf2("sha1", b"password", b"salt", 4096, 20).hex() == (
        "4b007901b765489abead49d926f721d065a429c1")


def test_af_split_merge_round_trip():
    key = bytes(range(64))
    split = luks.af_split(key, 4000, "sha256")
    assert len(split) == 64 * 4000
    assert luks.af_merge(split, 64, 4000, "sha256") == key
    damaged = bytearray(split)
    damaged[1234] ^= 1
    assert luks.af_merge(bytes(damaged), 64, 4000, "sha256") != key


# -- LUKS1 --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def luks1():
    area, mk = luks.create1(b"first", iter_time_ms=5)
    return area, mk


def test_luks1_create_parse_unlock(luks1):
    area, mk = luks1
    assert len(area) == 4040 * 512                   # qemu's payload offset for a 64-byte key
    h = luks.parse(_reader(area), len(area), "x")
    assert (h.version, h.cipher, h.mode, h.hash, h.key_bytes) == (
        1, "aes", "xts-plain64", "sha256", 64)
    assert [s.index for s in h.slots if s.active] == [0]
    assert [s.offset // 512 for s in h.slots] == [8 + 504 * i for i in range(8)]
    assert h.unlock(b"first", _reader(area)) == mk
    assert h.unlock(b"First", _reader(area)) is None
    assert h.build() == area[:592]
    assert L.Luks1Header.build(L.Luks1Header.parse(area[:592])) == area[:592]


def test_luks1_add_then_remove_keyslot(luks1):
    area, mk = bytearray(luks1[0]), luks1[1]
    h = luks.parse(_reader(area), len(area), "x")
    assert h.add_slot(mk, b"second", _writer(area), 5) == 1
    h = luks.parse(_reader(area), len(area), "x")
    assert h.unlock(b"second", _reader(area)) == mk
    assert h.unlock(b"first", _reader(area)) == mk
    material = area[h.slots[0].offset:h.slots[0].offset + 64 * 4000]
    h.remove_slot(0, _writer(area))
    h = luks.parse(_reader(area), len(area), "x")
    assert h.unlock(b"first", _reader(area)) is None
    assert h.unlock(b"second", _reader(area)) == mk
    assert area[h.slots[0].offset:h.slots[0].offset + 64 * 4000] != material   # wiped


def test_damaged_key_material_is_a_wrong_passphrase(luks1):
    area = bytearray(luks1[0])
    h = luks.parse(_reader(area), len(area), "disk.luks")
    area[h.slots[0].offset + 100] ^= 0xFF
    with PassphraseProvider([b"first"]) as prov, using_passphrases(prov), \
            pytest.raises(WrongPassphrase, match="disk.luks: wrong passphrase"):
        luks.unlock(h, _reader(area), "disk.luks")


def _hostile1(luks1, **changes):
    h = L.Luks1Header.parse(luks1[0][:592])
    slots = [dict(s) for s in h.slots]
    for k, v in changes.items():
        if k.startswith("slot0_"):
            slots[0][k[6:]] = v
        else:
            h[k] = v
    h["slots"] = slots
    raw = bytearray(luks1[0])
    raw[:592] = L.Luks1Header.build(h)
    return raw


@pytest.mark.parametrize("changes, error", [
    ({"key_bytes": 4096}, "key size out of range"),
    ({"payload_offset": 1 << 31}, "payload offset is past the end"),
    ({"mk_digest_iter": 0xFFFFFFFF}, "iterations out of range"),
    ({"slot0_iterations": 0xFFFFFFFF}, "iterations out of range"),
    ({"slot0_stripes": 0}, "stripes out of range"),
    ({"slot0_stripes": 0xFFFFFFFF}, "stripes out of range"),
    ({"slot0_key_offset": 0x7FFFFFFF}, "outside the LUKS area"),
    ({"slot0_active": 0x12345678}, "state is invalid"),
    ({"hash_spec": b"md4".ljust(32, b"\0")}, "hash 'md4' is not supported"),
    ({"cipher_name": b"twofish".ljust(32, b"\0")}, "cipher 'twofish' is not supported"),
    ({"cipher_mode": b"ecb".ljust(32, b"\0")}, "mode 'ecb' is not supported"),
])
def test_hostile_luks1_headers_are_refused_fast(luks1, changes, error):
    raw = _hostile1(luks1, **changes)
    t = time.monotonic()
    with pytest.raises(VDError, match=error):
        luks.parse(_reader(raw), len(raw), "h.luks")
    assert time.monotonic() - t < 1


def test_truncated_headers(luks1):
    for n in (0, 7, 100, 591):
        with pytest.raises(CorruptImage):
            luks.parse(_reader(luks1[0][:n]), n, "t.luks")
    # header whole, key material cut off: payload and slots lie past the end
    with pytest.raises(CorruptImage, match="past the end"):
        luks.parse(_reader(luks1[0][:8192]), 8192, "t.luks")


def test_kdf_costs_are_capped_before_any_work():
    t = time.monotonic()
    with pytest.raises(CorruptImage, match="memory"):
        P.argon2("argon2id", b"pw", bytes(16), 4, 4 << 30, 4, 32, "x")      # 4 TiB
    with pytest.raises(CorruptImage, match="time"):
        P.argon2("argon2id", b"pw", bytes(16), 1 << 31, 1024, 1, 32, "x")
    with pytest.raises(CorruptImage, match="cpus"):
        P.argon2("argon2i", b"pw", bytes(16), 1, 1 << 20, 1 << 20, 32, "x")
    with pytest.raises(CorruptImage, match="iteration"):
        P.pbkdf2("sha256", b"pw", bytes(16), 0xFFFFFFFF, 32, "x")
    assert time.monotonic() - t < 1


# -- LUKS2 (cryptsetup makes the headers) --------------------------------------------------------
def _cryptsetup():
    path = shutil.which("cryptsetup")
    if path is None:
        pytest.fail("cryptsetup is not installed: install Debian's cryptsetup-bin "
                    "(bash scripts/bootstrap test does)", pytrace=False)
    return path


def _luks2(tmp_path, name, *kdf):
    img = tmp_path / name
    key = tmp_path / "key"
    key.write_bytes(b"secret2")
    with open(img, "wb") as f:
        f.truncate(20 << 20)
    subprocess.run([_cryptsetup(), "luksFormat", "-q", "--type", "luks2", *kdf,
                    "--key-file", str(key), str(img)], check=True, capture_output=True)
    r = subprocess.run([_cryptsetup(), "luksDump", "--dump-volume-key", "--batch-mode",
                        "--key-file", str(key), str(img)], check=True, capture_output=True,
                       text=True)
    dump = r.stdout.split("MK dump:", 1)[1]
    mk = bytes.fromhex("".join(dump.replace(":", " ").split()[:64]))
    return img, mk


@pytest.mark.parametrize("kdf", [
    ("--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"),
    ("--pbkdf", "argon2id", "--pbkdf-memory", "32768", "--pbkdf-force-iterations", "4"),
    ("--pbkdf", "argon2i", "--pbkdf-memory", "16384", "--pbkdf-force-iterations", "4"),
], ids=["pbkdf2", "argon2id", "argon2i"])
def test_luks2_from_cryptsetup_unlocks_to_its_volume_key(tmp_path, kdf):
    img, mk = _luks2(tmp_path, "l2.img", *kdf)
    data = img.read_bytes()
    h = luks.parse(_reader(data), len(data), str(img))
    assert h.version == 2 and h.kind == "luks2"
    assert h.slots[0].kdf == kdf[1]
    assert h.unlock(b"secret2", _reader(data)) == mk
    assert h.unlock(b"secret3", _reader(data)) is None
    assert L.Luks2Binary.build(L.Luks2Binary.parse(data[:4096])) == data[:4096]


def test_luks2_container_reads_back_what_it_wrote(tmp_path):
    """The raw LUKS backend on a cryptsetup-made LUKS2 file (4096-byte sectors): data written
    through it is ciphertext in the file, IVs counting 512-byte sectors (no
    iv_large_sectors), checked with cryptography directly."""
    img, mk = _luks2(tmp_path, "l2.img", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000")
    marker = b"PLAINTEXT-MARKER" * 512                 # 8 KiB
    with PassphraseProvider([b"wrong", b"secret2"]) as prov:
        with Disk.open_chain(str(img), None, OpenFlags.NORMAL, passphrases=prov) as d:
            assert d.info()["encryption"]["format"] == "luks2"
            d.write(8192 + 100, marker)
        with Disk.open_chain(str(img), None, OpenFlags.READ_ONLY, passphrases=prov) as d:
            assert d.read(8192 + 100, len(marker)) == marker
    raw = img.read_bytes()
    assert b"PLAINTEXT-MARKER" not in raw
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    payload = 16 << 20
    unit = raw[payload + 8192:payload + 12288]
    dec = Cipher(algorithms.AES(mk), modes.XTS(struct.pack("<Q", 8192 // 512) + bytes(8)))
    plain = dec.decryptor().update(unit)
    assert plain[100:116] == b"PLAINTEXT-MARKER"


def _rehash2(raw: bytearray, meta_bytes: bytes) -> None:
    size = struct.unpack_from(">Q", raw, 8)[0]
    raw[4096:size] = meta_bytes.ljust(size - 4096, b"\0")
    raw[448:512] = bytes(64)
    raw[448:480] = hashlib.sha256(bytes(raw[:size])).digest()
    raw[size:2 * size] = bytes(size)                  # no valid second copy


def test_hostile_luks2_headers(tmp_path):
    img, _mk = _luks2(tmp_path, "l2.img", "--pbkdf", "argon2id", "--pbkdf-memory", "32768",
                      "--pbkdf-force-iterations", "4")
    good = bytearray(img.read_bytes())
    size = struct.unpack_from(">Q", good, 8)[0]
    meta = json.loads(bytes(good[4096:size]).rstrip(b"\0"))

    def variant(mutate):
        raw = bytearray(good)
        m = json.loads(json.dumps(meta))
        text = mutate(m)
        _rehash2(raw, text if isinstance(text, bytes) else json.dumps(m).encode())
        return raw

    def huge_memory(m):
        m["keyslots"]["0"]["kdf"]["memory"] = 4 << 30          # 4 TiB in KiB
    def huge_stripes(m):
        m["keyslots"]["0"]["af"]["stripes"] = 1 << 40
    def area_outside(m):
        m["keyslots"]["0"]["area"]["offset"] = str(1 << 50)
    cases = [(lambda m: b"{not json", "not JSON"), (huge_memory, "memory"),
             (huge_stripes, "anti-forensic"), (area_outside, "outside the LUKS area"),
             (lambda m: b"[1, 2]", "not an object")]
    for mutate, error in cases:
        raw = variant(mutate)
        t = time.monotonic()
        with pytest.raises(VDError, match=error):
            h = luks.parse(_reader(raw), len(raw), "h2")
            h.unlock(b"secret2", _reader(raw))
        assert time.monotonic() - t < 2, error
    # a checksum that does not hold, in both copies
    raw = bytearray(good)
    raw[5000] ^= 1
    raw[size + 5000] ^= 1
    with pytest.raises(CorruptImage, match="checksum"):
        luks.parse(_reader(raw), len(raw), "h2")
    # a header size out of range: the secondary copy is used; without one, refused
    raw = bytearray(good)
    struct.pack_into(">Q", raw, 8, 1 << 40)
    assert luks.parse(_reader(raw), len(raw), "h2").version == 2
    raw[size:size + 6] = bytes(6)
    with pytest.raises(CorruptImage, match="no LUKS2 header copy"):
        luks.parse(_reader(raw), len(raw), "h2")


def test_primary_damaged_secondary_used(tmp_path):
    img, mk = _luks2(tmp_path, "l2.img", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000")
    raw = bytearray(img.read_bytes())
    raw[4096 + 10] ^= 0x55                            # primary JSON: checksum fails
    h = luks.parse(_reader(raw), len(raw), "l2")
    assert h.unlock(b"secret2", _reader(raw)) == mk


@pytest.mark.parametrize("kdf", [
    ("--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"),
    ("--pbkdf", "argon2id", "--pbkdf-memory", "32768", "--pbkdf-force-iterations", "4"),
], ids=["pbkdf2", "argon2id"])
def test_luks2_passphrase_change_cryptsetup_accepts(tmp_path, kdf):
    """set on a cryptsetup-made LUKS2 file: a keyslot for the new passphrase (same KDF and
    costs), the old one removed; cryptsetup opens the header with the new passphrase to the
    same volume key, and not with the old."""
    img, mk = _luks2(tmp_path, "l2.img", *kdf)
    with PassphraseProvider([b"secret2"], new=b"brand-new") as prov, using_passphrases(prov):
        with Disk.open_chain(str(img), None, OpenFlags.NORMAL) as d:
            d.write(4096, b"DATA" * 1024)
            new_slot = d.top.change_passphrase()
    assert new_slot == 1
    (tmp_path / "new").write_bytes(b"brand-new")
    r = subprocess.run([_cryptsetup(), "luksDump", "--dump-volume-key", "--batch-mode",
                        "--key-file", str(tmp_path / "new"), str(img)], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    dump = r.stdout.split("MK dump:", 1)[1]
    assert bytes.fromhex("".join(dump.replace(":", " ").split()[:64])) == mk
    r = subprocess.run([_cryptsetup(), "luksDump", "--dump-volume-key", "--batch-mode",
                        "--key-file", str(tmp_path / "key"), str(img)], capture_output=True,
                       text=True)
    assert r.returncode != 0
    r = subprocess.run([_cryptsetup(), "luksDump", "--dump-json-metadata", str(img)],
                       capture_output=True, text=True, check=True)
    meta = json.loads(r.stdout)
    assert sorted(meta["keyslots"]) == ["1"] and meta["keyslots"]["1"]["kdf"]["type"] == kdf[1]
    with PassphraseProvider([b"brand-new"]) as prov, \
            Disk.open_chain(str(img), None, OpenFlags.READ_ONLY, passphrases=prov) as d:
        assert d.read(4096, 4096) == b"DATA" * 1024



@pytest.mark.parametrize("chain,key_bytes,unit", [("xts", 64, 512), ("xts", 32, 4096),
                                                   ("cbc", 32, 512), ("cbc", 24, 512),
                                                   ("cbc", 16, 4096)])
@pytest.mark.parametrize("path", ["evp", "cipher"])
def test_bulk_units_match_cryptography_unit_by_unit(chain, key_bytes, unit, path):
    """aes_units, through OpenSSL's EVP (one context, a new IV per unit) and through the
    fallback (one ``Cipher`` per unit), gives what cryptography's Cipher gives, unit by unit,
    both ways."""
    import os

    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    key = os.urandom(key_bytes)
    data = os.urandom(unit * 9)
    ivs = os.urandom(16 * 9)
    evp = P._evp()
    assert evp, "OpenSSL's EVP through cffi is not used: every unit pays a key schedule"
    if path == "evp":
        def run(d, encrypt):
            return P._evp_units(evp, chain, key, d, ivs, unit, encrypt)
    else:
        def run(d, encrypt):
            return P._cipher_units(chain, key, d, ivs, unit, encrypt)
    mode = modes.XTS if chain == "xts" else modes.CBC
    ct = run(data, True)
    for i in range(9):
        e = Cipher(algorithms.AES(key), mode(ivs[16 * i:16 * i + 16])).encryptor()
        assert ct[unit * i:unit * (i + 1)] == e.update(data[unit * i:unit * (i + 1)])
    assert run(ct, False) == data
    assert P.aes_units(chain, key, ct, ivs, unit, False) == data
    assert P.aes_units(chain, key, b"", b"", unit, True) == b""
    with pytest.raises(ValueError, match="IVs"):
        P.aes_units(chain, key, data, ivs[:-16], unit, True)


def test_counter_ivs_plain64_plain_and_step():
    from vdgui.vd.crypto.cipher import counter_ivs
    assert counter_ivs(5, 3) == b"".join((5 + i).to_bytes(16, "little") for i in range(3))
    assert counter_ivs(2, 2, step=8) == (2).to_bytes(16, "little") + (10).to_bytes(16, "little")
    # plain: 32 bits, wraps as dm-crypt's does
    assert counter_ivs(0xFFFFFFFF, 2, bits=32) == (
        (0xFFFFFFFF).to_bytes(16, "little") + bytes(16))
    assert counter_ivs(1 << 40, 1) == (1 << 40).to_bytes(16, "little")
    assert counter_ivs(7, 0) == b""
