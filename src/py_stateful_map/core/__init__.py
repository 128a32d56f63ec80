"""The parent side of the pool: one ``map()`` from the caller's input to the caller's results.

Everything here runs in the caller's process and steers workers; nothing here runs inside one.
One item's path, with the module of each step (``pool.map`` builds a ``core.map_run.MapRun``)::

    caller's iterable
      │ read: in the caller's thread, or a bounded feeder thread    core.input_reader
      ▼
    intake: replayed from a checkpoint, or failed upstream          core.intake, checkpoint.run
      │
      ▼
    plan: chunks sized by worker time (backends.chunk_policy)       core.chunking
          or length-aware windows and batches                       core.length_chunks,
      │                                                             core.length_batching
      ▼
    dispatch: a free slot takes the chunk                           core.dispatcher, core.slots
      │ one pipe per worker, pickled in the parent                  backends.processes,
      ▼                                                             backends.pipe_channel, wire
    worker: build state once, then receive → run → send             worker.process_main,
      │                                                             worker.runtime,
      │                                                             worker.batch_runner
      ▼
    accept: one poll over pipes and process sentinels               backends.processes (poll),
      │ completions: one value or error per item                    core.dispatcher (poll)
      ▼
    reorder (ordered maps) and the exception policy                 core.map_run
      │ commit: results written to the checkpoint first             checkpoint.run
      ▼
    hand over: a WorkerResultWrapper per item, or bare values       core.map_run, core.progress

A death is noticed where it happens to be seen — a process sentinel or a closed pipe
(``backends.processes``), a failed actor call (``backends.ray.driver.backend``), a thread that
ended (``backends.threads``) — and is turned into a ``WorkerExited`` event there; only
``core.dispatcher`` decides what it means (split and re-run the chunk, retry or blame the item,
restart the slot), and its words are ``core.fault_reports``. Past-limit tasks and starts are
found by ``core.deadlines``. The map above sees per-item outcomes only, never a death.
"""
