"""Progress reporting: any bar that wraps an iterable, plus a per-result callback.

The results of ``map()`` are an iterator with ``len()``, so ``tqdm(pool.map(x))`` already
works. ``progress=`` is the shortcut for that: ``True`` picks ``tqdm.auto`` (a notebook widget
in Jupyter, text elsewhere); any callable that wraps an iterable and accepts ``total=`` —
a tqdm class, ``rich.progress.track``, ``functools.partial(tqdm, desc="infer")`` — is used
as is. Bars count items, not chunks, and close when the map ends, raises or is abandoned.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from py_stateful_map.results import WorkerResultWrapper

R = TypeVar("R")

ProgressOption = bool | Callable[..., Iterable[Any]] | None
ResultCallback = Callable[[WorkerResultWrapper[Any]], object]


def resolve_progress(progress: ProgressOption) -> Callable[..., Iterable[Any]] | None:
    """Turn the user's ``progress=`` value into a wrapper function, or None for no bar."""
    if progress is None or progress is False:
        return None
    if progress is True:
        try:
            from tqdm.auto import tqdm
        except ImportError as exc:
            raise ImportError(
                "progress=True draws a tqdm bar, and tqdm is not installed: "
                "pip install 'py_stateful_map[tqdm]', or pass progress=<your bar>"
            ) from exc
        return tqdm  # type: ignore[no-any-return]
    if not callable(progress):
        raise TypeError(f"progress must be True, False, None or a callable, got {progress!r}")
    return progress


def with_progress(
    items: Iterator[R],
    total: int | None,
    bar: Callable[..., Iterable[Any]] | None,
    on_result: ResultCallback | None,
) -> Iterator[R]:
    """Wrap the flat result iterator with a callback and a bar, only when asked for."""
    if on_result is not None:
        items = map(_tap(on_result), items)
    if bar is not None:
        items = iter(bar(items, total=total))
    return items


def _tap(on_result: ResultCallback) -> Callable[[R], R]:
    def tap(result: R) -> R:
        on_result(result)  # type: ignore[arg-type]
        return result

    return tap
