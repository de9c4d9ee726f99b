"""MBC's stage 3: ``ClusterDataModule(clustering="mbc")`` puts every sample in its task's group."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import fit_config

from tclora.clustering import read_mbc_assignments, write_mbc_assignments
from tclora.datamodules import ClusterDataModule

GROUPS = {"arithmetic": 0, "code": 1, "sentiment": 1, "translation": 0}


def _dm(jsonl: Path, tmp_path: Path, tokenizer: Any, **kwargs: Any) -> ClusterDataModule:
    kwargs.setdefault("clustering", "mbc")
    return ClusterDataModule(
        [str(jsonl)],
        tokenizer=tokenizer,
        cache_dir=str(tmp_path / "cache"),
        progress_bar=False,
        **kwargs,
    )


def test_stage_file_round_trip_and_its_errors(tmp_path: Path) -> None:
    path = write_mbc_assignments(tmp_path / "stage2" / "mbc.json", GROUPS)
    assert json.loads(path.read_text()) == {"groups": GROUPS, "method": "mbc", "num_clusters": 2}
    assert read_mbc_assignments(path) == GROUPS

    missing = tmp_path / "none.json"
    with pytest.raises(ValueError, match=rf"mbc_assignments='{missing}': no such file; write it"):
        read_mbc_assignments(missing)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"bad\.json': not a readable JSON file"):
        read_mbc_assignments(bad)
    bad.write_text(json.dumps({"groups": {"a": 0, "b": 2}}))
    with pytest.raises(ValueError, match=r"groups must be 0 \.\. K-1, each used; got \[0, 2\]"):
        read_mbc_assignments(bad)
    bad.write_text(json.dumps({"groups": {"a": 0, "b": 1}, "num_clusters": 3}))
    with pytest.raises(ValueError, match=r"num_clusters=3 but the groups use 2"):
        read_mbc_assignments(bad)
    bad.write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match=r'expected a JSON object with "groups": \{task: group\}'):
        read_mbc_assignments(bad)
    with pytest.raises(ValueError, match=r"groups must map task names to integers; got \{'a': 'x'"):
        write_mbc_assignments(bad, {"a": "x"})  # type: ignore[dict-item]


def test_samples_follow_their_tasks_group_and_resume(
    tmp_path: Path, multitask_jsonl: Path, tokenizer: Any
) -> None:
    path = write_mbc_assignments(tmp_path / "mbc.json", GROUPS)
    dm = _dm(multitask_jsonl, tmp_path, tokenizer, mbc_assignments=str(path))
    assert dm.num_clusters == 2  # known before setup: the CLI sizes the model from it
    dm.prepare_data()
    dm.setup("fit")
    assert dm.num_clusters == 2 and dm.cluster_names == ["cluster_0", "cluster_1"]
    tasks = [s.task for s in dm.samples]
    np.testing.assert_array_equal(dm.assignments, [GROUPS[t] for t in tasks])
    assert dm.embeddings is not None
    for k in range(2):
        rows = [i for i in dm.train_indices if GROUPS[tasks[i]] == k]
        np.testing.assert_allclose(dm.centroids[k], dm.embeddings[rows].mean(0), atol=1e-6)
    # two tasks per group: each group is as pure as its larger task's share
    train_tasks = [tasks[i] for i in dm.train_indices]
    majority = sum(
        max(train_tasks.count(t) for t in GROUPS if GROUPS[t] == k) for k in range(2)
    ) / len(train_tasks)
    assert dm.statistics["purity"] == pytest.approx(majority)
    assert dm.statistics["num_clusters"] == 2

    state = dm.state_dict()
    assert state["clustering"] == "mbc" and state["num_clusters"] == 2
    other = write_mbc_assignments(
        tmp_path / "other.json", {"arithmetic": 0, "code": 0, "sentiment": 1, "translation": 1}
    )
    resumed = _dm(multitask_jsonl, tmp_path, tokenizer, mbc_assignments=str(other))
    resumed.load_state_dict(state)  # before setup: applied at its end
    with pytest.warns(
        UserWarning,
        match=r"used: mbc_groups: config \{'arithmetic': 0, 'code': 0, 'sentiment': 1, "
        r"'translation': 1\} -> checkpoint \{",
    ):
        resumed.setup("fit")
    np.testing.assert_array_equal(resumed.assignments, dm.assignments)
    np.testing.assert_array_equal(resumed.centroids, dm.centroids)


def test_mbc_data_module_errors(tmp_path: Path, multitask_jsonl: Path, tokenizer: Any) -> None:
    with pytest.raises(
        ValueError,
        match=r"clustering='mbc' with mbc_assignments=None: clustering='mbc' needs "
        r"mbc_assignments \(the JSON file of MBC's stage 2\), and only it takes one",
    ):
        _dm(multitask_jsonl, tmp_path, tokenizer)
    path = write_mbc_assignments(tmp_path / "mbc.json", GROUPS)
    with pytest.raises(ValueError, match=r"clustering='kmeans' with mbc_assignments='.*mbc\.json'"):
        _dm(multitask_jsonl, tmp_path, tokenizer, clustering="kmeans", mbc_assignments=str(path))
    with pytest.raises(
        ValueError, match=r"clustering='nope': expected one of \[.*'single', 'mbc'\]"
    ):
        _dm(multitask_jsonl, tmp_path, tokenizer, clustering="nope", mbc_assignments=str(path))
    with pytest.raises(ValueError, match=r"mbc_assignments='.*absent\.json': no such file"):
        _dm(multitask_jsonl, tmp_path, tokenizer, mbc_assignments=str(tmp_path / "absent.json"))

    partial = write_mbc_assignments(tmp_path / "partial.json", {"arithmetic": 0, "code": 1})
    dm = _dm(multitask_jsonl, tmp_path, tokenizer, mbc_assignments=str(partial))
    with pytest.raises(
        ValueError,
        match=r"partial\.json' has no group for the tasks \['sentiment', 'translation'\] \(it "
        r"groups \['arithmetic', 'code'\]\); rerun MBC's stages 1-2 on these sources",
    ):
        dm.setup("fit")
    dm = _dm(multitask_jsonl, tmp_path, tokenizer, mbc_assignments=str(path), min_cluster_size=100)
    with pytest.raises(
        ValueError,
        match=r"clustering='mbc': groups \[0, 1\] of '.*mbc\.json' have fewer than "
        r"min_cluster_size=100 training samples \(sizes \[\d+, \d+\]\)",
    ):
        dm.setup("fit")


def test_the_fit_cli_takes_k_from_the_mbc_file(tmp_path: Path) -> None:
    """``--data.clustering mbc --data.mbc_assignments F``: the model gets one adapter per group."""
    from tclora.cli import cli_main

    groups = write_mbc_assignments(tmp_path / "mbc.json", {"a": 0, "b": 1, "c": 2, "d": 1, "e": 0})
    demo = str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")
    argv = ["--config", demo, "--data.clustering", "mbc", "--data.mbc_assignments", str(groups)]
    cli = cli_main(argv, run=False)
    assert cli.datamodule.clustering == "mbc"
    assert cli.datamodule.num_clusters == 3
    assert cli.model.hparams.num_adapters == 3


def write_mbc_config(
    tmp_path: Path, model_dir: Path, jsonl: Path, **merge_options: Any
) -> tuple[Path, Path]:
    """``<tmp_path>/fit.yaml`` for ``tclora mbc``: :func:`helpers.fit_config` with a small
    ``CPMergeCallback`` (``merge_options`` override its options) writing to
    ``<tmp_path>/merge``. Returns the config's path and the merge folder."""
    import yaml

    config = fit_config(
        tmp_path / "fit", model_dir, jsonl, tmp_path / "cache", r=2, lr=1e-3, max_length=48
    )
    merge_dir = tmp_path / "merge"
    init_args = {
        "cp_ranks": 2,
        "rules": ["mean_loading"],
        "baselines": ["uniform"],
        "references": [],
        "output_dir": str(merge_dir),
        "export": False,
        "progress": False,
        **merge_options,
    }
    config["trainer"]["callbacks"] = [
        {"class_path": "tclora.callbacks.CPMergeCallback", "init_args": init_args}
    ]
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, merge_dir


def check_stage_outputs(tmp_path: Path, out: Path, merge_dir: Path) -> dict[str, int]:
    """What every ``tclora mbc`` run of :func:`write_mbc_config` leaves: ``mbc.json`` holds the
    groups of stage 1's exported adapters, the merge study ran once at stage 3's end on the 2
    group adapters (not on stage 1's 4), and stage 3 exported one adapter per group where the
    config says. Returns the groups."""
    from tclora.clustering import mbc_clusters, read_adapter_folders

    stage1 = out / "stage1" / "adapters"
    tasks = sorted(GROUPS)  # per_task numbers the tasks in sorted order
    folders = {t: stage1 / f"cluster_{k}" for k, t in enumerate(tasks)}
    groups = mbc_clusters(read_adapter_folders(folders), 2)
    assert read_mbc_assignments(out / "mbc.json") == groups
    results = json.loads((merge_dir / "results.json").read_text())
    assert results["adapters"] == ["cluster_0", "cluster_1"]
    assert sorted(p.name for p in (tmp_path / "fit" / "adapters").iterdir()) == [
        "README.md",
        "cluster_0",
        "cluster_1",
        "tclora_adapters.json",
    ]
    return groups


def test_one_command_runs_the_three_stages(
    tmp_path: Path, tiny_model_dir: Path, multitask_jsonl: Path
) -> None:
    """``tclora mbc``: stage 1 (per_task fit, exported) → stage 2 (MBC on those folders, the
    stage file) → stage 3 (the K-adapter fit on the groups), then the same groups by hand."""
    from tclora.cli import main

    path, merge_dir = write_mbc_config(tmp_path, tiny_model_dir, multitask_jsonl)
    out = tmp_path / "mbc"
    argv = ["mbc", "--config", str(path), "--num_clusters", "2", "--stage1_steps", "3"]
    assert main([*argv, "--output_dir", str(out), "--trainer.logger", "false"]) == 0

    groups = check_stage_outputs(tmp_path, out, merge_dir)
    manifest = json.loads((out / "stage1" / "adapters" / "tclora_adapters.json").read_text())
    assert len(manifest["adapters"]) == 4 and sum(manifest["adapter_steps"]) == 3  # 3 steps in all
    tasks = sorted(GROUPS)
    similarity = json.loads((out / "mbc_similarity.json").read_text())
    assert similarity["tasks"] == tasks and len(similarity["cosine"]) == 4
    assert similarity["groups"] == [groups[t] for t in tasks]
    # one initialisation for every task's adapter (shared_init): after a step each, their raw
    # LoRA parameters are still nearly parallel (independent random inits would give ~0)
    cosine = np.array(similarity["cosine"])
    assert cosine[~np.eye(4, dtype=bool)].min() > 0.9


def test_one_command_refuses_bad_input_before_any_fit(tmp_path: Path) -> None:
    from tclora.mbc_cli import mbc_main

    config = tmp_path / "fit.yaml"
    config.write_text("seed_everything: 0\n")
    base = ["--config", str(config), "--output_dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit, match=r"--config 'absent.yaml': no such file"):
        mbc_main(["--config", "absent.yaml", "--num_clusters", "2"])
    with pytest.raises(SystemExit, match=r"--num_clusters 0: must be >= 1"):
        mbc_main([*base, "--num_clusters", "0"])
    with pytest.raises(SystemExit, match=r"--stage1_steps 0: must be >= 1"):
        mbc_main([*base, "--num_clusters", "2", "--stage1_steps", "0"])
    with pytest.raises(SystemExit, match=r"'--trainer.max_steps=5': tclora mbc sets"):
        mbc_main([*base, "--num_clusters", "2", "--trainer.max_steps=5"])
    with pytest.raises(SystemExit, match=r"'--model.shared_init': tclora mbc sets"):
        mbc_main([*base, "--num_clusters", "2", "--model.shared_init", "false"])
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit, match=r"--output_dir '.*file' is a file, not a folder"):
        mbc_main([*base[:2], "--output_dir", str(tmp_path / "file"), "--num_clusters", "2"])
    assert not (tmp_path / "out").exists()
