"""Every action's enabled state follows the backend declarations (table-driven over the
registered backends); a disabled action's tooltip says why."""
from __future__ import annotations

import os

import pytest

from vdgui.gui import actions
from vdgui.gui.actions import SPECS
from vdgui.gui.models.media import MediaModel
from vdgui.vd import Cap, ImageRecord, Operation, backends

pytestmark = pytest.mark.gui

BACKENDS = [b for b in backends()]


def expected(key: str, b, *, has_parent=False, has_children=False) -> bool:
    """The rule, restated from the declarations alone."""
    if key in ("add", "refresh", "properties", "remove"):
        return True
    if key == "create":
        return any(x.creatable for x in backends())
    if key == "snapshot":
        return bool(b.caps & Cap.DIFF) and b.can(Operation.CREATE)
    if key == "copy":
        return any(x.creatable for x in backends())
    if key in ("move", "delete"):
        return bool(b.caps & Cap.FILE)
    if key == "merge":
        return bool(b.caps & Cap.DIFF) and (has_parent or has_children)
    if key == "resize":
        return b.can(Operation.RESIZE) and not has_children
    if key == "compact":
        return b.can(Operation.COMPACT) and not has_children
    if key == "check":
        return b.can(Operation.CHECK)
    if key == "repair":
        return b.can(Operation.REPAIR)
    if key == "compare":
        return False                    # one image selected: compare needs two
    if key == "encrypt":
        return bool(b.caps & Cap.FILE)  # the records here are not encrypted
    if key in ("decrypt", "passphrase"):
        return False
    raise AssertionError(key)


def _record(path: str, b, parent: str | None = None) -> ImageRecord:
    with open(path, "wb") as f:
        f.write(b"\0" * 512)
    return ImageRecord(path=path, format=b.name, virtual_size=1 << 20, file_size=512,
                       variant="dynamic", parent_path=parent, is_diff=parent is not None,
                       device_type=b.device_type_for(path).value)


@pytest.mark.parametrize("backend", BACKENDS, ids=[b.name for b in BACKENDS])
def test_actions_follow_declarations(qtbot, window, tmp_path, backend):
    ext = backend.default_extension() or "img"
    base = str(tmp_path / f"base.{ext}")
    child = str(tmp_path / f"child.{ext}")
    recs = [_record(base, backend)]
    if backend.caps & Cap.DIFF:
        recs.append(_record(child, backend, parent=base))
    window.model.set_records(recs)
    cases = [(base, False, len(recs) > 1)]
    if len(recs) > 1:
        cases.append((child, True, False))
    for path, has_parent, has_children in cases:
        window.select_paths([path])
        assert [n.path for n in window.selected_nodes()] == [path]
        for spec in SPECS:
            a = window.actions[spec.key]
            want = expected(spec.key, backend, has_parent=has_parent, has_children=has_children)
            assert a.isEnabled() == want, (backend.name, spec.key, path, a.toolTip())
            if not want:
                assert "Unavailable:" in a.toolTip(), (spec.key, a.toolTip())


def test_tooltips_name_the_missing_capability(qapp):
    b = next((x for x in BACKENDS if not x.caps & Cap.DIFF), None)
    assert b is not None
    model = MediaModel()
    model.set_records([ImageRecord(path=f"/nonexistent/x.{b.default_extension()}", format=b.name)])
    node = model.nodes()[0]
    r = actions.reason("snapshot", [node])
    assert r and "DIFF" in r and b.name in r


def test_busy_images_disable_conflicting_actions(qapp):
    b = BACKENDS[0]
    model = MediaModel()
    path = f"/nonexistent/x.{b.default_extension()}"
    model.set_records([ImageRecord(path=path, format=b.name)])
    node = model.nodes()[0]
    ctx = actions.Context(busy={path})
    for key in ("snapshot", "copy", "move", "merge", "resize", "compact", "check", "repair",
                "remove", "delete"):
        assert "busy" in (actions.reason(key, [node], ctx) or ""), key
    assert actions.reason("properties", [node], ctx) is None


def test_multi_selection(qtbot, window, tmp_path):
    b = next(x for x in BACKENDS if x.caps & Cap.FILE)
    ext = b.default_extension()
    recs = [_record(str(tmp_path / f"{i}.{ext}"), b) for i in range(3)]
    window.model.set_records(recs)
    window.select_paths([r.path for r in recs])
    assert len(window.selected_nodes()) == 3
    for key in ("remove", "delete"):
        assert window.actions[key].isEnabled()
    for key in ("copy", "move", "resize", "snapshot", "properties"):
        if key == "properties":
            continue
        assert not window.actions[key].isEnabled()
        assert "single image" in window.actions[key].toolTip()


def test_shortcuts_as_virtualbox(qapp, window):
    want = {"add": "Ctrl+Shift+A", "copy": "Ctrl+Shift+C", "move": "Ctrl+Shift+M",
            "remove": "Ctrl+Shift+R", "properties": "Ctrl+Shift+P", "refresh": "Ctrl+Shift+F"}
    for key, seq in want.items():
        assert window.actions[key].shortcut().toString() == seq


def test_no_format_names_compared_in_gui():
    """The GUI decides from declarations: no backend name literal appears in its code, except
    the default-format preference of the create dialog."""
    import vdgui.gui as gui
    root = os.path.dirname(gui.__file__)
    names = {b.name for b in BACKENDS} | {"VDI", "VMDK", "VHD", "VHDX", "QCOW2", "QED", "RAW"}
    for dirpath, _, files in os.walk(root):
        for fn in files:
            if not fn.endswith(".py"):
                continue
            with open(os.path.join(dirpath, fn), encoding="utf-8") as f:
                text = f.read()
            for n in names:
                for quote in ('"', "'"):
                    lit = f"{quote}{n}{quote}"
                    if lit in text:
                        assert fn == "common.py" and n == "VDI", f"{fn} compares with {lit}"


def test_context_menu(qtbot, window, vdi_chain):
    window.add_paths([vdi_chain["snap2"]], sync=True)
    window.show()
    idx = window.proxy.index_for_path(vdi_chain["snap2"])
    rect = window.tree.visualRect(idx)
    menu = window._context_menu(rect.center())
    texts = [a.text() for a in menu.actions()]
    assert window.actions["copy"] in menu.actions() and "Copy &UUID" in texts
    assert "Open Containing &Folder" in texts
    menu.close()
    empty = window._context_menu(rect.center() + rect.bottomLeft() * 0
                                 + type(rect.center())(5, 400))
    assert window.actions["add"] in empty.actions()
    empty.close()
