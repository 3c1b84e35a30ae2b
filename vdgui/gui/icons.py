"""Icons drawn as SVG in vdgui/resources/icons, loaded through importlib.resources.

Format icons are the device icon (hard disk, optical, floppy) with an accent colour derived
from the backend's name by hashing, so a new backend gets its own colour without any table.
"""
from __future__ import annotations

import zlib
from functools import cache
from importlib import resources

from PySide6.QtCore import QByteArray, QRectF, Qt
from PySide6.QtGui import QColor, QIcon, QImage, QPainter, QPixmap
from PySide6.QtSvg import QSvgRenderer

SIZES = (16, 20, 24, 32, 48, 64, 128)


def _read(name: str) -> bytes:
    return (resources.files("vdgui") / "resources" / "icons" / f"{name}.svg").read_bytes()


def _icon_from_svg(data: bytes) -> QIcon:
    renderer = QSvgRenderer(QByteArray(data))
    icon = QIcon()
    for s in SIZES:
        for dpr in (1, 2):
            img = QImage(s * dpr, s * dpr, QImage.Format_ARGB32_Premultiplied)
            img.fill(Qt.transparent)
            p = QPainter(img)
            p.setRenderHint(QPainter.Antialiasing)
            renderer.render(p, QRectF(0, 0, s * dpr, s * dpr))
            p.end()
            pm = QPixmap.fromImage(img)
            pm.setDevicePixelRatio(dpr)
            icon.addPixmap(pm)
    return icon


@cache
def icon(name: str) -> QIcon:
    """An action or status icon by file name (without .svg)."""
    try:
        return _icon_from_svg(_read(name))
    except (FileNotFoundError, OSError):
        return QIcon()


def accent_color(key: str | None) -> QColor:
    if not key:
        return QColor("#8a96a3")
    hue = zlib.crc32(key.lower().encode()) % 360
    return QColor.fromHsl(hue, 150, 110)


@cache
def format_icon(device: str, format_name: str | None, locked: bool = False) -> QIcon:
    """Device-type icon tinted with the format's accent colour; ``locked``: an encrypted
    image (a lock in the lower right corner)."""
    name = {"optical": "optical", "floppy": "floppy"}.get(device, "hdd")
    svg = _read(name).replace(b"@COLOR@", accent_color(format_name).name().encode())
    if not locked:
        return _icon_from_svg(svg)
    return _with_badge(_icon_from_svg(svg), icon("lock-badge"))


def _with_badge(base: QIcon, badge: QIcon) -> QIcon:
    out = QIcon()
    for s in SIZES:
        for dpr in (1, 2):
            img = QImage(s * dpr, s * dpr, QImage.Format_ARGB32_Premultiplied)
            img.fill(Qt.transparent)
            p = QPainter(img)
            p.drawPixmap(0, 0, base.pixmap(s, s).scaled(s * dpr, s * dpr))
            b = max(s * dpr * 11 // 16, 8)
            p.drawPixmap(s * dpr - b, s * dpr - b, badge.pixmap(b, b).scaled(b, b))
            p.end()
            pm = QPixmap.fromImage(img)
            pm.setDevicePixelRatio(dpr)
            out.addPixmap(pm)
    return out


def app_icon() -> QIcon:
    return icon("app")
