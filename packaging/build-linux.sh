#!/usr/bin/env bash
# Build the end-user packages from a clean checkout:
#   dist/vdgui-<version>-linux-<arch>.tar.gz   (unpack anywhere, run ./vdgui)
#   dist/vdgui_<version>_<debarch>.deb          (installs /opt/vdgui, /usr/bin/vdgui{,-img})
# Needs: python3 with the project's "package" extra (PyInstaller), dpkg-deb, ldd. Installs the Qt
# binding with constraints.txt into that Python (a virtual environment: the bootstrap's .venv).
# PYTHON may name the interpreter (default: .venv/bin/python if present, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi

VERSION=$("$PY" - <<'PYEOF'
import tomllib
with open("pyproject.toml", "rb") as f:
    print(tomllib.load(f)["project"]["version"])
PYEOF
)
# The bundle carries $PY's Qt binding: bring it to what constraints.txt allows (a no-op when the
# bootstrap already did), and refuse to bundle a binding that loses references (vdgui/qtfix.py).
"$PY" -m pip install -q --disable-pip-version-check -c constraints.txt "PySide6-Essentials" "pyinstaller>=6"
"$PY" - <<'PYEOF'
import sys
from vdgui import qtfix
problem = qtfix.binding_problem()
if problem:
    sys.exit(f"build-linux.sh: {problem}")
PYEOF
ARCH=$(uname -m)
DEBARCH=$(dpkg --print-architecture)
BUILD=$ROOT/build/pkg
DIST=$ROOT/dist
rm -rf "$BUILD"
mkdir -p "$BUILD" "$DIST"
echo "vdgui $VERSION ($ARCH): building the PyInstaller bundle"

# Bundle: one executable; vdgui-img is a link to it (the launcher dispatches on its name).
optional=()
for mod in zstandard lzfse; do
    "$PY" -c "import $mod" 2>/dev/null && optional+=(--hidden-import "$mod")
done
"$PY" -m PyInstaller --noconfirm --clean --log-level WARN --onedir --name vdgui \
    --distpath "$BUILD/dist" --workpath "$BUILD/work" --specpath "$BUILD" \
    --collect-data vdgui --collect-submodules vdgui --copy-metadata vdgui \
    --collect-submodules dissect --collect-submodules pycdlib \
    --collect-submodules cryptography --collect-submodules argon2 --hidden-import _cffi_backend \
    --exclude-module tkinter --exclude-module numpy \
    --exclude-module yaml --exclude-module PIL --exclude-module pytest --exclude-module setuptools \
    "${optional[@]}" \
    packaging/launcher.py
BUNDLE=$BUILD/dist/vdgui
ln -sf vdgui "$BUNDLE/vdgui-img"

# Icons
"$PY" packaging/render_icons.py resources/vdgui.svg "$BUILD/icons"

# Tarball: vdgui-<version>/{vdgui, vdgui-img, _internal/, share/}
TARDIR=$BUILD/tar/vdgui-$VERSION
mkdir -p "$TARDIR"
cp -a "$BUNDLE/." "$TARDIR/"
mkdir -p "$TARDIR/share"
cp resources/vdgui.desktop resources/org.vdgui.vdgui.metainfo.xml resources/vdgui-mime.xml \
   resources/vdgui.svg "$TARDIR/share/"
TARBALL=$DIST/vdgui-$VERSION-linux-$ARCH.tar.gz
tar -C "$BUILD/tar" -czf "$TARBALL" "vdgui-$VERSION"

# .deb
DEB=$BUILD/deb
mkdir -p "$DEB/DEBIAN" "$DEB/opt" "$DEB/usr/bin" "$DEB/usr/share/applications" \
         "$DEB/usr/share/metainfo" "$DEB/usr/share/mime/packages" \
         "$DEB/usr/share/icons/hicolor/scalable/apps"
cp -a "$BUNDLE" "$DEB/opt/vdgui"
ln -s /opt/vdgui/vdgui "$DEB/usr/bin/vdgui"
ln -s /opt/vdgui/vdgui-img "$DEB/usr/bin/vdgui-img"
install -m 644 resources/vdgui.desktop "$DEB/usr/share/applications/vdgui.desktop"
install -m 644 resources/org.vdgui.vdgui.metainfo.xml "$DEB/usr/share/metainfo/"
install -m 644 resources/vdgui-mime.xml "$DEB/usr/share/mime/packages/vdgui.xml"
install -m 644 resources/vdgui.svg "$DEB/usr/share/icons/hicolor/scalable/apps/vdgui.svg"
cp -a "$BUILD/icons/." "$DEB/usr/share/icons/hicolor/"

# Depends: the system libraries the bundle links against but does not carry, as packages.
libs=$(find "$BUNDLE" -type f \( -name '*.so*' -o -perm -u+x \) -print0 |
       xargs -0 ldd 2>/dev/null | awk '/=> \// {print $3}' | sort -u | grep -v "^$BUNDLE" || true)
pkgs=""
for lib in $libs; do
    p=$(dpkg -S "$(readlink -f "$lib")" 2>/dev/null | head -1 | cut -d: -f1 || true)
    [ -z "$p" ] && p=$(dpkg -S "$lib" 2>/dev/null | head -1 | cut -d: -f1 || true)
    [ -n "$p" ] && pkgs="$pkgs $p"
done
# libraries Qt loads at run time (platform plugin, xcb) that ldd of the bundle may not show
pkgs="$pkgs libxkbcommon-x11-0 libxcb-cursor0 libxcb-icccm4 libxcb-keysyms1 libxcb-image0
      libxcb-render-util0 libxcb-shape0 libxcb-xinerama0 libxcb-randr0 libegl1 libfontconfig1"
DEPENDS=$(echo $pkgs | tr ' ' '\n' | sort -u | paste -sd, | sed 's/,/, /g')
SIZE_KB=$(du -sk "$DEB" | cut -f1)
cat > "$DEB/DEBIAN/control" <<CTRL
Package: vdgui
Version: $VERSION
Architecture: $DEBARCH
Maintainer: The vdgui developers <maintainers@vdgui.invalid>
Installed-Size: $SIZE_KB
Depends: $DEPENDS
Section: admin
Priority: optional
Homepage: https://github.com/vdgui/vdgui
Description: desktop manager for virtual disk images
 vdgui shows every virtual disk image (VDI, VMDK, VHD, VHDX, QCOW2, QED,
 Parallels, raw, DMG, CUE/BIN, iSCSI) with its snapshot chain as a tree, and
 creates, converts, merges, resizes, compacts, checks and repairs them.
 Includes vdgui-img, the command-line tool.
CTRL
cat > "$DEB/DEBIAN/postinst" <<'POST'
#!/bin/sh
set -e
if [ "$1" = configure ]; then
    command -v update-mime-database >/dev/null && update-mime-database /usr/share/mime || true
    command -v update-desktop-database >/dev/null && update-desktop-database -q || true
    command -v gtk-update-icon-cache >/dev/null && gtk-update-icon-cache -q /usr/share/icons/hicolor || true
fi
POST
cp "$DEB/DEBIAN/postinst" "$DEB/DEBIAN/postrm"
chmod 755 "$DEB/DEBIAN/postinst" "$DEB/DEBIAN/postrm"
DEBFILE=$DIST/vdgui_${VERSION}_${DEBARCH}.deb
dpkg-deb --root-owner-group -Zgzip -z6 --build "$DEB" "$DEBFILE" >/dev/null

echo "built: $TARBALL ($(du -h "$TARBALL" | cut -f1))"
echo "built: $DEBFILE ($(du -h "$DEBFILE" | cut -f1))"
echo "bundle: $BUNDLE ($(du -sh "$BUNDLE" | cut -f1))"
