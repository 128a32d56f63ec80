"""Property test over combinations of options, each with a fault plan (see README.md).

``PSM_HYPOTHESIS_PROFILE=soak`` runs thousands of random examples instead of the ``ci``
profile's fixed ones; ``PSM_KNOWN_BROKEN=run`` runs the combinations ``KNOWN_BROKEN`` skips
(they then fail, which is how to check a fix).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from hypothesis import HealthCheck, Phase, event, given, note, reject, settings

from . import model as M
from .harness import (
    EXAMPLE_SECONDS,
    STAGE1,
    PoolCache,
    check_no_leaks,
    open_fds,
    our_shm_segments,
    run_example,
    watchdog,
)
from .model import KNOWN_BROKEN, Config, Plan, examples
from .scenarios import EXIT_HUNG, SCENARIOS

#: No "explain" phase: it re-runs a failing example dozens of times (minutes for one hang).
PHASES = (Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink)
settings.register_profile(
    "ci",
    max_examples=200,
    phases=PHASES,
    derandomize=True,
    deadline=None,
    database=None,
    print_blob=False,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)
settings.register_profile(
    "soak",
    max_examples=5000,
    phases=PHASES,
    derandomize=False,
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)
PROFILE_NAME = os.environ.get("PSM_HYPOTHESIS_PROFILE", "ci")
PROFILE = settings.get_profile(PROFILE_NAME)
RUN_KNOWN_BROKEN = os.environ.get("PSM_KNOWN_BROKEN") == "run"


@pytest.fixture(scope="module")
def pool_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[PoolCache, Path]]:
    cache = PoolCache()
    try:
        yield cache, tmp_path_factory.mktemp("combinations")
    finally:
        cache.close_all()


@pytest.fixture
def cache(pool_cache: tuple[PoolCache, Path]) -> Iterator[tuple[PoolCache, Path]]:
    """The module's pools, closed at the end of each test that used them.

    The autouse fixture of ``tests/conftest.py`` fails a test that leaves a worker alive, and
    it checks right after each test, before a module fixture's teardown would run: so pools
    live for one test (hundreds of examples), and this closes them before that check.
    """
    yield pool_cache
    print(pool_cache[0].summary())  # shown with -s
    pool_cache[0].close_all()


@pytest.mark.timeout(900 if PROFILE_NAME == "ci" else 8 * 3600)
@settings(PROFILE)
@given(example=examples())
def test_every_combination_keeps_the_contract(
    cache: tuple[PoolCache, Path], example: tuple[Config, Plan]
) -> None:
    pools, tmp = cache
    config, plan = example
    reason = KNOWN_BROKEN(config, plan)
    if reason is not None and not RUN_KNOWN_BROKEN:
        event(f"skipped: {reason}")
        reject()
    event(f"backend: {config.pool.backend}/{config.pool.start_method}")
    note(f"pool: {config.pool.label()}")
    note(f"items: {plan.items()}")
    fds, pool_fds = open_fds(), pools.pool_fds
    try:
        with watchdog(EXAMPLE_SECONDS, f"{config}"):
            run_example(pools, config, plan, tmp)
    except BaseException:
        pools.drop(config.pool)  # in an unknown state now: never reused
        pools.drop(STAGE1)
        raise
    check_no_leaks(pools, fds, pool_fds)


# -- the known open bugs, each at its minimal configuration ----------------------------------

#: Hard limit on one batch of scenario subprocesses (each has its own 6 s watchdog).
SCENARIO_TIMEOUT = 20.0
ROOT = Path(__file__).resolve().parents[2]


def run_scenarios(*names: str) -> dict[str, tuple[int | str, str]]:
    """Run scenarios (``scenarios.py``) in parallel subprocesses; name -> (exit code, tail).

    A subprocess still running after ``SCENARIO_TIMEOUT`` is killed together with every
    process it started (its workers lead process groups of their own, so each is killed by
    pid), and reported as ``"killed"``.
    """
    assert all(name in SCENARIOS for name in names)
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "tests.combinations.scenarios", name],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name in names
    }
    pids = [proc.pid for proc in procs.values()]
    deadline = time.monotonic() + SCENARIO_TIMEOUT
    outcomes: dict[str, tuple[int | str, str]] = {}
    for name, proc in procs.items():
        try:
            out, _ = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
            outcomes[name] = (proc.returncode, out[-2000:])
        except subprocess.TimeoutExpired:
            _kill_tree(proc)
            out, _ = proc.communicate()
            outcomes[name] = ("killed", out[-2000:])
    left = our_shm_segments(pids)  # named psm-<their pid>-...: each must have swept its own
    assert not left, f"shared-memory segments left by the scenarios: {left}"
    return outcomes


def _kill_tree(proc: subprocess.Popen[str]) -> None:
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    proc.kill()
    for child in family:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family, timeout=5)


def assert_scenarios_pass(*names: str) -> None:
    outcomes = run_scenarios(*names)
    broken = {
        name: ("hung" if rc == EXIT_HUNG else rc, tail.strip().splitlines()[-1:] or [""])
        for name, (rc, tail) in outcomes.items()
        if rc != 0
    }
    assert not broken, f"scenarios that break the contract: {broken}"


def test_issue_22_item_1_wait_others_raises_after_the_running_items() -> None:
    """Fixed (829e146): IMMEDIATE_WAIT_OTHERS, 60 items, the first fails: with a checkpoint
    (map and imap), with length-aware batching where the worker fails (map) or length_fn
    fails (imap). The map raises that item's error; it hung (items read but unsent counted
    as in progress)."""
    assert_scenarios_pass(
        "wait_others_checkpoint_map",
        "wait_others_checkpoint_imap",
        "wait_others_length_worker_fails",
        "wait_others_length_fn_fails",
    )


def test_issue_22_item_3_checkpoint_key_given_twice_is_refused() -> None:
    """Fixed (c4a76ab): two items of one key are refused (ValueError) before they run, in
    one window and 5000 items apart, and the pool stays usable."""
    assert_scenarios_pass("checkpoint_key_twice_is_refused")


def test_issue_22_item_5_chained_after_unordered_keeps_raw_positions() -> None:
    """Fixed: ``b.map(a.map(items, is_unordered=True))``: obj_id is the raw input position."""
    assert_scenarios_pass("chained_after_unordered_keeps_raw_positions")


def test_issue_22_item_5_chained_failure_never_reaches_key_as_a_marker() -> None:
    """Fixed: a chained map with ``Checkpoint(key=...)`` whose first stage failed item 1:
    key= was handed ``('py_stateful_map: failed upstream', ...)`` and the whole map raised."""
    assert_scenarios_pass("chained_failure_reaches_key_as_itself")


def test_issue_22_item_5_second_stage_raising_frees_the_first_stage() -> None:
    """Fixed: stage 2 (IMMEDIATE) raises on item 0 of 5000, or (DEFERRED, length-aware) the
    caller breaks after item 1's length_fn failure: the first stage's pool stayed busy
    (PoolBusyError) until ``gc.collect()``; the second stage now closes its input map."""
    assert_scenarios_pass(
        "chained_raise_frees_the_first_stage",
        "chained_break_after_a_cost_error_frees_the_first_stage",
    )


def test_issue_22_item_7_bad_costs_and_batch_size_true() -> None:
    """Fixed (2a646f7): 10**400, NaN, -5 and "long" from length_fn fail only that item
    (ItemCostError); ``batch_size=True`` is a ValueError of the constructor."""
    assert_scenarios_pass("bad_costs_fail_only_their_item", "batch_size_true_is_refused")


def test_issue_22_item_10_ordered_imap_yields_every_value_before_the_failure() -> None:
    """Fixed: ordered imap, item 1 slow, item 2 fails: it yields items 0 and 1, then raises
    item 2's error (IMMEDIATE and IMMEDIATE_WAIT_OTHERS); it raised after item 0 only."""
    assert_scenarios_pass("ordered_imap_immediate", "ordered_imap_wait_others")


# -- found by this suite ---------------------------------------------------------------------


def test_chained_death_or_unpicklable_result_is_blamed_on_its_own_item() -> None:
    """Fixed with item 5 (chunks cover raw positions consecutive both ways):
    ``b.map(a.map([fails in a, kills its worker in b]), checkpoint=...)``: item 1's
    WorkerDiedError said "item 0 killed its worker" with obj_id 0, an unpicklable result
    "the result of item 0": item 1's chunk kept start=0 while its positions were (1,)."""
    assert_scenarios_pass("chained_death_is_blamed_on_its_own_item")


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=M.UNDOCUMENTED_BATCH_BLAME)
def test_length_aware_unpicklable_result_is_blamed_on_its_own_item() -> None:
    """Length-aware batching (batch_size=2, length_fn=len), item 3 returns a lock: its
    SerializationError says "the result of item 1": a planned batch's positions are not
    ``start, start + 1, ...``, and the report counts from the batch's first position."""
    assert_scenarios_pass("length_aware_unpicklable_is_blamed_on_its_own_item")
