"""How much work one message to a worker should carry, as each backend declares it.

A message costs 50-100 µs on a pipe and about a millisecond on a Ray actor: each backend
states its cost as a :class:`ChunkPolicy`, and the parent's chunk sizer
(:mod:`py_stateful_map.core.chunking`) aims each chunk at it. The policy lives with the
backends, which own the cost; the sizer, which reads it, lives with the core.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


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
