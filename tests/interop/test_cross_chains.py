"""Chains across formats: a differencing image of one backend over a base of another (VDI over
VMDK, QCOW2 over VDI, VHD over VDI, QED over VHDX ...), wherever the backends accept it.

Every (base backend, child backend) pair of the registry is tried: a pair the child refuses must be
refused with NotSupported and leave no file; an accepted pair is written through the Disk API,
reopened with ``Disk.open_chain`` and compared with the expected bytes, copied as a chain
(``copy_image(as_chain=True)``) and flattened, and merged forward and backward. Where qemu can
read the chain (a qcow2/qed child over anything qemu reads), ``qemu-img compare`` checks it too."""
from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from tests.conftest import read_all
from tests.interop.qemu_formats import qemu_name
from vdgui.vd import Cap, Disk, NotSupported, OpenFlags, backends, copy_image, get_backend, merge

pytestmark = pytest.mark.interop

KiB, MiB = 1024, 1 << 20
SIZE = 3 * MiB + 1536          # odd number of sectors


def _file_backends(diff: bool = False):
    out = []
    for b in backends():
        if not (b.caps & Cap.FILE and b.creatable and b.writable) or b.needs_passphrase:
            continue        # encrypted-only formats: tests/interop/test_luks_interop.py
        if diff and not b.caps & Cap.DIFF:
            continue
        out.append(b)
    return out


BASES = _file_backends()
CHILDREN = _file_backends(diff=True)
PAIRS = [(b, c) for b in BASES for c in CHILDREN if b.name != c.name]


def _ext(b) -> str:
    return b.default_extension() or "img"


def _writes(seed: int, size: int, n: int = 12):
    """Deterministic scattered writes: unaligned, block-crossing, zero runs, the last sector."""
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        length = rnd.choice([512, 4096, 65536, 70000, 3 * 512 + 17, 200 * KiB])
        off = rnd.randrange(0, size - length)
        fill = 0 if i % 5 == 4 else rnd.randrange(1, 256)
        out.append((off, bytes([fill]) * length))
    out.append((size - 512, bytes([seed % 255 + 1]) * 512))
    return out


def _apply(disk: Disk, expected: bytearray, writes) -> None:
    for off, data in writes:
        disk.write(off, data)
        expected[off:off + len(data)] = data


def _make_base(tmp_path, b, name="base") -> tuple[str, bytearray]:
    path = str(tmp_path / f"{name}.{_ext(b)}")
    with Disk() as d:
        d.create_base(path, SIZE, b)
        expected = bytearray(d.size)     # a backend may round the size up (VHD: CHS geometry)
        _apply(d, expected, _writes(1, d.size))
        d.flush()
    return path, expected


def _make_child(parent_path, parent_be, child_be, path, expected, seed) -> None:
    # the whole chain below, read-only (the parent may itself be a child)
    with Disk.open_chain(parent_path, parent_be.name, OpenFlags.READ_ONLY) as d:
        d.create_diff(path, child_be)
        assert d.size == len(expected), "the child's size differs from its parent's"
        _apply(d, expected, _writes(seed, d.size))
        d.flush()


def _read_chain(path) -> tuple[bytes, list[str]]:
    with Disk.open_chain(path, None, OpenFlags.READ_ONLY) as d:
        return read_all(d), [img.format for img in d.images]


def _same(data: bytes, view: bytes) -> bool:
    """``data`` reads as ``view``; a copy may be larger (a backend rounding the size up, e.g. VHD
    to its CHS geometry) when the extra part reads as zeroes."""
    return len(data) >= len(view) and data[:len(view)] == view and not any(data[len(view):])


def _files(tmp_path) -> set[str]:
    return {p.name for p in tmp_path.iterdir()}


def _qemu_compare_to(qemu, tmp_path, path, qfmt, expected: bytes):
    ref = tmp_path / "expected.raw"
    ref.write_bytes(expected)
    r = qemu.compare(path, str(ref), qfmt, "raw")
    assert r.returncode == 0, f"qemu-img compare {os.path.basename(path)}: {r.stdout} {r.stderr}"


# Bugs found here in files owned by others: (base, child) -> reason (strict xfail)
XFAIL: dict[tuple[str, str], str] = {}


@pytest.mark.parametrize("base_be,child_be", PAIRS,
                         ids=[f"{c.name}-over-{b.name}" for b, c in PAIRS])
def test_cross_format_diff(qemu, tmp_path, request, base_be, child_be):
    reason = XFAIL.get((base_be.name, child_be.name))
    if reason:
        request.applymarker(pytest.mark.xfail(strict=True, reason=reason))
    base, expected = _make_base(tmp_path, base_be)
    base_view = bytes(expected)
    before = _files(tmp_path)
    child = str(tmp_path / f"child.{_ext(child_be)}")
    try:
        _make_child(base, base_be, child_be, child, expected, seed=2)
    except NotSupported:
        # a refusal is fine, but it must leave nothing behind
        assert _files(tmp_path) == before, "a refused create_diff left files behind"
        return
    data, fmts = _read_chain(child)
    assert fmts == [base_be.name, child_be.name]
    assert data == bytes(expected), "chain reads differ from what was written"
    # the base is untouched
    with Disk() as d:
        d.open(base, base_be, OpenFlags.READ_ONLY)
        assert read_all(d) == base_view
    q_child, q_base = qemu_name(child_be), qemu_name(base_be)
    if q_child in ("qcow2", "qed") and q_base:
        _qemu_compare_to(qemu, tmp_path, child, q_child, bytes(expected))
        r = qemu.check(child, q_child)
        assert r.returncode == 0, f"qemu-img check: {r.stdout} {r.stderr}"


def _chain_pairs():
    """Three-level chains mixing formats: base of one backend, then two children of others,
    chosen by rotation among the pairs the children accept (decided at run time)."""
    out = []
    names = [b.name for b in BASES]
    kids = [c.name for c in CHILDREN]
    for i, base in enumerate(names):
        mid = kids[i % len(kids)]
        top = kids[(i + 2) % len(kids)]
        if mid == base:
            mid = kids[(i + 1) % len(kids)]
        if top in (mid, base):
            top = kids[(i + 3) % len(kids)]
        if top in (mid, base):
            top = kids[(i + 4) % len(kids)]
        out.append((base, mid, top))
    return out


CHAINS = _chain_pairs()


def _build3(tmp_path, base_name, mid_name, top_name):
    """base -> mid -> top, returning the paths and the view at each level; a refused level
    raises NotSupported (the caller falls back to a same-format child there)."""
    bb, mb, tb = get_backend(base_name), get_backend(mid_name), get_backend(top_name)
    base, expected = _make_base(tmp_path, bb)
    views = [bytes(expected)]
    mid = str(tmp_path / f"mid.{_ext(mb)}")
    _make_child(base, bb, mb, mid, expected, seed=3)
    views.append(bytes(expected))
    top = str(tmp_path / f"top.{_ext(tb)}")
    _make_child(mid, mb, tb, top, expected, seed=4)
    views.append(bytes(expected))
    return [base, mid, top], views


def _build3_or_skip_pair(tmp_path, names):
    try:
        return _build3(tmp_path, *names)
    except NotSupported:
        pass
    # the rotation picked a refused pair: use the next child backends (rotated) that accept it
    base = names[0]
    k = [b.name for b in BASES].index(base)
    kids = CHILDREN[k % len(CHILDREN):] + CHILDREN[:k % len(CHILDREN)]
    for m in kids:
        for t in kids:
            if len({base, m.name, t.name}) < 3:
                continue
            for p in tmp_path.iterdir():
                p.unlink()
            try:
                return _build3(tmp_path, base, m.name, t.name)
            except NotSupported:
                continue
    raise AssertionError(f"no three-format chain over a {base} base is accepted")


@pytest.mark.parametrize("names", CHAINS, ids=[f"over-{c[0]}" for c in CHAINS])
@pytest.mark.parametrize("op", ["copy-chain", "copy-flat", "merge-forward", "merge-backward",
                                "merge-mid-into-base", "merge-mid-into-top"])
def test_three_format_chain(qemu, tmp_path, request, names, op):
    work = tmp_path / "w"
    work.mkdir()
    paths, views = _build3_or_skip_pair(work, names)
    data, fmts = _read_chain(paths[2])
    print("chain:", " <- ".join(fmts))
    assert data == views[2]
    qnames = [qemu_name(get_backend(f)) for f in fmts]
    if all(qnames) and all(q in ("qcow2", "qed") for q in qnames[1:]):
        _qemu_compare_to(qemu, tmp_path, paths[2], qnames[2], views[2])
    assert data == views[2]
    fmts_before = fmts
    if op == "copy-chain":
        # as a chain into each backend of the chain that can hold diffs over itself
        for tb in {get_backend(f) for f in fmts_before if get_backend(f).caps & Cap.DIFF}:
            out = tmp_path / f"cc-{tb.name}"
            out.mkdir()
            dst = str(out / f"copy.{_ext(tb)}")
            made = copy_image(paths[2], dst, tb, as_chain=True)
            assert len(made) == 3
            for lv, p in enumerate(made):
                d, f = _read_chain(p)
                assert f == [tb.name] * (lv + 1)
                assert _same(d, views[lv]), f"level {lv} of the chain copy into {tb.name} differs"
            q = qemu_name(tb)
            if q in ("qcow2", "qed", "vmdk"):
                _qemu_compare_to(qemu, out, made[-1], q, views[2])
    elif op == "copy-flat":
        out = tmp_path / "flat.raw"
        copy_image(paths[2], str(out), "RAW")
        assert _same(out.read_bytes(), views[2])
        for lv in (0, 1):
            o = tmp_path / f"flat{lv}.raw"
            copy_image(paths[2], str(o), "RAW", src_top=lv)
            assert _same(o.read_bytes(), views[lv])
    elif op == "merge-forward":
        merge(paths[2], paths[0])        # top (and mid) into base
        assert not os.path.exists(paths[2]) and not os.path.exists(paths[1])
        d, f = _read_chain(paths[0])
        assert f == [fmts_before[0]]
        assert d == views[2]
    elif op in ("merge-mid-into-base", "merge-mid-into-top"):
        # the image outside the merged pair is relinked across formats (forward: top now over
        # the base; backward: the merged top keeps the base): content unchanged, or a clean
        # refusal that leaves every file as it was
        before = {p: Path(p).read_bytes() for p in paths}
        try:
            merge(paths[1], paths[0] if op.endswith("base") else paths[2])
        except NotSupported:
            after = {p: Path(p).read_bytes() for p in paths}
            changed = [os.path.basename(p) for p in paths if after[p] != before[p]]
            assert not changed, f"a refused merge wrote into {changed}"
            return
        assert not os.path.exists(paths[1])
        d, f = _read_chain(paths[2])
        assert f == [fmts_before[0], fmts_before[2]]
        assert d == views[2]
        q = qemu_name(get_backend(fmts_before[2]))
        if q in ("qcow2", "qed") and qemu_name(get_backend(fmts_before[0])):
            _qemu_compare_to(qemu, tmp_path, paths[2], q, views[2])
    else:
        merge(paths[0], paths[1])        # base into mid: mid becomes the base
        assert not os.path.exists(paths[0])
        d, f = _read_chain(paths[2])
        assert f == fmts_before[1:]
        assert d == views[2]
        d, f = _read_chain(paths[1])
        assert d == views[1]


def test_vhd_diff_over_odd_sized_parent_keeps_its_size_as_a_base(tmp_path):
    """Minimal: VDI base of 3 MiB + 1536 B, VHD child, merge the base into the child."""
    size = 3 * MiB + 1536
    base, child = str(tmp_path / "b.vdi"), str(tmp_path / "c.vhd")
    with Disk() as d:
        d.create_base(base, size, "VDI")
        d.write(size - 512, b"\x01" * 512)
    with Disk.open_chain(base) as d:
        d.create_diff(child, "VHD")
    merge(base, child)
    with Disk.open_chain(child) as d:
        assert d.size == size
        assert d.read(size - 512, 512) == b"\x01" * 512


def test_refused_forward_merge_leaves_the_base_unchanged(tmp_path):
    """Minimal: RAW base <- VHD mid <- VDI top; merging mid into the base must be refused before
    anything is written (the VDI top cannot link to a parent without a UUID)."""
    base, mid, top = (str(tmp_path / n) for n in ("b.img", "m.vhd", "t.vdi"))
    with Disk() as d:
        d.create_base(base, 2 * MiB, "RAW")
    with Disk.open_chain(base, "RAW") as d:
        d.create_diff(mid, "VHD")
        d.write(0, b"\x05" * 4096)
        d.create_diff(top, "VDI")
    before = Path(base).read_bytes()
    with pytest.raises(NotSupported):
        merge(mid, base)
    assert Path(base).read_bytes() == before
