"""Arrays and tensors cross the pool bit-exact, and shared memory never leaks.

Large buffers (>= ``THRESHOLD``) travel through ``/dev/shm`` segments named
``psm-<parent pid>-...``; small ones, non-contiguous arrays, bfloat16 tensors and tensors that
require grad go through the pipe. Each round-trip test pushes one group of cases through a
worker that returns its input (``identity``) and one that returns a new array (``times_one``),
on the processes and threads backends.

Leak checks count only the segments of the process under test (``psm-<its pid>-*``): other
test runs on the same machine have their own. Scenarios that kill or interrupt the parent run
a small script in a subprocess (see ``tests/test_faults.py``).
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import psutil
import pytest

from py_stateful_map import ExceptionBehavior, StateFullWorkerPool, WorkerDiedError
from py_stateful_map.wire import shared_memory as shm
from py_stateful_map.wire.messages import RunChunk
from py_stateful_map.wire.serialization import DETACH_THRESHOLD, Codec

from .conftest import LOCAL_BACKENDS, RAY_BACKEND
from .scripts import read_line_starting, start_script

SHM_DIR = Path("/dev/shm")
LARGE = (1000, 1000)  # >= 1 MB for every dtype below: through shared memory
NUMPY_DTYPES = ["float64", "float32", "int8", "uint16", "bool", "complex64"]
TORCH_DTYPES = ["float32", "int64", "bool", "float16", "bfloat16"]

pytestmark = pytest.mark.skipif(not shm.available(), reason="needs a writable /dev/shm")

#: Where a copy crosses a process boundary: /dev/shm (processes), Ray's object store (ray).
COPYING_BACKENDS = ["processes", *RAY_BACKEND]
ROUND_TRIP_BACKENDS = [*LOCAL_BACKENDS, *RAY_BACKEND]


@pytest.fixture(autouse=True)
def _ray_for_ray_backend(request: pytest.FixtureRequest) -> None:
    """Ray-parametrized tests share one local Ray instance for the module."""
    params = getattr(request.node, "callspec", None)
    if params is not None and params.params.get("backend") == "ray":
        request.getfixturevalue("ray_cluster")


# -- workers (module level: worker processes import them by name) --------------------------


def identity(x: Any) -> Any:
    return x


def times_one(x: Any) -> Any:
    """A new array or tensor (same dtype, shape and values) for every one found in ``x``."""
    if isinstance(x, np.ndarray):
        return np.asarray(x * np.ones((), dtype=x.dtype))  # asarray: 0-d gives a scalar
    if type(x).__module__.startswith("torch"):
        import torch

        with torch.no_grad():
            out = x * torch.ones((), dtype=x.dtype)
        return out.requires_grad_(x.requires_grad)
    if isinstance(x, (tuple, list)):
        return type(x)(times_one(v) for v in x)
    if isinstance(x, dict):
        return {k: times_one(v) for k, v in x.items()}
    return x


def busy_identity(x: Any) -> Any:
    """Return ``x`` after 50 ms of pure Python: the worker holds the GIL most of the time."""
    deadline = time.perf_counter() + 0.05
    while time.perf_counter() < deadline:
        pass
    return x


def scribble_then_sum(x: np.ndarray) -> float:
    """Overwrite the received array in place (it is the worker's to keep), return its sum."""
    total = float(x.sum())
    x[...] = 99
    return total


def large_array_for(seed: int) -> np.ndarray:
    return np.full(1 << 18, seed, dtype=np.float32)  # 1 MiB


def four_mb_array_for(seed: int) -> np.ndarray:
    return np.full(1 << 20, seed, dtype=np.float32)


def first_and_last(x: np.ndarray) -> tuple[float, float]:
    return float(x[0]), float(x[-1])


class DieWhenPickled:
    """Kills its worker while the result that holds it is being pickled (sent)."""

    def __init__(self, how: str) -> None:
        self.how = how

    def __reduce__(self) -> NoReturn:  # type: ignore[override]
        die(self.how)


def die(how: str) -> NoReturn:
    if how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(10)
    os._exit(7)


def fault_on_transport(item: tuple[np.ndarray, str, str]) -> Any:
    """``(array, how, when)``: die on receiving ``array``, or while returning a large one."""
    array, how, when = item
    if when == "on_receive":
        die(how)
    if when == "on_return":
        return (array * 2, DieWhenPickled(how))
    return array * 2


# -- helpers -------------------------------------------------------------------------------


def segments(pid: int | None = None, directory: Path = SHM_DIR) -> list[str]:
    """Names of the shared-memory segments of process ``pid`` (default: this one)."""
    prefix = shm.prefix_for(os.getpid() if pid is None else pid)
    return sorted(p.name for p in directory.glob(f"{prefix}*"))


def round_trip(
    backend: str, worker: Callable[[Any], Any], items: list[Any], **kw: Any
) -> list[Any]:
    """Map ``items`` through a fresh 2-worker pool; returns the values; checks for leaks."""
    before = segments()
    with StateFullWorkerPool(2, worker, backend=backend, chunk_size=1, **kw) as pool:
        results = [r.ret_val for r in pool.map(items)]
    assert segments() == before, "segments left after the pool closed"
    return results


def numpy_cases(dtype: str) -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(abs(hash(dtype)) % 1000)

    def make(shape: tuple[int, ...]) -> np.ndarray:
        return np.asarray(draw(shape))  # 0-d draws come back as scalars

    def draw(shape: tuple[int, ...]) -> Any:
        if dtype == "bool":
            return rng.random(shape) < 0.5
        if dtype.startswith("complex"):
            return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype)
        if dtype.startswith("float"):
            return rng.standard_normal(shape).astype(dtype)
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=dtype)

    large = make(LARGE)
    readonly_large, readonly_small = make(LARGE), make((5,))
    readonly_large.flags.writeable = readonly_small.flags.writeable = False
    return [
        ("empty", make((0,))),
        ("small", make((3,))),
        ("empty-3d", make((7, 0, 3))),
        ("large", large),
        ("large-fortran", np.asfortranarray(make((1200, 900)))),
        ("small-fortran", np.asfortranarray(make((4, 3)))),
        ("large-every-other", make((2000, 1000))[::2]),
        ("large-transposed", large.T),
        ("small-transposed", make((3, 4)).T),
        ("large-readonly", readonly_large),
        ("small-readonly", readonly_small),
        ("scalar-0d", make(())),
    ]


def assert_same_array(got: Any, want: np.ndarray, what: str) -> None:
    assert isinstance(got, np.ndarray), what
    assert got.dtype == want.dtype, what
    assert got.shape == want.shape, what
    assert np.ascontiguousarray(got).tobytes() == np.ascontiguousarray(want).tobytes(), what


def assert_writable_like_numpy(got: np.ndarray, returned: np.ndarray, what: str) -> None:
    """Writable exactly where numpy's own protocol-5 pickling (there and back) makes it so."""
    there = pickle.loads(pickle.dumps(returned, protocol=5))
    reference = pickle.loads(pickle.dumps(there, protocol=5))
    assert got.flags.writeable == reference.flags.writeable, what


# -- numpy round trips ---------------------------------------------------------------------


@pytest.mark.parametrize("backend", ROUND_TRIP_BACKENDS)
@pytest.mark.parametrize("worker", [identity, times_one], ids=["identity", "times_one"])
@pytest.mark.parametrize("dtype", NUMPY_DTYPES)
def test_numpy_arrays_round_trip_bit_exact(
    dtype: str, worker: Callable[[Any], Any], backend: str
) -> None:
    cases = numpy_cases(dtype)
    got = round_trip(backend, worker, [array for _, array in cases])
    for (name, sent), received in zip(cases, got, strict=True):
        what = f"{dtype} {name}"
        assert_same_array(received, sent, what)
        if backend == "threads":
            assert (received is sent) == (worker is identity), what
            continue
        assert_writable_like_numpy(received, sent if worker is identity else sent.copy(), what)
        if worker is identity and sent.flags.f_contiguous and not sent.flags.c_contiguous:
            assert received.flags.f_contiguous, what  # Fortran order is kept


@pytest.mark.parametrize("backend", ROUND_TRIP_BACKENDS)
def test_buffers_at_the_threshold_round_trip(backend: str) -> None:
    sizes = [
        *(
            threshold + delta
            for threshold in (DETACH_THRESHOLD, shm.THRESHOLD)
            for delta in (-1, 0, 1)
        ),
        3 * shm.THRESHOLD + 5,
    ]
    sent = [np.arange(size, dtype=np.uint8) for size in sizes]
    for received, array in zip(round_trip(backend, times_one, sent), sent, strict=True):
        assert_same_array(received, array, f"{array.nbytes} bytes")
        assert received.flags.writeable


@pytest.mark.parametrize("backend", ROUND_TRIP_BACKENDS)
@pytest.mark.parametrize("worker", [identity, times_one], ids=["identity", "times_one"])
def test_nested_arrays_round_trip(worker: Callable[[Any], Any], backend: str) -> None:
    big = np.arange(1 << 20, dtype=np.float64)
    small = np.arange(10, dtype=np.int8)
    items = [
        (big, small, "text", 3),
        [big[::-1], {"a": small, "b": [big.reshape(1024, 1024).T]}],
        {"x": big, "y": (big, big)},  # the same buffer twice
        {"deep": [[(np.ones((600, 600), dtype=np.float32),)]]},
    ]
    got = round_trip(backend, worker, items)

    def compare(received: Any, sent: Any, path: str) -> None:
        if isinstance(sent, np.ndarray):
            assert_same_array(received, sent, path)
        elif isinstance(sent, dict):
            assert isinstance(received, dict) and received.keys() == sent.keys(), path
            for key in sent:
                compare(received[key], sent[key], f"{path}[{key!r}]")
        elif isinstance(sent, (tuple, list)):
            assert type(received) is type(sent) and len(received) == len(sent), path
            for i, (r, s) in enumerate(zip(received, sent, strict=True)):
                compare(r, s, f"{path}[{i}]")
        else:
            assert received == sent, path

    for i, (received, sent) in enumerate(zip(got, items, strict=True)):
        compare(received, sent, f"item {i}")
        if backend == "threads" and worker is identity:
            assert received is sent


@pytest.mark.parametrize("backend", ROUND_TRIP_BACKENDS)
def test_received_arrays_can_be_modified_without_corrupting_other_items(backend: str) -> None:
    sent = [large_array_for(i) for i in range(30)]
    before = segments()
    kept = []
    with StateFullWorkerPool(2, identity, backend=backend, chunk_size=1) as pool:
        for _ in range(2):  # the second map reuses segments the first one released
            for i, result in enumerate(pool.map(sent)):
                array = result.ret_val
                assert (array == i).all(), f"item {i} corrupted"
                if backend in COPYING_BACKENDS:
                    array[...] = -1  # the caller owns what it received
                    if i % 3 == 0:
                        kept.append(array)  # the rest is dropped: its segment is reused
    assert all((array == -1).all() for array in kept)
    assert all((array == i).all() for i, array in enumerate(sent)), "an input changed"
    assert segments() == before


@pytest.mark.parametrize("backend", ROUND_TRIP_BACKENDS)
def test_worker_modifying_its_input_does_not_touch_the_callers_array(backend: str) -> None:
    sent = [np.full(1 << 18, i, dtype=np.float32) for i in range(8)]
    results = round_trip(backend, scribble_then_sum, sent)
    assert results == [float(i) * (1 << 18) for i in range(8)]
    if backend in COPYING_BACKENDS:
        assert all((array == i).all() for i, array in enumerate(sent))
    else:  # threads hand over the very object: the worker's writes are the caller's
        assert all((array == 99).all() for array in sent)


# -- detached buffers (the Ray backend's framing) --------------------------------------------


def test_detached_encoding_keeps_large_buffers_out_of_the_frame() -> None:
    big = np.arange(DETACH_THRESHOLD, dtype=np.uint8)
    small = np.arange(DETACH_THRESHOLD - 1, dtype=np.uint8)
    codec = Codec()
    message = RunChunk(chunk_id=3, start=0, payload=[big, small, "text"])
    frame, buffers, size = codec.encode_detached(message)
    assert [memoryview(b).nbytes for b in buffers] == [big.nbytes]  # only the large one
    assert len(frame) < big.nbytes + small.nbytes  # the small one stays in-band
    assert big.nbytes + small.nbytes <= size <= len(frame) + big.nbytes
    # The receiver may get read-only views (Ray's object store): it must hand out copies
    # that are writable and own their memory.
    read_only = [memoryview(bytes(memoryview(b))) for b in buffers]
    task, raw, descriptors = codec.decode_header(frame)
    got = codec.with_payload(task, raw, descriptors, read_only).payload
    assert got[2] == "text" and task.chunk_id == 3
    for received, sent in zip(got[:2], (big, small), strict=True):
        assert_same_array(received, sent, f"{sent.nbytes} bytes")
        assert received.flags.writeable
        received[...] = 0


def test_detached_encoding_falls_back_to_cloudpickle_in_band() -> None:
    codec = Codec()
    message = RunChunk(chunk_id=0, start=0, payload=[lambda x: x + 1])
    frame, buffers, _ = codec.encode_detached(message)
    assert buffers == []
    task, raw, descriptors = codec.decode_header(frame)
    assert codec.with_payload(task, raw, descriptors, buffers).payload[0](1) == 2


# -- torch round trips ---------------------------------------------------------------------


def torch_cases(dtype_name: str) -> list[tuple[str, Any]]:
    torch = pytest.importorskip("torch")
    dtype = getattr(torch, dtype_name)
    gen = torch.Generator().manual_seed(0)

    def make(*shape: int) -> Any:
        if dtype == torch.bool:
            return torch.rand(*shape, generator=gen) < 0.5
        if dtype.is_floating_point:
            return torch.randn(*shape, generator=gen).to(dtype)
        return torch.randint(-(2**40), 2**40, shape, generator=gen, dtype=dtype)

    cases = [
        ("large", make(700, 700)),
        ("small", make(3)),
        ("empty", make(0)),
        ("empty-3d", make(7, 0, 3)),
        ("large-transposed", make(700, 600).t()),
        ("large-every-other", make(1200, 500)[::2]),
        ("small-non-contiguous", make(4, 6)[:, 1::2]),
    ]
    if dtype.is_floating_point:
        cases.append(("large-requires-grad", make(400, 400).requires_grad_()))
        cases.append(("small-requires-grad", make(3).requires_grad_()))
    return cases


def assert_same_tensor(got: Any, want: Any, what: str) -> None:
    import torch

    assert isinstance(got, torch.Tensor), what
    assert got.dtype == want.dtype and got.shape == want.shape, what
    assert got.device.type == "cpu", what
    assert got.requires_grad == want.requires_grad, what
    as_bytes = [t.detach().contiguous().view(-1).view(torch.uint8) for t in (got, want)]
    assert torch.equal(as_bytes[0], as_bytes[1]), what


@pytest.mark.parametrize("backend", ROUND_TRIP_BACKENDS)
@pytest.mark.parametrize("worker", [identity, times_one], ids=["identity", "times_one"])
def test_torch_tensors_round_trip_bit_exact(worker: Callable[[Any], Any], backend: str) -> None:
    # every dtype in one map: each pool's workers pay for ``import torch`` once
    cases = [(f"{dtype} {name}", t) for dtype in TORCH_DTYPES for name, t in torch_cases(dtype)]
    big = cases[0][1]
    mixed = {"tensors": (big, big.t()), "array": np.arange(1 << 18), "none": None}
    *got, got_mixed = round_trip(backend, worker, [tensor for _, tensor in cases] + [mixed])
    assert_same_tensor(got_mixed["tensors"][0], big, "mixed")
    assert_same_tensor(got_mixed["tensors"][1], big.t(), "mixed, transposed")
    assert_same_array(got_mixed["array"], mixed["array"], "mixed")
    assert got_mixed["none"] is None
    for (what, sent), received in zip(cases, got, strict=True):
        assert_same_tensor(received, sent, what)
        if backend == "threads":
            assert (received is sent) == (worker is identity), what
        elif not sent.requires_grad:
            received.copy_(received.clone())  # writable in place (a read-only warning errors)


# -- no leaks ------------------------------------------------------------------------------


def test_ctrl_c_while_a_segment_is_filled_leaves_no_segment(monkeypatch: Any) -> None:
    """A KeyboardInterrupt during the copy into a fresh segment (CI caught one with a real
    Ctrl-C): the segment must still be one that ``close()`` removes."""
    pool = shm.SegmentPool(f"{shm.prefix_for(os.getpid())}ctrlc-")
    create = pool._create

    class InterruptedCopy:
        """Stands for the segment's mapping: the copy into it is interrupted."""

        def __init__(self, mapping: Any) -> None:
            self.mapping = mapping

        def __setitem__(self, key: Any, value: Any) -> None:
            raise KeyboardInterrupt

    def create_then_interrupt(capacity: int) -> Any:
        segment = create(capacity)
        assert segment is not None
        interrupted = InterruptedCopy(segment.mapping)
        segment.mapping = interrupted  # type: ignore[assignment]
        return segment

    monkeypatch.setattr(pool, "_create", create_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        pool.dumps(np.zeros(1 << 20, dtype=np.float32))
    assert segments(directory=shm.SHM_DIR) != []  # the segment exists, kept for reuse
    monkeypatch.undo()
    for segment in pool._free:
        if isinstance(segment.mapping, InterruptedCopy):
            segment.mapping = segment.mapping.mapping
    pool.close()
    assert [name for name in segments() if "ctrlc-" in name] == []


def test_closing_a_segment_pool_removes_segments_it_lost_track_of() -> None:
    """A Ctrl-C between creating a segment's file and recording it leaves a file no list
    knows: ``close()`` sweeps the pool's whole prefix."""
    prefix = f"{shm.prefix_for(os.getpid())}stray-"
    pool = shm.SegmentPool(prefix)
    stray = shm.SHM_DIR / f"{prefix}7"
    shm._track(stray.name)  # as _create does, before the file exists
    stray.write_bytes(b"left by an interrupted _create")
    pool.close()
    assert not stray.exists()


def test_segments_are_reused_and_removed_after_normal_maps() -> None:
    before = segments()
    sent = [large_array_for(i) for i in range(40)]
    with StateFullWorkerPool(2, times_one) as pool:
        for _ in range(3):  # 120 arrays each way
            assert [float(r.ret_val[-1]) for r in pool.map(sent)] == list(range(40))
        in_use = len(segments()) - len(before)
        assert in_use > 0, "large arrays did not go through shared memory"
        assert in_use <= 100, "segments are not reused: bounded by what is in flight, not by items"
    assert segments() == before


def test_results_kept_alive_stay_valid_after_close_then_nothing_is_left() -> None:
    before = segments()
    with StateFullWorkerPool(2, large_array_for, chunk_size=1) as pool:
        kept = [r.ret_val for r in pool.map(range(24))]
        assert len(segments()) >= len(before) + 24, "kept results must each hold a segment"
    assert segments() == before  # unlinked, though still mapped by ``kept``
    assert all(float(array[0]) == i and float(array[-1]) == i for i, array in enumerate(kept))
    del kept
    assert segments() == before


@pytest.mark.parametrize("how", ["exit", "kill"])
@pytest.mark.parametrize("when", ["on_receive", "on_return"])
def test_worker_dying_mid_transfer_leaves_no_segment(how: str, when: str) -> None:
    before = segments()
    arrays = [large_array_for(i) for i in range(8)]
    items = [(a, how, when if i == 3 else "ok") for i, a in enumerate(arrays)]
    with StateFullWorkerPool(
        2,
        fault_on_transport,
        chunk_size=1,
        max_retries=0,
        exception_behavior=ExceptionBehavior.DEFERRED,
    ) as pool:
        results = list(pool.map(items))
        assert isinstance(results[3].exception_obj, WorkerDiedError)
        for i, result in enumerate(results):
            if i != 3:
                assert result.exception_obj is None
                assert float(result.ret_val[0]) == 2 * i
        dead_pid = results[3].exception_obj.pid
        alive_pids = {w["pid"] for w in pool.stats().workers}
        orphans = [
            name
            for name in segments()
            if "-w" in name and int(name.split("-w")[1].split("-")[0]) not in alive_pids
        ]
        assert not orphans, f"segments of dead worker {dead_pid} are left: {orphans}"
        assert [r.ret_val[0] for r in pool.map(items[:3])] == [0, 2, 4]  # still usable
    assert segments() == before


# -- Ctrl-C and parent death, in a subprocess ----------------------------------------------

FLOW_SCRIPT = """
import os, sys, time
import numpy as np
from py_stateful_map import StateFullWorkerPool
from py_stateful_map.wire import shared_memory as shm
from py_stateful_map.wire.messages import RunChunk
from py_stateful_map.wire.serialization import DETACH_THRESHOLD, Codec
from tests.test_transport import busy_identity, segments

def items():
    for i in range(100000):
        yield np.full(1 << 20, i, dtype=np.float32)  # 4 MB each way

def main():
    mode, start_method = sys.argv[1], sys.argv[2]
    pool = StateFullWorkerPool(2, busy_identity, chunk_size=1, start_method=start_method)
    print("PIDS", *[w["pid"] for w in pool.stats().workers], flush=True)
    try:
        for i, result in enumerate(pool.map(items())):
            if i == 5:
                print("FLOWING", len(segments(directory=shm.SHM_DIR)), flush=True)
    except KeyboardInterrupt:
        pool.close(cancel=True)
        print("CAUGHT", flush=True)
        return

if __name__ == "__main__":
    main()
"""


def wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def gone(pids: list[int]) -> bool:
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                return False
        except psutil.NoSuchProcess:
            pass
    return True


@pytest.fixture
def private_shm_dir() -> Iterator[Path]:
    """A directory of our own in /dev/shm: no other pool's orphan sweep can tidy up for us."""
    directory = SHM_DIR / f"pytest-transport-{os.getpid()}-{time.monotonic_ns()}"
    directory.mkdir()
    yield directory
    for path in directory.iterdir():
        path.unlink()
    directory.rmdir()


@pytest.fixture
def flow_script(
    tmp_path: Path, private_shm_dir: Path
) -> Iterator[Callable[..., tuple[subprocess.Popen[str], list[int]]]]:
    started: list[tuple[subprocess.Popen[str], list[int]]] = []

    def start(
        mode: str, start_method: str, private: bool = True
    ) -> tuple[subprocess.Popen[str], list[int]]:
        env = {"PY_STATEFUL_MAP_SHM_DIR": str(private_shm_dir)} if private else {}
        proc = start_script(tmp_path, FLOW_SCRIPT, mode, start_method, env=env)
        started.append((proc, []))
        pids = [int(p) for p in read_line_starting(proc, "PIDS", 60).split()[1:]]
        started[-1] = (proc, pids)
        flowing = read_line_starting(proc, "FLOWING", 60)
        assert int(flowing.split()[1]) > 0, "large arrays did not go through shared memory"
        return proc, pids

    yield start
    for proc, pids in started:
        for pid in pids:
            try:
                psutil.Process(pid).kill()
            except psutil.NoSuchProcess:
                pass
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_ctrl_c_while_large_arrays_flow_leaves_no_segment(
    flow_script: Any, private_shm_dir: Path
) -> None:
    proc, pids = flow_script("interrupt", "forkserver")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert "CAUGHT" in out, err
    assert wait_until(lambda: gone(pids), 5.0), "workers outlived the interrupted script"
    assert segments(proc.pid, private_shm_dir) == []


@pytest.mark.parametrize("start_method", ["forkserver", "spawn"])
def test_parent_sigkilled_while_large_arrays_flow_leaves_no_segment(
    flow_script: Any, start_method: str
) -> None:
    """In /dev/shm itself: what the killed workers' watchdogs could not remove, the resource
    tracker does (a private directory would only have the watchdogs)."""
    proc, pids = flow_script("kill", start_method, private=False)
    proc.kill()
    proc.wait(10)
    assert wait_until(lambda: gone(pids), 5.0), "workers outlived their SIGKILLed parent"
    left = lambda: segments(proc.pid)  # noqa: E731
    assert wait_until(lambda: not left(), 3.0), left()


# -- a full shared-memory directory: back to the pipe --------------------------------------

FALLBACK_SCRIPT = """
import logging, sys
import numpy as np
from py_stateful_map import StateFullWorkerPool
from tests.test_transport import first_and_last, four_mb_array_for

logging.basicConfig(level=logging.WARNING, format="LOG %(process)d %(message)s")

def main():
    sent = [np.full(1 << 20, i, dtype=np.float32) for i in range(12)]  # 4 MB each
    with StateFullWorkerPool(2, first_and_last, chunk_size=1) as pool:
        for i, result in enumerate(pool.map(sent)):  # the parent's sends fall back
            assert result.ret_val == (i, i), i
    print("PARENT-SENT", file=sys.stderr, flush=True)
    with StateFullWorkerPool(2, four_mb_array_for, chunk_size=1) as pool:
        for i, result in enumerate(pool.map(range(12))):  # the workers' sends fall back
            assert result.ret_val.shape == (1 << 20,) and (result.ret_val == i).all(), i
    print("OK", flush=True)

if __name__ == "__main__":
    main()
"""


@pytest.fixture(scope="module")
def fallback_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """Run FALLBACK_SCRIPT with segments in a 1 MB tmpfs; yields (its stderr, the tmpfs)."""
    tmp_path = tmp_path_factory.mktemp("fallback")
    mount_point = tmp_path / "tiny-shm"
    mount_point.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace')}")
    try:
        proc = start_script(
            tmp_path, FALLBACK_SCRIPT, env={"PY_STATEFUL_MAP_SHM_DIR": str(mount_point)}
        )
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0 and "OK" in out, err
        yield err, mount_point
        assert list(mount_point.iterdir()) == []
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fallback_warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "through the pipe" in line]


def test_full_shm_dir_falls_back_to_the_pipe_with_one_warning(fallback_run: Any) -> None:
    err, _ = fallback_run
    before_workers_send = err.split("PARENT-SENT")[0]
    assert len(fallback_warnings(before_workers_send)) == 1, err
    assert "full" in fallback_warnings(before_workers_send)[0]


def test_full_shm_dir_warns_once_even_when_workers_return_large_arrays(
    fallback_run: Any,
) -> None:
    err, _ = fallback_run
    assert len(fallback_warnings(err)) == 1, err


def test_fall_back_warning_names_the_directory(fallback_run: Any) -> None:
    err, mount_point = fallback_run
    assert str(mount_point) in fallback_warnings(err)[0], err
