"""Which formats the installed qemu-img knows, and qemu's name for one of our backends."""
from __future__ import annotations

import subprocess


def _qemu_formats() -> set[str]:
    r = subprocess.run(["qemu-img", "--help"], capture_output=True, text=True)
    for line in r.stdout.splitlines():
        if line.startswith("Supported formats:"):
            return set(line.split(":", 1)[1].split())
    return set()


QEMU_FORMATS = _qemu_formats()


def qemu_name(backend) -> str | None:
    """qemu's name for a backend: among its aliases (its own name lower-cased first)."""
    names = [backend.name.lower()] + [a.lower() for a in backend.aliases]
    return next((n for n in names if n in QEMU_FORMATS), None)
