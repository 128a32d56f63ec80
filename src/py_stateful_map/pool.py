"""``StateFullWorkerPool``: the public face of the core — options, lifecycle and ``map()``.

The pool validates options, picks a backend, starts every worker (each builds its state once,
inside the worker) and then serves any number of ``map()`` calls on those live workers. The
moving parts live elsewhere: ``core.map_run`` streams one map, ``core.dispatcher`` keeps the workers
and applies the fault policy, ``backends/*`` carry messages, ``worker.runtime`` runs inside
the worker.
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Generic, NoReturn

from py_stateful_map.backends.base import Backend
from py_stateful_map.checkpoint.api import Checkpoint, as_checkpoint
from py_stateful_map.checkpoint.run import CheckpointRun
from py_stateful_map.core.chunking import ChunkMemory, ChunkSizer
from py_stateful_map.core.dispatcher import Dispatcher, FaultPolicy
from py_stateful_map.core.map_run import MapResult, MapRun
from py_stateful_map.core.progress import (
    ProgressOption,
    ResultCallback,
    resolve_progress,
    with_progress,
)
from py_stateful_map.core.slots import WorkerSlot
from py_stateful_map.errors import PoolBrokenError
from py_stateful_map.options import PoolOptions
from py_stateful_map.results import ArgumentPassing, ExceptionBehavior, T, WorkerResultWrapper
from py_stateful_map.stats import PoolStats
from py_stateful_map.worker.prefetch import chunk_batches
from py_stateful_map.worker.runtime import WorkerSpec

#: A map's ``checkpoint=``: a ``Checkpoint``, a path, or None.
CheckpointOption = Checkpoint | str | os.PathLike[str] | None

logger = logging.getLogger("py_stateful_map")


#: Seconds a normal ``close()`` waits for workers when ``join_timeout`` is None.
DEFAULT_JOIN_TIMEOUT = 10.0
#: Seconds a cancelling ``close()`` (exception, abandoned map) waits before terminating.
DEFAULT_CANCEL_GRACE = 1.0


class StateFullWorkerPool(Generic[T]):
    """A pool of workers that each build their state once, then process a stream of items.

    >>> class Doubler:
    ...     def __init__(self, factor: int) -> None:
    ...         self.factor = factor            # e.g. load a model here, once per worker
    ...     def __call__(self, x: int) -> int:
    ...         return x * self.factor
    >>> with StateFullWorkerPool(2, Doubler, {"factor": 2}, backend="threads") as pool:
    ...     [r.ret_val for r in pool.map(range(5))]
    [0, 2, 4, 6, 8]

    ``num_workers=0`` runs one worker in the calling thread (for debugging). ``join_timeout``
    bounds how long closing waits for busy workers before terminating them (None: 10 s after
    a normal exit, 1 s after an exception or an abandoned map; Ctrl-C terminates at once).
    ``progress=True`` shows a ``tqdm.auto`` bar for every map (or pass any callable that wraps
    an iterable and takes ``total=``, e.g. ``rich.progress.track``); ``on_result`` is called
    with each result as the caller receives it. ``worker_env_arr`` sets environment variables
    in each worker process before any user code is imported (e.g. ``OMP_NUM_THREADS``).
    ``batch_size`` hands the worker lists of items (see ``DevicePool``); a worker class that
    defines ``prepare(batch)`` is called as ``__call__(prepare(batch))``, with ``prepare`` of
    the next ``prefetch`` batches (default 1; 0 = inline) running on one background thread
    while ``__call__`` runs. ``length_fn`` (with ``batch_size``) batches by cost: a window of
    ``sort_window`` items is sorted by ``length_fn(item)`` and cut into batches of similar cost
    within ``max_batch_tokens`` (items x longest); results still come back per item.
    ``read_input_in_thread`` (default True) reads an iterator input on a bounded feeder
    thread, so an input that waits for the caller's results cannot deadlock; pass False for
    iterators bound to their thread (``sqlite3`` cursors). With
    ``backend="ray"`` each worker is a Ray actor: ``ray_address`` picks the cluster (else an
    initialized Ray, else ``RAY_ADDRESS``, else a local instance) and ``ray_actor_options``
    (one dict per worker, e.g. ``{"num_gpus": 0.5}``) is passed to ``.options()``.

    ``close()`` may be called from any thread; a pool is never pickled or sent to a worker.
    """

    def __init__(
        self,
        num_workers: int,
        worker_class_or_func: Callable[..., Any],
        shared_kwarg_dict: dict[str, Any] | None = None,
        worker_kwarg_dict_arr: Sequence[dict[str, Any]] | None = None,
        argument_passing: ArgumentPassing = ArgumentPassing.AS_SINGLE_ARG,
        exception_behavior: ExceptionBehavior = ExceptionBehavior.IMMEDIATE,
        use_threads: bool = False,
        join_timeout: float | None = None,
        chunk_size: int | None = None,
        start_method: str | None = None,
        max_retries: int = 1,
        max_restarts: int | None = None,
        task_timeout: float | None = None,
        init_timeout: float | None = None,
        max_tasks_per_worker: int | None = None,
        backend: str = "processes",
        *,
        batch_size: int | None = None,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        prefetch: int = 1,
        worker_env_arr: Sequence[dict[str, str]] | None = None,
        worker_device_arr: Sequence[str] | None = None,
        init_concurrency: int | None = None,
        progress: ProgressOption = None,
        on_result: ResultCallback | None = None,
        ray_address: str | None = None,
        ray_actor_options: Sequence[dict[str, Any]] | None = None,
        read_input_in_thread: bool = True,
        length_fn: Callable[[Any], Any] | None = None,
        max_batch_tokens: float | None = None,
        sort_window: int | None = None,
    ) -> None:
        self._open(
            PoolOptions.create(
                num_workers=num_workers,
                worker_class_or_func=worker_class_or_func,
                shared_kwarg_dict=shared_kwarg_dict,
                worker_kwarg_dict_arr=worker_kwarg_dict_arr,
                argument_passing=argument_passing,
                exception_behavior=exception_behavior,
                use_threads=use_threads,
                join_timeout=join_timeout,
                chunk_size=chunk_size,
                start_method=start_method,
                max_retries=max_retries,
                max_restarts=max_restarts,
                task_timeout=task_timeout,
                init_timeout=init_timeout,
                max_tasks_per_worker=max_tasks_per_worker,
                backend=backend,
                batch_size=batch_size,
                collate_fn=collate_fn,
                prefetch=prefetch,
                worker_env_arr=worker_env_arr,
                worker_device_arr=worker_device_arr,
                init_concurrency=init_concurrency,
                progress=progress,
                on_result=on_result,
                ray_address=ray_address,
                ray_actor_options=ray_actor_options,
                read_input_in_thread=read_input_in_thread,
                length_fn=length_fn,
                max_batch_tokens=max_batch_tokens,
                sort_window=sort_window,
            )
        )

    @classmethod
    def from_options(cls, options: PoolOptions) -> StateFullWorkerPool[T]:
        """A pool from options built with :meth:`PoolOptions.create` (the pqdm drop-ins)."""
        pool: StateFullWorkerPool[T] = cls.__new__(cls)
        pool._open(options)
        return pool

    def _open(self, options: PoolOptions) -> None:
        """Start the workers the options describe; every option was checked already."""
        if options.num_workers is None:
            raise ValueError("these options count no workers yet: call options.for_workers(n)")
        #: The options this pool runs with (read-only).
        self.options = options
        self._slot_count = options.slot_count
        self.backend_name = options.backend
        self.start_method = options.start_method
        self._progress = resolve_progress(options.progress)
        self._owner_pid = os.getpid()
        self._chunk_memory = ChunkMemory()  # each map's chunk sizes start from the last's
        self._batches_per_chunk, self._chunk_size = _chunking_of(options)
        self._backend = self._make_backend(_worker_specs(options), _worker_envs(options))
        self._closed = False
        self._finalizer = weakref.finalize(self, _shutdown_if_owner, self._backend, self._owner_pid)
        devices = list(options.worker_device_arr or [None] * self._slot_count)
        slots = [WorkerSlot(index=i, device=devices[i]) for i in range(self._slot_count)]
        policy = FaultPolicy(
            options.max_retries,
            options.max_restarts,
            options.task_timeout,
            options.init_timeout,
            options.max_tasks_per_worker,
            options.init_concurrency,
        )
        self._dispatcher = Dispatcher(self._backend, slots, policy)
        try:
            self._dispatcher.start_all()
        except BaseException:
            self.close(cancel=True)
            raise
        logger.info("started %d %s worker(s)", self._slot_count, self.backend_name)

    def _make_backend(self, specs: list[WorkerSpec], envs: list[dict[str, str]]) -> Backend:
        if self.backend_name == "inline":
            from py_stateful_map.backends.inline import InlineBackend

            return InlineBackend(specs[0])
        if self.backend_name == "threads":
            from py_stateful_map.backends.threads import ThreadBackend

            return ThreadBackend(specs)
        if self.backend_name == "ray":
            from py_stateful_map.backends.ray.driver.backend import RayBackend

            actor_options = self.options.actor_options()
            return RayBackend(specs, envs, actor_options, address=self.options.ray_address)
        _refuse_fork_after_cuda(self.start_method)
        from py_stateful_map.backends.processes import ProcessBackend

        return ProcessBackend(specs, envs, self.start_method)

    @property
    def num_workers(self) -> int:
        """How many workers run (1 for ``num_workers=0``, which runs one inline)."""
        return self._slot_count

    def map(
        self,
        input_iterable: Iterable[Any],
        is_unordered: bool = False,
        checkpoint: CheckpointOption = None,
    ) -> MapResult[WorkerResultWrapper[T]]:
        """Stream ``input_iterable`` through the workers; lazily, with bounded read-ahead.

        Yields one ``WorkerResultWrapper`` per item, in input order unless ``is_unordered``.
        ``len()`` of the result is the input's length when it has one. Only one map may be in
        progress per pool at a time. The map keeps the pool alive while it is iterated; once
        the pool is closed, iterating raises ``PoolBrokenError``. An iterator input is read
        on a bounded feeder thread (see ``read_input_in_thread``).

        Another map's results as input (``pool_b.map(pool_a.map(x))``, or of ``imap`` /
        ``imap_unordered``: a *chained* map) run their values and keep their positions: each
        result's ``obj_id`` is the item's position in the first map's input, whatever order
        that map delivered in, and errors and a checkpoint name the item by it too (results
        come in the order this map reads them, unless ``is_unordered``). An item that failed
        there reaches no worker and comes out with its own exception: a checkpoint by
        position stores it as that item's failure; a ``Checkpoint(key=...)`` has no key for
        it (``key`` is only ever called with values), so it is not stored, and a resumed run
        takes it from the first map again. Two results held at once with one ``obj_id`` (two
        maps' results concatenated) are a ``ValueError``. However this map ends — exhausted,
        ``break``, ``close()``, an error — it closes the map it reads, so that map's pool is
        free at once.

        ``checkpoint`` (a path or a :class:`~py_stateful_map.Checkpoint`) makes the map
        resumable: every result is committed to it before you receive it, and rerunning the
        same map sends only unfinished items to workers; finished ones come back from the
        file at their place (``from_checkpoint`` is True on them).
        """
        return self._start_map(
            input_iterable, ordered=not is_unordered, values=False, checkpoint=checkpoint
        )

    def imap(
        self, input_iterable: Iterable[Any], checkpoint: CheckpointOption = None
    ) -> MapResult[Any]:
        """The workers' return values in input order, as ``multiprocessing.Pool.imap`` gives.

        An item's exception is raised here (its worker traceback as ``__cause__``) at its
        place, as ``Pool.imap`` and ``concurrent.futures.Executor.map`` do: every value before
        the failing position is yielded first, then the exception of the first failing
        position is raised (even if a later item's error arrived earlier). Meanwhile no more
        input is read and nothing past the failing item is sent; under ``IMMEDIATE`` it is
        raised as soon as the values before it are out, under ``IMMEDIATE_WAIT_OTHERS`` once
        the items still running have finished too. With a checkpoint, the results committed
        before the raise stay committed. Same laziness, ``len()``, progress and fault handling
        as :meth:`map`, without building a wrapper per item.

        >>> with StateFullWorkerPool(2, abs, backend="threads") as pool:
        ...     list(pool.imap([-1, -2, 3]))
        [1, 2, 3]
        """
        return self._start_map(input_iterable, ordered=True, values=True, checkpoint=checkpoint)

    def imap_unordered(
        self, input_iterable: Iterable[Any], checkpoint: CheckpointOption = None
    ) -> MapResult[Any]:
        """Like :meth:`imap`, in the order items finish.

        An item's exception is raised as soon as it arrives (``IMMEDIATE``), or once the items
        still running have finished (``IMMEDIATE_WAIT_OTHERS``); values that arrived before it
        were yielded, others are not waited for.
        """
        return self._start_map(input_iterable, ordered=False, values=True, checkpoint=checkpoint)

    def _start_map(
        self,
        input_iterable: Iterable[Any],
        *,
        ordered: bool,
        values: bool,
        checkpoint: CheckpointOption = None,
    ) -> MapResult[Any]:
        if values and self.options.exception_behavior is ExceptionBehavior.DEFERRED:
            raise ValueError(
                "imap()/imap_unordered() hand out bare values, so an item's exception has "
                "nowhere to go but up: use map() with ExceptionBehavior.DEFERRED (each result "
                "then carries its exception_obj), or IMMEDIATE / IMMEDIATE_WAIT_OTHERS here"
            )
        self._check_usable()
        try:
            length: int | None = len(input_iterable)  # type: ignore[arg-type]
        except TypeError:
            length = None
        run = MapRun(
            self._dispatcher,
            input_iterable,
            length,
            ordered=ordered,
            behavior=self.options.exception_behavior,
            sizer=ChunkSizer(
                self._slot_count,
                self._chunk_size,
                self._backend.chunk_policy,
                memory=self._chunk_memory,
            ),
            read_input_in_thread=self.options.read_input_in_thread,
            length_batching=self.options.length_batching,
            batches_per_chunk=self._batches_per_chunk,
            open_checkpoint=self._checkpoint_opener(checkpoint, length),
            checkpoint_by_key=isinstance(checkpoint, Checkpoint) and checkpoint.key is not None,
        )
        decorate = None
        if self._progress is not None or self.options.on_result is not None:
            bar, on_result = self._progress, self.options.on_result

            def decorate(items: Iterator[Any], total: int | None) -> Iterator[Any]:
                return with_progress(items, total, bar, on_result)

        batches = run.values() if values else run.batches()
        return MapResult(batches, length, decorate, owner=self, run=run)

    def _checkpoint_opener(
        self, checkpoint: CheckpointOption, length: int | None
    ) -> Callable[[], CheckpointRun] | None:
        """Opens the map's checkpoint when the map starts (the manifest names this job)."""
        store = as_checkpoint(checkpoint)
        if store is None:
            return None
        # What the manifest records of this job: per-worker kwargs such as devices are left
        # out, so a run may resume on other devices or worker counts.
        worker, shared = self.options.worker_class_or_func, self.options.shared_kwarg_dict

        def open_run() -> CheckpointRun:
            return store.open_run(worker=worker, init_kwargs=shared, length=length)

        return open_run

    def _check_usable(self) -> None:
        if self._closed:
            raise PoolBrokenError("this pool is closed")
        if self._dispatcher.broken:
            raise PoolBrokenError("this pool is broken: a previous map() gave up on its workers")

    def stats(self) -> PoolStats:
        """Per-worker counters (items, busy/idle seconds, restarts, retries, OOM back-offs)."""
        return PoolStats(
            workers=tuple(slot.as_dict() for slot in self._dispatcher.slots),
            elapsed_seconds=self._dispatcher.map_seconds,
            restarts=self._dispatcher.restarts,
        )

    def close(self, *, cancel: bool = False) -> None:
        """Stop every worker: let each finish its current chunk, then terminate stragglers.

        Safe from any thread: a map being consumed elsewhere raises ``PoolBrokenError`` at its
        next step (within about a second on Ray, at once elsewhere), and no worker starts
        after ``close()`` began. In a process forked from the pool's owner it does nothing:
        the workers belong to the owner.
        """
        dispatcher = getattr(self, "_dispatcher", None)
        if dispatcher is not None and dispatcher.holds_abandoned_work():
            cancel = True  # the workers are busy with a map nobody will read
        if self.options.join_timeout is not None:
            grace = self.options.join_timeout
        else:
            grace = DEFAULT_CANCEL_GRACE if cancel else DEFAULT_JOIN_TIMEOUT
        self._stop(grace, cancel=cancel)
        logger.info("stopped %d %s worker(s)", self._slot_count, self.backend_name)

    def terminate(self) -> None:
        """Stop every worker now, without waiting for running items."""
        self._stop(0.0, cancel=True)

    def _stop(self, grace: float, *, cancel: bool) -> None:
        if self._closed or os.getpid() != self._owner_pid:
            return
        self._closed = True
        self._finalizer.detach()
        dispatcher = getattr(self, "_dispatcher", None)
        if dispatcher is None:  # failed while building: nothing runs a map yet
            self._backend.shutdown(grace, cancel=cancel)
            return
        dispatcher.closed = True
        self._backend.wake()  # a map blocked in another thread lets go of the lock
        with dispatcher.lock:
            self._backend.shutdown(grace, cancel=cancel)

    def __reduce__(self) -> NoReturn:
        raise TypeError(
            f"a {type(self).__name__} cannot be pickled or sent to a worker: it owns live "
            "worker processes and pipes. Pass what the worker needs (e.g. its kwargs) instead, "
            "or chain pools in the caller: pool_b.map(pool_a.map(items))"
        )

    def __enter__(self) -> StateFullWorkerPool[T]:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
            self.terminate()
        else:
            self.close(cancel=exc_type is not None)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<StateFullWorkerPool {self._slot_count} {self.backend_name} worker(s), {state}>"


def _chunking_of(options: PoolOptions) -> tuple[int, int | None]:
    """Batches per chunk, and the fixed chunk size (None: sized automatically).

    A batch is one call, so it is the unit a ``task_timeout`` can time; otherwise items are.
    With ``prepare()``, a chunk carries several batches so the next one's ``prepare`` overlaps
    the current ``__call__``.
    """
    if options.batch_size is None:
        return 1, 1 if options.task_timeout is not None else options.chunk_size
    batches = chunk_batches(options.worker_class_or_func, options.prefetch, options.task_timeout)
    return batches, options.batch_size * batches


def _worker_specs(options: PoolOptions) -> list[WorkerSpec]:
    """What each worker builds and how it is called: the shared kwargs under its own."""
    per_worker = options.worker_kwarg_dict_arr or [{}] * options.slot_count
    devices = options.worker_device_arr or [None] * options.slot_count
    return [
        WorkerSpec(
            target=options.worker_class_or_func,
            init_kwargs={**options.shared_kwarg_dict, **own},
            argument_passing=options.argument_passing,
            batch_size=options.batch_size,
            collate_fn=options.collate_fn,
            prefetch=options.prefetch,
            thread_cuda_device=_thread_gpu(options.backend, device),
        )
        for own, device in zip(per_worker, devices, strict=True)
    ]


def _thread_gpu(backend: str, device: str | None) -> str | None:
    """A thread worker's (first) GPU, from its device label (``"cuda:2"``, ``"cuda:2,cuda:3"``)."""
    if backend != "threads" or device is None:
        return None
    first = device.split(",")[0].strip()
    return first if first.startswith("cuda:") else None


def _worker_envs(options: PoolOptions) -> list[dict[str, str]]:
    return [dict(env) for env in options.worker_env_arr or [{}] * options.slot_count]


def _shutdown_if_owner(backend: Backend, owner_pid: int) -> None:
    """The finalizer of a pool that was dropped unclosed (or still open at exit).

    A child forked from the owner (``os.fork()``) runs the same finalizers at its exit; the
    workers are not its to stop.
    """
    if os.getpid() == owner_pid:
        backend.shutdown(0.0, cancel=True)


def _refuse_fork_after_cuda(start_method: str) -> None:
    if start_method != "fork":
        return
    from py_stateful_map.devices.discovery import ensure_fork_is_safe

    ensure_fork_is_safe(start_method)


__all__ = ["StateFullWorkerPool", "WorkerResultWrapper"]
