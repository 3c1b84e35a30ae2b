"""Conversion matrix: images qemu makes (every format and subformat qemu can create, odd sizes,
scattered data, explicit zeroes, discards, compressed clusters) converted by ``vdgui-img convert``
into every writable backend of the table and every variant it declares, then checked by qemu:
``qemu-img compare`` finds the target identical to the source and ``qemu-img check`` finds it
clean (where qemu can check the target format).

Targets come from the registry: the matrix grows when a backend lands. To stay fast, not every
pair is run: the four common formats (VDI, VMDK, VHD, QCOW2) are crossed fully (their default
subformats against every variant of those backends), every target variant is fed from two
sources and every source goes to two targets (chosen by rotation, so the pairs are fixed).
The CLI is run in-process (``vdgui.cli.main``) to save an interpreter start per conversion."""
from __future__ import annotations

import contextlib
import io
import os

import pytest

from tests.interop.qemu_formats import qemu_name
from vdgui import cli
from vdgui.vd import Cap, ImageFlags, backends, variant_words

pytestmark = pytest.mark.interop

MiB = 1 << 20
SIZE = 5 * MiB + 3584          # odd: not a multiple of any block size (qemu may round it up)


# (id, qemu format, -o options, extension, qemu can write it in place)
SOURCES = [
    ("vdi-dynamic", "vdi", "static=off", "vdi", True),
    ("vdi-static", "vdi", "static=on", "vdi", True),
    ("vmdk-monolithicSparse", "vmdk", "subformat=monolithicSparse", "vmdk", True),
    ("vmdk-monolithicFlat", "vmdk", "subformat=monolithicFlat", "vmdk", True),
    ("vmdk-streamOptimized", "vmdk", "subformat=streamOptimized", "vmdk", False),
    ("vpc-dynamic", "vpc", "subformat=dynamic", "vhd", True),
    ("vpc-fixed", "vpc", "subformat=fixed", "vhd", True),
    ("vhdx-dynamic", "vhdx", "subformat=dynamic", "vhdx", True),
    ("vhdx-fixed", "vhdx", "subformat=fixed", "vhdx", True),
    ("qcow2-v2", "qcow2", "compat=0.10", "qcow2", True),
    ("qcow2-v3", "qcow2", "compat=1.1", "qcow2", True),
    ("qed", "qed", "", "qed", True),
    ("parallels", "parallels", "", "hdd", True),
    ("raw", "raw", "", "raw", True),
]
SOURCE_IDS = [s[0] for s in SOURCES]
COMMON = ("vdi", "vmdk", "vpc", "qcow2")
COMMON_SOURCES = ["vdi-dynamic", "vmdk-monolithicSparse", "vpc-dynamic", "qcow2-v3"]


def _ops(size: int, qfmt: str) -> list[str]:
    """qemu-io commands: data, block-crossing unaligned runs, explicit zeroes and a discard over
    data, compressed clusters (qcow2), the last sector."""
    ops = ["write -P 0x11 0 4096",
           "write -P 0x22 66048 70000",
           "write -P 0x33 1M 256k",
           "write -z 1088k 64k",            # zeroes inside data
           "discard 1152k 64k",             # discard inside data (no-op where unsupported)
           "write -z 2M 128k",              # zeroes over nothing
           "write -P 0x55 4193304 3000",    # crosses the 4 MiB boundary, unaligned
           f"write -P 0x66 {size - 512} 512"]
    if qfmt == "qcow2":
        ops.append("write -c -P 0x77 3M 64k")
    return ops


def _targets():
    out = []
    for b in backends():
        if not (b.creatable and b.writable and b.caps & Cap.FILE) or qemu_name(b) is None:
            continue
        if b.needs_passphrase:
            continue        # encrypted-only formats: tests/interop/test_luks_interop.py
        bits = [f for f in (ImageFlags.FIXED, ImageFlags.SPLIT_2G, ImageFlags.STREAM_OPTIMIZED,
                            ImageFlags.ESX) if b.create_flags & f]
        variants = [ImageFlags.NONE] + bits
        if ImageFlags.FIXED in bits and ImageFlags.SPLIT_2G in bits:
            variants.append(ImageFlags.FIXED | ImageFlags.SPLIT_2G)
        for v in variants:
            out.append((b, v))
    return out


TARGETS = _targets()


def _tid(b, v) -> str:
    return f"{b.name}-{variant_words(v).replace(',', '+')}"


def _cases():
    pairs: dict[tuple[str, str], tuple] = {}
    tids = [_tid(b, v) for b, v in TARGETS]
    by_tid = dict(zip(tids, TARGETS))
    # 1. full cross of the common formats (default subformats x every variant)
    for s in COMMON_SOURCES:
        for tid, (b, v) in by_tid.items():
            if qemu_name(b) in COMMON:
                pairs[(s, tid)] = (b, v)
    # 2. every target variant from two sources, 3. every source to two targets (rotation)
    for i, tid in enumerate(tids):
        for k in (0, 1):
            s = SOURCE_IDS[(2 * i + k * 7) % len(SOURCE_IDS)]
            pairs[(s, tid)] = by_tid[tid]
    for j, s in enumerate(SOURCE_IDS):
        for k in (0, 1):
            tid = tids[(3 * j + k * 5) % len(tids)]
            pairs[(s, tid)] = by_tid[tid]
    return [pytest.param(s, b, v, id=f"{s}-to-{tid}") for (s, tid), (b, v) in sorted(pairs.items())]


@pytest.fixture(scope="module")
def sources(qemu, tmp_path_factory):
    """Source images made by qemu, created on first use: id -> (path, qemu format)."""
    d = tmp_path_factory.mktemp("matrix-src")
    cache: dict[str, tuple[str, str]] = {}

    def get(sid: str) -> tuple[str, str]:
        if sid in cache:
            return cache[sid]
        _, qfmt, opts, ext, in_place = next(s for s in SOURCES if s[0] == sid)
        path = str(d / f"{sid}.{ext}")
        if in_place:
            qemu.img("create", "-q", "-f", qfmt, *(["-o", opts] if opts else []), path, SIZE)
            size = int(_virtual_size(qemu, path, qfmt))
            args = []
            for op in _ops(size, qfmt):
                args += ["-c", op]
            qemu.io("-f", qfmt, *args, path)
        else:                            # streamOptimized: qemu writes it only by converting
            raw = str(d / f"{sid}.raw")
            qemu.img("create", "-q", "-f", "raw", raw, SIZE)
            args = []
            for op in _ops(SIZE, "raw"):
                args += ["-c", op]
            qemu.io("-f", "raw", *args, raw)
            qemu.img("convert", "-f", "raw", "-O", qfmt, *(["-o", opts] if opts else []), raw, path)
        r = qemu.check(path, qfmt)
        assert r.returncode in (0, 63), f"qemu made a bad source {sid}: {r.stdout} {r.stderr}"
        cache[sid] = (path, qfmt)
        return cache[sid]

    return get


def _virtual_size(qemu, path, fmt) -> int:
    import json
    return json.loads(qemu.img("info", "--output=json", "-f", fmt, path).stdout)["virtual-size"]


def _cli(*argv) -> tuple[int, str]:
    err = io.StringIO()
    out = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        rc = cli.main([str(a) for a in argv])
    return rc, err.getvalue()


# Bugs found by this matrix in files owned by others (kept visible, strict):
XFAIL: dict[tuple[str, str], str] = {}


@pytest.mark.parametrize("sid,backend,variant", _cases())
def test_convert_matrix(qemu, sources, tmp_path, request, sid, backend, variant):
    reason = XFAIL.get((sid, _tid(backend, variant))) or XFAIL.get(("*", _tid(backend, variant)))
    if reason:
        request.applymarker(pytest.mark.xfail(strict=True, reason=reason))
    src, sfmt = sources(sid)
    tfmt = qemu_name(backend)
    dst = str(tmp_path / f"out.{backend.default_extension() or 'img'}")
    rc, err = _cli("convert", "-f", sfmt, "-O", backend.name, "--variant", variant_words(variant),
                   src, dst)
    assert rc == 0, f"vdgui-img convert failed: {err}"
    r = qemu.compare(src, dst, sfmt, tfmt)
    assert r.returncode == 0, (f"qemu-img compare {sid} vs {_tid(backend, variant)}: "
                               f"{r.stdout} {r.stderr}")
    r = qemu.check(dst, tfmt)
    if r.returncode != 63:  # 63: qemu cannot check this format
        assert r.returncode == 0, f"qemu-img check: {r.stdout} {r.stderr}"
    # and our own reading of the target agrees with the source as qemu reads it
    raw = str(tmp_path / "back.raw")
    rc, err = _cli("convert", "-f", backend.name, "-O", "RAW", dst, raw)
    assert rc == 0, f"vdgui-img convert back to RAW failed: {err}"
    r = qemu.compare(src, raw, sfmt, "raw")
    assert r.returncode == 0, f"our re-read of {_tid(backend, variant)} differs: {r.stdout}"


BIG = 4 * 1024 * MiB + 64 * 1024 + 1536  # past 4 GiB, not a multiple of any block size
BIG_OPS = [
    "write -P 0x21 0 512",
    "write -P 0x42 2147450880 65536",  # straddles 2 GiB
    "write -P 0x63 4294967196 200",  # straddles 4 GiB
    f"write -P 0x84 {BIG - 4096} 4096",
]


@pytest.fixture(scope="module")
def big_source(qemu, tmp_path_factory):
    d = tmp_path_factory.mktemp("matrix-big")
    path = str(d / "big.qcow2")
    qemu.img("create", "-q", "-f", "qcow2", path, BIG)
    args = []
    for op in BIG_OPS:
        args += ["-c", op]
    qemu.io("-f", "qcow2", *args, path)
    return path


def _big_cases():
    out = []
    for b, v in TARGETS:
        if v & (ImageFlags.FIXED | ImageFlags.ESX):
            continue  # would write gigabytes
        if b.max_size is not None and b.max_size < BIG:
            continue
        out.append(pytest.param(b, v, id=_tid(b, v)))
    return out


@pytest.mark.parametrize("backend,variant", _big_cases())
def test_convert_sparse_past_4g(qemu, big_source, tmp_path, backend, variant):
    """Sparse conversion of a >4 GiB image with data across the 2 GiB and 4 GiB boundaries (32-bit
    offsets, split2g extent edges), checked by qemu."""
    tfmt = qemu_name(backend)
    dst = str(tmp_path / f"big.{backend.default_extension() or 'img'}")
    rc, err = _cli(
        "convert",
        "-f",
        "qcow2",
        "-O",
        backend.name,
        "--variant",
        variant_words(variant),
        big_source,
        dst,
    )
    assert rc == 0, f"vdgui-img convert failed: {err}"
    r = qemu.compare(big_source, dst, "qcow2", tfmt)
    assert r.returncode == 0, f"qemu-img compare: {r.stdout} {r.stderr}"
    r = qemu.check(dst, tfmt)
    if r.returncode != 63:
        assert r.returncode == 0, f"qemu-img check: {r.stdout} {r.stderr}"


def _diff_targets():
    return [
        pytest.param(b, id=b.name) for b, v in TARGETS if v == ImageFlags.NONE and b.caps & Cap.DIFF
    ]


@pytest.fixture(scope="module")
def qemu_chain(qemu, tmp_path_factory):
    """A three-level qcow2 chain made by qemu (base, mid, top), with zero writes and discards in
    the children hiding data below."""
    d = tmp_path_factory.mktemp("matrix-chain")
    base, mid, top = (str(d / f"{n}.qcow2") for n in ("base", "mid", "top"))
    qemu.img("create", "-q", "-f", "qcow2", base, SIZE)
    qemu.io(
        "-f", "qcow2", "-c", "write -P 0x11 0 2M", "-c", f"write -P 0x12 {SIZE - 4096} 4096", base
    )
    qemu.img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", mid)
    qemu.io(
        "-f",
        "qcow2",
        "-c",
        "write -P 0x21 64k 64k",
        "-c",
        "write -z 1M 128k",
        "-c",
        "write -P 0x22 3000000 70000",
        mid,
    )
    qemu.img("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", top)
    qemu.io(
        "-f",
        "qcow2",
        "-c",
        "write -P 0x31 0 512",
        "-c",
        "discard 1536k 64k",
        "-c",
        "write -z 3M 64k",
        "-c",
        f"write -P 0x32 {SIZE - 512} 512",
        top,
    )
    return [base, mid, top]


@pytest.mark.parametrize("backend", _diff_targets())
def test_convert_chain_as_chain(qemu, qemu_chain, tmp_path, backend):
    """``convert --chain`` of a qemu qcow2 chain into each differencing backend: every level of
    the copy reads as the same level of the source does in qemu."""
    ext = backend.default_extension()
    dst = str(tmp_path / f"c.{ext}")
    rc, err = _cli("convert", "--chain", "-O", backend.name, qemu_chain[-1], dst)
    assert rc == 0, f"vdgui-img convert --chain failed: {err}"
    made = [
        str(tmp_path / f"c-{os.path.splitext(os.path.basename(p))[0]}.{ext}")
        for p in qemu_chain[:-1]
    ] + [dst]
    tfmt = qemu_name(backend)
    for lv, (src, out) in enumerate(zip(qemu_chain, made)):
        raw = str(tmp_path / f"level{lv}.raw")
        rc, err = _cli("convert", "-O", "RAW", out, raw)
        assert rc == 0, f"reading level {lv} back: {err}"
        r = qemu.compare(src, raw, "qcow2", "raw")
        assert r.returncode == 0, f"level {lv} of the chain copy differs: {r.stdout}"
        if tfmt in ("qcow2", "qed", "vmdk"):  # qemu follows these chains itself
            r = qemu.compare(src, out, "qcow2", tfmt)
            assert r.returncode == 0, f"qemu reads level {lv} differently: {r.stdout} {r.stderr}"


# DMG sources from the corpus (qemu cannot create DMG). qemu here lacks the bz2/lzfse modules and
# ADC support, so the compression-* images (one disk, every chunk type) are compared with its
# reading of compression-raw.dmg.
DMGS = [
    "dfvfs/hfsplus_zlib.dmg",
    "dfvfs/hfsplus_zlib.v1.dmg",
    "node-udif/compression-adc.dmg",
    "node-udif/compression-bz2.dmg",
    "node-udif/compression-lzfse.dmg",
    "node-udif/compression-raw.dmg",
    "node-udif/compression-zlib.dmg",
    "node-udif/gpt.dmg",
    "node-udif/raw.dmg",
    "node-udif/zlib-compressed.dmg",
]


def _dmg_cases():
    plain = [(b, v) for b, v in TARGETS if v == ImageFlags.NONE]
    return [
        pytest.param(
            name,
            *plain[(2 * i + k) % len(plain)],
            id=f"{name.split('/')[1]}-to-{_tid(*plain[(2 * i + k) % len(plain)])}",
        )
        for i, name in enumerate(DMGS)
        for k in (0, 1)
    ]


@pytest.mark.corpus
@pytest.mark.parametrize("name,backend,variant", _dmg_cases())
def test_convert_corpus_dmg(qemu, corpus, tmp_path, name, backend, variant):
    src = corpus / "dmg" / name
    ref = corpus / "dmg" / ("node-udif/compression-raw.dmg" if "compression-" in name else name)
    dst = str(tmp_path / f"out.{backend.default_extension() or 'img'}")
    rc, err = _cli("convert", "-O", backend.name, "--variant", variant_words(variant), src, dst)
    assert rc == 0, f"vdgui-img convert failed: {err}"
    r = qemu.compare(str(ref), dst, "dmg", qemu_name(backend))
    assert r.returncode == 0, f"qemu-img compare: {r.stdout} {r.stderr}"
