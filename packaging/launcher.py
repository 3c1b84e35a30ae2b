"""Entry point of the bundled app: one executable, two faces.

Started as ``vdgui-img`` (a link to the bundle's executable) it is the command line; started as
``vdgui`` it is the desktop app.
"""
import os
import sys


def main() -> int:
    name = os.path.basename(sys.argv[0]).lower()
    if name.startswith("vdgui-img"):
        from vdgui.cli import main as cli_main
        return cli_main()
    from vdgui.gui.app import main as gui_main
    return gui_main()


if __name__ == "__main__":
    sys.exit(main())
