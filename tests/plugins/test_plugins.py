"""Issue #19 part 5: backends from outside (docs/plugins.md). The example plugin
(examples/vdgui-bochs) is installed as a distribution, listed by vdgui-img backends with where it
came from, used by the engine, CLI and app; qemu-img reads what it writes. Broken plugins are
reported and skipped; nothing stops the CLI or the app from starting."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import ROOT
from vdgui.vd import (
    Backend,
    Disk,
    InvalidArgument,
    OpenFlags,
    backend_origin,
    get_backend,
    load_plugins,
    probe,
    register_backend,
)

MiB = 1 << 20
BROKEN = {
    "missing": "no_such_module_anywhere:BACKEND",            # import error
    "notbackend": "broken_plug:NOT_A_BACKEND",              # not a Backend
    "badcaps": "broken_plug:BadCaps",                       # a wrong declaration
    "boom": "broken_plug:Boom",                              # its constructor raises
    "taken": "broken_plug:TAKEN",                            # the name VDI is built in
    "probebug": "broken_plug:PROBE_BUG",                     # its probe raises a bug
}


def write_broken_module(site):
    (site.path / "broken_plug.py").write_text(textwrap.dedent("""
        import vdgui.vd as vd

        NOT_A_BACKEND = {"name": "dict"}

        class BadCaps(vd.Backend):
            name = "BadCaps"
            caps = "everything"

        class Boom(vd.Backend):
            name = "Boom"
            def __init__(self):
                raise RuntimeError("cannot start")

        class Taken(vd.Backend):
            name = "vdi"
        TAKEN = Taken()

        class ProbeBug(vd.Backend):
            name = "ProbeBug"
            def probe(self, src):
                return 1 // 0
        PROBE_BUG = ProbeBug()
    """))


def cli(site, *args, check=True):
    r = subprocess.run([sys.executable, "-m", "vdgui.cli", *map(str, args)], capture_output=True,
                       text=True, env=site.env(), cwd=str(ROOT))
    if check and r.returncode:
        raise AssertionError(f"vdgui-img {args} exited {r.returncode}: {r.stderr}")
    return r


def test_example_plugin_listed_with_its_origin(site):
    site.install_example()
    rows = {r["name"]: r for r in json.loads(cli(site, "backends", "--json").stdout)}
    assert rows["Bochs"]["origin"] == {"kind": "plugin", "distribution": "vdgui-bochs",
                                       "version": "0.1.0",
                                       "entry_point": "bochs = vdgui_bochs:BACKEND"}
    assert rows["VDI"]["origin"]["kind"] == "built-in"
    assert rows["Bochs"]["operations"] == ["create", "write"]
    text = cli(site, "backends").stdout
    assert ("Bochs: Bochs growing disk image (example plugin)\n"
            "  from: plugin vdgui-bochs 0.1.0 (entry point bochs = vdgui_bochs:BACKEND)") in text
    assert "VDI: " in text and "  from: built-in" in text


def test_example_plugin_images_read_by_qemu(site, tmp_path, qemu):
    site.install_example()
    report = load_plugins()
    assert [n for n, _ in report.loaded] == ["Bochs"] and not report.problems
    be = get_backend("bochs")
    assert backend_origin(be).describe() == "plugin vdgui-bochs 0.1.0"
    path = str(tmp_path / "disk.img")
    size = 300 * MiB                           # several extents, a partly used last one
    with Disk() as d:
        d.create_base(path, size, be)
        extent = d.top.block_size
        d.write(0, b"\x11" * 4096)
        d.write(extent - 512, b"\x22" * 1024)  # across two extents
        d.write(size - 512, b"\x33" * 512)
    assert probe(path) is be
    with Disk.open_chain(path, flags=OpenFlags.READ_ONLY) as d:
        assert d.size == size
        assert d.read(0, 4096) == b"\x11" * 4096
        assert d.read(4096, 4096) == bytes(4096)
        assert d.read(extent - 512, 1024) == b"\x22" * 1024
        assert d.read(size - 512, 512) == b"\x33" * 512
    info = json.loads(qemu.img("info", "--output=json", path).stdout)
    assert info["format"] == "bochs" and info["virtual-size"] == size
    raw = tmp_path / "disk.raw"
    qemu.img("convert", "-f", "bochs", "-O", "raw", path, raw)
    with open(raw, "rb") as f:
        assert f.read(4096) == b"\x11" * 4096
        f.seek(extent - 512)
        assert f.read(1024) == b"\x22" * 1024
        f.seek(size - 512)
        assert f.read(512) == b"\x33" * 512


def test_example_plugin_from_the_cli(site, tmp_path):
    site.install_example()
    img, data = tmp_path / "c.img", tmp_path / "data.bin"
    data.write_bytes(b"\xab" * 8192)
    cli(site, "create", "-f", "Bochs", "--size", "64M", img)
    cli(site, "write", img, "--offset", "1M", "--input", data)
    info = json.loads(cli(site, "info", "--json", img).stdout)
    assert info["format"] == "Bochs" and info["virtual_size"] == 64 * MiB
    load_plugins()
    with Disk.open_chain(str(img), flags=OpenFlags.READ_ONLY) as d:
        assert d.read(MiB, 8192) == b"\xab" * 8192
        assert d.read(0, MiB) == bytes(MiB)


def test_broken_plugins_are_reported_and_skipped(site):
    write_broken_module(site)
    site.install("broken-plugins", "1.0", BROKEN)
    site.install_example()
    report = load_plugins()
    assert [n for n, _ in report.loaded] == ["Bochs"]
    why = {p.entry_point.split(" ")[0]: p for p in report.problems}
    assert set(why) == set(BROKEN)
    assert all(p.distribution == "broken-plugins" and p.version == "1.0"
               for p in report.problems)
    assert "ModuleNotFoundError" in why["missing"].message
    assert "not a vdgui.vd.Backend" in why["notbackend"].message
    assert "caps is not a Cap" in why["badcaps"].message
    assert "RuntimeError: cannot start" in why["boom"].message
    assert "already used by the VDI backend" in why["taken"].message
    assert "ZeroDivisionError" in why["probebug"].message
    assert str(why["missing"]).startswith(
        "plugin missing = no_such_module_anywhere:BACKEND from broken-plugins 1.0 skipped: ")
    assert get_backend("VDI").name == "VDI"                   # the built-in one, untouched
    # loading again adds nothing and reports the same
    assert load_plugins() is report and len(report.problems) == len(BROKEN)


def test_cli_warns_and_goes_on(site):
    write_broken_module(site)
    site.install("broken-plugins", "1.0", BROKEN)
    r = cli(site, "backends")
    warnings = [ln for ln in r.stderr.splitlines() if ln.startswith("vdgui-img: warning: ")]
    assert len(warnings) == len(BROKEN), r.stderr
    assert "Traceback" not in r.stderr
    assert "VDI: " in r.stdout and "BadCaps" not in r.stdout
    # VDGUI_NO_PLUGINS: nothing loaded, nothing said
    env = site.env() | {"VDGUI_NO_PLUGINS": "1"}
    r = subprocess.run([sys.executable, "-m", "vdgui.cli", "backends"], capture_output=True,
                       text=True, env=env, cwd=str(ROOT))
    assert r.returncode == 0 and not r.stderr


def test_register_backend_checks_declarations(site):
    with pytest.raises(InvalidArgument, match="not a vdgui.vd.Backend"):
        register_backend(object())                           # type: ignore[arg-type]

    class Dup(Backend):
        name = "qcow"                                         # QCOW2's alias

    with pytest.raises(InvalidArgument, match="already used by the QCOW2 backend"):
        register_backend(Dup())


@pytest.mark.gui
def test_app_starts_with_broken_plugins(site, tmp_path):
    """The app's start: a broken plugin is logged on stderr and the window still renders."""
    write_broken_module(site)
    site.install("broken-plugins", "1.0", BROKEN)
    site.install_example()
    png = tmp_path / "app.png"
    env = site.env() | {"QT_QPA_PLATFORM": "offscreen", "VDGUI_DATA_DIR": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "vdgui", "--screenshot", str(png)],
                       capture_output=True, text=True, env=env, cwd=str(ROOT), timeout=120)
    assert r.returncode == 0, r.stderr
    assert png.stat().st_size > 0
    assert r.stderr.count("vdgui: warning: plugin ") == len(BROKEN), r.stderr


@pytest.mark.gui
def test_app_offers_and_creates_plugin_format(site, qtbot, window, tmp_path):
    """The app's format lists come from the registry: the plugin's format is offered by the
    create dialog, its image is made by a job and listed; About names the plugin, and the
    status bar says which plugin was skipped."""
    from tests.gui.conftest import wait_job
    from vdgui.gui.dialogs.create import CreateDialog
    from vdgui.jobs import JobState

    write_broken_module(site)
    site.install("broken-plugins", "1.0", {"missing": BROKEN["missing"]})
    site.install_example()
    from vdgui.gui.app import load_plugins as app_load
    problems = app_load()
    window.plugin_problems(problems)
    assert "plugin missing = no_such_module_anywhere:BACKEND" in window.statusBar().currentMessage()
    assert "Bochs (plugin vdgui-bochs 0.1.0)" in window.about_text()
    dlg = CreateDialog(str(tmp_path), window, size=32 * MiB)
    qtbot.addWidget(dlg)
    assert "Bochs" in dlg.format_buttons
    dlg.set_format("Bochs")
    assert dlg.location.path() == str(tmp_path / "NewVirtualDisk.img")
    assert dlg.ok.isEnabled(), dlg.messages.errors
    job = wait_job(qtbot, window.start_create(dlg.params()))
    assert job.state == JobState.DONE, job.error
    path = str(tmp_path / "NewVirtualDisk.img")
    qtbot.waitUntil(lambda: window.model.node(path) is not None, timeout=5000)
    assert window.model.node(path).record.format == "Bochs"


@pytest.mark.parametrize("offset,value,field", [
    (64, 0x30000, "version"), (80, 1000, "extent"), (80, 1 << 24, "extent"),
    (76, 0, "bitmap"), (72, 0x200000, "catalog")])
def test_example_plugin_refuses_damaged_headers(site, tmp_path, offset, value, field):
    """The plugin follows the engine's error rules: a damaged header is a CorruptImage naming
    the field, never a traceback or a huge allocation."""
    import struct

    from vdgui.vd import CorruptImage
    site.install_example()
    load_plugins()
    path = tmp_path / "d.img"
    with Disk() as d:
        d.create_base(str(path), 8 * MiB, get_backend("Bochs"))
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack("<I", value))
    with pytest.raises(CorruptImage) as exc:
        Disk.open_chain(str(path), flags=OpenFlags.READ_ONLY, format="Bochs")
    assert exc.value.field == field and str(path) in str(exc.value)
