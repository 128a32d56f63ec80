"""Find the CUDA devices this process may use, without initializing CUDA.

Why not ``torch.cuda.device_count()``: it calls ``cuInit`` in the parent, after
which a forked child can no longer use CUDA, and it imports torch (seconds,
hundreds of MB) into a parent that may never touch a GPU. NVML and
``nvidia-smi`` answer the same question without a CUDA context.

Data flow::

    probe (NVML -> nvidia-smi -L -> torch in a subprocess -> none)
            |                    physical GPUs and MIG instances, ignoring CUDA_VISIBLE_DEVICES
            |
    CUDA_VISIBLE_DEVICES (parsed as the CUDA driver parses it)
            |
    visible_gpus()      [VisibleGpu(ordinal=0, token="2"), ...]  what "cuda:<n>" means here
            |
    place_devices(request)  [DevicePlacement(device, worker_device, environ), ...]
    resolve_devices(request) ["cuda:0", "cuda:1"] or ["cpu"]
            |
    _device_groups.place_groups(request, gpus_per_worker)   several GPUs per worker

A process worker for ``cuda:3`` runs with ``CUDA_VISIBLE_DEVICES`` set to the one
token that names that GPU, so it sees exactly one device, ``cuda:0``. A GPU in MIG mode
cannot run CUDA work as a whole; each of its MIG instances is a device of its own, named
by its ``MIG-...`` UUID (CUDA shows one process at most one instance, and every worker is
a process of its own).
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeAlias

from py_stateful_map._cuda_state import cuda_initialized_in_this_process

__all__ = [
    "DevicePlacement",
    "DeviceProbe",
    "PhysicalGpu",
    "VisibleGpu",
    "cuda_initialized_in_this_process",
    "ensure_fork_is_safe",
    "place_devices",
    "placement_for",
    "probe_physical_gpus",
    "resolve_devices",
    "visible_gpus",
]

_log = logging.getLogger(__name__)

CPU = "cpu"
_CVD = "CUDA_VISIBLE_DEVICES"
# "-1" rather than "": CUDA reads both as "no device", but code that tests the
# variable for truthiness (`os.environ.get(...) or default`) reads "" as unset.
_NO_GPU = "-1"
_NVIDIA_SMI_TIMEOUT_S = 10.0
#: Importing torch takes seconds on a cold disk; it only runs where GPU device nodes exist.
_TORCH_PROBE_TIMEOUT_S = 120.0
_NVML_SUCCESS = 0
_NVML_UUID_BUFFER_SIZE = 96  # NVML_DEVICE_UUID_V2_BUFFER_SIZE
_CUDA_NAME = re.compile(r"cuda(?::(\d+))?")
_LEADING_INT = re.compile(r"[+-]?\d+")  # CUDA reads each entry like strtoul: "1gpu" is 1
_SMI_GPU = re.compile(r"^GPU (\d+):(?:.*\(UUID: (GPU-[^)\s]+)\))?")
_SMI_MIG = re.compile(r"^\s+MIG\b.*\(UUID: (MIG-[^)\s]+)\)")


# ---------------------------------------------------------------- data types


@dataclass(frozen=True, slots=True)
class PhysicalGpu:
    """One device as the driver reports it, before ``CUDA_VISIBLE_DEVICES`` applies.

    ``index`` is the driver's (NVML) index; a MIG instance carries its parent GPU's
    index. ``uuid`` is ``"GPU-..."`` for a whole GPU, ``"MIG-..."`` for a MIG
    instance, or ``""`` when the probe could not read it.
    """

    index: int
    uuid: str = ""

    @property
    def is_mig(self) -> bool:
        """Whether this is a MIG instance rather than a whole GPU."""
        return self.uuid.startswith("MIG-")


class DeviceProbe(Protocol):
    """Lists the physical GPUs; injectable so tests can pretend to have 2 or 4.

    Example: ``resolve_devices("auto", probe=lambda: [PhysicalGpu(0, "GPU-a")])``.
    """

    def __call__(self) -> Sequence[PhysicalGpu]:
        """Return every GPU (and MIG instance) the driver knows, in driver order."""
        ...


@dataclass(frozen=True, slots=True)
class VisibleGpu:
    """A GPU as this process names it.

    ``token`` is the ``CUDA_VISIBLE_DEVICES`` value that shows a child exactly this
    GPU: the parent's own entry verbatim (an index or a full UUID). An index is
    read under ``CUDA_DEVICE_ORDER``, which the child inherits, so parent and
    child agree on which GPU it is; translating indices to UUIDs through NVML
    would be wrong, since CUDA's default order (fastest first) is not NVML's.
    """

    ordinal: int
    token: str

    @property
    def device(self) -> str:
        """The device string in this process, e.g. ``"cuda:1"``."""
        return f"cuda:{self.ordinal}"


@dataclass(frozen=True, slots=True)
class DevicePlacement:
    """Where one worker runs, and how a worker process is made to see only that.

    - ``device``: the device as the parent names it (``"cuda:3"``); what a thread
      or inline worker receives, and what error messages should name.
    - ``worker_device``: what a *process* worker's constructor receives
      (``"cuda:0"``: with ``environ`` applied it sees one GPU).
    - ``environ``: set in the worker process before any user import: pass it as
      the child's environment at creation, or apply it first thing in the worker
      entry point (a forkserver child inherits the server's environment, not the
      parent's current one).

    A ``"cpu"`` worker gets ``CUDA_VISIBLE_DEVICES=-1``: "cpu" should mean no GPU,
    and otherwise a library that checks ``torch.cuda.is_available()`` would quietly
    open a context (hundreds of MB) on GPU 0, competing with the GPU workers.
    """

    device: str
    worker_device: str
    environ: Mapping[str, str] = field(hash=False)


#: ``"auto"``, ``"cpu"``, N, ``["cuda:0", 1]``, or groups of GPUs ``[[0, 1], [2, 3]]`` (one per
#: worker, for ``DevicePool``; see ``devices.groups``).
DeviceRequest: TypeAlias = str | int | Sequence[str | int] | Sequence[Sequence[str | int]]


# -------------------------------------------------------- public entry points


def resolve_devices(
    devices: DeviceRequest = "auto", *, probe: DeviceProbe | None = None
) -> list[str]:
    """Normalize a device request to device strings, checked against what exists.

    ``"auto"``: every CUDA device this process may see, else ``["cpu"]``.
    ``"cpu"``: ``["cpu"]``. An int N: the first N GPUs. A list such as
    ``["cuda:0", 1, "cpu"]`` becomes ``["cuda:0", "cuda:1", "cpu"]``; a repeated
    entry is kept (one more worker on that device). Never initializes CUDA.

    >>> resolve_devices([0, "cuda:1"], probe=lambda: [PhysicalGpu(0), PhysicalGpu(1)])
    ['cuda:0', 'cuda:1']

    Raises ``ValueError`` naming the devices that exist when a GPU is asked for
    that this process cannot see, ``TypeError`` for a request of the wrong type.
    """
    return [placement.device for placement in place_devices(devices, probe=probe)]


def place_devices(
    devices: DeviceRequest = "auto", *, probe: DeviceProbe | None = None
) -> list[DevicePlacement]:
    """Resolve a request like :func:`resolve_devices`, with one probe, to placements."""
    if isinstance(devices, str) and devices.strip().lower() == CPU:
        return [_cpu_placement()]
    gpus = visible_gpus(probe=probe)
    if devices == "auto":
        return [placement_for(gpu.device, gpus) for gpu in gpus] or [_cpu_placement()]
    return [placement_for(name, gpus) for name in _requested_names(devices, gpus)]


def placement_for(device: str, gpus: Sequence[VisibleGpu]) -> DevicePlacement:
    """The placement of a worker on ``device`` ("cpu" or "cuda:<n>") given ``gpus``."""
    name = _normalize(device)
    if name == CPU:
        return _cpu_placement()
    ordinal = int(name.partition(":")[2])
    if ordinal >= len(gpus):
        raise ValueError(f"{name} does not exist: {_describe(gpus)}")
    environ = {_CVD: gpus[ordinal].token}
    order = os.environ.get("CUDA_DEVICE_ORDER")
    if order is not None:
        environ["CUDA_DEVICE_ORDER"] = order  # index tokens mean the parent's order
    return DevicePlacement(device=name, worker_device="cuda:0", environ=environ)


def visible_gpus(*, probe: DeviceProbe | None = None) -> list[VisibleGpu]:
    """The GPUs this process may use, in the order it numbers them.

    MIG instances listed in ``CUDA_VISIBLE_DEVICES`` each count as one device:
    CUDA shows a single process only the first of them, but every worker is its
    own process and gets exactly one, so a pool can use them all.
    """
    physical = list((probe or probe_physical_gpus)())
    tokens = _select_visible(os.environ.get(_CVD), physical)
    return [VisibleGpu(ordinal, token) for ordinal, token in enumerate(tokens)]


def ensure_fork_is_safe(start_method: str) -> None:
    """Refuse ``fork`` after CUDA is initialized: the children would fail on first use.

    Called before every fork, restarts and recycled workers included: CUDA may have been
    initialized in the parent after the pool started.
    """
    if start_method == "fork" and cuda_initialized_in_this_process():
        raise RuntimeError(
            "cannot use start_method='fork': CUDA is already initialized in this process "
            "(torch.cuda.is_available() or device_count() is enough to initialize the driver), "
            "and a forked child cannot use it (it fails with 'Cannot re-initialize CUDA in "
            "forked subprocess' or 'CUDA error: initialization error'). Use "
            "start_method='spawn' or 'forkserver', or create the pool before anything "
            "touches CUDA."
        )


# ------------------------------------------------------------------- probing


def probe_physical_gpus() -> list[PhysicalGpu]:
    """The default probe: NVML through ctypes, else ``nvidia-smi -L``, else torch, else none.

    A container given only the ``compute`` driver capability has the GPUs' device nodes and
    libcuda but neither NVML nor ``nvidia-smi``; rather than silently choosing the CPU there,
    torch is asked in a subprocess (never here: that would initialize CUDA in the parent).
    """
    gpus = _probe_nvml()
    if gpus is None:
        gpus = _probe_nvidia_smi()
    if gpus is None and _gpu_device_nodes_exist():
        gpus = _probe_torch_in_subprocess()
        if not gpus:
            _log.warning(
                "this machine has NVIDIA device nodes but neither NVML, nvidia-smi nor torch "
                "could list its GPUs; using the CPU (pass devices=[0, 1, ...] to insist)"
            )
    return gpus or []


def _probe_nvml(load: Callable[[str], Any] = ctypes.CDLL) -> list[PhysicalGpu] | None:
    """GPUs from NVML, or None when NVML is missing or fails (then try nvidia-smi)."""
    try:
        lib = load("libnvidia-ml.so.1")
        if lib.nvmlInit_v2() != _NVML_SUCCESS:
            return None
    except (OSError, AttributeError):
        return None
    try:
        return _nvml_gpus(lib)
    except (OSError, AttributeError) as exc:
        _log.debug("NVML could not list GPUs: %s", exc)
        return None
    finally:
        lib.nvmlShutdown()


def _nvml_gpus(lib: Any) -> list[PhysicalGpu] | None:
    count = ctypes.c_uint(0)
    if lib.nvmlDeviceGetCount_v2(ctypes.byref(count)) != _NVML_SUCCESS:
        return None
    gpus: list[PhysicalGpu] = []
    for index in range(count.value):
        handle = ctypes.c_void_p()
        if lib.nvmlDeviceGetHandleByIndex_v2(ctypes.c_uint(index), ctypes.byref(handle)):
            return None
        gpus.append(PhysicalGpu(index, _nvml_uuid(lib, handle)))
        gpus.extend(PhysicalGpu(index, uuid) for uuid in _nvml_mig_uuids(lib, handle))
    return gpus


def _nvml_uuid(lib: Any, handle: ctypes.c_void_p) -> str:
    buffer = ctypes.create_string_buffer(_NVML_UUID_BUFFER_SIZE)
    if lib.nvmlDeviceGetUUID(handle, buffer, ctypes.c_uint(_NVML_UUID_BUFFER_SIZE)):
        return ""
    return buffer.value.decode("ascii", errors="replace")


def _nvml_mig_uuids(lib: Any, handle: ctypes.c_void_p) -> list[str]:
    """UUIDs of the MIG instances on one GPU; best effort, none when MIG is off."""
    slots = ctypes.c_uint(0)
    if lib.nvmlDeviceGetMaxMigDeviceCount(handle, ctypes.byref(slots)):
        return []  # not MIG-capable
    uuids = []
    for slot in range(slots.value):
        mig = ctypes.c_void_p()
        if lib.nvmlDeviceGetMigDeviceHandleByIndex(handle, ctypes.c_uint(slot), ctypes.byref(mig)):
            continue  # empty slot, or MIG disabled
        uuid = _nvml_uuid(lib, mig)
        if uuid:
            uuids.append(uuid)
    return uuids


def _probe_nvidia_smi(timeout: float = _NVIDIA_SMI_TIMEOUT_S) -> list[PhysicalGpu] | None:
    """GPUs from ``nvidia-smi -L``, run with a timeout: a wedged driver must not hang us."""
    executable = shutil.which("nvidia-smi")
    if executable is None:
        return None
    try:
        done = subprocess.run(
            [executable, "-L"], capture_output=True, text=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.SubprocessError) as exc:
        _log.debug("nvidia-smi -L failed: %s", exc)
        return None
    return _parse_nvidia_smi(done.stdout) if done.returncode == 0 else None


#: Run in a subprocess: the GPUs CUDA shows with no CUDA_VISIBLE_DEVICES, as whole-GPU UUIDs.
_TORCH_PROBE = """
import json, torch
count = torch.cuda.device_count() if torch.cuda.is_available() else 0
print(json.dumps([str(torch.cuda.get_device_properties(i).uuid) for i in range(count)]))
"""


def _gpu_device_nodes_exist(dev: Path = Path("/dev")) -> bool:
    return any(dev.glob("nvidia[0-9]*"))


def _probe_torch_in_subprocess(
    timeout: float = _TORCH_PROBE_TIMEOUT_S,
) -> list[PhysicalGpu] | None:
    """GPUs as torch sees them, asked in a child process so this one never runs ``cuInit``.

    The child runs without ``CUDA_VISIBLE_DEVICES`` (like the other probes, it lists every GPU;
    the variable is applied afterwards) and with the parent's ``CUDA_DEVICE_ORDER``, so its
    indices are this process's. MIG instances cannot be listed this way.
    """
    if importlib.util.find_spec("torch") is None:
        return None
    env = {name: value for name, value in os.environ.items() if name != "CUDA_VISIBLE_DEVICES"}
    try:
        done = subprocess.run(
            [sys.executable, "-c", _TORCH_PROBE],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            check=False,
        )
        uuids = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else None
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
        _log.debug("asking torch for GPUs failed: %s", exc)
        return None
    if not isinstance(uuids, list):
        return None
    return [PhysicalGpu(index, _gpu_uuid(str(uuid))) for index, uuid in enumerate(uuids)]


def _gpu_uuid(text: str) -> str:
    """torch prints a bare UUID; CUDA_VISIBLE_DEVICES and NVML write it ``GPU-<uuid>``."""
    return text if text.startswith(("GPU-", "MIG-")) or not text else f"GPU-{text}"


def _parse_nvidia_smi(text: str) -> list[PhysicalGpu]:
    """Parse ``GPU 0: <name> (UUID: GPU-...)`` lines and their indented MIG lines."""
    gpus: list[PhysicalGpu] = []
    parent: int | None = None
    for line in text.splitlines():
        if gpu := _SMI_GPU.match(line):
            parent = int(gpu[1])
            gpus.append(PhysicalGpu(parent, gpu[2] or ""))
        elif (mig := _SMI_MIG.match(line)) and parent is not None:
            gpus.append(PhysicalGpu(parent, mig[1]))
    return gpus


# ------------------------------------------------ CUDA_VISIBLE_DEVICES rules


def _select_visible(spec: str | None, physical: Sequence[PhysicalGpu]) -> list[str]:
    """Tokens of the visible GPUs, following the CUDA driver's reading of the variable.

    Unset: every whole GPU. Entries are read left to right; the first entry that
    names no device ends the list (so ``""`` and ``"-1"`` mean none); a repeated
    device hides every device. UUID entries may be unique prefixes. A GPU in MIG
    mode, named or implied, stands for its MIG instances.
    """
    whole_gpus = sum(1 for gpu in physical if not gpu.is_mig)
    if spec is None:
        chosen = [str(ordinal) for ordinal in range(whole_gpus)]
    else:
        entries = [entry.strip() for entry in spec.split(",")]
        if entries[0].startswith(("GPU-", "MIG-")):
            chosen = _select_by_uuid(entries, physical)
        else:
            chosen = _select_by_index(entries, whole_gpus)
    return _expand_mig(chosen, physical)


def _expand_mig(tokens: Sequence[str], physical: Sequence[PhysicalGpu]) -> list[str]:
    """Replace each GPU in MIG mode by its instances' UUIDs; other tokens stay as they are.

    An index token is the NVML index of the GPU: with MIG in play, CUDA's own numbering of
    whole GPUs is not reliable, so the instances are always named by UUID.
    """
    instances: dict[int, list[str]] = {}
    for gpu in physical:
        if gpu.is_mig:
            instances.setdefault(gpu.index, []).append(gpu.uuid)
    if not instances:
        return list(tokens)
    index_of = {gpu.uuid: gpu.index for gpu in physical if gpu.uuid and not gpu.is_mig}
    expanded: list[str] = []
    for token in tokens:
        index = int(token) if token.isdigit() else index_of.get(token)
        expanded.extend(instances.get(index, [token]) if index is not None else [token])
    return expanded


def _select_by_index(entries: Sequence[str], whole_gpus: int) -> list[str]:
    chosen: list[int] = []
    for entry in entries:
        number = _LEADING_INT.match(entry)
        if number is None or not 0 <= int(number[0]) < whole_gpus:
            break
        if int(number[0]) in chosen:
            return []
        chosen.append(int(number[0]))
    return [str(index) for index in chosen]


def _select_by_uuid(entries: Sequence[str], physical: Sequence[PhysicalGpu]) -> list[str]:
    chosen: list[str] = []
    for entry in entries:
        matches = [gpu.uuid for gpu in physical if gpu.uuid and gpu.uuid.startswith(entry)]
        if len(matches) != 1:  # unknown, or an ambiguous prefix
            break
        if matches[0] in chosen:
            return []
        chosen.append(matches[0])
    return chosen


# ----------------------------------------------------------- request parsing


def _requested_names(devices: object, gpus: Sequence[VisibleGpu]) -> list[str]:
    if isinstance(devices, bool):
        raise TypeError(f"devices must be 'auto', 'cpu', an int or a list, not {devices!r}")
    if isinstance(devices, int):
        if devices < 1:
            raise ValueError(f"devices={devices}: ask for at least one GPU, or use 'cpu'")
        if devices > len(gpus):
            raise ValueError(f"devices={devices} asks for more GPUs than exist: {_describe(gpus)}")
        return [gpu.device for gpu in gpus[:devices]]
    if isinstance(devices, str) or _is_torch_device(devices):
        return [_normalize(devices)]
    if isinstance(devices, Sequence):
        if not devices:
            raise ValueError("devices is an empty list: name at least one device")
        return [_normalize(device) for device in devices]
    raise TypeError(f"devices must be 'auto', 'cpu', an int or a list, not {devices!r}")


def _normalize(device: object) -> str:
    """``1`` / ``"1"`` / ``"cuda:1"`` / ``torch.device("cuda:1")`` -> ``"cuda:1"``."""
    if isinstance(device, bool):
        raise TypeError(f"not a device: {device!r}")
    if isinstance(device, int):
        if device < 0:
            raise ValueError(f"not a device: {device} (GPU indices start at 0)")
        return f"cuda:{device}"
    if isinstance(device, (list, tuple)):
        raise TypeError(
            f"not a device: {device!r} (a group of GPUs for one worker is for "
            "DevicePool(devices=[[0, 1], [2, 3]]))"
        )
    if not isinstance(device, str) and not _is_torch_device(device):
        raise TypeError(f"not a device: {device!r} (expected a str or an int)")
    text = str(device).strip().lower()
    if text == CPU:
        return CPU
    if text.isdigit():
        return f"cuda:{int(text)}"
    if name := _CUDA_NAME.fullmatch(text):
        return f"cuda:{int(name[1] or 0)}"
    raise ValueError(f"unknown device {device!r}: expected 'cpu', 'cuda:<n>' or a GPU index")


def _is_torch_device(value: object) -> bool:
    torch = sys.modules.get("torch")  # a torch.device can only exist if torch is imported
    return torch is not None and isinstance(value, torch.device)


def _cpu_placement() -> DevicePlacement:
    return DevicePlacement(device=CPU, worker_device=CPU, environ={_CVD: _NO_GPU})


def _describe(gpus: Sequence[VisibleGpu]) -> str:
    spec = os.environ.get(_CVD)
    where = "" if spec is None else f" (CUDA_VISIBLE_DEVICES={spec!r})"
    if not gpus:
        return f"this process sees no CUDA device{where}; use devices='cpu'"
    names = ", ".join(gpu.device for gpu in gpus)
    return f"this process sees {len(gpus)} CUDA device(s): {names}{where}"
