"""The filter table (vd.h's filter backends), explicit as the format table is. A filter
transforms data between a Disk and its user (:mod:`vdgui.vd.filter`)."""
from __future__ import annotations

from ..errors import UnknownFormat
from ..filter import FilterBackend
from .crypt import CRYPT

FILTERS: tuple[FilterBackend, ...] = (CRYPT,)


def filters() -> list[FilterBackend]:
    return list(FILTERS)


def get_filter(name: str) -> FilterBackend:
    for f in FILTERS:
        if f.name.lower() == name.lower():
            return f
    raise UnknownFormat(f"unknown filter '{name}' (known: {', '.join(f.name for f in FILTERS)})")


__all__ = ["FILTERS", "filters", "get_filter"]
