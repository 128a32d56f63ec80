"""Smallest end-to-end checks: if these fail, nothing else is worth reading."""

from __future__ import annotations

import pytest

from py_stateful_map import StateFullWorkerPool

from .conftest import LOCAL_BACKENDS


class Multiplier:
    def __init__(self, factor: int) -> None:
        self.factor = factor

    def __call__(self, x: int) -> int:
        return x * self.factor


@pytest.mark.parametrize("backend", [*LOCAL_BACKENDS, "inline"])
def test_map_returns_every_item_in_order(backend: str) -> None:
    workers = 0 if backend == "inline" else 2
    with StateFullWorkerPool(workers, Multiplier, {"factor": 3}, backend=backend) as pool:
        results = list(pool.map(range(100)))
    assert [r.obj_id for r in results] == list(range(100))
    assert [r.ret_val for r in results] == [3 * x for x in range(100)]
