"""Automatic chunk size: enough items per message that transport overhead stops mattering.

A chunk is the unit sent to a worker. Tiny tasks need big chunks (per-message costs dominate);
slow tasks need chunks of one (so work spreads evenly and a slow item holds up nothing else).
The sizer measures how long workers spend per item and aims each chunk at a fixed amount of
worker time, the way an expert hand-tunes ``multiprocessing.Pool.imap(chunksize=...)``.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Bytes one chunk may carry either way: large items (images, arrays) go a few at a time, so
#: memory in flight stays bounded and work still spreads over the workers.
MAX_CHUNK_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class ChunkPolicy:
    """How much work one message should carry, given what a message costs on a backend."""

    #: Worker time one chunk should represent: long enough to amortize the per-message cost,
    #: short enough that ordered results flow and the tail of a map stays balanced.
    target_seconds: float
    #: Upper bound on items per chunk, whatever the measured per-item time.
    max_items: int
    #: Worker time below which a chunk is not split further at the end of a sized input.
    tail_seconds: float


#: A pipe or a queue: about 50 µs per message.
LOCAL_POLICY = ChunkPolicy(target_seconds=0.02, max_items=4096, tail_seconds=0.002)
#: A Ray actor call costs about a millisecond of CPU spread over the driver, the actor's RPC
#: threads and the object store, and on a busy node that CPU is taken from the workers
#: themselves: chunks carry ~10x more work. At most 16384 items: a chunk of small values then
#: stays under Ray's 100 KiB limit for arguments passed inline, where a larger one goes through
#: the object store and costs 1 ms more per call (measured: benchmarks/NOTES.md).
REMOTE_POLICY = ChunkPolicy(target_seconds=0.2, max_items=16384, tail_seconds=0.02)


class ChunkSizer:
    """Chooses each chunk's size from measured per-item worker time (or a fixed size)."""

    def __init__(
        self, num_workers: int, fixed: int | None = None, policy: ChunkPolicy = LOCAL_POLICY
    ) -> None:
        self._workers = max(1, num_workers)
        self._fixed = fixed
        self._policy = policy
        self._seconds_per_item: float | None = None
        self._bytes_per_item = 0.0
        self._largest = 1

    def observe(self, items: int, busy_seconds: float) -> None:
        """Fold one finished chunk's timing into the estimate (moving average)."""
        if items <= 0 or self._fixed is not None:
            return
        sample = max(busy_seconds / items, 1e-8)
        previous = self._seconds_per_item
        self._seconds_per_item = sample if previous is None else 0.7 * previous + 0.3 * sample

    def observe_bytes(self, items: int, payload_bytes: int) -> None:
        """Remember the largest per-item payload seen (inputs or results)."""
        if items > 0:
            self._bytes_per_item = max(self._bytes_per_item, payload_bytes / items)

    def next_size(self, remaining: int | None) -> int:
        """Size of the next chunk; ``remaining`` is the known number of unread items, if any."""
        if self._fixed is not None:
            return self._fixed
        if self._seconds_per_item is None:
            return 1  # learn the task's cost before committing many items to one worker
        policy = self._policy
        size = int(policy.target_seconds / self._seconds_per_item)
        if self._bytes_per_item:
            size = min(size, int(MAX_CHUNK_BYTES / self._bytes_per_item))
        size = max(1, min(size, policy.max_items, self._largest * 8))
        if remaining is not None:
            # Keep the tail balanced: every worker gets a share of what is left. Only for work
            # that takes time: shrinking chunks of microsecond items costs round trips, not
            # balance (a whole chunk of them is over in the policy's tail_seconds).
            floor = int(policy.tail_seconds / self._seconds_per_item)
            size = min(size, max(1, remaining // (2 * self._workers), floor))
        self._largest = max(self._largest, size)
        return size

    @property
    def window_items(self) -> int:
        """How far reading may run ahead of the caller: enough to keep every worker fed."""
        largest = self._fixed or self._largest
        return max(64, 4 * self._workers * largest)
