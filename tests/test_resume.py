"""Resumable maps (issue 13): results are durable before visible, and a rerun does only the rest.

The store itself is tested in test_checkpoint_store.py; here the whole path through the pool
on every backend: a parent SIGKILLed mid-run then resumed (with another worker count), a
changed input item, a changed worker kwarg, two writers, a damaged file, a bad directory.
"""

from __future__ import annotations

import os
import signal
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from py_stateful_map import (
    Checkpoint,
    CheckpointError,
    CheckpointMismatchError,
    ExceptionBehavior,
    StateFullWorkerPool,
)

from . import hostile
from .conftest import LOCAL_BACKENDS, RAY_BACKEND
from .scripts import read_line_starting, start_script

DEFERRED = ExceptionBehavior.DEFERRED
ALL = [*LOCAL_BACKENDS, "inline", *RAY_BACKEND]


pytestmark = pytest.mark.usefixtures("ray_for_ray_kind")


def make_pool(kind: str, log: Path, workers: int = 2, **options: Any) -> Any:
    kwargs = {"log": str(log), **options.pop("kwargs", {})}
    if kind == "inline":
        return StateFullWorkerPool(0, hostile.Logged, kwargs, **options)
    return StateFullWorkerPool(workers, hostile.Logged, kwargs, backend=kind, **options)


@pytest.mark.parametrize("kind", ALL)
@pytest.mark.parametrize("is_unordered", [False, True])
def test_a_rerun_replays_finished_items_and_runs_only_the_rest(
    kind: str, is_unordered: bool, tmp_path: Path
) -> None:
    log, store = tmp_path / "runs.txt", tmp_path / "run.ckpt"
    with make_pool(kind, log, exception_behavior=DEFERRED) as pool:
        first = pool.map(range(200), is_unordered=is_unordered, checkpoint=store)
        for count, _ in enumerate(first):
            if count == 79:
                break
        first.close()
    ran_before = set(hostile.runs_logged(str(log)))
    log.unlink()
    with make_pool(kind, log, exception_behavior=DEFERRED) as pool:
        results = pool.map(range(200), is_unordered=is_unordered, checkpoint=store)
        assert len(results) == 200
        got = list(results)
    assert sorted(r.obj_id for r in got) == list(range(200))
    if not is_unordered:
        assert [r.obj_id for r in got] == list(range(200))
    assert all(r.ret_val == r.obj_id for r in got if r.obj_id != 13)
    assert isinstance(next(r for r in got if r.obj_id == 13).exception_obj, ValueError)
    replayed = {r.obj_id for r in got if r.from_checkpoint}
    assert len(replayed) >= 80
    rerun = set(hostile.runs_logged(str(log)))
    assert rerun.isdisjoint(replayed), "a finished item ran again"
    assert rerun | replayed == set(range(200))
    assert ran_before >= replayed
    status = Checkpoint(store).status()
    assert (status.done, status.failed) == (199, 1)


def test_failed_items_rerun_only_with_retry_failed(tmp_path: Path) -> None:
    log, store = tmp_path / "runs.txt", tmp_path / "run.ckpt"
    with make_pool("threads", log, exception_behavior=DEFERRED) as pool:
        list(pool.map(range(20), checkpoint=store))
        log.unlink()
        again = list(pool.map(range(20), checkpoint=store))
        assert hostile.runs_logged(str(log)) == []
        assert "thirteen" in str(again[13].exception_obj)
        list(pool.map(range(20), checkpoint=Checkpoint(store, retry_failed=True)))
        assert hostile.runs_logged(str(log)) == [13]


def test_imap_and_immediate_errors_are_durable_first(tmp_path: Path) -> None:
    log, store = tmp_path / "runs.txt", tmp_path / "run.ckpt"
    with make_pool("processes", log) as pool:
        with pytest.raises(ValueError, match="thirteen"):
            list(pool.imap(range(40), checkpoint=store))
        status = Checkpoint(store).status()
        assert status.failed == 1  # committed before the caller saw the error
        log.unlink()
        with pytest.raises(ValueError, match="thirteen"):  # replayed, not re-run
            list(pool.imap(range(40), checkpoint=store))
        assert 13 not in hostile.runs_logged(str(log))


def test_a_changed_input_item_is_named(tmp_path: Path) -> None:
    log, store = tmp_path / "runs.txt", tmp_path / "run.ckpt"
    with make_pool("threads", log, exception_behavior=DEFERRED) as pool:
        list(pool.map(range(30), checkpoint=store))
        changed = list(range(30))
        changed[17] = 1700
        with pytest.raises(CheckpointMismatchError, match="17"):
            list(pool.map(changed, checkpoint=store))


def test_two_items_with_one_key_fail_the_map_before_the_second_runs(tmp_path: Path) -> None:
    """Issue 22 item 3: three items ran, two were kept, a resume mixed up their results."""
    log, store = tmp_path / "runs.txt", tmp_path / "run.ckpt"
    checkpoint = Checkpoint(store, key=lambda x: str(x % 5))
    with make_pool("inline", log, exception_behavior=DEFERRED) as pool:
        with pytest.raises(ValueError, match=r"input items 1 and 5 the same key '1'"):
            list(pool.map([0, 1, 2, 3, 4, 6], checkpoint=checkpoint))
    assert 6 not in hostile.runs_logged(str(log))


def test_a_changed_worker_kwarg_refuses_to_resume_unless_forced(tmp_path: Path) -> None:
    log, store = tmp_path / "runs.txt", tmp_path / "run.ckpt"
    with make_pool("threads", log, exception_behavior=DEFERRED) as pool:
        list(pool.map(range(10), checkpoint=store))
    with make_pool("threads", log, exception_behavior=DEFERRED, kwargs={"scale": 2}) as pool:
        with pytest.raises(CheckpointMismatchError, match=r"init kwarg .scale."):
            list(pool.map(range(10), checkpoint=store))
        forced = list(pool.map(range(12), checkpoint=Checkpoint(store, force=True)))
        assert [r.ret_val for r in forced][10:] == [20, 22]


def test_a_second_writer_gets_a_clear_error(tmp_path: Path) -> None:
    log, store = tmp_path / "runs.txt", tmp_path / "run.ckpt"
    with make_pool("threads", log) as first, make_pool("threads", log) as second:
        running = first.map(range(100), checkpoint=store)
        next(iter(running))
        with pytest.raises(CheckpointError, match="in use"):
            list(second.map(range(100), checkpoint=store))
        running.close()


@pytest.mark.parametrize("damage", ["garbage", "foreign-sqlite"])
def test_a_damaged_or_foreign_file_fails_before_any_item_runs(damage: str, tmp_path: Path) -> None:
    log, store = tmp_path / "runs.txt", tmp_path / "run.ckpt"
    if damage == "garbage":
        store.write_bytes(b"this is not a database" * 100)
    else:
        with sqlite3.connect(store) as conn:
            conn.execute("CREATE TABLE notes (text)")
    with make_pool("threads", log) as pool, pytest.raises(CheckpointError, match=r"run\.ckpt"):
        list(pool.map(range(10), checkpoint=store))
    assert hostile.runs_logged(str(log)) == []


def test_a_missing_or_read_only_directory_is_a_clear_error(tmp_path: Path) -> None:
    log = tmp_path / "runs.txt"
    with make_pool("threads", log) as pool:
        with pytest.raises(CheckpointError, match="missing"):
            list(pool.map(range(3), checkpoint=tmp_path / "missing" / "run.ckpt"))
        if os.geteuid() != 0:  # root writes anywhere
            locked = tmp_path / "locked"
            locked.mkdir(mode=0o500)
            with pytest.raises(CheckpointError):
                list(pool.map(range(3), checkpoint=locked / "run.ckpt"))


@pytest.mark.timeout(120)
def test_parent_sigkilled_mid_run_resumes_with_another_worker_count(tmp_path: Path) -> None:
    log, store, received = tmp_path / "runs.txt", tmp_path / "run.ckpt", tmp_path / "got.txt"
    script = f"""
        import sys
        from py_stateful_map import ExceptionBehavior, StateFullWorkerPool
        from tests.hostile import Logged

        if __name__ == "__main__":
            workers = int(sys.argv[1])
            with StateFullWorkerPool(workers, Logged, {{"log": {str(log)!r}}},
                                     exception_behavior=ExceptionBehavior.DEFERRED) as pool:
                with open({str(received)!r}, "a") as out:
                    for r in pool.map(range(400), checkpoint={str(store)!r}):
                        out.write(f"{{r.obj_id}} {{int(r.from_checkpoint)}}\\n")
                        out.flush()
                        if r.obj_id == 150 and workers == 2:
                            print("HALFWAY", flush=True)
                            threading_event = __import__("threading").Event()
                            threading_event.wait(60)  # killed here
            print("DONE", flush=True)
    """
    first = start_script(tmp_path, script, "2")
    read_line_starting(first, "HALFWAY", 60)
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=20)
    seen_first = [int(line.split()[0]) for line in received.read_text().splitlines()]
    received.unlink()
    ran_first = hostile.runs_logged(str(log))
    log.unlink()
    second = start_script(tmp_path, script, "3")
    read_line_starting(second, "DONE", 90)
    second.communicate(timeout=20)
    rows = [line.split() for line in received.read_text().splitlines()]
    assert [int(obj_id) for obj_id, _ in rows] == list(range(400))  # every item once, in order
    ran_second = hostile.runs_logged(str(log))
    assert set(seen_first).isdisjoint(ran_second), "an item the caller had received ran again"
    assert sorted(set(ran_first) | set(ran_second)) == list(range(400))
    replayed = {int(obj_id) for obj_id, stored in rows if stored == "1"}
    assert set(seen_first) <= replayed
    status = Checkpoint(store).status()
    assert (status.done, status.failed) == (399, 1)
