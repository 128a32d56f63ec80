"""The engine behind the pqdm drop-ins (``py_stateful_map.processes`` / ``.threads``).

pqdm 0.2's contract, kept exactly so existing code runs by changing its import: the result is a
list in input order; ``exception_behaviour='ignore'`` puts each exception in its item's place,
``'immediate'`` raises the first one, ``'deferred'`` raises ``Exception(*all_exceptions)`` at
the end; ``n_jobs=1`` runs in the calling thread; extra keyword arguments go to the tqdm bar.

Beyond pqdm: ``function`` may be a stateful worker class (its ``__init__`` kwargs given as
``shared_kwarg_dict=``), any ``StateFullWorkerPool`` option may be passed as a keyword, the
input may be a lazy iterable (read with a bounded window, so ``bounded`` is always true), and
``'immediate'`` raises as soon as the error happens rather than after everything finished.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

from py_stateful_map.options import OPTION_NAMES, PoolOptions
from py_stateful_map.pool import StateFullWorkerPool
from py_stateful_map.results import ArgumentPassing, ExceptionBehavior

_ARGUMENT_TYPES = {
    None: ArgumentPassing.AS_SINGLE_ARG,
    "direct": ArgumentPassing.AS_SINGLE_ARG,
    "args": ArgumentPassing.AS_ARGS,
    "kwargs": ArgumentPassing.AS_KWARGS,
}
_EXCEPTION_BEHAVIOURS = {
    "ignore": ExceptionBehavior.DEFERRED,
    "deferred": ExceptionBehavior.DEFERRED,
    "immediate": ExceptionBehavior.IMMEDIATE,
}
#: Keywords that go to the pool; the others go to the progress bar, as in pqdm.
_POOL_OPTIONS = OPTION_NAMES - {
    "num_workers",
    "worker_class_or_func",
    "argument_passing",
    "exception_behavior",
    "use_threads",
    "backend",
    "progress",
}


def run_pqdm(
    array: Iterable[Any],
    function: Callable[..., Any],
    n_jobs: int,
    argument_type: str | None,
    exception_behaviour: str,
    tqdm_class: Any,
    backend: str,
    options: dict[str, Any],
) -> list[Any]:
    """Run a pqdm-style call on a ``StateFullWorkerPool`` and return the list pqdm returns."""
    if argument_type not in _ARGUMENT_TYPES:
        raise ValueError(f"argument_type must be None, 'args' or 'kwargs', got {argument_type!r}")
    if exception_behaviour not in _EXCEPTION_BEHAVIOURS:
        raise ValueError(
            "exception_behaviour must be 'ignore', 'immediate' or 'deferred', "
            f"got {exception_behaviour!r}"
        )
    pool_options = {k: v for k, v in options.items() if k in _POOL_OPTIONS}
    bar_options = {k: v for k, v in options.items() if k not in _POOL_OPTIONS}
    bar = functools.partial(_default_tqdm() if tqdm_class is None else tqdm_class, **bar_options)
    checked = PoolOptions.create(
        num_workers=0 if n_jobs == 1 else n_jobs,
        worker_class_or_func=function,
        argument_passing=_ARGUMENT_TYPES[argument_type],
        exception_behavior=_EXCEPTION_BEHAVIOURS[exception_behaviour],
        backend=backend,
        progress=bar,
        **pool_options,
    )
    with StateFullWorkerPool[Any].from_options(checked) as pool:
        if exception_behaviour == "immediate":  # map() raises on arrival; imap would wait
            return [r.ret_val for r in pool.map(array)]
        outcomes = [
            r.ret_val if r.exception_obj is None else r.exception_obj for r in pool.map(array)
        ]
    if exception_behaviour == "deferred":
        errors = [o for o in outcomes if isinstance(o, BaseException)]
        if errors:
            raise Exception(*errors)
    return outcomes


def _default_tqdm() -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError as exc:  # pqdm itself requires tqdm; so does its drop-in
        raise ImportError("pqdm needs tqdm: pip install 'py_stateful_map[tqdm]'") from exc
    return tqdm
