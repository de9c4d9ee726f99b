"""Does DeepSpeed move an adapter that takes no part in a step? (Why ``LoRAModule`` steps the
inactive adapters' optimizer groups with learning rate 0 under DeepSpeed.)

Two "adapters" (two linear layers, one AdamW group each, both requiring grad when DeepSpeed is
initialised, as ``LoRAModule.configure_model`` leaves them) train in turn, the inactive one with
``requires_grad=False``, as ``LoRAModule.activate`` does. Torch's AdamW skips a parameter whose
gradient is ``None``; DeepSpeed's ZeRO optimizer steps flat partitions whose gradients it fills
with zeros, so momentum and weight decay move the inactive adapter unless its group's learning
rate is 0. On 2026-11-27 (DeepSpeed 0.19.8, torch 2.13 CPU, gloo) for ZeRO stages 1 and 2:
moved with the schedule's learning rate, unmoved with 0. Learning rate 0 keeps the weights but
not the optimizer state (moments, step count), which ``LoRAModule`` also puts back after each
step; ``deepspeed_fit_check.py`` checks a whole fit. Runs on a CPU or a GPU::

    pip install deepspeed   # DS_BUILD_OPS=0 is enough: no compiled op is needed
    python benchmarks/gpu_kit/deepspeed_check.py
"""

from __future__ import annotations

import os

import torch


def inactive_adapter_moves(stage: int, lr_zero: bool) -> bool:
    """Train adapter ``a`` for one step after both adapters trained; report whether ``b`` moved.

    Args:
        stage: DeepSpeed's ZeRO stage (1 or 2).
        lr_zero: Whether ``b``'s group steps with learning rate 0 (what ``LoRAModule`` does).

    Returns:
        Whether ``b``'s weights changed in ``a``'s step.
    """
    import deepspeed

    torch.manual_seed(0)
    a, b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    model = torch.nn.ModuleDict({"a": a, "b": b})
    groups = [{"params": list(a.parameters())}, {"params": list(b.parameters())}]
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": stage, "overlap_comm": True, "contiguous_gradients": True},
    }
    engine, optimizer, _, _ = deepspeed.initialize(
        model=model, optimizer=torch.optim.AdamW(groups, lr=0.1), config=config
    )
    x = torch.randn(2, 4, device=engine.device)

    def step(active: str) -> None:
        for name, layer in model.items():
            layer.requires_grad_(name == active)
        if lr_zero:
            for i, name in enumerate(model):
                optimizer.param_groups[i]["lr"] = 0.1 if name == active else 0.0
        engine.backward(model[active](x).pow(2).sum())
        engine.step()

    step("a"), step("b")  # both adapters have Adam moments now
    before = b.weight.detach().clone()
    step("a")
    return not torch.equal(before, b.weight.detach())


def main() -> None:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    print("| ZeRO stage | inactive group's learning rate | inactive adapter moved |")
    print("|---|---|---|")
    for stage in (1, 2):
        for lr_zero in (False, True):
            moved = inactive_adapter_moves(stage, lr_zero)
            print(f"| {stage} | {'0' if lr_zero else 'its schedule'} | {moved} |")


if __name__ == "__main__":
    main()
