"""What a checkpoint stores about items and jobs, as bytes: input fingerprints, job digests, values.

Input fingerprints
    Every stored item keeps 8 bytes that identify its input, so that a resumed run can tell a
    changed item from the one whose result it is about to reuse. The fingerprint is a function
    of the item alone (never of its neighbours), so runs may batch items differently:

    - an ``int`` that fits 64 bits: the number itself (exact);
    - ``str``: CRC-32 of its UTF-8, tagged; ``bytes``: CRC-32, tagged;
    - anything else: CRC-32 of its pickle (protocol 5), tagged; an unpicklable item: CRC-32 of
      its ``repr`` with memory addresses removed (such an item is checked only that loosely).

    A run of items is fingerprinted in one C-level pass when they share one of the first three
    types (~10-60 ns an item), and by pickling each item otherwise. A pickle depends on what
    the item holds, in order: a ``set`` of strings pickles in hash order, which
    ``PYTHONHASHSEED`` changes between interpreters; use ``verify_inputs=False`` for such items.

Job digests
    The manifest keeps one digest per init kwarg (so a mismatch names the kwarg), of a pickle
    of the value with sets and dict keys put in a canonical order, or of its ``repr`` without
    memory addresses when it cannot be pickled.

Values (see "Trust" in ``checkpoint.api``)
    A row's values are stored as one blob, whose first byte says how:

    - ``V``: the list of values in ``checkpoint.tagged``, a format that runs no code when
      read (``O``: the one value of a row of one item, as every row is with ``key=``): None,
      bool, int, float, str, bytes, lists, tuples and dicts of them, numpy arrays and scalars
      of plain dtypes, CPU torch tensors. A list of one type is packed (a row of ints is one
      array); numpy arrays (or CPU tensors) of one shape and dtype, as an embedding model's,
      are stacked into one array: one buffer instead of one object per item, each read back
      as its own array;
    - ``P``: anything else, pickled as one list (protocol 5; tensors as the numpy arrays of
      their own elements, see ``wire.host_copy``; cloudpickle as a fallback), behind its
      HMAC-SHA256 signature (``checkpoint.signing``). It is unpickled only if the signature is
      this user's, or the reader passed ``trusted=True``; otherwise :class:`NotTrusted`;
    - ``0x80``: a bare pickle, as checkpoint format 1 (before signatures) stored every value:
      read only when trusted.

    A failed item's blob is a ``V`` tuple ``(type name, repr of its args, str, exception)``, the
    exception a ``P`` blob (or None when it cannot be rebuilt); the traceback text is beside it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import pickle
import re
import sys
import traceback
from array import array
from collections.abc import Mapping, Sequence
from itertools import repeat
from operator import methodcaller, or_
from typing import Any
from zlib import crc32

from py_stateful_map.errors import CheckpointedError, CheckpointError
from py_stateful_map.wire.serialization import dumps

from . import signing, tagged
from .tagged import Unsupported

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1
_UINT64 = 2**64 - 1
# Tags in the high half keep a string's fingerprint apart from a byte string's with the same
# CRC; an int's fingerprint is its own value, so a type change at one position is missed only
# when the bits collide exactly.
_TAG_STR = 1 << 32
_TAG_BYTES = 2 << 32
_TAG_PICKLE = 3 << 32
_TAG_REPR = 4 << 32
_FAST_KINDS = frozenset({int, str, bytes})
_utf8 = methodcaller("encode", "utf-8", "surrogatepass")
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
FINGERPRINT_SIZE = 8


def fingerprints(items: Sequence[Any]) -> bytes:
    """8 bytes per item, little-endian; equal bytes for equal items in any process."""
    kinds = set(map(type, items))
    packed: array[int] | None = None
    if len(kinds) == 1:
        packed = _bulk(next(iter(kinds)), items)
    elif not kinds & _FAST_KINDS:
        try:
            packed = array(
                "Q", map(or_, map(crc32, map(pickle.dumps, items, repeat(5))), repeat(_TAG_PICKLE))
            )
        except Exception:  # one unpicklable item: fingerprint each on its own
            packed = None
    if packed is None:
        packed = array("Q", map(fingerprint, items))
    if sys.byteorder != "little":
        packed.byteswap()
    return packed.tobytes()


def _bulk(kind: type, items: Sequence[Any]) -> array[int] | None:
    if kind is int:
        try:
            return array("q", items)  # same bytes as fingerprint(): the value, two's complement
        except OverflowError:
            return None
    if kind is str:
        try:
            return array("Q", map(or_, map(crc32, map(_utf8, items)), repeat(_TAG_STR)))
        except UnicodeError:
            return None
    if kind is bytes:
        return array("Q", map(or_, map(crc32, items), repeat(_TAG_BYTES)))
    return None


def fingerprint(item: Any) -> int:
    """One item's fingerprint as an unsigned 64-bit number (see the module docstring)."""
    kind = type(item)
    if kind is int and _INT64_MIN <= item <= _INT64_MAX:
        return int(item) & _UINT64
    if kind is str:
        return crc32(item.encode("utf-8", "surrogatepass")) | _TAG_STR
    if kind is bytes:
        return crc32(item) | _TAG_BYTES
    try:
        return crc32(pickle.dumps(item, 5)) | _TAG_PICKLE
    except Exception:  # pickling can raise anything a __reduce__ raises
        return crc32(stable_repr(item).encode("utf-8", "surrogatepass")) | _TAG_REPR


def stable_repr(obj: Any) -> str:
    """``repr`` without memory addresses (``<Foo object at 0x7f..>`` changes every run)."""
    return _ADDRESS.sub("", repr(obj))


def digest(value: Any) -> str:
    """A short hex digest of ``value`` that is equal in every process for equal values."""
    try:
        data = pickle.dumps(_canonical(value), 5)
    except Exception:
        data = stable_repr(value).encode("utf-8", "surrogatepass")
    return hashlib.blake2b(data, digest_size=8).hexdigest()


def _canonical(value: Any) -> Any:
    """Sets and dicts in a fixed order, so their pickle does not depend on hash seeds."""
    if isinstance(value, (set, frozenset)):
        return ("set", sorted((_canonical(v) for v in value), key=repr))
    if isinstance(value, Mapping):
        return ("map", sorted(((repr(k), _canonical(v)) for k, v in value.items())))
    if type(value) in (list, tuple):
        return type(value)(_canonical(v) for v in value)
    return value


def kwargs_digests(kwargs: Mapping[str, Any] | None) -> dict[str, str]:
    """One digest per init kwarg, sorted by name."""
    return {name: digest(value) for name, value in sorted((kwargs or {}).items())}


def qualified_name(worker: Any) -> str:
    """``module.QualName`` of a worker class or function (a partial: its function's)."""
    target = getattr(worker, "func", worker)  # functools.partial
    module = getattr(target, "__module__", None)
    name = getattr(target, "__qualname__", None)
    if module is None or name is None:
        return stable_repr(worker)
    return f"{module}.{name}"


logger = logging.getLogger("py_stateful_map")
_SAFE = b"V"
_SAFE_ONE = b"O"
_SAFE_BYTE, _SAFE_ONE_BYTE = _SAFE[0], _SAFE_ONE[0]
_SIGNED = b"P"
_BARE_PICKLE = b"\x80"  # the PROTO opcode every pickle of protocol 2 and later starts with
_LEGACY_STACKED = "py_stateful_map.stacked"  # format 1's mark of a stacked row
_TEXT_LIMIT = 4096
_warned: list[bool] = []  # once a process: no secret to sign exceptions with


class NotTrusted(Exception):
    """A stored pickle without this user's signature, met with ``trusted=False``."""


def encode_values(values: list[Any]) -> bytes:
    """A row's values as one blob: in the safe format when it can hold them, else a signed
    pickle (tensors as their own elements; cloudpickle fallback)."""
    try:
        if len(values) == 1:  # a row of one item (every row, with key=...): no list around it
            return tagged.encode(values[0], _SAFE_ONE)
        return tagged.encode(values, _SAFE)
    except (Unsupported, RecursionError):  # an object of another type, or a cycle
        pass
    data = None
    if "torch" not in sys.modules:  # no tensor can be among them: the C pickler alone
        with contextlib.suppress(Exception):  # e.g. a lambda: cloudpickle may manage it
            data = pickle.dumps(values, 5)
    return _signed(dumps(values) if data is None else data)


def decode_values(blob: bytes, *, trusted: bool) -> list[Any]:
    """The values of a row; :class:`NotTrusted` before unpickling anything not signed."""
    kind = blob[0]
    if kind == _SAFE_ONE_BYTE:
        return [tagged.decode(blob, 1)]
    if kind == _SAFE_BYTE:
        values = tagged.decode(blob, 1)
        if type(values) is not list:
            raise ValueError(f"a row holds a {type(values).__name__}, not a list")
        return values
    payload = pickle.loads(_pickle_in(blob, trusted=trusted))
    if type(payload) is list:
        return payload
    if type(payload) is tuple and len(payload) == 3 and payload[0] == _LEGACY_STACKED:
        _, kind, stacked = payload  # format 1: one array of a row's equal-shaped arrays
        if kind == "numpy":
            return [stacked[i, ...].copy() for i in range(len(stacked))]
        return [row.clone() for row in stacked]
    raise ValueError(f"a row holds a {type(payload).__name__}, not a list")


def _signed(data: bytes) -> bytes:
    return b"".join((_SIGNED, signing.sign(data), data))


def _pickle_in(blob: bytes, *, trusted: bool) -> bytes | memoryview:
    """The pickle a blob holds, once its signature is checked (unless ``trusted``)."""
    kind = blob[:1]
    if kind == _SIGNED:
        end = 1 + signing.SIGNATURE_SIZE
        data = memoryview(blob)[end:]
        reason = None if trusted else signing.check(blob[1:end], data)
        if reason is not None:
            raise NotTrusted(f"it is a pickle and {reason}")
        return data
    if kind == _BARE_PICKLE:
        if not trusted:
            raise NotTrusted(
                "it is a pickle without a signature (as checkpoint format 1 stored every "
                "value, before signatures), so nothing shows who wrote it"
            )
        return blob
    raise ValueError(f"unknown kind of stored value {kind!r}")


def encode_error(exc: BaseException, tb_text: str) -> tuple[bytes, str]:
    """(blob, traceback text) of a failed item (the blob: see the module docstring).

    The exception is kept only if it also unpickles: a class whose ``__init__`` takes other
    arguments than its ``args`` pickles fine and then fails to load, years later.
    """
    text = tb_text or "".join(traceback.format_exception_only(type(exc), exc))
    pickled = None
    try:
        data = dumps(exc)
        pickle.loads(data)
        pickled = _signed(data)
    except CheckpointError as problem:  # no secret to sign with: kept as text only
        if not _warned:
            _warned.append(True)
            logger.warning("exceptions of failed items are stored as text only: %s", problem)
    except Exception:
        pass
    kind = type(exc)
    record = (f"{kind.__module__}.{kind.__qualname__}", _text(repr, exc.args), _text(str, exc))
    return tagged.encode((*record, pickled), _SAFE), text


def _text(show: Any, value: Any) -> str:
    try:
        shown = str(show(value))
    except Exception as exc:  # a __repr__ or __str__ that raises
        shown = f"<{type(exc).__name__} in {show.__name__}()>"
    return shown if len(shown) <= _TEXT_LIMIT else shown[:_TEXT_LIMIT] + "..."


def decode_error(blob: bytes | None, text: str, *, trusted: bool) -> BaseException:
    """The stored exception when it can be rebuilt from a pickle this user signed (or any,
    ``trusted``); otherwise a ``CheckpointedError`` carrying its text. Never raises."""
    pickled, summary, note = blob, "", ""
    try:
        if blob is not None and blob[:1] == _SAFE:
            name, _, message, pickled = tagged.decode(blob, 1)
            summary = f"{name.rpartition('.')[2]}: {message}" if message else name
        if pickled is not None:
            exc = pickle.loads(_pickle_in(pickled, trusted=trusted))
            if isinstance(exc, BaseException):
                return exc
    except NotTrusted as refused:
        note = f"; not rebuilt as its own type: {refused}; Checkpoint(..., trusted=True) does"
    except Exception:  # its class is gone, or the record is damaged: the text still tells
        pass
    last_line = text.strip().splitlines()[-1] if text.strip() else summary or "unknown error"
    return CheckpointedError(
        f"{last_line} (failed in an earlier run, from the checkpoint{note})", text
    )
