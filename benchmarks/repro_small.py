"""Issue 7 reproduction sweep: clustered LoRA + joint CP merge against per-task, single LoRA and
dense/SVD merges, on SmolLM2-135M-Instruct with MIT-licensed evals-registry tasks.

Every run goes through the real command line (``tclora fit --config configs/repro_small.yaml
--config <run>/overrides.yaml``); this script only

1. writes the fixed, seed-independent splits: per training task a train file (the data module's
   source; it splits train/validation itself) and a *disjoint* test file (never trained on), and
   per unseen task a test file -- all local JSONL under ``<work-dir>/data``;
2. runs 3 seeds x {k-means K=4, K=8, one adapter per task, one LoRA on everything}, skipping runs
   whose ``merge/results.json`` exists (resumable); the one-LoRA run has a single adapter, which
   ``CPMergeCallback`` refuses to merge, so that run trains without the callback and is evaluated
   here, from its exported adapter, with the same :func:`tclora.evaluation.evaluate` settings;
3. aggregates every run into ``<results-dir>/repro_small.{csv,md,json}`` (mean +- std over seeds)
   and prints the table.

Usage::

    .venv/bin/python benchmarks/repro_small.py                 # the sweep (see the config header)
    .venv/bin/python benchmarks/repro_small.py --quick         # harness smoke run, tiny sizes
    .venv/bin/python benchmarks/repro_small.py --aggregate-only
    .venv/bin/python benchmarks/make_figures.py                # results figure
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
BASE_CONFIG = ROOT / "configs" / "repro_small.yaml"

# Training tasks: MIT-licensed registry tasks of different formats (0/1 headline labels, true/false
# logic, A/B science QA, Y/N lexicon decisions, Yes/No string and regex judgements, board states,
# poker winners, food words, date formatting and binary arithmetic as short answers). All have
# enough items for 200 test + 64 training items and short prompts (cheap to score on CPU).
TRAIN_TASKS = (
    "sarcasm",
    "formal_logic",
    "quartz",
    "bulgarian-lexicon",
    "polish-lexicon",
    "naughty_strings",
    "regex-match",
    "connect4",
    "poker_analysis",
    "food",
    "imperial_date_to_string",
    "positive-binary-operations",
)
# Unseen tasks (never in training or clustering): 4 multiple choice, 2 short answer.
OOD_TASKS = (
    "belarusian_lexicon",
    "syllables_long_words",
    "rectangles",
    "which_is_heavier",
    "logical_counting",
    "recurrence-relation",
)
SPLIT_SEED = 1234  # the train/test split is fixed across run seeds
MERGE_METHODS = (
    "cp4_sum_components",
    "cp4_mean_loading",
    "cp4_ties_loading",
    "cp16_sum_components",
    "cp16_mean_loading",
    "cp16_ties_loading",
    "uniform",
    "ties",
    "knots_ties",
    "tsv",
    "iso_c",
)


@dataclass
class Sweep:
    """What the sweep runs; ``quick()`` is the smoke-run version."""

    work_dir: Path = ROOT / "runs" / "repro_small"
    results_dir: Path = ROOT / "benchmarks" / "results"
    train_tasks: tuple[str, ...] = TRAIN_TASKS
    ood_tasks: tuple[str, ...] = OOD_TASKS
    train_items: int = 64
    test_items: int = 200
    ood_items: int = 200
    seeds: tuple[int, ...] = (0, 1, 2)
    variants: tuple[str, ...] = ("kmeans4", "kmeans8", "per_task", "single")
    overrides: dict[str, Any] = field(default_factory=dict)  # deep-merged into every run

    @classmethod
    def quick(cls) -> Sweep:
        return cls(
            work_dir=ROOT / "runs" / "repro_small_quick",
            results_dir=ROOT / "runs" / "repro_small_quick" / "results",
            train_tasks=("sarcasm", "naughty_strings", "food", "positive-binary-operations"),
            ood_tasks=("which_is_heavier", "logical_counting"),
            train_items=24,
            test_items=20,
            ood_items=20,
            seeds=(0,),
            variants=("kmeans4", "per_task", "single"),
            overrides={
                "trainer": {"max_epochs": 1, "max_steps": 8},
                "data": {"val_fraction": 0.25},
                "callback": {
                    "cp_ranks": [4, 16],
                    "rules": ["sum_components", "mean_loading"],
                    "baselines": ["uniform", "ties", "knots_ties", "tsv", "iso_c"],
                    "scales": [1.0, 4.0],
                    "max_length": 160,
                },
            },
        )


# ---------------------------------------------------------------------------------------- splits
def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _jsonl(records: Iterable[Mapping[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def _test_record(example: Any) -> dict[str, Any]:
    if example.choices is not None:
        return {
            "prompt": example.prompt,
            "choices": list(example.choices),
            "answer": example.answers[0],
            "task": example.task,
        }
    return {"prompt": example.prompt, "answer": list(example.answers), "task": example.task}


def _dedupe(examples: Sequence[Any]) -> list[Any]:
    """Drop items whose prompt repeats an earlier one (a repeat could leak test into train)."""
    seen: set[str] = set()
    out = []
    for ex in examples:
        key = json.dumps(ex.prompt, sort_keys=True, ensure_ascii=False)
        if key not in seen:
            seen.add(key)
            out.append(ex)
    return out


def majority_floor(train_answers: Sequence[str], test_examples: Sequence[Any]) -> dict[str, Any]:
    """Accuracy of always answering the training split's most frequent answer.

    Args:
        train_answers: Gold answer of every training item.
        test_examples: Test items (``EvalExample``; exact-match items may accept several answers).

    Returns:
        ``{"answer": the majority answer, "accuracy": its accuracy on the test items}``.
    """
    from tclora.evaluation import is_exact_match

    answer = collections.Counter(train_answers).most_common(1)[0][0]
    hits = [
        (ex.answers[0] == answer) if ex.choices is not None else is_exact_match(answer, ex.answers)
        for ex in test_examples
    ]
    return {"answer": answer, "accuracy": sum(hits) / len(hits)}


def prepare_data(sweep: Sweep) -> dict[str, Any]:
    """Write the fixed splits and ``manifest.json``; return the manifest.

    Training task items are deduplicated by prompt and permuted with ``SPLIT_SEED``: the first
    ``test_items`` are the test split, the next ``train_items`` the training file. Unseen tasks
    get a seeded sample of ``ood_items`` (or all of them).
    """
    from tclora.evaluation import load_eval_set

    data = sweep.work_dir / "data"
    manifest_path = data / "manifest.json"
    wanted = {
        "train_tasks": list(sweep.train_tasks),
        "ood_tasks": list(sweep.ood_tasks),
        "train_items": sweep.train_items,
        "test_items": sweep.test_items,
        "ood_items": sweep.ood_items,
        "split_seed": SPLIT_SEED,
    }
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("settings") == wanted:
            return dict(manifest)
        raise SystemExit(
            f"{manifest_path} was written with other split settings ({manifest.get('settings')}); "
            f"use another --work-dir or delete {sweep.work_dir} to start over"
        )
    tasks: dict[str, Any] = {}
    for task in sweep.train_tasks:
        es = load_eval_set(f"registry:{task}")
        items = _dedupe(es.examples)
        need = sweep.test_items + sweep.train_items
        if len(items) < need:
            raise SystemExit(
                f"training task {task!r} has {len(items)} distinct items; the split needs {need} "
                f"(test_items={sweep.test_items} + train_items={sweep.train_items})"
            )
        order = random.Random(f"{SPLIT_SEED}:{task}").sample(range(len(items)), need)
        test = [items[i] for i in order[: sweep.test_items]]
        train = [items[i] for i in order[sweep.test_items :]]
        _atomic_write(data / "test" / f"{task}.jsonl", _jsonl(_test_record(e) for e in test))
        _atomic_write(
            data / "train" / f"{task}.jsonl",
            _jsonl({"prompt": e.prompt, "response": e.answers[0], "task": task} for e in train),
        )
        tasks[task] = {
            "group": "in_domain",
            "kind": es.kind,
            "n_test": len(test),
            "n_train": len(train),
            "chance": 1.0 / len(es.examples[0].choices) if es.kind == "multiple_choice" else 0.0,
            "majority": majority_floor([e.answers[0] for e in train], test),
        }
    for task in sweep.ood_tasks:
        es = load_eval_set(f"registry:{task}")
        items = _dedupe(es.examples)
        n = min(sweep.ood_items, len(items))
        keep = sorted(random.Random(f"{SPLIT_SEED}:{task}").sample(range(len(items)), n))
        _atomic_write(data / "ood" / f"{task}.jsonl", _jsonl(_test_record(items[i]) for i in keep))
        tasks[task] = {
            "group": "out_of_domain",
            "kind": es.kind,
            "n_test": n,
            "chance": 1.0 / len(es.examples[0].choices) if es.kind == "multiple_choice" else 0.0,
        }
    manifest = {"settings": wanted, "tasks": tasks}
    _atomic_write(manifest_path, json.dumps(manifest, indent=1))
    return manifest


# ------------------------------------------------------------------------------------------- runs
def run_dir(sweep: Sweep, variant: str, seed: int) -> Path:
    return sweep.work_dir / "runs" / variant / f"seed{seed}"


def _deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def run_overrides(sweep: Sweep, variant: str, seed: int, evaluate_base: bool) -> dict[str, Any]:
    """The override config of one run (on top of ``configs/repro_small.yaml``)."""
    base = yaml.safe_load(BASE_CONFIG.read_text())
    folder = run_dir(sweep, variant, seed)
    data = sweep.work_dir / "data"
    callback = dict(base["trainer"]["callbacks"][0])
    init = dict(callback["init_args"])
    init["eval_sets"] = [str(data / "test" / f"{t}.jsonl") for t in sweep.train_tasks] + [
        str(data / "ood" / f"{t}.jsonl") for t in sweep.ood_tasks
    ]
    init["output_dir"] = str(folder / "merge")
    init["seed"] = seed
    refs = ["routing"] + (["single"] if variant == "per_task" else [])
    init["references"] = (["base"] if evaluate_base else []) + refs
    init.update(sweep.overrides.get("callback", {}))
    callback["init_args"] = init
    if variant.startswith("kmeans"):
        clustering: dict[str, Any] = {"clustering": "kmeans", "num_clusters": int(variant[6:])}
    else:
        clustering = {"clustering": variant}
    out: dict[str, Any] = {
        "seed_everything": seed,
        "trainer": {
            "default_root_dir": str(folder),
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(folder), "name": "tensorboard", "version": ""},
            },
            # One adapter cannot be merged: the single-LoRA run is evaluated by this script.
            "callbacks": [] if variant == "single" else [callback],
        },
        # Adapter k of seed s starts from seed 1000 s + k: every adapter has its own init.
        "model": {"init_seed": 1000 * seed, "export_dir": str(folder / "adapters")},
        "data": {
            "seed": seed,
            "sources": [
                {"path": str(data / "train" / f"{t}.jsonl"), "task": t} for t in sweep.train_tasks
            ],
            **clustering,
        },
    }
    extra = {k: v for k, v in sweep.overrides.items() if k != "callback"}
    return _deep_merge(out, extra)


def evaluate_single_lora(sweep: Sweep, variant: str, seed: int) -> None:
    """Score the one-LoRA run's exported adapter on every set, as the callback would."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tclora._io import atomic_write_text
    from tclora.assets import resolve_model
    from tclora.evaluation import evaluate, load_eval_set

    folder = run_dir(sweep, variant, seed)
    overrides = run_overrides(sweep, variant, seed, evaluate_base=False)
    base_cfg = yaml.safe_load(BASE_CONFIG.read_text())
    init = {
        **base_cfg["trainer"]["callbacks"][0]["init_args"],
        **sweep.overrides.get("callback", {}),
    }
    adapters = sorted(p for p in (folder / "adapters").iterdir() if p.is_dir())
    if len(adapters) != 1:
        raise SystemExit(f"{folder / 'adapters'}: expected one exported adapter, got {adapters}")
    path = resolve_model(base_cfg["model"]["model"])
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path), adapters[0])
    torch.manual_seed(seed)
    eval_files = [
        str(sweep.work_dir / "data" / grp / f"{t}.jsonl")
        for grp, tasks in (("test", sweep.train_tasks), ("ood", sweep.ood_tasks))
        for t in tasks
    ]
    assert all(Path(f).is_file() for f in eval_files), overrides["trainer"]["default_root_dir"]
    scores = {}
    start = time.perf_counter()
    for source in eval_files:
        es = load_eval_set(source)
        scores[es.name] = evaluate(
            model,
            tokenizer,
            es,
            batch_size=init["batch_size"],
            max_length=init["max_length"],
            max_new_tokens=init["max_new_tokens"],
            chat_template=True,
        )
    summary = {
        "kept": None,
        "eval_sets": list(scores),
        "rows": [{"name": "single_lora", "kind": "reference", "scores": scores}],
        "cp_fit_error": {},
        "adapters": [adapters[0].name],
        # One model scored on every set: the unit of the sweep's evaluation cost.
        "eval_pass_seconds": time.perf_counter() - start,
    }
    atomic_write_text(folder / "merge" / "results.json", json.dumps(summary, indent=1))


def run_one(
    sweep: Sweep, variant: str, seed: int, evaluate_base: bool, threads: int | None = None
) -> float:
    """Fit (and evaluate) one run through the CLI unless its results exist; return seconds."""
    folder = run_dir(sweep, variant, seed)
    if (folder / "merge" / "results.json").is_file():
        print(f"[skip] {variant} seed {seed}: {folder / 'merge' / 'results.json'} exists")
        return 0.0
    folder.mkdir(parents=True, exist_ok=True)
    override = folder / "overrides.yaml"
    _atomic_write(
        override,
        yaml.safe_dump(run_overrides(sweep, variant, seed, evaluate_base), sort_keys=False),
    )
    exe = Path(sys.executable).with_name("tclora")
    command = [str(exe), "fit", "--config", str(BASE_CONFIG), "--config", str(override)]
    print(f"[run ] {variant} seed {seed}: {' '.join(command)}", flush=True)
    start = time.perf_counter()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if threads is not None:  # on a shared machine, OpenMP spin-waits can slow small kernels a lot
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    with open(folder / "fit.log", "w") as log:
        done = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{variant} seed {seed} failed (exit {done.returncode}); see {log.name}")
    if variant == "single":
        evaluate_single_lora(sweep, variant, seed)
    seconds = time.perf_counter() - start
    _atomic_write(folder / "timing.json", json.dumps({"seconds": seconds}))
    print(f"[done] {variant} seed {seed}: {seconds:.0f} s", flush=True)
    return seconds


# -------------------------------------------------------------------------------------- aggregate
def _primary(scores: Mapping[str, float]) -> float:
    for key in ("acc", "exact_match"):
        if key in scores:
            return float(scores[key])
    return math.nan


def _mean(values: Sequence[float]) -> float:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else math.nan


def _std(values: Sequence[float]) -> float:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.stdev(values) if len(values) > 1 else math.nan


def _binomial_se(accs: Mapping[str, float], manifest: Mapping[str, Any]) -> float:
    """One standard error of a mean of per-task accuracies from item sampling alone."""
    if not accs:
        return math.nan
    var = sum(p * (1 - p) / manifest["tasks"][t]["n_test"] for t, p in accs.items())
    return math.sqrt(var) / len(accs)


def adapter_storage(adapter_dir: Path, cp_rank: int) -> dict[str, int]:
    """Parameter counts of the K exported adapters and of their rank-``cp_rank`` CP factors.

    Per adapted weight (d_out x d_in) a LoRA adapter stores r (d_in + d_out) numbers; the joint CP
    model of K adapters stores R (d_in + d_out + K) (factors U, V and task loadings C).
    """
    from safetensors import safe_open

    folders = sorted(p for p in adapter_dir.iterdir() if p.is_dir())
    k = len(folders)
    lora = 0
    cp = 0
    with safe_open(str(folders[0] / "adapter_model.safetensors"), framework="pt") as handle:
        shapes = {key: handle.get_slice(key).get_shape() for key in handle.keys()}
    for key, shape in shapes.items():
        if "lora_A" not in key:
            continue
        r, d_in = shape
        d_out = shapes[key.replace("lora_A", "lora_B")][0]
        lora += r * (d_in + d_out)
        cp += cp_rank * (d_in + d_out + k)
    return {"adapters": k, "lora_params": k * lora, "cp_params": cp}


def train_rate(folder: Path) -> dict[str, float]:
    """Training throughput logged by ``LoRAModule`` (``train/tokens_per_s``) in a run's events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rates: list[float] = []
    for path in sorted((folder / "tensorboard").rglob("events.out.tfevents.*")):
        events = EventAccumulator(str(path), size_guidance={"scalars": 0})
        events.Reload()
        if "train/tokens_per_s" in events.Tags()["scalars"]:
            rates += [e.value for e in events.Scalars("train/tokens_per_s")]
    return {"tokens_per_s": _mean(rates), "logged_steps": len(rates)}


def timings(sweep: Sweep) -> dict[str, Any]:
    """Wall time per run, training throughput and the seconds of one full evaluation pass."""
    out: dict[str, Any] = {}
    for variant in sweep.variants:
        for seed in sweep.seeds:
            folder = run_dir(sweep, variant, seed)
            timing = folder / "timing.json"
            if not timing.is_file():
                continue
            entry = {**json.loads(timing.read_text()), **train_rate(folder)}
            result = folder / "merge" / "results.json"
            if result.is_file():
                data = json.loads(result.read_text())
                if "eval_pass_seconds" in data:
                    entry["eval_pass_seconds"] = data["eval_pass_seconds"]
            out[f"{variant}/seed{seed}"] = entry
    return out


def collect(sweep: Sweep, manifest: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One record per (variant, seed, method) with its per-task scores."""
    records = []
    for variant in sweep.variants:
        for seed in sweep.seeds:
            folder = run_dir(sweep, variant, seed)
            path = folder / "merge" / "results.json"
            if not path.is_file():
                continue
            result = json.loads(path.read_text())
            timing = folder / "timing.json"
            seconds = json.loads(timing.read_text())["seconds"] if timing.is_file() else None
            for row in result["rows"]:
                name = row["name"]
                rank = name[2:].split("_")[0] if name.startswith("cp") else None
                fit = result["cp_fit_error"].get(f"cp{rank}", {}) if rank else {}
                storage = None
                if rank and (folder / "adapters").is_dir():
                    storage = adapter_storage(folder / "adapters", int(rank))
                records.append(
                    {
                        "variant": variant,
                        "seed": seed,
                        "method": "single_lora" if variant == "single" else name,
                        "kind": row["kind"],
                        "scale": row.get("scale"),
                        "merge_seconds": row.get("merge_seconds"),
                        "cp_fit_error": fit.get("mean"),
                        "storage": storage,
                        "run_seconds": seconds,
                        "acc": {
                            t: _primary(s)
                            for t, s in row["scores"].items()
                            if t in manifest["tasks"]
                        },
                    }
                )
    return records


def summarise(records: list[dict[str, Any]], manifest: Mapping[str, Any]) -> dict[str, Any]:
    """Mean +- std over seeds per (variant, method): in-domain, normalised in-domain, unseen."""
    tasks = manifest["tasks"]
    in_domain = [t for t, v in tasks.items() if v["group"] == "in_domain"]
    ood = [t for t, v in tasks.items() if v["group"] == "out_of_domain"]
    # Normaliser: per seed and task, the best single per-task adapter's accuracy on that task.
    best_single: dict[tuple[int, str], float] = {}
    for rec in records:
        if rec["variant"] == "per_task" and rec["method"].startswith("single:"):
            for t in in_domain:
                key = (rec["seed"], t)
                best_single[key] = max(best_single.get(key, -1.0), rec["acc"].get(t, math.nan))
    base = next((r for r in records if r["method"] == "base"), None)
    groups: dict[tuple[str, str], list[dict[str, Any]]] = collections.defaultdict(list)
    for rec in records:
        method = rec["method"]
        if method == "base":
            groups[("base", "base")].append(rec)
        elif method.startswith("single:"):
            groups[(rec["variant"], "single_adapters")].append(rec)
        else:
            groups[(rec["variant"], method)].append(rec)
    rows = []
    for (variant, method), recs in groups.items():
        if method == "single_adapters":
            # Per seed: each task scored by its best single adapter (the upper reference).
            per_seed = collections.defaultdict(dict)
            for rec in recs:
                for t, a in rec["acc"].items():
                    per_seed[rec["seed"]][t] = max(per_seed[rec["seed"]].get(t, -1.0), a)
            accs = [per_seed[s] for s in sorted(per_seed)]
            seeds = sorted(per_seed)
        else:
            accs = [r["acc"] for r in recs]
            seeds = [r["seed"] for r in recs]
        id_means = [_mean([a.get(t, math.nan) for t in in_domain]) for a in accs]
        ood_means = [_mean([a.get(t, math.nan) for t in ood]) for a in accs]
        norm_means = [
            _mean(
                [
                    a.get(t, math.nan) / best_single[(s, t)]
                    for t in in_domain
                    if best_single.get((s, t), 0) > 0
                ]
            )
            for a, s in zip(accs, seeds, strict=True)
        ]
        first = recs[0]
        per_task = {t: _mean([a.get(t, math.nan) for a in accs]) for t in in_domain + ood}
        rows.append(
            {
                "variant": variant,
                "method": method,
                "seeds": len(accs),
                "in_domain": _mean(id_means),
                "in_domain_std": _std(id_means),
                "in_domain_se": _binomial_se(
                    {t: per_task[t] for t in in_domain if math.isfinite(per_task[t])}, manifest
                ),
                "normalised": _mean(norm_means),
                "normalised_std": _std(norm_means),
                "out_of_domain": _mean(ood_means),
                "out_of_domain_std": _std(ood_means),
                "out_of_domain_se": _binomial_se(
                    {t: per_task[t] for t in ood if math.isfinite(per_task[t])}, manifest
                ),
                "scale": _mean([r["scale"] for r in recs if r["scale"] is not None]),
                "cp_fit_error": _mean(
                    [r["cp_fit_error"] for r in recs if r["cp_fit_error"] is not None]
                ),
                "merge_seconds": _mean(
                    [r["merge_seconds"] for r in recs if r["merge_seconds"] is not None]
                ),
                "lora_params": (first["storage"] or {}).get("lora_params"),
                "cp_params": (first["storage"] or {}).get("cp_params"),
                "per_task": per_task,
            }
        )
    order = {m: i for i, m in enumerate(("base", "single_adapters", "single_lora", "routing"))}
    order.update({m: 10 + i for i, m in enumerate(MERGE_METHODS)})
    vorder = {"base": 0, "single": 1, "per_task": 2, "kmeans4": 3, "kmeans8": 4}
    rows.sort(key=lambda r: (vorder.get(r["variant"], 9), order.get(r["method"], 99)))
    floors = {
        "majority": {t: tasks[t]["majority"]["accuracy"] for t in in_domain},
        "majority_in_domain": _mean([tasks[t]["majority"]["accuracy"] for t in in_domain]),
        "chance_out_of_domain": _mean([tasks[t]["chance"] for t in ood]),
        "base": None if base is None else base["acc"],
    }
    checks = adapter_checks(best_single, manifest)
    return {"rows": rows, "floors": floors, "adapter_checks": checks, "tasks": dict(tasks)}


def adapter_checks(
    best_single: Mapping[tuple[int, str], float], manifest: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """Does each task's per-task adapter beat the majority answer by more than 2 standard errors?"""
    out = []
    for (seed, task), acc in sorted(best_single.items()):
        info = manifest["tasks"][task]
        floor = info["majority"]["accuracy"]
        pooled = (acc + floor) / 2  # the standard error of acc - floor under "no difference"
        se = math.sqrt(max(pooled * (1 - pooled), 1 / info["n_test"]) / info["n_test"])
        out.append(
            {
                "seed": seed,
                "task": task,
                "adapter": acc,
                "majority": floor,
                "margin_se": (acc - floor) / se if se > 0 else math.inf,
                "clearly_beats": acc - floor > 2 * se,
            }
        )
    return out


def _pct(value: Any, std: Any = None) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    text = f"{100 * value:.1f}"
    if std is not None and isinstance(std, float) and math.isfinite(std):
        text += f" ± {100 * std:.1f}"
    return text


def _num(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return format(value, fmt)


def markdown(summary: Mapping[str, Any], command: str) -> str:
    """The results as Markdown: main table, per-task table, floors and adapter checks."""
    floors = summary["floors"]
    lines = [
        f"Command: `{command}`",
        "",
        "Accuracy in % (mean ± std over seeds). In-domain: each training task's held-out test "
        "split; normalised: accuracy / the task's best single per-task adapter (same seed); "
        "unseen: tasks never trained or clustered on. ±SE: one standard error of the mean from "
        "test-item sampling alone.",
        "",
        "| clustering | method | seeds | in-domain | ±SE | normalised | unseen | ±SE | scale "
        "| CP fit err | merge s | params K adapters | params CP |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["rows"]:
        lines.append(
            f"| {r['variant']} | {r['method']} | {r['seeds']} "
            f"| {_pct(r['in_domain'], r['in_domain_std'])} | {_pct(r['in_domain_se'])} "
            f"| {_pct(r['normalised'], r['normalised_std'])} "
            f"| {_pct(r['out_of_domain'], r['out_of_domain_std'])} "
            f"| {_pct(r['out_of_domain_se'])} | {_num(r['scale'], '.3g')} "
            f"| {_num(r['cp_fit_error'], '.3f')} | {_num(r['merge_seconds'], '.2f')} "
            f"| {_num(r['lora_params'], ',')} | {_num(r['cp_params'], ',')} |"
        )
    lines += [
        "",
        f"Floors: majority answer of the training split, in-domain mean "
        f"{_pct(floors['majority_in_domain'])}; chance on the unseen multiple-choice tasks "
        f"(0 for short answers), mean {_pct(floors['chance_out_of_domain'])}.",
        "",
        "Per task (mean over seeds; base model and majority floor beside each):",
        "",
    ]
    tasks = list(summary["tasks"])
    methods = [r for r in summary["rows"]]
    header = "| task | group | n | majority | " + " | ".join(
        f"{r['variant']}/{r['method']}" for r in methods
    )
    lines += [header + " |", "|" + "---|" * (4 + len(methods))]
    for t in tasks:
        info = summary["tasks"][t]
        maj = info.get("majority", {}).get("accuracy")
        cells = " | ".join(_pct(r["per_task"].get(t)) for r in methods)
        group = "in" if info["group"] == "in_domain" else "unseen"
        lines.append(f"| {t} | {group} | {info['n_test']} | {_pct(maj)} | {cells} |")
    checks = summary["adapter_checks"]
    if checks:
        beaten = sum(c["clearly_beats"] for c in checks)
        lines += [
            "",
            f"Per-task adapters clearly above the majority answer (> 2 SE): {beaten} of "
            f"{len(checks)} (task, seed) pairs.",
        ]
        failing = [c for c in checks if not c["clearly_beats"]]
        if failing:
            lines.append(
                "Not clearly above: "
                + ", ".join(
                    f"{c['task']} (seed {c['seed']}: {_pct(c['adapter'])} vs {_pct(c['majority'])})"
                    for c in failing
                )
                + "."
            )
    return "\n".join(lines) + "\n"


def write_results(summary: Mapping[str, Any], sweep: Sweep, command: str) -> None:
    import csv
    import io

    out = sweep.results_dir
    text = markdown(summary, command)
    _atomic_write(out / "repro_small.md", text)
    _atomic_write(out / "repro_small.json", json.dumps({**summary, "command": command}, indent=1))
    buffer = io.StringIO()
    keys = [k for k in summary["rows"][0] if k != "per_task"] if summary["rows"] else []
    tasks = list(summary["tasks"])
    writer = csv.writer(buffer)
    writer.writerow(keys + tasks)
    for r in summary["rows"]:
        writer.writerow([r[k] for k in keys] + [r["per_task"].get(t) for t in tasks])
    _atomic_write(out / "repro_small.csv", buffer.getvalue())
    print(text)


# ------------------------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run of the harness")
    parser.add_argument("--prepare-only", action="store_true", help="write the splits and stop")
    parser.add_argument("--aggregate-only", action="store_true", help="only aggregate results")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds (default 0 1 2)")
    parser.add_argument(
        "--variants", nargs="+", help="subset of kmeans4 kmeans8 per_task single to run"
    )
    parser.add_argument("--test-items", type=int, help="test items per training task")
    parser.add_argument("--ood-items", type=int, help="items per unseen task")
    parser.add_argument("--work-dir", type=Path, help="runs and splits (default runs/repro_small)")
    parser.add_argument("--results-dir", type=Path, help="aggregated results folder")
    parser.add_argument("--threads", type=int, help="OMP/MKL threads of each run (default: all)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sweep = Sweep.quick() if args.quick else Sweep()
    if args.seeds:
        sweep.seeds = tuple(args.seeds)
    if args.variants:
        bad = sorted(set(args.variants) - {"kmeans4", "kmeans8", "per_task", "single"})
        if bad:
            parser.error(f"--variants: unknown {bad}; allowed kmeans4 kmeans8 per_task single")
        sweep.variants = tuple(args.variants)
    if args.test_items:
        sweep.test_items = args.test_items
    if args.ood_items:
        sweep.ood_items = args.ood_items
    if args.work_dir:
        sweep.work_dir = args.work_dir.resolve()
    if args.results_dir:
        sweep.results_dir = args.results_dir.resolve()
    command = "python benchmarks/repro_small.py " + " ".join(argv or sys.argv[1:])
    manifest = prepare_data(sweep)
    print(f"splits in {sweep.work_dir / 'data'}: {json.dumps(manifest['settings'])}")
    if args.prepare_only:
        return 0
    if not args.aggregate_only:
        first = True
        for seed in sweep.seeds:
            for variant in sweep.variants:
                # The base model does not depend on the seed or the clustering: score it once.
                evaluate_base = first and variant != "single"
                run_one(sweep, variant, seed, evaluate_base, args.threads)
                first = first and not evaluate_base
    records = collect(sweep, manifest)
    if not records:
        print("no finished runs to aggregate")
        return 1
    summary = summarise(records, manifest)
    summary["timings"] = timings(sweep)
    summary["sweep"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(sweep).items()}
    write_results(summary, sweep, command.strip())
    for run, entry in summary["timings"].items():
        print(f"timing {run}: " + ", ".join(f"{k}={v:.4g}" for k, v in entry.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
