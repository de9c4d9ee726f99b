"""lm-evaluation-harness as a second evaluator, and as the referee of tclora's own scorer.

Owns the ``lm_eval:`` evaluation sets and everything that calls lm-eval (the optional extra
``pip install 'tclora[harness]'``; nothing here imports ``lm_eval`` until it is used):

* :func:`load_harness_task` -- ``"lm_eval:<task>"`` (a task of lm-eval's registry, e.g.
  ``lm_eval:arc_easy``) or ``"lm_eval:<path>.yaml"`` (a task file of one's own) loaded through
  lm-eval's ``TaskManager`` into a :class:`HarnessTask`: an :class:`EvalSet` whose examples are
  views of the task's documents (their prompt, used by centroid routing and the study's
  fingerprint), subsampled like every other set (``max_items`` documents, seeded);
* :func:`harness_evaluate` -- a model (any variant of one in-memory peft model: base, merge,
  single adapter, routing) scored on a :class:`HarnessTask` by ``lm_eval.simple_evaluate``
  through lm-eval's ``HFLM`` wrapped around the model instance; :func:`run_harness` is the one
  call underneath and also returns every document's log-likelihoods (the referee test's input);
* :func:`write_harness_task` / :func:`as_harness_task` -- a multiple-choice :class:`EvalSet`
  written as an lm-eval task (JSONL + YAML), so lm-eval can score tclora's own sets.

Under ``torch.distributed`` (DDP) the work is **sharded, not run on rank zero**: every rank wraps
the model in an ``HFLM`` that reports the process group's rank and world size and implements
lm-eval's ``all_gather`` / ``gather_object`` / ``barrier`` with ``torch.distributed``, so
lm-eval's own data-parallel path runs (rank ``i`` takes documents ``i::world_size``, requests are
padded to equal counts, rank zero aggregates); rank zero's numbers are then broadcast, so every
rank returns the same result, as :func:`tclora.evaluation.evaluate` does. A group of fewer
documents than ranks (lm-eval needs at least one per rank) is scored by rank zero alone and
broadcast. Every rank must call these functions. A sharded (FSDP/DeepSpeed) model is not
supported by this path: lm-eval batches differently on each rank.
"""

from __future__ import annotations

import copy
import difflib
import functools
import hashlib
import importlib.util
import json
import logging
import os
import random
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import torch
import yaml

from tclora._checks import check_choice
from tclora._dist import rank_and_world
from tclora.data.samples import Prompt, prompt_text
from tclora.evaluation.distributed import _adapter_restored, _validate_adapters
from tclora.evaluation.scoring import _check_positive
from tclora.evaluation.sets import EvalExample, EvalSet, EvalSetError, load_eval_set

__all__ = [
    "HARNESS_PREFIX",
    "Conventions",
    "LM_EVAL_VERSION",
    "HarnessError",
    "HarnessRun",
    "HarnessTask",
    "as_harness_task",
    "harness_evaluate",
    "harness_installed",
    "load_any_eval_set",
    "load_harness_task",
    "require_harness",
    "run_harness",
    "write_harness_task",
]

HARNESS_PREFIX = "lm_eval:"
LM_EVAL_VERSION = "0.4.13"
"""The version ``tclora[harness]`` pins; the referee test holds for this version."""

Conventions = Literal["tclora", "lm_eval"]
"""How lm-eval tokenises and normalises: ``"tclora"`` aligns lm-eval's two settable conventions
with tclora's scorer (no special tokens added to chat-templated text, log-softmax in float32);
``"lm_eval"`` keeps lm-eval's defaults (the tokenizer's special tokens unless the text starts
with the BOS token; log-softmax in the model's dtype)."""

_INSTALL = f"pip install 'tclora[harness]'  (lm-eval=={LM_EVAL_VERSION})"


class HarnessError(EvalSetError):
    """An ``lm_eval:`` set cannot be loaded or scored (lm-eval missing, unknown task, ...)."""


def harness_installed() -> bool:
    """Whether lm-evaluation-harness (``lm_eval``) can be imported."""
    return importlib.util.find_spec("lm_eval") is not None


def require_harness(what: str) -> None:
    """Raise :class:`HarnessError` naming ``what`` and the install command when lm-eval is missing.

    Args:
        what: What needs lm-eval, e.g. ``"eval set 'lm_eval:arc_easy'"``.
    """
    if not harness_installed():
        raise HarnessError(
            f"{what} needs lm-evaluation-harness, which is not installed; install the extra: "
            f"{_INSTALL}"
        )


# --------------------------------------------------------------------------------------------
# lm_eval: sets
# --------------------------------------------------------------------------------------------


@dataclass
class HarnessTask(EvalSet):
    """An lm-eval task as an evaluation set: scored by lm-eval, routed and fingerprinted by tclora.

    ``examples`` are views of the selected documents (``doc_ids``): the prompt lm-eval builds
    from each (``description`` as a system message, then ``doc_to_text``), which centroid routing
    embeds; for a zero-shot multiple-choice task whose items tclora's scorer can represent they
    also carry the choices and the gold answer, so :func:`tclora.evaluation.evaluate` can score
    the same documents (``tclora_unsupported`` says why not otherwise).

    Attributes:
        spec: The task name or YAML path after ``lm_eval:``.
        load_spec: What lm-eval's ``TaskManager.load`` is given (name, or absolute YAML path).
        task_name: lm-eval's name of the task (the key of its results).
        doc_ids: Indices of the scored documents in the task's evaluation split.
        output_type: lm-eval's ``output_type`` (``multiple_choice``, ``generate_until``, ...).
        config_digest: sha256 of the task's resolved configuration and of the selected documents.
        tclora_unsupported: Why tclora's own scorer cannot score this task (``None``: it can).
    """

    spec: str = ""
    load_spec: str = ""
    task_name: str = ""
    doc_ids: list[int] = field(default_factory=list)
    output_type: str = ""
    config_digest: str = ""
    tclora_unsupported: str | None = None

    def __post_init__(self) -> None:
        """No check of the examples: they are views of lm-eval's documents (see the class)."""


def load_any_eval_set(source: str, *, max_items: int | None = None, seed: int = 0) -> EvalSet:
    """Load ``lm_eval:...`` with :func:`load_harness_task`, anything else with ``load_eval_set``.

    Args:
        source: An evaluation set as the study's ``eval_sets`` names it.
        max_items: Seeded subsample size (``None``: all items / documents).
        seed: Subsample seed.

    Returns:
        The set (a :class:`HarnessTask` for ``lm_eval:`` sources).
    """
    if str(source).startswith(HARNESS_PREFIX):
        return load_harness_task(str(source), max_items=max_items, seed=seed)
    return load_eval_set(source, max_items=max_items, seed=seed)


_YAML = (".yaml", ".yml")


@functools.cache
def _task_manager(include_defaults: bool) -> Any:
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=include_defaults)


def _manager_for(load_spec: str) -> Any:
    """lm-eval's ``TaskManager`` for a task name (lm-eval's registry: indexing it takes seconds,
    so it is built once) or a YAML path (no index needed)."""
    return _task_manager(not load_spec.endswith(_YAML))


@contextmanager
def _quiet() -> Iterator[None]:
    """lm-eval's INFO/WARNING chatter (one block per variant) silenced, errors kept."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def load_harness_task(
    source: str, *, max_items: int | None = None, seed: int = 0, name: str | None = None
) -> HarnessTask:
    """Load ``"lm_eval:<task>"`` or ``"lm_eval:<path>.yaml"`` as a :class:`HarnessTask`.

    The task's data are read here (a hub dataset needs the network or a warm ``datasets``
    cache), so a missing task, file or dataset fails before any model work.

    Args:
        source: ``lm_eval:`` followed by a task name of lm-eval's registry or a task YAML path.
        max_items: Documents kept (a seeded subsample, sorted); ``None`` keeps all.
        seed: Subsample seed.
        name: Set name (default: lm-eval's task name).

    Returns:
        The task.

    Raises:
        HarnessError: lm-eval not installed, no such task or file, a group of tasks instead of
            one task, data that cannot be loaded, or an empty evaluation split.
        ValueError: Bad ``max_items``.
    """
    if max_items is not None and (isinstance(max_items, bool) or max_items < 1):
        raise ValueError(f"max_items must be a positive integer or None, got {max_items!r}")
    if not str(source).startswith(HARNESS_PREFIX):
        raise HarnessError(f"eval set {source!r} does not start with {HARNESS_PREFIX!r}")
    spec = str(source)[len(HARNESS_PREFIX) :].strip()
    if not spec:
        raise HarnessError(
            f"eval set {source!r} names no task; write {HARNESS_PREFIX}<task name> (e.g. "
            f"{HARNESS_PREFIX}arc_easy) or {HARNESS_PREFIX}<path/to/task.yaml>"
        )
    require_harness(f"eval set {source!r}")
    if spec.endswith(_YAML):
        path = Path(spec).expanduser().resolve()
        if not path.is_file():
            raise HarnessError(f"eval set {source!r}: task file not found: {path}")
        load_spec = str(path)
    else:
        load_spec = spec
    manager = _manager_for(load_spec)
    if not spec.endswith(_YAML):
        if spec not in manager.all_tasks:
            close = difflib.get_close_matches(spec, list(manager.all_tasks), n=5, cutoff=0.75)
            raise HarnessError(
                f"eval set {source!r}: lm-eval {LM_EVAL_VERSION} has no task {spec!r}"
                + (f"; similar names: {close}" if close else "")
                + f"; for a task file of your own write {HARNESS_PREFIX}<path>.yaml"
            )
    try:
        with _quiet():
            loaded = manager.load([load_spec])
    except Exception as err:  # noqa: BLE001 -- lm-eval and datasets raise many kinds
        raise HarnessError(
            f"eval set {source!r}: lm-eval could not load the task ({type(err).__name__}: "
            f"{str(err)[:300]}); a hub dataset needs the network or a warm datasets cache"
        ) from None
    tasks = loaded["tasks"]
    if len(tasks) != 1 or loaded.get("groups"):
        raise HarnessError(
            f"eval set {source!r} is a group of {len(tasks)} lm-eval tasks "
            f"({sorted(tasks)[:10]}); name one task per eval set"
        )
    ((task_name, task),) = tasks.items()
    docs = task.eval_docs
    if len(docs) == 0:
        raise HarnessError(f"eval set {source!r}: lm-eval task {task_name!r} has no documents")
    ids = list(range(len(docs)))
    if max_items is not None and max_items < len(ids):
        ids = sorted(random.Random(seed).sample(ids, max_items))
    examples, unsupported = _document_views(task, [docs[i] for i in ids], task_name)
    digest = hashlib.sha256(json.dumps(task.dump_config(), sort_keys=True, default=str).encode())
    for i in ids:
        digest.update(json.dumps(docs[i], sort_keys=True, default=str).encode())
    return HarnessTask(
        name=name or task_name,
        kind="multiple_choice" if task.OUTPUT_TYPE == "multiple_choice" else "exact_match",
        examples=examples,
        source=str(source),
        spec=spec,
        load_spec=load_spec,
        task_name=task_name,
        doc_ids=ids,
        output_type=str(task.OUTPUT_TYPE),
        config_digest=digest.hexdigest(),
        tclora_unsupported=unsupported,
    )


def _document_views(
    task: Any, docs: Sequence[Any], task_name: str
) -> tuple[list[EvalExample], str | None]:
    """Each document's prompt (and choices/gold where tclora's scorer can score it)."""
    config = task.config
    reason: str | None = None
    if task.OUTPUT_TYPE != "multiple_choice":
        reason = f"its output_type is {task.OUTPUT_TYPE!r} (tclora scores multiple choice)"
    elif task.multiple_input:
        reason = "each choice is its own context (multiple_input), the continuation is shared"
    elif config.num_fewshot:
        reason = f"it is {config.num_fewshot}-shot (tclora scores zero-shot prompts)"
    elif config.gen_prefix:
        reason = "it has a gen_prefix"
    elif config.target_delimiter != " ":
        reason = f"its target_delimiter is {config.target_delimiter!r} (tclora uses ' ')"
    examples = []
    for doc in docs:
        text = task.doc_to_text(doc)
        choices = task.doc_to_choice(doc) if task.OUTPUT_TYPE == "multiple_choice" else None
        if task.multiple_input and choices:
            text = choices[0]  # the routing text: the first filled-in context (never the gold)
        description = task.resolve_field(doc, config.description) or ""
        prompt: Prompt = (
            [{"role": "system", "content": description}, {"role": "user", "content": str(text)}]
            if description
            else str(text)
        )
        gold = task.doc_to_target(doc)
        if isinstance(gold, str) and choices and gold in choices:
            gold = choices.index(gold)
        item_ok = (
            reason is None
            and isinstance(gold, int)
            and choices is not None
            and 0 <= gold < len(choices)
            and len(set(choices)) == len(choices)
        )
        if reason is None and not item_ok:
            reason = f"a document's target {gold!r} is not one index into distinct choices"
        if item_ok and choices is not None and isinstance(gold, int):
            examples.append(EvalExample(prompt, (choices[gold],), tuple(choices), task_name))
        else:
            examples.append(EvalExample(prompt, (), None, task_name))
    if reason is not None:  # all or nothing: one evaluator per set
        examples = [EvalExample(ex.prompt, (), None, task_name) for ex in examples]
    return examples, reason


# --------------------------------------------------------------------------------------------
# tclora sets as lm-eval tasks
# --------------------------------------------------------------------------------------------


def _chat_parts(prompt: Prompt, where: str) -> tuple[str, str]:
    """``(system, user)`` of a prompt lm-eval can rebuild: one optional system, one user turn."""
    if isinstance(prompt, str):
        return "", prompt
    roles = [m.get("role") for m in prompt]
    if roles == ["user"]:
        return "", str(prompt[0]["content"])
    if roles == ["system", "user"]:
        return str(prompt[0]["content"]), str(prompt[1]["content"])
    raise HarnessError(
        f"{where}: a prompt with turns {roles} cannot be written as an lm-eval task under a chat "
        "template: lm-eval's zero-shot chat context is one optional system message (the task's "
        "description) and one user message"
    )


def write_harness_task(eval_set: EvalSet, folder: str | Path, *, chat: bool) -> Path:
    """Write a multiple-choice set as an lm-eval task: ``<folder>/<task>.jsonl`` and ``.yaml``.

    The task is the one tclora's scorer sees: plain text (``chat=False``: the prompt text, chat
    messages joined by newlines, as :func:`tclora.data.render_prompt` renders them) or, for
    ``apply_chat_template`` (``chat=True``), the system message as lm-eval's per-document
    ``description`` and the user message as ``doc_to_text``. Choices and the gold index are
    copied; the metrics are ``acc`` and ``acc_norm``.

    Args:
        eval_set: A multiple-choice set.
        folder: Where to write the two files (created).
        chat: Whether lm-eval will apply the chat template.

    Returns:
        The YAML path (give it as ``lm_eval:<path>``).

    Raises:
        HarnessError: The set is not multiple choice, or (``chat=True``) a prompt has other turns
            than one optional system and one user message.
    """
    if eval_set.kind != "multiple_choice":
        raise HarnessError(
            f"eval set {eval_set.name!r} is {eval_set.kind}; only multiple-choice sets can be "
            "written as lm-eval tasks"
        )
    task = "tclora_" + re.sub(r"[^A-Za-z0-9_]+", "_", eval_set.name)
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, ex in enumerate(eval_set.examples):
        where = f"eval set {eval_set.name!r} item {i}"
        system, user = _chat_parts(ex.prompt, where) if chat else ("", prompt_text(ex.prompt))
        record = {"system": system, "prompt": user, "choices": list(ex.choices or ())}
        lines.append(json.dumps({**record, "answer": ex.gold}, ensure_ascii=False) + "\n")
    data = out / f"{task}.jsonl"
    data.write_text("".join(lines), encoding="utf-8")
    config: dict[str, Any] = {
        "task": task,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data.resolve())}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "prompt",
        "doc_to_choice": "choices",
        "doc_to_target": "answer",
        "metric_list": [
            {"metric": m, "aggregation": "mean", "higher_is_better": True}
            for m in ("acc", "acc_norm")
        ],
        "metadata": {"version": 1.0},
    }
    if chat:
        config["description"] = "system"
    path = out / f"{task}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def as_harness_task(eval_set: EvalSet, folder: str | Path, *, chat: bool) -> HarnessTask:
    """:func:`write_harness_task`, then load it: tclora's set, every item, scored by lm-eval.

    Args:
        eval_set: A multiple-choice set.
        folder: Where the task files go.
        chat: Whether lm-eval will apply the chat template.

    Returns:
        The task, named like the set.
    """
    path = write_harness_task(eval_set, folder, chat=chat)
    return load_harness_task(f"{HARNESS_PREFIX}{path}", name=eval_set.name)


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------


@dataclass
class HarnessRun:
    """What one ``simple_evaluate`` call gave.

    Attributes:
        metrics: lm-eval's aggregated metrics, ``"acc,none"`` named ``"acc"`` and
            ``"exact_match,strict-match"`` named ``"exact_match_strict-match"`` (stderrs left out).
        n: Documents scored.
        samples: Per document (only with ``log_samples``): ``doc_id`` (index in the evaluation
            split), ``logliks`` (per choice, multiple choice only) and the per-document
            ``metrics``; sorted by ``doc_id``.
    """

    metrics: dict[str, float]
    n: int
    samples: list[dict[str, Any]] = field(default_factory=list)


@functools.cache
def _lm_class() -> Any:
    """lm-eval's ``HFLM`` taught the process group (built on first use: lm-eval is optional)."""
    import torch.distributed as dist
    from lm_eval.models.huggingface import HFLM

    class GroupHFLM(HFLM):
        """``HFLM`` on a model instance that joins lm-eval's data-parallel path through
        ``torch.distributed`` (the stock class assumes one process for a model instance)."""

        def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
            if self._world_size == 1:
                return tensor
            parts = [torch.zeros_like(tensor) for _ in range(self._world_size)]
            dist.all_gather(parts, tensor.contiguous())
            return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)

        def gather_object(self, obj: Any, dst: int = 0) -> Any:
            if self._world_size == 1:
                return [obj]
            out: list[Any] | None = [None] * self._world_size if self._rank == dst else None
            dist.gather_object(obj, out, dst=dst)
            return out

        def barrier(self) -> None:
            if self._world_size > 1:
                dist.barrier()

    return GroupHFLM


@contextmanager
def _results_here(here: bool) -> Iterator[None]:
    """``simple_evaluate`` returns results only where ``LOCAL_RANK`` is 0 (its tensor-parallel
    rule): on the process that must return them, ``LOCAL_RANK`` reads 0 meanwhile."""
    saved = os.environ.get("LOCAL_RANK")
    if here:
        os.environ["LOCAL_RANK"] = "0"
    try:
        yield
    finally:
        if here:
            if saved is None:
                os.environ.pop("LOCAL_RANK", None)
            else:
                os.environ["LOCAL_RANK"] = saved


def _metric_name(metric: str, filter_name: str) -> str:
    """``acc`` for lm-eval's ``"acc,none"``, ``exact_match_strict-match`` for a filtered one."""
    return metric if filter_name == "none" else f"{metric}_{filter_name}"


def _with_headline(metrics: dict[str, float]) -> dict[str, float]:
    """Add ``exact_match`` (the table's headline number) from the first filtered one if absent."""
    if "acc" not in metrics and "exact_match" not in metrics:
        first = next((k for k in metrics if k.startswith("exact_match_")), None)
        if first is not None:
            metrics["exact_match"] = metrics[first]
    return metrics


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _metric_values(results: Mapping[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in results.items():
        if "," in key and "_stderr" not in key and _is_number(value):
            metric, filter_name = key.split(",", 1)
            out[_metric_name(metric, filter_name)] = float(value)
    return _with_headline(out)


def run_harness(
    model: Any,
    tokenizer: Any,
    task: HarnessTask,
    *,
    doc_ids: Sequence[int] | None = None,
    batch_size: int = 8,
    max_length: int = 1024,
    chat_template: bool = True,
    log_samples: bool = False,
    distributed: bool = True,
    conventions: Conventions = "tclora",
) -> HarnessRun:
    """Score ``model`` as it is (active adapter included) with ``lm_eval.simple_evaluate``.

    lm-eval is called with the study's settings: ``max_length`` (left truncation to
    ``max_length + 1`` tokens, as tclora's scorer; lm-eval's own default is the model's context
    size), ``batch_size``, ``apply_chat_template`` when ``chat_template`` is set and the
    tokenizer has one, zero-shot unless the task's YAML says otherwise, no bootstrap stderrs, no
    reseeding of the process' random generators, and ``conventions`` (see :data:`Conventions`).
    A tokenizer without a pad token is copied first (lm-eval would add one to it).

    Args:
        model: A causal LM or peft model (the instance is used, never reloaded).
        tokenizer: Its tokenizer.
        task: The task.
        doc_ids: Documents to score (default ``task.doc_ids``); sorted, non-empty.
        batch_size: lm-eval's batch size.
        max_length: Longest input in tokens.
        chat_template: Apply the tokenizer's chat template when it has one.
        log_samples: Also return every document's log-likelihoods and metrics.
        distributed: Shard over ``torch.distributed`` ranks (see the module docstring).
        conventions: ``"tclora"`` (default) or ``"lm_eval"`` (see :data:`Conventions`).

    Returns:
        The :class:`HarnessRun`, equal on every rank.
    """
    check_choice("conventions", conventions, get_args(Conventions))
    require_harness(f"eval set {task.source!r}")
    import lm_eval

    ids = sorted(task.doc_ids if doc_ids is None else doc_ids)
    if not ids:
        raise ValueError(f"no documents of lm-eval task {task.task_name!r} to score")
    rank, world = rank_and_world() if distributed else (0, 1)
    shard = world > 1 and len(ids) >= world  # else rank zero scores them all
    templated = chat_template and bool(getattr(tokenizer, "chat_template", None))
    if tokenizer.pad_token_id is None:
        tokenizer = copy.deepcopy(tokenizer)
    payload: Any = None
    if shard or rank == 0:
        with _quiet(), _results_here(rank == 0):
            lm = _lm_class()(
                pretrained=model,
                tokenizer=tokenizer,
                batch_size=batch_size,
                max_length=max_length,
                **(
                    {"softmax_dtype": torch.float32, "add_bos_token": False if templated else None}
                    if conventions == "tclora"
                    else {}
                ),
            )
            lm._rank, lm._world_size = (rank, world) if shard else (0, 1)
            out = lm_eval.simple_evaluate(
                model=lm,
                tasks=[task.load_spec],
                task_manager=_manager_for(task.load_spec),
                samples={task.task_name: ids},
                apply_chat_template=templated,
                log_samples=log_samples,
                bootstrap_iters=0,
                random_seed=None,
                numpy_random_seed=None,
                torch_random_seed=None,
            )
        if out is not None:
            payload = (
                _metric_values(out["results"][task.task_name]),
                int(out["n-samples"][task.task_name]["effective"]),
                _sample_records(out.get("samples", {}).get(task.task_name, [])),
            )
    if world > 1:
        box = [payload]
        torch.distributed.broadcast_object_list(box, src=0)
        payload = box[0]
    metrics, n, samples = payload
    return HarnessRun(metrics, n, samples)


def _sample_records(samples: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One record per document (lm-eval logs one per filter), sorted by ``doc_id``."""
    records: dict[int, dict[str, Any]] = {}
    for sample in samples:
        record = records.setdefault(int(sample["doc_id"]), {"doc_id": int(sample["doc_id"])})
        resps = sample.get("resps") or []
        if all(isinstance(r, list | tuple) and r and isinstance(r[0], list | tuple) for r in resps):
            record.setdefault("logliks", [float(r[0][0]) for r in resps])
        filter_name = str(sample.get("filter", "none"))
        metrics = record.setdefault("metrics", {})
        for key in sample.get("metrics", []):
            if _is_number(sample.get(key)):
                metrics[_metric_name(key, filter_name)] = float(sample[key])
    return [records[k] for k in sorted(records)]


def harness_evaluate(
    model: Any,
    tokenizer: Any,
    task: HarnessTask,
    *,
    batch_size: int = 8,
    max_length: int = 1024,
    chat_template: bool = True,
    adapter_per_example: Sequence[str] | None = None,
    distributed: bool = True,
    conventions: Conventions = "tclora",
) -> dict[str, float]:
    """Score a model on an lm-eval task; the counterpart of :func:`tclora.evaluation.evaluate`.

    Without routing the numbers are lm-eval's own aggregates. With ``adapter_per_example`` the
    documents are grouped by adapter and each group is one :func:`run_harness` call with that
    adapter active; each metric is then the mean of its per-document values over all groups,
    which is what lm-eval reports for its mean-aggregated metrics (``acc``, ``acc_norm``,
    ``exact_match``; a corpus-level metric such as BLEU would differ). The model's training
    mode, active adapter(s) and ``requires_grad`` flags are restored afterwards.

    Args:
        model: A causal LM, or a peft model (with several adapters for ``adapter_per_example``).
        tokenizer: Its tokenizer.
        task: The task (its ``doc_ids`` are scored).
        batch_size: lm-eval's batch size.
        max_length: Longest input in tokens (left-truncated).
        chat_template: Apply the tokenizer's chat template when it has one.
        adapter_per_example: Adapter name for each of the task's examples (documents).
        distributed: Shard over ``torch.distributed`` ranks; every rank must call this.
        conventions: ``"tclora"`` (default) or ``"lm_eval"`` (see :data:`Conventions`).

    Returns:
        lm-eval's metrics (``{"acc", "acc_norm", "n"}`` for multiple choice), ``n`` the number
        of documents scored.
    """
    _check_positive(batch_size=batch_size, max_length=max_length)
    check_choice("conventions", conventions, get_args(Conventions))
    if adapter_per_example is not None:
        _validate_adapters(model, adapter_per_example, len(task.doc_ids))
    groups: dict[str | None, list[int]] = {}
    for position, doc_id in enumerate(task.doc_ids):
        key = None if adapter_per_example is None else adapter_per_example[position]
        groups.setdefault(key, []).append(doc_id)
    runs: list[HarnessRun] = []
    was_training = model.training
    try:
        with _adapter_restored(model, adapter_per_example is not None):
            for adapter in sorted(groups, key=lambda a: "" if a is None else a):
                if adapter is not None:
                    model.set_adapter(adapter)
                runs.append(
                    run_harness(
                        model,
                        tokenizer,
                        task,
                        doc_ids=groups[adapter],
                        batch_size=batch_size,
                        max_length=max_length,
                        chat_template=chat_template,
                        log_samples=len(groups) > 1,
                        distributed=distributed,
                        conventions=conventions,
                    )
                )
    finally:
        model.train(was_training)
    total = sum(run.n for run in runs)
    if len(runs) == 1:
        result = dict(runs[0].metrics)
    else:
        sums: dict[str, float] = {}
        for record in (r for run in runs for r in run.samples):
            for key, value in record["metrics"].items():
                sums[key] = sums.get(key, 0.0) + value
        result = _with_headline({key: value / total for key, value in sums.items()})
    result["n"] = total
    return result
