"""The VMDK text descriptor: parse, query, edit and print it back, keeping every line we do not
change (comments, blank lines, unknown keys) exactly as it was.

Facts from VMware's "Virtual Disk Format 1.1 / 5.0" notes: a descriptor has three parts —
a header (``version``, ``CID``, ``parentCID``, ``createType``, ``parentFileNameHint``...), the
extent descriptions (``RW 20480 SPARSE "disk.vmdk"``; access RW/RDONLY/NOACCESS, size in
sectors, type FLAT/SPARSE/ZERO/VMFS/VMFSSPARSE/VMFSRDM/VMFSRAW/SESPARSE, a quoted file name and,
for flat extents, the offset in sectors inside that file) and the disk database (``ddb.*``
keys). Lines starting with ``#`` are comments.
"""
from __future__ import annotations

import codecs
import re
from dataclasses import dataclass

from ...errors import CorruptImage
from . import MAX_DESCRIPTOR_BYTES as MAX_DESCRIPTOR_BYTES  # the declaration's (its probe's)

MAX_EXTENTS = 32768                 # 64 TiB in 2 GiB pieces; more is absurd
NO_PARENT_CID = 0xFFFFFFFF

ACCESS = ("RW", "RDONLY", "NOACCESS")
EXTENT_TYPES = ("SPARSE", "FLAT", "ZERO", "VMFS", "VMFSSPARSE", "VMFSRDM", "VMFSRAW", "SESPARSE")

_EXTENT_RE = re.compile(
    r'^(?P<access>RW|RDONLY|NOACCESS)\s+(?P<sectors>\d+)\s+(?P<type>[A-Za-z]+)'
    r'(?:\s+(?:"(?P<qname>[^"]*)"|(?P<name>[^"\s]+))(?:\s+(?P<offset>\d+))?)?(?P<rest>\s.*)?$')
_ENCODING_RE = re.compile(rb'^\s*encoding\s*=\s*"?([A-Za-z0-9_.\-]{1,40})"?\s*$', re.MULTILINE)
_KEY_RE = re.compile(r'^(?P<key>[A-Za-z0-9_.\-]+)\s*=\s*(?P<value>.*?)\s*$')


@dataclass
class ExtentLine:
    access: str
    sectors: int
    type: str
    filename: str | None = None
    offset: int = 0            # sectors into the file (FLAT / VMFS)

    def text(self) -> str:
        if self.filename is None:
            return f"{self.access} {self.sectors} {self.type}"
        s = f'{self.access} {self.sectors} {self.type} "{self.filename}"'
        if self.type == "FLAT" or self.offset:
            s += f" {self.offset}"
        return s


@dataclass
class _Line:
    kind: str                   # "blank", "comment", "header", "extent", "ddb"
    raw: str                    # the original text (without the line ending)
    key: str | None = None
    value: str | None = None
    quoted: bool = False
    extent: ExtentLine | None = None
    dirty: bool = False

    def text(self) -> str:
        if not self.dirty:
            return self.raw
        if self.extent is not None:             # the extent lines
            return self.extent.text()
        if self.kind == "ddb":
            return f'{self.key} = "{self.value}"'
        if self.kind == "header":
            return f'{self.key}="{self.value}"' if self.quoted else f"{self.key}={self.value}"
        return self.raw


def _unquote(v: str) -> tuple[str, bool]:
    if len(v) >= 2 and v[0] == '"' and v[-1] == '"':
        return v[1:-1], True
    return v, False


class Descriptor:
    """A parsed descriptor. ``path`` is used in error messages only."""

    def __init__(self, lines: list[_Line], path: str, newline: str = "\n",
                 encoding: str = "utf-8"):
        self.lines = lines
        self.path = path
        self.newline = newline
        self.encoding = encoding        # the codec the text is read and written with

    # -- parsing ---------------------------------------------------------------------------
    @classmethod
    def parse(cls, data: bytes | str, path: str = "descriptor") -> Descriptor:
        if isinstance(data, bytes):
            if len(data) > MAX_DESCRIPTOR_BYTES:
                raise CorruptImage("descriptor is too large", path=path,
                                   expected=f"at most {MAX_DESCRIPTOR_BYTES} bytes",
                                   found=f"{len(data)} bytes")
            data = data.split(b"\x00", 1)[0]
            encoding = "utf-8"
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                # VMware writes the host's code page when 'encoding' names one (e.g. windows-1252)
                em = _ENCODING_RE.search(data)
                try:
                    if em is None:
                        raise LookupError
                    encoding = codecs.lookup(em.group(1).decode("ascii")).name
                    text = data.decode(encoding)
                except (LookupError, UnicodeDecodeError):
                    raise CorruptImage(f"descriptor is not UTF-8 text (bad byte at {exc.start}) "
                                       "and names no usable encoding", path=path) from None
        else:
            text = data
            encoding = "utf-8"
            if len(text) > MAX_DESCRIPTOR_BYTES:
                raise CorruptImage("descriptor is too large", path=path,
                                   expected=f"at most {MAX_DESCRIPTOR_BYTES} bytes",
                                   found=f"{len(text)} bytes")
        bom = text.startswith("\ufeff")
        if bom:
            text = text[1:]
        newline = "\r\n" if "\r\n" in text else "\n"
        raw_lines = text.split("\n")
        if raw_lines and raw_lines[-1] == "":
            raw_lines.pop()
        lines: list[_Line] = []
        n_extents = 0
        for no, raw in enumerate(raw_lines, 1):
            raw = raw.rstrip("\r")
            s = raw.strip()
            if not s:
                lines.append(_Line("blank", raw))
                continue
            if s.startswith("#"):
                lines.append(_Line("comment", raw))
                continue
            if any(ord(c) < 32 and c != "\t" for c in s):
                raise CorruptImage(f"descriptor line {no} contains control characters: {s[:60]!r}",
                                   path=path)
            word = s.split(None, 1)[0]
            if word in ACCESS:
                m = _EXTENT_RE.match(s)
                if not m:
                    raise CorruptImage(f"descriptor line {no}: malformed extent description "
                                       f"{s[:80]!r}", path=path,
                                       expected='ACCESS SECTORS TYPE ["FILE" [OFFSET]]',
                                       found=s[:80])
                etype = m.group("type").upper()
                if etype not in EXTENT_TYPES:
                    raise CorruptImage(
                        f"descriptor line {no}: unknown extent type {etype!r}",
                        path=path,
                        expected="/".join(EXTENT_TYPES),
                        found=etype,
                    )
                name = m.group("qname") if m.group("qname") is not None else m.group("name")
                sectors = int(m.group("sectors"))
                offset = int(m.group("offset") or 0)
                if sectors > 1 << 48 or offset > 1 << 48:
                    raise CorruptImage(
                        f"descriptor line {no}: extent size or offset out of range",
                        path=path,
                        expected="< 2^48 sectors",
                        found=f"{sectors} / {offset}",
                    )
                if etype != "ZERO" and not name:
                    raise CorruptImage(
                        f"descriptor line {no}: {etype} extent without a file name", path=path
                    )
                n_extents += 1
                if n_extents > MAX_EXTENTS:
                    raise CorruptImage(
                        "descriptor lists too many extents",
                        path=path,
                        expected=f"at most {MAX_EXTENTS}",
                        found="more",
                    )
                ext = ExtentLine(m.group("access"), sectors, etype, name, offset)
                lines.append(_Line("extent", raw, extent=ext))
                continue
            m = _KEY_RE.match(s)
            if not m:
                raise CorruptImage(
                    f"descriptor line {no}: expected 'key = value', an extent or a "
                    f"comment, found {s[:80]!r}",
                    path=path,
                )
            key = m.group("key")
            value, quoted = _unquote(m.group("value"))
            kind = "ddb" if key.lower().startswith("ddb.") else "header"
            lines.append(_Line(kind, raw, key=key, value=value, quoted=quoted))
        d = cls(lines, path, newline, encoding)
        d.bom = bom
        if not d.extents:
            raise CorruptImage("descriptor lists no extents", path=path)
        return d

    # -- printing --------------------------------------------------------------------------
    bom = False

    def text(self) -> str:
        body = "".join(line.text() + self.newline for line in self.lines)
        return "\ufeff" + body if self.bom else body

    def to_bytes(self) -> bytes:
        try:
            return self.text().encode(self.encoding)
        except UnicodeEncodeError as exc:
            raise CorruptImage(
                f"descriptor text cannot be written in its encoding {self.encoding}: {exc.reason}",
                path=self.path,
            ) from None

    # -- queries ---------------------------------------------------------------------------
    @property
    def extents(self) -> list[ExtentLine]:
        return [ln.extent for ln in self.lines if ln.extent is not None]

    def _find(self, key: str, kind: str) -> _Line | None:
        lk = key.lower()
        for ln in self.lines:
            if ln.kind == kind and ln.key is not None and ln.key.lower() == lk:
                return ln
        return None

    def get(self, key: str, default: str | None = None) -> str | None:
        ln = self._find(key, "ddb" if key.lower().startswith("ddb.") else "header")
        return ln.value if ln is not None else default

    def get_int(self, key: str, base: int = 10) -> int | None:
        v = self.get(key)
        if v is None or v == "":
            return None
        try:
            return int(v, base)
        except ValueError:
            raise CorruptImage(
                f"descriptor key '{key}' is not a{' hexadecimal' if base == 16 else 'n'} integer",
                path=self.path,
                expected="an integer",
                found=repr(v),
            ) from None

    def set(self, key: str, value: str, *, quoted: bool | None = None) -> None:
        """Set a header or ddb key (added at the end of its section when new)."""
        is_ddb = key.lower().startswith("ddb.")
        kind = "ddb" if is_ddb else "header"
        ln = self._find(key, kind)
        if ln is not None:
            if ln.value != value:
                ln.value = value
                if quoted is not None:
                    ln.quoted = quoted
                ln.dirty = True
            return
        new = _Line(kind, "", key=key, value=value, quoted=bool(quoted), dirty=True)
        idx = [i for i, x in enumerate(self.lines) if x.kind == kind]
        if idx:
            self.lines.insert(idx[-1] + 1, new)
        elif is_ddb:
            self.lines.append(new)
        else:  # before the first extent (and the comment block right above it)
            first = next(i for i, x in enumerate(self.lines) if x.kind == "extent")
            while first > 0 and self.lines[first - 1].kind in ("comment", "blank"):
                first -= 1
            self.lines.insert(first, new)

    def remove(self, key: str) -> None:
        kind = "ddb" if key.lower().startswith("ddb.") else "header"
        ln = self._find(key, kind)
        if ln is not None:
            self.lines.remove(ln)

    def extent_lines(self) -> list[_Line]:
        return [ln for ln in self.lines if ln.kind == "extent"]

    def set_extent(self, index: int, ext: ExtentLine) -> None:
        ln = self.extent_lines()[index]
        ln.extent = ext
        ln.dirty = True

    def add_extent(self, ext: ExtentLine) -> None:
        last = self.extent_lines()[-1]
        i = self.lines.index(last)
        self.lines.insert(i + 1, _Line("extent", "", extent=ext, dirty=True))


def build(
    header: list[tuple[str, str, bool]],
    extents: list[ExtentLine],
    ddb: list[tuple[str, str]],
    path: str = "descriptor",
) -> Descriptor:
    """A new descriptor in the layout VMware, VirtualBox and qemu write."""
    out = ["# Disk DescriptorFile"]
    for k, v, q in header:
        out.append(f'{k}="{v}"' if q else f"{k}={v}")
    out += ["", "# Extent description"]
    out += [e.text() for e in extents]
    out += ["", "# The Disk Data Base", "#DDB", ""]
    out += [f'{k} = "{v}"' for k, v in ddb]
    return Descriptor.parse("\n".join(out) + "\n", path)


def new_cid(old: int | None = None) -> int:
    import random  # here: only a write needs it (start-up)

    while True:
        c = random.getrandbits(32)
        if c not in (NO_PARENT_CID, 0xFFFFFFFE, old):
            return c
