"""give_new_uuid over every format with UUIDs and differencing images: the image gets a new UUID,
its children are relinked and read the same, the byte copy it duplicated keeps the old one."""
from __future__ import annotations

import shutil

import pytest

from vdgui.vd import (
    Cap,
    Disk,
    Library,
    OpenFlags,
    Operation,
    backends,
    give_new_uuid,
    mark_duplicates,
)

MiB = 1 << 20
FORMATS = [b for b in backends() if b.caps & Cap.UUID and b.caps & Cap.DIFF and b.caps & Cap.FILE
           and b.can(Operation.RELINK) and b.can(Operation.CREATE)]


@pytest.mark.parametrize("backend", FORMATS, ids=[b.name for b in FORMATS])
def test_new_uuid_relinks_children(tmp_path, backend):
    ext = backend.default_extension()
    base, child = str(tmp_path / f"base.{ext}"), str(tmp_path / f"child.{ext}")
    (tmp_path / "copy").mkdir()
    twin = str(tmp_path / "copy" / f"base.{ext}")
    with Disk() as d:
        d.create_base(base, 4 * MiB, backend)
        d.write(0, b"\x11" * MiB)
        d.create_diff(child)
        d.write(MiB, b"\x22" * MiB)
    shutil.copyfile(base, twin)
    with Disk.open_chain(child, flags=OpenFlags.READ_ONLY) as d:
        content = d.read(0, d.size)
        old = d.image(0).uuid
    lib = Library(":memory:")
    try:
        recs = lib.add_with_parents(child) + lib.add_with_parents(twin)
        mark_duplicates(recs, lib)
        assert {r.path: r.duplicates for r in recs}[base] == [twin]
        new = give_new_uuid(base, children=[child])
        with Disk.open_chain(child, flags=OpenFlags.READ_ONLY) as d:
            assert d.image(0).uuid == new != old
            assert d.image(0).location == base
            assert d.read(0, d.size) == content
        with Disk.open_chain(twin, flags=OpenFlags.READ_ONLY) as d:
            assert d.image(0).uuid == old
        recs = lib.scan_all()
        assert all(r.duplicates == [] for r in recs), [(r.path, r.duplicates) for r in recs]
    finally:
        lib.close()
