"""The app's passphrase provider (issue #17): jobs run in pool threads; when an encrypted image
they open asks for its passphrase, the question goes to the GUI thread (a
:class:`~vdgui.gui.dialogs.passphrase.PassphraseDialog`) and the job waits until it is answered,
cancelled, or the job itself is cancelled (then it ends "cancelled"). A wrong answer asks again,
saying so. Per image, what is tried first: the passphrase that opened it earlier in this
session (memory only), then the desktop keyring's (only if the user ticked "Remember"), then
the user. Nothing here writes a passphrase to the library, a log or a message."""
from __future__ import annotations

import os
import threading

from PySide6.QtCore import QObject, Signal, Slot
from PySide6.QtWidgets import QDialog

from vdgui.vd import Cancelled, Passphrase, PassphraseProvider

KEYRING_SERVICE = "vdgui"
WRONG = "Wrong passphrase: try again."
WRONG_KEPT = "The remembered passphrase did not open it: type the passphrase."


def keyring_module():
    """The ``keyring`` module when it is installed and has a usable backend, else None."""
    try:
        import keyring
        from keyring.backends import fail
    except Exception:      # not installed, or broken: remembering is not offered
        return None
    try:
        if isinstance(keyring.get_keyring(), fail.Keyring):
            return None
    except Exception:
        return None
    return keyring


class _Ask:
    """One question from a worker to the GUI thread."""

    def __init__(self, job, request, error: str | None):
        self.job = job
        self.request = request
        self.error = error
        self.answer: Passphrase | None = None
        self.remember = False
        self.done = threading.Event()


class _JobProvider(PassphraseProvider):
    """The provider of one job (made in its pool thread by the queue)."""

    def __init__(self, broker: Passphrases, job):
        super().__init__(new=job.new_passphrase)
        self._broker = broker
        self._job = job
        self._made: list[Passphrase] = []
        self._remember: dict[str, bool] = {}

    @property
    def has_passphrases(self) -> bool:
        return True

    def candidates(self, request):
        loc = request.location
        error = None
        kept = self._broker.session_copy(loc)
        if kept is not None:
            self._made.append(kept)
            yield kept
            error = WRONG_KEPT
        if not self._job.asks:
            return
        ring = self._broker.keyring_copy(loc)
        if ring is not None:
            self._made.append(ring)
            yield ring
            error = WRONG_KEPT
        while True:
            ask = self._broker.ask(self._job, request, error)
            self._made.append(ask.answer)
            self._remember[loc] = ask.remember
            yield ask.answer
            error = WRONG

    def unlock(self, request, attempt, cache_key=None):
        won: list[bytes] = []

        def tracked(pw: bytes):
            found = attempt(pw)
            if found is not None:
                won.append(pw)
            return found
        result = super().unlock(request, tracked, cache_key)
        if won:
            self._broker.opened(request.location, won[0],
                                self._remember.get(request.location, False))
        return result

    def close(self) -> None:
        for p in self._made:
            p.wipe()
        self._made.clear()
        super().close()


class Passphrases(QObject):
    """Owned by the main window; ``provider_for`` is the job queue's passphrase factory."""

    asked = Signal(object)          # _Ask, from a worker
    withdrawn = Signal(object)      # _Ask whose job was cancelled meanwhile

    def __init__(self, window):
        super().__init__(window)
        self.w = window
        self._lock = threading.Lock()
        self._session: dict[str, Passphrase] = {}
        self.keyring = keyring_module()
        self.dialogs: list = []         # open prompts (tests answer them)
        self.asked.connect(self._show)
        self.withdrawn.connect(self._withdraw)

    # -- any thread ------------------------------------------------------------------------
    def provider_for(self, job) -> PassphraseProvider:
        return _JobProvider(self, job)

    def session_copy(self, location: str) -> Passphrase | None:
        with self._lock:
            p = self._session.get(location)
            return Passphrase(p.reveal()) if p is not None else None

    def keyring_copy(self, location: str) -> Passphrase | None:
        if self.keyring is None:
            return None
        try:
            text = self.keyring.get_password(KEYRING_SERVICE, location)
        except Exception:
            return None
        return Passphrase(text) if text else None

    def opened(self, location: str, pw: bytes, remember: bool) -> None:
        """``pw`` opened ``location``: kept for this session; in the keyring when asked."""
        with self._lock:
            old = self._session.get(location)
            if old is not None:
                old.wipe()
            self._session[location] = Passphrase(pw)
        if remember and self.keyring is not None:
            try:
                self.keyring.set_password(KEYRING_SERVICE, location,
                                          pw.decode("utf-8", "surrogateescape"))
            except Exception:
                pass            # the keyring refused: the session still has it

    def forget(self, location: str) -> None:
        """Forget ``location``'s passphrase (session and keyring)."""
        with self._lock:
            old = self._session.pop(location, None)
            if old is not None:
                old.wipe()
        if self.keyring is not None:
            try:
                self.keyring.delete_password(KEYRING_SERVICE, location)
            except Exception:
                pass

    def ask(self, job, request, error: str | None) -> _Ask:
        """(worker) Ask the GUI thread and wait; Cancelled when the user or the job cancels."""
        a = _Ask(job, request, error)
        self.asked.emit(a)
        while not a.done.wait(0.05):
            if job.cancel_requested:
                self.withdrawn.emit(a)
                raise Cancelled("cancelled while asking for the passphrase")
        if a.answer is None:
            raise Cancelled("no passphrase given")
        return a

    # -- GUI thread ------------------------------------------------------------------------
    @Slot(object)
    def _show(self, a: _Ask) -> None:
        from .dialogs.passphrase import PassphraseDialog
        if a.job.cancel_requested or a.done.is_set():
            a.done.set()
            return
        loc = a.request.location
        purpose = "open" if a.request.purpose == "open" else a.request.purpose
        dlg = PassphraseDialog(os.path.basename(loc) or loc, loc, a.request.kind,
                               purpose=purpose, error=a.error,
                               can_remember=self.keyring is not None, parent=self.w)
        dlg.ask = a
        self.dialogs.append(dlg)
        dlg.finished.connect(lambda result, d=dlg: self._answered(d, result))
        dlg.open()

    def _answered(self, dlg, result) -> None:
        if dlg in self.dialogs:
            self.dialogs.remove(dlg)
        a = dlg.ask
        if result == QDialog.DialogCode.Accepted and not a.done.is_set():
            p = dlg.params()
            a.answer, a.remember = p.passphrase, p.remember
        elif not a.done.is_set():
            a.job.cancel()
        a.done.set()
        dlg.deleteLater()

    @Slot(object)
    def _withdraw(self, a: _Ask) -> None:
        for dlg in list(self.dialogs):
            if dlg.ask is a:
                self.dialogs.remove(dlg)
                dlg.reject()
