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

import struct
from typing import ClassVar

from ...backend import Backend, Cap, FileExtension, ImageFlags, Operation, ProbeInput, lazy_exports
from ...config import ConfigKey, KeyFlag, ValueType
from ...crypto import DEFAULT_ITER_TIME_MS

# what the declaration needs, without the layout (construct) or the image code
MAGIC = b"QFI\xfb"
MAX_L1_BYTES = 32 << 20


def qcow2_max_size(cs: int) -> int:
    """qemu's limit: the L1 table at most 32 MiB (each entry maps cs/8 clusters), and host
    offsets of 56 bits."""
    return min(1 << 56, (MAX_L1_BYTES // 8) * (cs // 8) * cs)


def limit_reason(cs: int) -> str:
    return (f" with {cs}-byte clusters (qemu's L1 table limit, 32 MiB; larger clusters allow "
            "more, up to 64 PiB)")


class Qcow2Backend(Backend):
    name = "QCOW2"
    description = "QEMU copy-on-write image (qcow2 versions 2 and 3; qcow version 1 read-only)"
    aliases = ("QCOW", "qcow2", "qcow")
    resize_keeps_child_links = True   # children name it by file name only
    caps = Cap.FILE | Cap.VFS | Cap.CREATE_DYNAMIC | Cap.DIFF | Cap.ASYNC
    extensions = (FileExtension("qcow2"), FileExtension("qcow"))
    owns_extensions = True
    config_keys = (
        ConfigKey("ClusterSize", "65536", ValueType.INTEGER, KeyFlag.CREATEONLY,
                  "the unit of allocation (vdgui's own key; qemu's cluster_size)",
                  minimum=512, maximum=2 << 20, power_of_two=True, label="Cluster size",
                  unit="bytes"),
        ConfigKey("Compat", "1.1", ValueType.STRING, KeyFlag.CREATEONLY | KeyFlag.EXPERT,
                  "qcow2 compatibility level: 1.1 (version 3) or 0.10 (version 2, for old qemu)",
                  label="Compatibility level", choices=("1.1", "0.10")),
        ConfigKey("RefcountBits", "16", ValueType.INTEGER, KeyFlag.CREATEONLY | KeyFlag.EXPERT,
                  "width of each reference count (1..64, version 3 only)", minimum=1,
                  maximum=64, power_of_two=True, label="Reference count width", unit="bits"),
        ConfigKey("Compress", "0", ValueType.INTEGER, KeyFlag.CREATEONLY | KeyFlag.EXPERT,
                  "store whole written clusters compressed (like qemu-img convert -c)",
                  minimum=0, maximum=1, label="Compress clusters"),
        ConfigKey("Encryption", "none", ValueType.STRING, KeyFlag.CREATEONLY,
                  "encrypt the data with LUKS (qemu's encrypt.format=luks); the passphrase is "
                  "asked for", label="Encrypt the data", choices=("none", "luks")),
        ConfigKey("EncryptIterTime", str(DEFAULT_ITER_TIME_MS), ValueType.INTEGER,
                  KeyFlag.CREATEONLY | KeyFlag.EXPERT,
                  "time the passphrase's key derivation takes here (qemu's encrypt.iter-time)",
                  minimum=1, maximum=60000, label="Key derivation time", unit="ms"),
        ConfigKey("Snapshot", None, ValueType.STRING, KeyFlag.EXPERT,
                  "open an internal snapshot (ID or name) instead of the current state, "
                  "read-only", label="Internal snapshot"),
    )
    operations = frozenset({Operation.WRITE, Operation.CREATE, Operation.RESIZE, Operation.CHECK,
                            Operation.REPAIR, Operation.RELINK, Operation.DISCARD,
                            Operation.COMPACT})
    create_flags = ImageFlags.NONE
    encryptions: ClassVar[dict[str, dict[str, str]]] = {"luks": {"Encryption": "luks"}}
    max_size = qcow2_max_size(65536)            # 2 PiB with the default 64 KiB clusters
    size_granularity = 512
    can_shrink = True
    impl_module = f"{__name__}.image"

    def max_size_for(self, config: dict | None = None) -> int:
        return qcow2_max_size(self.config_int(config, "ClusterSize"))

    def limit_reason(self, config: dict | None = None) -> str:
        return limit_reason(self.config_int(config, "ClusterSize"))

    def probe(self, src: ProbeInput) -> int:
        if len(src.head) >= 8 and src.head[:4] == MAGIC:
            version = struct.unpack_from(">I", src.head, 4)[0]
            if version in (1, 2, 3):
                return 100
            return 60
        return 0


BACKEND = Qcow2Backend()
__getattr__ = lazy_exports(__name__, "image", "v1", "layout")
