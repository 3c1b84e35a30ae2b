"""Encrypted images against qemu (issue #17): qemu makes raw LUKS, LUKS-encrypted QCOW2 (a chain
with a key per level) and legacy AES QCOW2, vdgui reads them byte for byte; vdgui makes and
writes them, qemu-img compare/check with the key agree; no plaintext marker in any encrypted
file; passphrase change; wrong passphrase."""
from __future__ import annotations

import os

import pytest

from tests.conftest import retry_pbkdf_timing, run_cli
from tests.engine.test_secrets import _cli

MiB = 1 << 20
MARK = b"PLAINTEXT-MARKER"


def _secret(pw):
    return ["--object", f"secret,id=s0,data={pw}"]


def _opts(path, pw, fmt="qcow2"):
    if fmt == "luks":
        return f"driver=luks,file.filename={path},key-secret=s0"
    return f"driver=qcow2,file.filename={path},encrypt.key-secret=s0"


def _create(qemu, *args, check=True):
    """qemu-img create of an encrypted image (qemu's PBKDF2 timing failures retried)."""
    r = retry_pbkdf_timing(lambda: qemu.img("create", *args, check=False))
    if check and r.returncode != 0:
        raise AssertionError(f"qemu-img create failed: {r.stderr}")
    return r


def _pw(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text + "\n")
    return p


def _qemu_raw(qemu, path, pw, out, fmt="qcow2"):
    qemu.img("convert", *_secret(pw), "--image-opts", _opts(path, pw, fmt), "-O", "raw", out)
    return out.read_bytes()


def _qemu_write(qemu, path, pw, *cmds, fmt="qcow2"):
    args = []
    for c in cmds:
        args += ["-c", c]
    qemu.io(*_secret(pw), "--image-opts", _opts(path, pw, fmt), *args)


def _marker_file(tmp_path, n=64 * 1024):
    p = tmp_path / "marker.bin"
    p.write_bytes((MARK * (n // len(MARK) + 1))[:n])
    return p


def _compare(qemu, path, pw, plain, fmt="qcow2"):
    return qemu.img("compare", *_secret(pw), "--image-opts", _opts(path, pw, fmt),
                    f"driver=raw,file.filename={plain}", check=False)


# -- qemu makes, vdgui reads ----------------------------------------------------------------------
def test_qemu_raw_luks_reads_identically(qemu, tmp_path):
    img = tmp_path / "r.luks"
    _create(qemu, "-f", "luks", *_secret("hello"), "-o", "key-secret=s0,iter-time=100",
             img, "4M")
    _qemu_write(qemu, img, "hello", "write -P 0x5a 0 1M", "write -P 0x33 3M 5000", fmt="luks")
    want = _qemu_raw(qemu, img, "hello", tmp_path / "want.raw", fmt="luks")
    pw = _pw(tmp_path, "pw", "hello")
    out = tmp_path / "got.raw"
    code, _o, err = _cli("convert", img, "-O", "RAW", out, "--passphrase-file", pw)
    assert code == 0, err
    assert out.read_bytes() == want
    assert b"Z" * 64 not in img.read_bytes()


def test_qemu_qcow2_luks_chain_with_a_key_per_level(qemu, tmp_path):
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    _create(qemu, "-f", "qcow2", *_secret("base-pw"),
             "-o", "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=100", base, "8M")
    _qemu_write(qemu, base, "base-pw", "write -P 0x11 0 2M", "write -P 0x12 5M 70000")
    _create(qemu, "-f", "qcow2", *_secret("top-pw"), "-b", base.name, "-F", "qcow2",
             "-o", "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=100", top)
    # qemu opens the backing file with its own secret
    qemu.io("--object", "secret,id=s0,data=top-pw", "--object", "secret,id=s1,data=base-pw",
            "--image-opts", f"driver=qcow2,file.filename={top},encrypt.key-secret=s0,"
            "backing.encrypt.key-secret=s1", "-c", "write -P 0x21 1M 3000")
    want = tmp_path / "want.raw"
    qemu.img("convert", "--object", "secret,id=s0,data=top-pw", "--object",
             "secret,id=s1,data=base-pw", "--image-opts",
             f"driver=qcow2,file.filename={top},encrypt.key-secret=s0,"
             "backing.encrypt.key-secret=s1", "-O", "raw", want)
    a, b = _pw(tmp_path, "a", "base-pw"), _pw(tmp_path, "b", "top-pw")
    out = tmp_path / "got.raw"
    code, _o, err = _cli("convert", top, "-O", "RAW", out, "--passphrase-file", a,
                         "--passphrase-file", b)
    assert code == 0, err
    assert out.read_bytes() == want.read_bytes()
    # only the top's passphrase: the base refuses, by name, and nothing is left behind
    code, _o, err = _cli("convert", top, "-O", "RAW", tmp_path / "no.raw",
                         "--passphrase-file", b)
    assert code == 1 and "base.qcow2: wrong passphrase" in err
    assert not (tmp_path / "no.raw").exists()
    # info needs no passphrase and shows the encryption
    code, out_text, err = _cli("info", "--chain", "--json", top)
    assert code == 0, err
    assert '"format": "luks1"' in out_text and '"cipher": "aes-xts-plain64"' in out_text


def test_qemu_legacy_aes_qcow2_read_only_with_a_warning(qemu, tmp_path):
    img = tmp_path / "aes.qcow2"
    _create(qemu, "-f", "qcow2", *_secret("legacy"),
             "-o", "encrypt.format=aes,encrypt.key-secret=s0", img, "4M", check=False)
    if not img.exists():
        pytest.fail("qemu-img no longer creates encrypt.format=aes images")
    qemu.io(*_secret("legacy"), "--image-opts",
            f"driver=qcow2,file.filename={img},encrypt.key-secret=s0",
            "-c", "write -P 0x77 4096 70000")
    want = tmp_path / "want.raw"
    qemu.img("convert", *_secret("legacy"), "--image-opts",
             f"driver=qcow2,file.filename={img},encrypt.key-secret=s0", "-O", "raw", want)
    pw = _pw(tmp_path, "pw", "legacy")
    out = tmp_path / "got.raw"
    code, _o, err = _cli("convert", img, "-O", "RAW", out, "--passphrase-file", pw)
    assert code == 0, err
    assert out.read_bytes() == want.read_bytes()
    code, text, _e = _cli("info", img)
    assert "weak" in text
    code, _o, err = _cli("write", img, "--offset", "0", "--input", pw, "--passphrase-file", pw)
    assert code == 1 and "read-only" in err


# -- vdgui makes, qemu reads ----------------------------------------------------------------------
@pytest.mark.parametrize("fmt, key", [("QCOW2", "EncryptIterTime=10"), ("LUKS", "IterTime=50")])
def test_vdgui_encrypted_copy_qemu_agrees(qemu, tmp_path, fmt, key):
    src = tmp_path / "plain.raw"
    data = bytearray(6 * MiB)
    data[0:65536] = _marker_file(tmp_path).read_bytes()
    data[3 * MiB + 777:3 * MiB + 777 + 4000] = b"\x42" * 4000
    src.write_bytes(bytes(data))
    pw = _pw(tmp_path, "pw", "s3cret")
    dst = tmp_path / f"enc.{fmt.lower()}"
    r = run_cli("convert", "-f", "RAW", src, "-O", fmt, dst, "--encrypt", "luks",
                "--new-passphrase-file", pw, "--property", key)
    assert r.returncode == 0, r.stderr
    assert MARK not in dst.read_bytes()
    qfmt = "luks" if fmt == "LUKS" else "qcow2"
    assert _compare(qemu, dst, "s3cret", src, qfmt).returncode == 0
    if fmt == "QCOW2":
        r = qemu.img("check", *_secret("s3cret"), "--image-opts", _opts(dst, "s3cret"),
                     check=False)
        assert r.returncode == 0, r.stdout + r.stderr
    # convert from encrypted without --encrypt: a plain copy
    back = tmp_path / "back.raw"
    code, _o, err = _cli("convert", dst, "-O", "RAW", back, "--passphrase-file", pw)
    assert code == 0, err
    assert back.read_bytes() == bytes(data)


def test_vdgui_writes_into_qemu_encrypted_qcow2(qemu, tmp_path):
    img = tmp_path / "q.qcow2"
    _create(qemu, "-f", "qcow2", *_secret("pw1"),
             "-o", "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=100", img, "4M")
    _qemu_write(qemu, img, "pw1", "write -P 0x61 0 128k")
    pw = _pw(tmp_path, "pw", "pw1")
    marker = _marker_file(tmp_path, 3000)
    for off in ("100", "70000", "2000000"):       # inside an existing cluster, unaligned, new
        code, _o, err = _cli("write", img, "--offset", off, "--input", marker,
                             "--passphrase-file", pw)
        assert code == 0, err
    assert MARK not in img.read_bytes()
    want = bytearray(b"\x61" * 131072 + bytes(4 * MiB - 131072))
    for off in (100, 70000, 2000000):
        want[off:off + 3000] = marker.read_bytes()
    got = _qemu_raw(qemu, img, "pw1", tmp_path / "q.raw")
    assert got == bytes(want)
    r = qemu.img("check", *_secret("pw1"), "--image-opts", _opts(img, "pw1"), check=False)
    assert r.returncode == 0, r.stdout


def test_vdgui_creates_an_encrypted_qcow2_chain(qemu, tmp_path):
    a, b = _pw(tmp_path, "a", "level-a"), _pw(tmp_path, "b", "level-b")
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    for args in (("create", "-f", "QCOW2", "--size", "4M", base, "--encrypt", "luks",
                  "--new-passphrase-file", a, "--property", "EncryptIterTime=10"),
                 ("create", "-f", "QCOW2", "--parent", base, top, "--encrypt", "luks",
                  "--new-passphrase-file", b, "--property", "EncryptIterTime=10",
                  "--passphrase-file", a)):
        code, _o, err = _cli(*args)
        assert code == 0, err
    marker = _marker_file(tmp_path, 70000)
    code, _o, err = _cli("write", top, "--offset", "5000", "--input", marker,
                         "--passphrase-file", a, "--passphrase-file", b)
    assert code == 0, err
    want = tmp_path / "want.raw"
    qemu.img("convert", "--object", "secret,id=s0,data=level-b", "--object",
             "secret,id=s1,data=level-a", "--image-opts",
             f"driver=qcow2,file.filename={top},encrypt.key-secret=s0,"
             "backing.encrypt.key-secret=s1", "-O", "raw", want)
    expect = bytearray(4 * MiB)
    expect[5000:75000] = marker.read_bytes()
    assert want.read_bytes() == bytes(expect)
    assert MARK not in top.read_bytes() and MARK not in base.read_bytes()


# -- passphrases ----------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["qcow2", "luks"])
def test_set_changes_the_passphrase(qemu, tmp_path, fmt):
    img = tmp_path / f"p.{fmt}"
    old, new = _pw(tmp_path, "old", "old-pw"), _pw(tmp_path, "new", "new-pw")
    if fmt == "luks":           # made here: qemu's raw LUKS needs a slow iter-time (>= 100 ms)
        code, _o, err = _cli("create", "-f", "LUKS", "--size", "1M", img, "--encrypt", "luks",
                             "--new-passphrase-file", old, "--property", "IterTime=5")
        assert code == 0, err
    else:
        _create(qemu, "-f", "qcow2", *_secret("old-pw"),
                 "-o", "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=100", img,
                 "1M")
    _qemu_write(qemu, img, "old-pw", "write -P 0x99 0 4096", fmt=fmt)
    before = _qemu_raw(qemu, img, "old-pw", tmp_path / "before.raw", fmt)
    wrong = _pw(tmp_path, "wrong", "nope")
    code, _o, err = _cli("set", img, "--passphrase-file", wrong, "--new-passphrase-file", new)
    assert code == 1 and "wrong passphrase" in err
    code, _o, err = _cli("set", img, "--passphrase-file", old, "--new-passphrase-file", new)
    assert code == 0, err
    assert _qemu_raw(qemu, img, "new-pw", tmp_path / "after.raw", fmt) == before
    r = qemu.img("convert", *_secret("old-pw"), "--image-opts", _opts(img, "old-pw", fmt),
                 "-O", "raw", tmp_path / "x.raw", check=False)
    assert r.returncode != 0 and "Invalid password" in r.stderr
    code, text, _e = _cli("info", "--json", img)
    assert text.count('"slot"') == 1


def test_wrong_passphrase_writes_nothing(qemu, tmp_path):
    img = tmp_path / "w.qcow2"
    _create(qemu, "-f", "qcow2", *_secret("right"),
             "-o", "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=100", img, "1M")
    before = img.read_bytes()
    wrong = _pw(tmp_path, "wrong", "hunter2-secret")
    r = run_cli("convert", img, "-O", "QCOW2", tmp_path / "out.qcow2", "--passphrase-file",
                wrong, check=False)
    assert r.returncode == 1
    assert "wrong passphrase" in r.stderr and "Traceback" not in r.stderr
    assert "hunter2" not in r.stderr
    code, _o, err = _cli("write", img, "--offset", "0", "--input", wrong,
                         "--passphrase-file", wrong)
    assert code == 1 and "wrong passphrase" in err
    assert img.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["w.qcow2", "wrong"]


def test_compact_re_encrypts_the_clusters_it_moves(qemu, tmp_path):
    """A moved cluster's IV is its new host offset: compaction re-encrypts it, and qemu reads
    the compacted image identically (a byte copy would read as noise)."""
    img = tmp_path / "c.qcow2"
    pw = _pw(tmp_path, "pw", "compact-pw")
    code, _o, err = _cli("create", "-f", "QCOW2", "--size", "4M", img, "--encrypt", "luks",
                         "--new-passphrase-file", pw, "--property", "EncryptIterTime=10")
    assert code == 0, err
    pieces = tmp_path / "piece"
    for i in range(6):                               # six clusters, in this order in the file
        pieces.write_bytes(bytes([0x41 + i]) * 65536)
        code, _o, err = _cli("write", img, "--offset", str(i * 65536), "--input", pieces,
                             "--passphrase-file", pw)
        assert code == 0, err
    pieces.write_bytes(bytes(65536))
    for i in (0, 1, 2):                              # zero the first three: holes low down
        code, _o, err = _cli("write", img, "--offset", str(i * 65536), "--input", pieces,
                             "--passphrase-file", pw)
        assert code == 0, err
    size = img.stat().st_size
    code, _o, err = _cli("compact", img, "--passphrase-file", pw)
    assert code == 0, err
    assert img.stat().st_size < size                 # clusters moved down, the tail cut off
    want = bytes(3 * 65536) + b"".join(bytes([0x41 + i]) * 65536 for i in (3, 4, 5))
    got = _qemu_raw(qemu, img, "compact-pw", tmp_path / "c.raw")
    assert got[:6 * 65536] == want and not any(got[6 * 65536:])
    r = qemu.img("check", *_secret("compact-pw"), "--image-opts", _opts(img, "compact-pw"),
                 check=False)
    assert r.returncode == 0, r.stdout


def test_check_counts_the_encryption_header_clusters(qemu, tmp_path):
    """The LUKS header and key material live in refcounted clusters no table points to: check
    must count them (else it reports them leaked, and a repair would free the keys)."""
    img = tmp_path / "k.qcow2"
    _create(qemu, "-f", "qcow2", *_secret("chk"),
            "-o", "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=100", img, "4M")
    _qemu_write(qemu, img, "chk", "write -P 0x31 0 100k")
    pw = _pw(tmp_path, "pw", "chk")
    code, out, err = _cli("check", img, "--passphrase-file", pw)
    assert code == 0, out + err
    code, out, err = _cli("check", "--repair", img, "--passphrase-file", pw)
    assert code == 0 and "leak" not in out, out + err
    got = _qemu_raw(qemu, img, "chk", tmp_path / "k.raw")
    assert got[:102400] == b"\x31" * 102400


def test_qemu_cbc_essiv_luks_reads_identically(qemu, tmp_path):
    """aes-cbc-essiv:sha256 (LUKS1's old default): qemu writes, vdgui reads the same bytes."""
    img = tmp_path / "e.luks"
    _create(qemu, "-f", "luks", *_secret("essiv"), "-o", "key-secret=s0,iter-time=100,"
            "cipher-alg=aes-256,cipher-mode=cbc,ivgen-alg=essiv,ivgen-hash-alg=sha256",
            img, "2M")
    _qemu_write(qemu, img, "essiv", "write -P 0x6b 4096 70000", fmt="luks")
    want = _qemu_raw(qemu, img, "essiv", tmp_path / "want.raw", fmt="luks")
    pw = _pw(tmp_path, "pw", "essiv")
    code, text, _e = _cli("info", img)
    assert "aes-cbc-essiv:sha256" in text
    out = tmp_path / "got.raw"
    code, _o, err = _cli("convert", img, "-O", "RAW", out, "--passphrase-file", pw)
    assert code == 0, err
    assert out.read_bytes() == want
    # and written here (CBC chains within each sector), read by qemu
    marker = _marker_file(tmp_path, 5000)
    code, _o, err = _cli("write", img, "--offset", "1000", "--input", marker,
                         "--passphrase-file", pw)
    assert code == 0, err
    after = bytearray(want)
    after[1000:6000] = marker.read_bytes()
    assert _qemu_raw(qemu, img, "essiv", tmp_path / "after.raw", fmt="luks") == bytes(after)
    assert MARK not in img.read_bytes()
