"""Every YAML in configs/strategies parses against Trainer + LoRAModule and builds its strategy."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest
import yaml
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningArgumentParser

from tclora.module import LoRAModule

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "strategies"
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))


def _parser() -> LightningArgumentParser:
    parser = LightningArgumentParser(exit_on_error=False)
    parser.add_lightning_class_args(Trainer, "trainer")
    parser.add_lightning_class_args(LoRAModule, "model")
    return parser


def test_all_strategies_have_a_config() -> None:
    assert {p.stem for p in CONFIGS} == {"ddp", "fsdp", "deepspeed"}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_parses(path: Path) -> None:
    raw = yaml.safe_load(path.read_text())
    cfg = _parser().parse_path(str(path))
    assert cfg.trainer.accelerator == "gpu"
    # FSDP: one dtype per flattened unit, and peft keeps LoRA weights in float32
    assert cfg.model.dtype == ("float32" if path.stem == "fsdp" else "bfloat16")
    assert cfg.model.gradient_checkpointing is True
    assert set(raw) == {"trainer", "model"}


def _strategy(path: Path) -> Any:
    parser = LightningArgumentParser(exit_on_error=False)
    parser.add_lightning_class_args(Trainer, "trainer")
    raw = yaml.safe_load(path.read_text())
    cfg = parser.parse_object({"trainer": raw["trainer"]})
    return cfg.trainer.strategy


def test_ddp_finds_unused_parameters() -> None:
    from lightning.pytorch.strategies import StrategyRegistry

    name = _strategy(CONFIG_DIR / "ddp.yaml")
    strategy = StrategyRegistry.get(name)
    assert strategy._ddp_kwargs["find_unused_parameters"] is True


def test_fsdp_builds_with_orig_params_full_state_and_adapter_wrapping() -> None:
    from lightning.pytorch.strategies import FSDPStrategy
    from transformers.models.mistral.modeling_mistral import MistralDecoderLayer

    from tclora.fsdp_policy import AdapterWrapPolicy

    spec = _strategy(CONFIG_DIR / "fsdp.yaml")
    assert spec.class_path == "lightning.pytorch.strategies.FSDPStrategy"
    init = dict(vars(spec.init_args))
    init = {k: v for k, v in init.items() if v is not None}
    policy_spec = init.pop("auto_wrap_policy")
    assert policy_spec.class_path == "tclora.fsdp_policy.AdapterWrapPolicy"
    policy = AdapterWrapPolicy(**vars(policy_spec.init_args))
    strategy = FSDPStrategy(**init, auto_wrap_policy=policy)
    assert strategy.kwargs["use_orig_params"] is True
    assert strategy._state_dict_type == "full"
    assert strategy.kwargs["auto_wrap_policy"] is policy
    assert policy.layer_classes == [MistralDecoderLayer]


def test_deepspeed_excludes_frozen_parameters() -> None:
    from lightning.pytorch.strategies import DeepSpeedStrategy

    spec = _strategy(CONFIG_DIR / "deepspeed.yaml")
    assert spec.class_path == "lightning.pytorch.strategies.DeepSpeedStrategy"
    raw = yaml.safe_load((CONFIG_DIR / "deepspeed.yaml").read_text())
    given = raw["trainer"]["strategy"]["init_args"]
    accepted = inspect.signature(DeepSpeedStrategy.__init__).parameters
    assert set(given) <= set(accepted)
    assert spec.init_args.exclude_frozen_parameters is True
    assert spec.init_args.stage == 2
