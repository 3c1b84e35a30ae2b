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

from ...backend import Operation
from .image import BACKEND, VhdxBackend, VhdxImage
from .layout import *  # noqa: F403  (the structures and constants, as vhdx.py exported them)
from .layout import guid_from_bytes, with_checksum
from .log import LogReplayNeeded, find_active_sequence
from .metadata import build_locator, locator_for

__all__ = ["BACKEND", "LogReplayNeeded", "Operation", "VhdxBackend", "VhdxImage",
           "build_locator", "find_active_sequence", "locator_for"]

# the names these had in the single-module vhdx.py
_guid = guid_from_bytes
_with_checksum = with_checksum
