"""The automatic chunk size: learns the task's cost, settles fast, stays fair at the tail.

Pure unit tests of ``ChunkSizer`` (no workers): each scenario feeds it the timings a worker
would report and checks the sizes it then chooses.
"""

from __future__ import annotations

from itertools import pairwise

from py_stateful_map.backends.chunk_policy import LOCAL_POLICY, REMOTE_POLICY
from py_stateful_map.core.chunking import MAX_CHUNK_BYTES, PROBE_ITEMS, ChunkMemory, ChunkSizer

FIRST_CHUNK_PARTS = LOCAL_POLICY.first_chunk_parts


def test_a_first_map_starts_with_one_item_and_grows_at_most_eightfold() -> None:
    sizer = ChunkSizer(2)
    assert sizer.next_size(100_000) == 1
    sizer.observe(1, 30e-6)  # one tiny item: mostly the chunk's own fixed cost
    sizes = [sizer.next_size(100_000)]
    for _ in range(4):
        sizer.observe(sizes[-1], sizes[-1] * 1e-7)
        sizes.append(sizer.next_size(100_000))
    assert sizes[0] == 8
    assert all(b <= 8 * a for a, b in pairwise(sizes))


def test_one_large_chunk_outweighs_the_noisy_single_item_chunks() -> None:
    """Four 1-item chunks measured at 10-60 us each (their fixed cost), then one chunk of
    4096 items of 0.1 us: the estimate follows the large chunk, so tiny tasks reach the
    policy's largest chunks at once (an average of per-chunk rates took a dozen chunks)."""
    sizer = ChunkSizer(2)
    for seconds in (42e-6, 16e-6, 60e-6, 32e-6):
        sizer.observe(1, seconds)
    sizer.observe(4096, 4096 * 1e-7)
    sizer._largest = LOCAL_POLICY.max_items  # past the growth cap: the estimate alone decides
    assert sizer.next_size(None) == LOCAL_POLICY.max_items


def test_really_slower_items_shrink_the_next_chunk_at_once() -> None:
    sizer = ChunkSizer(2)
    sizer.observe(4096, 4096 * 1e-7)
    sizer._largest = LOCAL_POLICY.max_items
    assert sizer.next_size(None) == LOCAL_POLICY.max_items
    sizer.observe(4096, 4096 * 1e-3)  # now a millisecond each
    assert sizer.next_size(None) <= 40  # ~20-30 ms of work (the fast chunk still counts)


def test_slow_items_go_one_per_chunk() -> None:
    sizer = ChunkSizer(4)
    sizer.observe(1, 0.5)
    assert sizer.next_size(1000) == 1


def test_the_next_map_starts_from_the_last_maps_estimate_within_a_fair_share() -> None:
    memory = ChunkMemory()
    first = ChunkSizer(2, memory=memory)
    first.next_size(50_000)
    first.observe(4096, 4096 * 5e-8)
    assert memory.seconds_per_item is not None
    second = ChunkSizer(2, memory=memory)
    # A probe measures this map's items; then no ramp from one item, but no more than a
    # share of what is left, until this map's first answer.
    assert second.next_size(50_000) == PROBE_ITEMS
    second.observe_bytes(PROBE_ITEMS, 5 * PROBE_ITEMS)  # small ints
    left = 50_000 - PROBE_ITEMS
    parts = 2 * FIRST_CHUNK_PARTS
    assert second.next_size(left) == left // parts
    assert second.next_size(left - left // parts) == (left - left // parts) // parts
    assert second.window_items >= left // parts  # the read-ahead lets that chunk be read


def test_large_items_after_small_ones_go_a_few_at_a_time() -> None:
    """4 MB arrays after a map of ints: the probe's bytes cap the next chunks, where the
    last map's estimate alone would send a sixth of the map per chunk (hundreds of MB)."""
    sizer = ChunkSizer(2, memory=ChunkMemory(seconds_per_item=1e-7))
    assert sizer.next_size(1000) == PROBE_ITEMS
    sizer.observe_bytes(PROBE_ITEMS, PROBE_ITEMS * 4 * 1024 * 1024)
    assert sizer.next_size(1000 - PROBE_ITEMS) == MAX_CHUNK_BYTES // (4 * 1024 * 1024)


def test_on_ray_a_probes_fixed_cost_does_not_shrink_the_next_chunks() -> None:
    """The 8-item probe measured 47 us after a pause (6 us an item, 150x the last map's
    0.04 us): on Ray, where every call costs a millisecond, that short a measurement may not
    raise the estimate, so the map goes on in full-size chunks (7 calls became 5)."""
    for policy in (REMOTE_POLICY, LOCAL_POLICY):
        sizer = ChunkSizer(2, policy=policy, memory=ChunkMemory(seconds_per_item=4e-8))
        assert sizer.next_size(50_000) == PROBE_ITEMS
        sizer.observe_bytes(PROBE_ITEMS, 3 * PROBE_ITEMS)
        left = 50_000 - PROBE_ITEMS
        first = sizer.next_size(left)  # sent before the probe's answer
        sizer.observe(PROBE_ITEMS, 47e-6)
        after = sizer.next_size(left - first)
        if policy is REMOTE_POLICY:
            assert first == after == REMOTE_POLICY.max_items
        else:  # on pipes the answer is taken at face value: smaller chunks are cheap there
            assert after == int(LOCAL_POLICY.target_seconds / (47e-6 / PROBE_ITEMS)) < first


def test_on_ray_a_probe_of_slow_items_moves_the_estimate_at_once() -> None:
    """8 items of a millisecond after a map of tiny ones: past the trusted time, so the next
    chunks are sized from them (a few items), not from the last map (thousands)."""
    sizer = ChunkSizer(2, policy=REMOTE_POLICY, memory=ChunkMemory(seconds_per_item=4e-8))
    sizer.observe_bytes(PROBE_ITEMS, 3 * PROBE_ITEMS)
    sizer.observe(PROBE_ITEMS, PROBE_ITEMS * 1e-3)
    assert sizer.next_size(10_000) <= int(REMOTE_POLICY.target_seconds / 1e-3)


def test_a_remembered_estimate_never_hands_one_worker_more_than_its_share() -> None:
    """After a map of tiny items, a map of 24 slow items: each worker still gets a part of
    it (the last map's estimate would have put all 24 in one chunk)."""
    memory = ChunkMemory(seconds_per_item=1e-7)
    sizer = ChunkSizer(2, memory=memory)
    sizer.observe_bytes(1, 30)  # this map's items are small
    assert sizer.next_size(24) == 24 // (2 * FIRST_CHUNK_PARTS)
    assert sizer.next_size(3) == 1


def test_an_input_of_unknown_length_ignores_the_remembered_estimate() -> None:
    memory = ChunkMemory(seconds_per_item=1e-7)
    sizer = ChunkSizer(2, memory=memory)
    assert sizer.next_size(None) == 1


def test_the_tail_of_a_sized_map_shrinks_for_items_that_take_time() -> None:
    sizer = ChunkSizer(2)
    sizer.observe(10, 10 * 1e-3)  # a millisecond each: 20 per chunk
    sizer._largest = 1000
    assert sizer.next_size(10_000) == 20
    assert sizer.next_size(40) == 10  # a share of what is left for each worker
    assert sizer.next_size(3) == 1


def test_a_fixed_chunk_size_is_kept() -> None:
    sizer = ChunkSizer(2, fixed=7, memory=ChunkMemory(seconds_per_item=1e-7))
    sizer.observe(7, 7.0)
    assert sizer.next_size(1000) == 7
