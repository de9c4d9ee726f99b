"""The ``tclora`` command: every config parses, and a whole fit runs through the CLI."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tclora.cli import TCLoraCLI, cli_main

ROOT = Path(__file__).resolve().parents[1]
TOP_CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


class _ParseOnlyCLI(TCLoraCLI):
    """Parses and validates a config against the real classes without instantiating anything
    (the paper-scale configs name hub models that cannot be resolved offline)."""

    def instantiate_classes(self) -> None:
        pass


def _parse(path: Path) -> Any:
    from tclora.datamodules import ClusterDataModule
    from tclora.module import LoRAModule

    cli = _ParseOnlyCLI(
        LoRAModule,
        ClusterDataModule,
        args=["--config", str(path)],
        run=False,
        parser_kwargs={"parser_mode": "yaml", "exit_on_error": False},
    )
    return cli.config


def test_there_are_configs() -> None:
    assert "demo" in {p.stem for p in TOP_CONFIGS}


@pytest.mark.parametrize("path", TOP_CONFIGS, ids=[p.stem for p in TOP_CONFIGS])
def test_every_config_parses(path: Path) -> None:
    raw = yaml.safe_load(path.read_text())
    config = _parse(path)
    assert config.model.model == raw["model"]["model"]
    assert config.data.sources, f"{path.name} trains on no data"
    callbacks = [c["class_path"] for c in raw["trainer"].get("callbacks", [])]
    assert "tclora.callbacks.CPMergeCallback" in callbacks


def test_demo_config_instantiates() -> None:
    cli = cli_main(["--config", str(ROOT / "configs" / "demo.yaml")], run=False)
    assert cli.datamodule.num_clusters == 4
    assert cli.model.hparams.num_adapters == 4  # linked from data.num_clusters, never typed twice
    merge = next(c for c in cli.trainer.callbacks if type(c).__name__ == "CPMergeCallback")
    assert merge.config.scales == [1.0, 2.0, 4.0]


def test_num_adapters_is_not_typed_twice() -> None:
    with pytest.raises(argparse.ArgumentError, match=r"data.num_clusters --> model.num_adapters"):
        _parse_args(["--config", str(ROOT / "configs" / "demo.yaml"), "--model.num_adapters", "3"])


def _parse_args(args: list[str]) -> Any:
    from tclora.datamodules import ClusterDataModule
    from tclora.module import LoRAModule

    return _ParseOnlyCLI(
        LoRAModule,
        ClusterDataModule,
        args=args,
        run=False,
        parser_kwargs={"parser_mode": "yaml", "exit_on_error": False},
    )


def test_top_level_help_lists_own_commands() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tclora.cli", "--help"], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert "assets" in proc.stdout and "merge" in proc.stdout and "fit" in proc.stdout


@pytest.mark.slow
def test_fit_through_the_cli_with_a_tiny_model(
    tmp_path: Path, tiny_model_dir: Path, multitask_jsonl: Path
) -> None:
    """tclora fit --config on tclora's own module: clusters, adapters, CP merge, exports."""
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text(
        "".join(
            json.dumps({"prompt": f"Is {w} a fruit?", "choices": ["yes", "no"], "answer": a}) + "\n"
            for w, a in [("apple", 0), ("stone", 1), ("pear", 0), ("chair", 1)]
        )
    )
    out = tmp_path / "run"
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "max_steps": 8,
            "val_check_interval": 8,
            "limit_val_batches": 1,
            "num_sanity_val_steps": 0,
            "enable_progress_bar": False,
            "default_root_dir": str(out),
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(out), "name": "tb"},
            },
            "callbacks": [
                {
                    "class_path": "tclora.callbacks.CPMergeCallback",
                    "init_args": {
                        "cp_ranks": [2],
                        "rules": ["mean_loading"],
                        "baselines": ["uniform"],
                        "scales": [1.0, 2.0],
                        "references": ["base", "routing"],
                        "eval_sets": [str(heldout)],
                        "output_dir": str(out / "merge"),
                        "max_length": 64,
                        "progress": False,
                    },
                }
            ],
        },
        "model": {
            "model": str(tiny_model_dir),
            "r": 4,
            "lora_alpha": 8,
            "lr": 1e-3,
            "export_dir": str(out / "adapters"),
        },
        "data": {
            "sources": [str(multitask_jsonl)],
            "tokenizer": str(tiny_model_dir),
            "num_clusters": 4,
            "batch_size": 4,
            "max_length": 64,
            "progress_bar": False,
            "cache_dir": str(tmp_path / "cache"),
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = cli_main(["fit", "--config", str(path)])
    merge = next(c for c in cli.trainer.callbacks if type(c).__name__ == "CPMergeCallback")
    assert merge.finished and merge.result is not None
    names = [row.name for row in merge.result.rows]
    assert names == ["base", "routing", "cp2_mean_loading", "uniform"]
    assert sorted(p.name for p in (out / "adapters").iterdir()) == [
        f"cluster_{k}" for k in range(4)
    ]
    assert (out / "merge" / "merged_adapter" / "adapter_model.safetensors").is_file()
    assert (out / "merge" / "results.md").is_file()


def test_link_leaves_k_to_the_data_when_small_clusters_may_merge() -> None:
    """With small clusters merged away, K is only known after setup: the module takes it then."""
    demo = str(ROOT / "configs" / "demo.yaml")
    cli = cli_main(["--config", demo, "--data.min_cluster_size", "5"], run=False)
    assert cli.datamodule.num_clusters is None
    assert cli.model.hparams.num_adapters is None
