"""Recognising a poisoned device inside a worker: errors after which every CUDA call fails.

A kernel that trips a device-side assert, reads an illegal address or is killed by the
driver (an Xid) leaves the process's CUDA context unusable. NVIDIA's runtime documentation
says it for ``cudaErrorIllegalAddress``, ``cudaErrorAssert``, ``cudaErrorLaunchFailure`` and
friends: "This leaves the process in an inconsistent state and any further CUDA work will
return the same error. To continue using CUDA, the process must be terminated and
relaunched." A worker that went on would fail every later item; it must answer what it
finished and exit, so a fresh worker runs the rest.

Runs inside the worker; matched on the error text, which is what torch raises (a
``RuntimeError``, or its ``torch.AcceleratorError`` subclass from torch 2.8 on).
"""

from __future__ import annotations

#: Fragments of the messages of CUDA's sticky errors, as torch words them.
STICKY_MESSAGES = (
    "device-side assert triggered",
    "an illegal memory access was encountered",
    "an illegal instruction was encountered",
    "misaligned address",
    "unspecified launch failure",
    "uncorrectable ECC error",
    "CUDA error: unknown error",
    "Xid",
)


class DevicePoisoned(Exception):
    """The items from ``start`` on were not (or not reliably) run: the device is poisoned.

    ``suspects`` items from ``start`` ran together into the error (a batch); the worker
    exits after answering, and the parent re-runs them one by one elsewhere.
    """

    def __init__(self, start: int, suspects: int, error: BaseException) -> None:
        super().__init__(f"device poisoned at offset {start}: {error}")
        self.start = start
        self.suspects = suspects
        self.error = error


def is_sticky_device_error(error: BaseException) -> bool:
    """Whether ``error`` leaves the device unusable for the rest of this process."""
    if not isinstance(error, RuntimeError):
        return False
    text = str(error)
    return any(fragment in text for fragment in STICKY_MESSAGES)
