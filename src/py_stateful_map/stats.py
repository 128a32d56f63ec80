"""A snapshot of what a pool's workers have done, for logs, notebooks and tuning."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PoolStats:
    """Per-worker counters plus totals; ``str()`` renders a table (``print(pool.stats())``).

    Per worker: index, pid, device, init seconds, items done, busy and idle seconds,
    restarts, recycles (``max_tasks_per_worker``), retries and OOM back-offs.
    """

    workers: tuple[dict[str, Any], ...]
    elapsed_seconds: float  # time spent inside map() calls (start-up excluded)
    restarts: int

    @property
    def items_done(self) -> int:
        return sum(int(worker["items_done"]) for worker in self.workers)

    @property
    def items_per_second(self) -> float:
        return self.items_done / self.elapsed_seconds if self.elapsed_seconds > 0 else 0.0

    def total(self, key: str) -> float:
        """Sum of one per-worker counter, e.g. ``stats.total("retries")``."""
        return sum(float(worker[key]) for worker in self.workers)

    def __str__(self) -> str:
        columns = list(self.workers[0]) if self.workers else []
        rows = [[str(worker[c]) for c in columns] for worker in self.workers]
        widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(columns)]
        lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))]
        lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
        lines.append(
            f"total: {self.items_done} items in {self.elapsed_seconds:.2f}s "
            f"({self.items_per_second:.1f} items/s), {self.restarts} restarts, "
            f"{int(self.total('retries'))} retries, {int(self.total('oom_backoffs'))} OOM back-offs"
        )
        return "\n".join(lines)
