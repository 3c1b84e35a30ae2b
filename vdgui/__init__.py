"""vdgui: a desktop manager for virtual disk images."""
from __future__ import annotations


def __getattr__(name: str):
    # The version is looked up on first use: importlib.metadata costs ~10 ms at every start of
    # vdgui-img, which most commands never need.
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version
        try:
            value = version("vdgui")
        except PackageNotFoundError:  # running from a source tree without install
            value = "0.0.0+src"
        globals()["__version__"] = value
        return value
    raise AttributeError(f"module 'vdgui' has no attribute {name!r}")
