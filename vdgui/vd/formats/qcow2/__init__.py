"""QCOW2 backend: qemu's copy-on-write format, versions 2 and 3 (read/write/create/diff), and
QCOW version 1 (read-only).

Specification: qemu ``docs/interop/qcow2.txt``; structures in :mod:`.layout`.
Modelled on VirtualBox's QCOW backend (caps FILE|VFS|CREATE_DYNAMIC|DIFF|ASYNC, no UUIDs).
Split by concern, as qemu splits qcow2.c / qcow2-cluster.c / qcow2-refcount.c:

    layout       on-disk structures (construct) and constants
    state        Qcow2State: what the mixins below share (attributes, cross-mixin methods)
    header       header, extensions, snapshot table, feature bits, info
    clusters     L1/L2 tables: mapping, reading, writing, discarding
    refcount     refcount table and blocks, cluster allocation
    bitmaps      persistent dirty bitmaps kept up to date on writes
    maintenance  compact, resize (grow and shrink), relink
    check        check and repair (refcounts recounted from every reference)
    v1           QCOW version 1, read-only
    image        Qcow2Image (the mixins above put together) and the backend

Limits (qemu's caps, applied to every header before use): cluster size 512 B .. 2 MiB, L1 table
at most 32 MiB, refcount table at most 8 MiB, at most 65,536 snapshots, backing file name at most
1023 bytes, compressed cluster descriptors checked against the file size, decompressed output
capped at one cluster.

Writing keeps refcounts exact (no lazy refcounts): new clusters are allocated at the end of the
file, their refcount written before anything points at them; then data, then the L2 entry, then
the L1 entry, then the header. Shared clusters (internal snapshots, refcount > 1) are copied on
write. Images marked dirty (lazy refcounts) get their refcounts rebuilt on a read-write open;
images marked corrupt open read-only (a read-write open allows only ``check(repair=True)``).
Unknown incompatible feature bits refuse the open; unknown autoclear bits are cleared before
the first write. Enabled persistent dirty bitmaps are kept up to date (bits set before the data
is written); bitmaps that cannot be maintained are removed cleanly instead of leaking.

Operations: RESIZE (grow: L1 table moved when it must grow; shrink: refused over data this image
holds, L2 entries past the end cleared, free clusters at the end of the file cut off),
CHECK/REPAIR (refcounts recounted from every L1/L2 table, snapshot and bitmap like
``qemu-img check``; repair writes a new refcount structure at the end of the file and fixes
OFLAG_COPIED and reserved bits), RELINK (backing file name and format rewritten in the first
cluster), DISCARD (clusters unallocated, or zero clusters over a backing file), COMPACT
(zero/parent-equal clusters dropped, clusters moved into holes, file truncated). External data
files are read only when unsafe paths are allowed; internal snapshots are listed and can be
opened read-only (config key ``Snapshot``).
"""
from __future__ import annotations

from .header import qcow2_max_size
from .image import BACKEND, Qcow2Backend, Qcow2Image
from .v1 import QcowV1Image

__all__ = ["BACKEND", "Qcow2Backend", "Qcow2Image", "QcowV1Image", "qcow2_max_size"]
