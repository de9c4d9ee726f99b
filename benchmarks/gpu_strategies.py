"""GPU check of ``configs/strategies/``: one short ``tclora fit`` of the sweep's pipeline under
each strategy file, with figures.

For every strategy (``ddp``, ``fsdp``, ``deepspeed``; DeepSpeed only where it is installed) this
runs, in a fresh process::

    python -m tclora fit --config <run>.yaml --config configs/strategies/<s>.yaml [--config <fix>]

where ``<run>.yaml`` is the sweep's pipeline cut short: the sweep's own training files (per-task
clusters; the sentence encoder still embeds every sample, for the centroids), ``max_steps`` steps,
and the merge study with a small grid (CP rank 4, sum_components, uniform and TIES, scale 1)
scored on the first items of the training tasks' test splits, plus the base model as a reference.
The study runs at fit end (``CPMergeCallback``), except under FSDP, which the callback refuses
(sharded parameters): there ``tclora merge`` merges the exported adapters after the fit, as the
strategy file says (``--merge-after`` does this for every strategy). ``<fix>`` only sets what a
strategy file leaves to the user (FSDP's ``auto_wrap_policy``: the model's decoder layer class).

Checks per strategy (a failed check makes the exit status 1): the fit (and ``tclora merge``) exit
0, every adapter is exported as a peft folder whose LoRA B matrices moved away from zero (each
adapter trained), the merged adapter is exported, ``results.json`` scores every method on every
set, and the study ran on the GPU (its log line). Figures: median train step (s,
CUDA-synchronised), tokens per second, peak GPU memory of training
(``torch.cuda.max_memory_allocated``), the fit's wall time and the merge + evaluation's.

The model is ``--model`` (a folder, packaged alias or hub id), or, with ``--random-weights-from
DIR``, a model built from ``DIR/config.json`` with seeded random weights and ``DIR``'s tokenizer:
the architecture's step time and memory on a machine without the hub or the packaged weights (the
merge's accuracies are then meaningless; the point is that every stage runs). Likewise
``--random-encoder-from DIR`` embeds with a sentence-transformers folder whose transformer has
random weights (default: the packaged all-MiniLM-L6-v2).

Usage::

    python benchmarks/gpu_strategies.py --data runs/repro_small/data --out /tmp/gpu
    python benchmarks/gpu_strategies.py --data runs/repro_small/data --out /tmp/gpu \\
        --random-weights-from .gpu/smollm2-shape --strategies ddp fsdp
    python benchmarks/gpu_strategies.py --accelerator cpu --strategies ddp ...   # a dry run here

``--accelerator cpu`` replaces the strategy file's accelerator, precision and dtype with CPU ones
(a dry run of this script on a machine without a GPU; its figures mean nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch import Callback

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout, for `benchmarks`

from benchmarks.common import build_random_model, cuda_sync  # noqa: E402

STRATEGIES = ("ddp", "fsdp", "deepspeed")
VARIANTS = {
    "fsdp_layers": "fsdp",  # the decoder layers as the only FSDP units
    "fsdp_noac": "fsdp",  # AdapterWrapPolicy without activation checkpointing
    # the next two: refused by LoRAModule.setup on one GPU with a tied-embedding model (SmolLM2)
    "fsdp_32": "fsdp",  # AdapterWrapPolicy in float32 (no FSDP mixed precision, no autocast)
    "fsdp_bf16true": "fsdp",  # AdapterWrapPolicy with everything in bfloat16 (no autocast)
    "fsdp_ltac": "fsdp",  # AdapterWrapPolicy with Lightning's activation checkpointing
}
"""Runs on request (not by default), each a strategy file with one change: ``fsdp_layers`` is
``fsdp.yaml`` with the decoder layers as the only FSDP units (a plain list of classes, as it was
before ``AdapterWrapPolicy``), to set its step time and memory beside ``fsdp``'s."""
TASKS = ("sarcasm", "naughty_strings", "imperial_date_to_string", "guess_the_singer")


class GpuStats(Callback):
    """Records train-step times (synchronised on CUDA), tokens, peak GPU memory and the time
    from the end of training to the end of ``on_fit_end`` (the merge study runs there when this
    callback is listed after ``CPMergeCallback``). Writes ``path`` (JSON) on global rank zero.

    Args:
        path: Where to write the figures.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.ends: list[float] = []
        self.tokens = 0
        self.peak_train_bytes = 0
        self.train_end = 0.0
        self.device = "?"

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        import torch

        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, *_: Any
    ) -> None:
        cuda_sync(pl_module.device)
        self.ends.append(time.perf_counter())
        self.tokens += int(batch["attention_mask"].sum())

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        import torch

        cuda_sync(pl_module.device)
        self.train_end = time.perf_counter()
        self.device = str(pl_module.device)
        if pl_module.device.type == "cuda":
            self.peak_train_bytes = int(torch.cuda.max_memory_allocated(pl_module.device))
            self.device = torch.cuda.get_device_name(pl_module.device)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        steps = [b - a for a, b in zip(self.ends, self.ends[1:], strict=False)][2:]  # 3 warm-up
        record = {
            "world_size": trainer.world_size,
            "steps": len(self.ends),
            "median_step_s": statistics.median(steps) if steps else None,
            "tokens_per_s": (
                self.tokens / (self.ends[-1] - self.ends[0]) * trainer.world_size
                if len(self.ends) > 1
                else None
            ),
            "peak_train_mib": self.peak_train_bytes / 2**20,
            "merge_eval_s": time.perf_counter() - self.train_end,
            "device": self.device,
        }
        if trainer.is_global_zero:
            Path(self.path).write_text(json.dumps(record, indent=1))


def merge_options(args: argparse.Namespace) -> dict[str, Any]:
    """The merge study's options: CPMergeCallback's init_args, or ``tclora merge --merge``."""
    data = Path(args.data).resolve()
    return {
        "cp_ranks": [4],
        "rules": ["sum_components"],
        "baselines": ["uniform", "ties"],
        "scales": [1.0],
        "keep": "cp4_sum_components",  # `tclora merge` has no validation data to choose with
        "references": ["base"],
        "eval_sets": [str(data / "test" / f"{t}.jsonl") for t in TASKS],
        "eval_max_items": args.eval_items,
        "export": True,
        "batch_size": 32,
        "max_length": 256,
        "max_new_tokens": 12,
        "progress": False,
    }


def run_config(
    args: argparse.Namespace, model: str, run_dir: Path, merge_at_fit_end: bool
) -> dict[str, Any]:
    data = Path(args.data).resolve()
    merge = {
        "class_path": "tclora.callbacks.CPMergeCallback",
        "init_args": {
            **merge_options(args),
            "val_max_batches": 1,
            "output_dir": str(run_dir / "merge"),
        },
    }
    stats = {
        "class_path": "benchmarks.gpu_strategies.GpuStats",
        "init_args": {"path": str(run_dir / "gpu_stats.json")},
    }
    return {
        "seed_everything": 0,
        "trainer": {
            "max_steps": args.steps,
            "max_epochs": None,
            "limit_val_batches": 1,
            "val_check_interval": args.steps,
            "num_sanity_val_steps": 0,
            "log_every_n_steps": 8,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "default_root_dir": str(run_dir),
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(run_dir), "name": "tensorboard", "version": ""},
            },
            "callbacks": [merge, stats] if merge_at_fit_end else [stats],
        },
        "model": {
            "model": model,
            "r": 8,
            "lora_alpha": 16,
            "lr": 1e-3,
            "init_seed": 0,
            "export_dir": str(run_dir / "adapters"),
        },
        "data": {
            "sources": [{"path": str(data / "train" / f"{t}.jsonl"), "task": t} for t in TASKS],
            "tokenizer": model,
            "encoder": args.encoder,
            "clustering": "per_task",
            "num_clusters": None,
            "batch_size": args.batch_size,
            "max_length": 256,
            "val_fraction": 0.05,
            "seed": 42,
            "cache_dir": str(run_dir / "cache"),
            "progress_bar": False,
        },
    }


def fix_config(strategy: str, args: argparse.Namespace) -> dict[str, Any] | None:
    """What the strategy file leaves to the user, or a CPU dry run's replacements."""
    fix: dict[str, Any] = {}
    if strategy.startswith("fsdp"):
        policy: Any = {
            "class_path": "tclora.fsdp_policy.AdapterWrapPolicy",
            "init_args": {"layer_classes": [args.decoder_layer]},
        }
        fix["trainer"] = {
            "strategy": {
                "class_path": "lightning.pytorch.strategies.FSDPStrategy",
                "init_args": {
                    "auto_wrap_policy": [args.decoder_layer]
                    if strategy == "fsdp_layers"
                    else policy
                },
            }
        }
    if strategy in ("fsdp_noac", "fsdp_ltac"):
        fix["model"] = {"gradient_checkpointing": False}
    if strategy == "fsdp_ltac":
        init_args = fix["trainer"]["strategy"]["init_args"]
        init_args["activation_checkpointing_policy"] = [args.decoder_layer]
    elif strategy in ("fsdp_32", "fsdp_bf16true"):
        fix["trainer"]["precision"] = "32-true" if strategy == "fsdp_32" else "bf16-true"
        fix["model"] = {"dtype": "float32" if strategy == "fsdp_32" else "bfloat16"}
    if args.accelerator == "cpu":
        fix.setdefault("trainer", {}).update(
            {"accelerator": "cpu", "devices": 1, "precision": "32-true"}
        )
        fix["model"] = {"dtype": "float32"}
    if args.devices is not None:
        fix.setdefault("trainer", {})["devices"] = args.devices
    return fix or None


def check_run(run_dir: Path, num_adapters: int) -> list[str]:
    """What is missing or wrong in a finished run folder (empty when all is well)."""
    from safetensors.torch import load_file

    problems = []
    for k in range(num_adapters):
        weights = run_dir / "adapters" / f"cluster_{k}" / "adapter_model.safetensors"
        if not weights.is_file():
            problems.append(f"adapter {k} not exported ({weights})")
            continue
        tensors = load_file(str(weights))
        b = [v for n, v in tensors.items() if "lora_B" in n]
        if not b or all(float(v.abs().max()) == 0.0 for v in b):
            problems.append(f"adapter {k}: every LoRA B is still zero (not trained)")
    if not (run_dir / "merge" / "merged_adapter" / "adapter_model.safetensors").is_file():
        problems.append("merged adapter not exported")
    results = run_dir / "merge" / "results.json"
    if not results.is_file():
        return [*problems, "no merge results.json"]
    rows = json.loads(results.read_text())["rows"]
    names = {r["name"] for r in rows}
    if not {"base", "uniform", "ties"} <= names or not any(
        r["kind"] != "reference" and "cp" in r["name"] for r in rows
    ):
        problems.append(f"results.json lacks methods: has {sorted(names)}")
    for r in rows:
        if set(r["scores"]) != set(TASKS):
            problems.append(f"{r['name']} scored {sorted(r['scores'])}, not {sorted(TASKS)}")
    return problems


def _run(argv: list[str], log: Path, timeout: float) -> tuple[int, float]:
    """Run ``argv`` from the checkout (``benchmarks`` importable); exit status and wall seconds."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.run(
            argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout
        )
    return proc.returncode, time.perf_counter() - start


def _tail(log: Path, label: str) -> None:
    print(f"--- {label}: {log.name} tail\n" + "\n".join(log.read_text().splitlines()[-25:]))


def run_strategy(strategy: str, model: str, args: argparse.Namespace) -> dict[str, Any]:
    """One fit under ``strategy``; the merge study at fit end, or (FSDP, which CPMergeCallback
    refuses) afterwards with ``tclora merge`` on the exported adapters."""
    run_dir = Path(args.out) / strategy
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    at_fit_end = not strategy.startswith("fsdp") and not args.merge_after
    strategy_file = f"{VARIANTS.get(strategy, strategy)}.yaml"
    configs = [run_dir / "run.yaml", ROOT / "configs" / "strategies" / strategy_file]
    (run_dir / "run.yaml").write_text(yaml.safe_dump(run_config(args, model, run_dir, at_fit_end)))
    fix = fix_config(strategy, args)
    if fix:
        (run_dir / "fix.yaml").write_text(yaml.safe_dump(fix))
        configs.append(run_dir / "fix.yaml")
    argv = [sys.executable, "-m", "tclora", "fit"]
    for c in configs:
        argv += ["--config", str(c)]
    code, wall = _run(argv, run_dir / "fit.log", args.timeout)
    record: dict[str, Any] = {
        "strategy": strategy,
        "merge": "at fit end" if at_fit_end else "tclora merge",
        "exit": code,
        "fit_wall_s": wall,
    }
    stats = run_dir / "gpu_stats.json"
    if stats.is_file():
        record.update(json.loads(stats.read_text()))
    if code != 0:
        _tail(run_dir / "fit.log", strategy)
        record["problems"] = [f"fit exit {code}"]
        return record
    if args.fit_only:
        record["merge"] = "-"
        record["problems"] = []
        return record
    device = "cuda" if args.accelerator == "gpu" else "cpu"
    if at_fit_end:
        log, wanted = run_dir / "fit.log", f"CPMergeCallback: merge study on {device}"
    else:
        (run_dir / "merge.yaml").write_text(yaml.safe_dump(merge_options(args)))
        folders = [str(run_dir / "adapters" / f"cluster_{k}") for k in range(len(TASKS))]
        argv = [sys.executable, "-m", "tclora", "merge", "--adapters", *folders]
        argv += ["--model", model, "--output_dir", str(run_dir / "merge")]
        argv += ["--merge", str(run_dir / "merge.yaml"), "--device", device]
        log, wanted = run_dir / "merge.log", f", on {device}"
        code, record["merge_eval_s"] = _run(argv, log, args.timeout)
        if code != 0:
            _tail(log, f"{strategy} tclora merge")
            record["problems"] = [f"tclora merge exit {code}"]
            return record
    record["problems"] = check_run(run_dir, len(TASKS))
    if wanted not in log.read_text():
        record["problems"].append(f"the merge study did not run on {device} ({log.name})")
    return record


def table(records: list[dict[str, Any]]) -> str:
    def fmt(v: Any, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    lines = [
        "| strategy | GPUs | steps | median step s | tokens/s | peak train GPU MiB | fit wall s "
        "| merge | merge + eval s | checks |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        checks = "pass" if not r["problems"] else "; ".join(r["problems"])
        lines.append(
            f"| {r['strategy']} | {r.get('world_size', '-')} | {r.get('steps', '-')} "
            f"| {fmt(r.get('median_step_s'), '.4f')} | {fmt(r.get('tokens_per_s'), '.0f')} "
            f"| {fmt(r.get('peak_train_mib'), '.0f')} | {r['fit_wall_s']:.1f} | {r['merge']} "
            f"| {fmt(r.get('merge_eval_s'), '.1f')} | {checks} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="the sweep's data folder (train/, test/)")
    parser.add_argument("--out", required=True, help="folder for the runs and gpu_strategies.json")
    parser.add_argument(
        "--strategies",
        nargs="+",
        default=list(STRATEGIES),
        choices=[*STRATEGIES, *VARIANTS],
        help="strategy files to run; fsdp_layers: fsdp.yaml with the decoder layers as the only "
        "units (to compare with fsdp's AdapterWrapPolicy); fsdp_noac, fsdp_32, fsdp_bf16true, "
        "fsdp_ltac: fsdp.yaml without activation checkpointing, in float32, in bfloat16, with "
        "Lightning's activation checkpointing instead of transformers'",
    )
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--random-weights-from", type=Path, default=None, metavar="DIR")
    parser.add_argument("--random-encoder-from", type=Path, default=None, metavar="DIR")
    parser.add_argument(
        "--decoder-layer",
        default="transformers.models.llama.modeling_llama.LlamaDecoderLayer",
        help="FSDP's auto_wrap_policy class (the model's decoder layer)",
    )
    parser.add_argument(
        "--merge-after",
        action="store_true",
        help="merge with `tclora merge` after every fit (FSDP always does: the callback refuses it)",
    )
    parser.add_argument(
        "--fit-only", action="store_true", help="stop after each fit (no merge, no checks)"
    )
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-items", type=int, default=32, help="items per test set")
    parser.add_argument("--accelerator", choices=["gpu", "cpu"], default="gpu")
    parser.add_argument("--devices", type=int, default=None, help="default: the strategy file's")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per fit")
    args = parser.parse_args()
    data = Path(args.data)
    missing = [t for t in TASKS if not (data / "train" / f"{t}.jsonl").is_file()]
    if missing:
        parser.error(f"--data {args.data!r}: no train/<task>.jsonl for {missing}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = args.model
    if args.random_weights_from is not None:
        if not (args.random_weights_from / "config.json").is_file():
            parser.error(f"--random-weights-from {str(args.random_weights_from)!r}: no config.json")
        model = str(build_random_model(args.random_weights_from, out / "model").resolve())
    args.encoder = None
    if args.random_encoder_from is not None:
        if not (args.random_encoder_from / "modules.json").is_file():
            parser.error(
                f"--random-encoder-from {str(args.random_encoder_from)!r}: no modules.json "
                "(not a sentence-transformers folder)"
            )
        encoder = build_random_model(args.random_encoder_from, out / "encoder", encoder=True)
        args.encoder = str(encoder.resolve())
    label = (
        f"{args.random_weights_from} architecture, random weights"
        if args.random_weights_from
        else model
    )

    records = []
    for strategy in args.strategies:
        if strategy == "deepspeed":
            try:
                import deepspeed  # noqa: F401
            except ImportError:
                print("deepspeed: not installed, skipped", flush=True)
                continue
        print(f"=== {strategy}", flush=True)
        records.append(run_strategy(strategy, model, args))
        print(table(records[-1:]), flush=True)
        # after every strategy, so a run cut off by its time limit keeps the finished records
        summary = {
            "model": label,
            "steps": args.steps,
            "batch_size": args.batch_size,
            "records": records,
        }
        (out / "gpu_strategies.json").write_text(json.dumps(summary, indent=1))
    print(f"\nmodel: {label}; {args.steps} steps, batch {args.batch_size}, 4 per-task adapters")
    print(table(records))
    return 0 if records and all(not r["problems"] for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
