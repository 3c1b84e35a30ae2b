"""vdgui: a desktop manager for virtual disk images."""
from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("vdgui")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+src"
