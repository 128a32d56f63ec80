"""One map's use of a checkpoint: which items are already done, and recording the rest.

The map loop drives a :class:`CheckpointRun` (all in the parent, which alone writes)::

    open_run()  lock, check file and manifest
        │
        ▼
    plan(start, items) ──▶ Stored spans ─────────────────────────────▶ caller, at their place
        │ (per read window)   (values or replayed errors; inputs checked)
        └──────────────────▶ ToRun spans ──▶ workers ──▶ completion
                                                              │ record(): buffered
    caller ◀──── results ◀──── flush(): one transaction ◀─────┘
        (nothing is yielded before the flush that covers it: durable before visible)
    close(): flush, release the lock

Memory stays O(read window), whatever the number of stored items: ``plan`` reads only the
rows that overlap the window it is given (an index range scan, one query), and nothing is
kept per finished item. With position keys a row holds a whole *segment* of consecutive
items (one per completion, merged with its neighbours at flush, at most ``MAX_SEGMENT``), so
a million tiny results are a few hundred rows; the last row read stays decoded, for the next
window it overlaps. Windows past the end of what the file held when the run opened cost
nothing (``stored_end``): a fresh run never queries.

Invariants the loop keeps: each position is recorded at most once per run, never one that
``plan`` returned as stored; ``plan`` is called for increasing positions.

With ``key=...`` a row holds one item, found by its key: two items of one run with the same key
would both run, one result would replace the other, and a resume would hand that result to
both. ``plan`` refuses the second such item before it runs (a ``ValueError`` naming the key
and both positions). The keys a run has planned are kept in a temporary table of its SQLite
connection, not in a Python set, so memory stays O(read window) there too.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from py_stateful_map.errors import CheckpointError, CheckpointMismatchError, SerializationError
from py_stateful_map.wire.messages import ItemError

from .codec import (
    FINGERPRINT_SIZE,
    NotTrusted,
    decode_error,
    decode_values,
    encode_error,
    encode_values,
    fingerprints,
)
from .file import RunLock, WalCopier, damaged, describe

#: Items per row at most: a resumed window decodes whole rows.
MAX_SEGMENT = 4096
#: A flush happens before anything is yielded; also after this many buffered items or seconds,
#: so that results held back (behind a slow item, in ordered mode) are not lost to a crash.
AUTO_FLUSH_ITEMS = 16384
AUTO_FLUSH_SECONDS = 2.0
_IN_BATCH = 500  # keys per "IN (...)" query (SQLite allows 32766 parameters)
_INSERT = "INSERT OR REPLACE INTO results VALUES (?, ?, ?, ?, ?, ?)"
_KEY_TYPES = frozenset({int, str, bytes})
#: The keys this run planned, and where (custom keys only; see the module docstring).
_SEEN_TABLE = "CREATE TEMP TABLE planned_keys (key NOT NULL PRIMARY KEY, position INTEGER)"


@dataclass(frozen=True, slots=True)
class Stored:
    """Items finished in an earlier run: hand them to the caller, send nothing to workers.

    ``values`` has one entry per item (None where it failed); ``errors`` lists the failed
    items as ``(offset in this span, exception, traceback text)``, like a completion's.
    """

    start: int
    values: list[Any]
    errors: list[ItemError] | None


@dataclass(frozen=True, slots=True)
class ToRun:
    """Items to send to the workers (new, or failed before and ``retry_failed``)."""

    start: int
    items: list[Any]


Span = Stored | ToRun


class _Row:
    """One stored row; its values are decoded on first use."""

    __slots__ = ("_blob", "_values", "error", "failed", "inputs", "key", "n")

    def __init__(self, row: tuple[Any, ...], reuse: _Row | None = None) -> None:
        self.key, self.n, status, self.inputs, self._blob, self.error = row
        self.failed = status == "failed"
        self._values: list[Any] | None = None
        if reuse is not None:  # the same row, read by the previous window: blob not re-read
            self._blob, self._values = reuse._blob, reuse._values

    def values(self, path: str, trusted: bool) -> list[Any]:
        if self._values is None:
            self._values = read_values(path, self.key, self.n, self._blob, trusted=trusted)
            self._blob = None
        return self._values

    def error_at(self, trusted: bool) -> ItemError:
        text = self.error or ""
        return (0, decode_error(self._blob, text, trusted=trusted), text)


def read_values(path: str, key: Any, n: int, blob: bytes, *, trusted: bool) -> list[Any]:
    """The values of a stored row, or an error naming its items and the file."""
    try:
        values = decode_values(blob, trusted=trusted)
    except NotTrusted as exc:  # nothing was unpickled
        last = f" to {key + n - 1}" if n > 1 else ""
        raise CheckpointError(
            f"refusing to load the stored result of item {key!r}{last} in {describe(path)}: "
            f"{exc}. Loading a pickle can run any code: this file was not written by this "
            "user on this machine, or it was altered since. If you trust it, read it with "
            "Checkpoint(path, trusted=True).",
            path,
        ) from None
    except CheckpointError:  # this user's secret cannot be read: the message says why
        raise
    except Exception as exc:  # damaged bytes, or the class of a value is gone
        last = f" to {key + n - 1}" if n > 1 else ""
        raise CheckpointError(
            f"cannot read the stored result of item {key!r}{last} in {describe(path)}: "
            f"{type(exc).__name__}: {exc}",
            path,
        ) from exc
    if len(values) != n:
        raise CheckpointError(
            f"{describe(path)} is damaged: the row of item {key!r} holds {len(values)} values "
            f"for {n} items",
            path,
        )
    return values


class CheckpointRun:
    """The writer and resume planner of one ``map()`` over a checkpoint (see module docstring).

    Made by ``Checkpoint.open_run``; usable as a context manager (``close`` on exit).
    """

    def __init__(
        self,
        conn: sqlite3.Connection,
        lock: RunLock,
        path: str,
        *,
        key: Callable[[Any], Any] | None,
        retry_failed: bool,
        verify_inputs: bool,
        stored_end: int,
        trusted: bool = False,
    ) -> None:
        self._conn = conn
        self._lock = lock
        self.path = path
        self._wal = WalCopier(path)
        conn.execute("PRAGMA wal_autocheckpoint=0")  # see WalCopier
        self._key = key
        if key is not None:
            conn.execute(_SEEN_TABLE)
        self._retry_failed = retry_failed
        self._verify = verify_inputs
        self._trusted = trusted  # load pickles not signed by this user (Checkpoint's Trust)
        #: Positions at or past this held nothing when the run opened (custom keys: 0 = empty).
        self.stored_end = stored_end
        self._last: _Row | None = None
        self._buffer: list[tuple[Sequence[int], Sequence[Any], Sequence[Any], dict[int, Any]]] = []
        self._buffered = 0
        self._since = 0.0
        self.reused = 0  #: items ``plan`` returned as stored
        self.recorded = 0  #: items committed by this run
        self.closed = False

    # -- resuming -------------------------------------------------------------------------

    def plan(self, start: int, items: list[Any]) -> list[Span]:
        """Split the items read at ``start, start + 1, ...`` into stored and to-run spans.

        The spans cover every item once, in position order. A stored item whose input
        differs from the one recorded raises :class:`CheckpointMismatchError` naming it.
        """
        if self.closed:
            raise CheckpointError(f"{describe(self.path)}: this run is closed", self.path)
        if not items:
            return []
        if start >= self.stored_end:
            if self._key is not None:  # a key function that cannot work fails before items run
                self._claim(start, self._keys(items))
            return [ToRun(start, items)]
        builder = _SpanBuilder(start, items)
        try:
            if self._key is None:
                self._plan_positions(builder)
            else:
                self._plan_keys(builder)
        except sqlite3.DatabaseError as exc:
            raise damaged(self.path, exc) from exc
        spans = builder.finish()
        self.reused += sum(len(s.values) for s in spans if isinstance(s, Stored))
        return spans

    def _plan_positions(self, builder: _SpanBuilder) -> None:
        start, stop = builder.start, builder.stop
        for row in self._rows_between(start, stop):
            low, high = max(row.key, start), min(row.key + row.n, stop)
            if low >= high or (row.failed and self._retry_failed):
                continue
            self._check_inputs(row, low, builder.items[low - start : high - start])
            if row.failed:
                builder.stored(low, [None], [row.error_at(self._trusted)])
            else:
                values = row.values(self.path, self._trusted)
                builder.stored(low, values[low - row.key : high - row.key], None)

    def _rows_between(self, start: int, stop: int) -> list[_Row]:
        """Rows overlapping positions [start, stop): the one holding ``start``, then on."""
        last = self._last
        cached = (None, None, None) if last is None else (last.key, last.n, last.failed)
        rows = self._conn.execute(
            "SELECT key, n, status, inputs, "
            "CASE WHEN key = ?3 AND n = ?4 AND (status = 'failed') = ?5 THEN NULL ELSE value END, "
            "error FROM results WHERE key >= coalesce("
            "(SELECT key FROM results WHERE key <= ?1 ORDER BY key DESC LIMIT 1), ?1) "
            "AND key < ?2 ORDER BY key",
            (start, stop, *cached),
        ).fetchall()
        decoded = [
            _Row(row, last if row[4] is None and row[0] == cached[0] else None) for row in rows
        ]
        if decoded:
            self._last = decoded[-1]
        return decoded

    def _plan_keys(self, builder: _SpanBuilder) -> None:
        items = builder.items
        keys = self._keys(items)
        self._claim(builder.start, keys)
        rows = self._rows_for(keys)
        prints = fingerprints(items) if rows and self._verify else b""  # one pass for all
        size = FINGERPRINT_SIZE
        for offset, key in enumerate(keys):
            row = rows.get(key)
            if row is None or (row.failed and self._retry_failed):
                continue
            position = builder.start + offset
            got = prints[offset * size : (offset + 1) * size]
            self._check_inputs(row, position, items[offset : offset + 1], key=key, got=got)
            if row.failed:
                builder.stored(position, [None], [row.error_at(self._trusted)])
            else:
                builder.stored(position, row.values(self.path, self._trusted), None)

    def _rows_for(self, keys: list[Any]) -> dict[Any, _Row]:
        wanted = list(dict.fromkeys(keys))
        found: dict[Any, _Row] = {}
        for first in range(0, len(wanted), _IN_BATCH):
            batch = wanted[first : first + _IN_BATCH]
            marks = ",".join("?" * len(batch))
            for row in self._conn.execute(
                f"SELECT key, n, status, inputs, value, error FROM results WHERE key IN ({marks})",
                batch,
            ):
                found[row[0]] = _Row(row)
        return found

    def _claim(self, start: int, keys: list[Any]) -> None:
        """Note that this run gives positions ``start, ...`` these keys; refuse a key twice."""
        here: dict[Any, int] = {}
        for position, key in enumerate(keys, start):
            first = here.setdefault(key, position)
            if first != position:
                raise _duplicate_key(key, first, position)
        try:
            for low in range(0, len(keys), _IN_BATCH):
                batch = keys[low : low + _IN_BATCH]
                marks = ",".join("?" * len(batch))
                clash = self._conn.execute(
                    f"SELECT key, position FROM temp.planned_keys WHERE key IN ({marks}) "
                    "ORDER BY position LIMIT 1",
                    batch,
                ).fetchone()
                if clash is not None:
                    raise _duplicate_key(clash[0], clash[1], here[clash[0]])
            conn = self._conn
            conn.execute("BEGIN")  # one transaction of the temporary table per window
            try:
                conn.executemany("INSERT INTO temp.planned_keys VALUES (?, ?)", here.items())
                conn.execute("COMMIT")
            finally:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
        except sqlite3.DatabaseError as exc:
            raise damaged(self.path, exc) from exc

    def _check_inputs(
        self, row: _Row, position: int, items: list[Any], key: Any = None, got: bytes = b""
    ) -> None:
        """Raise if ``items`` (from ``position`` on, in ``row``) are not the ones it stored."""
        if not self._verify or row.inputs is None:
            return
        offset = (position - row.key) * FINGERPRINT_SIZE if self._key is None else 0
        expected = row.inputs[offset : offset + len(items) * FINGERPRINT_SIZE]
        got = got or fingerprints(items)
        if got == expected:
            return
        bad = next(
            i
            for i in range(len(items))
            if got[i * FINGERPRINT_SIZE : (i + 1) * FINGERPRINT_SIZE]
            != expected[i * FINGERPRINT_SIZE : (i + 1) * FINGERPRINT_SIZE]
        )
        where = f"input item {position + bad}"
        if self._key is not None:
            where += f" (key {key!r})"
        raise CheckpointMismatchError(
            f"{where} differs from the item whose result {describe(self.path)} holds: the "
            "input changed since the run that wrote it. Give this job another path, or "
            "key=... that identifies items by content.",
            self.path,
            position=position + bad,
            key=key if self._key is not None else position + bad,
        )

    def _keys(self, items: Sequence[Any]) -> list[Any]:
        assert self._key is not None
        keys = list(map(self._key, items))
        kinds = set(map(type, keys))
        if not kinds <= _KEY_TYPES:
            bad = next(k for k in keys if type(k) not in _KEY_TYPES)
            raise TypeError(
                f"key= returned {bad!r} ({type(bad).__name__}); a checkpoint key must be an "
                "int, str or bytes (join the parts of a composite key into a str)"
            )
        if int in kinds and not all(-(2**63) <= k < 2**63 for k in keys if type(k) is int):
            raise TypeError("key= returned an int outside 64 bits; a checkpoint key must fit")
        return keys

    # -- recording ------------------------------------------------------------------------

    def record(
        self,
        positions: Sequence[int],
        items: Sequence[Any],
        values: Sequence[Any],
        errors: Sequence[ItemError] | None = None,
    ) -> None:
        """Note completed items (``positions[i]`` held ``items[i]``, gave ``values[i]``).

        ``errors`` are ``(offset, exception, traceback text)`` of failed items, as in a
        completion. Nothing is written until :meth:`flush` (or an automatic flush).
        """
        if self.closed:
            raise CheckpointError(f"{describe(self.path)}: this run is closed", self.path)
        failed = {offset: (exc, text) for offset, exc, text in errors or ()}
        if not self._buffer:
            self._since = time.monotonic()
        self._buffer.append((positions, items, values, failed))
        self._buffered += len(items)
        if (
            self._buffered >= AUTO_FLUSH_ITEMS
            or time.monotonic() - self._since >= AUTO_FLUSH_SECONDS
        ):
            self.flush()

    def flush(self) -> None:
        """Commit everything recorded, in one transaction. Call it before yielding results."""
        if not self._buffer:
            return
        buffer, self._buffer, self._buffered = self._buffer, [], 0
        rows = self._rows_of(buffer)
        if not rows:
            return
        conn = self._conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            if self._key is None and rows[0][0] < self.stored_end:  # sorted: any below the end?
                for row in rows:
                    if row[0] < self.stored_end:
                        self._make_room(row[0], row[0] + row[1])
            conn.executemany(_INSERT, rows)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise damaged(self.path, exc) from exc
        finally:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
        self.recorded += sum(row[1] for row in rows)
        self._wal.wrote(sum(len(row[4] or b"") + len(row[3] or b"") for row in rows))

    def _make_room(self, start: int, stop: int) -> None:
        """Remove the failed rows a retry replaces; refuse to overlap a finished item.

        Below ``stored_end`` only retried failures are recorded; anything else is a position
        recorded twice (or one ``plan`` returned as stored), which would leave two rows
        claiming one item.
        """
        conn = self._conn
        before = conn.execute(
            "SELECT key, n FROM results WHERE key < ? ORDER BY key DESC LIMIT 1", (start,)
        ).fetchone()
        clash = before if before is not None and before[0] + before[1] > start else None
        clash = (
            clash
            or conn.execute(
                "SELECT key, n FROM results WHERE key >= ? AND key < ? AND status = 'done' LIMIT 1",
                (start, stop),
            ).fetchone()
        )
        if clash is not None:
            raise ValueError(
                f"items {start} to {stop - 1} overlap items {clash[0]} to "
                f"{clash[0] + clash[1] - 1}, finished earlier: record() each position once, "
                "never one that plan() returned as stored"
            )
        conn.execute("DELETE FROM results WHERE key >= ? AND key < ?", (start, stop))

    def _rows_of(self, buffer: list[Any]) -> list[tuple[Any, ...]]:
        """Rows to insert: merged segments of successes and single failures (position keys:
        sorted), or a row per item (custom keys)."""
        done: list[tuple[int, list[Any], list[Any]]] = []  # (first position, items, values)
        rows: list[tuple[Any, ...]] = []
        for positions, items, values, failed in buffer:
            for offset, (exc, text) in failed.items():
                rows.append(self._failed_row(positions[offset], items[offset], exc, text))
            done.extend(_runs(positions, items, values, failed))
        if self._key is not None:
            items = [item for _, run_items, _ in done for item in run_items]
            values = [value for _, _, run_values in done for value in run_values]
            prints = self._inputs(items)
            size = FINGERPRINT_SIZE
            for offset, key in enumerate(self._keys(items)):
                inputs = None if prints is None else prints[offset * size : (offset + 1) * size]
                rows.append((key, 1, "done", inputs, self._encode([values[offset]], key), None))
            return rows
        for start, run_items, run_values in _merged(done):
            rows.append(
                (
                    start,
                    len(run_items),
                    "done",
                    self._inputs(run_items),
                    self._encode(run_values, start),
                    None,
                )
            )
        rows.sort(key=lambda row: row[0])
        return rows

    def _failed_row(
        self, position: int, item: Any, exc: BaseException, text: str
    ) -> tuple[Any, ...]:
        key = position if self._key is None else self._keys([item])[0]
        blob, text = encode_error(exc, text)
        return (key, 1, "failed", self._inputs([item]), blob, text)

    def _inputs(self, items: Sequence[Any]) -> bytes | None:
        return fingerprints(items) if self._verify else None

    def _encode(self, values: list[Any], first: Any) -> bytes:
        try:
            return encode_values(values)
        except Exception as exc:
            for offset, value in enumerate(values):  # name the item that cannot be saved
                try:
                    encode_values([value])
                except Exception as item_exc:
                    where = first + offset if self._key is None else repr(first)
                    raise SerializationError(
                        f"the result of item {where} cannot be saved in "
                        f"{describe(self.path)}: {type(item_exc).__name__}: {item_exc}"
                    ) from item_exc
            raise SerializationError(f"results cannot be saved in {describe(self.path)}") from exc

    # -- end ------------------------------------------------------------------------------

    def close(self) -> None:
        """Flush, then release the checkpoint (idempotent; the lock goes even if flush fails)."""
        if self.closed:
            return
        try:
            self.flush()
        finally:
            self.closed = True
            try:
                self._wal.stop()
                self._conn.close()  # the last connection: SQLite folds the log into the file
            finally:
                self._lock.release()

    def __enter__(self) -> CheckpointRun:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _duplicate_key(key: Any, first: int, second: int) -> ValueError:
    return ValueError(
        f"key= gave input items {first} and {second} the same key {key!r}: a checkpoint keeps "
        "one result per key, so one item's result would replace the other's, and a resume "
        "would hand it to both. Make key(item) unique per item, or leave key=None (positions)."
    )


class _SpanBuilder:
    """Collects stored pieces in position order; the gaps between them become ToRun spans."""

    def __init__(self, start: int, items: list[Any]) -> None:
        self.start = start
        self.stop = start + len(items)
        self.items = items
        self._spans: list[Span] = []
        self._cursor = start
        self._values: list[Any] = []
        self._errors: list[ItemError] = []

    def stored(self, position: int, values: list[Any], errors: list[ItemError] | None) -> None:
        if position > self._cursor:
            self._close_stored()
            low, high = self._cursor - self.start, position - self.start
            self._spans.append(ToRun(self._cursor, self.items[low:high]))
            self._cursor = position
        if errors:
            base = self._cursor - self._stored_start()
            self._errors.extend((base + offset, exc, text) for offset, exc, text in errors)
        self._values.extend(values)
        self._cursor += len(values)

    def _stored_start(self) -> int:
        return self._cursor - len(self._values)

    def _close_stored(self) -> None:
        if self._values:
            start = self._stored_start()
            self._spans.append(Stored(start, self._values, self._errors or None))
            self._values, self._errors = [], []

    def finish(self) -> list[Span]:
        self._close_stored()
        if self._cursor < self.stop:
            self._spans.append(ToRun(self._cursor, self.items[self._cursor - self.start :]))
        return self._spans


def _runs(
    positions: Sequence[int], items: Sequence[Any], values: Sequence[Any], failed: dict[int, Any]
) -> list[tuple[int, list[Any], list[Any]]]:
    """Maximal runs of consecutive positions that succeeded, as (first position, items, values)."""
    if isinstance(positions, range) and not failed:
        return [(positions.start, list(items), list(values))]
    runs: list[tuple[int, list[Any], list[Any]]] = []
    previous = None
    for offset, position in enumerate(positions):
        if offset in failed:
            previous = None
            continue
        if previous is not None and position == previous + 1:
            runs[-1][1].append(items[offset])
            runs[-1][2].append(values[offset])
        else:
            runs.append((position, [items[offset]], [values[offset]]))
        previous = position
    return runs


def _merged(
    runs: list[tuple[int, list[Any], list[Any]]],
) -> list[tuple[int, list[Any], list[Any]]]:
    """Adjacent runs joined, then cut into segments of at most MAX_SEGMENT items."""
    runs.sort(key=lambda run: run[0])
    joined: list[tuple[int, list[Any], list[Any]]] = []
    for start, items, values in runs:
        if joined and joined[-1][0] + len(joined[-1][1]) > start:
            raise ValueError(f"position {start} was recorded twice in one run")
        if joined and joined[-1][0] + len(joined[-1][1]) == start:
            joined[-1][1].extend(items)
            joined[-1][2].extend(values)
        else:
            joined.append((start, items, values))
    segments = []
    for start, items, values in joined:
        for low in range(0, len(items), MAX_SEGMENT):
            high = low + MAX_SEGMENT
            segments.append((start + low, items[low:high], values[low:high]))
    return segments
