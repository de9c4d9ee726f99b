"""The merged adapter's config names its modules the way peft does: short names when they are
unambiguous (before: 210 fully-qualified module names in the demo's merged adapter)."""

from __future__ import annotations

import torch
from peft import LoraConfig

from tclora.merge import MergedAdapter, merged_lora_config

MODULES = [f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in ("q", "v")]


def _merged() -> MergedAdapter:
    lowrank = {m: (torch.ones(4, 2), torch.ones(2, 4)) for m in MODULES}
    return MergedAdapter(method="uniform", scale=1.0, lowrank=lowrank)


def test_short_names_when_the_adapters_used_exactly_them() -> None:
    config = merged_lora_config(_merged(), LoraConfig(target_modules=["v_proj", "q_proj"]))
    assert config.target_modules == {"q_proj", "v_proj"}
    assert (config.r, config.lora_alpha) == (2, 2)


def test_full_names_when_short_names_could_match_more() -> None:
    ambiguous = [
        LoraConfig(target_modules=["q_proj", "v_proj"], layers_to_transform=[0]),
        LoraConfig(target_modules=["q_proj", "v_proj", "k_proj"]),  # k_proj is not merged
        LoraConfig(target_modules=r".*\.(q|v)_proj"),  # a regular expression
        None,
    ]
    for adapters in ambiguous:
        assert set(merged_lora_config(_merged(), adapters).target_modules) == set(MODULES)
