"""Passphrases for encrypted images (issue #17; docs/design-encryption.md §2.5).

The engine never asks the user itself: an encrypted image, when opened for its data, calls
:func:`unlock` with a :class:`SecretRequest` (which image, what for) and a function that tries one
passphrase. The current :class:`PassphraseProvider` (set with :func:`using`, or given to
``Disk.open``/``Disk.open_chain``) offers its candidates one by one; the first that opens wins,
none -> :class:`WrongPassphrase`, no provider or no candidate -> :class:`PassphraseRequired`.

Secrets are kept in :class:`Passphrase` (a bytearray wiped on close) and never reach a repr, a
log or an exception message. What an unlock returns (a master key) is cached in the provider
under the caller's ``cache_key`` so the read-ahead threads, which open the chain again, do not
repeat the key derivation; closing the provider wipes the cache.
"""
from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from .errors import InvalidArgument, PassphraseRequired, WrongPassphrase
from .paths import read_small_file

T = TypeVar("T")


class Passphrase:
    """A secret's bytes. ``repr``/``str`` never show them; :meth:`wipe` zeroes them."""

    __slots__ = ("_buf",)

    def __init__(self, data: bytes | bytearray | str):
        if isinstance(data, str):
            data = data.encode("utf-8")
        self._buf = bytearray(data)

    def reveal(self) -> bytes:
        """The bytes, for the one call that needs them (a KDF)."""
        return bytes(self._buf)

    def __len__(self) -> int:
        return len(self._buf)

    def wipe(self) -> None:
        self._buf[:] = bytes(len(self._buf))
        self._buf.clear()

    def __repr__(self) -> str:
        return "<passphrase>"

    __str__ = __repr__

    def __reduce__(self) -> str | tuple[object, ...]:
        raise TypeError("a passphrase cannot be pickled")


def read_passphrase_file(path: str) -> Passphrase:
    """A passphrase file's content without one trailing newline (``\\n`` or ``\\r\\n``)."""
    data = bytearray(read_small_file(path, "passphrase file", limit=64 << 10))
    if data.endswith(b"\n"):
        del data[-1:]
        if data.endswith(b"\r"):
            del data[-1:]
    if not data:
        raise InvalidArgument(f"{path}: passphrase file is empty")
    p = Passphrase(data)
    data[:] = bytes(len(data))
    return p


@dataclass(frozen=True)
class SecretRequest:
    """What a passphrase is asked for: ``location`` (the image, as opened), ``kind`` (the
    encryption: "luks1", "luks2", "qcow2-aes", "vbox-crypt") and ``purpose`` (one line for a
    prompt: "open", "new passphrase", ...). Carries no secret."""

    location: str
    kind: str
    purpose: str = "open"


Prompt = Callable[[SecretRequest], "Passphrase | None"]


class PassphraseProvider:
    """Candidate passphrases for every encrypted member of a chain, each tried per member;
    ``new`` is the passphrase for what gets encrypted (create, convert --encrypt, change of
    passphrase); ``prompt`` (optional) is asked after the candidates failed, until it returns
    None. Use as a context manager (or call :meth:`close`) to wipe everything."""

    def __init__(self, passphrases: Iterable[Passphrase | bytes | str] = (), *,
                 new: Passphrase | bytes | str | None = None, prompt: Prompt | None = None):
        self._given = [p if isinstance(p, Passphrase) else Passphrase(p) for p in passphrases]
        self._new = new if isinstance(new, Passphrase) or new is None else Passphrase(new)
        self._prompt = prompt
        self._cache: dict[object, object] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<PassphraseProvider: {len(self._given)} passphrase(s)" \
               f"{', new' if self._new is not None else ''}>"

    def __enter__(self) -> PassphraseProvider:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def has_passphrases(self) -> bool:
        return bool(self._given) or self._prompt is not None

    def candidates(self, request: SecretRequest) -> Iterator[Passphrase]:
        yield from self._given
        if self._prompt is not None:
            while (p := self._prompt(request)) is not None:
                yield p

    def new_passphrase(self, request: SecretRequest) -> Passphrase:
        """The passphrase to encrypt with; PassphraseRequired when none was given."""
        if self._new is None:
            raise PassphraseRequired(f"encrypting needs a new passphrase ({request.kind})",
                                     path=request.location)
        return self._new

    def unlock(self, request: SecretRequest, attempt: Callable[[bytes], T | None],
               cache_key: object = None) -> T:
        """``attempt(passphrase bytes)`` for each candidate until one returns non-None."""
        if cache_key is not None:
            with self._lock:
                if cache_key in self._cache:
                    return self._cache[cache_key]  # type: ignore[return-value]
        tried = 0
        for p in self.candidates(request):
            tried += 1
            found = attempt(p.reveal())
            if found is not None:
                if cache_key is not None:
                    with self._lock:
                        self._cache[cache_key] = found
                return found
        if not tried:
            raise PassphraseRequired(f"encrypted ({request.kind}): needs a passphrase",
                                     path=request.location)
        raise WrongPassphrase("wrong passphrase", path=request.location)

    def close(self) -> None:
        for p in self._given:
            p.wipe()
        if self._new is not None:
            self._new.wipe()
        with self._lock:
            for v in self._cache.values():
                if isinstance(v, bytearray):
                    v[:] = bytes(len(v))
            self._cache.clear()


_current: contextvars.ContextVar[PassphraseProvider | None] = contextvars.ContextVar(
    "vdgui_passphrases", default=None)


def current() -> PassphraseProvider | None:
    """The provider in effect here (threads started by the engine's pipeline inherit it)."""
    return _current.get()


@contextlib.contextmanager
def using(provider: PassphraseProvider | None) -> Iterator[PassphraseProvider | None]:
    """Make ``provider`` the one every image opened inside the block asks (None: keep the
    current one)."""
    if provider is None:
        yield current()
        return
    token = _current.set(provider)
    try:
        yield provider
    finally:
        _current.reset(token)


def unlock(request: SecretRequest, attempt: Callable[[bytes], T | None],
           cache_key: object = None) -> T:
    """Ask the current provider (see :meth:`PassphraseProvider.unlock`)."""
    provider = current()
    if provider is None:
        raise PassphraseRequired(f"encrypted ({request.kind}): needs a passphrase",
                                 path=request.location)
    return provider.unlock(request, attempt, cache_key)


def new_passphrase(request: SecretRequest) -> Passphrase:
    provider = current()
    if provider is None:
        raise PassphraseRequired(f"encrypting needs a new passphrase ({request.kind})",
                                 path=request.location)
    return provider.new_passphrase(request)
