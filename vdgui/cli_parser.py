"""vdgui-img's command line: the argparse parser (commands, options, help texts). The commands
themselves are in :mod:`vdgui.cli`, chosen by the parsed ``command``."""
from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Container

PROG = "vdgui-img"


class CLIError(Exception):
    """A usage error found by the CLI itself (exit 1, one line)."""


def _columns() -> int:
    """shutil.get_terminal_size's columns (COLUMNS, else the terminal, else 80), without
    importing shutil and its compression modules into every start of vdgui-img."""
    try:
        cols = int(os.environ.get("COLUMNS", "0"))
    except ValueError:
        cols = 0
    if cols <= 0:
        try:
            cols = os.get_terminal_size(sys.__stdout__.fileno()).columns
        except (AttributeError, ValueError, OSError):
            cols = 0
    return cols or 80


class Formatter(argparse.HelpFormatter):
    """argparse's help formatter; its width (argparse's default: terminal columns - 2) found
    without shutil. argparse makes one for every add_argument, not only for --help."""

    def __init__(self, prog, indent_increment=2, max_help_position=24, width=None):
        super().__init__(prog, indent_increment, max_help_position,
                         _columns() - 2 if width is None else width)


class Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message):  # one line, exit 1 (argparse would print usage and exit 2)
        raise CLIError(message)


class VersionAction(argparse.Action):
    """--version, with the version looked up only when asked for."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS,
                 help="show the program's version and exit"):
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        import vdgui
        print(f"{PROG} {vdgui.__version__}")
        parser.exit()


class _LeftOut:
    """A command left out of a parser built for another one: its definitions go nowhere."""

    def __getattr__(self, name):
        return lambda *a, **kw: self


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or (``only``) of that command alone: what it accepts, it
    parses the same way (vdgui-img's start-up builds ~20 subparsers otherwise)."""
    common = Parser(add_help=False)
    common.add_argument("--allow-unsafe-paths", action="store_true", default=argparse.SUPPRESS,
                        help="follow absolute, '..' and device names stored inside images")

    def props(p, source=False):
        p.add_argument("--property", action="append", metavar="K=V",
                       help="backend configuration key (repeatable)")
        p.add_argument("--property-file", action="append", metavar="K=PATH",
                       help="backend configuration key read from a file (keeps secrets out of ps)")
        if source:
            p.add_argument("--source-property", action="append", metavar="K=V",
                           help="configuration key of the source backend")
            p.add_argument("--source-property-file", action="append", metavar="K=PATH")

    ap = Parser(prog=PROG, parents=[common],
                 description="Inspect, create, convert and repair virtual disk images.")
    ap.add_argument("--version", action=VersionAction)
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True

    def add(name, **kw):         # sub.add_parser, leaving out every command but ``only``
        return sub.add_parser(name, **kw) if only in (None, name) else _LeftOut()

    def force_share(p):
        p.add_argument("-U", "--force-share", action="store_true",
                       help="open without the shared lock, as qemu-img -U: works while another "
                            "program writes the image (what is read may then be inconsistent)")

    def cache_image(p, create=True):
        p.add_argument("--cache-image", metavar="FILE",
                       help="a VCI cache image in front of the disk (VDCacheOpen): reads fill "
                            "it, writes go through; it remembers which disk it belongs to")
        if create:
            p.add_argument("--cache-size", metavar="SIZE",
                           help="create the cache image with this size when it does not exist")
        p.add_argument("--cache-reset", action="store_true",
                       help="empty a cache image that was not closed cleanly, then use it")

    p = add("info", parents=[common], help="show an image's metadata")
    p.add_argument("-f", "--format")
    force_share(p)
    p.add_argument("--json", action="store_true")
    p.add_argument("--chain", action="store_true", help="every image of the chain, base first")
    cache_image(p, create=False)
    props(p)
    p.add_argument("image")

    p = add("backends", parents=[common], help="list the formats this build supports")
    p.add_argument("--json", action="store_true")
    p.add_argument("--filters", action="store_true",
                   help="list the filters (e.g. CRYPT) instead, in the same shape")

    p = add("create", parents=[common], help="create a new image")
    p.add_argument("-f", "--format", required=True)
    p.add_argument(
        "--variant", help="dynamic (default), fixed, split2g, stream, esx; comma-separated"
    )
    p.add_argument("--size")
    p.add_argument("--parent", help="create a differencing image over PARENT's chain")
    p.add_argument("--parent-format", help=argparse.SUPPRESS)
    p.add_argument("--uuid")
    p.add_argument("--comment")
    props(p)
    p.add_argument("image")

    def media_sources(p, what):
        p.add_argument("--from", dest="from_dirs", action="append", default=[], metavar="DIR",
                       help=f"put the contents of DIR at the root of the {what} (repeatable)")
        p.add_argument("--add", action="append", default=[], metavar="PATH",
                       help=f"put the file or folder PATH at the root of the {what} under its "
                            "own name (repeatable)")

    p = add("create-floppy", parents=[common],
                       help="create a formatted FAT12 floppy image, optionally filled")
    p.add_argument("--size", default="1.44M",
                   help="1.44M (default), 720K, 2.88M, 1.2M or 360K")
    p.add_argument("--label", help="volume label (up to 11 characters)")
    media_sources(p, "floppy")
    p.add_argument("image")

    p = add("create-iso", parents=[common],
                       help="create an ISO9660 image (Joliet, Rock Ridge) from files and folders")
    p.add_argument("--label", help="volume label (up to 32 characters, stored upper case)")
    media_sources(p, "disc")
    p.add_argument("image")

    p = add("create-rawvmdk", parents=[common],
            help="create a VMDK that gives a VM a host drive or some of its "
                 "partitions (VirtualBox's RawDisk variant)",
            description="Create IMAGE, a VMDK over the host drive DEV: the whole "
            "drive, or only --partitions (the others read zero in the VM; the "
            "partition tables are copied beside IMAGE as IMAGE-pt.vmdk). The VM "
            "writes to the real disk: never expose a partition the host has "
            "mounted (refused). The drive is only read here.")
    p.add_argument("--raw-drive", required=True, metavar="DEV",
                   help="the host drive, a block device such as /dev/sdb")
    p.add_argument("--partitions", metavar="N,N...",
                   help="partition numbers to expose, e.g. 1,3,5 (see: vdgui-img partitions "
                        "DEV); default: the whole drive")
    p.add_argument("--relative", action="store_true",
                   help="map the partitions through their own devices (/dev/sdb2), not the "
                        "whole drive")
    p.add_argument("--boot-sector", metavar="FILE",
                   help="boot code for the VM's copy of the MBR (up to 512 bytes; the first "
                        "440 are used, the host's partition table is kept)")
    p.add_argument("image")

    p = add("convert", parents=[common], help="copy an image into another format")
    p.add_argument("-f", "--format", help="source format (probed when absent)")
    force_share(p)
    p.add_argument("-O", "--output-format", required=True)
    p.add_argument("--variant")
    p.add_argument("--size", help="size of the target (grow; shrink only over zeroes)")
    p.add_argument(
        "--chain",
        action="store_true",
        help="copy the chain as a chain: DST is the copy of the top (SRC itself, what a "
        "VM attaches); each image below it is written beside DST as "
        "<DST stem>-<its own stem>.<ext>; every image keeps its own size",
    )
    p.add_argument("--keep-uuid", action="store_true")
    p.add_argument(
        "-t",
        "--cache",
        choices=("writeback", "unsafe"),
        default="writeback",
        help="writeback (default): the target is on disk (fsync) before it is renamed "
        "into place; unsafe: do not wait for the disk, as qemu-img convert does "
        "by default (faster; a power loss soon after can lose the copy)",
    )
    props(p, source=True)
    p.add_argument("src")
    p.add_argument("dst")

    p = add("compare", parents=[common], help="compare the content of two images")
    p.add_argument("-f", "--format", help="format of A")
    force_share(p)
    p.add_argument("-F", "--b-format", help="format of B")
    p.add_argument("a")
    p.add_argument("b")
    p.set_defaults(error_status=2)  # 0 same, 1 different, 2 error (as qemu)

    p = add("merge", parents=[common], help="merge SOURCE into TARGET (one chain)")
    p.add_argument("-f", "--format", help="format of TARGET")
    p.add_argument("source")
    p.add_argument("target")

    p = add("resize", parents=[common], help="change an image's virtual size")
    p.add_argument("-f", "--format")
    p.add_argument("image")
    p.add_argument(
        "size",
        help="new virtual size (bytes, or with K/M/G/T), or +SIZE / -SIZE to grow or shrink "
        "by that much (as qemu-img resize); shrinking needs a "
        "part cut off that reads zero and a format that can shrink (backends --json: "
        "can_shrink)",
    )

    p = add("compact", parents=[common], help="give unused space back")
    p.add_argument("-f", "--format")
    p.add_argument("image")

    p = add(
        "sparsify",
        parents=[common],
        help="give back the space the guest's file systems do not use (exit 0 "
        "done, 2 refused for safety, 1 other error)",
    )
    p.add_argument("-f", "--format")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="change nothing; report per partition what would be given back",
    )
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--into",
        metavar="DST",
        help="write the result into a new image DST "
        "(IMAGE is not changed; needed for an image with children)",
    )
    p.add_argument(
        "-O", dest="output_format", metavar="FMT", help="format of DST (default: IMAGE's)"
    )
    p.add_argument(
        "--dynamic",
        action="store_true",
        help="a fixed image: replace it with its dynamic variant, sparsified (through a "
        "copy beside it); without it a fixed image keeps its size (VDI: holes in the file)",
    )
    p.add_argument("image")

    p = add(
        "check", parents=[common], help="check consistency (exit 0 clean, 2 corrupt, 3 leaks only)"
    )
    p.add_argument("-f", "--format")
    force_share(p)
    p.add_argument(
        "--repair",
        action="store_true",
        help="fix what can be fixed; unreferenced blocks that hold data are saved "
        "beside the image first (NAME.orphans-DATE.bin, index .json)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="with --repair: say what would be fixed and kept, change nothing",
    )
    p.add_argument(
        "--backup",
        action="store_true",
        help="with --repair: copy the image's file(s) into NAME.backup-DATE/ beside "
        "it before repairing",
    )
    p.add_argument("--json", action="store_true")
    p.add_argument("image")

    p = add("map", parents=[common], help="allocation runs and which image holds each")
    p.add_argument("-f", "--format")
    force_share(p)
    p.add_argument("--json", action="store_true")
    props(p)
    p.add_argument("image")

    p = add(
        "partitions", parents=[common], help="partition table, file systems, labels and UUIDs"
    )
    p.add_argument("-f", "--format")
    force_share(p)
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--top",
        metavar="N|FILE",
        help="read the disk as seen at this chain member (0 = base, -1 = top, or its file name)",
    )
    props(p)
    p.add_argument("image")

    def inside(name, help, json=True):
        p = add(name, parents=[common], help=help)
        p.add_argument("-f", "--format")
        force_share(p)
        if json:
            p.add_argument("--json", action="store_true")
        p.add_argument(
            "--top",
            metavar="N|FILE",
            help="read the disk as seen at this chain "
            "member (0 = base, -1 = top, or its file name)",
        )
        props(p)
        p.add_argument("image")
        return p

    p = inside("ls", "list a folder inside the disk ([N:]PATH, N the partition number)")
    p.add_argument("-R", "--recursive", action="store_true")
    p.add_argument("path", nargs="?", default="/", metavar="[N:]PATH")
    p = inside("cat", "write a file inside the disk to stdout", json=False)
    p.add_argument("path", metavar="[N:]PATH")
    p = inside("extract", "copy a file or folder tree out of the disk", json=False)
    p.add_argument("path", metavar="[N:]PATH")
    p.add_argument("dest")
    p = inside("changed", "the files a differencing image changed compared with its parent")

    p = add("read", parents=[common], help="read bytes from the image's chain")
    p.add_argument("-f", "--format")
    force_share(p)
    p.add_argument("image")
    p.add_argument("--offset", required=True)
    p.add_argument("--length", required=True)
    p.add_argument("--output")
    cache_image(p)
    props(p)

    p = add("write", parents=[common], help="write a file's bytes into the chain's top")
    p.add_argument("-f", "--format")
    p.add_argument("image")
    p.add_argument("--offset", required=True)
    p.add_argument("--input", required=True)
    cache_image(p)
    props(p)

    p = add("set", parents=[common], help="change UUIDs, comment or geometry")
    p.add_argument("-f", "--format")
    p.add_argument("image")
    p.add_argument("--uuid", help="a UUID, or 'new'")
    p.add_argument("--parent-uuid")
    p.add_argument("--comment")
    p.add_argument("--pchs", metavar="C,H,S")
    p.add_argument("--lchs", metavar="C,H,S")
    props(p)

    # encrypted images (issue #17): every command that opens an image takes the passphrases
    for name, p in sub.choices.items():
        if name != "backends":
            p.add_argument("--passphrase-file", action="append", metavar="FILE",
                           help="passphrase of an encrypted image, the file's content without "
                                "its final newline (repeatable: each is tried on every "
                                "encrypted member of the chain)")
    for name in ("create", "convert"):
        sub.choices.get(name, _LeftOut()).add_argument(
            "--encrypt", metavar="KIND",
            help="encrypt the new image: luks (QCOW2 and LUKS images: qemu's LUKS), or "
                 "vbox-aes-xts256 or vbox-aes-xts128 (VirtualBox's disk encryption; its key "
                 "store is written beside the image as IMAGE.keystore)")
    for name in ("create", "convert", "set"):
        sub.choices.get(name, _LeftOut()).add_argument(
            "--new-passphrase-file", metavar="FILE",
            help="passphrase to encrypt with (create/convert --encrypt) or to change to (set: "
                 "LUKS adds a keyslot for it, then removes the one --passphrase-file opens)")
    for name, p in sub.choices.items():
        if name not in ("backends", "merge", "resize", "compact", "check", "sparsify"):
            p.add_argument("--keystore", action="append", metavar="FILE",
                           help="VirtualBox key store of an encrypted image: a VirtualBox.xml or "
                                ".vbox (the medium of the image), an IMAGE.keystore file or the "
                                "base64 key store (default: IMAGE.keystore beside each image of "
                                "the chain)")
    return ap


# a negative size at the end of 'resize' (-1G, -512M): shrink by, never an option
_SHRINK_BY = re.compile(r"-\d+(\.\d+)?\s*[A-Za-z]*")


def parse_args(argv: list[str] | None, commands: Container[str]) -> argparse.Namespace:
    """Parse with the parser of the named command alone (start-up); help, --version and any
    error go through the parser of every command, which words them as always."""
    words = sys.argv[1:] if argv is None else list(argv)
    cmd = next((w for w in words if not w.startswith("-")), None)
    if cmd == "resize" and len(words) > 1 and _SHRINK_BY.fullmatch(words[-1]) \
            and "--" not in words:
        words.insert(len(words) - 1, "--")   # 'resize IMG -1G': a size, not an option
    if cmd in commands and not {"-h", "--help", "--version"} & set(words):
        try:
            return build_parser(only=cmd).parse_args(words)
        except CLIError:
            pass
    return build_parser().parse_args(words)
