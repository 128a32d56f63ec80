"""Automatic chunk size: enough items per message that transport overhead stops mattering.

A chunk is the unit sent to a worker. Tiny tasks need big chunks (per-message costs dominate);
slow tasks need chunks of one (so work spreads evenly and a slow item holds up nothing else).
The sizer measures how long workers spend per item and aims each chunk at a fixed amount of
worker time, the way an expert hand-tunes ``multiprocessing.Pool.imap(chunksize=...)``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

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
    #: Before a map's first answer, a chunk sized from the last map's estimate holds at most
    #: 1/(workers x this) of what is left: smaller first chunks bring the first answers back
    #: sooner, each one smaller than the one before, where a message is cheap; few and large
    #: ones where it is not.
    first_chunk_parts: int = 1
    #: Worker time a map must have measured before its own estimate may exceed the last map's.
    #: Short measurements are mostly each chunk's fixed cost (the first chunk of 8 tiny items
    #: after a pause measured 47 µs, 6 µs an item against 0.04 µs), and taken at face value
    #: they shrink the next chunks 100x: where a message is expensive, the map then pays for
    #: calls it did not need. A slow map still moves the estimate at once (8 items of 1 ms are
    #: past a millisecond). Zero: a map trusts its own first answer.
    trusted_seconds: float = 0.0
    #: Whether chunks are pickled on their way to a worker: only then do their bytes bound a
    #: chunk (``MAX_CHUNK_BYTES``) and are a map's first items measured.
    pickles_items: bool = True
    #: Whether the ``PROBE_ITEMS`` measured at the start of a map go to a worker as a chunk of
    #: their own (measured as they are sent) rather than pickled once more in the caller and
    #: sent with the rest of the first chunk. Where a message is cheap the small first chunk
    #: is worth it: its results come back at once and an ordered caller starts consuming them.
    probe_alone: bool = True


#: A pipe or a queue: 50-100 µs per message, parent and worker together (with a fixed chunk
#: size, 50,000 tiny tasks took 8.4 ms in chunks of 2048, 7.0 ms in chunks of 4096 and 6.0 ms
#: in chunks of 8192). Measured with the sizer on 50,000 tiny tasks, 2 workers, medians of 60
#: interleaved rounds (ms per map; ``multiprocessing.Pool.imap`` at its best chunk size in the
#: same rounds in brackets):
#:
#: - ``max_items``: 7.48 / 7.08 at 16384, 6.26 / 6.00 at 8192, 6.13 at 12288, 6.29 at 4096
#:   (8.95 / 9.35): more chunks in flight overlap the caller's work with the workers'. 8192
#:   also keeps the read-ahead of an endless input (4 chunks per worker) at 65,536 items for
#:   two workers.
#: - ``first_chunk_parts``: 8.35 at 2, 7.67 at 6, 7.82 at 8 (11.25).
#: - ``tail_seconds``: 7.45 at 1 ms, 6.80 at 0.3 ms, 6.27 and 6.68 at 0.1 ms (two runs), 6.26
#:   at 0.03 ms, 7.60 with none (8.6): a short last chunk brings the last results sooner,
#:   until the round trips cost more than that saves.
LOCAL_POLICY = ChunkPolicy(
    target_seconds=0.02, max_items=8192, tail_seconds=0.0001, first_chunk_parts=6
)
#: Threads and the inline backend hand items over without copying them: bytes bound nothing.
IN_PROCESS_POLICY = replace(LOCAL_POLICY, pickles_items=False)
#: A Ray actor call costs about a millisecond of CPU spread over the driver, the actor's RPC
#: threads and the object store, and on a busy node that CPU is taken from the workers
#: themselves: chunks carry ~10x more work. At most 16384 items: a chunk of small values then
#: stays under Ray's 100 KiB limit for arguments passed inline, where a larger one goes through
#: the object store and costs 1 ms more per call (measured: benchmarks/NOTES.md).
#: ``probe_alone``: the probe as a call of its own cost 15.57 against 14.98 ms a map (medians
#: of 40 interleaved rounds, 50,000 tiny tasks); on pipes the small first chunk made ordered
#: maps faster (7.40 against 8.29 ms), unordered ones the same (7.29 against 7.36).
#: ``trusted_seconds``: with none, the 8-item probe's answer cut 50,000 tiny tasks into 7 calls
#: instead of 5 (15.86 against 15.29 ms a map, medians of 30 interleaved rounds); on pipes the
#: same rule made ordered maps slower (7.34 against 6.27 ms: there, smaller early chunks
#: start the caller's consumption sooner, and messages are cheap).
REMOTE_POLICY = ChunkPolicy(
    target_seconds=0.2,
    max_items=16384,
    tail_seconds=0.02,
    trusted_seconds=0.001,
    probe_alone=False,
)


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
