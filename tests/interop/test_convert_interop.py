"""Converting with vdgui, checked by qemu: for every creatable backend of the table (and each
variant it declares), our converted image passes ``qemu-img check`` (where qemu can check the
format) and ``qemu-img compare`` finds it identical to the source as qemu reads it. Sources qemu
makes in each format it can create are converted by us and compared the same way."""
from __future__ import annotations

import pytest

from tests.interop.qemu_formats import qemu_name
from vdgui.vd import Cap, ImageFlags, backends, copy_image

pytestmark = pytest.mark.interop

MiB = 1 << 20
SIZE = 6 * MiB


def _targets():
    cases = []
    for b in backends():
        if not (b.creatable and b.writable and b.caps & Cap.FILE) or qemu_name(b) is None:
            continue
        if b.needs_passphrase:
            continue        # encrypted-only formats: tests/interop/test_luks_interop.py
        variants = [ImageFlags.NONE] + [f for f in (ImageFlags.FIXED, ImageFlags.SPLIT_2G,
                                                    ImageFlags.STREAM_OPTIMIZED, ImageFlags.ESX)
                                        if b.create_flags & f]
        for v in variants:
            cases.append(pytest.param(b, v, id=f"{b.name}-{v.name or 'dynamic'}"))
    return cases


# scattered writes: unaligned, block-crossing, a zero-filled range, the very end
WRITES = [("0x11", 0, 4096), ("0x22", 65536 + 512, 70000), ("0x00", 2 * MiB, MiB),
          ("0x33", 3 * MiB - 512, 1536), ("0x44", 5 * MiB + 4096, 300 * 1024),
          ("0x55", SIZE - 512, 512)]


def _fill(qemu, path, fmt):
    for pat, off, ln in WRITES:
        qemu.io("-f", fmt, "-c", f"write -P {pat} {off} {ln}", path)


@pytest.fixture(scope="module")
def source(qemu, tmp_path_factory):
    d = tmp_path_factory.mktemp("convsrc")
    src = str(d / "src.raw")
    qemu.img("create", "-f", "raw", src, SIZE)
    _fill(qemu, src, "raw")
    return src


@pytest.mark.parametrize("backend,variant", _targets())
def test_our_conversion_passes_qemu(qemu, source, tmp_path, backend, variant):
    qfmt = qemu_name(backend)
    dst = str(tmp_path / f"out.{backend.default_extension() or 'img'}")
    created = copy_image(source, dst, backend, variant=variant)
    assert created == [dst]
    r = qemu.check(dst, qfmt)
    if r.returncode != 63:                       # 63: qemu cannot check this format
        assert r.returncode == 0, f"qemu-img check: {r.stdout} {r.stderr}"
    r = qemu.compare(source, dst, "raw", qfmt)
    assert r.returncode == 0, f"qemu-img compare: {r.stdout} {r.stderr}"


def _qemu_sources():
    out = []
    for b in backends():
        q = qemu_name(b)
        if q and q != "raw" and b.caps & Cap.FILE and q in ("vdi", "vpc", "vmdk", "qcow2", "qed",
                                                            "parallels", "vhdx"):
            out.append(pytest.param(b, id=b.name))
    return out


@pytest.mark.parametrize("backend", _qemu_sources())
def test_qemu_made_images_convert_to_raw(qemu, tmp_path, backend):
    q = qemu_name(backend)
    src = str(tmp_path / f"q.{backend.default_extension()}")
    qemu.img("create", "-f", q, src, SIZE)
    _fill(qemu, src, q)
    out = str(tmp_path / "ours.raw")
    copy_image(src, out, "RAW")
    r = qemu.compare(src, out, q, "raw")
    assert r.returncode == 0, f"qemu-img compare: {r.stdout} {r.stderr}"


def test_qemu_backing_chain_flattened(qemu, tmp_path):
    """A qcow2 backing chain (when QCOW2 is in the table) or else a chain qemu builds in the first
    differencing format both understand, flattened by us."""
    cands = [b for b in backends() if b.caps & Cap.DIFF and qemu_name(b) in ("qcow2", "qed",
                                                                            "vmdk")]
    assert cands, "no differencing backend shared with qemu is registered"
    b = cands[0]
    q = qemu_name(b)
    ext = b.default_extension()
    base, top = str(tmp_path / f"base.{ext}"), str(tmp_path / f"top.{ext}")
    qemu.img("create", "-f", q, base, SIZE)
    _fill(qemu, base, q)
    qemu.img("create", "-f", q, "-b", "base." + ext, "-F", q, top)
    qemu.io("-f", q, "-c", "write -P 0x66 1M 128k", "-c", "write -z 0 4096", top)
    out = str(tmp_path / "flat.raw")
    copy_image(top, out, "RAW")
    r = qemu.compare(top, out, q, "raw")
    assert r.returncode == 0, f"qemu-img compare: {r.stdout} {r.stderr}"


@pytest.mark.parametrize("fmt,qfmt,ext", [("RAW", "raw", "raw"), ("VHD", "vpc", "vhd")])
def test_kernel_copy_into_fixed_targets_matches_qemu(qemu, source, tmp_path, monkeypatch, fmt,
                                                    qfmt, ext):
    """Fixed RAW/VHD targets are filled with copy_file_range (issue #18 goal 4): qemu-img finds
    the result identical to the source."""
    import os
    calls = []
    real = os.copy_file_range
    monkeypatch.setattr(os, "copy_file_range",
                        lambda *a: (calls.append(a[2]), real(*a))[1])
    dst = str(tmp_path / f"fixed.{ext}")
    copy_image(source, dst, fmt, variant=ImageFlags.FIXED)
    assert calls, "copy_file_range was not used"
    r = qemu.compare(source, dst, "raw", qfmt)
    assert r.returncode == 0, f"qemu-img compare: {r.stdout} {r.stderr}"
