"""Frames between the parent and Ray actors, with Ray object references carried beside them.

A ``ray.ObjectRef`` that our own pickle flattens loses Ray's reference counting: its owner (the
actor that called ``ray.put``) never learns that the driver holds it, frees the object, and the
driver's ``ray.get`` waits forever (seen with actors that returned references). So each
reference leaves the pickle and travels in a list next to the frame, where Ray's serializer
sees it and registers the receiver as a borrower; in the pickle it is replaced by its index in
that list, and the receiver's unpickler puts each one back in place. Large buffers leave the
pickle too, as in ``Codec.encode_detached``.

The plain pickler finds references through its ``dispatch_table``, which the C pickler consults
only for objects of other than built-in types; a ``persistent_id`` hook would be a Python call
for every object, every int of a chunk of tiny tasks included (a third of the driver's time on
them). Cloudpickle's pickler keeps its table on its class, so for what only cloudpickle can
pickle (a lambda, rare in items) the references leave through ``persistent_id`` instead.

A reference stays owned by the process that made it: one a worker returns lives as long as
that worker's actor (until the pool closes, or recycles or restarts the worker).
"""

from __future__ import annotations

import contextlib
import copyreg
import io
import pickle
import threading
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

from py_stateful_map.wire.messages import evolve
from py_stateful_map.wire.serialization import DETACH_THRESHOLD, Codec
from py_stateful_map.wire.shared_memory import Descriptor, out_of_band_pickler

M = TypeVar("M")

#: The frame, its detached buffers, its object references, and the payload's size in bytes.
Encoded = tuple[bytes, list[pickle.PickleBuffer], list[Any], int]


class RayCodec(Codec):
    """A ``Codec`` without shared memory whose frames may hold Ray object references."""

    def __init__(self) -> None:
        super().__init__()  # in-band: Ray moves large frames through its object store
        self._incoming: Sequence[Any] = ()

    def encode_with_refs(self, message: Any) -> Encoded:
        """Frame a message; large buffers and object references go beside the frame."""
        payload, buffers, refs = _dump(message.payload)
        header, _, _ = self.encode_detached(evolve(message, payload=None))
        size = len(payload) + sum(buffer.raw().nbytes for buffer in buffers)
        return header + payload, buffers, refs, size  # frame: len(header) | header | payload

    @contextlib.contextmanager
    def receiving(self, refs: Sequence[Any]) -> Iterator[None]:
        """Decode payloads inside this block with ``refs``, the list sent beside their frame."""
        self._incoming = refs
        try:
            yield
        finally:
            self._incoming = ()

    def with_payload(
        self,
        message: M,
        raw: memoryview,
        descriptors: list[Descriptor],
        detached: Sequence[Any] | None = None,
    ) -> M:
        if not raw or not self._incoming:
            return super().with_payload(message, raw, descriptors, detached)
        buffers = [bytearray(buffer) for buffer in detached or ()]  # writable, as elsewhere
        unpickler = pickle.Unpickler(io.BytesIO(raw), buffers=buffers)
        unpickler.persistent_load = self._incoming.__getitem__  # type: ignore[method-assign]
        _receiving.refs = self._incoming
        try:
            return evolve(message, payload=unpickler.load())
        finally:
            _receiving.refs = ()


#: The references sent beside the frame being unpickled in this thread (for ``_ref_at``).
_receiving = threading.local()


def _ref_at(index: int) -> Any:
    """Unpickling: the object reference that travelled beside the frame at ``index``."""
    return _receiving.refs[index]


def _dump(payload: Any) -> tuple[bytes, list[pickle.PickleBuffer], list[Any]]:
    """Pickle a payload: plain pickle first, cloudpickle (in-band) for what only it can do."""
    if payload is None:
        return b"", [], []
    try:
        return _dump_with(payload, None)
    except (pickle.PicklingError, AttributeError, TypeError):
        return _dump_with(payload, cloudpickle_module())  # e.g. a lambda


def _dump_with(
    payload: Any, cloudpickle: Any
) -> tuple[bytes, list[pickle.PickleBuffer], list[Any]]:
    from ray import ObjectRef

    stream = io.BytesIO()
    buffers: list[pickle.PickleBuffer] = []
    refs: list[Any] = []
    pickler: pickle.Pickler
    if cloudpickle is None:

        def detach(buffer: pickle.PickleBuffer) -> bool:
            if buffer.raw().nbytes < DETACH_THRESHOLD:
                return True  # in-band
            buffers.append(buffer)
            return False

        def reduce_ref(ref: Any) -> tuple[Any, tuple[int]]:
            refs.append(ref)
            return _ref_at, (len(refs) - 1,)

        pickler = out_of_band_pickler(stream, detach)
        table = getattr(pickler, "dispatch_table", copyreg.dispatch_table)
        pickler.dispatch_table = {**table, ObjectRef: reduce_ref}
    else:

        def persistent_id(obj: Any) -> int | None:
            if not isinstance(obj, ObjectRef):
                return None
            refs.append(obj)
            return len(refs) - 1

        pickler = cloudpickle.CloudPickler(stream, pickle.HIGHEST_PROTOCOL)
        pickler.persistent_id = persistent_id  # type: ignore[method-assign]
    pickler.dump(payload)
    return stream.getvalue(), buffers, refs


def cloudpickle_module() -> Any:
    """The ``cloudpickle`` package, else the copy Ray carries."""
    try:
        import cloudpickle
    except ImportError:  # Ray carries its own copy
        from ray import cloudpickle
    return cloudpickle
