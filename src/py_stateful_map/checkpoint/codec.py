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

Values
    A row's values are pickled as one list (protocol 5: arrays as raw bytes, never text; a
    torch tensor as the numpy array of its own elements, see ``wire.host_copy``). When they are
    all numpy arrays (or CPU tensors) of one shape and dtype, as an embedding model's are,
    they are stacked into one array first: a pickle of one buffer instead of one object
    per item, six times faster to write and four to read; each comes back as its own array.
"""

from __future__ import annotations

import hashlib
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

from py_stateful_map.errors import CheckpointedError
from py_stateful_map.wire.serialization import dumps

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


_STACKED = "py_stateful_map.stacked"


def encode_values(values: list[Any]) -> bytes:
    """A row's values as one pickle (tensors as their own elements; cloudpickle fallback)."""
    payload: Any = values
    stacked = _stacked(values)
    if stacked is not None:
        payload = (_STACKED, *stacked)  # a tuple: a row of values is always a list
    if "torch" not in sys.modules:  # no tensor can be among them: the C pickler alone
        try:
            return pickle.dumps(payload, 5)
        except Exception:  # e.g. a lambda: cloudpickle may manage it
            pass
    return dumps(payload)


def decode_values(blob: bytes) -> list[Any]:
    payload = pickle.loads(blob)
    if type(payload) is list:
        return payload
    _, kind, stacked = payload
    if kind == "numpy":
        return [stacked[i, ...].copy() for i in range(len(stacked))]
    return [row.clone() for row in stacked]


def _stacked(values: list[Any]) -> tuple[str, Any] | None:
    """("numpy" | "torch", one array of all values) when they share type, shape and dtype."""
    if len(values) < 2:
        return None
    first = values[0]
    numpy = sys.modules.get("numpy")
    if numpy is not None and type(first) is numpy.ndarray and not first.dtype.hasobject:
        shape, dtype = first.shape, first.dtype
        for value in values:
            if type(value) is not numpy.ndarray or value.shape != shape or value.dtype != dtype:
                return None
        return "numpy", numpy.stack(values)
    torch = sys.modules.get("torch")
    if torch is not None and type(first) is torch.Tensor and _plain_tensor(first):
        shape, dtype = first.shape, first.dtype
        for value in values:
            if type(value) is not torch.Tensor or value.shape != shape or value.dtype != dtype:
                return None
            if not _plain_tensor(value):
                return None
        return "torch", torch.stack(values)
    return None


def _plain_tensor(tensor: Any) -> bool:
    """A dense CPU tensor without autograd state: stacking it loses nothing."""
    return bool(
        tensor.device.type == "cpu"
        and not tensor.requires_grad
        and tensor.layout is sys.modules["torch"].strided
        and not tensor.is_quantized
    )


def encode_error(exc: BaseException, tb_text: str) -> tuple[bytes | None, str]:
    """(pickled exception or None, traceback text) of a failed item.

    The exception is kept only if it also unpickles: a class whose ``__init__`` takes other
    arguments than its ``args`` pickles fine and then fails to load, years later.
    """
    text = tb_text or "".join(traceback.format_exception_only(type(exc), exc))
    try:
        blob = dumps(exc)
        pickle.loads(blob)
    except Exception:
        return None, text
    return blob, text


def decode_error(blob: bytes | None, text: str) -> BaseException:
    """The stored exception; a ``CheckpointedError`` carrying its text if it cannot be rebuilt."""
    if blob is not None:
        try:
            exc = pickle.loads(blob)
        except Exception:
            exc = None
        if isinstance(exc, BaseException):
            return exc
    last_line = text.strip().splitlines()[-1] if text.strip() else "unknown error"
    return CheckpointedError(f"{last_line} (failed in an earlier run, from the checkpoint)", text)
