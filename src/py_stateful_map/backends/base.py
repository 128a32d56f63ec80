"""The interface between the scheduler and whatever runs the workers."""

from __future__ import annotations

from typing import Protocol

from py_stateful_map.wire.messages import FromWorker, ToWorker

from .chunk_policy import ChunkPolicy

#: (worker index, message) — every fact the scheduler learns arrives in this shape.
Event = tuple[int, FromWorker]


class Backend(Protocol):
    """Start workers, send them messages, and report what they say and when they end.

    ``wait`` is the only place the parent blocks: it returns as soon as any worker has
    something to say *or has died*, so a dead worker can never leave the parent waiting.
    """

    #: Whether a worker can send a chunk's results again item by item (``ResendItemwise``);
    #: otherwise results the parent cannot unpickle are re-run item by item.
    resends_itemwise: bool
    #: Whether a worker's answer to a chunk is always delivered before it reads the next one,
    #: so that at its death the oldest chunk in hand is the one that was running.
    answers_in_order: bool
    #: How much work one chunk should carry, given what a message costs here.
    chunk_policy: ChunkPolicy

    def start_worker(self, index: int) -> None:
        """Start (or restart) worker ``index``; it answers with Ready or InitFailed."""

    def send(self, index: int, message: ToWorker) -> int:
        """Hand a message to a worker; returns the payload's size in bytes (0 if not pickled).

        Raises ``SerializationError`` if the payload cannot be pickled.
        """

    def wait(self, timeout: float | None) -> list[Event]:
        """Block until at least one event or until ``timeout`` seconds pass."""

    def wake(self) -> None:
        """Make a ``wait`` blocked in another thread return soon (thread-safe).

        ``close()`` from another thread uses it, so the consumer of a map notices promptly.
        """

    def kill(self, index: int) -> None:
        """End worker ``index`` now; its ``WorkerExited`` event follows from ``wait``.

        Only the backends the pool lists as able to kill (processes, Ray) are ever asked.
        """

    def retire(self, index: int) -> None:
        """Let worker ``index`` exit once idle and forget it, so a fresh one can take its slot."""

    def exiting(self, index: int) -> bool:
        """Whether the retired worker of slot ``index`` is still exiting.

        Its successor starts only afterwards, so the two never hold one GPU's memory at once;
        ``wait`` returns when it has exited.
        """

    def pid(self, index: int) -> int | None:
        """The worker's process id (the parent's for threads)."""

    def shutdown(self, grace: float | None, *, cancel: bool) -> None:
        """Stop every worker: ask politely, wait up to ``grace`` seconds, then force.

        With ``cancel`` the workers may be busy with work nobody will read; backends that
        can kill do so right after the grace period.
        """
