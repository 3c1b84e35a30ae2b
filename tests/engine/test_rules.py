"""ARCHITECTURE.md rule 1 and 2, checked by scanning imports."""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "vdgui"


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    mods = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
                pkg = parts[:-node.level]
                base = ".".join(pkg + ([base] if base else []))
                if not node.module:
                    mods += [f"{base}.{a.name}" for a in node.names]
                    continue
            mods.append(base)
    return mods


def test_engine_never_imports_qt():
    for py in (PKG / "vd").rglob("*.py"):
        for m in _imports(py):
            assert not m.startswith(("PySide6", "PyQt", "shiboken", "vdgui.gui", "vdgui.jobs")), \
                f"{py} imports {m}"


def test_gui_jobs_cli_use_only_public_engine_api():
    files = list((PKG / "gui").rglob("*.py")) + list((PKG / "jobs").rglob("*.py")) + [PKG / "cli.py"]
    for py in files:
        if not py.exists():
            continue
        for m in _imports(py):
            if m.startswith("vdgui.vd."):
                raise AssertionError(f"{py} imports {m}: use vdgui.vd (the public API) only")


def test_format_modules_do_not_import_each_other():
    fmt_dir = PKG / "vd" / "formats"
    names = {p.stem for p in fmt_dir.glob("*.py") if p.stem != "__init__"}
    for py in fmt_dir.glob("*.py"):
        if py.stem == "__init__":
            continue
        own = py.stem.split("_")[0]
        for m in _imports(py):
            if m.startswith("vdgui.vd.formats."):
                other = m.split(".")[3]
                assert other.split("_")[0] == own, f"{py} imports format module {other}"
