"""The desktop app (PySide6)."""

from vdgui import qtfix  # noqa: F401  (before any signal is emitted)
