"""The values a pool hands back, and the enums that steer how items are passed and errors raised.

These live apart from the pool so that worker-side code and user type hints can import them
without pulling in any scheduling machinery.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any, Generic

if TYPE_CHECKING:  # PEP 696 default: an un-annotated pool is a pool of Any, not an error
    from typing_extensions import TypeVar

    T = TypeVar("T", default=Any)
else:
    from typing import TypeVar

    T = TypeVar("T")


class ArgumentPassing(enum.Enum):
    """How one input item becomes the arguments of the worker's call.

    >>> ArgumentPassing.AS_ARGS  # item (1, 2) calls worker(1, 2)
    <ArgumentPassing.AS_ARGS: 'args'>
    """

    AS_SINGLE_ARG = "single"
    AS_ARGS = "args"
    AS_KWARGS = "kwargs"


class ExceptionBehavior(enum.Enum):
    """What the caller sees when an item raises.

    - ``DEFERRED``: the item comes back with ``exception_obj`` set; the map goes on.
    - ``IMMEDIATE``: the exception is raised as soon as it reaches the parent, without
      waiting for items in flight.
    - ``IMMEDIATE_WAIT_OTHERS``: no new items are started; items already handed to workers
      finish, then the exception is raised.
    """

    DEFERRED = "deferred"
    IMMEDIATE = "immediate"
    IMMEDIATE_WAIT_OTHERS = "immediate_wait_others"


class WorkerResultWrapper(Generic[T]):
    """One item's outcome: its position in the input, its value, or the exception it raised.

    A plain slotted class (not a dataclass or named tuple) because the pool creates one per
    item on its hottest path; this is the cheapest object Python can build with named fields.

    >>> r = WorkerResultWrapper(3, "x", None)
    >>> r.obj_id, r.ret_val, r.exception_obj
    (3, 'x', None)
    """

    __slots__ = ("exception_obj", "obj_id", "ret_val")
    #: True for an outcome replayed from a checkpoint (an earlier run computed it).
    from_checkpoint = False

    def __init__(self, obj_id: int, ret_val: T | None, exception_obj: BaseException | None) -> None:
        self.obj_id = obj_id
        self.ret_val = ret_val
        self.exception_obj = exception_obj

    @property
    def ok(self) -> bool:
        """True when the item produced a value rather than an exception."""
        return self.exception_obj is None

    def __repr__(self) -> str:
        if self.exception_obj is None:
            return f"WorkerResultWrapper(obj_id={self.obj_id}, ret_val={self.ret_val!r})"
        return f"WorkerResultWrapper(obj_id={self.obj_id}, exception_obj={self.exception_obj!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, WorkerResultWrapper):
            return NotImplemented
        return (self.obj_id, self.ret_val, self.exception_obj) == (
            other.obj_id,
            other.ret_val,
            other.exception_obj,
        )

    __hash__ = None  # type: ignore[assignment]  # mutable value object

    def __reduce__(self) -> tuple[Any, ...]:
        return (WorkerResultWrapper, (self.obj_id, self.ret_val, self.exception_obj))


class ResumedResult(WorkerResultWrapper[T]):
    """An outcome replayed from a checkpoint: an earlier run computed it, no worker ran it now.

    >>> ResumedResult(0, "x", None).from_checkpoint
    True
    """

    __slots__ = ()
    from_checkpoint = True
