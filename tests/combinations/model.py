"""What one example of the combination suite is: a configuration, a fault plan, and the
outcome each item must have; the strategies that draw them; and ``KNOWN_BROKEN``.

Nothing here starts a pool (``harness`` does): a configuration is plain data, so hypothesis
can draw, print and shrink it, and ``KNOWN_BROKEN`` can decide before anything runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

from py_stateful_map import ExceptionBehavior, SerializationError, WorkerDiedError
from py_stateful_map.core.length_batching import ItemCostError

from . import workers as W

IMMEDIATE = ExceptionBehavior.IMMEDIATE
WAIT_OTHERS = ExceptionBehavior.IMMEDIATE_WAIT_OTHERS
DEFERRED = ExceptionBehavior.DEFERRED
RAISING_MODES = (IMMEDIATE, WAIT_OTHERS)

# -- configurations -------------------------------------------------------------------------


@dataclass(frozen=True)
class PoolConfig:
    """Everything that is fixed when a pool is built (so: the key of the pool cache)."""

    backend: str  # "processes" | "threads" | "inline" (num_workers=0)
    start_method: str | None  # "spawn" | "forkserver" for processes, else None
    mode: ExceptionBehavior
    shape: str  # "function" | "class" (one item a call) | "batch" | "prepare" (DevicePool)
    chunk_size: int | None = None  # unbatched shapes only
    batch_size: int | None = None  # batched shapes only
    length_aware: bool = False  # length_fn=item_length (len, but for the length faults)
    max_batch_tokens: int | None = None
    sort_window: int | None = None

    @property
    def processes(self) -> bool:
        return self.backend == "processes"

    @property
    def batched(self) -> bool:
        return self.batch_size is not None

    @property
    def num_workers(self) -> int:
        return 0 if self.backend == "inline" else 2

    def label(self) -> str:
        parts = [self.backend + (f"/{self.start_method}" if self.start_method else "")]
        parts.append(self.mode.name)
        parts.append(self.shape)
        if self.chunk_size is not None:
            parts.append(f"chunk_size={self.chunk_size}")
        if self.batched:
            parts.append(f"batch_size={self.batch_size}")
        if self.length_aware:
            parts.append(
                f"length_fn(max_batch_tokens={self.max_batch_tokens}, "
                f"sort_window={self.sort_window})"
            )
        return " ".join(parts)


@dataclass(frozen=True)
class Config:
    """One example's configuration: the pool, and how the map is called on it."""

    pool: PoolConfig
    api: str = "map"  # "map" | "imap" (imap_unordered when not ordered)
    ordered: bool = True
    checkpoint: str | None = None  # None | "positions" | "key" (Checkpoint(key=key_of))
    chained: bool = False  # pool.map(stage1.map(items, is_unordered=not stage1_ordered))
    stage1_ordered: bool = True
    break_after: int | None = None  # leave the loop after this many results
    generator_input: bool = False  # a generator (read on the feeder thread) instead of a list

    @property
    def values_api(self) -> bool:
        return self.api == "imap"


@dataclass(frozen=True)
class Plan:
    """The items: what each does (``kinds[i]``) and how long it is (``pads[i]``)."""

    kinds: tuple[str, ...]
    pads: tuple[int, ...]

    def items(self) -> list[str]:
        return [W.make_item(i, kind, pad) for i, (kind, pad) in enumerate(self.items_plan())]

    def items_plan(self) -> list[tuple[str, int]]:
        return list(zip(self.kinds, self.pads, strict=True))

    def __len__(self) -> int:
        return len(self.kinds)


# -- expected outcomes ----------------------------------------------------------------------


@dataclass(frozen=True)
class Expected:
    """What item ``index`` must come back as: its value, or an error of ``error_type``."""

    index: int
    value: Any = None
    error_type: type[BaseException] | None = None
    message: str | None = None  # the exact str() of the error, where it is ours
    check_obj_id: bool = False  # the error carries the item's obj_id
    names_item: bool = False  # the error's message names the item ("item <index>")

    @property
    def fails(self) -> bool:
        return self.error_type is not None


def expected(config: Config, kind: str, index: int) -> Expected:
    """The outcome the contract promises for item ``index`` of ``kind`` under ``config``."""
    pool = config.pool
    if config.chained and kind == W.S1_RAISE:
        return Expected(index, error_type=W.ItemFailed, message=W.stage1_message(index))
    if kind == W.RAISE:
        return Expected(index, error_type=W.ItemFailed, message=W.error_message(index))
    if kind == W.BASE_RAISE:
        return Expected(index, error_type=W.ItemBaseFailure, message=W.error_message(index))
    if kind == W.UNPICKLABLE and pool.processes:
        return Expected(index, error_type=SerializationError, names_item=True)
    if kind == W.EXIT and pool.processes:
        return Expected(index, error_type=WorkerDiedError, check_obj_id=True, names_item=True)
    if pool.length_aware and kind in (W.LEN_FAIL, *W.BAD_LENGTHS):
        return Expected(index, error_type=ItemCostError, check_obj_id=True, names_item=True)
    return Expected(index, value=W.value_of(index))


def expectations(config: Config, plan: Plan) -> list[Expected]:
    return [expected(config, kind, i) for i, kind in enumerate(plan.kinds)]


def failing(config: Config, plan: Plan) -> list[int]:
    """Indices of the items that must fail."""
    return [e.index for e in expectations(config, plan) if e.fails]


# -- known open bugs ------------------------------------------------------------------------

UNDOCUMENTED_BATCH_BLAME = (
    "undocumented: an unpicklable result in a length-aware batch is reported as another "
    "item's (SerializationError: 'the result of item <another position>')"
)


def KNOWN_BROKEN(config: Config, plan: Plan) -> str | None:
    """The open issue item this combination hits, or None if the contract must hold.

    The property skips these (``reject()``); each item has a strict-xfail regression test
    with its minimal configuration in ``test_combinations.py``. Checked in order, so each
    example is attributed to one item. Remove a clause when its item is fixed: the property
    then covers the combination again (and the regression test XPASSes, which fails).
    """
    pool = config.pool
    if pool.length_aware and pool.processes and W.UNPICKLABLE in plan.kinds:
        return UNDOCUMENTED_BATCH_BLAME
    return None


# -- strategies -----------------------------------------------------------------------------

#: Processes twice as often as the others: most faults (deaths, pickling) exist only there.
BACKENDS = [
    ("processes", "forkserver"),
    ("processes", "spawn"),
    ("threads", None),
    ("processes", "forkserver"),
    ("processes", "spawn"),
    ("inline", None),
]
MODES = [IMMEDIATE, WAIT_OTHERS, DEFERRED]


@st.composite
def pool_configs(draw: st.DrawFn) -> PoolConfig:
    backend, start_method = draw(st.sampled_from(BACKENDS))
    mode = draw(st.sampled_from(MODES))
    shape = draw(st.sampled_from(["function", "class", "batch", "prepare"]))
    if shape in ("function", "class"):
        chunk_size = draw(st.sampled_from([None, 1, 3]))
        return PoolConfig(backend, start_method, mode, shape, chunk_size=chunk_size)
    batch_size = draw(st.sampled_from([1, 2, 4]))
    length_aware = draw(st.booleans())
    if not length_aware:
        return PoolConfig(backend, start_method, mode, shape, batch_size=batch_size)
    return PoolConfig(
        backend,
        start_method,
        mode,
        shape,
        batch_size=batch_size,
        length_aware=True,
        max_batch_tokens=draw(st.sampled_from([None, 12, 30])),
        sort_window=draw(st.sampled_from([None, 2 * batch_size, 8])),
    )


def fault_kinds(config: Config) -> list[str]:
    """The kinds that make sense under ``config`` (a kind that cannot happen is not drawn)."""
    kinds = [W.RAISE, W.RAISE, W.BASE_RAISE]
    if config.pool.processes:
        kinds += [W.UNPICKLABLE, W.EXIT]
    if config.pool.length_aware:
        kinds += [W.LEN_FAIL, W.LEN_FAIL, *W.BAD_LENGTHS]
    if config.chained:
        kinds += [W.S1_RAISE, W.S1_RAISE]
    return kinds


#: At most this many of a costly kind per example (each slow item sleeps, each exit restarts
#: a worker twice: the run and its retry).
MAX_OF_KIND = {W.SLOW: 2, W.EXIT: 1}


@st.composite
def plans(draw: st.DrawFn, config: Config) -> Plan:
    # Mostly short; now and then long enough that items are still unread or unsent when
    # something fails, or when the caller leaves.
    size = draw(st.sampled_from([*range(1, 17), 48, 48]))
    faulty = draw(st.booleans())
    healthy = st.sampled_from([W.OK] * 8 + [W.SLOW])
    faults = st.sampled_from(fault_kinds(config))
    kind = st.one_of(healthy, healthy, faults) if faulty else healthy
    kinds = draw(st.lists(kind, min_size=size, max_size=size))
    seen: dict[str, int] = {}
    for i, k in enumerate(kinds):  # over the cap: the item is healthy instead
        seen[k] = seen.get(k, 0) + 1
        if seen[k] > MAX_OF_KIND.get(k, size):
            kinds[i] = W.OK
    pads = draw(st.lists(st.integers(0, 12), min_size=size, max_size=size))
    return Plan(tuple(kinds), tuple(pads))


@st.composite
def examples(draw: st.DrawFn) -> tuple[Config, Plan]:
    pool = draw(pool_configs())
    chained = draw(st.booleans())
    config = Config(
        pool=pool,
        api=draw(st.sampled_from(["map", "map", "imap"])),
        ordered=draw(st.booleans()),
        checkpoint=draw(st.sampled_from([None, None, "positions", "key"])),
        chained=chained,
        stage1_ordered=draw(st.sampled_from([True, True, False])) if chained else True,
        generator_input=draw(st.booleans()),
    )
    plan = draw(plans(config))
    if len(plan) > 1 and draw(st.integers(0, 3)) == 0:
        config = Config(**{**config.__dict__, "break_after": draw(st.integers(1, len(plan) - 1))})
    return config, plan
