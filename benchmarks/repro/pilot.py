"""Pilot of the sweep's training budget: do the per-task adapters beat their majority answer?

Issue 13 asks that every task's own adapter beat the majority-answer floor before any conclusion
is drawn from the sweep, and to train longer if it does not. This script fits only the sweep's
``per_task`` run (one seed) under a given budget -- training items per task, epochs, learning
rate -- scores each adapter on its own task's test split (the same splits, scorer and options as
the sweep), and prints how far each one is above its floor. The merge study is cut to the
minimum the callback needs (one uniform and one CP merge at scale 1, in-domain sets only), so a
pilot costs the fit plus about two evaluation passes.

Usage::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/repro_pilot.py --train-items 180 --epochs 2 \
        --lr-schedule cosine
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/repro_pilot.py --train-items 64 --epochs 2 --lr 1e-3

Each budget gets its own work folder (``runs/repro_pilot/<budget>``); the table also goes to
``benchmarks/results/logs/repro_pilot-<budget>.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from benchmarks.repro.aggregate import adapter_checks, answer_patterns, one_answer_sets
from benchmarks.repro.data import prepare_data
from benchmarks.repro.runs import exit_on_termination, run_one
from benchmarks.repro.sweep import ROOT, Sweep, run_dir
from tclora._io import atomic_write_text

__all__ = ["candidate_tasks", "main", "pilot_sweep", "report"]


def pilot_sweep(
    train_items: int,
    epochs: int,
    lr: float | None,
    lr_schedule: str | None = None,
    tasks: Sequence[str] | None = None,
) -> Sweep:
    """The one-run sweep of a pilot: per_task, seed 0, in-domain sets only, minimal merges.

    Args:
        train_items: Training items per task (before the data module's validation split).
        epochs: Epochs over them.
        lr: Learning rate (``None``: the config's).
        lr_schedule: ``constant``, ``linear`` or ``cosine`` (``None``: the config's).
        tasks: Registry tasks to train on (``None``: the sweep's), e.g. candidates to screen.

    Returns:
        The sweep, its work folder ``runs/repro_pilot/<budget>`` named after the arguments.
    """
    tag = f"items{train_items}-epochs{epochs}" + (f"-lr{lr:g}" if lr is not None else "")
    tag += f"-{lr_schedule}" if lr_schedule else ""
    if tasks is not None:
        digest = hashlib.sha256(json.dumps(sorted(tasks)).encode()).hexdigest()[:8]
        tag += f"-{len(tasks)}tasks-{digest}"
    model: dict[str, Any] = {"lr": lr} if lr is not None else {}
    model.update({"lr_schedule": lr_schedule} if lr_schedule else {})
    work = ROOT / "runs" / "repro_pilot" / tag
    sweep = Sweep(work_dir=work, results_dir=work / "results", train_items=train_items)
    if tasks is not None:
        sweep.train_tasks = tuple(tasks)
    sweep.seeds, sweep.variants = (0,), ("per_task",)
    data = work / "data"
    sweep.overrides = {
        "trainer": {"max_epochs": epochs},
        **({"model": model} if model else {}),
        "callback": {
            "eval_sets": [str(data / "test" / f"{t}.jsonl") for t in sweep.train_tasks],
            "references": ["single"],
            "cp_ranks": [4],
            "rules": ["sum_components"],
            "baselines": ["uniform"],
            "scales": [1.0],
            "scale_extensions": 0,
            "val_max_batches": 1,  # the validation loss is not what a pilot checks
        },
    }
    return sweep


def report(sweep: Sweep, manifest: dict[str, Any], tag: str) -> str:
    """Each task's own adapter against its majority floor, as the sweep's harness checks it."""
    merge = run_dir(sweep, "per_task", 0) / "merge"
    # the finished study's results, else the rows its progress file holds (a stopped run)
    done = merge / "results.json"
    results = json.loads((done if done.is_file() else merge / "merge_progress.json").read_text())
    tasks = sorted(sweep.train_tasks)  # per_task numbers its clusters by task name, sorted
    patterns = answer_patterns(sweep.work_dir / "data", manifest)
    own, constant = {}, {}
    for row in results["rows"]:
        if row["name"].startswith("single:cluster_"):
            task = tasks[int(row["name"].rsplit("_", 1)[1])]
            metrics = row["scores"][task]
            own[(0, task)] = metrics.get("acc", metrics.get("exact_match"))
            if task in patterns:
                constant[task] = bool(one_answer_sets(row.get("items", {}), patterns))
    checks = adapter_checks(own, manifest)
    lines = [
        f"Pilot {tag}: per_task seed 0, {sweep.train_items} training items per task "
        f"(`python {' '.join(sys.argv)}`)",
        "",
        "| task | own adapter | majority | margin (SE) | clearly above | one constant answer |",
        "|---|---|---|---|---|---|",
    ]
    for c in checks:
        one = "–" if c["task"] not in constant else ("yes" if constant[c["task"]] else "no")
        lines.append(
            f"| {c['task']} | {100 * c['adapter']:.1f} | {100 * c['majority']:.1f} "
            f"| {c['margin_se']:+.1f} | {'yes' if c['clearly_beats'] else 'no'} | {one} |"
        )
    beaten = sum(c["clearly_beats"] for c in checks)
    lines += ["", f"Clearly above the majority answer (> 2 SE): {beaten} of {len(checks)} tasks."]
    timing = run_dir(sweep, "per_task", 0) / "timing.json"
    if timing.is_file():
        lines.append(f"Run time: {json.loads(timing.read_text())['seconds']:.0f} s.")
    return "\n".join(lines) + "\n"


def candidate_tasks(
    tasks: Sequence[str] | None = None,
    min_items: int = 280,
    tokenizer: Any = None,
    max_length: int = 256,
    max_new_tokens: int = 12,
) -> list[dict[str, Any]]:
    """Registry tasks a screen could train on: MIT-licensed, with at least ``min_items``
    distinct prompts (the sweep's 100 test items plus the training items).

    Args:
        tasks: Registry tasks to describe (``None``: every MIT-licensed one).
        min_items: Fewest distinct prompts kept.
        tokenizer: The model's tokenizer; with it, each row also says how much of the task the
            sweep's lengths would cut (``over_max_length``, ``answers_beyond``).
        max_length: Longest training sample in tokens (the data module's ``max_length``).
        max_new_tokens: The evaluation's generation budget.

    Returns:
        One dict per task, shortest prompts first: ``task``, ``kind``, ``items`` (distinct
        prompts), ``choices`` (0 for exact match), ``majority`` (share of the most frequent
        answer), ``prompt_chars`` and ``answer_chars`` (medians over the first 200 items); with
        a tokenizer, ``over_max_length`` (share of those 200 whose rendered prompt and answer
        exceed ``max_length`` tokens: the prompt's start is cut) and ``answers_beyond`` (share
        of exact-match items no answer of which fits in ``max_new_tokens``: never matched).
    """
    import collections
    import statistics

    import numpy as np

    from benchmarks.repro.data import _dedupe
    from tclora.assets import list_corpus_tasks
    from tclora.data import Sample, TokenizedSamples
    from tclora.evaluation import EvalSetError, answers_beyond_budget, load_eval_set

    rows = []
    for task in list_corpus_tasks() if tasks is None else tasks:
        try:
            eval_set = load_eval_set(f"registry:{task}")
        except EvalSetError:
            continue  # no evaluation file in a form the scorer reads
        examples, kind = eval_set.examples, eval_set.kind
        distinct = len(_dedupe(examples))  # what the sweep's splits draw from
        if distinct < min_items:
            continue
        answers = collections.Counter(e.answers[0] for e in examples)
        rows.append(
            {
                "task": task,
                "kind": kind,
                "items": distinct,
                "choices": len(examples[0].choices or ()),
                "majority": answers.most_common(1)[0][1] / len(examples),
                "prompt_chars": int(statistics.median(len(str(e.prompt)) for e in examples[:200])),
                "answer_chars": int(statistics.median(len(e.answers[0]) for e in examples[:200])),
            }
        )
        if tokenizer is not None:
            head = examples[:200]
            # counted as the data module counts its truncated samples (prompt + response + eos)
            samples = [Sample(prompt=e.prompt, response=e.answers[0], task=task) for e in head]
            lengths = TokenizedSamples(samples, np.zeros(len(samples)), tokenizer, max_length)
            long = int((lengths.token_lengths().sum(axis=1) > max_length).sum())
            beyond = (
                answers_beyond_budget(tokenizer, [e.answers for e in head], max_new_tokens)
                if kind == "exact_match"
                else []
            )
            rows[-1].update(
                over_max_length=long / len(head), answers_beyond=len(beyond) / len(head)
            )
    return sorted(rows, key=lambda r: (r["prompt_chars"], r["task"]))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--train-items", type=int, default=64, help="items per training task")
    parser.add_argument("--epochs", type=int, default=2, help="epochs over the training items")
    parser.add_argument("--lr", type=float, help="learning rate (default: the config's)")
    parser.add_argument(
        "--lr-schedule", choices=["constant", "linear", "cosine"], help="default: the config's"
    )
    parser.add_argument(
        "--tasks", nargs="+", help="registry tasks to train on (default: the sweep's 12)"
    )
    parser.add_argument(
        "--list-candidates",
        action="store_true",
        help="no fit: list the MIT registry tasks with enough items to screen "
        "(logs/repro_candidates.md)",
    )
    parser.add_argument(
        "--report-sweep",
        action="store_true",
        help="no fit: report the sweep's own per_task seed-0 run (runs/repro_small), finished "
        "or stopped after its per-task adapters were scored",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="no fit: report the pilot of these flags as it stands, e.g. stopped once its "
        "per-task adapters were scored (the minimal merges after them are not needed)",
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.list_candidates:
        from transformers import AutoTokenizer

        from benchmarks.repro.sweep import base_config, merge_callback
        from tclora.assets import resolve_model

        config = base_config()
        max_length = int(config["data"]["max_length"])
        max_new = int(merge_callback(config)["init_args"]["max_new_tokens"])
        tokenizer = AutoTokenizer.from_pretrained(resolve_model(config["model"]["model"]))
        rows = candidate_tasks(
            min_items=Sweep().test_items + args.train_items,
            tokenizer=tokenizer,
            max_length=max_length,
            max_new_tokens=max_new,
        )
        lines = [
            f"MIT registry tasks with at least {Sweep().test_items + args.train_items} distinct "
            f"prompts (`python benchmarks/repro_pilot.py --list-candidates --train-items "
            f"{args.train_items}`), shortest prompts first. Over max_length: share of the first "
            f"200 items longer than max_length={max_length} tokens (their prompt's start is "
            f"cut); unmatchable: share of exact-match items no answer of which fits in "
            f"max_new_tokens={max_new} (configs/repro_small.yaml's values).",
            "",
            "| task | kind | items | choices | majority | prompt chars | answer chars "
            "| over max_length | unmatchable |",
            "|---|---|---|---|---|---|---|---|---|",
            *(
                f"| {r['task']} | {r['kind']} | {r['items']} | {r['choices']} "
                f"| {100 * r['majority']:.0f}% | {r['prompt_chars']} | {r['answer_chars']} "
                f"| {100 * r['over_max_length']:.0f}% | {100 * r['answers_beyond']:.0f}% |"
                for r in rows
            ),
        ]
        text = "\n".join(lines) + "\n"
        atomic_write_text(ROOT / "benchmarks" / "results" / "logs" / "repro_candidates.md", text)
        print(text)
        return 0
    if args.report_sweep:
        sweep, tag = Sweep(), "sweep"
        manifest = prepare_data(sweep)
    else:
        sweep = pilot_sweep(args.train_items, args.epochs, args.lr, args.lr_schedule, args.tasks)
        tag = sweep.work_dir.name
        manifest = prepare_data(sweep)
        if not args.report_only:
            exit_on_termination()
            run_one(sweep, "per_task", 0, evaluate_base=False)
    text = report(sweep, manifest, tag)
    atomic_write_text(ROOT / "benchmarks" / "results" / "logs" / f"repro_pilot-{tag}.md", text)
    print(text)
    return 0
