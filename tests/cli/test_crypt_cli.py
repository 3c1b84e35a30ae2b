"""Issue #17: vdgui-img and VirtualBox's CRYPT encryption (--encrypt vbox-aes-xts*, key store
sidecar IMAGE.keystore, --keystore, --passphrase-file, set --new-passphrase-file)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import vdgui.vd as vd
from tests.conftest import pattern, read_all, run_cli, sha

MiB = 1 << 20
MARK = b"PLAINTEXT-MARKER"


def _plain(tmp_path, fmt="VDI", name="plain") -> tuple[str, bytes]:
    p = str(tmp_path / f"{name}.{fmt.lower()}")
    with vd.Disk() as d:
        d.create_base(p, 4 * MiB, fmt)
        d.write(MiB, pattern(300000, 9))
        d.write(3 * MiB, MARK * 64)
        data = read_all(d)
    return p, data


def _encrypted(tmp_path, pw=b"pw", fmt="VDI", name="enc") -> tuple[str, bytes]:
    """An encrypted image with a cheap key store (1000 iterations) in its sidecar."""
    src, data = _plain(tmp_path, fmt, name + "-src")
    with vd.PassphraseProvider(new=pw) as pp, vd.using_passphrases(pp):
        f = vd.get_filter("CRYPT").open({"CreateKeyStore": 1, "Algorithm": "AES-XTS256-PLAIN64",
                                         "Iterations": 1000, "KeyId": name}, name)
    dst = str(tmp_path / f"{name}.{fmt.lower()}")
    vd.copy_image(src, dst, fmt, dst_filters=[f])
    vd.write_sidecar(dst, f.properties())
    os.unlink(src)
    return dst, data


def _pw(tmp_path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text + "\n")
    return p


@pytest.mark.parametrize("fmt", ["VDI", "VMDK", "VHD"])
def test_convert_encrypts_and_decrypts(tmp_path, fmt):
    src, data = _plain(tmp_path, fmt)
    pw = _pw(tmp_path, "pw", "correct horse")
    enc = tmp_path / f"enc.{fmt.lower()}"
    run_cli("convert", "-O", fmt, "--encrypt", "vbox-aes-xts256", "--new-passphrase-file", pw,
            src, enc)
    side = Path(str(enc) + ".keystore")
    assert side.is_file() and "CRYPT/KeyStore" in side.read_text()
    assert MARK not in enc.read_bytes() and pattern(300000, 9)[:8192] not in enc.read_bytes()
    info = json.loads(run_cli("info", "--json", enc).stdout)
    assert info["encryption"]["format"] == "vbox-crypt"
    assert info["encryption"]["cipher"] == "AES-XTS256-PLAIN64"
    back = tmp_path / "back.raw"
    run_cli("convert", "-O", "RAW", "--passphrase-file", pw, enc, back)   # no --encrypt: plain
    assert back.read_bytes()[:len(data)] == data
    assert not Path(str(back) + ".keystore").exists()


def test_wrong_or_missing_passphrase_writes_nothing(tmp_path):
    enc, _data = _encrypted(tmp_path)
    bad = _pw(tmp_path, "bad", "nope")
    before = sorted(os.listdir(tmp_path))
    for extra, words in (([ "--passphrase-file", bad], "wrong passphrase"),
                         ([], "needs a passphrase")):
        r = run_cli("convert", "-O", "VDI", *extra, enc, tmp_path / "out.vdi", check=False)
        assert r.returncode == 1 and words in r.stderr and "Traceback" not in r.stderr
        r = run_cli("convert", "-O", "VDI", "--encrypt", "vbox-aes-xts128",
                    "--new-passphrase-file", bad, *extra, enc, tmp_path / "out2.vdi",
                    check=False)
        assert r.returncode == 1 and words in r.stderr
        r = run_cli("read", enc, "--offset", "0", "--length", "512", *extra, check=False)
        assert r.returncode == 1 and words in r.stderr
    assert sorted(os.listdir(tmp_path)) == before       # no target, no key store, no temporary


def test_existing_key_store_or_unknown_kind_is_refused_before_writing(tmp_path):
    src, _data = _plain(tmp_path)
    pw = _pw(tmp_path, "pw", "x")
    (tmp_path / "t.vdi.keystore").write_text("keep me")
    r = run_cli("convert", "-O", "VDI", "--encrypt", "vbox-aes-xts256", "--new-passphrase-file",
                pw, src, tmp_path / "t.vdi", check=False)
    assert r.returncode == 1 and "already exists" in r.stderr
    assert (tmp_path / "t.vdi.keystore").read_text() == "keep me"
    assert not (tmp_path / "t.vdi").exists()
    r = run_cli("create", "-f", "VDI", "--size", "1M", "--encrypt", "rot13",
                "--new-passphrase-file", pw, tmp_path / "u.vdi", check=False)
    assert r.returncode == 1 and "unknown encryption" in r.stderr
    assert not (tmp_path / "u.vdi").exists()
    r = run_cli("create", "-f", "VDI", "--size", "1M", "--encrypt", "vbox-aes-xts256",
                tmp_path / "v.vdi", check=False)
    assert r.returncode == 1 and "new passphrase" in r.stderr
    assert not (tmp_path / "v.vdi").exists() and not (tmp_path / "v.vdi.keystore").exists()
    # a failed convert takes its new key store away again
    r = run_cli("convert", "-O", "VDI", "--encrypt", "vbox-aes-xts256", "--new-passphrase-file",
                pw, "--size", "1M", src, tmp_path / "w.vdi", check=False)
    assert r.returncode == 1 and "shrink" in r.stderr
    assert not (tmp_path / "w.vdi").exists() and not (tmp_path / "w.vdi.keystore").exists()


def test_create_encrypted_and_a_child_uses_the_parents_key(tmp_path):
    pw = _pw(tmp_path, "pw", "s3cret")
    base = tmp_path / "base.vdi"
    run_cli("create", "-f", "VDI", "--size", "2M", "--encrypt", "vbox-aes-xts128",
            "--new-passphrase-file", pw, base)
    assert Path(str(base) + ".keystore").is_file()
    r = run_cli("create", "-f", "VDI", "--parent", base, "--encrypt", "vbox-aes-xts128",
                tmp_path / "x.vdi", check=False)
    assert r.returncode == 1 and "--parent" in r.stderr
    child = tmp_path / "child.vdi"
    run_cli("create", "-f", "VDI", "--parent", base, child)
    blob = tmp_path / "blob"
    blob.write_bytes(MARK * 100)
    run_cli("write", child, "--offset", "4096", "--input", blob, "--passphrase-file", pw)
    assert MARK not in child.read_bytes()
    r = run_cli("read", child, "--offset", "4000", "--length", "1700", "--output",
                tmp_path / "out", "--passphrase-file", pw)
    assert (tmp_path / "out").read_bytes() == bytes(96) + MARK * 100 + bytes(4)
    assert r.stderr == ""


def test_set_changes_the_passphrase_not_the_image(tmp_path):
    enc, data = _encrypted(tmp_path, b"old one")
    old, new = _pw(tmp_path, "old", "old one"), _pw(tmp_path, "new", "new one")
    digest = sha(enc)
    run_cli("set", enc, "--passphrase-file", old, "--new-passphrase-file", new)
    assert sha(enc) == digest
    r = run_cli("read", enc, "--offset", "1M", "--length", "4096", "--passphrase-file", old,
                check=False)
    assert r.returncode == 1 and "wrong passphrase" in r.stderr
    out = tmp_path / "out"
    run_cli("read", enc, "--offset", "1M", "--length", "4096", "--output", out,
            "--passphrase-file", new)
    assert out.read_bytes() == data[MiB:MiB + 4096]


def test_key_store_from_a_virtualbox_registry(tmp_path):
    enc, _data = _encrypted(tmp_path, b"computer", name="2019")
    store = vd.read_keystore_file(enc + ".keystore")["KeyStore"]
    os.unlink(enc + ".keystore")
    value = store.replace("\n", "&#13;&#10;")
    vbox = tmp_path / "vm.vbox"
    vbox.write_text(f"""<?xml version="1.0"?>
<VirtualBox xmlns="http://www.virtualbox.org/" version="1.16-linux">
  <Machine uuid="{{528b3540-b8be-4677-b43f-7f4969137747}}" name="VM">
    <MediaRegistry><HardDisks>
      <HardDisk uuid="{{12b147da-5b2d-471f-9e32-a32b1517ff4b}}" location="2019.vdi" format="VDI">
        <Property name="CRYPT/KeyId" value="VM"/>
        <Property name="CRYPT/KeyStore" value="{value}"/>
      </HardDisk>
    </HardDisks></MediaRegistry>
  </Machine>
</VirtualBox>
""")
    pw = _pw(tmp_path, "pw", "computer")
    out = tmp_path / "out"
    run_cli("read", enc, "--offset", "3M", "--length", "1024", "--output", out,
            "--keystore", vbox, "--passphrase-file", pw)
    assert out.read_bytes() == MARK * 64
    info = json.loads(run_cli("info", "--json", "--keystore", vbox, enc).stdout)
    assert info["encryption"]["key_id"] == "VM" and info["encryption"]["key_store"] == str(vbox)
    # a registry without this image is an error, not a silent read of ciphertext
    other = tmp_path / "other.vbox"
    other.write_text(vbox.read_text().replace('location="2019.vdi"', 'location="x.vdi"'))
    r = run_cli("read", enc, "--offset", "3M", "--length", "1024", "--keystore", other,
                "--passphrase-file", pw, check=False)
    assert r.returncode == 1 and "no key store for this image" in r.stderr
    # without the registry the image reads as what it stores (ciphertext)
    run_cli("read", enc, "--offset", "3M", "--length", "1024", "--output", out)
    assert out.read_bytes() != MARK * 64


def test_backends_lists_filters_with_their_keys():
    """Issue #17: "`vdgui-img backends --json` lists filters with their keys": the filters
    follow the formats in the one array, told apart by ``kind``, each row with every key a
    format's row has; ``--filters`` lists the filters alone."""
    def check(crypt):
        keys = {k["name"]: k for k in crypt["config_keys"]}
        assert {"Algorithm", "KeyId", "CreateKeyStore", "KeyStore"} <= set(keys)
        assert keys["Algorithm"]["choices"] == ["AES-XTS128-PLAIN64", "AES-XTS256-PLAIN64"]
        assert keys["KeyStore"]["type"] == "string" and "SECRET" in crypt["capabilities"]
    rows = json.loads(run_cli("backends", "--json").stdout)
    formats = [r for r in rows if r["kind"] == "format"]
    filters = [r for r in rows if r["kind"] == "filter"]
    assert [r["name"] for r in formats] == [b.name for b in vd.backends()]
    assert [r["name"] for r in filters] == [f.name for f in vd.filters()] and filters
    assert rows == formats + filters                        # formats first, as before
    assert all(set(r) == set(formats[0]) for r in rows)
    check(next(r for r in filters if r["name"] == "CRYPT"))
    only = json.loads(run_cli("backends", "--filters", "--json").stdout)
    assert only == filters
    check(next(r for r in only if r["name"] == "CRYPT"))
    text = run_cli("backends").stdout
    assert "filter CRYPT: " in text and "key KeyStore (" in text


def test_qemu_reads_the_container_of_an_encrypted_vdi(tmp_path, qemu):
    """The image is a valid VDI whose data is ciphertext."""
    enc, data = _encrypted(tmp_path)
    assert qemu.check(enc, "vdi").returncode == 0
    raw = qemu.to_raw(enc, tmp_path / "q.raw", "vdi").read_bytes()
    with vd.Disk.open_chain(enc) as d:            # no filter: the stored bytes
        stored = read_all(d)
    assert raw == stored and raw[MiB:2 * MiB] != data[MiB:2 * MiB] and MARK not in raw


def test_chain_copy_encrypts_every_member_and_each_has_its_key_store(tmp_path):
    base, _data = _plain(tmp_path, name="base")
    top = str(tmp_path / "top.vdi")
    with vd.Disk.open_chain(base) as d:
        d.create_diff(top)
        d.write(2 * MiB, MARK * 256)
    pw = _pw(tmp_path, "pw", "chain")
    out = tmp_path / "out" / "enc.vdi"
    out.parent.mkdir()
    run_cli("convert", "--chain", "-O", "VDI", "--encrypt", "vbox-aes-xts128",
            "--new-passphrase-file", pw, top, out)
    made = sorted(p.name for p in out.parent.iterdir())
    assert made == ["enc-base.vdi", "enc-base.vdi.keystore", "enc.vdi", "enc.vdi.keystore"]
    for name in ("enc-base.vdi", "enc.vdi"):
        assert MARK not in (out.parent / name).read_bytes()
    # each member opens alone with its own key store; the chain reads as the source chain
    r = run_cli("compare", base, out.parent / "enc-base.vdi", "--passphrase-file", pw)
    assert "identical" in r.stdout
    r = run_cli("compare", top, out, "--passphrase-file", pw)
    assert "identical" in r.stdout


def test_a_hostile_key_store_is_a_clear_error_before_anything_is_written(tmp_path):
    import base64
    import time

    from vdgui.vd.filters.keystore_layout import KeyStoreStruct

    enc, _data = _encrypted(tmp_path)
    ks = vd.KeyStore.decode(vd.read_keystore_file(enc + ".keystore")["KeyStore"])
    fields = dict(KeyStoreStruct.parse(ks.build()))
    fields.pop("_io", None)
    fields["dek_iterations"] = 0xFFFFFFFF
    hostile = base64.b64encode(KeyStoreStruct.build(fields)).decode()
    vd.write_sidecar(enc, {"KeyId": "x", "KeyStore": hostile}, replace=True)
    pw = _pw(tmp_path, "pw", "pw")
    t0 = time.monotonic()
    r = run_cli("convert", "-O", "RAW", "--passphrase-file", pw, enc, tmp_path / "out.raw",
                check=False)
    assert time.monotonic() - t0 < 10
    assert r.returncode == 1 and "cDekIterations" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out.raw").exists()
    Path(enc + ".keystore").write_text("<CryptProperties><Property name='CRYPT/KeyStore' "
                                       "value='U0NORQAB'/></CryptProperties>")
    r = run_cli("read", enc, "--offset", "0", "--length", "512", "--passphrase-file", pw,
                check=False)
    assert r.returncode == 1 and "250 bytes" in r.stderr
