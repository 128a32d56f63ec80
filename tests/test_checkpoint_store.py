"""The checkpoint store alone (issue 13): what it keeps, what it refuses, how it resumes.

The map loop's use of it is simulated: ``record`` completions as a pool would produce them,
``flush`` before "yielding", and ``plan`` read windows on resume.
"""

from __future__ import annotations

import itertools
import os
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from py_stateful_map import Checkpoint, CheckpointError, CheckpointMismatchError
from py_stateful_map.checkpoint.api import CheckpointStatus, as_checkpoint
from py_stateful_map.checkpoint.file import WalCopier
from py_stateful_map.checkpoint.run import AUTO_FLUSH_ITEMS, MAX_SEGMENT, Stored, ToRun
from py_stateful_map.errors import CheckpointedError, PoolError, SerializationError

from .scripts import read_line_starting, start_script


class Embedder:
    """Stands for the worker class in the manifest."""


class Other:
    pass


def open_run(path: Path, **options: Any) -> Any:
    kwargs = options.pop("init_kwargs", {"model": "m"})
    worker = options.pop("worker", Embedder)
    length = options.pop("length", None)
    return Checkpoint(path, **options).open_run(worker=worker, init_kwargs=kwargs, length=length)


def write(path: Path, values: list[Any], items: list[Any] | None = None, **options: Any) -> None:
    """One run that records ``values`` at positions 0.. in chunks of 3."""
    items = list(range(len(values))) if items is None else items
    with open_run(path, **options) as run:
        for first in range(0, len(values), 3):
            positions = range(first, min(first + 3, len(values)))
            run.record(positions, items[first : positions.stop], values[first : positions.stop])


def planned(path: Path, items: list[Any], window: int = 4, **options: Any) -> list[Any]:
    """Spans of a resumed run reading ``items`` in windows."""
    spans: list[Any] = []
    with open_run(path, **options) as run:
        for first in range(0, len(items), window):
            spans.extend(run.plan(first, items[first : first + window]))
    return spans


def stored_values(spans: list[Any]) -> dict[int, Any]:
    return {
        span.start + offset: value
        for span in spans
        if isinstance(span, Stored)
        for offset, value in enumerate(span.values)
    }


def assert_same(a: Any, b: Any) -> None:
    if type(a).__module__.startswith(("numpy", "torch")):
        assert type(a) is type(b) and a.dtype == b.dtype and a.shape == b.shape
        assert (a == b).all()
    else:
        assert a == b and type(a) is type(b)


# -- values ---------------------------------------------------------------------------------


def test_values_round_trip_through_resume_and_results(tmp_path: Path) -> None:
    values: list[Any] = [0, -(2**70), "tekst ✓", b"\x00raw", None, {"a": [1, 2.5]}, (1, "x")]
    path = tmp_path / "c.sqlite"
    write(path, values)
    spans = planned(path, list(range(len(values))))
    assert all(isinstance(span, Stored) for span in spans)
    resumed = stored_values(spans)
    for position, value in enumerate(values):
        assert_same(resumed[position], value)
    assert [key for key, _ in Checkpoint(path).results()] == list(range(len(values)))
    for (_, got), value in zip(Checkpoint(path).results(), values, strict=True):
        assert_same(got, value)


def test_numpy_arrays_round_trip_compactly_as_separate_arrays(tmp_path: Path) -> None:
    np = pytest.importorskip("numpy")
    rows = np.arange(40 * 384, dtype=np.float32).reshape(40, 384)
    same_shape = [rows[i] for i in range(40)]  # views: stored as one stacked buffer
    mixed = [np.arange(3), np.ones((2, 2)), np.array(5, dtype=np.int8), np.array(["s"])]
    for name, values in (("same", same_shape), ("mixed", mixed)):
        path = tmp_path / f"{name}.sqlite"
        write(path, values)
        got = [value for _, value in Checkpoint(path).results()]
        for a, b in zip(got, values, strict=True):
            assert_same(a, b)
        assert not any(np.shares_memory(a, b) for a, b in itertools.pairwise(got))
    size = (tmp_path / "same.sqlite").stat().st_size
    assert size < 40 * 384 * 4 + 64 * 1024  # raw bytes (plus a few pages), not text
    got[0][0] = -1  # writable, like the worker's own result


def test_torch_tensors_round_trip(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    batch = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    same_shape = [batch[i] for i in range(4)]
    mixed = [torch.ones(2, dtype=torch.bfloat16), torch.zeros(3, requires_grad=True)]
    path = tmp_path / "tensors.sqlite"
    write(path, same_shape + mixed)
    got = [value for _, value in Checkpoint(path).results()]
    for a, b in zip(got, same_shape + mixed, strict=True):
        assert type(a) is torch.Tensor and a.dtype == b.dtype and torch.equal(a, b.detach())
    assert got[0].untyped_storage().nbytes() == 3 * 4  # its own elements, not the batch
    assert got[-1].requires_grad


def test_status_counts_done_failed_and_pending(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    with open_run(path, length=10) as run:
        run.record(range(4), [0, 1, 2, 3], [0, None, 2, 3], [(1, ValueError("x"), "")])
    assert Checkpoint(path).status() == CheckpointStatus(done=3, failed=1, pending=6)
    assert [key for key, _ in Checkpoint(path).failures()] == [1]
    with open_run(path):  # an input without len(): pending unknown
        pass
    assert Checkpoint(path).status() == CheckpointStatus(3, 1, None)


def test_results_stream_in_key_order_whatever_the_completion_order(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    with open_run(path) as run:
        for first in (6, 0, 3):  # unordered completions
            run.record(range(first, first + 3), [0] * 3, [first * 10 + i for i in range(3)])
        run.record((10, 12, 9), [0] * 3, ["a", "b", "c"])  # a planned (length-aware) batch
    keys = [key for key, _ in Checkpoint(path).results()]
    assert keys == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12]
    assert dict(Checkpoint(path).results())[12] == "b"


def test_unpicklable_result_names_its_item(tmp_path: Path) -> None:
    with open_run(tmp_path / "c.sqlite") as run:
        run.record(range(3), [0, 1, 2], [0, _Unpicklable(), 2])
        with pytest.raises(SerializationError, match="result of item 1 cannot be saved"):
            run.flush()


class _Unpicklable:
    def __reduce__(self) -> Any:
        raise TypeError("not today")


# -- resuming -------------------------------------------------------------------------------


def test_resume_splits_windows_into_stored_and_to_run_spans(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    with open_run(path) as run:
        run.record(range(3), ["a", "b", "c"], [0, 1, 2])
        run.record(range(5, 7), ["f", "g"], [5, 6])
    items = list("abcdefghij")
    spans = planned(path, items, window=4)
    assert spans == [
        Stored(0, [0, 1, 2], None),
        ToRun(3, ["d"]),
        ToRun(4, ["e"]),
        Stored(5, [5, 6], None),
        ToRun(7, ["h"]),
        ToRun(8, ["i", "j"]),  # past everything stored: no query at all
    ]


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    done=st.lists(st.booleans(), min_size=1, max_size=60),
    chunk=st.integers(1, 9),
    window=st.integers(1, 13),
    shuffle=st.randoms(use_true_random=False),
)
def test_any_recording_resumes_every_item_once_at_its_place(
    tmp_path: Path, done: list[bool], chunk: int, window: int, shuffle: Any
) -> None:
    path = tmp_path / f"p{os.getpid()}-{time.monotonic_ns()}.sqlite"
    items = [f"item{i}" for i in range(len(done))]
    finished = [i for i, ok in enumerate(done) if ok]
    pieces = [finished[i : i + chunk] for i in range(0, len(finished), chunk)]
    shuffle.shuffle(pieces)
    with open_run(path) as run:
        for piece in pieces:
            run.record(tuple(piece), [items[i] for i in piece], [i * 7 for i in piece])
            if shuffle.random() < 0.3:
                run.flush()
    spans = planned(path, items, window=window)
    sizes = [len(s.values) if isinstance(s, Stored) else len(s.items) for s in spans]
    covered = [s.start + i for s, size in zip(spans, sizes, strict=True) for i in range(size)]
    assert covered == list(range(len(items)))
    assert stored_values(spans) == {i: i * 7 for i in finished}
    for span in spans:
        if isinstance(span, ToRun):
            assert span.items == items[span.start : span.start + len(span.items)]


def test_changed_input_item_raises_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    items = [f"sentence {i}" for i in range(10)]
    write(path, [len(item) for item in items], items)
    changed = [*items[:7], "an edited sentence", *items[8:]]
    with pytest.raises(CheckpointMismatchError, match="input item 7 differs") as info:
        planned(path, changed)
    assert info.value.position == 7 and info.value.key == 7
    assert str(path) in str(info.value)
    planned(path, changed, verify_inputs=False)  # the escape hatch


@pytest.mark.parametrize(
    "before, after",
    [(5, 6), (5, "5"), ("a", b"a"), ((1, 2), (1, 3)), ({"x": 1}, {"x": 2}), (2**70, 2**70 + 1)],
)
def test_fingerprints_tell_changed_items_apart(tmp_path: Path, before: Any, after: Any) -> None:
    path = tmp_path / "c.sqlite"
    write(path, ["v"], [before])
    assert planned(path, [before]) == [Stored(0, ["v"], None)]
    with pytest.raises(CheckpointMismatchError):
        planned(path, [after])


def test_key_callable_identifies_items_across_reordered_input(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    docs = [{"id": f"doc{i}", "text": "t" * i} for i in range(8)]
    write(path, [len(d["text"]) for d in docs[:5]], docs[:5], key=lambda d: d["id"])
    reordered = docs[::-1]  # doc7 .. doc0: 3 new ones first
    spans = planned(path, reordered, window=3, key=lambda d: d["id"])
    assert stored_values(spans) == {3 + i: len(reordered[3 + i]["text"]) for i in range(5)}
    assert [s.items for s in spans if isinstance(s, ToRun)] == [reordered[:3]]
    assert dict(Checkpoint(path).results()) == {f"doc{i}": i for i in range(5)}
    edited = [dict(d) for d in reordered]
    edited[4]["text"] = "changed"
    with pytest.raises(CheckpointMismatchError, match="'doc3'") as info:
        planned(path, edited, key=lambda d: d["id"])
    assert info.value.key == "doc3" and info.value.position == 4


def test_two_items_with_one_key_are_refused_naming_the_key_and_both_positions(
    tmp_path: Path,
) -> None:
    """Issue 22 item 3: both ran, one result replaced the other, a resume handed it to both."""
    path = tmp_path / "c.sqlite"
    by_id = {"key": lambda d: d["id"]}
    docs = [{"id": i, "v": i} for i in ("a", "b", "c", "a")]
    with pytest.raises(ValueError, match=r"input items 0 and 3 the same key 'a'"):
        planned(path, docs, window=2, **by_id)  # fresh run, the two in different windows
    with pytest.raises(ValueError, match=r"input items 1 and 2 the same key 'b'"):
        planned(path, [docs[0], docs[1], docs[1]], window=4, **by_id)  # in one window
    write(path, [1, 2], docs[:2], **by_id)
    with pytest.raises(ValueError, match=r"input items 0 and 2 the same key 'a'"):
        planned(path, [docs[0], docs[1], docs[0]], window=1, **by_id)  # both stored: resumed
    assert stored_values(planned(path, docs[:3], window=1, **by_id)) == {0: 1, 1: 2}


def test_key_must_be_int_str_or_bytes(tmp_path: Path) -> None:
    with open_run(tmp_path / "c.sqlite", key=lambda item: (item, 1)) as run:
        with pytest.raises(TypeError, match="must be an int, str or bytes"):
            run.plan(0, [1])
    with pytest.raises(TypeError, match="callable"):
        Checkpoint(tmp_path / "c.sqlite", key="id")  # type: ignore[arg-type]


def test_key_kind_cannot_change_even_with_force(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    write(path, [1, 2])
    with pytest.raises(CheckpointMismatchError, match="input positions"):
        open_run(path, key=str, force=True)


def test_resume_memory_stays_flat_over_ten_million_items(tmp_path: Path) -> None:
    """10,000,000 finished items resume through windows without loading them (issue 13)."""
    psutil = pytest.importorskip("psutil")
    total, window = 10_000_000, 8192
    path = tmp_path / "big.sqlite"
    started = time.monotonic()
    with open_run(path) as run:
        for first in range(0, total, MAX_SEGMENT):
            positions = range(first, min(first + MAX_SEGMENT, total))
            run.record(positions, positions, positions)  # items and values: the positions
    process = psutil.Process()
    before = peak = process.memory_info().rss
    served = 0
    with open_run(path) as run:
        for first in range(0, total, window):
            items = range(first, min(first + window, total))
            (span,) = run.plan(first, items)  # type: ignore[arg-type]
            served += len(span.values)
            if first % (window * 50) == 0:
                peak = max(peak, process.memory_info().rss)
    assert served == total and span.values[-1] == total - 1
    assert peak - before < 50 * 2**20, f"resume grew RSS by {(peak - before) / 2**20:.0f} MB"
    assert time.monotonic() - started < 60


# -- the job, failures ----------------------------------------------------------------------


def test_different_job_is_refused_naming_each_difference(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    write(path, [1], init_kwargs={"model": "a", "batch": 8}, run_id="eval-1")
    with pytest.raises(CheckpointMismatchError) as info:
        open_run(path, worker=Other, init_kwargs={"model": "b", "lr": 1}, run_id="eval-2")
    message = str(info.value)
    for part in (
        "Embedder",
        "Other",
        "'model': a different value",
        "'batch': in the",
        "'lr': given now",
        "'eval-1'",
        "'eval-2'",
        "force=True",
        str(path),
    ):
        assert part in message, part
    assert len(info.value.differences) == 5
    assert isinstance(info.value, PoolError)
    # force: resumes with the stored results and takes the new job as the checkpoint's
    assert planned(path, [0], worker=Other, init_kwargs={}, force=True) == [Stored(0, [1], None)]
    open_run(path, worker=Other, init_kwargs={}).close()


def test_init_kwargs_digest_is_stable_across_interpreters(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    kwargs = {"labels": {"cat", "dog", "eel", "fox"}, "cfg": {"b": 1, "a": [1, 2]}}
    write(path, [1], init_kwargs=kwargs)
    root = Path(__file__).parents[1]
    code = f"""
        import sys; sys.path[:0] = {[str(root), str(root / "src")]!r}
        from tests.test_checkpoint_store import open_run, Embedder
        from pathlib import Path
        open_run(Path({str(path)!r}), init_kwargs={kwargs!r}).close()
        print("same job")
    """
    for seed in ("1", "2"):  # set iteration order differs with the hash seed
        out = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code)],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
            timeout=60,
            check=False,
        )
        assert out.stdout.strip() == "same job", out.stderr


def test_library_major_version_is_part_of_the_job(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    write(path, [1])
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE manifest SET value = '99.0.0' WHERE name = 'library_version'")
    conn.close()
    with pytest.raises(CheckpointMismatchError, match=r"py_stateful_map 99\.0\.0"):
        open_run(path)


def test_failed_items_come_back_as_failures_unless_retried(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    with open_run(path) as run:
        errors = [
            (1, KeyError("k1"), "Traceback (worker)\nKeyError: 'k1'\n"),
            (2, ValueError("v2"), ""),
        ]
        run.record(range(5), list(range(5)), [0, None, None, 3, 4], errors)
    spans = planned(path, list(range(5)), window=5)
    assert len(spans) == 1 and spans[0].values == [0, None, None, 3, 4]
    (o1, e1, t1), (o2, e2, t2) = spans[0].errors
    assert (o1, type(e1), e1.args, t1) == (
        1,
        KeyError,
        ("k1",),
        "Traceback (worker)\nKeyError: 'k1'\n",
    )
    assert (o2, type(e2)) == (2, ValueError) and "ValueError: v2" in t2
    # retry_failed: the failed items run again; the run that does it replaces them
    spans = planned(path, list(range(5)), window=5, retry_failed=True)
    assert spans == [Stored(0, [0], None), ToRun(1, [1, 2]), Stored(3, [3, 4], None)]
    with open_run(path, retry_failed=True) as run:
        run.plan(0, list(range(5)))
        run.record(range(1, 3), [1, 2], [10, 20])  # one segment over two failed rows
    assert list(Checkpoint(path).results()) == [(0, 0), (1, 10), (2, 20), (3, 3), (4, 4)]
    assert Checkpoint(path).status() == CheckpointStatus(5, 0, None)


class _Picky(Exception):
    def __init__(self, code: int, detail: str) -> None:  # pickles, but cannot unpickle
        super().__init__(f"{code}: {detail}")


def test_failure_that_cannot_be_rebuilt_replays_as_checkpointed_error(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    with open_run(path) as run:
        run.record(range(1), [0], [None], [(0, _Picky(7, "gpu"), "Traceback...\n_Picky: 7: gpu\n")])
    (span,) = planned(path, [0])
    ((_, exc, text),) = span.errors
    assert isinstance(exc, CheckpointedError) and "_Picky: 7: gpu" in str(exc)
    assert exc.tb_text == text == "Traceback...\n_Picky: 7: gpu\n"


# -- one writer, bad files, bad places ------------------------------------------------------


def test_second_open_in_the_same_process_fails_clearly(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    with open_run(path):
        with pytest.raises(CheckpointError, match="in use by another run in this process"):
            open_run(path)
        assert list(Checkpoint(path).results()) == []  # reading is fine meanwhile
    open_run(path).close()  # free again
    assert not Path(f"{path}-lock").exists()


HOLDER = """
    import os, sys, time
    from py_stateful_map.checkpoint import Checkpoint
    run = Checkpoint(sys.argv[1]).open_run(worker=int)
    run.record(range(3), [0, 1, 2], ["a", "b", "c"])
    run.flush()
    child = os.fork() if sys.argv[2] == "fork" else -1  # a child forked while the run is open
    if child == 0:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        time.sleep(60)
        os._exit(0)
    print("holding", os.getpid(), child, flush=True)
    time.sleep(60)
"""


@pytest.mark.parametrize("fork", [False, True], ids=["plain", "forked-child-left-behind"])
def test_second_process_fails_clearly_and_a_killed_holder_frees_it(
    tmp_path: Path, fork: bool
) -> None:
    path = tmp_path / "c.sqlite"
    holder = start_script(tmp_path, HOLDER, str(path), "fork" if fork else "plain")
    child = -1
    try:
        pid, child = map(int, read_line_starting(holder, "holding", timeout=60).split()[1:])
        with pytest.raises(CheckpointError, match=f"in use by another run \\(process {pid}\\)"):
            open_run(path, worker=int)
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
        # committed before the kill: intact; the lock died with its holder (not its child)
        assert list(Checkpoint(path).results()) == [(0, "a"), (1, "b"), (2, "c")]
        with open_run(path, worker=int, init_kwargs={}) as run:
            assert run.plan(0, [0, 1, 2, 3]) == [Stored(0, ["a", "b", "c"], None), ToRun(3, [3])]
    finally:
        if child > 0:
            os.kill(child, signal.SIGKILL)
        holder.kill()
        holder.communicate(timeout=10)


def test_file_that_is_not_sqlite_is_refused_before_anything_runs(tmp_path: Path) -> None:
    path = tmp_path / "results.sqlite"
    path.write_text("id,value\n1,2\n")
    with pytest.raises(
        CheckpointError, match=f"{re.escape(str(path))} is not a checkpoint: not an SQLite"
    ):
        open_run(path)
    assert path.read_text() == "id,value\n1,2\n"
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        Checkpoint(path).status()


def test_sqlite_file_of_another_program_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE users (name TEXT)")
    conn.close()
    before = path.read_bytes()
    with pytest.raises(CheckpointError, match=r"another program \(tables: users\)"):
        open_run(path)
    assert path.read_bytes() == before


def test_damaged_checkpoint_is_refused_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    write(path, [f"value {i}" * 50 for i in range(300)])
    data = path.read_bytes()
    page = 16384
    path.write_bytes(data[: len(data) // 2])  # truncated: pages are missing
    with pytest.raises(CheckpointError, match=f"{re.escape(str(path))} is damaged"):
        open_run(path)
    path.write_bytes(data[:page] + os.urandom(len(data) - page))  # pages overwritten
    with pytest.raises(CheckpointError, match=f"{re.escape(str(path))} is damaged"):
        open_run(path)
    path.write_bytes(data[:50])  # truncated inside the header
    with pytest.raises(CheckpointError, match="damaged"):
        open_run(path)


def test_damaged_stored_value_is_reported_naming_its_items(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    write(path, [1, 2, 3])
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE results SET value = x'80059501' WHERE key = 0")
    conn.close()
    with pytest.raises(
        CheckpointError, match=f"stored result of item 0 to 2 in checkpoint {re.escape(str(path))}"
    ):
        planned(path, [0, 1, 2])
    with pytest.raises(CheckpointError, match="item 0 to 2"):
        list(Checkpoint(path).results())


def test_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "no" / "such" / "c.sqlite"
    with pytest.raises(CheckpointError, match=r"directory .*no/such does not exist"):
        open_run(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        Checkpoint(path).status()


DROP_DAC = """
    import ctypes, os, sys
    if os.geteuid() == 0:  # root ignores file modes: drop the capabilities that let it
        class Header(ctypes.Structure):
            _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]
        class Data(ctypes.Structure):
            _fields_ = [(n, ctypes.c_uint32) for n in ("effective", "permitted", "inheritable")]
        libc = ctypes.CDLL(None, use_errno=True)
        header, data = Header(0x20080522, 0), (Data * 2)()
        if libc.capget(ctypes.byref(header), data) != 0:
            sys.exit(77)
        for cap in (1, 2, 3):  # DAC_OVERRIDE, DAC_READ_SEARCH, FOWNER
            data[0].effective &= ~(1 << cap)
        if libc.capset(ctypes.byref(header), data) != 0:
            sys.exit(77)
"""


def test_read_only_directory_or_file_is_a_clear_error(tmp_path: Path) -> None:
    directory = tmp_path / "ro"
    directory.mkdir()
    write(directory / "old.sqlite", [1, 2])
    write(tmp_path / "frozen.sqlite", [3])
    directory.chmod(0o555)
    (tmp_path / "frozen.sqlite").chmod(0o444)
    script = (
        DROP_DAC
        + """
    from py_stateful_map import Checkpoint, CheckpointError
    for path in sys.argv[1:]:
        try:
            Checkpoint(path).open_run(worker=int)
        except CheckpointError as exc:
            print("refused:", exc)
    print("read:", list(Checkpoint(sys.argv[2]).results()))
    """
    )
    paths = [directory / "new.sqlite", directory / "old.sqlite", tmp_path / "frozen.sqlite"]
    try:
        proc = start_script(tmp_path, script, *map(str, paths))
        out, err = proc.communicate(timeout=60)
    finally:
        directory.chmod(0o755)
    if proc.returncode == 77:
        pytest.skip("cannot drop root's file-permission capabilities here")
    assert proc.returncode == 0, err
    refusals = [line for line in out.splitlines() if line.startswith("refused:")]
    assert len(refusals) == 3, out
    for line, path in zip(refusals, paths, strict=True):
        assert "read-only" in line and str(path) in line, line
    assert "read: [(0, 1), (1, 2)]" in out
    assert list(Checkpoint(tmp_path / "frozen.sqlite").results()) == [(0, 3)]  # untouched


# -- writing --------------------------------------------------------------------------------


def test_nothing_is_visible_before_flush_and_everything_after(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    with open_run(path) as run:
        run.record(range(2), [0, 1], ["a", "b"])
        assert Checkpoint(path).status().done == 0
        run.flush()
        assert Checkpoint(path).status().done == 2
        run.record(range(2, 2 + AUTO_FLUSH_ITEMS), range(AUTO_FLUSH_ITEMS), [0] * AUTO_FLUSH_ITEMS)
        assert Checkpoint(path).status().done == 2 + AUTO_FLUSH_ITEMS  # flushed by itself
        assert run.recorded == 2 + AUTO_FLUSH_ITEMS


def test_large_runs_fold_the_log_into_the_file_on_a_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(WalCopier, "EVERY", 64 * 1024)
    path = tmp_path / "c.sqlite"
    blob = os.urandom(20_000)
    with open_run(path) as run:
        for first in range(0, 100, 5):
            run.record(range(first, first + 5), [0] * 5, [blob] * 5)
            run.flush()
        assert run._wal._thread is not None and run._wal.error is None
    assert run._wal._thread is None  # stopped with the run
    assert sum(1 for _ in Checkpoint(path).results()) == 100


def test_closed_run_refuses_more_work(tmp_path: Path) -> None:
    run = open_run(tmp_path / "c.sqlite")
    run.close()
    run.close()
    with pytest.raises(CheckpointError, match="closed"):
        run.record(range(1), [0], [0])
    with pytest.raises(CheckpointError, match="closed"):
        run.plan(0, [0])


def test_as_checkpoint_accepts_paths(tmp_path: Path) -> None:
    checkpoint = Checkpoint(tmp_path / "c.sqlite", run_id="r")
    assert as_checkpoint(checkpoint) is checkpoint
    assert as_checkpoint(str(tmp_path / "c.sqlite")).path == tmp_path / "c.sqlite"
    assert as_checkpoint(tmp_path / "c.sqlite").path == tmp_path / "c.sqlite"
    assert as_checkpoint(None) is None
    with pytest.raises(TypeError, match="Checkpoint, a path or None"):
        as_checkpoint(3)  # type: ignore[arg-type]
    assert "run_id='r'" in repr(checkpoint)


def test_to_parquet_writes_embeddings_as_fixed_size_lists(tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    np = pytest.importorskip("numpy")
    path = tmp_path / "c.sqlite"
    matrix = np.arange(20 * 8, dtype=np.float32).reshape(20, 8)
    write(path, [matrix[i] for i in range(20)])
    assert Checkpoint(path).to_parquet(tmp_path / "out.parquet", rows_per_group=7) == 20
    table = pq.read_table(tmp_path / "out.parquet")
    assert table.column("key").to_pylist() == list(range(20))
    assert np.array_equal(np.stack(table.column("value").to_numpy(zero_copy_only=False)), matrix)
    assert table.schema.field("value").metadata == {b"shape": b"[8]"}


def test_to_parquet_writes_plain_values_and_empty_checkpoints(tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "c.sqlite"
    write(path, ["a", "bb", None, "dddd"])
    assert Checkpoint(path).to_parquet(tmp_path / "s.parquet") == 4
    assert pq.read_table(tmp_path / "s.parquet").to_pydict() == {
        "key": [0, 1, 2, 3],
        "value": ["a", "bb", None, "dddd"],
    }
    open_run(tmp_path / "empty.sqlite").close()
    assert Checkpoint(tmp_path / "empty.sqlite").to_parquet(tmp_path / "e.parquet") == 0
    assert pq.read_table(tmp_path / "e.parquet").num_rows == 0


def test_to_parquet_without_pyarrow_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "c.sqlite"
    write(path, [1])
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow -> ImportError
    with pytest.raises(ImportError, match=r"py_stateful_map\[parquet\]"):
        Checkpoint(path).to_parquet(tmp_path / "out.parquet")


def test_recording_a_stored_position_again_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    write(path, [0, 1, 2, 3, 4, 5])  # rows of items 0-5
    with open_run(path) as run:
        run.record(range(4, 8), [4, 5, 6, 7], [0] * 4)  # 4 and 5 were stored: a loop bug
        with pytest.raises(ValueError, match="overlap items 0 to 5, finished earlier"):
            run.flush()
        run.record(range(8, 10), [8, 9], [0, 0])
        run.record(range(9, 11), [9, 10], [0, 0])
        with pytest.raises(ValueError, match="position 9 was recorded twice"):
            run.flush()
    assert list(Checkpoint(path).results()) == [(i, i) for i in range(6)]  # unchanged
