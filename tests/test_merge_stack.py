"""AdapterStack from a PeftModel and from adapter folders; every input error."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import randomize_lora
from peft import LoraConfig, PeftModel, get_peft_model, inject_adapter_in_model
from torch.testing import assert_close

from tclora.merge import AdapterStack

TARGETS = ["q_proj", "v_proj", "down_proj"]


pytestmark = pytest.mark.usefixtures("one_thread")


def make_peft(base: Any, configs: dict[str, LoraConfig], seed: int = 0) -> PeftModel:
    names = list(configs)
    model = get_peft_model(base, configs[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, configs[name])
    randomize_lora(model, seed)
    return model


def cfg(r: int, alpha: float = 16, targets=TARGETS, **kw: Any) -> LoraConfig:
    return LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, **kw)


@pytest.fixture
def peft3(tiny_llama: Any) -> PeftModel:
    return make_peft(tiny_llama, {"x": cfg(2), "y": cfg(4, alpha=8), "z": cfg(3, use_rslora=True)})


def test_from_peft_model_reads_every_adapter(peft3: PeftModel) -> None:
    stack = AdapterStack.from_peft_model(peft3)
    assert stack.names == ["x", "y", "z"]
    assert len(stack.module_names) == 2 * 3
    assert stack.module_names == sorted(stack.module_names)
    assert "model.layers.0.self_attn.q_proj" in stack.module_names
    assert stack.lora_config is peft3.peft_config["x"]
    base = peft3.get_base_model()
    for module in stack.module_names:
        layer = base.get_submodule(module)
        assert stack.ranks(module) == [2, 4, 3]
        for t, name in enumerate(stack.names):
            assert_close(stack.delta(module, t), layer.get_delta_weight(name))
        assert stack.deltas(module).shape == (3, *stack.shape(module))
    assert stack.factors(stack.module_names[0])[2][2] == pytest.approx(16 / math.sqrt(3))


def test_from_peft_model_subset_and_copies(peft3: PeftModel) -> None:
    stack = AdapterStack.from_peft_model(peft3, ["z", "x"])
    assert stack.names == ["z", "x"]
    module = stack.module_names[0]
    before = stack.delta(module, 0).clone()
    with torch.no_grad():
        peft3.get_base_model().get_submodule(module).lora_B["z"].weight.mul_(2)
    assert_close(stack.delta(module, 0), before)  # the stack holds copies


def test_from_injected_module_without_peft_config(tiny_llama: Any) -> None:
    model = inject_adapter_in_model(cfg(2), tiny_llama, adapter_name="p")
    model = inject_adapter_in_model(cfg(3), model, adapter_name="q")
    randomize_lora(model)
    stack = AdapterStack.from_peft_model(model)
    assert stack.names == ["p", "q"]
    assert stack.lora_config.r == 2  # peft records the first adapter's config on the model
    layer = model.get_submodule(stack.module_names[0])
    assert_close(stack.delta(stack.module_names[0], 1), layer.get_delta_weight("q"))


def test_from_folders_equals_from_model(peft3: PeftModel, tmp_path: Path) -> None:
    peft3.save_pretrained(tmp_path)
    folders = [tmp_path / n for n in ("x", "y", "z")]
    from_files = AdapterStack.from_folders(folders)
    from_model = AdapterStack.from_peft_model(peft3)
    assert from_files.names == ["x", "y", "z"]
    assert from_files.module_names == from_model.module_names
    assert from_files.lora_config.r == 2
    for module in from_model.module_names:
        assert_close(from_files.deltas(module), from_model.deltas(module))
    named = AdapterStack.from_folders(folders[:2], names=["one", "two"])
    assert named.names == ["one", "two"]


def test_from_folders_alpha_pattern(tiny_llama: Any, tmp_path: Path) -> None:
    model = make_peft(tiny_llama, {"x": cfg(2, alpha_pattern={"v_proj": 5}), "y": cfg(2)})
    model.save_pretrained(tmp_path)
    stack = AdapterStack.from_folders([tmp_path / "x", tmp_path / "y"])
    ref = AdapterStack.from_peft_model(model)
    v = "model.layers.1.self_attn.v_proj"
    assert stack.factors(v)[0][2] == pytest.approx(2.5)
    for module in ref.module_names:
        assert_close(stack.deltas(module), ref.deltas(module))


# ------------------------------------------------------------------------------- errors
def test_fewer_than_two_adapters(tiny_llama: Any) -> None:
    model = make_peft(tiny_llama, {"only": cfg(2)})
    with pytest.raises(ValueError, match=r"need at least 2 adapters to merge, got 1: \['only'\]"):
        AdapterStack.from_peft_model(model)


def test_module_sets_differ_are_named(tiny_llama: Any) -> None:
    model = make_peft(tiny_llama, {"aa": cfg(2), "bb": cfg(2, targets=["q_proj", "v_proj"])})
    with pytest.raises(
        ValueError,
        match=r"module sets differ: module 'model.layers.0.mlp.down_proj' has adapters \['aa'\] but not \['bb'\]",
    ):
        AdapterStack.from_peft_model(model)


def test_folder_module_sets_differ(tiny_llama: Any, tmp_path: Path) -> None:
    model = make_peft(tiny_llama, {"aa": cfg(2), "bb": cfg(2, targets=["q_proj", "v_proj"])})
    model.save_pretrained(tmp_path)
    with pytest.raises(
        ValueError,
        match=r"module sets differ between adapters 'aa' and 'bb': only in 'aa': \['model.layers.0.mlp.down_proj'",
    ):
        AdapterStack.from_folders([tmp_path / "aa", tmp_path / "bb"])


def test_unknown_adapter_and_no_lora(peft3: PeftModel, tiny_llama: Any) -> None:
    with pytest.raises(
        ValueError,
        match=r"adapter_names contains \['w'\], which are not LoRA adapters of the model; available: \['x', 'y', 'z'\]",
    ):
        AdapterStack.from_peft_model(peft3, ["x", "w"])
    with pytest.raises(ValueError, match=r"model has no LoRA layers"):
        AdapterStack.from_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def test_dora_is_refused(tiny_llama: Any) -> None:
    model = make_peft(tiny_llama, {"pp": cfg(2), "d": cfg(2, use_dora=True)})
    with pytest.raises(ValueError, match=r"adapter 'd' on module .* uses DoRA"):
        AdapterStack.from_peft_model(model)


def test_non_finite_weights_are_named(peft3: PeftModel) -> None:
    layer = peft3.get_base_model().get_submodule("model.layers.1.mlp.down_proj")
    with torch.no_grad():
        layer.lora_B["y"].weight[0, 0] = math.inf
    with pytest.raises(
        ValueError,
        match=r"non-finite weights \(nan/inf\) in adapter 'y', module 'model.layers.1.mlp.down_proj', lora_B",
    ):
        AdapterStack.from_peft_model(peft3)


def test_direct_construction_errors() -> None:
    a, b = torch.randn(2, 8), torch.randn(6, 2)
    good = {"m": [(a, b, 1.0), (a, b, 1.0)]}
    with pytest.raises(
        ValueError,
        match=r"shapes differ on module 'm': adapter 'p' has d_out×d_in 6×8, adapter 'q' has 6×9",
    ):
        AdapterStack(
            ["p", "q"], [], LoraConfig(), {"m": [(a, b, 1.0), (torch.randn(2, 9), b, 1.0)]}
        )
    with pytest.raises(
        ValueError, match=r"adapter 'q' on module 'm': lora_A \(3, 8\) and lora_B \(6, 2\) are not"
    ):
        AdapterStack(
            ["p", "q"], [], LoraConfig(), {"m": [(a, b, 1.0), (torch.randn(3, 8), b, 1.0)]}
        )
    with pytest.raises(ValueError, match=r"adapter names must be unique, got \['p', 'p'\]"):
        AdapterStack(["p", "p"], [], LoraConfig(), good)
    with pytest.raises(ValueError, match=r"adapter 'q' on module 'm' has scaling=nan"):
        AdapterStack(["p", "q"], [], LoraConfig(), {"m": [(a, b, 1.0), (a, b, math.nan)]})
    stack = AdapterStack(["p", "q"], [], LoraConfig(), good)
    with pytest.raises(KeyError, match=r"module='n' is not in the stack"):
        stack.delta("n", 0)
    with pytest.raises(IndexError, match=r"t=2 is out of range for 2 adapters"):
        stack.delta("m", 2)


def test_folder_errors(peft3: PeftModel, tmp_path: Path) -> None:
    peft3.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"need at least 2 folders to merge, got 1"):
        AdapterStack.from_folders([tmp_path / "x"])
    with pytest.raises(
        FileNotFoundError, match=r"adapter_config.json not found: .* is not a peft adapter folder"
    ):
        AdapterStack.from_folders([tmp_path / "x", tmp_path / "nothing"])
    (tmp_path / "y" / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"has no adapter_model.safetensors"):
        AdapterStack.from_folders([tmp_path / "x", tmp_path / "y"])
    with pytest.raises(ValueError, match=r"names has 1 entries but folders has 2"):
        AdapterStack.from_folders([tmp_path / "x", tmp_path / "z"], names=["a"])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (dict(lora_bias=True), r"lora_bias=True; the LoRA bias is not part of B@A"),
        (dict(bias="lora_only"), r"bias='lora_only' trains the base model's biases"),
        (dict(modules_to_save=["lm_head"]), r"modules_to_save=\['lm_head'\] trains whole modules"),
    ],
)
def test_adapters_that_train_more_than_BA_are_refused(
    tiny_llama: Any, tmp_path: Path, extra: dict[str, Any], message: str
) -> None:
    """A merge of ``B@A`` would silently drop a LoRA bias, trained biases or whole modules."""
    model = make_peft(tiny_llama, {"pp": cfg(2), "qq": cfg(2, **extra)})
    with pytest.raises(ValueError, match=r"adapter 'qq': " + message):
        AdapterStack.from_peft_model(model)
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=rf"{tmp_path / 'qq'}: " + message):
        AdapterStack.from_folders([tmp_path / "pp", tmp_path / "qq"])


def test_folder_weights_besides_lora_A_and_B_are_refused(tiny_llama: Any, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    model = make_peft(tiny_llama, {"pp": cfg(2), "qq": cfg(2, targets=["q_proj", "embed_tokens"])})
    model.save_pretrained(tmp_path)
    with pytest.raises(
        ValueError,
        match=r"qq: the adapter file holds 3 weights besides lora_A/lora_B \(embedding LoRA, "
        r"whole modules or biases of the base model; e\.g\. \['base_model\.model\.model\."
        r"embed_tokens\.base_layer\.weight', .*a merge of B@A would drop them silently",
    ):
        AdapterStack.from_folders([tmp_path / "pp", tmp_path / "qq"])
    file = tmp_path / "pp" / "adapter_model.safetensors"
    state = load_file(str(file))
    key = next(k for k in state if k.endswith("q_proj.lora_B.weight"))
    save_file({**state, key.replace(".weight", ".bias"): torch.zeros(4)}, str(file))
    with pytest.raises(ValueError, match=r"pp: the adapter file holds 1 weights besides .*"):
        AdapterStack.from_folders([tmp_path / "pp", tmp_path / "pp"])


def test_folders_of_different_base_models_are_refused(peft3: PeftModel, tmp_path: Path) -> None:
    import json

    peft3.save_pretrained(tmp_path)
    config = tmp_path / "y" / "adapter_config.json"
    config.write_text(
        json.dumps({**json.loads(config.read_text()), "base_model_name_or_path": "o/m"})
    )
    with pytest.raises(
        ValueError,
        match=r"adapters of different base models cannot be merged: x -> None, y -> o/m, z -> None",
    ):
        AdapterStack.from_folders([tmp_path / n for n in ("x", "y", "z")])
