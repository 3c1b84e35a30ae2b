"""VHDX backend: Microsoft's Virtual Hard Disk v2 (Hyper-V), read and write.

Specification: [MS-VHDX] "Virtual Hard Disk v2 (VHDX) File Format" v1.0 (Microsoft Open
Specifications). Facts used here (section numbers of MS-VHDX):

* 2.1 layout: file type identifier at 0, headers at 64 KiB and 128 KiB (4 KiB each, the valid one
  with the highest sequence number is current), region tables at 192 KiB and 256 KiB (64 KiB each).
  Every object past the first MiB (log, metadata region, BAT, payload and sector-bitmap blocks) is
  1 MiB aligned.
* 2.2 checksums: CRC-32C over the whole structure with the checksum field zeroed.
* 2.3 log: circular, 4 KiB sectors; entries ("loge") hold zero ("zero") and data ("desc")
  descriptors, data sectors ("data") carry 4084 bytes between the descriptor's 8 leading and
  4 trailing bytes. The active sequence (highest sequence number, consecutive numbers, header's
  LogGuid) is replayed from the head entry's tail before anything else is read.
* 2.4 region table: BAT and metadata regions (unknown regions marked required: refuse).
* 2.5 BAT: 64-bit entries, state in bits 0-2, file offset in MiB in bits 20-63; a sector bitmap
  entry follows every ``chunk ratio`` payload entries, chunk ratio = 2^23 * logical sector size /
  block size.
* 2.6 metadata region: table ("metadata", at most 2047 entries) and items: file parameters
  (block size 1..256 MiB power of two, LeaveBlockAllocated, HasParent), virtual disk size, page 83
  data (used as this image's UUID), logical and physical sector size (512 or 4096), parent locator
  (type B04AEFB7-..., UTF-16 keys parent_linkage, relative_path, volume_path, absolute_win32_path).

Writing: a new payload block is appended at the 1 MiB aligned end of the file; its data is written
and flushed before its BAT entry. In a differencing image a write into a block that is not present
marks the written sectors in the chunk's sector bitmap (PARTIALLY_PRESENT), so the parent's data is
never copied. BAT, bitmap and metadata updates are written in place, each a single aligned write
inside one 4 KiB sector and ordered data -> bitmap -> BAT, so an interruption leaves a readable
image. (MS-VHDX 2.3 asks for metadata updates to go through the log; this implementation replays
logs written by others but orders its own single-sector updates instead, as qemu's readers and
Hyper-V only need the result to be consistent.) A BAT that outgrows its region on resize is copied
to the end of the file before region table 1, then 2, are rewritten. Header updates alternate
between the two header copies with increasing sequence numbers.
The DataWriteGuid changes before the first data write of a session, the FileWriteGuid on every
read-write open (2.2.2). A child's parent_linkage is its parent's DataWriteGuid (exposed as
modification_uuid / parent_modification_uuid); page 83 data is the image UUID.

Operations: create (dynamic, fixed, differencing; 512 or 4096-byte logical sectors), write,
discard, resize (grow: the BAT moves when it outgrows its region; shrink: refused over data
this image holds, BAT entries past the end cleared, file cut), compact (in place: zero or
parent-equal blocks dropped, blocks moved down into the holes, file cut), check/repair (a
pending log, damaged header copies, BAT entries with bad states or outside the file), relink
(rewrite the parent locator; None turns the child into a base image).
A read-only open of an image whose log holds changes raises LogReplayNeeded (a CorruptImage);
any read-write open replays it, as ``qemu-img check -r all`` does.

Limits (parser safety): region table entries <= 2047, metadata entries <= 2047, metadata items
<= 1 MiB, log <= 64 MiB, virtual size <= 64 TiB, BAT region must lie inside the file.

Split by on-disk structure: :mod:`.layout` (structs, GUIDs, constants, checksums), :mod:`.log`
(log replay), :mod:`.metadata` (metadata region, parent locator, relink), :mod:`.maintenance`
(resize, compact, check), :mod:`.image` (VhdxImage: headers, region table, BAT, data; the
backend); :mod:`.state` declares what the mixins share.
"""
from __future__ import annotations

from ...backend import Backend, Cap, FileExtension, ImageFlags, Operation, ProbeInput, lazy_exports
from ...config import ConfigKey, KeyFlag, ValueType

# what the declaration needs, without the layout (construct) or the image code
KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB
MAX_LOG = 64 * MiB
MAX_SIZE = 64 * TiB
# vdgui keeps the BAT in memory (8 bytes an entry): images it creates or grows have at most 2**22
# payload blocks (a 32 MiB BAT; a convert holds two, with copies: < 300 MiB): the spec's 64 TiB
# with blocks of 16 MiB or more (the default for large disks is 32 MiB), 4 TiB with 1 MiB blocks
MAX_NEW_BLOCKS = 1 << 22


def vhdx_max_size(block_size: int) -> int:
    return min(MAX_SIZE, MAX_NEW_BLOCKS * block_size)


def limit_reason(block_size: int) -> str:
    if MAX_NEW_BLOCKS * block_size >= MAX_SIZE:
        return " (the VHDX specification's limit)"
    return (f" with {block_size}-byte blocks (vdgui keeps the BAT in memory, {MAX_NEW_BLOCKS} "
            "blocks at most; a larger BlockSize allows up to 64 TiB)")


class VhdxBackend(Backend):
    name = "VHDX"
    description = "Hyper-V Virtual Hard Disk v2"
    aliases = ("vhdx",)
    caps = (Cap.FILE | Cap.VFS | Cap.CREATE_DYNAMIC | Cap.CREATE_FIXED | Cap.DIFF | Cap.UUID
            | Cap.DISCARD)
    extensions = (FileExtension("vhdx"), FileExtension("avhdx"))
    owns_extensions = True
    config_keys = (
        ConfigKey("BlockSize", "0", ValueType.INTEGER, KeyFlag.CREATEONLY,
                  "the unit of allocation (1 MiB .. 256 MiB, power of two); 0 chooses "
                  "8 MiB (32 MiB above 100 GiB, 2 MiB for differencing images)",
                  minimum=0, maximum=256 * MiB, label="Block size", unit="bytes"),
        ConfigKey("LogicalSectorSize", "512", ValueType.INTEGER,
                  KeyFlag.CREATEONLY | KeyFlag.EXPERT,
                  "the sector size the guest sees", minimum=512, maximum=4096,
                  label="Logical sector size", unit="bytes", choices=("512", "4096")),
        ConfigKey("PhysicalSectorSize", "4096", ValueType.INTEGER,
                  KeyFlag.CREATEONLY | KeyFlag.EXPERT, "the sector size the disk reports as "
                  "physical", minimum=512, maximum=4096, label="Physical sector size",
                  unit="bytes", choices=("512", "4096")),
        ConfigKey("LogSize", str(MiB), ValueType.INTEGER, KeyFlag.CREATEONLY | KeyFlag.EXPERT,
                  "size of the metadata log (a multiple of 1 MiB)", minimum=MiB,
                  maximum=MAX_LOG, label="Log size", unit="bytes"),
    )
    operations = frozenset({Operation.WRITE, Operation.CREATE, Operation.RESIZE, Operation.CHECK,
                            Operation.REPAIR, Operation.RELINK, Operation.DISCARD,
                            Operation.COMPACT})
    create_flags = ImageFlags.FIXED
    max_size = MAX_SIZE
    size_granularity = 512
    can_shrink = True
    impl_module = f"{__name__}.image"

    def max_size_for(self, config: dict | None = None) -> int:
        bs = self.config_int(config, "BlockSize")
        return vhdx_max_size(bs) if bs else MAX_SIZE    # automatic: 32 MiB blocks when large

    def limit_reason(self, config: dict | None = None) -> str:
        return limit_reason(self.config_int(config, "BlockSize") or 32 * MiB)

    def probe(self, src: ProbeInput) -> int:
        return 100 if src.head[:8] == b"vhdxfile" else 0


BACKEND = VhdxBackend()
__getattr__ = lazy_exports(__name__, "image", "layout", "log", "metadata")
