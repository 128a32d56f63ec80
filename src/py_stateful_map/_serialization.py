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
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from ._protocol import ChunkDone, FromWorker, InitFailed, ResultUnreadable
from ._shared_memory import Descriptor, SegmentPool, SegmentReader
from .errors import SerializationError

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


class Codec:
    """One end of a channel: frames protocol messages, large buffers via shared memory.

    Frame: ``len(header) | header | payload``. The header is the message without its payload,
    plus the shared-memory descriptors of the payload's large buffers and the names of the
    peer's segments this end has finished with. The payload is pickled on its own so that a
    payload that cannot be pickled or unpickled is the failure of one known chunk, never of
    the channel.
    """

    def __init__(self, pool: SegmentPool | None = None) -> None:
        self.pool = pool  # None: everything in-band (no /dev/shm, or threads)
        self.reader = SegmentReader()
        self.lent: set[str] = set()  # our segments the peer may still be using

    def reclaim(self) -> None:
        """The peer is gone: every segment it held is free again."""
        if self.pool is not None:
            self.pool.give_back(self.lent)
        self.lent.clear()

    def encode(self, message: Any) -> tuple[bytes, int]:
        """Frame a message; returns the frame and the payload size including shared memory."""
        payload_bytes, descriptors = self._dump_payload(message.payload)
        header = pickle.dumps(
            (dataclasses.replace(message, payload=None), descriptors, self.reader.take_released()),
            _PROTOCOL,
        )
        frame = b"".join((_HEADER_SIZE.pack(len(header)), header, payload_bytes))
        self.lent.update(name for name, _ in descriptors)
        return frame, len(payload_bytes) + sum(size for _, size in descriptors)

    def _dump_payload(self, payload: Any) -> tuple[bytes, list[Descriptor]]:
        if payload is None:
            return b"", []
        if self.pool is not None:
            try:
                return self.pool.dumps(payload)
            except (pickle.PicklingError, AttributeError, TypeError):
                pass  # e.g. a lambda: cloudpickle may manage it, in-band
        return dumps(payload), []

    def decode_header(self, frame: bytes) -> tuple[Any, memoryview, list[Descriptor]]:
        """The message without payload, its raw payload and descriptors; settles releases."""
        (size,) = _HEADER_SIZE.unpack_from(frame)
        view = memoryview(frame)
        end = _HEADER_SIZE.size + size
        message, descriptors, released = pickle.loads(view[_HEADER_SIZE.size : end])
        if released and self.pool is not None:
            self.lent.difference_update(released)
            self.pool.give_back(released)
        return message, view[end:], descriptors

    def with_payload(self, message: M, raw: memoryview, descriptors: list[Descriptor]) -> M:
        """Attach the unpickled payload; raises whatever unpickling raises."""
        if not raw:
            return message
        payload = self.reader.loads(raw, descriptors)
        return dataclasses.replace(message, payload=payload)  # type: ignore[type-var]


def decode_from_worker(codec: Codec, frame: bytes) -> FromWorker:
    """Decode a worker's frame; a payload that cannot be unpickled blames its chunk."""
    header, raw_payload, descriptors = codec.decode_header(frame)
    try:
        message = codec.with_payload(header, raw_payload, descriptors)
        if isinstance(message, ChunkDone):
            size = len(raw_payload) + sum(nbytes for _, nbytes in descriptors)
            message = dataclasses.replace(message, payload_bytes=size)
        return message  # type: ignore[no-any-return]
    except Exception as exc:  # blame the chunk, not the channel
        reason = f"{type(exc).__name__}: {exc}"
        if isinstance(header, ChunkDone):
            return ResultUnreadable(header.chunk_id, payload=reason)
        if isinstance(header, InitFailed):
            error = SerializationError(f"the constructor's exception cannot be unpickled: {reason}")
            return InitFailed(header.pid, payload=(error, ""))
        raise


def pickle_specs(
    specs: Sequence[Any], dump: Callable[[Any], bytes], destination: str, hint: str = ""
) -> list[bytes]:
    """Pickle each worker's spec once, up front: a failure names the worker, not a pipe."""
    try:
        return [dump(spec) for spec in specs]
    except Exception as exc:
        raise SerializationError(
            f"the worker {specs[0].target!r} or its init kwargs cannot be pickled to send to "
            f"{destination}: {exc}{hint}"
        ) from exc
