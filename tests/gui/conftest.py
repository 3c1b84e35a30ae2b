"""Fixtures for the GUI tests: an isolated data dir, a main window, a VDI snapshot chain."""
from __future__ import annotations

import pytest

from tests.conftest import enable_faulthandler
from vdgui.vd import Disk, Library, OpenFlags, backends


def pytest_configure(config):
    enable_faulthandler()      # a crash inside Qt names its place (thread and Python stack)


def registered(name: str) -> bool:
    return any(b.name.lower() == name.lower() for b in backends())


@pytest.fixture(autouse=True)
def data_dir(tmp_path, monkeypatch):
    d = tmp_path / "data"
    d.mkdir()
    monkeypatch.setenv("VDGUI_DATA_DIR", str(d))
    return d


@pytest.fixture
def library(data_dir):
    lib = Library(str(data_dir / "library.sqlite3"))
    yield lib
    lib.close()


@pytest.fixture
def window(qtbot, library, data_dir):
    from vdgui.gui.app import settings_for
    from vdgui.gui.main_window import MainWindow
    w = MainWindow(library, settings=settings_for(str(data_dir)))
    w.confirm = lambda *a: (True, False)
    qtbot.addWidget(w)
    w.resize(1100, 700)
    yield w
    w.queue.cancel_all()
    w.queue.wait(10000)


MiB = 1 << 20


@pytest.fixture
def vdi_chain(tmp_path):
    """base.vdi ← snap1.vdi ← snap2.vdi, and base.vdi ← branch.vdi (each writes its own MiB)."""
    assert registered("VDI"), "the VDI backend is not registered yet"
    d = tmp_path / "vms"
    d.mkdir()
    p = {n: str(d / f"{n}.vdi") for n in ("base", "snap1", "snap2", "branch")}
    with Disk() as disk:
        disk.create_base(p["base"], 8 * MiB, "VDI")
        disk.write(0, b"\x11" * MiB)
        disk.create_diff(p["snap1"])
        disk.write(MiB, b"\x22" * MiB)
        disk.create_diff(p["snap2"])
        disk.write(2 * MiB, b"\x33" * MiB)
    with Disk.open_chain(p["base"], flags=OpenFlags.READ_ONLY) as disk:
        disk.create_diff(p["branch"])
        disk.write(3 * MiB, b"\x44" * MiB)
    return p


def wait_job(qtbot, job, timeout=30000):
    """Wait until ``job`` reaches a final state; return it."""
    qtbot.waitUntil(lambda: job.finished, timeout=timeout)
    # let the queued signals reach their receivers
    qtbot.wait(20)
    return job
