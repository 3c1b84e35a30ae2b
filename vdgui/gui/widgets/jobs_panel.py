"""JobsPanel: running and finished jobs with progress, percent, throughput, elapsed and
remaining time, and a Cancel button each."""
from __future__ import annotations

from PySide6.QtCore import QEvent, QObject, Qt, QTimer, Signal
from PySide6.QtWidgets import (
    QFrame,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSizePolicy,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from vdgui.jobs import Job, JobQueue, JobState
from vdgui.vd import CheckReport, SparsifyReport, format_size

from ..icons import icon


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m} min {s:02d} s"
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min"


class JobRow(QFrame):
    def __init__(self, job: Job, queue: JobQueue, parent=None):
        super().__init__(parent)
        self.job = job
        self.queue = queue
        self.setFrameShape(QFrame.StyledPanel)
        self.setObjectName("jobRow")
        self.icon = QLabel()
        self.icon.setFixedSize(20, 20)
        self.title = QLabel(job.title)
        self.title.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.bar = QProgressBar()
        self.bar.setRange(0, 1000)
        self.bar.setTextVisible(True)
        self.bar.setFormat("%p %")
        self.bar.setMinimumWidth(160)
        self.bar.setMaximumHeight(16)
        self.detail = QLabel()
        self.detail.setWordWrap(True)
        self.detail.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.cancel_button = QToolButton()
        self.cancel_button.setIcon(icon("cancel"))
        self.cancel_button.setText("Cancel")
        self.cancel_button.setToolTip("Cancel this job")
        self.cancel_button.setToolButtonStyle(Qt.ToolButtonTextBesideIcon)
        self.cancel_button.setAutoRaise(True)
        self.cancel_button.clicked.connect(lambda: self.queue.cancel(self.job))
        top = QHBoxLayout()
        top.setContentsMargins(0, 0, 0, 0)
        top.addWidget(self.icon)
        top.addWidget(self.title, 1)
        top.addWidget(self.bar)
        top.addWidget(self.cancel_button)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(6, 4, 6, 4)
        lay.setSpacing(2)
        lay.addLayout(top)
        lay.addWidget(self.detail)
        self.refresh()

    def refresh(self) -> None:
        j = self.job
        self.bar.setValue(int(j.fraction * 1000))
        st = j.state
        parts = []
        if st == JobState.QUEUED:
            parts.append("Waiting for another job on the same chain…")
            self.icon.setPixmap(icon("busy").pixmap(18, 18))
        elif st == JobState.RUNNING:
            self.icon.setPixmap(icon("busy").pixmap(18, 18))
            if j.cancel_requested:
                parts.append("Cancelling…")
            if j.total and j.passes:
                parts.append(work_line(j.done, j.total))
            elif j.total:
                parts.append(f"{format_size(j.done)} of {format_size(j.total)}")
            rate = j.throughput()
            if rate and j.total > 1 and j.rate:
                parts.append(f"{format_size(int(rate))}/s")
            parts.append(f"elapsed {fmt_duration(j.elapsed())}")
            rem = j.remaining()
            if rem is not None:
                parts.append(f"about {fmt_duration(rem)} left")
        elif st == JobState.DONE:
            problems = isinstance(j.result, CheckReport) and any(
                not p.repaired for p in j.result.problems)
            # the outcome's own icon: success, or a warning when problems were found and left
            self.icon.setPixmap(icon("warning" if problems else "ok").pixmap(18, 18))
            self.icon.setToolTip("Problems found" if problems else "Done")
            parts.append(f"Done in {fmt_duration(j.elapsed())}")
            if isinstance(j.result, CheckReport):
                parts.append(check_summary(j.result))
            if isinstance(j.result, SparsifyReport):
                parts.append(j.result.summary())
            if j.total > 1 and j.elapsed() > 0.05 and j.rate:
                parts.append(f"{format_size(int(j.total / j.elapsed()))}/s")
        elif st == JobState.FAILED:
            self.icon.setPixmap(icon("error").pixmap(18, 18))
            self.icon.setToolTip("Failed")
            parts.append(f"<span style='color:#c9372c'>Failed: {_esc(j.error)}</span>")
        elif st == JobState.CANCELLED:
            self.icon.setPixmap(icon("cancel").pixmap(18, 18))
            parts.append("Cancelled")
        self.detail.setText(" · ".join(parts))
        self.detail.setToolTip(WORK_TIP if j.passes and st == JobState.RUNNING else "")
        self.cancel_button.setVisible(not j.finished)
        self.cancel_button.setEnabled(not j.cancel_requested)


WORK_TIP = ("This operation passes over the image's data more than once (for example copy, "
            "compact and verify). Each pass counts as work, so the work is larger than the data.")


def work_line(done: int, total: int) -> str:
    """Progress of an operation that counts several passes: 'work 1.10 of 1.50 GiB' (one unit,
    the total's), never bytes that read like the image's data."""
    text = format_size(total)
    num, _, unit = text.partition(" ")
    if not unit or unit == "B":
        return f"work {done} of {total} bytes"
    scale = 1 << (10 * ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB").index(unit) + 10)
    return f"work {done / scale:.2f} of {num} {unit}"


def check_summary(report: CheckReport) -> str:
    if not report.problems:
        return "no problems found"
    fixed = sum(1 for p in report.problems if p.repaired)
    left = len(report.problems) - fixed
    words = []
    if fixed:
        words.append(f"{fixed} problem(s) repaired")
    if left:
        kind = "corrupt" if report.corrupt else "leaked blocks" if report.leaks else "problems"
        words.append(f"{left} problem(s) left ({kind})")
    return ", ".join(words)


def _esc(t) -> str:
    import html
    return html.escape(str(t or ""))


ROW_ICONS = ("busy", "ok", "warning", "error", "cancel")


def warm_row_icons() -> None:
    """Render the job rows' icons once, before any job: the first render of one takes up to
    ~10 ms (every size), which fell inside the event loop while a job ran or ended."""
    for name in ROW_ICONS:
        icon(name)


class JobsPanel(QWidget):
    """Lists visible jobs of a JobQueue; newest at the top."""

    showRequested = Signal()
    fitRequested = Signal()      # the panel's wanted height changed (jobs came or went)

    def __init__(self, queue: JobQueue, parent=None):
        super().__init__(parent)
        QTimer.singleShot(0, warm_row_icons)          # once the event loop runs, before a job
        self.queue = queue
        self.rows: dict[int, JobRow] = {}
        self.container = QWidget()
        self.list = QVBoxLayout(self.container)
        self.list.setContentsMargins(4, 4, 4, 4)
        self.list.setSpacing(4)
        self.empty = QLabel("No jobs yet. Long operations (create, copy, merge, resize, compact, "
                            "check) show their progress here.")
        self.empty.setEnabled(False)
        self.empty.setWordWrap(True)
        self.list.addWidget(self.empty)
        self.list.addStretch(1)
        scroll = QScrollArea()
        scroll.setMinimumHeight(self.fontMetrics().lineSpacing() + 8)    # one hint line
        scroll.setWidgetResizable(True)
        scroll.setWidget(self.container)
        scroll.setFrameShape(QFrame.NoFrame)
        self.clear_button = QPushButton("Clear finished")
        self.clear_button.clicked.connect(self.clear_finished)
        self.cancel_all_button = QPushButton(icon("cancel"), "Cancel all")
        self.cancel_all_button.clicked.connect(self.queue.cancel_all)
        buttons = QHBoxLayout()
        buttons.setContentsMargins(4, 0, 4, 4)
        buttons.addStretch(1)
        buttons.addWidget(self.cancel_all_button)
        buttons.addWidget(self.clear_button)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(scroll, 1)
        lay.addLayout(buttons)
        self.setSizePolicy(QSizePolicy.Preferred, QSizePolicy.Expanding)
        queue.jobAdded.connect(self.add_job)
        queue.jobChanged.connect(self.update_job)
        self.timer = QTimer(self)
        self.timer.setInterval(1000)
        self.timer.timeout.connect(self._tick)
        self.timer.start()
        self._update_buttons()

    ROWS_SHOWN = 3

    def sizeHint(self):
        """Empty: one line of hint and the buttons. With jobs: room for three job rows (title,
        progress bar, status line) and the buttons."""
        from PySide6.QtCore import QSize
        line = self.fontMetrics().lineSpacing()
        buttons = self.clear_button.sizeHint().height() + 4
        if not self.rows:
            return QSize(600, line + 8 + 8 + buttons)
        row = 3 * line + 22
        return QSize(600, self.ROWS_SHOWN * row + 8 + buttons)

    def add_job(self, job: Job) -> None:
        if not job.visible or job.id in self.rows:
            return
        row = JobRow(job, self.queue)
        self.rows[job.id] = row
        self.list.insertWidget(0, row)
        self.empty.setVisible(False)
        self._update_buttons()
        self.showRequested.emit()
        if len(self.rows) == 1:
            self.fitRequested.emit()

    def update_job(self, job: Job) -> None:
        row = self.rows.get(job.id)
        if row is not None:
            row.refresh()
        self._update_buttons()

    def row_for(self, job: Job) -> JobRow | None:
        return self.rows.get(job.id)

    def clear_finished(self) -> None:
        for jid, row in list(self.rows.items()):
            if row.job.finished:
                row.setParent(None)
                row.deleteLater()
                del self.rows[jid]
        self.queue.clear_finished()
        self.empty.setVisible(not self.rows)
        self._update_buttons()
        if not self.rows:
            self.fitRequested.emit()

    def _tick(self) -> None:
        for row in self.rows.values():
            if row.job.state == JobState.RUNNING:
                row.refresh()

    def _update_buttons(self) -> None:
        self.clear_button.setEnabled(any(r.job.finished for r in self.rows.values()))
        self.cancel_all_button.setEnabled(any(not r.job.finished for r in self.rows.values()))


class DockFit(QObject):
    """Keeps a bottom (or top) dock holding a JobsPanel at the panel's wanted height: compact
    while empty, room for three rows once jobs come; never smaller under the user while jobs are
    listed. A height the user drags the dock to is theirs (``user_sized``) and is kept; the
    window state keeps it between runs."""

    def __init__(self, window, dock, panel: JobsPanel):
        super().__init__(window)
        self.window, self.dock, self.panel = window, dock, panel
        self.user_sized = False
        self._dragging = False          # a mouse button is down on the window's dock separator
        self._fitting = False
        panel.fitRequested.connect(self.fit)
        window.installEventFilter(self)
        dock.installEventFilter(self)

    def wanted(self) -> int:
        title = self.dock.sizeHint().height() - self.panel.sizeHint().height()
        return self.panel.sizeHint().height() + max(title, 0)

    def fit(self) -> None:
        if self.user_sized or self.dock.isFloating() or self.window.dockWidgetArea(self.dock) \
                not in (Qt.BottomDockWidgetArea, Qt.TopDockWidgetArea):
            return
        want = self.wanted()
        if self.panel.rows and self.dock.height() >= want:
            return                      # jobs listed: never shrink under the user
        self._fitting = True
        try:
            self.window.resizeDocks([self.dock], [want], Qt.Vertical)
        finally:
            self._fitting = False

    def eventFilter(self, obj, event):
        t = event.type()
        if obj is self.window:
            if t == QEvent.MouseButtonPress:
                self._dragging = True
            elif t == QEvent.MouseButtonRelease:
                self._dragging = False
        elif obj is self.dock and t == QEvent.Resize and self._dragging and not self._fitting \
                and event.oldSize().height() > 0 \
                and event.size().height() != event.oldSize().height():
            self.user_sized = True
        return False
