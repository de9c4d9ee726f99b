"""Merges as LoRA adapters: peft folder round trip, in-memory install, fold into the base."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import randomize_lora
from peft import LoraConfig, PeftModel, get_peft_model
from torch.testing import assert_close

from tclora.merge import (
    AdapterStack,
    MergedAdapter,
    cp_decompose,
    export_adapter,
    fold_into_base,
    install_adapter,
    merge_baseline,
    merge_cp,
)

TARGETS = ["q_proj", "k_proj", "up_proj"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def setup(tiny_llama: Any) -> tuple[Any, PeftModel, AdapterStack]:
    """A pristine copy of the base model, and a PeftModel over it with three random adapters."""
    base_copy = copy.deepcopy(tiny_llama)
    model = get_peft_model(
        tiny_llama,
        LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS, lora_dropout=0.0),
        adapter_name="t0",
    )
    model.add_adapter("t1", LoraConfig(r=3, lora_alpha=3, target_modules=TARGETS, lora_dropout=0.0))
    model.add_adapter("t2", LoraConfig(r=2, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0))
    randomize_lora(model, seed=0)
    return base_copy, model, AdapterStack.from_peft_model(model)


def merges(stack: AdapterStack) -> list[MergedAdapter]:
    cp = cp_decompose(stack, 4, n_iter_max=30)
    return [merge_cp(stack, cp, "mean_loading", scale=2.0), merge_baseline(stack, "ties", rank=5)]


def test_export_round_trip(setup, tmp_path: Path) -> None:
    base_copy, _, stack = setup
    for i, merged in enumerate(merges(stack)):
        out = export_adapter(merged, tmp_path / "merged", stack.lora_config)
        assert out == tmp_path / "merged"
        assert sorted(p.name for p in out.iterdir()) == [
            "adapter_config.json",
            "adapter_model.safetensors",
        ]
        assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # no temp folders left behind
        config = json.loads((out / "adapter_config.json").read_text())
        assert config["r"] == config["lora_alpha"] == merged.rank
        loaded = PeftModel.from_pretrained(copy.deepcopy(base_copy), out)
        for module in stack.module_names:
            layer = loaded.get_base_model().get_submodule(module)
            assert_close(
                layer.get_delta_weight("default"), merged.delta(module), atol=1e-6, rtol=1e-5
            )
        assert i in (0, 1)


def test_install_adapter(setup) -> None:
    _, model, stack = setup
    cp_merge, ties_merge = merges(stack)
    model.set_adapter("t1")
    install_adapter(model, "merged", cp_merge)
    assert model.active_adapter == "t1"
    base = model.get_base_model()
    for module in stack.module_names:
        layer = base.get_submodule(module)
        assert layer.scaling["merged"] == 1.0
        assert not layer.lora_A["merged"].weight.requires_grad
        assert_close(layer.get_delta_weight("merged"), cp_merge.delta(module))
        assert layer.lora_A["t1"].weight.requires_grad  # the active adapter stays trainable
    install_adapter(model, "merged", ties_merge)  # replace
    assert model.active_adapter == "t1"
    for module in stack.module_names:
        assert_close(
            base.get_submodule(module).get_delta_weight("merged"), ties_merge.delta(module)
        )
    model.set_adapter("merged")
    install_adapter(model, "merged", cp_merge)  # replace the active one: stays active
    assert model.active_adapter == "merged"
    assert_close(
        base.get_submodule(stack.module_names[0]).get_delta_weight("merged"),
        cp_merge.delta(stack.module_names[0]),
    )


def test_fold_into_base_matches_installed_adapter(setup) -> None:
    base_copy, model, stack = setup
    merged = merges(stack)[0]
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    install_adapter(model, "merged", merged)
    model.set_adapter("merged")
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    before = {m: base_copy.get_submodule(m).weight.detach().clone() for m in stack.module_names}
    fold_into_base(base_copy, merged)
    for m in stack.module_names:
        assert_close(base_copy.get_submodule(m).weight, before[m] + merged.delta(m))
    with torch.no_grad():
        assert_close(base_copy(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-4)
    # on a PeftModel the base layers change, the adapters do not
    layer = model.get_base_model().get_submodule(stack.module_names[0])
    w0 = layer.get_base_layer().weight.detach().clone()
    fold_into_base(model, merged)
    assert_close(layer.get_base_layer().weight, w0 + merged.delta(stack.module_names[0]))


def test_export_install_fold_errors(setup, tmp_path: Path) -> None:
    base_copy, model, stack = setup
    merged = merges(stack)[0]
    with pytest.raises(
        TypeError, match=r"peft_model must be a peft.PeftModel, got LlamaForCausalLM"
    ):
        install_adapter(base_copy, "m", merged)
    unknown = MergedAdapter(
        "x", 1.0, {"model.layers.9.mlp.up_proj": merged.lowrank[stack.module_names[0]]}
    )
    with pytest.raises(
        ValueError,
        match=r"module 'model.layers.9.mlp.up_proj' of the merge is not a module of the model",
    ):
        install_adapter(model, "m", unknown)
    with pytest.raises(
        ValueError,
        match=r"module 'model.layers.9.mlp.up_proj' of the merge is not a module of the model",
    ):
        fold_into_base(base_copy, unknown)
    q = "model.layers.0.self_attn.q_proj"
    wrong = MergedAdapter("x", 1.0, {q: (torch.randn(7, 2), torch.randn(2, 32))})
    with pytest.raises(
        ValueError, match=r"shape differs on module 'model.layers.0.self_attn.q_proj'"
    ):
        install_adapter(model, "m", wrong)
    with pytest.raises(
        ValueError, match=r"shape differs on module 'model.layers.0.self_attn.q_proj'"
    ):
        fold_into_base(base_copy, wrong)
    nan = MergedAdapter("x", 1.0, {q: (torch.full((32, 2), math.nan), torch.randn(2, 32))})
    with pytest.raises(
        ValueError,
        match=r"non-finite values \(nan/inf\) in the merge, module 'model.layers.0.self_attn.q_proj'",
    ):
        export_adapter(nan, tmp_path / "n", None)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"out_dir='.*file' exists and is not a folder"):
        export_adapter(merged, tmp_path / "file", stack.lora_config)
    with pytest.raises(ValueError, match=r"merged has no modules"):
        export_adapter(MergedAdapter("x", 1.0, {}), tmp_path / "e", None)
