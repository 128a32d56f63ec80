"""Collate functions: turn the list of items of a sub-batch into one batch.

Pass one as ``collate_fn`` when a batched worker wants a stacked array or tensor
rather than a plain list. numpy and torch are imported only when a function that
needs them is called.

>>> import numpy as np
>>> default_collate([np.zeros(3), np.ones(3)]).shape
(2, 3)
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any

__all__ = ["default_collate", "stack_dict", "stack_numpy", "stack_torch"]


def stack_numpy(items: Sequence[Any]) -> Any:
    """Stack arrays (or numbers) along a new first axis: ``numpy.stack(items)``."""
    return _require("numpy").stack(list(items))


def stack_torch(items: Sequence[Any]) -> Any:
    """Stack tensors along a new first dimension: ``torch.stack(items)``."""
    return _require("torch").stack(list(items))


def stack_dict(items: Sequence[Mapping[Any, Any]]) -> dict[Any, Any]:
    """Collate dicts key by key, each key's values with :func:`default_collate`.

    >>> stack_dict([{"id": "a", "x": 1}, {"id": "b", "x": 2}])
    {'id': ['a', 'b'], 'x': [1, 2]}

    Every item must have the same keys; a ``ValueError`` names the first that differs.
    """
    if not items:
        return {}
    keys = list(items[0])
    for position, item in enumerate(items):
        if set(item) != set(keys):
            raise ValueError(
                f"stack_dict: item {position} has keys {sorted(item, key=repr)}, "
                f"item 0 has {sorted(keys, key=repr)}"
            )
    return {key: default_collate([item[key] for item in items]) for key in keys}


def default_collate(items: Sequence[Any]) -> Any:
    """Collate by the first item's type.

    A torch tensor -> :func:`stack_torch`; a numpy array or scalar ->
    :func:`stack_numpy`; a dict -> :func:`stack_dict`; anything else -> the plain
    list, so strings, ids and mixed objects pass through untouched.
    """
    if not items:
        return []
    first = items[0]
    torch = sys.modules.get("torch")  # a tensor can only exist if torch is imported
    if torch is not None and isinstance(first, torch.Tensor):
        return stack_torch(items)
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(first, numpy.ndarray | numpy.generic):
        return stack_numpy(items)
    if isinstance(first, Mapping):
        return stack_dict(items)
    return list(items)


def _require(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise ImportError(
            f"this collate function needs {name}: pip install 'py_stateful_map[{name}]'"
        ) from exc
