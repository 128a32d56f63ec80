"""The original py_stateful_map example, on the new pool: 1000 tasks, 4 stateful workers.

Each worker is built once (its ``__init__`` runs inside its own process), every result
comes back through a tqdm progress bar that knows the total because the input has a length,
and errors are DEFERRED: returned with the item instead of raised.

Run: ``python examples/seed_example.py``
"""

from __future__ import annotations

from tqdm import tqdm

from py_stateful_map import (
    ArgumentPassing,
    ExceptionBehavior,
    StateFullWorkerPool,
    WorkerResultWrapper,
)

N_TASKS = 1000
N_WORKERS = 4


class SquareModWorker:
    """A stand-in for a model: state built once, then a CPU-bound call per item."""

    def __init__(self, proc_id: int) -> None:
        self.proc_id = proc_id
        self.modulus = 337  # "loading the model"

    def __call__(self, value: int) -> int:
        out = value
        for _ in range(20_000):
            out = (out * out) % self.modulus
        return out


def main() -> int:
    per_worker = [{"proc_id": i} for i in range(N_WORKERS)]
    total = 0
    errors = 0
    with StateFullWorkerPool(
        num_workers=N_WORKERS,
        worker_class_or_func=SquareModWorker,
        worker_kwarg_dict_arr=per_worker,
        argument_passing=ArgumentPassing.AS_SINGLE_ARG,
        exception_behavior=ExceptionBehavior.DEFERRED,
        join_timeout=1,
    ) as pool:
        result: WorkerResultWrapper[int]
        for result in tqdm(pool.map([k * 10 for k in range(N_TASKS)]), desc="tasks"):
            if result.exception_obj is not None:
                errors += 1
                print("Error:", result.exception_obj)
            else:
                total += result.ret_val or 0
        print(pool.stats())
    print("Total:", total)
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
