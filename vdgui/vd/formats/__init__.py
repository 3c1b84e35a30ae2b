"""The explicit table of built-in backends, in VirtualBox's registration order.

Add a backend by importing its module here and listing its BACKEND in BACKENDS.
"""
from __future__ import annotations

from . import cue, dmg, iscsi, raw, vdi, vhdx

BACKENDS = (
    vdi.BACKEND,
    dmg.BACKEND,
    vhdx.BACKEND,
    cue.BACKEND,
    raw.BACKEND,
    iscsi.BACKEND,
)
