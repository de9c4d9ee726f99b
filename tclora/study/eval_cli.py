"""``tclora eval``: score saved adapter folders (or the base model) with either evaluator.

For adapters trained anywhere: each peft adapter folder is attached to its base model and scored
on the evaluation sets by tclora's scorer (``--evaluator tclora``), by lm-evaluation-harness
(``--evaluator lm_eval``; the ``tclora[harness]`` extra) or by both side by side
(``--evaluator both``, the referee on one's own data). Sets are named as in the merge study:
``registry:<task>``, a JSONL file, ``lm_eval:<task>`` or ``lm_eval:<path>.yaml``. Under
``lm_eval`` tclora's multiple-choice sets are written as lm-eval tasks first
(:func:`~tclora.evaluation.write_harness_task`); under ``tclora`` an lm-eval task is scored
through its documents' views when tclora's scorer can represent it (zero-shot multiple choice).

Example::

    tclora eval --adapters runs/demo/adapters/cluster_0 --base \\
        --eval_sets registry:food lm_eval:my_task.yaml --evaluator both --output_dir runs/eval

Every input is checked before a model loads. The table (primary metric per set: ``acc`` or
``exact_match``) is printed; with ``--output_dir`` it is written as ``eval_results.md`` and
``.csv`` beside ``eval_results.json``, which holds every metric.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tclora._checks import DTYPES, resolve_device, resolve_dtype
from tclora._io import atomic_write_text, check_writable

__all__ = ["build_parser", "eval_main"]

EVALUATORS = ("tclora", "lm_eval", "both")


def build_parser() -> argparse.ArgumentParser:
    """The ``tclora eval`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="tclora eval",
        description="Score saved LoRA adapter folders (and/or their base model) on evaluation "
        "sets with tclora's scorer, lm-evaluation-harness, or both.",
    )
    parser.add_argument(
        "--adapters",
        nargs="+",
        default=[],
        help="peft adapter folders, each scored alone: --adapters A B or --adapters '[A, B]'",
    )
    parser.add_argument("--base", action="store_true", help="also score the base model")
    parser.add_argument(
        "--model", default=None, help="base model (default: the adapters' base model)"
    )
    parser.add_argument(
        "--eval_sets",
        nargs="+",
        required=True,
        help="registry:<task>, JSONL files, lm_eval:<task> or lm_eval:<path>.yaml",
    )
    parser.add_argument("--evaluator", choices=EVALUATORS, default="tclora")
    parser.add_argument(
        "--conventions",
        choices=("tclora", "lm_eval"),
        default="tclora",
        help="lm-eval's tokenisation conventions: aligned with tclora's (default) or its own",
    )
    parser.add_argument(
        "--device",
        default="auto",
        help="where the model runs: auto (the first GPU if torch sees one, else cpu), cpu, "
        "cuda, cuda:<index>",
    )
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=DTYPES,
        help="dtype of the base model's weights",
    )
    parser.add_argument("--max_items", type=int, default=200, help="items per set (seeded)")
    parser.add_argument("--seed", type=int, default=0, help="subsample seed")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--max_new_tokens", type=int, default=16)
    parser.add_argument(
        "--chat_template",
        choices=("true", "false"),
        default="true",
        help="render prompts with the tokenizer's chat template when it has one",
    )
    parser.add_argument("--output_dir", default=None, help="write eval_results.{md,csv,json}")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def eval_main(argv: Sequence[str]) -> int:
    """Run ``tclora eval`` with ``argv``; returns the process exit code."""
    from tclora.evaluation import HarnessTask, require_harness
    from tclora.study.cli import _adapter_folders, adapter_base_models
    from tclora.study.config import StudyConfig
    from tclora.study.study import MergeStudy

    parser = build_parser()
    args = parser.parse_args(list(argv))
    try:
        device = resolve_device(args.device)
    except ValueError as err:
        parser.error(str(err))
    folders = _adapter_folders(args.adapters)
    if not folders and not args.base:
        parser.error("nothing to score: give --adapters FOLDER ... and/or --base")
    names = [Path(f).name for f in folders]
    if len(set(names)) != len(names) or (args.base and "base" in names):
        parser.error(
            f"--adapters: folder names name the rows, so they must be distinct (and not 'base' "
            f"with --base): {names}"
        )
    bases = adapter_base_models(folders) if folders else {}
    model_name = args.model or next(iter(bases.values()), None)
    if model_name is None:
        parser.error("--model: the base model to score; needed when no --adapters are given")
    evaluators = ["tclora", "lm_eval"] if args.evaluator == "both" else [args.evaluator]
    if "lm_eval" in evaluators:
        require_harness(f"--evaluator {args.evaluator}")
    cfg = StudyConfig(
        eval_sets=list(_adapter_folders(args.eval_sets)),
        eval_max_items=args.max_items,
        batch_size=args.batch_size,
        max_length=args.max_length,
        max_new_tokens=args.max_new_tokens,
        chat_template=args.chat_template == "true",
        seed=args.seed,
        progress=not args.quiet,
        references=["base"],
    )
    sets = MergeStudy(cfg).load_eval_sets()  # every set checked before any model loads
    for es in sets:
        if "tclora" in evaluators and isinstance(es, HarnessTask) and es.tclora_unsupported:
            parser.error(
                f"--evaluator {args.evaluator}: tclora's scorer cannot score lm-eval task "
                f"{es.task_name!r}: {es.tclora_unsupported}; use --evaluator lm_eval"
            )
        if "lm_eval" in evaluators and not isinstance(es, HarnessTask):
            if es.kind != "multiple_choice":
                parser.error(
                    f"--evaluator {args.evaluator}: set {es.name!r} is {es.kind}; lm-eval scores "
                    "tclora's multiple-choice sets only (use --evaluator tclora)"
                )
    out_dir = Path(args.output_dir) if args.output_dir else None
    if out_dir is not None:
        check_writable(out_dir, "--output_dir")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tclora.assets import resolve_model

    resolved = resolve_model(model_name)
    tokenizer = AutoTokenizer.from_pretrained(resolved)
    model: Any = AutoModelForCausalLM.from_pretrained(resolved, dtype=resolve_dtype(args.dtype))
    model.eval()
    if folders:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, folders[0], adapter_name=names[0])
        for folder, name in zip(folders[1:], names[1:], strict=True):
            model.load_adapter(folder, adapter_name=name)
    model.to(device)
    with tempfile.TemporaryDirectory(prefix="tclora-eval-") as tmp:
        per_evaluator = {e: _prepared(sets, e, tokenizer, cfg, Path(tmp)) for e in evaluators}
        scores = _score_variants(model, tokenizer, names, args.base, per_evaluator, cfg, args)
    table = _table(scores, [es.name for es in sets])
    from tclora.study.results import to_csv, to_markdown

    print(to_markdown(table), end="")
    if out_dir is not None:
        atomic_write_text(out_dir / "eval_results.md", to_markdown(table))
        atomic_write_text(out_dir / "eval_results.csv", to_csv(table))
        record = {"model": model_name, "adapters": dict(zip(names, folders, strict=True))}
        record["scores"] = scores
        atomic_write_text(out_dir / "eval_results.json", json.dumps(record, indent=1))
        print(f"results in {out_dir}")
    return 0


def _prepared(sets: Sequence[Any], evaluator: str, tokenizer: Any, cfg: Any, tmp: Path) -> list:
    """The sets as the evaluator takes them: lm-eval tasks for lm-eval, plain sets for tclora."""
    from tclora.evaluation import EvalSet, HarnessTask, as_harness_task

    out: list[EvalSet] = []
    for es in sets:
        if evaluator == "lm_eval" and not isinstance(es, HarnessTask):
            chat = cfg.chat_template and bool(getattr(tokenizer, "chat_template", None))
            out.append(as_harness_task(es, tmp / es.name, chat=chat))
        elif evaluator == "tclora" and isinstance(es, HarnessTask):
            out.append(EvalSet(es.name, es.kind, es.examples, es.source))
        else:
            out.append(es)
    return out


def _score_variants(
    model: Any,
    tokenizer: Any,
    adapters: Sequence[str],
    base: bool,
    per_evaluator: dict[str, list[Any]],
    cfg: Any,
    args: argparse.Namespace,
) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """``{variant: {evaluator: {set: metrics}}}`` for the base model and each adapter."""
    from contextlib import nullcontext

    from tclora.study.run import evaluate_sets

    scores: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    variants = (["base"] if base else []) + list(adapters)
    for variant in variants:
        if variant == "base" and base:
            context: Any = model.disable_adapter() if adapters else nullcontext()
        else:
            model.set_adapter(variant)
            context = nullcontext()
        with context:
            scores[variant] = {
                e: evaluate_sets(model, tokenizer, sets, cfg, conventions=args.conventions)
                for e, sets in per_evaluator.items()
            }
    return scores


def _table(
    scores: dict[str, dict[str, dict[str, dict[str, float]]]], set_names: Sequence[str]
) -> list[dict[str, Any]]:
    """One row per variant and evaluator: the primary metric of each set and their average."""
    rows = []
    for variant, by_evaluator in scores.items():
        for evaluator, by_set in by_evaluator.items():
            row: dict[str, Any] = {"model": variant, "evaluator": evaluator}
            values = []
            for name in set_names:
                metrics = by_set.get(name, {})
                value = metrics.get("acc", metrics.get("exact_match"))
                row[name] = value
                if value is not None:
                    values.append(value)
            row["average"] = sum(values) / len(values) if values else None
            rows.append(row)
    return rows
