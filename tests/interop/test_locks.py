"""Locks against real qemu holders, in both directions (issue #12 item 13).

Every image an operation reads, writes or deletes is locked for the whole operation, in our
scheme (flock) and in qemu's (OFD locks on bytes 100..299); the operation is refused when another
program holds it, and nothing held open is ever written or deleted. The holders are qemu-io
processes reading commands from a pipe (and qemu-nbd --persistent, and a ``vdgui-img write
--input -`` that waits for its input). The holders open the files as ``raw``: qemu's lock bytes
are on the file whatever format reads it, so every format is covered alike; one test holds a
qcow2 child the way a VM does, which locks its backing file too.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import os
import shutil
import struct
import subprocess
import sys
import time

import pytest

from vdgui import cli
from vdgui.vd import Disk, ImageInUse, OpenFlags, compact, merge, move_image

MiB = 1 << 20
FORMATS = ["QCOW2", "VDI", "VMDK", "VHD"]
EXT = {"QCOW2": "qcow2", "VDI": "vdi", "VMDK": "vmdk", "VHD": "vhd"}

pytestmark = pytest.mark.skipif(shutil.which("qemu-io") is None, reason="qemu-io not installed")


def _lock_byte_taken(path, byte=100) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        lk = struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, byte, 1, 0)
        return struct.unpack("hhqqi4x", fcntl.fcntl(fd, fcntl.F_OFD_GETLK, lk))[0] != fcntl.F_UNLCK
    finally:
        os.close(fd)


def _wait_locked(path, proc, timeout=20.0):
    end = time.monotonic() + timeout
    while not _lock_byte_taken(path):
        if proc.poll() is not None:
            raise AssertionError(f"the holder exited: {proc.stderr.read() if proc.stderr else ''}")
        if time.monotonic() > end:
            raise AssertionError(f"{path}: the holder never took its lock")
        time.sleep(0.02)


@contextlib.contextmanager
def qemu_io_holder(path, mode="rw", fmt="raw"):
    """qemu-io keeping ``path`` open (read-write, or read-only with mode="ro") until the end."""
    args = ["qemu-io", "-f", fmt] + (["-r"] if mode == "ro" else []) + [str(path)]
    p = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE)
    try:
        _wait_locked(path, p)
        yield p
    finally:
        p.stdin.close()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        p.stderr.close()


@contextlib.contextmanager
def qemu_nbd_holder(path, tmp_path, fmt="raw", ro=False):
    sock = tmp_path / f"nbd-{os.getpid()}-{time.monotonic_ns()}.sock"
    args = (
        ["qemu-nbd", "-f", fmt, "-k", str(sock), "--persistent"]
        + (["-r"] if ro else [])
        + [str(path)]
    )
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_locked(path, p)
        yield p
    finally:
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        p.stderr.close()


def vimg(*args):
    """vdgui-img in this process: (exit code, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in args])
    return code, err.getvalue()


def make_chain(tmp_path, fmt):
    """base <- top, each holding data of its own."""
    ext = EXT[fmt]
    base, top = tmp_path / f"base.{ext}", tmp_path / f"top.{ext}"
    with Disk() as d:
        d.create_base(str(base), 4 * MiB, fmt)
        d.write(0, b"\x11" * MiB)
        d.create_diff(str(top))
        d.write(MiB, b"\x22" * MiB)
    return base, top


def snapshot(folder):
    return {
        n: hashlib.sha256((folder / n).read_bytes()).hexdigest()
        for n in sorted(os.listdir(folder))
        if (folder / n).is_file() and not n.endswith(".sock")
    }


# which lock each operation takes on the chain's files: S shared, W write/exclusive
def _ops(base, top, tmp_path):
    inp = tmp_path / "input.bin"
    inp.write_bytes(b"\x33" * 4096)
    dst = tmp_path / "out" / "copy.qcow2"
    # reads first, writes into the base last (on VMDK they break the top's parentCID link,
    # as they should: nothing protects a base whose child is held only as a raw file)
    return [
        (("info", base), {base: "S"}),
        (("info", "--chain", top), {top: "S", base: "S"}),
        (
            ("read", top, "--offset", "0", "--length", "4096", "--output", os.devnull),
            {top: "S", base: "S"},
        ),
        (("map", top), {top: "S", base: "S"}),
        (("compare", base, top), {top: "S", base: "S"}),
        (("convert", "-O", "QCOW2", top, dst), {top: "S", base: "S"}),
        (("check", base), {base: "S"}),
        (("merge", top, base), {top: "W", base: "W"}),
        (("merge", base, top), {top: "W", base: "W"}),
        (("write", top, "--offset", "0", "--input", inp), {top: "W", base: "S"}),
        (("resize", top, "8M"), {top: "W", base: "S"}),
        (("compact", top), {top: "W", base: "S"}),
        (("set", base, "--uuid", "new"), {base: "W"}),
        (("write", base, "--offset", "0", "--input", inp), {base: "W"}),
        (("resize", base, "8M"), {base: "W", top: "W?"}),  # W?: when top must be relinked
        (("compact", base), {base: "W", top: "W?"}),
    ]


def _run_matrix(tmp_path, fmt, held_name, mode, holder="qemu-io"):
    base, top = make_chain(tmp_path, fmt)
    (tmp_path / "out").mkdir()
    held = base if held_name == "base" else top
    ops = _ops(base, top, tmp_path)
    before = snapshot(tmp_path)
    cm = (
        qemu_io_holder(held, mode)
        if holder == "qemu-io"
        else qemu_nbd_holder(held, tmp_path, ro=mode == "ro")
    )
    wrong = []
    with cm:
        for args, needs in ops:
            if args[0] == "set" and fmt == "QCOW2":
                continue  # QCOW2 stores no UUID
            need = needs.get(held)
            refused = need is not None and (mode == "rw" or need == "W")
            snap = snapshot(tmp_path)
            code, err = vimg(*args)
            if need == "W?":  # either done, or refused with nothing changed
                refused = code == 1 and "in use" in err
                if refused and snapshot(tmp_path) != snap:
                    wrong.append(f"{' '.join(map(str, args))}: refused after changing files")
            err_code = 2 if args[0] == "compare" else 1  # compare: 1 means "different"
            if refused and not (code == err_code and "in use" in err):
                wrong.append(f"{' '.join(map(str, args))}: expected a refusal, got {code} {err!r}")
            elif not refused and code not in ((0, 1) if args[0] == "compare" else (0,)):
                wrong.append(f"{' '.join(map(str, args))}: expected success, got {code} {err!r}")
            if "Traceback" in err:
                wrong.append(err)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_path / "out" / "copy.qcow2")
            if (
                mode == "rw"
                and need == "S"
                and args[0] in ("info", "read", "map", "compare", "convert", "check")
            ):
                code, err = vimg(args[0], "-U", *args[1:])  # qemu's -U: allowed
                if code not in ((0, 1) if args[0] == "compare" else (0,)):
                    wrong.append(f"{args[0]} -U: {code} {err!r}")
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp_path / "out" / "copy.qcow2")
        after = snapshot(tmp_path)
        assert after.get(held.name) == before[held.name], (
            "the file held open was changed or deleted"
        )
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("mode", ["rw", "ro"])
@pytest.mark.parametrize("held", ["base", "top"])
@pytest.mark.parametrize(
    "fmt", [pytest.param(f, marks=[] if f == "QCOW2" else pytest.mark.slow) for f in FORMATS]
)
def test_every_op_refused_while_qemu_io_holds(tmp_path, fmt, held, mode):
    _run_matrix(tmp_path, fmt, held, mode)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("mode", ["rw", "ro"])
def test_merge_refused_while_qemu_nbd_serves(tmp_path, fmt, mode):
    """The issue's repro: qemu-nbd --persistent serving the base; merge used to delete it."""
    base, top = make_chain(tmp_path, fmt)
    before = snapshot(tmp_path)
    with qemu_nbd_holder(base, tmp_path, ro=mode == "ro"):
        for s, t in ((base, top), (top, base)):
            with pytest.raises(ImageInUse):
                merge(str(s), str(t))
        assert snapshot(tmp_path) == before
    merge(str(base), str(top))  # the holder gone: the merge runs
    assert not base.exists()


def test_merge_refused_while_qemu_nbd_serves_sample(tmp_path):
    base, top = make_chain(tmp_path, "VMDK")
    before = snapshot(tmp_path)
    with qemu_nbd_holder(base, tmp_path, ro=True):
        code, err = vimg("merge", base, top)
        assert code == 1 and "in use" in err and str(base.name) in err
        assert snapshot(tmp_path) == before


def test_qcow2_backing_file_of_a_qemu_writer(tmp_path, qemu):
    """qemu-io writing the child (as a VM does) locks the backing file against writers:
    vdgui's write/resize/compact of the base are refused, reads of it allowed."""
    base, top = make_chain(tmp_path, "QCOW2")
    before = snapshot(tmp_path)
    with qemu_io_holder(top, "rw", fmt="qcow2"):
        for args in (
            ("write", base, "--offset", "0", "--input", base),
            ("resize", base, "8M"),
            ("compact", base),
            ("merge", top, base),
            ("merge", base, top),
        ):
            code, err = vimg(*args)
            assert code == 1 and "in use" in err, (args, code, err)
        code, err = vimg("read", base, "--offset", "0", "--length", "512", "--output", os.devnull)
        assert code == 0, err
        assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "fmt", [pytest.param(f, marks=[] if f == "VMDK" else pytest.mark.slow) for f in FORMATS]
)
def test_qemu_refused_while_vdgui_writes_a_child(tmp_path, qemu, fmt):
    """While vdgui writes the child, qemu may not write or resize the parent (its backing
    file) nor open the child; it may still read the parent."""
    base, top = make_chain(tmp_path, fmt)
    with Disk.open_chain(str(top), None, OpenFlags.NORMAL) as d:
        d.write(0, b"\x44" * 4096)
        for path in (base, top):
            r = qemu.io("-f", "raw", "-c", "write -P 0x55 0 4k", path, check=False)
            assert r.returncode != 0 and "lock" in r.stderr, r
            r = qemu.img("resize", "-f", "raw", path, "16M", check=False)
            assert r.returncode != 0 and "lock" in r.stderr, r
        r = qemu.io("-f", "raw", "-r", "-c", "read 0 4k", base, check=False)
        assert r.returncode == 0, r
        r = qemu.io("-f", "raw", "-r", "-c", "read 0 4k", top, check=False)  # we write top
        assert "lock" in r.stderr, r
        # another vdgui process: the parent is protected against writers too
        r = subprocess.run(
            [sys.executable, "-m", "vdgui.cli", "resize", str(base), "8M"],
            capture_output=True,
            text=True,
        )
        assert r.returncode == 1 and "in use" in r.stderr, r
    assert os.path.getsize(base) < 16 * MiB


def test_qemu_refused_while_vdgui_reads(tmp_path, qemu):
    """A vdgui reader (convert, compare, map) holds the shared lock: qemu-img resize and
    qemu-io writes are refused mid-copy; qemu readers coexist."""
    base, top = make_chain(tmp_path, "QCOW2")
    with Disk.open_chain(str(top), None, OpenFlags.READ_ONLY):
        for path in (base, top):
            r = qemu.img("resize", "-f", "qcow2", path, "16M", check=False)
            assert r.returncode != 0 and "lock" in r.stderr, r
            r = qemu.io("-f", "qcow2", "-c", "write 0 4k", path, check=False)
            assert r.returncode != 0 and "lock" in r.stderr, r
        assert qemu.img("info", "-f", "qcow2", base, check=False).returncode == 0
    with Disk.open_chain(str(top), None, OpenFlags.READ_ONLY | OpenFlags.FORCE_SHARE):
        assert qemu.img("resize", "-f", "qcow2", base, "16M", check=False).returncode == 0


def test_qemu_refused_during_a_merge(tmp_path, qemu):
    """In the middle of a merge, every image of the chain is locked: qemu can neither write
    nor read (without -U) the ones merged away, nor write the target."""
    with Disk() as d:
        base = tmp_path / "base.qcow2"
        d.create_base(str(base), 8 * MiB, "QCOW2")
        d.write(0, b"\x11" * 8 * MiB)
        paths = [base]
        for i in range(2):
            p = tmp_path / f"s{i}.qcow2"
            d.create_diff(str(p))
            d.write(i * MiB, b"\x22" * 3 * MiB)
            paths.append(p)
    seen = []

    def progress(done, total):
        if not seen:
            for p in paths:
                w = qemu.io("-f", "raw", "-c", "write 0 512", p, check=False)
                r = qemu.io("-f", "raw", "-r", "-c", "read 0 512", p, check=False)
                seen.append((p.name, w.returncode, r.returncode))
        return True

    merge(str(paths[2]), str(paths[0]), progress=progress)  # forward: s0, s1 into base
    assert [(n, w != 0) for n, w, _ in seen] == [(p.name, True) for p in paths]
    # the merged-away images may not even be read; the target's readers refuse a writer
    assert all(r != 0 for _n, _w, r in seen), seen


def test_vdgui_writer_holding_the_top_blocks_a_forward_merge(tmp_path):
    """The issue's third repro: ``vdgui-img write ... --input -`` holding the top of a forward
    merge (another vdgui process)."""
    base, top = make_chain(tmp_path, "VDI")
    before = snapshot(tmp_path)
    p = subprocess.Popen(
        [sys.executable, "-m", "vdgui.cli", "write", str(top), "--offset", "0", "--input", "-"],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        _wait_locked(top, p)
        code, err = vimg("merge", top, base)
        assert code == 1 and "in use" in err, err
        code, err = vimg("write", base, "--offset", "0", "--input", top)  # its parent too
        assert code == 1 and "in use" in err, err
        assert snapshot(tmp_path) == before
    finally:
        p.stdin.close()
        p.wait(30)
        err = p.stderr.read()
        p.stderr.close()
    assert p.returncode == 0, err


def test_force_share_refused_for_a_repair(tmp_path):
    base, _top = make_chain(tmp_path, "VDI")
    code, err = vimg("check", "-U", "--repair", base)
    assert code == 1 and "force-share" in err


def test_compact_in_process_reads_and_writes_one_file(tmp_path):
    """Our own read-only opens inside an operation never refuse the operation's write lock
    (one lock descriptor per file in a process); a second writer in the process is refused."""
    _base, top = make_chain(tmp_path, "VHD")
    with Disk.open_chain(str(top), None, OpenFlags.READ_ONLY):
        compact(str(top))
        with Disk.open_chain(str(top), None, OpenFlags.NORMAL), pytest.raises(ImageInUse):
            Disk.open_chain(str(top), None, OpenFlags.NORMAL)


@pytest.mark.parametrize("mode", ["rw", "ro"])
def test_move_refused_while_qemu_holds(tmp_path, mode):
    """A move renames (or copies and deletes) every file of the image: never one a program
    holds open, even read-only."""
    base, top = make_chain(tmp_path, "VDI")
    (tmp_path / "elsewhere").mkdir()
    with qemu_io_holder(base, mode):
        for dst in (tmp_path / "elsewhere" / base.name, tmp_path / "renamed.vdi"):
            with pytest.raises(ImageInUse):
                move_image(str(base), str(dst))
        assert base.exists() and top.exists() and not (tmp_path / "renamed.vdi").exists()
    move_image(str(top), str(tmp_path / "top2.vdi"))
    assert (tmp_path / "top2.vdi").exists() and not top.exists()


@pytest.mark.parametrize("mode", ["rw", "ro"])
def test_repair_refused_while_qemu_holds(tmp_path, mode):
    """check --repair of a damaged image another program holds: refused, the file unchanged
    (the read-only first pass may run beside a reader; the repair itself never does)."""
    from tests.engine.test_check import _vdi_damage

    path = tmp_path / "img.vdi"
    with Disk() as d:
        d.create_base(str(path), 8 * MiB, "VDI")
        for i in range(4):
            d.write(i * MiB, bytes([i + 1]) * MiB)
    _vdi_damage(path)
    before = snapshot(tmp_path)[path.name]
    with qemu_io_holder(path, mode):
        code, err = vimg("check", "--repair", path)
        assert code == 1 and "in use" in err, (code, err)
        assert snapshot(tmp_path)[path.name] == before
    code, err = vimg("check", "--repair", path)
    assert code in (0, 2, 3) and "in use" not in err and snapshot(tmp_path)[path.name] != before


@pytest.mark.parametrize("mode", ["rw", "ro"])
def test_repair_refused_before_saving_anything_while_qemu_holds(tmp_path, mode):
    """A repair takes the image's write lock before it writes anything anywhere: no orphan-data
    file (NAME.orphans-DATE.bin/.json), no backup folder, no temporary, beside a held image."""
    from tests.engine.test_repair_keeps import _lose_vdi_entry, _make

    path = _make(tmp_path, "VDI")
    _lose_vdi_entry(path, 1)  # an orphaned block holding data: it would be saved
    assert check_dry(path).orphans
    before = sorted(os.listdir(tmp_path)), snapshot(tmp_path)
    with qemu_io_holder(path, mode):
        code, err = vimg("check", "--repair", "--backup", path)
        assert code == 1 and "in use" in err, (code, err)
        assert (sorted(os.listdir(tmp_path)), snapshot(tmp_path)) == before
    code, err = vimg("check", "--repair", "--backup", path)
    assert code == 0, err
    assert any(".orphans-" in n for n in os.listdir(tmp_path))


def check_dry(path):
    from vdgui.vd import check

    return check(str(path), repair=True, dry_run=True)


def test_a_forked_child_never_drops_the_parents_locks(tmp_path):
    """Locks live on open file descriptions, which a fork shares: a child that closes what it
    inherited, or opens and closes the same images, must not release what the parent holds."""
    base, top = make_chain(tmp_path, "QCOW2")
    with Disk.open_chain(str(top), None, OpenFlags.READ_ONLY):
        writer = Disk.open_chain(str(top), None, OpenFlags.NORMAL)
        try:
            pid = os.fork()
            if pid == 0:  # the child
                code = 1
                try:
                    writer.close()  # its copy of the parent's writer
                    with Disk.open_chain(str(base), None, OpenFlags.READ_ONLY):
                        pass
                    code = 0
                finally:
                    os._exit(code)
            _pid, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0
            for byte in (100, 101, 103, 200, 201, 203):
                assert _lock_byte_taken(top, byte), byte
            assert _lock_byte_taken(base, 100) and _lock_byte_taken(base, 201)
        finally:
            writer.close()


def test_issue_repro_qemu_nbd_qcow2(tmp_path):
    """`qemu-nbd -f qcow2 -k s.sock --persistent base.qcow2 &` then `merge base.qcow2
    top.qcow2` used to exit 0 and delete base.qcow2."""
    base, top = make_chain(tmp_path, "QCOW2")
    before = snapshot(tmp_path)
    with qemu_nbd_holder(base, tmp_path, fmt="qcow2"):
        code, err = vimg("merge", base, top)
        assert code == 1 and "in use" in err, err
        assert snapshot(tmp_path) == before


@pytest.mark.parametrize("mode", ["ro", pytest.param("rw", marks=pytest.mark.slow)])
def test_vmdk_extent_file_held(tmp_path, mode):
    """A split VMDK's extent files are locked like its descriptor: qemu holding one extent
    blocks every vdgui writer (and the merge) of that image."""
    from vdgui.vd import ImageFlags

    base, top = tmp_path / "base.vmdk", tmp_path / "top.vmdk"
    with Disk() as d:
        d.create_base(str(base), 4 * MiB, "VMDK", flags=ImageFlags.SPLIT_2G)
        d.write(0, b"\x11" * MiB)
        d.create_diff(str(top))
        d.write(MiB, b"\x22" * MiB)
        extents = [f for f in d.images[0].files() if os.path.abspath(f) != str(base)]
    assert extents
    before = snapshot(tmp_path)
    with qemu_io_holder(extents[0], mode):
        for args in (
            ("merge", top, base),
            ("merge", base, top),
            ("write", base, "--offset", "0", "--input", base),
            ("compact", base),
        ):
            code, err = vimg(*args)
            assert code == 1 and "in use" in err, (args, code, err)
        assert snapshot(tmp_path) == before


@pytest.mark.parametrize("forward", [True, False], ids=["forward", "backward"])
def test_merge_deletes_only_under_its_lock(tmp_path, monkeypatch, forward):
    """The images a merge removes are still locked when their names go: no other program can
    open one in between and then lose it."""
    import vdgui.vd.ops.merge as merge_mod

    base, top = make_chain(tmp_path, "VDI")
    seen = []
    real_unlink = os.unlink

    def unlink(path, *a, **kw):
        seen.append(
            (os.path.basename(path), _lock_byte_taken(path, 100), _lock_byte_taken(path, 200))
        )
        return real_unlink(path, *a, **kw)

    monkeypatch.setattr(merge_mod.os, "unlink", unlink)
    if forward:
        merge(str(top), str(base))
    else:
        merge(str(base), str(top))
    gone = top.name if forward else base.name
    assert seen == [(gone, True, True)]


@pytest.mark.skipif(shutil.which("mkfs.ext4") is None, reason="needs e2fsprogs")
def test_a_volume_kept_for_listing_lets_qemu_write_after_the_idle_close(tmp_path):
    """The app keeps a listed volume open (vd.volumes) with qemu's shared lock: a VM is refused
    while it is kept, and may write once close_idle let it go (issues #15, #16)."""
    from vdgui.vd.inside import VolumeCache

    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    raw, img = tmp_path / "v.raw", tmp_path / "v.qcow2"
    subprocess.run(["mkfs.ext4", "-q", "-d", str(src), str(raw), "8M"], check=True)
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(img)], check=True)
    t = [0.0]
    cache = VolumeCache(idle=30, clock=lambda: t[0])
    write = ["qemu-io", "-f", "qcow2", "-c", "write 0 64k", str(img)]
    try:
        with cache.use(str(img), 0) as fs:
            assert "/a" in {e.path for e in fs.listdir("/")}
        t[0] = 29
        assert cache.close_idle() == []
        r = subprocess.run(write, capture_output=True, text=True)
        assert r.returncode != 0 and 'Failed to get "write" lock' in r.stderr, r
        t[0] = 30
        assert cache.close_idle() == [os.path.realpath(img)]
        r = subprocess.run(write, capture_output=True, text=True)
        assert r.returncode == 0 and "wrote 65536/65536 bytes" in r.stdout, r
    finally:
        cache.close()
