"""AdapterSwitch: the cached adapter switch LoRAModule uses on every step leaves the model in
exactly the state peft's ``set_adapter`` does."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from helpers import build_tiny_llama, randomize_lora
from peft import LoraConfig, get_peft_model

from tclora.adapter_switch import AdapterSwitch

NAMES = ["cluster_0", "cluster_1", "cluster_2"]


def _peft_model(vocab: int, **extra: Any) -> Any:
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], **extra
    )
    model = get_peft_model(build_tiny_llama(vocab), copy.deepcopy(config), adapter_name=NAMES[0])
    for name in NAMES[1:]:
        model.add_adapter(name, copy.deepcopy(config))
    randomize_lora(model)
    return model


def _state(model: Any) -> tuple[dict[str, bool], dict[str, list[str]], Any]:
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    active = {n: list(m.active_adapters) for n, m in model.named_modules() if hasattr(m, "lora_A")}
    return grads, active, model.base_model.active_adapter


def test_switch_leaves_the_state_set_adapter_leaves(tokenizer: Any) -> None:
    ours = _peft_model(len(tokenizer))
    theirs = copy.deepcopy(ours)
    switch = AdapterSwitch.build(ours, NAMES)
    assert switch is not None
    assert [len(switch.params[n]) for n in NAMES] == [2 * 3 * 2] * 3  # A, B x 3 modules x 2 layers
    ids = torch.tensor([[5, 9, 2, 7, 1]])
    for name in ["cluster_1", "cluster_0", "cluster_2", "cluster_2", "cluster_1"]:
        switch(name)
        theirs.base_model.set_adapter(name)
        assert _state(ours) == _state(theirs)
        assert _state(ours)[2] == name
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits)
    with pytest.raises(KeyError, match=r"adapter 'cluster_9' is not one of \['cluster_0'"):
        switch("cluster_9")


def test_models_with_auxiliary_trainable_modules_use_set_adapter(tokenizer: Any) -> None:
    """modules_to_save wraps modules that peft's set_adapter also switches: no cached switch."""
    model = _peft_model(len(tokenizer), modules_to_save=["lm_head"])
    assert AdapterSwitch.build(model, NAMES) is None


def test_lora_module_switches_with_the_cache(tiny_model_dir: Any) -> None:
    from tclora.module import LoRAModule

    module = LoRAModule(model=str(tiny_model_dir), num_adapters=3, r=4)
    module.configure_model()
    module.activate(2)
    assert isinstance(module._switch, AdapterSwitch)
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert trainable and all(".cluster_2." in n for n in trainable)
    assert module.model.base_model.active_adapter == "cluster_2"
