"""One conformance suite every writable backend reuses by declaring only its data.

Subclass :class:`FormatConformance` in ``tests/formats/test_<fmt>.py``, set FORMAT/EXT/VARIANTS...
The expected content is modelled in memory (a bytearray) and compared byte for byte.
"""
from __future__ import annotations

import os
import random
import uuid

import pytest

from tests.conftest import read_all
from vdgui.vd import (
    Alloc,
    Cap,
    Disk,
    ImageFlags,
    ImageInUse,
    OpenFlags,
    VDError,
    get_backend,
    probe,
)


def scattered_writes(size: int, seed: int, count: int = 24):
    """(offset, data) pairs: unaligned, block-crossing, all-zero and full-block writes."""
    rnd = random.Random(seed)
    out = []
    for i in range(count):
        ln = rnd.choice([1, 511, 512, 4096, 65536, 70000, 1 << 20, 3 * (1 << 20) // 2])
        ln = min(ln, size)
        off = rnd.randrange(0, size - ln + 1)
        if i % 5 == 0:
            off -= off % 512
        fill = 0 if i % 7 == 3 else (i * 37 + seed) % 255 + 1
        out.append((off, bytes([fill]) * ln))
    out.append((size - 700, b"\xee" * 700))     # the very end
    out.append((0, b"\x01" * 100))              # the very start
    return out


class FormatConformance:
    FORMAT: str = ""
    EXT: str = ""
    SIZE: int = 5 * (1 << 20) + 512 * 7        # odd size on purpose
    VARIANTS: tuple = (ImageFlags.NONE,)
    DIFF: bool = True
    COMMENT: bool = False
    UUID: bool = True
    CREATE_CONFIG: dict | None = None

    @property
    def backend(self):
        return get_backend(self.FORMAT)

    def _path(self, tmp_path, name):
        return str(tmp_path / f"{name}.{self.EXT}")

    def _size(self):
        g = self.backend.size_granularity
        return -(-self.SIZE // g) * g

    # -----------------------------------------------------------------------------------
    def test_declarations(self):
        b = self.backend
        assert b.name == self.FORMAT
        assert self.EXT in [fe.ext for fe in b.extensions]
        assert bool(b.caps & Cap.DIFF) == self.DIFF

    def test_create_write_reopen(self, tmp_path, variant):
        vi = self.VARIANTS.index(variant)
        size = self._size()
        path = self._path(tmp_path, f"base{vi}")
        expect = bytearray(size)
        with Disk() as d:
            d.create_base(path, size, self.FORMAT, flags=variant, config=self.CREATE_CONFIG)
            assert d.size >= size
            if d.size > size:
                expect += bytes(d.size - size)
            for off, data in scattered_writes(size, seed=vi):
                d.write(off, data)
                expect[off:off + len(data)] = data
            assert read_all(d) == bytes(expect)
            d.flush()
        assert os.listdir(tmp_path) and not [n for n in os.listdir(tmp_path) if "vdgui-tmp" in n]
        assert probe(path).name == self.FORMAT
        with Disk() as d:
            d.open(path, flags=OpenFlags.READ_ONLY)
            assert read_all(d) == bytes(expect)
            info = d.info()
            assert info["format"] == self.FORMAT
            assert info["virtual_size"] == len(expect)

    def test_unwritten_is_unallocated(self, tmp_path):
        size = self._size()
        path = self._path(tmp_path, "sparse")
        with Disk() as d:
            d.create_base(path, size, self.FORMAT, config=self.CREATE_CONFIG)
            d.write(1 << 20, b"\x55" * 4096)
            ext = d.allocation()
            data_runs = [e for e in ext if e.status == Alloc.DATA]
            assert data_runs, ext
            assert all(e.start <= (1 << 20) and e.end >= (1 << 20) + 4096 for e in data_runs)
            assert sum(e.length for e in ext) == d.size
            assert any(e.status == Alloc.UNALLOCATED for e in ext)

    def test_diff_chain(self, tmp_path):
        if not self.DIFF:
            pytest.skip(f"{self.FORMAT} has no differencing images")
        size = self._size()
        paths = [self._path(tmp_path, n) for n in ("base", "snap1", "snap2", "snap3")]
        expect = bytearray(size)
        snapshots = []
        with Disk() as d:
            d.create_base(paths[0], size, self.FORMAT, config=self.CREATE_CONFIG)
            expect = bytearray(d.size)
            for level, p in enumerate(paths):
                if level:
                    d.create_diff(p)
                for off, data in scattered_writes(size, seed=10 + level, count=8):
                    d.write(off, data)
                    expect[off:off + len(data)] = data
                snapshots.append(bytes(expect))
            for level in range(len(paths)):
                assert d.read(0, d.size, top=level) == snapshots[level], f"level {level}"
        with Disk.open_chain(paths[-1], flags=OpenFlags.READ_ONLY) as d:
            assert len(d) == 4
            locations = [os.path.abspath(i.location) for i in d.images]
            assert locations == [os.path.abspath(p) for p in paths]
            assert read_all(d) == snapshots[-1]
            if self.UUID:
                for lower, upper in zip(d.images, d.images[1:]):
                    assert upper.parent_uuid == lower.uuid
        with Disk() as d:  # a diff opened over the wrong parent is refused
            d.open(paths[0], flags=OpenFlags.READ_ONLY)
            d.open(paths[1], flags=OpenFlags.READ_ONLY)
            with pytest.raises(VDError):
                d.open(paths[3], flags=OpenFlags.READ_ONLY)

    def test_metadata_persists(self, tmp_path):
        path = self._path(tmp_path, "meta")
        u = uuid.uuid4()
        with Disk() as d:
            d.create_base(
                path,
                self._size(),
                self.FORMAT,
                uuid=u if self.UUID else None,
                comment="hello" if self.COMMENT else None,
                config=self.CREATE_CONFIG,
            )
        with Disk() as d:
            img = d.open(path)
            if self.UUID:
                assert img.uuid == u
                u2 = uuid.uuid4()
                d.set_uuid(0, u2)
            if self.COMMENT:
                assert img.comment == "hello"
                d.set_comment(0, "changed comment")
        with Disk() as d:
            img = d.open(path, flags=OpenFlags.READ_ONLY)
            if self.UUID:
                assert img.uuid == u2
            if self.COMMENT:
                assert img.comment == "changed comment"

    def test_second_writer_refused_readers_coexist(self, tmp_path):
        path = self._path(tmp_path, "lock")
        with Disk() as d:
            d.create_base(path, self._size(), self.FORMAT, config=self.CREATE_CONFIG)
            with pytest.raises(ImageInUse):
                Disk().open(path)
            with Disk() as r1, Disk() as r2:
                r1.open(path, flags=OpenFlags.READ_ONLY)
                r2.open(path, flags=OpenFlags.READ_ONLY)

    def test_truncated_and_corrupted_headers_give_vderror(self, tmp_path):
        path = self._path(tmp_path, "victim")
        with Disk() as d:
            d.create_base(path, self._size(), self.FORMAT, config=self.CREATE_CONFIG)
            for off, data in scattered_writes(self._size(), seed=3, count=6):
                d.write(off, data)
        with open(path, "rb") as f:
            original = f.read()
        bad = str(tmp_path / f"bad.{self.EXT}")
        rnd = random.Random(1234)
        cases = [original[:n] for n in (0, 1, 64, 511, 512, 1024, len(original) // 2)]
        for _ in range(150):
            b = bytearray(original)
            for _ in range(rnd.choice([1, 2, 8])):
                i = rnd.randrange(0, min(len(b), 4096))
                b[i] = rnd.randrange(256)
            cases.append(bytes(b))
        for case in cases:
            with open(bad, "wb") as f:
                f.write(case)
            try:
                with Disk() as d:
                    d.open(bad, self.FORMAT, flags=OpenFlags.READ_ONLY)
                    read_all(d, chunk=1 << 20)
            except VDError:
                pass
