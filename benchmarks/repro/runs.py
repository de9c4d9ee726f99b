"""One run of the sweep: its override config on top of ``configs/repro_small.yaml``, its
``tclora fit`` invocation (skipped when its record exists; a finished run writes its record), and the evaluation of the one-LoRA
run, which has no merge study (one adapter cannot be merged) and is scored here instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml  # type: ignore[import-untyped]

from benchmarks.repro.pieces import (
    DATAMODULE_STATE,
    TRAINED,
    Piece,
    PieceKeeper,
    check_tclora_source,
    commit_paths,
    retire_pieces,
    study_only_overrides,
    training_identity,
)
from benchmarks.repro.publish import publish_summary
from benchmarks.repro.records import record_path, training_digest, write_record
from benchmarks.repro.sweep import (
    BASE_CONFIG,
    ROOT,
    Sweep,
    base_config,
    callback_options,
    eval_files,
    merge_callback,
    run_dir,
    study_config,
    variant_clusters,
)
from tclora._io import atomic_write_text

__all__ = [
    "CHECKPOINT_EVERY",
    "checkpoint_callback",
    "evaluate_single_lora",
    "exit_on_termination",
    "mbc_stage2",
    "resume_checkpoint",
    "run_one",
    "run_overrides",
]


def _deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


CHECKPOINT_EVERY = 25  # training steps between checkpoints (~2 min on 2 cores)


def checkpoint_callback(folder: Path) -> dict[str, Any]:
    """The ``ModelCheckpoint`` of a run: ``<run>/checkpoints/last.ckpt`` every
    :data:`CHECKPOINT_EVERY` steps, always overwritten (adapters and optimizer state only:
    :class:`tclora.LoRAModule` leaves the frozen base out of its checkpoints)."""
    return {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {
            "dirpath": str(folder / "checkpoints"),
            "save_top_k": 0,
            "save_last": True,
            "every_n_train_steps": CHECKPOINT_EVERY,
            "enable_version_counter": False,
        },
    }


def run_overrides(sweep: Sweep, variant: str, seed: int, evaluate_base: bool) -> dict[str, Any]:
    """The override config of one run (on top of ``configs/repro_small.yaml``)."""
    folder = run_dir(sweep, variant, seed)
    data = sweep.work_dir / "data"
    # Arrow (peft's per-token router over the run's adapters) beside every merge study
    refs = ["routing", "arrow"] + (["single"] if variant == "per_task" else [])
    # per_task numbers its clusters by task name, sorted (tclora.clustering.per_task_assignments):
    # each per-task adapter is the normaliser of its own task only, so it is scored there alone
    # (12 adapters x 1 set instead of x 18 sets: 11 fewer evaluation passes per seed)
    own = {f"cluster_{i}": [t] for i, t in enumerate(sorted(sweep.train_tasks))}
    callback = merge_callback(base_config())
    callback["init_args"] = callback_options(
        sweep,
        eval_sets=eval_files(sweep),
        output_dir=str(folder / "merge"),
        seed=seed,
        references=(["base"] if evaluate_base else []) + refs,
        **({"single_sets": own} if variant == "per_task" else {}),
    )
    if variant.startswith("kmeans"):
        clustering: dict[str, Any] = {"clustering": "kmeans", "num_clusters": int(variant[6:])}
    elif variant.startswith("mbc"):
        clustering = {"clustering": "mbc", "mbc_assignments": str(folder / "mbc.json")}
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
            # A run killed mid-way (a session's end) resumes from its last checkpoint.
            "enable_checkpointing": True,
            # One adapter cannot be merged: the single-LoRA run is evaluated by this script.
            "callbacks": ([] if variant == "single" else [callback])
            + [checkpoint_callback(folder)],
        },
        # Adapter k of seed s starts from seed 1000 s + k: every adapter has its own init --
        # except per_task, MBC's stage 1, whose adapters share one init so that their
        # parameters differ only by what each task taught them.
        "model": {
            "init_seed": 1000 * seed,
            "shared_init": variant == "per_task",
            "export_dir": str(folder / "adapters"),
        },
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
    """Score the one-LoRA run's exported adapter on every set, as the callback would (the same
    :class:`~tclora.study.StudyConfig` options, loader and :func:`tclora.evaluation.evaluate` calls).

    Writes ``merge/results.json`` in the merge study's form (rows are
    :func:`tclora.study.row_to_dict` data), plus ``eval_pass_seconds``: the time of one model
    scored on every set, the unit of the sweep's evaluation cost.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tclora.assets import resolve_model
    from tclora.study import MergeStudy, MethodResult, StudyResult, evaluate_sets, study_summary

    folder = run_dir(sweep, variant, seed)
    cfg = study_config(sweep, eval_sets=eval_files(sweep), seed=seed)
    eval_sets = MergeStudy(cfg).load_eval_sets()  # a missing file fails before any model loads
    adapters = sorted(p for p in (folder / "adapters").iterdir() if p.is_dir())
    if len(adapters) != 1:
        raise SystemExit(f"{folder / 'adapters'}: expected one exported adapter, got {adapters}")
    path = resolve_model(base_config()["model"]["model"])
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path), adapters[0])
    torch.manual_seed(seed)
    start = time.perf_counter()
    items: dict[str, str] = {}
    scores = evaluate_sets(model, tokenizer, eval_sets, cfg, items=items)  # the study's scoring
    seconds = time.perf_counter() - start
    row = MethodResult(name="single_lora", kind="reference", scores=scores, items=items)
    result = StudyResult([row], list(scores), cp_fit_error={}, loadings={}, kept=None)
    summary: dict[str, Any] = {
        **study_summary(result, adapters=[adapters[0].name], fingerprint=None),
        "eval_pass_seconds": seconds,
    }
    atomic_write_text(folder / "merge" / "results.json", json.dumps(summary, indent=1))


def mbc_stage2(sweep: Sweep, variant: str, seed: int) -> Path:
    """MBC's stage 2 for an ``mbc<K>`` run: the ``per_task`` run of the same seed is stage 1
    (one private LoRA per task, its full training budget); its adapters are grouped into ``K``
    clusters (:func:`tclora.clustering.mbc_clusters`) and written to ``<run>/mbc.json``.

    Raises:
        SystemExit: the ``per_task`` run of this seed has not exported its adapters yet.
    """
    from tclora.clustering import mbc_clusters, read_adapter_folders, write_mbc_assignments

    k = variant_clusters(variant)
    assert k is not None and variant.startswith("mbc"), variant
    stage1 = run_dir(sweep, "per_task", seed) / "adapters"
    kept = Piece(sweep, "per_task", seed)
    if not (stage1 / "tclora_adapters.json").is_file() and kept.has_adapters():
        stage1 = kept.adapters  # a new machine: the adapters the per_task run committed
    if not (stage1 / "tclora_adapters.json").is_file():
        raise SystemExit(
            f"{variant} seed {seed}: MBC groups the tasks by the per_task run's adapters, and "
            f"{stage1} has none; run the per_task variant of seed {seed} first"
        )
    # per_task numbers its clusters by task name, sorted (tclora.clustering.per_task_assignments)
    tasks = sorted(sweep.train_tasks)
    groups = mbc_clusters(
        read_adapter_folders({t: stage1 / f"cluster_{i}" for i, t in enumerate(tasks)}), k
    )
    return write_mbc_assignments(run_dir(sweep, variant, seed) / "mbc.json", groups)


def resume_checkpoint(folder: Path, made_by: str) -> bool:
    """Whether a run goes on from ``<run>/checkpoints/last.ckpt`` (an earlier attempt was killed).

    Only a checkpoint made by the very same run configuration is resumed: ``made_by`` (the
    run's override text and its training identity: the sweep's training digest, tclora's source
    and the packages' versions, :func:`benchmarks.repro.pieces.training_identity`) is stored
    beside the checkpoints as a sha256. A checkpoint of another configuration, or one that is
    not a whole archive, is moved aside (``checkpoints-stale-<time>``, nothing deleted) and the
    run starts afresh, saying so.

    Args:
        folder: The run folder.
        made_by: What the checkpoints of this run are made by.

    Returns:
        ``True`` when ``last.ckpt`` exists and was made by ``made_by``.
    """
    checkpoints = folder / "checkpoints"
    stamp = checkpoints / "made_by.sha256"
    digest = hashlib.sha256(made_by.encode()).hexdigest()
    last = checkpoints / "last.ckpt"
    stamped = last.is_file() and stamp.is_file() and stamp.read_text().strip() == digest
    # a checkpoint is a zip archive; one cut short (written before saves were atomic) has no
    # central directory at its end, and Lightning would fail on it deep inside the resume
    if stamped and zipfile.is_zipfile(last):
        return True
    why = (
        "holds an unreadable last.ckpt (cut short?)"
        if stamped
        else "was made by another run configuration (or has no stamp)"
    )
    if checkpoints.exists() and any(checkpoints.iterdir()):
        aside = folder / f"checkpoints-stale-{time.strftime('%Y%m%d-%H%M%S')}"
        n = 1
        while aside.exists():
            aside, n = aside.with_name(f"{aside.name.split('.')[0]}.{n}"), n + 1
        checkpoints.rename(aside)
        print(
            f"[stale] {checkpoints} {why}; moved to {aside.name}, starting afresh",
            flush=True,
        )
    checkpoints.mkdir(parents=True, exist_ok=True)
    atomic_write_text(stamp, digest + "\n")
    return False


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def exit_on_termination() -> None:
    """Make SIGTERM and SIGHUP (a session's end) exit through Python's unwinding, so that the run
    in progress records its attempt's seconds (:func:`run_one`) and its fit process is killed."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _exit_on_signal)


def run_one(
    sweep: Sweep,
    variant: str,
    seed: int,
    evaluate_base: bool,
    threads: int | None = None,
    commit: bool = False,
) -> float:
    """Fit (and evaluate) one run through the CLI unless its record exists; return seconds.

    A finished run leaves its record in ``<results_dir>/runs/`` (committed here when ``commit``,
    else commit it by hand); a run folder that finished before records existed gets its record
    written and is skipped.
    """
    folder = run_dir(sweep, variant, seed)
    record = record_path(sweep, variant, seed)
    if record.is_file():
        print(f"[skip] {variant} seed {seed}: {record} exists")
        return 0.0
    if (folder / "merge" / "results.json").is_file():  # finished here before records existed
        path = write_record(sweep, variant, seed)
        print(f"[skip] {variant} seed {seed}: finished in {folder}; record -> {path}")
        if commit:
            commit_paths(
                [path, *publish_summary(sweep)],
                f"Sweep record: {variant} seed {seed} (written from its folder)",
            )
        return 0.0
    check_tclora_source()  # before any work: the fit must run the code its piece names
    folder.mkdir(parents=True, exist_ok=True)
    if variant.startswith("mbc"):
        print(f"[mbc ] {variant} seed {seed}: groups {mbc_stage2(sweep, variant, seed)}")
    overrides = run_overrides(sweep, variant, seed, evaluate_base)
    roots = {"work_dir": sweep.work_dir, "checkout": ROOT}
    identity = training_identity(overrides, training_digest(sweep), roots)
    piece = Piece(sweep, variant, seed)
    study_only = _use_piece(piece, identity, commit)
    if study_only:  # trained in an earlier session: the merge study alone, on those adapters
        overrides = study_only_overrides(overrides, piece)
    else:  # adapters exported as training ends (before the study) are kept as this run's piece
        for stale in (folder / TRAINED, folder / DATAMODULE_STATE):  # an earlier attempt's
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink(missing_ok=True)
        save = {
            "class_path": "benchmarks.repro.pieces.SaveTrainedAdapters",
            "init_args": {"folder": str(folder / TRAINED)},
        }
        overrides["trainer"]["callbacks"].insert(0, save)
    override = folder / "overrides.yaml"
    atomic_write_text(override, yaml.safe_dump(overrides, sort_keys=False))
    exe = Path(sys.executable).with_name("tclora")
    command = [str(exe), "fit", "--config", str(BASE_CONFIG), "--config", str(override)]
    # the checkpoint of an attempt on other tclora code or packages is not resumed
    made_by = override.read_text() + json.dumps(identity, sort_keys=True)
    if not study_only and resume_checkpoint(folder, made_by):
        command += ["--ckpt_path", str(folder / "checkpoints" / "last.ckpt")]
    print(f"[run ] {variant} seed {seed}: {' '.join(command)}", flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    # the pieces' callbacks are named by class path: the CLI must import ``benchmarks``
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if threads is not None:  # on a shared machine, OpenMP spin-waits can slow small kernels a lot
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    # Earlier attempts that were killed (a session's end): their seconds stay on the record
    # (from a kept piece on a new machine: as last committed).
    attempts_file = folder / "attempts.json"
    earlier = json.loads(attempts_file.read_text()) if attempts_file.is_file() else []
    start = time.perf_counter()
    try:
        with (
            PieceKeeper(piece, identity, earlier, commit),
            open(folder / "fit.log", "a" if earlier else "w") as log,
        ):
            done = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
        if done.returncode != 0:
            raise SystemExit(
                f"{variant} seed {seed} failed (exit {done.returncode}); see {log.name}"
            )
        if variant == "single":
            evaluate_single_lora(sweep, variant, seed)
    except BaseException:  # killed or failed: keep this attempt's seconds for the record
        atomic_write_text(
            attempts_file, json.dumps([*earlier, round(time.perf_counter() - start, 1)])
        )
        raise
    seconds = time.perf_counter() - start
    timing: dict[str, Any] = {"seconds": seconds}
    if earlier:  # this attempt resumed the finished merge-study rows of the earlier ones
        timing.update(earlier_attempts_seconds=earlier, total_seconds=seconds + sum(earlier))
    if study_only:
        timing["study_only"] = True  # trained in an earlier session (its piece)
    atomic_write_text(folder / "timing.json", json.dumps(timing))
    path = write_record(sweep, variant, seed)
    print(f"[done] {variant} seed {seed}: {seconds:.0f} s; record {path}", flush=True)
    retired = retire_pieces(sweep, variant, seed)
    if commit:  # with the summary rebuilt, so that every commit passes the tests
        commit_paths(
            [path, *retired, *publish_summary(sweep)],
            f"Sweep record: {variant} seed {seed} ({seconds / 3600:.1f} h this attempt)"
            + (f"; its finished pieces removed ({len(retired)})" if retired else ""),
        )
    return seconds


def _use_piece(piece: Piece, identity: dict[str, Any], commit: bool) -> bool:
    """Whether the run goes on from its kept adapters (restored into the run folder here).

    A piece made by another training identity, or whose files changed, is removed (and the run
    fitted afresh), saying which part differs.
    """
    if not piece.folder.exists():
        return False
    if not piece.has_adapters():
        piece.discard("no whole set of trained adapters in it", commit)
        return False
    differ = piece.mismatch(identity)
    why = f"its adapters were made by another {', '.join(differ)}" if differ else piece.verify()
    if why is not None:
        piece.discard(why + "; fitting afresh", commit)
        return False
    piece.restore()
    print(
        f"[piece] {piece}: trained in an earlier session; its merge study goes on from "
        f"{piece.folder} ({piece.committed_rows()} rows committed)",
        flush=True,
    )
    return True
