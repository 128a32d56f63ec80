"""Is CUDA up in this process? Answered without importing or initializing anything.

Both sides ask: the parent before it forks (a forked child of a process that ran ``cuInit``
cannot use CUDA), a worker before it applies its device mask, before it syncs or empties the
cache, before it pins memory on a thread. Standard library only, and a leaf: any module of
the package may import it.
"""

from __future__ import annotations

import ctypes
import os
import sys

#: What every driver call answers before ``cuInit``.
CUDA_ERROR_NOT_INITIALIZED = 3


def torch_cuda_initialized() -> bool:
    """Whether torch, if something imported it, has set up its CUDA context here.

    Reads ``sys.modules`` only: a process that never imported torch did not initialize it.
    """
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    try:
        return bool(torch.cuda.is_initialized())
    except Exception:  # a CPU-only, half-imported or stubbed torch cannot have initialized it
        return False


def cuda_driver_initialized() -> bool:
    """Whether this process has called ``cuInit`` (through any library); loads nothing.

    ``RTLD_NOLOAD`` finds libcuda only if something already loaded it. Before ``cuInit``
    every driver call returns ``CUDA_ERROR_NOT_INITIALIZED``; any other answer means it ran.
    (A process forked after its parent ran ``cuInit`` also gets that error.) The same test
    as vllm-project/vllm#44252.
    """
    lib = loaded_libcuda()
    if lib is None:
        return False
    count = ctypes.c_int(0)
    try:
        return bool(lib.cuDeviceGetCount(ctypes.byref(count)) != CUDA_ERROR_NOT_INITIALIZED)
    except AttributeError:
        return False


def cuda_initialized_in_this_process() -> bool:
    """Whether CUDA was initialized here: by torch, or the driver by anyone.

    ``torch.cuda.is_initialized()`` alone misses the common case: ``torch.cuda.is_available()``
    and ``device_count()`` call ``cudaGetDeviceCount``, which runs ``cuInit`` without setting
    up torch's context.
    """
    return torch_cuda_initialized() or cuda_driver_initialized()


def loaded_libcuda() -> ctypes.CDLL | None:
    """The CUDA driver library if something in this process already loaded it, else None."""
    for name in ("libcuda.so.1", "libcuda.so"):
        try:
            return ctypes.CDLL(name, mode=getattr(os, "RTLD_NOLOAD", 4))
        except OSError:
            continue
    return None
