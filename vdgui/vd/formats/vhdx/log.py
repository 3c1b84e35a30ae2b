"""VHDX log ([MS-VHDX] 2.3): finding the active sequence in the circular log and replaying
its zero and data descriptors (before anything else is read)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from ...align import align_up
from ...errors import CorruptImage
from ...sparse import zeroes
from .layout import (
    HEADER_OFFSETS,
    LOG_SECTOR,
    MAX_FILE,
    MAX_LOG,
    REGION_OFFSETS,
    Container,
    DataDescriptor,
    DataSector,
    LogEntryHeader,
    MiB,
    ZeroDescriptor,
    checksum_ok,
)

if TYPE_CHECKING:
    from .image import VhdxImage


class LogReplayNeeded(CorruptImage):
    """A read-only open of a VHDX whose log still holds changes (reading it would be stale)."""
    code = "LOG_REPLAY_NEEDED"


# -- log replay --------------------------------------------------------------------------------
class LogEntry:
    __slots__ = ("descs", "hdr", "pos", "sectors")
    pos: int                                    # offset in the log
    hdr: Container                              # LogEntryHeader
    descs: list[tuple[str, Container]]          # ("zero" | "data", descriptor)
    sectors: list[bytes]                        # the data sectors' 4084 bytes, in order


def _parse_log_entry(log: bytes, pos: int, guid: bytes) -> LogEntry | None:
    """Parse and validate one log entry at ``pos`` of the circular log buffer; None if invalid."""
    n = len(log)

    def take(p: int, ln: int) -> bytes:
        p %= n
        if p + ln <= n:
            return log[p:p + ln]
        return log[p:] + log[:ln - (n - p)]

    head = take(pos, 64)
    if head[:4] != b"loge":
        return None
    h = LogEntryHeader.parse(head)
    if (h.entry_length < LOG_SECTOR or h.entry_length % LOG_SECTOR or h.entry_length > n
            or h.tail % LOG_SECTOR or h.tail >= n or h.log_guid != guid or h.sequence_number == 0):
        return None
    desc_area = align_up(64 + 32 * h.descriptor_count, LOG_SECTOR)
    if desc_area > h.entry_length:
        return None
    raw = bytearray(take(pos, h.entry_length))
    if not checksum_ok(raw):
        return None
    descs = []
    ndata = 0
    for i in range(h.descriptor_count):
        d = raw[64 + 32 * i:96 + 32 * i]
        if d[:4] == b"zero":
            z = ZeroDescriptor.parse(d)
            if z.sequence_number != h.sequence_number or z.zero_length % LOG_SECTOR \
                    or z.file_offset % LOG_SECTOR:
                return None
            descs.append(("zero", z))
        elif d[:4] == b"desc":
            dd = DataDescriptor.parse(d)
            if dd.sequence_number != h.sequence_number or dd.file_offset % LOG_SECTOR:
                return None
            descs.append(("data", dd))
            ndata += 1
        else:
            return None
    if desc_area + ndata * LOG_SECTOR != h.entry_length:
        return None
    sectors = []
    for i in range(ndata):
        at = desc_area + i * LOG_SECTOR
        s = DataSector.parse(bytes(raw[at:at + LOG_SECTOR]))
        if (s.signature != b"data" or s.sequence_high != h.sequence_number >> 32
                or s.sequence_low != h.sequence_number & 0xFFFFFFFF):
            return None
        sectors.append(s.data)
    e = LogEntry()
    e.pos, e.hdr, e.descs, e.sectors = pos, h, descs, sectors
    return e


def find_active_sequence(log: bytes, guid: bytes) -> list[LogEntry]:
    """MS-VHDX 2.3.3: the sequence of consecutive valid entries with the highest sequence
    number, from the head entry's tail to the head. Empty when the log has none."""
    n = len(log)
    cache: dict[int, LogEntry | None] = {}

    def entry(p: int) -> LogEntry | None:
        if p not in cache:
            cache[p] = _parse_log_entry(log, p, guid)
        return cache[p]

    best: list[LogEntry] = []
    for start in range(0, n, LOG_SECTOR):
        e = entry(start)
        if e is None:
            continue
        seq = [e]
        used = e.hdr.entry_length
        while used < n:
            nxt = entry((seq[-1].pos + seq[-1].hdr.entry_length) % n)
            if nxt is None or nxt.hdr.sequence_number != seq[-1].hdr.sequence_number + 1:
                break
            used += nxt.hdr.entry_length
            if used > n:
                break
            seq.append(nxt)
        # valid when the head entry's tail lies within the sequence; replay from that tail
        tail = seq[-1].hdr.tail
        for i, e in enumerate(seq):
            if e.pos == tail:
                if not best or seq[-1].hdr.sequence_number > best[-1].hdr.sequence_number:
                    best = seq[i:]
                break
    return best


def active_sequence(img: VhdxImage) -> list[LogEntry]:
    h = img.hdr
    if h.log_length == 0:
        return []
    if h.log_length > MAX_LOG:
        raise img._corrupt("log too large", field="LogLength", offset=HEADER_OFFSETS[img.hdr_slot],
                           expected=f"<= {MAX_LOG}", found=h.log_length)
    if h.log_offset + h.log_length > img.file_len:
        raise img._corrupt("log lies past the end of the file", field="LogOffset",
                           offset=HEADER_OFFSETS[img.hdr_slot],
                           expected=f"end <= {img.file_len}", found=h.log_offset + h.log_length)
    log = img.f.read_exact(h.log_offset, h.log_length, "log")
    return find_active_sequence(log, h.log_guid)


def _replay_zero(img: VhdxImage, start: int, length: int) -> None:
    """Make [start, start+length) read zero without writing more than the file already holds:
    zeroes go only over the file's data runs (holes already read zero), and the part past the
    end of the file is made by extending it (a hole). An attacker's zero descriptor as long as
    its LastFileOffset then costs nothing (it used to write that many zero bytes)."""
    size = img.f.size()
    end = start + length
    inside = min(end, size)
    if inside > start:
        runs = img.f.data_runs(start, inside - start)
        for a, b, is_data in runs if runs is not None else [(start, inside, True)]:
            pos = a
            while is_data and pos < b:
                k = min(4 * MiB, b - pos)
                img.f.pwrite(pos, zeroes(k))
                pos += k
    if end > size:
        img.f.truncate(end)


def replay(img: VhdxImage, seq: list[LogEntry]) -> None:
    h = img.hdr
    if not seq:
        return                                  # nothing valid to replay: only clear the GUID
    head = seq[-1].hdr
    if head.last_file_offset > MAX_FILE:
        raise img._corrupt("log says the file ends past the largest possible VHDX file",
                           field="LastFileOffset", offset=h.log_offset + seq[-1].pos,
                           expected=f"<= {MAX_FILE}", found=head.last_file_offset)
    if img.file_len < head.flushed_file_offset:
        raise img._corrupt("file is shorter than the log says it was when flushed",
                           field="FlushedFileOffset", expected=f">= {head.flushed_file_offset}",
                           found=img.file_len)
    for e in seq:
        si = 0
        for kind, d in e.descs:
            if d.file_offset < REGION_OFFSETS[0]:
                raise img._corrupt("log entry writes into the VHDX headers",
                                   field="log descriptor FileOffset",
                                   offset=h.log_offset + e.pos, expected=">= 192 KiB",
                                   found=d.file_offset)
            if kind == "zero":
                if d.file_offset + d.zero_length > max(head.last_file_offset, img.file_len):
                    raise img._corrupt("log zero descriptor lies past the file's end",
                                       field="ZeroLength", offset=h.log_offset + e.pos,
                                       expected=f"end <= {head.last_file_offset}",
                                       found=d.file_offset + d.zero_length)
                _replay_zero(img, d.file_offset, d.zero_length)
            else:
                if d.file_offset + LOG_SECTOR > max(head.last_file_offset, img.file_len):
                    raise img._corrupt("log data descriptor lies past the file's end",
                                       field="log descriptor FileOffset",
                                       offset=h.log_offset + e.pos,
                                       expected=f"end <= {head.last_file_offset}",
                                       found=d.file_offset + LOG_SECTOR)
                data = bytes(d.leading_bytes) + bytes(e.sectors[si]) + bytes(d.trailing_bytes)
                si += 1
                img.f.pwrite(d.file_offset, data)
    img.f.sync()
    size = img.f.size()
    if size < head.last_file_offset:
        img.f.truncate(head.last_file_offset)
        img.f.sync()
    img.file_len = img.f.size()
