"""The sweep's pieces (``benchmarks/repro/pieces.py``): a run longer than a session goes on, on a
new machine, from the adapters and study rows it committed."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from helpers import fit_config, fruit_eval_set, git, init_repo, tiny_study_callback

from benchmarks.repro.pieces import (
    DATAMODULE_STATE,
    LoadTrainedAdapters,
    Piece,
    PieceKeeper,
    commit_paths,
    retire_pieces,
    study_only_overrides,
    training_identity,
)
from benchmarks.repro.sweep import Sweep
from tclora.cli import cli_main


def _adapters(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    return {
        p.name: load_file(p / "adapter_model.safetensors")
        for p in sorted(folder.iterdir())
        if p.is_dir()
    }


def test_a_study_goes_on_from_committed_adapters_and_rows_bit_for_bit(
    tmp_path: Path,
    tiny_model_dir: Path,
    multitask_jsonl: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Session 1 trains (SaveTrainedAdapters exports the adapters as training ends) and its
    study finishes 2 rows; session 2, on a machine with none of session 1's folders, loads the
    kept adapters into a fit of 0 steps: the study's fingerprint is the same, so it takes the 2
    rows and computes the rest, and every row equals the uninterrupted study's."""
    heldout = fruit_eval_set(tmp_path / "heldout.jsonl")

    def config(out: Path, callbacks: list[dict[str, Any]]) -> str:
        cfg = fit_config(out, tiny_model_dir, multitask_jsonl, tmp_path / "cache", tensorboard=True)
        cfg["data"]["num_clusters"] = 2
        cfg["trainer"]["callbacks"] = [
            *callbacks,
            tiny_study_callback(heldout, out, ["uniform", "ties"]),
        ]
        path = out.with_suffix(".yaml")
        path.write_text(yaml.safe_dump(cfg))
        return str(path)

    first = tmp_path / "first"
    save = {
        "class_path": "benchmarks.repro.pieces.SaveTrainedAdapters",
        "init_args": {"folder": str(first / "trained")},
    }
    cli_main(["fit", "--config", config(first, [save])])
    full = json.loads((first / "merge" / "results.json").read_text())["rows"]
    assert [r["name"] for r in full] == ["base", "routing", "cp2_mean_loading", "uniform", "ties"]
    trained = _adapters(first / "trained")
    exported = _adapters(first / "adapters")  # LoRAModule's export, after the study
    assert sorted(trained) == ["cluster_0", "cluster_1"]
    for name, tensors in exported.items():
        for key, value in tensors.items():
            torch.testing.assert_close(trained[name][key], value, rtol=0, atol=0)

    # "session 2": only the kept adapters and the first 2 rows of the progress survive
    second = tmp_path / "second"
    (second / "merge").mkdir(parents=True)
    progress = json.loads((first / "merge" / "merge_progress.json").read_text())
    progress["rows"] = progress["rows"][:2]
    (second / "merge" / "merge_progress.json").write_text(json.dumps(progress))
    kept = tmp_path / "kept"
    shutil.copytree(first / "trained", kept)
    shutil.copy2(first / DATAMODULE_STATE, tmp_path / DATAMODULE_STATE)
    shutil.rmtree(first)
    load = {
        "class_path": "benchmarks.repro.pieces.LoadTrainedAdapters",
        "init_args": {"folder": str(kept), "datamodule_state": str(tmp_path / DATAMODULE_STATE)},
    }
    # another data seed: the data module alone would split and cluster differently; the kept
    # state gives the study the clusters and validation split the adapters were trained with
    argv = [
        "fit",
        "--config",
        config(second, [load]),
        "--trainer.max_steps",
        "0",
        "--data.seed",
        "7",
    ]
    with caplog.at_level(logging.INFO):
        cli = cli_main(argv)
    assert cli.trainer.global_step == 0
    assert "resuming, 2 rows of this very study already done" in caplog.text
    again = json.loads((second / "merge" / "results.json").read_text())["rows"]
    for row in again + full:
        row.pop("merge_seconds")  # the one field that is a timing
    assert again == full
    for name, tensors in _adapters(second / "adapters").items():
        for key, value in tensors.items():
            torch.testing.assert_close(trained[name][key], value, rtol=0, atol=0)


def test_load_trained_adapters_refuses_what_would_train_or_does_not_fit(
    tmp_path: Path, tiny_model_dir: Path, multitask_jsonl: Path
) -> None:
    with pytest.raises(ValueError, match=r"folder='.*nope' is not an adapter export"):
        LoadTrainedAdapters(str(tmp_path / "nope"))
    cfg = fit_config(tmp_path / "run", tiny_model_dir, multitask_jsonl, tmp_path / "cache")
    cfg["data"]["num_clusters"] = 2
    export = tmp_path / "run" / "adapters"
    cli_main(["fit", "--config", _write(tmp_path / "a.yaml", cfg)])
    with pytest.raises(ValueError, match=r"datamodule_state='.*gone' does not exist"):
        LoadTrainedAdapters(str(export), datamodule_state=str(tmp_path / "gone"))
    load = {
        "class_path": "benchmarks.repro.pieces.LoadTrainedAdapters",
        "init_args": {"folder": str(export)},
    }
    cfg["model"]["export_dir"] = str(tmp_path / "other")
    cfg["trainer"]["callbacks"] = [load]
    with pytest.raises(ValueError, match=r"trainer.max_steps=4; .* so max_steps must be 0"):
        cli_main(["fit", "--config", _write(tmp_path / "b.yaml", cfg)])
    cfg["data"]["num_clusters"] = 3
    with pytest.raises(ValueError, match=r"holds adapters \['cluster_0', 'cluster_1'\], the mod"):
        cli_main(["fit", "--config", _write(tmp_path / "c.yaml", cfg), "--trainer.max_steps", "0"])
    cfg["data"]["num_clusters"] = 2
    cfg["model"]["r"] = 2  # another rank: the kept tensors do not fit
    with pytest.raises(ValueError, match=r"does not fit adapter 'cluster_0' of the module"):
        cli_main(["fit", "--config", _write(tmp_path / "d.yaml", cfg), "--trainer.max_steps", "0"])


def _write(path: Path, cfg: dict[str, Any]) -> str:
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _sweep_in_repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Sweep]:
    """A throwaway git repository holding the sweep's folders; pieces commit there."""
    import benchmarks.repro.pieces as pieces

    (tmp_path / "README.md").write_text("x\n")
    repo = init_repo(tmp_path, commit="start")
    monkeypatch.setattr(pieces, "ROOT", repo)
    return repo, Sweep(work_dir=repo / "work", results_dir=repo / "results")


def _fake_export(folder: Path, names: list[str], source: str | None = None) -> None:
    """What SaveTrainedAdapters exports (by default from this process's tclora source)."""
    from safetensors.torch import save_file

    import tclora

    folder.mkdir(parents=True)
    for i, name in enumerate(names):
        (folder / name).mkdir()
        save_file({"w": torch.full((2,), float(i))}, folder / name / "adapter_model.safetensors")
    meta = {"adapters": names, "tclora_source": source or tclora.SOURCE_DIGEST}
    (folder / "tclora_adapters.json").write_text(json.dumps(meta))


def test_the_keeper_commits_adapters_then_progress_and_a_new_machine_restores_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    repo, sweep = _sweep_in_repo(tmp_path, monkeypatch)
    piece = Piece(sweep, "kmeans4", 0)
    identity = training_identity({"trainer": {"max_epochs": 2, "callbacks": []}}, "digest")
    (piece.run / "tensorboard").mkdir(parents=True)
    (piece.run / "tensorboard" / "events.out").write_text("train steps")
    keeper = PieceKeeper(piece, identity, earlier=[10.0], commit=True, progress_every=0.0)
    keeper.poll()
    assert not piece.folder.exists()  # nothing finished yet
    _fake_export(piece.run / "trained_adapters", ["cluster_0", "cluster_1"])
    keeper.poll()
    assert piece.has_adapters() and piece.mismatch(identity) == [] and piece.verify() is None
    assert (piece.folder / "tensorboard" / "events.out").read_text() == "train steps"
    log = git(repo, "log", "--format=%s", "-1", "--name-only").split("\n")
    assert log[0] == "Sweep piece: kmeans4 seed 0, trained adapters (the study goes on)"
    assert "results/pieces/kmeans4-seed0/adapters/cluster_1/adapter_model.safetensors" in log
    (piece.run / "merge").mkdir()
    (piece.run / "merge" / "merge_progress.json").write_text(json.dumps({"rows": [{}, {}]}))
    keeper.poll()
    assert (
        git(repo, "log", "--format=%s", "-1") == "Sweep piece: kmeans4 seed 0, 2 study rows done\n"
    )
    keeper.poll()  # unchanged: no new commit
    assert (
        git(repo, "log", "--format=%s", "-1") == "Sweep piece: kmeans4 seed 0, 2 study rows done\n"
    )
    assert piece.attempts()[0] == 10.0 and len(piece.attempts()) == 2
    assert git(repo, "status", "--porcelain", "results") == ""

    # a new machine: the run folder is gone; restore puts back the progress, events, attempts
    shutil.rmtree(sweep.work_dir)
    piece.restore()
    assert json.loads((piece.run / "merge" / "merge_progress.json").read_text()) == {
        "rows": [{}, {}]
    }
    assert (piece.run / "tensorboard" / "events.out").is_file()
    assert json.loads((piece.run / "attempts.json").read_text()) == piece.attempts()
    overrides = {
        "trainer": {
            "max_epochs": 2,
            "callbacks": [
                {"class_path": "tclora.callbacks.CPMergeCallback"},
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint"},
            ],
        }
    }
    study = study_only_overrides(overrides, piece)["trainer"]
    assert study["max_steps"] == 0 and study["enable_checkpointing"] is False
    assert [c["class_path"] for c in study["callbacks"]] == [
        "benchmarks.repro.pieces.LoadTrainedAdapters",
        "tclora.callbacks.CPMergeCallback",
    ]

    # the same run from a checkout laid at another path has the same identity
    here = {"data": {"path": str(repo / "work" / "data" / "x.jsonl")}, "trainer": {}}
    there = {"data": {"path": "/elsewhere/work/data/x.jsonl"}, "trainer": {}}
    assert training_identity(here, "d", {"work_dir": repo / "work"}) == training_identity(
        there, "d", {"work_dir": Path("/elsewhere/work")}
    )
    assert training_identity(here, "d", {"work_dir": repo / "work"})["run"] == {
        "data": {"path": "<work_dir>/data/x.jsonl"},
        "trainer": {},
    }
    # another training identity (here: the tclora source) is named and never used
    changed = {**identity, "tclora_source": "edited"}
    assert piece.mismatch(changed) == ["tclora_source"]
    (piece.adapters / "cluster_0" / "adapter_model.safetensors").write_bytes(b"changed")
    assert "does not hold the files piece.json names" in str(piece.verify())


def test_adapters_fitted_by_an_edited_tclora_are_not_kept_and_no_run_starts_after_an_edit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: the sweep stamped a piece with the tclora source it had imported, while the
    run's fit process imported the files as they were at its start: after an edit of tclora/
    mid-sweep, the piece named code that did not train it."""
    import tclora
    from benchmarks.repro import runs

    repo, sweep = _sweep_in_repo(tmp_path, monkeypatch)
    piece = Piece(sweep, "kmeans4", 0)
    identity = training_identity({"trainer": {}}, "digest")
    keeper = PieceKeeper(piece, identity, earlier=[], commit=True)
    _fake_export(piece.run / "trained_adapters", ["cluster_0"], source="f" * 64)
    keeper.poll()
    keeper.poll()  # said once
    err = capsys.readouterr().err
    assert err.count("adapters not kept") == 1
    assert (
        f"the fit ran tclora source ffffffffffff, not the {tclora.SOURCE_DIGEST[:12]} this "
        "sweep started with (tclora/ edited while it ran)"
    ) in err
    assert not piece.folder.exists() and git(repo, "ls-files", "results") == ""

    monkeypatch.setattr(tclora, "_source_digest", lambda: "e" * 64)
    with pytest.raises(
        SystemExit,
        match=rf"tclora/ changed since this sweep started \(source {tclora.SOURCE_DIGEST[:12]} "
        r"then, eeeeeeeeeeee now\).*restart the sweep",
    ):
        runs.run_one(sweep, "kmeans4", 1, evaluate_base=False, commit=False)
    assert not runs.run_dir(sweep, "kmeans4", 1).exists()  # refused before any work


def test_use_piece_fits_afresh_when_the_piece_was_made_otherwise(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from benchmarks.repro.runs import _use_piece

    repo, sweep = _sweep_in_repo(tmp_path, monkeypatch)
    piece = Piece(sweep, "per_task", 1)
    identity = training_identity({"trainer": {}}, "digest")
    _fake_export(repo / "trained", ["cluster_0"])
    piece.save_adapters(repo / "trained", identity, [5.0])
    commit_paths([piece.folder], "kept")
    assert _use_piece(piece, identity, commit=True)
    assert "trained in an earlier session; its merge study goes on" in capsys.readouterr().out
    assert not _use_piece(piece, training_identity({"trainer": {}}, "other"), commit=True)
    assert "its adapters were made by another sweep; fitting afresh" in capsys.readouterr().out
    assert not piece.folder.exists()
    assert git(repo, "ls-files", "results") == ""  # committed as removed
    assert not _use_piece(piece, identity, commit=True)  # nothing left: a plain fit


def test_pieces_are_retired_when_the_records_hold_the_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """per_task's adapters are MBC's stage 1: kept until the seed's mbc runs are recorded."""
    sweep = Sweep(work_dir=tmp_path / "work", results_dir=tmp_path / "results")
    for variant in ("per_task", "kmeans4", "mbc4"):
        _fake_export(Piece(sweep, variant, 0).adapters, ["cluster_0"])
    records = sweep.results_dir / "runs"
    records.mkdir(parents=True)
    (records / "kmeans4-seed0.json").write_text("{}")
    assert retire_pieces(sweep, "kmeans4", 0) == [Piece(sweep, "kmeans4", 0).folder]
    (records / "per_task-seed0.json").write_text("{}")
    assert retire_pieces(sweep, "per_task", 0) == []  # mbc4 seed 0 still needs them
    (records / "mbc4-seed0.json").write_text("{}")
    assert retire_pieces(sweep, "mbc4", 0) == [
        Piece(sweep, "mbc4", 0).folder,
        Piece(sweep, "per_task", 0).folder,
    ]
    assert list((sweep.results_dir / "pieces").iterdir()) == []


def test_the_runs_fit_process_can_import_the_pieces_callbacks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The override names ``benchmarks.repro.pieces.SaveTrainedAdapters`` by class path, so the
    ``tclora fit`` process must import ``benchmarks`` (before, it failed with exit 2: "No module
    named 'benchmarks'", which the in-process tests could not see)."""
    import sys

    from benchmarks.repro import runs

    sweep = Sweep(work_dir=tmp_path / "work", results_dir=tmp_path / "results", seeds=(0,))
    seen: dict[str, Any] = {}

    def capture(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess:
        seen.update(command=command, env=kwargs["env"])
        raise SystemExit(143)

    monkeypatch.setattr(runs.subprocess, "run", capture)
    stale = Piece(sweep, "kmeans4", 0).run / "trained_adapters"
    stale.mkdir(parents=True)  # an earlier attempt's export: never taken for this attempt's
    (stale.parent / DATAMODULE_STATE).write_text("old")
    with pytest.raises(SystemExit, match="143"):
        runs.run_one(sweep, "kmeans4", 0, evaluate_base=False)
    assert not stale.exists() and not (stale.parent / DATAMODULE_STATE).exists()
    override = yaml.safe_load(Path(seen["command"][-1]).read_text())
    callbacks = [c["class_path"].rpartition(".")[2] for c in override["trainer"]["callbacks"]]
    assert callbacks == ["SaveTrainedAdapters", "CPMergeCallback", "ModelCheckpoint"]
    (save,) = [
        c
        for c in override["trainer"]["callbacks"]
        if c["class_path"].endswith("SaveTrainedAdapters")
    ]
    module, _, name = save["class_path"].rpartition(".")
    monkeypatch.undo()
    done = subprocess.run(
        [sys.executable, "-c", f"from {module} import {name}"],
        cwd=tmp_path,  # not the checkout: only PYTHONPATH can make it importable
        env=seen["env"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr


def test_status_says_what_each_run_has(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks.repro.cli import main

    sweep = Sweep(
        work_dir=tmp_path / "work",
        results_dir=tmp_path / "results",
        seeds=(0,),
        variants=("per_task", "kmeans4", "kmeans8", "single", "mbc4"),
    )
    (sweep.results_dir / "runs").mkdir(parents=True)
    (sweep.results_dir / "runs" / "per_task-seed0.json").write_text("{}")
    piece = Piece(sweep, "kmeans4", 0)
    _fake_export(tmp_path / "trained", ["cluster_0"])
    piece.save_adapters(tmp_path / "trained", training_identity({"trainer": {}}, "d"), [1.0])
    piece.progress.write_text(json.dumps({"rows": [{}, {}, {}]}))
    for variant in ("kmeans8", "single"):
        (Piece(sweep, variant, 0).run / "checkpoints").mkdir(parents=True)
    torch.save({"global_step": 75}, Piece(sweep, "kmeans8", 0).run / "checkpoints" / "last.ckpt")
    (Piece(sweep, "single", 0).run / "checkpoints" / "last.ckpt").write_text("")  # unreadable
    argv = ["--status", "--work-dir", str(sweep.work_dir), "--results-dir", str(sweep.results_dir)]
    assert main([*argv, "--seeds", "0", "--variants", *sweep.variants]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "per_task seed 0: recorded",
        "kmeans4 seed 0: trained; adapters and 3 study rows committed (the study goes on)",
        "kmeans8 seed 0: training on this machine (checkpoint at step 75, nothing committed yet)",
        "single seed 0: training on this machine (checkpoint unreadable: RuntimeError, nothing "
        "committed yet)",
        "mbc4 seed 0: not started",
    ]


def test_a_fit_resumed_at_its_final_step_still_keeps_its_adapters(
    tmp_path: Path, tiny_model_dir: Path, multitask_jsonl: Path
) -> None:
    """Resumed from a checkpoint of its last step, a fit trains nothing and Lightning skips
    ``on_train_end``: SaveTrainedAdapters exports in ``on_fit_end`` then, the same adapters."""
    cfg = fit_config(tmp_path / "run", tiny_model_dir, multitask_jsonl, tmp_path / "cache")
    cfg["data"]["num_clusters"] = 2
    ckpt = tmp_path / "ckpt"
    cfg["trainer"].update(enable_checkpointing=True)
    cfg["trainer"]["callbacks"] = [
        {
            "class_path": "benchmarks.repro.pieces.SaveTrainedAdapters",
            "init_args": {"folder": str(tmp_path / "trained")},
        },
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {
                "dirpath": str(ckpt),
                "save_top_k": 0,
                "save_last": True,
                "every_n_train_steps": 2,
            },
        },
    ]
    path = _write(tmp_path / "fit.yaml", cfg)
    cli_main(["fit", "--config", path])
    first = _adapters(tmp_path / "trained")
    shutil.rmtree(tmp_path / "trained")
    (tmp_path / DATAMODULE_STATE).unlink()
    cli = cli_main(["fit", "--config", path, "--ckpt_path", str(ckpt / "last.ckpt")])
    assert cli.trainer.global_step == 4
    again = _adapters(tmp_path / "trained")
    assert sorted(again) == sorted(first) == ["cluster_0", "cluster_1"]
    for name, tensors in first.items():
        for key, value in tensors.items():
            torch.testing.assert_close(again[name][key], value, rtol=0, atol=0)
    assert (tmp_path / DATAMODULE_STATE).is_file()


def test_a_kept_training_checkpoint_resumes_the_fit_on_a_new_machine(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fit unfinished at a session's end: ``--keep-checkpoints`` commits its last checkpoint;
    a new machine's sweep start puts it back where the pinned code resumes it; it goes once the
    run's adapters are kept; a changed file is never restored."""
    import hashlib

    from benchmarks.repro.checkpoints import Kept, keep_checkpoints, restore_checkpoints
    from benchmarks.repro.cli import main
    from benchmarks.repro.runs import resume_checkpoint

    repo, sweep = _sweep_in_repo(tmp_path, monkeypatch)
    sweep.seeds, sweep.variants = (0,), ("kmeans4", "mbc4")
    kept = Kept(sweep, "mbc4", 0)
    ckpts = kept.run_checkpoints
    ckpts.mkdir(parents=True)
    torch.save({"global_step": 30, "state_dict": {"w": torch.ones(3)}}, ckpts / "last.ckpt")
    (ckpts / "made_by.sha256").write_text(hashlib.sha256(b"the run").hexdigest())
    (kept.piece.run / "attempts.json").write_text("[100.0]")

    assert keep_checkpoints(sweep, commit=True) == [
        f"[ckpt] mbc4 seed 0: checkpoint at step 30 kept in {kept.folder}"
    ]
    assert git(repo, "log", "--format=%s", "-1") == (
        "Sweep checkpoint: mbc4 seed 0, training at step 30 (the fit resumes from it on any "
        "machine)\n"
    )
    assert git(repo, "status", "--porcelain", "results") == ""
    assert git(repo, "ls-files", "results/checkpoints").split() == [
        f"results/checkpoints/mbc4-seed0/{name}"
        for name in ("checkpoint.json", "last.ckpt", "made_by.sha256")
    ]  # the checkpoint itself too (test_run_records_are_not_git_ignored: not ignored here)
    assert kept.meta()["attempts_seconds"] == [100.0]
    assert keep_checkpoints(sweep, commit=True) == [
        "[ckpt] mbc4 seed 0: its checkpoint is kept already"
    ]

    # a new machine: runs/ is empty; the sweep's start puts the checkpoint back, and the (pinned)
    # run resumes it because the same configuration made it
    shutil.rmtree(sweep.work_dir)
    assert restore_checkpoints(sweep, commit=True) == [
        f"[ckpt] mbc4 seed 0: its kept checkpoint (step 30) put into {ckpts}"
    ]
    assert (ckpts / "last.ckpt").read_bytes() == (kept.folder / "last.ckpt").read_bytes()
    assert json.loads((kept.piece.run / "attempts.json").read_text()) == [100.0]
    assert resume_checkpoint(kept.piece.run, "the run")
    # a checkpoint of this machine as far on is left alone
    torch.save({"global_step": 40}, ckpts / "last.ckpt")
    assert restore_checkpoints(sweep, commit=True) == []
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"] == 40

    # the status says so
    argv = ["--work-dir", str(sweep.work_dir), "--results-dir", str(sweep.results_dir)]
    assert main(["--status", *argv, "--seeds", "0", "--variants", "kmeans4", "mbc4"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        "mbc4 seed 0: training on this machine (checkpoint at step 40, nothing committed yet); "
        "a checkpoint at step 30 committed"
    )

    # a kept file that changed is removed, never restored
    shutil.rmtree(sweep.work_dir)
    (kept.folder / "last.ckpt").write_bytes(b"changed")
    assert restore_checkpoints(sweep, commit=True) == [
        f"[ckpt] mbc4 seed 0: its last.ckpt is not the file checkpoint.json names (sha256 "
        f"differs); removed {kept.folder}"
    ]
    assert not ckpts.exists() and git(repo, "ls-files", "results/checkpoints") == ""

    # once the run's trained adapters are kept, its checkpoint is not needed
    ckpts.mkdir(parents=True)
    torch.save({"global_step": 50}, ckpts / "last.ckpt")
    (ckpts / "made_by.sha256").write_text("x")
    assert main(["--keep-checkpoints", "--commit-records", *argv, "--seeds", "0"]) == 0
    assert kept.exists() and "step 50 kept" in capsys.readouterr().out
    _fake_export(repo / "trained", ["cluster_0"])
    kept.piece.save_adapters(repo / "trained", training_identity({"trainer": {}}, "d"), [1.0])
    assert restore_checkpoints(sweep, commit=True) == [
        f"[ckpt] mbc4 seed 0: trained (adapters kept or recorded); removed {kept.folder}"
    ]
    assert git(repo, "ls-files", "results/checkpoints") == ""
