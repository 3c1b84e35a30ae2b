"""The VMDK descriptor under its former module name; it lives in :mod:`.vmdk.descriptor`."""
from .vmdk.descriptor import *  # noqa: F403
