"""Out-of-memory on a GPU: recognising it, and sharing a GPU fairly between workers.

Recognising: the caching allocator raises ``torch.OutOfMemoryError``, but the CUDA libraries
allocate their own workspaces and report failure in their own words, wrapped by torch in a
plain ``RuntimeError`` (``"CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling
`cublasCreate(handle)`"``, ``"cuDNN error: CUDNN_STATUS_ALLOC_FAILED"``, ``"cuFFT error:
CUFFT_ALLOC_FAILED"``, ``"cusolver error: CUSOLVER_STATUS_ALLOC_FAILED, when calling ..."``).
Each of those is a batch too big for the memory left, and a smaller batch may fit.

Sharing: with ``workers_per_device > 1`` several processes share one GPU, each with its own
caching allocator, which keeps what it once reserved. A worker that ran a big batch first would
keep that memory; its neighbour would run out, halve its batches down to single items and fail
them, while the first never notices. So each of the N workers on a GPU caps its allocator at
1/N of the device once CUDA is up in it (``torch.cuda.set_per_process_memory_fraction``; an
allocator at its cap frees its own cache and retries before raising). Every out-of-memory is
then the worker's own, and the back-off sizes each worker's batches to its own share. A cap the
user set is kept; a worker already holding more than 1/N (its model) keeps what it holds.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import Any

from py_stateful_map._cuda_state import torch_cuda_initialized

__all__ = ["WORKERS_ON_DEVICE", "MemoryShare", "is_out_of_memory"]

_log = logging.getLogger("py_stateful_map")

#: Set by DevicePool in each process worker's environment: how many workers share its GPU.
WORKERS_ON_DEVICE = "PY_STATEFUL_MAP_WORKERS_ON_DEVICE"

_OUT_OF_MEMORY = re.compile(
    r"CUDA out of memory"
    r"|CUDA error: out of memory"
    r"|CUDA_ERROR_OUT_OF_MEMORY"
    r"|\b(?:CUBLAS_STATUS|CUDNN_STATUS|CUFFT|CUSOLVER_STATUS|CUSPARSE_STATUS)_ALLOC_FAILED\b"
    r"|\bCURAND_STATUS_ALLOCATION_FAILED\b"
    # cuBLAS reports a handle it could not allocate memory for as "not initialized"
    r"|CUBLAS_STATUS_NOT_INITIALIZED when calling `cublasCreate"
)
_CHAIN_LIMIT = 8


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` (or an exception it was raised from) is a GPU out-of-memory error.

    >>> is_out_of_memory(RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"))
    True
    >>> is_out_of_memory(RuntimeError("CUDA error: device-side assert triggered"))
    False

    Never imports torch.
    """
    seen: BaseException | None = error
    for _ in range(_CHAIN_LIMIT):
        if seen is None:
            return False
        if _names_out_of_memory(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _names_out_of_memory(error: BaseException) -> bool:
    if any(kind.__name__ == "OutOfMemoryError" for kind in type(error).__mro__):
        return True  # torch's, and cupy's (a MemoryError)
    # torch raises every one of these as a RuntimeError; a ValueError quoting one is not one
    return isinstance(error, RuntimeError) and _OUT_OF_MEMORY.search(str(error)) is not None


class MemoryShare:
    """This worker's share of its GPU's memory when it shares the GPU with other workers.

    >>> MemoryShare(workers=1).claim()  # alone on its device: nothing to do
    True
    """

    def __init__(self, workers: int) -> None:
        self._workers = workers
        self._settled = workers <= 1

    @classmethod
    def from_environment(cls) -> MemoryShare:
        try:
            workers = int(os.environ.get(WORKERS_ON_DEVICE, "1"))
        except ValueError:
            workers = 1
        return cls(workers)

    def claim(self) -> bool:
        """Cap this process's allocator at its share, once CUDA is up; True once settled.

        Called after the worker's constructor and again on each out-of-memory, so a worker
        that loads its model lazily, on its first batch, still gets its cap.
        """
        if self._settled:
            return True
        torch = sys.modules.get("torch")
        if torch is None or not torch_cuda_initialized():
            return False
        self._settled = True
        try:
            self._cap(torch)
        except Exception as exc:  # an old or unusual torch: back-off still works without it
            _log.info("could not cap this worker's share of GPU memory: %s", exc)
        return True

    def _cap(self, torch: Any) -> None:
        cuda = torch.cuda
        device = cuda.current_device()
        current = getattr(cuda, "get_per_process_memory_fraction", lambda _: 1.0)(device)
        if current < 1.0:
            return  # the user chose a cap
        total = cuda.get_device_properties(device).total_memory
        held = cuda.memory_reserved(device) / total if total else 0.0
        fraction = min(1.0, max(1.0 / self._workers, held))
        cuda.set_per_process_memory_fraction(fraction, device)
        _log.info(
            "GPU shared by %d workers: this one may use %.0f%%", self._workers, 100 * fraction
        )
