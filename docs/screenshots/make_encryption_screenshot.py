"""Regenerate ``encryption-prompt.png`` and ``encryption-details.png`` (issue #17):
``xvfb-run -a python3 docs/screenshots/make_encryption_screenshot.py``.

Builds a LUKS-encrypted QCOW2 with qemu-img (``--object secret``), a VirtualBox-encrypted VDI with
vdgui-img (``convert --encrypt vbox-aes-xts256``; key store in its sidecar) and a plain VDI, each
holding a FAT floppy file system. Opens the VDI's Contents tab, types a wrong passphrase, and
grabs the screen with the prompt asking again; then answers it and grabs the window: the lock on
both encrypted images, the Encryption row of the details, the listed files.
"""
from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def _scratch(prefix: str) -> str:
    path = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, path, True)
    return path


def build(d: str) -> dict:
    import vdgui.vd as vd

    src = os.path.join(d, "readme.txt")
    with open(src, "w") as f:
        f.write("Quarterly numbers, do not share.\n" * 40)
    floppy = os.path.join(d, "floppy.img")
    vd.create_floppy(floppy, "1.44M", label="FINANCE", sources=[src])
    out = {"luks": os.path.join(d, "finance-luks.qcow2"),
           "vbox": os.path.join(d, "finance-vbox.vdi"),
           "plain": os.path.join(d, "scratch.vdi")}
    for _ in range(40):     # qemu's PBKDF2 timing fails now and then on a coarse clock
        r = subprocess.run(["qemu-img", "convert", "--object", "secret,id=s0,data=luks-pass",
                            "-f", "raw", "-O", "qcow2", "-o",
                            "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=200",
                            floppy, out["luks"]], capture_output=True, text=True)
        if r.returncode == 0 or "accurate CPU usage" not in r.stderr:
            break
    r.check_returncode()
    pw = os.path.join(d, "pw")
    with open(pw, "w") as f:
        f.write("vbox-pass\n")
    subprocess.run([sys.executable, "-m", "vdgui.cli", "convert", "-O", "VDI", "--encrypt",
                    "vbox-aes-xts256", "--new-passphrase-file", pw, floppy, out["vbox"]],
                   check=True, cwd=ROOT)
    os.remove(pw)
    with vd.Disk() as disk:
        disk.create_base(out["plain"], 64 << 20, "VDI")
    os.remove(floppy)
    os.remove(src)
    return out


def main() -> int:
    sys.path.insert(0, ROOT)
    os.environ["PYTHONPATH"] = ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
    data = _scratch("vdgui-shots-data-")
    os.environ.setdefault("VDGUI_DATA_DIR", data)
    from vdgui.gui.app import make_app, settings_for
    from vdgui.gui.main_window import MainWindow
    from vdgui.vd import Library

    paths = build(_scratch("vdgui-shots-crypt-"))
    app = make_app()
    lib = Library(os.path.join(data, "library.sqlite3"))
    win = MainWindow(lib, settings=settings_for(data))
    win.passphrases.keyring = None          # the picture shows no keyring option
    win.resize(1240, 720)
    win.show()

    def spin(cond, s=30.0):
        end = time.monotonic() + s
        while time.monotonic() < end and not cond():
            app.processEvents()
            time.sleep(0.01)
        end = time.monotonic() + 0.4
        while time.monotonic() < end:
            app.processEvents()
            time.sleep(0.01)

    win.ops.add_paths(list(paths.values()), sync=True)
    win.select_paths([paths["vbox"]])
    win.side.setCurrentWidget(win.contents)
    spin(lambda: bool(win.passphrases.dialogs))
    dlg = win.passphrases.dialogs[0]
    dlg.edit.setText("not-the-passphrase")
    dlg.accept()
    spin(lambda: bool(win.passphrases.dialogs) and win.passphrases.dialogs[0] is not dlg)
    dlg = win.passphrases.dialogs[0]
    dlg.edit.setText("xxxxxxxx")            # typed, masked
    spin(lambda: True)
    app.primaryScreen().grabWindow(0, 0, 0, win.frameGeometry().width(),
                                   win.frameGeometry().height()).save(
        os.path.join(HERE, "encryption-prompt.png"))
    dlg.edit.setText("vbox-pass")
    dlg.accept()
    spin(lambda: win.contents.model.rowCount() > 0)
    win.side.setCurrentWidget(win.details)
    spin(lambda: True)
    win.details.ensureWidgetVisible(win.details.info["children"], 0, 120)
    spin(lambda: True)
    win.grab().save(os.path.join(HERE, "encryption-details.png"))
    win.queue.wait(10000)
    win.close()
    app.processEvents()
    lib.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
