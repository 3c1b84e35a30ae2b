"""Issue 7: build the end-user packages and use them as a user would, with a clean environment.

Builds once per session (PyInstaller takes a minute or two), then: the bundled vdgui-img converts
an image (checked by qemu-img compare), the bundled vdgui renders a screenshot under Xvfb, the
.deb has the right control fields and files, and the desktop files validate.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import tomllib

import pytest

from tests.conftest import ROOT

pytestmark = [pytest.mark.packaging, pytest.mark.slow]
CLEAN_ENV = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8"}


def _version() -> str:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["version"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    import sys
    env = dict(os.environ, PYTHON=sys.executable)
    r = subprocess.run(["bash", str(ROOT / "packaging" / "build-linux.sh")], cwd=ROOT, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    arch = os.uname().machine
    debarch = subprocess.run(["dpkg", "--print-architecture"], capture_output=True,
                             text=True).stdout.strip()
    tarball = ROOT / "dist" / f"vdgui-{_version()}-linux-{arch}.tar.gz"
    deb = ROOT / "dist" / f"vdgui_{_version()}_{debarch}.deb"
    assert tarball.exists() and deb.exists()
    unpack = tmp_path_factory.mktemp("unpacked")
    with tarfile.open(tarball) as t:
        # extraction filters exist from Python 3.11.4 on (Debian 12 has 3.11.2)
        t.extractall(unpack, **({"filter": "tar"} if hasattr(tarfile, "tar_filter") else {}))
    return {"tarball": tarball, "deb": deb, "dir": unpack / f"vdgui-{_version()}"}


def test_bundled_cli_converts_without_python(built, tmp_path, qemu):
    src = tmp_path / "src.vdi"
    qemu.img("create", "-f", "vdi", src, "16M")
    qemu.io("-f", "vdi", "-c", "write -P 0x5a 1M 3M", "-c", "write -P 0x11 9M 64k", src)
    out = tmp_path / "out.qcow2"
    exe = built["dir"] / "vdgui-img"
    r = subprocess.run([str(exe), "--version"], env=CLEAN_ENV, capture_output=True, text=True)
    assert r.returncode == 0 and _version() in r.stdout + r.stderr
    target_fmt = "VDI"
    out = tmp_path / "out.vdi"
    r = subprocess.run([str(exe), "convert", "-O", target_fmt, str(src), str(out)], env=CLEAN_ENV,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert qemu.compare(src, out).returncode == 0
    r = subprocess.run([str(exe), "info", "--json", str(out)], env=CLEAN_ENV, capture_output=True,
                       text=True)
    assert r.returncode == 0 and '"format": "VDI"' in r.stdout


def test_bundled_gui_takes_a_screenshot_under_xvfb(built, tmp_path, qemu):
    xvfb = shutil.which("xvfb-run")
    assert xvfb, "xvfb-run is missing: install Debian's xvfb (the README's test command does)"
    img = tmp_path / "disk.vdi"
    qemu.img("create", "-f", "vdi", img, "64M")
    shot = tmp_path / "shot.png"
    env = dict(
        CLEAN_ENV,
        XDG_DATA_HOME=str(tmp_path / "data"),
        XDG_CONFIG_HOME=str(tmp_path / "cfg"),
        VDGUI_DATA_DIR=str(tmp_path / "data"),
    )
    r = subprocess.run(
        [xvfb, "-a", str(built["dir"] / "vdgui"), "--screenshot", str(shot), str(img)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_deb_contents_and_control(built):
    r = subprocess.run(["dpkg-deb", "-f", str(built["deb"])], capture_output=True, text=True)
    fields = dict(line.split(": ", 1) for line in r.stdout.splitlines() if ": " in line)
    assert fields["Package"] == "vdgui" and fields["Version"] == _version()
    for key in ("Architecture", "Maintainer", "Depends", "Description"):
        assert fields.get(key), key
    assert "libxkbcommon-x11-0" in fields["Depends"]
    listing = subprocess.run(
        ["dpkg-deb", "-c", str(built["deb"])], capture_output=True, text=True
    ).stdout
    for path in (
        "./opt/vdgui/vdgui",
        "./usr/bin/vdgui -> /opt/vdgui/vdgui",
        "./usr/bin/vdgui-img -> /opt/vdgui/vdgui-img",
        "./usr/share/applications/vdgui.desktop",
        "./usr/share/metainfo/org.vdgui.vdgui.metainfo.xml",
        "./usr/share/mime/packages/vdgui.xml",
        "./usr/share/icons/hicolor/scalable/apps/vdgui.svg",
        "./usr/share/icons/hicolor/48x48/apps/vdgui.png",
    ):
        assert path in listing, path


def test_desktop_files_validate():
    for tool in ("desktop-file-validate", "appstreamcli"):
        assert shutil.which(tool), f"{tool} missing: install desktop-file-utils and appstream"
    r = subprocess.run(
        ["desktop-file-validate", str(ROOT / "resources" / "vdgui.desktop")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0 and "error" not in r.stdout.lower(), r.stdout
    r = subprocess.run(
        [
            "appstreamcli",
            "validate",
            "--no-net",
            str(ROOT / "resources" / "org.vdgui.vdgui.metainfo.xml"),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    r = (
        subprocess.run(
            ["xmllint", "--noout", str(ROOT / "resources" / "vdgui-mime.xml")],
            capture_output=True,
            text=True,
        )
        if shutil.which("xmllint")
        else None
    )
    assert r is None or r.returncode == 0
