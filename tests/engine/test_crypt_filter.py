"""Issue #17: the filter chain and VirtualBox's CRYPT filter (docs/design-encryption.md §1.5).

No VirtualBox-encrypted image with a known passphrase is published: the key store is tested
against the two published key stores, the data path by round trips and by decrypting stored
sectors with ``cryptography`` directly (tweak = disk offset / 512)."""
from __future__ import annotations

import base64
import time
from pathlib import Path

import pytest

import vdgui.vd as vd
from tests.conftest import pattern, read_all
from vdgui.vd.filters.keystore_layout import KeyStoreStruct

MiB = 1 << 20
ALGO = "AES-XTS256-PLAIN64"
MARKER = b"MERGED-THROUGH-THE-FILTER" * 20

# sinfocol/vboxdie-cracker README.md (VirtualBox 5.0, passphrase "123", 2000/2000 iterations)
VBOXDIE = """U0NORQABQUVTLVhUUzI1Ni1QTEFJTjY0AAAAAAAAAAAAAAAAAABQQktERjItU0hB
MjU2AAAAAAAAAAAAAAAAAAAAAAAAAEAAAAASAniX2ss6TE/u9IdinWigcwAg2bXe
dJRAjHr5mvCCiSAAAAAntQHDFvSfwpay/jKFVzUWc4GsIJ/RwMg+XkG2b/PDWtAH
AACKj0qUg37sG7TWmi58n/rcXmWVNt9FqBxGZiz2a+leWNAHAABAAAAA6qVV8nOu
r58RVxKP0cNRfXyu9D7JqqVAaRfNE3LFdoz4hXxWWWcxjOGBJA/BQ5VuwvrDxO8O
YpwYgl3yKOcewg=="""
# HackTheBox "Moderators" write-up (.vbox of VirtualBox 6.1 on Windows: CRLF line breaks;
# passphrase "computer"; 540000 DEK / 20000 digest iterations)
MODERATORS = (
    "U0NORQABQUVTLVhUUzI1Ni1QTEFJTjY0AAAAAAAAAAAAAAAAAABQQktERjItU0hB\r\n"
    "MjU2AAAAAAAAAAAAAAAAAAAAAAAAAEAAAABUQgV7yASjqRRgfezqVXSqcDjNzg1J\r\n"
    "jH/ENK/ozVskTyAAAADpYIvN2MBwhohZoxyfHl5d6YterYwh8lwMQ+5peBbjLCBO\r\n"
    "AABUYpGmB0lDsJbqgNsq451Bed5tHD8X6iXWLmJ6v6f7y2A9CABAAAAAo4alQy6T\r\n"
    "jyDI+8mvRgp4wXkMGavRxR6cC+ckk5yUgVhhgPxKNBNdhIHkNtjBMrj0uaVQ3ksk\r\n"
    "gwC6MrGLZFhl1g=="
)


def _filter(tmp_path, algo=ALGO, pw=b"secret", key_id="vm"):
    with vd.PassphraseProvider(new=pw) as pp, vd.using_passphrases(pp):
        return vd.get_filter("CRYPT").open(
            {"CreateKeyStore": 1, "Algorithm": algo, "Iterations": 1000, "KeyId": key_id},
            str(tmp_path / "new"))


def _reopen(store: str, pw=b"secret"):
    with vd.PassphraseProvider([pw]) as pp, vd.using_passphrases(pp):
        return vd.get_filter("CRYPT").open({"KeyStore": store}, "disk")


# -- key store --------------------------------------------------------------------------------
@pytest.mark.parametrize("text,pw,iters", [(VBOXDIE, b"123", (2000, 2000)),
                                           (MODERATORS, b"computer", (540000, 20000))],
                         ids=["vboxdie", "moderators"])
def test_published_key_stores_unlock_and_reencode_byte_exact(text, pw, iters):
    ks = vd.KeyStore.decode(text)
    raw = base64.b64decode("".join(text.split()))
    assert len(raw) == 250 and ks.build() == raw
    assert KeyStoreStruct.build(KeyStoreStruct.parse(raw)) == raw
    assert (ks.cipher, ks.kdf, ks.key_size) == ("AES-XTS256-PLAIN64", "PBKDF2-SHA256", 64)
    assert (ks.dek_iterations, ks.digest_iterations) == iters
    dek = ks.unlock(pw)
    assert len(dek) == 64
    with pytest.raises(vd.WrongPassphrase, match="wrong passphrase"):
        ks.unlock(pw + b"x")
    # the encoded form decodes to the same bytes (64-character lines, as RTBase64Encode)
    enc = ks.encode()
    assert all(len(line) <= 64 for line in enc.splitlines())
    assert vd.KeyStore.decode(enc).build() == raw


@pytest.mark.parametrize("algo,size", [("AES-XTS128-PLAIN64", 32), ("AES-XTS256-PLAIN64", 64)])
def test_new_key_store_round_trip(algo, size):
    ks, dek = vd.KeyStore.create(b"pw", algo, iterations=1000)
    assert len(dek) == size and ks.key_size == size and ks.dek_enc_size == size
    assert ks.kdf == "PBKDF2-SHA256" and ks.digest_iterations == 20000
    again = vd.KeyStore.decode(ks.encode())
    assert again.build() == ks.build()
    assert again.unlock(b"pw") == dek
    with pytest.raises(vd.WrongPassphrase):
        again.unlock(b"pW")


def test_new_key_store_benchmarks_its_iterations_as_virtualbox():
    ks, _dek = vd.KeyStore.create(b"pw", ALGO)
    assert ks.dek_iterations >= 20000 and ks.dek_iterations % 20000 == 0


def _hostile(**change) -> str:
    ks, _ = vd.KeyStore.create(b"pw", ALGO, iterations=1000)
    fields = dict(KeyStoreStruct.parse(ks.build()))
    fields.pop("_io", None)
    fields.update(change)
    return base64.b64encode(KeyStoreStruct.build(fields)).decode()


@pytest.mark.parametrize("text,words", [
    (base64.b64encode(b"SCNE\x00\x01" + bytes(243)).decode(), "250 bytes"),
    (_hostile(magic=0x41414141), "not a VirtualBox key store"),
    (_hostile(version=0x0200), "version"),
    (_hostile(dek_iterations=0xFFFFFFFF), "cDekIterations"),
    (_hostile(digest_iterations=0xFFFFFFFF), "cDekDigestIterations"),
    (_hostile(dek_iterations=0), "iteration count"),
    (_hostile(cipher=b"AES-CBC".ljust(32, b"\0")), "cipher"),
    (_hostile(kdf=b"SCRYPT".ljust(32, b"\0")), "key derivation"),
    (_hostile(key_size=1 << 30), "cbKey"),
    (_hostile(dek_enc_size=200), "cbDekEnc"),
    (_hostile(digest_size=4000), "cbDekDigest"),
    ("!!!! not base64 !!!!", "base64"),
    ("QUFB" * 5000, "too long"),
], ids=["truncated", "magic", "version", "huge-dek-iter", "huge-digest-iter", "zero-iter",
        "cipher", "kdf", "key-size", "enc-size", "digest-size", "base64", "long"])
def test_hostile_key_stores_give_clear_errors_fast(text, words):
    t0 = time.monotonic()
    with pytest.raises(vd.CorruptImage, match=words):
        ks = vd.KeyStore.decode(text, "disk.vdi")
        ks.unlock(b"pw")
    assert time.monotonic() - t0 < 1.0


def test_passphrase_is_never_in_errors_or_reprs(tmp_path):
    ks, _ = vd.KeyStore.create(b"hunter2-secret", ALGO, iterations=1000)
    with vd.PassphraseProvider([b"hunter2-wrong"]) as pp, vd.using_passphrases(pp), \
            pytest.raises(vd.WrongPassphrase) as exc:
        vd.get_filter("CRYPT").open({"KeyStore": ks.encode()}, "x.vdi")
    assert "hunter2" not in str(exc.value)
    f = _filter(tmp_path, pw=b"hunter2-secret")
    text = repr(f) + repr(f.info()) + repr(f.properties())
    assert "hunter2" not in text and f.info()["cipher"] == ALGO


# -- the data path ----------------------------------------------------------------------------
def _plain(tmp_path, fmt="VDI", size=4 * MiB) -> tuple[str, bytes]:
    p = str(tmp_path / f"plain.{fmt.lower()}")
    data = bytearray(size)
    data[MiB:MiB + 200000] = pattern(200000, 3)
    data[3 * MiB + 512:3 * MiB + 1024] = b"PLAINTEXT-MARKER" * 32
    with vd.Disk() as d:
        d.create_base(p, size, fmt)
        d.write(MiB, bytes(data[MiB:MiB + 200000]))
        d.write(3 * MiB + 512, bytes(data[3 * MiB + 512:3 * MiB + 1024]))
        data += bytes(d.size - size)      # VHD: CHS rounding
    return p, bytes(data)


def test_stored_sectors_are_aes_xts_with_the_offset_as_tweak(tmp_path):
    """Independent of the filter's code: decrypt what the image stores with cryptography."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    src, data = _plain(tmp_path)
    f = _filter(tmp_path)
    enc = str(tmp_path / "enc.vdi")
    vd.copy_image(src, enc, "VDI", dst_filters=[f])
    dek = vd.KeyStore.decode(f.properties()["KeyStore"]).unlock(b"secret")
    with vd.Disk.open_chain(enc) as d:          # no filter: the stored bytes
        for off in (MiB, MiB + 512 * 37, 3 * MiB + 512):
            stored = d.read(off, 512)
            assert stored != data[off:off + 512]
            dec = Cipher(algorithms.AES(dek), modes.XTS((off // 512).to_bytes(16, "little")))
            assert dec.decryptor().update(stored) == data[off:off + 512]


@pytest.mark.parametrize("fmt", ["VDI", "VMDK", "VHD"])
@pytest.mark.parametrize("algo", ["AES-XTS128-PLAIN64", "AES-XTS256-PLAIN64"])
def test_encrypt_and_decrypt_round_trip_per_format(tmp_path, fmt, algo):
    src, data = _plain(tmp_path, fmt)
    f = _filter(tmp_path, algo)
    enc = str(tmp_path / f"enc.{fmt.lower()}")
    vd.copy_image(src, enc, fmt, dst_filters=[f])
    raw = Path(enc).read_bytes()
    assert b"PLAINTEXT-MARKER" not in raw and pattern(200000, 3)[:4096] not in raw
    f2 = _reopen(f.properties()["KeyStore"])
    with vd.Disk.open_chain(enc) as d:
        d.add_filter(f2)
        assert read_all(d) == data
    back = str(tmp_path / "back.raw")
    vd.copy_image(enc, back, "RAW", src_filters=[f2])
    assert Path(back).read_bytes() == data


def test_writes_through_the_filter_and_unaligned_io(tmp_path):
    src, data = _plain(tmp_path)
    f = _filter(tmp_path)
    enc = str(tmp_path / "enc.vdi")
    vd.copy_image(src, enc, "VDI", dst_filters=[f])
    data = bytearray(data)
    with vd.Disk.open_chain(enc, flags=vd.OpenFlags.NORMAL) as d:
        d.add_filter(f)
        for off, blob in ((100, b"ABC" * 99), (2 * MiB + 7, b"PLAINTEXT-MARKER2" * 77)):
            d.write(off, blob)
            data[off:off + len(blob)] = blob
        assert d.read(95, 400) == bytes(data[95:495])
        buf = bytearray(4096)
        d.read_into(2 * MiB, buf)
        assert bytes(buf) == bytes(data[2 * MiB:2 * MiB + 4096])
    assert b"PLAINTEXT-MARKER2" not in Path(enc).read_bytes()
    with vd.Disk.open_chain(enc) as d:
        d.add_filter(f)
        assert read_all(d) == bytes(data)


def test_filter_chain_add_remove_info(tmp_path):
    src, data = _plain(tmp_path)
    f = _filter(tmp_path)
    with vd.Disk.open_chain(src, flags=vd.OpenFlags.NORMAL) as d:
        d.add_filter(f, vd.FilterUse.WRITE)       # VDPrepareWithFilters' way: encrypt in place
        info = d.filter_info()
        assert info[0]["name"] == "CRYPT" and info[0]["write"] and not info[0]["read"]
        d.write(MiB, data[MiB:MiB + 4096])
        assert d.read(MiB, 4096) != data[MiB:MiB + 4096]     # read chain has no filter
        d.add_filter(f, vd.FilterUse.READ)
        assert d.read(MiB, 4096) == data[MiB:MiB + 4096]
        assert d.remove_filter(vd.FilterUse.READ) is f
        assert d.remove_filter() is f
        assert d.filters == []
        with pytest.raises(vd.InvalidArgument):
            d.remove_filter()


def test_odd_sized_disk_refuses_a_filter(tmp_path):
    p = str(tmp_path / "odd.raw")
    Path(p).write_bytes(bytes(1000))
    with vd.Disk.open_chain(p, "RAW") as d, pytest.raises(vd.InvalidArgument, match="512"):
        d.add_filter(_filter(tmp_path))


# -- operations on encrypted chains (stored bytes move, no passphrase needed) ------------------
def test_merge_compact_resize_check_work_on_an_encrypted_chain(tmp_path):
    src, data = _plain(tmp_path)
    f = _filter(tmp_path)
    base = str(tmp_path / "base.vdi")
    vd.copy_image(src, base, "VDI", dst_filters=[f])
    diff = str(tmp_path / "diff.vdi")
    data = bytearray(data)
    with vd.Disk.open_chain(base) as d:
        d.create_diff(diff)
        d.add_filter(f)
        d.write(MiB + 4096, b"NEW-DATA-IN-DIFF" * 256)
        d.write(2 * MiB, bytes(MiB))                 # zeroes over nothing
    data[MiB + 4096:MiB + 8192] = b"NEW-DATA-IN-DIFF" * 256
    vd.merge(diff, base)
    vd.compact(base)
    vd.resize(base, 6 * MiB)
    assert vd.check(base).exit_code == 0
    with vd.Disk.open_chain(base) as d:
        d.add_filter(f)
        assert read_all(d) == bytes(data) + bytes(2 * MiB)


def test_copy_can_drop_and_add_and_change_the_key(tmp_path):
    src, data = _plain(tmp_path)
    f1 = _filter(tmp_path, pw=b"one")
    enc1 = str(tmp_path / "e1.vmdk")
    vd.copy_image(src, enc1, "VMDK", dst_filters=[f1])
    f2 = _filter(tmp_path, "AES-XTS128-PLAIN64", pw=b"two")
    enc2 = str(tmp_path / "e2.vhd")
    vd.copy_image(enc1, enc2, "VHD", src_filters=[f1], dst_filters=[f2])
    with vd.Disk.open_chain(enc2) as d:
        d.add_filter(_reopen(f2.properties()["KeyStore"], b"two"))
        got = read_all(d)
    assert got[:len(data)] == data and not got[len(data):].strip(b"\0")


def test_new_passphrase_rewraps_the_same_key(tmp_path):
    f = _filter(tmp_path, pw=b"old")
    old = f.properties()["KeyStore"]
    with vd.PassphraseProvider(new=b"new") as pp, vd.using_passphrases(pp):
        ks = f.rewrap("disk", iterations=1000)
    assert f.properties()["KeyStore"] == ks.encode() != old
    assert ks.unlock(b"new") == vd.KeyStore.decode(old).unlock(b"old")
    with pytest.raises(vd.WrongPassphrase):
        ks.unlock(b"old")


# -- where the key store lives: the media registry, a sidecar, a bare file --------------------
def _vbox(tmp_path, store_xml: str) -> Path:
    xml = tmp_path / "vm.vbox"
    xml.write_text(f"""<?xml version="1.0"?>
<VirtualBox xmlns="http://www.virtualbox.org/" version="1.16-windows">
  <Machine uuid="{{528b3540-b8be-4677-b43f-7f4969137747}}" name="Moderator 1">
    <MediaRegistry>
      <HardDisks>
        <HardDisk uuid="{{12b147da-5b2d-471f-9e32-a32b1517ff4b}}" location="2019.vdi"
                  format="VDI" type="Normal">
          <Property name="CRYPT/KeyId" value="Moderator 1"/>
          <Property name="CRYPT/KeyStore" value="{store_xml}"/>
        </HardDisk>
        <HardDisk uuid="{{5999a8f0-e31d-4d4e-937d-173eb6ba8881}}" location="Ubuntu.vdi"
                  format="VDI" type="Normal"/>
      </HardDisks>
    </MediaRegistry>
  </Machine>
</VirtualBox>
""")
    return xml


def test_library_keeps_the_key_store_from_a_virtualbox_registry(tmp_path):
    xml = _vbox(tmp_path, MODERATORS.replace("\r\n", "&#13;&#10;"))
    media = vd.read_virtualbox_registry(str(xml))
    assert media[0]["properties"]["CRYPT/KeyId"] == "Moderator 1"
    assert media[1]["properties"] == {}
    with vd.Library(":memory:") as lib:
        paths = lib.import_virtualbox(str(xml))
        crypt = lib.filter_properties(paths[0])["CRYPT"]
        assert crypt["KeyId"] == "Moderator 1"
        assert vd.KeyStore.decode(crypt["KeyStore"]).build() == vd.KeyStore.decode(
            MODERATORS).build()
        assert lib.filter_properties(paths[1]) == {}
        assert lib.properties(paths[0]) == {}          # not backend configuration
        with pytest.raises(vd.InvalidArgument):
            lib.set_filter_properties(paths[0], "CRYPT", {"Passphrase": b"computer"})
        # the library is where a chain's key store is found when no file names one
        assert vd.find_keystore([paths[1], paths[0]], library=lib) == (crypt, "library")
        assert vd.find_keystore([paths[1]], library=lib) is None
        lib.rename(paths[0], str(tmp_path / "moved.vdi"))
        assert lib.filter_properties(str(tmp_path / "moved.vdi"))["CRYPT"] == crypt


def test_key_store_files(tmp_path):
    xml = _vbox(tmp_path, MODERATORS.replace("\r\n", "&#13;&#10;"))
    want = vd.KeyStore.decode(MODERATORS).build()
    by_path = vd.read_keystore_file(str(xml), str(tmp_path / "2019.vdi"))
    by_uuid = vd.read_keystore_file(str(xml), image_uuid="12B147DA-5B2D-471F-9E32-A32B1517FF4B")
    for got in (by_path, by_uuid):
        assert got["KeyId"] == "Moderator 1"
        assert vd.KeyStore.decode(got["KeyStore"]).build() == want
    with pytest.raises(vd.ImageNotFound, match="no encrypted medium"):
        vd.read_keystore_file(str(xml), str(tmp_path / "Ubuntu.vdi"))
    bare = tmp_path / "store.txt"
    bare.write_text(VBOXDIE + "\n")
    assert vd.KeyStore.decode(vd.read_keystore_file(str(bare))["KeyStore"]).unlock(b"123")
    img = str(tmp_path / "disk.vdi")
    side = vd.write_sidecar(img, {"KeyId": "vm", "KeyStore": vd.KeyStore.decode(VBOXDIE).encode()})
    assert side == vd.sidecar_path(img) and side.endswith(".vdi.keystore")
    text = Path(side).read_text()
    assert '<Property name="CRYPT/KeyStore" value="U0NORQAB' in text
    assert vd.find_keystore([str(tmp_path / "top.vdi"), img]) == (
        vd.read_keystore_file(side), side)
    assert vd.KeyStore.decode(vd.read_keystore_file(side)["KeyStore"]).unlock(b"123")
    with pytest.raises(vd.FileExists):
        vd.write_sidecar(img, {"KeyStore": "x"})
    (tmp_path / "junk.keystore").write_text("<CryptProperties/>")
    with pytest.raises(vd.CorruptImage, match="no CRYPT/KeyStore"):
        vd.read_keystore_file(str(tmp_path / "junk.keystore"))


def test_looking_inside_an_encrypted_disk(tmp_path):
    """The partition table is read through the filter (DiskFile's read_into path)."""
    import struct

    mbr = bytearray(512)
    mbr[446:462] = struct.pack("<B3sB3sII", 0x80, b"\0\0\0", 0x83, b"\0\0\0", 2048, 4096)
    mbr[510:512] = b"\x55\xaa"
    src = str(tmp_path / "p.vdi")
    with vd.Disk() as d:
        d.create_base(src, 4 * MiB, "VDI")
        d.write(0, bytes(mbr))
    f = _filter(tmp_path)
    enc = str(tmp_path / "e.vdi")
    vd.copy_image(src, enc, "VDI", dst_filters=[f])
    with vd.Disk.open_chain(enc) as d:
        assert vd.disk_layout(d).partitions == []           # ciphertext: no table
        d.add_filter(f)
        parts = vd.disk_layout(d).partitions
    assert [(p.start, p.size) for p in parts] == [(2048 * 512, 4096 * 512)]


def test_moving_an_encrypted_image_takes_its_key_store_along(tmp_path):
    src, data = _plain(tmp_path)
    f = _filter(tmp_path)
    enc = str(tmp_path / "enc.vdi")
    vd.copy_image(src, enc, "VDI", dst_filters=[f])
    vd.write_sidecar(enc, f.properties())
    (tmp_path / "sub").mkdir()
    moved = str(tmp_path / "sub" / "renamed.vdi")
    out = vd.move_image(enc, moved)
    assert out == [moved, moved + ".keystore"]
    assert not Path(enc).exists() and not Path(enc + ".keystore").exists()
    cfg, where = vd.find_keystore([moved])
    assert where == moved + ".keystore"
    with vd.Disk.open_chain(moved) as d:
        d.add_filter(_reopen(cfg["KeyStore"]))
        assert read_all(d) == data


def test_merging_away_the_image_with_the_key_store_keeps_it_for_the_chain(tmp_path):
    """Base (with the sidecar) merged into its child: the child gets the key store."""
    src, data = _plain(tmp_path)
    f = _filter(tmp_path)
    base = str(tmp_path / "base.vdi")
    vd.copy_image(src, base, "VDI", dst_filters=[f])
    vd.write_sidecar(base, f.properties())
    child = str(tmp_path / "child.vdi")
    data = bytearray(data)
    with vd.Disk.open_chain(base) as d:
        d.create_diff(child)
        d.add_filter(f)
        d.write(512, MARKER)
    data[512:512 + len(MARKER)] = MARKER
    vd.merge(base, child)
    assert not Path(base).exists() and not Path(base + ".keystore").exists()
    cfg, where = vd.find_keystore([child])
    assert where == child + ".keystore"
    with vd.Disk.open_chain(child) as d:
        d.add_filter(_reopen(cfg["KeyStore"]))
        assert read_all(d) == bytes(data)
