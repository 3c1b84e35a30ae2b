"""Regenerate the screenshots in this folder:
``xvfb-run -a python3 docs/screenshots/make_screenshots.py``.

Builds sample images in a temporary folder (a VDI snapshot chain with a branch, a VMDK, a QCOW2,
an ISO, a missing image, a damaged VDI), then grabs the main window, a running job, the dialogs,
a Check that finds damage (the image's state and the result with Repair…) and a Compare.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
import threading

HERE = os.path.dirname(os.path.abspath(__file__))
MiB = 1 << 20
GiB = 1 << 30


def build_samples(d: str) -> dict:
    from vdgui.vd import Disk, OpenFlags, backends

    names = {b.name for b in backends()}
    vms = os.path.join(d, "VirtualBox VMs", "Debian")
    snaps = os.path.join(vms, "Snapshots")
    os.makedirs(snaps)
    p = {
        "base": os.path.join(vms, "debian.vdi"),
        "s1": os.path.join(snaps, "before-upgrade.vdi"),
        "s2": os.path.join(snaps, "after-upgrade.vdi"),
        "br": os.path.join(snaps, "experiment.vdi"),
    }
    with Disk() as disk:
        disk.create_base(p["base"], 20 * GiB, "VDI", comment="Debian 12 system disk")
        for i in range(24):
            disk.write(i * 96 * MiB, bytes([i + 1]) * MiB)
        disk.create_diff(p["s1"])
        for i in range(6):
            disk.write((i * 300 + 40) * MiB, b"\x51" * MiB)
        disk.create_diff(p["s2"])
        for i in range(4):
            disk.write((i * 500 + 900) * MiB, b"\x52" * MiB)
    with Disk.open_chain(p["base"], flags=OpenFlags.READ_ONLY) as disk:
        disk.create_diff(p["br"])
        disk.write(10 * GiB, b"\x53" * (4 * MiB))
    extra = []
    for fmt, name, size in (
        ("VMDK", "windows.vmdk", 64 * GiB),
        ("QCOW2", "cloud.qcow2", 8 * GiB),
        ("VHD", "azure-fixed.vhd", 30 * MiB),
    ):
        if fmt in names:
            path = os.path.join(d, name)
            with Disk() as disk:
                from vdgui.vd import ImageFlags

                flags = ImageFlags.FIXED if fmt == "VHD" else ImageFlags.NONE
                disk.create_base(path, size, fmt, flags=flags)
                disk.write(0, b"\x01" * MiB)
            extra.append(path)
    iso = os.path.join(d, "debian-12-netinst.iso")
    with Disk() as disk:
        disk.create_base(iso, 8 * MiB, "RAW")
        disk.write(0, b"\x02" * (4 * MiB))
    big = os.path.join(d, "fileserver-data.vdi")
    with Disk() as disk:
        disk.create_base(big, 2 * GiB, "VDI")
        chunk = bytes(range(256)) * (4 * MiB // 256)
        for i in range(0, 384 * MiB, 4 * MiB):
            disk.write(i, chunk)
    p["big"] = big
    p["qcow2"] = next((e for e in extra if e.endswith(".qcow2")), None)
    p["corrupt"] = _crosslinked_vdi(os.path.join(d, "crashed-vm.vdi"))
    p["extra"] = extra + [big, iso, os.path.join(d, "old-backup.vdi")]
    return p


def _crosslinked_vdi(path: str) -> str:
    """A VDI whose block 1 points at block 0's data (two blocks sharing storage: corrupt)."""
    import struct

    from vdgui.vd import Disk
    from vdgui.vd.formats.vdi import layout as L

    with Disk() as d:
        d.create_base(path, 64 * MiB, "VDI")
        d.write(0, b"\x01" * (2 * MiB))
    with open(path, "r+b") as f:
        f.seek(L.H1["offset_blocks"])
        off_blocks = struct.unpack("<I", f.read(4))[0]
        f.seek(off_blocks + 4)
        f.write(struct.pack("<I", 0))
    return path


def _scratch(prefix: str) -> str:
    """A temporary folder removed when the script ends (sample images are hundreds of MiB)."""
    path = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, path, True)
    return path


def main() -> int:
    os.environ.setdefault("VDGUI_DATA_DIR", _scratch("vdgui-shots-data-"))
    from PySide6.QtCore import QSize, Qt

    from vdgui.gui.app import make_app
    from vdgui.gui.dialogs.copy import CopyDialog
    from vdgui.gui.dialogs.create import CreateDialog
    from vdgui.gui.dialogs.merge import MergeDialog
    from vdgui.gui.dialogs.params import CreateParams
    from vdgui.gui.dialogs.resize import ResizeDialog
    from vdgui.gui.main_window import MainWindow
    from vdgui.jobs import Job
    from vdgui.vd import Library, copy_image

    app = make_app()
    tmp = _scratch("vdgui-shots-")
    p = build_samples(tmp)
    win = MainWindow(Library(":memory:"))
    win.resize(QSize(1240, 760))
    win.add_paths([p["s2"], p["br"], *p["extra"]], sync=True, select=False)
    win.show()
    win.select_paths([p["s2"]])

    def settle(ms=400):
        import time

        end = time.monotonic() + ms / 1000
        while time.monotonic() < end:
            app.processEvents()
            time.sleep(0.01)

    settle(800)
    win.grab().save(os.path.join(HERE, "main-window.png"))

    # a real conversion, paused part-way while the picture is taken
    gate = threading.Event()
    reached = threading.Event()
    dst = os.path.join(tmp, "fileserver-data.vmdk")

    def run(progress):
        def cb(done, total):
            r = progress(done, total)
            if total and total * 0.02 < done < total * 0.9 and not gate.is_set():
                reached.set()
                gate.wait(30)
            return r

        return copy_image(p["big"], dst, "VMDK", progress=cb)

    node = win.model.node(p["big"])
    job = Job(
        "Convert fileserver-data.vdi → fileserver-data.vmdk",
        run,
        keys=[node.root().path],
        paths=[n.path for n in node.ancestors()] + [node.path, dst],
        kind="copy",
    )
    done_job = win.start_create(
        CreateParams(location=os.path.join(tmp, "scratch.vdi"), size=2 * GiB, format="VDI")
    )
    while not done_job.finished:
        app.processEvents()
    win.start_job(job)
    win.resizeDocks([win.jobs_dock], [190], Qt.Vertical)
    reached.wait(30)
    settle(1500)
    win.select_paths([p["s2"]])
    settle(300)
    win.grab().save(os.path.join(HERE, "jobs-running.png"))
    gate.set()
    win.queue.wait(60000)
    settle(300)

    dlg = CreateDialog(tmp, win)
    dlg.show()
    settle()
    dlg.grab().save(os.path.join(HERE, "create-dialog.png"))
    dlg.close()
    dlg = CopyDialog(win.model.node(p["s2"]), win)
    dlg.show()
    settle()
    dlg.grab().save(os.path.join(HERE, "copy-dialog.png"))
    dlg.close()
    dlg = MergeDialog(win.model.node(p["s2"]), win)
    dlg.show()
    settle()
    dlg.grab().save(os.path.join(HERE, "merge-dialog.png"))
    dlg.close()
    dlg = ResizeDialog(win.model.node(p["s2"]), win)
    dlg.size.setValue(8 * MiB)
    dlg.show()
    settle()
    dlg.grab().save(os.path.join(HERE, "resize-dialog.png"))
    dlg.close()
    if p.get("qcow2"):  # a shrink over an unused tail: allowed, with its warning
        dlg = ResizeDialog(win.model.node(p["qcow2"]), win)
        dlg.size.setValue(6 * GiB)
        dlg.show()
        settle()
        dlg.grab().save(os.path.join(HERE, "resize-shrink-warning.png"))
        dlg.close()

    # a damaged image: Check marks it Corrupt and offers Repair…
    win.add_paths([p["corrupt"]], sync=True, select=False)
    win.select_paths([p["corrupt"]])
    settle()
    boxes = []
    orig_done = win.ops.check_done
    win.ops.check_done = lambda *a: boxes.append(orig_done(*a)) or boxes[-1]
    win.check_selected(False)
    while not boxes:
        app.processEvents()
    settle(500)
    boxes[0].grab().save(os.path.join(HERE, "check-result.png"))
    boxes[0].close()
    settle()
    win.grab().save(os.path.join(HERE, "corrupt-image.png"))

    # compare two images of the chain
    win.select_paths([p["s2"], p["br"]])
    settle()
    shown = []
    orig_cmp = win.ops.compare_done
    win.ops.compare_done = lambda *a: shown.append(orig_cmp(*a)) or shown[-1]
    win.compare_selected()
    while not shown:
        app.processEvents()
    settle(500)
    shown[0].grab().save(os.path.join(HERE, "compare-result.png"))
    shown[0].close()
    win.close()
    print("screenshots written to", HERE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
