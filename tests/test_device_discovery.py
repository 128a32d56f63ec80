"""Device discovery: CUDA_VISIBLE_DEVICES rules, requests, placements, no CUDA init.

Every test injects a probe that pretends the machine has N GPUs, so the suite
runs the same with or without a GPU.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import textwrap
import time
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from py_stateful_map.devices import discovery as dd
from py_stateful_map.devices.discovery import (
    DevicePlacement,
    PhysicalGpu,
    cuda_initialized_in_this_process,
    ensure_fork_is_safe,
    place_devices,
    placement_for,
    probe_physical_gpus,
    resolve_devices,
    visible_gpus,
)

from .conftest import leftover_children

SRC = Path(__file__).resolve().parents[1] / "src"


def uuid(index: int) -> str:
    return f"GPU-{index}{index}{index}{index}aaaa-bbbb-cccc"


def mig_uuid(name: str) -> str:
    return f"MIG-{name}-0000-1111"


def machine(count: int, migs: Sequence[str] = ()) -> Callable[[], list[PhysicalGpu]]:
    """A probe for a machine with ``count`` GPUs; MIG instances hang off GPU 0."""
    gpus = [PhysicalGpu(i, uuid(i)) for i in range(count)]
    gpus[1:1] = [PhysicalGpu(0, mig_uuid(name)) for name in migs]
    return lambda: list(gpus)


def no_probe() -> list[PhysicalGpu]:
    raise AssertionError("this request must not probe for GPUs")


@pytest.fixture(autouse=True)
def clean_cuda_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)


def tokens(migs: Sequence[str] = ()) -> list[str]:
    return [gpu.token for gpu in visible_gpus(probe=machine(4, migs=migs))]


# ------------------------------------------------------- CUDA_VISIBLE_DEVICES


def test_auto_lists_every_gpu_when_variable_is_unset() -> None:
    assert resolve_devices("auto", probe=machine(4)) == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]


def test_auto_falls_back_to_cpu_without_gpus() -> None:
    assert resolve_devices(probe=machine(0)) == ["cpu"]


@pytest.mark.parametrize("value", ["", "-1", " -1", "none", ",0"])
def test_variable_that_names_no_device_hides_every_gpu(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", value)
    assert resolve_devices("auto", probe=machine(4)) == ["cpu"]


def test_index_list_is_renumbered_from_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    assert resolve_devices(probe=machine(4)) == ["cuda:0", "cuda:1"]
    assert tokens() == ["3", "1"]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1,7,2", ["1"]),  # the first index that does not exist ends the list
        ("0,1,-1,2", ["0", "1"]),
        ("0,1,0", []),  # a repeated device hides every device
        (" 1, 2gpu", ["1", "2"]),  # entries are read like strtoul
        ("2,", ["2"]),
    ],
)
def test_index_list_follows_cuda_driver_rules(
    monkeypatch: pytest.MonkeyPatch, value: str, expected: list[str]
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", value)
    assert tokens() == expected


def test_a_gpu_in_mig_mode_is_one_device_per_instance(monkeypatch: pytest.MonkeyPatch) -> None:
    # GPU 0 is in MIG mode: it cannot run CUDA work as a whole, its instances can, one per
    # process; the instances do not shift the indices of the whole GPUs.
    assert tokens(migs=["a", "b"]) == [mig_uuid("a"), mig_uuid("b"), "1", "2", "3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,0")
    assert tokens(migs=["a", "b"]) == ["2", mig_uuid("a"), mig_uuid("b")]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", uuid(0))
    assert tokens(migs=["a"]) == [mig_uuid("a")]


def test_full_uuids_select_gpus_in_their_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", f"{uuid(3)},{uuid(1)}")
    assert tokens() == [uuid(3), uuid(1)]


def test_uuid_prefix_resolves_to_the_full_uuid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-2222,GPU-0")
    assert tokens() == [uuid(2), uuid(0)]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("GPU-1111,GPU-9999,GPU-2222", [uuid(1)]),  # unknown uuid ends the list
        ("GPU-,GPU-1111", []),  # an ambiguous prefix names no device
        ("GPU-1111,GPU-1111", []),  # repeated
        ("GPU-1111,2", [uuid(1)]),  # an index after a uuid names no device
    ],
)
def test_uuid_list_follows_cuda_driver_rules(
    monkeypatch: pytest.MonkeyPatch, value: str, expected: list[str]
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", value)
    assert tokens() == expected


def test_each_listed_mig_instance_is_a_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-b,MIG-a")
    assert tokens(migs=["a", "b"]) == [mig_uuid("b"), mig_uuid("a")]
    assert resolve_devices(probe=machine(4, migs=["a", "b"])) == ["cuda:0", "cuda:1"]


def test_unknown_mig_instance_hides_every_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-zz")
    assert resolve_devices(probe=machine(4, migs=["a"])) == ["cpu"]


# ------------------------------------------------------------------ requests


def test_cpu_request_does_not_probe() -> None:
    assert resolve_devices("cpu", probe=no_probe) == ["cpu"]
    assert resolve_devices(" CPU ", probe=no_probe) == ["cpu"]


def test_int_takes_the_first_n_gpus() -> None:
    assert resolve_devices(2, probe=machine(4)) == ["cuda:0", "cuda:1"]


def test_int_larger_than_gpu_count_lists_what_exists() -> None:
    with pytest.raises(ValueError, match=r"devices=3 .*2 CUDA device\(s\): cuda:0, cuda:1"):
        resolve_devices(3, probe=machine(2))


@pytest.mark.parametrize("count", [0, -1])
def test_int_below_one_is_rejected(count: int) -> None:
    with pytest.raises(ValueError, match="at least one GPU"):
        resolve_devices(count, probe=machine(2))


def test_list_is_normalized_to_device_strings() -> None:
    request: list[Any] = ["cuda:0", 1, "cuda:1", "cpu", "CUDA:1", "0", "cuda"]
    assert resolve_devices(request, probe=machine(2)) == [
        "cuda:0", "cuda:1", "cuda:1", "cpu", "cuda:1", "cuda:0", "cuda:0",
    ]  # fmt: skip


def test_single_device_string_is_one_device() -> None:
    assert resolve_devices("cuda:1", probe=machine(2)) == ["cuda:1"]


def test_torch_device_objects_are_accepted() -> None:
    torch = pytest.importorskip("torch")
    request = [torch.device("cuda", 1), torch.device("cpu")]
    assert resolve_devices(request, probe=machine(2)) == ["cuda:1", "cpu"]


def test_missing_gpu_error_names_what_exists_and_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    with pytest.raises(ValueError, match=r"cuda:2 does not exist") as info:
        resolve_devices(["cuda:0", "cuda:2"], probe=machine(4))
    assert "cuda:0, cuda:1" in str(info.value)
    assert "CUDA_VISIBLE_DEVICES='2,3'" in str(info.value)


def test_gpu_request_without_gpus_suggests_cpu() -> None:
    with pytest.raises(ValueError, match="sees no CUDA device; use devices='cpu'"):
        resolve_devices([0], probe=machine(0))


@pytest.mark.parametrize(
    ("request_", "error"),
    [
        ([], ValueError),
        ("mps", ValueError),
        ("gpu:1", ValueError),
        (["cuda:x"], ValueError),
        ([-1], ValueError),
        (True, TypeError),
        ([False], TypeError),
        (1.5, TypeError),
        ([1.0], TypeError),
        ({"cuda:0"}, TypeError),
        (None, TypeError),
    ],
)
def test_invalid_requests_are_rejected(request_: Any, error: type[Exception]) -> None:
    with pytest.raises(error):
        resolve_devices(request_, probe=machine(2))


# ---------------------------------------------------------------- placements


def test_gpu_worker_sees_only_its_gpu_as_cuda_0(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    placements = place_devices(["cuda:1", "cuda:0"], probe=machine(4))
    assert placements == [
        DevicePlacement("cuda:1", "cuda:0", {"CUDA_VISIBLE_DEVICES": "3"}),
        DevicePlacement("cuda:0", "cuda:0", {"CUDA_VISIBLE_DEVICES": "2"}),
    ]


def test_cpu_worker_hides_every_gpu() -> None:
    (placement,) = place_devices("cpu", probe=no_probe)
    assert placement == DevicePlacement("cpu", "cpu", {"CUDA_VISIBLE_DEVICES": "-1"})


def test_auto_without_gpus_places_one_cpu_worker() -> None:
    assert [p.environ for p in place_devices(probe=machine(0))] == [{"CUDA_VISIBLE_DEVICES": "-1"}]


def test_uuid_placement_uses_the_full_uuid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-3333,GPU-1111")
    placement = placement_for("cuda:1", visible_gpus(probe=machine(4)))
    assert placement.environ == {"CUDA_VISIBLE_DEVICES": uuid(1)}


def test_device_order_is_passed_on_with_the_index(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    placement = placement_for("cuda:1", visible_gpus(probe=machine(2)))
    assert placement.environ == {"CUDA_VISIBLE_DEVICES": "1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}


def test_placement_for_missing_gpu_is_rejected() -> None:
    with pytest.raises(ValueError, match="cuda:2 does not exist"):
        placement_for("cuda:2", visible_gpus(probe=machine(2)))


@pytest.mark.parametrize("parent", [None, "3,1,2", f"{uuid(2)},GPU-0", "MIG-b,MIG-a"])
def test_child_with_placement_environment_sees_the_parents_gpu(
    monkeypatch: pytest.MonkeyPatch, parent: str | None
) -> None:
    probe = machine(4, migs=["a", "b"])
    if parent is not None:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", parent)
    parent_gpus = visible_gpus(probe=probe)
    for gpu in parent_gpus:
        placement = placement_for(gpu.device, parent_gpus)
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", placement.environ["CUDA_VISIBLE_DEVICES"])
        assert [child.token for child in visible_gpus(probe=probe)] == [gpu.token]
        assert placement.worker_device == "cuda:0"
        if parent is not None:
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", parent)


# ------------------------------------------------------------ never init CUDA


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    path = [str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True, text=True, timeout=60, env=env, check=False,
    )  # fmt: skip


def test_discovery_imports_neither_torch_nor_numpy() -> None:
    done = run_python(
        """
        import sys
        from py_stateful_map.devices.discovery import resolve_devices
        resolve_devices("auto"); resolve_devices("cpu")
        assert "torch" not in sys.modules and "numpy" not in sys.modules, sorted(sys.modules)
        """
    )
    assert done.returncode == 0, done.stderr


def test_discovery_leaves_cuda_uninitialized_in_a_fresh_process() -> None:
    pytest.importorskip("torch")
    done = run_python(
        """
        import torch
        from py_stateful_map.devices.discovery import resolve_devices
        print(resolve_devices("auto"))
        assert not torch.cuda.is_initialized()
        """
    )
    assert done.returncode == 0, done.stderr


def test_discovery_never_calls_torch_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    torch = pytest.importorskip("torch")

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("discovery touched torch.cuda")

    for name in ("init", "device_count", "is_available", "_lazy_init", "current_device"):
        monkeypatch.setattr(torch.cuda, name, forbidden)
    assert resolve_devices([torch.device("cuda:0"), "cpu"], probe=machine(1)) == ["cuda:0", "cpu"]
    assert resolve_devices("auto")  # the real probe, on whatever this machine has


def fake_torch(initialized: Callable[[], bool]) -> types.ModuleType:
    module = types.ModuleType("torch")
    module.cuda = types.SimpleNamespace(is_initialized=initialized)  # type: ignore[attr-defined]
    return module


def test_cuda_initialized_is_false_without_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    assert cuda_initialized_in_this_process() is False
    assert "torch" not in sys.modules


def test_cuda_initialized_reports_torch_state(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", fake_torch(lambda: True))
    assert cuda_initialized_in_this_process() is True


def test_cuda_initialized_tolerates_a_broken_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", types.ModuleType("torch"))
    assert cuda_initialized_in_this_process() is False


def test_real_cpu_torch_is_not_initialized() -> None:
    pytest.importorskip("torch")
    assert cuda_initialized_in_this_process() is False


def test_fork_is_refused_once_cuda_is_initialized(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", fake_torch(lambda: True))
    with pytest.raises(RuntimeError, match=r"start_method='fork'.*'spawn'"):
        ensure_fork_is_safe("fork")
    ensure_fork_is_safe("spawn")
    ensure_fork_is_safe("forkserver")


def test_fork_is_allowed_before_cuda_is_initialized(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", fake_torch(lambda: False))
    ensure_fork_is_safe("fork")


# -------------------------------------------------------------------- probes


class FakeNvml:
    """Answers the NVML calls the probe makes, writing through ctypes.byref like C."""

    def __init__(self, uuids: list[str], migs: dict[int, list[str | None]], init: int = 0):
        self.uuids, self.migs, self.init_result = uuids, migs, init
        self.shutdowns = 0

    def nvmlInit_v2(self) -> int:
        return self.init_result

    def nvmlShutdown(self) -> int:
        self.shutdowns += 1
        return 0

    def nvmlDeviceGetCount_v2(self, count: Any) -> int:
        count._obj.value = len(self.uuids)
        return 0

    def nvmlDeviceGetHandleByIndex_v2(self, index: ctypes.c_uint, handle: Any) -> int:
        handle._obj.value = 1000 + index.value
        return 0

    def nvmlDeviceGetUUID(self, handle: ctypes.c_void_p, buffer: Any, size: ctypes.c_uint) -> int:
        value = handle.value or 0
        text = self.uuids[value - 1000] if value < 2000 else self.mig_uuid(value)
        buffer.value = text.encode()
        return 0

    def nvmlDeviceGetMaxMigDeviceCount(self, handle: ctypes.c_void_p, count: Any) -> int:
        slots = self.migs.get((handle.value or 0) - 1000)
        if slots is None:
            return 3  # NVML_ERROR_NOT_SUPPORTED
        count._obj.value = len(slots)
        return 0

    def nvmlDeviceGetMigDeviceHandleByIndex(
        self, handle: ctypes.c_void_p, slot: ctypes.c_uint, mig: Any
    ) -> int:
        gpu = (handle.value or 0) - 1000
        if self.migs[gpu][slot.value] is None:
            return 6  # NVML_ERROR_NOT_FOUND: an empty slot
        mig._obj.value = 2000 + gpu * 100 + slot.value
        return 0

    def mig_uuid(self, value: int) -> str:
        gpu, slot = divmod(value - 2000, 100)
        return self.migs[gpu][slot] or ""


def test_nvml_probe_lists_gpus_and_mig_instances() -> None:
    nvml = FakeNvml([uuid(0), uuid(1)], migs={1: ["MIG-x", None, "MIG-y"]})
    assert dd._probe_nvml(load=lambda name: nvml) == [
        PhysicalGpu(0, uuid(0)),
        PhysicalGpu(1, uuid(1)),
        PhysicalGpu(1, "MIG-x"),
        PhysicalGpu(1, "MIG-y"),
    ]
    assert nvml.shutdowns == 1


def test_nvml_probe_gives_up_when_init_fails() -> None:
    nvml = FakeNvml([uuid(0)], migs={}, init=9)  # NVML_ERROR_DRIVER_NOT_LOADED
    assert dd._probe_nvml(load=lambda name: nvml) is None
    assert nvml.shutdowns == 0


def test_nvml_probe_gives_up_without_the_library() -> None:
    def missing(name: str) -> Any:
        raise OSError(f"{name}: cannot open shared object file")

    assert dd._probe_nvml(load=missing) is None


SMI_OUTPUT = """\
GPU 0: NVIDIA A100-SXM4-80GB (UUID: GPU-aaaa-0000)
  MIG 3g.40gb     Device  0: (UUID: MIG-bbbb-0000)
  MIG 3g.40gb     Device  1: (UUID: MIG-bbbb-0001)
GPU 1: NVIDIA A100-SXM4-80GB (UUID: GPU-aaaa-0001)
"""


def test_nvidia_smi_listing_is_parsed() -> None:
    assert dd._parse_nvidia_smi(SMI_OUTPUT) == [
        PhysicalGpu(0, "GPU-aaaa-0000"),
        PhysicalGpu(0, "MIG-bbbb-0000"),
        PhysicalGpu(0, "MIG-bbbb-0001"),
        PhysicalGpu(1, "GPU-aaaa-0001"),
    ]


def fake_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str) -> None:
    script = tmp_path / "nvidia-smi"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))


def test_default_probe_falls_back_to_nvidia_smi(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "listing").write_text(SMI_OUTPUT)
    fake_nvidia_smi(tmp_path, monkeypatch, f"exec /bin/cat {tmp_path / 'listing'}")
    monkeypatch.setattr(dd, "_probe_nvml", lambda: None)
    assert [gpu.uuid for gpu in probe_physical_gpus()][::3] == ["GPU-aaaa-0000", "GPU-aaaa-0001"]
    # GPU 0 is in MIG mode: each of its two instances is a device, named by its UUID
    assert resolve_devices() == ["cuda:0", "cuda:1", "cuda:2"]
    assert [dict(p.environ) for p in place_devices()] == [
        {"CUDA_VISIBLE_DEVICES": "MIG-bbbb-0000"},
        {"CUDA_VISIBLE_DEVICES": "MIG-bbbb-0001"},
        {"CUDA_VISIBLE_DEVICES": "1"},
    ]


@pytest.fixture
def no_device_nodes(monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine without NVIDIA device nodes: discovery must not fall back to asking torch."""
    monkeypatch.setattr(dd, "_gpu_device_nodes_exist", lambda: False, raising=False)


@pytest.mark.usefixtures("no_device_nodes")
def test_failing_nvidia_smi_means_no_gpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_nvidia_smi(tmp_path, monkeypatch, "echo 'NVIDIA-SMI has failed' ; exit 9")
    monkeypatch.setattr(dd, "_probe_nvml", lambda: None)
    assert probe_physical_gpus() == []


FAKE_TORCH = """
import json, os
with open(os.environ["FAKE_TORCH_RECORD"], "w") as record:
    json.dump({"cvd": os.environ.get("CUDA_VISIBLE_DEVICES")}, record)

class _Properties:
    def __init__(self, index):
        self.uuid = f"{index}{index}{index}{index}aaaa-bbbb-cccc"

class cuda:
    is_available = staticmethod(lambda: True)
    device_count = staticmethod(lambda: 2)
    get_device_properties = staticmethod(_Properties)
"""


def test_without_nvml_or_nvidia_smi_torch_is_asked_in_a_subprocess(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A container with only the "compute" driver capability: device nodes and libcuda, but no
    # NVML and no nvidia-smi. A torch that sees two GPUs (a fake one here) is asked in a child.
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text(FAKE_TORCH)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setenv("FAKE_TORCH_RECORD", str(tmp_path / "record.json"))
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))  # no nvidia-smi
    monkeypatch.setattr(dd, "_probe_nvml", lambda: None)
    monkeypatch.setattr(dd, "_gpu_device_nodes_exist", lambda: True)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", uuid(1))
    assert probe_physical_gpus() == [PhysicalGpu(0, uuid(0)), PhysicalGpu(1, uuid(1))]
    # the child listed every GPU (the mask applies afterwards, here), so the mask selects one
    assert json.loads((tmp_path / "record.json").read_text()) == {"cvd": None}
    assert [dict(p.environ) for p in place_devices()] == [{"CUDA_VISIBLE_DEVICES": uuid(1)}]


def test_hanging_nvidia_smi_is_killed_after_the_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_nvidia_smi(tmp_path, monkeypatch, "exec /bin/sleep 30")
    started = time.monotonic()
    assert dd._probe_nvidia_smi(timeout=0.3) is None
    assert time.monotonic() - started < 10
    assert leftover_children() == []


@pytest.mark.usefixtures("no_device_nodes")
def test_no_driver_at_all_means_no_gpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(dd, "_probe_nvml", lambda: None)
    assert probe_physical_gpus() == []
    assert resolve_devices() == ["cpu"]


def test_real_probe_answers_on_this_machine() -> None:
    gpus = probe_physical_gpus()
    assert all(isinstance(gpu, PhysicalGpu) for gpu in gpus)
