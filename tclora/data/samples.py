"""The sample record and the pure functions over sample lists (hashing, text, splitting)."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "Message",
    "Prompt",
    "Sample",
    "content_hash",
    "prompt_text",
    "render_prompt",
    "split_train_val",
]

Message = dict[str, Any]
"""One chat message: ``{"role": "user" | "system" | "assistant", "content": str}``."""

Prompt = str | list[Message]
"""A prompt is plain text or a list of chat messages."""


@dataclass(slots=True)
class Sample:
    """One training example.

    Attributes:
        prompt: Plain text, or chat messages (rendered later with the tokenizer's chat template).
        response: The target text; the loss is computed on its tokens only.
        task: Name of the task the sample came from. Used for statistics and evaluation only,
            never as a clustering input.
        source: Which source (file, registry task, dataset) the sample was read from.
    """

    prompt: Prompt
    response: str
    task: str
    source: str = ""


def prompt_text(prompt: Prompt) -> str:
    """Return the plain text of a prompt, as fed to the sentence encoder.

    Chat messages are joined by newlines, content only (no role tags or template tokens), so the
    embedding reflects what the sample asks and not how a tokenizer formats it.

    Args:
        prompt: Plain text or a list of ``{"role", "content"}`` messages.

    Returns:
        The text.
    """
    if isinstance(prompt, str):
        return prompt
    return "\n".join(str(m.get("content", "")) for m in prompt)


def render_prompt(tokenizer: Any, prompt: Prompt, chat_template: bool = True) -> str:
    """Turn a prompt into the text the model reads; the one renderer of training and evaluation.

    With ``chat_template=True`` and a tokenizer that has a chat template, the prompt (a string
    becomes one user message) goes through ``apply_chat_template(..., add_generation_prompt=True,
    tokenize=False)``. Otherwise the prompt is :func:`prompt_text`: a string as is, the contents
    of chat messages joined by newlines (no role tags).

    Args:
        tokenizer: A transformers tokenizer (only used with a chat template).
        prompt: Plain text or chat messages.
        chat_template: Use the tokenizer's chat template when it has one.

    Returns:
        The text whose continuation the model is asked for (or trained on).
    """
    if chat_template and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        return str(
            tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        )
    return prompt_text(prompt)


def content_hash(samples: Sequence[Sample]) -> str:
    """Hash the content of a sample list (prompt, response and task, in order).

    Args:
        samples: The samples.

    Returns:
        A hex sha256 digest; equal lists give equal digests, any edited, added, removed or
        reordered sample changes it.
    """
    digest = hashlib.sha256()
    update = digest.update
    for sample in samples:
        prompt = sample.prompt
        if isinstance(prompt, str):
            parts = (b"s", prompt.encode(), sample.response.encode(), sample.task.encode())
        else:
            text = json.dumps(prompt, ensure_ascii=False, sort_keys=True)
            parts = (b"m", text.encode(), sample.response.encode(), sample.task.encode())
        for part in parts:  # length-prefixed, so no two different samples hash alike
            update(b"%d:" % len(part))
            update(part)
    return digest.hexdigest()


def split_train_val(
    num_samples: int, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``range(num_samples)`` into seeded train and validation index sets.

    Args:
        num_samples: Number of samples.
        val_fraction: Fraction in ``[0, 1)`` held out for validation (rounded up, so any positive
            fraction holds out at least one sample; never all of them).
        seed: Seed of the permutation.

    Returns:
        ``(train, val)``: sorted ``int64`` index arrays that partition ``range(num_samples)``.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction!r} must be in [0, 1)")
    num_val = min(math.ceil(num_samples * val_fraction), max(num_samples - 1, 0))
    order = np.random.default_rng(seed).permutation(num_samples)
    val = np.sort(order[:num_val]).astype(np.int64)
    train = np.sort(order[num_val:]).astype(np.int64)
    return train, val
