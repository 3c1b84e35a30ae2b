"""Copy / convert / move images (modelled on vd.h's VDCopyEx and the VirtualBox media mover).

``copy_image`` reads any readable chain (or the chain up to one member) and writes it into a new
image of any creatable backend and variant:

* **sparse**: only ranges the source chain holds as DATA are read; within them, all-zero pieces
  of the target's block size (at least 4 KiB) are not written, so unallocated and zero source
  blocks stay holes in the target. Work goes in windows of at most 4 MiB: memory stays small.
* **sizes**: ``new_size`` grows the target; shrinking is allowed only when everything beyond the
  new end reads as zeroes (otherwise a clear refusal). Sizes are rounded up to the target
  backend's granularity.
* **UUIDs**: new ones by default; ``keep_uuid`` copies each image's UUID.
* **chains**: ``as_chain=True`` copies chain members 0..top as a chain: the base, then one
  differencing image per source diff holding only that diff's own blocks (VDCopyEx's "same
  content up to image N" shortcut). Each member keeps its own virtual size (``new_size`` applies
  to the top only). Target names (documented contract, :func:`chain_target_names`): ``DST`` is
  the copy of the top (the image a VM attaches); each member below it is
  ``<DST stem>-<member's stem>.<ext>`` beside it (``-<N>`` added when two names would collide).
* **safety**: every file is created inside a private temporary folder beside the target
  (``.<name>.vdgui-tmp-<pid>-<random>``), with the final base names so that names stored inside
  the images (extents, parent links) are right; when the copy is complete the files are moved
  into place without replacing anything (unless ``overwrite``). A cancelled or failed copy leaves
  no file behind, and the source is only ever opened read-only.
* **non-file backends** (caps without FILE, e.g. iSCSI): the location comes from the config;
  the path may be "-". Such a target must already exist and be large enough: it is written in
  place (zero ranges written as zeroes), nothing is created or renamed.

``move_image`` renames every file of an image when source and target share a file system
(extents keep their base names, so a descriptor referring to them by relative name stays valid),
else copies the files (sparse-aware) then deletes the source. A differencing image moved to
another folder has its parent link rewritten when the backend can (Operation.RELINK); if it
cannot and the moved image no longer finds its parent, the move is undone and refused.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections import deque
from typing import TYPE_CHECKING, overload

from ..align import align_up
from ..backend import Backend, Cap, ImageFlags, OpenFlags, Operation
from ..config import parse_config
from ..disk import Disk
from ..errors import (
    FileExists,
    ImageNotFound,
    InvalidArgument,
    NotSupported,
    ParentNotFound,
    UnsafePath,
    VDError,
    VDIOError,
)
from ..fileio import (
    LockMode,
    check_same_file,
    lock_files,
    make_temp_dir,
    temp_dir_files,
    unsynced,
)
from ..filters.keyfile import sidecar_path
from ..image import Alloc
from ..progress import Progress, ProgressCallback, WorkMap
from ..registry import get_backend, probe
from ..sparse import first_nonzero
from .pipeline import (
    MAX_GRAIN,
    MIN_GRAIN,
    READAHEAD,
    READERS,
    WINDOW,
    ZEROS,
    CopyRanges,
    Readers,
    Window,
    Writer,
    read_window,
    stored_runs,
    zero_grain,
)
from .rewrite import data_ranges

if TYPE_CHECKING:  # pragma: no cover
    from concurrent.futures import Future

FLAT_WINDOW = 4 << 20       # a flat copy's step: fewer table and header updates per MiB
ALLOC_SLICE = 1 << 30       # allocation map queried in slices of this many bytes

__all__ = ["chain_target_names", "copy_image", "move_image"]


# ---------------------------------------------------------------------------------------------
# helpers
def _grain(block_size: int) -> int:
    """Zero-detection granularity for a target with blocks of ``block_size``: the block, but
    for blocks larger than MAX_GRAIN (VHDX: 32 MiB) one window. Source extents are widened to
    whole grains, so a large grain would read, zero-fill and scan mostly unallocated space;
    such backends store a partly written new block sparsely themselves."""
    if block_size > MAX_GRAIN:
        return WINDOW
    return max(block_size, MIN_GRAIN)


@overload
def _backend(fmt: str | Backend) -> Backend: ...
@overload
def _backend(fmt: None) -> None: ...
@overload
def _backend(fmt: str | Backend | None) -> Backend | None: ...
def _backend(fmt: str | Backend | None) -> Backend | None:
    if fmt is None or isinstance(fmt, Backend):
        return fmt
    return get_backend(fmt)


def _member_stem(location: str) -> str:
    """A chain member's name for a target file name: its base name without the extension,
    reduced to letters, digits, '-', '_' and '.' (at most 64 characters)."""
    name = location.rstrip("/").rsplit("/", 1)[-1]
    stem = os.path.splitext(name)[0]
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem).strip("._")
    return stem[:64]


def chain_target_names(dst_path: str, members) -> list[str]:
    """Target names for an ``as_chain`` copy, base first. The last one, the copy of the top (the
    image the user picked, which a VM attaches), is ``dst_path`` itself; each member below it is
    ``<stem>-<member's stem><ext>`` beside it, with ``-<N>`` (its chain index) added when two
    names would collide. ``members``: the source members' locations, base first (or their
    count, then members are named ``level<N>``)."""
    if isinstance(members, int):
        members = [f"level{i}" for i in range(members)]
    members = list(members)
    if not members:
        return []
    stem, ext = os.path.splitext(dst_path)
    used = {os.path.basename(dst_path).lower()}
    out = []
    for i, m in enumerate(members[:-1]):
        name = f"{stem}-{_member_stem(m) or f'level{i}'}{ext}"
        if os.path.basename(name).lower() in used:
            name = f"{stem}-{_member_stem(m) or 'level'}-{i}{ext}"
        used.add(os.path.basename(name).lower())
        out.append(name)
    return out + [dst_path]


def _round_up(n: int, g: int) -> int:
    return align_up(n, g)


def _extents(src: Disk, top: int, bottom: int, length: int):
    """The allocation map of ``src`` over [0, length), queried slice by slice."""
    pos = 0
    while pos < length:
        n = min(ALLOC_SLICE, length - pos)
        yield from src.allocation(pos, n, top=top, bottom=bottom)
        pos += n


def _copy_work(src: Disk, top: int, levels: int, lengths: list[int], fresh: bool) -> WorkMap:
    """What a copy moves, in its walk's positions (each member's length after the one before):
    a flat copy the ranges the chain holds as data (every range onto a device, which is written
    whole), a chain member's copy the ranges that member holds itself."""
    work = WorkMap()
    base = 0
    for lv in range(levels):
        if lv == 0:
            for ext in _extents(src, lv if levels > 1 else top, 0, lengths[lv]):
                if ext.status == Alloc.DATA or not fresh:
                    work.add(base + ext.start, base + ext.end)
        else:
            for ext in _extents(src, lv, lv, lengths[lv]):
                if ext.level == lv:
                    work.add(base + ext.start, base + ext.end)
        base += lengths[lv]
    return work


def _first_nonzero_in(src: Disk, top: int, start: int, end: int) -> int | None:
    """First offset in [start, end) that does not read as zero, or None."""
    return first_nonzero(((e.start, e.length) for e in src.allocation(start, end - start, top=top)
                          if e.status == Alloc.DATA),
                         lambda p, n: src.read(p, n, top=top), WINDOW)


def _flat_windows(src: Disk, top: int, length: int, g: int, chunk: int, fresh: bool,
                  aligned: bool = False):
    """("data", a, b, level) windows to copy (level: the chain member holding the whole window,
    or None), ("zero", a, b) ranges to clear on a non-fresh target and
    ("mark", pos, 0) progress points, in offset order. ``aligned``: windows end at multiples of
    ``chunk`` (no target block of a size dividing ``chunk`` is split between two windows,
    however the source's extents start)."""
    covered = 0
    for ext in _extents(src, top, 0, length):
        if ext.status == Alloc.DATA:
            start = max(ext.start - ext.start % g, covered)
            end = min(_round_up(ext.end, g), length)
            while start < end:
                wend = min(start - start % chunk + chunk if aligned else start + chunk, end)
                whole = ext.start <= start and wend <= ext.end
                yield "data", start, wend, ext.level if whole else None
                start = covered = wend
        elif not fresh and ext.end > covered:
            pos = max(ext.start, covered)
            while pos < ext.end:
                n = min(chunk, ext.end - pos)
                yield "zero", pos, pos + n, None
                pos += n
            covered = ext.end
        yield "mark", max(covered, ext.end), 0, None


def _copy_flat(src: Disk, top: int, w: Writer, length: int, prog: Progress, base: int,
               readers: Readers | None = None) -> None:
    """Copy the chain's view at level ``top`` over [0, length) into the target's top image."""
    cfr = CopyRanges(w.flat) if w.flat is not None else None
    try:
        _copy_flat_windows(src, top, w, length, prog, base, readers, cfr)
    finally:
        if cfr is not None:
            cfr.close()


def _copy_flat_windows(src: Disk, top: int, w: Writer, length: int, prog: Progress, base: int,
                       readers: Readers | None, cfr: CopyRanges | None) -> None:
    g = w.g
    chunk = max(g, FLAT_WINDOW // g * g)
    depth = max(2, READAHEAD // chunk)
    pending: deque = deque()
    in_flight = 0

    def settle() -> None:
        nonlocal in_flight
        kind, a, b, lv, fut = pending.popleft()
        if kind == "copy":
            in_flight -= 1
            k = fut.result()
            w.wb.add(k)
            if a + k < b:         # refused or short: the rest the long way
                w.write(a + k, read_window(src, a + k, b - a - k, top, lv))
            prog.at(base + b)
        elif kind == "data":
            in_flight -= 1
            w.write(a, fut.result() if fut is not None else read_window(src, a, b - a, top, lv))
            prog.at(base + b)
        elif kind == "zero":
            w.zero_fill(a, b - a)
            prog.at(base + b)
        else:
            prog.at(base + a)

    for kind, a, b, lv in _flat_windows(src, top, length, g, chunk, w.fresh, w.passthrough):
        fut: Future | Window | None = None
        runs = stored_runs(src, lv, a, b - a) if kind == "data" and cfr and cfr.on else None
        if runs and cfr is not None:
            kind = "copy"
            fut = cfr.submit(runs, a)
        elif kind == "data" and readers is not None:
            fut = readers.submit(a, b - a, top, lv)
        pending.append((kind, a, b, lv, fut))
        if kind in ("data", "copy"):
            in_flight += 1
        ahead = depth if readers is not None or cfr is not None else 0
        while pending and (in_flight > ahead or len(pending) > 1024):
            settle()
    while pending:
        settle()


def _copy_own(src: Disk, level: int, w: Writer, length: int, prog: Progress, base: int) -> None:
    """Copy only the ranges chain member ``level`` holds itself (DATA or explicit ZERO) into the
    target's top image (a differencing image whose parent already has the content below)."""
    t = w.t
    below = len(t.images) - 2

    below_size = t.image(below).size

    def below_zero(o: int, n: int) -> bool:
        n = min(n, below_size - o)      # past the parent's end the chain reads zero
        return n <= 0 or zero_grain(t.read(o, n, top=below))

    chunk = max(w.g, WINDOW // w.g * w.g)
    for ext in _extents(src, level, level, length):
        if ext.level == level:
            pos = ext.start
            while pos < ext.end:
                wend = min(pos - pos % chunk + chunk, ext.end)
                n = wend - pos
                data = (src.read(pos, n, top=level) if ext.status == Alloc.DATA
                        else ZEROS[:n])
                w.write(pos, data, below_zero)
                pos = wend
                prog.at(base + pos)
        prog.at(base + ext.end)


def _real(p: str) -> str:
    return os.path.realpath(os.path.abspath(p))


def _link_into_place(pairs: list[tuple[str, str]], overwrite: bool) -> None:
    """Move temp files to their final names; without ``overwrite`` never replace a file (hard
    link then unlink, or an existence check where links are unsupported). All or nothing."""
    done: list[str] = []
    try:
        for tmp, final in pairs:
            if overwrite:
                continue
            try:
                os.link(tmp, final)
                done.append(final)
            except FileExistsError:
                raise FileExists(f"{final}: file already exists") from None
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK,
                                     errno.ENOSYS):
                    raise VDIOError(f"{final}: cannot create: {exc.strerror or exc}") from None
                if os.path.lexists(final):
                    raise FileExists(f"{final}: file already exists") from None
    except BaseException:
        for f in done:
            with contextlib.suppress(OSError):
                os.unlink(f)
        raise
    for tmp, final in pairs:
        if final in done:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        else:
            try:
                os.replace(tmp, final)
            except OSError as exc:
                raise VDIOError(f"{final}: cannot rename into place: "
                                f"{exc.strerror or exc}") from None


def _make_tempdir(dst_path: str) -> str:
    return make_temp_dir(dst_path)


# ---------------------------------------------------------------------------------------------
def copy_image(src_path: str, dst_path: str, dst_format: str | Backend, *,
               src_format: str | Backend | None = None, variant: ImageFlags = ImageFlags.NONE,
               new_size: int | None = None, keep_uuid: bool = False, as_chain: bool = False,
               src_config: dict | None = None, dst_config: dict | None = None,
               progress: ProgressCallback | None = None, overwrite: bool = False,
               src_top: int | None = None, allow_unsafe_paths: bool = False,
               sync: bool = True, force_share: bool = False, src_filters: list | None = None,
               dst_filters: list | None = None) -> list[str]:
    """Copy (convert) the chain ending at ``src_path`` into a new image (VDCopyEx).

    Returns the locations of the images created, base first (one for a flattening copy). See the
    module docstring for sparseness, sizes, UUIDs, chain copies, target naming and safety.
    ``sync=False`` skips waiting for the disk (no fsync; qemu-img convert's default): the files
    are complete and renamed into place as usual, but a power loss soon after may lose them.
    The source chain is read under the shared lock (no one may write or resize it meanwhile)
    unless ``force_share`` (qemu-img's -U). ``src_filters``/``dst_filters``: opened filters
    (:mod:`vdgui.vd.filter`) the source is read through and the target written through: a copy
    decrypts, encrypts or both on the way."""
    dst_backend = _backend(dst_format)
    variant = ImageFlags(variant)
    file_target = bool(dst_backend.caps & Cap.FILE)
    if file_target and not dst_backend.can(Operation.CREATE):
        raise NotSupported(f"creating images is not supported for {dst_backend.name}")
    if not dst_backend.can(Operation.WRITE):
        raise NotSupported(f"writing images is not supported for {dst_backend.name}")
    parse_config(dst_backend.config_keys, dst_config, creating=file_target, owner=dst_backend.name)
    if new_size is not None and new_size <= 0:
        raise InvalidArgument(f"image size must be positive, found {new_size}")

    flags = OpenFlags.READ_ONLY | (OpenFlags.ALLOW_UNSAFE_PATHS if allow_unsafe_paths else 0)
    if force_share:
        flags |= OpenFlags.FORCE_SHARE
    src_be = _backend(src_format)
    with contextlib.nullcontext() if sync else unsynced(), \
            Disk.open_chain(src_path, src_be.name if src_be else None, flags, src_config) as src:
        for f in src_filters or ():
            src.add_filter(f)
        top = len(src) - 1 if src_top is None else src_top
        if top < 0:
            top += len(src)
        if not 0 <= top < len(src):
            raise InvalidArgument(f"{src_path}: no image number {src_top} in a chain of {len(src)}")
        src_size = src.image(top).size
        size = src_size if new_size is None else new_size
        size = _round_up(size, dst_backend.size_granularity)
        if size < src_size:
            bad = _first_nonzero_in(src, top, size, src_size)
            if bad is not None:
                raise InvalidArgument(f"{src_path}: cannot shrink to {size} bytes: the source "
                                      f"holds data beyond the new end (first at offset {bad})")
        copy_len = min(size, src_size)
        levels = top + 1 if as_chain else 1
        # a chain copy: every member keeps its own size; new_size applies to the top
        sizes = [_round_up(src.image(lv).size, dst_backend.size_granularity)
                 for lv in range(levels - 1)] + [size]
        lengths = [min(sizes[lv], src.image(lv if levels > 1 else top).size)
                   for lv in range(levels - 1)] + [copy_len]
        if levels > 1 and not (dst_backend.caps & Cap.DIFF):
            raise NotSupported(f"{dst_backend.name} images cannot be differencing images; copy "
                               "without the chain option to flatten the chain into one image")
        prog = Progress(progress, work=_copy_work(src, top, levels, lengths, file_target))
        prog.start()
        readers = None
        if all(img.backend.caps & Cap.FILE for img in src.images) and READERS > 1:
            top_backend = src.top.backend
            readers = Readers(lambda: _with_filters(
                Disk.open_chain(src_path, top_backend.name, flags, src_config), src_filters))
        try:
            if not file_target:
                if levels > 1:
                    raise NotSupported(f"{dst_backend.name}: a chain cannot be copied onto a "
                                       "device")
                _copy_to_device(src, top, dst_path, dst_backend, dst_config, size, copy_len, prog,
                                keep_uuid, readers, dst_filters)
                return [dst_path]
            return _copy_to_files(src, top, dst_path, dst_backend, variant, dst_config, sizes,
                                  lengths, prog, keep_uuid, levels, overwrite, allow_unsafe_paths,
                                  readers, dst_filters)
        finally:
            if readers is not None:
                readers.close()


def _with_filters(d: Disk, filters) -> Disk:
    for f in filters or ():
        d.add_filter(f)
    return d


def _copy_to_device(src, top, dst_path, backend, config, size, copy_len, prog, keep_uuid,
                    readers=None, filters=None):
    with Disk() as t:
        t.open(dst_path, backend, OpenFlags.NORMAL, config)
        _with_filters(t, filters)
        if t.size < size:
            raise InvalidArgument(f"{dst_path}: the target holds {t.size} bytes, too small for "
                                  f"{size} bytes")
        w = Writer(t, _grain(t.top.block_size), fresh=False)
        try:
            _copy_flat(src, top, w, copy_len, prog, 0, readers)
        finally:
            w.close()
        if keep_uuid and src.image(top).uuid:
            with contextlib.suppress(NotSupported):
                t.top.set_uuid(src.image(top).uuid)
        t.flush()
        prog.finish()


def _copy_to_files(src, top, dst_path, backend, variant, config, sizes, lengths, prog, keep_uuid,
                   levels, overwrite, allow_unsafe, readers=None, filters=None):
    finals = (chain_target_names(dst_path, [src.image(lv).location for lv in range(levels)])
              if levels > 1 else [dst_path])
    src_files = {_real(f) for img in src.images for f in img.files()}
    for f in finals:
        if _real(f) in src_files:
            raise InvalidArgument(f"{f}: the target is a file of the source chain")
        if os.path.lexists(f) and not overwrite:
            raise FileExists(f"{f}: file already exists")
    tmpdir = _make_tempdir(dst_path)
    try:
        t = Disk()
        try:
            unit = max([f.data_unit for f in filters or ()], default=1)
            if any(size % unit for size in sizes):
                raise InvalidArgument(f"{dst_path}: a filtered disk's size must be a multiple "
                                      f"of {unit} bytes, found {sizes[-1]}")
            _with_filters(t, filters)
            created: list[str] = []
            done = 0
            for lv in range(levels):
                img_src = src.image(lv if levels > 1 else top)
                loc = os.path.join(tmpdir, os.path.basename(finals[lv]))
                uid = img_src.uuid if keep_uuid else None
                size = sizes[lv]
                if lv == 0:
                    lchs = img_src.lchs if size == img_src.size else None
                    t.create_base(loc, size, backend, flags=variant, uuid=uid,
                                  lchs=lchs if lchs and not lchs.is_zero else None,
                                  config=config, allow_unsafe_paths=allow_unsafe,
                                  progress=lambda d, n: prog.poll())
                else:
                    t.create_diff(loc, backend, flags=variant & ~ImageFlags.FIXED, uuid=uid,
                                  config=config, allow_unsafe_paths=allow_unsafe, size=size)
                created.append(loc)
                w = Writer(t, _grain(t.top.block_size), fresh=t.top.zero_init,
                            allocated=bool(variant & ImageFlags.FIXED) and lv == 0)
                if lv == 0:
                    _copy_flat(src, lv if levels > 1 else top, w, lengths[lv], prog, 0, readers)
                else:
                    _copy_own(src, lv, w, lengths[lv], prog, done)
                done += lengths[lv]
                w.close()
                if lv > 0:        # a member larger than its parent holds its own tail
                    from .resize import store_tail_over_parent  # chain copies only
                    store_tail_over_parent(t.top, t.images[lv - 1].size,
                                           lambda o, n, _lv=lv: t.read_below(_lv, o, n))
                if img_src.comment:
                    with contextlib.suppress(NotSupported):
                        t.top.set_comment(img_src.comment)
                t.top.flush()
            prog.finish()
            tops = [img.location for img in t.images]
        finally:
            t.close()
        # publish: every file the backend made, under the same relative name
        pairs = [(p, os.path.join(os.path.dirname(os.path.abspath(dst_path)), rel))
                 for p, rel in temp_dir_files(tmpdir)]
        for _tmp, final in pairs:
            d = os.path.dirname(final)
            if not os.path.isdir(d):
                os.makedirs(d, exist_ok=True)
        _link_into_place(pairs, overwrite)
        results = [os.path.join(os.path.dirname(os.path.abspath(dst_path)),
                                os.path.relpath(p, tmpdir)) for p in tops]
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    if levels > 1:
        _fix_parent_links(results, backend, tmpdir, allow_unsafe)
    # report the names as the caller spelled them
    return [finals[i] if _real(finals[i]) == _real(r) else r for i, r in enumerate(results)]


def _fix_parent_links(locations: list[str], backend: Backend, tmpdir: str, allow_unsafe: bool):
    """Diffs created in the temporary folder may record absolute parent paths into it: rewrite
    those links (when the backend can) now that the files have their final names."""
    if not backend.can(Operation.RELINK):
        return
    for i in range(1, len(locations)):
        img = backend.open(locations[i], OpenFlags.INFO | OpenFlags.READ_ONLY, None)
        try:
            stale = any(tmpdir in (loc or "") for loc in (img.parent_hint.locations
                                                          if img.parent_hint else []))
        finally:
            img.close()
        if not stale:
            continue
        parent = backend.open(locations[i - 1], OpenFlags.READ_ONLY, None)
        try:
            child = backend.open(locations[i], OpenFlags.NORMAL, None)
            try:
                child.set_parent(parent)
                child.flush()
            finally:
                child.close()
        finally:
            parent.close()


# ---------------------------------------------------------------------------------------------
def _same_fs(a: str, b_folder: str) -> bool:
    try:
        return os.stat(a).st_dev == os.stat(b_folder).st_dev
    except OSError:
        return False


def _copy_file_sparse(src: str, dst: str, prog: Progress, base: int) -> None:
    """Copy one file keeping holes (SEEK_DATA/SEEK_HOLE; all-zero windows are not written)."""
    fi = os.open(src, os.O_RDONLY)
    try:
        fo = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            size = os.fstat(fi).st_size
            pos = 0
            while pos < size:
                try:
                    pos = os.lseek(fi, pos, os.SEEK_DATA)
                    hole = os.lseek(fi, pos, os.SEEK_HOLE)
                except OSError as exc:
                    if exc.errno == errno.ENXIO:
                        break
                    hole = size
                while pos < hole:
                    buf = os.pread(fi, min(WINDOW, hole - pos), pos)
                    if not buf:
                        hole = pos
                        break
                    if not zero_grain(buf):
                        mv = memoryview(buf)
                        off = pos
                        while mv:
                            k = os.pwrite(fo, mv, off)
                            mv = mv[k:]
                            off += k
                    pos += len(buf)
                    prog.at(base + pos)
            os.ftruncate(fo, size)
            os.fsync(fo)
        finally:
            os.close(fo)
    except OSError as exc:
        raise VDIOError(f"{src}: copy failed: {exc.strerror or exc}") from None
    finally:
        os.close(fi)


def _files_work(paths: list[str]) -> WorkMap:
    """The data a copy of these files reads (their holes are skipped), one file after another."""
    work = WorkMap()
    base = 0
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError as exc:
            raise VDIOError(f"{p}: cannot open: {exc.strerror or exc}") from None
        try:
            size = os.fstat(fd).st_size
            for s, e in data_ranges(fd, size):
                work.add(base + s, base + e)
        finally:
            os.close(fd)
        base += size
    return work


def _image_files(path: str, fmt, allow_unsafe: bool):
    be = _backend(fmt) or probe(path)
    flags = OpenFlags.INFO | OpenFlags.READ_ONLY | (OpenFlags.ALLOW_UNSAFE_PATHS if allow_unsafe
                                                    else 0)
    img = be.open(path, flags, None)
    try:
        return be, list(img.files()), img.is_diff
    finally:
        img.close()


def _inside(path: str, folder: str) -> bool:
    real, base = _real(path), _real(folder)
    return os.path.commonpath([real, base]) == base


def move_refusal(src_path: str, dst_path: str, *, format: str | Backend | None = None,
                 allow_unsafe_paths: bool = False) -> str | None:
    """Why moving ``src_path`` to ``dst_path`` would fail or break its chain (None: it works),
    decided before anything is touched, with what to do instead. A chain keeps its links only
    while every image's parent lies in the image's folder or below it (names stored inside images
    are confined to their folder unless unsafe paths are allowed)."""
    from ..chain import findable_from  # moves only
    dst_abs = os.path.abspath(dst_path)
    dst_dir = os.path.dirname(dst_abs)
    if not os.path.isdir(dst_dir):
        return f"The folder {dst_dir} does not exist"
    if _real(src_path) == _real(dst_abs):
        return "That is where the image already is"
    if os.path.lexists(dst_abs):
        return f"{dst_abs} already exists; choose another name"
    be, _files, is_diff = _image_files(src_path, format, allow_unsafe_paths)
    if not be.caps & Cap.FILE:
        return f"{be.name} images are not files and cannot be moved"
    if allow_unsafe_paths:
        return None
    name = os.path.basename(src_path)
    if is_diff:
        with Disk.open_chain(src_path, be.name, OpenFlags.READ_ONLY) as d:
            parent = d.image(-2).location
            hint = d.top.parent_hint
            assert hint is not None          # is_diff: the top names a parent
            by_uuid = hint.uuid is not None
        if not findable_from(dst_abs, parent, by_uuid):
            return (f"{name} is a differencing image of {os.path.basename(parent)} and would no "
                    f"longer find it from {dst_dir} (a parent is found in the image's folder or "
                    "below it, or by UUID beside it and in Snapshots/). Move the whole chain, or "
                    "copy it as a chain to the new place")
    for cpath, cbe in _children_of(src_path, be, allow_unsafe_paths):
        child = cbe.open(cpath, OpenFlags.INFO | OpenFlags.READ_ONLY, None)
        try:
            by_uuid = child.parent_hint is not None and child.parent_hint.uuid is not None
        finally:
            child.close()
        if not findable_from(cpath, dst_abs, by_uuid):
            return (f"{os.path.basename(cpath)} depends on {name} and would no longer find it "
                    f"in {dst_dir} (a parent is found in the image's folder or below it, or by "
                    "UUID beside it and in Snapshots/). Move the whole chain, or copy it as a "
                    "chain to the new place")
    return None


def move_image(src_path: str, dst_path: str, *, progress: ProgressCallback | None = None,
               format: str | Backend | None = None, allow_unsafe_paths: bool = False) -> list[str]:
    """Move an image (every file of it) to ``dst_path``. Returns the new locations of its files
    (the image itself first). Never replaces an existing file. Every file of the image is held
    under the exclusive lock meanwhile: one another program holds is not moved."""
    be, files, _is_diff = _image_files(src_path, format, allow_unsafe_paths)
    if not be.caps & Cap.FILE:
        raise NotSupported(f"{be.name} images are not files and cannot be moved")
    with lock_files(files, LockMode.EXCLUSIVE):
        return _move_image(src_path, dst_path, progress=progress, format=format,
                           allow_unsafe_paths=allow_unsafe_paths)


def _move_image(src_path: str, dst_path: str, *, progress, format, allow_unsafe_paths):
    be, files, is_diff = _image_files(src_path, format, allow_unsafe_paths)
    if not be.caps & Cap.FILE:
        raise NotSupported(f"{be.name} images are not files and cannot be moved")
    src_dir = os.path.dirname(os.path.abspath(src_path))
    dst_abs = os.path.abspath(dst_path)
    dst_dir = os.path.dirname(dst_abs)
    if not os.path.isdir(dst_dir):
        raise ImageNotFound(f"{dst_dir}: target folder does not exist")
    if _real(src_path) == _real(dst_path):
        raise InvalidArgument(f"{dst_path}: source and target are the same file")
    # the image's own file takes the new name; other files keep their names relative to it
    plan = [(os.path.abspath(src_path), dst_abs)]
    for f in files:
        fa = os.path.abspath(f)
        if fa == plan[0][0]:
            continue
        rel = os.path.relpath(fa, src_dir)
        if rel.startswith(".."):
            raise NotSupported(f"{f}: a file of this image lies outside its folder; "
                               "move it by hand")
        if os.path.join(dst_dir, rel) != fa:      # renaming in place: extents stay where they are
            plan.append((fa, os.path.join(dst_dir, rel)))
    if os.path.isfile(sidecar_path(plan[0][0])):  # its VirtualBox key store goes with it
        plan.append((sidecar_path(plan[0][0]), sidecar_path(dst_abs)))
    for _s, d in plan:
        if os.path.lexists(d):
            raise FileExists(f"{d}: file already exists")
    children = _children_of(src_path, be, allow_unsafe_paths)
    parent_path = None
    if is_diff and src_dir != dst_dir:
        with Disk.open_chain(src_path, be.name, OpenFlags.READ_ONLY | (
                OpenFlags.ALLOW_UNSAFE_PATHS if allow_unsafe_paths else 0)) as chain:
            parent_path = chain.image(-2).location
    same_fs = all(_same_fs(s, dst_dir) for s, _d in plan)
    prog = Progress(progress, work=WorkMap() if same_fs else _files_work([s for s, _d in plan]))
    prog.start()
    held: dict[str, int] = {}
    if same_fs:
        for _s, d in plan:
            os.makedirs(os.path.dirname(d), exist_ok=True)
        _link_into_place([(s, d) for s, d in plan], overwrite=False)   # unlinks the sources
        moved = True
    else:
        tmpdir = _make_tempdir(dst_path)
        for s, _d in plan:                  # the files copied, checked before their deletion
            held[s] = os.open(s, os.O_RDONLY | os.O_CLOEXEC)
        try:
            staged = []
            base = 0
            for s, d in plan:
                tmp = os.path.join(tmpdir, os.path.relpath(d, dst_dir))
                os.makedirs(os.path.dirname(tmp), exist_ok=True)
                _copy_file_sparse(s, tmp, prog, base)
                base += os.stat(s).st_size
                staged.append((tmp, d))
            _link_into_place(staged, overwrite=False)
        except BaseException:
            for fd in held.values():
                os.close(fd)
            raise
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)
        moved = False
    try:
        for s, fd in held.items():          # still the files copied: else nothing is deleted
            check_same_file(s, fd, "the move")
        if parent_path is not None:
            _relink_after_move(dst_abs, parent_path, be, allow_unsafe_paths)
        # differencing images of this one must still find it (rewrite their links if they can)
        for cpath, cbe in children:
            _relink_after_move(cpath, dst_abs, cbe, allow_unsafe_paths)
    except BaseException:
        # undo: the image (and its children) must stay usable where they were
        if moved:
            _link_into_place([(d, s) for s, d in plan], overwrite=False)
            if parent_path is not None and be.can(Operation.RELINK):
                with contextlib.suppress(VDError):
                    _relink_after_move(os.path.abspath(src_path), parent_path, be,
                                       allow_unsafe_paths)
        else:
            for _s, d in plan:
                with contextlib.suppress(OSError):
                    os.unlink(d)
        for cpath, cbe in children:
            if cbe.can(Operation.RELINK):
                with contextlib.suppress(VDError):
                    _relink_after_move(cpath, os.path.abspath(src_path), cbe, allow_unsafe_paths)
        raise
    finally:
        for fd in held.values():
            os.close(fd)
    if not moved:
        for s, _d in plan:
            os.unlink(s)
    prog.finish()
    return [d for _s, d in plan]


def _children_of(path: str, be: Backend, allow_unsafe: bool) -> list:
    """Differencing images beside ``path`` (and in Snapshots/) whose parent it is and whose link
    accepts it now (a link already broken is not rewritten by the move)."""
    from ..chain import find_children, link_matches  # moves only
    img = be.open(path, OpenFlags.INFO | OpenFlags.READ_ONLY | (
        OpenFlags.ALLOW_UNSAFE_PATHS if allow_unsafe else 0), None)
    try:
        out = []
        for cpath, cbe in find_children(img):
            try:
                kid = cbe.open(cpath, OpenFlags.INFO | OpenFlags.READ_ONLY, None)
            except VDError:
                continue
            try:
                if link_matches(kid, img):
                    out.append((cpath, cbe))
            finally:
                kid.close()
        return out
    finally:
        img.close()


def _relink_after_move(new_loc: str, parent_path: str, be: Backend, allow_unsafe: bool) -> None:
    """Make the image at ``new_loc`` link to ``parent_path`` (when its backend can rewrite links)
    and check that its chain opens; NotSupported (to undo the move) when it does not."""
    flags = OpenFlags.READ_ONLY | (OpenFlags.ALLOW_UNSAFE_PATHS if allow_unsafe else 0)
    if be.can(Operation.RELINK):
        parent_disk = Disk.open_chain(parent_path, None, flags)
        try:
            child = be.open(new_loc, OpenFlags.NORMAL | (flags & OpenFlags.ALLOW_UNSAFE_PATHS),
                            None)
            try:
                parent_disk.top.check_in_place("the move")
                child.check_in_place("the move")
                child.set_parent(parent_disk.top)
                child.flush()
            finally:
                child.close()
        finally:
            parent_disk.close()
    try:
        with Disk.open_chain(new_loc, be.name, flags) as d:
            found = d.image(-2).location if len(d) > 1 else None
        if found is None or _real(found) != _real(parent_path):
            raise ParentNotFound(f"{new_loc}: links to {found}, not {parent_path}")
    except (ParentNotFound, UnsafePath):
        raise NotSupported(f"{new_loc}: {be.name} cannot link this image to its parent "
                           f"{parent_path} from there (names stored in images stay inside the "
                           "image's folder unless unsafe paths are allowed); move it within its "
                           "folder, into a Snapshots subfolder, or move the whole chain") from None

