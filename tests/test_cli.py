"""The ``tclora`` command: every config parses, and a whole fit runs through the CLI."""

from __future__ import annotations

import argparse
import inspect
import json
import math
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from helpers import fit_config, fruit_eval_set, merge_argv, tiny_study_callback
from lightning.pytorch import Callback

from tclora.callbacks import CPMergeCallback
from tclora.checkpoint_io import AtomicCheckpointIO
from tclora.cli import COMMANDS, TCLoraCLI, cli_main, main
from tclora.lightning_cli import StepsProgressBar

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
    assert cli.datamodule._tokenizer_arg == "smollm2-135m-instruct"  # linked from model.model
    merge = next(c for c in cli.trainer.callbacks if type(c).__name__ == "CPMergeCallback")
    assert merge.config.scales == [1.0, 2.0, 4.0]


def test_num_adapters_is_not_typed_twice() -> None:
    with pytest.raises(argparse.ArgumentError, match=r"data.num_clusters --> model.num_adapters"):
        _parse_args(["--config", str(ROOT / "configs" / "demo.yaml"), "--model.num_adapters", "3"])


def test_tokenizer_is_not_typed_twice() -> None:
    """data.tokenizer comes from model.model; typing it is refused, naming the link."""
    with pytest.raises(
        argparse.ArgumentError, match=r'Linked "data.tokenizer" must be given via "model.model"'
    ):
        _parse_args(["--config", str(ROOT / "configs" / "demo.yaml"), "--data.tokenizer", "x"])
    cli = _parse_args(["--config", str(ROOT / "configs" / "demo.yaml"), "--model.model", "other"])
    assert cli.config.data.tokenizer == "other"


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


def test_top_level_help_is_fast_and_lists_only_working_commands() -> None:
    """`python -m tclora --help` lists the commands without importing torch or Lightning."""
    proc = subprocess.run(
        [sys.executable, "-m", "tclora", "--help"], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    commands = [
        line.split()[0]
        for line in proc.stdout.splitlines()
        if line.startswith("  ") and line[2:3] != " "
    ]
    assert commands == ["fit", "validate", *COMMANDS]
    assert {"merge", "export", "assets"} <= set(COMMANDS)
    assert "test" not in proc.stdout.split() and "predict" not in proc.stdout
    loaded = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, tclora.cli; print(sorted(m for m in ('torch', 'lightning', "
            "'transformers', 'numpy', 'jsonargparse') if m in sys.modules))",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert loaded.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("command", "reason"),
    [("test", "LoRAModule has no test step"), ("predict", "LoRAModule has no predict step")],
)
def test_test_and_predict_are_refused_with_the_reason(
    command: str, reason: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([command, "--config", "x.yaml"]) == 2
    err = capsys.readouterr().err
    assert (
        f"command='{command}' is not a tclora command; expected one of ['fit', 'validate', " in err
    )
    assert reason in err


def test_fit_help_documents_the_merge_callback(capsys: pytest.CaptureFixture[str]) -> None:
    """Before: `tclora fit --help` showed no CPMergeCallback option, and `default: null` for
    its list options."""
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: tclora [options] fit")  # also under python -m tclora
    section = " ".join(
        text.split("CPMergeCallback (tclora.callbacks.CPMergeCallback)", 1)[1].split()
    )
    options = [
        name for name in inspect.signature(CPMergeCallback.__init__).parameters if name != "self"
    ]
    for name in options:
        assert f"--trainer.callbacks.{name} " in section, name
    assert "default: ('sum_components', 'mean_loading')" in section
    assert "default: ('uniform', 'ties', 'knots_ties', 'tsv', 'iso_c')" in section
    assert "default: (1.0,)" in section
    assert "default: ('base', 'single', 'routing')" in section
    assert "model.model --> data.tokenizer" in text


def test_console_script_passes_no_args_back(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: every command warned "LightningCLI's args parameter ... not recommended"."""
    monkeypatch.setattr(
        sys,
        "argv",
        ["tclora", "fit", "--config", str(ROOT / "configs" / "demo.yaml"), "--print_config"],
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(SystemExit) as exit_info:
            main()
    assert exit_info.value.code == 0
    assert "max_steps: 48" in capsys.readouterr().out
    assert not [w for w in caught if "not recommended" in str(w.message)]


def test_training_bar_reads_steps_not_epoch_minus_two() -> None:
    """Before: Lightning's rich bar read "Epoch 0/-2" for a fit bounded by max_steps."""
    cli = cli_main(["--config", str(ROOT / "configs" / "demo.yaml")], run=False)
    bar = cli.trainer.progress_bar_callback
    assert isinstance(bar, StepsProgressBar)
    bar._trainer = cli.trainer
    assert bar._get_train_description(0).strip() == "Epoch 0 (max_steps 48)"
    cli = cli_main(
        ["--config", str(ROOT / "configs" / "demo.yaml"), "--trainer.enable_progress_bar", "false"],
        run=False,
    )
    assert cli.trainer.progress_bar_callback is None


def test_merge_says_routing_is_skipped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`tclora merge` has no data module to route with: it says so instead of dropping it."""
    from tclora.study.cli import MergeInputError, merge_main

    folders = [tmp_path / "a", tmp_path / "b"]
    with pytest.raises(MergeInputError, match="is not a peft adapter folder"):
        merge_main(merge_argv(folders, tmp_path / "out", references=["base", "routing"]))
    assert (
        "tclora merge: no data module to route with: the 'routing' reference is skipped"
        in capsys.readouterr().out
    )


@pytest.mark.slow
def test_fit_through_the_cli_with_a_tiny_model(
    tmp_path: Path, tiny_model_dir: Path, multitask_jsonl: Path
) -> None:
    """tclora fit --config on tclora's own module: clusters, adapters, CP merge, exports."""
    heldout = fruit_eval_set(tmp_path / "heldout.jsonl", items=4)
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
            "callbacks": [tiny_study_callback(heldout, out, ["uniform"])],
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
    folders = [out / "adapters" / f"cluster_{k}" for k in range(4)]
    assert sorted(p.name for p in (out / "adapters").iterdir()) == [
        "README.md",
        *[f.name for f in folders],
        "tclora_adapters.json",
    ]
    assert (out / "merge" / "merged_adapter" / "adapter_model.safetensors").is_file()
    assert (out / "merge" / "results.md").is_file()
    merged_config = json.loads(
        (out / "merge" / "merged_adapter" / "adapter_config.json").read_text()
    )
    assert merged_config["base_model_name_or_path"] == str(tiny_model_dir)

    # Before: only cluster_0 named its base model and `tclora merge` refused the fit's own
    # adapters ("different base models"). Now fit -> export -> tclora merge works as is.
    from tclora.study.cli import merge_main

    code = merge_main(merge_argv(folders, tmp_path / "merged", eval_sets=[str(heldout)]))
    assert code == 0
    summary = json.loads((tmp_path / "merged" / "results.json").read_text())
    assert summary["adapters"] == [f.name for f in folders]


def test_link_leaves_k_to_the_data_when_small_clusters_may_merge() -> None:
    """With small clusters merged away, K is only known after setup: the module takes it then."""
    demo = str(ROOT / "configs" / "demo.yaml")
    cli = cli_main(["--config", demo, "--data.min_cluster_size", "5"], run=False)
    assert cli.datamodule.num_clusters is None
    assert cli.model.hparams.num_adapters is None


def _small_config(tmp_path: Path, tiny_model_dir: Path, multitask_jsonl: Path) -> dict[str, Any]:
    """4 steps, 2 clusters, TensorBoard and checkpoints under ``<tmp_path>/run``."""
    out, cache = tmp_path / "run", tmp_path / "cache"
    return fit_config(out, tiny_model_dir, multitask_jsonl, cache, tensorboard=True, num_clusters=2)


def test_validate_reports_each_clusters_loss(
    tmp_path: Path, tiny_model_dir: Path, multitask_jsonl: Path
) -> None:
    """`tclora validate` (offered beside fit; test and predict are not) runs LoRAModule's
    validation: one loss per cluster's adapter on its own cluster."""
    config = _small_config(tmp_path, tiny_model_dir, multitask_jsonl)
    config["trainer"]["limit_val_batches"] = 1
    cli = cli_main(["validate", "--config", _write(tmp_path, config)])
    metrics = cli.trainer.callback_metrics
    assert {"val/loss", "val/loss_cluster_0", "val/loss_cluster_1"} <= set(metrics)
    assert all(math.isfinite(float(v)) for v in metrics.values())


def _write(tmp_path: Path, config: dict[str, Any], name: str = "config.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _merge_callback(**init_args: Any) -> dict[str, Any]:
    return {"class_path": "tclora.callbacks.CPMergeCallback", "init_args": init_args}


def test_fit_checks_outputs_and_eval_sets_before_embedding(
    tmp_path: Path, tiny_model_dir: Path, multitask_jsonl: Path
) -> None:
    """Before: these failed only after embedding (eval sets) or after the whole fit (folders)."""
    config = _small_config(tmp_path, tiny_model_dir, multitask_jsonl)
    config["trainer"]["callbacks"] = [_merge_callback(eval_sets=[str(tmp_path / "nope.jsonl")])]
    with pytest.raises(ValueError, match=r"eval set file not found: .*nope.jsonl"):
        cli_main(["fit", "--config", _write(tmp_path, config)])
    assert not (tmp_path / "cache").exists()  # nothing was embedded

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    config = _small_config(tmp_path, tiny_model_dir, multitask_jsonl)
    config["trainer"]["callbacks"] = [_merge_callback(output_dir=str(blocker / "merge"))]
    with pytest.raises(
        PermissionError, match=r"CPMergeCallback.output_dir='.*a_file/merge' cannot be a folder"
    ):
        cli_main(["fit", "--config", _write(tmp_path, config)])
    config = _small_config(tmp_path, tiny_model_dir, multitask_jsonl)
    config["trainer"]["default_root_dir"] = str(blocker / "root")
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(blocker / "logs")
    with pytest.raises(PermissionError, match=r"trainer.default_root_dir='.*a_file/root'"):
        cli_main(["fit", "--config", _write(tmp_path, config)])
    assert not (tmp_path / "cache").exists()

    config = _small_config(tmp_path, tiny_model_dir, multitask_jsonl)
    config["data"]["clustering"] = "single"
    config["trainer"]["callbacks"] = [_merge_callback()]
    with pytest.raises(
        ValueError,
        match=r"CPMergeCallback needs 2 or more adapters to merge, but the data "
        r"module makes num_clusters=1",
    ):
        cli_main(["fit", "--config", _write(tmp_path, config)])
    assert not (tmp_path / "cache").exists()


@pytest.mark.slow
def test_resume_names_every_model_value_the_checkpoint_overrides(
    tmp_path: Path, tiny_model_dir: Path, multitask_jsonl: Path
) -> None:
    """Before: a resume with a new model.export_dir silently overwrote the first run's adapters."""
    config = _small_config(tmp_path, tiny_model_dir, multitask_jsonl)
    cli = cli_main(["fit", "--config", _write(tmp_path, config)])
    (ckpt,) = Path(cli.trainer.log_dir or "").glob("checkpoints/*.ckpt")
    first = (tmp_path / "run" / "adapters" / "cluster_0" / "adapter_model.safetensors").read_bytes()
    other = tmp_path / "other_adapters"
    with pytest.warns(
        UserWarning,
        match=r"the model section is taken from the checkpoint, not from the config; these "
        rf"values differ and the checkpoint's are used: model.export_dir: config '{other}' -> "
        rf"checkpoint '{tmp_path / 'run' / 'adapters'}'; model.lr: config 0.001 -> checkpoint "
        r"0.0001",
    ):
        cli_main(
            [
                "fit",
                "--config",
                _write(tmp_path, config),
                "--ckpt_path",
                str(ckpt),
                "--model.export_dir",
                str(other),
                "--model.lr",
                "0.001",
            ]
        )
    assert not other.exists()  # as the warning said: the checkpoint's export_dir was used
    again = (tmp_path / "run" / "adapters" / "cluster_0" / "adapter_model.safetensors").read_bytes()
    assert again == first  # resumed at its last step: the same adapters


def test_a_fit_resumed_from_its_final_checkpoint_still_ends_the_fit(
    tmp_path: Path, tiny_model_dir: Path, multitask_jsonl: Path
) -> None:
    """The sweep resumes a run killed during its merge study from ``last.ckpt`` (saved at the
    final step): the resumed fit trains nothing more but still runs every ``on_fit_end`` (here
    the adapters' export), with the same adapters."""
    from safetensors.torch import load_file

    config = _small_config(tmp_path, tiny_model_dir, multitask_jsonl)
    ckpt_dir = tmp_path / "run" / "checkpoints"
    config["trainer"]["callbacks"] = [
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {
                "dirpath": str(ckpt_dir),
                "save_top_k": 0,
                "save_last": True,
                "every_n_train_steps": 2,
                "enable_version_counter": False,
            },
        }
    ]
    path = _write(tmp_path, config)
    cli_main(["fit", "--config", path])
    export = tmp_path / "run" / "adapters"
    first = {
        p.name: load_file(p / "adapter_model.safetensors") for p in export.iterdir() if p.is_dir()
    }
    assert sorted(first) == ["cluster_0", "cluster_1"] and sorted(
        p.name for p in ckpt_dir.iterdir()
    ) == ["last.ckpt"]
    shutil.rmtree(export)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = cli_main(["fit", "--config", path, "--ckpt_path", str(ckpt_dir / "last.ckpt")])
    assert cli.trainer.global_step == 4
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    # the same config: nothing to report (num_adapters, unset, is linked from the data module)
    assert not [w for w in caught if "taken from the checkpoint" in str(w.message)]
    for name, tensors in first.items():
        again = load_file(export / name / "adapter_model.safetensors")
        assert again.keys() == tensors.keys()
        for key in tensors:
            torch.testing.assert_close(again[key], tensors[key], rtol=0, atol=0)


class KillAtStep(Callback):
    """Raises :class:`Killed` as step ``step`` starts: a fit killed there (used by class path)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: Any, *args: Any) -> None:
        if trainer.global_step == self.step:
            raise Killed(f"killed at step {self.step}")


class Killed(RuntimeError):
    pass


def test_a_fit_killed_mid_epoch_resumes_bit_for_bit(
    tmp_path: Path, tiny_model_dir: Path, multitask_jsonl: Path
) -> None:
    """The sweep's setting: a cosine schedule whose lengths come from the data (no
    ``max_steps_per_adapter``), validation at epoch end, ``last.ckpt`` every 5 steps, a fit
    killed in its second epoch and resumed. Before, the resumed fit restarted the epoch's batch
    order from its first batch (Lightning issue #20550), so its adapters differed."""
    from safetensors.torch import load_file

    def fit(out: Path, kill_at: int | None = None, ckpt: Path | None = None) -> dict[str, Any]:
        cache = tmp_path / "cache"  # both fits embed the same corpus: once
        config = fit_config(
            out / "run", tiny_model_dir, multitask_jsonl, cache, tensorboard=True, num_clusters=2
        )
        config["trainer"].update(max_steps=-1, max_epochs=2, limit_val_batches=1)
        config["model"].update(lr=1e-2, lr_schedule="cosine")
        config["trainer"]["callbacks"] = [
            {
                "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {
                    "dirpath": str(out / "checkpoints"),
                    "save_top_k": 0,
                    "save_last": True,
                    "every_n_train_steps": 5,
                    "enable_version_counter": False,
                },
            }
        ]
        if kill_at is not None:
            config["trainer"]["callbacks"].append(
                {"class_path": f"{__name__}.KillAtStep", "init_args": {"step": kill_at}}
            )
        argv = ["fit", "--config", _write(out, config)]
        cli = cli_main(argv + (["--ckpt_path", str(ckpt)] if ckpt else []))
        export = out / "run" / "adapters"
        loader = cli.trainer.fit_loop._combined_loader.flattened[0]
        return {
            "steps": cli.trainer.global_step,
            "adapters": {
                p.name: load_file(p / "adapter_model.safetensors")
                for p in export.iterdir()
                if p.is_dir()
            },
            "loader": loader.state_dict(),
        }

    (tmp_path / "full").mkdir()
    (tmp_path / "killed").mkdir()
    full = fit(tmp_path / "full")
    per_epoch = full["steps"] // 2
    stop = 5 * (per_epoch // 5 + 1)  # the first checkpoint inside the second epoch
    assert per_epoch < stop < 2 * per_epoch - 2, (per_epoch, stop)
    with pytest.raises(Killed, match=f"killed at step {stop + 2}"):
        fit(tmp_path / "killed", kill_at=stop + 2)  # 2 steps after the checkpoint
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == stop
    resumed = fit(tmp_path / "killed", ckpt=last)
    assert resumed["steps"] == full["steps"]
    assert resumed["loader"] == full["loader"]  # it ended the epoch where the full fit did
    assert sorted(resumed["adapters"]) == sorted(full["adapters"]) == ["cluster_0", "cluster_1"]
    for name, tensors in full["adapters"].items():
        for key in tensors:
            torch.testing.assert_close(resumed["adapters"][name][key], tensors[key], rtol=0, atol=0)
