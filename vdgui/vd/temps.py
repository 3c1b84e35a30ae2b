"""Writing new files under a temporary name beside their final one, then renaming them into
place; the sweep of temporaries left by processes that are gone."""

from __future__ import annotations

import contextlib
import os
import re
import stat

from .errors import FileExists, ImageNotFound, VDIOError

# Temporaries are hidden names in the target's folder: ``.<name>.vdgui-tmp-<pid>`` (one file)
# and ``.<name>.vdgui-tmp-<pid>-<8 hex>/`` (a private folder, holding an owner record). A process
# killed before it cleans up leaves them; the next process that makes a temporary in that folder
# removes those whose owner is gone (sweep_stale_temps). Listings skip them (is_temp_name).
_TEMP_RE = re.compile(r"^\..+\.vdgui-tmp-(?P<pid>[0-9]+)(?:-(?P<rand>[0-9a-f]{8}))?$", re.S)
_OWNER = ".vdgui-owner"  # the owner record inside a temporary folder


def temp_name(final: str) -> str:
    d, b = os.path.split(os.path.abspath(final))
    return os.path.join(d, f".{b}.vdgui-tmp-{os.getpid()}")


def is_temp_name(name: str) -> bool:
    """Is ``name`` (a base name) one of our temporaries? Listings never show these."""
    return _TEMP_RE.match(os.path.basename(name)) is not None


def _proc_start(pid: int) -> str | None:
    """The start time of process ``pid`` (clock ticks since boot), None when unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        return data[data.rindex(b")") + 2 :].split()[19].decode()
    except (OSError, ValueError, IndexError):
        return None


def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # never ours to judge
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _host() -> str:
    # gethostname(2) is uname's node name: the same as socket.gethostname(), without loading
    # socket (and selectors) into every command that writes an image
    return os.uname().nodename


def _owner_record() -> str:
    import json

    return json.dumps(
        {
            "host": _host(),
            "boot": _boot_id(),
            "pid": os.getpid(),
            "start": _proc_start(os.getpid()),
        }
    )


def _owner_gone(folder: str, pid: int) -> bool:
    """A temporary folder's owner is gone: its record names this host, and the machine was
    rebooted since, or the process no longer runs (or its PID now belongs to another process).
    A folder from another host (a shared file system) is never judged gone."""
    import json

    try:
        fd = os.open(os.path.join(folder, _OWNER), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        rec = json.loads(os.read(fd, 4096).decode())
    except (OSError, ValueError):
        return False
    finally:
        os.close(fd)
    if (
        not isinstance(rec, dict)
        or rec.get("host") != _host()
        or rec.get("pid") != pid
    ):
        return False
    boot = _boot_id()
    if boot is not None and rec.get("boot") not in (None, boot):
        return True  # rebooted since: nothing of before still runs
    if not _pid_alive(pid):
        return True
    start = _proc_start(pid)
    return start is not None and rec.get("start") is not None and start != rec.get("start")


def sweep_stale_temps(folder: str) -> list[str]:
    """Remove our temporaries in ``folder`` whose process is gone; return their names. Only
    names of our pattern are considered: a file whose PID no longer runs, a folder whose owner
    record says its process is gone. Symbolic links and anything else are never touched."""
    import shutil

    removed: list[str] = []
    try:
        names = os.listdir(folder or ".")
    except OSError:
        return removed
    me = os.getpid()
    for n in names:
        m = _TEMP_RE.match(n)
        if m is None:
            continue
        pid = int(m.group("pid"))
        if pid == me:
            continue
        p = os.path.join(folder, n)
        try:
            st = os.lstat(p)
        except OSError:
            continue
        try:
            if m.group("rand") and stat.S_ISDIR(st.st_mode):
                if _owner_gone(p, pid):
                    shutil.rmtree(p)
                    removed.append(n)
            elif not m.group("rand") and stat.S_ISREG(st.st_mode) and not _pid_alive(pid):
                os.unlink(p)
                removed.append(n)
        except OSError:
            continue
    return removed


def make_temp_dir(dst_path: str) -> str:
    """A private temporary folder beside ``dst_path`` (``.<name>.vdgui-tmp-<pid>-<8 hex>/``,
    mode 0700, with an owner record), after removing stale ones of dead processes there."""
    folder = os.path.dirname(os.path.abspath(dst_path))
    if not os.path.isdir(folder):
        raise ImageNotFound(f"{folder}: target folder does not exist")
    sweep_stale_temps(folder)
    name = f".{os.path.basename(dst_path)}.vdgui-tmp-{os.getpid()}-{os.urandom(4).hex()}"
    path = os.path.join(folder, name)
    try:
        os.mkdir(path, 0o700)
        fd = os.open(os.path.join(path, _OWNER), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, _owner_record().encode())
        finally:
            os.close(fd)
    except OSError as exc:
        import shutil

        shutil.rmtree(path, ignore_errors=True)
        raise VDIOError(
            f"{folder}: cannot create a temporary folder: {exc.strerror or exc}"
        ) from None
    return path


def temp_dir_files(tmpdir: str):
    """(path, path relative to ``tmpdir``) of every file a copy made in ``tmpdir`` (the owner
    record left out)."""
    for root, _dirs, files in os.walk(tmpdir):
        for name in files:
            if root == tmpdir and name == _OWNER:
                continue
            p = os.path.join(root, name)
            yield p, os.path.relpath(p, tmpdir)


@contextlib.contextmanager
def atomic_files(finals: list[str], *, overwrite: bool = False):
    """Yield temporary paths for ``finals``; on success rename them into place, on any exception
    remove the temporaries. Refuses existing targets unless ``overwrite``."""
    for f in finals:
        if os.path.lexists(f) and not overwrite:
            raise FileExists(f"{f}: file already exists")
    temps = [temp_name(f) for f in finals]
    for d in {os.path.dirname(t) for t in temps}:
        sweep_stale_temps(d)
    for t in temps:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(t)
    try:
        yield temps
    except BaseException:
        for t in temps:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(t)
        raise
    for t, f in zip(temps, finals):
        if os.path.exists(t):
            os.replace(t, f)
