"""tclora.fsdp_policy.AdapterWrapPolicy: FSDP units that never mix frozen and trainable weights.

Lightning runs FSDP on GPUs only; torch's FSDP on the CPU, over gloo, stands in for it here (the
same wrapping, flattening, sharding and gradient reduction), alone and under Lightning's own
FSDPStrategy (``lightning_fsdp_script.py``, which lets it run on the CPU).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers.models.llama.modeling_llama import LlamaDecoderLayer
from transformers.models.mistral.modeling_mistral import MistralDecoderLayer

from tclora.fsdp_policy import AdapterWrapPolicy, adapter_modules
from tclora.module import LoRAModule, _is_lora

SCRIPT = Path(__file__).with_name("fsdp_policy_script.py")
LIGHTNING_SCRIPT = Path(__file__).with_name("lightning_fsdp_script.py")
SAFETENSORS = "adapter_model.safetensors"


def test_adapter_modules_are_each_adapters_lora_modules(tiny_model_dir: Path) -> None:
    module = LoRAModule(model=str(tiny_model_dir), num_adapters=2, r=4)
    module.configure_model()
    found = list(adapter_modules(module.model))
    # 2 layers x 7 linear modules x 2 adapters x (lora_A, lora_B)
    assert len(found) == 56 and all(type(m) is nn.Linear for m in found)
    covered = {id(p) for m in found for p in m.parameters()}
    lora = {id(p) for n, p in module.model.named_parameters() if _is_lora(n)}
    assert covered == lora
    own = [{id(p) for _, p in module.adapter_parameters(i)} for i in range(2)]
    for m in found:  # each module holds one adapter's weights only
        assert sum({id(p) for p in m.parameters()} <= weights for weights in own) == 1


def test_adapter_wrap_policy_refuses_bad_layer_classes(tiny_model_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"layer_classes=\[\] must name one or more"):
        AdapterWrapPolicy([])
    with pytest.raises(ValueError, match=r"layer_classes=\['LlamaDecoderLayer'\] must name"):
        AdapterWrapPolicy(["LlamaDecoderLayer"])  # type: ignore[list-item]
    module = LoRAModule(model=str(tiny_model_dir), num_adapters=2, r=4)
    module.configure_model()
    policy = AdapterWrapPolicy([MistralDecoderLayer])
    with pytest.raises(
        ValueError,
        match=r"layer_classes=\['MistralDecoderLayer'\] matches no module of the model "
        r"PeftModelForCausalLM; its decoder layer classes \(_no_split_modules\) are "
        r"\['LlamaDecoderLayer'\]",
    ):
        policy._run_policy(module.model, set(), {})  # what FSDP calls when it wraps
    units = AdapterWrapPolicy([LlamaDecoderLayer])._run_policy(module.model, set(), {"a": 1})
    assert len(units) == 2 + 56 and all(kwargs == {"a": 1} for kwargs in units.values())


def _run(tiny_model_dir: Path, out: Path, policy: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, str(SCRIPT), str(tiny_model_dir), str(out), policy]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / f"{policy}.json").read_text())


@pytest.mark.slow
def test_two_process_fsdp_adapter_units_train_like_layer_units(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """FULL_SHARD over two processes: with layer units, each layer's flat parameter mixes frozen
    and trainable weights, and every step leaves a gradient shard of both whole layers on each
    rank; with AdapterWrapPolicy no unit mixes, a step leaves only the active adapter's gradient
    (half of it per rank), the adapter not trained keeps its weights, and the adapters end bit
    for bit where the layer-unit run ends. Under both, the export gathers the sharded adapters
    on rank zero whole."""
    layers = _run(tiny_model_dir, tmp_path, "layers")
    adapters = _run(tiny_model_dir, tmp_path, "adapters")
    assert (layers["units"], layers["mixed_units"]) == (3, 2)  # root + 2 decoder layers
    assert (adapters["units"], adapters["mixed_units"]) == (1 + 2 + 56, 0)
    assert adapters["adapter_numel"] == 4096
    assert adapters["grad_numel"] == [4096 // 2] * 6
    assert layers["grad_numel"] == [13376] * 6  # 6.5x as many
    for report in (layers, adapters):  # checkpoints name the weights without FSDP's wrappers
        assert report["names_after"] == report["names_before"] and len(report["names_after"]) == 56
    want = load_file(tmp_path / "layers.safetensors")
    got = load_file(tmp_path / "adapters.safetensors")
    assert sorted(got) == sorted(want)
    for key, value in got.items():
        torch.testing.assert_close(value, want[key], rtol=0, atol=0)
    # the export gathers the shards on rank zero: peft's files, each adapter's final weights
    for policy in ("layers", "adapters"):
        for index in range(2):
            saved = load_file(tmp_path / f"{policy}-export" / f"cluster_{index}" / SAFETENSORS)
            assert len(saved) == 28
            for key, value in saved.items():
                name = key.replace(".lora_A.", f".lora_A.cluster_{index}.")
                name = name.replace(".lora_B.", f".lora_B.cluster_{index}.")
                torch.testing.assert_close(value, want[f"final/{name}"], rtol=0, atol=0)
    # steps 5 and 6 train adapter 0: adapter 1 stays where step 4 left it, adapter 0 moves
    for key in [k for k in got if k.startswith("final/")]:
        before = got[key.replace("final/", "step4/")]
        if ".cluster_1." in key:
            torch.testing.assert_close(got[key], before, rtol=0, atol=0)
        else:
            assert not torch.equal(got[key], before), key


@pytest.mark.slow
def test_lightning_fsdp_on_two_processes_trains_the_adapters_of_one_device(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """A LoRAModule fit under Lightning's FSDPStrategy with AdapterWrapPolicy (FULL_SHARD, two
    processes on the same batches) exports the adapters a one-device fit exports, bit for bit,
    with the same validation losses, and so does the same fit stopped after its first epoch and resumed from its checkpoint (which
    holds the adapters alone). Lightning runs training_step inside the root FSDP module's forward,
    after FSDP has set each unit's requires_grad from its original parameters; until 2026-11-27
    LoRAModule switched the adapter only there, and this fit raised "element 0 of tensors does not
    require grad" on both ranks at the first step of adapter 1 (as on an H100 with one process)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    for mode in ("single", "fsdp", "fsdp-first-epoch", "fsdp-resumed"):
        argv = [sys.executable, str(LIGHTNING_SCRIPT), str(tiny_model_dir), str(tmp_path), mode]
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, mode + proc.stderr[-3000:]
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert len(checkpoint["state_dict"]) == 56
    assert all(_is_lora(k) for k in checkpoint["state_dict"])
    for index in range(2):
        want = load_file(tmp_path / "single" / f"cluster_{index}" / SAFETENSORS)
        assert len(want) == 28 and all(bool(want[k].any()) for k in want if ".lora_B." in k)
        for mode in ("fsdp", "fsdp-resumed"):
            got = load_file(tmp_path / mode / f"cluster_{index}" / SAFETENSORS)
            assert sorted(got) == sorted(want)
            for key, value in got.items():
                torch.testing.assert_close(value, want[key], rtol=0, atol=0, msg=mode)
    # validation under FSDP (each cluster's loader through its adapter) gives the same losses
    val = {m: json.loads((tmp_path / f"{m}-val.json").read_text()) for m in ("single", "fsdp")}
    assert sorted(val["single"]) == ["val/loss", "val/loss_cluster_0", "val/loss_cluster_1"]
    assert val["fsdp"] == val["single"]
    # the comparison can fail: after one epoch of the two, adapter 0 is elsewhere
    halfway = load_file(tmp_path / "fsdp-first-epoch" / "cluster_0" / SAFETENSORS)
    final = load_file(tmp_path / "single" / "cluster_0" / SAFETENSORS)
    assert any(not torch.equal(halfway[k], final[k]) for k in final)


def test_the_unit_count_matches_what_fsdp_did_on_two_processes() -> None:
    """``benchmarks/fsdp_units.py`` counts without FSDP what the 2-process run above measured
    (13,376 and 2,048 gradient elements per rank), and prints Mistral-7B's figures."""
    from transformers import LlamaConfig

    from benchmarks.fsdp_units import UnitCount, compare, lora_model
    from tests.helpers import TINY_CONFIG

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = lora_model(LlamaConfig(vocab_size=128, **TINY_CONFIG), targets, adapters=2, r=4)
    assert compare(model, world=2) == {
        "decoder layers": UnitCount(units=3, mixed_units=2, grad_per_rank=13376, reduced=26752),
        "AdapterWrapPolicy": UnitCount(units=59, mixed_units=0, grad_per_rank=2048, reduced=4096),
    }


def test_fsdp_units_prints_the_readme_figures(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks.fsdp_units import main

    assert main(["--models", "mistral"]) == 0
    out = capsys.readouterr().out
    assert "| Mistral (q_proj, k_proj, v_proj, o_proj) | decoder layers | 33 | 32 | 3.5 GB |" in out
    assert "| AdapterWrapPolicy | 2,593 | 0 | 1.7 MB | 3,407,872 elements |" in out
    assert "| ratio | | | 2,058× | |" in out
