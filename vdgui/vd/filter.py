"""Filters: transforms between a disk and its user, as vd.h's VDFilterAdd/Remove/Info.

A filter backend is declared like an image backend (name, description, configuration keys,
capabilities); the table is :mod:`vdgui.vd.filters`. An opened :class:`Filter` sits in a
:class:`~vdgui.vd.disk.Disk`'s chain of filters: reads pass through every read filter after the
images are read, writes through every write filter before they reach the top image. Filters
work on whole data units (``data_unit`` bytes) and are told each unit's offset in the disk (the
tweak of a disk cipher). The images beneath hold the filtered bytes; operations that only move
stored bytes between members of one chain (merge, compact, resize, check) need no filter.
"""
from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

from .config import ConfigKey
from .errors import InvalidArgument


class FilterCap(enum.IntFlag):
    NONE = 0
    READ = 1 << 0        # transforms what is read (VD_FILTER_FLAGS_READ)
    WRITE = 1 << 1       # transforms what is written (VD_FILTER_FLAGS_WRITE)
    SECRET = 1 << 2      # needs a passphrase to open
    KEYSTORE = 1 << 3    # keeps a key store outside the image (in the media registry)


class FilterUse(enum.IntFlag):
    """Which of a disk's chains a filter joins (VDFilterAdd's fFlags)."""
    READ = 1
    WRITE = 2
    BOTH = 3


class Filter:
    """An opened filter. Subclasses transform ``buf`` (a writable buffer of whole data units
    starting at disk offset ``offset``) in place."""

    backend: FilterBackend
    data_unit: int = 512

    def decode(self, offset: int, buf: memoryview) -> None:
        """Stored bytes -> what the user reads."""
        raise NotImplementedError

    def encode(self, offset: int, buf: memoryview) -> None:
        """What the user writes -> stored bytes."""
        raise NotImplementedError

    def info(self) -> dict:
        """What VDFilterInfo would tell: never a secret."""
        return {"name": self.backend.name}

    def properties(self) -> dict[str, str]:
        """The configuration to keep for this filter (e.g. a new key store), never a secret."""
        return {}

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.backend.name}>"


@dataclass(frozen=True)
class FilterBackend:
    """A filter as the table declares it (VDFILTERBACKEND)."""
    name: str
    description: str
    caps: FilterCap
    config_keys: tuple[ConfigKey, ...] = ()
    # opener(config, location) -> Filter; config checked against config_keys first
    opener: Callable[[dict, str], Filter] | None = field(default=None, compare=False)

    def open(self, config: dict | None = None, location: str = "") -> Filter:
        """An opened filter for the disk at ``location`` (named in prompts and errors). A
        filter that needs a passphrase asks the current provider (:mod:`vdgui.vd.secrets`)."""
        from .config import parse_config

        cfg = parse_config(self.config_keys, config, owner=f"filter {self.name}")
        if self.opener is None:
            raise InvalidArgument(f"filter {self.name} cannot be opened")
        return self.opener(cfg, location)


def check_units(f: Filter, offset: int, length: int) -> None:
    if offset % f.data_unit or length % f.data_unit:
        raise InvalidArgument(
            f"filter {f.backend.name}: {length} bytes at {offset} are not whole "
            f"{f.data_unit}-byte data units"
        )


__all__ = ["Filter", "FilterBackend", "FilterCap", "FilterUse", "check_units"]
