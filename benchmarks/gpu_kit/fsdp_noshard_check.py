"""Which FSDP set-ups train a LoRAModule's adapters on one process (``NO_SHARD``)?

On one H100 (2026-11-27) ``fsdp.yaml`` with ``AdapterWrapPolicy`` failed: under bf16-mixed the
active adapter's weights reached the forward pass without ``requires_grad`` (a ``CheckpointError``
with activation checkpointing, "element 0 of tensors does not require grad" without), and in
float32 or bf16-true FSDP asserted ``as_params=True type(prim_param)=<class 'torch.Tensor'>``.
This script runs torch's FSDP (no Lightning) over one process on a tiny Llama with 2 adapters, three
steps switched as ``LoRAModule`` switches them, for every combination of

* wrap policy: ``AdapterWrapPolicy`` or the decoder layers alone,
* precision: float32, or bfloat16 ``MixedPrecision`` with autocast (what Lightning's bf16-mixed
  does under FSDP),
* activation checkpointing (transformers', non-reentrant) on or off,
* tied input and output embeddings (SmolLM2 ties them; Mistral-7B and Phi-3-mini do not),
* where the adapter is switched: ``before`` the root module's forward (``LoRAModule`` does it in
  ``on_train_batch_start`` since 2026-11-27), or ``in forward`` (inside the root forward, after
  FSDP's root pre-forward has set each unit's ``requires_grad`` from its original parameters:
  where Lightning ran ``training_step``, the only place it switched before),

and prints one table row each: ``ok``, or the error, and whether every adapter moved. On the CPU
(torch 2.13, gloo) every ``before`` row is ``ok`` except float32 with tied embeddings, which fails
with the assertion under both policies (FSDP's own, with shared parameters under ``NO_SHARD`` and
``use_orig_params``); ``in forward`` with ``AdapterWrapPolicy`` gives the H100's no-grad errors
(the decoder-layer units hold every adapter, so some weight always requires grad). Usage::

    python benchmarks/gpu_kit/fsdp_noshard_check.py            # cuda when there is one
    python benchmarks/gpu_kit/fsdp_noshard_check.py --quick    # three rows (a test runs it)
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))


class _SwitchInForward(torch.nn.Module):
    """A root module that switches the adapter inside its own forward, as a ``training_step``
    that Lightning runs through the FSDP root's forward does."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, index: int, **batch: torch.Tensor) -> torch.Tensor:
        self.module.activate(index)  # type: ignore[operator]
        return self.module.model(**batch).loss  # type: ignore[union-attr]


def one_case(
    model_dir: str,
    policy_name: str,
    bf16: bool,
    checkpointing: bool,
    device: torch.device,
    in_forward: bool = False,
) -> str:
    """Three steps (adapters 0, 1, 0) under FSDP ``NO_SHARD``; ``ok`` or the error, and whether
    both adapters moved."""
    from torch.distributed.fsdp import FullyShardedDataParallel, MixedPrecision, ShardingStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from tclora.fsdp_policy import AdapterWrapPolicy
    from tclora.module import LoRAModule

    torch.manual_seed(0)
    module = LoRAModule(model=model_dir, num_adapters=2, r=4, gradient_checkpointing=checkpointing)
    module.configure_model()
    before = {n: p.detach().clone() for n, p in module.model.named_parameters() if "lora_B" in n}
    policy = (
        AdapterWrapPolicy([LlamaDecoderLayer])
        if policy_name == "adapters"
        else ModuleWrapPolicy({LlamaDecoderLayer})
    )
    mixed = (
        MixedPrecision(
            param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16, buffer_dtype=torch.bfloat16
        )
        if bf16
        else None
    )
    root = _SwitchInForward(module) if in_forward else module.model
    wrapped = FullyShardedDataParallel(
        root,
        auto_wrap_policy=policy,
        use_orig_params=True,
        device_id=device,
        sharding_strategy=ShardingStrategy.NO_SHARD,
        mixed_precision=mixed,
    )
    groups = [{"params": [p for _, p in module.adapter_parameters(i)]} for i in range(2)]
    optimizer = torch.optim.AdamW(groups, lr=1e-2)
    generator = torch.Generator().manual_seed(1)
    try:
        for index in (0, 1, 0):
            if not in_forward:
                module.activate(index)
            ids = torch.randint(0, 128, (2, 16), generator=generator).to(device)
            autocast = (
                torch.autocast(device.type, dtype=torch.bfloat16)
                if bf16
                else contextlib.nullcontext()
            )
            with autocast:
                if in_forward:
                    loss = wrapped(index, input_ids=ids, labels=ids)
                else:
                    loss = wrapped(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    except Exception as error:  # noqa: BLE001 - the row reports it
        return f"{type(error).__name__}: {str(error).splitlines()[0][:110]}"
    with FullyShardedDataParallel.summon_full_params(wrapped, writeback=False):
        after = {  # the in-forward root holds the peft model as module.model
            n.removeprefix("module.model."): p
            for n, p in wrapped.named_parameters()
            if "lora_B" in n
        }
        if sorted(after) != sorted(before):
            raise AssertionError(f"lora_B names differ after wrapping: {sorted(after)[:2]}")
        moved = {
            name: any(
                not torch.equal(before[k].to(p.device), p.detach())
                for k, p in after.items()
                if f".{name}." in k
            )
            for name in module.adapter_names
        }
    return "ok, " + ", ".join(f"{k} {'moved' if v else 'UNMOVED'}" for k, v in moved.items())


def main() -> int:
    import argparse

    import torch.distributed as dist

    from benchmarks.common import save_tiny_llama

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tied embeddings, AdapterWrapPolicy, checkpointing only; in forward for bf16 only",
    )
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    with socket.socket() as free:  # a port that is free now, for the one-process group
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=0,
        world_size=1,
    )
    print(
        f"device: {torch.cuda.get_device_name(0) if device.type == 'cuda' else 'cpu'}; "
        f"torch {torch.__version__}"
    )
    print("| policy | precision | checkpointing | tied embeddings | switch | result |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for tied in (True,) if args.quick else (True, False):
            model_dir = str(
                save_tiny_llama(
                    Path(tmp) / f"tied{int(tied)}",
                    vocab_size=128,
                    hidden_size=32,
                    intermediate_size=64,
                    max_position_embeddings=64,
                    tie_word_embeddings=tied,
                )
            )
            cases = itertools.product(
                ("adapters",) if args.quick else ("adapters", "layers"),
                (True, False),
                (True,) if args.quick else (True, False),
                (False, True),
            )
            for policy, bf16, checkpointing, in_forward in cases:
                if args.quick and in_forward and not bf16:
                    continue
                result = one_case(model_dir, policy, bf16, checkpointing, device, in_forward)
                precision = "bf16 mixed + autocast" if bf16 else "float32"
                switch = "in forward" if in_forward else "before"
                print(
                    f"| {policy} | {precision} | {checkpointing} | {tied} | {switch} | {result} |",
                    flush=True,
                )
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
