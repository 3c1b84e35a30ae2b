"""vdgui-img: the command-line face of the engine (a stable contract, see ARCHITECTURE.md).

Uses only the public API (``vdgui.vd``) and never names a format in its logic: everything comes
from the backend table. Errors print one line on stderr and exit 1 (``check`` exits 2/3 for
corrupt/leaks only); no traceback ever reaches the user.
"""
from __future__ import annotations

import os
import sys
import uuid as uuidlib

import vdgui.vd as vd

from . import cli_crypt
from .cli_parser import PROG, CLIError, parse_args
from .cli_progress import TtyProgress

CHUNK = 4 << 20


# -- argument helpers -------------------------------------------------------------------------
def _size(text: str) -> int:
    return vd.parse_size(text)


def _props(args, attr="property", file_attr="property_file") -> dict:
    out: dict = {}
    for item in getattr(args, attr, None) or []:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise CLIError(f"--{attr.replace('_', '-')} expects KEY=VALUE, found {item!r}")
        out[k] = v
    for item in getattr(args, file_attr, None) or []:
        k, sep, p = item.partition("=")
        if not sep or not k:
            raise CLIError(f"--{file_attr.replace('_', '-')} expects KEY=PATH, found {item!r}")
        data = vd.read_small_file(p, "property file")
        if data.endswith(b"\n"):
            data = data[:-1]
            if data.endswith(b"\r"):
                data = data[:-1]
        out[k] = data
    return out


def _flags(args, base=vd.OpenFlags.NORMAL) -> vd.OpenFlags:
    if getattr(args, "allow_unsafe_paths", False):
        base |= vd.OpenFlags.ALLOW_UNSAFE_PATHS
    if getattr(args, "force_share", False) and base.read_only:
        base |= vd.OpenFlags.FORCE_SHARE
    return base


def _backend_for(path: str, fmt: str | None) -> vd.Backend:
    if fmt:
        return vd.get_backend(fmt)
    if path == "-":
        raise CLIError("image '-' (a non-file backend) needs -f FORMAT and --property settings")
    return vd.probe(path)


def _config(backend: vd.Backend, props: dict, *, creating: bool = False) -> dict | None:
    """Validate properties against the backend's config keys; None when there are none."""
    if not backend.config_keys:
        if props:
            raise vd.ConfigError(f"{backend.name}: unknown configuration key "
                                 f"'{next(iter(props))}' (this format has no configuration keys)")
        return None
    vd.parse_config(backend.config_keys, props, creating=creating, owner=backend.name)
    return props or None


def _check_location(path: str, backend: vd.Backend) -> None:
    if path == "-" and backend.caps & vd.Cap.FILE:
        raise CLIError(f"image '-' needs a non-file backend; {backend.name} images are files")


def _open_chain(args, path, fmt=None, flags=vd.OpenFlags.READ_ONLY, props=None, *,
                data=True) -> vd.Disk:
    """The chain of ``path``; with ``data``, read and written through the CRYPT filter when
    the chain has a VirtualBox key store (cli_crypt)."""
    be = _backend_for(path, fmt)
    _check_location(path, be)
    cfg = _config(be, props or {})
    d = vd.Disk.open_chain(path, be.name, _flags(args, flags), cfg)
    if data:
        try:
            cli_crypt.add_filters(args, d)
        except BaseException:
            d.close()
            raise
    return d


def _attach_cache(args, d: vd.Disk) -> dict | None:
    """--cache-image FILE [--cache-size S] [--cache-reset]: the cache in front of ``d``."""
    path = getattr(args, "cache_image", None)
    if not path:
        return None
    size = getattr(args, "cache_size", None)
    return d.cache_open(path, size=_size(size) if size else None,
                        reset=bool(getattr(args, "cache_reset", False)))


def _geometry(text: str | None):
    return vd.Geometry.parse(text) if text else None


def _variant(text: str | None) -> vd.ImageFlags:
    return vd.parse_variant(text)


def _out(line: str = "") -> None:
    sys.stdout.write(line + "\n")


def _unsupported(op: str, backend: vd.Backend) -> int:
    print(f"{PROG}: {op} is not supported yet for {backend.name}", file=sys.stderr)
    return 1


# -- commands ---------------------------------------------------------------------------------
def _fmt_value(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, list) and len(v) == 3 and all(isinstance(x, int) for x in v):
        return "{}/{}/{}".format(*v)
    if isinstance(v, (list, tuple)):
        return ", ".join(map(str, v)) if v else "-"
    return str(v)


_INFO_ORDER = ("location", "format", "variant", "virtual_size", "file_size", "uuid",
               "modification_uuid", "parent_uuid", "parent_modification_uuid", "parent_locations",
               "parent_format", "comment", "pchs", "lchs", "block_size", "device_type", "files",
               "read_only")


def _print_info(d: dict, indent: str = "") -> None:
    for k in _INFO_ORDER:
        if k not in d:
            continue
        v = d[k]
        if k in ("virtual_size", "file_size") and isinstance(v, int):
            txt = f"{vd.format_size(v)} ({v} bytes)"
        else:
            txt = _fmt_value(v)
        _out(f"{indent}{k.replace('_', ' ')}: {txt}")
    for k, v in d.items():
        if k in _INFO_ORDER or k in ("details", "image_flags", "chain"):
            continue
        if isinstance(v, list) and v and isinstance(v[0], dict):
            _out(f"{indent}{k.replace('_', ' ')}:")
            for item in v:
                _out(f"{indent}  - " + ", ".join(f"{a}={_fmt_value(b)}" for a, b in item.items()))
        elif isinstance(v, dict):        # e.g. encryption: format, cipher, keyslots
            _out(f"{indent}{k.replace('_', ' ')}:")
            _print_info(v, indent + "  ")
        else:
            _out(f"{indent}{k.replace('_', ' ')}: {_fmt_value(v)}")
    details = d.get("details") or {}
    if details:
        _out(f"{indent}details:")
        for k, v in details.items():
            if isinstance(v, dict):
                _out(f"{indent}  {k}:")
                for k2, v2 in v.items():
                    _out(f"{indent}    {k2}: {_fmt_value(v2)}")
            elif isinstance(v, list) and v and isinstance(v[0], dict):
                _out(f"{indent}  {k}:")
                for item in v:
                    _out(f"{indent}    - "
                         + ", ".join(f"{a}={_fmt_value(b)}" for a, b in item.items()))
            else:
                _out(f"{indent}  {k}: {_fmt_value(v)}")


def _jsonable(o):
    if isinstance(o, bytes):
        return o.hex()
    if isinstance(o, (uuidlib.UUID, os.PathLike)):
        return str(o)
    if hasattr(o, "_asdict"):
        return list(o)
    if hasattr(o, "value"):
        return o.value
    return str(o)


def _json(obj) -> None:
    import json  # only --json output needs it: every other run starts faster
    _out(json.dumps(obj, indent=2, default=_jsonable))


def cmd_info(args) -> int:
    props, cache = _props(args), None           # --cache-image: one image, not --chain
    if args.chain:      # header-only opens (INFO): encryption shown without a passphrase
        _check_location(args.image, be := _backend_for(args.image, args.format))
        fl = _flags(args, vd.OpenFlags.INFO | vd.OpenFlags.READ_ONLY | vd.OpenFlags.LOCK_SHARED)
        with vd.Disk.open_chain(args.image, be.name, fl, _config(be, props), parent_flags=fl) as d:
            infos = [d.info(i) for i in range(len(d))]
            paths = cli_crypt.chain_paths(d)
        top = dict(infos[-1])
        top["chain"] = infos
    else:
        be = _backend_for(args.image, args.format)
        _check_location(args.image, be)
        cfg = _config(be, props)
        with vd.Disk() as d:
            # as qemu-img info: a shared lock (refused while a writer holds the image) unless -U
            d.open(args.image, be, _flags(args, vd.OpenFlags.INFO | vd.OpenFlags.READ_ONLY
                                          | vd.OpenFlags.LOCK_SHARED), cfg)
            top = d.info(0)
            paths = [args.image]
            cache = _attach_cache(args, d)
    crypt = None if "encryption" in top else cli_crypt.info(args, paths)
    if crypt is not None:
        top["encryption"] = crypt
    if cache is not None:
        top["cache"] = {k: v for k, v in cache.items() if k not in ("hits", "misses")}
    if args.json:
        _json(top)
        return 0
    if args.chain:
        for i, info in enumerate(top["chain"]):
            _out(f"[{i}] {'base' if i == 0 else 'diff'}")
            _print_info(info, "  ")
    else:
        _print_info(top)
    return 0


def _caps_words(caps) -> list[str]:
    return [c.name for c in vd.Cap if c and c.name and caps & c]


def cmd_backends(args) -> int:
    """The formats, then the filters (issue #17: "lists filters with their keys"), in one
    array told apart by ``kind``; a filter's row has every key a format's row has."""
    filters = cli_crypt.filter_rows()
    if args.filters:
        if args.json:
            _json(filters)
        else:
            cli_crypt.print_filters(filters, _out)
        return 0
    rows = []
    for b in vd.backends():
        origin = vd.backend_origin(b)
        rows.append({
            "kind": "format",
            "name": b.name,
            "description": b.description,
            "origin": {"kind": origin.kind, "distribution": origin.distribution,
                       "version": origin.version, "entry_point": origin.entry_point},
            "aliases": list(b.aliases),
            "capabilities": _caps_words(b.caps),
            "extensions": [{"ext": fe.ext, "device": fe.device.value} for fe in b.extensions],
            "config_keys": [cli_crypt.key_row(k) for k in b.config_keys],
            "operations": sorted(op.value for op in b.operations),
            "can_shrink": b.can(vd.Operation.RESIZE) and b.can_shrink,
            "max_size": b.max_size if b.creatable else None,     # with the default keys
            "variants": vd.variant_words(b.create_flags) if b.creatable else None,
        })
    if args.json:
        _json(rows + filters)
        return 0
    for r, b in zip(rows, vd.backends()):
        _out(f"{r['name']}: {r['description']}")
        origin = vd.backend_origin(b)
        _out(f"  from: {origin.describe()}"
             + (f" (entry point {origin.entry_point})" if origin.entry_point else ""))
        if r["aliases"]:
            _out(f"  aliases: {', '.join(r['aliases'])}")
        _out(f"  capabilities: {', '.join(r['capabilities']) or '-'}")
        _out("  extensions: " + (", ".join(f"{e['ext']} ({e['device']})" for e in r["extensions"])
                                 or "-"))
        _out(f"  operations: {', '.join(r['operations']) or '-'}")
        for k in r["config_keys"]:
            flags = ",".join(k["flags"]) or "-"
            default = "-" if k["default"] is None else repr(k["default"])
            unit = f" {k['unit']}" if k["unit"] else ""
            _out(f"  key {k['name']} ({k['label']}{unit}): {k['type']}, default {default}, "
                 f"flags {flags}")
    cli_crypt.print_filters(filters, _out)
    return 0


def _uuid_arg(text: str, option: str) -> uuidlib.UUID:
    try:
        return uuidlib.UUID(text)
    except ValueError:
        raise CLIError(f"{option}: not a UUID: '{vd.printable(text)}' (expected 32 hex digits, "
                       "e.g. 01234567-89ab-cdef-0123-456789abcdef)") from None


def cmd_create(args) -> int:
    be = vd.get_backend(args.format)
    _check_location(args.image, be)
    if not be.can(vd.Operation.CREATE):
        raise vd.NotSupported(f"creating images is not supported for {be.name}")
    cfg = _config(be, cli_crypt.encryption_config(args, be, _props(args)), creating=True)
    flags = _variant(args.variant)
    if flags & vd.ImageFlags.RAWDISK:
        raise CLIError("a raw disk VMDK is made by: vdgui-img create-rawvmdk --raw-drive DEV "
                       "[--partitions N,N] OUT (or create -f VMDK --property RawDrive=DEV)")
    uid = _uuid_arg(args.uuid, "--uuid") if args.uuid else None
    if args.parent:
        if args.size is not None:
            raise CLIError("--size cannot be used with --parent (the size comes from the parent)")
        if getattr(args, "encrypt", None) in cli_crypt.VBOX:
            raise CLIError("--encrypt cannot be used with --parent (a differencing image is "
                           "encrypted with its parent's key)")
        with _open_chain(args, args.parent, args.parent_format, data=False) as d:
            d.create_diff(args.image, be, flags=flags, comment=args.comment, uuid=uid, config=cfg,
                          allow_unsafe_paths=bool(args.allow_unsafe_paths))
        return 0
    if args.size is None:
        raise CLIError("create needs --size SIZE (or --parent PARENT)")
    prog = TtyProgress("create")
    crypt = cli_crypt.new_filter(args, [args.image])
    try:
        with cli_crypt.keystore_written([args.image], crypt), vd.Disk() as d:
            d.create_base(args.image, _size(args.size), be, flags=flags, comment=args.comment,
                          uuid=uid, config=cfg, progress=prog,
                          allow_unsafe_paths=bool(args.allow_unsafe_paths))
    finally:
        prog.close()
    return 0


def _media_sources(args) -> list[str]:
    out = [p for d in args.from_dirs for p in vd.folder_contents(d)]
    return out + list(args.add)


def cmd_create_floppy(args) -> int:
    prog = TtyProgress("create-floppy")
    try:
        vd.create_floppy(args.image, args.size, label=args.label,
                         sources=_media_sources(args), progress=prog)
    finally:
        prog.close()
    return 0


def cmd_create_iso(args) -> int:
    prog = TtyProgress("create-iso")
    try:
        vd.create_iso(args.image, _media_sources(args), label=args.label, progress=prog)
    finally:
        prog.close()
    return 0


def cmd_create_rawvmdk(args) -> int:
    parts = vd.parse_partitions(args.partitions)
    if args.partitions is not None and not parts:
        raise vd.InvalidArgument("--partitions: name at least one partition (e.g. 1,3)")
    boot = None
    if args.boot_sector:
        boot = vd.read_small_file(args.boot_sector, "the boot sector", limit=513)
    vd.create_raw_vmdk(args.image, args.raw_drive, parts, relative=args.relative,
                       boot_sector=boot)
    return 0


def cmd_convert(args) -> int:
    dst_be = vd.get_backend(args.output_format)
    src_be = _backend_for(args.src, args.format)
    _check_location(args.src, src_be)
    _check_location(args.dst, dst_be)
    dst_props = cli_crypt.encryption_config(args, dst_be, _props(args))
    src_props = _props(args, "source_property", "source_property_file")
    if args.src == "-" and not src_props and dst_be.caps & vd.Cap.FILE:
        src_props, dst_props = dst_props, {}
    src_cfg = _config(src_be, src_props)
    dst_cfg = _config(dst_be, dst_props, creating=bool(dst_be.caps & vd.Cap.FILE))
    _tune_malloc()
    src_flags = _flags(args, vd.OpenFlags.READ_ONLY)     # -U applies to read-only opens
    src_filters, paths = (cli_crypt.source_chain(args, args.src, src_be.name, src_flags)
                          if src_be.caps & vd.Cap.FILE else ([], [args.src]))
    dsts = vd.chain_target_names(args.dst, paths[::-1]) if args.chain else [args.dst]
    crypt = cli_crypt.new_filter(args, dsts)
    prog = TtyProgress("convert")
    try:
        with cli_crypt.keystore_written(dsts, crypt):
            vd.copy_image(args.src, args.dst, dst_be, src_format=src_be,
                          variant=_variant(args.variant),
                          new_size=_size(args.size) if args.size is not None else None,
                          keep_uuid=args.keep_uuid, as_chain=args.chain, src_config=src_cfg,
                          dst_config=dst_cfg, progress=prog, force_share=args.force_share,
                          allow_unsafe_paths=bool(args.allow_unsafe_paths),
                          sync=args.cache != "unsafe", src_filters=src_filters,
                          dst_filters=[crypt] if crypt else None)
    finally:
        prog.close()
    return 0


def _tune_malloc() -> None:
    """Long copies allocate a window-sized buffer per read; glibc's defaults hand those to mmap
    and trim freed memory, so every window page-faults afresh (a third of convert's system time).
    Keep such buffers in the heap for reuse. Best effort; a no-op outside glibc."""
    try:
        import ctypes
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
    mallopt(M_MMAP_THRESHOLD, 32 << 20)
    mallopt(M_TRIM_THRESHOLD, 256 << 20)
    mallopt(M_TOP_PAD, 64 << 20)


def cmd_compare(args) -> int:
    prog = TtyProgress("compare")
    try:
        with _open_chain(args, args.a, args.format) as da, \
                _open_chain(args, args.b, args.b_format) as db:
            r = vd.compare_disks(da, db, prog)
    finally:
        prog.close()
    in_tail = r.offset is not None and r.offset >= min(r.sizes)
    if r.size_mismatch and (r.identical or in_tail):
        _out("Warning: Image size mismatch!")
    if not r.identical:
        _out(f"Content mismatch at offset {r.offset}!")
        return 1
    _out("Images are identical.")
    return 0


def _image_backend(args, path) -> vd.Backend:
    return _backend_for(path, getattr(args, "format", None))


def _operation(args, path: str, name: str, needs, run):
    """What merge, resize, compact and check share: the backend of ``path`` must declare each
    operation of ``needs`` ((Operation, what) pairs; if not, one line and exit 1), then
    ``run(backend, progress)`` runs with a progress display. Returns (exit code, backend,
    run's result)."""
    be = _image_backend(args, path)
    for op, what in needs:
        if not be.can(op):
            return _unsupported(what, be), be, None
    prog = TtyProgress(name)
    try:
        return 0, be, run(be, prog)
    finally:
        prog.close()


def cmd_merge(args) -> int:
    return _operation(args, args.target, "merge", [(vd.Operation.WRITE, "merge")],
                      lambda be, prog: vd.merge(args.source, args.target, progress=prog))[0]


def cmd_resize(args) -> int:
    return _operation(args, args.image, "resize", [(vd.Operation.RESIZE, "resize")],
                      lambda be, prog: vd.resize(args.image, vd.resize_target(args.image, args.size,
                                                                        format=be.name),
                                                 format=be.name, progress=prog))[0]


def cmd_compact(args) -> int:
    return _operation(args, args.image, "compact", [(vd.Operation.COMPACT, "compact")],
                      lambda be, prog: vd.compact(args.image, format=be.name, progress=prog))[0]


def cmd_sparsify(args) -> int:
    if args.output_format and not args.into:
        raise CLIError("-O names the format of --into DST; give --into too")
    prog = None if args.dry_run else TtyProgress("sparsify")
    try:
        rep = vd.sparsify(args.image, format=getattr(args, "format", None),
                          dry_run=args.dry_run, into=args.into,
                          into_format=args.output_format, progress=prog,
                          dynamic=args.dynamic)
    except (vd.Refused, vd.ImageInUse) as exc:
        print(f"{PROG}: refused: {_one_line(str(exc))}", file=sys.stderr)
        return 2
    finally:
        if prog is not None:
            prog.close()
    if args.json:
        _json(rep.as_dict())
        return 0
    for v in rep.partitions:
        name = ("outside partitions" if v.number < 0 else "whole disk" if v.number == 0
                else f"partition {v.number}")
        what = v.filesystem or "unknown"
        if v.skipped:
            _out(f"{name} ({what}): skipped: {v.skipped}")
        else:
            _out(f"{name} ({what}): size {vd.format_size(v.size)}, used "
                 f"{vd.format_size(v.used)}, free {vd.format_size(v.free)}, gives back "
                 f"{vd.format_size(v.reclaimable)}")
    if rep.skipped_ranges:
        _out(f"{vd.format_size(rep.skipped_ranges)} of free space kept: the format cannot "
             "store 'reads zero' in a differencing image")
    if rep.offer:
        _out(f"note: {_one_line(rep.offer)}")
    if rep.after is None:
        _out(f"would give back up to {vd.format_size(rep.reclaimable)} "
             f"(allocated now {vd.format_size(rep.before)})")
    else:
        _out(f"freed {vd.format_size(max(rep.before - rep.after, 0))} (from "
             f"{vd.format_size(rep.before)} to {vd.format_size(rep.after)})")
    return 0


def cmd_check(args) -> int:
    needs = [(vd.Operation.CHECK, "check")]
    if args.repair and not args.dry_run:
        needs.append((vd.Operation.REPAIR, "repair"))
    code, be, report = _operation(
        args, args.image, "check", needs,
        lambda be, prog: vd.check(args.image, format=be.name, repair=args.repair,
                                  dry_run=args.dry_run, progress=prog, force_share=args.force_share,
                                  **({"backup": True} if args.backup else {})))
    if code:
        return code
    if args.json:
        _json({"image": args.image, "format": be.name,
               "problems": [p.as_dict() for p in report.problems],
               "corrupt": report.corrupt, "leaks": report.leaks, "repaired": report.repaired,
               "orphans": [{"file": f, "offset": o, "length": n} for f, o, n in report.orphans],
               "orphans_file": report.orphans_file, "backup": report.backup,
               "exit_code": report.exit_code})
    else:
        for p in report.problems:
            at = f" at offset {p.offset}" if p.offset is not None else ""
            fixed = " (repaired)" if p.repaired else ""
            _out(f"{p.severity}: {p.what}{at}{fixed}")
        _check_data_lines(args, report)
        if report.exit_code == 0:
            _out("No errors were found on the image." if not report.problems
                 else "All problems were repaired.")
        elif report.exit_code == 2:
            _out(f"{sum(1 for p in report.problems if p.severity == 'corrupt' and not p.repaired)}"
                 " errors were found on the image.")
        else:
            _out(f"{sum(1 for p in report.problems if p.severity == 'leak' and not p.repaired)}"
                 " leaked clusters were found on the image"
                 + (" (some hold data: a repair saves it first)." if report.orphans
                    else " (no data is lost)."))
    return report.exit_code


def _check_data_lines(args, report) -> None:
    """What a repair keeps: unreferenced data found, where it was saved, the backup."""
    if report.orphans:
        total = sum(n for _f, _o, n in report.orphans)
        _out(f"{len(report.orphans)} unreferenced area(s) hold data ({total} bytes)"
             + ("" if report.orphans_file else
                "; a repair saves them beside the image first (NAME.orphans-DATE.bin)"
                if args.repair else ""))
    if report.backup:
        _out(f"Backup of the image before the repair: {report.backup}")
    if report.orphans_file:
        _out(f"Unreferenced data saved to {report.orphans_file} "
             f"(index: {report.orphans_file[:-4]}.json)")
    if args.repair and args.dry_run and report.problems:
        for line in vd.describe_effects(report):
            _out(f"repair would: {line}")


def cmd_map(args) -> int:
    with _open_chain(args, args.image, args.format, props=_props(args), data=False) as d:
        runs = []
        # one allocation walk over the whole disk: its cost follows the metadata, not the size
        for e in d.allocation(0, d.size):
            r = {"start": e.start, "length": e.length,
                 "status": e.status.name.lower(),
                 "level": e.level,
                 "depth": None if e.level is None else len(d) - 1 - e.level,
                 "data": e.status == vd.Alloc.DATA,
                 "zero": e.status != vd.Alloc.DATA,
                 "file": None if e.level is None else d.image(e.level).location}
            if runs and runs[-1]["level"] == r["level"] and runs[-1]["status"] == r["status"] \
                    and runs[-1]["start"] + runs[-1]["length"] == r["start"]:
                runs[-1]["length"] += r["length"]
            else:
                runs.append(r)
    if args.json:
        _json(runs)
        return 0
    _out(f"{'Offset':>20} {'Length':>20} {'Status':<12} {'Level':>5}  File")
    for r in runs:
        lvl = "-" if r["level"] is None else str(r["level"])
        _out(f"{r['start']:#20x} {r['length']:#20x} {r['status']:<12} {lvl:>5}  {r['file'] or '-'}")
    return 0


def cmd_read(args) -> int:
    offset, length = _size(args.offset), _size(args.length)
    with _open_chain(args, args.image, args.format, props=_props(args)) as d:
        _attach_cache(args, d)
        if offset + length > d.size:
            raise vd.InvalidArgument(f"read of {length} bytes at {offset} is outside the disk "
                                     f"(size {d.size})")
        if args.output:
            if os.path.exists(args.output) and os.path.samefile(args.output, args.image):
                raise CLIError(f"{args.output}: output is the image itself")
            out = open(args.output, "wb")  # noqa: SIM115 - closed in the finally below
        else:
            out = sys.stdout.buffer
        try:
            pos, end = offset, offset + length
            while pos < end:
                n = min(CHUNK, end - pos)
                out.write(d.read(pos, n))
                pos += n
            out.flush()
        finally:
            if args.output:
                out.close()
    return 0


def cmd_write(args) -> int:
    offset = _size(args.offset)
    src = sys.stdin.buffer if args.input == "-" else None
    if src is None:
        try:
            src = open(args.input, "rb")  # noqa: SIM115 - closed in the finally below
        except OSError as exc:
            raise CLIError(f"{args.input}: cannot read: {exc.strerror or exc}") from None
    try:
        with _open_chain(args, args.image, args.format, flags=vd.OpenFlags.NORMAL,
                         props=_props(args)) as d:
            _attach_cache(args, d)
            if args.input != "-":
                n = os.fstat(src.fileno()).st_size
                if offset + n > d.size:
                    raise vd.InvalidArgument(f"write of {n} bytes at {offset} is outside the disk "
                                             f"(size {d.size})")
            pos = offset
            while True:
                data = src.read(CHUNK)
                if not data:
                    break
                d.write(pos, data)
                pos += len(data)
            d.flush()
    finally:
        if src is not sys.stdin.buffer:
            src.close()
    return 0


def cmd_set(args) -> int:
    be = _backend_for(args.image, args.format)
    _check_location(args.image, be)
    cfg = _config(be, _props(args))
    if cli_crypt.rewrapped(args, be, cfg, _flags(args)):     # VirtualBox's key store
        return 0
    if not any((args.uuid, args.parent_uuid, args.comment is not None, args.pchs, args.lchs,
                args.new_passphrase_file)):
        raise CLIError("set needs one of --uuid, --parent-uuid, --comment, --pchs, --lchs, "
                       "--new-passphrase-file")

    def parse_uuid(text, option):
        if text.lower() == "new":
            return uuidlib.uuid4()
        return _uuid_arg(text, option)

    uid = parse_uuid(args.uuid, "--uuid") if args.uuid else None
    puid = parse_uuid(args.parent_uuid, "--parent-uuid") if args.parent_uuid else None
    pchs, lchs = _geometry(args.pchs), _geometry(args.lchs)
    img = be.open(args.image, _flags(args), cfg)
    try:
        if uid:
            img.set_uuid(uid)
        if puid:
            if not img.is_diff:
                raise vd.InvalidArgument(f"{args.image}: not a differencing image; it has no "
                                         "parent UUID")
            img.set_parent_uuid(puid)
        if args.comment is not None:
            img.set_comment(args.comment)
        if pchs:
            img.set_pchs(pchs)
        if lchs:
            img.set_lchs(lchs)
        if args.new_passphrase_file:
            img.change_passphrase()
        img.flush()
    finally:
        img.close()
    return 0


# -- looking inside a disk (issue #15) ---------------------------------------------------------
def _top_index(d: vd.Disk, text: str | None) -> int:
    """--top: a chain member by index (0 = base, -1 = top) or by its file name."""
    if text is None:
        return len(d) - 1
    try:
        i = int(text)
    except ValueError:
        real = os.path.realpath(text)
        for i, img in enumerate(d.images):
            if os.path.realpath(img.location) == real:
                return i
        raise CLIError(f"--top {text}: not a member of this chain "
                       f"({', '.join(img.location for img in d.images)})") from None
    if not -len(d) <= i < len(d):
        raise CLIError(f"--top {i}: the chain has {len(d)} images (0 = base .. {len(d) - 1})")
    return i % len(d)


def cmd_partitions(args) -> int:
    with _open_chain(args, args.image, args.format, props=_props(args)) as d:
        layout = vd.disk_layout(d, _top_index(d, args.top))
    parts = [{"number": p.number, "start": p.start, "size": p.size, "type": p.type,
              "type_name": p.type_name, "name": p.name, "filesystem": p.filesystem,
              "label": p.label, "uuid": p.uuid, "attributes": p.attributes, "guid": p.guid,
              "bootable": p.bootable} for p in layout.partitions]
    if args.json:
        _json({"scheme": layout.scheme, "disk_guid": layout.disk_guid, "partitions": parts,
               "problems": layout.problems})
        return 0
    _out(f"Scheme: {layout.scheme}" + (f"  (disk GUID {layout.disk_guid})"
                                       if layout.disk_guid else ""))
    _out(f"{'#':>3} {'Start':>14} {'Size':>10}  {'Type':<28} {'FS':<9} {'Label':<16} UUID")
    for p in parts:
        typ = p["type_name"] + (f" ({p['name']})" if p["name"] else "")
        _out(f"{p['number']:>3} {p['start']:>14} {vd.format_size(p['size']):>10}  {typ:<28} "
             f"{p['filesystem'] or '-':<9} {p['label'] or '-':<16} {p['uuid'] or '-'}")
    for prob in layout.problems:
        _out(f"problem: {prob}")
    return 0


def _volume(args, d: vd.Disk, spec: str):
    """(FileSystem, path, prefix) for IMAGE [N:]PATH."""
    import re
    m = re.match(r"^(\d+):(.*)$", spec)
    number, path = (int(m.group(1)), m.group(2) or "/") if m else (None, spec or "/")
    part, fs = vd.open_volume(d, number, _top_index(d, args.top))
    return fs, path, (f"{part.number}:" if part.number else "")


def _entry_json(e, prefix=""):
    return {"path": prefix + e.path, "type": e.type, "size": e.size, "mtime": e.mtime,
            **({"target": e.target} if e.type == "symlink" else {})}


def cmd_ls(args) -> int:
    import time
    with _open_chain(args, args.image, args.format, props=_props(args)) as d:
        fs, path, _ = _volume(args, d, args.path)
        top = fs.stat(path)
        if top.type != "dir":
            entries = [top]
        else:
            entries = list(fs.walk(path)) if args.recursive else fs.listdir(path)
    if args.json:
        _json({"entries": [_entry_json(e) for e in entries]})
        return 0
    for e in entries:
        when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(e.mtime)) if e.mtime is not None \
            else "-"
        tag = {"dir": "d", "symlink": "l", "file": "-"}.get(e.type, "?")
        name = e.path + (f" -> {e.target}" if e.type == "symlink" else "")
        _out(f"{tag} {e.size:>14} {when}  {name}")
    return 0


def cmd_cat(args) -> int:
    with _open_chain(args, args.image, args.format, props=_props(args)) as d:
        fs, path, _ = _volume(args, d, args.path)
        out = sys.stdout.buffer
        with fs.open(path) as f:
            while True:
                chunk = f.read(1 << 20)
                if not chunk:
                    break
                out.write(chunk)
        out.flush()
    return 0


def cmd_extract(args) -> int:
    with _open_chain(args, args.image, args.format, props=_props(args)) as d:
        fs, path, _ = _volume(args, d, args.path)
        dest = args.dest
        tty = sys.stderr.isatty()

        def progress(done, total):
            if tty and done:
                sys.stderr.write(f"\rextracting: {done * 100 // max(total, 1):3d}% "
                                 f"of {vd.format_size(total)}")
                sys.stderr.flush()

        vd.extract_tree(fs, path, dest, progress,
                        into=os.path.isdir(dest) and not os.path.islink(dest))
        if tty:
            sys.stderr.write("\n")
    return 0


def cmd_changed(args) -> int:
    with _open_chain(args, args.image, args.format, props=_props(args)) as d:
        rep = vd.changed(d, _top_index(d, args.top))
    if args.json:
        _json({"files": [{"path": c.path, "change": c.change} for c in rep.files],
               "metadata": [{"path": c.path, "change": c.change} for c in rep.metadata],
               "problems": rep.problems, "not_covered": rep.not_covered})
        return 0
    for c in rep.files:
        _out(f"{c.change:<9} {c.path}")
    for c in rep.metadata:
        _out(f"{c.change:<9} {c.path}  (metadata only)")
    for text in rep.problems + rep.not_covered:
        _out(f"note: {text}")
    return 0


# -- dispatch ---------------------------------------------------------------------------------
COMMANDS = {       # cli_parser's commands -> what runs them
    "info": cmd_info,
    "backends": cmd_backends,
    "create": cmd_create,
    "create-floppy": cmd_create_floppy,
    "create-iso": cmd_create_iso,
    "create-rawvmdk": cmd_create_rawvmdk,
    "convert": cmd_convert,
    "compare": cmd_compare,
    "merge": cmd_merge,
    "resize": cmd_resize,
    "compact": cmd_compact,
    "sparsify": cmd_sparsify,
    "check": cmd_check,
    "map": cmd_map,
    "partitions": cmd_partitions,
    "ls": cmd_ls,
    "cat": cmd_cat,
    "extract": cmd_extract,
    "changed": cmd_changed,
    "read": cmd_read,
    "write": cmd_write,
    "set": cmd_set,
}


def _one_line(text: str) -> str:
    # the user's paths, never a temporary name; undecodable bytes of names as \xNN
    return " ".join(vd.printable(vd.user_path(str(text))).split()) or "error"


def main(argv: list[str] | None = None) -> int:
    args = None
    try:
        for problem in vd.load_plugins().problems:     # reported, skipped, never fatal
            print(f"{PROG}: warning: {_one_line(str(problem))}", file=sys.stderr)
        args = parse_args(argv, COMMANDS)
        if not hasattr(args, "allow_unsafe_paths"):
            args.allow_unsafe_paths = False
        with cli_crypt.passphrases(args) as provider, vd.using_passphrases(provider):
            return COMMANDS[args.command](args)
    except SystemExit as exc:        # --help / --version
        return exc.code if isinstance(exc.code, int) else 0
    except CLIError as exc:
        msg = str(exc)
    except vd.Cancelled:
        msg = "cancelled"
    except KeyboardInterrupt:
        msg = "interrupted"
    except vd.PassphraseRequired as exc:
        msg = f"{exc} (give it with --passphrase-file FILE)"
    except vd.VDError as exc:
        msg = str(exc)
    except BrokenPipeError:
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - stdout until exit
        except OSError:
            pass
        return 1
    except OSError as exc:
        msg = f"{getattr(exc, 'filename', None) or ''}" \
              f"{': ' if getattr(exc, 'filename', None) else ''}" \
              f"{exc.strerror or exc}"
    except Exception as exc:
        msg = f"internal error: {type(exc).__name__}: {exc}"
    try:
        sys.stdout.flush()
    except Exception:
        pass
    print(f"{PROG}: {_one_line(msg)}", file=sys.stderr)
    return getattr(args, "error_status", 1)


if __name__ == "__main__":
    sys.exit(main())
