"""The engine's errors: one hierarchy, each class with a stable code.

Messages name the file, the field or offset, and expected vs found, e.g.
``basic.vdi: header field 'cbBlock' at offset 0x178: expected a power of two, found 3000``.
Only the CLI's main() and the job boundary catch these.
"""
from __future__ import annotations

import re

# new files are written under temporary names (temps.temp_name: ``.NAME.vdgui-tmp-PID``; copies:
# a folder ``.DST.vdgui-tmp-PID-RAND/`` holding the final base names) and renamed when complete;
# a message names the path the user asked for, never the temporary one
_TEMP_RE = re.compile(r"\.([^/\\]+?)\.vdgui-tmp-\d+(?:-[0-9a-f]+)?(?:/([^/\\:]+))?")


def user_path(text: str) -> str:
    """``/d/.x.vdi.vdgui-tmp-12`` -> ``/d/x.vdi``;
    ``/d/.x.vdi.vdgui-tmp-12-ab/y.vdi`` -> ``/d/y.vdi``."""
    if "vdgui-tmp-" not in text:
        return text
    return _TEMP_RE.sub(lambda m: m.group(2) or m.group(1), text)


def printable(text: str) -> str:
    """A name that may hold undecodable bytes (surrogate escapes), shown as backslash escapes."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def require_text(value: str, what: str, where: str = "") -> str:
    """Text about to be stored inside an image (comments, file names) must be valid Unicode:
    names and arguments that came from undecodable bytes are refused with a clear message."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgument(
            f"{where + ': ' if where else ''}{what} '{printable(value)}' is not "
            "valid UTF-8 text, and image formats store it as text; "
            + ("rename the file" if "name" in what else "use UTF-8 text")
        ) from None
    return value


class VDError(Exception):
    """Base of every error the engine raises on purpose."""

    code = "VD_ERROR"

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        field: str | None = None,
        offset: int | None = None,
        expected: object = None,
        found: object = None,
    ):
        self.path = path
        self.field = field
        self.offset = offset
        self.expected = expected
        self.found = found
        parts = []
        if path:
            parts.append(f"{path}: ")
        if field:
            parts.append(f"field '{field}'")
            if offset is not None:
                parts.append(f" at offset {offset:#x}")
            parts.append(": ")
        elif offset is not None:
            parts.append(f"at offset {offset:#x}: ")
        parts.append(message)
        if expected is not None or found is not None:
            parts.append(f" (expected {expected}, found {found})")
        self.message = user_path("".join(parts))
        if path:
            self.path = user_path(path)
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message


class ImageNotFound(VDError):
    code = "IMAGE_NOT_FOUND"


class CorruptImage(VDError):
    code = "CORRUPT"


class UnknownFormat(VDError):
    code = "UNKNOWN_FORMAT"


class AmbiguousFormat(VDError):
    code = "AMBIGUOUS_FORMAT"


class NotSupported(VDError):
    """The backend or this image cannot do what was asked."""

    code = "NOT_SUPPORTED"


class InvalidArgument(VDError):
    code = "INVALID_ARGUMENT"


class Refused(VDError):
    """An operation refused for safety (a file system not cleanly unmounted, children that
    would change); the message says why and how to clear it."""
    code = "REFUSED"


class CacheNotClean(Refused):
    """A cache image that was not closed cleanly: it may hold data older than its disk."""
    code = "CACHE_NOT_CLEAN"


class ImageInUse(VDError):
    code = "IN_USE"


class ReadOnlyImage(VDError):
    code = "READ_ONLY"


class ParentMismatch(VDError):
    """A differencing image does not link to the image below it."""

    code = "PARENT_MISMATCH"


class ParentNotFound(VDError):
    code = "PARENT_NOT_FOUND"


class ImageChanged(VDError):
    """A file an operation opened is no longer the one at its path (deleted, renamed or replaced
    meanwhile): nothing is relinked or deleted on its behalf."""

    code = "IMAGE_CHANGED"


class ScanIncomplete(VDError):
    """A folder scan (for the other differencing images of an image) could not look at every
    entry, or found one that cannot be relinked: an operation that would orphan it refuses."""

    code = "SCAN_INCOMPLETE"


class UnsafePath(VDError):
    """A name stored in an image points outside its folder or at a device."""

    code = "UNSAFE_PATH"


class ConfigError(VDError):
    """Missing mandatory key, unknown key or a value of the wrong type."""

    code = "CONFIG"


class Cancelled(VDError):
    code = "CANCELLED"

    def __init__(self, message: str = "operation cancelled", **kw):
        super().__init__(message, **kw)


class VDIOError(VDError):
    code = "IO"


class NetworkError(VDError):
    code = "NETWORK"


class AuthenticationError(VDError):
    code = "AUTH"


class VDTimeoutError(VDError):
    """A network peer stopped answering (not Python's builtin TimeoutError)."""

    code = "TIMEOUT"


class FileExists(VDError):
    code = "FILE_EXISTS"


class WrongPassphrase(VDError):
    """No passphrase given opens this encrypted image (never names the passphrase)."""

    code = "WRONG_PASSPHRASE"


class PassphraseRequired(VDError):
    """An encrypted image was opened without any passphrase to try."""

    code = "PASSPHRASE_REQUIRED"
