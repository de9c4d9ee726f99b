"""Scoring: exact-match normalisation, harness-style tokenisation, log-likelihood and generation.

Owns the pure helpers (:func:`normalize_answer`, :func:`is_exact_match`,
:func:`choice_predictions`), the lm-evaluation-harness context/continuation split
(:func:`encode_pair`) and the two model scorers, :func:`score_choices` (multiple choice by summed
log-likelihood) and :func:`generate_answers` (greedy short answers). Prompts are rendered by
:func:`tclora.data.render_prompt`, the one renderer. Nothing here shards or aggregates; see
:mod:`tclora.evaluation.distributed`.
"""

from __future__ import annotations

import copy
import inspect
import unicodedata
import warnings
from collections.abc import Sequence
from typing import Any, cast

import torch
from tqdm.auto import tqdm

from tclora.data.samples import Prompt, render_prompt
from tclora.evaluation.sets import EvalExample

__all__ = [
    "answers_beyond_budget",
    "choice_predictions",
    "encode_pair",
    "generate_answers",
    "is_exact_match",
    "normalize_answer",
    "score_choices",
]

# --------------------------------------------------------------------------------------------
# Pure scoring helpers
# --------------------------------------------------------------------------------------------


def normalize_answer(text: str) -> str:
    """Normalise an answer for exact match.

    Whitespace runs collapse to one space, the text is casefolded, and leading/trailing whitespace
    and trailing punctuation (any Unicode ``P*`` category: ``.``, ``!``, ``。``, ...) are removed.

    Args:
        text: A prediction or a reference answer.

    Returns:
        The normalised text.
    """
    return _strip_trailing(" ".join(text.split()).casefold())


def _strip_trailing(text: str) -> str:
    """``text`` without trailing whitespace and punctuation (Unicode ``P*`` categories)."""
    end = len(text)
    while end and (text[end - 1].isspace() or unicodedata.category(text[end - 1]).startswith("P")):
        end -= 1
    return text[:end]


def answers_beyond_budget(
    tokenizer: Any, answers: Sequence[Sequence[str]], max_new_tokens: int
) -> list[int]:
    """The items none of whose acceptable answers fits in ``max_new_tokens`` generated tokens.

    An answer fits when its text without trailing whitespace and punctuation (which
    :func:`normalize_answer` drops anyway) takes at most ``max_new_tokens`` tokens: such an item
    can never be an exact match, whatever the model.

    Args:
        tokenizer: The model's tokenizer.
        answers: Each item's acceptable answers.
        max_new_tokens: The generation budget.

    Returns:
        Indices of the items that cannot be matched.
    """
    out = []
    for i, options in enumerate(answers):
        lengths = [
            len(tokenizer(_strip_trailing(answer), add_special_tokens=False)["input_ids"])
            for answer in options
        ]
        if lengths and min(lengths) > max_new_tokens:
            out.append(i)
    return out


def is_exact_match(prediction: str, answers: Sequence[str]) -> bool:
    """Whether a prediction equals one of the acceptable answers after :func:`normalize_answer`.

    Args:
        prediction: Generated text (already cut to its first line).
        answers: Acceptable answers.

    Returns:
        ``True`` on a match.
    """
    target = normalize_answer(prediction)
    return any(target == normalize_answer(a) for a in answers)


def choice_predictions(logliks: Sequence[float], lengths: Sequence[int]) -> tuple[int, int]:
    """The harness' multiple-choice predictions from per-choice log-likelihoods.

    Args:
        logliks: Summed log-likelihood of each choice's continuation.
        lengths: Length of each choice in characters (``len(choice)``).

    Returns:
        ``(pred, pred_norm)``: argmax of ``logliks`` and of ``logliks / lengths`` (first index on
        ties, like ``numpy.argmax``).

    Raises:
        ValueError: ``logliks`` is empty or not as long as ``lengths``.
    """
    if len(logliks) != len(lengths) or not logliks:
        raise ValueError(
            f"logliks and lengths must be non-empty and of equal length, got {len(logliks)} "
            f"and {len(lengths)}"
        )
    ll = torch.tensor(list(logliks), dtype=torch.float64)
    norm = ll / torch.tensor([max(int(n), 1) for n in lengths], dtype=torch.float64)
    return int(torch.argmax(ll)), int(torch.argmax(norm))


# --------------------------------------------------------------------------------------------
# Tokenisation
# --------------------------------------------------------------------------------------------


def _has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _encode(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def _prefix_token(tokenizer: Any) -> int:
    for token_id in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    raise ValueError(
        "tokenizer has neither a BOS nor an EOS token to condition an empty context on"
    )


def encode_pair(
    tokenizer: Any, context: str, continuation: str, add_special_tokens: bool
) -> tuple[list[int], list[int]]:
    """Token ids of a context and of its continuation, split the lm-evaluation-harness way.

    Trailing whitespace of the context moves to the continuation; ``context + continuation`` is
    encoded whole and cut at the length of the encoded context (``HFLM._encode_pair``). An empty
    context is replaced by the BOS (else EOS) token.

    Args:
        tokenizer: A transformers tokenizer.
        context: The rendered prompt.
        continuation: The choice text (with its delimiter).
        add_special_tokens: Passed to the tokenizer (``False`` for chat-templated text).

    Returns:
        ``(context_ids, continuation_ids)``.

    Raises:
        ValueError: The context is empty and the tokenizer has neither a BOS nor an EOS token.
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = _encode(tokenizer, context + continuation, add_special_tokens)
    context_ids = _encode(tokenizer, context, add_special_tokens)
    continuation_ids = whole[len(context_ids) :]
    if not context_ids:
        context_ids = [_prefix_token(tokenizer)]
    return context_ids, continuation_ids


def _model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover - models without parameters
        return torch.device("cpu")


def _supports_logits_to_keep(model: Any) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - exotic forward
        return False


def _cache_argument(model: Any) -> str:
    """The forward's name for a key/value cache: ``cache`` (transformers ≥ 5.2x), else
    ``past_key_values``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        params = inspect.signature(base.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - exotic forward
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def _warn_cut(cut: set[int], total: int, max_length: int) -> None:
    """Say how many prompts were cut from the left to fit ``max_length`` (as lm-eval cuts)."""
    if cut:
        warnings.warn(
            f"evaluation: {len(cut)} of {total} prompts (e.g. item {min(cut)}) are longer than "
            f"max_length={max_length} tokens (with the choice, for multiple choice) and lose their "
            "first tokens (cut from the left, as lm-eval does); raise max_length to score them "
            "whole",
            UserWarning,
            stacklevel=3,
        )


def _check_positive(**values: int) -> None:
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be a positive integer, got {value!r}")


# --------------------------------------------------------------------------------------------
# Model scoring
# --------------------------------------------------------------------------------------------


def score_choices(
    model: Any,
    tokenizer: Any,
    examples: Sequence[EvalExample],
    *,
    batch_size: int = 8,
    max_length: int = 1024,
    chat_template: bool = True,
    progress: bool = False,
    share_prefix: bool = True,
) -> list[tuple[list[float], list[int]]]:
    """Summed log-likelihood of every choice of every example.

    Each (example, choice) pair is one row: the context is the rendered prompt, the continuation
    the choice (bare under a chat template, else ``" " + choice``), split by :func:`encode_pair`
    and left-truncated to ``max_length + 1`` tokens. Rows with the same input tokens (e.g.
    single-token choices after one context) share a forward pass; inputs are sorted by length,
    right-padded with an attention mask and run ``batch_size`` at a time; only the positions that
    predict continuation tokens are projected to the vocabulary (``logits_to_keep``) when the
    model supports it. Log-softmax is taken in float32. The model is used as is (no ``eval()`` or
    ``no_grad`` here; :func:`evaluate` sets both).

    With ``share_prefix``, the longest token prefix common to every input (the chat template's
    system turn and a task's shared instruction: 30-80% of the tokens of registry tasks) runs
    once; its key/value cache is repeated over each batch, which then runs only the rest of each
    input. Log-likelihoods equal the unshared ones up to float rounding.

    Args:
        model: A causal LM (transformers or peft) returning ``.logits``.
        tokenizer: Its tokenizer.
        examples: Items with ``choices``.
        batch_size: Distinct inputs (choice rows) per forward pass.
        max_length: Longest input in tokens (context is truncated from the left).
        chat_template: Render prompts with the tokenizer's chat template when it has one.
        progress: Show a tqdm bar.
        share_prefix: Run the inputs' common prefix once and reuse its cache (see above).

    Returns:
        Per example: the summed log-likelihood of each choice, and each choice's length in
        characters (lm-evaluation-harness' ``completion_len``, used by ``acc_norm``).

    Raises:
        ValueError: An example without choices, a continuation longer than ``max_length``
            tokens, or a bad ``batch_size`` / ``max_length``.
    """
    _check_positive(batch_size=batch_size, max_length=max_length)
    for i, ex in enumerate(examples):
        if not ex.choices:
            raise ValueError(f"example {i} (task {ex.task!r}) has no choices to score")
    templated = chat_template and _has_chat_template(tokenizer)
    delimiter = "" if templated else " "

    # (example index, choice index, input ids, number of continuation tokens)
    rows: list[tuple[int, int, list[int], list[int]]] = []
    cut: set[int] = set()
    for i, ex in enumerate(examples):
        context = render_prompt(tokenizer, ex.prompt, chat_template)
        for j, choice in enumerate(cast(tuple[str, ...], ex.choices)):
            ctx_ids, cont_ids = encode_pair(
                tokenizer, context, delimiter + choice, add_special_tokens=not templated
            )
            if not cont_ids:
                raise ValueError(f"example {i} (task {ex.task!r}) choice {j} encodes to no tokens")
            if len(cont_ids) > max_length:
                raise ValueError(
                    f"example {i} (task {ex.task!r}) choice {j} has {len(cont_ids)} tokens, more "
                    f"than max_length={max_length}"
                )
            window = (ctx_ids + cont_ids)[-(max_length + 1) :]
            if len(ctx_ids) + len(cont_ids) > max_length + 1:
                cut.add(i)
            rows.append((i, j, window[:-1], cont_ids))
    _warn_cut(cut, len(examples), max_length)

    # Rows with the same input (e.g. single-token choices after the same context) share one
    # forward pass: the logits are identical, only the gathered targets differ.
    shared: dict[tuple[int, ...], list[int]] = {}
    for r, row in enumerate(rows):
        shared.setdefault(tuple(row[2]), []).append(r)
    inputs = sorted(shared, key=lambda inp: (-len(inp), shared[inp][0]))
    device = _model_device(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    use_keep = _supports_logits_to_keep(model)
    prefix = None
    if share_prefix:  # up to the first position that predicts a continuation token
        needed = [len(inp) - max(len(rows[r][3]) for r in shared[inp]) for inp in inputs]
        prefix = _shared_prefix(model, inputs, min(needed, default=0), device)
    sums = [0.0] * len(rows)
    starts = range(0, len(inputs), batch_size)
    for start in tqdm(starts, desc="score choices", disable=not progress, leave=False):
        chunk = inputs[start : start + batch_size]
        batch = [(list(inp), [rows[r][3] for r in shared[inp]]) for inp in chunk]
        values_per_input = _score_rows(model, batch, device, pad_id, use_keep, prefix)
        for inp, values in zip(chunk, values_per_input, strict=True):
            for r, value in zip(shared[inp], values, strict=True):
                sums[r] = value

    results: list[tuple[list[float], list[int]]] = [
        ([], [len(c) for c in cast(tuple[str, ...], ex.choices)]) for ex in examples
    ]
    for (i, _, _, _), value in zip(rows, sums, strict=True):
        results[i][0].append(value)
    return results


def _prefix_cache(model: Any, prefix: Sequence[int], device: torch.device) -> Any:
    """The key/value cache of ``prefix`` (batch 1), or ``None`` if the model gives none."""
    ids = torch.tensor([list(prefix)], device=device)
    keep: dict[str, Any] = {"logits_to_keep": 1} if _supports_logits_to_keep(model) else {}
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True, **keep)
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    return cache if cache is not None and hasattr(cache, "batch_repeat_interleave") else None


def _shared_prefix(
    model: Any, inputs: Sequence[Sequence[int]], limit: int, device: torch.device
) -> tuple[Any, int] | None:
    """``(key/value cache, P)`` of the ``P ≤ limit`` tokens every input starts with, run once;
    ``None`` for a single input, a prefix too short to pay off, or a model without a cache."""
    if len(inputs) < 2:
        return None
    length = _common_prefix(inputs, limit)
    if length < _MIN_SHARED_PREFIX:
        return None
    cache = _prefix_cache(model, inputs[0][:length], device)
    return None if cache is None else (cache, length)


def _repeated_cache(model: Any, cache: Any, batch: int) -> dict[str, Any]:
    """Forward keyword arguments holding a fresh copy of ``cache`` repeated ``batch`` times
    (the forward appends to the cache it is given)."""
    copied = copy.deepcopy(cache)
    copied.batch_repeat_interleave(batch)
    return {_cache_argument(model): copied}


def _common_prefix(inputs: Sequence[Sequence[int]], limit: int) -> int:
    """Length of the longest token prefix shared by every input, at most ``limit``."""
    first = inputs[0]
    length = min(limit, *(len(inp) for inp in inputs))
    for inp in inputs[1:]:
        k = 0
        while k < length and inp[k] == first[k]:
            k += 1
        length = k
        if not length:
            break
    return max(length, 0)


_MIN_SHARED_PREFIX = 4
"""Shared prefixes shorter than this are not worth a separate forward pass."""


@torch.no_grad()
def _score_rows(
    model: Any,
    batch: list[tuple[list[int], list[list[int]]]],
    device: torch.device,
    pad_id: int,
    use_keep: bool,
    prefix: tuple[Any, int] | None = None,
) -> list[list[float]]:
    """Summed log-likelihood of continuations, for a right-padded batch of inputs.

    Args:
        model: The causal LM.
        batch: ``(input_ids, continuations)`` pairs; each continuation's tokens are the last
            ``len(continuation)`` targets of its input (``input[1:] + [last token]``).
        device: Where the model lives.
        pad_id: Padding token (masked out).
        use_keep: Pass ``logits_to_keep`` to project only the needed positions.
        prefix: ``(cache, P)``: every input starts with the same ``P`` tokens, whose key/value
            cache (batch 1) is given; only the tokens after them are run. Every continuation
            must be predicted after the prefix (``len(input) - len(continuation) >= P``).

    Returns:
        For each input, the summed log-probability of each of its continuations.
    """
    skip = prefix[1] if prefix is not None else 0
    width = max(len(inp) for inp, _ in batch) - skip
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), skip + width), dtype=torch.long)
    attention_mask[:, :skip] = 1
    for b, (inp, _) in enumerate(batch):
        input_ids[b, : len(inp) - skip] = torch.tensor(inp[skip:])
        attention_mask[b, skip : len(inp)] = 1
    # Position p predicts token p + 1, so a continuation of n tokens after input `inp` is
    # predicted at positions len(inp) - n .. len(inp) - 1 (its last token ends the window);
    # positions count from the first token run here (after the shared prefix).
    first = min(len(inp) - max(len(c) for c in conts) for inp, conts in batch) - skip
    keep = width - first
    kwargs: dict[str, Any] = {"logits_to_keep": keep} if use_keep else {}
    kwargs["use_cache"] = prefix is not None
    if prefix is not None:
        kwargs.update(_repeated_cache(model, prefix[0], len(batch)))
    out = model(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        **kwargs,
    )
    logits = out.logits[:, -keep:, :]
    sums: list[list[float]] = []
    for b, (inp, conts) in enumerate(batch):
        n_max = max(len(c) for c in conts)
        lo = len(inp) - skip - n_max - (width - keep)
        logprobs = torch.log_softmax(logits[b, lo : lo + n_max].float(), dim=-1)
        row = []
        for cont in conts:
            target = torch.tensor(cont, device=logprobs.device).unsqueeze(-1)
            row.append(float(logprobs[n_max - len(cont) :].gather(-1, target).sum()))
        sums.append(row)
    return sums


def generate_answers(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    *,
    batch_size: int = 8,
    max_length: int = 1024,
    max_new_tokens: int = 16,
    chat_template: bool = True,
    progress: bool = False,
    share_prefix: bool = True,
) -> list[str]:
    """Greedy short answers: the first non-empty line of each generated continuation.

    Prompts are rendered by :func:`render_prompt`, left-truncated to ``max_length`` tokens, sorted
    by length and left-padded into batches (the tokenizer itself is not modified); generation is
    greedy (``do_sample=False``) for at most ``max_new_tokens``, a row stops once its first
    non-empty line is complete (the answer cannot change after it), and only new tokens are
    decoded (special tokens skipped).

    Args:
        model: A causal LM with ``generate``.
        tokenizer: Its tokenizer.
        prompts: Plain texts or chat messages.
        batch_size: Prompts per ``generate`` call.
        max_length: Longest prompt in tokens.
        max_new_tokens: Generation budget.
        chat_template: Render prompts with the tokenizer's chat template when it has one.
        progress: Show a tqdm bar.
        share_prefix: Run the token prefix common to every prompt once and start each batch
            from its key/value cache (prompts are laid out as prefix, padding, rest).

    Returns:
        One answer string per prompt (possibly empty), in input order.

    Raises:
        ValueError: A bad ``batch_size`` / ``max_length`` / ``max_new_tokens``, or a tokenizer
            with neither a pad nor an EOS token.
    """
    _check_positive(batch_size=batch_size, max_length=max_length, max_new_tokens=max_new_tokens)
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("tokenizer has neither a pad nor an EOS token to pad generation batches")
    templated = chat_template and _has_chat_template(tokenizer)
    whole = [
        _encode(tokenizer, render_prompt(tokenizer, p, chat_template), not templated)
        for p in prompts
    ]
    _warn_cut({r for r, ids in enumerate(whole) if len(ids) > max_length}, len(whole), max_length)
    encoded = [ids[-max_length:] for ids in whole]
    order = sorted(range(len(encoded)), key=lambda r: (-len(encoded[r]), r))
    device = _model_device(model)
    answers = [""] * len(encoded)
    generation_config = _greedy_config(model, max_new_tokens, int(pad_id))
    # keep at least one token of each prompt to run
    shared = (
        _shared_prefix(model, encoded, min(map(len, encoded), default=1) - 1, device)
        if share_prefix
        else None
    )
    skip = shared[1] if shared is not None else 0
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc="generate", disable=not progress, leave=False):
        idx = order[start : start + batch_size]
        # [shared prefix | left padding | the rest of the prompt]: positions follow the mask
        width = skip + max(len(encoded[r]) - skip for r in idx)
        input_ids = torch.full((len(idx), width), int(pad_id), dtype=torch.long)
        attention_mask = torch.zeros((len(idx), width), dtype=torch.long)
        for b, r in enumerate(idx):
            ids = encoded[r]
            input_ids[b, :skip] = torch.tensor(ids[:skip])
            attention_mask[b, :skip] = 1
            input_ids[b, width - (len(ids) - skip) :] = torch.tensor(ids[skip:])
            attention_mask[b, width - (len(ids) - skip) :] = 1
        kwargs = _repeated_cache(model, shared[0], len(idx)) if shared is not None else {}
        out = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            generation_config=generation_config,
            stopping_criteria=_first_line_done(tokenizer, width),
            **kwargs,
        )
        texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        for r, text in zip(idx, texts, strict=True):
            lines = [line for line in text.strip().splitlines() if line.strip()]
            answers[r] = lines[0].strip() if lines else ""
    return answers


def _first_line_done(tokenizer: Any, width: int) -> Any:
    """A stopping criterion that ends a row once its first non-empty line is complete.

    The answer is the first non-empty line of the new text, so it is fixed as soon as the new
    text, left-stripped, holds a newline; later tokens cannot change it. Rows finish on their own
    (greedy decoding of a row does not depend on the others), so answers are identical to running
    all ``max_new_tokens`` steps -- only the steps after every row's first line are saved.
    """
    from transformers import StoppingCriteria, StoppingCriteriaList

    class FirstLineDone(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
            texts = tokenizer.batch_decode(input_ids[:, width:], skip_special_tokens=True)
            done = ["\n" in text.lstrip() for text in texts]
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([FirstLineDone()])


def _greedy_config(model: Any, max_new_tokens: int, pad_id: int) -> Any:
    """The model's generation config, made greedy (sampling knobs cleared to avoid warnings)."""
    from transformers import GenerationConfig

    base = getattr(model, "generation_config", None)
    config = copy.deepcopy(base) if base is not None else GenerationConfig()
    config.do_sample = False
    config.num_beams = 1
    config.temperature = None
    config.top_p = None
    config.top_k = None
    config.max_new_tokens = max_new_tokens
    config.max_length = None
    config.pad_token_id = pad_id
    return config
