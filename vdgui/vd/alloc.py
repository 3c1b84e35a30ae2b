"""Alloc: what one image says about a range (a leaf module: sparse helpers and the Image
contract both use it)."""
from __future__ import annotations

import enum


class Alloc(enum.IntEnum):
    UNALLOCATED = 0     # not in this image: look at the parent (zeroes for a base)
    DATA = 1            # this image holds the bytes
    ZERO = 2            # this image says "reads as zeroes" (hides the parent)
