"""Two-process FSDP (FULL_SHARD over gloo on the CPU) of a LoRAModule's model under a wrap policy.

Usage: ``python tests/fsdp_policy_script.py MODEL_DIR OUT_DIR {layers,adapters}``. Each rank trains
the same two adapters for six steps (adapter 0, 1, 0, 1, 0, 0) on its own batches with AdamW, one
param group per adapter, as ``LoRAModule`` does. Rank zero writes ``OUT_DIR/<policy>.json`` (the
units, how many mix frozen and trainable weights, the gradient elements each step left on the rank,
one adapter's size, the adapter weight names before and after wrapping) and
``OUT_DIR/<policy>.safetensors`` (every LoRA weight after step 4 and at the end, gathered), and
exports the adapters from the sharded model (``tclora.module.full_parameters``) to
``OUT_DIR/<policy>-export``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import free_port, randomize_lora  # noqa: E402

STEPS = (0, 1, 0, 1, 0, 0)


def _gathered(module: object, wrapped: torch.nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.fsdp import FullyShardedDataParallel

    from tclora.module import _is_lora, _unwrapped

    with FullyShardedDataParallel.summon_full_params(wrapped, writeback=False):
        return {
            _unwrapped(n): p.detach().clone() for n, p in wrapped.named_parameters() if _is_lora(n)
        }


def worker(rank: int, world: int, port: int, model_dir: str, out: str, policy_name: str) -> None:
    torch.manual_seed(0)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from tclora.fsdp_policy import AdapterWrapPolicy
    from tclora.module import LoRAModule, full_parameters

    module = LoRAModule(model=model_dir, num_adapters=2, r=4, gradient_checkpointing=True)
    module.configure_model()
    randomize_lora(module.model)
    names_before = module.adapter_weight_names()
    adapter_numel = sum(p.numel() for _, p in module.adapter_parameters(0))
    if policy_name == "layers":
        policy = ModuleWrapPolicy({LlamaDecoderLayer})
    else:
        policy = AdapterWrapPolicy([LlamaDecoderLayer])
    wrapped = FullyShardedDataParallel(
        module.model,
        auto_wrap_policy=policy,
        use_orig_params=True,
        device_id=torch.device("cpu"),
        sharding_strategy=ShardingStrategy.FULL_SHARD,
    )
    units = FullyShardedDataParallel.fsdp_modules(wrapped)
    flats = [u._flat_param for u in units if getattr(u, "_flat_param", None) is not None]
    mixed = sum(len({p.requires_grad for p in f._params}) > 1 for f in flats)
    groups = [
        {"params": [p for _, p in module.adapter_parameters(i)], "lr": 1e-2} for i in range(2)
    ]
    optimizer = torch.optim.AdamW(groups, weight_decay=0.1)
    generator = torch.Generator().manual_seed(100 + rank)
    grad_numel, after_step_4 = [], {}
    for step, index in enumerate(STEPS):
        module.activate(index)
        ids = torch.randint(0, 128, (2, 16), generator=generator)
        wrapped(input_ids=ids, labels=ids).loss.backward()
        grad_numel.append(sum(f.grad.numel() for f in flats if f.grad is not None))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step == 3:
            after_step_4 = _gathered(module, wrapped)
    final = _gathered(module, wrapped)
    with full_parameters(wrapped):  # a collective; rank zero writes
        if rank == 0:
            module.export_adapters(Path(out) / f"{policy_name}-export")
    if rank == 0:
        from safetensors.torch import save_file

        tensors = {f"step4/{k}": v for k, v in after_step_4.items()}
        tensors.update({f"final/{k}": v for k, v in final.items()})
        save_file(tensors, str(Path(out) / f"{policy_name}.safetensors"))
        report = {
            "units": len(units),
            "mixed_units": mixed,
            "grad_numel": grad_numel,
            "adapter_numel": adapter_numel,
            "names_before": names_before,
            "names_after": module.adapter_weight_names(),
        }
        (Path(out) / f"{policy_name}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


def main() -> None:
    model_dir, out, policy_name = sys.argv[1:4]
    mp.spawn(worker, args=(2, free_port(), model_dir, out, policy_name), nprocs=2)


if __name__ == "__main__":
    main()
