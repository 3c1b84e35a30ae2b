"""Errors that hide the truth (issue #12 items 10, 11): raw OSErrors escaping retry loops, probe
exceptions swallowed, the probe rule."""
from __future__ import annotations

import errno
import os
import struct

import pytest

from vdgui.vd import (
    AmbiguousFormat,
    Backend,
    CorruptImage,
    UnknownFormat,
    VDIOError,
    fileio,
    probe,
    registry,
)

MiB = 1 << 20


# -- item 10: every pread/pwrite loop turns an OSError into VDIOError ---------------------------

def test_pread_short_read_retry_error_is_vdioerror(tmp_path, monkeypatch):
    path = tmp_path / "f.raw"
    path.write_bytes(b"\x11" * 8192)
    real = os.pread
    calls = []

    def flaky(fd, n, off):
        calls.append((n, off))
        if len(calls) == 1:
            return real(fd, min(n, 100), off)        # a short read ...
        raise OSError(errno.EIO, "Input/output error")   # ... then the retry fails

    f = fileio.ImageFile(str(path))
    try:
        monkeypatch.setattr(fileio.os, "pread", flaky)
        with pytest.raises(VDIOError) as ei:
            f.pread(0, 4096)
    finally:
        monkeypatch.undo()
        f.close()
    assert len(calls) == 2
    assert str(path) in str(ei.value) and "Input/output error" in str(ei.value)
    assert "0x64" in str(ei.value)                    # names where the read failed


def test_compact_copy_loop_error_is_vdioerror(tmp_path, monkeypatch):
    from vdgui.vd.ops import rewrite as rewrite_mod
    src = tmp_path / "a"
    src.write_bytes(b"\x22" * 65536)
    dst = tmp_path / "b"
    fi = os.open(src, os.O_RDONLY)
    fo = os.open(dst, os.O_WRONLY | os.O_CREAT, 0o644)

    def no_cfr(*a):
        raise OSError(errno.EXDEV, "cross-device")

    def enospc(*a):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(rewrite_mod.os, "copy_file_range", no_cfr)
    monkeypatch.setattr(rewrite_mod.os, "pwrite", enospc)
    try:
        with pytest.raises(VDIOError, match="No space left"):
            rewrite_mod.copy_range(fi, fo, 0, 65536, lambda n: None, str(src))
    finally:
        monkeypatch.undo()
        os.close(fi)
        os.close(fo)


# -- item 11: probes ----------------------------------------------------------------------------

class _Probe(Backend):
    def __init__(self, name, fn):
        super().__init__()
        self.name = name
        self._fn = fn

    def probe(self, src):
        return self._fn(src)


def _with_backends(monkeypatch, *bes):
    monkeypatch.setattr(
        registry.formats, "REGISTERED", list(registry.formats.REGISTERED) + list(bes)
    )


def test_probe_bug_surfaces(tmp_path, monkeypatch):
    path = tmp_path / "x.bin"
    path.write_bytes(b"\0" * 4096)
    _with_backends(monkeypatch, _Probe("BUGGY", lambda src: 1 // 0))
    with pytest.raises(ZeroDivisionError) as ei:
        probe(str(path))
    assert any("BUGGY" in n for n in getattr(ei.value, "__notes__", []))


def test_probe_format_level_failure_is_not_this_format(tmp_path, monkeypatch):
    path = tmp_path / "x.img"
    path.write_bytes(b"\0" * 4096)

    def corrupt(src):
        raise CorruptImage("bad header")

    def short(src):
        return struct.unpack_from(">Q", src.head, len(src.head) - 2)[0]

    _with_backends(monkeypatch, _Probe("CORRUPTP", corrupt), _Probe("SHORTP", short))
    assert probe(str(path)).name == "RAW"


def _qcow2_header() -> bytes:
    # a QCOW2 v3 header: magic, version (probe looks no further)
    return b"QFI\xfb" + struct.pack(">I", 3) + b"\0" * 504


def _vhd_footer(good_checksum: bool) -> bytes:
    from vdgui.vd.formats import vhd

    raw = bytearray(512)
    raw[:8] = vhd.COOKIE
    struct.pack_into(">I", raw, 60, 2)  # fixed disk
    if good_checksum:
        return vhd._with_checksum(bytes(raw), vhd.FOOTER_CHECKSUM_AT)
    struct.pack_into(">I", raw, 64, 0x12345678)
    return bytes(raw)


@pytest.mark.parametrize("good", [True, False], ids=["tie-100-100", "unequal-100-85"])
def test_two_strong_claims_are_an_error(tmp_path, good):
    """A file that is both a QCOW2 (head) and a VHD (footer): the old rule refused only a tie
    (100/100) and silently picked QCOW2 for 100/85."""
    path = tmp_path / "both.img"
    path.write_bytes(_qcow2_header() + b"\0" * (MiB - 512) + _vhd_footer(good))
    scores = {b.name: s for s, b in registry.probe_scores(str(path))}
    assert scores["QCOW2"] == 100 and scores["VHD"] == (100 if good else 85)
    with pytest.raises(AmbiguousFormat, match=r"QCOW2.*VHD|VHD.*QCOW2"):
        probe(str(path))


def test_one_strong_claim_wins_over_weak_ones(tmp_path):
    """The other way: one strong claim and weak ones (RAW, a QCOW2 of unknown version at 60)
    is not ambiguous."""
    path = tmp_path / "one.img"
    head = b"QFI\xfb" + struct.pack(">I", 9) + b"\0" * 504
    path.write_bytes(head + b"\0" * (MiB - 512) + _vhd_footer(True))
    scores = {b.name: s for s, b in registry.probe_scores(str(path))}
    assert scores["QCOW2"] == 60 and scores["VHD"] == 100
    assert probe(str(path)).name == "VHD"


@pytest.mark.parametrize("ext,owner,found", [
    ("vdi", "VDI", "offset 0x40"), ("vhd", "VHD", "conectix"), ("vhdx", "VHDX", "vhdxfile"),
    ("qcow2", "QCOW2", "magic"), ("qed", "QED", "magic"), ("luks", "LUKS", "LUKS")])
def test_a_damaged_image_is_never_guessed_raw_by_its_own_name(tmp_path, ext, owner, found):
    """x.vdi whose header is garbage was shown as a healthy RAW disk (and writable as one):
    its format's own reason is given instead; raw data under a raw-ish name stays RAW."""
    data = bytes((i * 7 + 3) & 0xFF or 1 for i in range(MiB))
    path = tmp_path / f"damaged.{ext}"
    path.write_bytes(data)
    with pytest.raises(UnknownFormat) as exc:
        probe(str(path))
    msg = str(exc.value)
    assert f"not a valid {owner} image" in msg and found in msg and "-f RAW" in msg
    for name in ("disk.img", "disk", "disk-flat.vmdk"):        # VMDK flat extents are raw data
        (tmp_path / name).write_bytes(data)
        assert probe(str(tmp_path / name)).name == "RAW"


def test_a_damaged_vdi_is_refused_by_the_cli_in_one_line(tmp_path, capsys):
    from vdgui.cli import main
    path = tmp_path / "x.vdi"
    path.write_bytes(b"<<< Oracle VM VirtualBox Disk Image >>>\n".ljust(MiB, b"\xa5"))
    assert main(["info", str(path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a valid VDI image" in err[0] and "0xbeda107f" in err[0]
    assert main(["info", "-f", "RAW", str(path)]) == 0


# -- item 12: check findings carry codes; repair keys on codes, never on the wording -------------


def _problem_calls(tree):
    import ast

    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = (
                f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
            )
            if name == "Problem":
                yield node


def test_every_check_finding_has_a_code():
    """Every Problem built by the engine names its code (a ProblemCode member), so that repair
    and the CLI's --json never depend on the message text."""
    import ast
    import pathlib

    import vdgui.vd as vd
    from vdgui.vd import ProblemCode

    codes = {v for k, v in vars(ProblemCode).items() if k.isupper()}
    root = pathlib.Path(vd.__file__).parent
    missing, seen = [], 0
    for py in sorted(root.rglob("*.py")):
        tree = ast.parse(py.read_text(), str(py))
        for call in _problem_calls(tree):
            seen += 1
            kw = {k.arg: k.value for k in call.keywords}
            if "code" not in kw:
                missing.append(f"{py.relative_to(root)}:{call.lineno}")
            elif (
                isinstance(kw["code"], ast.Attribute)
                and isinstance(kw["code"].value, ast.Name)
                and kw["code"].value.id == "ProblemCode"
            ):
                assert kw["code"].attr in codes, f"{py}:{call.lineno}: unknown code"
    assert seen > 30
    assert not missing, f"Problem(...) without code=: {missing}"


def _vhd_pair(tmp_path):
    from vdgui.vd import Disk

    base, child = str(tmp_path / "base.vhd"), str(tmp_path / "child.vhd")
    with Disk() as d:
        d.create_base(base, 4 * MiB, "VHD")
        d.write(0, b"\x5a" * MiB)
        d.flush()
    with Disk.open_chain(base) as d:
        d.create_diff(child, "VHD")
        d.write(MiB, b"\xa5" * MiB)
        d.flush()
    return base, child


def _reworded_repair(path):
    """Open for writing, reword every finding found on open, repair: what gets fixed must not
    depend on the words."""
    from vdgui.vd import OpenFlags, get_backend

    img = get_backend("VHD").open(path, OpenFlags.NORMAL, None)
    try:
        assert img._problems
        for p in img._problems:
            p.what = "reworded for people"
        rep = img.check(repair=True)
        assert rep.repaired
    finally:
        img.close()


def test_vhd_repair_keys_on_codes_header_checksum(tmp_path):
    from vdgui.vd import ProblemCode, check
    from vdgui.vd.formats import vhd

    base, _child = _vhd_pair(tmp_path)
    with open(base, "r+b") as f:
        footer = f.read(512)
        hoff = struct.unpack_from(">Q", footer, 16)[0]
        f.seek(hoff + vhd.HEADER_CHECKSUM_AT)
        f.write(b"\xde\xad\xbe\xef")
    rep = check(base)
    assert [p.code for p in rep.problems] == [ProblemCode.HEADER_CHECKSUM]
    _reworded_repair(base)
    assert not check(base).problems


def test_vhd_repair_keys_on_codes_parent_locator(tmp_path):
    from vdgui.vd import ProblemCode, check

    _base, child = _vhd_pair(tmp_path)
    with open(child, "r+b") as f:
        footer = f.read(512)
        hoff = struct.unpack_from(">Q", footer, 16)[0]
        f.seek(hoff + 576)  # locator 0
        loc = bytearray(f.read(24))
        struct.pack_into(">Q", loc, 16, 1 << 40)  # data far past the end of the file
        f.seek(hoff + 576)
        f.write(loc)
        # keep the header checksum right: only the locator is wrong
        from vdgui.vd.formats import vhd

        f.seek(hoff)
        raw = f.read(1024)
        f.seek(hoff)
        f.write(vhd._with_checksum(raw, vhd.HEADER_CHECKSUM_AT))
    rep = check(child)
    assert ProblemCode.PARENT_LOCATOR in [p.code for p in rep.problems]
    _reworded_repair(child)
    rep = check(child)
    assert ProblemCode.PARENT_LOCATOR not in [p.code for p in rep.problems], rep.problems


# -- item 22: compare and map cost follows the allocation, not the virtual size -----------------

TiB = 1 << 40


def _counting(monkeypatch):
    from vdgui.vd import Disk

    calls = {"read": 0, "allocation": 0}
    real_read, real_alloc = Disk.read, Disk.allocation

    def read(self, *a, **k):
        calls["read"] += 1
        return real_read(self, *a, **k)

    def allocation(self, *a, **k):
        calls["allocation"] += 1
        return real_alloc(self, *a, **k)

    monkeypatch.setattr(Disk, "read", read)
    monkeypatch.setattr(Disk, "allocation", allocation)
    return calls


def _sparse_qcow2(path, size, data_at):
    from vdgui.vd import Disk

    with Disk() as d:
        d.create_base(str(path), size, "QCOW2")
        d.write(data_at, b"\x11" * MiB)
        d.flush()


def test_compare_reads_only_allocated_ranges(tmp_path, monkeypatch, capsys):
    """compare of two 1 TiB images holding 1 MiB each: it asked the allocation of every 4 MiB
    window (262,144 calls, 2 s per TiB); now one walk per image and reads of the data only."""
    from vdgui import cli

    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    _sparse_qcow2(a, TiB, 100 * MiB)
    _sparse_qcow2(b, TiB, 100 * MiB)
    calls = _counting(monkeypatch)
    assert cli.main(["compare", str(a), str(b)]) == 0
    assert "identical" in capsys.readouterr().out
    assert calls["allocation"] <= 4 and calls["read"] <= 4, calls
    # and a difference far from the data is still found
    from vdgui.vd import Disk

    with Disk.open_chain(str(b)) as d:
        d.write(TiB - 4096, b"\x01" * 4096)
        d.flush()
    assert cli.main(["compare", str(a), str(b)]) == 1
    assert f"offset {TiB - 4096}" in capsys.readouterr().out


def test_map_walks_the_allocation_once(tmp_path, monkeypatch, capsys):
    """map of a 64 TiB image: one allocation walk (it stepped 1 GiB at a time: 65,536 calls;
    a DMG declaring 2^64 sectors never finished)."""
    from vdgui import cli

    a = tmp_path / "a.qcow2"
    _sparse_qcow2(a, 64 * TiB, 100 * MiB)
    calls = _counting(monkeypatch)
    assert cli.main(["map", "--json", str(a)]) == 0
    import json

    runs = json.loads(capsys.readouterr().out)
    assert [(r["start"], r["length"], r["data"]) for r in runs] == [
        (0, 100 * MiB, False),
        (100 * MiB, MiB, True),
        (101 * MiB, 64 * TiB - 101 * MiB, False),
    ]
    assert calls["allocation"] <= 2, calls


def test_parents_by_uuid_open_each_file_once(tmp_path, monkeypatch):
    """Opening a 60-deep VDI chain (VDI finds parents by UUID only): every member's search
    opened every file of the folder (quadratic; 200 members took 10-24 s). The UUID of an
    unchanged file is now remembered: about one open per file."""
    from vdgui.vd import Disk, chain, registry

    n = 60
    paths = [str(tmp_path / f"s{i:03d}.vdi") for i in range(n)]
    with Disk() as d:
        d.create_base(paths[0], MiB, "VDI")
        for p in paths[1:]:
            d.create_diff(p, "VDI")
    monkeypatch.setattr(chain, "_UUID_CACHE", {})
    probes = [0]
    real = registry.probe

    def counting(path):
        probes[0] += 1
        return real(path)

    monkeypatch.setattr(registry, "probe", counting)
    with Disk.open_chain(paths[-1]) as d:
        assert len(d) == n
    assert probes[0] <= 3 * n, probes[0]
    # a changed file is looked at again: a new UUID is seen
    import uuid as uuidlib

    with Disk.open_chain(paths[0]) as d:
        d.set_uuid(0, uuidlib.uuid4())
    from vdgui.vd import VDError

    with pytest.raises(VDError):
        Disk.open_chain(paths[1])
