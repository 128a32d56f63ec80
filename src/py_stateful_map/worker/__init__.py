"""The worker side: everything a worker process, worker thread or Ray actor runs.

Build state once, then receive a chunk, run it, send the answers, until told to stop. Nothing
here imports the parent side (``core``, ``checkpoint``, ``devices``, ``pool``,
``device_pool``); the contract is checked by ``lint-imports`` (see ``pyproject.toml``).
"""
