"""numpy arrays and torch tensors in the tagged format of ``checkpoint.tagged``.

The tags ``a g x A G X`` of that format's grammar. A numpy value is stored as its dtype's
string (``"<f4"``, ``">i8"``, ``"<M8[ns]"``, ``"<U3"``: byte order included), its shape, and
its elements' raw bytes in C order; reading parses the dtype only after it matched a plain
numeric, bool, date or fixed-width string pattern, and refuses any object, structured or
empty dtype (``np.load(allow_pickle=True)`` is never involved). A CPU torch tensor is its
dtype's name and its elements through numpy (a dtype numpy lacks, bfloat16: integers of the
same width, viewed back). numpy and torch are looked up in ``sys.modules`` to write (a value
of theirs exists only if they are imported) and imported to read only when such a tag is met.

Also the few pieces both modules use: :class:`Unsupported`, :func:`take`.
"""

from __future__ import annotations

import importlib
import math
import re
import struct
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["ARRAY_READERS", "Out", "Read", "Unsupported", "end", "packer_for", "take", "writer_for"]

Out = list[Any]  # bytes-like pieces, joined once at the end
Read = tuple[Any, int]  # a value, and the position after it

_ARRAY_KINDS = frozenset("biufcmMSU")
_DTYPE = re.compile(r"[<>|=]?[biufcmMSU][0-9]{1,5}(\[[0-9]{0,6}[a-zA-Z]{1,2}\])?\Z")
_TORCH_DTYPE = re.compile(r"[a-z][a-z0-9_]{0,31}\Z")
_MAX_DIMS = 64
_REQUIRES_GRAD = 1
#: Integer dtypes of each element width, to carry the tensor dtypes numpy does not have.
_CARRIERS = {1: "uint8", 2: "int16", 4: "int32", 8: "int64"}


class Unsupported(Exception):
    """A value this format has no tag for; the caller stores it another way."""


def take(data: bytes, pos: int, size: int) -> bytes:
    """``data[pos : pos + size]`` (a copy), or ValueError if the data ends before."""
    return data[pos : end(data, pos, size)]


def end(data: bytes, pos: int, size: int) -> int:
    """``pos + size``, or ValueError if the data ends before (for reading in place)."""
    if pos + size > len(data):
        raise ValueError(f"truncated: {size} bytes wanted at byte {pos} of {len(data)}")
    return pos + size


# -- writing ------------------------------------------------------------------------------


def writer_for(value: Any) -> Callable[[Any, Out], None]:
    """The writer of a numpy or torch value; :class:`Unsupported` for anything else."""
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        if type(value) is numpy.ndarray:
            return _write_ndarray
        if isinstance(value, numpy.generic):
            return _write_numpy_scalar
    torch = sys.modules.get("torch")
    if torch is not None and type(value) is torch.Tensor:
        return _write_tensor
    raise Unsupported(type(value).__qualname__)


def packer_for(kind: type) -> Callable[[Any, Out], bool] | None:
    """The packer of a list of numpy or torch values of type ``kind``, if it is one."""
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        if kind is numpy.ndarray:
            return _pack_ndarrays
        if issubclass(kind, numpy.generic):
            return _pack_numpy_scalars
    torch = sys.modules.get("torch")
    if torch is not None and kind is torch.Tensor:
        return _pack_tensors
    return None


def _array(tag: bytes, value: Any, out: Out) -> None:
    """``tag``, then the array part of the grammar (any dtype of a plain kind)."""
    dtype = value.dtype
    if dtype.kind not in _ARRAY_KINDS or dtype.itemsize == 0 or value.ndim > _MAX_DIMS:
        raise Unsupported(f"numpy dtype {dtype}")
    name = dtype.str.encode("ascii")
    numpy = sys.modules["numpy"]
    raw = numpy.ascontiguousarray(value).reshape(-1).view(numpy.uint8)
    dims = struct.pack(f"<B{value.ndim}Q", value.ndim, *value.shape)
    out += (tag, bytes((len(name),)), name, dims, raw)


def _write_ndarray(value: Any, out: Out) -> None:
    _array(b"a", value, out)


def _write_numpy_scalar(value: Any, out: Out) -> None:
    _array(b"g", sys.modules["numpy"].asarray(value), out)


def _pack_ndarrays(values: list[Any], out: Out) -> bool:
    first = values[0]
    shape, dtype = first.shape, first.dtype
    if any(value.shape != shape or value.dtype != dtype for value in values):
        return False
    stacked = sys.modules["numpy"].stack(values)
    if stacked.dtype != dtype:  # stack() gives the native byte order
        stacked = stacked.astype(dtype)
    _array(b"A", stacked, out)
    return True


def _pack_numpy_scalars(values: list[Any], out: Out) -> bool:
    dtype = values[0].dtype
    if any(value.dtype != dtype for value in values):
        return False
    _array(b"G", sys.modules["numpy"].array(values, dtype=dtype), out)
    return True


def _tensor(tensor: Any, out: Out) -> None:
    """The dtype's name and the elements as an array (the part after a tensor's tag)."""
    torch = sys.modules["torch"]
    if (
        tensor.device.type != "cpu"
        or tensor.layout is not torch.strided
        or tensor.is_quantized
        or tensor.is_nested
    ):
        raise Unsupported(f"torch tensor ({tensor.device}, {tensor.layout})")
    host = tensor.detach().resolve_conj().resolve_neg()
    try:
        elements = host.numpy()
    except TypeError:  # "Got unsupported ScalarType BFloat16": no numpy dtype
        carrier = _CARRIERS.get(host.element_size())
        if carrier is None:
            raise Unsupported(f"torch dtype {tensor.dtype}") from None
        elements = host.contiguous().view(getattr(torch, carrier)).numpy()
    name = str(tensor.dtype).removeprefix("torch.").encode("ascii")
    out += (bytes((len(name),)), name)
    _array(b"", elements, out)


def _write_tensor(value: Any, out: Out) -> None:
    flags = _REQUIRES_GRAD if value.requires_grad and value.is_leaf else 0
    out += (b"x", bytes((flags,)))
    _tensor(value, out)


def _pack_tensors(values: list[Any], out: Out) -> bool:
    first = values[0]
    shape, dtype, device = first.shape, first.dtype, first.device
    for value in values:
        if value.shape != shape or value.dtype != dtype or value.device != device:
            return False
        if value.requires_grad or value.is_quantized or value.is_nested:
            return False
    if device.type != "cpu":
        return False
    out.append(b"X")
    _tensor(sys.modules["torch"].stack(values), out)
    return True


# -- reading ------------------------------------------------------------------------------


def _module(name: str) -> Any:
    return sys.modules.get(name) or importlib.import_module(name)


def _read_array(data: bytes, pos: int, *, copy: bool = True) -> Read:
    numpy = _module("numpy")
    size = data[pos]
    name = take(data, pos + 1, size).decode("ascii")
    if not _DTYPE.match(name):
        raise ValueError(f"not a plain numpy dtype: {name!r}")
    dtype = numpy.dtype(name)
    if dtype.kind not in _ARRAY_KINDS or dtype.itemsize == 0:
        raise ValueError(f"not a plain numpy dtype: {name!r}")
    pos += 1 + size
    ndim = data[pos]
    if ndim > _MAX_DIMS:
        raise ValueError(f"{ndim} dimensions")
    shape = struct.unpack_from(f"<{ndim}Q", data, pos + 1)
    pos += 1 + 8 * ndim
    count = math.prod(shape)
    after = end(data, pos, count * dtype.itemsize)
    elements = numpy.frombuffer(data, dtype, count, pos).reshape(shape)
    return (elements.copy() if copy else elements), after


def _read_arrays(data: bytes, pos: int) -> Read:
    stacked, pos = _read_array(data, pos, copy=False)
    if stacked.ndim == 0:
        raise ValueError("stacked arrays: a 0-d array")
    return [stacked[i, ...].copy() for i in range(len(stacked))], pos  # each its own memory


def _read_numpy_scalar(data: bytes, pos: int) -> Read:
    elements, pos = _read_array(data, pos, copy=False)
    if elements.ndim != 0:
        raise ValueError("numpy scalar: not a 0-d array")
    return elements[()], pos


def _read_numpy_scalars(data: bytes, pos: int) -> Read:
    elements, pos = _read_array(data, pos, copy=False)
    if elements.ndim != 1:
        raise ValueError("numpy scalars: not a 1-d array")
    return list(elements), pos


def _torch_dtype(data: bytes, pos: int) -> tuple[Any, Any, int]:
    torch = _module("torch")
    size = data[pos]
    name = take(data, pos + 1, size).decode("ascii")
    # the module's own names only: getattr() would run torch's __getattr__ (lazy imports)
    dtype = vars(torch).get(name) if _TORCH_DTYPE.match(name) else None
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"not a torch dtype: {name!r}")
    return torch, dtype, pos + 1 + size


def _as_tensor(torch: Any, elements: Any, dtype: Any) -> Any:
    tensor = torch.from_numpy(elements)
    return tensor if tensor.dtype == dtype else tensor.view(dtype)


def _read_tensor(data: bytes, pos: int) -> Read:
    flags = data[pos]
    torch, dtype, pos = _torch_dtype(data, pos + 1)
    elements, pos = _read_array(data, pos)
    tensor = _as_tensor(torch, elements, dtype)
    if flags & _REQUIRES_GRAD:
        tensor.requires_grad_()
    return tensor, pos


def _read_tensors(data: bytes, pos: int) -> Read:
    torch, dtype, pos = _torch_dtype(data, pos)
    stacked, pos = _read_array(data, pos, copy=False)
    if stacked.ndim == 0:
        raise ValueError("stacked tensors: a 0-d array")
    return [_as_tensor(torch, stacked[i, ...].copy(), dtype) for i in range(len(stacked))], pos


ARRAY_READERS: dict[int, Callable[[bytes, int], Read]] = {
    ord("a"): _read_array,
    ord("g"): _read_numpy_scalar,
    ord("x"): _read_tensor,
    ord("A"): _read_arrays,
    ord("G"): _read_numpy_scalars,
    ord("X"): _read_tensors,
}
