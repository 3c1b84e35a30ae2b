"""vdgui-img imports only what a command uses (issue #18 goal 3): `info` of a VDI loads no
operation, no look inside disks, no media creation, no library, no archive or fraction code,
and no importlib.metadata when no distribution declares a plugin. Checked on sys.modules in a
fresh interpreter, not by timing."""
from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT
from vdgui.vd import PLUGIN_GROUP, Disk, registry

NOT_FOR_INFO = ("vdgui.vd.ops", "vdgui.vd.inside", "vdgui.vd.media", "vdgui.vd.library",
                "vdgui.gui", "vdgui.jobs", "sqlite3", "tarfile", "fractions", "dissect",
                "pycdlib", "PySide6")

PROBE = """
import contextlib, io, json, sys
from vdgui.cli import main
with contextlib.redirect_stdout(io.StringIO()):
    rc = main(["info", sys.argv[1]])
print(json.dumps({"rc": rc, "modules": sorted(sys.modules)}))
"""


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
