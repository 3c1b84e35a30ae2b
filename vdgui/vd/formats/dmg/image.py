"""The DMG backend's image and open (its declaration and probe are the package's)."""
from __future__ import annotations

import bisect
import itertools
import threading
import zlib
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterator

from ...backend import Backend, OpenFlags
from ...errors import CorruptImage, NotSupported
from ...fileio import ImageFile
from ...image import Alloc, Image
from ...runs import RunList
from . import DmgBackend
from .layout import (
    CHUNK_ADC,
    CHUNK_BZIP2,
    CHUNK_COMMENT,
    CHUNK_END,
    CHUNK_IGNORE,
    CHUNK_LZFSE,
    CHUNK_LZMA,
    CHUNK_NAMES,
    CHUNK_RAW,
    CHUNK_SIZE,
    CHUNK_ZERO,
    CHUNK_ZLIB,
    MAX_CHUNK,
    MAX_CHUNKS,
    MAX_PLIST,
    MAX_SECTORS,
    MISH_HEADER_SIZE,
    SECTOR,
    KolyTrailer,
    MishHeader,
)

CACHE_BUDGET = 128 << 20    # decompressed chunks kept, all open DMGs together (+ the newest one)


def adc_decompress(src: bytes, out_size: int) -> bytes:
    """Apple Data Compression: literal runs and back-references (2- and 3-byte forms)."""
    out = bytearray()
    i, n = 0, len(src)
    while i < n and len(out) < out_size:
        b = src[i]
        if b & 0x80:                       # literal run of 1..128 bytes
            ln = (b & 0x7F) + 1
            out += src[i + 1:i + 1 + ln]
            i += 1 + ln
            continue
        if b & 0x40:                       # 3 bytes: length 4..67, 16-bit distance
            if i + 2 >= n:
                raise ValueError("truncated ADC back-reference")
            ln = (b & 0x3F) + 4
            dist = (src[i + 1] << 8 | src[i + 2]) + 1
            i += 3
        else:                              # 2 bytes: length 3..18, 10-bit distance
            if i + 1 >= n:
                raise ValueError("truncated ADC back-reference")
            ln = ((b & 0x3C) >> 2) + 3
            dist = ((b & 0x03) << 8 | src[i + 1]) + 1
            i += 2
        if dist > len(out):
            raise ValueError(f"ADC back-reference distance {dist} before the start of the output")
        start = len(out) - dist
        for k in range(ln):                # may overlap itself: copy byte by byte
            out.append(out[start + k])
    return bytes(out[:out_size])


_LZFSE_DECODE: list[Callable[..., int] | None] = []    # the decoder, once looked up


def _lzfse_decoder() -> Callable[..., int] | None:
    """liblzfse's lzfse_decode_buffer from the installed ``lzfse`` module (which exports it),
    or None. Python's lzfse.decompress has no output limit: it doubles its buffer until the
    stream fits, so a small chunk could claim gigabytes (and damaged data grows it until
    memory runs out). The C call writes at most the buffer it is given."""
    if not _LZFSE_DECODE:
        fn = None
        try:
            import ctypes

            import lzfse
            lib = ctypes.CDLL(lzfse.__file__)
            fn = lib.lzfse_decode_buffer
            fn.restype = ctypes.c_size_t
            fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t,
                           ctypes.c_void_p]
        except (ImportError, OSError, AttributeError):
            fn = None
        _LZFSE_DECODE.append(fn)
    return _LZFSE_DECODE[0]


def lzfse_raw_size(src: bytes) -> int:
    """The decoded size an LZFSE stream declares (the sum of its blocks' n_raw_bytes), from the
    block headers alone; ValueError for a stream whose blocks cannot be walked."""
    pos, total, n = 0, 0, len(src)
    while True:
        if pos + 4 > n:
            raise ValueError("LZFSE stream ends without an end-of-stream block")
        magic = src[pos:pos + 4]
        if magic == b"bvx$":
            return total
        if pos + 8 > n:
            raise ValueError("truncated LZFSE block header")
        raw = int.from_bytes(src[pos + 4:pos + 8], "little")
        if magic == b"bvx-":
            size = 8 + raw
        elif magic == b"bvxn" and pos + 12 <= n:
            size = 12 + int.from_bytes(src[pos + 8:pos + 12], "little")
        elif magic == b"bvx2" and pos + 32 <= n:
            f0 = int.from_bytes(src[pos + 8:pos + 16], "little")
            f1 = int.from_bytes(src[pos + 16:pos + 24], "little")
            f2 = int.from_bytes(src[pos + 24:pos + 32], "little")
            size = (f2 & 0xFFFFFFFF) + ((f0 >> 20) & 0xFFFFF) + ((f1 >> 40) & 0xFFFFF)
        else:
            raise ValueError(f"unknown or truncated LZFSE block {bytes(magic)!r} at {pos}")
        if size <= 0:
            raise ValueError(f"empty LZFSE block at {pos}")
        total += raw
        pos += size


def lzfse_decompress(src: bytes, out_size: int) -> bytes:
    """Decode an LZFSE stream into at most ``out_size`` bytes; ValueError when it holds more
    or does not decode."""
    if lzfse_raw_size(src) > out_size:
        raise ValueError(f"the stream declares more than the chunk's {out_size} bytes")
    fn = _lzfse_decoder()
    data: bytes
    if fn is None:                    # a binding without the C symbol: headers checked above
        import lzfse
        data = lzfse.decompress(src)
    else:
        import ctypes
        buf = ctypes.create_string_buffer(out_size + 1)
        got = fn(buf, out_size + 1, src, len(src), None)
        if got == 0 and out_size:
            raise ValueError("LZFSE data does not decode")
        data = buf.raw[:got]
    if len(data) > out_size:
        raise ValueError(f"decodes to more than the chunk's {out_size} bytes")
    return data


class _ChunkCache:
    """Decompressed chunks of every open DMG, least recently used first, within CACHE_BUDGET
    bytes (the newest entry is kept even when it alone is larger)."""

    def __init__(self, budget: int):
        self.budget = budget
        self.bytes = 0
        self._d: OrderedDict[tuple[int, int], bytes] = OrderedDict()   # (owner, chunk) keys
        self._lock = threading.Lock()

    def get(self, key: tuple[int, int]) -> bytes | None:
        with self._lock:
            data = self._d.get(key)
            if data is not None:
                self._d.move_to_end(key)
            return data

    def put(self, key: tuple[int, int], data: bytes) -> None:
        with self._lock:
            old = self._d.pop(key, None)
            if old is not None:
                self.bytes -= len(old)
            self._d[key] = data
            self.bytes += len(data)
            while self.bytes > self.budget and len(self._d) > 1:
                _k, v = self._d.popitem(last=False)
                self.bytes -= len(v)

    def drop(self, owner: int) -> None:
        with self._lock:
            for k in [k for k in self._d if k[0] == owner]:
                self.bytes -= len(self._d.pop(k))


_CACHE = _ChunkCache(CACHE_BUDGET)
_OWNERS = itertools.count()           # cache keys never reuse an owner (ids can be reused)


def _lzma_error() -> type[Exception]:
    import lzma  # imported when needed: most runs never open a DMG
    return lzma.LZMAError


class DmgImage(Image):
    def __init__(self, backend: Backend, location: str, f: ImageFile) -> None:
        super().__init__(backend, location, True)
        self.f = f
        self._owner = next(_OWNERS)
        self._load()

    # -- parsing -------------------------------------------------------------------------------
    def _load(self) -> None:
        path = self.location
        fsize = self.f.size()
        if fsize < 512:
            raise CorruptImage("file too small for a UDIF trailer", path=path,
                               expected=">= 512 bytes", found=f"{fsize} bytes")
        raw = self.f.read_exact(fsize - 512, 512, "koly trailer")
        if raw[:4] != b"koly":
            raise CorruptImage("no UDIF 'koly' trailer in the last 512 bytes", path=path,
                               field="signature", offset=fsize - 512, expected=b"koly",
                               found=raw[:4])
        k = KolyTrailer.parse(raw)
        self.koly = k
        if k.header_size != 512:
            raise CorruptImage(
                "unexpected trailer size",
                path=path,
                field="header_size",
                expected=512,
                found=k.header_size,
            )
        if k.xml_length == 0:
            raise NotSupported(
                f"{path}: DMG without an XML property list (old NDIF/resource-fork "
                "images) is not supported"
            )
        if k.xml_length > MAX_PLIST:
            raise CorruptImage(
                "property list too large",
                path=path,
                field="xml_length",
                expected=f"<= {MAX_PLIST}",
                found=k.xml_length,
            )
        if k.xml_offset + k.xml_length > fsize:
            raise CorruptImage(
                "property list lies past the end of the file",
                path=path,
                field="xml_offset",
                expected=f"<= {fsize - k.xml_length}",
                found=k.xml_offset,
            )
        if k.data_fork_offset + k.data_fork_length > fsize:
            raise CorruptImage(
                "data fork lies past the end of the file",
                path=path,
                field="data_fork_length",
                expected=f"<= {fsize}",
                found=k.data_fork_offset + k.data_fork_length,
            )
        xml = self.f.read_exact(k.xml_offset, k.xml_length, "property list")
        import plistlib

        try:
            plist = plistlib.loads(xml)
            blkx = plist["resource-fork"]["blkx"]
        except Exception as exc:  # plistlib raises several kinds
            raise CorruptImage(
                f"property list unreadable: {exc}", path=path, offset=k.xml_offset
            ) from None
        if not isinstance(blkx, list):
            raise CorruptImage("property list 'blkx' is not an array", path=path)
        starts = array("Q")
        counts = array("Q")
        types = array("L")
        offsets = array("Q")
        lengths = array("Q")
        kinds: dict[str, int] = {}
        partitions = []
        for n, entry in enumerate(blkx):
            data = entry.get("Data") if isinstance(entry, dict) else None
            if not isinstance(data, bytes) or len(data) < MISH_HEADER_SIZE:
                raise CorruptImage(f"blkx entry {n} has no valid 'Data' block table", path=path)
            if data[:4] != b"mish":
                raise CorruptImage(
                    f"blkx entry {n}: bad block table signature",
                    path=path,
                    expected=b"mish",
                    found=data[:4],
                )
            m = MishHeader.parse(data[:MISH_HEADER_SIZE])
            if m.chunk_count > MAX_CHUNKS or MISH_HEADER_SIZE + m.chunk_count * CHUNK_SIZE > len(
                data
            ):
                raise CorruptImage(
                    f"blkx entry {n}: chunk count does not fit the table",
                    path=path,
                    field="chunk_count",
                    expected=f"<= {(len(data) - MISH_HEADER_SIZE) // CHUNK_SIZE}",
                    found=m.chunk_count,
                )
            partitions.append(
                {
                    "name": entry.get("Name") or entry.get("CFName") or "",
                    "first_sector": m.first_sector,
                    "sectors": m.sector_count,
                }
            )
            mv = memoryview(data)
            import struct

            for c in range(m.chunk_count):
                ctype, _comment, sec, cnt, coff, clen = struct.unpack_from(
                    ">IIQQQQ", mv, MISH_HEADER_SIZE + c * CHUNK_SIZE
                )
                if ctype in (CHUNK_COMMENT, CHUNK_END) or cnt == 0:
                    continue
                if ctype not in CHUNK_NAMES:
                    raise CorruptImage(
                        f"blkx entry {n} chunk {c}: unknown chunk type",
                        path=path,
                        field="type",
                        found=hex(ctype),
                        expected="zero/raw/ignore/ADC/zlib/bzip2/lzfse/lzma",
                    )
                if m.first_sector + sec + cnt > MAX_SECTORS:
                    raise CorruptImage(
                        f"blkx entry {n} chunk {c}: chunk ends past the largest "
                        "disk the chunk tables can describe",
                        path=path,
                        field="sector_number",
                        expected=f"end <= {MAX_SECTORS}",
                        found=m.first_sector + sec + cnt,
                    )
                if cnt * SECTOR > MAX_CHUNK:
                    raise CorruptImage(
                        f"blkx entry {n} chunk {c}: chunk too large (decompression bomb guard)",
                        path=path,
                        field="sector_count",
                        expected=f"<= {MAX_CHUNK // SECTOR} sectors",
                        found=cnt,
                    )
                if ctype not in (CHUNK_ZERO, CHUNK_IGNORE):
                    file_off = k.data_fork_offset + m.data_offset + coff
                    if clen > MAX_CHUNK or file_off + clen > fsize:
                        raise CorruptImage(
                            f"blkx entry {n} chunk {c}: compressed data lies past "
                            "the end of the file",
                            path=path,
                            field="compressed_offset",
                            offset=file_off,
                            expected=f"end <= {fsize}",
                            found=file_off + clen,
                        )
                    if ctype == CHUNK_RAW and clen < cnt * SECTOR:
                        raise CorruptImage(
                            f"blkx entry {n} chunk {c}: raw chunk shorter than its sectors",
                            path=path,
                            expected=cnt * SECTOR,
                            found=clen,
                        )
                else:
                    file_off = 0
                kinds[CHUNK_NAMES[ctype]] = kinds.get(CHUNK_NAMES[ctype], 0) + 1
                starts.append(m.first_sector + sec)
                counts.append(cnt)
                types.append(ctype)
                offsets.append(file_off)
                lengths.append(clen)
        order = sorted(range(len(starts)), key=starts.__getitem__)
        self._starts = array("Q", (starts[i] for i in order))
        self._counts = array("Q", (counts[i] for i in order))
        self._types = array("L", (types[i] for i in order))
        self._offs = array("Q", (offsets[i] for i in order))
        self._lens = array("Q", (lengths[i] for i in order))
        for i in range(1, len(self._starts)):
            if self._starts[i] < self._starts[i - 1] + self._counts[i - 1]:
                raise CorruptImage(
                    "chunks overlap",
                    path=path,
                    field="sector_number",
                    expected=f">= {self._starts[i - 1] + self._counts[i - 1]}",
                    found=self._starts[i],
                )
        data_chunks = sorted(
            (self._offs[i], self._lens[i], i)
            for i in range(len(self._starts))
            if self._types[i] not in (CHUNK_ZERO, CHUNK_IGNORE) and self._lens[i]
        )
        for (o1, l1, i1), (o2, _l2, i2) in itertools.pairwise(data_chunks):
            if o2 < o1 + l1:
                raise CorruptImage(
                    "two chunks share compressed data (a table repeating one chunk "
                    "multiplies the work of reading it)",
                    path=path,
                    offset=o2,
                    expected=f"chunk at sector {self._starts[i2]} to start at or "
                    f"after {o1 + l1:#x}",
                    found=f"{o2:#x} (inside the chunk at sector {self._starts[i1]})",
                )
        total = k.sector_count
        if total > MAX_SECTORS:
            raise CorruptImage(
                "virtual size larger than the chunk tables can describe",
                path=path,
                field="sector_count",
                expected=f"<= {MAX_SECTORS}",
                found=total,
            )
        if self._starts:
            end = self._starts[-1] + self._counts[-1]
            if total == 0 or end > total:
                total = max(total, end)
        self.size = total * SECTOR
        self.block_size = SECTOR
        self._kinds = kinds
        self._partitions = partitions

    def info(self) -> dict:
        return {
            "udif_version": self.koly.version,
            "image_variant": self.koly.image_variant,
            "chunk_types": dict(self._kinds),
            "partitions": self._partitions,
        }

    # -- data ------------------------------------------------------------------------------------
    def _chunk_index(self, sector: int) -> int:
        """Index of the chunk holding ``sector``, or -1 when no chunk covers it."""
        i = bisect.bisect_right(self._starts, sector) - 1
        if i >= 0 and sector < self._starts[i] + self._counts[i]:
            return i
        return -1

    def _pieces(self, offset: int, length: int) -> Iterator[tuple[int, int, int]]:
        """Yield (start, length, chunk index or -1) covering the range."""
        pos, end = offset, offset + length
        while pos < end:
            sec = pos // SECTOR
            i = self._chunk_index(sec)
            if i < 0:
                j = bisect.bisect_right(self._starts, sec)
                nxt = self._starts[j] * SECTOR if j < len(self._starts) else end
                stop = min(end, nxt)
            else:
                stop = min(end, (self._starts[i] + self._counts[i]) * SECTOR)
            yield pos, stop - pos, i
            pos = stop

    def block_status(self, offset: int, length: int) -> list[tuple[int, int, Alloc]]:
        runs: RunList[Alloc] = RunList()
        for s, n, i in self._pieces(offset, length):
            st = (
                Alloc.UNALLOCATED
                if i < 0 or self._types[i] in (CHUNK_ZERO, CHUNK_IGNORE)
                else Alloc.DATA
            )
            runs.add(s, n, st)
        return runs.runs

    def _chunk_data(self, i: int) -> bytes:
        key = (self._owner, i)
        data = _CACHE.get(key)
        if data is not None:
            return data
        ctype = self._types[i]
        out_size = self._counts[i] * SECTOR
        comp = self.f.read_exact(self._offs[i], self._lens[i], f"chunk {i}")
        at = self._offs[i]
        try:
            if ctype == CHUNK_RAW:
                data = comp[:out_size]
            elif ctype == CHUNK_ZLIB:
                d = zlib.decompressobj()
                data = d.decompress(comp, out_size)
            elif ctype == CHUNK_BZIP2:
                import bz2

                data = bz2.BZ2Decompressor().decompress(comp, max_length=out_size)
            elif ctype == CHUNK_LZMA:
                import lzma

                data = lzma.LZMADecompressor().decompress(comp, max_length=out_size)
            elif ctype == CHUNK_ADC:
                data = adc_decompress(comp, out_size)
            elif ctype == CHUNK_LZFSE:
                try:
                    import lzfse  # noqa: F401 - the decoder lives in this module
                except ImportError:
                    raise NotSupported(
                        f"{self.location}: LZFSE-compressed DMG (ULFO) needs the "
                        "'lzfse' Python module, which is not installed"
                    ) from None
                data = lzfse_decompress(comp, out_size)
            else:  # pragma: no cover - filtered at load
                raise CorruptImage(f"unexpected chunk type {ctype:#x}", path=self.location,
                                   offset=at)
        except (zlib.error, OSError, EOFError, ValueError, _lzma_error()) as exc:
            raise CorruptImage(
                f"chunk {i} ({CHUNK_NAMES.get(ctype)}) does not decompress: {exc}",
                path=self.location, offset=at,
            ) from None
        except Exception as exc:
            if type(exc).__module__.startswith("lzfse") or type(exc).__name__ == "error":
                raise CorruptImage(
                    f"chunk {i} (lzfse) does not decompress: {exc}", path=self.location,
                    offset=at,
                ) from None
            raise
        if len(data) < out_size:
            data = data + bytes(out_size - len(data))
        _CACHE.put(key, data)
        return data

    def read(self, offset: int, length: int) -> bytes:
        out = bytearray(length)
        for s, n, i in self._pieces(offset, length):
            if i < 0 or self._types[i] in (CHUNK_ZERO, CHUNK_IGNORE):
                continue
            base = self._starts[i] * SECTOR
            data = self._chunk_data(i)
            out[s - offset : s - offset + n] = data[s - base : s - base + n]
        return bytes(out)

    def close(self) -> None:
        self.f.close()
        _CACHE.drop(self._owner)


def open_image(backend: DmgBackend, location: str, flags: OpenFlags = OpenFlags.NORMAL,
         config: dict | None = None) -> DmgImage:
    if not flags.read_only:
        raise NotSupported(f"{location}: DMG images are read-only; open them read-only")
    return ImageFile(location).hand_to(lambda f: DmgImage(backend, location, f))

