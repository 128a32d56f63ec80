"""Large buffers (numpy arrays, torch CPU tensors) travel through /dev/shm, not the pipe.

Pickle protocol 5 hands us every contiguous array buffer separately (``buffer_callback``).
A buffer of at least ``THRESHOLD`` bytes is copied once into a shared-memory *segment* and
only the segment's name crosses the pipe; the receiver maps the segment and unpickles the
array *on top of the mapping*: no copy on the receiving side.

Segments are reused, never re-created per message: allocating fresh tmpfs pages costs far more
than copying into pages that already exist (0.4 GB/s against 10+ GB/s here, see
benchmarks/NOTES.md). The sender keeps a pool; the receiver maps a segment once per message and
notices (a ``weakref.finalize`` on that mapping) when the last array using it is gone; it then
names the segment in the header of its next message, and the sender puts it back in its pool.

Nothing leaks (every name is ``psm-<parent pid>-<sender tag>-<n>``):

- the sender unlinks its whole pool when it closes; a receiver's mapping outlives the unlink;
- the parent unlinks a dead worker's prefix, and its own prefix at shutdown;
- when the parent dies, each worker's watchdog unlinks the parent's prefix before exiting;
- and because a worker stuck in native code cannot run its watchdog, every segment in
  /dev/shm is also registered with multiprocessing's resource tracker, a separate process
  that unlinks whatever is still registered once the parent and all workers are gone;
- a pool starting on the machine sweeps segments whose parent process no longer exists
  (``backends.orphans``).

``fallocate`` reserves pages up front: on a full /dev/shm (small in many containers) it fails
cleanly, where ``ftruncate`` alone would crash the writer with SIGBUS later. The buffer then
goes in-band through the pipe, with a one-time warning.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import logging
import mmap
import os
import pickle
import sys
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .host_copy import tensor_pickler

logger = logging.getLogger("py_stateful_map")

#: Buffers at least this large go through shared memory; smaller ones are cheaper in-band.
THRESHOLD = 256 * 1024
#: Bytes of free segments a sender always may keep for reuse (more while more is in use).
REUSE_FLOOR = 64 * 1024 * 1024
#: Where segments live; ``PY_STATEFUL_MAP_SHM_DIR`` points elsewhere (e.g. a larger tmpfs
#: when a container's /dev/shm is tiny). Workers inherit it with the environment.
SHM_DIR = Path(os.environ.get("PY_STATEFUL_MAP_SHM_DIR", "/dev/shm"))
_PROTOCOL = 5

#: (segment name, byte length) of each out-of-band buffer, in pickle's buffer order.
Descriptor = tuple[str, int]


def available() -> bool:
    """Whether this platform has a writable /dev/shm (Linux)."""
    return sys.platform.startswith("linux") and os.access(SHM_DIR, os.W_OK)


def prefix_for(parent_pid: int) -> str:
    return f"psm-{parent_pid}-"


@dataclass(eq=False)
class _Segment:
    name: str
    capacity: int
    mapping: mmap.mmap


class SegmentPool:
    """The sending side: pickles objects, moving large buffers into reusable segments."""

    def __init__(self, prefix: str, *, loud: bool = True) -> None:
        self.prefix = prefix
        self._loud = loud
        self._counter = itertools.count()
        self._free: list[_Segment] = []
        self._lent: dict[str, _Segment] = {}
        self._warned = False
        self._subscribers: list[list[str]] = []  # each receiver's names unlinked since

    def dumps(self, obj: Any) -> tuple[bytes, list[Descriptor]]:
        """Pickle ``obj``; large buffers go to segments listed in the returned descriptors."""
        descriptors: list[Descriptor] = []

        def place(buffer: pickle.PickleBuffer) -> bool:
            view = buffer.raw()
            if view.nbytes < THRESHOLD:
                return True  # in-band
            segment = self._segment_for(view.nbytes)
            if segment is None:
                return True
            # Lent before the copy: a Ctrl-C during a 4 MB copy must not strand the segment
            # outside both lists (``close`` would then miss it).
            self._lent[segment.name] = segment
            descriptors.append((segment.name, view.nbytes))
            segment.mapping[: view.nbytes] = view
            return False

        stream = io.BytesIO()
        try:
            out_of_band_pickler(stream, place).dump(obj)
        except BaseException:
            self.give_back(name for name, _ in descriptors)
            raise
        return stream.getvalue(), descriptors

    def give_back(self, names: Any) -> None:
        """The receiver no longer uses these segments: keep some for reuse, unlink the rest.

        The reuse cache is bounded by what is in use now (twice it, at least
        ``REUSE_FLOOR`` bytes): a caller that held every result of a map, then dropped them,
        gets that memory back instead of leaving it parked in /dev/shm for the pool's life.
        """
        for name in names:
            segment = self._lent.pop(name, None)
            if segment is not None:
                self._free.append(segment)
        in_use = sum(segment.capacity for segment in self._lent.values())
        budget = max(REUSE_FLOOR, 2 * in_use)
        self._free.sort(key=lambda segment: segment.capacity)
        kept = 0
        for segment in list(self._free):
            if kept + segment.capacity <= budget:
                kept += segment.capacity
                continue
            self._free.remove(segment)
            self._unlink(segment)

    def subscribe(self) -> list[str]:
        """A list that every unlinked segment's name is appended to, for one receiver.

        A pool shared by several channels (the parent's, for inputs) must tell each receiver,
        since any of them may map any segment.
        """
        names: list[str] = []
        self._subscribers.append(names)
        return names

    def unsubscribe(self, names: list[str]) -> None:
        with contextlib.suppress(ValueError):
            self._subscribers.remove(names)

    def _unlink(self, segment: _Segment) -> None:
        _remove(SHM_DIR / segment.name)
        with contextlib.suppress(BufferError):  # still exported: freed with its arrays
            segment.mapping.close()
        for names in self._subscribers:
            names.append(segment.name)

    def _segment_for(self, size: int) -> _Segment | None:
        fitting = [s for s in self._free if s.capacity >= size]
        if fitting:
            best = min(fitting, key=lambda s: s.capacity)
            self._free.remove(best)
            return best
        return self._create(1 << (size - 1).bit_length())  # power of two: reusable for more

    def _create(self, capacity: int) -> _Segment | None:
        name = f"{self.prefix}{next(self._counter)}"
        path = SHM_DIR / name
        # Registered before the file exists: a process killed between creating and
        # registering would leave a segment nobody removes until the next pool's sweep.
        _track(name)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        except OSError:
            _untrack(name)
            self._fall_back(f"cannot create files in {SHM_DIR}")
            return None
        try:
            os.posix_fallocate(fd, 0, capacity)
            mapping = mmap.mmap(fd, capacity)
        except OSError as exc:
            _remove(path)
            self._fall_back(f"{SHM_DIR} is full or too small ({exc.strerror})")
            return None
        finally:
            os.close(fd)
        return _Segment(name, capacity, mapping)

    def _fall_back(self, reason: str) -> None:
        if not self._warned:
            self._warned = True
            # Once per pool: workers log at INFO, so N workers do not repeat the warning.
            log = logger.warning if self._loud else logger.info
            log("%s: large arrays go through the pipe instead (slower)", reason)

    def close(self) -> None:
        """Unlink every segment; receivers that still map one keep their data.

        The prefix is swept as well: a KeyboardInterrupt between creating a file and
        recording it (inside ``_create``) leaves a segment that neither list knows.
        """
        for segment in [*self._free, *self._lent.values()]:
            self._unlink(segment)
        self._free.clear()
        self._lent.clear()
        unlink_prefix(self.prefix)


class SegmentReader:
    """The receiving side: maps segments and records which ones the receiver let go of.

    Each segment is mapped once and the mapping kept, so later messages in the same segment
    cost no system call and no page fault. Every message gets its own small view object
    (a numpy ``uint8`` array when numpy is loaded, else a fresh mapping) because the release
    is detected with a ``weakref.finalize`` on that object: it dies with the last array that
    the unpickler built on it.
    """

    def __init__(self) -> None:
        self._released: list[str] = []
        self._mappings: dict[str, mmap.mmap] = {}

    def loads(self, data: bytes | memoryview, descriptors: list[Descriptor]) -> Any:
        buffers = [self._view(name, size) for name, size in descriptors]
        return pickle.loads(data, buffers=buffers)

    def _view(self, name: str, size: int) -> Any:
        numpy = sys.modules.get("numpy")
        if numpy is None:
            view: Any = _map(name, size)  # a fresh mapping is weakref-able itself
        else:
            mapping = self._mappings.get(name)
            if mapping is None or len(mapping) < size:
                mapping = self._mappings[name] = _map(name, 0)
            view = numpy.frombuffer(mapping, dtype=numpy.uint8, count=size)
        weakref.finalize(view, self._release, name)
        return view

    def _release(self, name: str) -> None:
        self._released.append(name)  # runs when the last array on the view is gone

    def forget(self, names: list[str]) -> None:
        """The sender unlinked these segments: drop our mappings (arrays on them keep theirs).

        A mapping of an unlinked file keeps its pages alive; without this, a reader would pin
        every segment it ever saw.
        """
        for name in names:
            self._mappings.pop(name, None)

    def close(self) -> None:
        """Drop every mapping; what live arrays still use is freed with them."""
        self._mappings.clear()

    def take_released(self) -> list[str]:
        """Segments no longer in use since the last call, to name in the next message."""
        released, self._released = self._released, []
        return released


def _map(name: str, size: int) -> mmap.mmap:
    """Map a segment (``size`` 0: all of it)."""
    fd = os.open(SHM_DIR / name, os.O_RDWR)
    try:
        return mmap.mmap(fd, size)
    finally:
        os.close(fd)


def unlink_prefix(prefix: str) -> int:
    """Remove every segment whose name starts with ``prefix``; returns how many."""
    if not SHM_DIR.is_dir():
        return 0
    return sum(_remove(path) for path in SHM_DIR.glob(f"{prefix}*"))


def _tracked() -> bool:
    """Only /dev/shm files are POSIX shared memory the resource tracker can unlink by name."""
    return Path("/dev/shm") == SHM_DIR


def _track(name: str) -> None:
    if _tracked():
        from multiprocessing import resource_tracker

        resource_tracker.register(f"/{name}", "shared_memory")


def _untrack(name: str) -> None:
    if _tracked():
        from multiprocessing import resource_tracker

        resource_tracker.unregister(f"/{name}", "shared_memory")


def _remove(path: Path) -> bool:
    """Unlink a segment this process tree created, and tell the tracker it is gone."""
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    if _tracked():
        from multiprocessing import resource_tracker

        resource_tracker.unregister(f"/{path.name}", "shared_memory")
    return True


def out_of_band_pickler(
    stream: io.BytesIO, place: Callable[[pickle.PickleBuffer], bool]
) -> pickle.Pickler:
    """A protocol-5 pickler that offers every array buffer (torch CPU tensors included) to
    ``place``, which keeps it in-band by returning True."""
    # Tensors: on the CPU, detached, as numpy arrays whose buffers can be placed (wire.host_copy).
    return tensor_pickler(stream, _PROTOCOL, buffer_callback=place)
