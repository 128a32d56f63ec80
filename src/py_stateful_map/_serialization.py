"""Pickling with a by-value fallback, and the framing of protocol messages on a pipe.

Plain ``pickle`` is tried first because it is the fastest; ``cloudpickle`` (optional) is used
when an object is only reachable by value: a class or function defined in ``__main__``, a
notebook cell or a lambda. Without cloudpickle those still work for scripts, since spawn and
forkserver workers re-import the main script.
"""

from __future__ import annotations

import dataclasses
import pickle
import struct
from typing import Any, TypeVar

_PROTOCOL = pickle.HIGHEST_PROTOCOL
_HEADER_SIZE = struct.Struct("<I")

M = TypeVar("M")


def _cloudpickle() -> Any:
    try:
        import cloudpickle
    except ImportError:
        return None
    return cloudpickle


def dumps(obj: Any) -> bytes:
    """Pickle ``obj``, falling back to cloudpickle for objects only picklable by value."""
    try:
        return pickle.dumps(obj, _PROTOCOL)
    except (pickle.PicklingError, AttributeError, TypeError):
        cloudpickle = _cloudpickle()
        if cloudpickle is None:
            raise
        data: bytes = cloudpickle.dumps(obj, _PROTOCOL)
        return data


def dumps_by_value(obj: Any) -> bytes:
    """Pickle a worker definition so it can be rebuilt where ``__main__`` differs.

    A class defined in a notebook cell or in ``__main__`` pickles by reference to a module the
    worker cannot import; cloudpickle ships its code instead.
    """
    cloudpickle = _cloudpickle()
    if cloudpickle is not None and _defined_in_main(obj):
        data: bytes = cloudpickle.dumps(obj, _PROTOCOL)
        return data
    return dumps(obj)


def _defined_in_main(obj: Any) -> bool:
    target = getattr(obj, "target", obj)
    return getattr(target, "__module__", None) in {"__main__", "__mp_main__"}


loads = pickle.loads


def encode(message: Any) -> bytes:
    """Frame a protocol message as ``len(header) | header | payload``.

    The payload is pickled on its own so that a payload failure (raised from here) never
    corrupts the header, and the reader can tell which chunk it concerned.
    """
    payload = message.payload
    payload_bytes = b"" if payload is None else dumps(payload)
    header = pickle.dumps(dataclasses.replace(message, payload=None), _PROTOCOL)
    return b"".join((_HEADER_SIZE.pack(len(header)), header, payload_bytes))


def decode_header(frame: bytes) -> tuple[Any, memoryview]:
    """Split a frame into its header message (payload None) and the raw payload bytes."""
    (size,) = _HEADER_SIZE.unpack_from(frame)
    view = memoryview(frame)
    end = _HEADER_SIZE.size + size
    return pickle.loads(view[_HEADER_SIZE.size : end]), view[end:]


def with_payload(message: M, raw_payload: memoryview) -> M:
    """Attach the unpickled payload to a header; raises whatever unpickling raises."""
    if not raw_payload:
        return message
    return dataclasses.replace(message, payload=pickle.loads(raw_payload))  # type: ignore[type-var]
