"""Peak GPU memory of the paper configs' training step, on their models' shapes with random weights.

``configs/phi3_flan.yaml`` and ``configs/mistral7b_flan.yaml`` say which cards they need
(Phi-3-mini: batch 16 x 2048 tokens on one 40 GB card per rank under DDP with gradient
checkpointing; Mistral-7B: an 80 GB card). This script measures it: the model is built from
transformers' own config defaults for the shape (``Phi3Config()`` is Phi-3-mini-4k's,
``MistralConfig()`` Mistral-7B-v0.1's) with seeded random weights (the hub cannot be reached
from the GPU machines lent here), saved, and trained by ``LoRAModule`` under Lightning on one GPU
with the config's settings (K adapters of rank r on its target modules, bf16 weights, bf16-mixed,
gradient checkpointing) on full-length batches of random tokens, every step a different adapter.
It prints the peak memory torch allocated and reserved and the median step time. One GPU holds
what one DDP rank holds, besides DDP's buckets of the trainable (LoRA) weights, a few MB.

Usage::

    python benchmarks/gpu_kit/memory_check.py --shape phi3-mini        # 3.8 B, ~1-2 min on an H100
    python benchmarks/gpu_kit/memory_check.py --shape mistral-7b
    python benchmarks/gpu_kit/memory_check.py --shape tiny --accelerator cpu   # a dry run (a test)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

#: shape -> (transformers config class, target modules of the config that trains it)
SHAPES: dict[str, tuple[str, list[str]]] = {
    "phi3-mini": ("Phi3Config", ["qkv_proj", "o_proj"]),  # configs/phi3_flan.yaml
    "mistral-7b": ("MistralConfig", ["q_proj", "k_proj", "v_proj", "o_proj"]),  # mistral7b_flan
    "tiny": ("LlamaConfig", ["q_proj", "v_proj"]),  # a CPU dry run
}


def save_random_model(shape: str, out: Path, device: torch.device) -> Path:
    """Save a causal LM of ``shape`` with seeded random bf16 weights (built on ``device``)."""
    import transformers
    from transformers import AutoModelForCausalLM

    from benchmarks.common import save_tiny_llama

    if shape == "tiny":
        return save_tiny_llama(out, vocab_size=128, hidden_size=32, intermediate_size=64)
    config_class, _ = SHAPES[shape]
    config = getattr(transformers, config_class)()
    torch.manual_seed(0)
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def measure(model_dir: Path, shape: str, args: argparse.Namespace) -> dict[str, Any]:
    """Train ``args.steps`` steps; peak memory and step times."""
    from lightning.pytorch import Trainer, seed_everything
    from transformers import AutoConfig

    from benchmarks.train_step import Batches, StepTimer
    from tclora.module import LoRAModule

    vocab = int(AutoConfig.from_pretrained(model_dir).vocab_size)
    gen = torch.Generator().manual_seed(0)
    batches = []
    for step in range(args.steps):
        ids = torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=gen)
        cluster = torch.full((args.batch_size,), step % args.num_adapters, dtype=torch.long)
        batches.append(
            {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
            | {"cluster_id": cluster}
        )

    seed_everything(0)
    module = LoRAModule(
        model=str(model_dir),
        num_adapters=args.num_adapters,
        r=args.rank,
        lora_alpha=4 * args.rank,
        lora_dropout=0.05,
        target_modules=SHAPES[shape][1],
        lr=1e-4,
        dtype="bfloat16",
        gradient_checkpointing=True,
    )
    timer = StepTimer()
    gpu = args.accelerator == "gpu"
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    Trainer(
        accelerator=args.accelerator,
        devices=1,
        precision="bf16-mixed",
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[timer],
    ).fit(module, datamodule=Batches(batches, args.num_adapters))
    steps = [b - a for a, b in zip(timer.ends, timer.ends[1:], strict=False)]
    params = sum(p.numel() for p in module.model.parameters())
    return {
        "shape": shape,
        "params_billion": params / 1e9,
        "batch": f"{args.batch_size} x {args.seq_len}",
        "adapters": args.num_adapters,
        "steps": args.steps,
        "median_step_s": statistics.median(steps) if steps else float("nan"),
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if gpu else float("nan"),
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if gpu else float("nan"),
        "device": torch.cuda.get_device_name(0) if gpu else "cpu",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), nargs="+", default=["phi3-mini"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--num-adapters", type=int, default=10)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4, help="training steps (>= 2: one is timed)")
    parser.add_argument("--accelerator", choices=["gpu", "cpu"], default="gpu")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error(f"--steps {args.steps}: at least 2 (the first step is not timed)")
    if args.accelerator == "gpu" and not torch.cuda.is_available():
        parser.error("--accelerator 'gpu': torch sees no CUDA device")
    device = torch.device("cuda", 0) if args.accelerator == "gpu" else torch.device("cpu")
    header = "| shape | params (B) | batch | adapters | steps | median step s | peak allocated GiB "
    print(header + "| peak reserved GiB | device |\n|---|---|---|---|---|---|---|---|---|")
    for shape in args.shape:
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = save_random_model(shape, Path(tmp) / shape, device)
            row = measure(model_dir, shape, args)
        print(
            f"| {row['shape']} | {row['params_billion']:.2f} | {row['batch']} | {row['adapters']} "
            f"| {row['steps']} | {row['median_step_s']:.3f} | {row['peak_allocated_gib']:.1f} "
            f"| {row['peak_reserved_gib']:.1f} | {row['device']} |",
            flush=True,
        )
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
