"""The sweep's command line (``main``): flags onto a :class:`~benchmarks.repro.sweep.Sweep`,
then splits, runs, aggregation and the results files, in that order.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import benchmarks.repro
from benchmarks.repro.aggregate import (
    answer_patterns,
    collect,
    gate_failures,
    summarise,
    timings,
)
from benchmarks.repro.checkpoints import Kept, keep_checkpoints, restore_checkpoints
from benchmarks.repro.code_pin import PIN_FILE, pinned_checkout, read_pin, write_pin
from benchmarks.repro.data import prepare_data
from benchmarks.repro.pieces import status_lines
from benchmarks.repro.records import base_scored, read_records
from benchmarks.repro.report import write_results
from benchmarks.repro.runs import exit_on_termination, run_one
from benchmarks.repro.sweep import ROOT, VARIANTS, Sweep, study_config

__all__ = ["PROG", "main"]

PROG = "python benchmarks/repro_small.py"


def _parser() -> argparse.ArgumentParser:
    doc = benchmarks.repro.__doc__ or ""
    parser = argparse.ArgumentParser(prog=PROG, description=doc.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run of the harness")
    parser.add_argument("--prepare-only", action="store_true", help="write the splits and stop")
    parser.add_argument("--aggregate-only", action="store_true", help="only aggregate results")
    parser.add_argument(
        "--status",
        action="store_true",
        help="say which runs are recorded, trained (pieces committed) or not started, and stop",
    )
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds (default 0 1 2)")
    parser.add_argument(
        "--variants", nargs="+", choices=VARIANTS, help=f"subset of {' '.join(VARIANTS)} to run"
    )
    parser.add_argument("--test-items", type=int, help="test items per training task")
    parser.add_argument("--ood-items", type=int, help="items per unseen task")
    parser.add_argument("--work-dir", type=Path, help="runs and splits (default runs/repro_small)")
    parser.add_argument("--results-dir", type=Path, help="aggregated results folder")
    parser.add_argument("--threads", type=int, help="OMP/MKL threads of each run (default: all)")
    parser.add_argument(
        "--commit-records",
        action="store_true",
        help="git-commit each run's record (that file alone) as it lands, so an unattended sweep "
        "that spans sessions loses no finished run",
    )
    parser.add_argument(
        "--keep-checkpoints",
        action="store_true",
        help="keep the last checkpoint of each fit unfinished on this machine under "
        "<results_dir>/checkpoints (committed with --commit-records), and stop: run it after "
        "stopping the sweep at a session's end, so the fit resumes on any machine "
        "(benchmarks/repro/checkpoints.py)",
    )
    parser.add_argument(
        "--pin-code",
        metavar="WHY",
        help="run every later run of the sweep from this checkout's HEAD (benchmarks/repro/"
        "code_pin.py), saying why in the pin, and stop",
    )
    parser.add_argument(
        "--no-gate",
        action="store_true",
        help="go on past a seed's per_task run even when some task's own adapter does not "
        "clearly beat its majority answer (by default the sweep stops there: issue 13's gate)",
    )
    return parser


def _portable(value: object) -> object:
    """A path as written into the committed summary: relative to the checkout when inside it."""
    if not isinstance(value, Path):
        return value
    return str(value.relative_to(ROOT)) if value.is_relative_to(ROOT) else str(value)


def _gate_passes(sweep: Sweep, manifest: dict[str, object], seed: int) -> bool:
    """Issue 13's gate before a seed's merges are run: every task's own adapter (the seed's
    per_task record) clearly beats its majority answer. Says which tasks fail, or that no
    per_task record exists yet to check (then the runs go on)."""
    failures = gate_failures(collect(sweep, manifest), manifest, seed)
    if failures is None:
        print(f"[gate] seed {seed}: no per_task record yet, so the gate is not checked")
        return True
    if not failures:
        return True
    print(
        f"[gate] seed {seed}: stopped -- {len(failures)} task(s) whose own adapter does not clearly "
        "beat the majority answer (> 2 SE): "
        + ", ".join(
            f"{c['task']} {100 * c['adapter']:.1f}% vs {100 * c['majority']:.1f}%" for c in failures
        )
        + ". Train longer or change the tasks; --no-gate runs on regardless.",
        file=sys.stderr,
    )
    return False


def _run_pinned(checkout: Path, argv: list[str]) -> int:
    """Re-execute this command from the pinned ``checkout`` (same interpreter, same process: a
    signal sent to this process reaches the sweep)."""
    script = checkout / "benchmarks" / "repro_small.py"
    print(f"[pin ] the sweep is pinned to {checkout.name}: running {script}", flush=True)
    os.execv(sys.executable, [sys.executable, str(script), *argv])
    return 0  # not reached


def main(argv: Sequence[str] | None = None) -> int:
    """Run the sweep as ``python benchmarks/repro_small.py [flags]``; return the exit code."""
    args = _parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sweep = Sweep.quick() if args.quick else Sweep()
    if args.seeds:
        sweep.seeds = tuple(args.seeds)
    if args.variants:
        sweep.variants = tuple(args.variants)
    if args.test_items:
        sweep.test_items = args.test_items
    if args.ood_items:
        sweep.ood_items = args.ood_items
    if args.work_dir:
        sweep.work_dir = args.work_dir.resolve()
    if args.results_dir:
        sweep.results_dir = args.results_dir.resolve()
    command = f"{PROG} " + " ".join(argv or sys.argv[1:])
    if args.status:
        pin = read_pin(sweep.results_dir)
        if pin is not None:
            print(f"code: pinned to {pin['commit'][:12]} ({pin['why']})")
        lines = status_lines(sweep)  # one per run, seeds outer, variants inner
        runs = [(variant, seed) for seed in sweep.seeds for variant in sweep.variants]
        for i, (variant, seed) in enumerate(runs):  # a kept training checkpoint (checkpoints.py)
            kept = Kept(sweep, variant, seed)
            if kept.exists():
                lines[i] += f"; a checkpoint at step {kept.meta().get('step')} committed"
        print("\n".join(lines))
        return 0
    if args.keep_checkpoints:
        print("\n".join(keep_checkpoints(sweep, args.commit_records)) or "no checkpoint to keep")
        return 0
    if args.pin_code:
        pin = write_pin(ROOT, sweep.results_dir, args.pin_code)
        print(f"[pin ] the sweep runs commit {pin['commit']} from now on ({PIN_FILE} written)")
        return 0
    if not (args.quick or args.prepare_only or args.aggregate_only):
        # this checkout's code, before the pinned one runs (which does not know kept checkpoints)
        for line in restore_checkpoints(sweep, args.commit_records):
            print(line, flush=True)
        pinned = pinned_checkout(ROOT, sweep.results_dir)
        if pinned is not None:  # the folders stay this checkout's: records are committed here
            folders = ["--work-dir", str(sweep.work_dir), "--results-dir", str(sweep.results_dir)]
            return _run_pinned(pinned, [*(argv if argv is not None else sys.argv[1:]), *folders])
    manifest = prepare_data(sweep)
    print(f"splits in {sweep.work_dir / 'data'}: {json.dumps(manifest['settings'])}")
    if args.prepare_only:
        return 0
    if not args.aggregate_only:
        exit_on_termination()
        for seed in sweep.seeds:
            gate_checked = args.no_gate
            for variant in sweep.variants:
                if variant != "per_task" and not gate_checked:  # once, before the seed's merges
                    if not _gate_passes(sweep, manifest, seed):
                        return 3
                    gate_checked = True
                # The base model does not depend on the seed or the clustering: it is scored
                # once, by the first run fitted while no record holds it (whatever runs are picked).
                evaluate_base = variant != "single" and not base_scored(sweep)
                run_one(sweep, variant, seed, evaluate_base, args.threads, args.commit_records)
    records = collect(sweep, manifest)
    if not records:
        print("no finished runs to aggregate")
        return 1
    patterns = answer_patterns(sweep.work_dir / "data", manifest)
    summary = summarise(records, manifest, study_config(sweep).method_names, patterns)
    runs = read_records(sweep)
    summary["timings"] = timings(runs)
    summary["resume_checks"] = {
        f"{variant}/seed{seed}": record.get("resume_check")
        for (variant, seed), record in runs.items()
    }
    summary["sweep"] = {k: _portable(v) for k, v in asdict(sweep).items()}
    write_results(summary, sweep, command.strip())
    for run, entry in summary["timings"].items():
        print(timing_line(run, entry))
    return 0


def timing_line(run: str, entry: Mapping[str, Any]) -> str:
    """One run's timing record on one line: numbers to 4 significant digits, the rest (a resumed
    run's list of earlier attempts' seconds, flags) as they are."""

    def text(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        if isinstance(value, list):
            return "[" + ", ".join(map(text, value)) + "]"
        return str(value)

    return f"timing {run}: " + ", ".join(f"{k}={text(v)}" for k, v in entry.items())
