"""FSDP's gradient per rank with decoder-layer units against tclora's AdapterWrapPolicy.

FSDP flattens each unit's own parameters (those not in a nested unit) into one flat parameter
and shards it over the ranks; a flat parameter holding any trainable weight gets a gradient of
its whole size, reduce-scattered in the backward pass. This script builds a model's shape with
K LoRA adapters on the meta device (no weights, nothing downloaded), groups its parameters into
units the way each policy wraps them, and counts, for one training step of one adapter:

- the gradient elements each rank keeps (the flat parameters that get a gradient, sharded),
- the elements reduce-scattered (those flat parameters unsharded),

so that the difference can be read for Mistral-7B on 8 GPUs without 8 GPUs. Padding for
alignment and for even shards is left out (a few elements per parameter). The counting is checked
against torch's FSDP over two CPU processes on a tiny model (``tests/test_fsdp_policy.py``: 13,376
and 2,048 gradient elements per rank, as counted here).

Usage::

    python benchmarks/fsdp_units.py                       # Mistral-7B and Phi-3-mini, 8 GPUs
    python benchmarks/fsdp_units.py --models mistral --gpus 4 --adapters 8 --r 16
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from tclora.fsdp_policy import AdapterWrapPolicy  # noqa: E402

# the paper's two configs (configs/mistral7b_flan.yaml, configs/phi3_flan.yaml): LoRA rank 4,
# 10 clusters; transformers' default configs of these classes are the two models' shapes
MODELS: dict[str, tuple[str, list[str]]] = {
    "mistral": ("MistralConfig", ["q_proj", "k_proj", "v_proj", "o_proj"]),
    "phi3": ("Phi3Config", ["qkv_proj", "o_proj"]),
}


@dataclass(frozen=True)
class UnitCount:
    """One policy's units and what one training step of one adapter costs per rank.

    Attributes:
        units: FSDP units (the root included).
        mixed_units: Units whose flat parameter holds frozen and trainable weights.
        grad_per_rank: Gradient elements each rank keeps after the step.
        reduced: Elements reduce-scattered in the step's backward pass.
    """

    units: int
    mixed_units: int
    grad_per_rank: int
    reduced: int


def lora_model(config: Any, targets: Sequence[str], adapters: int, r: int) -> nn.Module:
    """A causal LM of ``config``'s shape on the meta device with ``adapters`` LoRA adapters,
    every LoRA weight trainable (as ``LoRAModule`` leaves them before a strategy wraps)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(config)
        lora = LoraConfig(r=r, target_modules=list(targets), task_type="CAUSAL_LM")
        model = get_peft_model(base, lora, adapter_name="cluster_0")
        for i in range(1, adapters):
            model.add_adapter(f"cluster_{i}", lora)
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
    return model


def count_units(model: nn.Module, policy: Any, world: int, active: str = "cluster_0") -> UnitCount:
    """Group ``model``'s parameters into ``policy``'s FSDP units and count one step of adapter
    ``active`` on ``world`` ranks.

    Args:
        model: The model as FSDP would wrap it (the root unit).
        policy: A ``torch.distributed.fsdp.wrap`` policy (``_run_policy``).
        world: Ranks the flat parameters are sharded over.
        active: The adapter the step trains; the others' weights get no gradient, and a flat
            parameter gets one when it holds any of the active adapter's weights.

    Returns:
        The count.
    """
    wrapped = set(policy._run_policy(model, set(), {})) | {model}
    owner: dict[int, nn.Module] = {}

    def assign(module: nn.Module, unit: nn.Module) -> None:
        for param in module.parameters(recurse=False):
            owner.setdefault(id(param), unit)
        for child in module.children():
            assign(child, child if child in wrapped else unit)

    assign(model, model)
    flats: dict[nn.Module, list[tuple[str, nn.Parameter]]] = {u: [] for u in wrapped}
    for name, param in model.named_parameters():
        flats[owner[id(param)]].append((name, param))
    mixed = grad = reduced = 0
    for params in flats.values():
        if not params:
            continue
        trainable = {p.requires_grad for _, p in params}
        mixed += len(trainable) > 1
        if any(p.requires_grad and f".{active}." in n for n, p in params):
            size = sum(p.numel() for _, p in params)
            grad += math.ceil(size / world)
            reduced += size
    return UnitCount(len(wrapped), mixed, grad, reduced)


def decoder_layer_class(model: nn.Module) -> type[nn.Module]:
    """The class named by the model's ``_no_split_modules`` (its decoder layer)."""
    names = {n for m in model.modules() for n in getattr(m, "_no_split_modules", None) or []}
    for module in model.modules():
        if type(module).__name__ in names:
            return type(module)
    raise ValueError(f"no module of {type(model).__name__} is one of {sorted(names)}")


def compare(model: nn.Module, world: int) -> dict[str, UnitCount]:
    """Both policies' counts for ``model`` on ``world`` ranks."""
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    layer = decoder_layer_class(model)
    return {
        "decoder layers": count_units(model, ModuleWrapPolicy({layer}), world),
        "AdapterWrapPolicy": count_units(model, AdapterWrapPolicy([layer]), world),
    }


def _size(elements: int) -> str:
    """Elements as float32 bytes."""
    size = 4 * elements
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{size} B"
        size /= 1000
    raise AssertionError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=sorted(MODELS))
    parser.add_argument("--gpus", type=int, default=8, help="ranks the units are sharded over")
    parser.add_argument("--adapters", type=int, default=10, help="K, the number of adapters")
    parser.add_argument("--r", type=int, default=4, help="LoRA rank")
    args = parser.parse_args(argv)
    import transformers

    print(
        f"One training step of one adapter, FULL_SHARD over {args.gpus} ranks, "
        f"K = {args.adapters}, r = {args.r}; gradients in float32 (the FSDP config's model "
        "dtype), padding aside"
    )
    print()
    print(
        "| model | policy | units | units mixing frozen and trainable | gradient per rank "
        "| reduce-scattered per step |"
    )
    print("|---|---|---|---|---|---|")
    for key in args.models:
        config_class, targets = MODELS[key]
        config = getattr(transformers, config_class)()
        model = lora_model(config, targets, args.adapters, args.r)
        name = f"{config_class.removesuffix('Config')} ({', '.join(targets)})"
        counts = compare(model, args.gpus)
        for policy, c in counts.items():
            print(
                f"| {name} | {policy} | {c.units:,} | {c.mixed_units} "
                f"| {_size(c.grad_per_rank)} | {c.reduced:,} elements |"
            )
        ratio = counts["decoder layers"].grad_per_rank / counts["AdapterWrapPolicy"].grad_per_rank
        print(f"| {name} | ratio | | | {ratio:,.0f}× | |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
