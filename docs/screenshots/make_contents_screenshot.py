"""Regenerate ``contents.png`` and ``contents-changes.png``:
``xvfb-run -a python3 docs/screenshots/make_contents_screenshot.py``.

Builds a 256 MiB GPT disk with the file systems' own tools (sgdisk or sfdisk, mkfs.fat + mcopy for
an EFI partition, mkfs.ext4 -d for a Linux root), converts it to a QCOW2 base, changes a few files
with debugfs, makes the snapshot with ``qemu-img convert -B``, then grabs the Contents tab of the
snapshot: the partition bar and the file browser, and the Changes view.
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
MiB = 1 << 20


def _scratch(prefix: str) -> str:
    path = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, path, True)
    return path


def _sh(*args, input=None):
    exe = shutil.which(args[0]) or shutil.which(args[0], path="/usr/sbin:/sbin") or args[0]
    subprocess.run([exe, *map(str, args[1:])], check=True, capture_output=True, text=True,
                   input=input)


def build(d: str) -> str:
    os.environ.setdefault("MTOOLS_SKIP_CHECK", "1")
    raw = os.path.join(d, "disk.img")
    with open(raw, "wb") as f:
        f.truncate(256 * MiB)
    # 1: EFI 32 MiB, 2: Linux root 160 MiB, then free space
    _sh("sfdisk", "-q", raw, input="label: gpt\nstart=2048, size=65536, "
        "type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name=EFI\n"
        "start=67584, size=327680, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=root\n")
    src = os.path.join(d, "root")
    tree = {"etc/hostname": b"debian\n", "etc/fstab": b"UUID=... / ext4 defaults 0 1\n",
            "etc/os-release": b'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\n',
            "home/alice/Documents/report.odt": os.urandom(180_000),
            "home/alice/Pictures/holiday.jpg": os.urandom(2_400_000),
            "home/alice/notes.txt": b"buy milk\n" * 40,
            "var/log/syslog": b"Dec  5 06:00:00 debian systemd[1]: Started.\n" * 3000,
            "usr/bin/hello": os.urandom(70_000), "boot/vmlinuz-6.1.0-13-amd64": os.urandom(
                7 * MiB), "boot/initrd.img-6.1.0-13-amd64": os.urandom(12 * MiB)}
    for rel, data in tree.items():
        p = os.path.join(src, rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(data)
    _sh("mkfs.ext4", "-q", "-F", "-L", "debian-root", "-d", src, "-E",
        f"offset={67584 * 512}", raw, "160M")
    _sh("mkfs.fat", "-F", "16", "-n", "EFI", "--offset", "2048", raw, 65536 // 2)
    efi = os.path.join(d, "efi")
    os.makedirs(os.path.join(efi, "EFI", "debian"))
    with open(os.path.join(efi, "EFI", "debian", "grubx64.efi"), "wb") as f:
        f.write(os.urandom(200_000))
    _sh("mcopy", "-s", "-i", f"{raw}@@{2048 * 512}", os.path.join(efi, "EFI"), "::/")
    base = os.path.join(d, "debian.qcow2")
    _sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, base)
    # what "apt upgrade" did: a new kernel, a changed config, a longer log
    part = os.path.join(d, "root.img")
    _sh("dd", f"if={raw}", f"of={part}", "bs=512", "skip=67584", "count=327680")
    note = os.path.join(d, "note")
    for rel, data in (("etc/hostname", b"debian-upgraded\n"),
                      ("var/log/syslog", b"Dec  5 07:00:00 debian apt: upgraded\n" * 3200)):
        with open(note, "wb") as f:
            f.write(data)
        _sh("debugfs", "-w", "-R", f"rm /{rel}", part)
        _sh("debugfs", "-w", "-R", f"write {note} /{rel}", part)
    with open(note, "wb") as f:
        f.write(os.urandom(7 * MiB))
    _sh("debugfs", "-w", "-R", f"write {note} /boot/vmlinuz-6.1.0-15-amd64", part)
    _sh("dd", f"if={part}", f"of={raw}", "bs=512", "seek=67584", "conv=notrunc")
    top = os.path.join(d, "after-upgrade.qcow2")
    _sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-B", base, "-F", "qcow2", raw, top)
    os.remove(raw)
    os.remove(part)
    return top


def main() -> int:
    sys.path.insert(0, ROOT)
    data = _scratch("vdgui-shots-data-")
    os.environ.setdefault("VDGUI_DATA_DIR", data)
    from vdgui.gui.app import make_app, settings_for
    from vdgui.gui.main_window import MainWindow
    from vdgui.vd import Library

    top = build(_scratch("vdgui-shots-contents-"))
    app = make_app()
    lib = Library(os.path.join(data, "library.sqlite3"))
    win = MainWindow(lib, settings=settings_for(data))
    win.resize(1440, 760)
    win.show()

    def spin(cond, s=20.0):
        end = time.monotonic() + s
        while time.monotonic() < end and not cond():
            app.processEvents()
            time.sleep(0.01)
        end = time.monotonic() + 0.4
        while time.monotonic() < end:
            app.processEvents()
            time.sleep(0.01)

    win.ops.add_paths([top], sync=True)
    win.select_paths([top])
    win.side.setCurrentWidget(win.contents)
    pane = win.contents
    spin(lambda: pane.number == 2 or pane.volume_box.count() == 2)
    pane.select_volume(2)
    spin(lambda: pane.model.rowCount() > 0)
    root = pane.folders.topLevelItem(0)
    home = next(root.child(i) for i in range(root.childCount()) if root.child(i).text(0) == "boot")
    pane.folders.setCurrentItem(home)
    spin(lambda: pane.folder == "/boot" and pane.model.rowCount() > 0)
    win.splitter.setSizes([620, 820])
    win.tree.expandAll()
    spin(lambda: True)
    win.tree.header().resizeSection(0, 210)
    spin(lambda: True)
    win.grab().save(os.path.join(HERE, "contents.png"))
    pane.views.setCurrentWidget(pane.changes_page)
    spin(lambda: pane.changes.topLevelItemCount() > 0)
    win.grab().save(os.path.join(HERE, "contents-changes.png"))
    print(pane.change_paths())
    win.queue.wait(10000)
    win.close()
    del win
    app.processEvents()
    lib.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
