"""Shared fixtures: qemu tools, pattern data, the real-image corpus."""
from __future__ import annotations

import faulthandler
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vdgui.vd import ImageFlags, variant_words

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
# Debian keeps system tools (cryptsetup, sfdisk, debugfs, tgtd...) in the sbin folders, which a
# user's PATH (and CI's fresh-clone stage, PATH=/usr/bin:/bin) lacks; every test finds them.
_path = os.environ.get("PATH", "").split(os.pathsep)
os.environ["PATH"] = os.pathsep.join(
    _path + [d for d in ("/usr/local/sbin", "/usr/sbin", "/sbin") if d not in _path])

ROOT = Path(__file__).resolve().parent.parent
CORPUS_SRC = ROOT.parent / "shared" / "corpus"
CORPUS_SKIP = "needs the real-image corpus"      # the start of the skip reason when it is absent


def enable_faulthandler() -> None:
    """A crash in Qt or a binding (SIGSEGV, SIGABRT, "Fatal Python error") prints the Python
    stack of every thread. pytest's faulthandler plugin normally has it on, writing to the real
    stderr; this turns it on when the plugin was disabled (-p no:faulthandler)."""
    if not faulthandler.is_enabled():
        faulthandler.enable(file=sys.__stderr__, all_threads=True)


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: install Debian's qemu-utils (the README's test "
                    "command does this)", pytrace=False)
    return path


class Qemu:
    """Runs qemu-img / qemu-io and returns their output; failures raise with stderr shown."""

    def img(self, *args, check=True) -> subprocess.CompletedProcess:
        r = subprocess.run([_tool("qemu-img"), *map(str, args)], capture_output=True, text=True)
        if check and r.returncode != 0:
            raise AssertionError(
                f"qemu-img {' '.join(map(str, args))} failed ({r.returncode}): {r.stderr}"
            )
        return r

    def io(self, *args, check=True) -> subprocess.CompletedProcess:
        r = subprocess.run([_tool("qemu-io"), *map(str, args)], capture_output=True, text=True)
        if check and (
            r.returncode != 0 or "error" in r.stdout.lower() or "failed" in r.stdout.lower()
        ):
            raise AssertionError(
                f"qemu-io {' '.join(map(str, args))} failed: {r.stdout} {r.stderr}"
            )
        return r

    def to_raw(self, path, out, fmt=None) -> Path:
        args = ["convert"] + (["-f", fmt] if fmt else []) + ["-O", "raw", path, out]
        self.img(*args)
        return Path(out)

    def check(self, path, fmt=None) -> subprocess.CompletedProcess:
        return self.img("check", *(["-f", fmt] if fmt else []), path, check=False)

    def compare(self, a, b, fa=None, fb=None) -> subprocess.CompletedProcess:
        args = ["compare"] + (["-f", fa] if fa else []) + (["-F", fb] if fb else []) + [a, b]
        return self.img(*args, check=False)


@pytest.fixture(scope="session")
def qemu() -> Qemu:
    _tool("qemu-img")
    return Qemu()


def pattern(size: int, seed: int = 0, block: int = 65536) -> bytes:
    """Deterministic content: block i filled with byte (i + seed) % 251 + 1, with a marker."""
    out = bytearray()
    for i in range(-(-size // block)):
        b = bytes([(i + seed) % 251 + 1]) * block
        out += b
    out = out[:size]
    return bytes(out)


def sha(data_or_path) -> str:
    if isinstance(data_or_path, (bytes, bytearray)):
        return hashlib.sha256(data_or_path).hexdigest()
    h = hashlib.sha256()
    with open(data_or_path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def require_corpus() -> Path:
    """The real-image corpus (../shared/corpus beside the project), for the tests that read it.

    A user's clone has no ../shared: those tests are then skipped, with a reason naming what is
    missing. CI's machines have it, so under CI (the CI variable set) its absence fails instead
    of silently skipping the corpus tests."""
    if (CORPUS_SRC / "unpack.py").exists():
        return CORPUS_SRC
    what = f"{CORPUS_SKIP} at {CORPUS_SRC} (../shared/corpus beside the project)"
    if os.environ.get("CI"):
        pytest.fail(f"{what}, and CI must have it", pytrace=False)
    pytest.skip(f"{what}: it is absent")


def pytest_runtest_logreport(report):
    """With VDGUI_CORPUS_SKIPS=FILE, note the id of every test skipped for want of the corpus
    (.ci/run runs the suite in a fresh clone, then exactly those tests where the corpus is)."""
    out = os.environ.get("VDGUI_CORPUS_SKIPS")
    if out and report.skipped and CORPUS_SKIP in str(report.longrepr):
        with open(out, "a") as f:
            f.write(report.nodeid + "\n")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """The real images of ../shared/corpus unpacked into a temp folder (not the project)."""
    src = require_corpus()
    dest = tmp_path_factory.mktemp("corpus")
    subprocess.run(
        [sys.executable, str(src / "unpack.py"), str(dest)], check=True, capture_output=True
    )
    return dest


def entry_point(name: str) -> str:
    """The installed command ``name`` (vdgui-img, vdgui) of the Python running the tests: the
    one beside sys.executable, so the README's ``.venv/bin/python -m pytest`` finds it without
    an activated virtual environment."""
    path = Path(sys.executable).parent / name
    if not os.access(path, os.X_OK):
        pytest.fail(
            f"{name} is not installed beside {sys.executable}: run "
            "'bash scripts/bootstrap test' (it installs the project into .venv)",
            pytrace=False,
        )
    return str(path)


def read_all(disk, chunk: int = 4 << 20) -> bytes:
    out = bytearray()
    pos = 0
    while pos < disk.size:
        n = min(chunk, disk.size - pos)
        out += disk.read(pos, n)
        pos += n
    return bytes(out)


def retry_pbkdf_timing(run):
    """Run `run()` (a qemu command creating a LUKS header) until qemu's PBKDF2 timing works.
    qemu times its PBKDF2 in thread CPU time and fails ("Unable to get accurate CPU usage") when
    a coarse or busy clock shows 0 ms; that one failure is retried, any other is returned."""
    for _ in range(40):
        r = run()
        if r.returncode == 0 or "accurate CPU usage" not in r.stderr:
            return r
    return r


def run_cli(*args, check=True, env=None, input=None) -> subprocess.CompletedProcess:
    """Run vdgui-img in a subprocess (as a user would)."""
    r = subprocess.run(
        [sys.executable, "-m", "vdgui.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        input=input,
        cwd=str(ROOT),
    )
    if check and r.returncode != 0:
        raise AssertionError(
            f"vdgui-img {' '.join(map(str, args))} exited {r.returncode}: {r.stderr}"
        )
    return r


def pytest_generate_tests(metafunc):
    """Conformance classes declare VARIANTS; each becomes one test case, named by the variant's
    words (``[dynamic]``, ``[fixed,split2g]``), as the CLI's --variant spells them."""
    if "variant" in metafunc.fixturenames and metafunc.cls is not None:
        variants = getattr(metafunc.cls, "VARIANTS", ())
        metafunc.parametrize("variant", variants, ids=[variant_words(v) for v in variants])


def pytest_make_parametrize_id(config, val, argname):
    """Any ImageFlags parameter is named by its words too ([fixed], not [65536])."""
    if isinstance(val, ImageFlags):
        return variant_words(val)
    return None


# a test that uses one of these fixtures (directly or through another fixture) gets the marker
MARK_BY_FIXTURE = {"qemu": "interop", "qtbot": "gui", "qapp": "gui", "corpus": "corpus"}


def markers_for(fixturenames) -> set[str]:
    return {mark for fixture, mark in MARK_BY_FIXTURE.items() if fixture in fixturenames}


def pytest_collection_modifyitems(config, items):
    """Markers follow the fixtures a test uses (-m "not interop" leaves out every test that runs
    qemu-img, whatever its folder), rather than being remembered file by file."""
    for item in items:
        for mark in sorted(markers_for(getattr(item, "fixturenames", ()))):
            if item.get_closest_marker(mark) is None:
                item.add_marker(mark)
