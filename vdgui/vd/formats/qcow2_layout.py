"""The qcow2 structures under their former module name; they live in :mod:`.qcow2.layout`."""
from .qcow2.layout import *  # noqa: F403
