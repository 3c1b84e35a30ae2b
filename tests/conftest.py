"""Shared fixtures: qemu tools, pattern data, the real-image corpus."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

ROOT = Path(__file__).resolve().parent.parent
CORPUS_SRC = ROOT.parent / "shared" / "corpus"


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
            raise AssertionError(f"qemu-img {' '.join(map(str, args))} failed ({r.returncode}): {r.stderr}")
        return r

    def io(self, *args, check=True) -> subprocess.CompletedProcess:
        r = subprocess.run([_tool("qemu-io"), *map(str, args)], capture_output=True, text=True)
        if check and (r.returncode != 0 or "error" in r.stdout.lower() or "failed" in r.stdout.lower()):
            raise AssertionError(f"qemu-io {' '.join(map(str, args))} failed: {r.stdout} {r.stderr}")
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


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """The real images of ../shared/corpus unpacked into a temp folder (not the project)."""
    if not (CORPUS_SRC / "unpack.py").exists():
        pytest.fail(f"the image corpus is missing at {CORPUS_SRC}", pytrace=False)
    dest = tmp_path_factory.mktemp("corpus")
    subprocess.run([sys.executable, str(CORPUS_SRC / "unpack.py"), str(dest)], check=True,
                   capture_output=True)
    return dest


def read_all(disk, chunk: int = 4 << 20) -> bytes:
    out = bytearray()
    pos = 0
    while pos < disk.size:
        n = min(chunk, disk.size - pos)
        out += disk.read(pos, n)
        pos += n
    return bytes(out)


def run_cli(*args, check=True, env=None, input=None) -> subprocess.CompletedProcess:
    """Run vdgui-img in a subprocess (as a user would)."""
    r = subprocess.run([sys.executable, "-m", "vdgui.cli", *map(str, args)], capture_output=True,
                       text=True, env=env, input=input, cwd=str(ROOT))
    if check and r.returncode != 0:
        raise AssertionError(f"vdgui-img {' '.join(map(str, args))} exited {r.returncode}: {r.stderr}")
    return r


def pytest_generate_tests(metafunc):
    """Conformance classes declare VARIANTS; each becomes one test case."""
    if "variant" in metafunc.fixturenames and metafunc.cls is not None:
        variants = getattr(metafunc.cls, "VARIANTS", ())
        metafunc.parametrize("variant", variants, ids=[str(int(v)) for v in variants])
