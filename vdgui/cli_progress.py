"""vdgui-img's progress display (split from cli.py)."""
from __future__ import annotations

import sys
import time

import vdgui.vd as vd


class TtyProgress:
    """Percent and throughput on stderr, redrawn in place; silent when stderr is not a tty."""

    def __init__(self, what: str, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty()
        self.what = what
        self.t0 = time.monotonic()
        self.last = 0.0
        self.drawn = False

    def __call__(self, done: int, total: int):
        if not self.enabled:
            return None
        now = time.monotonic()
        if now - self.last < 0.1 and done < total:
            return None
        self.last = now
        pct = 100.0 * done / total if total else 100.0
        rate = done / max(now - self.t0, 1e-6)
        self.stream.write(f"\r{self.what}: {pct:5.1f}%  {vd.format_size(done)} of "
                          f"{vd.format_size(total)}  {vd.format_size(int(rate))}/s\x1b[K")
        self.stream.flush()
        self.drawn = True
        return None

    def close(self):
        if self.enabled and self.drawn:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False
