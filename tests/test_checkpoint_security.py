"""Reading a checkpoint runs no code its file names (issue 22 item 16).

Common results are stored in the package's own tagged format (``checkpoint.tagged``), which
holds data only; anything else, and stored exceptions, are pickles signed with a per-user
secret (``checkpoint.signing``) and loaded only when the signature is this user's, or with
``Checkpoint(..., trusted=True)``. A file altered by hand — a crafted pickle that would create
a marker file — is refused before anything is unpickled.
"""

from __future__ import annotations

import math
import os
import pickle
import sqlite3
import stat
import struct
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from py_stateful_map import Checkpoint, CheckpointError, ExceptionBehavior, StateFullWorkerPool
from py_stateful_map.checkpoint import codec, signing, tagged
from py_stateful_map.checkpoint.file import UNSIGNED_FORMAT
from py_stateful_map.checkpoint.run import Stored
from py_stateful_map.errors import CheckpointedError

from .scripts import REPO_ROOT


@pytest.fixture(autouse=True)
def secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This test's user secret, in its own file (the real one is never touched)."""
    path = tmp_path / "secrets" / "mine"
    monkeypatch.setenv(signing.SECRET_ENV, str(path))
    monkeypatch.setattr(signing, "_keys", {})
    return path


def use_secret(monkeypatch: pytest.MonkeyPatch, path: Path) -> None:
    """Act as the user whose secret is ``path`` (another user, in these tests)."""
    monkeypatch.setenv(signing.SECRET_ENV, str(path))


class Point:
    """A result of a user class: stored as a signed pickle."""

    def __init__(self, x: int, y: int) -> None:
        self.x, self.y = x, y

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Point) and (self.x, self.y) == (other.x, other.y)

    def __hash__(self) -> int:
        return hash((self.x, self.y))


class Boom(Exception):
    """A user exception class: rebuilt from its signed pickle."""


def write(path: Path, values: list[Any], **options: Any) -> None:
    with Checkpoint(path, **options).open_run(worker=Point) as run:
        run.record(range(len(values)), list(range(len(values))), values)


def blobs(path: Path) -> dict[int, bytes]:
    with sqlite3.connect(path) as conn:
        rows = dict(conn.execute("SELECT key, value FROM results"))
    conn.close()
    return rows


def set_blob(path: Path, key: int, blob: bytes) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE results SET value = ? WHERE key = ?", (blob, key))
    conn.close()


class Evil:
    """Pickles as a call of ``os.system`` that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (os.system, (f"touch {self.marker}",))


def evil_pickle(marker: Path) -> bytes:
    return pickle.dumps([Evil(marker)], 5)  # a row of one value, as the store keeps it


# -- exact round trips of the safe types ------------------------------------------------------


def same(a: Any, b: Any) -> bool:
    """Equal values of identical types all the way down; floats bit for bit (nan, -0.0)."""
    if type(a) is not type(b):
        return False
    if type(a) is float:
        return struct.pack("<d", a) == struct.pack("<d", b)
    if type(a) in (list, tuple):
        return len(a) == len(b) and all(map(same, a, b))
    if type(a) is dict:
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    return bool(a == b)


each_scalar = [
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.integers(-(2**200), 2**200),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(st.characters(codec=None, exclude_categories=())),  # lone surrogates too
    st.binary(),
]
scalars = st.one_of(*each_scalar)
keys = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text())
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=6),
        st.tuples(inner, inner),
        st.dictionaries(keys, inner, max_size=5),
    ),
    max_leaves=20,
)
#: Rows as results come: often of one type (packed), records (tuples, dicts of one shape),
#: or a mix (a union of packed lists).
rows = st.one_of(
    st.lists(values, min_size=1, max_size=30),
    st.lists(scalars, min_size=1, max_size=30),
    *(st.lists(scalar, min_size=1, max_size=40) for scalar in each_scalar),
    st.lists(st.tuples(st.integers(), st.text(), st.none()), min_size=1, max_size=20),
    st.lists(st.fixed_dictionaries({"label": st.text(), "score": st.floats()}), max_size=20),
)


@settings(max_examples=300, deadline=None)
@given(row=rows)
def test_safe_values_round_trip_exactly_without_a_pickle(row: list[Any]) -> None:
    blob = codec.encode_values(row)
    assert blob[:1] in (b"V", b"O"), "stored as a pickle"
    assert same(codec.decode_values(blob, trusted=False), row)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(row=st.lists(values, min_size=1, max_size=12))
def test_safe_values_round_trip_through_a_checkpoint(tmp_path: Path, row: list[Any]) -> None:
    path = tmp_path / f"c{os.getpid()}-{id(row)}-{os.urandom(4).hex()}.sqlite"
    write(path, row)
    got = [value for _, value in Checkpoint(path).results()]
    assert same(got, row)
    with Checkpoint(path).open_run(worker=Point) as run:
        spans = run.plan(0, list(range(len(row))))
    assert same([v for span in spans if isinstance(span, Stored) for v in span.values], row)


def test_numpy_arrays_round_trip_with_exact_dtype_byte_order_and_shape() -> None:
    np = pytest.importorskip("numpy")
    hnp = pytest.importorskip("hypothesis.extra.numpy")
    dtypes = st.one_of(
        hnp.boolean_dtypes(),
        hnp.integer_dtypes(endianness="?"),
        hnp.unsigned_integer_dtypes(endianness="?"),
        hnp.floating_dtypes(endianness="?"),
        hnp.complex_number_dtypes(endianness="?"),
        hnp.datetime64_dtypes(endianness="?"),
        hnp.timedelta64_dtypes(endianness="?"),
    )
    arrays = hnp.arrays(dtypes, hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=4))

    @settings(max_examples=200, deadline=None)
    @given(array=arrays, copies=st.integers(1, 3))
    def check(array: Any, copies: int) -> None:
        for row in ([array] * copies, [array, np.asarray(array).T]):  # stacked, then mixed
            blob = codec.encode_values(row)
            assert blob[:1] in (b"V", b"O")
            for got, want in zip(codec.decode_values(blob, trusted=False), row, strict=True):
                assert type(got) is np.ndarray and got.dtype == want.dtype
                assert got.dtype.str == want.dtype.str and got.shape == want.shape
                assert got.tobytes() == np.ascontiguousarray(want).tobytes()
                assert got.flags.writeable and got.flags.owndata

    check()


def test_numpy_scalars_round_trip_as_numpy_scalars() -> None:
    np = pytest.importorskip("numpy")
    row = [np.float32(1.5), np.int8(-3), np.bool_(True), np.datetime64("2024-01-01", "ns")]
    for values in (row, [np.float16(0.5)] * 5, [np.float64("nan")]):
        got = codec.decode_values(codec.encode_values(values), trusted=False)
        for a, b in zip(got, values, strict=True):
            assert type(a) is type(b) and a.dtype == b.dtype and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("shape", [(), (0,), (5,), (2, 3), (2, 0, 4)])
def test_torch_tensors_round_trip_with_dtype_and_shape(shape: tuple[int, ...]) -> None:
    torch = pytest.importorskip("torch")
    dtypes = [
        torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.complex64,
        torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool,
    ]  # fmt: skip
    for dtype in dtypes:
        tensor = (torch.arange(math.prod(shape)) % 7).reshape(shape).to(dtype)
        for row in ([tensor], [tensor, tensor.clone()], [tensor, tensor.reshape(-1)]):
            blob = codec.encode_values(row)
            assert blob[:1] in (b"V", b"O"), dtype
            for got, want in zip(codec.decode_values(blob, trusted=False), row, strict=True):
                assert type(got) is torch.Tensor and got.dtype == want.dtype, dtype
                assert got.shape == want.shape and torch.equal(got, want)
    matrix = torch.arange(6.0).reshape(2, 3)
    leaf = torch.zeros(3, requires_grad=True)
    (transposed, grad) = codec.decode_values(codec.encode_values([matrix.t(), leaf]), trusted=False)
    assert torch.equal(transposed, matrix.t()) and grad.requires_grad


def test_plain_results_need_neither_numpy_nor_torch(tmp_path: Path) -> None:
    code = f"""
        import sys; sys.path[:0] = {[str(REPO_ROOT / "src")]!r}
        from py_stateful_map import Checkpoint
        with Checkpoint({str(tmp_path / "c.sqlite")!r}).open_run(worker=int) as run:
            run.record(range(4), [0, 1, 2, 3], [1, "a", {{"k": [1.5, None]}}, (b"x", True)])
        print(list(Checkpoint({str(tmp_path / "c.sqlite")!r}).results()))
        print(sorted({{"numpy", "torch"}} & set(sys.modules)))
    """
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env={**os.environ, signing.SECRET_ENV: str(tmp_path / "secret")},
    ).stdout.splitlines()
    assert out == ["[(0, 1), (1, 'a'), (2, {'k': [1.5, None]}), (3, (b'x', True))]", "[]"]
    assert not (tmp_path / "secret").exists()  # nothing was pickled: no secret needed


# -- what is pickled is signed, and what is not this user's is refused ----------------------


def test_other_results_are_signed_pickles_that_this_user_reads(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    write(path, [Point(1, 2), Point(3, 4), 5])
    (blob,) = blobs(path).values()
    assert blob[:1] == b"P" and len(blob) > 1 + signing.SIGNATURE_SIZE
    assert list(Checkpoint(path).results()) == [(0, Point(1, 2)), (1, Point(3, 4)), (2, 5)]


def test_tampered_pickle_is_refused_before_it_runs(tmp_path: Path) -> None:
    path, marker = tmp_path / "c.sqlite", tmp_path / "marker"
    write(path, [Point(1, 2)])
    payload = evil_pickle(marker)
    signed = blobs(path)[0]
    forged = [
        b"P" + signed[1 : 1 + signing.SIGNATURE_SIZE] + payload,  # a real signature, other bytes
        b"P" + bytes(signing.SIGNATURE_SIZE) + payload,  # a made-up signature
        payload,  # a bare pickle, as format 1 stored values
    ]
    for blob in forged:
        set_blob(path, 0, blob)
        with pytest.raises(CheckpointError) as info:
            list(Checkpoint(path).results())
        message = str(info.value)
        for part in ("item 0", str(path), "not written by this user", "trusted=True"):
            assert part in message, (part, message)
        with Checkpoint(path).open_run(worker=Point) as run:
            with pytest.raises(CheckpointError, match="item 0"):
                run.plan(0, [0])
        assert not marker.exists(), "the crafted pickle ran"
    assert list(Checkpoint(path, trusted=True).results()) == [(0, 0)]  # os.system's status
    assert marker.exists()  # what trusted=True means: the file's code ran


def test_file_signed_with_another_users_secret_is_refused(
    tmp_path: Path, secret: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "c.sqlite"
    write(path, [Point(1, 2), "plain"])
    use_secret(monkeypatch, tmp_path / "secrets" / "someone-else")
    signing.sign(b"")  # they have a secret of their own
    with pytest.raises(CheckpointError, match=r"item 0 to 1.*not one made with this user's"):
        list(Checkpoint(path).results())
    assert list(Checkpoint(path, trusted=True).results()) == [(0, Point(1, 2)), (1, "plain")]
    use_secret(monkeypatch, tmp_path / "secrets" / "nobody")
    with pytest.raises(CheckpointError, match=r"has no checkpoint secret .* to check it with"):
        list(Checkpoint(path).results())
    assert not (tmp_path / "secrets" / "nobody").exists()  # checking creates no secret
    use_secret(monkeypatch, secret)
    assert list(Checkpoint(path).results()) == [(0, Point(1, 2)), (1, "plain")]


def test_stored_exceptions_are_rebuilt_only_from_this_users_pickles(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, marker = tmp_path / "c.sqlite", tmp_path / "marker"
    text = "Traceback (most recent call last):\n  ...\nBoom: disk on fire\n"
    with Checkpoint(path).open_run(worker=Point) as run:
        errors = [(0, Boom("disk on fire"), text), (1, Boom("b"), "")]
        run.record(range(2), [0, 1], [None, None], errors)

    def replayed(**options: Any) -> list[BaseException]:
        with Checkpoint(path, **options).open_run(worker=Point) as run:
            (span,) = run.plan(0, [0, 1])
        return [exc for _, exc, _ in span.errors]

    assert [type(exc) for exc in replayed()] == [Boom, Boom]
    use_secret(monkeypatch, tmp_path / "secrets" / "someone-else")
    first, _ = replayed()
    assert isinstance(first, CheckpointedError) and "disk on fire" in str(first)
    assert "trusted=True" in str(first) and "Boom" in first.tb_text
    assert [type(exc) for exc in replayed(trusted=True)] == [Boom, Boom]
    name, args, message, pickled = tagged.decode(blobs(path)[0], 1)
    assert (name, args, message) == (f"{__name__}.Boom", "('disk on fire',)", "disk on fire")
    assert pickled[:1] == b"P"
    forged = tagged.encode((name, args, message, b"P" + pickled[1:33] + evil_pickle(marker)))
    set_blob(path, 0, b"V" + forged)
    first, _ = replayed()
    assert isinstance(first, CheckpointedError) and not marker.exists()


class Picky(Exception):
    def __init__(self, code: int, detail: str) -> None:  # pickles, but cannot unpickle
        super().__init__(f"{code}: {detail}")


def test_exception_that_cannot_be_rebuilt_keeps_its_type_name_and_text(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    with Checkpoint(path).open_run(worker=Point) as run:
        run.record(range(1), [0], [None], [(0, Picky(7, "gpu"), "")])
    with Checkpoint(path).open_run(worker=Point) as run:
        ((_, exc, _),) = run.plan(0, [0])[0].errors
    assert isinstance(exc, CheckpointedError) and "Picky: 7: gpu" in str(exc)
    name, _, message, pickled = tagged.decode(blobs(path)[0], 1)
    assert name.endswith(".Picky") and message == "7: gpu" and pickled is None


def test_damaged_safe_value_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    write(path, [[1.5] * 10, "x"])
    blob = blobs(path)[0]
    for damaged in (blob[:-3], blob + b"\x00", b"V\xff", b"Vl\xff\xff\xff\xff", b"Z"):
        set_blob(path, 0, damaged)
        with pytest.raises(CheckpointError, match=r"cannot read the stored result of item 0"):
            list(Checkpoint(path).results())


def test_crafted_numpy_dtype_is_refused(tmp_path: Path) -> None:
    pytest.importorskip("numpy")
    for dtype in (b"|O", b"|V8", b"f8,i4", b"<U0"):
        blob = b"Va" + bytes((len(dtype),)) + dtype + b"\x01" + struct.pack("<Q", 1) + bytes(8)
        with pytest.raises(ValueError, match="plain numpy dtype"):
            codec.decode_values(blob, trusted=True)


# -- format 1, the secret itself --------------------------------------------------------------


def as_format_1(path: Path) -> None:
    """Make ``path`` what py_stateful_map wrote before signatures: bare pickles, format 1."""
    with sqlite3.connect(path) as conn:
        for key, blob in conn.execute("SELECT key, value FROM results").fetchall():
            values = codec.decode_values(blob, trusted=False)
            conn.execute(
                "UPDATE results SET value = ? WHERE key = ?", (pickle.dumps(values, 5), key)
            )
        conn.execute(f"PRAGMA user_version = {UNSIGNED_FORMAT}")
        conn.execute("UPDATE manifest SET value = '1' WHERE name = 'format'")
    conn.close()


def test_format_1_file_is_read_only_when_trusted(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    write(path, [1, "two"])
    as_format_1(path)
    with pytest.raises(CheckpointError, match=r"format 1.*trusted=True"):
        list(Checkpoint(path).results())
    with pytest.raises(CheckpointError, match=r"format 1.*trusted=True"):
        Checkpoint(path).open_run(worker=Point)
    assert Checkpoint(path).status().done == 2  # counts read no value
    assert list(Checkpoint(path, trusted=True).results()) == [(0, 1), (1, "two")]
    with Checkpoint(path, trusted=True).open_run(worker=Point) as run:
        assert run.plan(0, [0, 1, 2])[0] == Stored(0, [1, "two"], None)
        run.record(range(2, 3), [2], [Point(0, 0)])
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == UNSIGNED_FORMAT
    conn.close()
    with pytest.raises(CheckpointError, match="format 1"):  # still holds unsigned pickles
        list(Checkpoint(path).results())


def test_secret_is_created_private_on_first_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(signing.SECRET_ENV)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    expected = tmp_path / "data" / "py_stateful_map" / "checkpoint_secret"
    assert signing.secret_path() == expected
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    expected = tmp_path / "home" / ".local" / "share" / "py_stateful_map" / "checkpoint_secret"
    assert signing.secret_path() == expected
    write(tmp_path / "c.sqlite", [Point(1, 1)])
    assert stat.S_IMODE(expected.stat().st_mode) == 0o600
    assert stat.S_IMODE(expected.parent.stat().st_mode) == 0o700
    assert len(bytes.fromhex(expected.read_text())) == 32
    assert list(Checkpoint(tmp_path / "c.sqlite").results()) == [(0, Point(1, 1))]
    assert list(expected.parent.iterdir()) == [expected]  # no temporary file left


def test_secret_others_may_read_is_refused(tmp_path: Path, secret: Path) -> None:
    secret.parent.mkdir()
    secret.write_text("0123456789abcdef0123456789abcdef\n")
    secret.chmod(0o644)
    with pytest.raises(CheckpointError, match=r"may be read or written by others.*chmod 600"):
        signing.sign(b"x")
    secret.chmod(0o600)
    assert signing.check(signing.sign(b"x"), b"x") is None
    assert signing.check(signing.sign(b"x"), b"y") is not None


# -- through a pool ---------------------------------------------------------------------------


def shapes(i: int) -> Any:
    """Safe results for most items, a user class for every fifth, a failure for item 13."""
    if i == 13:
        raise Boom(f"item {i}")
    return Point(i, -i) if i % 5 == 0 else {"i": i, "sq": [i * i, float(i) / 3]}


@pytest.mark.parametrize("kind", ["threads", "processes"])
def test_a_rerun_replays_safe_and_pickled_results(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    deferred = ExceptionBehavior.DEFERRED
    by_position = tmp_path / "positions.ckpt"
    by_key = Checkpoint(tmp_path / "keys.ckpt", key=str)  # a row per item: safe ones, pickles
    with StateFullWorkerPool(2, shapes, backend=kind, exception_behavior=deferred) as pool:
        first = list(pool.map(range(40), checkpoint=by_position))
        for checkpoint in (by_position, by_key, by_key):
            again = list(pool.map(range(40), checkpoint=checkpoint))
            assert [r.ret_val for r in again] == [r.ret_val for r in first]
            assert type(again[13].exception_obj) is Boom
    assert not any(r.from_checkpoint for r in first) and all(r.from_checkpoint for r in again)
    assert again[5].ret_val == Point(5, -5) and again[6].ret_val == {"i": 6, "sq": [36, 2.0]}
    kinds = {blob[:1] for blob in blobs(by_key.path).values()}
    assert kinds == {b"O", b"P", b"V"}  # safe results, pickled ones, the failure's record
    use_secret(monkeypatch, tmp_path / "secrets" / "someone-else")
    with StateFullWorkerPool(2, shapes, backend=kind, exception_behavior=deferred) as pool:
        for checkpoint in (by_position, by_key):
            with pytest.raises(CheckpointError, match=r"trusted=True"):
                list(pool.map(range(40), checkpoint=checkpoint))
        trusted = list(pool.map(range(40), checkpoint=Checkpoint(by_position, trusted=True)))
    assert [r.ret_val for r in trusted] == [r.ret_val for r in first]
