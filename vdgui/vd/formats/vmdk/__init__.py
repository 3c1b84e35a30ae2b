"""VMDK backend: VMware's virtual disk format, every variant VirtualBox's VMDK.cpp handles.

Specification: VMware "Virtual Disk Format 5.0" technical note (hosted sparse extents, the text
descriptor, streamOptimized grain/marker layout) and the ESX "COWD" vmfsSparse layout as qemu's
block/vmdk.c reads it. Facts, not code, were taken from those sources.

* The descriptor (see :mod:`.descriptor`) is either a separate text file or embedded in a
  hosted sparse extent (sectors ``descriptorOffset .. +descriptorSize``). createTypes:
  monolithicSparse, monolithicFlat, twoGbMaxExtentSparse, twoGbMaxExtentFlat, streamOptimized,
  vmfs / vmfsThin (flat, ESX), vmfsSparse (COWD extents, read-only), seSparse (ESXi 6.5+, u64
  tables, read-only); extent types SPARSE, FLAT, ZERO, VMFS, VMFSSPARSE, SESPARSE.
* A hosted sparse extent: 512-byte header (``KDMV``), grain directory (GD) of u32 sector
  offsets of grain tables (GT, ``numGTEsPerGT`` u32 entries each) of sector offsets of grains;
  a redundant GD/GT copy (flag bit 1) kept equal on every write; GTE 1 = zero grain when flag
  bit 2 is set; compressed grains (bit 16, deflate/zlib) with markers (bit 17) in
  streamOptimized files, whose GD may live at the end (``gdOffset`` = -1: read the footer).
* Limits: descriptor <= 1 MiB, <= 32768 extents, grain <= 16 MiB, GT <= 4096 entries; every
  table offset is checked against its file's size before use; decompression output is capped at
  one grain.
* Writes: data first, then GT and redundant GT entries, then header/descriptor. The CID changes
  on the first write of a session (as VMware/VirtualBox/qemu do), written before the data, so
  children notice; check_parent_link compares parentCID with the parent's CID.
* Hooks: RELINK (parentCID, parentFileNameHint, ddb.uuid.parent), RESIZE (grow: last extent,
  grain directory moved to the end when it outgrows its sectors, new -sNNN/-fNNN extents for
  split images), CHECK/REPAIR (directory vs redundant directory, tables vs redundant tables,
  entries past the end of the file or into metadata, cross-linked grains, unreferenced tail),
  COMPACT (sparse extents: drop zero / parent-equal grains, move grains down, truncate).
  streamOptimized images are written once, in increasing offsets (the copy operation does that);
  any other write to a stream image is refused.
* Raw host disk descriptors (config keys RawDrive/Partitions/BootSector/Relative, as VirtualBox
  declares them; plan in vd/rawdisk.py): 'fullDevice' (one FLAT extent, the whole drive) or
  'partitionedDevice' (chosen partitions as FLAT extents of the drive, or of the partition
  devices with Relative; the partition tables copied into NAME-pt.vmdk; ZERO elsewhere).
  Creating one needs unsafe paths allowed (drives are named by absolute path), otherwise
  UnsafePath; only block devices (regular files under the tests' flag). Opening any descriptor
  that names a device needs OpenFlags.ALLOW_UNSAFE_PATHS.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ...backend import (
    Backend,
    Cap,
    FileExtension,
    ImageFlags,
    OpenFlags,
    Operation,
    ProbeInput,
    Refusal,
    lazy_exports,
)
from ...config import ConfigKey, ValueType
from ...fileio import ImageFile

if TYPE_CHECKING:  # pragma: no cover
    from .image import VmdkImage

# what the declaration and its probe need, without the layout (construct) or the image code
SECTOR = 512
MAGIC = b"KDMV"                      # hosted sparse extent
COWD_MAGIC = b"COWD"                 # ESX vmfsSparse extent
SESPARSE_MAGIC = 0xCAFEBABE          # ESXi seSparse extent (u64 little-endian)
MAX_SPARSE_SIZE = 2 << 40            # grain offsets are u32 sectors
MAX_DESCRIPTOR_BYTES = 1 << 20      # larger descriptors are refused (a descriptor is a few KiB)


class VmdkBackend(Backend):
    name = "VMDK"
    description = "VMware virtual disk (VMDK)"
    aliases = ("vmdk",)
    resize_keeps_child_links = True   # CID, UUIDs and modification UUID stay
    caps = (Cap.UUID | Cap.CREATE_FIXED | Cap.CREATE_DYNAMIC | Cap.CREATE_SPLIT_2G | Cap.DIFF |
            Cap.FILE | Cap.ASYNC | Cap.VFS | Cap.PREFERRED)
    extensions = (FileExtension("vmdk"),)
    config_keys = (
        ConfigKey("RawDrive", None, ValueType.STRING,
                  description="host drive (a block device such as /dev/sda) for a raw disk "
                              "VMDK; needs unsafe paths allowed",
                  label="Host drive", variant=ImageFlags.RAWDISK),
        ConfigKey("Partitions", None, ValueType.STRING,
                  description="partitions of the raw drive to expose, e.g. 1,3,5 (the "
                              "others read zero); empty: the whole drive",
                  label="Partitions to expose", variant=ImageFlags.RAWDISK),
        ConfigKey("BootSector", None, ValueType.BYTES,
                  description="replacement boot code (up to 512 bytes, the first 440 used) "
                              "for the MBR copy of a raw partition VMDK",
                  label="Boot sector", variant=ImageFlags.RAWDISK),
        ConfigKey("Relative", None, ValueType.INTEGER,
                  description="map partitions through their own devices (/dev/sda2) "
                              "instead of the whole drive",
                  label="Relative partition names", variant=ImageFlags.RAWDISK),
    )
    operations = frozenset({Operation.WRITE, Operation.CREATE, Operation.RESIZE, Operation.CHECK,
                            Operation.REPAIR, Operation.RELINK, Operation.COMPACT,
                            Operation.DISCARD})
    create_flags = (ImageFlags.FIXED | ImageFlags.SPLIT_2G | ImageFlags.STREAM_OPTIMIZED |
                    ImageFlags.ESX)
    max_size = MAX_SPARSE_SIZE
    impl_module = f"{__name__}.impl"

    def refusal(self, op: Operation, flags: ImageFlags | None = None) -> str | None:
        if flags is not None and flags & ImageFlags.STREAM_OPTIMIZED and op in (
                Operation.WRITE, Operation.RESIZE, Operation.RELINK):
            return Refusal("a streamOptimized VMDK is written once and cannot be changed; "
                           "convert it to a resizable variant first (Copy to VMDK, dynamic)",
                           way_out="convert")
        return super().refusal(op, flags)
    size_granularity = 512

    # -- probe -------------------------------------------------------------------------------
    def probe(self, src: ProbeInput) -> int:
        head = src.head
        if head[:4] == MAGIC:
            return 100
        if head[:4] == COWD_MAGIC:
            return 90
        if head[:8] == SESPARSE_MAGIC.to_bytes(8, "little"):
            return 60
        if src.size > MAX_DESCRIPTOR_BYTES or not head:
            return 0
        text = head[:4096].split(b"\0", 1)[0]     # qemu pads descriptors with NULs
        if text.startswith(b"\xef\xbb\xbf"):
            text = text[3:]
        if not text.strip():
            return 0
        low = text.lower()
        if low.lstrip().startswith(b"# disk descriptorfile"):
            return 100
        if b"createtype" in low and (b" sparse " in low or b" flat " in low or b" vmfs" in low
                                     or b" zero" in low):
            return 90
        return 0

    # -- open --------------------------------------------------------------------------------

    # -- open --------------------------------------------------------------------------------
    def extent_file(self, path: str, writable: bool) -> ImageFile:
        """Open one file of an image; the image and its extents share it."""
        return ImageFile(path, writable=writable)

    def open_file(self, f: ImageFile, location: str,
                  flags: OpenFlags = OpenFlags.READ_ONLY) -> VmdkImage:
        """Open a VMDK held in an already open (read-only) file, e.g. a member of an archive."""
        return self.open(location, flags | OpenFlags.READ_ONLY, None, _file=f)

    def open(self, location: str, flags: OpenFlags = OpenFlags.NORMAL,
             config: dict | None = None, *, _file: ImageFile | None = None) -> VmdkImage:
        image: VmdkImage = self.implementation().open_image(self, location, flags, config,
                                                            _file=_file)
        return image


BACKEND = VmdkBackend()
__getattr__ = lazy_exports(__name__, "impl", "image", "layout", "sparse", "descriptor", "stream")
