"""``tclora mbc``: model-based clustering's three stages in one command.

1. **Stage 1** -- one short private LoRA per task: ``tclora fit`` with the given config(s),
   ``--data.clustering per_task``, ``--trainer.max_steps <stage1_steps>`` and the adapters
   exported to ``<output_dir>/stage1/adapters``, every adapter from the same initial weights
   (``--model.shared_init true``: their parameters differ by what training did); the config's
   ``CPMergeCallback`` is left out (stage 1's adapters are compared, not merged).
2. **Stage 2** -- the tasks' adapters grouped into ``K`` clusters by the cosine similarity of
   their flattened LoRA parameters (:func:`tclora.clustering.mbc_clusters`), written to
   ``<output_dir>/mbc.json`` (with the similarity matrix in ``<output_dir>/mbc_similarity.json``).
3. **Stage 3** -- the normal K-adapter ``tclora fit`` with ``--data.clustering mbc
   --data.mbc_assignments <output_dir>/mbc.json``; everything else comes from the config(s) and
   the extra arguments (its own export folder, logger, merge callback).

Stage 1 is trained afresh on every call (its adapters are replaced whole), so a stage-2 file can
never come from other data or another config. Every argument tclora mbc does not know is passed
to both fits, e.g. ``--trainer.accelerator cpu``.

Example::

    tclora mbc --config configs/demo.yaml --num_clusters 2 --stage1_steps 100 \\
        --output_dir runs/mbc
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["build_parser", "mbc_main", "stage1_tasks"]


def build_parser() -> argparse.ArgumentParser:
    """The ``tclora mbc`` argument parser (unknown arguments go to both fits)."""
    parser = argparse.ArgumentParser(
        prog="tclora mbc",
        description="Model-based clustering: (1) one short LoRA per task, (2) group the tasks by "
        "the cosine similarity of their LoRA parameters, (3) fit one adapter per group. Other "
        "arguments (--trainer.*, --model.*, --data.*) go to both fits.",
    )
    parser.add_argument(
        "--config", action="append", required=True, help="fit config(s), as for tclora fit"
    )
    parser.add_argument("--num_clusters", type=int, required=True, help="K, the number of groups")
    parser.add_argument(
        "--stage1_steps",
        type=int,
        default=100,
        help="optimizer steps of stage 1 (all tasks' adapters together; default 100)",
    )
    parser.add_argument(
        "--output_dir",
        default="runs/mbc",
        help="folder of the stage files: stage1/ (its fit and adapters), mbc.json, "
        "mbc_similarity.json (default runs/mbc)",
    )
    parser.add_argument("--seed", type=int, default=42, help="k-means seed of stage 2 (mttl: 42)")
    parser.add_argument(
        "--stop_after",
        choices=["stage1", "stage2", "stage3"],
        default="stage3",
        help="stop after this stage (stage2: write mbc.json, no K-adapter fit)",
    )
    return parser


def _check(args: argparse.Namespace, extra: Sequence[str]) -> None:
    """Bad input, before any fit."""
    for config in args.config:
        if not Path(config).is_file():
            raise SystemExit(f"tclora mbc: error: --config {config!r}: no such file")
    if args.num_clusters < 1:
        raise SystemExit(f"tclora mbc: error: --num_clusters {args.num_clusters}: must be >= 1")
    if args.stage1_steps < 1:
        raise SystemExit(f"tclora mbc: error: --stage1_steps {args.stage1_steps}: must be >= 1")
    owned = (
        "--data.clustering",
        "--data.mbc_assignments",
        "--trainer.max_steps",
        "--model.shared_init",
    )
    clash = [a for a in extra if a.split("=", 1)[0] in owned]
    if clash:
        raise SystemExit(
            f"tclora mbc: error: {clash[0]!r}: tclora mbc sets {', '.join(owned)} for its stages "
            "(use --stage1_steps for stage 1; stage 3's max_steps comes from the config)"
        )
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise SystemExit(f"tclora mbc: error: --output_dir {str(out)!r} is a file, not a folder")


def stage1_tasks(datamodule: Any) -> list[str]:
    """The task of each stage-1 adapter (``cluster_k`` → task), read from the fit's own
    assignments: every cluster of a ``per_task`` fit holds exactly one task.

    Raises:
        ValueError: a cluster holding several tasks (not a per-task fit).
    """
    tasks: dict[int, set[str]] = {}
    for sample, cluster in zip(datamodule.samples, datamodule.assignments.tolist(), strict=True):
        tasks.setdefault(int(cluster), set()).add(sample.task)
    mixed = {k: sorted(v) for k, v in tasks.items() if len(v) != 1}
    if mixed:
        raise ValueError(f"stage 1 is not one task per adapter: clusters {mixed}")
    return [next(iter(tasks[k])) for k in sorted(tasks)]


def _stage_cli(args: Sequence[str], run: bool = True) -> Any:
    """``tclora fit``'s CLI on a stage's own arguments.

    Lightning warns when a CLI gets ``args`` while the process has command-line arguments (here
    always: ``tclora mbc ...``); each stage's arguments are built on purpose, so that one warning
    is left out.
    """
    import warnings

    from tclora.cli import cli_main

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended")
        return cli_main(list(args), run=run)


def mbc_main(argv: Sequence[str] | None = None) -> int:
    """Run the stages; returns the exit code."""
    import numpy as np
    from lightning.pytorch.utilities import rank_zero_info as info

    from tclora._io import atomic_write_text
    from tclora.callbacks import CPMergeCallback
    from tclora.clustering import (
        mbc_clusters,
        mbc_similarity,
        mbc_vectors,
        read_adapter_folders,
        write_mbc_assignments,
    )

    args, extra = build_parser().parse_known_args(argv)
    _check(args, extra)
    out = Path(args.output_dir)
    configs = [a for c in args.config for a in ("--config", c)]
    adapters = out / "stage1" / "adapters"

    info(f"tclora mbc: stage 1, one LoRA per task ({args.stage1_steps} steps) -> {adapters}")
    stage1 = _stage_cli(
        [
            *configs,
            *extra,
            "--data.clustering",
            "per_task",
            "--trainer.max_steps",
            str(args.stage1_steps),
            "--trainer.default_root_dir",
            str(out / "stage1"),
            "--model.export_dir",
            str(adapters),
            # one initialisation for every task's adapter: their differences are the training
            "--model.shared_init",
            "true",
        ],
        run=False,
    )
    # stage 1's adapters are only compared, never merged: no merge study at its fit end
    trainer: Any = stage1.trainer
    merging = [c for c in trainer.callbacks if isinstance(c, CPMergeCallback)]
    if merging:
        info("tclora mbc: stage 1 runs without the config's CPMergeCallback (stage 3 has it)")
        trainer.callbacks = [c for c in trainer.callbacks if c not in merging]
    stage1.trainer.fit(stage1.model, datamodule=stage1.datamodule)
    tasks = stage1_tasks(stage1.datamodule)
    if args.stop_after == "stage1":
        return 0
    # Under a multi-process strategy every rank runs this command: rank zero exports stage 1's
    # adapters at its fit end, every rank then groups them (the same way, so an error stops them
    # all), rank zero alone writes the stage files, and stage 3 starts once they are written.
    strategy = stage1.trainer.strategy
    strategy.barrier("tclora mbc: stage 1 exported")
    folders = {task: adapters / f"cluster_{k}" for k, task in enumerate(tasks)}
    weights = read_adapter_folders(folders)
    groups = mbc_clusters(weights, args.num_clusters, seed=args.seed)
    path = out / "mbc.json"
    if stage1.trainer.is_global_zero:
        names, vectors = mbc_vectors(weights)
        similarity = {
            "tasks": names,
            "cosine": np.round(mbc_similarity(vectors), 6).tolist(),
            "groups": [groups[t] for t in names],
        }
        atomic_write_text(out / "mbc_similarity.json", json.dumps(similarity, indent=1) + "\n")
        write_mbc_assignments(path, groups)
    strategy.barrier("tclora mbc: stage 2 written")
    info(
        f"tclora mbc: stage 2, {len(tasks)} tasks -> {args.num_clusters} groups {groups} -> {path}"
    )
    if args.stop_after == "stage2":
        return 0
    info("tclora mbc: stage 3, one adapter per group")
    _stage_cli(
        ["fit", *configs, *extra, "--data.clustering", "mbc", "--data.mbc_assignments", str(path)]
    )
    return 0
