"""Parsing and printing byte sizes (binary units only).

Accepted: a whole number of bytes (``512``, ``512B``), a number with a one-letter binary suffix as
qemu-img takes it (``K``, ``M``, ``G``, ``T``, ``P``, ``E``, either case: ``4G`` = 4 GiB) or with an
IEC unit (``KiB``, ``MiB``, ``GiB``, ``TiB``, ``PiB``, ``EiB``). A fraction is fine when it makes a
whole number of bytes (``1.5M``). Refused: decimal-looking units (``KB``, ``Kb``, ``MB``, ``GB``…),
which mean 1000-based bytes or bits elsewhere, so guessing would size a disk wrongly.
"""
from __future__ import annotations

import re

from .errors import InvalidArgument

_LETTERS = "KMGTPE"
_UNITS = {"": 1, "B": 1}
for _i, _c in enumerate(_LETTERS, 1):
    _UNITS[_c] = 1 << (10 * _i)
    _UNITS[_c.lower()] = 1 << (10 * _i)
    _UNITS[_c + "iB"] = 1 << (10 * _i)

_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*")


def parse_size(text: str | int) -> int:
    """'4G' -> 4294967296; '512' -> 512; '1.5M' -> 1572864; '2TiB' -> 2199023255552."""
    if isinstance(text, bool):
        raise InvalidArgument(f"not a size: {text!r}")
    if isinstance(text, int):
        if text < 0:
            raise InvalidArgument(f"size must not be negative: {text}")
        return text
    m = _SIZE_RE.fullmatch(str(text))
    if not m:
        raise InvalidArgument(f"not a size: {text!r} (use bytes, or a number with K, M, G, T, P, "
                              "E or KiB, MiB, GiB, TiB, PiB, EiB)")
    unit = m.group(2)
    if unit not in _UNITS:
        hint = ""
        if unit[:1].upper() in _LETTERS:
            c = unit[0].upper()
            hint = (f"; for {_UNITS[c]} bytes write {c} or {c}iB (sizes are binary: "
                    "1000-based units are not accepted)")
        raise InvalidArgument(f"not a size: {text!r}: unknown or ambiguous unit {unit!r}{hint}")
    if m.group(1).isdigit():                # '4G': no fractions module (resize's start-up)
        return int(m.group(1)) * _UNITS[unit]
    from fractions import Fraction  # here: a start-up cost most commands never need

    value = Fraction(m.group(1)) * _UNITS[unit]
    if value.denominator != 1:
        raise InvalidArgument(f"not a whole number of bytes: {text!r} is {float(value)} bytes")
    return int(value)


def format_size(n: int) -> str:
    """4294967296 -> '4.00 GiB'."""
    for unit, name in ((1 << 60, "EiB"), (1 << 50, "PiB"), (1 << 40, "TiB"), (1 << 30, "GiB"),
                       (1 << 20, "MiB"), (1 << 10, "KiB")):
        if n >= unit:
            return f"{n / unit:.2f} {name}"
    return f"{n} B"


def describe_size(n: int) -> str:
    """A limit as a person reads it: '2 TiB (2199023255552 bytes)', '2040 GiB (...)': the largest
    unit that divides it exactly, else two decimals rounded down (a limit is never overstated)."""
    units = ((1 << 60, "EiB"), (1 << 50, "PiB"), (1 << 40, "TiB"), (1 << 30, "GiB"),
             (1 << 20, "MiB"), (1 << 10, "KiB"))
    for unit, name in units:
        if n >= unit and n % unit == 0:
            return f"{n // unit} {name} ({n} bytes)"
    for unit, name in units:
        if n >= unit:
            hundredths = n * 100 // unit
            return f"{hundredths // 100}.{hundredths % 100:02d} {name} ({n} bytes)"
    return f"{n} bytes"
