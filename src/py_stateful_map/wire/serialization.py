"""Pickling with a by-value fallback, and the framing of protocol messages on a pipe.

Plain ``pickle`` is tried first because it is the fastest; ``cloudpickle`` (optional) is used
when an object is only reachable by value: a class or function defined in ``__main__``, a
notebook cell or a lambda. Without cloudpickle those still work for scripts, since spawn and
forkserver workers re-import the main script.
"""

from __future__ import annotations

import io
import pickle
import struct
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from py_stateful_map.errors import SerializationError

from .host_copy import tensor_pickler
from .messages import (
    ChunkDone,
    FromWorker,
    InitFailed,
    ItemError,
    ResultUnreadable,
    evolve,
    from_header,
    header_of,
)
from .shared_memory import Descriptor, SegmentPool, SegmentReader, out_of_band_pickler

_PROTOCOL = pickle.HIGHEST_PROTOCOL
_HEADER_SIZE = struct.Struct("<I")
#: Buffers at least this large leave the pickle as separate buffers (``encode_detached``).
DETACH_THRESHOLD = 64 * 1024

M = TypeVar("M")
P = TypeVar("P")  # what pickling a spec gives

#: What pickling or unpickling a user's object may raise, each the failure of that one item:
#: any ``Exception``, and the exits a ``__reduce__`` or a rebuilding function can call
#: (``sys.exit()``, a stray ``GeneratorExit``). Caught as ``Exception`` alone, a ``SystemExit``
#: ended the worker pickling a result (twice: the item was re-run on its successor) and left
#: the parent's loop when unpickled there. ``KeyboardInterrupt`` is not one: in the parent it
#: is the user's Ctrl-C (a worker process ignores SIGINT).
PICKLING_ERRORS: tuple[type[BaseException], ...] = (Exception, SystemExit, GeneratorExit)


def _cloudpickle() -> Any:
    try:
        import cloudpickle
    except ImportError:
        return None
    return cloudpickle


#: Replaces an object by a reference pickled in its place (``Pickler.persistent_id``).
PersistentId = Callable[[Any], Any]


def dumps(obj: Any, persistent_id: PersistentId | None = None) -> bytes:
    """Pickle ``obj``, falling back to cloudpickle for objects only picklable by value.

    Tensors go as CPU tensors holding only their own elements, wherever they are nested
    (``wire.host_copy``): a CUDA tensor would otherwise be rebuilt on the receiver's GPU.
    """
    try:
        return _dump(pickle.Pickler, obj, persistent_id)
    except (pickle.PicklingError, AttributeError, TypeError):
        cloudpickle = _cloudpickle()
        if cloudpickle is None:
            raise
        return _dump(cloudpickle.Pickler, obj, persistent_id)


def _dump(pickler_type: Any, obj: Any, persistent_id: PersistentId | None = None) -> bytes:
    stream = io.BytesIO()
    if persistent_id is not None:
        pickler_type = _with_persistent_ids(pickler_type)
    pickler = tensor_pickler(stream, _PROTOCOL, pickler_type)
    if persistent_id is not None:
        pickler.references = persistent_id  # type: ignore[attr-defined]
    pickler.dump(obj)
    return stream.getvalue()


_WITH_PERSISTENT_IDS: dict[type, type] = {}


def _with_persistent_ids(pickler_type: type) -> type:
    """A subclass asking its instance's ``references`` for persistent ids (Python 3.13 no
    longer lets an instance of the C pickler itself take a ``persistent_id`` attribute)."""
    subclass = _WITH_PERSISTENT_IDS.get(pickler_type)
    if subclass is None:

        def persistent_id(self: Any, obj: Any) -> Any:
            return self.references(obj)

        subclass = type(pickler_type.__name__, (pickler_type,), {"persistent_id": persistent_id})
        _WITH_PERSISTENT_IDS[pickler_type] = subclass
    return subclass


def dumps_by_value(obj: Any, persistent_id: PersistentId | None = None) -> bytes:
    """Pickle a worker definition so it can be rebuilt where ``__main__`` differs.

    A class defined in a notebook cell or in ``__main__`` pickles by reference to a module the
    worker cannot import; cloudpickle ships its code instead.
    """
    cloudpickle = _cloudpickle()
    if cloudpickle is not None and _defined_in_main(obj):
        return _dump(cloudpickle.Pickler, obj, persistent_id)
    return dumps(obj, persistent_id)


def dumps_for_process_start(obj: Any) -> tuple[bytes, list[Any]]:
    """Pickle ``obj`` as :func:`dumps_by_value` does, except its ``multiprocessing`` objects.

    A lock, queue, barrier, shared value or array may reach a process only while
    multiprocessing starts it (``context.assert_spawning``: "... should only be shared between
    processes through inheritance"). Each is left out, a reference pickled in its place, and
    returned in a list that goes in the ``Process`` args: multiprocessing pickles it with its
    own reduction while spawning (duplicating file descriptors for the child), or, with fork,
    the child inherits it. :func:`loads_inherited` puts them back. An object found twice is
    left out once, so it is one object again in the worker.
    """
    inherited: list[Any] = []
    positions: dict[int, int] = {}

    def leave_out(candidate: Any) -> int | None:
        if not _shared_through_inheritance(candidate):
            return None
        position = positions.setdefault(id(candidate), len(inherited))
        if position == len(inherited):
            inherited.append(candidate)
        return position

    return dumps_by_value(obj, leave_out), inherited


def _shared_through_inheritance(obj: Any) -> bool:
    """Whether ``obj`` belongs to ``multiprocessing``, which alone can send it to a process.

    Its classes live in ``multiprocessing.*``; ``RawValue``/``RawArray`` are plain ctypes
    objects backed by multiprocessing's shared heap.
    """
    module = getattr(type(obj), "__module__", None) or ""
    if module == "multiprocessing" or module.startswith("multiprocessing."):
        return True
    ctypes, heap = sys.modules.get("ctypes"), sys.modules.get("multiprocessing.heap")
    if ctypes is None or heap is None:
        return False
    c_data = (ctypes._SimpleCData, ctypes.Array, ctypes.Structure, ctypes.Union)
    return isinstance(obj, c_data) and isinstance(
        getattr(obj, "_wrapper", None), heap.BufferWrapper
    )


class _InheritingUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, inherited: Sequence[Any]) -> None:
        super().__init__(io.BytesIO(data))
        self.inherited = inherited

    def persistent_load(self, pid: Any) -> Any:
        return self.inherited[pid]


def loads_inherited(data: bytes, inherited: Sequence[Any]) -> Any:
    """Unpickle what :func:`dumps_for_process_start` pickled, given the objects it left out."""
    return _InheritingUnpickler(data, inherited).load()


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
        self._removed: list[str] = [] if pool is None else pool.subscribe()

    def close(self) -> None:
        """This end is done: drop the mappings of the peer's segments."""
        self.reader.close()
        if self.pool is not None:
            self.pool.unsubscribe(self._removed)

    def reclaim(self) -> None:
        """The peer is gone: every segment it held is free again."""
        if self.pool is not None:
            self.pool.give_back(self.lent)
        self.lent.clear()

    def encode(self, message: Any) -> tuple[bytes, int]:
        """Frame a message; returns the frame and the payload size including shared memory."""
        payload_bytes, descriptors = self._dump_payload(message.payload)
        settled = (self.reader.take_released(), self._removed[:])
        self._removed.clear()
        header = pickle.dumps((header_of(message), descriptors, settled), _PROTOCOL)
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

    def encode_detached(self, message: Any) -> tuple[bytes, list[pickle.PickleBuffer], int]:
        """Frame a message, keeping its large buffers out of the frame.

        For a transport that moves buffers well on its own (Ray writes each one into its
        object store once, where an in-band pickle would be copied twice more): the buffers
        go next to the frame and ``with_payload(..., detached=...)`` puts them back.
        """
        payload_bytes, buffers = _dumps_detached(message.payload)
        header = pickle.dumps((header_of(message), [], ([], [])), _PROTOCOL)
        frame = b"".join((_HEADER_SIZE.pack(len(header)), header, payload_bytes))
        return frame, buffers, len(payload_bytes) + sum(b.raw().nbytes for b in buffers)

    def decode_header(self, frame: bytes) -> tuple[Any, memoryview, list[Descriptor]]:
        """The message without payload, its raw payload and descriptors; settles releases."""
        (size,) = _HEADER_SIZE.unpack_from(frame)
        view = memoryview(frame)
        end = _HEADER_SIZE.size + size
        header, descriptors, (released, removed) = pickle.loads(view[_HEADER_SIZE.size : end])
        message = from_header(header)
        if released and self.pool is not None:
            self.lent.difference_update(released)
            self.pool.give_back(released)
        if removed:
            self.reader.forget(removed)
        return message, view[end:], descriptors

    def with_payload(
        self,
        message: M,
        raw: memoryview,
        descriptors: list[Descriptor],
        detached: Sequence[Any] | None = None,
    ) -> M:
        """Attach the unpickled payload; raises whatever unpickling raises.

        ``detached`` buffers (from ``encode_detached``) may be read-only views of a store the
        sender owns: they are copied once, so arrays come out writable and own their memory,
        as on every other transport.
        """
        if not raw:
            return message
        if detached:
            payload = pickle.loads(raw, buffers=[bytearray(buffer) for buffer in detached])
        else:
            payload = self.reader.loads(raw, descriptors)
        return evolve(message, payload=payload)


def pickled_size(items: list[Any]) -> int | None:
    """Bytes ``items`` take when pickled, large buffers counted without being copied (a
    chunk's size is chosen from it before the chunk is read); None when plain pickle cannot
    pickle them."""
    detached = 0

    def count(buffer: pickle.PickleBuffer) -> bool:
        nonlocal detached
        detached += buffer.raw().nbytes
        return False  # out of band: counted, never copied

    try:
        return len(pickle.dumps(items, _PROTOCOL, buffer_callback=count)) + detached
    except Exception:  # whatever a user's __reduce__ raises: the chunk is measured when sent
        return None


def _dumps_detached(payload: Any) -> tuple[bytes, list[pickle.PickleBuffer]]:
    if payload is None:
        return b"", []
    buffers: list[pickle.PickleBuffer] = []

    def detach(buffer: pickle.PickleBuffer) -> bool:
        if buffer.raw().nbytes < DETACH_THRESHOLD:
            return True  # in-band
        buffers.append(buffer)
        return False

    stream = io.BytesIO()
    try:
        out_of_band_pickler(stream, detach).dump(payload)
    except (pickle.PicklingError, AttributeError, TypeError):
        return dumps(payload), []  # e.g. a lambda: cloudpickle may manage it, in-band
    return stream.getvalue(), buffers


def decode_from_worker(
    codec: Codec, frame: bytes, detached: Sequence[Any] | None = None
) -> FromWorker:
    """Decode a worker's frame; a payload that cannot be unpickled blames its chunk."""
    header, raw_payload, descriptors = codec.decode_header(frame)
    try:
        if isinstance(header, ChunkDone) and raw_payload:  # one copy of the header, not two
            size = len(raw_payload) + sum(nbytes for _, nbytes in descriptors)
            size += sum(memoryview(buffer).nbytes for buffer in detached or ())
            header = evolve(header, payload_bytes=size)
        return codec.with_payload(header, raw_payload, descriptors, detached)  # type: ignore[no-any-return]
    except PICKLING_ERRORS as exc:  # blame the chunk, not the channel; the dispatcher asks again
        # item by item (``ResendItemwise``) to find the items at fault
        reason = f"{type(exc).__name__}: {exc}"
        if isinstance(header, ChunkDone):
            return ResultUnreadable(header.chunk_id, payload=reason)
        if isinstance(header, InitFailed):
            error = SerializationError(f"the constructor's exception cannot be unpickled: {reason}")
            error.__cause__ = exc
            return InitFailed(header.pid, payload=(error, ""))
        raise


def encode_itemwise(values: list[Any], errors: list[ItemError] | None) -> list[bytes]:
    """One pickle per item's outcome, so the parent can rebuild each on its own.

    An exception is pickled inside its entry, next to its traceback text, so the text still
    reaches the caller when the exception itself cannot be rebuilt there.
    """
    failed = {offset: (exc, text) for offset, exc, text in errors or ()}
    entries = []
    for offset, value in enumerate(values):
        try:
            if offset in failed:
                exc, text = failed[offset]
                entries.append(dumps(("error", dumps(exc), text)))
            else:
                entries.append(dumps(("value", value)))
        except PICKLING_ERRORS as exc:
            entries.append(dumps(("unpicklable", f"{type(exc).__name__}: {exc}")))
    return entries


def decode_itemwise(
    entries: list[bytes] | None, start: int, count: int
) -> tuple[list[Any], list[ItemError]]:
    """Rebuild an itemwise answer; an entry that cannot be unpickled fails only its item."""
    if entries is None or len(entries) != count:
        error = SerializationError(
            f"the results of items {start}..{start + count - 1} cannot be unpickled here, and "
            "the worker no longer holds them to send again"
        )
        return [None] * count, [(offset, error, "") for offset in range(count)]
    values: list[Any] = [None] * count
    errors: list[ItemError] = []
    for offset, entry in enumerate(entries):
        try:
            kind, *rest = pickle.loads(entry)
        except PICKLING_ERRORS as load_error:  # the value itself (errors are nested pickles)
            reason = f"{type(load_error).__name__}: {load_error}"
            error = SerializationError(
                f"the result of item {start + offset} cannot be unpickled: {reason}"
            )
            error.__cause__ = load_error
            errors.append((offset, error, ""))
            continue
        if kind == "value":
            values[offset] = rest[0]
            continue
        if kind == "unpicklable":
            errors.append((offset, SerializationError(f"item {start + offset}: {rest[0]}"), ""))
            continue
        exc_bytes, text = rest
        try:
            exc = pickle.loads(exc_bytes)
        except PICKLING_ERRORS as load_error:
            exc = SerializationError(
                f"the exception of item {start + offset} cannot be unpickled: "
                f"{type(load_error).__name__}: {load_error} (its worker traceback is attached)"
            )
        errors.append((offset, exc, text))
    return values, errors


def pickle_specs(
    specs: Sequence[Any], dump: Callable[[Any], P], destination: str, hint: str = ""
) -> list[P]:
    """Pickle each worker's spec once, up front: a failure names the worker, not a pipe."""
    try:
        return [dump(spec) for spec in specs]
    except Exception as exc:
        raise SerializationError(
            f"the worker {specs[0].target!r} or its init kwargs cannot be pickled to send to "
            f"{destination}: {exc}{hint}"
        ) from exc
