"""Backend configuration keys, modelled on VirtualBox's VDCONFIGINFO.

A backend declares its keys; the CLI's ``--property`` and the GUI's generated forms are built from
them. Values travel as strings (as in VirtualBox) and are converted by :func:`parse_config`.
"""
from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

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
    """One setting. ``name`` is the key scripts use (``--property NAME=V``, as VirtualBox names
    it); ``label``, ``unit`` and ``description`` are what a person reads in a form."""
    name: str
    default: str | None
    type: ValueType
    flags: KeyFlag = KeyFlag.NONE
    description: str = ""        # one line: what the setting does
    minimum: int | None = None   # INTEGER only
    maximum: int | None = None   # INTEGER only
    power_of_two: bool = False   # INTEGER only
    label: str = ""              # the form's label ("Block size"); the name when empty
    unit: str = ""               # shown beside the value: "bytes", "ms", "bits"...
    choices: tuple[str, ...] = ()   # the only values accepted, when the key is a pick-list
    variant: int = 0             # image variant bits (ImageFlags) the key applies to; 0: all
    # a check of the converted value beyond type and range (e.g. "host:port"); raises
    # ConfigError. The CLI and the forms both run it.
    validator: Callable[[object], object] | None = field(default=None, compare=False)

    @property
    def title(self) -> str:
        return self.label or self.name

    @property
    def is_switch(self) -> bool:
        """An on/off setting (INTEGER 0 or 1): a check box in a form."""
        return self.type is ValueType.INTEGER and self.minimum == 0 and self.maximum == 1

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
                    raise ConfigError(
                        f"key '{self.name}': expected an integer, found {text!r}"
                    ) from None
            if self.minimum is not None and value < self.minimum:
                raise ConfigError(
                    f"key '{self.name}': value {value} is below the minimum {self.minimum}"
                )
            if self.maximum is not None and value > self.maximum:
                raise ConfigError(
                    f"key '{self.name}': value {value} is above the maximum {self.maximum}"
                )
            if self.power_of_two and (value <= 0 or value & (value - 1)):
                raise ConfigError(f"key '{self.name}': expected a power of two, found {value}")
            if self.choices and str(value) not in self.choices:
                raise ConfigError(
                    f"key '{self.name}': expected one of {', '.join(self.choices)}, found {value}"
                )
            return value
        if self.choices:
            text = raw.decode() if isinstance(raw, bytes) else str(raw)
            if text not in self.choices:
                raise ConfigError(
                    f"key '{self.name}': expected one of {', '.join(self.choices)}, found {text!r}"
                )
        if self.type is ValueType.BYTES:
            return raw if isinstance(raw, bytes) else str(raw).encode()
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        if self.validator is not None:
            try:
                self.validator(text)
            except ConfigError as exc:
                msg = exc.message
                raise ConfigError(
                    msg if msg.startswith(f"key '{self.name}'") else f"key '{self.name}': {msg}"
                ) from None
        return text


def parse_config(
    keys: tuple[ConfigKey, ...] | list[ConfigKey],
    given: dict | None,
    *,
    creating: bool = False,
    owner: str = "backend",
) -> dict:
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


def applicable_keys(keys, *, mode: str = "create", variant: int = 0) -> list[ConfigKey]:
    """The keys a form shows: CREATEONLY keys only when creating, and a key tied to an image
    variant (``ConfigKey.variant``) only when that variant is chosen."""
    if mode not in ("create", "edit"):
        raise ValueError(f"mode must be 'create' or 'edit', not {mode!r}")
    return [
        k
        for k in keys
        if (mode == "create" or not k.create_only)
        and (not k.variant or (variant & k.variant) == k.variant)
    ]
