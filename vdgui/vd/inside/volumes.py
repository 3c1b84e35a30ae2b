"""Opened volumes kept between listings (issue #15). The app lists one folder at a time; each
listing opened the chain, read the partition table and opened the file system again (~40 ms a
folder for ext4 in a QCOW2 chain). :class:`VolumeCache` keeps a few opened ``(image,
partition)`` volumes, least recently used first out. One caller uses an entry at a time (it
leaves the cache while in use); an entry is reopened when any file of its chain changed
(device, inode, size or modification time) and closed by :meth:`VolumeCache.close` (the app
calls it when the shown image changes). Entries hold the chain open read-only, with qemu's
shared locks, as long as they are kept: a VM cannot start writing the image meanwhile, so
:meth:`VolumeCache.close_idle` (the app calls it from a timer) closes the entries left unused
for ``idle`` seconds; the next use opens the chain again, and :meth:`VolumeCache.stamp` tells
the caller whether the files changed in between (its listings shown before are then stale).
"""
from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator

from ..backend import OpenFlags
from ..disk import Disk
from .filesystems import FileSystem
from .volume import open_volume

_Key = tuple[str, str | None, int, int | None]


def _stamp(files: list[str]) -> tuple:
    out = []
    for f in files:
        try:
            st = os.stat(f)
        except OSError:
            return ()
        out.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


class _Entry:
    def __init__(self, path: str, number: int, fmt: str | None, library, top: int | None,
                 opener: Callable[[], Disk] | None = None):
        self.disk = (opener() if opener is not None else
                     Disk.open_chain(path, fmt, flags=OpenFlags.READ_ONLY, library=library))
        try:
            self.files = [f for img in self.disk.images for f in img.files()]
            self.stamp = _stamp(self.files)
            self.fs: FileSystem = open_volume(self.disk, number or None, top)[1]
        except BaseException:
            self.disk.close()
            raise
        self.gen = 0
        self.used = 0.0                      # clock() when last given back

    def fresh(self) -> bool:
        return bool(self.stamp) and _stamp(self.files) == self.stamp

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.disk.close()


class VolumeCache:
    """At most ``size`` opened volumes, keyed by (real path, format, partition, chain member);
    :meth:`close_idle` closes those unused for ``idle`` seconds of ``clock``."""

    def __init__(self, size: int = 4, idle: float = 30.0,
                 clock: Callable[[], float] = time.monotonic):
        self.size = size
        self.idle = idle
        self.clock = clock
        self._lock = threading.Lock()
        self._idle: OrderedDict[_Key, _Entry] = OrderedDict()
        self._gens: dict[str, int] = {}
        self._stamps: dict[str, tuple] = {}

    @contextlib.contextmanager
    def use(self, path: str, number: int, *, format: str | None = None, library=None,
            top: int | None = None,
            opener: Callable[[], Disk] | None = None) -> Iterator[FileSystem]:
        """The file system of partition ``number`` (0: the only volume) of ``path``'s chain,
        for this caller alone until the block ends. ``opener``: opens the chain when it is not
        kept (the app's adds an encrypted chain's filter); default: read-only open_chain."""
        real = os.path.realpath(path)
        key: _Key = (real, format or None, number, top)
        with self._lock:
            e = self._idle.pop(key, None)
            gen = self._gens.get(real, 0)
        if e is not None and (e.gen != gen or not e.fresh()):
            e.close()
            e = None
        if e is None:
            e = _Entry(path, number, format or None, library, top, opener)
            e.gen = gen
        with self._lock:
            self._stamps[real] = e.stamp
        try:
            yield e.fs
        except BaseException:
            e.close()                        # a failed use may have left it in any state
            raise
        drop: list[_Entry] = []
        with self._lock:
            if e.gen != self._gens.get(real, 0):
                drop.append(e)               # closed meanwhile: not kept
            else:
                old = self._idle.pop(key, None)
                if old is not None:
                    drop.append(old)
                e.used = self.clock()
                self._idle[key] = e
                while len(self._idle) > self.size:
                    drop.append(self._idle.popitem(last=False)[1])
        for d in drop:
            d.close()

    def close(self, path: str | None = None) -> None:
        """Close the kept volumes of ``path`` (None: all); one in use is closed after its use."""
        real = os.path.realpath(path) if path is not None else None
        with self._lock:
            if real is None:
                for k in {k[0] for k in self._idle} | set(self._gens):
                    self._gens[k] = self._gens.get(k, 0) + 1
            else:
                self._gens[real] = self._gens.get(real, 0) + 1
            drop = [k for k in self._idle if real is None or k[0] == real]
            entries = [self._idle.pop(k) for k in drop]
        for e in entries:
            e.close()

    def close_idle(self, now: float | None = None) -> list[str]:
        """Close the kept volumes unused for ``idle`` seconds at ``now`` (default: clock()),
        which releases their locks; returns the real paths of the images closed."""
        now = self.clock() if now is None else now
        with self._lock:
            old = [k for k, e in self._idle.items() if now - e.used >= self.idle]
            entries = [self._idle.pop(k) for k in old]
        for e in entries:
            e.close()
        return sorted({k[0] for k in old})

    def stamp(self, path: str) -> tuple:
        """What the last use of ``path`` found its chain's files to be (device, inode, size,
        modification time of each; () before any use): a listing made under another stamp is
        stale."""
        with self._lock:
            return self._stamps.get(os.path.realpath(path), ())

    def __len__(self) -> int:
        return len(self._idle)


volumes = VolumeCache()

__all__ = ["VolumeCache", "volumes"]
