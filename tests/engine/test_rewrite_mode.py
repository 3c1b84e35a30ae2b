"""An image rewritten through a copy (compact, resize, repair) keeps its file mode."""
from __future__ import annotations

import os
import stat

from vdgui.vd import get_backend
from vdgui.vd.ops.rewrite import rewrite_in_copy


def test_the_copy_keeps_the_original_mode(tmp_path):
    p = tmp_path / "m.img"
    p.write_bytes(b"x" * 65536)
    os.chmod(p, 0o604)
    ino = os.stat(p).st_ino
    rewrite_in_copy(str(p), get_backend("RAW"), None, lambda img, cb: True)
    st = os.stat(p)
    assert st.st_ino != ino                      # it was replaced by the copy
    assert stat.S_IMODE(st.st_mode) == 0o604
    assert p.read_bytes() == b"x" * 65536
