"""check(): the generic CHECK/REPAIR driver, with VDI (and the test-only FAKEDIFF) damaged on
purpose. Per-format damage recipes beyond these live in the format tests."""
from __future__ import annotations

import struct

import pytest

from tests.engine import fake_backend
from tests.engine.ops_support import (  # noqa: F401 - fixtures
    MiB,
    ProgressLog,
    cancel_everywhere,
    fake_registered,
    file_sha,
    formats_with,
    qemu_name,
    read_chain,
    temps_in,
    unthrottled,
)
from vdgui.vd import CheckReport, Disk, NotSupported, Operation, check

SIZE = 8 * MiB


def _vdi_damage(path):
    """Block map entry 1 -> far past the end of the file (corrupt); 2 MiB of junk appended
    after the last block (leak)."""
    with open(path, "r+b") as f:
        off_blocks = struct.unpack_from("<I", f.read(0x200), 0x154)[0]
        f.seek(off_blocks + 4)
        f.write(struct.pack("<I", 0x00FFFFF0))
        f.seek(0, 2)
        f.write(b"\xab" * (2 * MiB))


def _fake_damage(path):
    with open(path, "r+b") as f:
        f.seek(fake_backend.MAP_OFF + 8 * (MiB // fake_backend.BLOCK))   # inside MiB 1
        f.write(struct.pack("<Q", 0x7FFF0000))
        f.seek(0, 2)
        f.write(b"\xab" * fake_backend.BLOCK)


DAMAGE = {"VDI": (_vdi_damage, "vdi"), "FAKEDIFF": (_fake_damage, "fkd")}
FORMATS = [f for f in formats_with(Operation.CHECK, Operation.REPAIR) if f in DAMAGE]


def _make(tmp_path, fmt):
    path = str(tmp_path / f"img.{DAMAGE[fmt][1]}")
    with Disk() as d:
        d.create_base(path, SIZE, fmt)
        for i in range(4):
            d.write(i * MiB, bytes([i + 1]) * MiB)
        d.flush()
    return path


@pytest.mark.parametrize("fmt", FORMATS)
def test_check_clean(tmp_path, qemu, fmt):
    path = _make(tmp_path, fmt)
    sha = file_sha(path)
    log = ProgressLog()
    rep = check(path, progress=log)
    log.assert_well_formed()
    assert isinstance(rep, CheckReport) and not rep.problems and rep.exit_code == 0
    assert file_sha(path) == sha
    rep = check(path, repair=True)
    assert rep.exit_code == 0 and file_sha(path) == sha     # nothing to repair: untouched


@pytest.mark.parametrize("fmt", FORMATS)
def test_check_dry_run_then_repair(tmp_path, qemu, fmt):
    path = _make(tmp_path, fmt)
    DAMAGE[fmt][0](path)
    sha = file_sha(path)
    qn = qemu_name(fmt)
    if qn:
        assert qemu.check(path, qn).returncode in (2, 3)     # the oracle agrees it is damaged

    rep = check(path)
    assert rep.exit_code == 2 and rep.corrupt
    assert any(p.severity == "corrupt" and p.offset is not None for p in rep.problems)
    assert any(p.severity == "leak" for p in rep.problems)
    assert file_sha(path) == sha

    rep = check(path, repair=True, dry_run=True)
    assert rep.problems and not any(p.repaired for p in rep.problems)
    assert file_sha(path) == sha, "a dry run changed the image"

    log = ProgressLog()
    rep = check(path, repair=True, progress=log)
    log.assert_well_formed()
    assert any(p.repaired for p in rep.problems)
    assert rep.exit_code == 0
    assert file_sha(path) != sha
    assert not temps_in(tmp_path)

    again = check(path)
    assert again.exit_code == 0 and not again.problems, [p.what for p in again.problems]
    if qn:
        r = qemu.check(path, qn)
        assert r.returncode == 0, r.stdout + r.stderr
    # blocks other than the damaged one still read their data
    data = read_chain(path)
    for i in (0, 2, 3):
        assert data[i * MiB:(i + 1) * MiB] == bytes([i + 1]) * MiB


@pytest.mark.parametrize("fmt", FORMATS)
def test_repair_cancel(tmp_path, fmt, unthrottled):
    (tmp_path / "img").mkdir()
    path = _make(tmp_path / "img", fmt)
    DAMAGE[fmt][0](path)
    points = cancel_everywhere(path, lambda p, cb: check(p, repair=True, progress=cb),
                               tmp_path / "count")
    assert len(points) >= 3


def test_check_unopenable_is_a_report(tmp_path):
    path = tmp_path / "bad.fkd"
    path.write_bytes(fake_backend.MAGIC + b"{not json" + bytes(40000))
    rep = check(str(path), format="FAKEDIFF")
    assert rep.exit_code == 2
    assert "cannot be opened" in rep.problems[0].what


def test_check_refusals(tmp_path):
    raw = tmp_path / "r.img"
    raw.write_bytes(bytes(MiB))
    with pytest.raises(NotSupported, match="check is not supported for RAW"):
        check(str(raw), format="RAW")
