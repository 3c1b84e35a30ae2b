"""Read-only file systems over a volume, through libraries (never hand-written parsers):
dissect.extfs (ext2/3/4), dissect.fat (FAT12/16/32 with long names; exFAT), dissect.ntfs (NTFS),
pycdlib (ISO9660 with Joliet and Rock Ridge). See docs/inside.md for the comparison.

Every library error becomes a CorruptImage naming the volume and the path; nothing reads a whole
file into memory (open() returns a stream).
"""
from __future__ import annotations

import io
import posixpath
import stat as statmod
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ..errors import CorruptImage, ImageNotFound, InvalidArgument, NotSupported, VDError


@dataclass
class Entry:
    path: str                   # absolute within the volume
    type: str                   # "file", "dir", "symlink", "other"
    size: int
    mtime: float | None         # seconds since the epoch (UTC)
    atime: float | None = None
    target: str = ""            # symlink target

    def as_dict(self) -> dict:
        return {"path": self.path, "type": self.type, "size": self.size, "mtime": self.mtime,
                "target": self.target}


def _ts(dt) -> float | None:
    if dt is None:
        return None
    if isinstance(dt, datetime):
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=UTC)
        return dt.timestamp()
    return float(dt)


def _short(path: str) -> str:
    return path if len(path) <= 160 else path[:70] + " ... " + path[-70:]


def _norm(path: str) -> str:
    p = posixpath.normpath("/" + path.replace("\\", "/").lstrip("/"))
    return "/" + p.lstrip("/")


class FileSystem:
    kind = ""
    fs: Any          # the library's file-system object, set by the subclasses that use one

    def __init__(self, fh, name: str) -> None:
        self.fh, self.name = fh, name

    # subclasses: _node(path) -> node, _entry(path, node) -> Entry, _children(node) ->
    # [(name, node)], _open(node) -> stream, allocation(node) -> [(offset, length)]
    def _node(self, path: str) -> Any:
        raise NotImplementedError

    def _entry(self, path: str, node: Any) -> Entry:
        raise NotImplementedError

    def _children(self, node: Any) -> Iterable[tuple[str, Any]]:
        raise NotImplementedError

    def _open(self, node: Any) -> Any:
        raise NotImplementedError
    def _fail(self, path, exc) -> VDError:
        if isinstance(exc, VDError):
            return exc
        if isinstance(exc, (FileNotFoundError, KeyError)) or "not found" in str(exc).lower():
            return ImageNotFound(f"{self.name}: {_short(path)}: no such file or folder")
        return CorruptImage(f"{self.name}: {self.kind} volume: cannot read {_short(path)}: "
                            f"{type(exc).__name__}: {exc}")

    def stat(self, path: str) -> Entry:
        path = _norm(path)
        try:
            return self._entry(path, self._node(path))
        except Exception as e:
            raise self._fail(path, e) from None

    def listdir(self, path: str) -> list[Entry]:
        path = _norm(path)
        try:
            node = self._node(path)
            if self._entry(path, node).type != "dir":
                raise InvalidArgument(f"{self.name}: {path} is not a folder")
            out = [self._entry(posixpath.join(path, n), c) for n, c in self._children(node)
                   if n not in (".", "..")]
        except Exception as e:
            raise self._fail(path, e) from None
        return sorted(out, key=lambda e: e.path)

    def _key(self, node):
        """A folder's identity (inode, first cluster, ...) to stop at loops; None: unknown."""
        return None

    def walk(self, path: str):
        """Every entry below ``path`` (depth first, sorted). A folder that contains itself (a
        damaged file system; hard-linked folders) is a CorruptImage, not endless recursion."""
        path = _norm(path)
        try:
            root = self._node(path)
        except Exception as e:
            raise self._fail(path, e) from None
        stack: list[tuple[str, Any, tuple[Any, ...]]] = [(path, root, (self._key(root),))]
        while stack:
            dpath, node, ancestors = stack.pop()
            try:
                kids = sorted(((posixpath.join(dpath, n), c) for n, c in self._children(node)
                               if n not in (".", "..")), key=lambda t: t[0])
                entries = [(self._entry(p, c), c) for p, c in kids]
            except VDError:
                raise
            except Exception as e:
                raise self._fail(dpath, e) from None
            subdirs = []
            for ent, c in entries:
                yield ent
                if ent.type == "dir":
                    key = self._key(c)
                    if key is not None and key in ancestors:
                        raise CorruptImage(f"{self.name}: {self.kind} volume: folder "
                                           f"{_short(ent.path)} contains itself (a loop in the "
                                           "file system)")
                    if len(ancestors) > 512:
                        raise CorruptImage(f"{self.name}: {self.kind} volume: folders nested "
                                           f"more than 512 deep at {_short(ent.path)}")
                    subdirs.append((ent.path, c, ancestors + (key,)))
            stack.extend(reversed(subdirs))

    def open(self, path: str):
        path = _norm(path)
        try:
            node = self._node(path)
            e = self._entry(path, node)
            if e.type != "file":
                raise InvalidArgument(f"{self.name}: {path} is a {e.type}, not a file")
            return _Guard(_direct(self._open(node)), self, path)
        except Exception as e:
            raise self._fail(path, e) from None


def _direct(stream):
    """A plain dissect RunlistStream over our partition is replaced by a _RunReader over the same
    runs (the library's own runlist), which reads straight into the caller's buffer; any other
    stream (inline data, compressed runs, ...) is returned unchanged."""
    from dissect.util.stream import RangeStream, RunlistStream

    from .diskfile import SliceFile
    if type(stream) is not RunlistStream:
        return stream
    fh, base = stream._fh, 0
    if type(fh) is RangeStream:          # FAT: runs relative to the data area
        fh, base = fh._fh, fh.offset
    raw = getattr(fh, "raw", None)
    if not isinstance(fh, io.BufferedReader) or not isinstance(raw, SliceFile):
        return stream
    return _RunReader(raw, base, stream.runlist, stream.size, stream.block_size)


class _RunReader(io.RawIOBase):
    """A file's bytes from ``(block or None, count)`` runs of ``block_size`` on ``src`` (a
    SliceFile) from byte ``base``; None runs read as zeroes; short when the runs end early."""

    def __init__(self, src, base: int, runs, size: int, block_size: int) -> None:
        super().__init__()
        self._src, self._base, self._size, self._bs = src, base, size, block_size
        self._runs, self._starts = [], []
        pos = 0
        for blk, count in runs:
            self._starts.append(pos)
            self._runs.append((blk, count * block_size))
            pos += count * block_size
        self._pos = 0
        self.size = size

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self._pos

    def seek(self, offset, whence=io.SEEK_SET):
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, b) -> int:
        from bisect import bisect_right
        out = memoryview(b).cast("B")
        want = max(0, min(len(out), self._size - self._pos))
        done = 0
        i = bisect_right(self._starts, self._pos) - 1
        while done < want and 0 <= i < len(self._runs):
            blk, length = self._runs[i]
            inner = self._pos - self._starts[i]
            n = min(length - inner, want - done)
            if n <= 0:
                break
            piece = out[done:done + n]
            if blk is None:
                piece[:] = bytes(n)
            elif self._src.pread_into(self._base + blk * self._bs + inner, piece) != n:
                raise CorruptImage(f"a file's data lies past the end of its volume (block {blk})")
            done += n
            self._pos += n
            i += 1
        return done


class _Guard(io.RawIOBase):
    """A library stream whose errors become VDErrors."""

    def __init__(self, inner, fs, path) -> None:
        super().__init__()
        self._inner, self._fs, self._path = inner, fs, path

    def readable(self):
        return True

    def readinto(self, b):
        try:
            into = getattr(self._inner, "readinto", None)
            if into is not None:
                return into(b) or 0
            data = self._inner.read(len(b))
        except Exception as e:
            raise self._fs._fail(self._path, e) from None
        b[:len(data)] = data
        return len(data)


class ExtVolume(FileSystem):
    kind = "ext"

    def __init__(self, fh, name):
        super().__init__(fh, name)
        from dissect.extfs import ExtFS
        try:
            self.fs = ExtFS(fh)
        except Exception as e:
            raise CorruptImage(f"{name}: not a readable ext2/3/4 volume: {e}") from None

    def _node(self, path):
        return self.fs.root if path == "/" else self.fs.get(path)

    def _entry(self, path, n):
        ft = n.filetype
        typ = {statmod.S_IFREG: "file", statmod.S_IFDIR: "dir",
               statmod.S_IFLNK: "symlink"}.get(ft, "other")
        return Entry(path, typ, n.size if typ != "dir" else 0, n.mtime_ns / 1e9,
                     n.atime_ns / 1e9, n.link if typ == "symlink" else "")

    def _children(self, n):
        return [(c.filename, c) for c in n.iterdir()]

    def _key(self, n):
        return n.inum

    def _open(self, n):
        return n.open()

    def allocation(self, path):
        n = self._node(_norm(path))
        bs = self.fs.block_size
        out, pos = [], 0
        for blk, count in n.dataruns():
            if blk is not None:
                out.append((blk * bs, count * bs))
            pos += count
        return out


class FatVolume(FileSystem):
    kind = "fat"

    def __init__(self, fh, name):
        super().__init__(fh, name)
        from dissect.fat import FATFS
        try:
            self.fs = FATFS(fh)
        except Exception as e:
            raise CorruptImage(f"{name}: not a readable FAT volume: {e}") from None

    def _entry(self, path, n):
        typ = "dir" if n.is_directory() else "file"
        return Entry(path, typ, 0 if typ == "dir" else n.size, _ts(n.mtime), _ts(n.atime))

    def _children(self, n):
        return [(self._name(c), self._fix_runs(c)) for c in self._fix_runs(n).iterdir()
                if not c.is_volume_id()]

    def _key(self, n):
        return n.cluster or None

    @staticmethod
    def _name(c) -> str:
        """The library ignores the case bits Windows NT (and mtools, Linux) keep for 8.3 names
        without a long name: apply them (0x08 lower-case base, 0x10 lower-case extension)."""
        if c.name != c.short_name:
            return c.name
        flags = c.dirent.DIR_NTRes
        base, dot, ext = c.name.partition(".")
        return (base.lower() if flags & 0x08 else base) + dot + \
            (ext.lower() if flags & 0x10 else ext)

    def _node(self, path):
        if path == "/":
            return self.fs.get("/")
        node = self.fs.get("/")
        for part in path.strip("/").split("/"):
            for c in self._fix_runs(node).iterdir():
                if not c.is_volume_id() and (self._name(c) == part or
                                             c.name.lower() == part.lower()):
                    node = self._fix_runs(c)
                    break
            else:
                raise FileNotFoundError(path)
        return node

    def _open(self, n):
        return n.open()

    def allocation(self, path):
        n = self._node(_norm(path))
        fs = self.fs
        base = fs.first_data_sector * fs.sector_size
        return [(base + first * fs.cluster_size, count * fs.cluster_size)
                for first, count in n.dataruns()]

    @staticmethod
    def _fix_runs(n):
        """dissect.fat 3.13's FAT.runlist merges a cluster two below the run's end into the run
        (it compares a raw cluster number with a data-area index), so a chain that steps
        backwards reads the wrong clusters. Give every node the runlist of its real chain."""
        if getattr(n, "_vd_runs", False) or n.cluster in (None, 0):
            return n
        runs: list = []
        for cl in n.fs.fat.chain(n.cluster):
            idx = cl - 2
            if runs and runs[-1][0] + runs[-1][1] == idx:
                runs[-1][1] += 1
            else:
                runs.append([idx, 1])
        n._runlist = [tuple(r) for r in runs]
        n._vd_runs = True
        return n

def _exfat_time(ts: int, centis: int, tz: int) -> float | None:
    """An exFAT timestamp (MS-DOS date and time, 10 ms increments, UTC offset in 15 minutes
    when bit 7 of ``tz`` is set; local time of an unknown zone otherwise, taken as UTC)."""
    try:
        dt = datetime(1980 + (ts >> 25), (ts >> 21) & 0xF, (ts >> 16) & 0x1F, (ts >> 11) & 0x1F,
                      (ts >> 5) & 0x3F, (ts & 0x1F) * 2, tzinfo=UTC)
    except ValueError:
        return None
    t = dt.timestamp() + min(centis, 199) / 100
    if tz & 0x80:
        off = tz & 0x7F
        t -= (off - 0x80 if off & 0x40 else off) * 15 * 60
    return t


def _exfat_class():
    from collections.abc import Mapping

    from dissect.fat import exfat as lib
    from dissect.util.stream import RangeStream

    class _Lazy(Mapping):
        """A folder's entries, parsed on first use."""

        def __init__(self, parse) -> None:
            self._parse, self._d = parse, None

        def _get(self):
            if self._d is None:
                self._d = self._parse()
            return self._d

        def __getitem__(self, key):
            return self._get()[key]

        def __iter__(self):
            return iter(self._get())

        def __len__(self):
            return len(self._get())

    class _Root(lib.RootDirectory):
        def _parse_subdir(self, entry):
            return _Lazy(lambda: lib.RootDirectory._parse_subdir(self, entry))

    class _ExFAT(lib.ExFAT):
        """dissect.fat 3.13's ExFAT, reading a folder when it is first listed (the library
        parses the whole tree when the volume opens: 1.3 s for 10,000 files, and damage in any
        folder made the whole volume unreadable), with two fixes: a contiguous (NoFatChain)
        folder larger than one cluster was read as its first cluster only, and a cluster chain
        that loops (damage) was followed forever."""

        def __init__(self, fh):             # the library's, with the lazy root folder
            self.filesystem = fh
            fh.seek(0)
            self.vbr = lib.c_exfat.EXFAT_HEADER(fh.read(512))
            self.fs_name = self.vbr.fs_name
            if self.fs_name != b"EXFAT   ":
                raise lib.InvalidHeaderMagic("Invalid exFAT header magic")
            self.sector_size = 2 ** self.vbr.bytes_per_sector_exp
            self.cluster_size = self.sector_size * 2 ** self.vbr.sectors_per_cluster_exp
            self.fat_sector = self.vbr.fat_sector
            self.fat_sector_count = self.vbr.fat_sector_count
            self.fat_size = self.fat_sector_count * self.sector_size
            self.fat = RangeStream(fh, self.fat_sector * self.sector_size, self.fat_size)
            self.cluster_heap_sector = self.vbr.cluster_heap_sector
            self.cluster_count = self.vbr.cluster_heap_count
            self.root_dir_cluster = self.vbr.root_dir_cluster
            self.root_dir_sector = self.cluster_to_sector(self.root_dir_cluster)
            self.root_directory = _Root(fh, self.root_dir_cluster, self)
            self.files = self.root_directory.dict
            self.alloc_bitmap = self.root_directory.bitmap_entry
            self.upcase_table = self.root_directory.upcase_entry
            vol = self.root_directory.volume_entry
            self.volume_label = vol.volume_label.strip("\x00") if vol is not None else ""

        def runlist(self, starting_cluster, not_fragmented=True, size=None):
            if not_fragmented and not size:       # a folder: its stream is cut at its length
                n = self.cluster_count + 2 - starting_cluster
                if starting_cluster < 2 or n <= 0:
                    raise ValueError(f"cluster {starting_cluster} lies outside the volume")
                return [(self.cluster_to_sector(starting_cluster),
                         n * 2 ** self.vbr.sectors_per_cluster_exp)]
            return super().runlist(starting_cluster, not_fragmented, size)

        def get_cluster_chain(self, starting_cluster):
            chain: list[int] = []
            cur = starting_cluster
            while cur != lib.EOC:
                if not 2 <= cur < self.cluster_count + 2:
                    raise ValueError(f"a cluster chain names cluster {cur:#x}, outside the "
                                     f"volume's {self.cluster_count} clusters")
                if len(chain) > self.cluster_count:
                    raise ValueError(f"the cluster chain from {starting_cluster} loops")
                chain.append(cur)
                self.fat.seek(cur * 4)
                cur = int.from_bytes(self.fat.read(4), "little")
            return chain

    return _ExFAT


class _Pread:
    """pread_into over a seekable file (when the volume is not a SliceFile)."""

    def __init__(self, fh) -> None:
        self.fh = fh

    def pread_into(self, offset: int, out) -> int:
        self.fh.seek(offset)
        return self.fh.readinto(out) or 0


class ExfatVolume(FileSystem):
    """exFAT through dissect.fat's ExFAT (folders read when first listed). Nodes are the
    library's (FILE entry set, children or None) pairs."""
    kind = "exfat"

    def __init__(self, fh, name):
        super().__init__(fh, name)
        try:
            self.fs = _exfat_class()(fh)
        except Exception as e:
            raise CorruptImage(f"{name}: not a readable exFAT volume: {type(e).__name__}: "
                               f"{e}") from None
        self.heap = self.fs.cluster_heap_sector * self.fs.sector_size
        self._index: dict[int, dict] = {}          # a folder's children by name
        raw = getattr(fh, "raw", None)
        self._src = raw if hasattr(raw, "pread_into") else _Pread(fh)

    @staticmethod
    def _name(f) -> str:
        return "".join(e.filename for e in f.fn_entries
                       if e.entry_type == 0xC1)[:f.stream.filename_length]

    def _node(self, path):
        node = self.fs.files["/"]
        for part in [p for p in path.split("/") if p]:
            kids = node[1]
            if kids is None:
                raise FileNotFoundError(path)
            index = self._index.get(id(kids))
            if index is None:                      # exFAT compares names case-blind
                index = self._index[id(kids)] = {}
                for c in kids.values():
                    name = self._name(c[0])
                    index.setdefault(name, c)
                    index.setdefault(name.upper(), c)
            node = index.get(part) or index.get(part.upper())
            if node is None:
                raise FileNotFoundError(path)
        return node

    def _entry(self, path, n):
        f, kids = n
        typ = "dir" if kids is not None else "file"
        m = f.metadata
        return Entry(path, typ, 0 if typ == "dir" else f.stream.data_length,
                     _exfat_time(m.modified_time, m.modified_offset, m.modified_timezone),
                     _exfat_time(m.access_time, 0, m.access_timezone))

    def _children(self, n):
        return [(self._name(c[0]), c) for c in (n[1] or {}).values()]

    def _key(self, n):
        return n[0].stream.location or None

    def runs(self, first: int, length: int, contiguous: bool) -> list[tuple[int, int]]:
        """(byte offset in the volume, length) of the clusters holding ``length`` bytes from
        cluster ``first`` (``contiguous``: NoFatChain; else the FAT's chain)."""
        cs = self.fs.cluster_size
        need = -(-length // cs)
        if not need:
            return []
        if contiguous:
            if first < 2 or first + need > self.fs.cluster_count + 2:
                raise CorruptImage(f"{self.name}: exFAT clusters {first}..{first + need - 1} "
                                   f"lie outside the volume's {self.fs.cluster_count}")
            return [(self.heap + (first - 2) * cs, need * cs)]
        chain = self.fs.get_cluster_chain(first)
        if len(chain) < need:
            raise CorruptImage(f"{self.name}: an exFAT cluster chain ends after {len(chain)} "
                               f"clusters, {need} are needed for {length} bytes")
        out: list[list[int]] = []
        for c in chain[:need]:
            off = self.heap + (c - 2) * cs
            if out and out[-1][0] + out[-1][1] == off:
                out[-1][1] += cs
            else:
                out.append([off, cs])
        return [(o, n) for o, n in out]

    def _open(self, n):
        f = n[0]
        size, valid = f.stream.data_length, min(f.stream.valid_data_length, f.stream.data_length)
        runs: list[tuple[int | None, int]] = []
        pos = 0
        for off, k in self.runs(f.stream.location, valid, f.stream.flags.not_fragmented):
            k = min(k, valid - pos)
            runs.append((off, k))
            pos += k
        if size > pos:                          # past valid_data_length: zeroes
            runs.append((None, size - pos))
        return _RunReader(self._src, 0, runs, size, 1)

    def allocation(self, path):
        f = self._node(_norm(path))[0]
        return self.runs(f.stream.location, f.stream.data_length, f.stream.flags.not_fragmented)


class NtfsVolume(FileSystem):
    kind = "ntfs"

    def __init__(self, fh, name):
        super().__init__(fh, name)
        from dissect.ntfs import NTFS
        try:
            self.fs = NTFS(fh)
        except Exception as e:
            raise CorruptImage(f"{name}: not a readable NTFS volume: {e}") from None

    def _node(self, path):
        return self.fs.mft.get(path)

    def _entry(self, path, n):
        if n.is_dir():
            typ = "dir"
        elif n.is_symlink():
            typ = "symlink"
        else:
            typ = "file"
        si = n.attributes.get(0x10)
        mtime = _ts(si[0].last_modification_time) if si else None
        size = n.size() if typ == "file" else 0
        return Entry(path, typ, size, mtime, None,
                     n.reparse_point_substitute_name if typ == "symlink" else "")

    def _children(self, n):
        return [(k, v) for k, v in n.listdir(dereference=True, ignore_dos=True).items()
                if not (k.startswith("$") and n.segment == 5)]

    def _open(self, n):
        return n.open()


class IsoVolume(FileSystem):
    kind = "iso9660"

    def __init__(self, fh, name):
        super().__init__(fh, name)
        import pycdlib
        self.iso = pycdlib.PyCdlib()
        try:
            self.iso.open_fp(fh)
        except Exception as e:
            raise CorruptImage(f"{name}: not a readable ISO9660 volume: {e}") from None
        if self.iso.has_rock_ridge():
            self._facade, self._pathkey = self.iso.get_rock_ridge_facade(), "rr_path"
        elif self.iso.has_joliet():
            self._facade, self._pathkey = self.iso.get_joliet_facade(), "joliet_path"
        else:
            self._facade, self._pathkey = self.iso.get_iso9660_facade(), "iso_path"

    def _node(self, path):
        rec = self._facade.get_record(path)
        if rec.is_dir() or path == "/":
            return rec
        # a file of 4 GiB or more has one record per extent, all named alike: pycdlib's lookup
        # gives the last; the first (the head of the data_continuation chain) is the file
        parent, _, name = path.rpartition("/")
        for n, c in self._children(self._facade.get_record(parent or "/")):
            if n == name:
                return c
        return rec

    @staticmethod
    def _chunks(rec) -> list:
        """The records holding a file's extents, in order (one, unless multi-extent)."""
        out = [rec]
        while out[-1].data_continuation is not None and len(out) < 1 << 16:
            out.append(out[-1].data_continuation)
        return out

    def _entry(self, path, rec):
        if rec.is_dir():
            typ = "dir"
        elif rec.is_symlink():
            typ = "symlink"
        else:
            typ = "file"
        dt = rec.date
        try:
            mtime = datetime(1900 + dt.years_since_1900, dt.month, dt.day_of_month, dt.hour,
                             dt.minute, dt.second, tzinfo=UTC).timestamp() \
                - dt.gmtoffset * 15 * 60
        except (ValueError, AttributeError):
            mtime = None
        target = ""
        if typ == "symlink" and rec.rock_ridge is not None:
            target = rec.rock_ridge.symlink_path().decode("utf-8", "surrogateescape")
        size = sum(c.get_data_length() for c in self._chunks(rec)) if typ == "file" else 0
        return Entry(path, typ, size, mtime, None, target)

    def _key(self, rec):
        return rec.extent_location()

    def _children(self, rec):
        out, later = [], set()
        for c in self._facade.list_children(**{self._pathkey: self._path_of(rec)}):
            if c is None or c.is_dot() or c.is_dotdot() or id(c) in later:
                continue
            later.update(id(x) for x in self._chunks(c)[1:])   # a multi-extent file's tail
            out.append((self._name_of(c), c))
        return out

    def _path_of(self, rec):
        return self.iso.full_path_from_dirrecord(rec, rockridge=self._pathkey == "rr_path") \
            if self._pathkey != "joliet_path" else self.iso.full_path_from_dirrecord(rec)

    def _name_of(self, rec):
        if self._pathkey == "rr_path" and rec.rock_ridge is not None:
            return rec.rock_ridge.name().decode("utf-8", "surrogateescape")
        name = rec.file_identifier().decode("utf-16-be" if self._pathkey == "joliet_path"
                                            else "latin-1")
        return name.split(";", 1)[0] if self._pathkey == "iso_path" else name

    def _open(self, rec):
        chunks = self._chunks(rec)
        raw = getattr(self.fh, "raw", None)
        if len(chunks) > 1 and hasattr(raw, "pread_into"):
            runs = [(c.extent_location() * 2048, c.get_data_length()) for c in chunks]
            return _RunReader(raw, 0, runs, sum(n for _, n in runs), 1)
        stream = self.iso.open_file_from_iso(**{self._pathkey: self._path_of(rec)})
        return stream.__enter__()     # PyCdlibIO sets up its range on entering


_BY_FS = {"ext2": ExtVolume, "ext3": ExtVolume, "ext4": ExtVolume, "fat12": FatVolume,
          "fat16": FatVolume, "fat32": FatVolume, "exfat": ExfatVolume, "ntfs": NtfsVolume,
          "iso9660": IsoVolume}


def open_filesystem(fh, filesystem: str, name: str) -> FileSystem:
    cls = _BY_FS.get(filesystem)
    if cls is None:
        raise NotSupported(f"{name}: " + (f"reading {filesystem} volumes is not supported"
                                         if filesystem else "no file system recognised"))
    fh.seek(0)
    return cls(fh, name)
