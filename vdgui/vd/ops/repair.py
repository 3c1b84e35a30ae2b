"""Check and repair an image (vd.h VDRepair / qemu-img check) through the CHECK/REPAIR hooks.

* ``check`` (no repair) and ``dry_run`` open the image read-only: not one byte changes.
* A real repair first checks read-only; a clean image is left alone. Otherwise the REPAIR hook runs
  on a copy of a single-file image, which replaces the original atomically only when the hook
  repaired something, so an interrupted repair never leaves a half-repaired (or worse) file.
An image so damaged that it cannot be opened is reported as one "corrupt" problem, not an error.

Data a repair would drop is never dropped silently. The CHECK hooks list the file areas no table
references (``CheckReport.orphans``); those holding a non-zero byte are kept in the report (a dry
run shows them), and a real repair first saves them beside the image, as
``NAME.orphans-DATE.bin`` with the index ``NAME.orphans-DATE.json`` (file, offset and length of
each area, and where it lies in the .bin), written under temporary names, synced and renamed
before the repair starts, under the image's write lock (taken before anything is written
anywhere: a held image is refused with nothing saved). ``backup=True`` also copies the image's
file(s) into the folder ``NAME.backup-DATE/`` beside it first (same names inside; made before any
repair writes).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time

from ..backend import Backend, OpenFlags, Operation
from ..errors import CorruptImage, InvalidArgument, VDIOError
from ..fileio import LockMode, lock_files
from ..image import CheckReport, Image, Problem, ProblemCode
from ..progress import Progress, ProgressCallback, sub_progress
from .rewrite import backend_for, finish, require_op, rewrite_in_copy

_RO_TRIES = (OpenFlags.READ_ONLY, OpenFlags.READ_ONLY | OpenFlags.SKIP_CONSISTENCY_CHECKS)
_RW_TRIES = (OpenFlags.NORMAL, OpenFlags.NORMAL | OpenFlags.SKIP_CONSISTENCY_CHECKS)


def _open(backend: Backend, path: str, tries) -> Image:
    for i, fl in enumerate(tries):
        try:
            return backend.open(path, fl, None)
        except CorruptImage:
            if i == len(tries) - 1:
                raise
    raise AssertionError("unreachable")


def _unopenable(exc: CorruptImage) -> CheckReport:
    return CheckReport(
        problems=[
            Problem(
                "corrupt",
                f"the image cannot be opened: {exc}",
                exc.offset,
                code=ProblemCode.OPEN_FAILED,
            )
        ]
    )


def check(
    path: str,
    *,
    format: str | None = None,
    repair: bool = False,
    dry_run: bool = False,
    progress: ProgressCallback | None = None,
    force_share: bool = False,
    backup: bool = False,
) -> CheckReport:
    """Check ``path``; with ``repair`` fix what the backend can (``dry_run``: only report what
    would be fixed). Returns a CheckReport (exit_code 0 clean, 2 corrupt, 3 leaks only);
    ``orphans`` lists the unreferenced areas that hold data, and after a repair
    ``orphans_file`` names where they were saved and ``backup`` the copy made first.
    The check reads under the shared lock unless ``force_share`` (qemu-img check -U)."""
    if force_share and repair and not dry_run:
        raise InvalidArgument(
            f"{path}: a repair writes the image: it cannot be combined with force-share (-U)"
        )
    backend = backend_for(path, format)
    require_op(backend, Operation.CHECK, path, "check")
    if repair:
        require_op(backend, Operation.REPAIR, path, "repair")
    span = 1 << 20
    prog = Progress(progress, span * (2 if repair and not dry_run else 1))
    prog.start()
    try:
        img = _open(
            backend,
            path,
            tuple(f | OpenFlags.FORCE_SHARE for f in _RO_TRIES) if force_share else _RO_TRIES,
        )
    except CorruptImage as exc:
        if not (repair and not dry_run):
            finish(prog)
            return _unopenable(exc)
        img = None
        first = _unopenable(exc)
    files = [path]
    if img is not None:
        try:
            first = img.check(
                repair=repair and dry_run,
                dry_run=True if repair else dry_run,
                progress=sub_progress(prog, 0, span),
            )
            first.orphans = _holding_data(first.orphans, img.location)
            files = list(img.files()) or [path]
        finally:
            img.close()
    if not repair or dry_run or not first.problems:
        finish(prog)
        return first
    # the write lock first: while another program holds the image, nothing is written anywhere
    held = lock_files([f for f in files if not os.path.isdir(f)], LockMode.WRITE)
    try:
        return _repair(path, backend, img, first, files, prog, span, backup)
    finally:
        held.close()


def _repair(path, backend, img, first, files, prog, span, backup) -> CheckReport:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    saved_backup = _backup(path, files, stamp) if backup else None
    saved_orphans = _save_orphans(path, first.orphans, stamp) if first.orphans else None

    result: list[CheckReport] = []

    def work(img: Image, cb) -> bool:
        rep = img.check(repair=True, dry_run=False, progress=cb)
        result.append(rep)
        return rep.repaired or any(p.repaired for p in rep.problems)

    sub = sub_progress(prog, span, span)
    try:
        if img is None or backend_single_file(backend, path):
            rewrite_in_copy(path, backend, lambda d, t: sub(d, t), work, open_flags=_RW_TRIES)
        else:
            img = _open(backend, path, _RW_TRIES)
            try:
                work(img, sub)
                img.flush()
            finally:
                img.close()
    except CorruptImage as exc:
        finish(prog)
        rep = _unopenable(exc)
        rep.orphans, rep.orphans_file, rep.backup = first.orphans, saved_orphans, saved_backup
        return rep
    finish(prog)
    rep = result[0] if result else first
    rep.orphans, rep.orphans_file, rep.backup = first.orphans, saved_orphans, saved_backup
    return rep


# -- keeping what a repair would drop ------------------------------------------------------
_WINDOW = 1 << 20


def _holding_data(orphans, location: str) -> list[tuple[str, int, int]]:
    """The orphan areas that hold at least one non-zero byte (read in 1 MiB windows)."""
    out = []
    folder = os.path.dirname(os.path.abspath(location))
    runs: list[list] = []
    for f, off, n in sorted(orphans):  # adjacent areas as one run
        if runs and runs[-1][0] == f and runs[-1][1] + runs[-1][2] == off:
            runs[-1][2] += n
        else:
            runs.append([f, off, n])
    for f, off, n in runs:
        f = f if os.path.isabs(f) else os.path.join(folder, f)
        if n <= 0:
            continue
        try:
            fd = os.open(f, os.O_RDONLY)
        except OSError as exc:
            raise VDIOError(
                f"{f}: cannot read unreferenced blocks: {exc.strerror or exc}"
            ) from None
        try:
            pos, end = off, off + n
            while pos < end:
                buf = os.pread(fd, min(_WINDOW, end - pos), pos)
                if not buf:
                    break
                if buf.count(0) != len(buf):
                    out.append((f, off, n))
                    break
                pos += len(buf)
        except OSError as exc:
            raise VDIOError(
                f"{f}: cannot read unreferenced blocks at {pos:#x}: {exc.strerror or exc}"
            ) from None
        finally:
            os.close(fd)
    return out


def _free_name(folder: str, name: str, ext: str) -> str:
    """``name + ext`` in ``folder``, or ``name-N + ext`` when taken."""
    cand, i = name + ext, 1
    while os.path.lexists(os.path.join(folder, cand)):
        i += 1
        cand = f"{name}-{i}{ext}"
    return os.path.join(folder, cand)


def _fsync_dir(folder: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _need_space(folder: str, need: int, what: str) -> None:
    try:
        st = os.statvfs(folder)
    except OSError:
        return
    free = st.f_bavail * st.f_frsize
    if need > free:
        raise InvalidArgument(
            f"{folder}: not enough free space for {what}: it needs {need} bytes, "
            f"{free} are free; nothing was changed"
        )


def _save_orphans(path: str, orphans, stamp: str) -> str:
    """Write the orphan areas into NAME.orphans-DATE.bin with the index NAME.orphans-DATE.json
    beside the image (temporary names, synced, renamed). Returns the .bin path."""
    folder = os.path.dirname(os.path.abspath(path))
    total = sum(n for _f, _o, n in orphans)
    _need_space(folder, total, "the unreferenced blocks that hold data")
    binp = _free_name(folder, f"{os.path.basename(path)}.orphans-{stamp}", ".bin")
    idxp = binp[:-4] + ".json"
    tmp_bin, tmp_idx = binp + ".tmp", idxp + ".tmp"
    entries = []
    try:
        with open(tmp_bin, "wb") as out:
            at = 0
            for f, off, n in orphans:
                with open(f, "rb") as src:
                    src.seek(off)
                    left = n
                    while left:
                        buf = src.read(min(_WINDOW, left))
                        if not buf:
                            break
                        out.write(buf)
                        left -= len(buf)
                entries.append({"file": f, "offset": off, "length": n - left, "at": at})
                at += n - left
            out.flush()
            os.fsync(out.fileno())
        with open(tmp_idx, "w", encoding="utf-8") as out:
            json.dump(
                {
                    "image": os.path.abspath(path),
                    "saved": stamp,
                    "what": "blocks of the image that no table referenced and that held data, "
                    "saved before a repair freed their space",
                    "data": os.path.basename(binp),
                    "blocks": entries,
                },
                out,
                indent=1,
            )
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp_bin, binp)
        os.replace(tmp_idx, idxp)
        _fsync_dir(folder)
    except OSError as exc:
        for t in (tmp_bin, tmp_idx):
            with contextlib.suppress(OSError):
                os.unlink(t)
        raise VDIOError(
            f"{binp}: cannot save the unreferenced blocks: {exc.strerror or exc}; "
            "nothing was repaired"
        ) from None
    return binp


def _backup(path: str, files: list[str], stamp: str) -> str:
    """Copy the image's files into NAME.backup-DATE/ beside it (a temporary folder, synced,
    renamed). Returns the folder."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):  # a bundle: everything in it, not only what is read
        files = list(files) + [os.path.join(r, n) for r, _d, ns in os.walk(path) for n in ns]
    files = list(dict.fromkeys(os.path.abspath(f) for f in files))
    _need_space(
        folder,
        sum(os.stat(f).st_blocks * 512 for f in files if os.path.exists(f)),
        "the backup copy",
    )
    final = _free_name(folder, f"{os.path.basename(path)}.backup-{stamp}", "")
    tmp = final + ".tmp"
    try:
        os.mkdir(tmp)
        for f in files:
            rel = os.path.relpath(f, folder)
            if rel.startswith(".."):
                rel = os.path.basename(f)
            dst = os.path.join(tmp, rel)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copyfile(f, dst)
            with open(dst, "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(tmp)
        os.rename(tmp, final)
        _fsync_dir(folder)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise VDIOError(
            f"{final}: cannot make the backup copy: {exc.strerror or exc}; nothing was repaired"
        ) from None
    return final


def describe_effects(report: CheckReport) -> list[str]:
    """What a repair of the problems in ``report`` (a dry run's) does to the data, in words."""
    out = []
    corrupt = [p for p in report.problems if p.severity == "corrupt"]
    leaks = [p for p in report.problems if p.severity == "leak"]
    if corrupt:
        out.append(
            f"{len(corrupt)} damaged structure(s) are rewritten as each finding says; a "
            "table entry that is cleared no longer shows its block, so that part of the "
            "disk then reads as zeroes (or from the parent image)."
        )
    data = sum(n for _f, _o, n in report.orphans)
    if report.orphans:
        from ..sizes import format_size

        out.append(
            f"{len(report.orphans)} unreferenced area(s) hold data ({format_size(data)}, "
            f"{data:,} bytes): no "
            "table points to them, so the disk does not show them now, and the repair "
            "frees their space. They are saved first beside the image, as "
            "NAME.orphans-DATE.bin with an index (.json)."
        )
    if leaks and not report.orphans:
        out.append(
            f"{len(leaks)} leak(s): the space is unreferenced and holds no data; freeing "
            "it loses nothing."
        )
    return out


def backend_single_file(backend: Backend, path: str) -> bool:
    try:
        img = backend.open(path, OpenFlags.INFO | OpenFlags.READ_ONLY, None)
    except CorruptImage:
        return True
    try:
        return img.single_file
    finally:
        img.close()


__all__ = ["check", "describe_effects"]
