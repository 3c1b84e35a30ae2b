"""A real iSCSI target for the tests: Linux's userspace target tgt, started on loopback."""
from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import time

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Tgt:
    """One tgtd instance with its own control port and portal."""

    def __init__(self, workdir):
        for tool in ("tgtd", "tgtadm"):
            if shutil.which(tool) is None:
                pytest.fail("tgt is not installed: install Debian's tgt (the README's test "
                            "command does this)", pytrace=False)
        self.workdir = workdir
        self.port = _free_port()
        self.control = random.randrange(100, 30000)
        self.log = open(os.path.join(workdir, f"tgtd-{self.port}.log"), "w")
        self.proc = subprocess.Popen(
            [self._bin("tgtd"), "-f", "-C", str(self.control), "--iscsi",
             f"portal=127.0.0.1:{self.port}"], stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True)
        deadline = time.monotonic() + 15
        while True:
            r = self.adm("--op", "show", "--mode", "system", check=False)
            if r.returncode == 0 and self._listening():
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"tgtd did not start: {open(self.log.name).read()[-2000:]}")
            time.sleep(0.1)
        self.tids = []

    @staticmethod
    def _bin(name):
        return shutil.which(name) or name

    def _listening(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def adm(self, *args, check=True):
        r = subprocess.run([self._bin("tgtadm"), "-C", str(self.control), "--lld", "iscsi", *args],
                           capture_output=True, text=True)
        if check and r.returncode != 0:
            raise RuntimeError(f"tgtadm {' '.join(args)}: {r.stderr}")
        return r

    def add_target(self, iqn: str, backing: str, *, user=None, password=None,
                   out_user=None, out_password=None) -> int:
        tid = len(self.tids) + 1
        self.adm("--op", "new", "--mode", "target", "--tid", str(tid), "-T", iqn)
        self.adm("--op", "new", "--mode", "logicalunit", "--tid", str(tid), "--lun", "1",
                 "-b", backing)
        self.adm("--op", "bind", "--mode", "target", "--tid", str(tid), "-I", "ALL")
        if user:
            self.adm("--op", "new", "--mode", "account", "--user", user, "--password", password)
            self.adm("--op", "bind", "--mode", "account", "--tid", str(tid), "--user", user)
        if out_user:
            self.adm("--op", "new", "--mode", "account", "--user", out_user, "--password",
                     out_password)
            self.adm("--op", "bind", "--mode", "account", "--tid", str(tid), "--user", out_user,
                     "--outgoing")
        self.tids.append(tid)
        return tid

    def stop(self):
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
            for tid in self.tids:
                self.adm("--op", "delete", "--mode", "target", "--tid", str(tid), "--force",
                         check=False)
            self.adm("--op", "delete", "--mode", "system", check=False)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture
def tgt_factory(tmp_path):
    servers = []

    def make():
        t = Tgt(str(tmp_path))
        servers.append(t)
        return t
    yield make
    for s in servers:
        s.stop()


@pytest.fixture(scope="module")
def tgt(tmp_path_factory):
    t = Tgt(str(tmp_path_factory.mktemp("tgt")))
    yield t
    t.stop()
