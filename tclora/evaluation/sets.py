"""Evaluation sets: what an item is, and how sets load from local JSONL files or the registry.

Owns :class:`EvalExample`, :class:`EvalSet`, :class:`EvalSetError` and :func:`load_eval_set`,
with the parsing of local records (multiple-choice and exact-match forms) and of evals-registry
tasks. Lines are read by :func:`tclora.data.jsonl.read_jsonl` and registry tasks found by
:func:`tclora.data.jsonl.registry_task_folder`, the readers training-data sources use too.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

from tclora.data.jsonl import read_jsonl, registry_task_folder
from tclora.data.samples import Prompt

__all__ = [
    "REGISTRY_PREFIX",
    "EvalExample",
    "EvalKind",
    "EvalSet",
    "EvalSetError",
    "load_eval_set",
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


def _read_lines(path: Path) -> Iterator[tuple[str, Any]]:
    """Yield ``("<path>:<line>", record)`` for each non-blank line of a JSONL file."""
    for number, record in read_jsonl(path, EvalSetError):
        yield f"{path}:{number}", record


def _first_record(path: Path) -> Any:
    for _, record in _read_lines(path):
        return record
    return None


def _registry_records(task: str) -> list[tuple[str, Prompt, tuple[str, ...]]]:
    """All ``{"input", "ideal"}`` lines of a registry task, in sorted file order.

    Files whose first record lacks ``input`` or ``ideal`` are not evaluation files (few-shot
    ``{"sample": ...}`` pools, model-graded ``{"input", "completion", "choice"}`` sets, knowledge
    bases) and are skipped; inside an evaluation file every line must have both fields.
    """
    folder = registry_task_folder(task, f"{REGISTRY_PREFIX}{task}", EvalSetError)
    records: list[tuple[str, Prompt, tuple[str, ...]]] = []
    eval_files = []
    for path in sorted(folder.rglob("*.jsonl")):
        first = _first_record(path)
        if not (isinstance(first, dict) and "input" in first and "ideal" in first):
            continue
        eval_files.append(path)
        for where, record in _read_lines(path):
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
        for where, record in _read_lines(path):
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
