"""QCOW2 writes reuse the clusters that zeroes freed, overwrite clusters the image holds alone
in place with one write, and never put new data into a freed cluster before a sync made its
release durable (issue #18 goal 2: merge as fast as ``qemu-img commit``)."""
from __future__ import annotations

import os

from vdgui.vd import Disk, OpenFlags, merge

MiB = 1 << 20
CS = 65536


def _zero(o, n):
    return bytes(n)


def test_merge_reuses_the_clusters_zeroes_free(qemu, tmp_path):
    """A child whose zero clusters cover base data and whose data lies elsewhere: the data goes
    into the clusters the zeroes freed, so the base file does not grow (as qemu-img commit)."""
    base, child = str(tmp_path / "base.qcow2"), str(tmp_path / "child.qcow2")
    qemu.img("create", "-f", "qcow2", base, "64M")
    qemu.io("-f", "qcow2", "-c", "write -P 0x11 0 32M", base)
    qemu.img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", child)
    qemu.io("-f", "qcow2", "-c", "write -z 0 24M", "-c", "write -P 0x22 32M 24M",
            "-c", "write -P 0x33 24M 4M", child)
    want = str(tmp_path / "want.raw")
    qemu.img("convert", "-f", "qcow2", "-O", "raw", child, want)
    before = os.path.getsize(base)

    merge(child, base)

    assert qemu.compare(base, want, "qcow2", "raw").returncode == 0
    r = qemu.check(base, "qcow2")
    assert r.returncode == 0, r.stdout + r.stderr          # no leaks either
    # 24 MiB of new data, 24 MiB freed: the file stays (it grew by 24 MiB before)
    assert os.path.getsize(base) <= before + MiB, (before, os.path.getsize(base))


def _traced(img):
    """Log the file's writes and syncs of ``img`` in order: ("w", offset, length) / ("sync",)."""
    log = []
    f = img.f
    pwrite, sync = f.pwrite, f.sync

    def traced_pwrite(off, data):
        log.append(("w", off, memoryview(data).nbytes))
        return pwrite(off, data)

    def traced_sync():
        log.append(("sync",))
        return sync()
    f.pwrite, f.sync = traced_pwrite, traced_sync
    return log


def _hosts(img, offset, length):
    """Host clusters of the data clusters of [offset, offset+length)."""
    return {img._entry(ci)[0] & ((1 << 56) - 1) & ~(CS - 1)
            for ci in range(offset // CS, (offset + length) // CS)}


def test_freed_clusters_are_reused_only_after_a_sync(qemu, tmp_path):
    path = str(tmp_path / "a.qcow2")
    qemu.img("create", "-f", "qcow2", path, "64M")
    qemu.io("-f", "qcow2", "-c", "write -P 0x11 0 24M", path)
    with Disk() as d:
        d.open(path, "QCOW2", OpenFlags.NORMAL)
        img = d.top
        freed = _hosts(img, 0, 20 * MiB)
        log = _traced(img)
        img.write_zeroes(0, 20 * MiB, _zero)
        zeroed = len(log)
        img.write(32 * MiB, b"\x44" * (20 * MiB), _zero)
        new = _hosts(img, 32 * MiB, 20 * MiB)
        assert new <= freed, "the new data did not go into the freed clusters"
        first = min(i for i, e in enumerate(log) if e[0] == "w" and i >= zeroed
                    and any(h <= e[1] < h + CS for h in freed))
        assert ("sync",) in log[zeroed:first], "a freed cluster was written before a sync"
        assert log.count(("sync",)) == 1
    assert qemu.check(path, "qcow2").returncode == 0
    r = qemu.io("-f", "qcow2", "-c", "read -P 0 0 20M", "-c", "read -P 0x44 32M 20M",
                "-c", "read -P 0x11 20M 4M", path)
    assert "Pattern verification failed" not in r.stdout


def test_a_few_freed_clusters_wait_for_the_next_flush(qemu, tmp_path):
    """2 MiB freed (a sync mid-write is made for 16 MiB or more): no sync in the middle of the
    writes (the data is appended), and the clusters are reused after the next flush."""
    path = str(tmp_path / "a.qcow2")
    qemu.img("create", "-f", "qcow2", path, "64M")
    qemu.io("-f", "qcow2", "-c", "write -P 0x11 0 8M", path)
    with Disk() as d:
        d.open(path, "QCOW2", OpenFlags.NORMAL)
        img = d.top
        freed = _hosts(img, 0, 2 * MiB)
        log = _traced(img)
        img.write_zeroes(0, 2 * MiB, _zero)
        img.write(32 * MiB, b"\x44" * (2 * MiB), _zero)
        assert ("sync",) not in log
        assert not _hosts(img, 32 * MiB, 2 * MiB) & freed
        img.flush()
        img.write(40 * MiB, b"\x55" * (2 * MiB), _zero)
        assert _hosts(img, 40 * MiB, 2 * MiB) == freed
    assert qemu.check(path, "qcow2").returncode == 0
    r = qemu.io("-f", "qcow2", "-c", "read -P 0 0 2M", "-c", "read -P 0x44 32M 2M",
                "-c", "read -P 0x55 40M 2M", "-c", "read -P 0x11 2M 6M", path)
    assert "Pattern verification failed" not in r.stdout


def test_writes_over_held_clusters_and_zeroes_are_batched(qemu, tmp_path):
    """Overwriting 64 clusters the image holds alone is one data write in place; zeroing them
    drops the references with one refcount write (one refcount block)."""
    path = str(tmp_path / "a.qcow2")
    qemu.img("create", "-f", "qcow2", path, "64M")
    qemu.io("-f", "qcow2", "-c", "write -P 0x11 0 8M", path)
    size = os.path.getsize(path)
    with Disk() as d:
        d.open(path, "QCOW2", OpenFlags.NORMAL)
        img = d.top
        log = _traced(img)
        img.write(0, b"\x66" * (64 * CS), _zero)
        assert [e for e in log if e[0] == "w"] == [("w", _hosts(img, 0, CS).pop(), 64 * CS)]
        del log[:]
        img.write_zeroes(4 * MiB, 4 * MiB, _zero)
        writes = [e for e in log if e[0] == "w"]
        assert len(writes) == 2, writes                        # the L2 entries, the refcounts
    assert os.path.getsize(path) == size
    assert qemu.check(path, "qcow2").returncode == 0
    r = qemu.io("-f", "qcow2", "-c", "read -P 0x66 0 4M", "-c", "read -P 0 4M 4M", path)
    assert "Pattern verification failed" not in r.stdout


def test_compact_after_reuse_in_one_open(qemu, tmp_path):
    """Freed, partly reused, then compacted in the same open: the pool is dropped before
    clusters move; the image checks clean and reads the same."""
    path = str(tmp_path / "a.qcow2")
    qemu.img("create", "-f", "qcow2", path, "64M")
    qemu.io("-f", "qcow2", "-c", "write -P 0x11 0 40M", path)
    with Disk() as d:
        d.open(path, "QCOW2", OpenFlags.NORMAL)
        img = d.top
        img.write_zeroes(0, 30 * MiB, _zero)
        img.write(48 * MiB, b"\x77" * (10 * MiB), _zero)
        img.compact()
    assert qemu.check(path, "qcow2").returncode == 0
    r = qemu.io("-f", "qcow2", "-c", "read -P 0 0 30M", "-c", "read -P 0x11 30M 10M",
                "-c", "read -P 0x77 48M 10M", "-c", "read -P 0 58M 6M", path)
    assert "Pattern verification failed" not in r.stdout
    assert os.path.getsize(path) < 22 * MiB
