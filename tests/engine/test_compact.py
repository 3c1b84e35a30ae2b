"""compact(): zero blocks dropped, parent duplicates dropped in diffs, file shrinks, content kept,
cancellation leaves the file byte-identical, refusal for backends without COMPACT."""
from __future__ import annotations

import os

import pytest

from tests.engine.ops_support import (  # noqa: F401 - fixtures
    MiB,
    ProgressLog,
    cancel_everywhere,
    ext_of,
    fake_registered,
    file_sha,
    formats_with,
    qemu_verify,
    read_chain,
    temps_in,
    unthrottled,
)
from vdgui.vd import Disk, NotSupported, OpenFlags, Operation, compact

FORMATS = formats_with(Operation.COMPACT, Operation.WRITE)
DIFF_FORMATS = formats_with(Operation.COMPACT, Operation.WRITE, diff=True)
SIZE = 16 * MiB


def _base_with_zero_blocks(path, fmt):
    """Data everywhere in the first 12 MiB, then 6 MiB of it overwritten with zeroes."""
    with Disk() as d:
        d.create_base(path, SIZE, fmt)
        size = d.size
        for i in range(12):
            d.write(i * MiB, bytes([i + 1]) * MiB)
        d.write(3 * MiB, bytes(6 * MiB))
        d.write(10 * MiB + 512, b"tail" * 128)
        bs = d.top.block_size
        d.flush()
    expect = bytearray(size)
    for i in range(12):
        expect[i * MiB:(i + 1) * MiB] = bytes([i + 1]) * MiB
    expect[3 * MiB:9 * MiB] = bytes(6 * MiB)
    expect[10 * MiB + 512:10 * MiB + 1024] = b"tail" * 128
    freed = 0
    if bs and bs <= 6 * MiB:
        first = -(-3 * MiB // bs)
        last = 9 * MiB // bs
        freed = max(0, last - first) * bs
    return bytes(expect), freed


@pytest.mark.parametrize("fmt", FORMATS)
def test_compact_base(tmp_path, qemu, fmt):
    path = str(tmp_path / f"b.{ext_of(fmt)}")
    expect, freed = _base_with_zero_blocks(path, fmt)
    before = os.path.getsize(path)
    log = ProgressLog()
    compact(path, progress=log)
    log.assert_well_formed()
    after = os.path.getsize(path)
    # formats with blocks larger than the zeroed area (VHDX: 32 MiB) have nothing to free here
    assert freed >= 4 * MiB or freed == 0
    assert before - after >= freed, f"{before} -> {after}: expected at least {freed} bytes freed"
    assert read_chain(path) == expect
    assert not temps_in(tmp_path)
    qemu_verify(qemu, path, fmt, expect, tmp_path, is_base=True)
    # idempotent: a second compact frees nothing more and changes no content
    compact(path)
    assert os.path.getsize(path) <= after
    assert read_chain(path) == expect


@pytest.mark.parametrize("fmt", DIFF_FORMATS)
def test_compact_diff_keeps_content(tmp_path, qemu, fmt):
    """A diff's zero block over parent data is data (kept); blocks equal to the parent and zero
    blocks over zero parent areas are dropped."""
    base, diff = str(tmp_path / f"b.{ext_of(fmt)}"), str(tmp_path / f"d.{ext_of(fmt)}")
    with Disk() as d:
        d.create_base(base, SIZE, fmt)
        size = d.size
        for i in range(8):
            d.write(i * MiB, bytes([i + 1]) * MiB)
        d.create_diff(diff, fmt)
        for i in range(2, 6):
            d.write(i * MiB, bytes([i + 1]) * MiB)        # duplicates of the parent
        d.write(6 * MiB, bytes(MiB))                       # zeroes over parent data: keep
        d.write(10 * MiB, b"\x07" * MiB)
        d.write(10 * MiB, bytes(MiB))                      # zeroes over a zero parent: drop
        d.write(12 * MiB, b"\x55" * MiB)                   # real data
        d.flush()
    expect = read_chain(diff)
    assert expect[6 * MiB:7 * MiB] == bytes(MiB) and expect[12 * MiB] == 0x55
    base_sha = file_sha(base)
    before = os.path.getsize(diff)
    log = ProgressLog()
    compact(diff, progress=log)
    log.assert_well_formed()
    assert read_chain(diff) == expect
    assert file_sha(base) == base_sha
    assert os.path.getsize(diff) < before
    with Disk.open_chain(diff, None, OpenFlags.READ_ONLY) as d:
        held = sum(e.length for e in d.allocation() if e.level == 1)
    assert held <= 3 * MiB, f"the diff still holds {held} bytes"
    assert size == len(expect)
    qemu_verify(qemu, diff, fmt, expect, tmp_path, is_base=False)


@pytest.mark.parametrize("fmt", FORMATS)
def test_compact_cancel(tmp_path, fmt, unthrottled):
    (tmp_path / "img").mkdir()
    path = str(tmp_path / "img" / f"b.{ext_of(fmt)}")
    expect, _ = _base_with_zero_blocks(path, fmt)
    points = cancel_everywhere(path, lambda p, cb: compact(p, progress=cb), tmp_path / "count")
    assert len(points) >= 3
    assert read_chain(path) == expect


def test_compact_refusal_and_stale_temps(tmp_path):
    raw = tmp_path / "r.img"
    raw.write_bytes(bytes(MiB))
    with pytest.raises(NotSupported, match="compact is not supported for RAW"):
        compact(str(raw), format="RAW")
    path = str(tmp_path / "f.fkd")
    expect, _ = _base_with_zero_blocks(path, "FAKEDIFF")
    stale = tmp_path / ".f.fkd.vdgui-tmp-999999999"      # no such process
    stale.write_bytes(b"left over by a killed run")
    compact(path)
    assert not stale.exists()
    assert read_chain(path) == expect
