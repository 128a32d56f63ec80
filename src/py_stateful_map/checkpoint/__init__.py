"""Resumable runs: ``map(items, checkpoint=...)`` keeps every result in a file as it arrives.

The public names live in :mod:`py_stateful_map.checkpoint.api`; the file's layout in
``file``, what is stored about items and jobs in ``codec``, one map's use of it in ``run``.
"""

from py_stateful_map.checkpoint.api import (
    Checkpoint,
    CheckpointError,
    CheckpointMismatchError,
    CheckpointRun,
    CheckpointStatus,
    Stored,
    ToRun,
    as_checkpoint,
)

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "CheckpointMismatchError",
    "CheckpointRun",
    "CheckpointStatus",
    "Stored",
    "ToRun",
    "as_checkpoint",
]
