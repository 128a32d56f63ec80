"""The checkpoint file: layout, the run lock, opening with checks, and the manifest.

Layout: one SQLite database in WAL mode, marked as ours by ``PRAGMA application_id``, its
format version in ``PRAGMA user_version``::

    manifest(name TEXT PRIMARY KEY, value TEXT)
        format, library_version, worker, init_kwargs (JSON: kwarg name -> digest), run_id,
        key ("position" | "custom"), length (of the last run's input, when it had one)
    results(key PRIMARY KEY, n, status, inputs, value, error)
        position keys: a row holds ``n`` consecutive items from input position ``key``
        custom keys (``key=callable``): a row holds one item; ``key`` is int, str or bytes
        status 'done':   value = the row's values (``checkpoint.codec``: in a format that runs
                         no code when read, or a pickle signed by the user who wrote it)
        status 'failed': n = 1; value = the exception's type name, args and text, and its
                         signed pickle if it can be rebuilt; error = the worker's traceback text
        inputs: 8 bytes per item (``checkpoint.codec.fingerprints``), or NULL when not kept

One run at a time writes a checkpoint: ``flock`` on a sidecar ``<file>-lock`` that the holder
removes when it is done. SQLite's own locks cannot say this: in WAL mode a second writer
simply waits for the first one's transaction, and two runs interleaving their rows would
each believe the other's items were its own. ``flock`` (not ``fcntl`` record locks) because
closing any descriptor of a file drops *all* of a process's record locks on it, SQLite's
included; and the lock file, not the database, for the same reason. The kernel drops the lock
when its holder dies, so a killed run never leaves the checkpoint locked.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
import threading
import time
import urllib.parse
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from py_stateful_map.errors import CheckpointError, CheckpointMismatchError

FORMAT = 2
#: Format 1 stored every value as a bare pickle: it is read only with ``trusted=True`` (and
#: stays format 1 when a trusted run adds to it), since nothing shows who wrote its pickles.
UNSIGNED_FORMAT = 1
APPLICATION_ID = 0x50534D43  # "PSMC"
#: Larger than SQLite's 4 KiB: a row is a segment of many results (or an embedding matrix),
#: and a WAL frame per page is one write() on every commit.
PAGE_SIZE = 16384
_SQLITE_MAGIC = b"SQLite format 3\x00"
_TABLES = {"manifest", "results"}
#: Files up to this size get a full ``PRAGMA quick_check`` on open (0.04 s for 236 MB from
#: the page cache, ~0.5 s from disk); larger ones are checked by reading their first and last
#: rows, and damage found later still fails the run with the file and items named (a full
#: check of a 20 GB embedding store would take minutes).
QUICK_CHECK_LIMIT = 256 * 1024 * 1024


def describe(path: str) -> str:
    return f"checkpoint {path}"


def check_directory(path: str) -> None:
    """Fail clearly, before anything runs, when the file cannot be created next to ``path``."""
    directory = Path(path).parent
    if not directory.is_dir():
        raise CheckpointError(
            f"cannot use {describe(path)}: its directory {directory} does not exist; "
            "create it first",
            path,
        )
    if Path(path).is_dir():
        raise CheckpointError(f"cannot use {describe(path)}: it is a directory", path)


# -- the run lock ---------------------------------------------------------------------------

_HELD: weakref.WeakSet[RunLock] = weakref.WeakSet()


class RunLock:
    """An exclusive ``flock`` on ``<path>-lock``: at most one run writes a checkpoint."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.lock_path = path + "-lock"
        self.fd = -1

    def acquire(self) -> None:
        for _ in range(20):  # the previous holder may remove the file between open and flock
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _read_owner(fd)
                os.close(fd)
                raise CheckpointError(_in_use_message(self.path, owner), self.path) from None
            if _same_file(fd, self.lock_path):
                os.ftruncate(fd, 0)
                os.write(fd, str(os.getpid()).encode())
                self.fd = fd
                _HELD.add(self)
                return
            os.close(fd)
        raise CheckpointError(f"could not lock {describe(self.path)}: its lock file keeps changing")

    def _open(self) -> int:
        try:
            return os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise CheckpointError(
                f"cannot write {describe(self.path)}: {exc.strerror} creating {self.lock_path} "
                "(is the directory read-only?)",
                self.path,
            ) from exc

    def release(self) -> None:
        if self.fd < 0:
            return
        with contextlib.suppress(OSError):  # remove it while still holding it: see acquire()
            Path(self.lock_path).unlink()
        os.close(self.fd)
        self.fd = -1
        _HELD.discard(self)


def _forget_in_child() -> None:
    """A forked child drops its copy of the lock descriptor (never unlocks: that is shared).

    Otherwise a worker forked while a run holds the lock would keep the checkpoint locked
    after the parent died.
    """
    for lock in list(_HELD):
        with contextlib.suppress(OSError):
            os.close(lock.fd)
        lock.fd = -1
    _HELD.clear()


os.register_at_fork(after_in_child=_forget_in_child)


def _read_owner(fd: int) -> str:
    try:
        return os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return ""


def _in_use_message(path: str, owner: str) -> str:
    if owner == str(os.getpid()):
        who = "another run in this process (a map() not yet finished or closed)"
    elif owner:
        who = f"another run (process {owner})"
    else:
        who = "another run"
    return (
        f"{describe(path)} is in use by {who}; one run at a time can write a checkpoint. "
        "Wait for it to finish, or give this run another path."
    )


def _same_file(fd: int, path: str) -> bool:
    try:
        now = Path(path).stat()
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino)


# -- opening --------------------------------------------------------------------------------


def connect(path: str, *, readonly: bool, trusted: bool) -> tuple[sqlite3.Connection, bool]:
    """Open and check the file; also say whether it is new (no schema yet: see create_schema).

    ``trusted``: the caller may load any pickle the file holds (or reads no values at all).
    """
    if readonly and not Path(path).exists():
        raise CheckpointError(f"{describe(path)} does not exist", path)
    _check_header(path)
    try:
        if readonly:
            conn = _reader(path)
        else:
            conn = sqlite3.connect(
                path, isolation_level=None, check_same_thread=False, timeout=30.0
            )
    except sqlite3.Error as exc:
        raise CheckpointError(f"cannot open {describe(path)}: {exc}", path) from exc
    try:
        return conn, _prepare(conn, path, readonly=readonly, trusted=trusted)
    except BaseException:
        conn.close()
        raise


def _reader(path: str) -> sqlite3.Connection:
    """A read-only connection; in a read-only directory, one that needs no ``-shm`` file.

    A WAL database is read through its shared-memory index, which SQLite cannot create
    where it may not write; ``immutable`` reads the file alone (a run that writes it
    cannot be going on in such a directory: it could not have created its log there).
    """
    uri = f"file:{urllib.parse.quote(path)}?mode=ro"
    conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
    try:
        conn.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
    except sqlite3.OperationalError:
        conn.close()
        uri += "&immutable=1"
        conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
    return conn


def _check_header(path: str) -> None:
    try:
        with Path(path).open("rb") as file:
            header = file.read(100)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise CheckpointError(f"cannot read {describe(path)}: {exc}", path) from exc
    if header and not header.startswith(_SQLITE_MAGIC):
        raise CheckpointError(
            f"{path} is not a checkpoint: not an SQLite database (it starts with "
            f"{header[:16]!r}). Give the checkpoint another path.",
            path,
        )
    if header and len(header) < 100:
        raise CheckpointError(
            f"{describe(path)} is damaged: truncated to {len(header)} bytes", path
        )


def _prepare(conn: sqlite3.Connection, path: str, *, readonly: bool, trusted: bool) -> bool:
    try:
        tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master")}
        application_id = conn.execute("PRAGMA application_id").fetchone()[0]
        if not tables and application_id == 0:
            if readonly:
                raise CheckpointError(f"{describe(path)} is empty: no run has written it", path)
            conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")  # before anything is written
            _writable(conn, path)
            return True
        if application_id != APPLICATION_ID or not tables >= _TABLES:
            listed = ", ".join(sorted(t for t in tables if not t.startswith("sqlite_")))
            raise CheckpointError(
                f"{path} is not a checkpoint: an SQLite database of another program "
                f"(tables: {listed or 'none'}). Give the checkpoint another path.",
                path,
            )
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version == UNSIGNED_FORMAT and not trusted:
            raise CheckpointError(
                f"{describe(path)} has format {version}, written by an earlier version of "
                "py_stateful_map: its results are pickles without a signature, and loading a "
                "pickle runs whatever code it names. If you wrote this file, read it with "
                "Checkpoint(path, trusted=True); otherwise move it away to start over.",
                path,
            )
        if version not in (FORMAT, UNSIGNED_FORMAT):
            raise CheckpointError(
                f"{describe(path)} has format {version}; this version of py_stateful_map "
                f"reads format {FORMAT}",
                path,
            )
        _check_pages(conn, path)
        if not readonly:
            _writable(conn, path)
    except sqlite3.DatabaseError as exc:
        raise damaged(path, exc) from exc
    return False


def create_schema(conn: sqlite3.Connection, *, positional: bool) -> None:
    """The tables and marks of a new checkpoint; inside the caller's first transaction."""
    key = "key INTEGER PRIMARY KEY" if positional else "key NOT NULL PRIMARY KEY"
    conn.execute("CREATE TABLE manifest (name TEXT PRIMARY KEY, value TEXT) WITHOUT ROWID")
    conn.execute(
        f"CREATE TABLE results ({key}, n INTEGER NOT NULL, status TEXT NOT NULL, "
        "inputs BLOB, value BLOB, error TEXT)"
    )
    conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    conn.execute(f"PRAGMA user_version = {FORMAT}")


def _check_pages(conn: sqlite3.Connection, path: str) -> None:
    """Find damage before any item runs: all of a small file, both ends of a large one."""
    if Path(path).stat().st_size <= QUICK_CHECK_LIMIT:
        problems = [row[0] for row in conn.execute("PRAGMA quick_check(3)")]
        if problems != ["ok"]:
            raise CheckpointError(f"{describe(path)} is damaged: {'; '.join(problems)}", path)
        return
    for order in ("ASC", "DESC"):
        conn.execute(f"SELECT * FROM results ORDER BY key {order} LIMIT 1").fetchall()


def _writable(conn: sqlite3.Connection, path: str) -> None:
    """Write once (rolled back): SQLite opens a read-only file quietly, and even takes its
    write lock; only a page write reports it."""
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("BEGIN IMMEDIATE")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        conn.execute(f"PRAGMA user_version = {int(version)}")
    except sqlite3.OperationalError as exc:
        raise damaged(path, exc) from exc
    finally:
        if conn.in_transaction:
            conn.execute("ROLLBACK")


def damaged(path: str, exc: BaseException) -> CheckpointError:
    """The error for a failed SQLite call, in the words of its likely cause."""
    text = str(exc)
    if "readonly" in text or "read-only" in text:
        reason = "the file or its directory is read-only"
    elif "full" in text:
        reason = "the disk is full"
    elif "locked" in text or "busy" in text:
        reason = "another program holds a lock on it"
    else:
        return CheckpointError(
            f"{describe(path)} is damaged or unreadable ({text}); move it away to start over",
            path,
        )
    return CheckpointError(f"cannot write {describe(path)}: {reason} ({text})", path)


class WalCopier:
    """Copies the write-ahead log into the database on a thread of its own.

    SQLite's automatic checkpoint runs inside the commit that crosses its threshold and
    ends with an ``fsync`` of the database: a stall of the map loop of up to a second on a
    slow disk, every few MB. Here the writer turns it off and pokes this thread instead,
    whose PASSIVE checkpoint runs beside the writer's commits (SQLite drops the GIL while it
    works). The thread starts on the first poke: a small run never starts it.
    """

    #: Bytes written between two checkpoints.
    EVERY = 16 * 1024 * 1024

    def __init__(self, path: str) -> None:
        self.path = path
        self.written = 0
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()
        self._stopping = False
        self.error: BaseException | None = None

    def wrote(self, size: int) -> None:
        self.written += size
        if self.written < self.EVERY:
            return
        self.written = 0
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name="py_stateful_map-checkpoint-wal", daemon=True
            )
            self._thread.start()
        self._wake.set()

    def _run(self) -> None:
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            self.error = exc
            return
        try:
            while True:
                self._wake.wait()
                self._wake.clear()
                if self._stopping:
                    return
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.Error as exc:  # the writer's close checkpoints anyway
            self.error = exc
        finally:
            conn.close()

    def stop(self) -> None:
        if self._thread is not None:
            self._stopping = True
            self._wake.set()
            self._thread.join()
            self._thread = None


# -- manifest -------------------------------------------------------------------------------


def read_manifest(conn: sqlite3.Connection) -> dict[str, str]:
    return dict(conn.execute("SELECT name, value FROM manifest").fetchall())


def write_manifest(conn: sqlite3.Connection, fields: Mapping[str, str | None]) -> None:
    conn.executemany(
        "INSERT OR REPLACE INTO manifest VALUES (?, ?)",
        [(name, value) for name, value in fields.items() if value is not None],
    )
    stale = [name for name, value in fields.items() if value is None]
    conn.executemany("DELETE FROM manifest WHERE name = ?", [(name,) for name in stale])


def differences(stored: Mapping[str, str], current: Mapping[str, str]) -> list[str]:
    """What makes ``current`` a different job than the one that wrote ``stored``, in words."""
    found: list[str] = []
    if stored.get("worker") != current["worker"]:
        found.append(
            f"worker: {stored.get('worker')!r} in the checkpoint, now {current['worker']!r}"
        )
    old = json.loads(stored.get("init_kwargs", "{}"))
    new = json.loads(current["init_kwargs"])
    for name in sorted(set(old) | set(new)):
        if name not in new:
            found.append(f"init kwarg {name!r}: in the checkpoint, not given now")
        elif name not in old:
            found.append(f"init kwarg {name!r}: given now, not in the checkpoint")
        elif old[name] != new[name]:
            found.append(f"init kwarg {name!r}: a different value")
    if stored.get("run_id") != current.get("run_id"):
        found.append(
            f"run_id: {stored.get('run_id')!r} in the checkpoint, now {current.get('run_id')!r}"
        )
    old_major = stored.get("library_version", "").split(".")[0]
    if old_major != current["library_version"].split(".")[0]:
        found.append(
            f"library version: written by py_stateful_map {stored.get('library_version')}, "
            f"this is {current['library_version']}"
        )
    return found


def mismatch(path: str, found: list[str]) -> CheckpointMismatchError:
    listed = "".join(f"\n  - {line}" for line in found)
    return CheckpointMismatchError(
        f"{describe(path)} was written by a different job:{listed}\n"
        "Resume anyway with Checkpoint(..., force=True), or give this job another path.",
        path,
        differences=tuple(found),
    )


def timestamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def dump_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True)
