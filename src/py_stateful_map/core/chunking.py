"""Automatic chunk size: enough items per message that transport overhead stops mattering.

A chunk is the unit sent to a worker. Tiny tasks need big chunks (per-message costs dominate);
slow tasks need chunks of one (so work spreads evenly and a slow item holds up nothing else).
The sizer measures how long workers spend per item and aims each chunk at a fixed amount of
worker time, the way an expert hand-tunes ``multiprocessing.Pool.imap(chunksize=...)``.
"""

from __future__ import annotations

from dataclasses import dataclass

from py_stateful_map.backends.chunk_policy import LOCAL_POLICY, ChunkPolicy

#: Bytes one chunk may carry either way: large items (images, arrays) go a few at a time, so
#: memory in flight stays bounded and work still spreads over the workers.
MAX_CHUNK_BYTES = 8 * 1024 * 1024


#: How much of the previous estimate's evidence a new chunk's timing leaves standing.
RECENT_WEIGHT = 0.7
#: Items read alone at the start of a map whose chunk size comes from the last map's estimate:
#: the caller pickles them to learn this map's item size before reading a full chunk
#: (``MAX_CHUNK_BYTES``), so 4 MB arrays after a map of ints are not read a sixth of the map at
#: a time. They then travel in the first chunk; only items plain pickle cannot measure go as a
#: chunk of their own, measured as they are sent.
PROBE_ITEMS = 8


@dataclass
class ChunkMemory:
    """What the pool's last map measured, for the next map to start from.

    Without it every map starts with chunks of one item and grows them 8x per answer: five
    round trips before tiny tasks reach full-size chunks, a fifth of a 50,000-item map here.
    """

    seconds_per_item: float | None = None


class ChunkSizer:
    """Chooses each chunk's size from measured per-item worker time (or a fixed size).

    A map of known length whose pool already ran a map starts from that map's estimate, but
    until its first answer each chunk holds no more than a share of what is left
    (``ChunkPolicy.first_chunk_parts`` per worker): if its items are much slower than the last
    map's, each worker still gets a part, and the map's own measurements take over at the
    first answer. An input of unknown length starts from one item, as a first map does.
    """

    def __init__(
        self,
        num_workers: int,
        fixed: int | None = None,
        policy: ChunkPolicy = LOCAL_POLICY,
        *,
        memory: ChunkMemory | None = None,
    ) -> None:
        self._workers = max(1, num_workers)
        self._fixed = fixed
        self._policy = policy
        self._memory = memory
        self._prior = None if memory is None else memory.seconds_per_item
        self._seconds_per_item: float | None = None
        self._recent_seconds = 0.0  # decayed sums over recent chunks: seconds / items is
        self._recent_items = 0.0  # the estimate
        self._busy_seconds = 0.0  # all this map measured
        self._bytes_per_item = 0.0
        self._bytes_seen = False  # this map's item size is known (measured or sent)
        self._largest = 1

    def observe(self, items: int, busy_seconds: float) -> None:
        """Fold one finished chunk's timing into the estimate.

        The estimate is recent seconds over recent items (both decayed by ``RECENT_WEIGHT``
        per chunk), not an average of per-chunk rates: a chunk of one item measures mostly
        the chunk's own fixed cost (20-60 µs against 0.1 µs of work, measured), and averaging
        its rate with a 2,000-item chunk's kept tiny tasks in small chunks for a dozen chunks.
        Weighted by items, one large chunk settles it; a chunk of really slower items still
        moves the estimate at once, because its seconds dominate the sum.
        """
        if items <= 0 or self._fixed is not None:
            return
        self._recent_seconds = RECENT_WEIGHT * self._recent_seconds + max(busy_seconds, 0.0)
        self._recent_items = RECENT_WEIGHT * self._recent_items + items
        self._busy_seconds += max(busy_seconds, 0.0)
        estimate = self._recent_seconds / self._recent_items
        if self._prior is not None and self._busy_seconds < self._policy.trusted_seconds:
            estimate = min(estimate, self._prior)
        self._seconds_per_item = max(estimate, 1e-8)
        if self._memory is not None:
            self._memory.seconds_per_item = self._seconds_per_item

    def observe_bytes(self, items: int, payload_bytes: int) -> None:
        """Remember the largest per-item payload seen (inputs or results)."""
        if items > 0:
            self._bytes_seen = True
            self._bytes_per_item = max(self._bytes_per_item, payload_bytes / items)

    def next_size(self, remaining: int | None) -> int:
        """Size of the next chunk; ``remaining`` is the known number of unread items, if any."""
        if self._fixed is not None:
            return self._fixed
        seconds_per_item = self._seconds_per_item
        growth_cap = self._largest * 8
        if seconds_per_item is None:
            if self._prior is None or remaining is None:
                return 1  # learn the task's cost before committing many items to one worker
            seconds_per_item = self._prior
            growth_cap = max(1, remaining // (self._workers * self._policy.first_chunk_parts))
            if self.wants_item_bytes:
                # This map's items may be far larger than the last map's (4 MB arrays after
                # ints): a few items are measured before a larger chunk is read.
                growth_cap = min(growth_cap, PROBE_ITEMS)
        policy = self._policy
        size = int(policy.target_seconds / seconds_per_item)
        if self._bytes_per_item:
            size = min(size, int(MAX_CHUNK_BYTES / self._bytes_per_item))
        size = max(1, min(size, policy.max_items, growth_cap))
        if remaining is not None:
            # Keep the tail balanced: every worker gets a share of what is left. Only for work
            # that takes time: shrinking chunks of microsecond items costs round trips, not
            # balance (a whole chunk of them is over in the policy's tail_seconds).
            floor = int(policy.tail_seconds / seconds_per_item)
            size = min(size, max(1, remaining // (2 * self._workers), floor))
        self._largest = max(self._largest, size)
        return size

    @property
    def wants_item_bytes(self) -> bool:
        """Whether chunks would be sized from the last map's estimate without knowing how
        large this map's items are: ``next_size`` then says ``PROBE_ITEMS``, and the caller
        measures those (``observe_bytes``) before it reads the rest of the chunk."""
        return (
            self._policy.pickles_items
            and not self._bytes_seen
            and self._fixed is None
            and self._seconds_per_item is None
            and self._prior is not None
        )

    @property
    def probes_in_caller(self) -> bool:
        """Whether the caller should measure the ``PROBE_ITEMS`` it just read and read the
        rest of the chunk at once, instead of sending them alone (``probe_alone``)."""
        return self.wants_item_bytes and not self._policy.probe_alone

    @property
    def window_items(self) -> int:
        """How far reading may run ahead of the caller: enough to keep every worker fed."""
        largest = self._fixed or self._largest
        return max(64, 4 * self._workers * largest)
