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


@pytest.fixture
def image(tmp_path, qemu):
    src = tmp_path / "src"
    for d in ("a", "b", "c"):
        (src / d).mkdir(parents=True)
        (src / d / "f.txt").write_text(d)
    raw = tmp_path / "v.raw"
    subprocess.run(["mkfs.ext4", "-q", "-d", str(src), str(raw), "8M"], check=True)
    img = tmp_path / "v.qcow2"
    qemu.img("convert", "-O", "qcow2", raw, img)
    yield str(img)
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
