"""vdgui-img imports only what a command uses (issue #18 goal 3): `info` of a VDI loads no
operation, no look inside disks, no media creation, no library, no archive or fraction code,
and no importlib.metadata when no distribution declares a plugin; `info` and `resize` load no
other format's code beyond its declaration (every backend still probes: rule 6). Checked on
sys.modules in a fresh interpreter, not by timing."""
from __future__ import annotations

import json
import struct
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from vdgui.vd import PLUGIN_GROUP, Disk, get_backend, registry
from vdgui.vd.formats import BACKENDS

NOT_FOR_INFO = ("vdgui.vd.ops", "vdgui.vd.inside", "vdgui.vd.media", "vdgui.vd.library",
                "vdgui.vd.chain",           # parents are looked for by differencing images only
                "vdgui.gui", "vdgui.jobs", "sqlite3", "tarfile", "fractions", "dissect",
                "pycdlib", "PySide6",
                "shutil", "bz2", "lzma")      # argparse's help formatter's terminal width

PROBE = """
import contextlib, io, json, sys
from vdgui.cli import main
with contextlib.redirect_stdout(io.StringIO()):
    rc = main(sys.argv[1:] if len(sys.argv) > 2 else ["info", sys.argv[1]])
print(json.dumps({"rc": rc, "modules": sorted(sys.modules)}))
"""

# whatever a VDI command needs, nothing of these: the other formats' code (image, layout,
# construct structures...) beyond their declarations, LUKS and ciphers, iSCSI's PDUs
HEAVY = ("vdgui.vd.crypto.luks", "vdgui.vd.crypto.primitives", "vdgui.vd.crypto.cipher",
         "vdgui.vd.cache", "vdgui.vd.ioqueue", "cryptography", "argon2", "socket", "plistlib",
         "xml", "logging", "fractions",     # fractions: a size like 1.5G only
         "shutil", "bz2", "lzma")          # shutil (and the compressors it loads): copies only


def _run(*args: str) -> dict:
    r = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True,
                       cwd=str(ROOT))
    assert r.returncode == 0, r.stderr
    got: dict = json.loads(r.stdout.strip().splitlines()[-1])
    return got


def _not_needed(modules: list[str], own: str) -> list[str]:
    """Modules of formats other than ``own`` below their declaration, and HEAVY ones."""
    pkg = "vdgui.vd.formats."
    out = []
    for m in modules:
        if m.startswith(pkg) and m.count(".") > 3 and not m.startswith(pkg + own + "."):
            out.append(m)                  # e.g. vdgui.vd.formats.vmdk.image
        elif any(m == h or m.startswith(h + ".") for h in HEAVY):
            out.append(m)
    return out


def test_info_imports_only_what_it_uses(tmp_path):
    img = str(tmp_path / "a.vdi")
    with Disk() as d:
        d.create_base(img, 64 << 20, "VDI")
    r = subprocess.run([sys.executable, "-c", PROBE, img], capture_output=True, text=True,
                       cwd=str(ROOT), check=True)
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["rc"] == 0
    loaded = [m for m in got["modules"]
              if any(m == x or m.startswith(x + ".") for x in NOT_FOR_INFO)]
    assert loaded == []
    assert "vdgui.vd.formats.vdi" in got["modules"]
    if not registry._declared_somewhere(PLUGIN_GROUP):     # no plugin installed here
        assert "importlib.metadata" not in got["modules"]


def test_lazy_names_resolve_on_first_use():
    """The names imported on first use are the same objects their modules define."""
    r = subprocess.run([sys.executable, "-c",
                        "import sys, vdgui.vd as vd\n"
                        "assert 'vdgui.vd.ops.merge' not in sys.modules\n"
                        "from vdgui.vd.ops.merge import merge\n"
                        "from vdgui.vd.ops.sparsify import plan\n"
                        "from vdgui.vd.inside import DiskFile\n"
                        "assert vd.merge is merge and vd.sparsify_plan is plan\n"
                        "assert vd.DiskFile is DiskFile\n"],
                       capture_output=True, text=True, cwd=str(ROOT))
    assert r.returncode == 0, r.stderr


def _commands(parser):
    import argparse

    return next(a for a in parser._actions
                if isinstance(a, argparse._SubParsersAction)).choices


def test_a_parser_built_for_one_command_defines_it_as_the_whole_one():
    """vdgui-img builds the parser of the command it runs alone; that command must be the
    same as in the parser of every command (options, defaults, positionals, in order)."""
    from vdgui.cli_parser import build_parser

    def shape(p):
        return [(a.option_strings, a.dest, a.nargs, a.default, a.required, a.help)
                for a in p._actions]

    full = _commands(build_parser())
    assert len(full) > 15
    for name, p in full.items():
        alone = _commands(build_parser(only=name))
        assert list(alone) == [name]
        assert shape(alone[name]) == shape(p), name


@pytest.mark.parametrize("command", ["info", "resize"])
def test_a_vdi_command_loads_only_the_vdi_code(tmp_path, command):
    """Every backend's declaration (and probe) is imported, no other format's image code."""
    img = str(tmp_path / "a.vdi")
    with Disk() as d:
        d.create_base(img, 64 << 20, "VDI")
    args = ["resize", img, "128M"] if command == "resize" else [img]
    got = _run(*args)
    assert got["rc"] == 0
    assert _not_needed(got["modules"], "vdi") == []
    assert "vdgui.vd.formats.vdi.image" in got["modules"]
    for b in BACKENDS:                      # every declaration is there, to probe
        assert type(b).__module__ in got["modules"]


PROBE_ALL = """
import json, sys
from vdgui.vd import registry, AmbiguousFormat, UnknownFormat
asked = []
for b in registry.backends():
    def spy(src, _probe=b.probe, _name=b.name):
        asked.append(_name)
        return _probe(src)
    b.probe = spy
try:
    registry.probe(sys.argv[1])
    outcome = "chosen"
except (AmbiguousFormat, UnknownFormat) as exc:
    outcome = type(exc).__name__
print(json.dumps({"asked": asked, "outcome": outcome, "modules": sorted(sys.modules)}))
"""


@pytest.mark.parametrize("kind", ["unknown", "ambiguous"])
def test_probing_asks_every_backend_without_loading_them(tmp_path, kind):
    """Rule 6 with declarations only: a file of no known format is probed by every backend,
    and a file two formats claim strongly is still refused, and no format's image code loads."""
    path = tmp_path / "x.bin"
    if kind == "unknown":
        path.write_bytes(b"\x01" * 65536 + b"\x02" * 4096)
    else:   # a QCOW2 header at the start, a fixed VHD's footer at the end
        foot = bytearray(512)
        foot[:8] = b"conectix"
        struct.pack_into(">I", foot, 60, 2)
        struct.pack_into(">I", foot, 64, (~sum(foot)) & 0xFFFFFFFF)
        path.write_bytes(b"QFI\xfb" + struct.pack(">I", 3) + bytes(1 << 20) + bytes(foot))
    r = subprocess.run([sys.executable, "-c", PROBE_ALL, str(path)], capture_output=True,
                       text=True, cwd=str(ROOT))
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert sorted(got["asked"]) == sorted(b.name for b in registry.backends())
    assert got["outcome"] == ("chosen" if kind == "unknown" else "AmbiguousFormat")
    assert _not_needed(got["modules"], "") == []


# -- convert, merge and resize of plain images (issue #18 goal 3): no encryption code, no
# check/maintenance/bitmaps code a command does not run, no socket/logging/thread pools
PLAIN_HEAVY = ("vdgui.vd.crypto.luks", "vdgui.vd.crypto.luks_layout", "vdgui.vd.crypto.primitives",
               "vdgui.vd.crypto.cipher", "vdgui.vd.filters.keystore", "cryptography", "argon2",
               "socket", "selectors", "logging", "concurrent.futures")
# each format's code only some operations run
CHECK = {"QCOW2": ["vdgui.vd.formats.qcow2.check", "vdgui.vd.formats.qcow2.bitmaps",
                   "vdgui.vd.formats.qcow2.v1"],
         "VMDK": ["vdgui.vd.formats.vmdk.check"], "VHD": [], "VHDX": [], "VDI": []}
MAINTENANCE = {"QCOW2": ["vdgui.vd.formats.qcow2.maintenance"],
               "VDI": ["vdgui.vd.formats.vdi.maintenance"],
               "VMDK": ["vdgui.vd.formats.vmdk.maintenance"],
               "VHD": ["vdgui.vd.formats.vhd.maintenance"],
               "VHDX": ["vdgui.vd.formats.vhdx.maintenance"]}
EXT = {"QCOW2": "qcow2", "VDI": "vdi", "VMDK": "vmdk", "VHD": "vhd", "VHDX": "vhdx"}


def _loaded(modules: list[str], names) -> list[str]:
    return [m for m in modules if any(m == n or m.startswith(n + ".") for n in names)]


def _image(path, fmt: str, size: int = 64 << 20, data: bool = True) -> str:
    with Disk() as d:
        d.create_base(str(path), size, fmt)
        if data:
            d.write(1 << 20, b"\x5a" * 65536)
    return str(path)


@pytest.mark.parametrize("src, dst", [("QCOW2", "VDI"), ("VDI", "VMDK")])
def test_convert_of_a_plain_image_loads_no_crypto_check_or_maintenance(tmp_path, src, dst):
    a = _image(tmp_path / f"a.{EXT[src]}", src)
    b = str(tmp_path / f"b.{EXT[dst]}")
    got = _run("convert", "-O", dst, a, b)
    assert got["rc"] == 0
    with Disk.open_chain(b) as d:
        assert d.read(1 << 20, 65536) == b"\x5a" * 65536
    heavy = PLAIN_HEAVY + ("vdgui.vd.ops.resize",
                           "vdgui.vd.chain")     # a base image: no parent to look for
    for fmt in (src, dst):
        heavy += tuple(CHECK[fmt] + MAINTENANCE[fmt])
    assert _loaded(got["modules"], heavy) == []


@pytest.mark.parametrize("fmt", ["QCOW2", "VDI"])
def test_merge_of_a_plain_chain_loads_no_crypto(tmp_path, fmt):
    base = _image(tmp_path / f"base.{EXT[fmt]}", fmt)
    child = str(tmp_path / f"child.{EXT[fmt]}")
    with Disk() as d:
        d.open(base)
        d.create_diff(child, fmt)
        d.write(4 << 20, b"\xa5" * 65536)
    got = _run("merge", child, base)
    assert got["rc"] == 0
    with Disk.open_chain(base) as d:
        assert d.read(4 << 20, 65536) == b"\xa5" * 65536
    # (a QCOW2 target counts its references once before its first write: check's code)
    assert _loaded(got["modules"], PLAIN_HEAVY + ("vdgui.vd.ops.resize",)) == []


@pytest.mark.parametrize("fmt", ["QCOW2", "VDI", "VMDK", "VHD", "VHDX"])
def test_resize_of_a_plain_image_loads_no_crypto_or_check(tmp_path, fmt):
    img = _image(tmp_path / f"a.{EXT[fmt]}", fmt)
    got = _run("resize", img, "128M")
    assert got["rc"] == 0
    with Disk.open_chain(img) as d:
        assert d.size >= 128 << 20          # (VHD rounds up to its geometry)
        assert d.read(1 << 20, 65536) == b"\x5a" * 65536
    assert _loaded(got["modules"], PLAIN_HEAVY + tuple(CHECK[fmt])) == []
    assert _loaded(got["modules"], MAINTENANCE[fmt])     # where resize lives: loaded on use
    # no parent to look for, and no children either where a resize keeps their links
    if get_backend(fmt).resize_keeps_child_links:
        assert "vdgui.vd.chain" not in got["modules"]


def _stand_in_classes():
    import importlib
    out = []
    for fmt in ("qcow2", "vdi", "vmdk", "vhd", "vhdx"):
        mod = importlib.import_module(f"vdgui.vd.formats.{fmt}.image")
        for v in vars(mod).values():
            if isinstance(v, type) and v.__module__ == mod.__name__ and \
                    any("__later__" in vars(b) for b in v.__mro__):
                out.append(v)
    return out


def test_mixins_loaded_later_resolve_as_the_mixins_themselves():
    """A stand-in names exactly its mixin's own attributes, the mixin's methods need no
    zero-argument super(), and every name resolves on the image class as it would with the
    mixin itself in the bases (vdgui/vd/later.py)."""
    import importlib
    classes = _stand_in_classes()
    assert {c.__name__ for c in classes} >= {"Qcow2Image", "VdiImage", "VmdkImage", "VhdImage",
                                            "VhdxImage"}
    for cls in classes:
        swap = {}
        for b in cls.__mro__:
            if "__later__" not in vars(b):
                continue
            module, name = vars(b)["__later__"]
            real = getattr(importlib.import_module(module), name)
            swap[b] = real
            own = {n for n in vars(real) if not (n.startswith("__") and n.endswith("__"))}
            held = {n for n in vars(b) if not (n.startswith("__") and n.endswith("__"))}
            assert held == own, (cls.__name__, name, sorted(held ^ own))
            for n in own:
                code = getattr(vars(real)[n], "__code__", None)
                assert code is None or "__class__" not in code.co_freevars, (name, n)
        eager = type("Eager", tuple(swap.get(b, b) for b in cls.__bases__), {})
        for real in swap.values():
            for n in vars(real):
                if n.startswith("__") and n.endswith("__"):
                    continue
                if n in vars(cls):
                    continue                # the image's own: the same either way
                lazy_owner = next(k for k in cls.__mro__[1:] if n in vars(k))
                eager_owner = next(k for k in eager.__mro__[1:] if n in vars(k))
                assert swap.get(lazy_owner, lazy_owner) is eager_owner, (cls.__name__, n)
