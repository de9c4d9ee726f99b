"""Evaluation of causal LMs (and multi-adapter peft models) on multiple-choice and short-answer sets.

Two scorers, both batched and shardable over ``torch.distributed`` ranks:

* **Multiple choice by log-likelihood**, as lm-evaluation-harness scores it
  (``lm_eval/api/task.py``, ``ConfigurableTask.process_results`` for ``output_type:
  multiple_choice``)::

      completion_len = np.array([float(len(i)) for i in choices])
      pred = np.argmax(lls)
      pred_norm = np.argmax(lls / completion_len)

  ``acc`` is the argmax of the summed log-likelihood of each choice's continuation tokens;
  ``acc_norm`` is the argmax of that sum divided by the choice's length in *characters*
  (``len(str)``, not tokens and not UTF-8 bytes -- the harness divides by ``len`` of the choice
  string; its byte counts are only used for perplexity metrics). Each continuation is scored the
  way the harness' ``HFLM._encode_pair`` / ``_loglikelihood_tokens`` do it: trailing whitespace
  of the context is moved to the front of the continuation, ``context + continuation`` is encoded
  whole and split at the length of the encoded context, the sequence is left-truncated to
  ``max_length + 1`` tokens, and the log-probabilities of the continuation tokens are summed.

  The continuation text depends on the prompt format, again as in the harness: with a chat
  template (``apply_chat_template(..., add_generation_prompt=True)``) the assistant turn starts
  right after the generation prompt, so the continuation is the bare choice text (the harness sets
  ``target_delimiter = ""`` under ``apply_chat_template``); for plain-text prompts it is
  ``" " + choice`` (the harness' default ``target_delimiter``). Note that SmolLM2's generation
  prompt ends in ``"\\n"``, which the whitespace rule moves into the continuation: every choice then
  also pays ``log p("\\n" | "...<|im_start|>assistant")``, a constant shared by all choices.

* **Short-answer exact match**: greedy generation (``do_sample=False``) of at most
  ``max_new_tokens`` with left padding; only the new tokens are decoded, the first non-empty line
  is kept, and it is compared to every acceptable answer after :func:`normalize_answer`
  (whitespace collapsed, casefolded, trailing punctuation removed).

Accuracies are accumulated in a torchmetrics :class:`~torchmetrics.Metric` with integer count
states, so when examples are sharded over ranks (rank ``i`` takes examples ``i::world_size``) the
synchronised result equals the single-process result exactly.

Evaluation sets load from a local JSONL file or from the packaged evals registry
(``"registry:<task>"``); see :func:`load_eval_set`.
"""

from __future__ import annotations

import inspect
import json
import random
import unicodedata
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import torch
import torch.distributed as dist
from torchmetrics import Metric
from tqdm.auto import tqdm

from tclora.data.samples import Prompt, render_prompt

__all__ = [
    "REGISTRY_PREFIX",
    "AccuracyCounter",
    "EvalExample",
    "EvalSet",
    "EvalSetError",
    "choice_predictions",
    "evaluate",
    "generate_answers",
    "is_exact_match",
    "load_eval_set",
    "normalize_answer",
    "render_prompt",
    "score_choices",
]

REGISTRY_PREFIX = "registry:"
EvalKind = Literal["multiple_choice", "exact_match"]
_KINDS = ("multiple_choice", "exact_match")
_CHOICE_FIELDS = ("choices", "options")  # "options": BIG-bench and lm-eval style


class EvalSetError(ValueError):
    """An evaluation set is missing, malformed or cannot be scored as asked."""


@dataclass(frozen=True)
class EvalExample:
    """One evaluation item.

    Attributes:
        prompt: Plain text, or chat messages (``[{"role": ..., "content": ...}, ...]``).
        answers: Acceptable answers for exact match. For multiple choice ``answers[0]`` is the
            text of the gold choice.
        choices: ``None`` for short-answer exact match, else the options scored by
            log-likelihood.
        task: Name of the task the item comes from.
    """

    prompt: Prompt
    answers: tuple[str, ...]
    choices: tuple[str, ...] | None
    task: str

    @property
    def gold(self) -> int:
        """Index of the gold choice (multiple choice only)."""
        if self.choices is None:
            raise ValueError(f"example of task {self.task!r} has no choices")
        return self.choices.index(self.answers[0])


@dataclass
class EvalSet:
    """A named list of examples of one kind.

    Attributes:
        name: Short name (task name or file stem), used as a metric prefix by callers.
        kind: ``"multiple_choice"`` (scored by log-likelihood) or ``"exact_match"``.
        examples: The items.
        source: File path, or ``"registry:<task>"``.
    """

    name: str
    kind: EvalKind
    examples: list[EvalExample]
    source: str

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"EvalSet kind must be one of {_KINDS}, got {self.kind!r}")
        if self.kind == "multiple_choice":
            for i, ex in enumerate(self.examples):
                if ex.choices is None or ex.answers[:1] == () or ex.answers[0] not in ex.choices:
                    raise ValueError(
                        f"EvalSet {self.name!r} is multiple_choice but example {i} has no choices "
                        "or its answers[0] is not among them"
                    )

    def __len__(self) -> int:
        return len(self.examples)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _scalar_text(value: Any) -> str | None:
    """A JSON string or number as text; ``None`` for anything else (bools, null, objects)."""
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return None


def _parse_prompt(value: Any, where: str, field: str) -> Prompt:
    if isinstance(value, str):
        if not value.strip():
            raise EvalSetError(f"{where}: field {field!r} is an empty string")
        return value
    if isinstance(value, list) and value:
        messages: list[dict[str, str]] = []
        for j, message in enumerate(value):
            if not (
                isinstance(message, dict)
                and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)
            ):
                raise EvalSetError(
                    f"{where}: field {field!r} message {j} must be an object with string 'role' "
                    f"and 'content', got {json.dumps(message)[:80]}"
                )
            messages.append({k: v for k, v in message.items() if isinstance(v, str)})
        return messages
    raise EvalSetError(
        f"{where}: field {field!r} must be a non-empty string or a non-empty list of chat "
        f"messages, got {json.dumps(value)[:80]}"
    )


def _parse_answers(value: Any, where: str, field: str) -> tuple[str, ...]:
    items = value if isinstance(value, list) else [value]
    answers = [_scalar_text(v) for v in items]
    if not items or any(a is None for a in answers):
        raise EvalSetError(
            f"{where}: field {field!r} must be a string, a number or a non-empty list of them, "
            f"got {json.dumps(value)[:80]}"
        )
    return tuple(dict.fromkeys(cast(list[str], answers)))


def _first_field(record: dict[str, Any], names: tuple[str, ...], where: str, what: str) -> Any:
    for name in names:
        if name in record:
            return name, record[name]
    alternatives = " (or " + ", ".join(repr(n) for n in names[1:]) + ")" if names[1:] else ""
    raise EvalSetError(
        f"{where}: missing field {names[0]!r}{alternatives}: {what}; "
        f"the line has fields {sorted(record)}"
    )


def _parse_local_record(
    record: Any, where: str, default_task: str
) -> tuple[Prompt, tuple[str, ...], tuple[str, ...] | None, str]:
    """Parse one line of a local eval JSONL (multiple-choice or exact-match form)."""
    if not isinstance(record, dict):
        raise EvalSetError(f"{where}: expected a JSON object, got {type(record).__name__}")
    field, raw_prompt = _first_field(record, ("prompt", "input"), where, "the question")
    prompt = _parse_prompt(raw_prompt, where, field)
    task = record.get("task") if isinstance(record.get("task"), str) else default_task
    choice_field = next((f for f in _CHOICE_FIELDS if f in record), None)
    if choice_field is None:
        field, raw = _first_field(record, ("ideal", "answer"), where, "the acceptable answer(s)")
        if field == "answer" and isinstance(raw, int) and not isinstance(raw, bool):
            raise EvalSetError(
                f"{where}: 'answer' is the integer {raw}, which reads as a choice index, but the "
                f"line has no choice list (fields {list(_CHOICE_FIELDS)}); the line has fields "
                f"{sorted(record)}. Add the choices, or give the answer as text for exact match"
            )
        return prompt, _parse_answers(raw, where, field), None, cast(str, task)
    raw_choices = record[choice_field]
    choices = [_scalar_text(c) for c in raw_choices] if isinstance(raw_choices, list) else [None]
    if len(choices) < 2 or any(c is None for c in choices):
        raise EvalSetError(
            f"{where}: field {choice_field!r} must be a list of at least 2 strings, "
            f"got {json.dumps(raw_choices)[:80]}"
        )
    options = tuple(cast(list[str], choices))
    if len(set(options)) != len(options):
        raise EvalSetError(f"{where}: field {choice_field!r} has duplicate options {list(options)}")
    _, answer = _first_field(record, ("answer",), where, "the gold choice (index or text)")
    if isinstance(answer, int) and not isinstance(answer, bool):
        if not 0 <= answer < len(options):
            raise EvalSetError(
                f"{where}: answer index {answer} is out of range for {len(options)} choices "
                f"(allowed 0..{len(options) - 1})"
            )
        gold = options[answer]
    elif isinstance(answer, str):
        if answer not in options:
            raise EvalSetError(f"{where}: answer {answer!r} is not among choices {list(options)}")
        gold = answer
    else:
        raise EvalSetError(
            f"{where}: field 'answer' must be a choice index or a choice text, "
            f"got {json.dumps(answer)[:80]}"
        )
    return prompt, (gold,), options, cast(str, task)


def _read_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    """Yield ``("<path>:<line>", record)`` for each non-blank line of a JSONL file."""
    try:
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{number}"
                try:
                    yield where, json.loads(line)
                except json.JSONDecodeError as exc:
                    raise EvalSetError(
                        f"{where}: invalid JSON ({exc.msg} at column {exc.colno})"
                    ) from None
    except UnicodeDecodeError as exc:
        raise EvalSetError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _first_record(path: Path) -> Any:
    for _, record in _read_jsonl(path):
        return record
    return None


def _registry_task_dir(task: str) -> Path:
    from tclora.assets import corpus_dir

    root = corpus_dir()
    folder = root / task
    if not task or "/" in task or task.startswith(".") or not folder.is_dir():
        import difflib

        known = sorted(p.name for p in root.iterdir() if p.is_dir())
        close = difflib.get_close_matches(task, known, n=3)
        hint = f"; did you mean {close}?" if close else ""
        raise EvalSetError(
            f"unknown registry task {task!r}: no folder {folder}{hint} "
            "(tclora.assets.list_corpus_tasks() lists the MIT-licensed tasks)"
        )
    return folder


def _registry_records(task: str) -> list[tuple[str, Prompt, tuple[str, ...]]]:
    """All ``{"input", "ideal"}`` lines of a registry task, in sorted file order.

    Files whose first record lacks ``input`` or ``ideal`` are not evaluation files (few-shot
    ``{"sample": ...}`` pools, model-graded ``{"input", "completion", "choice"}`` sets, knowledge
    bases) and are skipped; inside an evaluation file every line must have both fields.
    """
    folder = _registry_task_dir(task)
    records: list[tuple[str, Prompt, tuple[str, ...]]] = []
    eval_files = []
    for path in sorted(folder.rglob("*.jsonl")):
        first = _first_record(path)
        if not (isinstance(first, dict) and "input" in first and "ideal" in first):
            continue
        eval_files.append(path)
        for where, record in _read_jsonl(path):
            if not isinstance(record, dict):
                raise EvalSetError(f"{where}: expected a JSON object, got {type(record).__name__}")
            _, raw_prompt = _first_field(record, ("input",), where, "the chat messages")
            _, raw_ideal = _first_field(record, ("ideal",), where, "the acceptable answer(s)")
            records.append(
                (
                    where,
                    _parse_prompt(raw_prompt, where, "input"),
                    _parse_answers(raw_ideal, where, "ideal"),
                )
            )
    if not eval_files:
        raise EvalSetError(
            f"registry task {task!r} has no evaluation file: no JSONL under {folder} whose lines "
            "have both 'input' and 'ideal'"
        )
    return records


def _as_multiple_choice(
    examples: list[EvalExample], source: str, max_choices: int
) -> list[EvalExample] | None:
    """Turn exact-match items into multiple choice over the set's distinct gold answers.

    The label of an item is its first acceptable answer; the options (sorted) are the distinct
    labels of the whole set. Returns ``None`` when the labels number outside ``2..max_choices``.
    """
    labels = sorted({ex.answers[0] for ex in examples})
    if not 2 <= len(labels) <= max_choices:
        return None
    options = tuple(labels)
    return [EvalExample(ex.prompt, ex.answers, options, ex.task) for ex in examples]


def load_eval_set(
    source: str | Path,
    *,
    name: str | None = None,
    max_items: int | None = None,
    seed: int = 0,
    kind: Literal["auto", "multiple_choice", "exact_match"] = "auto",
    max_choices: int = 10,
) -> EvalSet:
    """Load an evaluation set from a local JSONL file or from the evals registry.

    Local JSONL lines take one of two forms (a file may not mix them):

    * multiple choice: ``{"prompt" | "input": str | messages, "choices" | "options": [str, ...],
      "answer": int | str}`` -- ``answer`` is the gold index or the gold choice text;
    * exact match: ``{"prompt" | "input": ..., "ideal" | "answer": str | [str, ...]}``. An
      integer ``answer`` without a choice list is refused (it reads as a choice index).

    An optional ``"task"`` string names the item's task (default: the set name).

    ``"registry:<task>"`` reads every ``{"input": messages, "ideal": str | list}`` line under
    ``tclora.assets.corpus_dir()/<task>/`` (all ``*.jsonl`` files, recursively, sorted; files that
    are not evaluation files -- few-shot pools, model-graded sets -- are skipped).

    Args:
        source: Local JSONL path, or ``"registry:<task>"``.
        name: Set name; default the registry task or the file stem.
        max_items: Keep a seeded random subsample of this many items (file order preserved).
        seed: Seed of the subsample.
        kind: ``"auto"``: local files by their form; registry tasks become multiple choice over
            their distinct gold answers when those number ``2..max_choices`` (classification-style
            tasks: A/B/C/D, yes/no, ...), else exact match. ``"multiple_choice"`` forces that
            conversion (exact-match items) or keeps the choices; ``"exact_match"`` scores by
            generation, with the gold choice as the answer of multiple-choice items.
        max_choices: Largest number of distinct answers turned into choices.

    Returns:
        The :class:`EvalSet`; for multiple choice the option set is computed on the whole task,
        before subsampling, so it does not depend on ``max_items``.

    Raises:
        EvalSetError: Missing file or registry task, invalid JSON or missing/ill-typed field
            (named by ``<path>:<line>``), an answer not among the choices, a set that cannot be
            multiple choice, or an empty set.
        ValueError: Bad ``max_items``, ``kind`` or ``max_choices``.
    """
    if kind not in ("auto", *_KINDS):
        raise ValueError(f"kind must be 'auto', 'multiple_choice' or 'exact_match', got {kind!r}")
    if max_items is not None and (isinstance(max_items, bool) or max_items < 1):
        raise ValueError(f"max_items must be a positive integer or None, got {max_items!r}")
    if isinstance(max_choices, bool) or max_choices < 2:
        raise ValueError(f"max_choices must be an integer >= 2, got {max_choices!r}")

    text = str(source)
    examples: list[EvalExample]
    if text.startswith(REGISTRY_PREFIX):
        task = text[len(REGISTRY_PREFIX) :]
        set_name = name or task
        examples = [
            EvalExample(prompt, answers, None, task)
            for _, prompt, answers in _registry_records(task)
        ]
        resolved_kind: EvalKind = "exact_match"
        if examples and kind in ("auto", "multiple_choice"):
            converted = _as_multiple_choice(examples, text, max_choices)
            if converted is not None:
                examples, resolved_kind = converted, "multiple_choice"
            elif kind == "multiple_choice":
                n_labels = len({ex.answers[0] for ex in examples})
                raise EvalSetError(
                    f"{text}: cannot score as multiple choice: {n_labels} distinct answers "
                    f"(allowed 2..{max_choices}, see max_choices)"
                )
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise EvalSetError(f"eval set file not found: {path}")
        if not path.is_file():
            raise EvalSetError(f"eval set path is not a file: {path} (expected a JSONL file)")
        set_name = name or path.stem
        examples = []
        forms: set[bool] = set()
        for where, record in _read_jsonl(path):
            prompt, answers, choices, task = _parse_local_record(record, where, set_name)
            forms.add(choices is not None)
            if len(forms) > 1:
                raise EvalSetError(
                    f"{where}: the file mixes multiple-choice lines (with 'choices' or 'options') and "
                    "exact-match lines (without); use one form per file"
                )
            examples.append(EvalExample(prompt, answers, choices, task))
        is_mc = forms == {True}
        if kind == "exact_match" or (kind == "auto" and not is_mc):
            resolved_kind = "exact_match"
            examples = [EvalExample(ex.prompt, ex.answers, None, ex.task) for ex in examples]
        else:
            resolved_kind = "multiple_choice"
            if examples and not is_mc:
                converted = _as_multiple_choice(examples, str(path), max_choices)
                if converted is None:
                    n_labels = len({ex.answers[0] for ex in examples})
                    raise EvalSetError(
                        f"{path}: cannot score as multiple choice: {n_labels} distinct answers "
                        f"(allowed 2..{max_choices}, see max_choices)"
                    )
                examples = converted
        text = str(path)

    if not examples:
        raise EvalSetError(f"eval set {text} has no examples")
    if max_items is not None and max_items < len(examples):
        keep = sorted(random.Random(seed).sample(range(len(examples)), max_items))
        examples = [examples[i] for i in keep]
    return EvalSet(name=set_name, kind=resolved_kind, examples=examples, source=text)


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
    out = " ".join(text.split()).casefold()
    end = len(out)
    while end and (out[end - 1].isspace() or unicodedata.category(out[end - 1]).startswith("P")):
        end -= 1
    return out[:end]


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

    Args:
        model: A causal LM (transformers or peft) returning ``.logits``.
        tokenizer: Its tokenizer.
        examples: Items with ``choices``.
        batch_size: Distinct inputs (choice rows) per forward pass.
        max_length: Longest input in tokens (context is truncated from the left).
        chat_template: Render prompts with the tokenizer's chat template when it has one.
        progress: Show a tqdm bar.

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
            rows.append((i, j, window[:-1], cont_ids))

    # Rows with the same input (e.g. single-token choices after the same context) share one
    # forward pass: the logits are identical, only the gathered targets differ.
    shared: dict[tuple[int, ...], list[int]] = {}
    for r, row in enumerate(rows):
        shared.setdefault(tuple(row[2]), []).append(r)
    inputs = sorted(shared, key=lambda inp: (-len(inp), shared[inp][0]))
    device = _model_device(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    use_keep = _supports_logits_to_keep(model)
    sums = [0.0] * len(rows)
    starts = range(0, len(inputs), batch_size)
    for start in tqdm(starts, desc="score choices", disable=not progress, leave=False):
        chunk = inputs[start : start + batch_size]
        batch = [(list(inp), [rows[r][3] for r in shared[inp]]) for inp in chunk]
        values_per_input = _score_rows(model, batch, device, pad_id, use_keep)
        for inp, values in zip(chunk, values_per_input, strict=True):
            for r, value in zip(shared[inp], values, strict=True):
                sums[r] = value

    results: list[tuple[list[float], list[int]]] = [
        ([], [len(c) for c in cast(tuple[str, ...], ex.choices)]) for ex in examples
    ]
    for (i, _, _, _), value in zip(rows, sums, strict=True):
        results[i][0].append(value)
    return results


@torch.no_grad()
def _score_rows(
    model: Any,
    batch: list[tuple[list[int], list[list[int]]]],
    device: torch.device,
    pad_id: int,
    use_keep: bool,
) -> list[list[float]]:
    """Summed log-likelihood of continuations, for a right-padded batch of inputs.

    Args:
        model: The causal LM.
        batch: ``(input_ids, continuations)`` pairs; each continuation's tokens are the last
            ``len(continuation)`` targets of its input (``input[1:] + [last token]``).
        device: Where the model lives.
        pad_id: Padding token (masked out).
        use_keep: Pass ``logits_to_keep`` to project only the needed positions.

    Returns:
        For each input, the summed log-probability of each of its continuations.
    """
    width = max(len(inp) for inp, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for b, (inp, _) in enumerate(batch):
        input_ids[b, : len(inp)] = torch.tensor(inp)
        attention_mask[b, : len(inp)] = 1
    # Position p predicts token p + 1, so a continuation of n tokens after input `inp` is
    # predicted at positions len(inp) - n .. len(inp) - 1 (its last token ends the window).
    first = min(len(inp) - max(len(c) for c in conts) for inp, conts in batch)
    keep = width - first
    kwargs: dict[str, Any] = {"logits_to_keep": keep} if use_keep else {}
    out = model(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        use_cache=False,
        **kwargs,
    )
    logits = out.logits[:, -keep:, :]
    sums: list[list[float]] = []
    for b, (inp, conts) in enumerate(batch):
        n_max = max(len(c) for c in conts)
        lo = len(inp) - n_max - (width - keep)
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
) -> list[str]:
    """Greedy short answers: the first non-empty line of each generated continuation.

    Prompts are rendered by :func:`render_prompt`, left-truncated to ``max_length`` tokens, sorted
    by length and left-padded into batches (the tokenizer itself is not modified); generation is
    greedy (``do_sample=False``) for at most ``max_new_tokens`` and only new tokens are decoded
    (special tokens skipped).

    Args:
        model: A causal LM with ``generate``.
        tokenizer: Its tokenizer.
        prompts: Plain texts or chat messages.
        batch_size: Prompts per ``generate`` call.
        max_length: Longest prompt in tokens.
        max_new_tokens: Generation budget.
        chat_template: Render prompts with the tokenizer's chat template when it has one.
        progress: Show a tqdm bar.

    Returns:
        One answer string per prompt (possibly empty), in input order.
    """
    _check_positive(batch_size=batch_size, max_length=max_length, max_new_tokens=max_new_tokens)
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("tokenizer has neither a pad nor an EOS token to pad generation batches")
    templated = chat_template and _has_chat_template(tokenizer)
    encoded = [
        _encode(tokenizer, render_prompt(tokenizer, p, chat_template), not templated)[-max_length:]
        for p in prompts
    ]
    order = sorted(range(len(encoded)), key=lambda r: (-len(encoded[r]), r))
    device = _model_device(model)
    answers = [""] * len(encoded)
    generation_config = _greedy_config(model, max_new_tokens, int(pad_id))
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc="generate", disable=not progress, leave=False):
        idx = order[start : start + batch_size]
        width = max(len(encoded[r]) for r in idx)
        input_ids = torch.full((len(idx), width), int(pad_id), dtype=torch.long)
        attention_mask = torch.zeros((len(idx), width), dtype=torch.long)
        for b, r in enumerate(idx):
            ids = encoded[r]
            input_ids[b, width - len(ids) :] = torch.tensor(ids)
            attention_mask[b, width - len(ids) :] = 1
        out = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            generation_config=generation_config,
        )
        texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        for r, text in zip(idx, texts, strict=True):
            lines = [line for line in text.strip().splitlines() if line.strip()]
            answers[r] = lines[0].strip() if lines else ""
    return answers


def _greedy_config(model: Any, max_new_tokens: int, pad_id: int) -> Any:
    """The model's generation config, made greedy (sampling knobs cleared to avoid warnings)."""
    import copy

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


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


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

    rank, world = _world() if distributed else (0, 1)
    local = list(range(rank, n, world))
    names = ("acc", "acc_norm") if eval_set.kind == "multiple_choice" else ("exact_match",)
    counter = AccuracyCounter(names, sync_on_compute=world > 1).to(_model_device(model))

    groups: dict[str | None, list[int]] = {}
    for i in local:
        key = None if adapter_per_example is None else adapter_per_example[i]
        groups.setdefault(key, []).append(i)

    was_training = model.training
    show = progress and rank == 0
    try:
        model.eval()
        with torch.no_grad(), _adapter_restored(model, adapter_per_example is not None):
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
                )
                counter.update(correct)
    finally:
        model.train(was_training)
    if not local:  # an idle rank still joins the reduction, with zero counts
        counter.update(torch.zeros((0, len(names)), dtype=torch.long))
    values = counter.compute()
    result: dict[str, float] = {name: float(values[name]) for name in names}
    result["n"] = int(values["n"])
    return result
