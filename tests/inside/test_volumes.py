"""Opened volumes kept between listings (issue #15): the app lists one folder at a time, and
each listing opened the chain and the file system again."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from vdgui.jobs import tasks
from vdgui.vd import Disk, volumes
from vdgui.vd.inside import VolumeCache

pytestmark = pytest.mark.skipif(shutil.which("mkfs.ext4") is None, reason="needs e2fsprogs")


def make_image(tmp_path, qemu, name="v", extra=()) -> str:
    """An ext4 QCOW2 with folders a, b, c (one f.txt each) and the folders ``extra``."""
    src = tmp_path / f"{name}-src"
    for d in ("a", "b", "c", *extra):
        (src / d).mkdir(parents=True)
        (src / d / "f.txt").write_text(d)
    raw = tmp_path / f"{name}.raw"
    subprocess.run(["mkfs.ext4", "-q", "-d", str(src), str(raw), "8M"], check=True)
    img = tmp_path / f"{name}.qcow2"
    qemu.img("convert", "-O", "qcow2", raw, img)
    return str(img)


def rewrite_in_place(path: str, new: str) -> None:
    """Another program changes ``path``: same file (inode), new content, new time."""
    st = os.stat(path)
    with open(new, "rb") as src, open(path, "r+b") as dst:
        shutil.copyfileobj(src, dst)
        dst.truncate()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert os.stat(path).st_ino == st.st_ino


@pytest.fixture
def image(tmp_path, qemu):
    yield make_image(tmp_path, qemu)
    volumes.close()


def _count_opens(monkeypatch) -> list:
    opened: list = []
    real = Disk.open_chain.__func__

    def counting(cls, *a, **kw):
        opened.append(a[0])
        return real(cls, *a, **kw)
    monkeypatch.setattr(Disk, "open_chain", classmethod(counting))
    return opened


def _ls(path: str, folder: str) -> list[str]:
    res = tasks.list_job(path, 0, folder).fn(lambda d, t: None)
    return sorted(e.path.rsplit("/", 1)[-1] for e in res["entries"])


def test_listing_folders_opens_the_chain_once(image, monkeypatch):
    opened = _count_opens(monkeypatch)
    assert _ls(image, "/a") == ["f.txt"]
    assert _ls(image, "/b") == ["f.txt"]
    assert "c" in _ls(image, "/")
    assert len(opened) == 1, opened


def test_a_changed_or_closed_image_is_opened_again(image, monkeypatch, qemu):
    opened = _count_opens(monkeypatch)
    _ls(image, "/a")
    st = os.stat(image)
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))     # another program wrote
    _ls(image, "/a")
    assert len(opened) == 2
    volumes.close(image)                         # the app: the shown image changed
    _ls(image, "/a")
    assert len(opened) == 3


def test_the_cache_is_bounded_and_an_entry_in_use_is_not_shared(image, tmp_path):
    cache = VolumeCache(size=2)
    copies = []
    for i in range(3):
        p = tmp_path / f"c{i}.qcow2"
        shutil.copy(image, p)
        copies.append(str(p))
        with cache.use(str(p), 0) as fs:
            assert fs.listdir("/a")
    assert len(cache) == 2
    with cache.use(copies[2], 0) as fs1, cache.use(copies[2], 0) as fs2:
        assert fs1 is not fs2                     # one caller at a time per opened volume
    cache.close()
    assert len(cache) == 0


def test_idle_volumes_are_closed_and_reopened_seeing_a_change_meanwhile(image, tmp_path, qemu,
                                                                         monkeypatch):
    """Kept volumes hold qemu's shared lock; close_idle lets a VM have the image after ``idle``
    seconds unused; the next use opens it again and its stamp says the files changed."""
    opened = _count_opens(monkeypatch)
    t = [1000.0]
    cache = VolumeCache(idle=30, clock=lambda: t[0])
    with cache.use(image, 0) as fs:
        assert "new" not in {e.path for e in fs.listdir("/")}
        t[0] += 100                                   # in use: never idle
        assert cache.close_idle() == [] and len(opened) == 1
    first = cache.stamp(image)
    assert first and len(cache) == 1
    t[0] += 29.9
    assert cache.close_idle() == [] and len(cache) == 1
    assert cache.close_idle(t[0] + 0.1) == [os.path.realpath(image)]
    assert len(cache) == 0
    with cache.use(image, 0):                         # reopened transparently
        pass
    assert len(opened) == 2 and cache.stamp(image) == first
    t[0] += 30
    assert cache.close_idle() == [os.path.realpath(image)]
    rewrite_in_place(image, make_image(tmp_path, qemu, "v2", extra=("new",)))
    with cache.use(image, 0) as fs:
        assert "/new" in {e.path for e in fs.listdir("/")}
    assert len(opened) == 3 and cache.stamp(image) != first
    # a use restarts the idle time
    t[0] += 20
    with cache.use(image, 0):
        pass
    t[0] += 20
    assert cache.close_idle() == [] and len(cache) == 1
    cache.idle = 10                                   # configurable
    assert cache.close_idle() == [os.path.realpath(image)]


def test_a_listing_carries_the_stamp_of_what_it_read(image, tmp_path, qemu):
    res = tasks.list_job(image, 0, "/").fn(lambda d, t: None)
    assert res["stamp"] == volumes.stamp(image) != ()
    volumes.close_idle(volumes.clock() + volumes.idle)
    rewrite_in_place(image, make_image(tmp_path, qemu, "v2", extra=("new",)))
    res2 = tasks.list_job(image, 0, "/").fn(lambda d, t: None)
    assert res2["stamp"] != res["stamp"]
    assert "/new" in {e.path for e in res2["entries"]}
