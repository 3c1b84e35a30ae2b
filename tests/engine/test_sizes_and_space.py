"""Sizes (issue #12 items 7, 8, 27): fixed images hold their blocks on disk and are refused up
front when the file system cannot hold them; each format declares its real maximum size, which
create, resize and convert enforce with a message naming it; memory stays bounded at that
maximum; sizes parse without ambiguous units."""
from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vdgui.vd import (
    Cap,
    Disk,
    ImageFlags,
    InvalidArgument,
    OpenFlags,
    Operation,
    VDError,
    backends,
    copy_image,
    describe_size,
    get_backend,
    parse_size,
    resize,
    space,
)

MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40
ROOT = Path(__file__).resolve().parent.parent.parent

CREATABLE = [b for b in backends() if b.caps & Cap.FILE and b.can(Operation.CREATE)
             and not b.needs_passphrase]   # raw LUKS: tests/interop/test_luks_interop.py
# every fixed variant each creatable backend offers
FIXED = [(b.name, v) for b in CREATABLE if b.create_flags & ImageFlags.FIXED
         for v in ([ImageFlags.FIXED] + ([ImageFlags.FIXED | ImageFlags.SPLIT_2G]
                                           if b.caps & Cap.CREATE_SPLIT_2G else []))]


def _ext(fmt: str) -> str:
    return get_backend(fmt).default_extension()


def _allocated(d: Disk) -> int:
    return sum(os.stat(f).st_blocks * 512 for f in d.top.files())


def _create(path, fmt, size, flags=ImageFlags.NONE, config=None):
    with Disk() as d:
        d.create_base(str(path), size, fmt, flags=flags, config=config)
        return d.top.files()


# -- item 7: fixed images are allocated ------------------------------------------------------
@pytest.mark.parametrize("fmt,flags", FIXED, ids=[f"{f}-{int(v)}" for f, v in FIXED])
def test_fixed_images_hold_their_blocks(tmp_path, fmt, flags):
    size = 8 * MiB
    _create(tmp_path / f"f.{_ext(fmt)}", fmt, size, flags)
    with Disk.open_chain(str(tmp_path / f"f.{_ext(fmt)}"), fmt, OpenFlags.READ_ONLY) as d:
        assert d.top.flags & ImageFlags.FIXED
        assert _allocated(d) >= size, f"{fmt} fixed: {_allocated(d)} bytes on disk for {size}"


@pytest.mark.parametrize("fmt", [f for f, v in FIXED if v == ImageFlags.FIXED
                                 and get_backend(f).can(Operation.RESIZE) and f != "RAW"])
def test_grown_fixed_images_hold_their_blocks(tmp_path, fmt):
    path = tmp_path / f"g.{_ext(fmt)}"
    _create(path, fmt, 8 * MiB, ImageFlags.FIXED)
    resize(str(path), 16 * MiB)
    with Disk.open_chain(str(path), fmt, OpenFlags.READ_ONLY) as d:
        assert d.size >= 16 * MiB
        assert _allocated(d) >= 16 * MiB, f"{fmt}: {_allocated(d)} bytes on disk after growing"


def test_without_fallocate_zeroes_are_written(tmp_path, monkeypatch):
    def no_fallocate(fd, off, n):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")
    monkeypatch.setattr(os, "posix_fallocate", no_fallocate)
    path = tmp_path / "z.vdi"
    _create(path, "VDI", 8 * MiB, ImageFlags.FIXED)
    assert os.stat(path).st_blocks * 512 >= 8 * MiB
    with Disk.open_chain(str(path), "VDI", OpenFlags.READ_ONLY) as d:
        assert d.read(0, 8 * MiB) == bytes(8 * MiB)


def _too_big_for_disk(tmp_path) -> int:
    free = space.free_space(str(tmp_path))
    assert free is not None
    return (free + 64 * GiB) // MiB * MiB


@pytest.mark.parametrize("fmt,flags", FIXED, ids=[f"{f}-{int(v)}" for f, v in FIXED])
def test_fixed_image_larger_than_free_space_is_refused_before_writing(tmp_path, fmt, flags):
    size = _too_big_for_disk(tmp_path)
    limit = get_backend(fmt).max_size
    if limit is not None and size > limit:
        pytest.skip(f"more free space than a {fmt} image can hold")
    with pytest.raises(VDError) as exc:
        _create(tmp_path / f"big.{_ext(fmt)}", fmt, size, flags)
    msg = str(exc.value)
    assert "not enough free space" in msg and describe_size(size) in msg and "available" in msg
    assert sorted(os.listdir(tmp_path)) == []          # nothing written, no temporary left


# -- item 8: declared maxima ---------------------------------------------------------------
def test_every_creatable_backend_declares_its_maximum():
    for b in CREATABLE:
        assert b.max_size is not None and b.max_size > 0, b.name
        assert b.max_size % b.size_granularity == 0 or b.name == "VHD", b.name
        assert b.max_size_for(None) == b.max_size, b.name


LIMITS = {"VDI": 16 * TiB, "VMDK": 2 * TiB, "VHD": 2040 * GiB, "VHDX": 64 * TiB,
          "QCOW2": 2 * (1 << 50), "QED": 64 * TiB, "Parallels": 16 * TiB,
          "RAW": (1 << 63) - 512}


def test_limits_are_the_documented_ones():
    assert {b.name: b.max_size for b in CREATABLE} == LIMITS


@pytest.mark.parametrize("fmt", sorted(LIMITS))
def test_create_above_the_limit_names_it(tmp_path, fmt):
    b = get_backend(fmt)
    over = b.max_size + b.size_granularity
    with pytest.raises(InvalidArgument) as exc:
        _create(tmp_path / f"o.{_ext(fmt)}", fmt, over)
    assert f"{fmt} images can be at most {describe_size(b.max_size)}" in str(exc.value)
    assert os.listdir(tmp_path) == []


def test_limit_follows_the_block_and_cluster_size():
    vdi, qcow2, qed, par = (get_backend(n) for n in ("VDI", "QCOW2", "QED", "Parallels"))
    assert vdi.max_size_for({"AllocationBlockSize": "2097152"}) == 32 * TiB
    assert qcow2.max_size_for({"ClusterSize": "2097152"}) == 1 << 56
    assert qed.max_size_for({"ClusterSize": "131072"}) == 512 * TiB
    assert par.max_size_for({"ClusterSize": "4096"}) == 64 * GiB


@pytest.mark.parametrize("fmt", ["VDI", "QCOW2", "QED", "VHD", "VHDX", "VMDK", "Parallels"])
def test_resize_above_the_limit_is_refused_before_any_work(tmp_path, fmt):
    path = tmp_path / f"r.{_ext(fmt)}"
    _create(path, fmt, 8 * MiB)
    before = path.read_bytes() if path.is_file() else None
    b = get_backend(fmt)
    with Disk.open_chain(str(path), fmt, OpenFlags.READ_ONLY) as d:
        limit = d.top.max_size          # the image's own (its block or cluster size)
    assert limit <= b.max_size
    with pytest.raises(InvalidArgument) as exc:
        resize(str(path), limit + (1 << 30))
    assert f"can be at most {describe_size(limit)}" in str(exc.value)
    if before is not None:
        assert path.read_bytes() == before


def test_convert_above_the_target_limit_is_refused(tmp_path):
    src = tmp_path / "s.qcow2"
    _create(src, "QCOW2", 3 * TiB)
    with pytest.raises(InvalidArgument) as exc:
        copy_image(str(src), str(tmp_path / "d.vmdk"), "VMDK")
    assert "VMDK images can be at most 2 TiB" in str(exc.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.qcow2"]


# peak memory at each format's maximum, measured in a fresh interpreter
_MEASURE = r'''
import sys
from vdgui.vd import Disk, copy_image, get_backend, resize
fmt, op, d = sys.argv[1], sys.argv[2], sys.argv[3]
b = get_backend(fmt)
ext = b.default_extension()
if op == "create":
    with Disk() as disk:
        disk.create_base(f"{d}/a.{ext}", b.max_size, fmt)
elif op == "resize":
    with Disk() as disk:
        disk.create_base(f"{d}/r.{ext}", 1 << 30, fmt)
        limit = disk.top.max_size        # the image's limit (its block or cluster size)
    resize(f"{d}/r.{ext}", limit)
else:
    with Disk() as disk:
        disk.create_base(f"{d}/s.{ext}", b.max_size, fmt)
    copy_image(f"{d}/s.{ext}", f"{d}/t.{ext}", fmt)
# VmHWM, not ru_maxrss: Linux carries the forking parent's (pytest's) peak across exec
for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):
        print(int(line.split()[1]) * 1024)
'''


def _peak(tmp_path, fmt, op) -> int:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", _MEASURE, fmt, op, str(tmp_path)],
                       capture_output=True, text=True, env=env, timeout=300,
                       preexec_fn=lambda: __import__("resource").setrlimit(
                           __import__("resource").RLIMIT_AS, (2 * GiB, 2 * GiB)))
    assert r.returncode == 0, r.stderr[-2000:]
    return int(r.stdout.split()[-1])


def test_vdi_create_at_its_maximum_stays_small(tmp_path):
    assert _peak(tmp_path, "VDI", "create") < 300 * MiB


@pytest.mark.slow
@pytest.mark.parametrize("op", ["create", "resize", "convert"])
@pytest.mark.parametrize("fmt", ["VDI", "VMDK", "VHD", "QED", "VHDX"])
def test_peak_memory_at_the_maximum(tmp_path, fmt, op):
    assert _peak(tmp_path, fmt, op) < 300 * MiB


# -- sizes (item 27) ---------------------------------------------------------------------------
@pytest.mark.parametrize("text,value", [
    ("512", 512), ("512B", 512), ("4K", 4096), ("4k", 4096), ("4KiB", 4096), ("1.5M", 3 << 19),
    ("2G", 2 * GiB), ("2GiB", 2 * GiB), ("1T", TiB), ("1P", 1 << 50), ("8E", 1 << 63),
    (" 3 MiB ", 3 * MiB)])
def test_parse_size_binary_units(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["1Kb", "1KB", "1kB", "1MB", "2GB", "1Gb", "1kib", "1mb",
                                  "0.3K", "1.5", "-1", "K", "1 X", "1e3"])
def test_parse_size_refuses_ambiguous_units(text):
    with pytest.raises(InvalidArgument):
        parse_size(text)
