"""The explicit table of built-in backends, in VirtualBox's registration order.

Add a backend by importing its module here and listing its BACKEND in BACKENDS.
"""
from __future__ import annotations

from . import cue, dmg, iscsi, ova, parallels, qcow2, qed, raw, vdi, vhd, vhdx, vmdk

BACKENDS = (
    vmdk.BACKEND,
    vdi.BACKEND,
    vhd.BACKEND,
    parallels.BACKEND,
    dmg.BACKEND,
    qed.BACKEND,
    qcow2.BACKEND,
    vhdx.BACKEND,
    cue.BACKEND,
    ova.BACKEND,
    raw.BACKEND,
    iscsi.BACKEND,
)
