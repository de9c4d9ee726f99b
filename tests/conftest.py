"""Shared fixtures: tiny causal LMs built from a config, and a tiny multi-task corpus.

The hub is never reached: ``HF_HUB_OFFLINE=1`` is set before transformers is imported, models are
built from a ``LlamaConfig`` with a seeded init, and the tokenizer is the packaged SmolLM2 one.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import build_tiny_llama, make_multitask_samples


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    torch.manual_seed(0)
    random.seed(0)


@pytest.fixture
def one_thread() -> Any:
    """One intra-op thread for tests of tiny tensors: avoids OpenMP spin-waits on 2 busy cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The packaged SmolLM2-135M-Instruct folder (built from its GGUF on first use)."""
    from tclora.assets import ensure_model

    return ensure_model()


@pytest.fixture(scope="session")
def tokenizer(smollm2_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture
def tiny_llama(tokenizer: Any) -> Any:
    return build_tiny_llama(len(tokenizer))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> Path:
    """A saved tiny Llama folder with the SmolLM2 tokenizer: loadable by ``resolve_model``."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_llama(len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def multitask_samples() -> list[dict[str, str]]:
    return make_multitask_samples()


@pytest.fixture
def multitask_jsonl(tmp_path: Path, multitask_samples: list[dict[str, str]]) -> Path:
    path = tmp_path / "multitask.jsonl"
    path.write_text("".join(json.dumps(s) + "\n" for s in multitask_samples))
    return path
