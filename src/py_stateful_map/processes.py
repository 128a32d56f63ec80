"""pqdm drop-in running on processes (true parallelism for CPU-bound Python).

Replace ``from pqdm.processes import pqdm`` with ``from py_stateful_map.processes import pqdm``:

>>> from py_stateful_map.processes import pqdm
>>> pqdm([1, 2, 3], abs, n_jobs=2, disable=True)
[1, 2, 3]

See ``py_stateful_map._pqdm`` for what goes beyond pqdm (stateful workers, lazy input).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from py_stateful_map._pqdm import run_pqdm


def pqdm(
    array: Iterable[Any],
    function: Callable[..., Any],
    n_jobs: int,
    argument_type: str | None = None,
    bounded: bool = False,
    exception_behaviour: str = "ignore",
    tqdm_class: Any = None,
    **kwargs: Any,
) -> list[Any]:
    """Apply ``function`` to every item with ``n_jobs`` workers and a progress bar.

    ``tqdm_class=None`` means ``tqdm.auto.tqdm``. ``bounded`` is accepted for compatibility;
    input is always read lazily with a bounded window.
    """
    del bounded  # always bounded
    return run_pqdm(
        array, function, n_jobs, argument_type, exception_behaviour, tqdm_class, "processes", kwargs
    )
