"""Integer rounding used by every block-mapped format (blocks, clusters, sectors, tables)."""
from __future__ import annotations


def ceil_div(a: int, b: int) -> int:
    """``a / b`` rounded up (``b > 0``): how many units of ``b`` cover ``a``."""
    return -(-a // b)


def align_up(a: int, b: int) -> int:
    """``a`` rounded up to a multiple of ``b`` (``b > 0``)."""
    return -(-a // b) * b


def align_down(a: int, b: int) -> int:
    """``a`` rounded down to a multiple of ``b`` (``b > 0``)."""
    return a // b * b
