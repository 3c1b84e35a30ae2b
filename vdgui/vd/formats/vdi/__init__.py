"""VDI backend: VirtualBox's native container (dynamic, fixed and differencing images).

Specification: VirtualBox ``src/VBox/Storage/VDI.cpp`` / ``VDICore.h``; structures in
:mod:`.layout`. Reads header versions 0.x, 1.0, 1.1 and 1.1+ (with LCHS); writes 1.1+ when
creating and keeps the version of an existing file. Limits and conventions:

* block size (``AllocationBlockSize``): a power of two, 512 B .. 256 MiB (1 MiB by default; qemu
  only opens 1 MiB blocks); ``cbBlockExtra`` bytes before each block are honoured and kept;
* at most 0x3fffffff blocks; the map must lie inside the file; new images put the map and the
  data area each on a 1 MiB boundary, as VirtualBox does (VDI_DATA_ALIGN), so an empty image is
  2 MiB and the map has room to grow in place; a differencing image's legacy geometry is 0/0/0;
* new blocks are appended at index ``cBlocksAllocated``; writes go data -> map entry ->
  header (the header's count is written at flush/close); block indices stay dense
  (0..allocated-1) after compact, discard and repair, which is what qemu-img check expects;
* a differencing image names its parent only by UUID (uuidLinkage) and the parent's
  modification UUID (uuidParentModify); there is no parent path in the format;
* the modification UUID changes on the first write of a session, as VirtualBox's VD layer does.
"""
from __future__ import annotations

from ...backend import Backend, Cap, FileExtension, ImageFlags, Operation, ProbeInput, lazy_exports
from ...config import ConfigKey, KeyFlag, ValueType

# what the declaration and its probe need, without the layout (construct) or the image code
SIGNATURE = 0xBEDA107F
PRE_HEADER_SIZE = 72                  # the pre-header's size (layout.PreHeader)
OFF_SIGNATURE = 0x40
OFF_VERSION = 0x44
MIN_BLOCK = 512
MAX_BLOCK = 256 << 20
# vdgui keeps the block map (4 bytes a block) in memory: images it creates or grows have at most
# 2**24 blocks (a 64 MiB map, so that a convert holding a source's and a target's map stays far
# below 300 MiB; 16 TiB with the default 1 MiB blocks, ext4's largest file). VirtualBox's own
# limit is MAX_SIZE below, qemu's MAX_BLOCKS blocks; larger images made elsewhere still open.
MAX_NEW_BLOCKS = 1 << 24
MAX_SIZE = 4 * (1 << 50) - 3 * (1 << 20) - 512   # VirtualBox: below 4 PiB - 3 MiB


def _max_size(block_size: int) -> int:
    """The largest VDI vdgui creates or grows with this block size."""
    return min(MAX_SIZE, MAX_NEW_BLOCKS * block_size)


def _size_limit(block_size: int) -> str:
    return (f" with {block_size}-byte blocks (vdgui keeps the block map in memory, "
            f"{MAX_NEW_BLOCKS} blocks at most; a larger AllocationBlockSize allows more, up to "
            f"VirtualBox's 4 PiB - 3 MiB)")


class VdiBackend(Backend):
    name = "VDI"
    description = "VirtualBox Disk Image"
    aliases = ("vdi",)
    resize_keeps_child_links = True   # UUID and modification UUID stay (as VirtualBox)
    caps = (Cap.UUID | Cap.CREATE_FIXED | Cap.CREATE_DYNAMIC | Cap.DIFF | Cap.FILE | Cap.ASYNC
            | Cap.VFS | Cap.DISCARD | Cap.PREFERRED)
    extensions = (FileExtension("vdi"),)
    owns_extensions = True
    config_keys = (
        ConfigKey("AllocationBlockSize", "1048576", ValueType.INTEGER, KeyFlag.CREATEONLY,
                  description="the unit of allocation (a power of two; qemu opens only 1 MiB "
                              "blocks)",
                  minimum=MIN_BLOCK, maximum=MAX_BLOCK, power_of_two=True,
                  label="Block size", unit="bytes"),
    )
    operations = frozenset({Operation.WRITE, Operation.CREATE, Operation.COMPACT,
                            Operation.RESIZE, Operation.CHECK, Operation.REPAIR,
                            Operation.RELINK, Operation.DISCARD, Operation.COMMENT})
    create_flags = ImageFlags.FIXED
    max_size = _max_size(1 << 20)
    size_granularity = 512
    can_shrink = True
    impl_module = f"{__name__}.impl"

    def max_size_for(self, config: dict | None = None) -> int:
        return _max_size(self.config_int(config, "AllocationBlockSize"))

    def limit_reason(self, config: dict | None = None) -> str:
        return _size_limit(self.config_int(config, "AllocationBlockSize"))

    def probe(self, src: ProbeInput) -> int:
        h = src.head
        if len(h) < PRE_HEADER_SIZE:
            return 0
        sig = int.from_bytes(h[OFF_SIGNATURE:OFF_SIGNATURE + 4], "little")
        if sig != SIGNATURE:
            return 0
        major = int.from_bytes(h[OFF_VERSION:OFF_VERSION + 4], "little") >> 16
        return 100 if major in (0, 1) else 60


BACKEND = VdiBackend()
__getattr__ = lazy_exports(__name__, "impl", "image", "blockmap", "layout")
