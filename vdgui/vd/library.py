"""The media library: the images a user knows about, their parent links, persisted in SQLite.

Engine side (no Qt). The GUI keeps its list of images here; :func:`vdgui.vd.chain.find_parent`
consults it (``find_by_uuid``) when an image's own parent link fails. The database lives under
platformdirs' user data dir, or under ``$VDGUI_DATA_DIR`` when that is set (tests, portable use).

:meth:`Library.scan` reads one image's metadata (never its data) into an :class:`ImageRecord`;
an image that cannot be read still yields a record, with ``error`` saying why, so callers can
show it as inaccessible. :meth:`Library.import_virtualbox` reads the ``<MediaRegistry>`` of a
``VirtualBox.xml`` or ``.vbox`` file.
"""
from __future__ import annotations

import os
import sqlite3
import threading
import time
import traceback
import uuid as uuidlib
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

from .backend import DeviceType, OpenFlags, is_network_location
from .chain import find_parent
from .errors import ImageNotFound, InvalidArgument, VDError
from .fileio import held_elsewhere
from .registry import backends_for_extension

ENV_DATA_DIR = "VDGUI_DATA_DIR"
SCHEMA_VERSION = 1


def data_dir() -> str:
    """Where vdgui keeps its library and settings (created on demand)."""
    d = os.environ.get(ENV_DATA_DIR)
    if not d:
        import platformdirs
        d = platformdirs.user_data_dir("vdgui", appauthor=False)
    os.makedirs(d, exist_ok=True)
    return d


@dataclass
class ImageRecord:
    """What the library knows about one image file, read from its header."""
    path: str
    format: str | None = None
    device_type: str = DeviceType.HARD_DISK.value
    virtual_size: int | None = None
    file_size: int | None = None
    variant: str = ""
    image_flags: int = 0
    uuid: str | None = None
    parent_uuid: str | None = None
    modification_uuid: str | None = None
    parent_modification_uuid: str | None = None
    parent_path: str | None = None          # resolved parent file, None for a base image
    is_diff: bool = False
    comment: str | None = None
    files: list[str] = field(default_factory=list)
    pchs: list | None = None
    lchs: list | None = None
    block_size: int | None = None
    details: dict = field(default_factory=dict)
    error: str | None = None                # why the image is inaccessible, or None
    error_code: str | None = None
    bug: str | None = None                  # traceback when a backend failed unexpectedly
    scanned_at: float = 0.0
    duplicates: list[str] = field(default_factory=list)   # other known images with this UUID
    health: str | None = None               # "corrupt" or "leaks" from the last check, while
    health_note: str = ""                   # the file is unchanged since; what it found
    held: str | None = None                 # "for writing"/"for reading": another program holds it
    # how the image is encrypted, read without a passphrase (format, cipher, keyslots) from its
    # own header (LUKS); the app adds a VirtualBox key store's (vdgui.jobs.tasks.key_stores)
    encryption: dict | None = None

    @property
    def accessible(self) -> bool:
        return self.error is None

    @property
    def name(self) -> str:
        if is_network_location(self.path):
            rest = self.path.split("://", 1)[1]
            return rest.split("@", 1)[-1]          # never show credentials
        return os.path.basename(self.path)


def _same_file(a: str, b: str) -> bool:
    """Two names of one file (a link, another spelling): not a duplicate of itself."""
    if is_network_location(a) or is_network_location(b):
        return a == b
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def mark_duplicates(records: list[ImageRecord], library: Library | None = None) -> list[str]:
    """Detect images that share one UUID (byte copies of one image: VirtualBox registers only
    one of them, and a child's parent search by UUID may pick either). Sets each record's
    ``duplicates`` to the other images with its UUID, among ``records`` and, with ``library``,
    the library's other known images whose file exists. Returns the paths of the records whose
    ``duplicates`` changed. Inaccessible images and images without a UUID take no part."""
    groups: dict[str, list[str]] = {}
    for r in records:
        if r.uuid and r.error is None:
            groups.setdefault(r.uuid.lower(), []).append(r.path)
    if library is not None:
        rows = library.uuid_rows()
        known = {r.path for r in records}
        for path, uid in rows:
            g = groups.get(uid.lower())
            if g is not None and path not in known and path not in g and os.path.isfile(path):
                g.append(path)
    changed = []
    for r in records:
        dup: list[str] = []
        if r.uuid and r.error is None:
            dup = sorted(p for p in groups.get(r.uuid.lower(), ())
                         if p != r.path and not _same_file(p, r.path))
        if dup != r.duplicates:
            r.duplicates = dup
            changed.append(r.path)
    return changed


def _device_for_extension(path: str) -> str:
    ext = os.path.splitext(path)[1].lstrip(".").lower()
    for b in backends_for_extension(ext):
        return b.device_type_for(path).value
    return DeviceType.HARD_DISK.value


def _norm(path: str) -> str:
    if is_network_location(path):
        return path.strip()
    return os.path.abspath(os.path.expanduser(path))


# Disk.info() keys a scan copies into an ImageRecord (same names); a network disk has no file
# size, parents or geometry of its own.
_NETWORK_INFO = ("format", "device_type", "virtual_size", "variant", "image_flags", "uuid",
                 "comment", "block_size")
_FILE_INFO = _NETWORK_INFO + ("file_size", "parent_uuid", "modification_uuid",
                              "parent_modification_uuid", "pchs", "lchs")


def _take_info(rec: ImageRecord, info: dict, keys: tuple[str, ...]) -> None:
    for key in keys:
        setattr(rec, key, info[key])
    rec.details = dict(info.get("details") or {})


class Library:
    """The persistent list of known images. Thread-safe (one connection, one lock)."""

    def __init__(self, path: str | None = None):
        if path is None:
            path = os.path.join(data_dir(), "library.sqlite3")
        self.path = path
        self._lock = threading.RLock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        mode = "WAL" if path != ":memory:" else "MEMORY"
        self._db.execute(f"PRAGMA journal_mode={mode}")
        # forgotten secrets are overwritten in the file, not just unlinked from the b-tree
        self._db.execute("PRAGMA secure_delete=ON")
        self._db.executescript("""
            CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
            CREATE TABLE IF NOT EXISTS images (
                path TEXT PRIMARY KEY, format TEXT, uuid TEXT, parent_uuid TEXT,
                parent_path TEXT, device TEXT, added REAL, source TEXT);
            CREATE INDEX IF NOT EXISTS images_uuid ON images(uuid);
            CREATE TABLE IF NOT EXISTS properties (path TEXT, key TEXT, value TEXT,
                PRIMARY KEY (path, key));
            CREATE TABLE IF NOT EXISTS recent (path TEXT PRIMARY KEY, used REAL);
            CREATE TABLE IF NOT EXISTS secrets (path TEXT PRIMARY KEY, keys TEXT,
                remember INTEGER);
            CREATE TABLE IF NOT EXISTS health (path TEXT PRIMARY KEY, state TEXT, note TEXT,
                mtime_ns INTEGER, size INTEGER);
            CREATE TABLE IF NOT EXISTS filter_properties (path TEXT, filter TEXT, key TEXT,
                value TEXT, PRIMARY KEY (path, filter, key));
            CREATE TABLE IF NOT EXISTS caches (path TEXT PRIMARY KEY, cache TEXT, size INTEGER);
            CREATE TABLE IF NOT EXISTS cache_counts (cache TEXT PRIMARY KEY, hits INTEGER,
                misses INTEGER);
        """)
        # secrets (BYTES config values) that are not remembered live here, for this session only
        self._session_secrets: dict[str, dict[str, bytes]] = {}
        self._db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._db.close()

    def uuid_rows(self) -> list[tuple[str, str]]:
        """(path, uuid) of every known image with a UUID; none once the library is closed (a
        window's last scan result may arrive after that)."""
        with self._lock:
            if getattr(self, "_closed", False):
                return []
            return self._db.execute(
                "SELECT path, uuid FROM images WHERE uuid IS NOT NULL"
            ).fetchall()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- the list -------------------------------------------------------------------------
    def paths(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT path FROM images ORDER BY added, path")]

    def __contains__(self, path: str) -> bool:
        with self._lock:
            return (
                self._db.execute("SELECT 1 FROM images WHERE path=?", (_norm(path),)).fetchone()
                is not None
            )

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM images").fetchone()[0]

    def entry(self, path: str) -> dict | None:
        with self._lock:
            row = self._db.execute(
                "SELECT path, format, uuid, parent_uuid, parent_path, device, "
                "source FROM images WHERE path=?",
                (_norm(path),),
            ).fetchone()
        if row is None:
            return None
        return dict(
            zip(("path", "format", "uuid", "parent_uuid", "parent_path", "device", "source"), row)
        )

    def add(
        self,
        path: str,
        *,
        format: str | None = None,
        uuid: str | None = None,
        parent_uuid: str | None = None,
        device: str | None = None,
        source: str = "user",
    ) -> str:
        """Remember ``path`` (absolute). Known facts are kept when not given again."""
        path = _norm(path)
        with self._lock:
            old = self.entry(path)
            if old is None:
                self._db.execute(
                    "INSERT INTO images VALUES (?,?,?,?,?,?,?,?)",
                    (
                        path,
                        format,
                        uuid,
                        parent_uuid,
                        None,
                        device or _device_for_extension(path),
                        time.time(),
                        source,
                    ),
                )
            else:
                self._db.execute(
                    "UPDATE images SET format=coalesce(?,format), uuid=coalesce(?,uuid), "
                    "parent_uuid=coalesce(?,parent_uuid), device=coalesce(?,device) "
                    "WHERE path=?",
                    (format, uuid, parent_uuid, device, path),
                )
        return path

    def remember(self, rec: ImageRecord) -> None:
        """Store what a scan learnt (uuid, parent link) so later parent searches can use it."""
        with self._lock:
            row = self._db.execute(
                "SELECT format, uuid, parent_uuid, parent_path, device FROM images WHERE path=?",
                (rec.path,),
            ).fetchone()
            if row is None:
                self.add(rec.path)
            elif row == (rec.format or row[0], rec.uuid or row[1], rec.parent_uuid,
                         rec.parent_path, rec.device_type):
                return      # nothing new: no write (each one is a commit, synced to disk)
            self._db.execute(
                "UPDATE images SET format=coalesce(?,format), uuid=coalesce(?,uuid), "
                "parent_uuid=?, parent_path=?, device=? WHERE path=?",
                (rec.format, rec.uuid, rec.parent_uuid, rec.parent_path, rec.device_type, rec.path),
            )

    def set_health(self, path: str, state: str | None, note: str = "") -> None:
        """What a check found ("corrupt", "leaks" or None: clean), kept while the file stays as
        it was checked (same modification time and size); a later change makes it unknown."""
        path = _norm(path)
        with self._lock:
            self._db.execute("DELETE FROM health WHERE path=?", (path,))
            if state is None:
                return
            try:
                st = os.stat(path)
            except OSError:
                return
            self._db.execute(
                "INSERT INTO health VALUES (?,?,?,?,?)",
                (path, state, note, st.st_mtime_ns, st.st_size),
            )

    def health(self, path: str) -> tuple[str, str] | None:
        """(state, note) of the last check while the file is unchanged since; else None."""
        path = _norm(path)
        with self._lock:
            row = self._db.execute(
                "SELECT state, note, mtime_ns, size FROM health WHERE path=?", (path,)
            ).fetchone()
        if row is None:
            return None
        try:
            st = os.stat(path)
        except OSError:
            return None
        if (st.st_mtime_ns, st.st_size) != (row[2], row[3]):
            return None
        return row[0], row[1]

    def remove(self, path: str) -> None:
        path = _norm(path)
        with self._lock:
            self._db.execute("DELETE FROM images WHERE path=?", (path,))
            self._db.execute("DELETE FROM properties WHERE path=?", (path,))
            self._db.execute("DELETE FROM secrets WHERE path=?", (path,))
            self._db.execute("DELETE FROM health WHERE path=?", (path,))
            self._db.execute("DELETE FROM filter_properties WHERE path=?", (path,))
            self._session_secrets.pop(path, None)

    def rename(self, old: str, new: str) -> None:
        """An image moved: keep its entry (and properties) under the new path."""
        old, new = _norm(old), _norm(new)
        with self._lock:
            self._db.execute("DELETE FROM images WHERE path=?", (new,))
            self._db.execute("UPDATE images SET path=? WHERE path=?", (new, old))
            self._db.execute("UPDATE images SET parent_path=? WHERE parent_path=?", (new, old))
            self._db.execute("UPDATE OR REPLACE properties SET path=? WHERE path=?", (new, old))
            self._db.execute("UPDATE OR REPLACE recent SET path=? WHERE path=?", (new, old))
            self._db.execute("UPDATE OR REPLACE secrets SET path=? WHERE path=?", (new, old))
            self._db.execute("UPDATE OR REPLACE health SET path=? WHERE path=?", (new, old))
            self._db.execute("UPDATE OR REPLACE filter_properties SET path=? WHERE path=?",
                             (new, old))
            if old in self._session_secrets:
                self._session_secrets[new] = self._session_secrets.pop(old)

    def find_by_uuid(self, uuid) -> str | None:
        """The path of a known image with this UUID (used by chain.find_parent)."""
        text = str(uuid)
        with self._lock:
            rows = self._db.execute("SELECT path FROM images WHERE uuid=?", (text,)).fetchall()
        for (p,) in rows:
            if os.path.isfile(p):
                return p
        return rows[0][0] if rows else None

    def children_of(self, path: str) -> list[str]:
        with self._lock:
            return [
                r[0]
                for r in self._db.execute(
                    "SELECT path FROM images WHERE parent_path=?", (_norm(path),)
                )
            ]

    # -- backend properties (config keys that are kept, i.e. not CREATEONLY) --------------
    # Secrets are the values of BYTES-typed keys (e.g. iSCSI's InitiatorSecret). The database
    # keeps them (as BLOBs, unencrypted) only for images whose secrets the user chose to
    # remember; otherwise they stay in memory for this session and only their key names are
    # stored, so that opening the image in a later session can ask for them again.
    def properties(self, path: str) -> dict[str, str | bytes]:
        path = _norm(path)
        with self._lock:
            out = dict(
                self._db.execute(
                    "SELECT key, value FROM properties WHERE path=?", (path,)
                ).fetchall()
            )
            out.update(self._session_secrets.get(path, {}))
        return out

    def _secret_names(self, path: str, values: dict) -> set[str]:
        entry = self.entry(path)
        declared: set[str] = set()
        if entry and entry["format"]:
            from .config import ValueType
            from .registry import get_backend

            try:
                declared = {
                    k.name
                    for k in get_backend(entry["format"]).config_keys
                    if k.type is ValueType.BYTES
                }
            except VDError:
                pass
        return {k for k, v in values.items() if isinstance(v, bytes) or k in declared}

    def set_properties(
        self, path: str, values: dict, *, remember_secrets: bool | None = None
    ) -> None:
        """Store ``path``'s backend configuration. Secrets (BYTES values, or values of keys the
        image's backend declares BYTES) reach the database only when ``remember_secrets`` is
        True; when False they are kept in memory for this session. None keeps the choice made
        for this image before (remember, for an image that never had one)."""
        path = _norm(path)
        values = {
            k: v if isinstance(v, (str, bytes)) else str(v)
            for k, v in values.items()
            if v not in (None, "", b"")
        }
        with self._lock:
            row = self._db.execute("SELECT remember FROM secrets WHERE path=?", (path,)).fetchone()
            was_remembered = bool(row[0]) if row else False
            still_missing = set(self.missing_secrets(path))
            if remember_secrets is None:
                remember_secrets = bool(row[0]) if row else True
            names = self._secret_names(path, values)
            secrets = {
                k: v if isinstance(v, bytes) else v.encode()
                for k, v in values.items()
                if k in names
            }
            # a secret that was already missing (not remembered, new session) stays wanted
            # when the other settings are saved without it
            recorded = names | (still_missing - set(values))
            stored = {k: v for k, v in values.items() if k not in names or remember_secrets}
            self._db.execute("DELETE FROM properties WHERE path=?", (path,))
            # BYTES values stay bytes (a BLOB); everything else is stored as text
            self._db.executemany(
                "INSERT INTO properties VALUES (?,?,?)", [(path, k, v) for k, v in stored.items()]
            )
            self._db.execute(
                "INSERT OR REPLACE INTO secrets VALUES (?,?,?)",
                (path, ",".join(sorted(recorded)), int(remember_secrets)),
            )
            if was_remembered and not remember_secrets and self.path != ":memory:":
                # secrets stored before are forgotten: no old copy may stay in the WAL
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            if remember_secrets or not secrets:
                self._session_secrets.pop(path, None)
            else:
                self._session_secrets[path] = secrets

    # -- cache images (VDCacheOpen): a disk's VCI cache, attached whenever it is opened ---------
    def set_cache(self, path: str, cache: str | None, size: int | None = None) -> None:
        """Remember ``cache`` (created with ``size`` bytes at first use) for ``path``; None
        forgets it (the cache file stays)."""
        path = _norm(path)
        with self._lock:
            self._db.execute("DELETE FROM caches WHERE path=?", (path,))
            if cache:
                cache = os.path.abspath(cache)
                self._db.execute("INSERT INTO caches VALUES (?,?,?)", (path, cache, size))
                self._db.execute("DELETE FROM cache_counts WHERE cache=?", (cache,))

    def cache(self, path: str) -> tuple[str, int | None] | None:
        """(cache file, size to create it with) kept for ``path``, or None."""
        with self._lock:
            row = self._db.execute("SELECT cache, size FROM caches WHERE path=?",
                                   (_norm(path),)).fetchone()
        return (row[0], row[1]) if row else None

    def add_cache_counts(self, cache: str, hits: int, misses: int) -> None:
        """Add one session's hits and misses (DiskCache.read's counts) to ``cache``'s."""
        with self._lock:
            if getattr(self, "_closed", False):
                return
            self._db.execute(
                "INSERT INTO cache_counts VALUES (?,?,?) ON CONFLICT(cache) DO UPDATE SET "
                "hits=hits+excluded.hits, misses=misses+excluded.misses",
                (os.path.abspath(cache), hits, misses))

    def cache_counts(self, cache: str) -> tuple[int, int]:
        """(hits, misses) of ``cache`` in the opens through this library since it was
        attached."""
        with self._lock:
            row = self._db.execute("SELECT hits, misses FROM cache_counts WHERE cache=?",
                                   (os.path.abspath(cache),)).fetchone()
        return (row[0], row[1]) if row else (0, 0)

    # -- filter properties (e.g. CRYPT's KeyId and KeyStore: never a passphrase) ---------------
    def set_filter_properties(self, path: str, filter_name: str, values: dict[str, str]) -> None:
        """Keep a filter's configuration for ``path`` (replacing what was kept). Only text
        values: a secret (bytes) is refused, never stored."""
        if any(not isinstance(v, str) for v in values.values()):
            raise InvalidArgument(f"filter {filter_name}: only text properties are kept")
        path = _norm(path)
        with self._lock:
            self._db.execute("DELETE FROM filter_properties WHERE path=? AND filter=?",
                             (path, filter_name))
            self._db.executemany(
                "INSERT INTO filter_properties VALUES (?,?,?,?)",
                [(path, filter_name, k, v) for k, v in values.items()],
            )

    def filter_properties(self, path: str) -> dict[str, dict[str, str]]:
        """Filter name -> its kept configuration, for ``path``."""
        out: dict[str, dict[str, str]] = {}
        with self._lock:
            for f, k, v in self._db.execute(
                "SELECT filter, key, value FROM filter_properties WHERE path=?", (_norm(path),)
            ):
                out.setdefault(f, {})[k] = v
        return out

    def remembers_secrets(self, path: str) -> bool:
        """Whether ``path``'s secrets are stored in the database (False: this session only)."""
        with self._lock:
            row = self._db.execute(
                "SELECT remember FROM secrets WHERE path=?", (_norm(path),)
            ).fetchone()
        return bool(row[0]) if row else True

    def missing_secrets(self, path: str) -> list[str]:
        """Names of the secrets ``path`` was configured with that are not known now (they were
        not remembered and this is a new session): ask the user for them."""
        path = _norm(path)
        with self._lock:
            row = self._db.execute("SELECT keys FROM secrets WHERE path=?", (path,)).fetchone()
        if not row or not row[0]:
            return []
        have = self.properties(path)
        return [k for k in row[0].split(",") if k not in have]

    def set_secrets(self, path: str, secrets: dict, *, remember: bool = False) -> None:
        """Provide secrets (e.g. typed into a prompt) for an image already configured."""
        values = {k: v for k, v in self.properties(path).items()}
        values.update(secrets)
        self.set_properties(path, values, remember_secrets=remember)

    # -- recent files ---------------------------------------------------------------------
    def touch_recent(self, path: str, keep: int = 10) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO recent VALUES (?,?)", (_norm(path), time.time())
            )
            self._db.execute(
                "DELETE FROM recent WHERE path NOT IN (SELECT path FROM recent "
                "ORDER BY used DESC LIMIT ?)",
                (keep,),
            )

    def recent(self, limit: int = 10) -> list[str]:
        with self._lock:
            return [
                r[0]
                for r in self._db.execute(
                    "SELECT path FROM recent ORDER BY used DESC LIMIT ?", (limit,)
                )
            ]

    def clear_recent(self) -> None:
        with self._lock:
            self._db.execute("DELETE FROM recent")

    # -- reading images -------------------------------------------------------------------
    def scan(self, path: str, format: str | None = None) -> ImageRecord:
        """Read one image's metadata. Never raises for a bad image: ``error`` says why."""
        from .disk import Disk

        path = _norm(path)
        entry = self.entry(path)
        rec = ImageRecord(
            path=path,
            device_type=entry["device"]
            if entry and entry["device"]
            else _device_for_extension(path),
            scanned_at=time.time(),
        )
        if entry:
            rec.format = entry["format"]
            rec.uuid = entry["uuid"]
            rec.parent_uuid = entry["parent_uuid"]
        rec.files = [path]
        if is_network_location(path):
            return self._scan_network(rec, format or rec.format)
        if not os.path.lexists(path):
            rec.error, rec.error_code = f"{path}: file not found", ImageNotFound.code
            return rec
        if not os.path.exists(path):
            rec.error, rec.error_code = (
                f"{path}: broken link (points to {os.readlink(path)})",
                ImageNotFound.code,
            )
            return rec
        disk = Disk()
        try:
            # a known format is never probed again (a damaged VDI must not turn into RAW)
            img = disk.open(
                path, format or rec.format or None, OpenFlags.INFO | OpenFlags.READ_ONLY
            )
            info = disk.info(0)
            _take_info(rec, info, _FILE_INFO)
            rec.files = list(info["files"])
            rec.is_diff = img.is_diff
            rec.encryption = info.get("encryption")
            if img.is_diff:
                try:
                    ppath, _fmt = find_parent(img, library=self)
                    rec.parent_path = _norm(ppath)
                except VDError as exc:
                    rec.error, rec.error_code = exc.message, exc.code
        except VDError as exc:
            rec.error, rec.error_code = exc.message, exc.code
        except Exception as exc:  # a backend bug: keep the image listed, say so, keep the trace
            rec.error = f"{path}: internal error while reading the image: {exc!r}"
            rec.error_code = "BUG"
            rec.bug = traceback.format_exc()
        finally:
            disk.close()
        try:
            if rec.file_size is None:
                rec.file_size = os.stat(path).st_blocks * 512
        except OSError:
            pass
        h = self.health(path)
        if h is not None:
            rec.health, rec.health_note = h
        rec.held = next((w for w in (held_elsewhere(f) for f in (rec.files or [path])) if w), None)
        return rec

    def _scan_network(self, rec: ImageRecord, fmt: str | None) -> ImageRecord:
        """A non-file image: opened with its stored properties as the backend's config."""
        from .disk import Disk

        rec.files = []
        if not fmt:
            rec.error, rec.error_code = (
                (f"{rec.path}: the format of a network location must be known (none recorded)"),
                InvalidArgument.code,
            )
            return rec
        disk = Disk()
        try:
            disk.open(
                rec.path,
                fmt,
                OpenFlags.INFO | OpenFlags.READ_ONLY,
                self.properties(rec.path) or None,
            )
            _take_info(rec, disk.info(0), _NETWORK_INFO)
        except VDError as exc:
            rec.format = rec.format or fmt
            rec.error, rec.error_code = exc.message, exc.code
        except Exception as exc:  # a backend bug: keep the image listed, say so
            rec.format = rec.format or fmt
            rec.error = f"{rec.path}: internal error while opening the image: {exc!r}"
            rec.error_code = "BUG"
            rec.bug = traceback.format_exc()
        finally:
            disk.close()
        return rec

    def add_with_parents(
        self, path: str, format: str | None = None, source: str = "user"
    ) -> list[ImageRecord]:
        """Add ``path`` and every parent its chain names; return the scanned records (top first)."""
        out: list[ImageRecord] = []
        seen: set[str] = set()
        cur: str | None = _norm(path)
        fmt = format
        while cur and cur not in seen and len(out) < 256:
            seen.add(cur)
            self.add(cur, format=fmt, source=source)
            rec = self.scan(cur, fmt)
            self.remember(rec)
            out.append(rec)
            cur, fmt = rec.parent_path, None
        mark_duplicates(out, self)
        return out

    def scan_all(self, progress=None) -> list[ImageRecord]:
        """Re-read every known image (and keep what was learnt). ``progress(done, total)``."""
        paths = self.paths()
        out = []
        for i, p in enumerate(paths):
            if progress is not None and progress(i, len(paths)) is False:
                from .errors import Cancelled

                raise Cancelled()
            rec = self.scan(p)
            self.remember(rec)
            out.append(rec)
            if rec.parent_path and rec.parent_path not in self:
                for r in self.add_with_parents(rec.parent_path, source="parent"):
                    if r.path not in paths:
                        out.append(r)
                        paths.append(r.path)
        if progress is not None:
            progress(len(paths), len(paths))
        mark_duplicates(out, self)
        return out

    # -- VirtualBox media registry ----------------------------------------------------------
    def import_virtualbox(self, xml_path: str) -> list[str]:
        """Add the images of a VirtualBox.xml / .vbox media registry; returns their paths."""
        found = read_virtualbox_registry(xml_path)
        out = []
        for m in found:
            out.append(
                self.add(
                    m["path"],
                    format=m["format"],
                    uuid=m["uuid"],
                    parent_uuid=m["parent_uuid"],
                    device=m["device"],
                    source="virtualbox",
                )
            )
            # VirtualBox's disk encryption: CRYPT/KeyId and CRYPT/KeyStore (not secrets)
            crypt = {k.split("/", 1)[1]: v for k, v in m["properties"].items()
                     if k.startswith("CRYPT/")}
            if "KeyStore" in crypt:
                self.set_filter_properties(out[-1], "CRYPT", crypt)
        return out


_VBOX_KINDS = {
    "HardDisks": DeviceType.HARD_DISK,
    "DVDImages": DeviceType.OPTICAL,
    "FloppyImages": DeviceType.FLOPPY,
}


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _vbox_uuid(text: str | None) -> str | None:
    if not text:
        return None
    try:
        return str(uuidlib.UUID(text.strip().strip("{}")))
    except ValueError:
        return None


def read_virtualbox_registry(xml_path: str) -> list[dict]:
    """Parse the ``<MediaRegistry>`` of a VirtualBox settings file.

    Returns dicts with path (absolute; relative locations are taken from the XML's folder),
    format, uuid, parent_uuid, device ('hdd', 'optical', 'floppy') and properties (the
    medium's ``<Property>`` name -> value, e.g. CRYPT/KeyStore), parents before children.
    Non-file media (e.g. iSCSI, whose location is not a path) are skipped.
    """
    try:
        tree = ET.parse(xml_path)
    except FileNotFoundError:
        raise ImageNotFound(f"{xml_path}: file not found") from None
    except OSError as exc:
        raise ImageNotFound(f"{xml_path}: cannot read: {exc.strerror or exc}") from None
    except ET.ParseError as exc:
        raise InvalidArgument(f"{xml_path}: not a VirtualBox settings file: {exc}") from None
    base = os.path.dirname(os.path.abspath(xml_path))
    out: list[dict] = []

    def walk(elem, device: DeviceType, parent_uuid: str | None):
        for child in elem:
            if _local(child.tag) not in ("HardDisk", "Image"):
                continue
            loc = child.get("location") or ""
            fmt = child.get("format")
            uid = _vbox_uuid(child.get("uuid"))
            if loc and (fmt or "").lower() != "iscsi" and not is_network_location(loc):
                loc = loc.replace("\\", "/") if os.sep == "/" and ":" not in loc[:2] else loc
                path = os.path.normpath(os.path.join(base, os.path.expanduser(loc)))
                out.append(
                    {
                        "path": path,
                        "format": fmt,
                        "uuid": uid,
                        "parent_uuid": parent_uuid,
                        "device": device.value,
                        "properties": {
                            p.get("name") or "": p.get("value") or ""
                            for p in child
                            if _local(p.tag) == "Property" and p.get("name")
                        },
                    }
                )
            walk(child, device, uid)

    root = tree.getroot()
    for reg in root.iter():
        if _local(reg.tag) != "MediaRegistry":
            continue
        for kind in reg:
            device = _VBOX_KINDS.get(_local(kind.tag))
            if device is not None:
                walk(kind, device, None)
    if _local(root.tag) != "VirtualBox":
        raise InvalidArgument(
            f"{xml_path}: not a VirtualBox settings file (root element <{_local(root.tag)}>)"
        )
    return out


__all__ = [
    "ENV_DATA_DIR",
    "ImageRecord",
    "Library",
    "data_dir",
    "is_network_location",
    "read_virtualbox_registry",
]
