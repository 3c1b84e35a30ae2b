"""The explicit table of built-in backends, in VirtualBox's registration order.

Add a backend by importing its module here and listing its BACKEND in BACKENDS. Outside
backends join REGISTERED (registry.register_backend). The OVA backend reads the disks inside an
archive through the other backends: it is given ``all_backends`` (formats never import the
registry).
"""
from __future__ import annotations

from ..backend import Backend
from . import cue, dmg, iscsi, luks, ova, parallels, qcow2, qed, raw, vdi, vhd, vhdx, vmdk

REGISTERED: list[Backend] = []


def all_backends() -> tuple[Backend, ...]:
    """The built-in table, then the outside backends registered."""
    return BACKENDS + tuple(REGISTERED)


BACKENDS: tuple[Backend, ...] = (
    vmdk.BACKEND,
    vdi.BACKEND,
    vhd.BACKEND,
    parallels.BACKEND,
    dmg.BACKEND,
    qed.BACKEND,
    qcow2.BACKEND,
    vhdx.BACKEND,
    cue.BACKEND,
    ova.OvaBackend(all_backends),
    luks.BACKEND,       # qemu's raw LUKS container (issue #17), not a VirtualBox backend
    raw.BACKEND,
    iscsi.BACKEND,
)
