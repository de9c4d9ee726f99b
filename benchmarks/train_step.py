"""Benchmark LoRAModule training against plain PyTorch + peft.

Two comparisons in one run, printed as a table:

1. Step time: one ``LoRAModule`` training step inside ``Trainer.fit`` (K adapters, batches
   cycling over the clusters) against a plain loop ``zero_grad → forward → backward → AdamW.step``
   over a one-adapter peft model, on the same base model and the same batch. Goal: ≤ 1.05×.
2. Wall time: one fit of K adapters (S steps each) against K separate one-adapter fits of S
   steps each (each loads the base model again).

Usage::

    python benchmarks/train_step.py                 # the packaged SmolLM2-135M-Instruct
    python benchmarks/train_step.py --model PATH    # any causal LM folder / alias / hub id
    python benchmarks/train_step.py --quick         # a tiny config model, seconds
    python benchmarks/train_step.py --accelerator gpu --precision bf16-mixed --dtype bfloat16 \
        --random-weights-from DIR                   # on a GPU; DIR/config.json, random weights

On a GPU both sides run on ``cuda:0`` and every step is timed after ``torch.cuda.synchronize``;
``--precision bf16-mixed`` is Lightning's autocast on one side and ``torch.autocast`` on the other.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from lightning.pytorch import Callback, LightningDataModule, Trainer, seed_everything  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, for `benchmarks`

from benchmarks.common import build_random_model, cuda_sync, save_tiny_llama  # noqa: E402
from tclora.module import LoRAModule  # noqa: E402


def make_batch(cluster: int, rows: int, length: int, vocab: int, seed: int) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, length), generator=gen)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": ids.clone(),
        "cluster_id": torch.full((rows,), cluster, dtype=torch.long),
    }


class Batches(LightningDataModule):
    def __init__(self, batches: list[dict[str, Any]], num_clusters: int) -> None:
        super().__init__()
        self.batches = batches
        self.num_clusters = num_clusters

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.batches, batch_size=None)  # type: ignore[arg-type]


class StepTimer(Callback):
    """Times from one batch end to the next: everything the trainer does per step."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_train_batch_end(self, *args: Any) -> None:
        cuda_sync()
        self.ends.append(time.perf_counter())


def trainer(
    steps: int, args: argparse.Namespace, callbacks: list[Callback] | None = None
) -> Trainer:
    return Trainer(
        accelerator=args.accelerator,
        devices=1,
        precision=args.precision,
        max_epochs=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=callbacks,
    )


def module_kwargs(model: str, args: argparse.Namespace) -> dict[str, Any]:
    return dict(
        model=model,
        r=args.rank,
        lora_alpha=2 * args.rank,
        lr=1e-4,
        weight_decay=0.01,
        dtype=args.dtype,
    )


def lightning_step_times(model: str, args: argparse.Namespace, vocab: int) -> list[float]:
    k = args.num_adapters
    steps = args.warmup + args.steps
    batch = make_batch(0, args.batch_size, args.seq_len, vocab, seed=0)
    batches = [
        {**batch, "cluster_id": torch.full_like(batch["cluster_id"], s % k)} for s in range(steps)
    ]
    seed_everything(0)
    module = LoRAModule(num_adapters=k, **module_kwargs(model, args))
    timer = StepTimer()
    trainer(steps, args, [timer]).fit(module, datamodule=Batches(batches, k))
    deltas = [b - a for a, b in zip(timer.ends, timer.ends[1:], strict=False)]
    return deltas[args.warmup - 1 :]


def plain_step_times(model: str, args: argparse.Namespace, vocab: int) -> list[float]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tclora.module import linear_module_names

    seed_everything(0)
    device = torch.device("cuda:0" if args.accelerator == "gpu" else "cpu")
    base = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, args.dtype))
    base.config.use_cache = False
    base.train()
    config = LoraConfig(
        r=args.rank, lora_alpha=2 * args.rank, target_modules=linear_module_names(base)
    )
    peft_model = get_peft_model(base, config).to(device)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    batch = make_batch(0, args.batch_size, args.seq_len, vocab, seed=0)
    inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "labels")}
    autocast = torch.autocast(
        device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16-mixed"
    )
    times = []
    for _ in range(args.warmup + args.steps):
        cuda_sync()
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = peft_model(**inputs).loss
        loss.backward()
        optimizer.step()
        cuda_sync()
        times.append(time.perf_counter() - start)
    del peft_model, base, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return times[args.warmup :]


def switch_times(model: str, args: argparse.Namespace) -> tuple[list[float], list[float]]:
    """Seconds of one adapter switch: peft's ``set_adapter`` against ``LoRAModule.activate``
    (the cached :class:`tclora.adapter_switch.AdapterSwitch`), on the same K-adapter model."""
    module = LoRAModule(num_adapters=args.num_adapters, **module_kwargs(model, args))
    module.configure_model()
    names = module.adapter_names
    peft_side, ours = [], []
    for i in range(2 * args.steps):
        start = time.perf_counter()
        module.model.base_model.set_adapter(names[i % len(names)])
        peft_side.append(time.perf_counter() - start)
        start = time.perf_counter()
        module.activate(i % len(names))
        ours.append(time.perf_counter() - start)
    return peft_side, ours


def fit_wall_times(model: str, args: argparse.Namespace, vocab: int) -> tuple[float, float]:
    k, s = args.num_adapters, args.fit_steps
    batches = [
        make_batch(i % k, args.batch_size, args.seq_len, vocab, seed=i) for i in range(k * s)
    ]
    start = time.perf_counter()
    seed_everything(0)
    joint = LoRAModule(**module_kwargs(model, args))
    trainer(k * s, args).fit(joint, datamodule=Batches(batches, k))
    joint_time = time.perf_counter() - start

    start = time.perf_counter()
    for c in range(k):
        own = [
            {**b, "cluster_id": torch.zeros_like(b["cluster_id"])}
            for i, b in enumerate(batches)
            if i % k == c
        ]
        seed_everything(0)
        alone = LoRAModule(init_seed=c, **module_kwargs(model, args))
        trainer(s, args).fit(alone, datamodule=Batches(own, 1))
    separate_time = time.perf_counter() - start
    return joint_time, separate_time


def tiny_model(folder: Path) -> str:
    return str(save_tiny_llama(folder, 1024, 64, 128, max_position_embeddings=512))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default=None, help="model folder, alias or hub id (default: SmolLM2)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny config model, few steps")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side")
    parser.add_argument("--num-adapters", type=int, default=2, help="K")
    parser.add_argument("--fit-steps", type=int, default=None, help="steps per adapter (part 2)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--accelerator", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument(
        "--precision",
        choices=["32-true", "bf16-mixed", "bf16-true"],
        default="32-true",
        help="Lightning precision (the plain loop autocasts to bf16 under bf16-mixed)",
    )
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument(
        "--random-weights-from",
        type=Path,
        default=None,
        metavar="DIR",
        help="a model folder without weights: its config.json with seeded random weights",
    )
    args = parser.parse_args()
    if args.accelerator == "gpu" and not torch.cuda.is_available():
        parser.error("--accelerator 'gpu': torch sees no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    quick = args.quick
    args.batch_size = args.batch_size or (4 if quick else 4)
    args.seq_len = args.seq_len or (64 if quick else 128)
    args.steps = args.steps or (20 if quick else 6)
    args.fit_steps = args.fit_steps or (5 if quick else 2)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    with tempfile.TemporaryDirectory() as tmp:
        if args.random_weights_from is not None:
            model = str(build_random_model(args.random_weights_from, Path(tmp) / "random"))
            label = f"{args.random_weights_from} architecture, random weights"
        elif quick and args.model is None:
            model = tiny_model(Path(tmp) / "tiny")
            label = "tiny Llama (2 layers, hidden 64)"
        else:
            from tclora.assets import ensure_model, resolve_model

            model = resolve_model(args.model) if args.model else str(ensure_model())
            label = args.model or "SmolLM2-135M-Instruct"
        from transformers import AutoConfig

        vocab = int(AutoConfig.from_pretrained(model).vocab_size)
        # Alternate the two sides so that machine load affects both alike.
        plain = plain_step_times(model, args, vocab)
        ours = lightning_step_times(model, args, vocab)
        plain += plain_step_times(model, args, vocab)
        ours += lightning_step_times(model, args, vocab)
        joint, separate = fit_wall_times(model, args, vocab)
        switch_peft, switch_ours = switch_times(model, args)

    p_med, o_med = statistics.median(plain), statistics.median(ours)
    print()
    print(
        f"model: {label}; batch {args.batch_size} x {args.seq_len} tokens; LoRA rank {args.rank}; "
        f"K={args.num_adapters}; threads {torch.get_num_threads()}; {args.accelerator} "
        f"({torch.cuda.get_device_name(0) if args.accelerator == 'gpu' else 'cpu'}), "
        f"precision {args.precision}, dtype {args.dtype}"
    )
    print(f"{'measurement':<52} {'baseline':>12} {'LoRAModule':>12} {'ratio':>8}")
    print("-" * 88)
    print(
        f"{'train step, median s (plain peft loop | LoRAModule)':<52} {p_med:>12.4f} "
        f"{o_med:>12.4f} {o_med / p_med:>7.3f}x"
    )
    print(
        f"{'train step, min s':<52} {min(plain):>12.4f} {min(ours):>12.4f} "
        f"{min(ours) / min(plain):>7.3f}x"
    )
    print(
        f"{f'fit wall s ({args.num_adapters} separate fits | one K fit)':<52} {separate:>12.2f} "
        f"{joint:>12.2f} {joint / separate:>7.3f}x"
    )
    s_peft, s_ours = statistics.median(switch_peft) * 1e3, statistics.median(switch_ours) * 1e3
    print(
        f"{'adapter switch, median ms (peft set_adapter | ours)':<52} {s_peft:>12.3f} "
        f"{s_ours:>12.3f} {s_ours / s_peft:>7.3f}x"
    )
    print(
        f"(goal: step ratio <= 1.05x; {len(plain)} timed steps per side, {args.fit_steps} steps "
        "per adapter in the fits)"
    )


if __name__ == "__main__":
    main()
