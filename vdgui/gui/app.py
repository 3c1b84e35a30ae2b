"""Entry point of the desktop app: ``vdgui [--screenshot FILE] [IMAGE...]``."""
from __future__ import annotations

import argparse
import os
import sys

import vdgui


def parse_args(argv):
    p = argparse.ArgumentParser(prog="vdgui", description="Desktop manager for virtual disk images")
    p.add_argument("images", nargs="*", help="image files (or VirtualBox.xml / .vbox files) to add")
    p.add_argument("--screenshot", metavar="FILE",
                   help="render the main window with IMAGES loaded to a PNG and exit")
    p.add_argument("--size", default="1240x760", help="window size for --screenshot (WxH)")
    p.add_argument("--select", help="image to select for --screenshot (default: the deepest)")
    p.add_argument("--version", action="version", version=f"vdgui {vdgui.__version__}")
    return p.parse_args(argv)


def make_app(argv=None):
    from PySide6.QtWidgets import QApplication
    # Jobs run Python code in pool threads: hand the GIL back to the GUI thread sooner than the
    # default 5 ms so the event loop stays responsive (measured by bench/gui_stall.py).
    sys.setswitchinterval(0.002)
    app = QApplication.instance()
    if app is None:
        app = QApplication(argv or [sys.argv[0]])
    app.setApplicationName("vdgui")
    app.setOrganizationName("vdgui")
    app.setApplicationVersion(vdgui.__version__)
    app.setApplicationDisplayName("vdgui")
    app.setDesktopFileName("vdgui")
    from .icons import app_icon
    app.setWindowIcon(app_icon())
    return app


def settings_for(data_dir: str):
    from PySide6.QtCore import QSettings
    return QSettings(os.path.join(data_dir, "settings.ini"), QSettings.IniFormat)


def load_plugins() -> list[str]:
    """Load the backend plugins (docs/plugins.md); each one skipped is logged on stderr and
    returned as a sentence for the window. A broken plugin never stops the app."""
    from vdgui.vd import load_plugins as load
    problems = [str(p) for p in load().problems]
    for text in problems:
        print(f"vdgui: warning: {text}", file=sys.stderr)
    return problems


def screenshot(args) -> int:
    from PySide6.QtCore import QSize

    from vdgui.jobs import tasks
    from vdgui.vd import Library

    from .main_window import MainWindow

    problems = load_plugins()
    app = make_app()
    lib = Library(":memory:")
    win = MainWindow(lib, settings=None)
    win.plugin_problems(problems)
    w, _, h = args.size.partition("x")
    win.resize(QSize(int(w), int(h)))
    if args.images:
        win.add_paths(args.images, sync=True, select=False)
    win.tree.expandAll()
    nodes = win.model.nodes()
    target = None
    if args.select:
        target = win.model.node(args.select)
    if target is None and nodes:
        target = max(nodes, key=lambda n: (n.accessible, n.depth))
    win.show()
    if target is not None:
        win.select_paths([target.path])
        if target.accessible:
            job = tasks.allocation_job(target.path, library=lib)
            try:
                res = job.fn(lambda d, t: None)
                win.show_allocation(job, res)
            except Exception as exc:
                win.details.set_allocation_error(target.path, str(exc))
    for _ in range(10):
        app.processEvents()
    win.queue.wait(5000)
    for _ in range(10):
        app.processEvents()
    pix = win.grab()
    ok = pix.save(args.screenshot, "PNG")
    win.queue.cancel_all()
    win.queue.wait()
    win.close()
    if not ok:
        print(f"vdgui: cannot write {args.screenshot}", file=sys.stderr)
        return 1
    return 0


def _quit_on_sigint(app, win) -> None:
    """Ctrl+C in the terminal closes the window properly (jobs cancelled, settings saved)."""
    import signal

    from PySide6.QtCore import QTimer
    signal.signal(signal.SIGINT, lambda *_: win.close())
    timer = QTimer(app)
    timer.timeout.connect(lambda: None)     # let Python run its signal handlers
    timer.start(250)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from vdgui import qtfix
    if problem := qtfix.binding_problem():      # refuse now rather than abort mid-job
        print(f"vdgui: {problem}", file=sys.stderr)
        return 2
    if args.screenshot:
        return screenshot(args)
    from vdgui.vd import Library, data_dir

    from .crash import install_excepthook
    from .main_window import MainWindow

    problems = load_plugins()
    app = make_app()
    ddir = data_dir()
    lib = Library()
    win = MainWindow(lib, settings=settings_for(ddir))
    win.plugin_problems(problems)
    install_excepthook(lambda: win)
    _quit_on_sigint(app, win)
    win.show()
    win.load_library()
    if args.images:
        win.add_paths(args.images)
    rc = app.exec()
    lib.close()
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
