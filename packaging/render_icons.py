"""Render resources/vdgui.svg to the PNG sizes desktops look for (uses Qt's SVG renderer)."""
import os
import sys

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from PySide6.QtCore import Qt
from PySide6.QtGui import QGuiApplication, QImage, QPainter
from PySide6.QtSvg import QSvgRenderer


def main(svg: str, outdir: str, sizes=(16, 24, 32, 48, 64, 128, 256)) -> None:
    app = QGuiApplication.instance() or QGuiApplication(sys.argv[:1])
    renderer = QSvgRenderer(svg)
    if not renderer.isValid():
        raise SystemExit(f"cannot render {svg}")
    for s in sizes:
        img = QImage(s, s, QImage.Format_ARGB32)
        img.fill(Qt.transparent)
        p = QPainter(img)
        renderer.render(p)
        p.end()
        d = os.path.join(outdir, f"{s}x{s}", "apps")
        os.makedirs(d, exist_ok=True)
        if not img.save(os.path.join(d, "vdgui.png")):
            raise SystemExit(f"cannot write {d}/vdgui.png")
    del app


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
