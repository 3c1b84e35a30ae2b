"""The operations controller: turns what a dialog (or the selection) asks for into a job
(vdgui.jobs.tasks) and refreshes what the job touched: the media model's rows, the details pane,
the images' health states and the Contents tab when it shows a touched image. A job started
from a dialog that fails after the dialog closed offers "Change and Retry…" (run_dialog +
retry_on_failure). MainWindow delegates here; no format module is imported."""
from __future__ import annotations

import dataclasses
import html
import os

from PySide6.QtCore import Qt, QTimer
from PySide6.QtWidgets import QDialog, QFileDialog, QMessageBox

from vdgui.jobs import Job, tasks
from vdgui.vd import (
    CheckReport,
    DeviceType,
    VDError,
    format_size,
    get_backend,
    give_new_uuid,
    is_network_location,
    mark_duplicates,
    move_refusal,
)

from . import actions
from .crash import show_crash
from .dialogs.params import (
    ChangePassphraseParams,
    CopyParams,
    CreateParams,
    EncryptParams,
    FloppyParams,
    IsoParams,
    MergeParams,
    MoveParams,
    RawDiskParams,
    ResizeParams,
    SnapshotParams,
)
from .files import is_ours_temporary, is_vbox_registry, location, mtime
from .widgets.jobs_panel import check_summary


class Operations:
    """What the window's actions do; ``window`` shows the results (MainWindow)."""

    def __init__(self, window):
        self.w = window
        self.pending_select: list[str] = []    # select these once a scan lists them
        self.secret_prompts: dict = {}          # path -> open SecretsDialog
        self.secrets_asked: set[str] = set()

    def say(self, text: str, ms: int) -> None:
        """A message in the window's status bar for ``ms`` milliseconds."""
        self.w.statusBar().showMessage(text, ms)

    # -- loading --------------------------------------------------------------------------
    def load_library(self, sync: bool = False) -> Job | None:
        """Show the library's images: read them all (in the background unless ``sync``)."""
        if sync:
            recs = tasks.key_stores(self.w.library.scan_all(), self.w.library)
            self.w.model.set_records(recs)
            self.after_records()
            return None
        return self.run_scan(None)

    def add_paths(self, paths: list[str], *, sync: bool = False, select: bool = True) -> Job | None:
        """Add image files (and their parents); XML files are VirtualBox registries."""
        images, registries = [], []
        skipped = [p for p in paths if is_ours_temporary(p)]
        for p in paths:
            if p not in skipped:
                (registries if is_vbox_registry(p) else images).append(location(p))
        if skipped:
            self.say(f"Not added: {len(skipped)} temporary file(s) of vdgui", 5000)
        for r in registries:
            try:
                images += self.w.library.import_virtualbox(r)
            except VDError as exc:
                self.w.error_message("Cannot import from VirtualBox", exc.message)
        if not images:
            return None
        for p in images:
            self.w.library.touch_recent(p)
        if not is_network_location(images[0]):
            self.w.remember_folder(images[0])
        if select:
            self.pending_select = [images[0]]
        if sync:
            recs = []
            for p in images:
                recs += self.w.library.add_with_parents(p)
            self.records_arrived(tasks.key_stores(recs, self.w.library))
            return None
        return self.run_scan(images)

    def add_network_image(self, location: str, format: str, properties: dict, *,
                          remember_secrets: bool = False) -> Job | None:
        """Add a non-file image (``scheme://…`` location) opened with ``properties`` as its
        backend configuration (e.g. the values of a ConfigForm). For "Add network disk…".
        Secrets (BYTES values) reach the library file only with ``remember_secrets``; otherwise
        they are kept in memory for this session."""
        self.w.library.add(location, format=format)
        self.w.library.set_properties(location, properties, remember_secrets=remember_secrets)
        self.secrets_asked.discard(location)
        return self.add_paths([location])

    def network_disk_dialog(self):
        from .dialogs.network_disk import NetworkDiskDialog
        dlg = NetworkDiskDialog(self.w, queue=self.w.queue)
        accepted = dlg.exec() == QDialog.Accepted
        p = dlg.params() if accepted else None
        dlg.deleteLater()          # a connection test still running reports to nobody
        if p is None:
            return None
        return self.add_network_image(p.location, p.format, p.properties,
                                      remember_secrets=p.remember_secrets)

    def ask_secrets(self, path: str):
        """Prompt (non-modal) for the secrets of a network image that were not remembered."""
        from .dialogs.network_disk import SecretsDialog
        if path in self.secret_prompts:
            self.secret_prompts[path].raise_()
            return self.secret_prompts[path]
        node = self.w.model.node(path)
        rec = node.record if node is not None else None
        missing = self.w.library.missing_secrets(path)
        if rec is None or not rec.format or not missing:
            return None
        try:
            backend = get_backend(rec.format)
        except VDError:
            return None
        self.secrets_asked.add(path)
        dlg = SecretsDialog(rec.name, backend, missing, self.w, path=path)
        dlg.setAttribute(Qt.WA_DeleteOnClose)
        self.secret_prompts[path] = dlg
        dlg.finished.connect(lambda result, d=dlg: self.secrets_entered(d, result))
        dlg.open()
        return dlg

    def secrets_entered(self, dlg, result) -> None:
        self.secret_prompts.pop(dlg.path, None)
        if result == QDialog.Accepted:
            p = dlg.params()
            self.w.library.set_secrets(p.path, p.secrets, remember=p.remember)
            self.rescan([p.path])

    def prompt_missing_secrets(self, recs) -> None:
        for rec in recs:
            if (not rec.accessible and is_network_location(rec.path)
                    and rec.path not in self.secrets_asked
                    and self.w.library.missing_secrets(rec.path)):
                self.ask_secrets(rec.path)

    def run_scan(self, paths, touched=()) -> Job:
        """Read ``paths`` (None: the whole library); then the Contents tab reads its image again
        if it is in ``touched`` (images a job changed)."""
        job = tasks.scan_job(self.w.library, paths)
        job.signals.finished.connect(lambda j, recs: self.records_arrived(recs, full=paths is None))
        if touched:
            job.signals.finished.connect(lambda j, recs: self.contents_touched(touched))
        job.signals.failed.connect(self.job_failed)
        self.say("Reading images…", 2000)
        return self.w.queue.submit(job)

    def records_arrived(self, recs, full: bool = False) -> None:
        if full:
            self.w.model.set_records(recs)
        else:
            self.w.model.update_records(recs)
        # duplicate UUIDs across everything listed (a new copy also marks the image it copies)
        self.w.model.refresh_paths(mark_duplicates(self.w.model.records(), self.w.library))
        self.after_records()
        self.prompt_missing_secrets(recs)

    def after_records(self) -> None:
        if self.pending_select:
            # select what a job created once it is listed (another scan may land first)
            present = [p for p in self.pending_select if self.w.model.node(p) is not None]
            if present:
                self.pending_select = []
                self.w.select_paths(present)
        self.w.refresh_view()

    def refresh(self) -> Job:
        self.w.alloc_cache.clear()
        return self.load_library()

    # -- jobs -----------------------------------------------------------------------------
    def start_job(self, job: Job, on_done=None) -> Job:
        job.signals.failed.connect(self.job_failed)
        if on_done is not None:
            job.signals.finished.connect(lambda j, res: on_done(res))
        job.signals.cancelled.connect(lambda j: self.say(f"Cancelled: {j.title}", 5000))
        self.w.jobs_dock.show()
        return self.w.queue.submit(job)

    def job_failed(self, job: Job, message, tb) -> None:
        if tb:
            self.w.messages.append(
                show_crash(self.w, f"{job.title} failed unexpectedly: {message}", tb))
        else:
            self.say(f"Failed: {job.title}: {message}", 10000)
        # what was touched may have changed
        paths = [p for p in job.paths if self.w.model.node(p) is not None]
        if paths and job.kind not in ("scan", "allocation"):
            self.rescan(paths)

    def rescan(self, paths) -> Job | None:
        """Re-read images after a job; never brings back an image that is gone and forgotten."""
        known = set(self.w.library.paths())
        paths = [p for p in paths if p and (p in known or os.path.lexists(p))]
        if not paths:
            return None
        touched = set(paths)
        for p in paths:
            self.w.alloc_cache.pop(p, None)
            node = self.w.model.node(p)
            for c in node.descendants() if node is not None else ():
                self.w.alloc_cache.pop(c.path, None)     # their pictures show this image too
                touched.add(c.path)                      # and so do their contents
        return self.run_scan(list(dict.fromkeys(paths)), touched)

    def contents_touched(self, touched) -> None:
        """The Contents tab reads its image again (in jobs) if a job changed it."""
        c = self.w.contents
        if c.path is not None and c.path in touched and self.w.model.node(c.path) is not None:
            c.reload()

    def chain_key(self, node) -> str:
        return node.root().path

    def import_virtualbox(self, path: str) -> Job | None:
        try:
            paths = self.w.library.import_virtualbox(path)
        except VDError as exc:
            self.w.error_message("Cannot import from VirtualBox", exc.message)
            return None
        self.say(f"Imported {len(paths)} image(s) from {path}", 5000)
        return self.run_scan(None)

    def create_dialog(self, *, previous: CreateParams | None = None):
        if previous is None and self.w.current_device() == DeviceType.FLOPPY.value:
            return self.create_floppy_dialog()   # a formatted floppy, not a blank RAW file
        from .dialogs.create import CreateDialog
        dlg = CreateDialog(self.w.last_folder(), self.w, device=self.w.current_device())
        p = self.run_dialog(dlg, previous)
        return None if p is None else self.start_create(p)

    def start_create(self, p: CreateParams) -> Job:
        job = tasks.create_job(p.location, p.size, p.format, flags=p.flags,
                               config=p.config, comment=p.comment, encrypt=p.encrypt)
        job.new_passphrase = p.passphrase
        self.w.remember_folder(p.location)
        self.pending_select = [p.location]
        self.retry_on_failure(job, f"Creating {os.path.basename(p.location)} failed",
                              lambda: self.create_dialog(
                                  previous=dataclasses.replace(p, passphrase=None)))
        return self.start_job(job, lambda res: self.rescan(res))

    def create_floppy_dialog(self, *, previous: FloppyParams | None = None):
        from .dialogs.media import FloppyDialog
        p = self.run_dialog(FloppyDialog(self.w.last_folder(), self.w), previous)
        return None if p is None else self.start_create_floppy(p)

    def start_create_floppy(self, p: FloppyParams) -> Job:
        job = tasks.floppy_job(p.location, p.size, label=p.label, sources=p.sources)
        return self._start_media(job, p.location,
                                 lambda: self.create_floppy_dialog(previous=p))

    def create_iso_dialog(self, *, previous: IsoParams | None = None):
        from .dialogs.media import IsoDialog
        p = self.run_dialog(IsoDialog(self.w.last_folder(), self.w), previous)
        return None if p is None else self.start_create_iso(p)

    def start_create_iso(self, p: IsoParams) -> Job:
        job = tasks.iso_job(p.location, label=p.label, sources=p.sources)
        return self._start_media(job, p.location, lambda: self.create_iso_dialog(previous=p))

    def create_rawdisk_dialog(self, *, previous: RawDiskParams | None = None):
        from .dialogs.rawdisk import RawDiskDialog
        p = self.run_dialog(RawDiskDialog(self.w.last_folder(), self.w), previous)
        return None if p is None else self.start_create_rawdisk(p)

    def start_create_rawdisk(self, p: RawDiskParams) -> Job:
        job = tasks.rawvmdk_job(p.location, p.drive, p.partitions, relative=p.relative)
        return self._start_media(job, p.location,
                                 lambda: self.create_rawdisk_dialog(previous=p))

    def _start_media(self, job: Job, location: str, reopen) -> Job:
        """A new floppy or disc image: made by ``job``, then added to the list and selected."""
        self.w.remember_folder(location)
        self.retry_on_failure(job, f"Creating {os.path.basename(location)} failed", reopen)
        return self.start_job(job, lambda res: self.add_paths(list(res)))

    # A job started from a dialog can fail after the dialog closed. Every such dialog has
    # set_params (and params), its x_dialog(previous=...) fills it with what was chosen, and
    # its start_x registers the way back with retry_on_failure: one mechanism for all.
    def run_dialog(self, dlg, previous=None):
        """Show ``dlg`` filled with ``previous`` (if any); its params (a dialogs.params
        dataclass) when accepted."""
        if previous is not None:
            dlg.set_params(previous)
        if dlg.exec() != QDialog.Accepted:
            return None
        return dlg.params()

    def retry_on_failure(self, job: Job, title: str, reopen) -> None:
        """When ``job`` fails with an engine error (not a bug), offer "Change and Retry…",
        which calls ``reopen()``: the dialog again, filled with the same choices."""
        job.signals.failed.connect(
            lambda j, msg, tb: None if tb else self.offer_retry(title, msg, reopen))

    def dialog_node(self, path: str | None):
        """The image a dialog is for: the one at ``path`` (a retry: looked up again, the list
        may have been refreshed meanwhile), else the current one."""
        if path is None:
            return self.w.current_node()
        node = self.w.model.node(path)
        if node is None:
            self.w.error_message("Cannot retry", f"{path} is no longer in the list.")
        return node

    def offer_retry(self, title: str, message: str, reopen) -> QMessageBox:
        """A job from a dialog failed: say why, and offer the dialog again with what was
        typed, so nothing has to be entered twice."""
        box = QMessageBox(QMessageBox.Warning, title, html.escape(str(message)),
                          QMessageBox.Close, self.w)
        box.setObjectName("retryBox")
        again = box.addButton("Change and Retry…", QMessageBox.AcceptRole)
        again.setObjectName("retryButton")
        again.clicked.connect(lambda _=False: QTimer.singleShot(0, reopen))
        box.setAttribute(Qt.WA_DeleteOnClose)
        box.setModal(False)
        box.show()
        self.w.messages.append(box)
        return box

    def snapshot_dialog(self, *, path: str | None = None,
                        previous: SnapshotParams | None = None):
        from .dialogs.create import CreateDiffDialog
        node = self.dialog_node(path)
        if node is None:
            return None
        p = self.run_dialog(CreateDiffDialog(node, self.w), previous)
        return None if p is None else self.start_snapshot(node, p)

    def start_snapshot(self, node, p: SnapshotParams) -> Job:
        job = tasks.create_diff_job(p.parent, p.location, p.format, library=self.w.library,
                                    comment=p.comment, key=self.chain_key(node))
        self.pending_select = [p.location]
        self.retry_on_failure(job, f"Creating {os.path.basename(p.location)} failed",
                              lambda: self.snapshot_dialog(path=node.path, previous=p))
        return self.start_job(job, lambda res: self.rescan(res))

    def copy_dialog(self, *, path: str | None = None, previous: CopyParams | None = None):
        from .dialogs.copy import CopyDialog
        node = self.dialog_node(path)
        if node is None:
            return None
        dlg = CopyDialog(node, self.w)
        if is_network_location(node.path):
            # a network disk has no folder: copy into the last folder used, named after it
            from .dialogs.common import unique_path
            b = dlg.backend()
            stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in node.name).strip("._")
            dlg.location.set_path(unique_path(self.w.last_folder(), f"{stem or 'disk'}_copy",
                                              b.default_extension() if b else ""))
        p = self.run_dialog(dlg, previous)
        return None if p is None else self.start_copy(node, p)

    def start_copy(self, node, p: CopyParams) -> Job:
        chain = [n.path for n in node.ancestors()]
        kw = p.copy_kwargs()
        if is_network_location(node.path) and "src_config" not in kw:
            kw["src_config"] = self.w.library.properties(node.path) or None   # network disk
        job = tasks.copy_job(p.src, p.dst, p.dst_format, key=self.chain_key(node),
                             paths=chain, library=self.w.library, encrypt=p.encrypt, **kw)
        job.new_passphrase = p.passphrase
        if is_network_location(node.path):   # name a network source by its shown name, not its LUN
            job.title = f"{job.title.split(' ', 1)[0]} {node.name} → {os.path.basename(p.dst)}"
        self.pending_select = [p.dst]
        self.retry_on_failure(job, f"Copying {node.name} failed",
                              lambda: self.copy_dialog(path=node.path, previous=p))
        return self.start_job(job, lambda res: self.rescan(list(res or [p.dst])))

    # -- encryption (issue #17) -------------------------------------------------------------
    def encrypt_dialog(self, *, decrypt: bool = False, path: str | None = None,
                       previous: EncryptParams | None = None):
        from .dialogs.passphrase import EncryptDialog
        node = self.dialog_node(path)
        if node is None:
            return None
        p = self.run_dialog(EncryptDialog(node, self.w, decrypt=decrypt), previous)
        return None if p is None else self.start_crypt(node, p)

    def start_crypt(self, node, p: EncryptParams) -> Job:
        job = tasks.crypt_job(p.path, format=node.record.format, encrypt=p.encrypt, into=p.into,
                              into_format=p.into_format, library=self.w.library,
                              key=self.chain_key(node))
        job.new_passphrase = p.passphrase
        if p.into:
            self.pending_select = [p.into]
        verb = "Decrypting" if p.encrypt is None else "Encrypting"
        self.retry_on_failure(job, f"{verb} {node.name} failed", lambda: self.encrypt_dialog(
            decrypt=p.encrypt is None, path=node.path,
            previous=dataclasses.replace(p, passphrase=None)))
        def done(res):
            if not p.into:
                self.w.passphrases.forget(node.path)     # the old one no longer applies
            self.rescan([node.path] + ([p.into] if p.into else []))
        return self.start_job(job, done)

    def passphrase_dialog(self, *, path: str | None = None):
        from .dialogs.passphrase import ChangePassphraseDialog
        node = self.dialog_node(path)
        if node is None:
            return None
        p = self.run_dialog(ChangePassphraseDialog(node, self.w))
        return None if p is None else self.start_change_passphrase(node, p)

    def start_change_passphrase(self, node, p: ChangePassphraseParams) -> Job:
        job = tasks.change_passphrase_job(p.path, format=node.record.format,
                                          library=self.w.library, key=self.chain_key(node))
        job.new_passphrase = p.passphrase

        def changed(res):
            self.w.passphrases.forget(node.path)
            self.say(f"Changed the passphrase of {node.name}", 8000)
            self.rescan([node.path])
        self.retry_on_failure(job, f"Changing the passphrase of {node.name} failed",
                              lambda: self.passphrase_dialog(path=node.path))
        return self.start_job(job, changed)

    def move_dialog(self, *, path: str | None = None, previous: MoveParams | None = None):
        node = self.dialog_node(path)
        if node is None:
            return None
        dst, _ = QFileDialog.getSaveFileName(self.w, f"Move {node.name}",
                                             previous.dst if previous else node.path)
        if not dst or os.path.abspath(dst) == node.path:
            return None
        return self.start_move(node, dst)

    def start_move(self, node, dst: str) -> Job | None:
        """Move after checking that the chain keeps its links there (nothing is touched when
        not: the reason and what to do instead are shown)."""
        src = node.path
        dst = os.path.abspath(dst)
        try:
            why = move_refusal(src, dst, format=node.record.format or None)
        except VDError as exc:
            why = exc.message
        if why:
            self.w.error_message(f"Cannot move {node.name} there", why)
            return None
        deps = [c.path for c in node.descendants()]

        def moved(res):
            self.w.library.rename(src, dst)
            self.w.model.remove_paths([src])
            self.pending_select = [dst]
            self.rescan([dst] + deps)
        job = tasks.move_job(src, dst, key=self.chain_key(node))
        self.retry_on_failure(job, f"Moving {node.name} failed",
                              lambda: self.move_dialog(path=src, previous=MoveParams(dst)))
        return self.start_job(job, moved)

    def merge_dialog(self, *, path: str | None = None, previous: MergeParams | None = None):
        from .dialogs.merge import MergeDialog
        node = self.dialog_node(path)
        if node is None:
            return None
        p = self.run_dialog(MergeDialog(node, self.w, busy=self.w.queue.busy_paths()), previous)
        return None if p is None else self.start_merge(node, p)

    def start_merge(self, node, p: MergeParams) -> Job:
        deleted = p.deleted
        others = [x for x in p.paths if x not in deleted]
        model = self.w.model
        deps = [c.path for n in p.paths if model.node(n) for c in model.node(n).descendants()
                if c.path not in deleted]

        def merged(res):
            for d in deleted:
                if not os.path.exists(d):
                    self.w.library.remove(d)
            self.w.model.remove_paths([d for d in deleted if not os.path.exists(d)])
            self.pending_select = [p.target]
            kept = [d for d in deleted if os.path.exists(d)]
            self.rescan(list(dict.fromkeys(others + deps + kept)))
        job = tasks.merge_job(p.source, p.target, key=self.chain_key(node), paths=p.paths)
        self.retry_on_failure(job, f"Merging {os.path.basename(p.source)} failed",
                              lambda: self.merge_dialog(path=node.path, previous=p))
        return self.start_job(job, merged)

    def resize_dialog(self, *, path: str | None = None, previous: ResizeParams | None = None):
        from .dialogs.resize import ResizeDialog
        node = self.dialog_node(path)
        if node is None:
            return None
        dlg = ResizeDialog(node, self.w, used=self.used_end(node), library=self.w.library)
        p = self.run_dialog(dlg, previous)
        if p is None or not self.confirm_resize(node, p.size, dlg.used):
            return None
        return self.start_resize(node, p.size)

    def confirm_resize(self, node, size: int, used: int | None = None) -> bool:
        """The checks of the Resize dialog for a size from anywhere (dialog, details pane); a
        shrink always asks, naming what is cut and whether data lies there."""
        from .dialogs.resize import resize_problems, shrink_text, used_end
        current = node.record.virtual_size or 0
        if used is None:
            used = self.used_end(node)
        if used is None and size < current:
            used, _err = used_end(node.path, self.w.library)
        errors, _warnings = resize_problems(node, size, used)
        if errors:
            self.w.error_message(f"Cannot resize {node.name}",
                                 "<br>".join(html.escape(e) for e in errors))
            return False
        if size < current:
            ok, _ = self.w.confirm(f"Shrink {node.name}", shrink_text(node, size, used),
                                   f"Shrink to {format_size(size)}", None)
            return ok
        return True

    def used_end(self, node) -> int | None:
        from vdgui.vd import Alloc
        c = self.w.alloc_cache.get(node.path)
        if not c or c.get("mtime") != mtime(node.path):
            return None
        last = 0
        for e in c["extents"]:
            if e.status == Alloc.DATA:
                last = e.end
        return last

    def start_resize(self, node, size: int) -> Job:
        job = tasks.resize_job(node.path, size, format=node.record.format, key=self.chain_key(node))
        self.retry_on_failure(job, f"Resizing {node.name} failed",
                              lambda: self.resize_dialog(path=node.path,
                                                         previous=ResizeParams(size)))
        return self.start_job(job, lambda res: self.rescan([node.path]))

    def compact_selected(self) -> list[Job]:
        out = []
        for node in self.w.selected_nodes():
            job = tasks.compact_job(node.path, format=node.record.format, key=self.chain_key(node))
            out.append(self.start_job(job, lambda res, p=node.path: self.rescan([p])))
        return out

    def compare_selected(self) -> Job | None:
        nodes = self.w.selected_nodes()
        if len(nodes) != 2:
            return None
        a, b = nodes
        job = tasks.compare_job(a.path, b.path, formats=(a.record.format, b.record.format),
                                keys=[self.chain_key(a), self.chain_key(b)])
        return self.start_job(job, lambda res: self.compare_done(a.name, b.name, res))

    def compare_done(self, a: str, b: str, res) -> QMessageBox:
        if res.identical:
            text = f"<b>{html.escape(a)}</b> and <b>{html.escape(b)}</b> read the same."
            if res.size_mismatch:
                text += (f"<br>Their sizes differ ({format_size(res.sizes[0])} and "
                         f"{format_size(res.sizes[1])}); the larger one reads zeroes past the "
                         "end of the smaller.")
            ic = QMessageBox.Information
        else:
            text = (f"<b>{html.escape(a)}</b> and <b>{html.escape(b)}</b> differ. The first "
                    f"difference is at offset {res.offset:,} ({format_size(res.offset)} into "
                    "the disk).")
            ic = QMessageBox.Warning
        box = QMessageBox(ic, "Compare result", text, QMessageBox.Ok, self.w)
        box.setObjectName("compareResult")
        box.setAttribute(Qt.WA_DeleteOnClose)
        box.setModal(False)
        box.show()
        self.w.messages.append(box)
        return box

    def check_selected(self, repair: bool = False) -> list[Job]:
        """Check; or, for a repair, a dry run first whose findings the user confirms."""
        out = []
        for node in self.w.selected_nodes():
            if repair:
                job = self.repair_job(node, dry_run=True)
                out.append(self.start_job(job, lambda res, n=node: self.repair_findings(n, res)))
                continue
            job = tasks.check_job(node.path, repair=repair, format=node.record.format,
                                  key=self.chain_key(node))
            out.append(self.start_job(job, lambda res, n=node: self.check_done(n, res, repair)))
        return out

    def repair_job(self, node, *, dry_run: bool, backup: bool = False) -> Job:
        from vdgui.vd import check
        path, fmt = node.path, node.record.format

        def fn(progress):
            return check(path, format=fmt, repair=True, dry_run=dry_run, backup=backup,
                         progress=progress)
        title = (f"Check {node.name} before repairing" if dry_run else f"Repair {node.name}"
                 + (" (with a backup)" if backup else ""))
        return Job(title, fn, keys=[self.chain_key(node)], paths=[path],
                   kind="check" if dry_run else "repair")

    def repair_findings(self, node, report) -> Job | None:
        """The dry run's findings: nothing to do, or ask (findings, effects, backup) first."""
        if not isinstance(report, CheckReport):
            return None
        if not report.problems:
            self.check_done(node, report, False)
            return None
        answer = self.w.repair_confirm(node, report)
        if answer is None:
            self.say(f"Repair of {node.name} cancelled; nothing was changed", 8000)
            return None
        job = self.repair_job(node, dry_run=False, backup=answer.backup)
        return self.start_job(job, lambda res, n=node: self.check_done(n, res, True))

    def check_done(self, node, report, repair: bool) -> QMessageBox | None:
        if not isinstance(report, CheckReport):
            if repair:
                self.rescan([node.path])
            return None
        # the result is on the image: its state column says Corrupt / Leaks until it changes
        left = [p for p in report.problems if not p.repaired]
        state = ("corrupt" if report.corrupt and left else
                 "leaks" if report.leaks and left else None)
        note = check_summary(report) if state else ""
        self.w.library.set_health(node.path, state, note)
        if repair:
            self.rescan([node.path])
        elif self.w.model.node(node.path) is not None:
            rec = self.w.model.node(node.path).record
            rec.health, rec.health_note = state, note
            self.w.model.update_records([rec])
            self.after_records()
        if not report.problems:
            self.say(f"{node.name}: no problems found", 8000)
            text = f"<b>{html.escape(node.name)}</b>: no problems found."
            ic = QMessageBox.Information
        else:
            lines = [f"{'✔ repaired: ' if p.repaired else ''}{p.severity}: {html.escape(p.what)}"
                     for p in report.problems[:50]]
            more = len(report.problems) - 50
            state = ("corrupt" if report.corrupt else "has leaked blocks" if report.leaks
                     else "repaired")
            text = (f"<b>{html.escape(node.name)}</b> {state}.<br><br>" + "<br>".join(lines)
                    + (f"<br>… and {more} more" if more > 0 else ""))
            if (report.corrupt and not repair
                    and actions.reason("repair", [node], self.w.context()) is None):
                text += "<br><br><b>Repair…</b> shows what each fix does before anything changes."
            ic = QMessageBox.Warning if report.corrupt else QMessageBox.Information
        if repair and report.backup:
            text += f"<br><br>Backup of the image before the repair: {html.escape(report.backup)}"
        if repair and report.orphans_file:
            text += (f"<br><br>Unreferenced data saved to {html.escape(report.orphans_file)} "
                     "(index: the .json beside it)")
        box = QMessageBox(ic, "Repair result" if repair else "Check result", text,
                          QMessageBox.Ok, self.w)
        box.setObjectName("checkResult")
        if (not repair and state is not None
                and actions.reason("repair", [node], self.w.context()) is None):
            fix = box.addButton("Repair…", QMessageBox.ActionRole)
            fix.setObjectName("repairButton")
            fix.clicked.connect(lambda _=False, p=node.path: self.repair_path(p))
        box.setAttribute(Qt.WA_DeleteOnClose)
        box.setModal(False)
        box.show()
        self.w.messages.append(box)
        return box

    def repair_path(self, path: str):
        """Repair… from a check result: the same confirmation as the Repair action."""
        if self.w.model.node(path) is None:
            return None
        self.w.select_paths([path])
        return self.check_selected(True)

    def remove_selected(self) -> list[str]:
        nodes = self.w.selected_nodes()
        paths = []
        for n in nodes:
            paths += [n.path] + [c.path for c in n.descendants()]
        paths = list(dict.fromkeys(paths))
        for p in paths:
            self.w.library.remove(p)
        self.w.model.remove_paths(paths)
        self.after_records()
        extra = len(paths) - len(nodes)
        self.say(
            f"Removed {len(nodes)} image(s) from the list"
            + (f" with {extra} differencing image(s) that depend on them" if extra else "")
            + "; the files stay on disk", 8000)
        return paths

    def remove_inaccessible(self) -> list[str]:
        bad = [n.path for n in self.w.model.nodes() if not n.accessible and not n.busy]
        for p in bad:
            self.w.library.remove(p)
        self.w.model.remove_paths(bad)
        self.after_records()
        self.say(f"Removed {len(bad)} inaccessible image(s) from the list", 8000)
        return bad

    def delete_plan(self, nodes) -> tuple[list, list]:
        """(images to delete, images that depend on them but are not selected)."""
        sel = {n.path for n in nodes}
        dependents = []
        for n in nodes:
            for c in n.descendants():
                if c.path not in sel and c not in dependents:
                    dependents.append(c)
        return list(nodes), dependents

    def delete_selected(self) -> Job | None:
        nodes, dependents = self.delete_plan(self.w.selected_nodes())
        if not nodes:
            return None
        files = [f for n in nodes for f in (n.record.files or [n.path]) if os.path.lexists(f)]
        text = (f"Delete {len(nodes)} image(s) from disk? This removes these files permanently:<br>"
                + "<br>".join(f"&nbsp;&nbsp;• {html.escape(f)}" for f in files[:20])
                + ("<br>&nbsp;&nbsp;…" if len(files) > 20 else ""))
        also = None
        if dependents:
            text += (f"<br><br><b>{len(dependents)} other image(s) depend on "
                     f"{'it' if len(nodes) == 1 else 'them'}</b> and would become unusable: "
                     + ", ".join(html.escape(d.name) for d in dependents[:10])
                     + (" …" if len(dependents) > 10 else "") + ".")
            also = f"Also delete the {len(dependents)} dependent image(s)"
        answer = self.w.confirm("Delete from Disk", text, f"Delete {len(files)} file(s)", also)
        if not answer:
            return None
        ok, also_delete = answer
        if not ok:
            return None
        victims = nodes + (dependents if also_delete else [])
        job = tasks.delete_job([(n.path, list(n.record.files or [n.path])) for n in victims],
                               library=self.w.library)
        survivors = [d.path for d in dependents] if not also_delete else []

        def deleted(res):
            self.w.model.remove_paths(res)
            self.after_records()
            if survivors:
                self.rescan(survivors)
        return self.start_job(job, deleted)

    def apply_details(self, node, changes: dict) -> list[Job]:
        out = []
        if "comment" in changes:
            out.append(self.start_job(tasks.set_comment_job(node.path, changes["comment"],
                                                            library=self.w.library,
                                                            key=self.chain_key(node)),
                                      lambda res: self.rescan([node.path])))
        if "size" in changes:
            if self.confirm_resize(node, changes["size"]):
                out.append(self.start_resize(node, changes["size"]))
            else:
                self.w.details.reset_field("size")
        if "location" in changes:
            out.append(self.start_move(node, changes["location"]))
        return [j for j in out if j is not None]

    def new_uuid(self, node) -> Job | None:
        """Give ``node`` (one of several images sharing a UUID) a new UUID; the images that
        depend on it are relinked to it."""
        kids = [c.path for c in node.children]
        rec = node.record
        text = (f"Give <b>{html.escape(node.name)}</b> a new UUID?<br><br>Its UUID {rec.uuid} is "
                "also the UUID of:<br>" + "<br>".join(f"&nbsp;&nbsp;• {html.escape(p)}"
                                                      for p in rec.duplicates[:10])
                + "<br><br>Those keep it. The data of every image stays as it is.")
        if kids:
            text += (f"<br><br>{len(kids)} differencing image(s) depend on {html.escape(node.name)}"
                     " and get their parent link updated: "
                     + ", ".join(html.escape(c.name) for c in node.children[:10]) + ".")
        text += ("<br><br>A virtual machine that attaches this image by its UUID must attach it "
                 "again.")
        ok, _ = self.w.confirm("Give a New UUID", text, "Give a new UUID", None)
        if not ok:
            return None
        path, fmt, lib = node.path, rec.format, self.w.library
        twins = list(rec.duplicates)

        def fn(progress):
            progress(0, 1)
            new = give_new_uuid(path, children=kids, format=fmt, library=lib)
            progress(1, 1)
            return str(new)
        job = Job(f"Give {node.name} a new UUID", fn, keys=[self.chain_key(node)],
                  paths=[path, *kids], kind="new_uuid")
        return self.start_job(job, lambda res: self.rescan([path, *kids, *twins]))

    def save_properties(self, node, values: dict) -> None:
        self.w.library.set_properties(node.path, values)
        self.say(f"Saved the properties of {node.name}", 5000)
