"""A map's first chunk, sized from the last map's estimate: the probe that measures its items.

On the inline backend (no processes) with the policy patched the way each real backend sets
it, a spy on ``Dispatcher.submit`` records every chunk's size.
"""

from __future__ import annotations

import pickle
import threading
from collections.abc import Iterator
from dataclasses import replace

import pytest

from py_stateful_map import StateFullWorkerPool
from py_stateful_map.backends.chunk_policy import LOCAL_POLICY, REMOTE_POLICY
from py_stateful_map.backends.inline import InlineBackend
from py_stateful_map.core.chunking import MAX_CHUNK_BYTES, PROBE_ITEMS
from py_stateful_map.core.dispatcher import Dispatcher
from py_stateful_map.wire.serialization import pickled_size

FOUR_MB = 4 * 1024 * 1024


def add_one(x: int) -> int:
    return x + 1


def length(item: bytes) -> int:
    return len(item)


@pytest.fixture
def chunk_sizes(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    sizes: list[int] = []
    submit = Dispatcher.submit

    def spy(self: Dispatcher, slot: object, chunk: object) -> int:
        sizes.append(len(chunk.items))  # type: ignore[attr-defined]
        return submit(self, slot, chunk)  # type: ignore[arg-type]

    monkeypatch.setattr(Dispatcher, "submit", spy)
    yield sizes


def test_on_ray_the_probe_travels_in_the_first_full_chunk(
    monkeypatch: pytest.MonkeyPatch, chunk_sizes: list[int]
) -> None:
    """Ray's policy: the probe's items are pickled in the caller, then sent with the rest of
    the first chunk (a call of their own cost a millisecond of CPU per map)."""
    policy = replace(REMOTE_POLICY, pickles_items=True)
    monkeypatch.setattr(InlineBackend, "chunk_policy", policy)
    with StateFullWorkerPool(1, add_one, backend="inline") as pool:
        assert list(pool.imap(range(20_000))) == list(range(1, 20_001))
        chunk_sizes.clear()
        assert list(pool.imap(range(20_000))) == list(range(1, 20_001))
    assert chunk_sizes[0] > PROBE_ITEMS
    assert sum(chunk_sizes) == 20_000


def test_on_pipes_the_probe_goes_alone_as_a_small_first_chunk(
    monkeypatch: pytest.MonkeyPatch, chunk_sizes: list[int]
) -> None:
    """Pipes: a message is cheap, and the small first chunk's results reach an ordered
    caller at once."""
    monkeypatch.setattr(InlineBackend, "chunk_policy", LOCAL_POLICY)
    with StateFullWorkerPool(1, add_one, backend="inline") as pool:
        list(pool.imap(range(20_000)))
        chunk_sizes.clear()
        assert list(pool.imap(range(20_000))) == list(range(1, 20_001))
    assert chunk_sizes[0] == PROBE_ITEMS
    assert chunk_sizes[1] > PROBE_ITEMS


def test_large_items_after_small_ones_go_a_few_at_a_time(
    monkeypatch: pytest.MonkeyPatch, chunk_sizes: list[int]
) -> None:
    """4 MB items after a map of small ones, probed in the caller: their bytes bound every
    chunk, where the last map's estimate alone would read and send them all at once."""
    policy = replace(REMOTE_POLICY, pickles_items=True)
    monkeypatch.setattr(InlineBackend, "chunk_policy", policy)
    items = [bytes([n]) * FOUR_MB for n in range(16)]  # distinct objects: no pickle memo
    with StateFullWorkerPool(1, length, backend="inline") as pool:
        list(pool.imap([b"x"] * 20_000))
        chunk_sizes.clear()
        assert list(pool.imap(items)) == [FOUR_MB] * 16
    assert max(chunk_sizes) <= MAX_CHUNK_BYTES // FOUR_MB


def test_threads_send_no_probe(chunk_sizes: list[int]) -> None:
    """Threads and the inline backend do not pickle items: their size bounds nothing, and
    the next map starts in full-size chunks."""
    with StateFullWorkerPool(1, add_one, backend="inline") as pool:
        list(pool.imap(range(20_000)))
        chunk_sizes.clear()
        list(pool.imap(range(20_000)))
    assert chunk_sizes[0] > PROBE_ITEMS


def test_pickled_size_counts_large_buffers_without_copying_them() -> None:
    array = bytearray(FOUR_MB)
    assert pickled_size([pickle.PickleBuffer(array)]) == pytest.approx(FOUR_MB, abs=200)
    assert pickled_size(list(range(100))) == len(pickle.dumps(list(range(100)), 5))


def test_pickled_size_is_none_for_what_plain_pickle_cannot_pickle() -> None:
    assert pickled_size([threading.Lock()]) is None
    assert pickled_size([lambda x: x]) is None
