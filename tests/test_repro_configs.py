"""The reproduction configs parse through the real CLI, and the sweep harness' pure parts work.

The paper configs name hub models, FLAN through ``datasets`` and GPUs, none of which exist here, so
they are parsed (``--print_config``: the CLI validates every key and type, then exits before
instantiating anything), never run.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
import yaml
from helpers import git, init_repo

from benchmarks.repro.aggregate import (
    answer_patterns,
    collect,
    gate_failures,
    one_answer_sets,
    paired_differences,
    summarise,
    timings,
)
from benchmarks.repro.data import majority_floor, prepare_data
from benchmarks.repro.report import main_table, markdown
from benchmarks.repro.runs import checkpoint_callback, run_overrides
from benchmarks.repro.sweep import (
    OOD_TASKS,
    TRAIN_TASKS,
    Sweep,
    merge_callback,
    run_dir,
    study_config,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
PAPER_EVALS = {
    "arc_challenge",
    "arc_easy",
    "boolq",
    "hellaswag",
    "openbookqa",
    "piqa",
    "winogrande",
}


def _resolved(*args: str) -> dict[str, Any]:
    from tclora.cli import cli_main

    out = io.StringIO()
    argv = mock.patch.object(sys, "argv", ["tclora"])  # pytest's own arguments are not ours
    with argv, contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", *args, "--print_config"])
    assert exit_info.value.code in (0, None)
    return dict(yaml.safe_load(out.getvalue()))


def _merge_callback(cfg: dict[str, Any]) -> dict[str, Any]:
    return dict(merge_callback(cfg)["init_args"])


@pytest.mark.parametrize(
    ("name", "model", "targets"),
    [
        ("phi3_flan", "microsoft/Phi-3-mini-4k-instruct", ["qkv_proj", "o_proj"]),
        ("mistral7b_flan", "mistralai/Mistral-7B-v0.1", ["q_proj", "k_proj", "v_proj", "o_proj"]),
    ],
)
def test_paper_config_is_the_authors_setting(name: str, model: str, targets: list[str]) -> None:
    cfg = _resolved("--config", str(CONFIGS / f"{name}.yaml"))
    hp, data, trainer = cfg["model"], cfg["data"], cfg["trainer"]
    assert (hp["model"], hp["r"], hp["lora_dropout"], hp["lr"]) == (model, 4, 0.05, 1e-4)
    assert hp["target_modules"] == targets
    assert (trainer["max_epochs"], data["batch_size"], data["max_length"]) == (5, 16, 2048)
    assert (data["num_clusters"], data["clustering"]) == (10, "kmeans")
    assert [s["hf"] for s in data["sources"]] == ["sordonia/flan-10k-flat"]
    # GPU settings agree with configs/strategies/ddp.yaml.
    ddp = yaml.safe_load((CONFIGS / "strategies" / "ddp.yaml").read_text())
    for key, value in ddp["trainer"].items():
        assert trainer[key] == value, key
    for key, value in ddp["model"].items():
        assert hp[key] == value, key
    merge = _merge_callback(cfg)
    assert {p.removeprefix("lm_eval:") for p in merge["eval_sets"]} == PAPER_EVALS
    assert set(merge["baselines"]) == {"uniform", "ties", "knots_ties", "tsv", "iso_c"}


def test_paper_config_combines_with_fsdp() -> None:
    policy = "transformers.models.phi3.modeling_phi3.Phi3DecoderLayer"
    cfg = _resolved(
        "--config",
        str(CONFIGS / "phi3_flan.yaml"),
        "--config",
        str(CONFIGS / "strategies" / "fsdp.yaml"),
        f"--trainer.strategy.init_args.auto_wrap_policy.init_args.layer_classes=[{policy}]",
    )
    strategy = cfg["trainer"]["strategy"]
    assert strategy["class_path"] == "lightning.pytorch.strategies.FSDPStrategy"
    assert strategy["init_args"]["auto_wrap_policy"] == {
        "class_path": "tclora.fsdp_policy.AdapterWrapPolicy",
        "init_args": {"layer_classes": [policy]},
    }
    # what phi3_flan.yaml's comment tells users to type
    assert (
        f"auto_wrap_policy.init_args.layer_classes='[{policy}]'"
        in (CONFIGS / "phi3_flan.yaml").read_text()
    )
    assert cfg["model"]["r"] == 4


def test_repro_small_config_and_run_overrides(tmp_path: Path) -> None:
    cfg = _resolved("--config", str(CONFIGS / "repro_small.yaml"))
    assert cfg["model"]["model"] == "smollm2-135m-instruct"
    tasks = [s["task"] for s in cfg["data"]["sources"]]
    assert tasks == list(TRAIN_TASKS) and len(tasks) >= 12
    merge = _merge_callback(cfg)
    stems = [Path(p).stem for p in merge["eval_sets"]]
    assert stems == list(TRAIN_TASKS) + list(OOD_TASKS)
    assert not set(OOD_TASKS) & set(TRAIN_TASKS) and len(OOD_TASKS) >= 6
    assert merge["cp_ranks"] == [4, 16] and len(merge["scales"]) > 1

    sweep = Sweep(work_dir=tmp_path)
    per_task = run_overrides(sweep, "per_task", 2, evaluate_base=False)
    assert per_task["data"]["clustering"] == "per_task"
    assert (per_task["seed_everything"], per_task["data"]["seed"]) == (2, 2)
    assert per_task["model"]["init_seed"] == 2000
    assert per_task["model"]["shared_init"]  # MBC's stage 1: one init for every task's adapter
    init = per_task["trainer"]["callbacks"][0]["init_args"]
    assert init["references"] == ["routing", "arrow", "single"]
    # each per-task adapter (clusters numbered by sorted task name) scored on its own task only
    assert init["single_sets"] == {f"cluster_{i}": [t] for i, t in enumerate(sorted(TRAIN_TASKS))}
    assert init["output_dir"] == str(tmp_path / "runs" / "per_task" / "seed2" / "merge")
    kmeans = run_overrides(sweep, "kmeans8", 0, evaluate_base=True)
    assert (kmeans["data"]["clustering"], kmeans["data"]["num_clusters"]) == ("kmeans", 8)
    assert not kmeans["model"]["shared_init"]
    assert "single_sets" not in kmeans["trainer"]["callbacks"][0]["init_args"]
    assert kmeans["trainer"]["callbacks"][0]["init_args"]["references"] == [
        "base",
        "routing",
        "arrow",
    ]
    mbc = run_overrides(sweep, "mbc4", 1, evaluate_base=False)
    assert mbc["data"]["clustering"] == "mbc"
    assert mbc["data"]["mbc_assignments"] == str(tmp_path / "runs" / "mbc4" / "seed1" / "mbc.json")
    # every run checkpoints (a killed run goes on from <run>/checkpoints/last.ckpt)
    single = run_overrides(sweep, "single", 0, False)["trainer"]
    assert single["enable_checkpointing"] and single["callbacks"] == [
        checkpoint_callback(tmp_path / "runs" / "single" / "seed0")
    ]
    ckpt = kmeans["trainer"]["callbacks"][-1]["init_args"]
    assert ckpt["dirpath"] == str(tmp_path / "runs" / "kmeans8" / "seed0" / "checkpoints")
    assert (ckpt["save_top_k"], ckpt["save_last"], ckpt["enable_version_counter"]) == (
        0,
        True,
        False,
    )
    # Every override, on top of the base config, still parses through the CLI.
    override = tmp_path / "overrides.yaml"
    override.write_text(yaml.safe_dump(kmeans))
    resolved = _resolved("--config", str(CONFIGS / "repro_small.yaml"), "--config", str(override))
    assert resolved["data"]["num_clusters"] == 8
    assert _merge_callback(resolved)["output_dir"].endswith("kmeans8/seed0/merge")
    override.write_text(yaml.safe_dump(per_task))
    resolved = _resolved("--config", str(CONFIGS / "repro_small.yaml"), "--config", str(override))
    assert _merge_callback(resolved)["single_sets"] == init["single_sets"]


def test_mbc_variant_groups_the_per_task_runs_adapters(tmp_path: Path) -> None:
    """Stage 2 of the sweep's MBC run reads the per_task run of the same seed (cluster_k = the
    k-th task in sorted order): two pairs of near-equal adapters give exactly those two groups."""
    from safetensors.torch import save_file

    from benchmarks.repro.runs import mbc_stage2
    from tclora.clustering import read_mbc_assignments

    # results_dir apart from the repository's, which may hold a committed per_task piece
    sweep = Sweep(
        work_dir=tmp_path, results_dir=tmp_path / "results", train_tasks=("d", "b", "a", "c")
    )
    with pytest.raises(SystemExit, match=r"mbc2 seed 0: MBC groups the tasks by the per_task"):
        mbc_stage2(sweep, "mbc2", 0)
    stage1 = tmp_path / "runs" / "per_task" / "seed0" / "adapters"
    gen = torch.Generator().manual_seed(0)
    pair = [torch.randn(4, 6, generator=gen), torch.randn(4, 6, generator=gen)]
    for i, task in enumerate(sorted(sweep.train_tasks)):
        base = pair[0] if task in ("a", "c") else pair[1]
        folder = stage1 / f"cluster_{i}"
        folder.mkdir(parents=True)
        weight = base + 1e-3 * torch.randn(4, 6, generator=gen)
        save_file(
            {"m.lora_A.weight": weight.contiguous(), "m.lora_B.weight": weight.T.contiguous()},
            str(folder / "adapter_model.safetensors"),
        )
    (stage1 / "tclora_adapters.json").write_text("{}")
    path = mbc_stage2(sweep, "mbc2", 0)
    assert path == tmp_path / "runs" / "mbc2" / "seed0" / "mbc.json"
    assert read_mbc_assignments(path) == {"a": 0, "b": 1, "c": 0, "d": 1}
    # a new machine: no per_task run folder, but its committed piece (benchmarks/repro/pieces.py)
    from benchmarks.repro.pieces import Piece

    piece = Piece(sweep, "per_task", 0)
    piece.folder.mkdir(parents=True)
    stage1.rename(piece.adapters)
    piece.meta.write_text("{}")
    path.unlink()
    assert mbc_stage2(sweep, "mbc2", 0) == path
    assert read_mbc_assignments(path) == {"a": 0, "b": 1, "c": 0, "d": 1}


def test_splits_are_disjoint_fixed_and_floors_come_from_train(tmp_path: Path) -> None:
    from tclora.evaluation import load_eval_set

    sweep = Sweep(
        work_dir=tmp_path,
        train_tasks=("food", "positive-binary-operations"),
        ood_tasks=("which_is_heavier",),
        train_items=30,
        test_items=25,
        ood_items=500,
    )
    manifest = prepare_data(sweep)
    for task in sweep.train_tasks:
        train = [json.loads(x) for x in (tmp_path / "data/train" / f"{task}.jsonl").open()]
        test = load_eval_set(tmp_path / "data/test" / f"{task}.jsonl")
        assert (len(train), len(test)) == (30, 25)
        train_prompts = {json.dumps(r["prompt"]) for r in train}
        assert not train_prompts & {json.dumps(e.prompt) for e in test.examples}
        floor = majority_floor([r["response"] for r in train], test.examples)
        assert manifest["tasks"][task]["majority"] == floor
    assert load_eval_set(tmp_path / "data/test/food.jsonl").kind == "multiple_choice"
    assert load_eval_set(tmp_path / "data/test/positive-binary-operations.jsonl").kind == (
        "exact_match"
    )
    assert manifest["tasks"]["which_is_heavier"]["n_test"] == 183  # all of a small task
    # Same settings: same files; other settings on the same folder: a clear refusal.
    before = (tmp_path / "data/test/food.jsonl").read_text()
    assert prepare_data(sweep) == manifest
    assert (tmp_path / "data/test/food.jsonl").read_text() == before
    sweep.test_items = 26
    with pytest.raises(SystemExit, match="other split settings"):
        prepare_data(sweep)


def test_majority_floor_counts_exact_match_answers() -> None:
    from tclora.evaluation import EvalExample

    mc = [EvalExample("q", (a,), ("No", "Yes"), "t") for a in ("Yes", "No", "Yes", "Yes")]
    assert majority_floor(["No", "No", "Yes"], mc) == {"answer": "No", "accuracy": 0.25}
    em = [EvalExample("q", ("7", "seven"), None, "t"), EvalExample("q", ("8",), None, "t")]
    assert majority_floor(["seven", "Seven.", "seven"], em)["accuracy"] == 0.5


def _manifest(**majority: float | None) -> dict[str, Any]:
    """A splits manifest of 100-item tasks: ``name=majority accuracy`` for an in-domain task,
    ``name=None`` for an unseen one."""
    tasks: dict[str, Any] = {}
    for name, floor in majority.items():
        tasks[name] = {"group": "out_of_domain", "n_test": 100, "chance": 0.5}
        if floor is not None:
            tasks[name].update(group="in_domain", majority={"accuracy": floor})
    return {"tasks": tasks}


def _record(
    variant: str, seed: int, method: str, acc: dict[str, float], **fields: Any
) -> dict[str, Any]:
    """One :func:`collect` record; ``fields`` set scale, merge_seconds, cp_fit_error, storage."""
    return {
        "variant": variant,
        "seed": seed,
        "method": method,
        "kind": "merge",
        "scale": None,
        "merge_seconds": None,
        "cp_fit_error": None,
        "storage": None,
        "run_seconds": 1.0,
        "acc": acc,
        **fields,
    }


def test_summary_normalises_by_best_single_adapter_and_checks_floors() -> None:
    manifest = _manifest(a=0.5, b=0.6, u=None)

    def rec(variant: str, seed: int, method: str, a: float, b: float, u: float) -> dict[str, Any]:
        cp = method.startswith("cp")
        return _record(
            variant,
            seed,
            method,
            {"a": a, "b": b, "u": u},
            scale=2.0,
            merge_seconds=0.5,
            cp_fit_error=0.1 if cp else None,
            storage={"lora_params": 10, "cp_params": 4} if cp else None,
        )

    records = [
        rec("per_task", 0, "single:cluster_0", 0.8, 0.5, 0.5),
        rec("per_task", 0, "single:cluster_1", 0.4, 0.6, 0.5),
        rec("per_task", 1, "single:cluster_0", 1.0, 0.5, 0.5),
        rec("per_task", 1, "single:cluster_1", 0.4, 1.0, 0.5),
        {
            **rec("kmeans4", 0, "cp4_sum_components", 0.4, 0.6, 0.7),
            "norm_ratio": 0.8,
            "scale_at_edge": True,
        },
        {
            **rec("kmeans4", 1, "cp4_sum_components", 0.5, 0.5, 0.5),
            "norm_ratio": 0.6,
            "scale_at_edge": False,
        },
    ]
    summary = summarise(records, manifest)
    cp = next(r for r in summary["rows"] if r["method"] == "cp4_sum_components")
    assert math.isclose(cp["norm_ratio"], 0.7) and cp["scale_at_edge"] == 1  # of 2 seeds
    single = next(r for r in summary["rows"] if r["method"] == "single_adapters")
    assert math.isnan(single["norm_ratio"]) and single["scale_at_edge"] is None
    # seed 0: (0.4/0.8 + 0.6/0.6) / 2 = 0.75; seed 1: (0.5/1.0 + 0.5/1.0) / 2 = 0.5
    assert math.isclose(cp["normalised"], 0.625)
    assert math.isclose(cp["in_domain"], 0.5) and math.isclose(cp["out_of_domain"], 0.6)
    assert math.isclose(cp["out_of_domain_std"], math.sqrt(0.02))
    assert (cp["lora_params"], cp["cp_params"], cp["cp_fit_error"]) == (10, 4, 0.1)
    best = next(r for r in summary["rows"] if r["method"] == "single_adapters")
    assert math.isclose(best["normalised"], 1.0)
    checks = {(c["seed"], c["task"]): c["clearly_beats"] for c in summary["adapter_checks"]}
    # 0.6 vs majority 0.6 is not above it; 0.8 vs 0.5 and 1.0 vs 0.6 clearly are.
    assert checks == {(0, "a"): True, (0, "b"): False, (1, "a"): True, (1, "b"): True}
    text = markdown(summary, "cmd")
    assert "Not clearly above: b (seed 0" in text and "| kmeans4 | cp4_sum_components |" in text


def test_summary_normalises_by_each_tasks_own_adapter_scored_on_its_task_only() -> None:
    """The sweep's per_task records score each adapter on its own task alone (``single_sets``):
    the normaliser and the ``single_adapters`` row are then each task's own adapter."""
    manifest = _manifest(a=0.5, b=0.5)

    def rec(method: str, acc: dict[str, float]) -> dict[str, Any]:
        return _record("per_task" if method.startswith("single") else "kmeans4", 0, method, acc)

    records = [
        rec("single:cluster_0", {"a": 0.8}),
        rec("single:cluster_1", {"b": 0.5}),
        rec("uniform", {"a": 0.4, "b": 0.5}),
    ]
    summary = summarise(records, manifest, ["uniform"])
    own = next(r for r in summary["rows"] if r["method"] == "single_adapters")
    assert math.isclose(own["in_domain"], 0.65) and math.isclose(own["normalised"], 1.0)
    uniform = next(r for r in summary["rows"] if r["method"] == "uniform")
    assert math.isclose(uniform["normalised"], (0.4 / 0.8 + 0.5 / 0.5) / 2)
    checks = {c["task"]: c["adapter"] for c in summary["adapter_checks"]}
    assert checks == {"a": 0.8, "b": 0.5}


def test_the_gate_stops_a_seeds_merges_while_an_own_adapter_fails_its_floor(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 13: no merge of a seed runs until every task's own adapter (the seed's per_task
    run) clearly beats its majority answer; the message names each failing task and its numbers."""
    from benchmarks.repro import cli

    manifest = _manifest(a=0.5, b=0.6, u=None)
    records = [
        _record("per_task", 0, "single:cluster_0", {"a": 0.8}),
        _record("per_task", 0, "single:cluster_1", {"b": 0.62}),
        _record("per_task", 1, "single:cluster_0", {"a": 0.9}),
        _record("per_task", 1, "single:cluster_1", {"b": 0.95}),
        _record("kmeans4", 2, "single:cluster_0", {"a": 0.1, "b": 0.1}),  # not per_task
    ]
    (failure,) = gate_failures(records, manifest, 0)
    assert (failure["task"], failure["adapter"], failure["majority"]) == ("b", 0.62, 0.6)
    assert gate_failures(records, manifest, 1) == []
    assert gate_failures(records, manifest, 2) is None  # no per_task record of seed 2
    sweep = Sweep(seeds=(0, 1, 2))
    with mock.patch.object(cli, "collect", return_value=records):
        assert not cli._gate_passes(sweep, manifest, 0)
        assert "seed 0: stopped -- 1 task(s)" in capsys.readouterr().err
        assert cli._gate_passes(sweep, manifest, 1) and cli._gate_passes(sweep, manifest, 2)
        assert "seed 2: no per_task record yet" in capsys.readouterr().out
    with (
        mock.patch.object(cli, "collect", return_value=records),
        mock.patch.object(cli, "prepare_data", return_value={"settings": {}, **manifest}),
        mock.patch.object(cli, "run_one") as run_one,
    ):
        dirs = ["--work-dir", str(tmp_path / "w"), "--results-dir", str(tmp_path / "r")]
        assert cli.main([*dirs, "--seeds", "0", "--variants", "per_task", "kmeans4"]) == 3
        assert [c.args[1:3] for c in run_one.call_args_list] == [("per_task", 0)]
        err = capsys.readouterr().err
        assert "b 62.0% vs 60.0%" in err and "--no-gate runs on regardless" in err
        # checked once per seed, before its first merge run (not again before each variant)
        run_one.reset_mock()
        with mock.patch.object(cli, "_gate_passes", return_value=True) as gate:
            argv = [*dirs, "--seeds", "1", "--variants", "per_task", "kmeans4", "kmeans8"]
            cli.main(argv)
        assert gate.call_count == 1 and len(run_one.call_args_list) == 3
    with (
        mock.patch.object(cli, "collect", return_value=[]),  # nothing to aggregate: exit 1
        mock.patch.object(cli, "prepare_data", return_value={"settings": {}, **manifest}),
        mock.patch.object(cli, "run_one") as run_one,
    ):
        argv = [*dirs, "--seeds", "0", "--variants", "per_task", "kmeans4", "--no-gate"]
        assert cli.main(argv) == 1
        assert [c.args[1:3] for c in run_one.call_args_list] == [("per_task", 0), ("kmeans4", 0)]


def test_one_answer_sets_are_results_identical_to_a_constant_answer(tmp_path: Path) -> None:
    """A row whose per-item results are those of always answering one choice is counted, per
    set and seed; exact-match sets and the per-task adapters' row are not counted."""
    manifest = _manifest(a=0.5, b=0.5, u=None)
    manifest["tasks"]["a"]["kind"] = manifest["tasks"]["u"]["kind"] = "multiple_choice"
    manifest["tasks"]["b"]["kind"] = "exact_match"
    answers = {"test/a": ["Yes", "No", "No", "Yes"], "ood/u": ["X", "Y", "draw"]}
    for name, golds in answers.items():
        choices = sorted(set(golds) | {"Yes", "No"}) if name == "test/a" else ["X", "Y", "draw"]
        path = tmp_path / f"{name}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            "".join(
                json.dumps({"prompt": "p", "choices": choices, "answer": g}) + "\n" for g in golds
            )
        )
    patterns = answer_patterns(tmp_path, manifest)
    assert patterns == {
        "a": {"No": "0110", "Yes": "1001"},
        "u": {"X": "100", "Y": "010", "draw": "001"},
    }
    assert one_answer_sets({"a": "1001", "b": "1111", "u": "110"}, patterns) == ["a"]
    assert one_answer_sets({"a": "1000", "u": "001"}, patterns) == ["u"]

    def rec(seed: int, method: str, items: dict[str, str]) -> dict[str, Any]:
        acc = {t: v.count("1") / len(v) for t, v in items.items()}
        return _record("kmeans4", seed, method, acc, items=items)

    records = [
        rec(0, "uniform", {"a": "0110", "b": "0000", "u": "010"}),  # both sets one answer
        rec(1, "uniform", {"a": "1100", "b": "1000", "u": "010"}),  # u only
        rec(0, "tsv", {"a": "1101", "b": "0000", "u": "111"}),
        {**rec(0, "single:cluster_0", {"a": "1001"}), "variant": "per_task"},
    ]
    rows = {
        r["method"]: r for r in summarise(records, manifest, ["uniform", "tsv"], patterns)["rows"]
    }
    assert (rows["uniform"]["one_answer_sets"], rows["uniform"]["mc_sets"]) == (1.5, 2)
    assert (rows["tsv"]["one_answer_sets"], rows["tsv"]["mc_sets"]) == (0, 2)
    assert rows["single_adapters"]["one_answer_sets"] is None
    assert "| 1.5 of 2 |" in markdown(summarise(records, manifest, None, patterns), "cmd")
    assert all(r["one_answer_sets"] is None for r in summarise(records, manifest)["rows"])


def test_method_order_is_the_study_config_of_the_sweep() -> None:
    methods = study_config(Sweep()).method_names
    assert methods == [
        *(
            f"cp{r}_{rule}"
            for r in (4, 16)
            for rule in ("sum_components", "mean_loading", "ties_loading")
        ),
        *("uniform", "ties", "knots_ties", "tsv", "iso_c"),
    ]
    assert study_config(Sweep.quick()).method_names == [
        *(f"cp{r}_{rule}" for r in (4, 16) for rule in ("sum_components", "mean_loading")),
        *("uniform", "ties", "knots_ties", "tsv", "iso_c"),
    ]


def test_records_carry_the_runs_and_collect_reads_only_them(tmp_path: Path) -> None:
    from benchmarks.repro.records import base_scored, read_records, record_path, write_record
    from tclora.study import MethodResult, row_to_dict

    sweep = Sweep(
        work_dir=tmp_path / "work",
        results_dir=tmp_path / "results",
        seeds=(0,),
        variants=("kmeans4", "single"),
    )
    manifest = {"tasks": {"a": {}, "u": {}}}
    rows = [
        MethodResult(
            "base", "reference", scores={"a": {"acc": 0.5, "acc_norm": 0.9}}, items={"a": "10"}
        ),
        MethodResult(
            "cp4_sum_components",
            "merge",
            scale=2.0,
            merge_seconds=1.5,
            scores={"a": {"acc": 0.75}, "u": {"exact_match": 0.25}, "other": {"acc": 1.0}},
            items={"a": "1110", "u": "1000", "other": "1"},
        ),
    ]
    results = {
        "rows": [row_to_dict(r) for r in rows],
        "cp_fit_error": {"cp4": {"mean": 0.3}},
        "components": {"cp4": {"shared_fraction": 0.25, "mean_evenness": 0.4}},
    }
    merge = run_dir(sweep, "kmeans4", 0) / "merge"
    merge.mkdir(parents=True)
    (merge / "results.json").write_text(json.dumps(results))
    (merge.parent / "timing.json").write_text(json.dumps({"seconds": 12.0}))
    single = run_dir(sweep, "single", 0) / "merge"
    single.mkdir(parents=True)
    old_row = {"name": "single_lora", "kind": "reference", "scores": {"u": {"acc": 0.4}}}
    (single / "results.json").write_text(
        json.dumps({"rows": [old_row], "cp_fit_error": {}, "eval_pass_seconds": 7.0})
    )
    assert collect(sweep, manifest) == []  # run folders alone are not results
    for variant in ("kmeans4", "single"):
        write_record(sweep, variant, 0)
    shutil.rmtree(tmp_path / "work")  # aggregation needs the records only
    assert record_path(sweep, "kmeans4", 0) == tmp_path / "results/runs/kmeans4-seed0.json"
    base, cp, lora = collect(sweep, manifest)
    assert (base["method"], base["acc"], base["scale"]) == ("base", {"a": 0.5}, None)
    assert cp["acc"] == {"a": 0.75, "u": 0.25}  # accuracy, else exact match; unknown sets dropped
    assert cp["items"] == {"a": "1110", "u": "1000"}
    assert (cp["scale"], cp["merge_seconds"], cp["cp_fit_error"]) == (2.0, 1.5, 0.3)
    assert cp["run_seconds"] == 12.0 and cp["shared_fraction"] == 0.25
    assert (lora["method"], lora["acc"], lora["run_seconds"]) == ("single_lora", {"u": 0.4}, None)
    assert timings(read_records(sweep)) == {
        "kmeans4/seed0": {"seconds": 12.0},
        "single/seed0": {"eval_pass_seconds": 7.0},
    }
    # a record of other settings is never mixed in
    other = Sweep(**{**sweep.__dict__, "test_items": 20})
    with pytest.raises(
        SystemExit, match=r"kmeans4-seed0\.json was made with other sweep settings "
    ):
        read_records(other)
    # nor one fitted with another training configuration (here another learning rate)
    retrained = Sweep(**{**sweep.__dict__, "overrides": {"model": {"lr": 1e-4}}})
    with pytest.raises(SystemExit, match=r"other sweep settings \(training: \['[0-9a-f]{64}'\]"):
        read_records(retrained)
    # the base model is scored once per sweep: any record of its settings holding it counts,
    # picked or not (``--variants per_task`` must not score it a second time)
    assert base_scored(sweep) and base_scored(Sweep(**{**sweep.__dict__, "variants": ("mbc4",)}))
    assert not base_scored(other) and not base_scored(retrained)
    record_path(sweep, "kmeans4", 0).unlink()
    assert not base_scored(sweep)


def test_paired_differences_against_uniform_and_the_best_non_cp_merge() -> None:
    manifest = {
        "tasks": {"a": {"group": "in_domain"}, "u": {"group": "out_of_domain"}},
    }
    n = 100

    def rec(method: str, seed: int, right_a: int, right_u: int) -> dict[str, Any]:
        kind = "reference" if method == "routing" else "merge"
        items = {"a": "1" * right_a + "0" * (n - right_a), "u": "1" * right_u + "0" * (n - right_u)}
        return {"variant": "kmeans4", "seed": seed, "method": method, "kind": kind, "items": items}

    records = [
        r
        for seed in (0, 1)
        for r in (
            rec("uniform", seed, 50, 40),
            rec("ties", seed, 60, 40),
            rec("tsv", seed, 55, 46),
            rec("cp4_mean_loading", seed, 70, 30),
            rec("routing", seed, 65, 45),
        )
    ]
    out = paired_differences(records, manifest, n_boot=500)
    got = {(p["method"], p["versus"], p["split"]): p for p in out}
    cp = got[("cp4_mean_loading", "ties", "in_domain")]
    assert cp["versus_is_best_non_cp"] and cp["diff"] == pytest.approx(0.10)
    # each split has its own best non-CP merge: ties in-domain, tsv on unseen tasks (ties was
    # held against unseen tasks too, where tsv beats it)
    assert got[("cp4_mean_loading", "tsv", "unseen")]["versus_is_best_non_cp"]
    assert got[("cp4_mean_loading", "tsv", "unseen")]["diff"] == pytest.approx(-0.16)
    assert ("cp4_mean_loading", "ties", "unseen") not in got
    assert ("cp4_mean_loading", "tsv", "in_domain") not in got
    assert 0 < cp["low"] < 0.10 < cp["high"]  # right on 10 more items of 100, paired
    assert got[("cp4_mean_loading", "uniform", "unseen")]["diff"] == pytest.approx(-0.10)
    assert got[("cp4_mean_loading", "uniform", "in_domain")]["high"] > 0.2
    assert ("ties", "ties", "in_domain") not in got and ("uniform", "ties", "in_domain") in got
    assert got[("routing", "uniform", "in_domain")]["seeds"] == 2
    assert got[("routing", "uniform", "in_domain")]["items"] == n
    text = markdown(
        {
            "rows": [],
            "floors": {"majority_in_domain": 0.5, "chance_out_of_domain": 0.5},
            "tasks": {},
            "adapter_checks": [],
            "paired": out,
        },
        "cmd",
    )
    assert "| kmeans4 | cp4_mean_loading | ties (best non-CP) | in_domain | +10.0 |" in text


def test_figure_draws_every_method_and_the_floors(tmp_path: Path) -> None:
    from benchmarks import make_figures as figures  # sets matplotlib's Agg backend on import

    row = {"in_domain": 0.6, "in_domain_std": 0.02, "out_of_domain": 0.4}
    summary = {
        "rows": [
            {"variant": "base", "method": "base", **row},
            {"variant": "per_task", "method": "single_adapters", **row, "out_of_domain": None},
            {"variant": "kmeans4", "method": "cp4_sum_components", **row},
            {"variant": "kmeans4", "method": "tsv", **row, "out_of_domain_std": math.nan},
            {"variant": "kmeans8", "method": "tsv", **row},
        ],
        "tasks": {"a": {"group": "in_domain"}, "u": {"group": "out_of_domain"}},
        "floors": {"base": {"a": 0.5, "u": 0.3}, "majority_in_domain": 0.55},
    }
    fig = figures.figure(summary)
    top, bottom = fig.axes
    assert [t.get_text() for t in top.get_xticklabels()] == [
        "single_adapters",
        "cp4_sum_components",
        "tsv",
    ]
    assert len(top.patches) == 4  # one bar per (clustering, method) that exists
    # the per-task adapters have no unseen-task score: no empty tick for them below
    assert [t.get_text() for t in bottom.get_xticklabels()] == ["cp4_sum_components", "tsv"]
    floors = {line.get_label(): line.get_ydata()[0] for line in top.lines}
    assert floors["base model"] == pytest.approx(50.0)
    assert floors["majority answer"] == pytest.approx(55.0)
    out = tmp_path / "fig.png"
    assert figures.main(["--results", str(_write(tmp_path, summary)), "--out", str(out)]) == 0
    assert out.stat().st_size > 10_000


def test_figure_error_bars_are_the_std_over_seeds_or_one_se_with_a_single_seed() -> None:
    from benchmarks import make_figures as figures

    one_seed = {"in_domain": 0.6, "in_domain_std": math.nan, "in_domain_se": 0.05}
    assert figures.error_bars([one_seed], "in_domain") == ("se", "±1 SE over test items (one seed)")
    two_seeds = {**one_seed, "in_domain_std": 0.02}
    assert figures.error_bars([one_seed, two_seeds], "in_domain") == ("std", "std over seeds")
    assert figures.error_bars([{**one_seed, "in_domain_std": None}], "in_domain")[0] == "se"
    summary = {
        "rows": [{"variant": "kmeans4", "method": "uniform", **one_seed, "out_of_domain": 0.4}],
        "tasks": {"a": {"group": "in_domain"}, "u": {"group": "out_of_domain"}},
        "floors": {},
    }
    top, bottom = figures.figure(summary).axes
    assert top.get_ylabel() == "accuracy (%); error bars: ±1 SE over test items (one seed)"
    (errors,) = [c for c in top.containers if type(c).__name__ == "ErrorbarContainer"]
    (bar,) = errors.lines[2]  # the vertical error segments: ±5 points around 60
    ((_, low), (_, high)) = bar.get_segments()[0]
    assert (low, high) == pytest.approx((55.0, 65.0))


def test_summary_json_is_standard_json_with_null_for_missing_numbers(tmp_path: Path) -> None:
    from benchmarks.repro.report import strict_json, write_results

    tree = {"a": math.nan, "b": [1.5, math.inf, (-math.inf, "x")], "c": {"d": None, "e": 2}}
    assert strict_json(tree) == {"a": None, "b": [1.5, None, [None, "x"]], "c": {"d": None, "e": 2}}
    row = {
        "variant": "kmeans4", "method": "uniform", "seeds": 1, "in_domain": 0.5,
        "in_domain_std": math.nan, "in_domain_se": 0.05, "normalised": 0.9,
        "normalised_std": math.nan, "out_of_domain": 0.4, "out_of_domain_std": math.nan,
        "out_of_domain_se": 0.05, "scale": math.nan, "cp_fit_error": math.nan,
        "merge_seconds": 1.0, "lora_params": 10, "cp_params": None, "per_task": {"a": 0.5},
    }  # fmt: skip
    paired = {
        "variant": "kmeans4", "method": "ties", "versus": "uniform", "versus_is_best_non_cp": True,
        "split": "in_domain", "diff": 0.02, "low": -0.01, "high": 0.05, "low_seeds": math.nan,
        "high_seeds": math.nan, "seeds": 1, "items": 100,
    }  # fmt: skip
    summary = {
        "rows": [row],
        "tasks": {"a": {"group": "in_domain", "n_test": 100}},
        "floors": {"majority_in_domain": 0.3, "chance_out_of_domain": 0.25},
        "adapter_checks": [],
        "paired": [paired],
    }
    sweep = Sweep(work_dir=tmp_path / "work", results_dir=tmp_path)
    with contextlib.redirect_stdout(io.StringIO()):
        write_results(summary, sweep, "cmd")
    text = (tmp_path / "repro_small.json").read_text()

    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} is not JSON")

    saved = json.loads(text, parse_constant=refuse)
    assert saved["rows"][0]["in_domain_std"] is None and saved["rows"][0]["in_domain"] == 0.5
    assert saved["paired"][0]["low_seeds"] is None
    text = (tmp_path / "repro_small.md").read_text()
    assert "| kmeans4 | uniform | 1 | 50.0 | 5.0 | 90.0 | 40.0 | 5.0 | – |" in text
    tsv = {**row, "method": "tsv", "seeds": 3, "scale": 0.25, "norm_ratio": 2.4726}
    (tsv_line,) = [line for line in main_table({**summary, "rows": [tsv]}) if "| tsv |" in line]
    assert "| 5.0 | 0.25 (2.47×) |" in tsv_line
    edge = main_table({**summary, "rows": [{**tsv, "scale_at_edge": 2}]})[-1]
    assert "| 0.25 (2.47×), edge in 2 of 3 |" in edge
    assert "| in_domain | +2.0 | [-1.0, +5.0] | – | 1 | 100 |" in text  # no interval over 1 seed


def _write(folder: Path, summary: dict[str, Any]) -> Path:
    path = folder / "summary.json"
    path.write_text(json.dumps(summary).replace("NaN", "null"))
    return path


def test_committed_summary_is_the_aggregation_of_the_committed_records(tmp_path: Path) -> None:
    """Nothing in ``benchmarks/results`` is typed by hand: ``repro_small.json`` (the README's
    sweep block is rendered from it) is exactly what aggregating the committed records gives."""
    from benchmarks.repro.cli import main

    committed = ROOT / "benchmarks" / "results"
    records = sorted((committed / "runs").glob("*.json"))
    saved_file = committed / "repro_small.json"
    if not records:
        assert not saved_file.exists(), f"{saved_file} exists without any run record"
        return
    results = tmp_path / "results"
    (results / "runs").mkdir(parents=True)
    for record in records:
        shutil.copy(record, results / "runs" / record.name)
    args = ["--aggregate-only", "--work-dir", str(tmp_path / "work"), "--results-dir", str(results)]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(args) == 0
    fresh = json.loads((results / "repro_small.json").read_text())
    saved = json.loads(saved_file.read_text())
    for summary in (fresh, saved):  # where and how it was invoked, not what it found
        summary.pop("command")
        summary["sweep"].pop("work_dir")
        summary["sweep"].pop("results_dir")
    assert json.dumps(fresh, sort_keys=True) == json.dumps(saved, sort_keys=True)


def test_run_records_are_not_git_ignored() -> None:
    """The records and kept checkpoints must be committable: a ``runs/`` ignore rule once matched
    ``benchmarks/results/runs/`` too, and the first finished run's record was invisible to git."""
    import subprocess

    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    for path in (
        "benchmarks/results/runs/kmeans4-seed0.json",
        "benchmarks/results/repro_small.json",
        # a kept training checkpoint: `*.ckpt` once hid it, so `git add` committed its
        # checkpoint.json alone and no other machine could resume the fit
        "benchmarks/results/checkpoints/single-seed0/last.ckpt",
    ):
        done = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT, check=False)
        assert done.returncode == 1, f"{path} is ignored by git"
    for path in ("runs/demo", "runs/repro_small/runs/single/seed0/checkpoints/last.ckpt"):
        done = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT, check=False)
        assert done.returncode == 0, path  # the working folders stay out of the repository
    done = subprocess.run(["git", "check-ignore", "-q", "lightning_logs/x/last.ckpt"], cwd=ROOT)
    assert done.returncode == 0  # and every other checkpoint


def _kmeans4_sweep(tmp_path: Path) -> Sweep:
    """A sweep of one run (kmeans4, seed 0) under ``tmp_path``."""
    return Sweep(
        work_dir=tmp_path / "work",
        results_dir=tmp_path / "results",
        seeds=(0,),
        variants=("kmeans4",),
    )


def _killed(calls: list[list[str]]) -> Callable[..., Any]:
    """A ``subprocess.run`` stand-in that records the command, then exits as a run killed by
    the session's end does."""

    def killed(command: list[str], **kwargs: Any) -> Any:
        calls.append(command)
        raise SystemExit(143)  # what the sweep's SIGTERM handler raises

    return killed


def test_a_killed_run_keeps_its_attempts_seconds_on_the_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A session's end kills the run in progress; the resumed run's record says so (its
    ``seconds`` are the last attempt's, which reused the earlier attempts' finished rows)."""
    import subprocess

    from benchmarks.repro import runs
    from benchmarks.repro.records import read_records

    sweep = _kmeans4_sweep(tmp_path)
    calls: list[list[str]] = []
    killed = _killed(calls)

    def finishes(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess:
        calls.append(command)
        merge = run_dir(sweep, "kmeans4", 0) / "merge"
        merge.mkdir(parents=True, exist_ok=True)
        (merge / "results.json").write_text(json.dumps({"rows": [], "cp_fit_error": {}}))
        return subprocess.CompletedProcess(command, 0)

    import signal

    previous = signal.getsignal(signal.SIGTERM)
    try:
        runs.exit_on_termination()
        with pytest.raises(SystemExit, match="143"):  # SIGTERM exits through Python's unwinding
            signal.raise_signal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, previous)
    monkeypatch.setattr(runs.subprocess, "run", killed)
    with pytest.raises(SystemExit, match="143"):
        runs.run_one(sweep, "kmeans4", 0, evaluate_base=False)
    attempts = json.loads((run_dir(sweep, "kmeans4", 0) / "attempts.json").read_text())
    assert len(attempts) == 1 and attempts[0] >= 0
    last = run_dir(sweep, "kmeans4", 0) / "checkpoints" / "last.ckpt"
    assert (last.parent / "made_by.sha256").is_file()  # stamped before the fit started
    torch.save({"global_step": 3}, last)  # what the killed attempt's ModelCheckpoint left
    monkeypatch.setattr(runs.subprocess, "run", finishes)
    seconds = runs.run_one(sweep, "kmeans4", 0, evaluate_base=False)
    timing = read_records(sweep)[("kmeans4", 0)]["timing"]
    assert timing["earlier_attempts_seconds"] == attempts
    assert math.isclose(timing["total_seconds"], seconds + attempts[0])
    assert len(calls) == 2 and calls[1] == [*calls[0], "--ckpt_path", str(last)]
    # a record exists now: the run is skipped
    assert runs.run_one(sweep, "kmeans4", 0, evaluate_base=False) == 0.0 and len(calls) == 2


def test_a_checkpoint_made_by_other_tclora_code_is_not_resumed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A sweep restarted on other tclora code (an edit between sessions) must not go on from
    the killed attempt's checkpoint: its adapters would be half one code's, half the other's."""

    import tclora
    from benchmarks.repro import runs

    sweep = _kmeans4_sweep(tmp_path)
    calls: list[list[str]] = []
    monkeypatch.setattr(runs.subprocess, "run", _killed(calls))
    for _ in range(2):  # the second attempt, same code, resumes the first one's checkpoint
        with pytest.raises(SystemExit, match="143"):
            runs.run_one(sweep, "kmeans4", 0, evaluate_base=False)
        last = run_dir(sweep, "kmeans4", 0) / "checkpoints" / "last.ckpt"
        torch.save({"global_step": 3}, last)
    assert "--ckpt_path" not in calls[0] and calls[1][-2:] == ["--ckpt_path", str(last)]
    monkeypatch.setattr(tclora, "SOURCE_DIGEST", "0" * 64)
    monkeypatch.setattr(tclora, "_source_digest", lambda: "0" * 64)
    with pytest.raises(SystemExit, match="143"):
        runs.run_one(sweep, "kmeans4", 0, evaluate_base=False)
    assert "--ckpt_path" not in calls[2]
    assert "was made by another run configuration" in capsys.readouterr().out
    (aside,) = run_dir(sweep, "kmeans4", 0).glob("checkpoints-stale-*")
    assert (aside / "last.ckpt").is_file() and not last.exists()  # kept aside, not deleted


def test_pilot_fits_per_task_only_and_checks_each_adapter_on_its_own_task(tmp_path: Path) -> None:
    """``benchmarks/repro_pilot.py``: the sweep's per_task run under another training budget,
    its study cut to the per-task adapters on the in-domain sets, reported against the floors."""
    from benchmarks.repro.pilot import pilot_sweep, report

    screen = pilot_sweep(120, 2, None, None, ["food", "sarcasm"])
    assert screen.train_tasks == ("food", "sarcasm")
    assert screen.work_dir.name.startswith("items120-epochs2-2tasks-")
    assert screen.overrides["callback"]["eval_sets"][1].endswith("test/sarcasm.jsonl")
    sweep = pilot_sweep(180, 3, 3e-4, "cosine")
    assert sweep.work_dir.name == "items180-epochs3-lr0.0003-cosine"
    assert (sweep.train_items, sweep.seeds, sweep.variants) == (180, (0,), ("per_task",))
    sweep.work_dir = tmp_path / "work"
    sweep.overrides["callback"]["eval_sets"] = [
        str(sweep.work_dir / "data" / "test" / f"{t}.jsonl") for t in sweep.train_tasks
    ]
    override = run_overrides(sweep, "per_task", 0, evaluate_base=False)
    assert override["trainer"]["max_epochs"] == 3
    assert override["model"]["lr"] == 3e-4 and override["model"]["lr_schedule"] == "cosine"
    cb = override["trainer"]["callbacks"][0]["init_args"]
    assert cb["references"] == ["single"] and len(cb["eval_sets"]) == 12
    assert cb["single_sets"]["cluster_0"] == [sorted(TRAIN_TASKS)[0]]
    cfg = study_config(sweep, eval_sets=cb["eval_sets"], single_sets=cb["single_sets"])
    assert cfg.method_names == ["cp4_sum_components", "uniform"] and cfg.scales == [1.0]

    tasks = sorted(sweep.train_tasks)
    rows = [
        {"name": f"single:cluster_{i}", "scores": {t: {"acc": 0.9 if i == 0 else 0.5}}}
        for i, t in enumerate(tasks)
    ]
    merge = run_dir(sweep, "per_task", 0) / "merge"
    merge.mkdir(parents=True)
    (merge / "merge_progress.json").write_text(json.dumps({"rows": rows}))  # a stopped run
    manifest = {
        "tasks": {t: {"n_test": 100, "majority": {"accuracy": 0.5}} for t in sweep.train_tasks}
    }
    # task 1 is multiple choice and its adapter answered "Y" to every item
    manifest["tasks"][tasks[1]].update(kind="multiple_choice", group="in_domain")
    test_file = sweep.work_dir / "data" / "test" / f"{tasks[1]}.jsonl"
    test_file.parent.mkdir(parents=True)
    golds = ["Y", "N"] * 50
    test_file.write_text(
        "".join(
            json.dumps({"prompt": "p", "choices": ["Y", "N"], "answer": g}) + "\n" for g in golds
        )
    )
    rows[1]["items"] = {tasks[1]: "10" * 50}
    (merge / "merge_progress.json").write_text(json.dumps({"rows": rows}))
    text = report(sweep, manifest, "tag")
    assert f"| {tasks[0]} | 90.0 | 50.0 | +8.7 | yes | – |" in text
    assert f"| {tasks[1]} | 50.0 | 50.0 | +0.0 | no | yes |" in text
    assert "Clearly above the majority answer (> 2 SE): 1 of 12 tasks." in text


def test_pilot_report_only_reports_without_fitting(tmp_path: Path) -> None:
    """``--report-only`` reports the pilot of the given flags as it stands and fits nothing."""
    from benchmarks.repro import pilot

    with (
        mock.patch.object(pilot, "prepare_data", return_value={"tasks": {}}),
        mock.patch.object(pilot, "run_one") as run_one,
        mock.patch.object(pilot, "report", return_value="table\n") as report,
        mock.patch.object(pilot, "atomic_write_text") as write,
        mock.patch.object(pilot, "exit_on_termination"),  # keeps pytest's own signal handlers
    ):
        argv = ["--train-items", "180", "--epochs", "4", "--tasks", "food", "sarcasm"]
        assert pilot.main([*argv, "--report-only"]) == 0
        assert not run_one.called and report.call_args.args[2].startswith("items180-epochs4-")
        assert write.call_args.args[0].name.startswith("repro_pilot-items180-epochs4-2tasks-")
        assert pilot.main(argv) == 0
        assert run_one.call_args.args[1:3] == ("per_task", 0)


def test_candidate_tasks_describe_registry_tasks_with_enough_items() -> None:
    from benchmarks.repro.pilot import candidate_tasks

    rows = candidate_tasks(["food", "imperial_date_to_string", "rectangles"], min_items=280)
    assert [r["task"] for r in rows] == ["food", "imperial_date_to_string"]  # rectangles: < 280
    food = rows[0]
    assert (food["kind"], food["items"], food["choices"]) == ("multiple_choice", 761, 2)
    assert round(food["majority"], 2) == 0.82 and food["prompt_chars"] < rows[1]["prompt_chars"]
    assert (rows[1]["kind"], rows[1]["choices"]) == ("exact_match", 0)
    assert "over_max_length" not in food  # no tokenizer, no token counts


def test_candidate_tasks_say_what_the_sweeps_lengths_would_cut(tokenizer: Any) -> None:
    """With the SmolLM2 tokenizer: the share of items longer than max_length, and of exact-match
    items whose answers cannot fit in max_new_tokens (knot-theory's 42-token answers, at 12)."""
    from benchmarks.repro.pilot import candidate_tasks

    rows = {
        r["task"]: r
        for r in candidate_tasks(
            ["food", "knot-theory"], min_items=280, tokenizer=tokenizer, max_new_tokens=12
        )
    }
    assert rows["knot-theory"]["answers_beyond"] > 0.9 and rows["food"]["answers_beyond"] == 0
    assert rows["food"]["over_max_length"] == 0
    short = candidate_tasks(["food"], min_items=280, tokenizer=tokenizer, max_length=8)
    assert short[0]["over_max_length"] == 1.0


def test_only_a_checkpoint_of_the_same_run_configuration_is_resumed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from benchmarks.repro.runs import resume_checkpoint

    run = tmp_path / "run"
    assert not resume_checkpoint(run, "config A")  # nothing yet: stamped, fresh start
    torch.save({"global_step": 7}, run / "checkpoints" / "last.ckpt")
    weights = (run / "checkpoints" / "last.ckpt").read_bytes()
    assert resume_checkpoint(run, "config A")
    # another configuration (a changed lr, task list, ...): moved aside, never resumed
    assert not resume_checkpoint(run, "config B")
    (aside,) = run.glob("checkpoints-stale-*")
    assert (aside / "last.ckpt").read_bytes() == weights
    assert "was made by another run configuration" in capsys.readouterr().out
    # the same configuration, but a checkpoint cut short by a kill: moved aside, not resumed
    (run / "checkpoints" / "last.ckpt").write_bytes(weights[: len(weights) // 2])
    assert not resume_checkpoint(run, "config B")
    assert "holds an unreadable last.ckpt (cut short?)" in capsys.readouterr().out
    assert len(list(run.glob("checkpoints-stale-*"))) == 2
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["made_by.sha256"]
    # a checkpoint without a stamp is not trusted either
    (run / "checkpoints" / "made_by.sha256").unlink()
    (run / "checkpoints" / "last.ckpt").write_bytes(b"old")
    assert not resume_checkpoint(run, "config B")
    assert len(list(run.glob("checkpoints-stale-*"))) == 3  # all kept, nothing overwritten


def test_commit_paths_commits_those_files_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--commit-records``: a landed record is committed by itself; anything else staged or
    changed in the checkout stays out of the commit; a failure is reported, not raised."""
    from benchmarks.repro.pieces import commit_paths

    (tmp_path / "README.md").write_text("x\n")
    init_repo(tmp_path, commit="start")
    (tmp_path / "README.md").write_text("edited, not to be committed\n")
    (tmp_path / "staged.txt").write_text("staged\n")
    git(tmp_path, "add", "staged.txt")
    record = tmp_path / "runs" / "per_task-seed0.json"
    record.parent.mkdir()
    record.write_text("{}\n")
    assert commit_paths([record], "Sweep record: per_task seed 0", repo=tmp_path)
    assert git(tmp_path, "show", "--name-only", "--format=%s", "HEAD").split() == [
        "Sweep",
        "record:",
        "per_task",
        "seed",
        "0",
        "runs/per_task-seed0.json",
    ]
    assert git(tmp_path, "status", "--porcelain").splitlines() == [" M README.md", "A  staged.txt"]
    assert "[git ] committed" in capsys.readouterr().out
    outside = tmp_path.parent / f"{tmp_path.name}-not-a-repo"
    outside.mkdir()
    (outside / "r.json").write_text("{}\n")
    assert not commit_paths([outside / "r.json"], "m", repo=outside)
    assert "could not commit" in capsys.readouterr().err


def test_resume_check_compares_the_steps_both_processes_trained(tmp_path: Path) -> None:
    """A killed fit and its resumed continuation both log the steps between the checkpoint and
    the kill: equal adapter and loss there is an exact resume; anything else is named."""
    from torch.utils.tensorboard import SummaryWriter

    from benchmarks.repro.aggregate import load_events, resume_check

    def process(run: Path, name: str, steps: range, changed: int | None = None) -> None:
        writer = SummaryWriter(str(run / "tensorboard"), filename_suffix=f".{name}")
        for step in steps:
            cluster = (step + (step == changed)) % 3
            writer.add_scalar(f"train/loss_cluster_{cluster}", 1.0 / (step + 1), step)
        writer.add_scalar("train/tokens_per_s", 100.0, steps[-1])
        writer.close()

    exact, wrong = tmp_path / "exact", tmp_path / "wrong"
    for run in (exact, wrong):
        process(run, "killed", range(0, 8))
    process(exact, "resumed", range(5, 12))
    process(wrong, "resumed", range(5, 12), changed=6)
    assert resume_check(load_events(exact)) == {
        "processes": 2,
        "overlapping_steps": 3,
        "mismatched_steps": [],
    }
    assert resume_check(load_events(wrong)) == {
        "processes": 2,
        "overlapping_steps": 3,
        "mismatched_steps": [6],
    }
    fresh = tmp_path / "fresh"
    process(fresh, "only", range(0, 4))
    assert resume_check(load_events(fresh)) == {
        "processes": 1,
        "overlapping_steps": 0,
        "mismatched_steps": [],
    }


def test_the_report_says_which_resumed_fits_were_exact() -> None:
    from benchmarks.repro.report import resume_lines

    exact = {"processes": 2, "overlapping_steps": 7, "mismatched_steps": []}
    fresh = {"processes": 1, "overlapping_steps": 0, "mismatched_steps": []}
    assert resume_lines({"kmeans4/seed0": fresh, "single/seed0": None}) == []
    assert resume_lines({"per_task/seed0": exact, "kmeans4/seed0": fresh}) == [
        "",
        "Resumed fits: 1 run(s) were killed and resumed from a checkpoint; 7 step(s) were "
        "trained by both processes, with the same adapter and bit-identical loss at every one.",
    ]
    wrong = {"processes": 3, "overlapping_steps": 4, "mismatched_steps": [275, 525]}
    (line,) = resume_lines({"per_task/seed0": exact, "per_task/seed1": wrong})[1:]
    assert line.startswith("Resumed fits: 2 run(s) were killed and resumed from a checkpoint; 11")
    assert "**Not exact**: per_task/seed1 at steps [275, 525]" in line


def test_timing_line_prints_a_resumed_runs_attempts() -> None:
    """A run resumed over sessions records its earlier attempts' seconds as a list: printing the
    timings once failed on it (``--aggregate-only`` exited 1 with the summary already written)."""
    from benchmarks.repro.cli import timing_line

    entry = {"seconds": 6149.96, "earlier_attempts_seconds": [192.0, 8705.04], "study_only": True}
    assert timing_line("per_task/seed0", entry) == (
        "timing per_task/seed0: seconds=6150, earlier_attempts_seconds=[192, 8705], study_only=True"
    )
