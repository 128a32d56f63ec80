"""Collate functions: stacking arrays, tensors and dicts; plain lists otherwise."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import pytest
import torch

from py_stateful_map.collate import default_collate, stack_dict, stack_numpy, stack_torch


def test_stack_numpy_adds_a_leading_axis() -> None:
    batch = stack_numpy([np.arange(3), np.arange(3) + 1])
    assert batch.shape == (2, 3)
    assert batch.tolist() == [[0, 1, 2], [1, 2, 3]]


def test_stack_numpy_accepts_a_tuple_of_scalars() -> None:
    assert stack_numpy((np.float32(1), np.float32(2))).tolist() == [1.0, 2.0]


def test_stack_torch_adds_a_leading_dimension() -> None:
    batch = stack_torch((torch.zeros(2, 2), torch.ones(2, 2)))
    assert batch.shape == (2, 2, 2)


def test_stack_numpy_rejects_ragged_items() -> None:
    with pytest.raises(ValueError):
        stack_numpy([np.zeros(2), np.zeros(3)])


def test_stack_dict_stacks_each_key_by_its_type() -> None:
    items = [
        {"pixels": torch.full((2,), float(i)), "mask": np.ones(2) * i, "id": f"img{i}"}
        for i in range(3)
    ]
    batch = stack_dict(items)
    assert list(batch) == ["pixels", "mask", "id"]
    assert isinstance(batch["pixels"], torch.Tensor) and batch["pixels"].shape == (3, 2)
    assert isinstance(batch["mask"], np.ndarray) and batch["mask"].shape == (3, 2)
    assert batch["id"] == ["img0", "img1", "img2"]


def test_stack_dict_collates_nested_dicts() -> None:
    batch = stack_dict([{"inputs": {"ids": np.array([i, i])}} for i in range(2)])
    assert batch["inputs"]["ids"].tolist() == [[0, 0], [1, 1]]


def test_stack_dict_rejects_items_with_other_keys() -> None:
    with pytest.raises(ValueError, match=r"item 1 has keys \['a'\], item 0 has \['a', 'b'\]"):
        stack_dict([{"a": 1, "b": 2}, {"a": 1}])


def test_empty_batches_collate_to_empty_containers() -> None:
    assert stack_dict([]) == {}
    assert default_collate([]) == []


@pytest.mark.parametrize(
    ("items", "kind"),
    [
        ([torch.zeros(2), torch.ones(2)], torch.Tensor),
        ([np.zeros(2), np.ones(2)], np.ndarray),
        ([np.int64(1), np.int64(2)], np.ndarray),
        ([{"x": np.zeros(1)}, {"x": np.ones(1)}], dict),
        ([1, 2], list),
        (["a", "b"], list),
        ([[1, 2], [3, 4]], list),
        ([None, object()], list),
    ],
)
def test_default_collate_picks_by_the_first_item(items: list[Any], kind: type) -> None:
    assert isinstance(default_collate(items), kind)


def test_default_collate_keeps_plain_items_untouched() -> None:
    items = [{1, 2}, "text", 3]
    batch = default_collate(tuple(items))
    assert batch == items
    assert batch[0] is items[0]


def test_missing_numpy_is_a_clear_import_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "numpy", None)
    with pytest.raises(ImportError, match=r"needs numpy: pip install 'py_stateful_map\[numpy\]'"):
        stack_numpy([1, 2])


def test_missing_torch_is_a_clear_import_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match="needs torch"):
        stack_torch([1, 2])
