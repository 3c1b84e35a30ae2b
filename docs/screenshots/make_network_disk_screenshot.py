"""Regenerate ``network-disk-dialog.png``:
``xvfb-run -a python3 docs/screenshots/make_network_disk_screenshot.py``.

Starts a real iSCSI target (Linux's tgt, as the tests do; needs tgtd and root) on loopback with a
CHAP-protected 64 MiB LUN, fills the "Add network disk" dialog from a pasted URL plus the CHAP
secret, runs "Test connection" and grabs the dialog showing the result.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
IQN = "iqn.2026-11.org.example.storage:vm-disks"


def _scratch(prefix: str) -> str:
    """A temporary folder removed when the script ends (sample images are hundreds of MiB)."""
    path = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, path, True)
    return path


def main() -> int:
    sys.path.insert(0, ROOT)
    os.environ.setdefault("VDGUI_DATA_DIR", _scratch("vdgui-shots-data-"))
    from tests.iscsi.conftest import Tgt
    from vdgui.gui.app import make_app
    from vdgui.gui.dialogs.network_disk import NetworkDiskDialog
    from vdgui.jobs import JobQueue

    tmp = _scratch("vdgui-shots-iscsi-")
    backing = os.path.join(tmp, "lun.img")
    with open(backing, "wb") as f:
        f.truncate(64 << 20)
    tgt = Tgt(tmp)
    try:
        tgt.add_target(IQN, backing, user="vmhost", password="Chap-Secret-2026")
        app = make_app()
        queue = JobQueue()
        dlg = NetworkDiskDialog(queue=queue)
        dlg.url.setText(f"iscsi://vmhost@127.0.0.1:{tgt.port}/{IQN}/1")
        dlg.url.textEdited.emit(dlg.url.text())
        dlg.form.editor("InitiatorSecret").setText("Chap-Secret-2026")
        dlg.show()
        job = dlg.test_connection()
        end = time.monotonic() + 20
        while not job.finished and time.monotonic() < end:
            app.processEvents()
            time.sleep(0.01)
        end = time.monotonic() + 0.5
        while time.monotonic() < end:
            app.processEvents()
            time.sleep(0.01)
        dlg.resize(640, dlg.sizeHint().height())
        app.processEvents()
        out = os.path.join(HERE, "network-disk-dialog.png")
        dlg.grab().save(out)
        print(out, "—", dlg.status.text())
        queue.wait(5000)
        del dlg, job, queue  # widgets go before the application object
        app.processEvents()
    finally:
        tgt.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
