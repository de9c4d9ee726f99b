"""evaluate(): a model on an eval set, sharded over ranks, routed over adapters, counted exactly.

Owns :class:`AccuracyCounter` (integer counts summed over ``torch.distributed`` ranks, so a
sharded run equals a single-process one), the peft adapter-routing helpers (activate one adapter
per group of examples, then restore the active adapters and ``requires_grad`` flags) and
:func:`evaluate`, which puts them together around the scorers of :mod:`tclora.evaluation.scoring`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torchmetrics import Metric

from tclora._dist import rank_and_world
from tclora.evaluation.scoring import (
    _check_positive,
    _model_device,
    answers_beyond_budget,
    choice_predictions,
    generate_answers,
    is_exact_match,
    score_choices,
)
from tclora.evaluation.sets import EvalExample, EvalKind, EvalSet

__all__ = ["AccuracyCounter", "evaluate"]

# --------------------------------------------------------------------------------------------
# Distributed accuracy
# --------------------------------------------------------------------------------------------


class AccuracyCounter(Metric):
    """Counts correct predictions per metric name; exact under DDP (integer sum reduction).

    Args:
        names: Metric names, e.g. ``("acc", "acc_norm")``.
        **kwargs: Passed to :class:`torchmetrics.Metric` (e.g. ``sync_on_compute=False``).
    """

    full_state_update = False
    correct: torch.Tensor
    total: torch.Tensor

    def __init__(self, names: Sequence[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.names = tuple(names)
        self.add_state(
            "correct", default=torch.zeros(len(self.names), dtype=torch.long), dist_reduce_fx="sum"
        )
        self.add_state("total", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, correct: torch.Tensor) -> None:
        """Add a ``(n_examples, n_names)`` 0/1 tensor of per-example correctness."""
        correct = correct.to(device=self.correct.device, dtype=torch.long).reshape(
            -1, len(self.names)
        )
        self.correct += correct.sum(dim=0)
        self.total += correct.shape[0]

    def compute(self) -> dict[str, torch.Tensor]:
        """Accuracy per name (``correct / total``, float64) and ``n`` (the global count)."""
        total = self.total.clamp(min=1).double()
        out = {name: self.correct[k].double() / total for k, name in enumerate(self.names)}
        out["n"] = self.total.clone()
        return out


# --------------------------------------------------------------------------------------------
# evaluate()
# --------------------------------------------------------------------------------------------


def _active_adapters(model: Any) -> list[str]:
    if not isinstance(getattr(model, "peft_config", None), dict):
        return []
    active = getattr(model, "active_adapters", None)
    if callable(active):  # transformers' PeftAdapterMixin exposes a method
        active = active()
    if isinstance(active, str):
        return [active]
    return list(active) if active else []


def _set_adapters(model: Any, names: list[str]) -> None:
    if len(names) == 1:
        model.set_adapter(names[0])
    elif hasattr(model, "base_model") and hasattr(model.base_model, "set_adapter"):
        model.base_model.set_adapter(names)
    else:  # pragma: no cover - single-adapter models
        model.set_adapter(names)


@contextmanager
def _adapter_restored(model: Any, enabled: bool = True) -> Iterator[None]:
    """Restore the active adapter(s) and every parameter's ``requires_grad`` on exit.

    peft's ``set_adapter`` marks the activated adapter trainable and freezes the others; training
    code relies on those flags, so they are put back exactly as they were.
    """
    if not enabled:
        yield
        return
    previous = _active_adapters(model)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        yield
    finally:
        if previous:
            _set_adapters(model, previous)
        for name, p in model.named_parameters():
            if name in flags:
                p.requires_grad_(flags[name])


@contextmanager
def _folded(model: Any, enabled: bool) -> Iterator[bool]:
    """Add the active LoRA adapter into the base weights for the block, then restore the base
    weights bit-exactly (from a copy of every touched weight: peft's ``unmerge_adapter`` alone
    would leave float rounding behind). Yields whether it folded: not for a model without LoRA
    layers, not for a per-token router (peft's Arrow), nor while adapters are disabled
    (``disable_adapter()``: the base is being scored).
    """
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)] if enabled else []
    configs = getattr(model, "peft_config", {}) or {}
    routed = any(getattr(c, "arrow_config", None) is not None for c in configs.values())
    if not layers or routed or any(getattr(m, "disable_adapters", False) for m in layers):
        yield False  # nothing to fold, a per-token router (Arrow), or the base being scored
        return
    if any(getattr(m, "merged", False) for m in layers):
        raise ValueError("fold_adapter=True on a model whose adapter is already merged")
    bases: list[Any] = [m.get_base_layer() for m in layers]
    saved = [(base.weight, base.weight.detach().clone()) for base in bases]
    model.merge_adapter()
    try:
        yield True
    finally:
        model.unmerge_adapter()
        with torch.no_grad():
            for weight, original in saved:
                weight.copy_(original)


def _validate_adapters(model: Any, adapters: Sequence[str], n_examples: int) -> None:
    if isinstance(adapters, str):
        raise ValueError("adapter_per_example must be a sequence of adapter names, not a string")
    if len(adapters) != n_examples:
        raise ValueError(
            f"adapter_per_example has {len(adapters)} entries but the eval set has {n_examples} "
            "examples; give one adapter name per example"
        )
    config = getattr(model, "peft_config", None)
    if not hasattr(model, "set_adapter") or not isinstance(config, dict):
        raise ValueError(
            "adapter_per_example needs a peft model with named adapters (set_adapter, "
            f"peft_config); got {type(model).__name__}"
        )
    unknown = sorted(set(adapters) - set(config))
    if unknown:
        raise ValueError(
            f"adapter_per_example names unknown adapters {unknown}; the model has {sorted(config)}"
        )


def _score_group(
    model: Any,
    tokenizer: Any,
    examples: list[EvalExample],
    kind: EvalKind,
    *,
    batch_size: int,
    max_length: int,
    max_new_tokens: int,
    chat_template: bool,
    progress: bool,
    share_prefix: bool = True,
) -> torch.Tensor:
    """0/1 correctness of each example: ``(n, 2)`` for acc/acc_norm, ``(n, 1)`` for exact match."""
    if kind == "multiple_choice":
        scores = score_choices(
            model,
            tokenizer,
            examples,
            batch_size=batch_size,
            max_length=max_length,
            chat_template=chat_template,
            progress=progress,
            share_prefix=share_prefix,
        )
        rows = []
        for ex, (logliks, lengths) in zip(examples, scores, strict=True):
            pred, pred_norm = choice_predictions(logliks, lengths)
            rows.append([pred == ex.gold, pred_norm == ex.gold])
        return torch.tensor(rows, dtype=torch.long).reshape(-1, 2)
    predictions = generate_answers(
        model,
        tokenizer,
        [ex.prompt for ex in examples],
        batch_size=batch_size,
        max_length=max_length,
        max_new_tokens=max_new_tokens,
        chat_template=chat_template,
        progress=progress,
        share_prefix=share_prefix,
    )
    hits = [is_exact_match(p, ex.answers) for p, ex in zip(predictions, examples, strict=True)]
    return torch.tensor(hits, dtype=torch.long).reshape(-1, 1)


def evaluate(
    model: Any,
    tokenizer: Any,
    eval_set: EvalSet,
    *,
    batch_size: int = 8,
    max_length: int = 1024,
    max_new_tokens: int = 16,
    chat_template: bool = True,
    progress: bool = True,
    adapter_per_example: Sequence[str] | None = None,
    distributed: bool = True,
    items: dict[str, list[int]] | None = None,
    fold_adapter: bool = False,
    share_prefix: bool = True,
) -> dict[str, float]:
    """Score a model on an evaluation set.

    The model is put in ``eval()`` mode under ``torch.no_grad()`` and its training mode, active
    adapter(s) and ``requires_grad`` flags are restored afterwards.

    Args:
        model: A causal LM, or a peft model (with several adapters for ``adapter_per_example``).
        tokenizer: Its tokenizer.
        eval_set: The set; its ``kind`` selects the scorer.
        batch_size: Rows (choices) per forward pass, or prompts per ``generate`` call.
        max_length: Longest input in tokens (left-truncated).
        max_new_tokens: Generation budget for exact match.
        chat_template: Render prompts with the tokenizer's chat template when it has one.
        progress: Show tqdm bars (on rank zero only).
        adapter_per_example: Adapter name for each example (routing): examples are grouped by
            adapter and each group is scored with ``model.set_adapter(name)``.
        distributed: When ``torch.distributed`` is initialised with several processes, rank ``i``
            scores examples ``i::world_size`` and the counts are summed over ranks, so every rank
            returns the global numbers (equal to a single-process run). Every rank must call
            this. ``False`` scores all examples locally without communication.
        items: If given, filled with ``{metric: [0/1 for each example, in set order]}`` -- every
            example, also under DDP (gathered over ranks; every rank must pass ``items`` then):
            what paired statistics between two models need.
        fold_adapter: Add the active LoRA adapter into the base weights while scoring (no LoRA
            work per token), restoring the base weights bit-exactly afterwards (a copy of every
            adapted weight is held meanwhile). Scores change only by float rounding
            (``benchmarks/eval_throughput.py`` measures both); ignored with
            ``adapter_per_example`` and while adapters are disabled.
        share_prefix: Run the token prefix common to all inputs (chat template, a task's shared
            instruction) once and reuse its key/value cache, for choices
            (:func:`~tclora.evaluation.score_choices`) and generation
            (:func:`~tclora.evaluation.generate_answers`); equal up to float rounding.

    Returns:
        ``{"acc", "acc_norm", "n"}`` for multiple choice, ``{"exact_match", "n"}`` for exact
        match; ``n`` is the number of examples scored (over all ranks).

    Raises:
        ValueError: Empty set, bad sizes, or an ``adapter_per_example`` that does not fit the
            set or the model -- all before any model call.
    """
    _check_positive(batch_size=batch_size, max_length=max_length, max_new_tokens=max_new_tokens)
    if not eval_set.examples:
        raise ValueError(f"eval set {eval_set.name!r} has no examples")
    n = len(eval_set.examples)
    if eval_set.kind == "multiple_choice":
        for i, ex in enumerate(eval_set.examples):
            if not ex.choices:
                raise ValueError(f"eval set {eval_set.name!r} example {i} has no choices")
    if adapter_per_example is not None:
        _validate_adapters(model, adapter_per_example, n)
    if eval_set.kind == "exact_match":
        beyond = answers_beyond_budget(
            tokenizer, [ex.answers for ex in eval_set.examples], max_new_tokens
        )
        if beyond:
            warnings.warn(
                f"eval set {eval_set.name!r}: {len(beyond)} of {n} examples have no answer that "
                f"fits in max_new_tokens={max_new_tokens} tokens (e.g. example {beyond[0]}), so "
                "they can never be an exact match; raise max_new_tokens",
                UserWarning,
                stacklevel=2,
            )

    rank, world = rank_and_world() if distributed else (0, 1)
    local = list(range(rank, n, world))
    names = ("acc", "acc_norm") if eval_set.kind == "multiple_choice" else ("exact_match",)
    counter = AccuracyCounter(names, sync_on_compute=world > 1).to(_model_device(model))

    full = torch.zeros((n, len(names)), dtype=torch.long) if items is not None else None
    groups: dict[str | None, list[int]] = {}
    for i in local:
        key = None if adapter_per_example is None else adapter_per_example[i]
        groups.setdefault(key, []).append(i)

    was_training = model.training
    show = progress and rank == 0
    try:
        model.eval()
        with (
            torch.no_grad(),
            _adapter_restored(model, adapter_per_example is not None),
            _folded(model, fold_adapter and adapter_per_example is None),
        ):
            for adapter in sorted(groups, key=lambda a: "" if a is None else a):
                if adapter is not None:
                    model.set_adapter(adapter)
                idx = groups[adapter]
                correct = _score_group(
                    model,
                    tokenizer,
                    [eval_set.examples[i] for i in idx],
                    eval_set.kind,
                    batch_size=batch_size,
                    max_length=max_length,
                    max_new_tokens=max_new_tokens,
                    chat_template=chat_template,
                    progress=show,
                    share_prefix=share_prefix,
                )
                counter.update(correct)
                if full is not None:
                    full[idx] = correct.cpu()
    finally:
        model.train(was_training)
    if not local:  # an idle rank still joins the reduction, with zero counts
        counter.update(torch.zeros((0, len(names)), dtype=torch.long))
    values = counter.compute()
    if full is not None and items is not None:
        if world > 1:  # every example was scored on exactly one rank: a sum gathers them
            gathered = full.to(_model_device(model))
            torch.distributed.all_reduce(gathered)
            full = gathered.cpu()
        items.clear()
        items.update({name: full[:, j].tolist() for j, name in enumerate(names)})
    result: dict[str, float] = {name: float(values[name]) for name in names}
    result["n"] = int(values["n"])
    return result
