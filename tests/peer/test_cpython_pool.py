"""CPython ``Lib/test/_test_multiprocessing.py``, re-expressed: the ``_TestPool*`` classes.

Each test keeps the peer's inputs and expected outcome, through ``shim.Pool`` (a
``multiprocessing.Pool``-shaped facade) or our pool directly; the docstring names the peer
test. Where our contract says something else, the test checks ours and ``README.md`` lists
the difference. CPython runs these against processes and threads (``ThreadPool``); so do we.
"""

from __future__ import annotations

import contextlib
import gc
import io
import multiprocessing
import subprocess
import sys
import textwrap
import threading
import time
import warnings
import weakref
from pathlib import Path

import pytest

from py_stateful_map import (
    ExceptionBehavior,
    PoolBrokenError,
    RemoteTraceback,
    SerializationError,
    StateFullWorkerPool,
)

from .shim import Pool
from .workers import (
    Apply,
    CannotPickle,
    CountedObject,
    SayWhenError,
    SpecialIterable,
    counting_initializer,
    exception_throwing_generator,
    identity,
    mul,
    raise_large_valuerror,
    raise_runtime_123,
    raise_runtime_foo,
    raising,
    sqr,
    sqr_and_pid,
    unpickleable_result,
)

BACKENDS = ["processes", "threads"]
ROOT = Path(__file__).resolve().parents[2]
#: CPython's support.LONG_TIMEOUT: a task that would run "forever".
LONG_TIMEOUT = 300.0
COMMENTED_LINE = "raise RuntimeError(123)  # some comment"


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_apply(backend: str) -> None:
    """CPython _TestPool.test_apply"""
    with Pool(2, backend=backend) as p:
        assert p.apply(sqr, (5,)) == sqr(5)
        assert p.apply(sqr, (), {"x": 3}) == sqr(x=3)


def test_map(backend: str) -> None:
    """CPython _TestPool.test_map"""
    with Pool(2, backend=backend) as p:
        assert p.map(sqr, list(range(10))) == list(map(sqr, list(range(10))))
        assert p.map(sqr, list(range(100)), chunksize=20) == list(map(sqr, list(range(100))))


def test_starmap(backend: str) -> None:
    """CPython _TestPool.test_starmap (and test_starmap_async's input)"""
    with Pool(2, backend=backend) as p:
        tuples = list(zip(range(10), range(9, -1, -1)))
        assert p.starmap(mul, tuples) == [mul(*t) for t in tuples]
        tuples = list(zip(range(100), range(99, -1, -1)))
        assert p.starmap(mul, tuples, chunksize=20) == [mul(*t) for t in tuples]


def test_map_async_callbacks(backend: str) -> None:
    """CPython _TestPool.test_map_async_callbacks: ``int`` over ['1'] gives [1], over ['a']
    a ValueError (our maps are synchronous iterators: the callbacks become the return value
    and the raised exception)."""
    with Pool(2, backend=backend) as p:
        assert p.map(int, ["1"]) == [1]
        with pytest.raises(ValueError):
            p.map(int, ["a"])


def test_map_async_callbacks_int_as_the_worker(backend: str) -> None:
    """CPython _TestPool.test_map_async_callbacks, with ``int`` as our pool's worker (the way
    a user maps a callable over items): a class whose instances are not callable is called
    per item, like a function (issue 22 item 14)."""
    with StateFullWorkerPool(2, int, backend=backend) as pool:
        assert list(pool.imap(["1"])) == [1]
        with pytest.raises(ValueError):
            list(pool.imap(["a"]))


def test_map_unplicklable() -> None:
    """CPython _TestPool.test_map_unplicklable (issue #19425: no hang). The peer raises the
    pickler's RuntimeError; ours is a SerializationError naming the item, with that
    RuntimeError as its ``__cause__`` (processes only; threads pickle nothing, as in the
    peer)."""
    with Pool(2) as p:
        with pytest.raises(SerializationError, match="cannot pickle") as info:
            p.map(sqr, [CannotPickle()] * 10)
        assert isinstance(info.value.__cause__, RuntimeError)
        assert str(info.value.__cause__) == "cannot pickle"
        assert p.map(sqr, [1, 2]) == [1, 4]  # the pool goes on


def test_map_chunksize(backend: str) -> None:
    """CPython _TestPool.test_map_chunksize: an empty list with chunksize=1 does not stall."""
    with Pool(2, backend=backend) as p:
        start = time.monotonic()
        assert p.map(sqr, [], chunksize=1) == []
        assert time.monotonic() - start < 5


def test_map_handle_iterable_exception(backend: str) -> None:
    """CPython _TestPool.test_map_handle_iterable_exception"""
    with Pool(2, backend=backend) as p:
        with pytest.raises(SayWhenError):  # at the very first item
            p.map(sqr, exception_throwing_generator(1, -1), 1)
        with pytest.raises(SayWhenError):  # again: reentrant
            p.map(sqr, exception_throwing_generator(1, -1), 1)
        with pytest.raises(SayWhenError):
            p.map(sqr, exception_throwing_generator(10, 3), 1)
        with pytest.raises(SayWhenError):
            p.map(sqr, SpecialIterable(), 1)
        with pytest.raises(SayWhenError):
            p.map(sqr, SpecialIterable(), 1)


def test_imap(backend: str) -> None:
    """CPython _TestPool.test_imap"""
    with Pool(2, backend=backend) as p:
        assert list(p.imap(sqr, list(range(10)))) == list(map(sqr, list(range(10))))

        it = iter(p.imap(sqr, list(range(10))))
        for i in range(10):
            assert next(it) == i * i
        with pytest.raises(StopIteration):
            next(it)

        it = iter(p.imap(sqr, list(range(1000)), chunksize=100))
        for i in range(1000):
            assert next(it) == i * i
        with pytest.raises(StopIteration):
            next(it)


def test_imap_handle_iterable_exception(backend: str) -> None:
    """CPython _TestPool.test_imap_handle_iterable_exception. The peer loses the items read
    into the chunk the input failed in (6 values with chunksize 2, 4 with chunksize 4); ours
    runs every item read before the input raised, so 7 values come first with any chunk
    size (README: differences)."""
    with Pool(2, backend=backend) as p:
        it = iter(p.imap(sqr, exception_throwing_generator(1, -1), 1))
        with pytest.raises(SayWhenError):
            next(it)
        it = iter(p.imap(sqr, exception_throwing_generator(1, -1), 1))  # reentrant
        with pytest.raises(SayWhenError):
            next(it)

        it = iter(p.imap(sqr, exception_throwing_generator(10, 3), 1))
        for i in range(3):
            assert next(it) == i * i
        with pytest.raises(SayWhenError):
            next(it)

        for chunksize in (2, 4):
            it = iter(p.imap(sqr, exception_throwing_generator(20, 7), chunksize))
            for i in range(7):
                assert next(it) == i * i
            with pytest.raises(SayWhenError):
                next(it)


def test_imap_unordered(backend: str) -> None:
    """CPython _TestPool.test_imap_unordered"""
    with Pool(2, backend=backend) as p:
        assert sorted(p.imap_unordered(sqr, list(range(10)))) == list(map(sqr, range(10)))
        it = p.imap_unordered(sqr, list(range(1000)), chunksize=100)
        assert sorted(it) == list(map(sqr, range(1000)))


def test_imap_unordered_handle_iterable_exception(backend: str) -> None:
    """CPython _TestPool.test_imap_unordered_handle_iterable_exception"""
    with Pool(2, backend=backend) as p:
        it = iter(p.imap_unordered(sqr, exception_throwing_generator(1, -1), 1))
        with pytest.raises(SayWhenError):
            next(it)
        it = iter(p.imap_unordered(sqr, exception_throwing_generator(1, -1), 1))
        with pytest.raises(SayWhenError):
            next(it)

        for total, when, chunksize in ((10, 3, 1), (20, 7, 2)):
            it = iter(p.imap_unordered(sqr, exception_throwing_generator(total, when), chunksize))
            expected_values = list(map(sqr, range(total)))
            with pytest.raises(SayWhenError):
                for _ in range(total):
                    value = next(it)
                    assert value in expected_values
                    expected_values.remove(value)


def test_make_pool(backend: str) -> None:
    """CPython _TestPool.test_make_pool: -1 workers is a ValueError; a pool of 3 has 3. The
    peer also refuses 0; ours runs one worker inline for 0 (README: differences)."""
    with pytest.raises(ValueError):
        StateFullWorkerPool(-1, sqr, backend=backend)
    with StateFullWorkerPool(0, sqr, backend=backend) as inline:
        assert (inline.backend_name, inline.num_workers) == ("inline", 1)
    with StateFullWorkerPool(3, sqr, backend=backend) as pool:
        assert pool.num_workers == 3
        assert len(pool.stats().workers) == 3


def test_terminate() -> None:
    """CPython _TestPool.test_terminate: tasks that would run "forever", terminated at once.
    Processes only: a thread cannot be stopped (README: differences). The map being read in
    another thread ends with PoolBrokenError."""
    p = Pool(3)
    results = p.imap(time.sleep, [LONG_TIMEOUT] * 10_000, chunksize=1)  # as map_async
    outcome: list[BaseException] = []

    def consume() -> None:
        try:
            list(results)
        except BaseException as exc:
            outcome.append(exc)

    reader = threading.Thread(target=consume, daemon=True)
    reader.start()
    time.sleep(0.3)  # the workers are inside time.sleep(300)
    start = time.monotonic()
    p.terminate()
    p.join()
    reader.join(10)
    assert time.monotonic() - start < 5
    assert not reader.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], PoolBrokenError)


def test_empty_iterable(backend: str) -> None:
    """CPython _TestPool.test_empty_iterable (issue 12157)"""
    p = Pool(1, backend=backend)
    try:
        assert p.map(sqr, []) == []
        assert list(p.imap(sqr, [])) == []
        assert list(p.imap_unordered(sqr, [])) == []
        assert len(p.imap(sqr, [])) == 0
    finally:
        p.close()
        p.join()


def test_context(backend: str) -> None:
    """CPython _TestPool.test_context: after the with-block the pool refuses work. The peer
    raises ValueError; ours PoolBrokenError (README: differences)."""
    values = list(range(10))
    expected = [sqr(i) for i in values]
    with Pool(2, backend=backend) as p:
        assert p.map(sqr, values) == expected
    p.join()
    with pytest.raises(PoolBrokenError):
        p.map(sqr, values)


def test_traceback() -> None:
    """CPython _TestPool.test_traceback: the worker's traceback reaches the caller (type,
    args, a RemoteTraceback as ``__cause__`` with the text as ``.tb``, the worker's source
    line in what ``sys.excepthook`` prints); an error of the input itself is not made
    remote."""
    with Pool(1) as p, pytest.raises(RuntimeError) as info:
        p.apply(raise_runtime_123)
    exc = info.value
    assert type(exc) is RuntimeError
    assert exc.args == (123,)
    cause = exc.__cause__
    assert type(cause) is RemoteTraceback
    assert COMMENTED_LINE in cause.tb
    assert cause.tb == cause.tb_text

    printed = io.StringIO()
    with contextlib.redirect_stderr(printed):
        sys.excepthook(type(exc), exc, exc.__traceback__)
    assert COMMENTED_LINE in printed.getvalue()

    with Pool(1) as p, pytest.raises(SayWhenError) as info2:
        p.map(sqr, exception_throwing_generator(1, -1), 1)
    assert type(info2.value) is SayWhenError
    assert info2.value.__cause__ is None


def test_wrapped_exception(backend: str) -> None:
    """CPython _TestPool.test_wrapped_exception (issue #20980): not wrapped, on threads too."""
    with Pool(1, backend=backend) as p, pytest.raises(RuntimeError) as info:
        p.apply(raise_runtime_foo)
    assert type(info.value) is RuntimeError
    assert info.value.args == ("foo",)


def test_map_no_failfast() -> None:
    """CPython _TestPool.test_map_no_failfast (issue #23992): an exception during map with a
    1 MiB payload does not deadlock closing. The peer's close() then waits for the other job
    (>0.9 s); ours cancels the abandoned item at once (README: differences)."""
    start = time.monotonic()
    with pytest.raises(ValueError) as info, Pool(2) as p:
        try:
            p.map(raise_large_valuerror, [0, 1])
        finally:
            time.sleep(0.5)
            p.close()
            p.join()
    assert info.value.args == ("x" * 1024**2,)
    assert time.monotonic() - start < 30


@pytest.mark.parametrize("backend", ["processes", "threads"])
def test_release_task_refs(backend: str) -> None:
    """CPython _TestPool.test_release_task_refs (issue #29861): arguments and results are
    not kept alive once the map is done (copies made by pickling included)."""
    with Pool(2, backend=backend) as p:
        objs = [CountedObject() for _ in range(10)]
        refs = [weakref.ref(o) for o in objs]
        p.map(identity, objs)
        del objs
        gc.collect()
        time.sleep(0.1)  # let threaded cleanup run
        assert {wr() for wr in refs} == {None}
        assert CountedObject.n_instances == 0


def test_enter(backend: str) -> None:
    """CPython _TestPool.test_enter (bpo-35477). The peer's ``__enter__`` on a closed pool
    raises ValueError; ours enters, and the first use raises PoolBrokenError (README:
    differences)."""
    pool = Pool(1, backend=backend)
    with pool:
        pass
    with pool:
        with pytest.raises(PoolBrokenError):
            pool.map(sqr, [1])
    pool.join()


def test_resource_warning(backend: str) -> None:
    """CPython _TestPool.test_resource_warning. The peer warns (ResourceWarning) when a
    running pool is collected; ours stops its workers from a finalizer, silently (README:
    differences). The autouse fixture checks that no worker is left."""
    pool = StateFullWorkerPool(1, sqr, backend=backend)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del pool
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]


def test_async_error_callback(backend: str) -> None:
    """CPython _TestPoolWorkerErrors.test_async_error_callback: the error reaches the
    callback (ours: ``on_result`` with DEFERRED gets the item's outcome, KeyError in it)."""
    scratchpad: list[object] = []
    with StateFullWorkerPool(
        2,
        Apply,
        backend=backend,
        exception_behavior=ExceptionBehavior.DEFERRED,
        on_result=scratchpad.append,
    ) as pool:
        (result,) = pool.map([(raising, (), {})])
    assert isinstance(result.exception_obj, KeyError)
    assert len(scratchpad) == 1
    assert isinstance(getattr(scratchpad[0], "exception_obj", None), KeyError)


def test_unpickleable_result() -> None:
    """CPython _TestPoolWorkerErrors.test_unpickleable_result: 20 results that cannot be
    pickled, each an error for its item (peer: MaybeEncodingError keeping the original as
    ``.exc``; ours: SerializationError chaining it as ``__cause__``), and no worker is lost.
    A lock stands in for the peer's lambda, which cloudpickle ships."""
    with Pool(2) as p:
        for _ in range(20):
            with pytest.raises(SerializationError, match="cannot be pickled") as info:
                p.apply(unpickleable_result)
            assert "lock" in str(info.value)
            assert isinstance(info.value.__cause__, TypeError)
        assert p.pool.stats().restarts == 0


def test_pool_worker_lifetime() -> None:
    """CPython _TestPoolWorkerLifetime.test_pool_worker_lifetime: maxtasksperchild=10 over 100
    tasks replaces the workers, results stay right."""
    with Pool(3, maxtasksperchild=10) as p:
        assert p.pool.num_workers == 3
        original = [w["pid"] for w in p.pool.stats().workers]
        results = p.map(sqr_and_pid, range(100))
        assert [value for value, _ in results] == [sqr(j) for j in range(100)]
        final = [w["pid"] for w in p.pool.stats().workers]
        assert None not in original
        assert None not in final
        assert sorted(original) != sorted(final)
        assert len({pid for _, pid in results}) > 3


def test_pool_worker_lifetime_early_close() -> None:
    """CPython _TestPoolWorkerLifetime.test_pool_worker_lifetime_early_close (issue #10332):
    closing a pool whose workers have a lifetime of 1 does not hang. Our maps are lazy, so
    the results are read first; a map closed early ends with PoolBrokenError (README:
    differences)."""
    p = Pool(3, maxtasksperchild=1)
    results = p.starmap(sqr, [(i, 0.3) for i in range(6)])
    p.close()
    p.join()
    assert results == [sqr(j) for j in range(6)]

    p = Pool(3, maxtasksperchild=1)
    it = iter(p.imap(sqr, range(6)))
    assert next(it) == 0
    start = time.monotonic()
    p.close()
    p.join()
    assert time.monotonic() - start < 10
    with pytest.raises(PoolBrokenError):
        list(it)


@pytest.mark.parametrize("value", [0, -1, 0.5, "12"])
def test_pool_maxtasksperchild_invalid(value: object) -> None:
    """CPython _TestPoolWorkerLifetime.test_pool_maxtasksperchild_invalid"""
    with pytest.raises(ValueError):
        StateFullWorkerPool(3, sqr, max_tasks_per_worker=value)  # type: ignore[arg-type]


def test_worker_finalization_via_atexit_handler_of_multiprocessing() -> None:
    """CPython
    _TestPoolWorkerLifetime.test_worker_finalization_via_atexit_handler_of_multiprocessing
    (bpo-38744, bpo-39360): a pool left open in a global exits cleanly."""
    script = textwrap.dedent(
        """
        from tests.peer.shim import Pool
        problem = None
        class A:
            def __init__(self):
                self.pool = Pool(processes=1)
        def test():
            global problem
            problem = A()
            problem.pool.map(float, tuple(range(10)))
        if __name__ == "__main__":
            test()
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr.decode()
    assert done.stderr == b""


def test_worker_finalization_float_as_the_worker() -> None:
    """CPython
    _TestPoolWorkerLifetime.test_worker_finalization_via_atexit_handler_of_multiprocessing
    maps ``float``: as our pool's worker, it is called per item (issue 22
    item 14)."""
    with StateFullWorkerPool(1, float) as pool:
        assert list(pool.imap(tuple(range(10)))) == [float(i) for i in range(10)]


def test_pool_initializer(backend: str) -> None:
    """CPython TestInitializers.test_pool_initializer (issue 5585): a non-callable is a
    TypeError; the initializer runs once per worker (a Manager namespace counts)."""
    with pytest.raises(TypeError):
        StateFullWorkerPool(1, 1)  # type: ignore[arg-type]  # initializer=1
    manager = multiprocessing.get_context("forkserver").Manager()
    try:
        ns = manager.Namespace()
        ns.test = 0
        p = Pool(1, counting_initializer, (ns,), backend=backend)
        p.close()
        p.join()
        assert ns.test == 1
    finally:
        manager.shutdown()
        manager.join()
