"""Shared by the merge benchmarks: peak-memory measurement, synthetic adapter stacks, and the
LoRA target shapes of SmolLM2-135M, a model with random weights built from a config folder, a
tiny two-layer Llama for quick runs, and a GPU sync for wall-clock timings."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

SMOLLM2 = {
    "hidden": 576,
    "intermediate": 1536,
    "heads": 9,
    "kv_heads": 3,
    "head_dim": 64,
    "layers": 30,
}


def save_tiny_llama(
    folder: Path, vocab_size: int, hidden_size: int, intermediate_size: int, **config: Any
) -> Path:
    """Save a two-layer Llama (4 heads, 2 key-value heads) with weights drawn from seed 0.

    Args:
        folder: Where ``save_pretrained`` writes it.
        vocab_size: Its vocabulary size.
        hidden_size: Its hidden size.
        intermediate_size: Its MLP width.
        **config: Further ``LlamaConfig`` fields (``max_position_embeddings``, ...).

    Returns:
        ``folder``.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    llama = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        **config,
    )
    LlamaForCausalLM(llama).save_pretrained(folder)
    return folder


def cuda_sync(device: Any = None) -> None:
    """Wait for queued GPU work so that a wall-clock reading covers it (a no-op on the CPU).

    Args:
        device: The device to wait for (a ``torch.device``, a string or ``None`` for the current
            CUDA device). A non-CUDA device, or no CUDA, returns at once.
    """
    import torch

    if device is not None and torch.device(device).type != "cuda":
        return
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize(device)


def _status_kb(field: str) -> int:
    match = re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text())
    return int(match.group(1)) if match else 0


class PeakRSS:
    """Peak resident memory above the level at entry (Linux ``VmHWM``, reset on entry)."""

    def __enter__(self) -> PeakRSS:
        import gc

        gc.collect()
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        self.start_kb = _status_kb("VmRSS")
        return self

    def __exit__(self, *exc: object) -> None:
        self.peak_mb = max(_status_kb("VmHWM") - self.start_kb, 0) / 1024


def synthetic_stack(shapes: dict[str, tuple[int, int]], t: int, r: int, seed: int = 0) -> Any:
    import torch
    from peft import LoraConfig

    from tclora.merge import AdapterStack

    g = torch.Generator().manual_seed(seed)
    weights = {
        name: [
            (
                torch.randn(r, d_in, generator=g) / d_in**0.5,
                torch.randn(d_out, r, generator=g) * 0.02,
                2.0,
            )
            for _ in range(t)
        ]
        for name, (d_out, d_in) in shapes.items()
    }
    names = [f"adapter{i}" for i in range(t)]
    return AdapterStack(names=names, module_names=[], lora_config=LoraConfig(), weights=weights)


def smollm2_shapes() -> dict[str, tuple[int, int]]:
    """``module -> (d_out, d_in)`` for every LoRA target of SmolLM2-135M (config read if cached)."""
    cfg = dict(SMOLLM2)
    try:
        from tclora.assets import ensure_model

        raw = json.loads((ensure_model() / "config.json").read_text())
        cfg = {
            "hidden": raw["hidden_size"],
            "intermediate": raw["intermediate_size"],
            "heads": raw["num_attention_heads"],
            "kv_heads": raw["num_key_value_heads"],
            "head_dim": raw.get("head_dim", raw["hidden_size"] // raw["num_attention_heads"]),
            "layers": raw["num_hidden_layers"],
        }
    except Exception as err:  # offline without the packaged model: the published numbers
        print(f"(SmolLM2 config not available: {err}; using its published shapes)", file=sys.stderr)
    h, i, hd = cfg["hidden"], cfg["intermediate"], cfg["head_dim"]
    per_layer = {
        "self_attn.q_proj": (cfg["heads"] * hd, h),
        "self_attn.k_proj": (cfg["kv_heads"] * hd, h),
        "self_attn.v_proj": (cfg["kv_heads"] * hd, h),
        "self_attn.o_proj": (h, cfg["heads"] * hd),
        "mlp.gate_proj": (i, h),
        "mlp.up_proj": (i, h),
        "mlp.down_proj": (h, i),
    }
    return {
        f"model.layers.{layer}.{name}": shape
        for layer in range(cfg["layers"])
        for name, shape in per_layer.items()
    }


def build_random_model(config_dir: Path, out: Path, seed: int = 0, encoder: bool = False) -> Path:
    """Save a model built from ``config_dir/config.json`` with seeded random weights, beside a
    copy of everything else in ``config_dir`` (tokenizer, chat template, and for a
    sentence-transformers folder its pooling and normalisation modules).

    Args:
        config_dir: A model folder without weights.
        out: The folder to write.
        seed: Seed of the initialisation.
        encoder: Build the bare transformer (``AutoModel``: the first module of a
            sentence-transformers folder) instead of a causal LM.

    Returns:
        ``out``.
    """
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    weights = shutil.ignore_patterns("*.safetensors", "*.bin", "*.onnx", "tclora-*")
    shutil.copytree(config_dir, out, ignore=weights, dirs_exist_ok=True)
    torch.manual_seed(seed)
    auto = AutoModel if encoder else AutoModelForCausalLM
    auto.from_config(AutoConfig.from_pretrained(config_dir)).save_pretrained(out)
    return out
