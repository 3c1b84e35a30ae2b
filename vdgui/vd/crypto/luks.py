"""LUKS1 and LUKS2 headers: parse and validate (hostile input gives CorruptImage/NotSupported
before any large allocation or long key derivation), unlock a keyslot, and for LUKS1 create a
header, add and remove keyslots (docs/design-encryption.md §1.1-1.2).

Every offset here is relative to the start of the LUKS header: the file for the raw ``luks``
container, the crypt header extension's area inside a QCOW2 file. Reads and writes go through
the caller's ``read(offset, length)`` / ``write(offset, data)``.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import time
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass, field

from construct import ConstructError

from .. import secrets
from ..align import align_up, ceil_div
from ..errors import CorruptImage, NotSupported
from . import DEFAULT_ITER_TIME_MS
from . import luks_layout as L
from . import primitives as P
from .cipher import SectorCipher, parse_mode

Read = Callable[[int, int], bytes]
Write = Callable[[int, bytes], None]

MAX_KEY_BYTES = 64
MAX_STRIPES = 4000 * 16
LUKS2_HDR_SIZES = tuple(1 << k for k in range(14, 23))     # 16 KiB .. 4 MiB
MIN_ITERATIONS = 1000


def _text(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("ascii", "replace")


# -- anti-forensic split (cryptsetup lib/luks1/af.c; qemu crypto/afsplit.c) ---------------------
def _diffuse(buf: bytes, hash_name: str) -> bytes:
    size = P.digest_size(hash_name)
    out = bytearray()
    for i in range(ceil_div(len(buf), size)):
        block = buf[i * size:(i + 1) * size]
        out += hashlib.new(hash_name, i.to_bytes(4, "big") + block).digest()[:len(block)]
    return bytes(out)


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")


def af_merge(material: bytes, key_bytes: int, stripes: int, hash_name: str) -> bytes:
    d = bytes(key_bytes)
    for s in range(stripes - 1):
        d = _diffuse(_xor(d, material[s * key_bytes:(s + 1) * key_bytes]), hash_name)
    return _xor(d, material[(stripes - 1) * key_bytes:stripes * key_bytes])


def af_split(key: bytes, stripes: int, hash_name: str) -> bytes:
    n = len(key)
    rand = P.random_bytes(n * (stripes - 1))
    d = bytes(n)
    for s in range(stripes - 1):
        d = _diffuse(_xor(d, rand[s * n:(s + 1) * n]), hash_name)
    return rand + _xor(d, key)


# -- the parsed header ----------------------------------------------------------------------------
@dataclass
class Keyslot:
    index: int
    active: bool
    kdf: str                    # pbkdf2, argon2i, argon2id
    hash: str = "sha256"        # PBKDF2's hash
    iterations: int = 0
    time: int = 0
    memory: int = 0             # KiB
    cpus: int = 0
    salt: bytes = b""
    offset: int = 0             # key material, bytes from the header start
    size: int = 0               # bytes of the key material area
    stripes: int = 4000
    af_hash: str = "sha256"
    key_size: int = 0           # the master key's bytes
    area_cipher: str = "aes"
    area_mode: str = "xts-plain64"
    area_key_size: int = 0      # the slot key's bytes

    def info(self) -> dict:
        d: dict = {"slot": self.index, "active": self.active}
        if self.active:
            d["kdf"] = self.kdf
            if self.kdf == "pbkdf2":
                d.update(hash=self.hash, iterations=self.iterations)
            else:
                d.update(time=self.time, memory_kib=self.memory, cpus=self.cpus)
        return d


@dataclass
class LuksHeader:
    version: int
    cipher: str
    mode: str
    hash: str                   # LUKS1: PBKDF2 + AF hash; LUKS2: the digest's
    key_bytes: int
    payload_offset: int         # bytes
    payload_size: int | None    # None: to the end of the file ("dynamic")
    sector_size: int            # the data's encryption unit
    iv_tweak: int
    uuid: str
    slots: list[Keyslot]
    digest: bytes
    digest_salt: bytes
    digest_iter: int
    raw: bytes                  # the header bytes (the unlock cache's key)
    where: str = ""
    label: str = ""
    json: dict = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return f"luks{self.version}"

    def info(self) -> dict:
        return {"format": self.kind, "cipher": f"{self.cipher}-{self.mode}",
                "key_bits": self.key_bytes * 8, "hash": self.hash,
                "payload_offset": self.payload_offset, "sector_size": self.sector_size,
                "uuid": self.uuid,
                "keyslots": [s.info() for s in self.slots if s.active]}

    # -- unlocking -----------------------------------------------------------------------------
    def slot_key(self, slot: Keyslot, passphrase: bytes) -> bytes:
        where = f"{self.where}: keyslot {slot.index}"
        if slot.kdf == "pbkdf2":
            return P.pbkdf2(slot.hash, passphrase, slot.salt, slot.iterations,
                            slot.area_key_size, where)
        return P.argon2(slot.kdf, passphrase, slot.salt, slot.time, slot.memory, slot.cpus,
                        slot.area_key_size, where)

    def try_slot(self, slot: Keyslot, passphrase: bytes, read: Read) -> bytes | None:
        kek = self.slot_key(slot, passphrase)
        n = slot.key_size * slot.stripes
        material = read(slot.offset, align_up(n, L.SECTOR))
        if len(material) < align_up(n, L.SECTOR):
            raise CorruptImage(f"key material of keyslot {slot.index} is truncated",
                               path=self.where, offset=slot.offset,
                               expected=f"{align_up(n, L.SECTOR)} bytes", found=len(material))
        c = SectorCipher(slot.area_cipher, slot.area_mode, kek, L.SECTOR, self.where)
        try:
            split = bytes(c.decrypt(material, 0)[:n])
        finally:
            c.wipe()
        mk = af_merge(split, slot.key_size, slot.stripes, slot.af_hash)
        return mk if self.check_key(mk) else None

    def check_key(self, mk: bytes) -> bool:
        if len(mk) != self.key_bytes:
            return False
        got = P.pbkdf2(self.hash, mk, self.digest_salt, self.digest_iter, len(self.digest),
                       f"{self.where}: key digest")
        return got == self.digest

    def unlock(self, passphrase: bytes, read: Read) -> bytearray | None:
        for slot in self.slots:
            if slot.active:
                mk = self.try_slot(slot, passphrase, read)
                if mk is not None:
                    return bytearray(mk)
        return None

    def data_cipher(self, mk: bytes) -> SectorCipher:
        """Data units of sector_size bytes; pass IV numbers in 512-byte sectors (offset // 512
        + iv_tweak): LUKS2 tables carry no iv_large_sectors (dmsetup tables of cryptsetup's
        4096-byte sectors: "... 1 sector_size:4096")."""
        return SectorCipher(self.cipher, self.mode, mk, self.sector_size, self.where,
                            iv_step=self.sector_size // L.SECTOR)

    # -- LUKS1 changes -------------------------------------------------------------------------
    def require_v1(self, what: str) -> None:
        if self.version != 1:
            raise NotSupported(f"{self.where}: {what} is supported for LUKS1 headers only "
                               "(this one is LUKS2)")

    def build(self) -> bytes:
        """The LUKS1 header's 592 bytes."""
        self.require_v1("writing the header")

        def pad(text: str, n: int) -> bytes:
            return text.encode("ascii").ljust(n, b"\0")
        return L.Luks1Header.build({
            "magic": L.MAGIC, "version": 1, "cipher_name": pad(self.cipher, 32),
            "cipher_mode": pad(self.mode, 32), "hash_spec": pad(self.hash, 32),
            "payload_offset": self.payload_offset // L.SECTOR, "key_bytes": self.key_bytes,
            "mk_digest": self.digest, "mk_digest_salt": self.digest_salt,
            "mk_digest_iter": self.digest_iter, "uuid": pad(self.uuid, 40),
            "slots": [{"active": L.SLOT_ACTIVE if s.active else L.SLOT_INACTIVE,
                       "iterations": s.iterations if s.active else 0,
                       "salt": s.salt if s.active else bytes(32),
                       "key_offset": s.offset // L.SECTOR, "stripes": s.stripes}
                      for s in self.slots]})

    def add_slot(self, mk: bytes, passphrase: bytes, write: Write,
                 iter_time_ms: int = DEFAULT_ITER_TIME_MS, iterations: int | None = None) -> int:
        """LUKS1: write a new keyslot's key material, then the header. Returns its index.
        ``iterations``: PBKDF2's count, else measured for ``iter_time_ms``."""
        self.require_v1("adding a passphrase")
        free = [s for s in self.slots if not s.active]
        if not free:
            raise NotSupported(f"{self.where}: all {len(self.slots)} keyslots are in use")
        slot = free[0]
        slot.salt = P.random_bytes(32)
        slot.iterations = iterations or pbkdf2_iterations(self.hash, iter_time_ms,
                                                          self.key_bytes)
        slot.key_size = slot.area_key_size = self.key_bytes
        kek = P.pbkdf2(self.hash, passphrase, slot.salt, slot.iterations, self.key_bytes)
        split = af_split(mk, slot.stripes, self.hash)
        material = split + bytes(align_up(len(split), L.SECTOR) - len(split))
        c = SectorCipher(self.cipher, self.mode, kek, L.SECTOR, self.where)
        try:
            write(slot.offset, bytes(c.encrypt(material, 0)))
        finally:
            c.wipe()
        slot.active = True
        slot.kdf = "pbkdf2"
        write(0, self.build())
        return slot.index

    def remove_slot(self, index: int, write: Write) -> None:
        """Header first (the slot stops counting), then the key material is overwritten."""
        slot = self.slot(index)
        if self.version == 2:
            self._remove_slot2(slot, write)
            return
        slot.active = False
        write(0, self.build())
        write(slot.offset, P.random_bytes(align_up(self.key_bytes * slot.stripes, L.SECTOR)))

    def slot(self, index: int) -> Keyslot:
        return next(s for s in self.slots if s.index == index)

    # -- LUKS2 changes: JSON edited, both header copies rewritten with the next seqid ----------
    def add_slot_like(self, mk: bytes, passphrase: bytes, write: Write, like: Keyslot) -> int:
        """LUKS2: a new keyslot with ``like``'s KDF costs and area cipher, in the first free
        place of the keyslots area; key material first, then the headers."""
        meta = self.json
        kss = meta["keyslots"]
        size = align_up(like.key_size * like.stripes, 4096)
        first = 2 * self._binary().hdr_size
        end = first + _num(meta.get("config") or {}, "keyslots_size", self.where, "config")
        used = sorted((_num(k.get("area") or {}, "offset", self.where, "keyslot"),
                       _num(k.get("area") or {}, "size", self.where, "keyslot"))
                      for k in kss.values() if isinstance(k, dict))
        off = first
        for a, n in used:
            if off + size <= a:
                break
            off = max(off, align_up(a + n, 4096))
        if off + size > end:
            raise NotSupported(f"{self.where}: no room for another keyslot in the LUKS2 area")
        idx = next(i for i in range(32) if str(i) not in kss)
        salt = P.random_bytes(32)
        kdf: dict = ({"type": "pbkdf2", "hash": like.hash, "iterations": like.iterations}
                     if like.kdf == "pbkdf2" else
                     {"type": like.kdf, "time": like.time, "memory": like.memory,
                      "cpus": like.cpus})
        kdf["salt"] = base64.b64encode(salt).decode()
        slot = Keyslot(idx, True, like.kdf, like.hash, like.iterations, like.time, like.memory,
                       like.cpus, salt, off, size, like.stripes, like.af_hash, like.key_size,
                       like.area_cipher, like.area_mode, like.area_key_size)
        kek = self.slot_key(slot, passphrase)
        split = af_split(mk, slot.stripes, slot.af_hash)
        c = SectorCipher(slot.area_cipher, slot.area_mode, kek, L.SECTOR, self.where)
        try:
            write(off, bytes(c.encrypt(split + bytes(-len(split) % L.SECTOR), 0)))
        finally:
            c.wipe()
        kss[str(idx)] = {
            "type": "luks2", "key_size": slot.key_size,
            "af": {"type": "luks1", "stripes": slot.stripes, "hash": slot.af_hash},
            "area": {"type": "raw", "offset": str(off), "size": str(size),
                     "encryption": f"{slot.area_cipher}-{slot.area_mode}",
                     "key_size": slot.area_key_size},
            "kdf": kdf}
        for d in meta["digests"].values():
            if isinstance(d, dict) and "0" in (d.get("segments") or []):
                d["keyslots"] = [*d.get("keyslots", []), str(idx)]
        self._write2(write)
        self.slots.append(slot)
        return idx

    def _remove_slot2(self, slot: Keyslot, write: Write) -> None:
        del self.json["keyslots"][str(slot.index)]
        for d in self.json["digests"].values():
            if isinstance(d, dict):
                d["keyslots"] = [k for k in d.get("keyslots", []) if k != str(slot.index)]
        self._write2(write)
        self.slots.remove(slot)
        write(slot.offset, P.random_bytes(slot.size))

    def _binary(self):
        return L.Luks2Binary.parse(self.raw[:L.LUKS2_BINARY_SIZE])

    def _write2(self, write: Write) -> None:
        b = self._binary()
        text = json.dumps(self.json, separators=(",", ":")).encode()
        room = b.hdr_size - L.LUKS2_BINARY_SIZE
        if len(text) >= room:
            raise NotSupported(f"{self.where}: the LUKS2 JSON area is full")
        area = text + bytes(room - len(text))
        alg = _text(b.checksum_alg)
        out = b""
        for at, magic in ((0, L.MAGIC), (b.hdr_size, L.MAGIC2_SECONDARY)):
            fields = dict(b)
            fields.update(magic=magic, seqid=b.seqid + 1, hdr_offset=at, csum=bytes(64))
            binary = bytearray(L.Luks2Binary.build(fields))
            digest = hashlib.new(alg, bytes(binary) + area).digest()
            binary[448:448 + len(digest)] = digest
            write(at, bytes(binary) + area)
            out = out or bytes(binary) + area
        self.raw = out


def pbkdf2_iterations(hash_name: str, iter_time_ms: int, length: int) -> int:
    """Iterations that take about ``iter_time_ms`` here (qemu's and cryptsetup's way)."""
    probe = 20000
    t = time.perf_counter()
    hashlib.pbkdf2_hmac(hash_name, b"probe", bytes(32), probe, length)
    per_ms = probe / max((time.perf_counter() - t) * 1000, 1e-3)
    return max(MIN_ITERATIONS, min(int(per_ms * iter_time_ms), P.MAX_PBKDF2_ITERATIONS))


# -- parsing ------------------------------------------------------------------------------------
def parse(read: Read, limit: int, where: str) -> LuksHeader:
    """The LUKS header at offset 0 of ``read``; ``limit``: bytes available from there."""
    head = read(0, L.LUKS1_HEADER_SIZE)
    if len(head) < 8 or head[:6] != L.MAGIC:
        raise CorruptImage("no LUKS header", path=where, offset=0, expected=L.MAGIC,
                           found=head[:6])
    version = int.from_bytes(head[6:8], "big")
    if version == 1:
        return _parse1(head, limit, where)
    if version == 2:
        return _parse2(read, limit, where)
    raise NotSupported("LUKS header version not supported", path=where, field="version",
                       offset=6, expected="1 or 2", found=version)


def _check_area(where: str, what: str, offset: int, size: int, limit: int) -> None:
    if offset < 0 or size < 0 or offset + size > limit:
        raise CorruptImage(f"{what} lies outside the LUKS area", path=where, offset=offset,
                           expected=f"end <= {limit}", found=offset + size)


def _parse1(head: bytes, limit: int, where: str) -> LuksHeader:
    if len(head) < L.LUKS1_HEADER_SIZE:
        raise CorruptImage("LUKS1 header is truncated", path=where,
                           expected=f"{L.LUKS1_HEADER_SIZE} bytes", found=len(head))
    h = L.Luks1Header.parse(head)
    cipher, mode, hash_name = _text(h.cipher_name), _text(h.cipher_mode), _text(h.hash_spec)
    P.check_hash(hash_name, where)
    if not 1 <= h.key_bytes <= MAX_KEY_BYTES:
        raise CorruptImage("LUKS1 key size out of range", path=where, field="key_bytes",
                           offset=108, expected=f"1..{MAX_KEY_BYTES}", found=h.key_bytes)
    parse_mode(cipher, mode, h.key_bytes, where)
    payload = h.payload_offset * L.SECTOR
    if payload > limit:
        raise CorruptImage("LUKS1 payload offset is past the end", path=where,
                           field="payload_offset", offset=104, expected=f"<= {limit}",
                           found=payload)
    if not 1 <= h.mk_digest_iter <= P.MAX_PBKDF2_ITERATIONS:
        raise CorruptImage("LUKS1 key digest iterations out of range", path=where,
                           field="mk_digest_iter", offset=164,
                           expected=f"1..{P.MAX_PBKDF2_ITERATIONS}", found=h.mk_digest_iter)
    slots = []
    for i, s in enumerate(h.slots):
        at = 208 + 48 * i
        if s.active not in (L.SLOT_ACTIVE, L.SLOT_INACTIVE):
            raise CorruptImage(f"keyslot {i} state is invalid", path=where, offset=at,
                               expected="0x00ac71f3 or 0x0000dead", found=hex(s.active))
        active = s.active == L.SLOT_ACTIVE
        if not 1 <= s.stripes <= MAX_STRIPES:
            raise CorruptImage(f"keyslot {i} stripes out of range", path=where, offset=at + 44,
                               expected=f"1..{MAX_STRIPES}", found=s.stripes)
        size = align_up(h.key_bytes * s.stripes, L.SECTOR)
        if active:
            _check_area(where, f"keyslot {i} key material", s.key_offset * L.SECTOR, size,
                        limit)
            if not 1 <= s.iterations <= P.MAX_PBKDF2_ITERATIONS:
                raise CorruptImage(f"keyslot {i} iterations out of range", path=where,
                                   offset=at + 4, expected=f"1..{P.MAX_PBKDF2_ITERATIONS}",
                                   found=s.iterations)
        slots.append(Keyslot(i, active, "pbkdf2", hash_name, s.iterations, salt=s.salt,
                             offset=s.key_offset * L.SECTOR, size=size, stripes=s.stripes,
                             af_hash=hash_name, key_size=h.key_bytes, area_cipher=cipher,
                             area_mode=mode, area_key_size=h.key_bytes))
    return LuksHeader(1, cipher, mode, hash_name, h.key_bytes, payload, None, L.SECTOR, 0,
                      _text(h.uuid), slots, h.mk_digest, h.mk_digest_salt, h.mk_digest_iter,
                      head, where)


# -- LUKS2 --------------------------------------------------------------------------------------
def _binary2(raw: bytes, where: str, at: int):
    try:
        return L.Luks2Binary.parse(raw)
    except ConstructError:
        raise CorruptImage("LUKS2 binary header is truncated", path=where, offset=at) from None


def _checked2(read: Read, at: int, limit: int, where: str):
    """(binary header, JSON text) of the copy at ``at`` when its checksum holds, else None."""
    raw = read(at, L.LUKS2_BINARY_SIZE)
    if len(raw) < L.LUKS2_BINARY_SIZE or raw[:6] not in (L.MAGIC, L.MAGIC2_SECONDARY):
        return None
    b = _binary2(raw, where, at)
    if b.version != 2 or b.hdr_size not in LUKS2_HDR_SIZES or b.hdr_offset != at \
            or at + b.hdr_size > limit:
        return None
    alg = _text(b.checksum_alg)
    if alg not in ("sha256", "sha512", "sha1"):
        return None
    area = read(at + L.LUKS2_BINARY_SIZE, b.hdr_size - L.LUKS2_BINARY_SIZE)
    if len(area) != b.hdr_size - L.LUKS2_BINARY_SIZE:
        return None
    zeroed = raw[:448] + bytes(64) + raw[512:]
    digest = hashlib.new(alg, zeroed + area).digest()
    if b.csum[:len(digest)] != digest:
        return None
    return b, area, raw + area


def _parse2(read: Read, limit: int, where: str) -> LuksHeader:
    first = read(0, L.LUKS2_BINARY_SIZE)
    if len(first) < L.LUKS2_BINARY_SIZE:
        raise CorruptImage("LUKS2 header is truncated", path=where,
                           expected=f"{L.LUKS2_BINARY_SIZE} bytes", found=len(first))
    b0 = _binary2(first, where, 0)
    copies = [_checked2(read, 0, limit, where)]
    seconds = [b0.hdr_size] if b0.hdr_size in LUKS2_HDR_SIZES else list(LUKS2_HDR_SIZES)
    for at in seconds:
        c = _checked2(read, at, limit, where)
        if c is not None:
            copies.append(c)
            break
    good = [c for c in copies if c is not None]
    if not good:
        raise CorruptImage("no LUKS2 header copy has a valid checksum", path=where, offset=0)
    b, area, raw = max(good, key=lambda c: c[0].seqid)
    try:
        meta = json.loads(area.rstrip(b"\0").decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CorruptImage(f"LUKS2 JSON area is not JSON: {exc}", path=where) from None
    return _from_json(meta, raw, b, limit, where)


def _num(obj: dict, key: str, where: str, what: str) -> int:
    v = obj.get(key) if isinstance(obj, dict) else None
    if isinstance(v, bool):
        v = None
    if isinstance(v, str) and v.isdigit():
        v = int(v)
    if not isinstance(v, int) or v < 0:
        raise CorruptImage(f"LUKS2 {what}: '{key}' is missing or not a number", path=where,
                           found=repr(v)[:40])
    return v


def _b64(obj: dict, key: str, where: str, what: str) -> bytes:
    try:
        return base64.b64decode(str(obj[key]), validate=True)
    except (KeyError, TypeError, binascii.Error):
        raise CorruptImage(f"LUKS2 {what}: '{key}' is missing or not base64",
                           path=where) from None


def _split_encryption(enc: object, where: str) -> tuple[str, str]:
    if not isinstance(enc, str) or "-" not in enc:
        raise NotSupported(f"{where}: LUKS2 encryption '{enc}' is not supported")
    cipher, mode = enc.split("-", 1)
    return cipher, mode


def _section(meta: dict, key: str, where: str) -> dict:
    v = meta.get(key)
    if not isinstance(v, dict):
        raise CorruptImage(f"LUKS2 JSON has no '{key}' object", path=where)
    return v


def _from_json(meta: object, raw: bytes, b, limit: int, where: str) -> LuksHeader:
    if not isinstance(meta, dict):
        raise CorruptImage("LUKS2 JSON area is not an object", path=where)
    segs, digs, kss = (_section(meta, k, where) for k in ("segments", "digests", "keyslots"))
    seg = segs.get("0")
    if not isinstance(seg, dict) or seg.get("type") != "crypt":
        raise NotSupported(f"{where}: LUKS2 without a 'crypt' segment 0 is not supported")
    cipher, mode = _split_encryption(seg.get("encryption"), where)
    sector = _num(seg, "sector_size", where, "segment 0")
    if sector not in (512, 1024, 2048, 4096):
        raise CorruptImage("LUKS2 segment sector size", path=where, expected="512..4096",
                           found=sector)
    offset = _num(seg, "offset", where, "segment 0")
    size = None if seg.get("size") == "dynamic" else _num(seg, "size", where, "segment 0")
    _check_area(where, "LUKS2 data segment", offset, 0, limit)
    dig = next((d for d in digs.values() if isinstance(d, dict)
                and "0" in (d.get("segments") or [])), None)
    if dig is None or dig.get("type") != "pbkdf2":
        raise NotSupported(f"{where}: LUKS2 digest of segment 0 missing or not pbkdf2")
    dhash = P.check_hash(str(dig.get("hash")), where)
    digest, dsalt = _b64(dig, "digest", where, "digest"), _b64(dig, "salt", where, "digest")
    diter = _num(dig, "iterations", where, "digest")
    if not 1 <= diter <= P.MAX_PBKDF2_ITERATIONS:
        raise CorruptImage("LUKS2 digest iterations out of range", path=where,
                           expected=f"1..{P.MAX_PBKDF2_ITERATIONS}", found=diter)
    slot_ids = {str(k) for k in (dig.get("keyslots") or [])}
    slots: list[Keyslot] = []
    key_bytes = 0
    for name, ks in sorted(kss.items(), key=lambda kv: kv[0]):
        if not name.isdigit() or not isinstance(ks, dict):
            raise CorruptImage(f"LUKS2 keyslot '{name[:20]}' is malformed", path=where)
        if ks.get("type") != "luks2" or name not in slot_ids:
            continue
        what = f"keyslot {name}"
        kdf, af, area = (ks.get(k) or {} for k in ("kdf", "af", "area"))
        ksize = _num(ks, "key_size", where, what)
        stripes = _num(af, "stripes", where, what)
        akey = _num(area, "key_size", where, what)
        if not 1 <= ksize <= MAX_KEY_BYTES or not 1 <= akey <= MAX_KEY_BYTES:
            raise CorruptImage(f"LUKS2 {what}: key size out of range", path=where,
                               expected=f"1..{MAX_KEY_BYTES}", found=max(ksize, akey))
        if af.get("type") != "luks1" or not 1 <= stripes <= MAX_STRIPES:
            raise CorruptImage(f"LUKS2 {what}: anti-forensic splitter", path=where,
                               expected=f"luks1, 1..{MAX_STRIPES} stripes",
                               found=f"{af.get('type')}, {stripes}")
        aoff, asize = _num(area, "offset", where, what), _num(area, "size", where, what)
        _check_area(where, f"LUKS2 {what} area", aoff, asize, limit)
        if align_up(ksize * stripes, L.SECTOR) > asize:
            raise CorruptImage(f"LUKS2 {what}: key material larger than its area", path=where,
                               expected=f"<= {asize}", found=ksize * stripes)
        acipher, amode = _split_encryption(area.get("encryption"), where)
        parse_mode(acipher, amode, akey, where)
        kind = kdf.get("type")
        slot = Keyslot(int(name), True, str(kind), offset=aoff, size=asize, stripes=stripes,
                       af_hash=P.check_hash(str(af.get("hash")), where), key_size=ksize,
                       area_cipher=acipher, area_mode=amode, area_key_size=akey,
                       salt=_b64(kdf, "salt", where, what))
        if kind == "pbkdf2":
            slot.hash = P.check_hash(str(kdf.get("hash")), where)
            slot.iterations = _num(kdf, "iterations", where, what)
        elif kind in ("argon2i", "argon2id"):
            slot.time = _num(kdf, "time", where, what)
            slot.memory = _num(kdf, "memory", where, what)
            slot.cpus = _num(kdf, "cpus", where, what)
        else:
            raise NotSupported(f"{where}: LUKS2 {what}: kdf '{kind}' is not supported")
        slots.append(slot)
        key_bytes = ksize
    if not key_bytes:
        raise CorruptImage("LUKS2 header has no keyslot for segment 0", path=where)
    parse_mode(cipher, mode, key_bytes, where)
    return LuksHeader(2, cipher, mode, dhash, key_bytes, offset, size, sector,
                      _num(seg, "iv_tweak", where, "segment 0") if "iv_tweak" in seg else 0,
                      _text(b.uuid), slots, digest, dsalt, diter, raw, where,
                      label=_text(b.label), json=meta)


# -- creating (LUKS1, as qemu writes it) --------------------------------------------------------
def create1(passphrase: bytes, *, cipher: str = "aes", mode: str = "xts-plain64",
            hash_name: str = "sha256", key_bytes: int = 64, stripes: int = 4000,
            iter_time_ms: int = DEFAULT_ITER_TIME_MS, where: str = "") -> tuple[bytes, bytes]:
    """(the whole header area: header, 8 key material areas; the master key). The area's
    length is the payload offset (4040 sectors for a 64-byte key, as qemu)."""
    parse_mode(cipher, mode, key_bytes, where)
    P.check_hash(hash_name, where)
    stride = align_up(key_bytes * stripes, 4096)
    first = align_up(L.LUKS1_HEADER_SIZE, 4096)
    payload = first + L.LUKS1_SLOTS * stride
    mk = P.random_bytes(key_bytes)
    iters = pbkdf2_iterations(hash_name, iter_time_ms, key_bytes)
    salt = P.random_bytes(32)
    diter = max(MIN_ITERATIONS, iters // 8)
    digest = P.pbkdf2(hash_name, mk, salt, diter, L.DIGEST1_SIZE)
    slots = [Keyslot(i, False, "pbkdf2", hash_name, offset=first + i * stride,
                     size=align_up(key_bytes * stripes, L.SECTOR), stripes=stripes,
                     af_hash=hash_name, key_size=key_bytes, area_cipher=cipher,
                     area_mode=mode, area_key_size=key_bytes) for i in range(L.LUKS1_SLOTS)]
    h = LuksHeader(1, cipher, mode, hash_name, key_bytes, payload, None, L.SECTOR, 0,
                   str(uuidlib.uuid4()), slots, digest, salt, diter, b"", where)
    area = bytearray(payload)

    def write(off: int, data: bytes) -> None:
        area[off:off + len(data)] = data
    h.add_slot(mk, passphrase, write, iter_time_ms)
    return bytes(area), mk


# -- unlocking through the passphrase provider --------------------------------------------------
def unlock(header: LuksHeader, read: Read, location: str) -> bytearray:
    """The master key, from the current passphrase provider's candidates (cached per header)."""
    return secrets.unlock(secrets.SecretRequest(location, header.kind),
                          lambda pw: header.unlock(pw, read),
                          cache_key=("luks", hashlib.sha256(header.raw).digest()))


def change_passphrase(h: LuksHeader, read: Read, write: Write, location: str,
                      iter_time_ms: int | None = None) -> int:
    """The safe order (``write`` must sync): find the slots the current passphrase opens, add
    a slot for the provider's new passphrase (material, then header), check that it opens, then
    drop the old slots (header, then material wiped). Returns the new slot's index. Without
    ``iter_time_ms`` (LUKS1; always for LUKS2) the new slot costs what the old one did."""

    def opened(pw: bytes) -> list[tuple[int, bytes]] | None:
        found = []
        for s in h.slots:
            if s.active:
                mk = h.try_slot(s, pw, read)
                if mk is not None:
                    found.append((s.index, mk))
        return found or None
    found = secrets.unlock(secrets.SecretRequest(location, h.kind, "current passphrase"),
                           opened)
    mk = found[0][1]
    new = secrets.new_passphrase(secrets.SecretRequest(location, h.kind, "new passphrase"))
    old = h.slot(found[0][0])
    if h.version == 2:          # LUKS2: the old slot's KDF and costs (argon2 included)
        idx = h.add_slot_like(mk, new.reveal(), write, old)
    else:
        idx = h.add_slot(mk, new.reveal(), write, iter_time_ms or DEFAULT_ITER_TIME_MS,
                         iterations=None if iter_time_ms else max(MIN_ITERATIONS,
                                                                  old.iterations))
    if h.try_slot(h.slot(idx), new.reveal(), read) is None:
        raise CorruptImage("the new keyslot does not open after writing it; the old keyslots "
                           "are kept", path=location)
    for i, _ in found:
        h.remove_slot(i, write)
    return idx
