"""A FIFO (or socket, or character device) where an image belongs is refused at once, never
waited on (issue #12 item 23): every command used to hang in open() on a FIFO with no writer."""
from __future__ import annotations

import contextlib
import io
import os
import signal
import socket

import pytest

from vdgui import cli
from vdgui.vd import Disk

MiB = 1 << 20


class Hung(Exception):
    pass


def vimg(*args, timeout=10):
    """vdgui-img in this process, interrupted (a test failure, not a hang) after ``timeout``."""
    def on_alarm(signum, frame):
        raise Hung(f"vdgui-img {' '.join(map(str, args))} hung for {timeout} s")
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(timeout)
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main([str(a) for a in args])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    return code, err.getvalue()


@pytest.fixture
def fifo(tmp_path):
    p = tmp_path / "pipe.vdi"
    os.mkfifo(p)
    return p


@pytest.fixture
def image(tmp_path):
    p = tmp_path / "real.vdi"
    with Disk() as d:
        d.create_base(str(p), MiB, "VDI")
    return p


def _commands(fifo, image, tmp_path):
    out = tmp_path / "out.vdi"
    return [
        ("info", fifo), ("info", "-f", "VDI", fifo), ("info", "--chain", fifo),
        ("check", fifo), ("check", "--repair", fifo), ("map", fifo),
        ("read", fifo, "--offset", "0", "--length", "512"),
        ("write", fifo, "--offset", "0", "--input", image),
        ("compare", fifo, image), ("compare", image, fifo),
        ("merge", fifo, image), ("merge", image, fifo),
        ("resize", fifo, "2M"), ("compact", fifo), ("set", fifo, "--uuid", "new"),
        ("convert", "-O", "VDI", fifo, out),
        ("create", "-f", "VDI", "--parent", fifo, out),
        ("create", "-f", "VDI", "--size", "1M", "--property-file", f"AllocationBlockSize={fifo}",
         out),
    ]


def test_fifo_is_refused_by_every_command(fifo, image, tmp_path):
    bad = []
    for args in _commands(fifo, image, tmp_path):
        code, err = vimg(*args)
        err_code = 2 if args[0] == "compare" else 1          # compare: 1 means "different"
        if code != err_code or "FIFO" not in err or "Traceback" in err:
            bad.append(f"{' '.join(map(str, args))}: exit {code}, {err!r}")
    assert not bad, "\n".join(bad)
    assert not (tmp_path / "out.vdi").exists()


def test_fifo_with_a_format_given_is_refused(fifo):
    for fmt in ("VDI", "QCOW2", "VMDK", "VHD", "VHDX", "QED", "Parallels", "RAW", "DMG"):
        code, err = vimg("info", "-f", fmt, fifo)
        assert code == 1 and "FIFO" in err, (fmt, err)


def test_socket_and_character_device_are_refused(tmp_path):
    sock = tmp_path / "s.vdi"
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(str(sock))
        code, err = vimg("info", sock)
        assert code == 1 and "socket" in err, err
    finally:
        s.close()
    code, err = vimg("info", "-f", "RAW", "/dev/zero")
    assert code == 1 and "character device" in err, err


def test_property_file_from_a_pipe_with_a_writer_still_works(tmp_path):
    """``--property-file K=<(...)`` (a pipe with a writer) keeps working: only a FIFO nobody
    writes to is refused."""
    r, w = os.pipe()
    os.write(w, b"1048576\n")
    os.close(w)
    try:
        code, err = vimg("create", "-f", "VDI", "--size", "1M", "--property-file",
                         f"AllocationBlockSize=/dev/fd/{r}", tmp_path / "p.vdi")
    finally:
        os.close(r)
    assert code == 0, err


def test_parallels_bundle_descriptor_fifo(tmp_path):
    bundle = tmp_path / "b.hdd"
    bundle.mkdir()
    os.mkfifo(bundle / "DiskDescriptor.xml")
    for args in (("info", "-f", "Parallels", bundle), ("info", bundle)):
        code, err = vimg(*args)
        assert code == 1 and ("FIFO" in err or "is a directory" in err), (args, err)
