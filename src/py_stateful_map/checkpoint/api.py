"""Resumable runs: ``map(items, checkpoint=...)`` keeps every result in a file as it arrives.

A crash at hour five then costs minutes: rerunning the same map with the same checkpoint
sends only the unfinished items to the workers, and the finished ones come back from the file
at their place. Results are committed before the caller sees them (durable before visible),
by the parent process alone, so the worker count, devices and backend may change between runs.

>>> import tempfile, os
>>> path = os.path.join(tempfile.mkdtemp(), "squares.sqlite")
>>> with Checkpoint(path).open_run(worker=pow) as run:
...     run.record(range(3), [0, 1, 2], [0, 1, 4])
>>> list(Checkpoint(path).results())
[(0, 0), (1, 1), (2, 4)]
>>> Checkpoint(path).status()
CheckpointStatus(done=3, failed=0, pending=None)
>>> import shutil; shutil.rmtree(os.path.dirname(path))

What makes a resume safe:

- each reused item is checked against a fingerprint of its input: a changed item raises
  :class:`CheckpointMismatchError` naming it (``verify_inputs=False`` skips the check);
- the manifest (worker class, a digest of each init kwarg, ``run_id``, library major version)
  refuses a different job, naming what differs, unless ``force=True``;
- failed items are kept with their traceback; a resumed run hands them back as failures
  again (their own exception type, or :class:`~py_stateful_map.errors.CheckpointedError`
  when it cannot be rebuilt), or re-runs them with ``retry_failed=True``;
- one run at a time writes a checkpoint; a second gets a clear :class:`CheckpointError`. A
  file that is not a checkpoint, is damaged, or cannot be written fails before any item runs;
- reading a file runs no code it names: common results are stored as plain data, and a
  pickle (any other result, an exception) is loaded only if the user reading it signed it
  (see *Trust* in :class:`Checkpoint`).

The file is an SQLite database (WAL mode) that any SQLite tool can read; the layout is in
``checkpoint.file``, how a run reads and writes it in ``checkpoint.run``.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from py_stateful_map import __version__
from py_stateful_map.errors import CheckpointError, CheckpointMismatchError

from .codec import kwargs_digests, qualified_name
from .file import (
    FORMAT,
    RunLock,
    check_directory,
    connect,
    create_schema,
    damaged,
    describe,
    differences,
    dump_json,
    mismatch,
    read_manifest,
    timestamp,
    write_manifest,
)
from .run import CheckpointRun, Stored, ToRun, read_values

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "CheckpointMismatchError",
    "CheckpointRun",
    "CheckpointStatus",
    "Stored",
    "ToRun",
    "as_checkpoint",
]

logger = logging.getLogger("py_stateful_map")
#: Custom keys have no position order: any stored row may match any window.
_ANYWHERE = 2**63


class CheckpointStatus(NamedTuple):
    """Item counts of a checkpoint; ``pending`` is known when the last run's input had a length."""

    done: int
    failed: int
    pending: int | None


class Checkpoint:
    """A file that keeps a map's results so that rerunning the map resumes it.

    Args:
        path: the database file (created on first use; its directory must exist).
        key: ``key(item)`` identifies an item across runs (an int, str or bytes, unique per
            item: a second item with a key already given is a ``ValueError``, before it runs)
            instead of its position in the input: for inputs that are reordered or filtered
            between runs. Positions are faster: a stored row then holds many items.
        run_id: any label of the job (``str``); a checkpoint written under another one is
            refused, like a different worker class or init kwarg.
        force: resume even when the job differs from the manifest's (the manifest is then
            updated); changed *inputs* are still refused.
        retry_failed: re-run the items that failed before; otherwise they come back as the
            same failures without running.
        verify_inputs: check each reused item against the fingerprint of the input it had.
        fsync: make each commit wait for the disk, so results also survive a power failure;
            without it they survive any crash of the process (SIGKILL, the OOM killer).
        trusted: load every pickle the file holds, signed by this user or not (see Trust).

    Trust: common results (None, bool, int, float, str, bytes, lists, tuples and dicts of
    them, numpy arrays and scalars, CPU torch tensors) are stored as data, which runs no code
    when read. Other results and failed items' exceptions are pickles, signed (HMAC-SHA256)
    with a secret of the user who wrote them, made on first use at
    ``~/.local/share/py_stateful_map/checkpoint_secret`` (``$XDG_DATA_HOME``, or the file
    named by ``$PSM_CHECKPOINT_SECRET_FILE``). Since unpickling can run any code, a pickle
    signed by anyone else or not at all (a file of another user or machine, or altered) is
    refused with a :class:`CheckpointError` naming the item, before it is unpickled; a stored
    exception then comes back as a ``CheckpointedError`` with its text. A file of format 1,
    written before signatures, is refused as a whole. Pass ``trusted=True`` only for a file
    you know, such as your own from another machine.

    A plain path works wherever a ``Checkpoint`` is accepted (:func:`as_checkpoint`).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        key: Callable[[Any], Any] | None = None,
        run_id: str | None = None,
        *,
        force: bool = False,
        retry_failed: bool = False,
        verify_inputs: bool = True,
        fsync: bool = False,
        trusted: bool = False,
    ) -> None:
        if key is not None and not callable(key):
            raise TypeError(f"key must be a callable (item -> int | str | bytes), got {key!r}")
        self.path = Path(path).absolute()
        self.key = key
        self.run_id = run_id
        self.force = force
        self.retry_failed = retry_failed
        self.verify_inputs = verify_inputs
        self.fsync = fsync
        self.trusted = trusted

    def __repr__(self) -> str:
        options = "".join(
            f", {name}={value!r}"
            for name, value in (("key", self.key), ("run_id", self.run_id))
            if value is not None
        )
        if self.trusted:
            options += ", trusted=True"
        return f"Checkpoint({str(self.path)!r}{options})"

    # -- writing (the map loop) -----------------------------------------------------------

    def open_run(
        self,
        *,
        worker: Any,
        init_kwargs: Mapping[str, Any] | None = None,
        length: int | None = None,
    ) -> CheckpointRun:
        """Lock the file, check it and the job against its manifest, and start a run.

        ``worker`` is the worker class or function and ``init_kwargs`` the kwargs every worker
        shares: per-worker kwargs (devices) are left out on purpose, so that a run may resume
        on other devices. ``length`` is the input's, when it has one (for ``status()``).
        """
        path = str(self.path)
        check_directory(path)
        lock = RunLock(path)
        lock.acquire()
        try:
            conn, new = connect(path, readonly=False, trusted=self.trusted)
            try:
                return self._start(conn, lock, new, worker, init_kwargs, length)
            except BaseException:
                conn.close()
                raise
        except BaseException:
            lock.release()
            raise

    def _start(
        self,
        conn: sqlite3.Connection,
        lock: RunLock,
        new: bool,
        worker: Any,
        init_kwargs: Mapping[str, Any] | None,
        length: int | None,
    ) -> CheckpointRun:
        path = str(self.path)
        current: dict[str, str | None] = {
            "library_version": __version__,
            "worker": qualified_name(worker),
            "init_kwargs": dump_json(kwargs_digests(init_kwargs)),
            "run_id": None if self.run_id is None else str(self.run_id),
            "key": "position" if self.key is None else "custom",
            "key_function": None if self.key is None else qualified_name(self.key),
            "length": None if length is None else str(length),
            "updated": timestamp(),
        }
        conn.execute(f"PRAGMA synchronous={'FULL' if self.fsync else 'NORMAL'}")
        try:
            conn.execute("BEGIN IMMEDIATE")
            if new:
                create_schema(conn, positional=self.key is None)
                current["created"] = timestamp()
                current["format"] = str(FORMAT)  # an existing file keeps its own (1 stays 1)
            else:
                self._check_job(read_manifest(conn), current)
            write_manifest(conn, current)
            stored_end = self._stored_end(conn)
            conn.execute("COMMIT")
        except sqlite3.DatabaseError as exc:
            raise damaged(path, exc) from exc
        finally:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
        return CheckpointRun(
            conn,
            lock,
            path,
            key=self.key,
            retry_failed=self.retry_failed,
            verify_inputs=self.verify_inputs,
            stored_end=stored_end,
            trusted=self.trusted,
        )

    def _check_job(self, stored: Mapping[str, str], current: Mapping[str, str | None]) -> None:
        path = str(self.path)
        if stored.get("key") != current["key"]:
            kinds = {"position": "input positions", "custom": "key=... (a key function)"}
            raise CheckpointMismatchError(
                f"{describe(path)} identifies items by {kinds.get(stored.get('key', ''), '?')}, "
                f"this run by {kinds[str(current['key'])]}; a checkpoint keeps one kind of "
                "key for good. Give this job another path.",
                path,
                differences=("key",),
            )
        found = differences(stored, {k: v for k, v in current.items() if v is not None})
        if not found:
            return
        if not self.force:
            raise mismatch(path, found)
        logger.warning("resuming %s despite (force=True): %s", describe(path), "; ".join(found))

    def _stored_end(self, conn: sqlite3.Connection) -> int:
        if self.key is not None:
            return _ANYWHERE if conn.execute("SELECT 1 FROM results LIMIT 1").fetchone() else 0
        last = conn.execute("SELECT key + n FROM results ORDER BY key DESC LIMIT 1").fetchone()
        return 0 if last is None else int(last[0])

    # -- reading back ---------------------------------------------------------------------

    def results(self) -> Iterator[tuple[Any, Any]]:
        """``(key, value)`` of every finished item, in key order (position by default).

        Streams: memory stays constant however large the file. Failed items are left out
        (see :meth:`failures`). Readable while a run writes the file (it sees what that run
        committed when iteration started).
        """
        conn, custom = self._reader(values=True)
        rows = conn.execute("SELECT key, n, value FROM results WHERE status = 'done' ORDER BY key")
        return self._stream(conn, rows, custom)

    def _stream(
        self, conn: sqlite3.Connection, rows: sqlite3.Cursor, custom: bool
    ) -> Iterator[tuple[Any, Any]]:
        try:
            for key, n, blob in rows:
                values = read_values(str(self.path), key, n, blob, trusted=self.trusted)
                if custom:
                    yield key, values[0]
                else:
                    yield from zip(range(key, key + n), values, strict=True)
        except sqlite3.DatabaseError as exc:
            raise damaged(str(self.path), exc) from exc
        finally:
            conn.close()

    def failures(self) -> Iterator[tuple[Any, str]]:
        """``(key, traceback text)`` of every item whose last run failed, in key order."""
        conn, _ = self._reader(values=False)
        try:
            yield from conn.execute(
                "SELECT key, error FROM results WHERE status = 'failed' ORDER BY key"
            )
        finally:
            conn.close()

    def status(self) -> CheckpointStatus:
        """How many items are done, failed, and (when the input length is known) pending."""
        conn, _ = self._reader(values=False)
        try:
            counts = dict(conn.execute("SELECT status, sum(n) FROM results GROUP BY status"))
            length = read_manifest(conn).get("length")
        except sqlite3.DatabaseError as exc:
            raise damaged(str(self.path), exc) from exc
        finally:
            conn.close()
        done, failed = int(counts.get("done", 0)), int(counts.get("failed", 0))
        pending = None if length is None else max(int(length) - done - failed, 0)
        return CheckpointStatus(done, failed, pending)

    def _reader(self, *, values: bool) -> tuple[sqlite3.Connection, bool]:
        """A read-only connection; ``values=False``: the caller reads no stored values, so
        the file's format does not matter to trust."""
        conn, _ = connect(str(self.path), readonly=True, trusted=self.trusted or not values)
        try:
            custom = read_manifest(conn).get("key") == "custom"
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise damaged(str(self.path), exc) from exc
        return conn, custom

    def to_parquet(self, path: str | os.PathLike[str], *, rows_per_group: int = 65536) -> int:
        """Write the finished results to a Parquet file with columns ``key`` and ``value``.

        Equal-shaped arrays (numpy, or CPU torch tensors) become a fixed-size list column of
        their flattened elements, with the shape in the column's metadata: an embedding
        matrix loads back as ``np.stack`` of the rows. Needs ``pyarrow``
        (``pip install 'py_stateful_map[parquet]'``). Returns the number of rows written.
        """
        from .parquet import write_parquet

        return write_parquet(self.results(), os.fspath(path), rows_per_group)


def as_checkpoint(obj: Checkpoint | str | os.PathLike[str] | None) -> Checkpoint | None:
    """A ``Checkpoint`` for what ``map(checkpoint=...)`` accepts: one, a path, or None.

    >>> as_checkpoint("run.sqlite").path.name
    'run.sqlite'
    >>> as_checkpoint(None) is None
    True
    """
    if obj is None or isinstance(obj, Checkpoint):
        return obj
    if isinstance(obj, (str, os.PathLike)):
        return Checkpoint(obj)
    raise TypeError(f"checkpoint must be a Checkpoint, a path or None, got {obj!r}")
