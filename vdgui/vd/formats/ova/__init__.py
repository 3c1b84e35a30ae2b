"""OVA backend: an Open Virtualization Format archive (a tar of an .ovf descriptor, an optional
.mf manifest and the disks), read-only.

Specification: DMTF DSP0243 (OVF 1.x/2.x), "OVF package" as a single file: a POSIX ustar
archive whose first member is the .ovf descriptor. The disks are members stored whole and
uncompressed inside the tar (streamOptimized VMDK in VirtualBox's and VMware's exports), so a
disk is read in place through a window onto the archive, by the backend that claims the member's
first bytes; nothing is extracted. Limits: at most MAX_MEMBERS members; GNU sparse members and
compressed (.gz) disks are refused with what to do instead.

Which disk: the ``Disk`` key names a member (``disk1.vmdk``) or its number among the disks (1 =
the first, the default). ``info`` lists every disk with its format and size.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

from ...backend import Backend, Cap, DeviceType, FileExtension, ProbeInput, lazy_exports
from ...config import ConfigKey, KeyFlag, ValueType

TAR_BLOCK = 512


def _is_ustar(head: bytes) -> bool:
    return len(head) >= TAR_BLOCK and head[257:262] == b"ustar"


class OvaBackend(Backend):
    name = "OVA"
    description = "Open Virtualization Format archive (.ova: the disks inside), read-only"
    aliases = ("ovf-archive",)
    caps = Cap.FILE | Cap.CONFIG
    extensions = (FileExtension("ova", DeviceType.HARD_DISK),)
    config_keys = (ConfigKey("Disk", "1", ValueType.STRING, KeyFlag.NONE,
                             "which disk of the archive: its member name or its number (1 = "
                             "the first)", label="Disk in the archive"),)
    operations = frozenset()
    impl_module = f"{__name__}.image"

    def __init__(self, backends: Callable[[], Iterable[Backend]]):
        self._backends = backends          # the table the disks inside are probed against

    def probe(self, src: ProbeInput) -> int:
        # a ustar archive whose first member is the .ovf descriptor (DSP0243 requires it first)
        if not _is_ustar(src.head):
            return 0
        name = src.head[:100].split(b"\0", 1)[0].decode("utf-8", "replace").lower()
        if name.endswith(".ovf"):
            return 100
        return 60 if src.ext == "ova" else 0


__getattr__ = lazy_exports(__name__, "image")
