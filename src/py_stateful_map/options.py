"""A pool's options, validated once into one frozen, typed record.

``StateFullWorkerPool``, ``DevicePool`` and the pqdm drop-ins all build a :class:`PoolOptions`
and read it; nothing below re-validates or re-routes keyword dictionaries. Two steps, because
``DevicePool`` learns how many workers it runs only after it has placed them on devices::

    PoolOptions.create(worker_class_or_func=..., **keywords)    every check that needs no count
        │   (DevicePool: place workers on devices, build each one's kwargs and environment)
        ▼
    options.for_workers(count, worker_kwarg_dict_arr=..., ...)  the per-worker lists, checked
                                                                 against the count

The field names are the public keyword names, so a keyword means the same thing on every
entry point. ``use_threads=True`` is read once, as ``backend="threads"``; ``num_workers=0`` as
``backend="inline"``.

>>> options = PoolOptions.create(num_workers=2, worker_class_or_func=abs, backend="threads")
>>> options.backend, options.slot_count, options.exception_behavior.name
('threads', 2, 'IMMEDIATE')
>>> PoolOptions.create(num_workers=2, worker_class_or_func=abs, chunk_size=0)
Traceback (most recent call last):
...
ValueError: chunk_size must be a positive int or None, got 0
"""

from __future__ import annotations

import dataclasses
import inspect
import multiprocessing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from py_stateful_map.core.length_batching import LengthBatching
from py_stateful_map.results import ArgumentPassing, ExceptionBehavior
from py_stateful_map.worker.prefetch import check_prefetch
from py_stateful_map.worker.runtime import builds_state

BACKENDS = ("processes", "threads", "inline", "ray")
#: Backends whose workers can be killed, so a stuck item can be timed out.
KILLABLE_BACKENDS = ("processes", "ray")


def default_start_method() -> str:
    """``forkserver`` where available: CUDA-safe (never forks a CUDA parent) and fast to start.

    Workers fork from a clean server process instead of the caller, so a parent that has
    initialized CUDA, or holds threads and locks, cannot poison them; ``spawn`` elsewhere.
    """
    methods = multiprocessing.get_all_start_methods()
    return "forkserver" if "forkserver" in methods else "spawn"


@dataclass(frozen=True, kw_only=True)
class PoolOptions:
    """Every option of a pool, checked; see ``StateFullWorkerPool`` for what each one does.

    ``num_workers`` is None only between :meth:`create` and :meth:`for_workers` (a
    ``DevicePool`` counts its workers from the devices).
    """

    worker_class_or_func: Callable[..., Any]
    num_workers: int | None = None
    shared_kwarg_dict: Mapping[str, Any] = field(default_factory=dict)
    worker_kwarg_dict_arr: Sequence[Mapping[str, Any]] | None = None
    argument_passing: ArgumentPassing = ArgumentPassing.AS_SINGLE_ARG
    exception_behavior: ExceptionBehavior = ExceptionBehavior.IMMEDIATE
    backend: str = "processes"
    join_timeout: float | None = None
    chunk_size: int | None = None
    start_method: str = field(default_factory=default_start_method)
    max_retries: int = 1
    max_restarts: int | None = None
    task_timeout: float | None = None
    init_timeout: float | None = None
    max_tasks_per_worker: int | None = None
    batch_size: int | None = None
    collate_fn: Callable[[list[Any]], Any] | None = None
    prefetch: int = 1
    worker_env_arr: Sequence[Mapping[str, str]] | None = None
    worker_device_arr: Sequence[str | None] | None = None
    init_concurrency: int | None = None
    progress: Any = None
    on_result: Callable[[Any], Any] | None = None
    ray_address: str | None = None
    ray_actor_options: Sequence[Mapping[str, Any]] | Mapping[str, Any] | None = None
    read_input_in_thread: bool = True
    length_fn: Callable[[Any], Any] | None = None
    max_batch_tokens: float | None = None
    sort_window: int | None = None
    #: Derived: the validated length-aware batching, or None without ``length_fn``.
    length_batching: LengthBatching | None = field(init=False, default=None)

    @classmethod
    def create(cls, *, use_threads: bool = False, **keywords: Any) -> PoolOptions:
        """The options from public keywords; an unknown keyword is a ``TypeError`` naming it.

        ``None`` for ``start_method``, ``shared_kwarg_dict``, ``argument_passing`` or
        ``exception_behavior`` means the default, as it does in the public signatures.
        """
        unknown = sorted(set(keywords) - OPTION_NAMES)
        if unknown:
            raise TypeError(
                f"unexpected pool option(s) {', '.join(map(repr, unknown))}; the options are: "
                f"{', '.join(sorted(OPTION_NAMES | {'use_threads'}))}"
            )
        given = {name: value for name, value in keywords.items() if value is not None}
        for name in ("max_retries", "prefetch", "read_input_in_thread"):
            if name in keywords and keywords[name] is None:
                given[name] = None  # None is no default for these: let the check name it
        if use_threads:
            given["backend"] = "threads"
        if given.get("num_workers") == 0:  # whichever backend: one worker, in this thread
            given["backend"] = "inline"
        return cls(**given)

    def for_workers(self, count: int, **per_worker: Any) -> PoolOptions:
        """These options for ``count`` workers, with per-worker lists checked against it."""
        return dataclasses.replace(self, num_workers=count, **per_worker)

    @property
    def slot_count(self) -> int:
        """How many workers run (one for ``num_workers=0``, which runs it inline)."""
        return max(1, self.num_workers or 0)

    def actor_options(self) -> list[dict[str, Any]]:
        """``ray_actor_options`` as one dict per worker (one dict given applies to every one)."""
        given = self.ray_actor_options
        if isinstance(given, Mapping):
            return [dict(given) for _ in range(self.slot_count)]
        return [dict(entry) for entry in given or [{}] * self.slot_count]

    @property
    def killable(self) -> bool:
        """Whether a stuck worker can be killed (so items can be timed out)."""
        return self.backend in KILLABLE_BACKENDS

    def __post_init__(self) -> None:
        _freeze(self, "argument_passing", ArgumentPassing(self.argument_passing))
        _freeze(self, "exception_behavior", ExceptionBehavior(self.exception_behavior))
        _freeze(self, "shared_kwarg_dict", dict(self.shared_kwarg_dict))
        for check in _CHECKS:
            check(self)
        _freeze(
            self,
            "length_batching",
            LengthBatching.from_options(
                self.batch_size, self.length_fn, self.max_batch_tokens, self.sort_window
            ),
        )


def _freeze(options: PoolOptions, name: str, value: Any) -> None:
    """Set a normalized value on the frozen record, once, while it is being built."""
    object.__setattr__(options, name, value)


def _is_count(value: object, *, least: int) -> bool:
    """An int (not a bool, which is one too) of at least ``least``."""
    return not isinstance(value, bool) and isinstance(value, int) and value >= least


def _check_workers(options: PoolOptions) -> None:
    count = options.num_workers
    if count is not None and not _is_count(count, least=0):
        raise ValueError(f"num_workers must be an int >= 0, got {count!r}")
    if options.backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {options.backend!r}")
    if options.backend == "inline" and count not in (None, 0, 1):
        raise ValueError("backend='inline' runs one worker in this thread: use num_workers=0")


def _check_worker(options: PoolOptions) -> None:
    worker = options.worker_class_or_func
    if not callable(worker):
        raise TypeError(f"worker_class_or_func must be a class or a function, got {worker!r}")
    has_kwargs = bool(options.shared_kwarg_dict) or any(options.worker_kwarg_dict_arr or ())
    if has_kwargs and not builds_state(worker):
        kind = "a class whose instances are not callable" if inspect.isclass(worker) else ""
        raise ValueError(
            f"{getattr(worker, '__name__', worker)!r} is {kind or 'a function'}, so it is "
            "called per item and takes no init kwargs; pass a class whose __init__ takes them "
            "(and whose __call__ processes an item)"
        )


def _check_counts(options: PoolOptions) -> None:
    for name in ("chunk_size", "batch_size", "max_tasks_per_worker", "init_concurrency"):
        value = getattr(options, name)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    for name in ("max_retries", "max_restarts"):
        value = getattr(options, name)
        if name == "max_restarts" and value is None:
            continue
        if not _is_count(value, least=0):
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    check_prefetch(options.prefetch)
    if not isinstance(options.read_input_in_thread, bool):
        raise ValueError(
            f"read_input_in_thread must be True or False, got {options.read_input_in_thread!r}"
        )


def _check_timeouts(options: PoolOptions) -> None:
    for name in ("task_timeout", "init_timeout", "join_timeout"):
        timeout = getattr(options, name)
        if timeout is None:
            continue
        least = 0 if name == "join_timeout" else None
        if isinstance(timeout, bool) or not isinstance(timeout, int | float):
            raise ValueError(f"{name} must be a number of seconds or None, got {timeout!r}")
        if (least is None and timeout <= 0) or (least is not None and timeout < least):
            bound = ">= 0" if least is not None else "> 0"
            raise ValueError(f"{name} must be a number of seconds {bound} or None, got {timeout!r}")
        if name != "join_timeout" and not options.killable:
            raise ValueError(
                f"{name} needs backend='processes' or 'ray': a stuck {options.backend} worker "
                "cannot be killed, only a process can"
            )
    if options.task_timeout is not None and options.chunk_size not in (None, 1):
        raise ValueError("task_timeout times each item, so it needs chunk_size=None or 1")


def _check_batching(options: PoolOptions) -> None:
    if options.batch_size is None:
        return
    if options.argument_passing is not ArgumentPassing.AS_SINGLE_ARG:
        raise ValueError("batch_size hands the worker a list of items: use AS_SINGLE_ARG")
    if options.chunk_size is not None:
        raise ValueError(
            f"chunk_size={options.chunk_size} and batch_size={options.batch_size} both size "
            "what a worker receives: with batch_size, a worker receives whole batches (and "
            "prepare() overlaps them), so leave chunk_size unset"
        )
    if options.collate_fn is not None and not callable(options.collate_fn):
        raise TypeError(f"collate_fn must be callable, got {options.collate_fn!r}")


def _check_start_method(options: PoolOptions) -> None:
    if options.backend != "processes":
        return
    methods = multiprocessing.get_all_start_methods()
    if options.start_method not in methods:
        raise ValueError(
            f"start_method must be one of {methods} on this platform, got {options.start_method!r}"
        )


def _check_per_worker(options: PoolOptions) -> None:
    if options.num_workers is None:
        return  # DevicePool: checked by for_workers() once the workers are counted
    for name in ("worker_kwarg_dict_arr", "worker_env_arr", "worker_device_arr"):
        entries = getattr(options, name)
        if entries is not None and len(entries) != options.slot_count:
            raise ValueError(
                f"{name} has {len(entries)} entries for {options.slot_count} worker(s); give "
                "exactly one per worker"
            )
    actor_options = options.ray_actor_options
    if isinstance(actor_options, Sequence) and len(actor_options) != options.slot_count:
        raise ValueError(
            f"ray_actor_options has {len(actor_options)} entries for {options.slot_count} "
            "worker(s); give exactly one per worker"
        )


_CHECKS: tuple[Callable[[PoolOptions], None], ...] = (
    _check_workers,
    _check_worker,
    _check_counts,
    _check_timeouts,
    _check_batching,
    _check_start_method,
    _check_per_worker,
)

#: The public keyword of every option (``use_threads`` aside, which ``create`` reads).
OPTION_NAMES = frozenset(f.name for f in dataclasses.fields(PoolOptions) if f.init)

__all__ = ["BACKENDS", "KILLABLE_BACKENDS", "OPTION_NAMES", "PoolOptions", "default_start_method"]
