"""DMG backend: Apple UDIF disk images (read-only), as written by hdiutil.

Layout (Apple's UDIF as documented publicly; VirtualBox's DMG.cpp reads the same):
  * the 512-byte ``koly`` trailer at the end of the file (big-endian) locates the data fork and
    the XML property list;
  * the plist's ``resource-fork/blkx`` array holds one ``mish`` block table per partition;
  * each ``mish`` lists chunks: zero-fill, raw, ignore, ADC, zlib (UDZO), bzip2 (UDBZ),
    LZFSE (ULFO, when the ``lzfse`` module is installed), LZMA (ULMO), comments and a terminator.
Caps (as qemu): chunk ≤ 64 MiB decompressed and compressed, plist ≤ 16 MiB.
"""
from __future__ import annotations

import bisect
import zlib
from collections import OrderedDict
from array import array

from construct import Bytes, Const, Int32ub, Int64ub, Struct

from ..backend import Backend, Cap, DeviceType, FileExtension, OpenFlags, ProbeInput
from ..errors import CorruptImage, NotSupported
from ..fileio import ImageFile
from ..image import Alloc, Image

SECTOR = 512
MAX_CHUNK = 64 << 20
MAX_PLIST = 16 << 20
MAX_CHUNKS = 1 << 22

# UDIF trailer (512 bytes at the end of the file).
KolyTrailer = Struct(
    "signature" / Const(b"koly"),
    "version" / Int32ub,
    "header_size" / Int32ub,
    "flags" / Int32ub,
    "running_data_fork_offset" / Int64ub,
    "data_fork_offset" / Int64ub,
    "data_fork_length" / Int64ub,
    "rsrc_fork_offset" / Int64ub,
    "rsrc_fork_length" / Int64ub,
    "segment_number" / Int32ub,
    "segment_count" / Int32ub,
    "segment_id" / Bytes(16),
    "data_checksum_type" / Int32ub,
    "data_checksum_size" / Int32ub,
    "data_checksum" / Bytes(128),
    "xml_offset" / Int64ub,
    "xml_length" / Int64ub,
    "reserved1" / Bytes(120),
    "checksum_type" / Int32ub,
    "checksum_size" / Int32ub,
    "checksum" / Bytes(128),
    "image_variant" / Int32ub,
    "sector_count" / Int64ub,
    "reserved2" / Bytes(12),
)

# Block table ("mish") header; chunk entries (40 bytes each) follow and are read with struct.
MishHeader = Struct(
    "signature" / Const(b"mish"),
    "version" / Int32ub,
    "first_sector" / Int64ub,
    "sector_count" / Int64ub,
    "data_offset" / Int64ub,
    "buffers_needed" / Int32ub,
    "block_descriptors" / Int32ub,
    "reserved" / Bytes(24),
    "checksum_type" / Int32ub,
    "checksum_size" / Int32ub,
    "checksum" / Bytes(128),
    "chunk_count" / Int32ub,
)
MISH_HEADER_SIZE = 204
CHUNK_SIZE = 40

CHUNK_ZERO, CHUNK_RAW, CHUNK_IGNORE = 0x00000000, 0x00000001, 0x00000002
CHUNK_ADC, CHUNK_ZLIB, CHUNK_BZIP2, CHUNK_LZFSE, CHUNK_LZMA = (
    0x80000004, 0x80000005, 0x80000006, 0x80000007, 0x80000008)
CHUNK_COMMENT, CHUNK_END = 0x7FFFFFFE, 0xFFFFFFFF
CHUNK_NAMES = {CHUNK_ZERO: "zero", CHUNK_RAW: "raw", CHUNK_IGNORE: "ignore", CHUNK_ADC: "ADC",
               CHUNK_ZLIB: "zlib", CHUNK_BZIP2: "bzip2", CHUNK_LZFSE: "lzfse", CHUNK_LZMA: "lzma"}


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


def _lzma_error() -> type:
    import lzma     # imported when needed: most runs never open a DMG
    return lzma.LZMAError


class DmgImage(Image):
    def __init__(self, backend, location, f: ImageFile):
        super().__init__(backend, location, True)
        self.f = f
        self._cache: OrderedDict[int, bytes] = OrderedDict()
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
                               field="signature", offset=fsize - 512, expected=b"koly", found=raw[:4])
        k = KolyTrailer.parse(raw)
        self.koly = k
        if k.header_size != 512:
            raise CorruptImage("unexpected trailer size", path=path, field="header_size",
                               expected=512, found=k.header_size)
        if k.xml_length == 0:
            raise NotSupported(f"{path}: DMG without an XML property list (old NDIF/resource-fork "
                               "images) is not supported")
        if k.xml_length > MAX_PLIST:
            raise CorruptImage("property list too large", path=path, field="xml_length",
                               expected=f"<= {MAX_PLIST}", found=k.xml_length)
        if k.xml_offset + k.xml_length > fsize:
            raise CorruptImage("property list lies past the end of the file", path=path,
                               field="xml_offset", expected=f"<= {fsize - k.xml_length}",
                               found=k.xml_offset)
        if k.data_fork_offset + k.data_fork_length > fsize:
            raise CorruptImage("data fork lies past the end of the file", path=path,
                               field="data_fork_length", expected=f"<= {fsize}",
                               found=k.data_fork_offset + k.data_fork_length)
        xml = self.f.read_exact(k.xml_offset, k.xml_length, "property list")
        import plistlib
        try:
            plist = plistlib.loads(xml)
            blkx = plist["resource-fork"]["blkx"]
        except Exception as exc:  # plistlib raises several kinds
            raise CorruptImage(f"property list unreadable: {exc}", path=path,
                               offset=k.xml_offset) from None
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
                raise CorruptImage(f"blkx entry {n}: bad block table signature", path=path,
                                   expected=b"mish", found=data[:4])
            m = MishHeader.parse(data[:MISH_HEADER_SIZE])
            if m.chunk_count > MAX_CHUNKS or MISH_HEADER_SIZE + m.chunk_count * CHUNK_SIZE > len(data):
                raise CorruptImage(f"blkx entry {n}: chunk count does not fit the table", path=path,
                                   field="chunk_count",
                                   expected=f"<= {(len(data) - MISH_HEADER_SIZE) // CHUNK_SIZE}",
                                   found=m.chunk_count)
            partitions.append({"name": entry.get("Name") or entry.get("CFName") or "",
                               "first_sector": m.first_sector, "sectors": m.sector_count})
            mv = memoryview(data)
            import struct
            for c in range(m.chunk_count):
                ctype, _comment, sec, cnt, coff, clen = struct.unpack_from(
                    ">IIQQQQ", mv, MISH_HEADER_SIZE + c * CHUNK_SIZE)
                if ctype in (CHUNK_COMMENT, CHUNK_END) or cnt == 0:
                    continue
                if ctype not in CHUNK_NAMES:
                    raise CorruptImage(f"blkx entry {n} chunk {c}: unknown chunk type", path=path,
                                       field="type", found=hex(ctype),
                                       expected="zero/raw/ignore/ADC/zlib/bzip2/lzfse/lzma")
                if cnt * SECTOR > MAX_CHUNK:
                    raise CorruptImage(f"blkx entry {n} chunk {c}: chunk too large (decompression "
                                       "bomb guard)", path=path, field="sector_count",
                                       expected=f"<= {MAX_CHUNK // SECTOR} sectors", found=cnt)
                if ctype not in (CHUNK_ZERO, CHUNK_IGNORE):
                    file_off = k.data_fork_offset + m.data_offset + coff
                    if clen > MAX_CHUNK or file_off + clen > fsize:
                        raise CorruptImage(f"blkx entry {n} chunk {c}: compressed data lies past "
                                           "the end of the file", path=path,
                                           field="compressed_offset", offset=file_off,
                                           expected=f"end <= {fsize}", found=file_off + clen)
                    if ctype == CHUNK_RAW and clen < cnt * SECTOR:
                        raise CorruptImage(f"blkx entry {n} chunk {c}: raw chunk shorter than its "
                                           "sectors", path=path, expected=cnt * SECTOR, found=clen)
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
                raise CorruptImage("chunks overlap", path=path, field="sector_number",
                                   expected=f">= {self._starts[i - 1] + self._counts[i - 1]}",
                                   found=self._starts[i])
        total = k.sector_count
        if self._starts:
            end = self._starts[-1] + self._counts[-1]
            if total == 0 or end > total:
                total = max(total, end)
        self.size = total * SECTOR
        self.block_size = SECTOR
        self._kinds = kinds
        self._partitions = partitions

    def info(self) -> dict:
        return {"udif_version": self.koly.version, "image_variant": self.koly.image_variant,
                "chunk_types": dict(self._kinds), "partitions": self._partitions}

    # -- data ------------------------------------------------------------------------------------
    def _chunk_index(self, sector: int) -> int:
        """Index of the chunk holding ``sector``, or -1 when no chunk covers it."""
        i = bisect.bisect_right(self._starts, sector) - 1
        if i >= 0 and sector < self._starts[i] + self._counts[i]:
            return i
        return -1

    def _pieces(self, offset: int, length: int):
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

    def block_status(self, offset, length):
        runs: list = []
        for s, n, i in self._pieces(offset, length):
            st = Alloc.UNALLOCATED if i < 0 or self._types[i] in (CHUNK_ZERO, CHUNK_IGNORE) else Alloc.DATA
            if runs and runs[-1][2] == st:
                runs[-1] = (runs[-1][0], runs[-1][1] + n, st)
            else:
                runs.append((s, n, st))
        return runs

    def _chunk_data(self, i: int) -> bytes:
        data = self._cache.get(i)
        if data is not None:
            self._cache.move_to_end(i)
            return data
        ctype = self._types[i]
        out_size = self._counts[i] * SECTOR
        comp = self.f.read_exact(self._offs[i], self._lens[i], f"chunk {i}")
        where = dict(path=self.location, offset=self._offs[i])
        try:
            if ctype == CHUNK_RAW:
                data = comp[:out_size]
            elif ctype == CHUNK_ZLIB:
                d = zlib.decompressobj()
                data = d.decompress(comp, out_size)
            elif ctype == CHUNK_BZIP2:
                import bz2
                d = bz2.BZ2Decompressor()
                data = d.decompress(comp, max_length=out_size)
            elif ctype == CHUNK_LZMA:
                import lzma
                d = lzma.LZMADecompressor()
                data = d.decompress(comp, max_length=out_size)
            elif ctype == CHUNK_ADC:
                data = adc_decompress(comp, out_size)
            elif ctype == CHUNK_LZFSE:
                try:
                    import lzfse
                except ImportError:
                    raise NotSupported(f"{self.location}: LZFSE-compressed DMG (ULFO) needs the "
                                       "'lzfse' Python module, which is not installed") from None
                data = lzfse.decompress(comp)
                if len(data) > out_size:
                    raise CorruptImage("LZFSE chunk decompresses to more than its sectors", **where,
                                       expected=out_size, found=len(data))
            else:  # pragma: no cover - filtered at load
                raise CorruptImage(f"unexpected chunk type {ctype:#x}", **where)
        except (zlib.error, OSError, EOFError, ValueError, _lzma_error()) as exc:
            raise CorruptImage(f"chunk {i} ({CHUNK_NAMES.get(ctype)}) does not decompress: {exc}",
                               **where) from None
        except Exception as exc:
            if type(exc).__module__.startswith("lzfse") or type(exc).__name__ == "error":
                raise CorruptImage(f"chunk {i} (lzfse) does not decompress: {exc}", **where) from None
            raise
        if len(data) < out_size:
            data = data + bytes(out_size - len(data))
        self._cache[i] = data
        if len(self._cache) > 8:
            self._cache.popitem(last=False)
        return data

    def read(self, offset, length):
        out = bytearray(length)
        for s, n, i in self._pieces(offset, length):
            if i < 0 or self._types[i] in (CHUNK_ZERO, CHUNK_IGNORE):
                continue
            base = self._starts[i] * SECTOR
            data = self._chunk_data(i)
            out[s - offset:s - offset + n] = data[s - base:s - base + n]
        return bytes(out)

    def close(self):
        self.f.close()
        self._cache.clear()


class DmgBackend(Backend):
    name = "DMG"
    description = "Apple disk image (UDIF), read-only"
    aliases = ("dmg", "udif")
    caps = Cap.FILE | Cap.VFS
    extensions = (FileExtension("dmg", DeviceType.OPTICAL),)
    operations = frozenset()

    def probe(self, src: ProbeInput) -> int:
        if src.size >= 512 and src.tail[-512:-508] == b"koly":
            return 100
        return 0

    def open(self, location, flags=OpenFlags.NORMAL, config=None):
        if not flags.read_only:
            raise NotSupported(f"{location}: DMG images are read-only; open them read-only")
        f = ImageFile(location)
        try:
            return DmgImage(self, location, f)
        except BaseException:
            f.close()
            raise


BACKEND = DmgBackend()
