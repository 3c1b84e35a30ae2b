"""Disk encryption shared by the backends (issue #17; docs/design-encryption.md): primitives
(the one place cryptography and argon2 are imported), sector ciphers with their IV generators,
LUKS1/LUKS2 headers and keyslots. Imports no format module."""

DEFAULT_ITER_TIME_MS = 2000          # as qemu and cryptsetup (a declaration needs it: cheap here)
LUKS_MAGIC = b"LUKS\xba\xbe"


def is_luks(head: bytes) -> int:
    """0, 1 or 2: the LUKS version a file's first bytes announce (cheap: for probes)."""
    if len(head) >= 8 and head[:6] == LUKS_MAGIC:
        v = int.from_bytes(head[6:8], "big")
        return v if v in (1, 2) else 0
    return 0
