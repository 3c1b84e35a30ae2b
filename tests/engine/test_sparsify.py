"""Sparsify (issue #16): file systems built over random bytes, so that their free space holds
garbage no zero-detecting compaction can drop; sparsify must give it back from the file systems'
own allocation maps, and every file must read the same."""
from __future__ import annotations

import hashlib
import itertools
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.engine import kill_harness as kh

MiB = 1 << 20
TOOLS = ("sfdisk", "mkfs.ext4", "mkswap", "mkfs.fat", "mcopy", "mtype", "debugfs", "e2fsck",
         "fsck.fat", "dumpe2fs")
need_tools = pytest.mark.skipif(any(shutil.which(t) is None for t in TOOLS),
                                reason="needs e2fsprogs, dosfstools, mtools, util-linux")
HAVE_NTFS = all(shutil.which(t) for t in ("mkntfs", "ntfscp", "ntfscat"))

# partitions (start sector, sectors) of the full layout; the tail is left unpartitioned
P_EXT, P_SWAP, P_FAT, P_NTFS = (2048, 65536), (67584, 32768), (100352, 65536), (165888, 65536)
FILES = {"a.bin": 700_000, "b.bin": 1_300_000, "c.txt": 5_000, "d.bin": 2_100_000}


def _sh(*args, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([str(a) for a in args], capture_output=True, **kw)
    assert r.returncode == 0, f"{args}: {r.stderr!r}"
    return r


def _part(disk: Path, where, out: Path) -> None:
    _sh("dd", f"if={disk}", f"of={out}", "bs=512", f"skip={where[0]}", f"count={where[1]}",
        "status=none")


def _put(disk: Path, where, src: Path) -> None:
    _sh("dd", f"if={src}", f"of={disk}", "bs=512", f"seek={where[0]}", "conv=notrunc",
        "status=none")


def build_disk(folder: Path, size_mib: int = 128, parts=("ext", "swap", "fat", "ntfs")) -> dict:
    """A raw disk of random bytes with file systems in it; returns {name: sha256}."""
    src = folder / "files"
    src.mkdir()
    sums = {}
    for i, (name, n) in enumerate(FILES.items()):
        data = hashlib.sha256(name.encode()).digest() * (n // 32 + 1)
        data = bytes(b ^ (i * 37 + j) % 256 for j, b in enumerate(data[:n])) if n < 10000 \
            else data[:n]
        (src / name).write_bytes(data)
        sums[name] = hashlib.sha256(data).hexdigest()
    disk = folder / "disk.raw"
    _sh("dd", "if=/dev/urandom", f"of={disk}", "bs=1M", f"count={size_mib}", "status=none")
    table = "label: dos\n"
    for p in parts:
        table += {"ext": ",32M,L\n", "swap": ",16M,S\n", "fat": ",32M,c\n",
                  "ntfs": ",32M,7\n"}[p]
    _sh("sfdisk", "-q", disk, input=table.encode())
    tmp = folder / "part"
    if "ext" in parts:
        _part(disk, P_EXT, tmp)
        _sh("mkfs.ext4", "-q", "-F", "-E", "nodiscard", "-d", src, tmp)
        _put(disk, P_EXT, tmp)
    if "swap" in parts:
        _part(disk, P_SWAP, tmp)
        _sh("mkswap", "-q", tmp)
        _put(disk, P_SWAP, tmp)
    if "fat" in parts:
        _part(disk, P_FAT, tmp)
        _sh("mkfs.fat", tmp)
        _sh("mcopy", "-i", tmp, *sorted(src.iterdir()), "::/")
        _put(disk, P_FAT, tmp)
    if "ntfs" in parts:
        _part(disk, P_NTFS, tmp)
        _sh("mkntfs", "-Q", "-F", "-q", tmp)
        for f in sorted(src.iterdir()):
            _sh("ntfscp", "-q", tmp, f, f.name)
        _put(disk, P_NTFS, tmp)
    tmp.unlink()
    return sums


ORIG: list = [None]         # the raw disk the images were made from


def check_volumes(raw: Path, sums: dict, parts) -> int:
    """fsck every volume clean, every file's hash equal; returns the in-use bytes the file
    systems' own tools count (the tail and free space excluded)."""
    tmp = raw.parent / "vol"
    in_use = P_EXT[0] * 512                       # the MBR and the gap before partition 1
    if "ext" in parts:
        _part(raw, P_EXT, tmp)
        _sh("e2fsck", "-fn", tmp)
        # group 1 is BLOCK_UNINIT (no bitmap on disk): its backup superblock, descriptors and
        # reserved descriptor blocks (blocks 8193..8449) must be left as they were
        a, b = P_EXT[0] * 512 + 8193 * 1024, P_EXT[0] * 512 + 8450 * 1024
        with open(raw, "rb") as f1, open(ORIG[0], "rb") as f2:
            f1.seek(a)
            f2.seek(a)
            assert f1.read(b - a) == f2.read(b - a), "ext backup superblock/descriptors changed"
        for name, h in sums.items():
            got = _sh("debugfs", "-R", f"cat /{name}", tmp).stdout
            assert hashlib.sha256(got).hexdigest() == h, f"ext {name}"
        head = _sh("dumpe2fs", "-h", tmp).stdout.decode()
        free = int(re.search(r"Free blocks:\s+(\d+)", head).group(1))
        bs = int(re.search(r"Block size:\s+(\d+)", head).group(1))
        in_use += P_EXT[1] * 512 - free * bs
    if "swap" in parts:
        in_use += 4096
    if "fat" in parts:
        _part(raw, P_FAT, tmp)
        out = _sh("fsck.fat", "-n", tmp).stdout.decode()
        used, total = map(int, re.search(r"(\d+)/(\d+) clusters", out).groups())
        for name, h in sums.items():
            got = _sh("mtype", "-i", tmp, f"::/{name}").stdout
            assert hashlib.sha256(got).hexdigest() == h, f"fat {name}"
        in_use += P_FAT[1] * 512 - (total - used) * 2048
    if "ntfs" in parts:
        _part(raw, P_NTFS, tmp)
        for name, h in sums.items():
            got = _sh("ntfscat", tmp, name).stdout
            assert hashlib.sha256(got).hexdigest() == h, f"ntfs {name}"
        _sh("ntfsfix", "-n", tmp)
        info = _sh("ntfsinfo", "-m", tmp).stdout.decode()
        m = re.search(r"Free Clusters:\s+(\d+)", info)
        cs = int(re.search(r"Cluster Size:\s+(\d+)", info).group(1))
        in_use += P_NTFS[1] * 512 - int(m.group(1)) * cs
    tmp.unlink()
    return in_use


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    if any(shutil.which(t) is None for t in TOOLS):
        pytest.skip("needs e2fsprogs, dosfstools, mtools, util-linux")
    folder = tmp_path_factory.mktemp("sparsify")
    parts = ("ext", "swap", "fat") + (("ntfs",) if HAVE_NTFS and shutil.which("ntfsinfo")
                                      else ())
    sums = build_disk(folder, 128, parts)
    ORIG[0] = folder / "disk.raw"
    return folder, sums, parts


def _main(*args):
    import contextlib
    import io

    from vdgui import cli
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@need_tools
@pytest.mark.parametrize("fmt,opts", [("vdi", []), ("vmdk", []), ("vhdx", ["-o", "block_size=1M"]),
                                      ("qcow2", []), ("raw", []), ("vpc", [])])
def test_sparsify_gives_back_free_space_and_files_read_the_same(built, tmp_path, qemu, fmt, opts):
    folder, sums, parts = built
    img = tmp_path / f"d.{fmt}"
    qemu.img("convert", "-O", fmt, *opts, folder / "disk.raw", img)
    import os
    with open(img, "rb") as fh:          # delayed allocation settles: st_blocks stops moving
        os.fsync(fh.fileno())
    before = img.stat().st_blocks * 512
    assert before > 100 * MiB                  # random bytes: nothing to drop by zero detection

    code, out, err = _main("sparsify", "--dry-run", "--json", img)
    assert code == 0, err
    import json
    dry = json.loads(out)
    assert "after" not in dry and dry["before"] == before
    assert _sha(img) == _sha(img) and img.stat().st_blocks * 512 == before
    kinds = {p["filesystem"] for p in dry["partitions"]}
    assert {"ext4", "swap", "fat16"} <= kinds and dry["reclaimable"] > 60 * MiB

    code, out, err = _main("sparsify", "--json", img)
    assert code == 0, err
    rep = json.loads(out)
    assert rep["after"] == img.stat().st_blocks * 512 < rep["before"]
    if fmt not in ("raw", "vpc"):               # RAW: holes punched; qemu cannot check VHD
        r = qemu.img("check", "-f", fmt, img, check=False)
        assert r.returncode == 0, r.stdout + r.stderr
    raw = tmp_path / "back.raw"
    qemu.img("convert", "-f", fmt, "-O", "raw", img, raw)
    in_use = check_volumes(raw, sums, parts)
    assert rep["after"] <= in_use * 1.1 + 16 * MiB, (rep["after"], in_use)


@need_tools
def test_dry_run_changes_no_byte(built, tmp_path):
    folder, _sums, _parts = built
    img = tmp_path / "d.raw"
    shutil.copy(folder / "disk.raw", img)
    h = _sha(img)
    code, out, err = _main("sparsify", "--dry-run", img)
    assert code == 0, err
    assert "partition 1 (ext4)" in out and "would give back" in out
    assert _sha(img) == h


@need_tools
def test_into_a_copy_leaves_the_source(built, tmp_path, qemu):
    folder, sums, parts = built
    src = tmp_path / "s.vdi"
    qemu.img("convert", "-O", "vdi", folder / "disk.raw", src)
    h = _sha(src)
    code, _out, err = _main("sparsify", "--into", tmp_path / "d.qcow2", "-O", "QCOW2", src)
    assert code == 0, err
    assert _sha(src) == h
    raw = tmp_path / "back.raw"
    qemu.img("convert", "-O", "raw", tmp_path / "d.qcow2", raw)
    in_use = check_volumes(raw, sums, parts)
    assert (tmp_path / "d.qcow2").stat().st_blocks * 512 <= in_use * 1.1 + 16 * MiB


def _set_byte(path: Path, offset: int, mask: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([b | mask]))


@need_tools
@pytest.mark.parametrize("flag", ["needs_recovery", "orphan", "fat_dirty"])
def test_dirty_file_systems_are_refused(built, tmp_path, qemu, flag):
    folder, _sums, _parts = built
    raw = tmp_path / "d.raw"
    shutil.copy(folder / "disk.raw", raw)
    part = tmp_path / "p"
    if flag == "fat_dirty":
        _set_byte(raw, P_FAT[0] * 512 + 0x25, 0x01)
        words = ("dirty bit", "fsck.fat")
    else:
        _part(raw, P_EXT, part)
        cmd = "feature needs_recovery" if flag == "needs_recovery" else "ssv last_orphan 12"
        _sh("debugfs", "-w", "-R", cmd, part)
        _put(raw, P_EXT, part)
        words = (flag if flag == "needs_recovery" else "orphan list", "e2fsck")
    img = tmp_path / "d.vdi"
    qemu.img("convert", "-O", "vdi", raw, img)
    h = _sha(img)
    code, _out, err = _main("sparsify", img)
    assert code == 2, (code, err)
    for w in words:
        assert w in err, err
    assert _sha(img) == h
    code, _out, err = _main("sparsify", "--dry-run", img)
    assert code == 2


def _ntfs_set_dirty(raw: Path) -> None:
    """Set VOLUME_IS_DIRTY in $Volume's VOLUME_INFORMATION (MFT record 3, resident)."""
    import struct
    base = P_NTFS[0] * 512
    with open(raw, "r+b") as f:
        f.seek(base)
        boot = f.read(512)
        cs = struct.unpack_from("<H", boot, 11)[0] * boot[13]
        mft = struct.unpack_from("<Q", boot, 0x30)[0] * cs
        rec_at = base + mft + 3 * 1024
        f.seek(rec_at)
        rec = bytearray(f.read(1024))
        assert rec[:4] == b"FILE"
        pos = struct.unpack_from("<H", rec, 0x14)[0]
        while True:
            typ, length = struct.unpack_from("<II", rec, pos)
            assert typ != 0xFFFFFFFF, "no VOLUME_INFORMATION"
            if typ == 0x70:
                voff = struct.unpack_from("<H", rec, pos + 0x14)[0]
                rec[pos + voff + 10] |= 0x01
                break
            pos += length
        for at in (rec_at, base + struct.unpack_from("<Q", boot, 0x38)[0] * cs + 3 * 1024):
            f.seek(at)
            f.write(rec)                # $MFT and its mirror $MFTMirr


@need_tools
@pytest.mark.skipif(not HAVE_NTFS, reason="needs ntfs-3g tools")
def test_a_dirty_ntfs_volume_is_refused(built, tmp_path, qemu):
    folder, _, _ = built
    raw = tmp_path / "d.raw"
    shutil.copy(folder / "disk.raw", raw)
    _ntfs_set_dirty(raw)
    part = tmp_path / "p"
    _part(raw, P_NTFS, part)
    r = subprocess.run(["ntfsfix", "-n", str(part)], capture_output=True, text=True)
    assert "dirty" in r.stdout.lower() + r.stderr.lower(), r.stdout + r.stderr
    h = _sha(raw)
    code, _, err = _main("sparsify", raw)
    assert code == 2, err
    assert "dirty flag" in err and "chkdsk" in err, err
    assert _sha(raw) == h


@need_tools
def test_an_image_held_by_another_program_is_refused(built, tmp_path, qemu):
    from tests.interop.test_locks import qemu_io_holder
    folder, _, _ = built
    img = tmp_path / "d.qcow2"
    qemu.img("convert", "-O", "qcow2", folder / "disk.raw", img)
    h = _sha(img)
    with qemu_io_holder(img, "rw", "qcow2"):
        code, _, err = _main("sparsify", img)
    assert code == 2 and "in use" in err, (code, err)
    assert _sha(img) == h


@need_tools
def test_progress_counts_data_bytes_and_a_cancel_keeps_the_files(built, tmp_path, qemu):
    from vdgui.vd import Cancelled, check, sparsify
    folder, sums, parts = built
    img = tmp_path / "d.vdi"
    qemu.img("convert", "-O", "vdi", folder / "disk.raw", img)
    seen = []
    rep = sparsify(str(tmp_path / "d.vdi"), progress=lambda d, t: seen.append((d, t)))
    assert seen[0][0] == 0 and seen[-1][0] == seen[-1][1] > 0
    assert all(a[0] <= b[0] for a, b in itertools.pairwise(seen))
    # the total counts the held free bytes (discarded, then compacted), not the virtual size
    assert seen[-1][1] == 2 * rep.reclaimable
    img2 = tmp_path / "e.vdi"
    qemu.img("convert", "-O", "vdi", folder / "disk.raw", img2)
    calls = []

    def cancel(d, t):
        calls.append(d)
        return d < t // 4
    with pytest.raises(Cancelled):
        sparsify(str(img2), progress=cancel)
    assert not check(str(img2)).corrupt
    raw = tmp_path / "back.raw"
    qemu.img("convert", "-O", "raw", img2, raw)
    check_volumes(raw, sums, parts)
    assert [p.name for p in tmp_path.iterdir() if "tmp" in p.name] == []


@need_tools
def test_a_chain_child_stores_zero_and_the_parent_is_unchanged(built, tmp_path, qemu):
    folder, sums, parts = built
    base = tmp_path / "base.qcow2"
    qemu.img("convert", "-O", "qcow2", folder / "disk.raw", base)
    child = tmp_path / "child.qcow2"
    qemu.img("create", "-f", "qcow2", "-b", base.name, "-F", "qcow2", child)
    tail = 120 * MiB                               # unpartitioned garbage, rewritten in the child
    qemu.io("-f", "qcow2", "-c", f"write -P 0x5a {tail} 4M", child)
    # also a file system's free range: the swap area past its header
    qemu.io("-f", "qcow2", "-c", f"write -P 0x77 {P_SWAP[0] * 512 + MiB} 2M", child)
    hb = _sha(base)

    code, _out, err = _main("sparsify", base)
    assert code == 2 and "differencing" in err, err      # the parent has a child
    assert _sha(base) == hb

    code, _out, err = _main("sparsify", "--json", child)
    assert code == 0, err
    assert _sha(base) == hb
    assert qemu.img("check", child, check=False).returncode == 0
    m = qemu.img("map", "--output=json", child).stdout
    import json
    runs = json.loads(m)
    for off, n in ((tail, 4 * MiB), (P_SWAP[0] * 512 + MiB, 2 * MiB)):
        cover = [r for r in runs if r["start"] < off + n and r["start"] + r["length"] > off]
        assert cover and all(r["zero"] and not r["data"] for r in cover), cover
    raw = tmp_path / "back.raw"
    qemu.img("convert", "-O", "raw", child, raw)
    check_volumes(raw, sums, parts)
    assert (child.stat().st_blocks * 512) < 2 * MiB


def _read_files(path: Path) -> dict:
    from vdgui.vd import Disk, OpenFlags, open_volume
    out = {}
    with Disk.open_chain(str(path), None, OpenFlags.READ_ONLY) as disk:
        _, fs = open_volume(disk, 1)
        for name in FILES:
            with fs.open("/" + name) as f:
                out[name] = hashlib.sha256(f.read()).hexdigest()
    return out


@need_tools
@pytest.mark.skipif(not kh.have_strace(), reason="needs strace")
@pytest.mark.parametrize("fmt,points", [("vdi", 6), ("vpc", 6), ("vhdx", 6), ("vmdk", 6),
                                        ("qed", 6), ("parallels", 6),
                                        pytest.param("qcow2", 24, marks=pytest.mark.slow)])
def test_kill_during_in_place_sparsify_keeps_the_files(tmp_path, qemu, fmt, points):
    from vdgui.vd import check
    src = tmp_path / "src"
    src.mkdir()
    sums = build_disk(src, 64, ("ext", "swap"))
    ORIG[0] = src / "disk.raw"
    tpl = tmp_path / "tpl"
    tpl.mkdir()
    qemu.img("convert", "-O", fmt, src / "disk.raw", tpl / f"a.{fmt}")

    def fn_for(work: Path):
        def fn():
            from vdgui import cli
            return cli.main(["sparsify", f"a.{fmt}"])
        return fn

    def judge(work: Path, finished: bool) -> list[str]:
        p = work / f"a.{fmt}"
        try:
            got = _read_files(p)
        except Exception as e:
            return [f"cannot read the files: {e}"]
        bad = [n for n in FILES if got.get(n) != sums[n]]
        rep = check(str(p))
        return ([f"files differ: {bad}"] if bad else []) + \
            (["check calls it corrupt"] if rep.corrupt else [])

    _all_points, outcomes = kh.campaign(tmp_path, tpl, fn_for, judge, points=points)
    bad = [f"kill at {o.point}: {p}" for o in outcomes for p in o.problems]
    assert not bad, "\n".join(bad)
    assert sum(o.killed for o in outcomes) >= len(outcomes) * 0.8


@need_tools
def test_gpt_tables_the_boot_gap_and_unknown_volumes_are_left_alone(tmp_path):
    raw = tmp_path / "g.raw"
    _sh("dd", "if=/dev/urandom", f"of={raw}", "bs=1M", "count=64", "status=none")
    _sh("sfdisk", "-q", raw, input=b"label: gpt\n,16M,L\n,16M,L\n")
    part = tmp_path / "p"
    _part(raw, (2048, 32768), part)
    _sh("mkfs.ext4", "-q", "-F", "-E", "nodiscard", part)
    _put(raw, (2048, 32768), part)
    orig = raw.read_bytes()
    code, out, err = _main("sparsify", "--json", raw)
    assert code == 0, err
    import json
    rep = json.loads(out)
    skipped = [p for p in rep["partitions"] if p["skipped"]]
    assert [p["number"] for p in skipped] == [2] and "no file system" in skipped[0]["skipped"]
    assert rep["after"] < rep["before"] - 30 * MiB           # holes punched in the RAW file
    now = raw.read_bytes()
    head, tail = 2048 * 512, 33 * 512          # tables + boot gap; backup entries + header
    assert now[:head] == orig[:head] and now[-tail:] == orig[-tail:]
    p2 = slice(34816 * 512, (34816 + 32768) * 512)
    assert now[p2] == orig[p2]                 # the unknown volume is untouched
    assert b"No errors detected" in _sh("sfdisk", "--verify", raw).stdout


def test_qcow2_discard_punches_adjacent_clusters_in_one_call(tmp_path, qemu, monkeypatch):
    """A discard of gigabytes punched one hole per cluster (16 s of 23 for 1.4 GiB)."""
    from vdgui.vd import Disk, OpenFlags
    from vdgui.vd.fileio import ImageFile
    img = tmp_path / "a.qcow2"
    qemu.img("create", "-f", "qcow2", img, "64M")
    qemu.io("-f", "qcow2", "-c", "write -P 0x33 0 16M", img)
    calls = []
    real = ImageFile.punch_hole
    monkeypatch.setattr(ImageFile, "punch_hole",
                        lambda self, o, n: calls.append((o, n)) or real(self, o, n))
    with Disk.open_chain(str(img), "QCOW2", OpenFlags.NORMAL) as d:
        d.discard(0, 16 * MiB)
        assert d.read(0, 16 * MiB) == bytes(16 * MiB)
    assert 1 <= len(calls) <= 2 and sum(n for _, n in calls) == 16 * MiB, calls
    assert qemu.img("check", img, check=False).returncode == 0


@need_tools
@pytest.mark.parametrize("fmt,opts", [("qcow2", []), ("vhdx", ["-o", "block_size=1M"]),
                                      ("vpc", []), ("vmdk", []),
                                      ("vmdk", ["-o", "subformat=twoGbMaxExtentSparse"]),
                                      ("qed", []), ("parallels", [])])
def test_sparsify_closes_holes_in_place_without_a_copy(built, tmp_path, qemu, monkeypatch,
                                                       fmt, opts):
    """QCOW2 and VHDX went through compact's verified copy after their discard (the 4 GiB in
    use copied, scanned and read again to verify: 1.55x qemu-img convert); the blocks above the
    holes now move down in place, so the file keeps its inode. Discard calls start at
    multiples of their size (small here), so no block is split between two calls and left
    zero-filled instead of freed."""
    from vdgui.vd.ops import sparsify as sp
    monkeypatch.setattr(sp, "CHUNK", 2 * MiB)      # VHD blocks are 2 MiB
    folder, sums, parts = built
    ORIG[0] = folder / "disk.raw"            # the kill test points it at its own disk
    img = tmp_path / f"d.{fmt}"
    qemu.img("convert", "-O", fmt, *opts, folder / "disk.raw", img)
    ino = img.stat().st_ino
    code, out, err = _main("sparsify", "--json", img)
    assert code == 0, err
    import json
    rep = json.loads(out)
    assert img.stat().st_ino == ino                  # not replaced by a copy
    # the file itself is cut after its last cluster in use, not only punched
    assert img.stat().st_size <= rep["after"] + 4 * MiB, (img.stat().st_size, rep["after"])
    if fmt != "vpc":
        r = qemu.img("check", img, check=False)
        assert r.returncode == 0, r.stdout + r.stderr
    from vdgui.vd import check
    assert not check(str(img)).problems
    raw = tmp_path / "back.raw"
    qemu.img("convert", "-O", "raw", img, raw)
    in_use = check_volumes(raw, sums, parts)
    assert rep["after"] <= in_use * 1.1 + 16 * MiB


def test_qcow2_close_holes_moves_only_what_lies_above_the_holes(tmp_path, qemu, monkeypatch):
    from vdgui.vd import Disk, OpenFlags
    from vdgui.vd.fileio import ImageFile
    img = tmp_path / "a.qcow2"
    qemu.img("create", "-f", "qcow2", img, "64M")
    qemu.io("-f", "qcow2", "-c", "write -P 0x11 0 8M", "-c", "write -P 0x22 8M 8M",
            "-c", "write -P 0x33 16M 2M", img)
    with Disk.open_chain(str(img), "QCOW2", OpenFlags.NORMAL) as d:
        d.discard(0, 8 * MiB)
        reads = []
        real = ImageFile.preadv_into
        monkeypatch.setattr(ImageFile, "preadv_into",
                            lambda self, o, b: reads.append(len(b)) or real(self, o, b))
        seen = []
        assert d.top.close_holes(lambda a, b: seen.append((a, b))) is True
        monkeypatch.undo()
        assert sum(reads) <= 10 * MiB                  # the 10 MiB above the hole, no more
        assert seen[-1][0] == seen[-1][1]
        assert d.read(0, 8 * MiB) == bytes(8 * MiB)
        assert d.read(8 * MiB, 8 * MiB) == b"\x22" * (8 * MiB)
        assert d.read(16 * MiB, 2 * MiB) == b"\x33" * (2 * MiB)
    assert img.stat().st_size < 12 * MiB
    assert qemu.img("check", img, check=False).returncode == 0
    r = qemu.io("-f", "qcow2", "-c", "read -P 0x22 8M 8M", "-c", "read -P 0x33 16M 2M", img)
    assert "verification failed" not in r.stdout + r.stderr


def test_vhd_discard_frees_whole_blocks_zeroes_parts_and_a_child_refuses(tmp_path, qemu):
    """VHD had no discard: sparsify wrote zeroes over every free byte, then compacted through a
    copy (12 s where qemu-img convert took 0.8 s for 2 GiB)."""
    from vdgui.vd import Alloc, Disk, NotSupported, OpenFlags, check
    img = tmp_path / "a.vhd"
    qemu.img("create", "-f", "vpc", img, "16M")
    qemu.io("-f", "vpc", "-c", "write -P 0x44 0 8M", img)
    with Disk.open_chain(str(img), "VHD", OpenFlags.NORMAL) as d:
        d.discard(0, 2 * MiB + 4096)               # block 0 whole, 4 KiB of block 1
        assert d.read(0, 2 * MiB + 4096) == bytes(2 * MiB + 4096)
        assert d.read(2 * MiB + 4096, 6 * MiB - 4096) == b"\x44" * (6 * MiB - 4096)
        assert d.top.block_status(0, 2 * MiB) == [(0, 2 * MiB, Alloc.UNALLOCATED)]
        assert d.top.close_holes() is True
        assert d.read(2 * MiB + 4096, 6 * MiB - 4096) == b"\x44" * (6 * MiB - 4096)
    assert img.stat().st_size < 6 * MiB + 64 * 1024
    assert not check(str(img)).problems
    back = tmp_path / "b.raw"
    qemu.img("convert", "-f", "vpc", "-O", "raw", img, back)
    assert back.read_bytes()[:8 * MiB] == bytes(2 * MiB + 4096) + b"\x44" * (6 * MiB - 4096)
    with Disk.open_chain(str(img), "VHD", OpenFlags.NORMAL) as d:
        d.create_diff(str(tmp_path / "c.vhd"))
        with pytest.raises(NotSupported):
            d.discard(2 * MiB, 2 * MiB)           # a VHD child cannot say "reads zero"


def test_vmdk_discard_in_a_base_and_in_a_child_with_zeroed_grains(tmp_path, qemu):
    """VMDK had no discard: sparsify wrote zeroes over every free byte, then compacted (8.9 s
    where qemu-img convert took 3.5 s for 2 GiB)."""
    from vdgui.vd import Alloc, Disk, NotSupported, OpenFlags
    base = tmp_path / "b.vmdk"
    qemu.img("create", "-f", "vmdk", base, "8M")
    qemu.io("-f", "vmdk", "-c", "write -P 0x55 0 4M", base)
    kid = tmp_path / "k.vmdk"
    qemu.img("create", "-f", "vmdk", "-o", "zeroed_grain=on", "-b", base.name, "-F", "vmdk", kid)
    plain = tmp_path / "p.vmdk"
    qemu.img("create", "-f", "vmdk", "-b", base.name, "-F", "vmdk", plain)
    with Disk.open_chain(str(kid), "VMDK", OpenFlags.NORMAL) as d:
        d.discard(0, 128 * 1024 + 4096)           # two grains whole, 4 KiB of the third
        assert d.read(0, 128 * 1024 + 4096) == bytes(128 * 1024 + 4096)
        assert d.read(128 * 1024 + 4096, 4096) == b"\x55" * 4096
        assert d.top.block_status(0, 128 * 1024)[0][2] == Alloc.ZERO
    with Disk.open_chain(str(plain), "VMDK", OpenFlags.NORMAL) as d, pytest.raises(NotSupported):
        d.discard(0, 64 * 1024)                   # no zeroed-grain entries: cannot say zero
    qemu.io("-f", "vmdk", "-c", "read -P 0 0 132k", "-c", "read -P 0x55 132k 100k", kid)
    before = base.stat().st_blocks
    with Disk.open_chain(str(base), "VMDK", OpenFlags.NORMAL) as d:
        d.discard(0, 2 * MiB)
        assert d.top.block_status(0, 2 * MiB) == [(0, 2 * MiB, Alloc.UNALLOCATED)]
        assert d.top.close_holes() is True
    assert base.stat().st_blocks < before - 3 * MiB // 512 // 2
    assert qemu.img("check", base, check=False).returncode == 0
    qemu.io("-f", "vmdk", "-c", "read -P 0 0 2M", "-c", "read -P 0x55 2M 2M", base)


def test_qed_discard_in_a_child_stores_zero_clusters(tmp_path, qemu):
    """QED had no discard (sparsify wrote zeroes, then compacted through a copy)."""
    from vdgui.vd import Alloc, Disk, OpenFlags
    base = tmp_path / "b.qed"
    qemu.img("create", "-f", "qed", base, "8M")
    qemu.io("-f", "qed", "-c", "write -P 0x66 0 4M", base)
    kid = tmp_path / "k.qed"
    qemu.img("create", "-f", "qed", "-b", base.name, "-F", "qed", kid)
    qemu.io("-f", "qed", "-c", "write -P 0x77 0 1M", kid)
    with Disk.open_chain(str(kid), "QED", OpenFlags.NORMAL) as d:
        d.discard(0, 2 * MiB + 4096)               # held clusters, parent's, and a part
        assert d.read(0, 2 * MiB + 4096) == bytes(2 * MiB + 4096)
        assert d.top.block_status(0, 2 * MiB) == [(0, 2 * MiB, Alloc.ZERO)]
        assert d.top.close_holes() is True
    assert qemu.img("check", kid, check=False).returncode == 0
    qemu.io("-f", "qed", "-c", "read -P 0 0 2052k", "-c", "read -P 0x66 2052k 2044k", kid)


def _vd_info(path: Path) -> dict:
    import json
    code, out, err = _main("info", "--json", path)
    assert code == 0, err
    return json.loads(out)


@need_tools
def test_a_fixed_vhd_is_offered_its_dynamic_variant_and_dynamic_replaces_it(built, tmp_path,
                                                                           qemu):
    """A fixed VHD got zeroes written over its free space, then compact failed ("a fixed VHD
    cannot be compacted"): the image changed and nothing was given back."""
    import json
    folder, sums, parts = built
    ORIG[0] = folder / "disk.raw"
    img = tmp_path / "f.vhd"
    qemu.img("convert", "-O", "vpc", "-o", "subformat=fixed", folder / "disk.raw", img)
    h = _sha(img)
    code, out, err = _main("sparsify", "--dry-run", "--json", img)
    assert code == 0, err
    assert "--dynamic" in json.loads(out)["offer"]
    code, _out, err = _main("sparsify", img)
    assert code == 1 and "--dynamic" in err and "--into" in err, (code, err)
    assert _sha(img) == h                            # nothing was written
    uuid = _vd_info(img)["uuid"]
    code, out, err = _main("sparsify", "--dynamic", "--json", img)
    assert code == 0, err
    info = _vd_info(img)
    assert "fixed" not in info["variant"].lower() and info["uuid"] == uuid, info
    rep = json.loads(out)
    assert rep["after"] == img.stat().st_blocks * 512 < rep["before"] // 2
    raw = tmp_path / "back.raw"
    qemu.img("convert", "-f", "vpc", "-O", "raw", img, raw)
    check_volumes(raw, sums, parts)
    assert [p.name for p in tmp_path.iterdir() if "tmp" in p.name] == []


@need_tools
def test_a_stream_optimized_vmdk_is_sparsified_through_a_copy(built, tmp_path, qemu):
    """streamOptimized VMDKs cannot be written in place: sparsify failed on them."""
    folder, sums, parts = built
    ORIG[0] = folder / "disk.raw"
    img = tmp_path / "s.vmdk"
    qemu.img("convert", "-O", "vmdk", "-o", "subformat=streamOptimized", folder / "disk.raw", img)
    before = img.stat().st_blocks * 512
    code, _out, err = _main("sparsify", img)
    assert code == 0, err
    assert "streamOptimized" in qemu.img("info", img).stdout
    assert img.stat().st_blocks * 512 < before // 2
    assert qemu.img("check", img, check=False).returncode == 0
    raw = tmp_path / "back.raw"
    qemu.img("convert", "-O", "raw", img, raw)
    check_volumes(raw, sums, parts)


@need_tools
def test_into_is_one_copy_whose_progress_counts_bytes(built, tmp_path, qemu):
    """--into copied everything, then sparsified the copy, reporting percent as if bytes
    ("50 B of 100 B"); now the free ranges read as zeroes on the way: one copy, in bytes."""
    from vdgui.vd import sparsify
    folder, sums, parts = built
    ORIG[0] = folder / "disk.raw"
    src = tmp_path / "s.qcow2"
    qemu.img("convert", "-O", "qcow2", folder / "disk.raw", src)
    seen = []
    rep = sparsify(str(src), into=str(tmp_path / "d.vdi"), into_format="VDI",
                   progress=lambda d, t: seen.append((d, t)))
    assert seen[-1][0] == seen[-1][1] > 16 * MiB, seen[-1]
    assert rep.after == (tmp_path / "d.vdi").stat().st_blocks * 512 < rep.before // 2
    raw = tmp_path / "back.raw"
    qemu.img("convert", "-O", "raw", tmp_path / "d.vdi", raw)
    check_volumes(raw, sums, parts)


@pytest.mark.skipif(not HAVE_NTFS or shutil.which("mkntfs") is None, reason="needs ntfs-3g")
def test_ntfs_clusters_a_file_uses_but_bitmap_calls_free_stop_everything(tmp_path):
    """NTFS was not cross-checked (ext and FAT were): a file's clusters cleared in $Bitmap
    were zeroed by sparsify."""
    from dissect.ntfs import NTFS
    vol = tmp_path / "n.raw"
    _sh("dd", "if=/dev/urandom", f"of={vol}", "bs=1M", "count=16", "status=none")
    _sh("mkntfs", "-Q", "-F", "-q", vol)
    src = tmp_path / "big.bin"
    src.write_bytes(hashlib.sha256(b"x").digest() * 8192)          # 256 KiB
    _sh("ntfscp", "-q", vol, src, "big.bin")
    with open(vol, "r+b") as f:
        fs = NTFS(f)
        cs = fs.cluster_size
        lcn = fs.mft.get("big.bin").attributes.DATA[0].dataruns()[0][0]
        bm_lcn = fs.mft.get(6).attributes.DATA[0].dataruns()[0][0]
        at = bm_lcn * cs + lcn // 8
        f.seek(at)
        b = f.read(1)[0]
        f.seek(at)
        f.write(bytes([b & ~(1 << (lcn % 8))]))                # the file's first cluster: "free"
    h = _sha(vol)
    code, _out, err = _main("sparsify", vol)
    assert code == 1 and "$Bitmap marks bytes" in err and "big.bin" in err, (code, err)
    assert _sha(vol) == h


def test_qed_discard_leaves_no_leak_once_closed(tmp_path, qemu):
    """QED has no refcounts: a discarded cluster nothing names is a leak until packed."""
    from vdgui.vd import Disk, OpenFlags
    img = tmp_path / "a.qed"
    qemu.img("create", "-f", "qed", img, "8M")
    qemu.io("-f", "qed", "-c", "write -P 0x66 0 4M", img)
    with Disk.open_chain(str(img), "QED", OpenFlags.NORMAL) as d:
        d.discard(64 * 1024, 128 * 1024)           # two clusters in the middle, no close_holes
    r = qemu.img("check", img, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    qemu.io("-f", "qed", "-c", "read -P 0x66 0 64k", "-c", "read -P 0 64k 128k",
            "-c", "read -P 0x66 192k 3904k", img)


@need_tools
def test_vdi_is_packed_once_after_all_discards(built, tmp_path, qemu, monkeypatch):
    """VDI closed its holes at every discard call (a sync-heavy pass each 256 MiB: 1.15x qemu-img
    convert at 8 GiB on a loaded machine); the blocks are now freed and punched per call and
    packed once at the end."""
    from vdgui.vd.formats.vdi.image import VdiImage
    from vdgui.vd.ops import sparsify as sp
    monkeypatch.setattr(sp, "CHUNK", 2 * MiB)
    passes = []
    real = VdiImage._close_holes
    monkeypatch.setattr(VdiImage, "_close_holes",
                        lambda self: passes.append(1) or real(self))
    folder, sums, parts = built
    ORIG[0] = folder / "disk.raw"
    img = tmp_path / "d.vdi"
    qemu.img("convert", "-O", "vdi", folder / "disk.raw", img)
    code, _out, err = _main("sparsify", img)
    assert code == 0, err
    assert len(passes) == 1, len(passes)
    assert qemu.img("check", img, check=False).returncode == 0
    raw = tmp_path / "back.raw"
    qemu.img("convert", "-O", "raw", img, raw)
    in_use = check_volumes(raw, sums, parts)
    assert img.stat().st_blocks * 512 <= in_use * 1.1 + 16 * MiB


def test_bitmap_runs_are_read_a_run_of_whole_bytes_at_a_time(monkeypatch):
    """ext's block bitmaps were read a byte at a time (4,096 steps for one empty group of 32,768
    blocks; 0.3 s of a 2 GiB sparsify); runs of 0x00 or 0xFF bytes are now one step each. The
    result is the bit-by-bit one."""
    import random

    from vdgui.vd.ops import sparsify as sp

    def by_bit(bm, count, base, unit):
        out: list = []
        for i in range(min(count, len(bm) * 8)):
            if not (bm[i >> 3] >> (i & 7)) & 1:
                sp._add(out, base + i * unit, base + (i + 1) * unit)
        return out
    rnd = random.Random(7)
    for _ in range(300):
        bm = bytes(rnd.choice([0, 0xFF, 0, 0xFF, rnd.randrange(256)])
                   for _ in range(rnd.randrange(40)))
        count = rnd.randrange(len(bm) * 8 + 6)
        out: list = []
        sp._bits_free(bm, count, 100, 4, out)
        assert out == by_bit(bm, count, 100, 4), (bm, count)
    calls = []
    real = sp._add
    monkeypatch.setattr(sp, "_add", lambda o, s, e: calls.append(1) or real(o, s, e))
    out = []
    sp._bits_free(bytes(4096) + b"\xff" * 4096, 65536, 0, 4096, out)
    assert out == [(0, 32768 * 4096)] and len(calls) <= 2, len(calls)
