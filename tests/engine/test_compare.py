"""vd.compare: qemu-img compare's rules, at a cost that follows the data, not the virtual size."""
from __future__ import annotations

import pytest

from vdgui.vd import Disk, OpenFlags, compare, compare_disks

MiB = 1 << 20


def _img(path, size, writes=(), fmt="QCOW2"):
    with Disk() as d:
        d.create_base(str(path), size, fmt)
        for off, data in writes:
            d.write(off, data)
    return str(path)


def test_identical_different_and_size_rules(tmp_path):
    a = _img(tmp_path / "a.qcow2", 8 * MiB, [(3 * MiB, b"\x11" * 4096)])
    b = _img(tmp_path / "b.vdi", 8 * MiB, [(3 * MiB, b"\x11" * 4096)], "VDI")
    assert compare(a, b).identical
    c = _img(tmp_path / "c.vdi", 8 * MiB, [(3 * MiB, b"\x11" * 4000 + b"\x12" * 96)], "VDI")
    r = compare(a, c)
    assert not r.identical and r.offset == 3 * MiB + 4000
    # larger, zero past the smaller end: identical with a size mismatch
    d = _img(tmp_path / "d.qcow2", 16 * MiB, [(3 * MiB, b"\x11" * 4096)])
    r = compare(a, d)
    assert r.identical and r.size_mismatch and r.sizes == (8 * MiB, 16 * MiB)
    e = _img(tmp_path / "e.qcow2", 16 * MiB, [(3 * MiB, b"\x11" * 4096), (12 * MiB + 5, b"\x01")])
    r = compare(e, a)
    assert not r.identical and r.offset == 12 * MiB + 5


def test_cost_follows_the_data_not_the_virtual_size(tmp_path, monkeypatch):
    """Two almost empty 1 TiB images: only the held ranges are read, and progress counts them."""
    a = _img(tmp_path / "a.qcow2", 1 << 40, [(5 << 30, b"\x42" * 65536)])
    b = _img(tmp_path / "b.qcow2", 1 << 40, [(5 << 30, b"\x42" * 65536)])
    read = []
    orig = Disk.read

    def counting(self, off, n):
        read.append(n)
        return orig(self, off, n)
    monkeypatch.setattr(Disk, "read", counting)
    seen = []
    with Disk.open_chain(a, None, OpenFlags.READ_ONLY) as da, \
            Disk.open_chain(b, None, OpenFlags.READ_ONLY) as db:
        r = compare_disks(da, db, lambda done, total: seen.append((done, total)))
    assert r.identical
    assert sum(read) <= 4 * 65536                  # the cluster each holds, not a terabyte
    assert seen[-1][0] == seen[-1][1] <= 2 * 65536  # progress in bytes actually compared


@pytest.mark.parametrize("first", ["a", "b"])
def test_cli_messages_unchanged(tmp_path, first):
    from tests.conftest import run_cli
    a = _img(tmp_path / "a.qcow2", 8 * MiB, [(MiB, b"\x01" * 512)])
    b = _img(tmp_path / "b.qcow2", 8 * MiB, [(MiB, b"\x01" * 511 + b"\x02")])
    x, y = (a, b) if first == "a" else (b, a)
    r = run_cli("compare", x, y, check=False)
    assert r.returncode == 1 and r.stdout.strip() == f"Content mismatch at offset {MiB + 511}!"
    r = run_cli("compare", a, a, check=False)
    assert r.returncode == 0 and r.stdout.strip() == "Images are identical."
