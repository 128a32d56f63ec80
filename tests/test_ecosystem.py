"""The pool among its neighbours: progress bars, the pqdm drop-ins, stats, logging, typing.

Each test guards one promise the library makes to the tools around it:

- *Progress*: the result iterator has ``len()``, so tqdm, rich and hand-written bars show a
  total; ``progress=`` and ``on_result=`` count items (not chunks or batches) and the bar is
  closed however the map ends.
- *pqdm drop-in*: ``py_stateful_map.processes.pqdm`` / ``.threads.pqdm`` keep pqdm 0.2's
  signature and results (compared with the real pqdm when it is installed), plus stateful
  workers and lazy input.
- *Statistics*: ``pool.stats()`` counts items, busy time, restarts and retries per worker.
- *Logging*: lifecycle and fault messages go through the ``py_stateful_map`` logger; a normal
  run writes nothing to stdout or stderr.
- *Typing*: ``mypy --strict`` accepts typed code using ``StateFullWorkerPool[int]`` and
  ``WorkerResultWrapper[int]``.

Workers live at module level so spawn and forkserver children can import them by reference.
"""

from __future__ import annotations

import functools
import importlib.util
import io
import logging
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tqdm import tqdm

from py_stateful_map import (
    DevicePool,
    ExceptionBehavior,
    StateFullWorkerPool,
    WorkerResultWrapper,
)
from py_stateful_map import processes as pqdm_processes
from py_stateful_map import threads as pqdm_threads

ROOT = Path(__file__).resolve().parents[1]
PQDM_MODULES = [pqdm_processes, pqdm_threads]

# -- workers and items (module level: picklable by reference) -------------------------------


class ItemFailed(Exception):
    """A plain user exception raised for one item."""


def square(x: int) -> int:
    return x * x


def add(a: int, b: int) -> int:
    return a + b


def fail_on_odd(x: int) -> int:
    if x % 2:
        raise ItemFailed(f"odd {x}")
    return x


def fail_on_3(x: int) -> int:
    if x == 3:
        raise ItemFailed("three")
    return x


def sleep_or_fail(item: tuple[str, float]) -> str:
    """``("sleep", s)`` sleeps ``s`` seconds; ``("fail", _)`` raises at once."""
    kind, seconds = item
    if kind == "fail":
        raise ItemFailed("failed at once")
    time.sleep(seconds)
    return kind


def sleep_for(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def where_am_i(_: Any) -> tuple[int, int]:
    return os.getpid(), threading.get_ident()


def die_once(marker_dir: str, value: int) -> int:
    """Kill the worker process the first time this item runs; succeed on the re-run."""
    marker = Path(marker_dir) / f"ran-{value}"
    if not marker.exists():
        marker.touch()
        os._exit(1)
    return value


def run_item(item: tuple[Any, ...]) -> Any:
    """``item`` is ``(function, *args)``: mixes healthy and dying items in one map."""
    function, *args = item
    return function(*args)


class Scaler:
    """A stateful worker: the factor is its state, built once per worker."""

    def __init__(self, factor: int) -> None:
        self.factor = factor

    def __call__(self, x: int) -> int:
        return x * self.factor


class BatchDoubler:
    """A ``DevicePool`` worker: receives a list of items, returns one result per item."""

    def __init__(self, device: str) -> None:
        self.device = device

    def __call__(self, batch: list[int]) -> list[int]:
        assert isinstance(batch, list)
        assert len(batch) <= 5
        return [x * 2 for x in batch]


def numbers(n: int) -> Iterator[int]:
    """An unsized (lazy) input."""
    yield from range(n)


# -- bars -----------------------------------------------------------------------------------


class MinimalBar:
    """A hand-written progress bar: wraps an iterable, reads ``len()`` for its total."""

    made: list[MinimalBar] = []

    def __init__(self, iterable: Iterable[Any], total: int | None = None) -> None:
        self.iterable = iterable
        if total is None:
            try:
                total = len(iterable)  # type: ignore[arg-type]
            except TypeError:
                total = None
        self.total = total
        self.n = 0
        self.closed = False
        MinimalBar.made.append(self)

    def __iter__(self) -> Iterator[Any]:
        try:
            for item in self.iterable:
                self.n += 1
                yield item
        finally:
            self.closed = True


class RecordingTqdm(tqdm):  # type: ignore[misc]
    """A tqdm that records its total, kwargs and final count, holding no reference to itself.

    (Keeping the bar alive would keep the map's iterator alive after a ``break``.)
    """

    created: list[dict[str, Any]] = []
    closed: list[tuple[int, int | None]] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("file", io.StringIO())
        super().__init__(*args, **kwargs)
        RecordingTqdm.created.append({"total": self.total, **kwargs})

    def close(self) -> None:
        if not getattr(self, "_recorded_close", False):
            self._recorded_close = True
            RecordingTqdm.closed.append((self.n, self.total))
        super().close()


@pytest.fixture(autouse=True)
def fresh_bar_records() -> Iterator[None]:
    MinimalBar.made.clear()
    RecordingTqdm.created.clear()
    RecordingTqdm.closed.clear()
    yield
    MinimalBar.made.clear()
    RecordingTqdm.created.clear()
    RecordingTqdm.closed.clear()


def last_frame(buf: io.StringIO) -> str:
    """The last state tqdm drew to a file (tqdm separates redraws with carriage returns)."""
    frames = [f for f in buf.getvalue().replace("\n", "\r").split("\r") if f.strip()]
    assert frames, "the bar wrote nothing"
    return frames[-1]


# == progress: bars that read len() =========================================================


@pytest.mark.parametrize("backend", ["processes", "threads"])
def test_tqdm_around_map_shows_n_of_n(backend: str) -> None:
    buf = io.StringIO()
    with StateFullWorkerPool[int](2, square, backend=backend) as pool:
        results = [r.ret_val for r in tqdm(pool.map(range(25)), file=buf)]
    assert results == [x * x for x in range(25)]
    assert "25/25" in last_frame(buf)


def test_tqdm_notebook_around_map_counts_to_total() -> None:
    if importlib.util.find_spec("ipywidgets") is None:
        pytest.skip("tqdm.notebook needs ipywidgets to draw a bar outside a kernel")
    from tqdm.notebook import tqdm as tqdm_notebook

    with StateFullWorkerPool[int](2, square, backend="threads") as pool:
        bar = tqdm_notebook(pool.map(range(12)))
        results = [r.ret_val for r in bar]
    assert results == [x * x for x in range(12)]
    assert (bar.n, bar.total) == (12, 12)


def rich_console() -> Any:
    from rich.console import Console

    return Console(file=io.StringIO(), force_terminal=True, width=100)


def test_rich_track_around_map_renders_completion() -> None:
    from rich.progress import track

    console = rich_console()
    with StateFullWorkerPool[int](2, square, backend="threads") as pool:
        results = [r.ret_val for r in track(pool.map(range(17)), console=console)]
    assert results == [x * x for x in range(17)]
    assert "100%" in console.file.getvalue()


def test_progress_option_takes_rich_track() -> None:
    from rich.progress import track

    console = rich_console()
    bar = functools.partial(track, console=console, description="rich")
    with StateFullWorkerPool[int](2, square, backend="threads", progress=bar) as pool:
        results = [r.ret_val for r in pool.map(range(17))]
    assert results == [x * x for x in range(17)]
    assert "100%" in console.file.getvalue()


def test_hand_written_bar_reads_len_of_map() -> None:
    with StateFullWorkerPool[int](2, square, backend="threads") as pool:
        bar = MinimalBar(pool.map(range(9)))
        assert bar.total == 9
        results = [r.ret_val for r in bar]
    assert results == [x * x for x in range(9)]
    assert (bar.n, bar.closed) == (9, True)


# == progress= and on_result= ===============================================================


def test_progress_true_draws_tqdm_auto_on_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    with StateFullWorkerPool[int](2, square, backend="threads", progress=True) as pool:
        results = [r.ret_val for r in pool.map(range(13))]
    assert results == [x * x for x in range(13)]
    captured = capsys.readouterr()
    assert "13/13" in captured.err
    assert captured.out == ""


def test_progress_partial_tqdm_uses_its_file_and_desc() -> None:
    buf = io.StringIO()
    bar = functools.partial(tqdm, file=buf, desc="infer")
    with StateFullWorkerPool[int](2, square, progress=bar) as pool:
        results = [r.ret_val for r in pool.map(range(11))]
    assert results == [x * x for x in range(11)]
    final = last_frame(buf)
    assert final.startswith("infer")
    assert "11/11" in final


def test_progress_plain_callable_gets_total_and_every_item() -> None:
    calls: list[tuple[int | None, int]] = []

    def my_progress(iterable: Iterable[Any], total: int | None = None) -> Iterator[Any]:
        count = 0
        for item in iterable:
            count += 1
            yield item
        calls.append((total, count))

    with StateFullWorkerPool[int](2, square, backend="threads", progress=my_progress) as pool:
        first = [r.ret_val for r in pool.map(range(8))]
        second = [r.ret_val for r in pool.map(numbers(5))]
    assert first == [x * x for x in range(8)]
    assert second == [x * x for x in range(5)]
    assert calls == [(8, 8), (None, 5)]


def test_progress_hand_written_class_is_closed_after_map() -> None:
    with StateFullWorkerPool[int](2, square, backend="threads", progress=MinimalBar) as pool:
        results = [r.ret_val for r in pool.map(range(6))]
    assert results == [x * x for x in range(6)]
    [bar] = MinimalBar.made
    assert (bar.total, bar.n, bar.closed) == (6, 6, True)


def test_progress_true_without_tqdm_is_a_clear_import_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # "import tqdm.auto" now fails
    with pytest.raises(ImportError, match=r"tqdm") as info:
        StateFullWorkerPool[int](2, square, backend="threads", progress=True)
    assert "pip install" in str(info.value)
    assert "progress=" in str(info.value)


def test_progress_rejects_a_non_callable() -> None:
    with pytest.raises(TypeError, match="progress"):
        StateFullWorkerPool[int](2, square, backend="threads", progress="yes")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("chunk_size", "n"),
    [(7, 30), (None, 300)],
    ids=["chunk_size=7", "automatic-chunks"],
)
def test_progress_counts_items_not_chunks(chunk_size: int | None, n: int) -> None:
    buf = io.StringIO()
    steps: list[int] = []
    bar = functools.partial(RecordingTqdm, file=buf, mininterval=0)
    with StateFullWorkerPool[int](
        2,
        square,
        chunk_size=chunk_size,
        progress=bar,
        on_result=lambda r: steps.append(r.obj_id),
    ) as pool:
        results = [r.ret_val for r in pool.map(range(n))]
    assert results == [x * x for x in range(n)]
    assert steps == list(range(n))
    assert RecordingTqdm.closed == [(n, n)]
    assert f"{n}/{n}" in last_frame(buf)


def test_progress_counts_items_of_a_batched_device_pool() -> None:
    buf = io.StringIO()
    bar = functools.partial(RecordingTqdm, file=buf, mininterval=0)
    with DevicePool[int](BatchDoubler, devices="cpu", batch_size=5, progress=bar) as pool:
        results = [r.ret_val for r in pool.map(range(23))]
    assert results == [x * 2 for x in range(23)]
    assert RecordingTqdm.closed == [(23, 23)]
    assert "23/23" in last_frame(buf)


def test_progress_bar_closed_when_a_worker_raises_immediate() -> None:
    with StateFullWorkerPool[int](
        2,
        fail_on_3,
        chunk_size=1,
        exception_behavior=ExceptionBehavior.IMMEDIATE,
        progress=RecordingTqdm,
    ) as pool:
        with pytest.raises(ItemFailed, match="three"):
            for _ in pool.map(range(50)):
                pass
        [(n, total)] = RecordingTqdm.closed  # closed before the pool is
    assert total == 50
    assert n <= 3


def test_progress_bar_closed_on_early_break_and_pool_reusable() -> None:
    with StateFullWorkerPool[int](2, square, progress=RecordingTqdm) as pool:
        for result in pool.map(range(100)):
            if result.obj_id == 4:
                break
        [(n, total)] = RecordingTqdm.closed  # closed at the break, not when the pool closes
        assert total == 100
        assert n in (4, 5)  # tqdm counts an item once the next one is asked for
        again = [r.ret_val for r in pool.map(range(3))]
    assert again == [0, 1, 4]
    assert RecordingTqdm.closed[1] == (3, 3)


def test_progress_bar_closed_when_map_result_closed() -> None:
    with StateFullWorkerPool[int](2, square, backend="threads", progress=MinimalBar) as pool:
        with pool.map(range(100)) as results:
            next(iter(results))
        [bar] = MinimalBar.made
        assert bar.closed
        assert bar.n == 1


def test_progress_on_unsized_input_shows_a_count_without_total() -> None:
    buf = io.StringIO()
    bar = functools.partial(tqdm, file=buf, mininterval=0)
    with StateFullWorkerPool[int](2, square, progress=bar) as pool:
        results = pool.map(numbers(12))
        with pytest.raises(TypeError):
            len(results)
        values = [r.ret_val for r in results]
    assert values == [x * x for x in range(12)]
    final = last_frame(buf)
    assert "12it" in final
    assert "/" not in final.split("[")[0]  # no "n/total" before the timing part


@pytest.mark.parametrize("unordered", [False, True], ids=["ordered", "unordered"])
def test_on_result_called_once_per_item_in_yield_order(unordered: bool) -> None:
    seen: list[WorkerResultWrapper[int]] = []
    with StateFullWorkerPool[int](
        2,
        fail_on_odd,
        chunk_size=3,
        exception_behavior=ExceptionBehavior.DEFERRED,
        on_result=seen.append,
    ) as pool:
        yielded = list(pool.map(range(40), is_unordered=unordered))
    assert len(seen) == len(yielded) == 40
    assert all(a is b for a, b in zip(seen, yielded, strict=True))
    assert all(isinstance(r, WorkerResultWrapper) for r in seen)
    assert sorted(r.obj_id for r in seen) == list(range(40))
    failed = [r.obj_id for r in seen if r.exception_obj is not None]
    assert sorted(failed) == list(range(1, 40, 2))
    assert all(isinstance(r.exception_obj, ItemFailed) for r in seen if r.obj_id % 2)


def test_on_result_runs_as_the_caller_consumes() -> None:
    seen: list[int] = []
    with StateFullWorkerPool[int](
        2, square, backend="threads", on_result=lambda r: seen.append(r.obj_id)
    ) as pool:
        for result in pool.map(range(20)):
            assert seen[-1] == result.obj_id  # called for this item, before it reached us
            if result.obj_id == 5:
                break
    assert seen == list(range(6))


# == pqdm drop-in ===========================================================================


@pytest.fixture(params=PQDM_MODULES, ids=["processes", "threads"])
def pqdm(request: pytest.FixtureRequest) -> Any:
    return request.param.pqdm


PQDM_PARAMETERS = [
    "array",
    "function",
    "n_jobs",
    "argument_type",
    "bounded",
    "exception_behaviour",
    "tqdm_class",
    "kwargs",
]


def test_pqdm_keeps_pqdm_signature() -> None:
    import inspect

    for module in PQDM_MODULES:
        params = inspect.signature(module.pqdm).parameters
        assert list(params) == PQDM_PARAMETERS
        assert params["kwargs"].kind is inspect.Parameter.VAR_KEYWORD
        assert params["argument_type"].default is None
        assert params["bounded"].default is False
        assert params["exception_behaviour"].default == "ignore"
        assert params["tqdm_class"].default is None  # None means tqdm.auto, as in pqdm


@pytest.mark.parametrize("flavour", ["processes", "threads"])
def test_pqdm_signature_matches_real_pqdm(flavour: str) -> None:
    import inspect

    real = pytest.importorskip(f"pqdm.{flavour}")
    ours = pqdm_processes if flavour == "processes" else pqdm_threads
    real_params = inspect.signature(real.pqdm).parameters
    our_params = inspect.signature(ours.pqdm).parameters
    assert list(our_params) == list(real_params)
    for name in ("argument_type", "bounded", "exception_behaviour"):
        assert our_params[name].default == real_params[name].default


def test_pqdm_returns_list_in_input_order(pqdm: Any) -> None:
    out = pqdm([0.03, 0.0, 0.02, 0.0, 0.01, 0.0], sleep_for, n_jobs=3, disable=True)
    assert out == [0.03, 0.0, 0.02, 0.0, 0.01, 0.0]
    assert type(out) is list


@pytest.mark.parametrize(
    ("argument_type", "array", "function", "expected"),
    [
        (None, [1, 2, 3], square, [1, 4, 9]),
        ("args", [(1, 2), (3, 4), (5, 6)], add, [3, 7, 11]),
        ("kwargs", [{"a": 1, "b": 2}, {"b": 10, "a": 3}], add, [3, 13]),
    ],
    ids=["direct", "args", "kwargs"],
)
def test_pqdm_argument_types(
    pqdm: Any, argument_type: str | None, array: list[Any], function: Any, expected: list[int]
) -> None:
    assert pqdm(array, function, n_jobs=2, argument_type=argument_type, disable=True) == expected


def test_pqdm_rejects_unknown_argument_type(pqdm: Any) -> None:
    with pytest.raises(ValueError, match="argument_type"):
        pqdm([1], square, n_jobs=2, argument_type="star", disable=True)


def test_pqdm_ignore_puts_exceptions_in_place(pqdm: Any) -> None:
    out = pqdm(range(6), fail_on_odd, n_jobs=2, exception_behaviour="ignore", disable=True)
    assert [out[i] for i in (0, 2, 4)] == [0, 2, 4]
    for i in (1, 3, 5):
        assert isinstance(out[i], ItemFailed)
        assert out[i].args == (f"odd {i}",)


def test_pqdm_deferred_raises_all_errors_at_the_end(pqdm: Any) -> None:
    with pytest.raises(Exception) as info:  # pqdm raises a bare Exception
        pqdm(range(6), fail_on_odd, n_jobs=2, exception_behaviour="deferred", disable=True)
    assert type(info.value) is Exception
    assert [type(e) for e in info.value.args] == [ItemFailed] * 3
    assert [e.args[0] for e in info.value.args] == ["odd 1", "odd 3", "odd 5"]


def test_pqdm_immediate_raises_the_worker_exception(pqdm: Any) -> None:
    # The first error to *arrive* is raised (pqdm raises the first in input order, after all).
    with pytest.raises(ItemFailed, match=r"^odd [135]$"):
        pqdm(range(6), fail_on_odd, n_jobs=2, exception_behaviour="immediate", disable=True)


def test_pqdm_immediate_does_not_wait_for_a_slow_item_threads() -> None:
    items = [("sleep", 3.0), ("fail", 0.0), ("sleep", 0.0)]
    started = time.monotonic()
    with pytest.raises(ItemFailed):
        pqdm_threads.pqdm(
            items, sleep_or_fail, n_jobs=2, exception_behaviour="immediate", disable=True
        )
    assert time.monotonic() - started < 1.5


def test_pqdm_immediate_does_not_wait_for_a_slow_item_processes() -> None:
    # Timed from the bar's creation (the pool is up by then): worker start-up is not the point.
    items = [("sleep", 3.0), ("fail", 0.0), ("sleep", 0.0)]
    bar_created: list[float] = []

    def timing_bar(*args: Any, **kwargs: Any) -> Any:
        bar_created.append(time.monotonic())
        return tqdm(*args, **kwargs)

    with pytest.raises(ItemFailed):
        pqdm_processes.pqdm(
            items,
            sleep_or_fail,
            n_jobs=2,
            exception_behaviour="immediate",
            tqdm_class=timing_bar,
            disable=True,
            chunk_size=1,
        )
    assert time.monotonic() - bar_created[0] < 1.5


def test_pqdm_n_jobs_1_runs_inline(pqdm: Any) -> None:
    out = pqdm(range(4), where_am_i, n_jobs=1, disable=True)
    assert set(out) == {(os.getpid(), threading.get_ident())}


def test_pqdm_bar_gets_extra_kwargs(pqdm: Any) -> None:
    buf = io.StringIO()
    out = pqdm(range(7), square, n_jobs=2, desc="squaring", file=buf, mininterval=0)
    assert out == [x * x for x in range(7)]
    final = last_frame(buf)
    assert final.startswith("squaring")
    assert "7/7" in final


def test_pqdm_disable_true_draws_nothing(pqdm: Any) -> None:
    buf = io.StringIO()
    assert pqdm(range(5), square, n_jobs=2, file=buf, disable=True) == [0, 1, 4, 9, 16]
    assert buf.getvalue() == ""


def test_pqdm_custom_tqdm_class(pqdm: Any) -> None:
    out = pqdm(range(9), square, n_jobs=2, tqdm_class=RecordingTqdm, desc="custom")
    assert out == [x * x for x in range(9)]
    [created] = RecordingTqdm.created
    assert created["total"] == 9
    assert created["desc"] == "custom"
    assert RecordingTqdm.closed == [(9, 9)]


def test_pqdm_accepts_bounded(pqdm: Any) -> None:
    assert pqdm(range(5), square, n_jobs=2, bounded=True, disable=True) == [0, 1, 4, 9, 16]


def test_pqdm_stateful_worker_class(pqdm: Any) -> None:
    out = pqdm(range(5), Scaler, n_jobs=2, shared_kwarg_dict={"factor": 3}, disable=True)
    assert out == [0, 3, 6, 9, 12]


def test_pqdm_lazy_generator_input(pqdm: Any) -> None:
    assert pqdm(numbers(20), square, n_jobs=2, disable=True) == [x * x for x in range(20)]


PARITY_CASES = [
    (None, [1, 2, 3, 4, 5], fail_on_3),
    ("args", [(1, 2), (3, 4), (5, 6)], add),
    ("kwargs", [{"a": 1, "b": 2}, {"a": 3, "b": 4}], add),
]


@pytest.mark.parametrize("flavour", ["processes", "threads"])
@pytest.mark.parametrize(
    ("argument_type", "array", "function"), PARITY_CASES, ids=["direct", "args", "kwargs"]
)
def test_pqdm_parity_with_real_pqdm(
    flavour: str, argument_type: str | None, array: list[Any], function: Any
) -> None:
    real = pytest.importorskip(f"pqdm.{flavour}")
    ours = pqdm_processes if flavour == "processes" else pqdm_threads
    options = {
        "n_jobs": 2,
        "argument_type": argument_type,
        "exception_behaviour": "ignore",
        "disable": True,
    }
    expected = real.pqdm(array, function, **options)
    got = ours.pqdm(array, function, **options)
    assert [type(x) for x in got] == [type(x) for x in expected]
    assert [x.args if isinstance(x, BaseException) else x for x in got] == [
        x.args if isinstance(x, BaseException) else x for x in expected
    ]


# == statistics =============================================================================

STAT_KEYS = {
    "index",
    "pid",
    "device",
    "init_seconds",
    "items_done",
    "busy_seconds",
    "idle_seconds",
    "restarts",
    "recycles",
    "retries",
    "oom_backoffs",
    "padding_efficiency",  # None unless length_fn batches by cost
}


def test_stats_per_worker_fields_and_item_totals_over_two_maps() -> None:
    with StateFullWorkerPool[float](2, sleep_for, chunk_size=1) as pool:
        list(pool.map([0.05] * 10))
        list(pool.map([0.05] * 6))
        stats = pool.stats()
    assert len(stats.workers) == 2
    for index, worker in enumerate(stats.workers):
        assert set(worker) == STAT_KEYS
        assert worker["index"] == index
        assert isinstance(worker["pid"], int)
        assert worker["pid"] != os.getpid()
        assert worker["device"] is None
        assert worker["init_seconds"] >= 0
        assert worker["idle_seconds"] >= 0
        assert (worker["restarts"], worker["recycles"], worker["retries"]) == (0, 0, 0)
        assert worker["oom_backoffs"] == 0
        # busy time is the time spent in the worker function: ~0.05 s per item
        assert worker["busy_seconds"] >= 0.045 * worker["items_done"]
        assert worker["busy_seconds"] <= 0.05 * worker["items_done"] + 0.5
    assert len({w["pid"] for w in stats.workers}) == 2
    assert stats.items_done == sum(w["items_done"] for w in stats.workers) == 16
    assert 0.75 <= stats.total("busy_seconds") <= 1.6


def test_stats_device_pool_reports_device() -> None:
    with DevicePool[int](BatchDoubler, devices="cpu", batch_size=5, backend="threads") as pool:
        list(pool.map(range(12)))
        stats = pool.stats()
    assert [w["device"] for w in stats.workers] == ["cpu"]
    assert stats.items_done == 12


def test_stats_count_restarts_and_retries_after_a_worker_death(tmp_path: Path) -> None:
    items = [(square, i) for i in range(6)]
    items[3] = (die_once, str(tmp_path), 3)
    with StateFullWorkerPool[int](2, run_item, chunk_size=1, max_retries=1) as pool:
        pids_before = {w["pid"] for w in pool.stats().workers}
        results = [r.ret_val for r in pool.map(items)]
        stats = pool.stats()
    assert results == [0, 1, 4, 3, 16, 25]
    assert stats.restarts == 1
    assert stats.total("restarts") == 1
    assert stats.total("retries") == 1
    assert stats.items_done == 6  # the item that died is counted once, when it succeeded
    [restarted] = [w for w in stats.workers if w["restarts"]]
    assert restarted["pid"] not in pids_before


def test_stats_str_renders_a_table_with_totals() -> None:
    with StateFullWorkerPool[int](2, square, backend="threads") as pool:
        list(pool.map(range(10)))
        table = str(pool.stats())
    lines = table.splitlines()
    assert len(lines) == 1 + 2 + 1  # header, one row per worker, total
    for key in ("index", "pid", "items_done", "busy_seconds", "restarts", "retries"):
        assert key in lines[0]
    assert lines[-1].startswith("total:")
    assert "10 items" in lines[-1]
    assert "items/s" in lines[-1]


# == logging ================================================================================


def test_lifecycle_and_faults_are_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # One worker, so the retry must wait for the restarted worker: both readies are logged.
    caplog.set_level(logging.INFO, logger="py_stateful_map")
    items = [(square, 0), (die_once, str(tmp_path), 1), (square, 2)]
    with StateFullWorkerPool[int](1, run_item, chunk_size=1) as pool:
        assert [r.ret_val for r in pool.map(items)] == [0, 1, 4]
    messages = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "py_stateful_map"]

    def logged(level: int, pattern: str) -> int:
        return sum(1 for lvl, msg in messages if lvl == level and re.search(pattern, msg))

    assert logged(logging.INFO, r"^started 1 processes worker\(s\)$") == 1
    assert logged(logging.WARNING, r"^worker 0 \(pid \d+\) exited with code 1\b") == 1
    assert logged(logging.WARNING, r"^re-running item 1 \(attempt 2\)$") == 1
    assert logged(logging.INFO, r"^worker 0 ready \(pid \d+, ") == 2  # first start, restart
    assert messages[-1] == (logging.INFO, "stopped 1 processes worker(s)")
    assert all(level in (logging.INFO, logging.WARNING) for level, _ in messages)


@pytest.mark.parametrize(
    ("num_workers", "backend"),
    [(2, "processes"), (2, "threads"), (0, "inline")],
    ids=["processes", "threads", "inline"],
)
def test_normal_run_prints_nothing(
    num_workers: int, backend: str, capfd: pytest.CaptureFixture[str]
) -> None:
    with StateFullWorkerPool[int](num_workers, Scaler, {"factor": 2}, backend=backend) as pool:
        assert [r.ret_val for r in pool.map(range(30))] == [x * 2 for x in range(30)]
        list(pool.map(numbers(5), is_unordered=True))
        pool.stats()
    captured = capfd.readouterr()
    assert (captured.out, captured.err) == ("", "")


# == typing =================================================================================

TYPED_SNIPPET = """
from py_stateful_map import StateFullWorkerPool, WorkerResultWrapper


class Square:
    def __init__(self, offset: int) -> None:
        self.offset = offset

    def __call__(self, x: int) -> int:
        return x * x + self.offset


def values(results: list[WorkerResultWrapper[int]]) -> list[int]:
    return [r.ret_val for r in results if r.ret_val is not None and r.exception_obj is None]


def main() -> list[int]:
    pool: StateFullWorkerPool[int]
    with StateFullWorkerPool[int](2, Square, {"offset": 1}, backend="threads") as pool:
        results: list[WorkerResultWrapper[int]] = list(pool.map(range(3)))
        for result in pool.map([4, 5]):
            value: int | None = result.ret_val
            index: int = result.obj_id
            error: BaseException | None = result.exception_obj
            del value, index, error
    return values(results)
"""

#: The same code with a wrong annotation: mypy must see the ``int`` through the generics.
TYPED_SNIPPET_WRONG = TYPED_SNIPPET.replace(
    "value: int | None = result.ret_val", "value: str = result.ret_val"
)

INFERRED_SNIPPET = """
from py_stateful_map import StateFullWorkerPool


def square(x: int) -> int:
    return x * x


def main() -> None:
    with StateFullWorkerPool(2, square, backend="threads") as pool:
        print([r.ret_val for r in pool.map(range(3))])
"""


#: A persistent (git-ignored) cache: a cold mypy run over examples/ takes ~20 s, mostly torch.
MYPY_CACHE = ROOT / ".mypy_cache" / "test_ecosystem"


def run_mypy(*targets: str) -> subprocess.CompletedProcess[str]:
    pytest.importorskip("mypy", reason="mypy is not installed")
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--no-error-summary",
            "--cache-dir",
            str(MYPY_CACHE),
            *targets,
        ],
        cwd=ROOT,
        env={**os.environ, "MYPYPATH": str(ROOT / "src")},
        capture_output=True,
        text=True,
        timeout=100,  # under pytest-timeout's 120 s
        check=False,
    )


def write_snippet(tmp_path: Path, name: str, code: str) -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(code))
    return str(path)


def test_mypy_strict_accepts_typed_results(tmp_path: Path) -> None:
    good = write_snippet(tmp_path, "typed_ok.py", TYPED_SNIPPET)
    result = run_mypy(good)
    assert result.returncode == 0, result.stdout + result.stderr

    wrong = write_snippet(tmp_path, "typed_wrong.py", TYPED_SNIPPET_WRONG)
    result = run_mypy(wrong)
    assert result.returncode == 1, result.stdout + result.stderr
    assert 'has type "int | None", variable has type "str"' in result.stdout


def test_mypy_strict_infers_pool_type_without_annotation(tmp_path: Path) -> None:
    snippet = write_snippet(tmp_path, "inferred.py", INFERRED_SNIPPET)
    result = run_mypy(snippet)
    assert 'Need type annotation for "pool"' not in result.stdout
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_accepts_examples() -> None:
    result = run_mypy("examples")
    assert 'Need type annotation for "pool"' not in result.stdout
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_exception_raised_to_users_is_exported() -> None:
    """Issue 22: ``ItemCostError`` (a bad ``length_fn``) and ``CheckpointedError`` (a failure
    replayed from a checkpoint) reached users but could not be imported from the package."""
    import py_stateful_map
    from py_stateful_map import errors
    from py_stateful_map.core.length_batching import ItemCostError

    defined = {
        name
        for name, value in vars(errors).items()
        if isinstance(value, type) and issubclass(value, BaseException)
    }
    assert defined | {"ItemCostError"} <= set(py_stateful_map.__all__)
    assert set(py_stateful_map.__all__) == set(py_stateful_map._EXPORTS)
    assert py_stateful_map.ItemCostError is ItemCostError
    assert py_stateful_map.CheckpointedError is errors.CheckpointedError
    namespace: dict[str, Any] = {}
    exec("from py_stateful_map import *", namespace)  # the star import users write
    assert {"ItemCostError", "CheckpointedError"} <= set(namespace)
