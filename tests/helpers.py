"""Test helpers, imported one way (``from helpers import ...``), like Lightning's BoringModel:
tiny causal LMs built from a config (never the hub), LoRA weights made nonzero, and a tiny
multi-task corpus. The fixtures that use them live in ``conftest.py``.
"""

from __future__ import annotations

import json
import random
import socket
import subprocess
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "TINY_CONFIG",
    "build_tiny_llama",
    "deepspeed_strategy",
    "fit_config",
    "free_port",
    "git",
    "init_repo",
    "make_batch",
    "make_multitask_samples",
    "merge_argv",
    "randomize_lora",
]

TINY_CONFIG: dict[str, Any] = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=True,
)


def build_tiny_llama(vocab_size: int, seed: int = 0, **overrides: Any) -> Any:
    """A 2-layer Llama with hidden size 32, initialised from ``seed``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, **{**TINY_CONFIG, **overrides})
    return LlamaForCausalLM(config).eval()


def randomize_lora(model: Any, seed: int = 0) -> None:
    """LoRA B is zero-initialised: give every adapter's A and B random nonzero values."""
    from peft.tuners.lora import LoraLayer

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in sorted(model.named_modules(), key=lambda kv: kv[0]):
            if isinstance(layer, LoraLayer):
                for name in sorted(layer.lora_A):
                    for w in (layer.lora_A[name].weight, layer.lora_B[name].weight):
                        w.copy_(torch.randn(w.shape, generator=g) * 0.3)


def deepspeed_strategy(stage: int, world_size: int = 1) -> Any:
    """A Lightning ``DeepSpeedStrategy`` holding a ZeRO config, over ``world_size`` processes
    (built without deepspeed installed: only what tclora's setup checks read)."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DeepSpeedStrategy

    strategy = object.__new__(DeepSpeedStrategy)
    strategy.config = {"zero_optimization": {"stage": stage}}
    strategy.cluster_environment = SimpleNamespace(world_size=lambda: world_size)
    strategy._ddp_kwargs = {}  # what DeepSpeedStrategy's own __init__ leaves (no DDP kwargs)
    return strategy


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_multitask_samples(per_task: int = 30, seed: int = 0) -> list[dict[str, str]]:
    """Four tasks with clearly different input formats: arithmetic, translation, sentiment, code."""
    rng = random.Random(seed)
    words = {
        "cat": "chat",
        "dog": "chien",
        "house": "maison",
        "water": "eau",
        "bread": "pain",
        "apple": "pomme",
        "book": "livre",
        "sun": "soleil",
        "tree": "arbre",
        "car": "voiture",
    }
    good = ["loved", "enjoyed", "adored", "liked"]
    bad = ["hated", "disliked", "loathed", "despised"]
    things = ["the film", "this restaurant", "the new phone", "that concert", "the hotel"]
    samples: list[dict[str, str]] = []
    for _ in range(per_task):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        samples.append(
            {
                "prompt": f"What is {a} + {b}? Answer with a number.",
                "response": str(a + b),
                "task": "arithmetic",
            }
        )
        en = rng.choice(sorted(words))
        samples.append(
            {
                "prompt": f"Translate the English word '{en}' into French.",
                "response": words[en],
                "task": "translation",
            }
        )
        positive = rng.random() < 0.5
        verb = rng.choice(good if positive else bad)
        samples.append(
            {
                "prompt": f"Review: I {verb} {rng.choice(things)}. Is this review "
                "positive or negative?",
                "response": "positive" if positive else "negative",
                "task": "sentiment",
            }
        )
        x = rng.randint(1, 9)
        k = rng.randint(2, 5)
        samples.append(
            {
                "prompt": f"```python\ndef f(x):\n    return x * {k}\nprint(f({x}))\n```\n"
                "What does this code print?",
                "response": str(x * k),
                "task": "code",
            }
        )
    return samples


QUICK_MERGE: dict[str, Any] = {
    "cp_ranks": [2],
    "rules": ["mean_loading"],
    "baselines": ["uniform"],
    "scales": [1.0],
    "keep": "cp2_mean_loading",  # without --val_data nothing chooses the best merge
    "references": ["base"],
    "max_length": 64,
    "cp_iters": 5,
    "progress": False,
}


def merge_argv(
    folders: list[str] | list[Path], out: Path | None = None, *extra: str, **options: Any
) -> list[str]:
    """``tclora merge`` arguments for a quick study: :data:`QUICK_MERGE` updated by ``options``.

    Args:
        folders: Adapter folders (given as ``--adapters A B ...``).
        out: ``--output_dir`` (omitted when ``None``).
        *extra: More arguments, as they are (e.g. ``"--val_data", "[...]"``).
        **options: ``--merge.<name>`` values (JSON-encoded, strings as they are).

    Returns:
        The argument list.
    """
    args = ["--adapters", *[str(f) for f in folders]]
    for name, value in {**QUICK_MERGE, **options}.items():
        args += [f"--merge.{name}", value if isinstance(value, str) else json.dumps(value)]
    if out is not None:
        args += ["--output_dir", str(out)]
    return args + list(extra)


def fit_config(
    out: Path,
    model_dir: Path,
    jsonl: Path,
    cache: Path,
    *,
    r: int = 4,
    lr: float | None = None,
    max_length: int = 64,
    tensorboard: bool = False,
    **data: Any,
) -> dict[str, Any]:
    """A ``tclora fit`` config of 4 CPU steps on the tiny model (no validation, no progress bar).

    Args:
        out: The run folder (``default_root_dir``; adapters go to ``<out>/adapters``).
        model_dir: The model folder (``model.model``).
        jsonl: The training corpus (``data.sources``).
        cache: ``data.cache_dir``.
        r: LoRA rank.
        lr: Learning rate (``None``: the module's default).
        max_length: ``data.max_length``.
        tensorboard: Log to ``<out>/tb`` (and checkpoint); otherwise no logger, no checkpoint.
        **data: More ``data`` options (e.g. ``num_clusters``).

    Returns:
        The config as a dict (write it with ``yaml.safe_dump``).
    """
    trainer: dict[str, Any] = {
        "accelerator": "cpu",
        "max_steps": 4,
        "limit_val_batches": 0,
        "num_sanity_val_steps": 0,
        "enable_progress_bar": False,
        "default_root_dir": str(out),
    }
    if tensorboard:
        trainer["logger"] = {
            "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
            "init_args": {"save_dir": str(out), "name": "tb"},
        }
    else:
        trainer.update(logger=False, enable_checkpointing=False)
    model: dict[str, Any] = {"model": str(model_dir), "r": r, "export_dir": str(out / "adapters")}
    if lr is not None:
        model["lr"] = lr
    return {
        "seed_everything": 0,
        "trainer": trainer,
        "model": model,
        "data": {
            "sources": [str(jsonl)],
            "batch_size": 4,
            "max_length": max_length,
            "progress_bar": False,
            "cache_dir": str(cache),
            **data,
        },
    }


FRUITS = [("apple", 0), ("stone", 1), ("pear", 0), ("chair", 1), ("plum", 0)]


def fruit_eval_set(path: Path, items: int = len(FRUITS)) -> Path:
    """A tiny two-choice eval set ("Is apple a fruit?" yes/no) of the first ``items`` questions."""
    path.write_text(
        "".join(
            json.dumps({"prompt": f"Is {w} a fruit?", "choices": ["yes", "no"], "answer": a}) + "\n"
            for w, a in FRUITS[:items]
        )
    )
    return path


def tiny_study_callback(eval_set: Path, out: Path, baselines: list[str]) -> dict[str, Any]:
    """A ``CPMergeCallback`` config entry of a tiny study (CP rank 2, one rule, ``baselines``,
    scales 1 and 2, base and routing references) on ``eval_set``, written to ``<out>/merge``."""
    return {
        "class_path": "tclora.callbacks.CPMergeCallback",
        "init_args": {
            "cp_ranks": [2],
            "rules": ["mean_loading"],
            "baselines": baselines,
            "scales": [1.0, 2.0],
            "references": ["base", "routing"],
            "eval_sets": [str(eval_set)],
            "output_dir": str(out / "merge"),
            "max_length": 64,
            "progress": False,
        },
    }


def git(repo: Path, *args: str) -> str:
    """``git <args>`` run in ``repo``; its standard output as printed (an error fails the test)."""
    return subprocess.run(
        ["git", *args], cwd=repo, check=True, capture_output=True, text=True
    ).stdout


def init_repo(repo: Path, commit: str | None = None) -> Path:
    """A git repository at ``repo`` with a committer identity (the sweep commits there); with
    ``commit``, everything already in ``repo`` committed under that message."""
    repo.mkdir(parents=True, exist_ok=True)
    git(repo, "init", "-q")
    git(repo, "config", "user.email", "sweep@example.com")
    git(repo, "config", "user.name", "sweep")
    if commit is not None:
        git(repo, "add", ".")
        git(repo, "commit", "-q", "-m", commit)
    return repo


def make_batch(cluster: int, seed: int, rows: int = 2, length: int = 12) -> dict[str, torch.Tensor]:
    """A cluster-pure batch in the ClusterDataModule format (no padding, 3 prompt tokens)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(100, 2000, (rows, length), generator=gen)
    labels = ids.clone()
    labels[:, :3] = -100
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": labels,
        "cluster_id": torch.full((rows,), cluster, dtype=torch.long),
    }
