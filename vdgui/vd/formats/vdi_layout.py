"""The VDI structures under their former module name; they live in :mod:`.vdi.layout`."""
from .vdi.layout import *  # noqa: F403
