"""Passphrase plumbing (issue #17): vdgui.vd.secrets, Disk's provider, the CLI's
--passphrase-file. A test-only FAKELOCK backend (FAKEDIFF whose header may carry a passphrase
hash) asks the provider on every open for data, as the encrypted backends do."""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import threading

import pytest

from tests.engine import fake_backend
from vdgui import cli
from vdgui.vd import (
    Disk,
    OpenFlags,
    Passphrase,
    PassphraseProvider,
    PassphraseRequired,
    SecretRequest,
    WrongPassphrase,
    read_passphrase_file,
    using_passphrases,
)
from vdgui.vd import secrets as vsecrets
from vdgui.vd.formats import REGISTERED

SECRET = b"correct horse battery"
ATTEMPTS: list[str] = []          # the thread names that ran a key derivation


class LockedBackend(fake_backend.FakeBackend):
    name = "FAKELOCK"

    def probe(self, src):
        return 0                  # only by -f FAKELOCK

    def open(self, location, flags=OpenFlags.NORMAL, config=None):
        img = super().open(location, flags, config)
        want = img.h.get("lock")
        if want and not flags & OpenFlags.INFO:
            def attempt(pw: bytes):
                ATTEMPTS.append(threading.current_thread().name)
                return b"key" if hashlib.sha256(pw).hexdigest() == want else None
            try:
                vsecrets.unlock(SecretRequest(location, "fake"), attempt,
                                cache_key=("fake", want))
            except BaseException:
                img.close()
                raise
        return img


LOCKED = LockedBackend()


@pytest.fixture
def locked(tmp_path):
    undo = fake_backend.register()
    REGISTERED.append(LOCKED)
    path = tmp_path / "disk.fkd"
    with Disk() as d:
        d.create_base(str(path), 1 << 20, fake_backend.BACKEND)
        d.write(0, b"PLAINTEXT" * 100)
    raw = bytearray(path.read_bytes())
    h = json.loads(raw[len(fake_backend.MAGIC):4096].rstrip(b"\0"))
    h["lock"] = hashlib.sha256(SECRET).hexdigest()
    body = fake_backend.MAGIC + json.dumps(h).encode()
    raw[:4096] = body + bytes(4096 - len(body))
    path.write_bytes(raw)
    ATTEMPTS.clear()
    yield path
    REGISTERED.remove(LOCKED)
    undo()


def _pwfile(tmp_path, name, data):
    p = tmp_path / name
    p.write_bytes(data)
    return str(p)


def _cli(*args):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


# -- the module ---------------------------------------------------------------------------------
def test_passphrase_never_shows_its_bytes():
    p = Passphrase(SECRET)
    assert SECRET.decode() not in repr(p) and SECRET.decode() not in str(p)
    assert SECRET.decode() not in f"{p!r} {p}"
    with pytest.raises(TypeError):
        pickle.dumps(p)
    prov = PassphraseProvider([p], new=b"other")
    assert "correct" not in repr(prov) and "other" not in repr(prov)
    assert p.reveal() == SECRET
    prov.close()
    assert len(p) == 0 and p.reveal() == b""


def test_passphrase_file_loses_one_final_newline_only(tmp_path):
    assert read_passphrase_file(_pwfile(tmp_path, "a", b"pw\n")).reveal() == b"pw"
    assert read_passphrase_file(_pwfile(tmp_path, "b", b"pw\r\n")).reveal() == b"pw"
    assert read_passphrase_file(_pwfile(tmp_path, "c", b"pw\n\n")).reveal() == b"pw\n"
    assert read_passphrase_file(_pwfile(tmp_path, "d", b" pw ")).reveal() == b" pw "


def test_provider_tries_each_candidate_and_caches_the_result():
    seen = []

    def attempt(pw):
        seen.append(pw)
        return bytearray(b"MK") if pw == b"two" else None

    req = SecretRequest("/x/disk.qcow2", "luks1")
    with PassphraseProvider([b"one", b"two", b"three"]) as prov:
        assert prov.unlock(req, attempt, cache_key="k") == b"MK"
        assert seen == [b"one", b"two"]
        assert prov.unlock(req, attempt, cache_key="k") == b"MK"   # no second derivation
        assert seen == [b"one", b"two"]
        with pytest.raises(WrongPassphrase) as exc:
            prov.unlock(req, lambda pw: None)
    msg = str(exc.value)
    assert "wrong passphrase" in msg and "/x/disk.qcow2" in msg
    assert not any(w in msg for w in ("one", "two", "three"))
    assert exc.value.code == "WRONG_PASSPHRASE"


def test_no_provider_or_no_candidate_is_passphrase_required():
    req = SecretRequest("/x/a.luks", "luks2")
    with pytest.raises(PassphraseRequired):
        vsecrets.unlock(req, lambda pw: b"k")
    with PassphraseProvider() as prov, using_passphrases(prov), pytest.raises(PassphraseRequired):
        vsecrets.unlock(req, lambda pw: b"k")
    with pytest.raises(PassphraseRequired):
        vsecrets.new_passphrase(req)


def test_prompt_is_asked_after_the_candidates():
    asked = []

    def prompt(req):
        asked.append(req)
        return Passphrase(b"typed") if len(asked) < 3 else None

    prov = PassphraseProvider([b"given"], prompt=prompt)
    req = SecretRequest("/x/a", "luks1")
    assert prov.unlock(req, lambda pw: pw if pw == b"typed" else None) == b"typed"
    assert asked == [req]
    with pytest.raises(WrongPassphrase):
        prov.unlock(req, lambda pw: None)


# -- Disk and the operations --------------------------------------------------------------------
def test_disk_open_asks_the_given_provider(locked):
    with pytest.raises(PassphraseRequired):
        Disk.open_chain(str(locked), "FAKELOCK", OpenFlags.READ_ONLY)
    with pytest.raises(WrongPassphrase):
        Disk.open_chain(str(locked), "FAKELOCK", OpenFlags.READ_ONLY,
                        passphrases=PassphraseProvider([b"nope"]))
    with PassphraseProvider([b"nope", SECRET]) as prov:
        with Disk.open_chain(str(locked), "FAKELOCK", OpenFlags.READ_ONLY,
                             passphrases=prov) as d:
            assert d.read(0, 9) == b"PLAINTEXT"
        d2 = Disk()
        with d2:
            d2.open(str(locked), "FAKELOCK", OpenFlags.READ_ONLY, passphrases=prov)
    # INFO opens need no passphrase (info shows the encryption without one)
    with Disk() as d:
        d.open(str(locked), "FAKELOCK", OpenFlags.INFO | OpenFlags.READ_ONLY)


# -- the CLI ------------------------------------------------------------------------------------
def test_cli_without_passphrase_says_how_to_give_one(locked):
    code, _out, err = _cli("map", "-f", "FAKELOCK", locked)
    assert code == 1
    assert "needs a passphrase" in err and "--passphrase-file" in err
    assert "Traceback" not in err


def test_cli_wrong_passphrase_exits_1_without_the_secret(locked, tmp_path):
    wrong = _pwfile(tmp_path, "wrong", b"hunter2\n")
    code, _out, err = _cli("read", "-f", "FAKELOCK", locked, "--offset", "0", "--length", "9",
                           "--passphrase-file", wrong)
    assert code == 1 and "wrong passphrase" in err and "hunter2" not in err


def test_cli_repeated_passphrase_files_each_tried(locked, tmp_path):
    wrong = _pwfile(tmp_path, "wrong", b"hunter2\n")
    right = _pwfile(tmp_path, "right", SECRET + b"\n")
    out = tmp_path / "out.bin"
    code, _o, err = _cli("read", "-f", "FAKELOCK", locked, "--offset", "0", "--length", "9",
                         "--output", out, "--passphrase-file", wrong, "--passphrase-file", right)
    assert code == 0, err
    assert out.read_bytes() == b"PLAINTEXT"


def test_cli_convert_reads_ahead_with_the_passphrase(locked, tmp_path):
    """convert opens the chain again in its read-ahead threads: they see the provider, and the
    key derivation runs once (cached), not once per thread."""
    right = _pwfile(tmp_path, "right", SECRET)
    dst = tmp_path / "plain.img"
    code, _o, err = _cli("convert", "-f", "FAKELOCK", "-O", "RAW", locked, dst,
                         "--passphrase-file", right)
    assert code == 0, err
    assert dst.read_bytes()[:900] == b"PLAINTEXT" * 100
    assert len(ATTEMPTS) == 1


def test_cli_convert_with_wrong_passphrase_leaves_no_target(locked, tmp_path):
    wrong = _pwfile(tmp_path, "wrong", b"hunter2")
    dst = tmp_path / "plain.img"
    code, _o, err = _cli("convert", "-f", "FAKELOCK", "-O", "RAW", locked, dst,
                         "--passphrase-file", wrong)
    assert code == 1 and "wrong passphrase" in err
    assert sorted(os.listdir(tmp_path)) == ["disk.fkd", "wrong"]


@pytest.mark.parametrize("command", ["info", "check", "convert", "compare", "merge", "resize",
                                     "compact", "sparsify", "map", "partitions", "ls", "cat",
                                     "extract", "changed", "read", "write", "set", "create"])
def test_every_image_command_takes_passphrase_files(command):
    from vdgui.cli_parser import build_parser
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    opts = {o for a in sub.choices[command]._actions for o in a.option_strings}
    assert "--passphrase-file" in opts
