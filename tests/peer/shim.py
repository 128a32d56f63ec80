"""Facades with the peers' shapes, over ``StateFullWorkerPool``, so their tests read alike.

``Pool`` looks like ``multiprocessing.Pool`` and ``Executor`` like a
``concurrent.futures`` executor. Both send the function with each task, as the peers do:
the pool's worker is :class:`~tests.peer.workers.Apply`, which runs the peer's
``initializer(*initargs)`` once when the worker is built and then ``func(*args, **kwargs)``
per item. Everything else — laziness, ordering, chunking, errors, closing — is our pool's own
behaviour, passed through unchanged: the facades translate calls, they never make up an
outcome. Where the peers and we differ, ``README.md`` says so.

A peer's ``chunksize`` is per call; ours is fixed when a pool is built, so a facade keeps one
extra pool per ``chunksize`` it is asked for (closed with it). Once closed, every call goes to
the first pool, so our own closed-pool error is what a test sees.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from typing import Any

from py_stateful_map import StateFullWorkerPool

from .workers import Apply

Task = tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]


class Tasks:
    """``(func, args, {})`` per input item, lazily; sized exactly when the input is."""

    def __init__(self, func: Callable[..., Any], iterable: Iterable[Any], star: bool) -> None:
        self.func = func
        self.iterable = iterable
        self.star = star

    def __iter__(self) -> Iterator[Task]:
        func, star = self.func, self.star
        for item in self.iterable:
            yield (func, tuple(item) if star else (item,), {})

    def __len__(self) -> int:
        return len(self.iterable)  # type: ignore[arg-type]  # TypeError when unsized


class _Facade:
    """What both facades share: a first pool built at once, more per chunk size."""

    default_chunksize: int | None = None

    def __init__(
        self,
        workers: int | None,
        initializer: Callable[..., Any] | None,
        initargs: Iterable[Any],
        max_tasks: int | None,
        backend: str,
        options: dict[str, Any],
    ) -> None:
        kwargs: dict[str, Any] = {}
        if initializer is not None:
            kwargs = {"initializer": initializer, "initargs": tuple(initargs)}
        self._build: Callable[[int | None], StateFullWorkerPool[Any]] = lambda chunk_size: (
            StateFullWorkerPool(
                (os.cpu_count() or 1) if workers is None else workers,
                Apply,
                shared_kwarg_dict=kwargs,
                backend=backend,
                chunk_size=chunk_size,
                max_tasks_per_worker=max_tasks,
                **options,
            )
        )
        self._first = self._build(self.default_chunksize)
        self._by_chunksize: dict[int | None, StateFullWorkerPool[Any]] = {
            self.default_chunksize: self._first
        }
        self._closed = False

    @property
    def pool(self) -> StateFullWorkerPool[Any]:
        """The first underlying pool (for ``stats()``, ``num_workers`` ...)."""
        return self._first

    def _for(self, chunksize: int | None) -> StateFullWorkerPool[Any]:
        if self._closed:
            return self._first
        if chunksize not in self._by_chunksize:
            self._by_chunksize[chunksize] = self._build(chunksize)
        return self._by_chunksize[chunksize]

    def _close_all(self, *, terminate: bool) -> None:
        self._closed = True
        for pool in self._by_chunksize.values():
            if terminate:
                pool.terminate()
            else:
                pool.close()


class Pool(_Facade):
    """``multiprocessing.Pool(processes, initializer, initargs, maxtasksperchild)``."""

    def __init__(
        self,
        processes: int | None = None,
        initializer: Callable[..., Any] | None = None,
        initargs: Iterable[Any] = (),
        maxtasksperchild: int | None = None,
        *,
        backend: str = "processes",
        **options: Any,
    ) -> None:
        super().__init__(processes, initializer, initargs, maxtasksperchild, backend, options)

    def apply(
        self,
        func: Callable[..., Any],
        args: tuple[Any, ...] = (),
        kwds: dict[str, Any] | None = None,
    ) -> Any:
        values = self._first.imap([(func, tuple(args), dict(kwds or {}))])
        return next(iter(values))

    def imap(
        self, func: Callable[..., Any], iterable: Iterable[Any], chunksize: int | None = None
    ) -> Any:
        return self._for(chunksize).imap(Tasks(func, iterable, star=False))

    def imap_unordered(
        self, func: Callable[..., Any], iterable: Iterable[Any], chunksize: int | None = None
    ) -> Any:
        return self._for(chunksize).imap_unordered(Tasks(func, iterable, star=False))

    def map(
        self, func: Callable[..., Any], iterable: Iterable[Any], chunksize: int | None = None
    ) -> list[Any]:
        return list(self.imap(func, iterable, chunksize))

    def starmap(
        self, func: Callable[..., Any], iterable: Iterable[Any], chunksize: int | None = None
    ) -> list[Any]:
        return list(self._for(chunksize).imap(Tasks(func, iterable, star=True)))

    def close(self) -> None:
        self._close_all(terminate=False)

    def terminate(self) -> None:
        self._close_all(terminate=True)

    def join(self) -> None:
        """Nothing to do: our ``close()`` and ``terminate()`` return once workers are gone."""

    def __enter__(self) -> Pool:
        self._first.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.terminate()  # as multiprocessing.Pool.__exit__ does


class Executor(_Facade):
    """``ProcessPoolExecutor`` / ``ThreadPoolExecutor``: ``submit``, ``map``, ``shutdown``.

    ``submit`` runs its one item at once and returns a finished ``Future`` (our pool has no
    futures; the result or the item's exception is what lands in it). A refusal of the pool
    itself (closed) is raised by ``submit``, as an executor raises after ``shutdown()``.
    """

    default_chunksize = 1  # ProcessPoolExecutor.map's default

    def __init__(
        self,
        max_workers: int | None = None,
        initializer: Callable[..., Any] | None = None,
        initargs: Iterable[Any] = (),
        max_tasks_per_child: int | None = None,
        *,
        backend: str = "processes",
        **options: Any,
    ) -> None:
        super().__init__(max_workers, initializer, initargs, max_tasks_per_child, backend, options)

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        values = self._first.imap([(fn, args, kwargs)])  # a closed pool refuses here
        future: Future[Any] = Future()
        try:
            future.set_result(next(iter(values)))
        except BaseException as exc:  # the item's own exception, as a future holds it
            future.set_exception(exc)
        return future

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any], chunksize: int = 1) -> Any:
        if len(iterables) == 1:
            return self._for(chunksize).imap(Tasks(fn, iterables[0], star=False))
        return self._for(chunksize).imap(Tasks(fn, _Zipped(iterables), star=True))

    def shutdown(self, wait: bool = True) -> None:
        self._close_all(terminate=not wait)

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown(wait=True)


class _Zipped:
    """``zip(*iterables)`` that keeps a length when every iterable has one."""

    def __init__(self, iterables: tuple[Iterable[Any], ...]) -> None:
        self.iterables = iterables

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        return zip(*self.iterables)

    def __len__(self) -> int:
        return min(len(it) for it in self.iterables)  # type: ignore[arg-type]


__all__ = ["Executor", "Pool", "Tasks"]
