"""FAKEDIFF: a tiny block-mapped test format (NOT a real format, never registered by the app).

It exists only so the operation tests (merge, compact, resize, check) run against a second
backend with differencing images, independent of the real backends landing in parallel.

Layout: 4 KiB header (magic + JSON), a block map of MAP_ENTRIES little-endian u64 file offsets
(0 = unallocated, 1 = reads zeroes) at 4096, data blocks of BLOCK bytes after the map.
Writes are ordered data -> map entry; header rewrites are a single 4 KiB pwrite.
"""
from __future__ import annotations

import json
import struct
import uuid as uuidlib

from vdgui.vd import (
    Alloc,
    Backend,
    Cap,
    CheckReport,
    CorruptImage,
    FileExtension,
    Image,
    ImageFlags,
    InvalidArgument,
    OpenFlags,
    Operation,
    ParentHint,
    Problem,
    register_backend,
)
from vdgui.vd.fileio import ImageFile, relative_name
from vdgui.vd.geometry import vbox_pchs
from vdgui.vd.sparse import is_zero

MAGIC = b"VDGUIFAKE\x00"
HEADER = 4096
BLOCK = 64 * 1024
MAP_ENTRIES = 4096                      # up to 256 MiB
MAP_OFF = HEADER
DATA_OFF = MAP_OFF + MAP_ENTRIES * 8    # 36 KiB: blocks are not aligned on BLOCK, on purpose
UNALLOC, ZERO = 0, 1
NAME = "FAKEDIFF"


class FakeImage(Image):
    def __init__(self, backend, location, f: ImageFile, read_only):
        super().__init__(backend, location, read_only)
        self.f = f
        self.block_size = BLOCK
        self.honor_zeroes = False
        self._load()

    def _load(self):
        head = self.f.read_exact(0, HEADER, "header")
        if not head.startswith(MAGIC):
            raise CorruptImage("not a FAKEDIFF image", path=self.location)
        try:
            h = json.loads(head[len(MAGIC):].rstrip(b"\x00").decode())
        except ValueError:
            raise CorruptImage("header JSON unreadable", path=self.location) from None
        self.h = h
        self.size = h["size"]
        self.uuid = uuidlib.UUID(h["uuid"])
        self.modification_uuid = uuidlib.UUID(h["mod"])
        self.parent_uuid = uuidlib.UUID(h["puuid"]) if h.get("puuid") else None
        self.parent_modification_uuid = uuidlib.UUID(h["pmod"]) if h.get("pmod") else None
        self.parent_hint = (ParentHint([h["pname"]], self.parent_uuid, h.get("pfmt"))
                            if h.get("pname") else None)
        self.flags = ImageFlags.DIFF if self.parent_hint else ImageFlags.NONE
        self.pchs = vbox_pchs(self.size)
        raw = self.f.read_exact(MAP_OFF, MAP_ENTRIES * 8, "block map")
        self.map = list(struct.unpack(f"<{MAP_ENTRIES}Q", raw))

    def _write_header(self):
        body = MAGIC + json.dumps(self.h).encode()
        self.f.pwrite(0, body + bytes(HEADER - len(body)))

    def _set_entry(self, idx, value):
        self.map[idx] = value
        self.f.pwrite(MAP_OFF + idx * 8, struct.pack("<Q", value))

    def block_status(self, offset, length):
        out = []
        pos, end = offset, offset + length
        while pos < end:
            idx = pos // BLOCK
            n = min((idx + 1) * BLOCK, end) - pos
            e = self.map[idx]
            st = Alloc.UNALLOCATED if e == UNALLOC else Alloc.ZERO if e == ZERO else Alloc.DATA
            if out and out[-1][2] == st:
                out[-1] = (out[-1][0], out[-1][1] + n, st)
            else:
                out.append((pos, n, st))
            pos += n
        return out

    def read(self, offset, length):
        buf = bytearray(length)
        pos, end = offset, offset + length
        while pos < end:
            idx, inner = divmod(pos, BLOCK)
            n = min(BLOCK - inner, end - pos)
            e = self.map[idx]
            if e > ZERO:
                buf[pos - offset:pos - offset + n] = self.f.pread(e + inner, n).ljust(n, b"\0")
            pos += n
        return bytes(buf)

    def write(self, offset, data, fill):
        self.require_writable()
        pos, end = offset, offset + len(data)
        while pos < end:
            idx, inner = divmod(pos, BLOCK)
            n = min(BLOCK - inner, end - pos)
            piece = data[pos - offset:pos - offset + n]
            e = self.map[idx]
            if e > ZERO:
                self.f.pwrite(e + inner, piece)
            elif (is_zero(piece) and not self.honor_zeroes
                  and (e == ZERO or self.parent_hint is None)):
                pass
            else:
                bstart = idx * BLOCK
                blen = min(BLOCK, self.size - bstart)
                block = bytearray(bytes(blen) if e == ZERO else fill(bstart, blen))
                block[inner:inner + n] = piece
                block += bytes(BLOCK - blen)
                where = max(self.f.size(), DATA_OFF)
                self.f.pwrite(where, block)           # data first
                self._set_entry(idx, where)           # then the map
            pos += n

    def flush(self):
        if not self.read_only:
            self.f.sync()

    def close(self):
        self.f.close()

    # -- hooks ---------------------------------------------------------------------------
    def set_parent(self, parent):
        self.require_writable()
        if parent is None:
            for k in ("puuid", "pmod", "pname", "pfmt"):
                self.h.pop(k, None)
        else:
            self.h["puuid"] = str(parent.uuid) if parent.uuid else None
            self.h["pmod"] = str(parent.modification_uuid) if parent.modification_uuid else None
            self.h["pname"] = relative_name(self.location, parent.location)
            self.h["pfmt"] = parent.format
        self._write_header()
        self.f.sync()
        self._load()

    def resize(self, new_size, progress=None):
        self.require_writable()
        if new_size > MAP_ENTRIES * BLOCK:
            raise InvalidArgument(f"{self.location}: FAKEDIFF holds at most "
                                  f"{MAP_ENTRIES * BLOCK} bytes")
        if progress:
            progress(0, 1)
        if new_size < self.size:
            for idx in range(-(-new_size // BLOCK), MAP_ENTRIES):
                if self.map[idx]:
                    self._set_entry(idx, UNALLOC)
            if new_size % BLOCK and self.map[new_size // BLOCK] > ZERO:   # zero the cut tail
                e = self.map[new_size // BLOCK]
                inner = new_size % BLOCK
                self.f.pwrite(e + inner, bytes(BLOCK - inner))
        self.h["size"] = new_size
        self._write_header()
        self.size = new_size
        self.pchs = vbox_pchs(new_size)
        if progress:
            progress(1, 1)

    def compact(self, progress=None, parent_read=None):
        self.require_writable()
        used = [i for i, e in enumerate(self.map) if e > ZERO]
        total = len(used) * 2 or 1
        done = 0
        for i in used:
            blen = min(BLOCK, self.size - i * BLOCK)
            data = self.f.pread(self.map[i], blen)
            if parent_read is not None:
                drop = data == parent_read(i * BLOCK, blen)
            else:
                drop = is_zero(data)
            if drop:
                self._set_entry(i, UNALLOC)
            done += 1  # noqa: SIM113 - counted as in the real formats' loops
            if progress and progress(done, total) is False:
                from vdgui.vd import Cancelled
                raise Cancelled()
        self._close_holes(lambda: progress and progress(total, total))

    def _close_holes(self, step=None):
        """Move each block to the lowest free slot (data, then map entry), then truncate."""
        live = sorted((e, i) for i, e in enumerate(self.map) if e > ZERO)
        slot = DATA_OFF
        for e, i in live:
            if e != slot:
                self.f.pwrite(slot, self.f.pread(e, BLOCK))
                self.f.sync()
                self._set_entry(i, slot)
            slot += BLOCK
            if step:
                step()
        self.f.truncate(slot)

    def check(self, repair=False, dry_run=False, progress=None):
        rep = CheckReport()
        fsize = self.f.size()
        seen = {}
        for i, e in enumerate(self.map):
            if e <= ZERO:
                continue
            bad = None
            if i * BLOCK >= self.size:
                bad = "beyond the virtual size"
            elif e < DATA_OFF or (e - DATA_OFF) % BLOCK or e + BLOCK > fsize:
                bad = f"points at {e:#x}, outside the data area"
            elif e in seen:
                bad = f"points at {e:#x}, already used by block {seen[e]}"
            if bad:
                fix = repair and not dry_run
                rep.problems.append(Problem("corrupt", f"block map entry {i} {bad}",
                                            MAP_OFF + i * 8, repaired=fix))
                if fix:
                    self._set_entry(i, UNALLOC)
            else:
                seen[e] = i
        used = set(seen)
        slot = DATA_OFF
        fix = repair and not dry_run
        while slot + BLOCK <= fsize:
            if slot not in used:
                rep.problems.append(Problem("leak", f"data block at {slot:#x} is not referenced",
                                            slot, repaired=fix))
            slot += BLOCK
        if fix and rep.problems:
            self._close_holes()
        if progress:
            progress(1, 1)
        rep.repaired = any(p.repaired for p in rep.problems)
        return rep


class FakeBackend(Backend):
    name = NAME
    description = "test-only block-mapped format"
    caps = Cap.UUID | Cap.CREATE_DYNAMIC | Cap.DIFF | Cap.FILE
    extensions = (FileExtension("fkd"),)
    operations = frozenset({Operation.WRITE, Operation.CREATE, Operation.COMPACT,
                            Operation.RESIZE, Operation.CHECK, Operation.REPAIR,
                            Operation.RELINK})
    max_size = MAP_ENTRIES * BLOCK
    can_shrink = True

    def probe(self, src):
        return 100 if src.head.startswith(MAGIC) else 0

    def open(self, location, flags=OpenFlags.NORMAL, config=None):
        f = ImageFile(location, writable=not flags.read_only)
        try:
            return FakeImage(self, location, f, flags.read_only)
        except BaseException:
            f.close()
            raise

    def create(self, p):
        f = ImageFile.create_temp(p.location)
        try:
            h = {"size": p.size, "uuid": str(p.uuid or uuidlib.uuid4()),
                 "mod": str(uuidlib.uuid4())}
            if p.parent is not None:
                h.update(puuid=str(p.parent.uuid) if p.parent.uuid else None,
                         pmod=(str(p.parent.modification_uuid)
                               if p.parent.modification_uuid else None),
                         pname=relative_name(p.location, p.parent.location), pfmt=p.parent.format)
            body = MAGIC + json.dumps(h).encode()
            f.pwrite(0, body + bytes(HEADER - len(body)) + bytes(MAP_ENTRIES * 8))
            f.commit()
        except BaseException:
            f.abandon()
            raise
        return FakeImage(self, p.location, f, False)


BACKEND = FakeBackend()


def register():
    """Register FAKEDIFF in this process (idempotent). Returns an undo function."""
    from vdgui.vd import registry
    if BACKEND in registry.formats.REGISTERED:
        return lambda: None
    register_backend(BACKEND)

    def undo():
        if BACKEND in registry.formats.REGISTERED:
            registry.formats.REGISTERED.remove(BACKEND)
    return undo
