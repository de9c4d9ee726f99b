"""benchmarks/gpu_strategies.py, the script a GPU session runs, works end to end: a dry run on the
CPU (``--accelerator cpu``) of its DDP fit and its two-step merge (``tclora merge`` after the fit,
the way FSDP runs), on a tiny architecture with random weights, so that the rare GPU session does
not spend its minutes on a broken script."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import TINY_CONFIG

from benchmarks.gpu_strategies import TASKS

ROOT = Path(__file__).resolve().parents[1]


def _data(folder: Path) -> Path:
    for task in TASKS:
        (folder / "train").mkdir(parents=True, exist_ok=True)
        (folder / "test").mkdir(parents=True, exist_ok=True)
        train = [
            {"prompt": f"{task}: is {i} odd?", "response": str(i % 2), "task": task}
            for i in range(12)
        ]
        test = [
            {"prompt": f"{task}: is {i} odd?", "choices": ["0", "1"], "answer": str(i % 2)}
            for i in range(4)
        ]
        for split, rows in (("train", train), ("test", test)):
            text = "".join(json.dumps(r) + "\n" for r in rows)
            (folder / split / f"{task}.jsonl").write_text(text)
    return folder


def _tiny_shape(smollm2_dir: Path, folder: Path) -> Path:
    """SmolLM2's tokenizer and config, the config shrunk to the tests' tiny Llama."""
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy2(smollm2_dir / name, folder / name)
    config = json.loads((smollm2_dir / "config.json").read_text())
    config.update(TINY_CONFIG, head_dim=TINY_CONFIG["hidden_size"] // 4)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.slow
def test_gpu_strategies_dry_run_trains_merges_and_checks(tmp_path: Path, smollm2_dir: Path) -> None:
    out = tmp_path / "out"
    argv = [sys.executable, str(ROOT / "benchmarks" / "gpu_strategies.py")]
    argv += ["--data", str(_data(tmp_path / "data")), "--out", str(out)]
    argv += ["--random-weights-from", str(_tiny_shape(smollm2_dir, tmp_path / "shape"))]
    argv += ["--accelerator", "cpu", "--strategies", "ddp", "--merge-after"]
    argv += ["--steps", "4", "--batch-size", "2", "--eval-items", "2"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (record,) = json.loads((out / "gpu_strategies.json").read_text())["records"]
    assert record["problems"] == []
    assert (record["strategy"], record["merge"], record["world_size"], record["steps"]) == (
        "ddp",
        "tclora merge",
        1,
        4,
    )
    assert "| ddp | 1 | 4 |" in proc.stdout
    assert ", on cpu" in (out / "ddp" / "merge.log").read_text()


@pytest.mark.parametrize("strategy", ["fsdp", "fsdp_layers"])
def test_gpu_strategies_fsdp_runs_wrap_with_adapter_units_or_layers_alone(
    tmp_path: Path, strategy: str
) -> None:
    """``fsdp`` runs ``fsdp.yaml`` as it is (``AdapterWrapPolicy``); ``fsdp_layers``, which a GPU
    session asks for to compare, the same file with the decoder layers as the only units."""
    import argparse

    import yaml
    from jsonargparse import ActionConfigFile
    from lightning.pytorch import Trainer
    from lightning.pytorch.cli import LightningArgumentParser

    from benchmarks.gpu_strategies import VARIANTS, fix_config

    layer = "transformers.models.llama.modeling_llama.LlamaDecoderLayer"
    args = argparse.Namespace(decoder_layer=layer, accelerator="gpu", devices=None)
    fix = fix_config(strategy, args)
    assert fix is not None
    (tmp_path / "fix.yaml").write_text(yaml.safe_dump(fix))
    file = ROOT / "configs" / "strategies" / f"{VARIANTS.get(strategy, strategy)}.yaml"
    parser = LightningArgumentParser(exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_lightning_class_args(Trainer, "trainer")
    # what gpu_strategies passes to `tclora fit` after its run file (the model part aside)
    raws = [
        {"trainer": yaml.safe_load(p.read_text())["trainer"]} for p in (file, tmp_path / "fix.yaml")
    ]
    paths = [tmp_path / "strategy.yaml", tmp_path / "fix-only.yaml"]
    for path, raw in zip(paths, raws, strict=True):
        path.write_text(yaml.safe_dump(raw))
    cfg = parser.parse_args(["--config", str(paths[0]), "--config", str(paths[1])])
    policy = cfg.trainer.strategy.init_args.auto_wrap_policy
    if strategy == "fsdp":
        assert policy.class_path == "tclora.fsdp_policy.AdapterWrapPolicy"
        assert [c.__name__ for c in policy.init_args.layer_classes] == ["LlamaDecoderLayer"]
    else:
        assert [c.__name__ for c in policy] == ["LlamaDecoderLayer"]


def test_fsdp_noshard_check_reports_each_set_up(tmp_path: Path) -> None:
    """The one-process FSDP check the GPU kit runs: on the CPU, bf16 mixed precision with
    AdapterWrapPolicy trains both adapters when the adapter is switched before the root forward;
    switched inside it, the H100's CheckpointError; float32 with tied embeddings hits FSDP's own
    assertion. Each row reports its error instead of stopping the table."""
    argv = [sys.executable, str(ROOT / "benchmarks" / "gpu_kit" / "fsdp_noshard_check.py")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [*argv, "--quick"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| adapters")]
    assert rows[0] == (
        "| adapters | bf16 mixed + autocast | True | True | before "
        "| ok, cluster_0 moved, cluster_1 moved |"
    )
    assert rows[1].startswith(
        "| adapters | bf16 mixed + autocast | True | True | in forward | CheckpointError: "
        "torch.utils.checkpoint: Recomputed values for the following tensors have different "
        "metadata"
    )
    assert rows[2:] == [
        "| adapters | float32 | True | True | before | AssertionError: as_params=True "
        "type(prim_param)=<class 'torch.Tensor'> |",
    ]


def test_memory_check_dry_run_trains_a_random_model_of_a_shape() -> None:
    """memory_check.py, which measures the paper configs' peak GPU memory on a GPU, runs end to
    end on the CPU on its tiny shape: a random model saved, K adapters trained, one row."""
    argv = [sys.executable, str(ROOT / "benchmarks" / "gpu_kit" / "memory_check.py")]
    argv += ["--shape", "tiny", "--accelerator", "cpu", "--batch-size", "2", "--seq-len", "16"]
    argv += ["--num-adapters", "3", "--steps", "3"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (row,) = [line for line in proc.stdout.splitlines() if line.startswith("| tiny |")]
    assert row.startswith("| tiny | 0.00 | 2 x 16 | 3 | 3 | ")
    assert row.endswith("| nan | nan | cpu |")
    bad = subprocess.run([*argv[:2], "--steps", "1"], env=env, capture_output=True, text=True)
    assert bad.returncode == 2
    assert "--steps 1: at least 2 (the first step is not timed)" in bad.stderr
