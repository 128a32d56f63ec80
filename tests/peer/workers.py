"""Worker-side callables of the ported peer tests.

Everything a worker process must import lives here, in a module that imports neither pytest
nor the test modules: a worker that unpickles a function defined in a test module imports
that module (and pytest with it), which costs about a second per pool on this machine.

The functions keep the peers' names and behaviour where they have one (``sqr``, ``mul``,
``exception_throwing_generator``, ``CrashAtPickle`` ...); they are written anew here.
"""

from __future__ import annotations

import faulthandler
import os
import pickle
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

# --- generic helpers the shims use -------------------------------------------------------


class Apply:
    """The shims' worker: runs an optional initializer once, then ``func(*args, **kwargs)``.

    ``multiprocessing.Pool`` and ``concurrent.futures`` send the function with every task
    and run ``initializer(*initargs)`` once per worker; this class is that, expressed as a
    stateful worker of our pool (its ``__init__`` is the once-per-worker part).
    """

    def __init__(self, initializer: Any = None, initargs: tuple[Any, ...] = ()) -> None:
        if initializer is not None:
            initializer(*initargs)

    def __call__(self, task: tuple[Any, tuple[Any, ...], dict[str, Any]]) -> Any:
        func, args, kwargs = task
        return func(*args, **kwargs)


# --- CPython Lib/test/_test_multiprocessing.py ---------------------------------------------


def sqr(x: int, wait: float = 0.0) -> int:
    time.sleep(wait)
    return x * x


def mul(x: int, y: int) -> int:
    return x * y


def identity(x: Any) -> Any:
    return x


def raise_large_valuerror(wait: float) -> None:
    time.sleep(wait)
    raise ValueError("x" * 1024**2)


class SayWhenError(ValueError):
    pass


def exception_throwing_generator(total: int, when: int) -> Any:
    if when == -1:
        raise SayWhenError("Somebody said when")
    for i in range(total):
        if i == when:
            raise SayWhenError("Somebody said when")
        yield i


class SpecialIterable:
    """Claims one item, raises on the first ``next()``."""

    def __iter__(self) -> SpecialIterable:
        return self

    def __next__(self) -> int:
        raise SayWhenError

    def __len__(self) -> int:
        return 1


class CountedObject:
    n_instances = 0

    def __new__(cls) -> CountedObject:
        cls.n_instances += 1
        return object.__new__(cls)

    def __del__(self) -> None:
        type(self).n_instances -= 1


class CannotPickle:
    """CPython's ``A`` of test_map_unplicklable."""

    def __reduce__(self) -> Any:
        raise RuntimeError("cannot pickle")


def raise_runtime_123() -> None:
    raise RuntimeError(123)  # some comment


def raise_runtime_foo() -> None:
    raise RuntimeError("foo")


def raising() -> None:
    raise KeyError("key")


def unpickleable_result() -> Any:
    """CPython returns a lambda; cloudpickle ships lambdas, so a lock stands in for it."""
    return threading.Lock()


def sqr_and_pid(x: int, wait: float = 0.0) -> tuple[int, int]:
    time.sleep(wait)
    return x * x, os.getpid()


def counting_initializer(ns: Any) -> None:
    ns.test += 1


def to_float(x: Any) -> float:
    return float(x)


# --- CPython Lib/test/test_concurrent_futures ---------------------------------------------


def capture(*args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return args, kwargs


class MyObject:
    def my_method(self) -> None:
        pass


def make_dummy_object(_: Any) -> MyObject:
    return MyObject()


def divmod_second_is_slow(a: int, b: int) -> tuple[int, int]:
    """``divmod`` with the peer's inputs ([1, 1, 1, 1], [2, 3, 0, 5]) made deterministic.

    Item 1 (b=3) takes long, item 2 (b=0) fails at once: the failure reaches the parent
    while an earlier item is still running, which is what the peer's ordering promise is
    about (earlier values are yielded before the error).
    """
    time.sleep({2: 0.05, 3: 0.6}.get(b, 0.0))
    return divmod(a, b)


INITIALIZER_STATUS = "uninitialized"


def init(x: str) -> None:
    global INITIALIZER_STATUS
    INITIALIZER_STATUS = x


def get_init_status() -> str:
    return INITIALIZER_STATUS


def init_fail() -> None:
    time.sleep(0.1)
    raise ValueError("error in initializer")


def record_finished(path: str, n: int) -> int:
    with Path(path).open("a") as f:
        f.write(f"{n}\n")
    return n


def hang_once(marker: str) -> str:
    """First call: write this process's pid to ``marker`` and hang; later calls: return."""
    path = Path(marker)
    if path.exists():
        return "rerun"
    path.write_text(str(os.getpid()))
    time.sleep(60)
    return "first"


def os_exit(code: int) -> None:
    os._exit(code)


# test_deadlock.py: objects that fail while being pickled or unpickled


def _crash(delay: float | None = None) -> None:
    if delay:
        time.sleep(delay)
    faulthandler.disable()
    faulthandler._sigsegv()  # type: ignore[attr-defined]


def _crash_with_data(data: Any) -> None:
    _crash()


def _exit() -> None:
    sys.exit(1)


def _raise_error(err: type[BaseException]) -> None:
    raise err()


def _return_instance(cls: type) -> Any:
    return cls()


class CrashAtPickle:
    def __reduce__(self) -> Any:
        _crash()


class CrashAtUnpickle:
    def __reduce__(self) -> Any:
        return _crash, ()


class ExitAtPickle:
    def __reduce__(self) -> Any:
        _exit()


class ExitAtUnpickle:
    def __reduce__(self) -> Any:
        return _exit, ()


class ErrorAtPickle:
    def __reduce__(self) -> Any:
        raise pickle.PicklingError("Error in pickle")


class ErrorAtUnpickle:
    def __reduce__(self) -> Any:
        return _raise_error, (pickle.UnpicklingError,)


# --- mpire tests/test_pool.py --------------------------------------------------------------


def square(idx: int, x: int) -> tuple[int, int]:
    return idx, x * x


def extremely_large_output(idx: int, _: Any) -> tuple[int, bytes]:
    return idx, os.urandom(1024 * 1024)


def square_numpy(x: Any) -> Any:
    return x * x


def subtract(x: int, y: int) -> int:
    return x - y


def square_raises(_: int, x: int) -> None:
    raise ValueError(x)


def square_raises_on_idx(idx: int, x: int) -> tuple[int, int]:
    if idx == 5:
        raise ValueError(x)
    return idx, x * x


def call_exit(_: Any) -> None:
    exit()


def square_in_nested_pool(items: list[tuple[int, int]]) -> list[tuple[int, int]]:
    from py_stateful_map import ArgumentPassing, StateFullWorkerPool

    with StateFullWorkerPool(2, square, argument_passing=ArgumentPassing.AS_ARGS) as pool:
        return list(pool.imap(items))


class WithWorkerId:
    """mpire's ``pass_worker_id``: the worker's index, given to its constructor."""

    def __init__(self, worker_id: int) -> None:
        self.worker_id = worker_id

    def __call__(self, n_jobs: int) -> bool:
        return isinstance(self.worker_id, int) and 0 <= self.worker_id < n_jobs


class WithSharedObjects:
    """mpire's ``shared_objects``: the same objects, given to every worker's constructor."""

    def __init__(self, shared_objects: Any) -> None:
        self.shared_objects = shared_objects

    def __call__(self, arg: Any) -> bool:
        return bool(self.shared_objects == arg)


class WithWorkerState:
    """mpire's ``use_worker_state``: a dict that lives as long as the worker."""

    def __init__(self, worker_id: int) -> None:
        self.worker_id = worker_id
        self.worker_state: dict[str, Any] = {}

    def __call__(self, arg: int) -> tuple[int, int, bool]:
        ids = self.worker_state.setdefault("worker_id", set())
        ids.add(self.worker_id)
        self.worker_state.setdefault("args", []).append(arg)
        return self.worker_id, len(self.worker_state["args"]), ids == {self.worker_id}


class InitOnce:
    """mpire InitFuncTest: ``worker_init`` waits on a barrier (first start only) and counts."""

    def __init__(self, barrier: Any, call_count: Any) -> None:
        if call_count.value == 0:
            barrier.wait(timeout=10)
        with call_count.get_lock():
            call_count.value += 1
        self.worker_state = {"test": 42}

    def __call__(self, x: int) -> int:
        return self.worker_state["test"] + x


class InitError:
    def __init__(self) -> None:
        raise ValueError(":(")

    def __call__(self, x: int) -> int:
        return x


class Tokened:
    """Returns ``(token, x * factor)``; the token is made once, when the worker is built."""

    def __init__(self, factor: int = 2) -> None:
        self.token = uuid.uuid4().hex
        self.factor = factor

    def __call__(self, x: int) -> tuple[str, int]:
        return self.token, x * self.factor


class SlowInit:
    def __init__(self, seconds: float) -> None:
        time.sleep(seconds)

    def __call__(self, x: int) -> int:
        return x


def sleep_then_return(x: int) -> int:
    time.sleep(1)
    return x


def odd_items_sleep(x: int) -> int:
    if x % 2:
        time.sleep(1)
    return x


def square_or_hang_once(marker: str, x: int) -> int:
    """mpire's ``_worker_0_sleeps_others_square``: item 0 hangs on its first run (its
    process's pid written to ``marker``, for the test to kill); every other item squares."""
    if x == 0:
        hang_once(marker)
    return x * x
