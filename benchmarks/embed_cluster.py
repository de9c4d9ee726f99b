"""Benchmark: ClusterDataModule.prepare_data + setup against bare encode + KMeans.

For every size N it runs, each in a fresh process (so peak memory is per configuration):

* ``bare``  -- ``SentenceTransformer.encode`` (normalised) of the same texts, then scikit-learn
  ``KMeans(k-means++, n_init, random_state)`` fitted on the same subsample and ``predict`` on all;
* ``cold``  -- ``ClusterDataModule.prepare_data() + setup()`` with an empty embedding cache (reads
  the JSONL file, hashes, embeds, caches, clusters, builds the datasets, statistics);
* ``warm``  -- the same with the cache filled by ``cold``.

Both sides import their libraries (sentence-transformers, scikit-learn) before the clock starts:
the first runs timed the data module's lazy ``import sentence_transformers`` (~2.5 s here) against
a baseline that had imported it already.

and prints samples/s, peak resident memory, and the ratios: overhead = cold / bare - 1 (goal
<= 5%), warm speed-up = cold / warm (goal >= 50x).

Usage::

    HF_HUB_OFFLINE=1 python benchmarks/embed_cluster.py --sizes 1000 10000 100000
    HF_HUB_OFFLINE=1 python benchmarks/embed_cluster.py --sizes 1000 --num-clusters 8
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TEMPLATES = [
    ("arithmetic", "What is {a} + {b}? Answer with a number.", "{s}"),
    ("translation", "Translate the English sentence '{w} has {a} {x}s' into French.", "{w} a {a}"),
    ("sentiment", "Review: I {v} {t}, it was {a} stars. Positive or negative?", "positive"),
    (
        "code",
        "```python\ndef f(x):\n    return x * {a}\nprint(f({b}))\n```\nWhat does it print?",
        "{p}",
    ),
    ("geography", "Which country has the city of {w}{x}? Answer in one word.", "{w}land"),
    ("chemistry", "Balance the equation: {w}{a} + O{b} -> {w}O{a}.", "2{w}"),
    (
        "summary",
        "Summarize in one line: {t} met {w} on day {a} and talked about {x} for {b} hours.",
        "{t}",
    ),
    ("riddle", "I have {a} legs in the morning and {b} at night; I am a {x}. What am I?", "{x}"),
]
WORDS = ["Anna", "Boris", "Chen", "Dmitri", "Eva", "Farah", "Goro", "Hana", "Ivo", "Jun", "Kofi"]
THINGS = ["apple", "book", "river", "engine", "garden", "castle", "violin", "rocket", "lemon"]
VERBS = ["loved", "hated", "enjoyed", "disliked", "adored", "despised"]
TOPICS = ["the film", "this restaurant", "the phone", "that concert", "the hotel", "the game"]


def make_samples(n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` synthetic samples from 8 task templates with random fillers (mostly unique)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        task, prompt, response = TEMPLATES[i % len(TEMPLATES)]
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        fill = {
            "a": a,
            "b": b,
            "s": a + b,
            "p": a * b,
            "w": rng.choice(WORDS),
            "x": rng.choice(THINGS),
            "v": rng.choice(VERBS),
            "t": rng.choice(TOPICS),
        }
        out.append(
            {"prompt": prompt.format(**fill), "response": response.format(**fill), "task": task}
        )
    return out


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_bare(data: Path, k: int, batch_size: int, n_init: int) -> dict[str, Any]:
    import numpy as np
    from sentence_transformers import SentenceTransformer
    from sklearn.cluster import KMeans

    from tclora.clustering import default_encoder_path

    texts = [json.loads(line)["prompt"] for line in data.read_text().splitlines()]
    start = time.perf_counter()
    model = SentenceTransformer(default_encoder_path(), device="cpu")
    emb = model.encode(
        texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True
    )
    fit_size = min(len(texts), max(-(-len(texts) // 5), 1000))
    idx = np.sort(np.random.default_rng(42).choice(len(texts), fit_size, replace=False))
    km = KMeans(k, init="k-means++", n_init=n_init, random_state=42).fit(emb[idx])
    km.predict(emb)
    return {"seconds": time.perf_counter() - start, "peak_mib": _peak_mib()}


def run_module(data: Path, cache: Path, k: int, batch_size: int, n_init: int) -> dict[str, Any]:
    import sentence_transformers  # noqa: F401  -- imported before the clock, as in run_bare
    import sklearn.cluster  # noqa: F401
    from transformers import AutoTokenizer

    from tclora.assets import ensure_model
    from tclora.datamodules import ClusterDataModule

    tokenizer = AutoTokenizer.from_pretrained(ensure_model())  # loaded by the trainer's model too
    start = time.perf_counter()
    dm = ClusterDataModule(
        [str(data)],
        tokenizer=tokenizer,
        num_clusters=k,
        val_fraction=0.0,
        cache_dir=str(cache),
        embed_batch_size=batch_size,
        n_init=n_init,
        progress_bar=False,
        encoder_device="cpu",
    )
    dm.prepare_data()
    dm.setup("fit")
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "peak_mib": _peak_mib(),
        "ari": dm.statistics["adjusted_rand_index"],
        "truncated": dm.num_truncated,
    }


def _child(args: argparse.Namespace) -> None:
    data, cache = Path(args.data), Path(args.cache)
    if args.child == "bare":
        result = run_bare(data, args.num_clusters, args.batch_size, args.n_init)
    else:
        result = run_module(data, cache, args.num_clusters, args.batch_size, args.n_init)
    print("RESULT " + json.dumps(result))


def _spawn(kind: str, data: Path, cache: Path, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        kind,
        "--data",
        str(data),
        "--cache",
        str(cache),
        "--num-clusters",
        str(args.num_clusters),
        "--batch-size",
        str(args.batch_size),
        "--n-init",
        str(args.n_init),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{kind} run failed:\n{proc.stderr[-3000:]}")
    return dict(json.loads(lines[-1][len("RESULT ") :]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--num-clusters", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64, help="encoder batch size")
    parser.add_argument("--n-init", type=int, default=10)
    parser.add_argument(
        "--repeats", type=int, default=1, help="interleaved repeats; the fastest run is reported"
    )
    parser.add_argument("--child", choices=["bare", "module"], help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return
    import torch

    print(f"torch threads {torch.get_num_threads()}, cpu count {os.cpu_count()}")
    rows = []
    for n in args.sizes:
        with tempfile.TemporaryDirectory(prefix="tclora-bench-") as tmp:
            data = Path(tmp) / "data.jsonl"
            data.write_text("".join(json.dumps(s) + "\n" for s in make_samples(n)))
            bares, colds, warms = [], [], []
            for repeat in range(args.repeats):  # interleaved; the fastest of each is kept
                cache = Path(tmp) / f"cache{repeat}"
                bares.append(_spawn("bare", data, cache, args))
                colds.append(_spawn("module", data, cache, args))
                warms.append(_spawn("module", data, cache, args))
            bare, cold, warm = (
                min(runs, key=lambda r: r["seconds"]) for runs in (bares, colds, warms)
            )
        rows.append((n, bare, cold, warm))
        print(
            f"N={n}: bare {bare['seconds']:.1f}s cold {cold['seconds']:.1f}s "
            f"warm {warm['seconds']:.2f}s",
            flush=True,
        )
    header = (
        f"{'N':>7} | {'bare s/s':>9} {'MiB':>6} | {'cold s/s':>9} {'MiB':>6} | "
        f"{'warm s/s':>9} {'MiB':>6} | {'overhead':>8} | {'warm x':>7} | {'ARI':>5}"
    )
    print("\n" + header)
    print("-" * len(header))
    for n, bare, cold, warm in rows:
        print(
            f"{n:>7} | {n / bare['seconds']:>9.0f} {bare['peak_mib']:>6.0f} | "
            f"{n / cold['seconds']:>9.0f} {cold['peak_mib']:>6.0f} | "
            f"{n / warm['seconds']:>9.0f} {warm['peak_mib']:>6.0f} | "
            f"{cold['seconds'] / bare['seconds'] - 1:>+8.1%} | "
            f"{cold['seconds'] / warm['seconds']:>6.0f}x | {cold['ari']:>5.2f}"
        )
    print(
        f"\nfastest of {args.repeats} interleaved run(s) per cell. "
        "samples/s = N / wall seconds of the whole step (model loading included); "
        "overhead = cold / bare - 1 (goal <= +5%); warm x = cold / warm (goal >= 50x)."
    )


if __name__ == "__main__":
    main()
