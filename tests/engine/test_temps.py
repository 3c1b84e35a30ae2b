"""Stale temporaries (issue #12 item 26): a killed convert leaves its hidden temporary folder
(``.<dst>.vdgui-tmp-<pid>-<hex>/``); the next run that makes a temporary in that folder removes
those whose process is gone, and only those (our name pattern, an owner record naming this host
and a process that no longer runs). Listings never show them."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from tests.engine import kill_harness as kh
from vdgui.vd import Disk, copy_image, is_temp_name, temps

MiB = 1 << 20


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _owner(folder, **rec):
    base = {"host": socket.gethostname(), "boot": temps._boot_id()}
    base.update(rec)
    folder.mkdir()
    (folder / ".vdgui-owner").write_text(json.dumps(base))
    (folder / "dst.vdi").write_bytes(b"partial copy")


def test_sweep_removes_only_temporaries_of_processes_that_are_gone(tmp_path):
    dead = _dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        start = temps._proc_start(live.pid)
        gone = tmp_path / f".dst.vdi.vdgui-tmp-{dead}-0123abcd"
        _owner(gone, pid=dead, start="1")
        running = tmp_path / f".dst.vdi.vdgui-tmp-{live.pid}-0123abcd"
        _owner(running, pid=live.pid, start=start)
        reused = tmp_path / f".x.vdi.vdgui-tmp-{live.pid}-00000001"     # PID reused since
        _owner(reused, pid=live.pid, start=str(int(start) - 1))
        rebooted = tmp_path / f".y.vdi.vdgui-tmp-{live.pid}-00000002"
        _owner(rebooted, pid=live.pid, start=start, boot="another-boot")
        other_host = tmp_path / f".z.vdi.vdgui-tmp-{dead}-00000003"      # a shared folder
        _owner(other_host, pid=dead, host="some-other-host")
        no_record = tmp_path / f".w.vdi.vdgui-tmp-{dead}-00000004"
        no_record.mkdir()
        (no_record / "keep.vdi").write_bytes(b"x")
        outside = tmp_path / "outside"
        outside.mkdir()
        (outside / ".vdgui-owner").write_text(json.dumps({"host": socket.gethostname(),
                                                           "pid": dead}))
        link = tmp_path / f".l.vdi.vdgui-tmp-{dead}-00000005"
        link.symlink_to(outside)
        stale_file = tmp_path / f".a.vdi.vdgui-tmp-{dead}"
        stale_file.write_bytes(b"copy")
        live_file = tmp_path / f".b.vdi.vdgui-tmp-{live.pid}"
        live_file.write_bytes(b"copy")
        lookalikes = [tmp_path / n for n in (f".c.vdi.vdgui-tmp-{dead}x", f"c.vdi.vdgui-tmp-{dead}",
                                             f".d.vdi.vdgui-tmp-{dead}-zz", "image.vdi")]
        for p in lookalikes:
            p.write_bytes(b"user data")

        removed = temps.sweep_stale_temps(str(tmp_path))
        assert sorted(removed) == sorted(p.name for p in (gone, reused, rebooted, stale_file))
        for p in (running, other_host, no_record, link, live_file, outside / ".vdgui-owner",
                  *lookalikes):
            assert os.path.lexists(p), p
    finally:
        live.kill()
        live.wait()


def test_names_are_recognised():
    assert is_temp_name(".dst.vdi.vdgui-tmp-123-0123abcd")
    assert is_temp_name("/some/where/.base.qcow2.vdgui-tmp-77")
    for n in ("dst.vdi", ".dst.vdi", ".dst.vdi.vdgui-tmp-", ".dst.vdi.vdgui-tmp-12x"):
        assert not is_temp_name(n)


def test_temp_folder_has_an_owner_record_that_is_never_published(tmp_path):
    src = tmp_path / "src.vdi"
    with Disk() as d:
        d.create_base(str(src), 4 * MiB, "VDI")
        d.write(0, b"\x5a" * MiB)
    out = copy_image(str(src), str(tmp_path / "copy.vdi"), "VDI")
    assert [os.path.basename(p) for p in out] == ["copy.vdi"]
    assert sorted(os.listdir(tmp_path)) == ["copy.vdi", "src.vdi"]


def _kill_convert_midway(tmp_path, src, dst):
    """``vdgui-img convert`` killed (tests/engine/kill_harness.py) at the middle one of its
    writes; returns the temporary it left."""
    argv = ["convert", "-O", "VDI", str(src), str(dst)]

    def fn():
        from vdgui import cli
        return cli.main(argv)
    scratch = tmp_path.parent / f"{tmp_path.name}-scratch"
    scratch.mkdir()
    code, points = kh.count(fn, tmp_path, scratch)
    assert code == 0
    os.unlink(dst)
    writes = [pt for pt in points if pt.name in kh.WRITES]
    assert kh.run(fn, tmp_path, kill_at=writes[len(writes) // 2],
                  log=str(scratch / "kill.log")) is None, "the convert was not killed"
    return next((n for n in os.listdir(tmp_path) if is_temp_name(n)), None)


def test_killed_convert_leftover_is_removed_by_the_next_run(tmp_path):
    src = tmp_path / "src.vdi"
    with Disk() as d:
        d.create_base(str(src), 32 * MiB, "VDI")
        for i in range(0, 32, 2):
            d.write(i * MiB, os.urandom(64 << 10) * 16)
    temp = _kill_convert_midway(tmp_path, src, tmp_path / "dst.vdi")
    assert temp is not None and (tmp_path / temp).is_dir(), "the convert was killed mid-copy"
    assert any(n != ".vdgui-owner" for n in os.listdir(tmp_path / temp)), "nothing copied yet"
    assert not (tmp_path / "dst.vdi").exists()
    # the next run in the folder (any copy, create or compact) removes it
    copy_image(str(src), str(tmp_path / "again.vdi"), "VDI")
    assert not (tmp_path / temp).exists()
    assert sorted(os.listdir(tmp_path)) == ["again.vdi", "src.vdi"]
