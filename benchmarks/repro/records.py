"""Results live in the repository: one small JSON per finished run (variant x seed).

``<results_dir>/runs/<variant>-seed<seed>.json`` (for the full sweep
``benchmarks/results/runs/``, committed as each run finishes) holds everything aggregation needs:
the study's rows with each method's per-item correctness (paired statistics), its CP fit errors
and component sharing, the run's timings and parameter counts, MBC's groups, and the sweep
settings that produced it. The sweep skips a run whose record exists, so it resumes on any machine
from the repository alone; aggregation and figures read these files and nothing else.

A record made under other settings (items per task, tasks, the training configuration) is never
mixed in: reading it stops with the file and the differing settings named.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from benchmarks.repro.sweep import Sweep, base_config, run_dir
from tclora._io import atomic_write_text

__all__ = [
    "RECORD_VERSION",
    "base_scored",
    "read_records",
    "record_path",
    "sweep_settings",
    "training_digest",
    "write_record",
]

RECORD_VERSION = 1


def record_path(sweep: Sweep, variant: str, seed: int) -> Path:
    """Where the record of one run lives."""
    return sweep.results_dir / "runs" / f"{variant}-seed{seed}.json"


def training_digest(sweep: Sweep) -> str:
    """sha256 of what every run is fitted and evaluated with: ``configs/repro_small.yaml`` as
    parsed (comments aside) and the sweep's overrides. Another budget, learning rate, schedule
    or study option gives another digest, so its records are never mixed with these."""
    text = json.dumps({"config": base_config(), "overrides": sweep.overrides}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def sweep_settings(sweep: Sweep) -> dict[str, Any]:
    """The settings a record must share with the sweep reading it: data and split sizes, and
    the training configuration (:func:`training_digest`)."""
    return {
        "train_tasks": list(sweep.train_tasks),
        "ood_tasks": list(sweep.ood_tasks),
        "train_items": sweep.train_items,
        "test_items": sweep.test_items,
        "ood_items": sweep.ood_items,
        "training": training_digest(sweep),
    }


def write_record(sweep: Sweep, variant: str, seed: int) -> Path:
    """Write the record of a finished run from its folder (``merge/results.json`` and friends).

    Raises:
        SystemExit: the run has no ``merge/results.json`` (not finished).
    """
    from benchmarks.repro.aggregate import adapter_storage, load_events, resume_check, train_rate

    folder = run_dir(sweep, variant, seed)
    results_file = folder / "merge" / "results.json"
    if not results_file.is_file():
        raise SystemExit(f"{variant} seed {seed}: {results_file} is missing; the run is unfinished")
    results = json.loads(results_file.read_text())
    timing_file = folder / "timing.json"
    timing: dict[str, Any] = json.loads(timing_file.read_text()) if timing_file.is_file() else {}
    resumed: dict[str, Any] | None = None
    if (folder / "tensorboard").is_dir():
        events = load_events(folder)
        timing.update(train_rate(events))
        resumed = resume_check(events)
        if resumed["mismatched_steps"]:
            print(
                f"[warn] {variant} seed {seed}: the resumed fit did not repeat the killed one at "
                f"steps {resumed['mismatched_steps'][:10]} (other adapter or loss in TensorBoard): "
                "its adapters are not those of an uninterrupted fit",
                file=sys.stderr,
            )
    if "eval_pass_seconds" in results:
        timing["eval_pass_seconds"] = results.pop("eval_pass_seconds")
    storage = {}
    if (folder / "adapters").is_dir():
        for label in results.get("cp_fit_error", {}):
            storage[label] = adapter_storage(folder / "adapters", int(label[2:]))
    mbc = folder / "mbc.json"
    record = {
        "version": RECORD_VERSION,
        "variant": variant,
        "seed": seed,
        "settings": sweep_settings(sweep),
        "results": results,
        "timing": timing,
        "storage": storage,
        "mbc_groups": json.loads(mbc.read_text())["groups"] if mbc.is_file() else None,
        "resume_check": resumed,
    }
    path = record_path(sweep, variant, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(record, separators=(",", ":"), sort_keys=True) + "\n")
    return path


def base_scored(sweep: Sweep) -> bool:
    """Whether a record of this sweep's settings -- of any variant and seed, picked or not --
    already holds the base model's row (the base model is scored once per sweep)."""
    want = sweep_settings(sweep)
    for path in sorted((sweep.results_dir / "runs").glob("*.json")):
        record = json.loads(path.read_text())
        if record.get("settings") == want and any(
            row["name"] == "base" for row in record["results"]["rows"]
        ):
            return True
    return False


def read_records(sweep: Sweep) -> dict[tuple[str, int], dict[str, Any]]:
    """The records of the sweep's runs that exist, by ``(variant, seed)``.

    Raises:
        SystemExit: a record of another version or made under other settings.
    """
    want = sweep_settings(sweep)
    out: dict[tuple[str, int], dict[str, Any]] = {}
    for variant in sweep.variants:
        for seed in sweep.seeds:
            path = record_path(sweep, variant, seed)
            if not path.is_file():
                continue
            record = json.loads(path.read_text())
            if record.get("version") != RECORD_VERSION:
                raise SystemExit(
                    f"{path}: record version {record.get('version')}, this code reads "
                    f"{RECORD_VERSION}; rebuild it (delete it and re-run the sweep)"
                )
            have = record.get("settings", {})
            differ = sorted(k for k in want if have.get(k) != want[k])
            if differ:
                raise SystemExit(
                    f"{path} was made with other sweep settings ({', '.join(differ)}: "
                    f"{[have.get(k) for k in differ]} vs {[want[k] for k in differ]}); not mixed "
                    "in. Run with its settings, or move it away to run this setting afresh"
                )
            out[(variant, seed)] = record
    return out
