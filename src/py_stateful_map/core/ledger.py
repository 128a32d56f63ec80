"""One map's accounting of its items: read, waiting, on a worker, settled, dropped, handed over.

Every item the map reads is in exactly one of four places until the map ends::

    read ──▶ waiting ──sent──▶ on workers ──answered──▶ settled ──▶ handed over (to the caller)
               │                   │                      ▲
               │                   └── dropped (a pending ├── settled without a worker
               │                      error: retries not   │   (replayed from a checkpoint,
               │                      re-run)              │   failed upstream, a failing
               └── dropped (a pending error: read ahead, ──┘   length_fn)
                   never sent)

*Waiting* items are read and not on a worker: chunks read ahead, a length-aware sort window,
planned batches. Only *on workers* is something the map may wait for; when an error is
pending (``IMMEDIATE_WAIT_OTHERS``) waiting items are dropped at once, so the map waits for
what runs and no longer for what will never be sent (the map hung there with a checkpoint,
whose reads run 4,096 items ahead). The read-ahead bound counts from what was handed over.

Invariant (checked by :meth:`Ledger.check`, and after every step in the tests)::

    read == waiting + on_workers + settled + dropped,  every count >= 0,  handed <= settled
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Ledger:
    """Item counts of one map; each method moves items from one place to the next."""

    read: int = 0
    waiting: int = 0
    on_workers: int = 0
    settled: int = 0
    dropped: int = 0
    handed: int = 0

    def took(self, count: int) -> None:
        """``count`` items were read from the input."""
        self.read += count
        self.waiting += count

    def sent(self, count: int) -> None:
        """A chunk of ``count`` waiting items went to a worker."""
        self.waiting -= count
        self.on_workers += count

    def answered(self, count: int, *, on_worker: bool) -> None:
        """The outcomes of ``count`` items are known (from a worker, or without one)."""
        if on_worker:
            self.on_workers -= count
        else:
            self.waiting -= count
        self.settled += count

    def drop_waiting(self, count: int) -> None:
        """Waiting items that will never be sent (an error is pending)."""
        self.waiting -= count
        self.dropped += count

    def drop_on_workers(self, count: int) -> None:
        """Items of chunks that will not be re-run after their worker died (an error is pending)."""
        self.on_workers -= count
        self.dropped += count

    def handed_over(self, count: int) -> None:
        """``count`` settled items were given to the caller."""
        self.handed += count

    @property
    def in_progress(self) -> int:
        """Items read whose outcome is not known yet."""
        return self.waiting + self.on_workers

    @property
    def read_ahead(self) -> int:
        """Items read and not yet handed over: what the read-ahead bound limits.

        Results released but not yet taken count: in ordered mode one answer may release many
        chunks, and reading against the released count instead ran past the bound by as much
        (135,188 items pulled for a 131,072 bound on Ray).
        """
        return self.read - self.handed

    def check(self) -> None:
        """Raise ``AssertionError`` if the counts do not add up (a bug in the map loop)."""
        counts = (self.read, self.waiting, self.on_workers, self.settled, self.dropped)
        total = self.waiting + self.on_workers + self.settled + self.dropped
        if min(counts) < 0 or self.read != total or not 0 <= self.handed <= self.settled:
            raise AssertionError(f"item accounting does not add up: {self}")
