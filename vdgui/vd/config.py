"""Backend configuration keys, modelled on VirtualBox's VDCONFIGINFO.

A backend declares its keys; the CLI's ``--property`` and the GUI's generated forms are built from
them. Values travel as strings (as in VirtualBox) and are converted by :func:`parse_config`.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

from .errors import ConfigError


class ValueType(enum.IntEnum):
    INTEGER = 1
    STRING = 2
    BYTES = 3


class KeyFlag(enum.IntFlag):
    NONE = 0
    MANDATORY = 1 << 0
    EXPERT = 1 << 1      # not shown by default in the GUI
    CREATEONLY = 1 << 2  # only when creating; never stored


@dataclass(frozen=True)
class ConfigKey:
    name: str
    default: str | None
    type: ValueType
    flags: KeyFlag = KeyFlag.NONE
    description: str = ""
    minimum: int | None = None   # INTEGER only
    maximum: int | None = None   # INTEGER only
    power_of_two: bool = False   # INTEGER only

    @property
    def mandatory(self) -> bool:
        return bool(self.flags & KeyFlag.MANDATORY)

    @property
    def expert(self) -> bool:
        return bool(self.flags & KeyFlag.EXPERT)

    @property
    def create_only(self) -> bool:
        return bool(self.flags & KeyFlag.CREATEONLY)

    def convert(self, raw: str | bytes | int) -> int | str | bytes:
        """Convert and validate one value; raise ConfigError naming the key on bad input."""
        if self.type is ValueType.INTEGER:
            if isinstance(raw, int) and not isinstance(raw, bool):
                value = raw
            else:
                text = raw.decode() if isinstance(raw, bytes) else str(raw)
                try:
                    value = int(text.strip(), 0)
                except ValueError:
                    raise ConfigError(f"key '{self.name}': expected an integer, found {text!r}") from None
            if self.minimum is not None and value < self.minimum:
                raise ConfigError(f"key '{self.name}': value {value} is below the minimum {self.minimum}")
            if self.maximum is not None and value > self.maximum:
                raise ConfigError(f"key '{self.name}': value {value} is above the maximum {self.maximum}")
            if self.power_of_two and (value <= 0 or value & (value - 1)):
                raise ConfigError(f"key '{self.name}': expected a power of two, found {value}")
            return value
        if self.type is ValueType.BYTES:
            return raw if isinstance(raw, bytes) else str(raw).encode()
        return raw.decode() if isinstance(raw, bytes) else str(raw)


def parse_config(keys: tuple[ConfigKey, ...] | list[ConfigKey], given: dict | None, *,
                 creating: bool = False, owner: str = "backend") -> dict:
    """Validate ``given`` against ``keys``: unknown keys and missing mandatory keys are errors.

    Returns a dict with every key that has a value (given or default), converted to its type.
    CREATEONLY keys are rejected unless ``creating``.
    """
    given = dict(given or {})
    by_name = {k.name: k for k in keys}
    for name in given:
        if name not in by_name:
            known = ", ".join(sorted(by_name)) or "none"
            raise ConfigError(f"{owner}: unknown configuration key '{name}' (known keys: {known})")
        if by_name[name].create_only and not creating:
            raise ConfigError(f"{owner}: key '{name}' can only be set when creating an image")
    out: dict = {}
    for key in keys:
        if key.name in given and given[key.name] not in (None, ""):
            out[key.name] = key.convert(given[key.name])
        elif key.default is not None:
            out[key.name] = key.convert(key.default)
        elif key.mandatory:
            raise ConfigError(f"{owner}: mandatory configuration key '{key.name}' is missing")
    return out
