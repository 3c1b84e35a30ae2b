"""Config keys a person can read: every key has a label; pick-lists and variant-bound keys."""
from __future__ import annotations

import pytest

from vdgui.vd import (
    ConfigError,
    ConfigKey,
    ImageFlags,
    KeyFlag,
    ValueType,
    applicable_keys,
    backends,
    filters,
    parse_config,
)


@pytest.mark.parametrize("backend", [*backends(), *filters()], ids=lambda b: b.name)
def test_every_key_has_a_label_and_a_description(backend):
    for k in backend.config_keys:
        assert (k.label and k.label != k.name) or k.name in ("LUN",), (backend.name, k.name)
        assert k.description, (backend.name, k.name)
        assert not k.description[:2].startswith(("0:", "1:")), "a switch's text says what it does"


def test_choices_are_enforced_for_strings_and_integers():
    s = ConfigKey("Compat", "1.1", ValueType.STRING, choices=("1.1", "0.10"))
    assert s.convert("0.10") == "0.10"
    with pytest.raises(ConfigError, match="expected one of 1.1, 0.10, found '2'"):
        s.convert("2")
    i = ConfigKey("Sector", "512", ValueType.INTEGER, choices=("512", "4096"))
    assert i.convert("4096") == 4096
    with pytest.raises(ConfigError, match="expected one of 512, 4096"):
        i.convert("1024")


def test_applicable_keys_by_mode_and_variant():
    a = ConfigKey("A", None, ValueType.STRING)
    c = ConfigKey("C", None, ValueType.STRING, KeyFlag.CREATEONLY)
    r = ConfigKey("R", None, ValueType.STRING, variant=ImageFlags.RAWDISK)
    keys = (a, c, r)
    assert applicable_keys(keys, mode="create") == [a, c]
    assert applicable_keys(keys, mode="edit") == [a]
    assert applicable_keys(keys, mode="create", variant=ImageFlags.RAWDISK | ImageFlags.FIXED) \
        == [a, c, r]
    # the CLI still takes every key: forms choose, parse_config does not
    assert parse_config(keys, {"R": "x", "C": "y"}, creating=True) == {"R": "x", "C": "y"}
