"""QED backend: the QEMU Enhanced Disk format (read/write/create/diff, grow, relink, check).

Specification: qemu ``docs/interop/qed_spec.txt`` (header, feature bits, L1/L2 tables, zero
clusters, consistency checking). Modelled on VirtualBox's QED backend (caps
FILE|VFS|CREATE_DYNAMIC|DIFF|ASYNC, no UUIDs). All numbers are little-endian.

Limits: cluster size a power of two in 4 KiB .. 64 MiB, table size a power of two in 1 .. 16
clusters (tables larger than 64 MiB are refused rather than loaded), every table and cluster
offset checked for alignment and against the file size before use, backing file name at most
4095 bytes and inside the header clusters.

Writing: clusters are allocated at the end of the file; the need-check feature bit is set (and
synced) before the first allocating write and cleared on flush/close once everything is synced.
An image found with need-check set is checked (and invalid table entries cleared) when opened
read-write. Order of updates: data -> L2 -> L1 -> header.

Operations: RESIZE (grow; the L1 table is fixed, so up to the size its tables can map), RELINK
(backing file name in the header cluster, raw parents flagged "no probe"), CHECK/REPAIR (every
cluster referenced once, offsets inside the file; repair clears bad entries and cuts trailing
leaks), COMPACT (zero/parent-equal clusters dropped, the file packed without holes, since QED has
no refcounts and every unreferenced cluster would be a leak). QED can record a backing format
only for raw parents (the no-probe feature); other parents are probed.
"""
from __future__ import annotations

from ...backend import Backend, Cap, FileExtension, ImageFlags, Operation, ProbeInput, lazy_exports
from ...config import ConfigKey, KeyFlag, ValueType

# what the declaration and its probe need, without the layout (construct) or the image code
MAGIC = b"QED\0"
MIN_CLUSTER = 4096
MAX_CLUSTER = 64 << 20
MAX_TABLE_SIZE = 16


def qed_max_size(cs: int, ts: int) -> int:
    """QED's limit: one L1 table of ``ts`` clusters of 8-byte entries, each L2 table alike."""
    entries = ts * cs // 8
    return min(entries * entries * cs, (1 << 63) - cs)      # and a file offset (off_t)


def _limit_reason(cs: int, ts: int) -> str:
    return (f" with {cs}-byte clusters and {ts}-cluster tables (two table levels; larger "
            "ClusterSize or TableSize allow more)")


class QedBackend(Backend):
    name = "QED"
    description = "QEMU Enhanced Disk image"
    aliases = ("qed",)
    resize_keeps_child_links = True   # children name it by file name only
    caps = Cap.FILE | Cap.VFS | Cap.CREATE_DYNAMIC | Cap.DIFF | Cap.ASYNC
    extensions = (FileExtension("qed"),)
    owns_extensions = True
    config_keys = (
        ConfigKey("ClusterSize", "65536", ValueType.INTEGER, KeyFlag.CREATEONLY,
                  "the unit of allocation (vdgui's own key; qemu's cluster_size)",
                  minimum=MIN_CLUSTER, maximum=MAX_CLUSTER, power_of_two=True,
                  label="Cluster size", unit="bytes"),
        ConfigKey("TableSize", "4", ValueType.INTEGER, KeyFlag.CREATEONLY | KeyFlag.EXPERT,
                  "size of each L1/L2 table (qemu's table_size; qemu cannot open images "
                  "with one-cluster tables, so 2 is the minimum here)", minimum=2,
                  maximum=MAX_TABLE_SIZE, power_of_two=True, label="Table size",
                  unit="clusters"),
    )
    operations = frozenset({Operation.WRITE, Operation.CREATE, Operation.RESIZE,
                            Operation.CHECK, Operation.REPAIR, Operation.RELINK,
                            Operation.COMPACT, Operation.DISCARD})
    create_flags = ImageFlags.NONE
    size_granularity = 512
    impl_module = f"{__name__}.image"
    max_size = (4 * 65536 // 8) ** 2 * 65536     # 64 TiB with the default keys

    def max_size_for(self, config: dict | None = None) -> int:
        return qed_max_size(self.config_int(config, "ClusterSize"),
                            self.config_int(config, "TableSize"))

    def limit_reason(self, config: dict | None = None) -> str:
        return _limit_reason(self.config_int(config, "ClusterSize"),
                             self.config_int(config, "TableSize"))

    def probe(self, src: ProbeInput) -> int:
        return 100 if src.head[:4] == MAGIC else 0


BACKEND = QedBackend()
__getattr__ = lazy_exports(__name__, "image", "layout", "discard")
