"""Hostile images through the CLI: for every backend with files, a valid small image is damaged the
ways attacks do (truncation at many points, flipped header bytes, count/offset/size fields set to
huge values, stored names pointing at /etc/passwd, ../x or /dev/zero) and fed to ``vdgui-img
info``, ``info --chain``, ``map``, ``check`` and ``convert -O RAW``.

Each run must end with status 0 or 1 (2/3 also for check); a failure prints exactly one line on
stderr (``vdgui-img: ...``), never a traceback nor an "internal error" (an exception that is not a
VDError escaped the engine: ARCHITECTURE rule 10), never hangs (20 s) and never needs more than
1 GiB of address space. Names stored in images never make the CLI read outside the image's
folder.

To keep the runtime small the CLI runs in a fork server: one interpreter, started with
RLIMIT_AS = 1 GiB (preexec_fn), imports vdgui once and forks a fresh child per command, which
runs ``vdgui.cli.main`` with its own stdout/stderr and is killed after 20 s. A few commands are
also run as real ``python -m vdgui.cli`` processes. Damage points are sampled with fixed seeds.
"""
from __future__ import annotations

import io
import json
import os
import random
import resource
import shutil
import struct
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import retry_pbkdf_timing
from vdgui.vd import Cap, backends

ROOT = Path(__file__).resolve().parent.parent.parent
GiB = 1 << 30
TIMEOUT = 20
MiB = 1 << 20

DRIVER = r'''
import json, os, signal, sys, tempfile, time, traceback
import vdgui.cli as cli

def run(argv, timeout):
    out = tempfile.TemporaryFile()
    err = tempfile.TemporaryFile()
    pid = os.fork()
    if pid == 0:
        rc = 70
        try:
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
            sys.stdout = open(1, "w", closefd=False)
            sys.stderr = open(2, "w", closefd=False)
            rc = cli.main(argv)
        except BaseException:
            traceback.print_exc()
            rc = 70
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            except BaseException:
                pass
            os._exit(rc if isinstance(rc, int) else 71)
    deadline = time.monotonic() + timeout
    status = None
    while True:
        p, st = os.waitpid(pid, os.WNOHANG)
        if p:
            status = st
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            break
        time.sleep(0.002)
    res = {"timeout": status is None}
    if status is not None:
        res["rc"] = os.waitstatus_to_exitcode(status)
    for name, f in (("out", out), ("err", err)):
        f.seek(0)
        res[name] = f.read().decode("utf-8", "replace")
        f.close()
    return res

# warm up: every lazy import happens once here, not in each forked child
with tempfile.TemporaryDirectory() as d:
    for fmt in ("VDI", "QCOW2"):
        img = os.path.join(d, "w." + fmt.lower())
        sink = open(os.devnull, "w")
        saved = sys.stdout, sys.stderr
        sys.stdout = sys.stderr = sink
        try:
            cli.main(["backends"])
            cli.main(["create", "-f", fmt, "--size", "1M", img])
            for argv in (["info", img], ["info", "--chain", img], ["map", img], ["check", img],
                         ["convert", "-O", "RAW", img, img + ".raw"], ["info", img + ".raw"]):
                cli.main(argv)
        finally:
            sys.stdout, sys.stderr = saved
            sink.close()

for line in sys.stdin:
    job = json.loads(line)
    print(json.dumps(run(job["argv"], job["timeout"])), flush=True)
'''


def _limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (GiB, GiB))


class ForkServer:
    def __init__(self):
        self.p = subprocess.Popen([sys.executable, "-c", DRIVER], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, cwd=str(ROOT),
                                  preexec_fn=_limit_memory)

    def run(self, *argv) -> dict:
        self.p.stdin.write(json.dumps({"argv": [str(a) for a in argv], "timeout": TIMEOUT}) + "\n")
        self.p.stdin.flush()
        line = self.p.stdout.readline()
        assert line, "the fork server died"
        return json.loads(line)

    def close(self):
        self.p.stdin.close()
        self.p.wait(timeout=30)
        self.p.stdout.close()


@pytest.fixture(scope="module")
def server():
    s = ForkServer()
    yield s
    s.close()


def _verdict(cmd: str, res: dict) -> str | None:
    """None when the run behaved; else what went wrong."""
    if res["timeout"]:
        return f"hung (killed after {TIMEOUT} s)"
    rc, err = res["rc"], res["err"]
    allowed = {0, 1, 2, 3} if cmd == "check" else {0, 1}
    if rc not in allowed:
        return f"exit status {rc}: {err.strip()[-300:]}"
    if "Traceback" in err or "Traceback" in res["out"]:
        return f"traceback: {err.strip()[-300:]}"
    if (rc != 0 and cmd != "check") or rc == 1:
        lines = err.splitlines()
        if len(lines) != 1 or not lines[0].startswith("vdgui-img: "):
            return f"stderr is not one line: {err!r:.300}"
    if "internal error" in err:
        return f"non-VDError escaped: {err.strip()}"
    return None


COMMANDS = [("info",), ("info", "--chain"), ("map",), ("check",), ("convert", "-O", "RAW")]
DAMAGE_COMMANDS = [("info",), ("map",), ("check",), ("convert", "-O", "RAW")]


def _run_all(server, path: Path, fmt: str | None, out_dir: Path, commands=COMMANDS) -> list[str]:
    """Run the commands on ``path``; returns the problems found."""
    problems = []
    for cmd in commands:
        argv = list(cmd) + (["-f", fmt] if fmt else []) + [str(path)]
        dst = out_dir / "out.raw"
        if cmd[0] == "convert":
            if dst.exists():
                dst.unlink()
            argv.append(str(dst))
        res = server.run(*argv)
        bad = _verdict(cmd[0], res)
        if bad:
            problems.append(f"{' '.join(cmd)} {path.name}: {bad}")
        if cmd[0] == "convert" and res.get("rc") == 0 and dst.exists():
            with open(dst, "rb") as f:
                head = f.read(1 << 20)
            if b"root:" in head:
                problems.append(f"convert {path.name}: the output holds /etc/passwd")
    return problems


# -- specimens: one valid small image per backend with files ------------------------------------
def _qemu(*args):
    r = subprocess.run(list(map(str, args)), capture_output=True, text=True)
    assert r.returncode == 0, f"{' '.join(map(str, args))}: {r.stderr}"


def _qemu_image(d: Path, name: str, fmt: str, opts: str = "", size: int = 2 * MiB) -> Path:
    p = d / name
    _qemu("qemu-img", "create", "-q", "-f", fmt, *(["-o", opts] if opts else []), p, size)
    if "streamOptimized" not in opts:
        _qemu("qemu-io", "-f", fmt, "-c", "write -P 0x5a 0 64k", "-c", "write -P 0xa5 1M 1k", p)
    return p


def _cue(d: Path) -> Path:
    (d / "disc.bin").write_bytes(bytes([0x11]) * (8 * 2352))
    p = d / "disc.cue"
    p.write_text('FILE "disc.bin" BINARY\n  TRACK 01 MODE1/2352\n    INDEX 01 00:00:00\n')
    return p


def _luks(d: Path) -> Path:
    p = d / "s.luks"
    secret = ["--object", "secret,id=s0,data=hostile"]
    r = retry_pbkdf_timing(lambda: subprocess.run(
        ["qemu-img", "create", "-q", "-f", "luks", *secret, "-o", "key-secret=s0,iter-time=100",
         str(p), str(2 * MiB)], capture_output=True, text=True))
    assert r.returncode == 0, r.stderr
    _qemu("qemu-io", *secret, "--image-opts", f"driver=luks,file.filename={p},key-secret=s0",
          "-c", "write -P 0x5a 0 64k")
    return p


def _ova(d: Path) -> Path:
    vmdk = _qemu_image(d, "ova-disk.vmdk", "vmdk")
    p = d / "s.ova"
    with tarfile.open(p, "w", format=tarfile.USTAR_FORMAT) as tf:
        ovf = b'<?xml version="1.0"?><Envelope/>'
        ti = tarfile.TarInfo("s.ovf")
        ti.size = len(ovf)
        tf.addfile(ti, io.BytesIO(ovf))
        tf.add(vmdk, arcname="disk1.vmdk")
    return p


def _specimens(d: Path) -> dict[str, Callable[[pytest.FixtureRequest], tuple[Path, str]]]:
    """backend name -> maker of (main file, format) given the test's request, built here (DMG
    from the corpus: only the DMG case asks for it, so only it skips where there is none)."""
    out: dict[str, Callable[[pytest.FixtureRequest], tuple[Path, str]]] = {}
    makers = {
        "vdi": lambda: _qemu_image(d, "s.vdi", "vdi"),
        "vmdk": lambda: _qemu_image(d, "s.vmdk", "vmdk"),
        "vpc": lambda: _qemu_image(d, "s.vhd", "vpc"),
        "vhdx": lambda: _qemu_image(d, "s.vhdx", "vhdx"),
        "qcow2": lambda: _qemu_image(d, "s.qcow2", "qcow2"),
        "qed": lambda: _qemu_image(d, "s.qed", "qed"),
        "parallels": lambda: _qemu_image(d, "s.hdd", "parallels"),
        "dmg": lambda request: Path(shutil.copy(
            request.getfixturevalue("corpus") / "dmg" / "dfvfs" / "hfsplus_zlib.dmg", d / "s.dmg")),
        "cue": lambda: _cue(d),
        "luks": lambda: _luks(d),
        "ova": lambda: _ova(d),
        "raw": lambda: _qemu_image(d, "s.img", "raw", size=MiB + 1536),
    }
    for b in backends():
        if not b.caps & Cap.FILE:
            continue
        names = [b.name.lower()] + [a.lower() for a in b.aliases]
        key = next((n for n in names if n in makers), None)
        assert key is not None, f"no specimen maker for the {b.name} backend: add one here"
        out[b.name] = lambda request, key=key, name=b.name: (
            (makers[key](request) if key == "dmg" else makers[key]()), name)
    return out


BACKENDS_WITH_FILES = [b.name for b in backends() if b.caps & Cap.FILE]


@pytest.fixture(scope="module")
def specimens(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile-valid")
    return _specimens(d)


def _damages(data: bytes, seed: int) -> list[tuple[str, bytes]]:
    """(label, damaged bytes): truncations, flipped header bytes, huge fields."""
    rnd = random.Random(seed)
    n = len(data)
    out = []
    cuts = {0, 1, 511, 512, 4096, n // 2, n - 1}
    cuts |= {rnd.randrange(1, n) for _ in range(2)}
    for c in sorted(x for x in cuts if 0 <= x < n):
        out.append((f"trunc{c}", data[:c]))
    head = min(n, 1024)
    for _ in range(2):
        b = bytearray(data)
        for pos in rnd.sample(range(head), 3):
            b[pos] ^= 0xFF
        out.append((f"flip-{pos}", bytes(b)))
    tail = max(0, n - 512)
    b = bytearray(data)
    for pos in rnd.sample(range(tail, n), 3):
        b[pos] ^= 0xFF
    out.append(("flip-tail", bytes(b)))
    huge = [b"\xff\xff\xff\xff", b"\x7f\xff\xff\xff", b"\x00\x00\x00\x80", b"\x80\x00\x00\x00",
            b"\xff" * 8, b"\x00\x00\x00\x00"]
    for _ in range(2):
        b = bytearray(data)
        for _k in range(2):
            pos = rnd.randrange(0, max(4, min(n, 512) - 8)) & ~3
            val = rnd.choice(huge)
            b[pos:pos + len(val)] = val
        out.append((f"huge-{pos}", bytes(b)))
    # a field deep inside the file (tables, descriptors, trailers)
    for _ in range(1):
        b = bytearray(data)
        pos = rnd.randrange(0, max(4, n - 8)) & ~3
        b[pos:pos + 4] = b"\xff\xff\xff\x7f"
        out.append((f"deep-{pos}", bytes(b)))
    return out


HUGE = [b"\xff\xff\xff\xff", b"\x7f\xff\xff\xff", b"\x00\x00\x00\x80", b"\x80\x00\x00\x00",
        b"\xff" * 8, b"\x00\x00\x00\x00"]


def _sweep(data: bytes, seed: int) -> list[tuple[str, bytes]]:
    """Header fields, systematically: every 8th position of the first 128 bytes, of bytes
    512..640 (second headers: VHD dynamic header, VMDK/VDI tables...) and of the last 128 bytes
    (footers, trailers), each set to a huge (or zero) value."""
    rnd = random.Random(seed)
    n = len(data)
    positions = sorted({p for p in [*range(0, 128, 8), *range(512, 640, 16),
                                    *range(n - 128, n, 16)] if 0 <= p <= n - 4})
    out = []
    for pos in positions:
        val = HUGE[rnd.randrange(len(HUGE))] if pos % 16 else b"\xff\xff\xff\xff"
        b = bytearray(data)
        b[pos:pos + len(val)] = val
        out.append((f"field-{pos}", bytes(b[:n])))
    return out


# Bugs found here in files owned by others: backend -> reason (strict xfail)
XFAIL: dict[str, str] = {}


@pytest.mark.corpus
@pytest.mark.parametrize("backend", [   # 2-6 s each: one sample stays out of "slow"
    pytest.param(b, marks=[] if b == "VDI" else pytest.mark.slow) for b in BACKENDS_WITH_FILES])
def test_damaged_images(server, specimens, tmp_path, request, backend):
    if backend in XFAIL:
        request.applymarker(pytest.mark.xfail(strict=True, reason=XFAIL[backend]))
    src, fmt = specimens[backend](request)
    data = src.read_bytes()
    # the valid image behaves
    work = tmp_path / "w"
    work.mkdir()
    for f in src.parent.iterdir():
        if (f.is_file() and f.stem == src.stem) or f.suffix == ".bin":
            shutil.copy(f, work / f.name)
    problems = _run_all(server, work / src.name, None, tmp_path)
    assert not problems, "the valid specimen fails:\n" + "\n".join(problems)
    seed = sum(backend.encode())
    for i, (label, damaged) in enumerate(_damages(data, seed)):
        p = work / src.name
        p.write_bytes(damaged)
        for f in (None, fmt) if i % 3 == 1 else (None,):   # probed; a third also with -f
            # (convert and map open the chain as info --chain does)
            for prob in _run_all(server, p, f, tmp_path, DAMAGE_COMMANDS):
                problems.append(f"[{label}{' -f' if f else ''}] {prob}")
    for label, damaged in _sweep(data, seed):
        p = work / src.name
        p.write_bytes(damaged)
        for cmd in (("convert", "-O", "RAW"),):       # opens the chain and reads everything
            dst = tmp_path / "out.raw"
            if dst.exists():
                dst.unlink()
            argv = [*cmd, str(p)] + ([str(dst)] if cmd[0] == "convert" else [])
            bad = _verdict(cmd[0], server.run(*argv))
            if bad:
                problems.append(f"[{label}] {' '.join(cmd)}: {bad}")
    assert not problems, f"{len(problems)} misbehaving runs:\n" + "\n".join(problems[:40])


def _vhd_fix_checksum(b: bytearray, start: int, length: int, at: int) -> None:
    b[start + at:start + at + 4] = bytes(4)
    s = sum(b[start:start + length]) & 0xFFFFFFFF
    b[start + at:start + at + 4] = struct.pack(">I", ~s & 0xFFFFFFFF)


# (qemu format, field offset, struct format, unit): 64-bit offsets of tables, set past off_t
FAR_FIELDS = [
    ("qcow2", 40, ">Q", 1),        # l1_table_offset
    ("qcow2", 48, ">Q", 1),        # refcount_table_offset
    ("qcow2", 64, ">Q", 1),        # snapshots_offset (with nb_snapshots 0: harmless)
    ("qed", 40, "<Q", 1),          # l1_table_offset
    ("vmdk", 56, "<Q", 512),       # gd_offset (sectors)
    ("vmdk", 48, "<Q", 512),       # rgd_offset (sectors)
    ("vpc", 512 + 16, ">Q", 1),    # dynamic header: table_offset (checksum fixed)
]


@pytest.mark.parametrize("qfmt,pos,fmt,unit", FAR_FIELDS,
                         ids=[f"{q}-{p}" for q, p, _f, _u in FAR_FIELDS])
def test_table_offsets_past_off_t(server, tmp_path, qfmt, pos, fmt, unit):
    """A table offset of 2**63 or more (regression: os.pread raised OverflowError, shown as an
    internal error, for a qcow2 l1_table_offset of 0x8000000000030000)."""
    src = _qemu_image(tmp_path, f"far.{qfmt}", qfmt)
    data = src.read_bytes()
    problems = []
    for value in (1 << 63, (1 << 64) - 65536, 0x8000000000030000):
        b = bytearray(data)
        b[pos:pos + 8] = struct.pack(fmt, (value // unit) & ((1 << 64) - 1))
        if qfmt == "vpc":
            _vhd_fix_checksum(b, 512, 1024, 36)
        src.write_bytes(bytes(b))
        for prob in _run_all(server, src, None, tmp_path):
            problems.append(f"[{value:#x}] {prob}")
    assert not problems, "\n".join(problems)


# -- names stored inside images ------------------------------------------------------------------
SECRET = b"root:x:0:0:SECRET-OUTSIDE-THE-FOLDER\n" * 64
HOSTILE_NAMES = ["/etc/passwd", "../x", "/dev/zero", "../../../../../../../../etc/passwd",
                 'json:{"file.filename": "/etc/passwd"}', "file:/etc/passwd", "x/../../x"]


def _embed(path: Path, old: bytes, new: bytes) -> None:
    """Replace ``old`` by ``new`` in a NUL-padded embedded text area (VMDK descriptor)."""
    b = bytearray(path.read_bytes())
    i = b.index(old)
    end = b.index(b"\0", i)                  # the text ends where the padding starts
    text = bytes(b[i:end]).replace(old, new, 1)
    region = text + bytes(max(0, (end - i) - len(text)))
    assert not any(b[end:i + len(region)]), "no room for the new name"
    b[i:i + len(region)] = region
    path.write_bytes(bytes(b))


def _name_case(d: Path, kind: str, name: str) -> Path:
    if kind in ("qcow2", "qed"):
        p = _qemu_image(d, f"n.{kind}", kind)
        _qemu("qemu-img", "rebase", "-u", "-f", kind, "-b", name, "-F", "raw", p)
        return p
    if kind == "vmdk-extent":
        p = d / "n.vmdk"
        _qemu("qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat=monolithicFlat", p, MiB)
        text = p.read_text().replace('"n-flat.vmdk"', json.dumps(name))
        p.write_text(text)
        return p
    if kind == "vmdk-parent":
        _qemu("qemu-img", "create", "-q", "-f", "vmdk", d / "nb.vmdk", MiB)
        p = d / "n.vmdk"
        _qemu("qemu-img", "create", "-q", "-f", "vmdk", "-b", "nb.vmdk", "-F", "vmdk", p)
        (d / "nb.vmdk").unlink()
        _embed(p, b'parentFileNameHint="nb.vmdk"',
               b"parentFileNameHint=" + json.dumps(name).encode())
        return p
    if kind == "cue":
        (d / "disc.bin").write_bytes(bytes([0x11]) * (4 * 2352))
        p = d / "n.cue"
        p.write_text(f'FILE {json.dumps(name)} BINARY\n  TRACK 01 MODE1/2352\n'
                     "    INDEX 01 00:00:00\n")
        return p
    raise AssertionError(kind)


NAME_KINDS = ["qcow2", "qed", "vmdk-extent", "vmdk-parent", "cue"]


@pytest.mark.parametrize("kind", NAME_KINDS)
def test_hostile_stored_names(server, tmp_path, kind):
    """Backing files, extents, parent hints and BIN files naming /etc/passwd, ../x, /dev/zero,
    json:/file: prefixes: nothing outside the image's folder is read, commands fail cleanly."""
    (tmp_path / "x").write_bytes(SECRET)           # what '../x' would reach
    problems = []
    for i, name in enumerate(HOSTILE_NAMES):
        d = tmp_path / f"case{i}"
        d.mkdir()
        p = _name_case(d, kind, name)
        problems += [f"[{name}] {m}" for m in _run_all(server, p, None, tmp_path)]
        out = tmp_path / "o.raw"
        if out.exists():
            out.unlink()
        for cmd in (("map",), ("convert", "-O", "RAW")):
            argv = [*cmd, str(p)] + ([str(out)] if cmd[0] == "convert" else [])
            res = server.run(*argv)
            if res.get("rc") == 0:
                problems.append(f"[{name}] {' '.join(cmd)} succeeded through a hostile name")
            if "SECRET-OUTSIDE" in res["out"]:
                problems.append(f"[{name}] {' '.join(cmd)} printed the outside file")
        if out.exists() and (b"SECRET-OUTSIDE" in out.read_bytes()[:1 << 20]
                             or b"root:" in out.read_bytes()[:1 << 20]):
            problems.append(f"[{name}] convert copied a file outside the folder")
    assert not problems, "\n".join(problems)


SPECIAL_KINDS = ["qcow2", "qed", "vmdk-extent", "vmdk-parent", "cue"]


@pytest.mark.parametrize("kind", SPECIAL_KINDS)
def test_stored_names_to_special_files_in_the_folder(server, tmp_path, kind):
    """Names that stay in the folder but reach a FIFO (opening it would block forever) or a
    symbolic link leading out of the folder, also via an absolute name whose base name is tried
    beside the image (regressions: a VMDK extent naming a FIFO hung convert; a qcow2 backing
    file '/etc/passwd' with a 'passwd' symlink beside the image copied /etc/passwd)."""
    (tmp_path / "x").write_bytes(SECRET)
    problems = []
    for i, (name, make) in enumerate([("fifo", lambda d: os.mkfifo(d / "fifo")),
                                      ("x", lambda d: os.symlink(tmp_path / "x", d / "x")),
                                      (str(tmp_path / "elsewhere" / "x"),
                                       lambda d: os.symlink(tmp_path / "x", d / "x")),
                                      ("zero", lambda d: os.symlink("/dev/zero", d / "zero"))]):
        d = tmp_path / f"case{i}"
        d.mkdir()
        make(d)
        p = _name_case(d, kind, name)
        problems += [f"[{name}] {m}" for m in _run_all(server, p, None, tmp_path)]
        out = tmp_path / "o.raw"
        if out.exists():
            out.unlink()
        res = server.run("convert", "-O", "RAW", p, out)
        if res.get("rc") == 0:
            problems.append(f"[{name}] convert succeeded through {name}")
        if out.exists() and b"SECRET-OUTSIDE" in out.read_bytes()[:1 << 20]:
            problems.append(f"[{name}] convert copied the file outside the folder")
    assert not problems, "\n".join(problems)


# -- XML descriptors: Parallels DiskDescriptor.xml, DMG property lists ---------------------------
LAUGHS = ('<?xml version="1.0"?>\n<!DOCTYPE lolz [<!ENTITY lol "lollollollollollollollollollol">'
          + "".join(f'<!ENTITY lol{i} "{("&lol" + (str(i - 1) if i > 1 else "") + ";") * 10}">'
                    for i in range(1, 10))
          + ']>\n')
EXTERNAL = ('<?xml version="1.0"?>\n<!DOCTYPE x [<!ENTITY ext SYSTEM "file:///etc/passwd">]>\n')


def _parallels_variants(xml: str, hds: str) -> list[tuple[str, str]]:
    body = xml.split("?>", 1)[1]
    out = [(f"file={n}", xml.replace(f"<File>{hds}</File>", f"<File>{n}</File>"))
           for n in ("/etc/passwd", "../x", "/dev/zero", "fifo", "")]
    out += [("disk_size", xml.replace("<Disk_size>2048</Disk_size>",
                                      "<Disk_size>99999999999999999999999</Disk_size>")),
            ("end", xml.replace("<End>2048</End>", "<End>18446744073709551615</End>")),
            ("start", xml.replace("<Start>0</Start>", "<Start>-4096</Start>")),
            ("blocksize0", xml.replace("<Blocksize>2048</Blocksize>", "<Blocksize>0</Blocksize>")),
            ("blocksize-huge", xml.replace("<Blocksize>2048</Blocksize>",
                                           "<Blocksize>4294967295</Blocksize>")),
            ("storages", xml.replace("</StorageData>", xml.split("<StorageData>")[1]
                                     .split("</StorageData>")[0] * 2000 + "</StorageData>")),
            ("laughs", LAUGHS + body.replace("<Name>n</Name>", "<Name>&lol9;</Name>")),
            ("external", EXTERNAL + body.replace("<Name>n</Name>", "<Name>&ext;</Name>")),
            ("not-xml", "<Parallels_disk_image><<<"),
            ("deep", "<a>" * 100000 + "</a>" * 100000)]
    return out


def _dmg_with_plist(data: bytes, plist: bytes) -> bytes:
    koly = bytearray(data[-512:])
    xml_off = struct.unpack(">Q", koly[216:224])[0]
    koly[224:232] = struct.pack(">Q", len(plist))
    return data[:xml_off] + plist + bytes(koly)


def _dmg_variants(data: bytes) -> list[tuple[str, bytes]]:
    koly = data[-512:]
    xml_off, xml_len = struct.unpack(">QQ", koly[216:232])
    plist = data[xml_off:xml_off + xml_len].decode()
    body = plist.split("?>", 1)[1]
    out = [("laughs", LAUGHS.encode() + body.replace("<key>resource-fork</key>",
                                                    "<key>&lol9;</key>").encode()),
           ("external", EXTERNAL.encode() + body.replace("<key>resource-fork</key>",
                                                        "<key>&ext;</key>").encode()),
           ("deep", b"<plist><array>" + b"<array>" * 100000 + b"</array>" * 100000
            + b"</array></plist>"),
           ("not-xml", b"<plist><<<"),
           ("empty", b"")]
    return [(label, _dmg_with_plist(data, p)) for label, p in out]


@pytest.mark.corpus
def test_hostile_xml_descriptors(server, tmp_path, corpus):
    """Entity bombs, external entities, deep nesting and absurd values in the XML a backend
    parses: a clean error (or a clean read), within the time and memory limits."""
    (tmp_path / "x").write_bytes(SECRET)
    problems = []
    d = tmp_path / "prl"
    d.mkdir()
    bundle = d / "n.hdd"
    r = server.run("create", "-f", "Parallels", "--size", "1M", "--property", "Bundle=1", bundle)
    assert r["rc"] == 0, r["err"]
    os.mkfifo(bundle / "fifo")
    desc = bundle / "DiskDescriptor.xml"
    xml = desc.read_text()
    hds = next(p.name for p in bundle.iterdir() if p.suffix == ".hds")
    for label, text in _parallels_variants(xml, hds):
        desc.write_text(text)
        problems += [f"[parallels {label}] {m}" for m in _run_all(server, bundle, None, tmp_path)]
    data = (corpus / "dmg" / "dfvfs" / "hfsplus_zlib.dmg").read_bytes()
    p = tmp_path / "h.dmg"
    for label, damaged in _dmg_variants(data):
        p.write_bytes(damaged)
        problems += [f"[dmg {label}] {m}" for m in _run_all(server, p, None, tmp_path)]
    assert not problems, "\n".join(problems)


def test_chain_loops(server, tmp_path):
    """Parent links forming a loop (qcow2 by name, VDI by UUID) or naming the image itself:
    a clean error from every command, no endless walk."""
    d = tmp_path / "q"
    d.mkdir()
    for n in ("a", "b", "s"):
        _qemu("qemu-img", "create", "-q", "-f", "qcow2", d / f"{n}.qcow2", MiB)
    for child, parent in (("a", "b"), ("b", "a"), ("s", "s")):
        _qemu("qemu-img", "rebase", "-u", "-f", "qcow2", "-b", f"{parent}.qcow2", "-F", "qcow2",
              d / f"{child}.qcow2")
    v = tmp_path / "v"
    v.mkdir()
    assert server.run("create", "-f", "VDI", "--size", "1M", v / "x.vdi")["rc"] == 0
    assert server.run("create", "-f", "VDI", "--parent", v / "x.vdi", v / "a.vdi")["rc"] == 0
    assert server.run("create", "-f", "VDI", "--parent", v / "a.vdi", v / "b.vdi")["rc"] == 0
    info = json.loads(server.run("info", "--json", v / "b.vdi")["out"])
    r = server.run("set", v / "a.vdi", "--parent-uuid", info["uuid"])
    assert r["rc"] == 0, r["err"]
    problems = []
    for p in (d / "a.qcow2", d / "s.qcow2", v / "a.vdi", v / "b.vdi"):
        problems += _run_all(server, p, None, tmp_path)
        for cmd in (("info", "--chain"), ("map",)):
            if server.run(*cmd, p)["rc"] != 1:
                problems.append(f"{' '.join(cmd)} {p.name}: a looping chain was accepted")
    assert not problems, "\n".join(problems)


# -- command lines that used to raise internal errors (issue #12 items 24, 27) ------------------
BAD_NAME = os.fsdecode(b"p\xff")        # a file name that is not UTF-8 (as argv delivers it)


def _image(path: Path, fmt: str, size: int = MiB) -> Path:
    from vdgui.vd import Disk
    with Disk() as d:
        d.create_base(str(path), size, fmt)
    return path


def _cmd_raw_8e(d: Path):
    return ["create", "-f", "RAW", "--size", "8E", d / "x.raw"], "RAW images can be at most"


def _cmd_bad_uuid(d: Path):
    return ["create", "-f", "VDI", "--size", "1M", "--uuid", "not-a-uuid", d / "u.vdi"], \
        "not a UUID"


def _cmd_bad_comment_create(d: Path):
    return ["create", "-f", "VDI", "--size", "1M", "--comment", os.fsdecode(b"\xff"),
            d / "c.vdi"], "is not valid UTF-8"


def _cmd_bad_comment_set(d: Path):
    img = _image(d / "s.vdi", "VDI")
    return ["set", img, "--comment", os.fsdecode(b"\xff")], "is not valid UTF-8"


def _parent_cmd(fmt: str):
    def make(d: Path):
        ext = fmt.lower()
        parent = _image(d / f"{BAD_NAME}.{ext}", fmt)
        return ["create", "-f", fmt, "--parent", parent, d / f"child.{ext}"], "is not valid UTF-8"
    return make


def _cmd_bundle(d: Path):
    return ["create", "-f", "Parallels", "--property", "Bundle=1", "--size", "1M",
            d / f"{BAD_NAME}.hdd"], "is not valid UTF-8"


def _cmd_ambiguous_unit(d: Path):
    return ["create", "-f", "VDI", "--size", "1Kb", d / "k.vdi"], "ambiguous unit 'Kb'"


def _cmd_resize_too_large(d: Path):
    img = _image(d / "big.vdi", "VDI")
    return ["resize", img, "999T"], "VDI images can be at most 16 TiB"


HOSTILE_LINES = {
    "raw-8E": _cmd_raw_8e, "create-uuid": _cmd_bad_uuid, "create-comment": _cmd_bad_comment_create,
    "set-comment": _cmd_bad_comment_set, "parent-qcow2": _parent_cmd("QCOW2"),
    "parent-qed": _parent_cmd("QED"), "parent-vhd": _parent_cmd("VHD"),
    "parent-vhdx": _parent_cmd("VHDX"), "parallels-bundle": _cmd_bundle,
    "size-1Kb": _cmd_ambiguous_unit, "resize-999T": _cmd_resize_too_large,
}


@pytest.mark.parametrize("case", sorted(HOSTILE_LINES))
def test_hostile_command_lines_end_in_one_line(server, tmp_path, case):
    argv, expect = HOSTILE_LINES[case](tmp_path)
    before = set(os.listdir(tmp_path))
    res = server.run(*argv)
    assert _verdict(argv[0], res) is None, _verdict(argv[0], res)
    assert res["rc"] == 1 and expect in res["err"], res
    assert "vdgui-tmp" not in res["err"]
    assert set(os.listdir(tmp_path)) == before          # nothing created


def test_resize_vdi_with_fewer_used_blocks_than_the_map_needs(server, tmp_path):
    """Growing the map moves the first data blocks; with fewer blocks in use than must move,
    the moved ones landed inside the new map area (OverflowError in _relocate_for_map)."""
    from vdgui.vd import Disk, OpenFlags
    img = _image(tmp_path / "g.vdi", "VDI")
    with Disk.open_chain(str(img), "VDI", OpenFlags.NORMAL) as d:
        d.write(0, b"x" * 100)
    res = server.run("resize", img, "1T")
    assert _verdict("resize", res) is None and res["rc"] == 0, res
    with Disk.open_chain(str(img), "VDI", OpenFlags.READ_ONLY) as d:
        assert d.size == 1 << 40
        assert d.read(0, 4096) == b"x" * 100 + bytes(3996)
        assert not d.top.check().corrupt
    subprocess.run(["qemu-img", "check", str(img)], check=True, capture_output=True)


def test_compare_errors_exit_2(server, tmp_path):
    a = _image(tmp_path / "a.vdi", "VDI")
    b = _image(tmp_path / "b.vdi", "VDI")
    assert server.run("compare", a, b)["rc"] == 0
    res = server.run("compare", a, tmp_path / "missing.vdi")
    assert res["rc"] == 2 and res["err"].startswith("vdgui-img: ") and "missing.vdi" in res["err"]
    from vdgui.vd import Disk, OpenFlags
    with Disk.open_chain(str(b), "VDI", OpenFlags.NORMAL) as d:
        d.write(0, b"y")
    assert server.run("compare", a, b)["rc"] == 1


def test_messages_name_the_users_path_not_a_temporary():
    from vdgui.vd import VDIOError
    e = VDIOError("/d/.x.raw.vdgui-tmp-318: truncate failed: File too large")
    assert str(e) == "/d/x.raw: truncate failed: File too large"
    e = VDIOError("write failed", path="/d/.dst.vdi.vdgui-tmp-12-0a1b/dst-s1.vdi")
    assert str(e) == "/d/dst-s1.vdi: write failed" and e.path == "/d/dst-s1.vdi"
