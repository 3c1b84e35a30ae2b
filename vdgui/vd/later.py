"""Mixins whose code loads on first use (issue #18 goal 3: a command imports what it uses).

An image class is put together from concern mixins (checking, compaction, resize, bitmaps …);
most commands use one or two of them. ``later(module, name, names)`` is a stand-in base class
holding, for each of ``names`` (the mixin's own attributes), a descriptor that imports the
module on first access and puts the mixin's attribute in its place. Attribute lookup is then as
if the mixin itself were in the bases. The mixin's methods must not use zero-argument
``super()`` (its class is not in the image's bases); tests/cli/test_startup.py checks that
``names`` are exactly the mixin's own attributes, and that no method needs ``__class__``.

Type checkers see the real mixin: ``if TYPE_CHECKING: from .check import CheckMixin``
``else: CheckMixin = later(...)``.
"""
from __future__ import annotations

import importlib
from typing import Any


class _Deferred:
    __slots__ = ("mixin", "module", "name")

    def __init__(self, module: str, mixin: str, name: str) -> None:
        self.module, self.mixin, self.name = module, mixin, name

    def resolve(self) -> Any:
        mixin = getattr(importlib.import_module(self.module), self.mixin)
        return mixin.__dict__[self.name]

    def __get__(self, obj: object, owner: type | None = None) -> Any:
        if owner is None:
            owner = type(obj)
        raw = self.resolve()
        for k in owner.__mro__:             # the stand-in holding us: the real attribute now
            if k.__dict__.get(self.name) is self:
                setattr(k, self.name, raw)
                break
        get = getattr(type(raw), "__get__", None)
        return raw if get is None else get(raw, obj, owner)


def later(module: str, mixin: str, names: str) -> type:
    """A stand-in for ``module.mixin`` (absolute module name) defining ``names`` (blank
    separated) on first use."""
    attrs: dict[str, Any] = {n: _Deferred(module, mixin, n) for n in names.split()}
    attrs["__later__"] = (module, mixin)
    attrs["__doc__"] = f"{mixin} of {module}, loaded on first use"
    return type(mixin, (), attrs)


__all__ = ["later"]
