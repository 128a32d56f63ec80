"""The three ways an input item becomes the arguments of a worker's call.

- ``AS_SINGLE_ARG`` (the default): ``worker(item)``. Shown with a stateful class whose
  ``__init__`` runs once per worker with the shared kwargs merged under its own kwargs.
- ``AS_ARGS``: the item is a tuple, ``worker(*item)``.
- ``AS_KWARGS``: the item is a dict, ``worker(**item)``.

Run: ``python examples/argument_passing.py``
"""

from __future__ import annotations

import os

from py_stateful_map import ArgumentPassing, StateFullWorkerPool


class Scaler:
    """A stateful worker: built once per worker with its kwargs, then called per item."""

    def __init__(self, factor: int, name: str) -> None:
        self.factor = factor
        self.name = name

    def __call__(self, x: int) -> str:
        return f"{self.name} (pid {os.getpid()}): {x} * {self.factor} = {x * self.factor}"


def power(base: int, exponent: int) -> int:
    """A stateless worker taking two positional arguments."""
    return int(base**exponent)


def label(text: str, upper: bool = False, suffix: str = "") -> str:
    """A stateless worker taking keyword arguments, some optional."""
    return (text.upper() if upper else text) + suffix


def main() -> int:
    print("== AS_SINGLE_ARG: worker(item), shared kwargs merged under per-worker kwargs")
    with StateFullWorkerPool(
        2,
        Scaler,
        shared_kwarg_dict={"factor": 10, "name": "shared-name"},
        worker_kwarg_dict_arr=[{"name": "worker-0"}, {"name": "worker-1"}],
    ) as pool:
        single = [result.ret_val for result in pool.map(range(4))]
    for line in single:
        print("  " + str(line))

    print("== AS_ARGS: worker(*item)")
    pairs = [(2, 3), (3, 2), (10, 0)]
    with StateFullWorkerPool(2, power, argument_passing=ArgumentPassing.AS_ARGS) as pool:
        powers = [result.ret_val for result in pool.map(pairs)]
    for (base, exponent), value in zip(pairs, powers, strict=True):
        print(f"  power{(base, exponent)} = {value}")

    print("== AS_KWARGS: worker(**item)")
    records = [{"text": "a"}, {"text": "b", "upper": True}, {"text": "c", "suffix": "!"}]
    with StateFullWorkerPool(2, label, argument_passing=ArgumentPassing.AS_KWARGS) as pool:
        labels = [result.ret_val for result in pool.map(records)]
    for record, value in zip(records, labels, strict=True):
        print(f"  label(**{record}) = {value!r}")

    ok = powers == [8, 9, 1] and labels == ["a", "B", "c!"] and len(single) == 4
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
