"""LUKS on-disk structures (rule 5), big-endian.

LUKS1: cryptsetup's "LUKS On-Disk Format Specification" 1.2.x (docs/on-disk-format.pdf), as
qemu's crypto/block-luks.c writes it: a 592-byte header with 8 key slots.
LUKS2: cryptsetup's docs/on-disk-format-luks2.pdf and lib/luks2/luks2.h (struct
luks2_hdr_disk): a 4096-byte binary header followed by the JSON area, twice.
"""
from __future__ import annotations

from construct import Array, Bytes, Int16ub, Int32ub, Int64ub, Struct

from . import LUKS_MAGIC

MAGIC = LUKS_MAGIC                   # the package holds it (probes check it cheaply)
MAGIC2_SECONDARY = b"SKUL\xba\xbe"
SLOT_ACTIVE = 0x00AC71F3
SLOT_INACTIVE = 0x0000DEAD
LUKS1_SLOTS = 8
DIGEST1_SIZE = 20
SECTOR = 512

Luks1Slot = Struct(
    "active" / Int32ub,
    "iterations" / Int32ub,
    "salt" / Bytes(32),
    "key_offset" / Int32ub,     # in 512-byte sectors, from the header's start
    "stripes" / Int32ub,
)

Luks1Header = Struct(
    "magic" / Bytes(6),
    "version" / Int16ub,
    "cipher_name" / Bytes(32),
    "cipher_mode" / Bytes(32),
    "hash_spec" / Bytes(32),
    "payload_offset" / Int32ub,  # sectors
    "key_bytes" / Int32ub,
    "mk_digest" / Bytes(DIGEST1_SIZE),
    "mk_digest_salt" / Bytes(32),
    "mk_digest_iter" / Int32ub,
    "uuid" / Bytes(40),
    "slots" / Array(LUKS1_SLOTS, Luks1Slot),
)
LUKS1_HEADER_SIZE = 592

Luks2Binary = Struct(
    "magic" / Bytes(6),
    "version" / Int16ub,
    "hdr_size" / Int64ub,       # binary + JSON area
    "seqid" / Int64ub,
    "label" / Bytes(48),
    "checksum_alg" / Bytes(32),
    "salt" / Bytes(64),
    "uuid" / Bytes(40),
    "subsystem" / Bytes(48),
    "hdr_offset" / Int64ub,
    "_padding" / Bytes(184),
    "csum" / Bytes(64),
    "_padding4096" / Bytes(7 * 512),
)
LUKS2_BINARY_SIZE = 4096
