"""Tensors cross a process boundary on the CPU: detached, complete, and only their own elements.

Why here and not in the user's code: torch pickles a CUDA tensor with ``torch.save`` and the
receiver's ``torch.load`` rebuilds it on *its* ``cuda:<n>``. A CUDA result would open a CUDA
context in the parent (on GPU 0, whatever GPU the worker had), or fail to unpickle in a parent
without a GPU; and a view would ship its whole storage. So every pickler the package uses to
send a payload (``wire.shared_memory.out_of_band_pickler``, ``wire.serialization.dumps``) has
:func:`reduce_tensor` in its ``dispatch_table``: it sees every tensor wherever it is nested
(dataclasses, sets, any object), at no cost for objects that hold none.

For each ``torch.Tensor`` (exact type; a ``Parameter`` reduces to its ``.data``):

- on a device: copied to the CPU (``.to("cpu")`` waits for the copy and copies only the
  view's elements);
- detached: no autograd graph crosses (a non-leaf result, which torch itself refuses to
  pickle, arrives as plain data; a leaf keeps its ``requires_grad`` flag, as with torch);
- on the CPU in pinned memory while CUDA is in use: the devices are synchronized first, since a
  ``.to("cpu", non_blocking=True)`` copy may still be in flight (pinned memory is what torch
  allocates for exactly that copy);
- then sent as a numpy array, whose buffer can go through shared memory; a dtype numpy lacks
  (bfloat16, float8, complex32) travels as integers of the same width and is viewed back.

Inputs sent by the parent follow the same rule: a CUDA tensor in the input reaches the worker
as a CPU tensor, which the worker moves to its own device.
"""

from __future__ import annotations

import contextlib
import copyreg
import io
import pickle
import sys
from collections import ChainMap
from collections.abc import Callable, Mapping
from typing import Any, cast

from py_stateful_map._cuda_state import torch_cuda_initialized

__all__ = [
    "move_to_cpu",
    "rebuild_tuple",
    "reduce_tensor",
    "synchronize_cuda",
    "tensor_pickler",
    "tensor_reducers",
    "tuple_fields",
]

_PROTOCOL = pickle.HIGHEST_PROTOCOL
#: Subclasses of picklers that keep their table on the class (cloudpickle), per torch.Tensor.
_WITH_TABLE: dict[tuple[type, type], type] = {}


def tensor_reducers() -> dict[type, Callable[[Any], Any]]:
    """Entries for a pickler's ``dispatch_table``; empty while torch is not imported."""
    torch = sys.modules.get("torch")
    return {} if torch is None else {torch.Tensor: reduce_tensor}


def tensor_pickler(
    stream: io.BytesIO,
    protocol: int,
    pickler_type: type[pickle.Pickler] = pickle.Pickler,
    **options: Any,
) -> pickle.Pickler:
    """A ``pickler_type`` that pickles tensors with :func:`reduce_tensor`.

    Its table *extends* copyreg's (a pickler's own ``dispatch_table`` replaces copyreg's, so
    registrations made with ``copyreg.pickle`` would otherwise be ignored). A pickler that
    keeps its table on the class, like cloudpickle's, gets a subclass: the C pickler reads that
    attribute once, at construction.
    """
    reducers = tensor_reducers()
    if not reducers:
        return pickler_type(stream, protocol, **options)
    class_table = getattr(pickler_type, "dispatch_table", None)
    if isinstance(class_table, Mapping):
        key = (pickler_type, next(iter(reducers)))
        subclass = _WITH_TABLE.get(key)
        if subclass is None:
            table = ChainMap(reducers, cast("dict[type, Any]", class_table))  # live view
            subclass = type(pickler_type.__name__, (pickler_type,), {"dispatch_table": table})
            _WITH_TABLE[key] = subclass
        return subclass(stream, protocol, **options)  # type: ignore[no-any-return]
    pickler = pickler_type(stream, protocol, **options)
    pickler.dispatch_table = {**copyreg.dispatch_table, **reducers}
    return pickler


def reduce_tensor(tensor: Any) -> tuple[Any, ...]:
    """Pickle ``tensor`` as a CPU tensor holding only its own elements (see module doc)."""
    torch = sys.modules["torch"]
    host = _on_host(torch, tensor)
    if host is None or host.layout is not torch.strided or host.is_quantized:
        return (host if host is not None else tensor).__reduce_ex__(_PROTOCOL)  # type: ignore[no-any-return]
    try:
        reduced = _as_array(torch, host.contiguous())
    except (TypeError, RuntimeError):  # e.g. a conjugate view: torch's own pickling copes
        return host.__reduce_ex__(_PROTOCOL)  # type: ignore[no-any-return]
    if tensor.requires_grad and tensor.is_leaf:  # no graph to lose: keep the flag, as torch does
        return (_requiring_grad, reduced)
    return reduced


def _on_host(torch: Any, tensor: Any) -> Any:
    """The tensor on the CPU, detached; None for a tensor without data (``meta``)."""
    kind = tensor.device.type
    if kind == "meta":
        return None
    if kind != "cpu":
        return tensor.detach().to("cpu")
    if torch_cuda_initialized() and tensor.is_pinned():
        synchronize_cuda(torch)
    return tensor.detach() if tensor.requires_grad else tensor


#: Integer dtypes of each element width, to carry dtypes numpy does not have.
_CARRIERS = {1: "uint8", 2: "int16", 4: "int32", 8: "int64"}


def _as_array(torch: Any, tensor: Any) -> tuple[Any, ...]:
    try:
        return (torch.from_numpy, (tensor.numpy(),))
    except TypeError:  # "Got unsupported ScalarType BFloat16": no numpy dtype
        carrier = _CARRIERS.get(tensor.element_size())
        if carrier is None:
            raise
        return (_view_as, (tensor.view(getattr(torch, carrier)).numpy(), tensor.dtype))


def _view_as(array: Any, dtype: Any) -> Any:
    """Rebuild a tensor of a dtype numpy lacks from the integers that carried its bytes."""
    import torch

    return torch.from_numpy(array).view(dtype)


def _requiring_grad(rebuild: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    """Rebuild a leaf tensor that required grad as a fresh leaf that requires grad."""
    return rebuild(*args).requires_grad_()


def synchronize_cuda(torch: Any) -> None:
    """Wait for all queued work, copies included, on every device this process has used.

    Devices without a context are skipped: synchronizing one would create a context there.
    """
    has_context = getattr(torch._C, "_cuda_hasPrimaryContext", None)
    if has_context is None:
        torch.cuda.synchronize()
        return
    for index in range(torch.cuda.device_count()):
        if has_context(index):
            torch.cuda.synchronize(index)


def move_to_cpu(value: Any) -> Any:
    """Copy tensors that live on a device to the CPU, inside lists, tuples and dicts too.

    Done before a batch's result is split, so that it takes one copy per tensor rather than
    one per row. Pending ``non_blocking`` copies are waited for (pinned CPU tensors). Mappings
    come back as plain dicts; named tuples and structseqs (``x.max(dim=1)``) keep their type;
    other objects are returned unchanged (their tensors are moved when the result is pickled).
    """
    torch = sys.modules.get("torch")
    if torch is None:
        return value
    pinned: list[bool] = []
    moved = _to_cpu(value, torch, pinned)
    if pinned:
        synchronize_cuda(torch)
    return moved


def _to_cpu(value: Any, torch: Any, pinned: list[bool]) -> Any:
    if isinstance(value, torch.Tensor):
        if value.device.type not in ("cpu", "meta"):
            return value.detach().to("cpu")
        if not pinned and value.device.type == "cpu" and torch_cuda_initialized():
            with contextlib.suppress(RuntimeError):
                if value.is_pinned():
                    pinned.append(True)
        return value
    if isinstance(value, Mapping):
        return {key: _to_cpu(item, torch, pinned) for key, item in value.items()}
    if isinstance(value, list):
        return [_to_cpu(item, torch, pinned) for item in value]
    if isinstance(value, tuple):
        return rebuild_tuple(value, [_to_cpu(item, torch, pinned) for item in value])
    return value


def tuple_fields(value: Any) -> tuple[str, ...] | None:
    """Field names of a named tuple or structseq (``torch.return_types.max``); else None."""
    if not isinstance(value, tuple):
        return None
    fields = getattr(value, "_fields", None)
    if fields is None and hasattr(type(value), "n_sequence_fields"):
        fields = getattr(type(value), "__match_args__", None)
    return tuple(fields) if fields is not None else None


def rebuild_tuple(record: tuple[Any, ...], items: list[Any]) -> tuple[Any, ...]:
    """A tuple of ``record``'s type holding ``items``: a named tuple or structseq keeps it."""
    kind = type(record)
    if kind is tuple:
        return tuple(items)
    if hasattr(record, "_make"):
        return kind._make(items)  # type: ignore[attr-defined, no-any-return]
    if hasattr(kind, "n_sequence_fields"):
        return kind(items)
    return tuple(items)
