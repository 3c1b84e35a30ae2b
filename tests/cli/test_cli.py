"""vdgui-img, run as a user runs it (subprocess), against every backend of the table that can
create images; a few exit-code cases run main() in-process with the test-only FAKEDIFF format."""
from __future__ import annotations

import contextlib
import io
import json
import os
import pty
import subprocess
import sys

import pytest

from tests.conftest import ROOT, entry_point, pattern, run_cli, sha
from tests.engine import fake_backend
from vdgui import cli
from vdgui.vd import Cap, KeyFlag, Operation, backends

MiB = 1 << 20


def _file_backends(*, diff=False):
    out = []
    for b in backends():
        if b.needs_passphrase:
            continue        # encrypted-only formats: tests/interop/test_luks_interop.py
        if b.creatable and b.writable and b.caps & Cap.FILE and (not diff or b.caps & Cap.DIFF):
            out.append(b)
    return out


CREATABLE = [b.name for b in _file_backends()]
DIFFABLE = [b.name for b in _file_backends(diff=True)]


def _ext(fmt):
    return next(b for b in backends() if b.name == fmt).default_extension() or "img"


def _bytes(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def inproc(*args, check=True):
    """Same as run_cli, but calls cli.main() in this process (no interpreter start-up): used for
    the per-backend matrix; every subcommand also runs through run_cli (a real subprocess)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in args])
    r = subprocess.CompletedProcess(["vdgui-img", *map(str, args)], code, out.getvalue(),
                                    err.getvalue())
    if check and code != 0:
        raise AssertionError(f"vdgui-img {' '.join(map(str, args))} exited {code}: {r.stderr}")
    return r


def _runner(fmt, subprocess_for):
    return run_cli if fmt == subprocess_for else inproc


def fails(*args, match=None):
    """Run a command that must fail: exit 1, exactly one line on stderr, no traceback."""
    r = run_cli(*args, check=False)
    assert r.returncode == 1, (args, r.returncode, r.stdout, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 1, (args, r.stderr)
    assert "Traceback" not in r.stderr and lines[0].startswith("vdgui-img: ")
    if match:
        assert match.lower() in lines[0].lower(), lines[0]
    return lines[0]


def info_json(path, *extra):
    return json.loads(run_cli("info", "--json", *extra, path).stdout)


# -- basics ------------------------------------------------------------------------------------
def test_version_and_help():
    r = run_cli("--version")
    assert r.stdout.startswith("vdgui-img ")
    assert "convert" in run_cli("--help").stdout
    r = subprocess.run([entry_point("vdgui-img"), "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("vdgui-img ")


def test_convert_help_says_dst_is_the_copy_of_the_top():
    text = " ".join(run_cli("convert", "--help").stdout.split())
    assert "DST is the copy of the top" in text and "keeps its own size" in text


def test_backends_lists_the_table():
    data = [d for d in json.loads(run_cli("backends", "--json").stdout)
            if d["kind"] == "format"]                       # the filters follow (issue #17)
    assert [d["name"] for d in data] == [b.name for b in backends()]
    for d, b in zip(data, backends()):
        assert set(d) >= {"name", "description", "capabilities", "extensions", "config_keys",
                          "operations"}
        assert d["operations"] == sorted(op.value for op in b.operations)
        assert [e["ext"] for e in d["extensions"]] == [fe.ext for fe in b.extensions]
        for k, ck in zip(d["config_keys"], b.config_keys):
            assert k["name"] == ck.name and k["default"] == ck.default
            assert k["type"] == ck.type.name.lower()
            assert ("mandatory" in k["flags"]) == ck.mandatory
    text = run_cli("backends").stdout
    for b in backends():
        assert f"{b.name}: " in text


# -- every creatable backend ---------------------------------------------------------------------
@pytest.mark.parametrize("fmt", CREATABLE)
def test_create_info_write_read_map_convert_compare(tmp_path, fmt):
    run = _runner(fmt, "RAW")
    img = str(tmp_path / f"disk.{_ext(fmt)}")
    r = run("create", "-f", fmt.lower(), "--size", "3M", img)
    assert r.stdout == "" and r.stderr == ""
    info = json.loads(run("info", "--json", img).stdout)
    for key in ("format", "variant", "virtual_size", "file_size", "uuid", "parent_uuid",
                "modification_uuid", "comment", "pchs", "lchs"):
        assert key in info
    assert info["format"] == fmt and info["virtual_size"] >= 3 * MiB
    assert f"format: {fmt}" in run("info", img).stdout
    blob = pattern(70000, 5)
    (tmp_path / "blob").write_bytes(blob)
    off = MiB + 512
    run("write", img, "--offset", str(off), "--input", tmp_path / "blob")
    run("read", img, "--offset", str(off), "--length", "70000", "--output", tmp_path / "back")
    assert (tmp_path / "back").read_bytes() == blob
    if run is run_cli:     # binary stdout
        r = subprocess.run([sys.executable, "-m", "vdgui.cli", "read", img, "--offset", "1M",
                            "--length", "4096"], capture_output=True, cwd=str(ROOT))
        assert r.returncode == 0 and r.stdout == bytes(512) + blob[:4096 - 512]
    runs = json.loads(run("map", "--json", img).stdout)
    assert runs[0]["start"] == 0 and sum(x["length"] for x in runs) == info["virtual_size"]
    assert any(x["data"] and x["level"] == 0 and x["start"] <= off < x["start"] + x["length"]
               for x in runs)
    assert "data" in run("map", img).stdout
    out = str(tmp_path / "out.raw")
    r = run("convert", "-O", "RAW", img, out)
    assert r.stderr == ""                       # no progress when stderr is not a terminal
    assert _bytes(out)[off:off + 70000] == blob
    assert run("compare", img, out).returncode == 0
    # back into the same format, through the alias table
    alias = (next(b for b in backends() if b.name == fmt).aliases or (fmt,))[0]
    again = str(tmp_path / f"again.{_ext(fmt)}")
    run("convert", "-f", "raw", "-O", alias, out, again)
    assert run("compare", again, img).stdout.strip() == "Images are identical."
    unsynced = str(tmp_path / f"unsynced.{_ext(fmt)}")          # qemu's -t unsafe
    run("convert", "-t", "unsafe", "-f", "raw", "-O", fmt, out, unsynced)
    assert run("compare", unsynced, img).stdout.strip() == "Images are identical."
    if next(b for b in backends() if b.name == fmt).can(Operation.CHECK):
        assert run("check", again, check=False).returncode == 0
        rep = json.loads(run("check", "--json", again).stdout)
        assert rep["exit_code"] == 0 and rep["problems"] == []


@pytest.mark.parametrize("fmt", DIFFABLE)
def test_differencing_chain(tmp_path, fmt):
    run = _runner(fmt, "VDI" if "VDI" in DIFFABLE else DIFFABLE[0])
    ext = _ext(fmt)
    base, top = str(tmp_path / f"base.{ext}"), str(tmp_path / f"top.{ext}")
    run("create", "-f", fmt, "--size", "4M", "--comment", "the base", base)
    (tmp_path / "a").write_bytes(b"\x11" * 100000)
    (tmp_path / "b").write_bytes(b"\x22" * 5000)
    run("write", base, "--offset", "0", "--input", tmp_path / "a")
    run("create", "-f", fmt, "--parent", base, top)
    run("write", top, "--offset", "3M", "--input", tmp_path / "b")
    base_hash = sha(base)
    info = json.loads(run("info", "--json", "--chain", top).stdout)
    chain = info["chain"]
    assert len(chain) == 2 and chain[0]["parent_uuid"] is None
    # the child links to its parent by UUID, or (VHDX) by the parent's modification UUID
    assert (chain[1]["parent_uuid"] == chain[0]["uuid"] or
            chain[1]["parent_modification_uuid"] == chain[0]["modification_uuid"])
    assert info["uuid"] == chain[1]["uuid"]
    levels = {r["level"] for r in json.loads(run("map", "--json", top).stdout) if r["data"]}
    assert levels == {0, 1}
    run("read", top, "--offset", "0", "--length", "4M", "--output", tmp_path / "flat")
    want = bytearray(4 * MiB)
    want[:100000] = b"\x11" * 100000
    want[3 * MiB:3 * MiB + 5000] = b"\x22" * 5000
    assert (tmp_path / "flat").read_bytes() == bytes(want)
    # flatten, and copy as a chain
    run("convert", "-O", "raw", top, tmp_path / "flat.raw")
    got = (tmp_path / "flat.raw").read_bytes()       # some formats round the size up (VHD: CHS)
    assert got[:4 * MiB] == bytes(want) and not any(got[4 * MiB:])
    out = str(tmp_path / "copy" / f"c.{ext}")
    os.mkdir(tmp_path / "copy")
    run("convert", "--chain", "--keep-uuid", "-O", fmt, top, out)
    snap = out          # DST is the copy of the top; the base's copy is named after the base
    stem = os.path.splitext(os.path.basename(base))[0]
    assert sorted(os.listdir(tmp_path / "copy")) == sorted([f"c.{ext}", f"c-{stem}.{ext}"])
    assert run("compare", snap, top).returncode == 0
    copied = json.loads(run("info", "--json", "--chain", snap).stdout)["chain"]
    assert [c["uuid"] for c in copied] == [c["uuid"] for c in chain]
    assert sha(base) == base_hash
    be = next(b for b in backends() if b.name == fmt)
    if be.can(Operation.CHECK):
        assert run("check", top).returncode == 0
    if be.can(Operation.COMPACT):
        run("compact", top)
    run("merge", top, base)                     # fold the diff into its parent
    assert not os.path.exists(top)
    run("read", base, "--offset", "0", "--length", "4M", "--output", tmp_path / "merged")
    assert (tmp_path / "merged").read_bytes() == bytes(want)


@pytest.mark.parametrize("fmt", [b.name for b in _file_backends()
                                 if b.caps & Cap.UUID])
def test_set_uuid(tmp_path, fmt):
    run = _runner(fmt, "VDI")
    img = str(tmp_path / f"s.{_ext(fmt)}")

    def info_json(path):
        return json.loads(run("info", "--json", path).stdout)
    run("create", "-f", fmt, "--size", "1M", "--uuid", "12345678-1234-5678-1234-567812345678",
            img)
    assert info_json(img)["uuid"] == "12345678-1234-5678-1234-567812345678"
    run("set", img, "--uuid", "new")
    assert info_json(img)["uuid"] != "12345678-1234-5678-1234-567812345678"
    run("set", img, "--uuid", "aaaaaaaa-1234-5678-1234-567812345678")
    assert info_json(img)["uuid"] == "aaaaaaaa-1234-5678-1234-567812345678"


# -- compare semantics ---------------------------------------------------------------------------
def test_compare_semantics(tmp_path):
    a, b, c, d = (str(tmp_path / n) for n in ("a.img", "b.img", "c.img", "d.img"))
    for p, size in ((a, 2 * MiB), (b, 2 * MiB), (c, 3 * MiB), (d, 3 * MiB)):
        with open(p, "wb") as f:
            f.truncate(size)
            f.write(b"same")
    with open(b, "r+b") as f:
        f.seek(MiB + 1234)
        f.write(b"x")
    with open(d, "r+b") as f:
        f.seek(2 * MiB + 99)
        f.write(b"y")
    r = run_cli("compare", a, b, check=False)
    assert r.returncode == 1 and f"offset {MiB + 1234}" in r.stdout
    r = run_cli("compare", a, c, check=False)
    assert r.returncode == 0 and "identical" in r.stdout      # extra part is zero
    r = run_cli("compare", a, d, check=False)
    assert r.returncode == 1 and f"offset {2 * MiB + 99}" in r.stdout
    assert run_cli("compare", a, a).returncode == 0


# -- error cases: one line, exit 1 ----------------------------------------------------------------
def test_errors_are_one_line(tmp_path):
    img = str(tmp_path / "x.img")
    fails("info", str(tmp_path / "missing.vdi"), match="not found")
    fails("create", "-f", "NOSUCHFORMAT", "--size", "1M", img, match="unknown format")
    fails("create", "-f", "RAW", "--size", "12Q", img, match="not a size")
    fails("create", "-f", "RAW", "--size", "1M", "--property", "Nope=1", img, match="Nope")
    fails("create", "-f", "RAW", img, match="--size")
    fails("convert", img, str(tmp_path / "y.img"), match="-O")
    fails("frobnicate", match="invalid choice")
    fails("create", "-f", "RAW", "--size", "1M", "--variant", "weird", img, match="variant")
    assert not os.path.exists(img)
    run_cli("create", "-f", "RAW", "--size", "1M", img)
    fails("create", "-f", "RAW", "--size", "1M", img, match="exists")
    fails("read", img, "--offset", "1M", "--length", "1", match="outside")
    fails("write", img, "--offset", "0", "--input", str(tmp_path / "nope"), match="nope")
    fails("set", img, "--uuid", "new", match="UUID")
    fails("set", img, "--uuid", "not-a-uuid", match="not a UUID")
    fails("convert", "-O", "RAW", img, img, match="source")
    fails("info", "--property", "bad", img, match="KEY=VALUE")


def test_mandatory_property_missing(tmp_path):
    be = next(b for b in backends() if any(k.flags & KeyFlag.MANDATORY and k.default is None
                                           for k in b.config_keys))
    key = next(k.name for k in be.config_keys if k.mandatory and k.default is None)
    fails("info", "-f", be.name, "-", match=key)
    fails("info", "-f", be.name, "--property", "NoSuchKey=1", "-", match="NoSuchKey")
    secret = tmp_path / "secret"
    secret.write_text("s3cr3t\n")
    fails("info", "-f", be.name, "--property-file", f"NoSuchKey={secret}", "-", match="NoSuchKey")
    fails("info", "-f", be.name, "--property-file", f"{key}={tmp_path / 'none'}", "-",
          match="cannot read")


def test_unsupported_operations_say_so(tmp_path):
    img = str(tmp_path / "r.img")
    run_cli("create", "-f", "RAW", "--size", "1M", img)
    for op in (b for b in backends() if b.name == "RAW"):
        for name, opv in (("compact", Operation.COMPACT), ("check", Operation.CHECK)):
            if not op.can(opv):
                fails(name, img, match=f"{name} is not supported yet for RAW")


def test_resize_through_cli(tmp_path):
    img = str(tmp_path / "r.img")
    run_cli("create", "-f", "RAW", "--size", "1M", img)
    run_cli("resize", img, "2M")
    assert os.path.getsize(img) == 2 * MiB
    fails("resize", img, "lots", match="not a size")


def test_resize_by_a_relative_size_as_qemu_img(tmp_path):
    """+SIZE grows by, -SIZE shrinks by (no '--' needed before it), relative to the virtual
    size now; the result is what qemu-img reads."""
    img = str(tmp_path / "r.qcow2")
    run_cli("create", "-f", "QCOW2", "--size", "1G", img)
    run_cli("resize", img, "+1G")
    assert _qemu_size(img) == 2 << 30
    run_cli("resize", img, "-512M")
    assert _qemu_size(img) == (3 << 30) // 2
    run_cli("resize", img, "--", "-0.5G")
    assert _qemu_size(img) == 1 << 30
    line = fails("resize", img, "-2G", match="by 2G: its virtual size is only 1073741824 bytes")
    assert line.startswith(f"vdgui-img: cannot shrink {img}")
    assert _qemu_size(img) == 1 << 30
    fails("resize", img, "+lots", match="not a size")


def _qemu_size(path: str) -> int:
    out = subprocess.run(["qemu-img", "info", "--output=json", path], capture_output=True,
                         text=True, check=True).stdout
    size: int = json.loads(out)["virtual-size"]
    return size


# -- progress display ----------------------------------------------------------------------------
def test_progress_only_on_a_terminal(tmp_path):
    src = str(tmp_path / "p.img")
    with open(src, "wb") as f:
        f.truncate(8 * MiB)
        f.write(b"z" * MiB)
    r = run_cli("convert", "-O", "RAW", src, tmp_path / "q.img")
    assert r.stderr == ""
    master, slave = pty.openpty()
    try:
        p = subprocess.run([sys.executable, "-m", "vdgui.cli", "convert", "-O", "RAW", src,
                            str(tmp_path / "tty.img")], stderr=slave, stdout=subprocess.PIPE,
                           cwd=str(ROOT), timeout=60)
        os.close(slave)
        slave = -1
        out = b""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    assert p.returncode == 0
    assert b"100.0%" in out and b"\r" in out and b"/s" in out


# -- check exit codes (in-process, FAKEDIFF test format) -------------------------------------------
@pytest.fixture
def fake():
    undo = fake_backend.register()
    yield fake_backend
    undo()


def _fake_image(tmp_path, name="c.fkd"):
    from vdgui.vd import Disk
    path = str(tmp_path / name)
    with Disk() as d:
        d.create_base(path, 2 * MiB, fake_backend.NAME)
        d.write(0, b"\x01" * fake_backend.BLOCK)
        d.write(fake_backend.BLOCK * 3, b"\x02" * fake_backend.BLOCK)
    return path


def test_check_exit_codes(tmp_path, fake, capsys):
    import struct
    clean = _fake_image(tmp_path, "clean.fkd")
    assert cli.main(["check", clean]) == 0
    assert "No errors" in capsys.readouterr().out
    leak = _fake_image(tmp_path, "leak.fkd")
    with open(leak, "ab") as f:
        f.write(b"\x09" * fake_backend.BLOCK)
    assert cli.main(["check", leak]) == 3
    corrupt = _fake_image(tmp_path, "corrupt.fkd")
    with open(corrupt, "r+b") as f:
        f.seek(fake_backend.MAP_OFF + 8 * 5)
        f.write(struct.pack("<Q", 0xDEADBEEF000))
    assert cli.main(["check", corrupt]) == 2
    capsys.readouterr()
    assert cli.main(["check", "--json", corrupt]) == 2
    rep = json.loads(capsys.readouterr().out)
    assert rep["exit_code"] == 2 and rep["corrupt"] and rep["problems"][0]["severity"] == "corrupt"
    h = sha(corrupt)
    assert cli.main(["check", "--repair", "--dry-run", corrupt]) == 2
    assert sha(corrupt) == h
    assert cli.main(["check", "--repair", corrupt]) == 0
    assert cli.main(["check", corrupt]) == 0
    err = capsys.readouterr().err
    assert err == ""


def test_unexpected_exceptions_become_one_line(monkeypatch, capsys, tmp_path):
    def boom(args):
        raise RuntimeError("kaboom\nsecond line")
    monkeypatch.setitem(cli.COMMANDS, "backends", boom)
    assert cli.main(["backends"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "internal error: RuntimeError: kaboom second line" in err


def test_allow_unsafe_paths_is_global_and_per_command(tmp_path):
    img = str(tmp_path / "u.img")
    run_cli("create", "-f", "RAW", "--size", "64K", img)
    assert inproc("--allow-unsafe-paths", "info", "--json", img).returncode == 0
    assert inproc("info", "--allow-unsafe-paths", img).returncode == 0
    assert inproc("map", img, "--allow-unsafe-paths").returncode == 0


def test_property_file_keeps_values_out_of_argv(tmp_path, monkeypatch):
    """--property-file K=PATH reads the value from the file (trailing newline dropped)."""
    seen = {}
    real = cli._config

    def spy(backend, props, *, creating=False):
        seen.update(props)
        return real(backend, props, creating=creating)

    monkeypatch.setattr(cli, "_config", spy)
    be = next(b for b in backends() if any(k.mandatory for k in b.config_keys))
    key = next(k.name for k in be.config_keys if k.mandatory and k.default is None)
    (tmp_path / "v").write_bytes(b"value-from-file\n")
    r = inproc("info", "-f", be.name, "--property-file", f"{key}={tmp_path / 'v'}", "-",
               check=False)
    assert seen[key] == b"value-from-file"
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1


def test_every_parsed_command_has_its_function():
    """The parser (cli_parser) and the commands (cli.COMMANDS) are apart: each command the
    parser knows runs a function, and no function waits for a command the parser lacks."""
    import argparse

    from vdgui import cli, cli_parser
    sub = next(a for a in cli_parser.build_parser()._actions
               if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == set(cli.COMMANDS)
    assert all(callable(f) for f in cli.COMMANDS.values())
