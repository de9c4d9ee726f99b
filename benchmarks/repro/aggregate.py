"""From finished runs to the sweep's numbers: one record per (clustering, seed, method) read from
each run's record (``benchmarks/results/runs/<variant>-seed<s>.json``), their mean +- std over seeds with standard errors and
normalised accuracy, the per-task adapter checks, parameter counts and timings.
"""

from __future__ import annotations

import collections
import json
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.repro.sweep import Sweep, study_config
from tclora.study.paired import parse_items as parse

__all__ = [
    "adapter_checks",
    "adapter_storage",
    "answer_patterns",
    "collect",
    "gate_failures",
    "load_events",
    "one_answer_sets",
    "own_adapter_scores",
    "paired_differences",
    "resume_check",
    "summarise",
    "tasks_in",
    "timings",
    "train_rate",
]

REFERENCE_ORDER = ("base", "single_adapters", "single_lora", "routing")
VARIANT_ORDER = ("base", "single", "per_task", "kmeans4", "kmeans8", "mbc2", "mbc4")


def _mean(values: Sequence[float]) -> float:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else math.nan


def _std(values: Sequence[float]) -> float:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.stdev(values) if len(values) > 1 else math.nan


def tasks_in(tasks: Mapping[str, Mapping[str, Any]], group: str) -> list[str]:
    """The names of the manifest's ``tasks`` in ``group`` (``"in_domain"`` or
    ``"out_of_domain"``), in manifest order."""
    return [t for t, v in tasks.items() if v.get("group") == group]


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
        shapes = {key: handle.get_slice(key).get_shape() for key in handle.keys()}  # noqa: SIM118
    for key, shape in shapes.items():
        if "lora_A" not in key:
            continue
        r, d_in = shape
        d_out = shapes[key.replace("lora_A", "lora_B")][0]
        lora += r * (d_in + d_out)
        cp += cp_rank * (d_in + d_out + k)
    return {"adapters": k, "lora_params": k * lora, "cp_params": cp}


def load_events(folder: Path) -> list[Any]:
    """A run's TensorBoard event files (``<folder>/tensorboard``, one per process), each read
    once, in path order, for :func:`train_rate` and :func:`resume_check`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = []
    for path in sorted((folder / "tensorboard").rglob("events.out.tfevents.*")):
        events = EventAccumulator(str(path), size_guidance={"scalars": 0})
        events.Reload()
        out.append(events)
    return out


def train_rate(events: Sequence[Any]) -> dict[str, float]:
    """Training throughput logged by ``LoRAModule`` (``train/tokens_per_s``) in a run's events
    (:func:`load_events`)."""
    rates: list[float] = []
    for log in events:
        if "train/tokens_per_s" in log.Tags()["scalars"]:
            rates += [e.value for e in log.Scalars("train/tokens_per_s")]
    return {"tokens_per_s": _mean(rates), "logged_steps": len(rates)}


def resume_check(events: Sequence[Any]) -> dict[str, Any]:
    """Whether a fit that was killed and resumed trained what an uninterrupted one would have.

    Every process of a resumed fit writes its own TensorBoard event file, and the steps between
    the last checkpoint and the kill are trained (and logged) twice: once by the killed process,
    once by the resumed one. An exact resume gives the same adapter (``train/loss_cluster_<k>``
    tag) and the bit-identical loss at each of those steps.

    Args:
        events: The run's event files (:func:`load_events`).

    Returns:
        ``{"processes": files with training losses, "overlapping_steps": steps logged by more
        than one, "mismatched_steps": those whose adapter or loss differ}``.
    """
    logs: list[dict[int, tuple[str, float]]] = []
    for log in events:
        steps = {
            e.step: (tag, e.value)
            for tag in log.Tags()["scalars"]
            if tag.startswith("train/loss_cluster_")
            for e in log.Scalars(tag)
        }
        if steps:
            logs.append(steps)
    overlapping, mismatched = set(), set()
    for i, first in enumerate(logs):
        for later in logs[i + 1 :]:
            for step in first.keys() & later.keys():
                overlapping.add(step)
                if first[step] != later[step]:
                    mismatched.add(step)
    return {
        "processes": len(logs),
        "overlapping_steps": len(overlapping),
        "mismatched_steps": sorted(mismatched),
    }


def timings(runs: Mapping[tuple[str, int], Mapping[str, Any]]) -> dict[str, Any]:
    """Wall time per run, training throughput and the seconds of one full evaluation pass, from
    the runs' records (:func:`benchmarks.repro.records.read_records`)."""
    return {
        f"{variant}/seed{seed}": record["timing"]
        for (variant, seed), record in runs.items()
        if record["timing"]
    }


def answer_patterns(data_dir: Path, manifest: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    """The per-item results of always giving one answer, per multiple-choice task and choice.

    Args:
        data_dir: The splits folder (``<work_dir>/data``: ``test/`` for the training tasks'
            test splits, ``ood/`` for the unseen tasks).
        manifest: The splits' manifest (:func:`benchmarks.repro.data.prepare_data`).

    Returns:
        ``{task: {choice: "0110..."}}`` in the test file's item order (a study row's ``items``
        order); exact-match tasks are left out.
    """
    out: dict[str, dict[str, str]] = {}
    for task, info in manifest["tasks"].items():
        if info.get("kind") != "multiple_choice":
            continue
        folder = "test" if info.get("group") == "in_domain" else "ood"
        lines = (data_dir / folder / f"{task}.jsonl").read_text().splitlines()
        items = [json.loads(line) for line in lines if line.strip()]
        out[task] = {
            choice: "".join("1" if item["answer"] == choice else "0" for item in items)
            for choice in items[0]["choices"]
        }
    return out


def one_answer_sets(
    items: Mapping[str, str], patterns: Mapping[str, Mapping[str, str]]
) -> list[str]:
    """The multiple-choice sets on which a method's per-item results are exactly those of always
    giving one answer (:func:`answer_patterns`): a model collapsed to a constant answer there, or
    indistinguishable from one by its scores.

    Args:
        items: A method's per-item results per set (``"0110..."``).
        patterns: :func:`answer_patterns`.

    Returns:
        The sets, in ``patterns`` order.
    """
    return [t for t, per in patterns.items() if t in items and items[t] in per.values()]


def collect(sweep: Sweep, manifest: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One record per (variant, seed, method) with its per-task headline scores and per-item
    correctness, from the runs' records (:mod:`benchmarks.repro.records`) alone.

    Rows are read back with :func:`tclora.study.row_from_dict` and scored with
    :meth:`tclora.study.MethodResult.primary` (accuracy, else exact match), as the study does.
    """
    from benchmarks.repro.records import read_records
    from tclora.study import row_from_dict

    records = []
    for (variant, seed), record in read_records(sweep).items():
        result = record["results"]
        seconds = record["timing"].get("seconds")
        for row in map(row_from_dict, result["rows"]):
            rank = row.name[2:].split("_")[0] if row.name.startswith("cp") else None
            fit = result["cp_fit_error"].get(f"cp{rank}", {}) if rank else {}
            records.append(
                {
                    "variant": variant,
                    "seed": seed,
                    "method": "single_lora" if variant == "single" else row.name,
                    "kind": row.kind,
                    "scale": row.scale,
                    "norm_ratio": row.norm_ratio,
                    "scale_at_edge": row.scale_at_edge,
                    "merge_seconds": row.merge_seconds,
                    "cp_fit_error": fit.get("mean"),
                    "storage": record["storage"].get(f"cp{rank}") if rank else None,
                    "shared_fraction": result.get("components", {})
                    .get(f"cp{rank}", {})
                    .get("shared_fraction")
                    if rank
                    else None,
                    "run_seconds": seconds,
                    "acc": {t: row.primary(t) for t in row.scores if t in manifest["tasks"]},
                    "items": {t: v for t, v in row.items.items() if t in manifest["tasks"]},
                }
            )
    return records


def own_adapter_scores(
    records: Sequence[Mapping[str, Any]], variant: str = "per_task"
) -> dict[tuple[int, str], float]:
    """Per seed and task, ``variant``'s best single adapter on the task. For per_task it is the
    task's own adapter (the run scores each adapter on its own task only).

    Args:
        records: :func:`collect`'s records.
        variant: The run variant whose ``single:`` rows are read.

    Returns:
        ``{(seed, task): accuracy}``.
    """
    best: dict[tuple[int, str], float] = {}
    for rec in records:
        if rec["variant"] == variant and rec["method"].startswith("single:"):
            for t, a in rec["acc"].items():
                if math.isfinite(a) and a > best.get((rec["seed"], t), -1.0):
                    best[(rec["seed"], t)] = a
    return best


def gate_failures(
    records: Sequence[Mapping[str, Any]], manifest: Mapping[str, Any], seed: int
) -> list[dict[str, Any]] | None:
    """Issue 13's gate: the training tasks whose own adapter (per_task run, ``seed``) does not
    clearly beat the majority answer (:func:`adapter_checks`). No conclusion is drawn from the
    sweep's merges while any task fails it.

    Args:
        records: :func:`collect`'s records.
        manifest: The splits' manifest.
        seed: The run seed to check.

    Returns:
        The failing checks (empty: the gate passes); ``None`` when no per_task record of
        ``seed`` exists yet.
    """
    in_domain = tasks_in(manifest["tasks"], "in_domain")
    own = {
        k: a for k, a in own_adapter_scores(records).items() if k[0] == seed and k[1] in in_domain
    }
    if not own:
        return None
    return [c for c in adapter_checks(own, manifest) if not c["clearly_beats"]]


def summarise(
    records: list[dict[str, Any]],
    manifest: Mapping[str, Any],
    methods: Sequence[str] | None = None,
    patterns: Mapping[str, Mapping[str, str]] | None = None,
) -> dict[str, Any]:
    """Mean +- std over seeds per (variant, method): in-domain, normalised in-domain, unseen.

    Args:
        records: :func:`collect`'s records.
        manifest: The splits' manifest (:func:`benchmarks.repro.data.prepare_data`).
        methods: Merge methods in table order (default: the default sweep's
            :attr:`tclora.study.StudyConfig.method_names`); the references come first.
        patterns: :func:`answer_patterns`; with them each row gets ``one_answer_sets`` (mean
            over seeds of :func:`one_answer_sets`' count) and ``mc_sets`` (the multiple-choice
            sets it was scored on), ``None`` for the per-task adapters' row.

    Each merge's row also holds ``norm_ratio`` (mean over seeds of the merged update's norm
    relative to the mean merge's, at the chosen scale: one unit for every method's scale) and
    ``scale_at_edge`` (in how many seeds the chosen scale was the smallest or largest tried;
    ``None`` for the references, which have no scale).

    Returns:
        ``{"rows", "floors", "adapter_checks", "tasks", "paired"}``.
    """
    if methods is None:
        methods = study_config(Sweep()).method_names
    tasks = manifest["tasks"]
    in_domain, ood = tasks_in(tasks, "in_domain"), tasks_in(tasks, "out_of_domain")
    # per_task's in-domain values (each task's own adapter) are the normaliser.
    best_single = {k: a for k, a in own_adapter_scores(records).items() if k[1] in in_domain}
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
    rows: list[dict[str, Any]] = []
    for (variant, method), recs in groups.items():
        if method == "single_adapters":
            # Per seed: each task scored by its own per-task adapter (the upper reference).
            by_seed: dict[int, dict[str, float]] = collections.defaultdict(dict)
            for (s, t), a in own_adapter_scores(recs, variant).items():
                by_seed[s][t] = a
            seeds = sorted(by_seed)
            accs = [by_seed[s] for s in seeds]
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
        one_answer, mc_sets = None, None
        if patterns is not None and method != "single_adapters":
            one_answer = _mean([len(one_answer_sets(r["items"], patterns)) for r in recs])
            mc_sets = max(sum(t in r["items"] for t in patterns) for r in recs)
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
                "norm_ratio": _mean(
                    [r["norm_ratio"] for r in recs if r.get("norm_ratio") is not None]
                ),
                "scale_at_edge": (
                    sum(bool(r["scale_at_edge"]) for r in recs)
                    if any(r.get("scale_at_edge") is not None for r in recs)
                    else None
                ),
                "cp_fit_error": _mean(
                    [r["cp_fit_error"] for r in recs if r["cp_fit_error"] is not None]
                ),
                "merge_seconds": _mean(
                    [r["merge_seconds"] for r in recs if r["merge_seconds"] is not None]
                ),
                "shared_fraction": _mean(
                    [r["shared_fraction"] for r in recs if r.get("shared_fraction") is not None]
                ),
                "lora_params": (first["storage"] or {}).get("lora_params"),
                "cp_params": (first["storage"] or {}).get("cp_params"),
                "one_answer_sets": one_answer,
                "mc_sets": mc_sets,
                "per_task": per_task,
            }
        )
    order = {m: i for i, m in enumerate(REFERENCE_ORDER)}
    order.update({m: 10 + i for i, m in enumerate(methods)})
    vorder = {v: i for i, v in enumerate(VARIANT_ORDER)}
    rows.sort(key=lambda r: (vorder.get(r["variant"], 9), order.get(r["method"], 99)))
    floors = {
        "majority": {t: tasks[t]["majority"]["accuracy"] for t in in_domain},
        "majority_in_domain": _mean([tasks[t]["majority"]["accuracy"] for t in in_domain]),
        "chance_out_of_domain": _mean([tasks[t]["chance"] for t in ood]),
        "base": None if base is None else base["acc"],
    }
    checks = adapter_checks(best_single, manifest)
    return {
        "rows": rows,
        "floors": floors,
        "adapter_checks": checks,
        "tasks": dict(tasks),
        "paired": paired_differences(records, manifest),
    }


def paired_differences(
    records: list[dict[str, Any]], manifest: Mapping[str, Any], n_boot: int = 2000
) -> list[dict[str, Any]]:
    """Each method's difference to ``uniform`` and to the best non-CP merge of its clustering,
    in-domain and unseen, with paired bootstrap 95% intervals (:func:`tclora.study.paired_bootstrap`:
    over items with the seeds kept, and over seeds and items).

    The best non-CP merge is, for each split, the non-CP merge with the highest mean accuracy
    over seeds of that clustering on that split -- chosen with hindsight on the test items, so a
    CP merge that beats it beats the strongest competitor the data could pick there (in-domain
    and unseen may pick different merges). Only seeds where both methods have per-item results
    count.

    Returns:
        One dict per (variant, method, versus, split): ``diff``, ``low``/``high`` (items),
        ``low_seeds``/``high_seeds`` (seeds and items), ``seeds``, ``items``.
    """
    from tclora.study import paired_bootstrap

    tasks = manifest["tasks"]
    splits = {
        "in_domain": tasks_in(tasks, "in_domain"),
        "unseen": tasks_in(tasks, "out_of_domain"),
    }
    items: dict[tuple[str, str], dict[int, dict[str, str]]] = collections.defaultdict(dict)
    kinds: dict[tuple[str, str], str] = {}
    for rec in records:
        if rec.get("items") and rec["method"] != "base" and not rec["method"].startswith("single"):
            items[(rec["variant"], rec["method"])][rec["seed"]] = rec["items"]
            kinds[(rec["variant"], rec["method"])] = rec["kind"]
    out: list[dict[str, Any]] = []
    for variant in sorted({v for v, _ in items}):
        methods = [m for v, m in items if v == variant]

        def mean_accuracy(method: str, split: str, variant: str = variant) -> float:
            per_seed = items[(variant, method)].values()
            return _mean(
                [
                    _mean([float(parse(x[t]).mean()) for t in splits[split] if t in x])
                    for x in per_seed
                ]
            )

        non_cp = [m for m in methods if kinds[(variant, m)] == "merge" and not m.startswith("cp")]
        best = {
            split: max(non_cp, key=lambda m, split=split: mean_accuracy(m, split))
            if non_cp
            else None
            for split in splits
        }
        for method in methods:
            for split, names in splits.items():
                for versus in dict.fromkeys(
                    v for v in ("uniform", best[split]) if v and v != method
                ):
                    if (variant, versus) not in items:
                        continue
                    a, b = items[(variant, method)], items[(variant, versus)]
                    seeds = sorted(set(a) & set(b))
                    common = [t for t in names if all(t in a[s] and t in b[s] for s in seeds)]
                    if not seeds or not common:
                        continue
                    res = paired_bootstrap(
                        [{t: a[s][t] for t in common} for s in seeds],
                        [{t: b[s][t] for t in common} for s in seeds],
                        n_boot=n_boot,
                    )
                    out.append(
                        {
                            "variant": variant,
                            "method": method,
                            "versus": versus,
                            "versus_is_best_non_cp": versus == best[split],
                            "split": split,
                            "diff": res["items"]["diff"],
                            "low": res["items"]["low"],
                            "high": res["items"]["high"],
                            "low_seeds": res["seeds_items"]["low"],
                            "high_seeds": res["seeds_items"]["high"],
                            "seeds": len(seeds),
                            "items": int(res["items"]["n_items"]),
                        }
                    )
    return out


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
