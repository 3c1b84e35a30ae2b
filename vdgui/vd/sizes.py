"""Parsing and printing byte sizes (K/M/G/T suffixes, binary)."""
from __future__ import annotations

import re

from .errors import InvalidArgument

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}


def parse_size(text: str | int) -> int:
    """'4G' -> 4294967296; '512' -> 512; '1.5M' -> 1572864. Suffixes K/M/G/T (KiB... accepted)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGTPB]?)(?:I?B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise InvalidArgument(f"not a size: {text!r} (use bytes or a K/M/G/T suffix)")
    value = float(m.group(1)) if "." in m.group(1) else int(m.group(1))
    result = int(value * _UNITS[m.group(2).upper()])
    if result < 0:
        raise InvalidArgument(f"size must not be negative: {text!r}")
    return result


def format_size(n: int) -> str:
    """4294967296 -> '4.00 GiB'."""
    for unit, name in ((1 << 40, "TiB"), (1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if n >= unit:
            return f"{n / unit:.2f} {name}"
    return f"{n} B"
