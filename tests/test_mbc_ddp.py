"""``tclora mbc`` (and so ``tclora fit`` with its merge callback, centroid routing and Arrow)
under 2-process DDP, gloo on CPU: every rank runs the command; rank zero exports stage 1's
adapters, writes the stage files once and reports; the other rank waits for them instead of
reading half-written folders; the merge study's evaluations are sharded and gathered."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_mbc_datamodule import check_stage_outputs, write_mbc_config


@pytest.mark.slow
def test_mbc_runs_its_three_stages_under_ddp(
    tmp_path: Path, tiny_model_dir: Path, multitask_jsonl: Path
) -> None:
    """Before: rank 1 read stage 1's adapter folders before rank 0 had exported them, and
    ``tclora fit``'s closing report asked for ``trainer.log_dir`` (a collective) on rank 0 only,
    so every DDP fit through the CLI ended with a gloo error."""
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text(
        "".join(
            json.dumps({"prompt": f"Is {w} a fruit?", "choices": ["yes", "no"], "answer": a}) + "\n"
            for w, a in [("apple", 0), ("stone", 1), ("pear", 0), ("chair", 1), ("plum", 0)]
        )
    )
    path, merge_dir = write_mbc_config(
        tmp_path,
        tiny_model_dir,
        multitask_jsonl,
        references=["base", "routing", "arrow"],
        eval_sets=[str(heldout)],
    )
    out = tmp_path / "mbc"
    argv = ["mbc", "--config", str(path), "--num_clusters", "2", "--stage1_steps", "3"]
    argv += ["--output_dir", str(out), "--trainer.devices", "2"]
    argv += ["--trainer.strategy", "ddp_find_unused_parameters_true"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, "-m", "tclora", *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]

    check_stage_outputs(tmp_path, out, merge_dir)
    results = json.loads((merge_dir / "results.json").read_text())
    rows = {r["name"]: r for r in results["rows"]}
    # every reference and merge scored each of the 5 held-out items once (sharded over the 2
    # ranks, then gathered in set order), and its accuracy is the mean of those items
    for name in ("base", "routing", "arrow", "uniform", "cp2_mean_loading"):
        items = rows[name]["items"]["heldout"]
        assert len(items) == 5 and set(items) <= {"0", "1"}, (name, items)
        assert rows[name]["scores"]["heldout"]["acc"] == pytest.approx(items.count("1") / 5)
    assert "LightningCLI's args parameter" not in proc.stderr  # each stage's args are on purpose
    # rank zero alone reported, once per fit; stage 2 was announced once
    assert proc.stdout.count("tclora: fit finished") == 1
    assert (proc.stdout + proc.stderr).count("tclora mbc: stage 2, 4 tasks -> 2 groups") == 1
