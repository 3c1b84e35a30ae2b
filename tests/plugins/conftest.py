"""Backend plugins installed for a test without pip: a distribution's .dist-info (METADATA and
entry_points.txt) written into a temporary folder put on sys.path, which importlib.metadata
reads like any installed distribution. Fast and offline; subprocesses get the same folders
through PYTHONPATH."""
from __future__ import annotations

import importlib
import os
import sys

import pytest

from tests.conftest import ROOT
from tests.gui.conftest import data_dir, library, window  # noqa: F401 - fixtures for GUI tests
from vdgui.vd import PluginReport, registry

EXAMPLE = ROOT / "examples" / "vdgui-bochs"


def install(site, name: str, version: str, entry_points: dict[str, str],
            group: str = "vdgui.backends"):
    d = site / f"{name.replace('-', '_')}-{version}.dist-info"
    d.mkdir(parents=True)
    (d / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (d / "entry_points.txt").write_text(
        f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in entry_points.items()))
    importlib.invalidate_caches()


def example_distribution() -> tuple[str, str, dict[str, str]]:
    """(name, version, entry points) as examples/vdgui-bochs/pyproject.toml declares them."""
    import tomllib
    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]
    return (project["name"], project["version"],
            dict(project["entry-points"]["vdgui.backends"]))


class Site:
    def __init__(self, path):
        self.path = path

    def install(self, *a, **kw):
        install(self.path, *a, **kw)

    def install_example(self):
        """The example plugin, installed as its pyproject.toml declares it."""
        install(self.path, *example_distribution())

    def env(self) -> dict:
        env = dict(os.environ)
        env.pop("VDGUI_NO_PLUGINS", None)
        env["PYTHONPATH"] = os.pathsep.join([str(self.path), str(EXAMPLE), str(ROOT)])
        return env


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A folder on sys.path for .dist-info of test plugins (the example's sources beside it);
    the backend table and the plugin bookkeeping are restored afterwards."""
    path = tmp_path / "site"
    path.mkdir()
    monkeypatch.syspath_prepend(str(path))
    monkeypatch.syspath_prepend(str(EXAMPLE))
    monkeypatch.delenv("VDGUI_NO_PLUGINS", raising=False)
    monkeypatch.setattr(registry.formats, "REGISTERED", list(registry.formats.REGISTERED))
    monkeypatch.setattr(registry, "_REPORT", PluginReport())
    monkeypatch.setattr(registry, "_SEEN_ENTRY_POINTS", set())
    monkeypatch.setattr(registry, "_ORIGINS", {})
    yield Site(path)
    for mod in [m for m in sys.modules if m == "vdgui_bochs" or m.startswith("broken_plug")]:
        del sys.modules[mod]
