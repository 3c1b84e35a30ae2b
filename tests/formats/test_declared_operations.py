"""Each backend's declared operations (Backend.operations) match the hooks its image classes
implement: the app offers an action from the declaration alone (architecture rule 3), so a
declared operation without its hook would fail when used, and a hook without its declaration
is never offered."""
from __future__ import annotations

import importlib
import inspect
import pkgutil

from vdgui.vd import Backend, Image, Operation, backends

HOOKS = {Operation.WRITE: "write", Operation.COMPACT: "compact", Operation.RESIZE: "resize",
         Operation.CHECK: "check", Operation.RELINK: "set_parent", Operation.DISCARD: "discard",
         Operation.COMMENT: "set_comment"}


def image_classes(backend: Backend) -> set[type]:
    """The Image subclasses of the backend's format module (or every module of its package)."""
    prefix = ".".join(type(backend).__module__.split(".")[:4])     # vdgui.vd.formats.<name>
    top = importlib.import_module(prefix)
    mods = [top] + [importlib.import_module(f"{prefix}.{m.name}")
                    for m in pkgutil.iter_modules(getattr(top, "__path__", []))]
    return {c for m in mods for _, c in inspect.getmembers(m, inspect.isclass)
            if issubclass(c, Image) and c is not Image and c.__module__.startswith(prefix)}


def mismatches(backend: Backend, classes: set[type]) -> list[str]:
    out = []
    declared = set(backend.operations)
    for op, hook in HOOKS.items():
        has = any(getattr(c, hook) is not getattr(Image, hook) for c in classes)
        if op in declared and not has:
            out.append(f"{backend.name} declares {op.name} but no image class implements {hook}")
        if has and op not in declared:
            out.append(f"{backend.name} implements {hook} but does not declare {op.name}")
    impl = backend.implementation() if backend.impl_module else None
    creates = (type(backend).create is not Backend.create
               or getattr(impl, "create_image", None) is not None)
    if creates != (Operation.CREATE in declared):
        out.append(f"{backend.name}: create {'is' if creates else 'is not'} implemented, "
                   f"CREATE {'is not' if creates else 'is'} declared")
    if Operation.REPAIR in declared and Operation.CHECK not in declared:
        out.append(f"{backend.name} declares REPAIR without CHECK")
    return out


def test_the_comparison_sees_a_false_declaration():
    class Img(Image):
        def resize(self, new_size, progress=None):
            pass

    class Liar(Backend):
        name = "LIAR"
        operations = frozenset({Operation.COMPACT, Operation.REPAIR})

    found = mismatches(Liar(), {Img})
    assert any("declares COMPACT" in m for m in found)
    assert any("implements resize" in m for m in found)
    assert any("REPAIR without CHECK" in m for m in found)


def test_every_backend_declares_what_its_images_implement():
    found = []
    for b in backends():
        classes = image_classes(b)
        assert classes, f"no image class found for {b.name}"
        found += mismatches(b, classes)
    assert not found, "\n".join(found)
