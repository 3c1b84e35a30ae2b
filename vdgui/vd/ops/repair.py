"""Check and repair an image (vd.h VDRepair / qemu-img check) through the CHECK/REPAIR hooks.

* ``check`` (no repair) and ``dry_run`` open the image read-only: not one byte changes.
* A real repair first checks read-only; a clean image is left alone. Otherwise the REPAIR hook runs
  on a copy of a single-file image, which replaces the original atomically only when the hook
  repaired something, so an interrupted repair never leaves a half-repaired (or worse) file.
An image so damaged that it cannot be opened is reported as one "corrupt" problem, not an error.
"""
from __future__ import annotations

from ..backend import Backend, OpenFlags, Operation
from ..errors import CorruptImage, InvalidArgument
from ..image import CheckReport, Image, Problem, ProblemCode
from ..progress import Progress, ProgressCallback
from .compact import _backend, finish, require_op, rewrite_in_copy

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
    return CheckReport(problems=[Problem("corrupt", f"the image cannot be opened: {exc}",
                                         exc.offset, code=ProblemCode.OPEN_FAILED)])


def _scaled(prog: Progress, start: int, span: int):
    def cb(done, total):
        frac = done / total if total else 1.0
        prog.set(start + int(span * min(max(frac, 0.0), 1.0)))
    return cb


def check(path: str, *, format: str | None = None, repair: bool = False, dry_run: bool = False,
          progress: ProgressCallback | None = None, force_share: bool = False) -> CheckReport:
    """Check ``path``; with ``repair`` fix what the backend can (``dry_run``: only report what
    would be fixed). Returns a CheckReport (exit_code 0 clean, 2 corrupt, 3 leaks only).
    The check reads under the shared lock unless ``force_share`` (qemu-img check -U)."""
    if force_share and repair and not dry_run:
        raise InvalidArgument(f"{path}: a repair writes the image: it cannot be combined with "
                              "force-share (-U)")
    backend = _backend(path, format)
    require_op(backend, Operation.CHECK, path, "check")
    if repair:
        require_op(backend, Operation.REPAIR, path, "repair")
    span = 1 << 20
    prog = Progress(progress, span * (2 if repair and not dry_run else 1))
    prog.start()
    try:
        img = _open(backend, path, tuple(f | OpenFlags.FORCE_SHARE for f in _RO_TRIES)
                    if force_share else _RO_TRIES)
    except CorruptImage as exc:
        if not (repair and not dry_run):
            finish(prog)
            return _unopenable(exc)
        img = None
        first = _unopenable(exc)
    if img is not None:
        try:
            first = img.check(repair=repair and dry_run, dry_run=True if repair else dry_run,
                              progress=_scaled(prog, 0, span))
        finally:
            img.close()
    if not repair or dry_run or not first.problems:
        finish(prog)
        return first

    result: list[CheckReport] = []

    def work(img: Image, cb) -> bool:
        rep = img.check(repair=True, dry_run=False, progress=cb)
        result.append(rep)
        return rep.repaired or any(p.repaired for p in rep.problems)

    sub = _scaled(prog, span, span)
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
        return _unopenable(exc)
    finish(prog)
    return result[0] if result else first


def backend_single_file(backend: Backend, path: str) -> bool:
    try:
        img = backend.open(path, OpenFlags.INFO | OpenFlags.READ_ONLY, None)
    except CorruptImage:
        return True
    try:
        return img.single_file
    finally:
        img.close()


__all__ = ["check"]
