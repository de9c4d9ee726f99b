"""Samples -> token ids: tokenisation with response-only labels, padding collation, and the
:class:`TokenizedSamples` dataset that training and validation loaders (and ``tclora merge``'s
validation loss) read.

Prompts are rendered exactly as evaluation renders them (:func:`tclora.data.render_prompt`), so a
model is trained and scored on the same text.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from tclora.data.samples import Sample, render_prompt

__all__ = [
    "IGNORE_INDEX",
    "TokenizedSamples",
    "collate_batch",
    "tokenize_sample",
    "tokenizer_fingerprint",
]

IGNORE_INDEX = -100
"""Label of positions without a loss (prompt and padding), as ``torch.nn.CrossEntropyLoss`` skips."""


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Identify a tokenizer by what it does, not by where it was loaded from.

    A fast tokenizer's whole definition (its JSON: vocabulary, merges, normaliser,
    pre-tokeniser), else its vocabulary, else (a stand-in without either) its name; then its
    size, special tokens and chat template. A copy in another folder gets the same fingerprint;
    a tokenizer re-trained into the same folder gets another.

    Args:
        tokenizer: A transformers tokenizer.

    Returns:
        A hex sha256 digest.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        what = hashlib.sha256(backend.to_str().encode()).hexdigest()
    elif callable(getattr(tokenizer, "get_vocab", None)):
        vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
        what = hashlib.sha256(vocab.encode()).hexdigest()
    else:
        what = str(getattr(tokenizer, "name_or_path", ""))
    record = [
        what,
        len(tokenizer),
        getattr(tokenizer, "bos_token", None),
        getattr(tokenizer, "eos_token", None),
        getattr(tokenizer, "pad_token", None),
        str(getattr(tokenizer, "chat_template", "") or ""),
    ]
    return hashlib.sha256(json.dumps(record, default=str).encode()).hexdigest()


def tokenize_sample(
    prompt_ids: Sequence[int], response_ids: Sequence[int], max_length: int
) -> tuple[list[int], list[int], bool]:
    """Join prompt and response tokens, labelling only the response, within ``max_length``.

    When too long, the response keeps ``min(len(response), max(max_length - len(prompt),
    max_length // 2))`` tokens from its start and the prompt keeps its last tokens (the end of
    a prompt, next to the answer, carries the generation prompt), so every sample keeps a loss.

    Args:
        prompt_ids: Token ids of the rendered prompt.
        response_ids: Token ids of the response (ending with the eos token).
        max_length: Maximum total length.

    Returns:
        ``(input_ids, labels, truncated)`` with ``labels = -100`` on prompt positions.
    """
    prompt, response = list(prompt_ids), list(response_ids)
    truncated = len(prompt) + len(response) > max_length
    if truncated:
        keep_response = min(len(response), max(max_length - len(prompt), max_length // 2))
        keep_prompt = max_length - keep_response
        prompt = prompt[len(prompt) - keep_prompt :] if keep_prompt > 0 else []
        response = response[:keep_response]
    return prompt + response, [IGNORE_INDEX] * len(prompt) + response, truncated


def collate_batch(items: Sequence[Mapping[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Pad items to the longest one (right padding).

    Args:
        items: Dicts with ``input_ids`` and ``labels`` (lists of int) and ``cluster_id`` (int).
        pad_token_id: Id written at padded ``input_ids`` positions.

    Returns:
        ``{"input_ids", "attention_mask", "labels", "cluster_id"}`` LongTensors; labels are -100
        and the mask 0 on padding.
    """
    length = max(len(item["input_ids"]) for item in items)
    batch = len(items)
    input_ids = torch.full((batch, length), pad_token_id, dtype=torch.long)
    labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((batch, length), dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item["input_ids"])
        input_ids[row, :n] = torch.as_tensor(item["input_ids"], dtype=torch.long)
        labels[row, :n] = torch.as_tensor(item["labels"], dtype=torch.long)
        mask[row, :n] = 1
    cluster_id = torch.as_tensor([int(item["cluster_id"]) for item in items], dtype=torch.long)
    return {
        "input_ids": input_ids,
        "attention_mask": mask,
        "labels": labels,
        "cluster_id": cluster_id,
    }


class TokenizedSamples(Dataset):
    """Samples tokenised on access: ``dataset[i]`` is a dict for :func:`collate_batch`.

    Args:
        samples: The samples.
        cluster_ids: Cluster of every sample.
        tokenizer: A transformers tokenizer.
        max_length: Maximum tokens per sample (see :func:`tokenize_sample`).
        chat_template: Render prompts with the tokenizer's chat template (plain strings as one
            user message) and ``add_generation_prompt=True``; otherwise use the prompt text.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        cluster_ids: np.ndarray,
        tokenizer: Any,
        max_length: int,
        chat_template: bool = True,
    ) -> None:
        self.samples = list(samples)
        self.cluster_ids = np.asarray(cluster_ids, dtype=np.int64)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.chat_template = chat_template

    def __len__(self) -> int:
        return len(self.samples)

    def render_prompt(self, sample: Sample) -> str:
        """The prompt text the model sees (:func:`tclora.data.render_prompt`, as in evaluation).

        Args:
            sample: The sample.

        Returns:
            The rendered prompt.
        """
        return render_prompt(self.tokenizer, sample.prompt, self.chat_template)

    def token_ids(self, index: int) -> tuple[list[int], list[int]]:
        """Prompt and response token ids of sample ``index`` (response ends with eos).

        Args:
            index: Position of the sample.

        Returns:
            ``(prompt_ids, response_ids)``, untruncated.
        """
        sample = self.samples[index]
        tok = self.tokenizer
        prompt = tok(self.render_prompt(sample), add_special_tokens=False)["input_ids"]
        response = tok(sample.response + (tok.eos_token or ""), add_special_tokens=False)
        return list(prompt), list(response["input_ids"])

    def __getitem__(self, index: int) -> dict[str, Any]:
        prompt, response = self.token_ids(index)
        input_ids, labels, truncated = tokenize_sample(prompt, response, self.max_length)
        return {
            "input_ids": input_ids,
            "labels": labels,
            "cluster_id": int(self.cluster_ids[index]),
            "truncated": truncated,
        }

    def _plain_prompt_renderer(self) -> Callable[[str], str] | None:
        """A fast renderer for plain-string prompts, or None.

        Renders the chat template once around a sentinel and keeps the text before and after
        it. Used only if it reproduces ``apply_chat_template`` exactly on up to 32 of the
        samples (a template that trims or escapes the content fails that check).
        """
        if not self.chat_template:
            return None
        sentinel = "\ue000TCLORA\ue001"
        full = self.render_prompt(Sample(sentinel, "", ""))
        if full.count(sentinel) != 1:
            return None
        head, tail = full.split(sentinel)

        def render(text: str) -> str:
            return head + text + tail

        plain = [s for s in self.samples if isinstance(s.prompt, str)]
        step = max(1, len(plain) // 32)
        for sample in plain[::step][:32]:
            if render(str(sample.prompt)) != self.render_prompt(sample):
                return None
        return render

    def token_lengths(self) -> np.ndarray:
        """Prompt and response token counts of every sample (tokenises everything, batched).

        Returns:
            ``(N, 2)`` int64 counts, untruncated; ``max_length`` plays no part.
        """
        if not self.samples:
            return np.zeros((0, 2), dtype=np.int64)
        tok = self.tokenizer
        eos = tok.eos_token or ""
        fast = self._plain_prompt_renderer()
        prompts = [
            fast(s.prompt)
            if fast is not None and isinstance(s.prompt, str)
            else self.render_prompt(s)
            for s in self.samples
        ]
        responses = [s.response + eos for s in self.samples]
        backend = getattr(tok, "backend_tokenizer", None)
        if backend is not None:  # a fast tokenizer: count ids without building Python lists
            counts = [
                [len(e.ids) for e in backend.encode_batch(texts, add_special_tokens=False)]
                for texts in (prompts, responses)
            ]
        else:
            counts = [
                [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]]
                for texts in (prompts, responses)
            ]
        return np.asarray(counts, dtype=np.int64).T.copy()
