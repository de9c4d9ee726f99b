"""The merge study's core loop: decompose, merge, pick each method's scale, evaluate.

No Lightning and no files here: :class:`~tclora.study.MergeStudy` calls :func:`run_study` and owns
progress, outputs and export.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from tclora._dist import rank_and_world
from tclora.data import prompt_text
from tclora.evaluation import EvalSet, HarnessTask, evaluate, harness_evaluate
from tclora.evaluation.harness import Conventions
from tclora.merge import (
    AdapterStack,
    CPResult,
    MergedAdapter,
    component_analysis,
    cp_decompose,
    install_adapter,
    merge_baseline,
    merge_cp,
    merge_report,
)
from tclora.study.arrow import arrow_top_k, build_arrow_model
from tclora.study.config import StudyConfig, check_single_sets
from tclora.study.results import MethodResult, StudyResult

__all__ = [
    "MERGED_ADAPTER",
    "Router",
    "build_merges",
    "has_validation_data",
    "lm_loss",
    "route",
    "run_study",
    "select_scale",
]

MERGED_ADAPTER = "tclora_merged"
_log = logging.getLogger(__name__)


@runtime_checkable
class Router(Protocol):
    """What centroid routing needs: embed texts, assign them to clusters, name the clusters.

    :class:`~tclora.datamodules.ClusterDataModule` is one.
    """

    @property
    def cluster_names(self) -> list[str]: ...

    def embed(self, texts: list[str]) -> np.ndarray: ...

    def assign(self, embeddings: np.ndarray) -> np.ndarray: ...


def route(router: Router, eval_sets: Sequence[EvalSet]) -> dict[str, list[str]]:
    """The adapter (cluster name) each example of each evaluation set is routed to.

    Args:
        router: Embeds the prompts' text and assigns each to its nearest cluster.
        eval_sets: The evaluation sets.

    Returns:
        ``{eval set name: [adapter name per example]}``.
    """
    names = list(router.cluster_names)
    routes = {}
    for es in eval_sets:
        texts = [prompt_text(ex.prompt) for ex in es.examples]
        ids = router.assign(router.embed(texts)).tolist() if texts else []
        routes[es.name] = [names[int(i)] for i in ids]
    return routes


@torch.no_grad()
def lm_loss(
    model: torch.nn.Module, batches: Iterable[Mapping[str, Any]], max_batches: int | None
) -> float:
    """Token-weighted mean next-token loss over ``batches`` (summed over DDP ranks).

    Args:
        model: A causal LM taking ``input_ids``, ``attention_mask`` and ``labels``.
        batches: Dicts with ``input_ids`` and ``labels`` (``-100`` ignored), ``attention_mask``
            optional.
        max_batches: Stop after this many batches (``None``: all).

    Returns:
        Mean loss per supervised token; ``nan`` when there is none.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        labels = batch["labels"].to(device)
        out = model(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch.get("attention_mask", torch.ones_like(labels)).to(device),
        )
        logits = out.logits[:, :-1].float()
        targets = labels[:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
        )
        total += torch.stack([loss.double(), (targets != -100).sum().double()])
    if rank_and_world()[1] > 1:
        torch.distributed.all_reduce(total)
    model.train(was_training)
    return float(total[0] / total[1]) if total[1] > 0 else math.nan


def select_scale(curve: Mapping[float, float]) -> float:
    """The scale with the lowest validation metric (ties go to the smaller scale)."""
    finite = {s: v for s, v in curve.items() if math.isfinite(v)}
    if not finite:
        raise ValueError(f"no finite validation metric on the scale grid {sorted(curve)}")
    return min(sorted(finite), key=lambda s: finite[s])


def has_validation_data(val_loaders: Sequence[Iterable[Mapping[str, Any]]]) -> bool:
    """Whether any validation loader has data (a loader without a length is assumed to).

    Args:
        val_loaders: Validation loaders (one per cluster), e.g. ``DataLoader`` objects.

    Returns:
        ``False`` for no loaders or loaders whose datasets are all empty.
    """
    return any(_size(loader) != 0 for loader in val_loaders)


def _size(loader: Iterable[Any]) -> int | None:
    """Samples in a loader's dataset (or items of a sized iterable); ``None``: unknown."""
    data = getattr(loader, "dataset", loader)
    try:
        return len(data)  # type: ignore[arg-type]
    except TypeError:  # an iterable without a length
        return None


def _validation_metric(
    model: Any,
    val_loaders: Sequence[Iterable[Mapping[str, Any]]],
    cfg: StudyConfig,
    adapters: Sequence[str] | None = None,
) -> float:
    """The selection metric over the validation loaders; ``adapters[k]`` scores loader ``k``
    (routing: each cluster's batches through its own adapter), else the active adapter."""
    losses = []
    for k, loader in enumerate(val_loaders):
        if adapters is not None:
            model.set_adapter(adapters[k])
        losses.append(lm_loss(model, loader, cfg.val_max_batches))
    losses = [v for v in losses if math.isfinite(v)]
    if not losses:
        return math.nan
    return max(losses) if cfg.selection_metric == "val_loss_max" else sum(losses) / len(losses)


def evaluate_sets(
    model: Any,
    tokenizer: Any,
    eval_sets: Sequence[EvalSet],
    cfg: StudyConfig,
    adapter_per_example: Mapping[str, Sequence[str]] | None = None,
    conventions: Conventions = "tclora",
    items: dict[str, str] | None = None,
) -> dict[str, dict[str, float]]:
    """Score ``model`` on every evaluation set with the study's settings.

    Sets loaded from ``lm_eval:`` (:class:`~tclora.evaluation.HarnessTask`) are scored by
    lm-evaluation-harness (:func:`~tclora.evaluation.harness_evaluate`), the others by tclora's
    scorer (:func:`~tclora.evaluation.evaluate`); both shard over DDP ranks.

    Args:
        model: The (peft) model, with the adapter to score active.
        tokenizer: Its tokenizer.
        eval_sets: The sets.
        cfg: The study's options (batch size, lengths, chat template, progress).
        adapter_per_example: Per set, the adapter of each example (routing), or ``None``.
        conventions: lm-eval's tokenisation conventions (see
            :data:`tclora.evaluation.harness.Conventions`).
        items: If given, filled with ``{set name: "0110..."}``: the headline metric (``acc`` or
            ``exact_match``) of every example in set order, for paired comparisons between
            methods (tclora-scored sets only; lm-eval tasks are left out).

    Returns:
        ``{set name: {"acc", "acc_norm", "n"} or {"exact_match", "n"}}`` (lm-eval tasks: the
        metrics lm-eval reports, and ``n``).
    """
    scores: dict[str, dict[str, float]] = {}
    for es in eval_sets:
        common: dict[str, Any] = {
            "batch_size": cfg.batch_size,
            "max_length": cfg.max_length,
            "chat_template": cfg.chat_template,
            "adapter_per_example": None
            if adapter_per_example is None
            else adapter_per_example[es.name],
        }
        if isinstance(es, HarnessTask):
            scores[es.name] = harness_evaluate(
                model, tokenizer, es, conventions=conventions, **common
            )
        else:
            per_item: dict[str, list[int]] | None = {} if items is not None else None
            scores[es.name] = evaluate(
                model,
                tokenizer,
                es,
                max_new_tokens=cfg.max_new_tokens,
                progress=cfg.progress,
                items=per_item,
                fold_adapter=cfg.fold_adapter,
                **common,
            )
            if items is not None and per_item is not None:
                headline = "acc" if "acc" in per_item else "exact_match"
                items[es.name] = "".join(str(int(v)) for v in per_item[headline])
    return scores


def build_merges(
    stack: AdapterStack, cfg: StudyConfig
) -> tuple[dict[str, MergedAdapter], dict[str, dict[str, CPResult]], dict[str, float]]:
    """Run every configured CP rank, rule and baseline at scale 1.

    Returns:
        ``(merges by method name, CP results by rank label, seconds per method)``.
    """
    merges: dict[str, MergedAdapter] = {}
    cps: dict[str, dict[str, CPResult]] = {}
    seconds: dict[str, float] = {}
    for rank in cfg.cp_ranks:
        start = time.perf_counter()
        cp = cp_decompose(
            stack,
            rank,
            engine=cfg.engine,
            n_iter_max=cfg.cp_iters,
            tol=cfg.cp_tol,
            seed=cfg.seed,
        )
        decompose_s = time.perf_counter() - start
        cps[f"cp{rank}"] = cp
        for rule in cfg.rules:
            start = time.perf_counter()
            name = f"cp{rank}_{rule}"
            merges[name] = merge_cp(stack, cp, rule, scale=1.0)
            seconds[name] = decompose_s + time.perf_counter() - start
    for method in cfg.baselines:
        start = time.perf_counter()
        merges[method] = merge_baseline(
            stack,
            method,
            scale=1.0,
            merge_space=cfg.merge_space,
            density=cfg.density,
            seed=cfg.seed,
            cart_rank=cfg.cart_rank,
        )
        seconds[method] = time.perf_counter() - start
    return merges, cps, seconds


def run_study(
    model: Any,
    tokenizer: Any,
    stack: AdapterStack,
    *,
    cfg: StudyConfig,
    val_loaders: Sequence[Iterable[Mapping[str, Any]]] = (),
    eval_sets: Sequence[EvalSet] = (),
    router: Router | None = None,
    done: Sequence[MethodResult] = (),
    on_row: Callable[[MethodResult], None] | None = None,
) -> StudyResult:
    """Merge the adapters of ``stack`` every configured way, pick scales, evaluate everything.

    Args:
        model: The ``PeftModel`` holding the adapters named in ``stack``. A temporary adapter
            ``tclora_merged`` is installed on it for each merge and removed at the end; the active
            adapter is restored.
        tokenizer: Its tokenizer.
        stack: The adapters to merge.
        cfg: What to merge and evaluate.
        val_loaders: Validation batches (one iterable per cluster) on which each method's scale is
            chosen; required when ``cfg.scales`` has more than one value.
        eval_sets: Held-out evaluation sets, never used for choosing anything.
        router: Routes each evaluation example to one of the adapters (see :func:`route`);
            ``None`` skips the routing reference.
        done: Rows already finished by an interrupted study: kept as they are, not redone.
        on_row: Called with each finished row (used to save progress).

    Returns:
        The :class:`StudyResult`.
    """
    if not has_validation_data(val_loaders):
        cfg.check_validation(False, "pass validation loaders")
        val_loaders = []  # empty loaders (val_fraction=0): no validation, not NaN losses
    empty = [k for k, loader in enumerate(val_loaders) if _size(loader) == 0]
    if empty:
        warnings.warn(
            f"merge study: validation loaders {empty} (of {len(val_loaders)}; one per cluster) "
            f"are empty: {cfg.selection_metric} is taken over the other "
            f"{len(val_loaders) - len(empty)}, so the scales are chosen without those clusters",
            UserWarning,
            stacklevel=2,
        )
    if "arrow" in cfg.references and (cfg.arrow_top_k or 0) > len(stack.names):
        raise ValueError(
            f"arrow_top_k={cfg.arrow_top_k}: Arrow mixes at most the {len(stack.names)} adapters "
            f"{stack.names} per token"
        )
    mixed = (
        [m for m in stack.module_names if len(set(stack.ranks(m))) > 1]
        if "arrow" in cfg.references
        else []
    )
    if mixed:
        # peft's Arrow stacks the adapters' factors; found here, not after hours of other rows
        raise ValueError(
            f"references include 'arrow', which needs adapters of one LoRA rank (peft's Arrow "
            f"stacks their factors), but module {mixed[0]!r} has ranks "
            f"{dict(zip(stack.names, stack.ranks(mixed[0]), strict=True))} ({len(mixed)} such "
            "modules); leave 'arrow' out of references or merge adapters of one rank"
        )
    if "single" in cfg.references:
        check_single_sets(cfg.single_sets, stack.names, [es.name for es in eval_sets])
    previous_adapter = model.active_adapter
    finished = {row.name: row for row in done}
    _say(f"merge study: building {len(cfg.method_names)} merges of {len(stack.names)} adapters")
    clock = time.perf_counter()
    merges, cps, seconds = build_merges(stack, cfg)
    _say(
        f"merge study: merges built in {time.perf_counter() - clock:.1f} s ("
        + ", ".join(f"{m} {s:.1f} s" for m, s in seconds.items())
        + ")"
    )
    rows: list[MethodResult] = []
    names = [es.name for es in eval_sets]
    clock = time.perf_counter()

    def step(name: str) -> str:
        todo = [n for n in plan() if n not in finished]
        return f"merge study: [{todo.index(name) + 1}/{len(todo)}] {name}"

    def finish(row: MethodResult) -> None:
        nonlocal clock
        rows.append(row)
        scored = [n for n in names if n in row.scores]
        scores = ", ".join(f"{n} {row.primary(n):.3f}" for n in scored)
        selection = "" if row.selection is None else f"; val loss {row.selection:.4f}"
        scale = "" if row.scale is None else f" at scale {row.scale:g}"
        _say(
            f"{step(row.name)}{scale} done in {time.perf_counter() - clock:.1f} s"
            + (f": {scores} (average {row.average(scored):.3f})" if scored else "")
            + selection
        )
        clock = time.perf_counter()
        if on_row is not None:
            on_row(row)

    def score(
        scored: Any,
        routes: Mapping[str, Sequence[str]] | None = None,
        only: Sequence[str] | None = None,
    ) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
        """Every set's (or the sets named in ``only``) scores and per-item headline correctness
        (see :func:`evaluate_sets`)."""
        items: dict[str, str] = {}
        sets = eval_sets if only is None else [es for es in eval_sets if es.name in only]
        return evaluate_sets(scored, tokenizer, sets, cfg, routes, items=items), items

    def plan() -> list[str]:
        planned = ["base"] if "base" in cfg.references else []
        if "single" in cfg.references:
            planned += [f"single:{a}" for a in stack.names]
        if "routing" in cfg.references and router is not None:
            planned.append("routing")
        if "arrow" in cfg.references:
            planned.append("arrow")
        return planned + list(merges)

    try:
        if "base" in cfg.references and "base" not in finished:
            with model.disable_adapter():
                scores, items = score(model)
                selection = _validation_metric(model, val_loaders, cfg) if val_loaders else None
            finish(
                MethodResult("base", "reference", selection=selection, scores=scores, items=items)
            )
        if "single" in cfg.references:
            for adapter in stack.names:
                if f"single:{adapter}" in finished:
                    continue
                model.set_adapter(adapter)
                scores, items = score(model, only=(cfg.single_sets or {}).get(adapter))
                finish(
                    MethodResult(
                        f"single:{adapter}",
                        "reference",
                        selection=_validation_metric(model, val_loaders, cfg)
                        if val_loaders
                        else None,
                        scores=scores,
                        items=items,
                    )
                )
        if "routing" in cfg.references and router is not None and "routing" not in finished:
            routes = route(router, eval_sets)
            clusters = list(router.cluster_names)
            scores, items = score(model, routes)
            finish(
                MethodResult(
                    "routing",
                    "reference",
                    # loader k holds cluster k's validation batches: each through its own adapter
                    selection=_validation_metric(model, val_loaders, cfg, clusters)
                    if val_loaders and len(val_loaders) == len(clusters)
                    else None,
                    scores=scores,
                    items=items,
                )
            )
        if "arrow" in cfg.references and "arrow" not in finished:
            arrow = build_arrow_model(
                model,
                stack.names,
                top_k=cfg.arrow_top_k or arrow_top_k(len(stack.names)),
                router_temperature=cfg.arrow_temperature,
                rng_seed=cfg.seed,
            )
            scores, items = score(arrow)
            finish(
                MethodResult(
                    "arrow",
                    "reference",
                    selection=_validation_metric(arrow, val_loaders, cfg) if val_loaders else None,
                    scores=scores,
                    items=items,
                )
            )
            del arrow
        for name, merged in merges.items():
            if name in finished:
                continue
            curve: dict[float, float] = {}

            def measure(
                scale: float,
                name: str = name,
                merged: MergedAdapter = merged,
                curve: dict[float, float] = curve,
            ) -> None:
                install_adapter(model, MERGED_ADAPTER, merged.scaled(scale))
                model.set_adapter(MERGED_ADAPTER)
                curve[scale] = (
                    _validation_metric(model, val_loaders, cfg) if val_loaders else math.nan
                )
                if val_loaders:
                    _say(
                        f"{step(name)} at scale {scale:g}: val loss {curve[scale]:.4f} "
                        f"({time.perf_counter() - clock:.1f} s)"
                    )

            for scale in cfg.scales:
                measure(scale)
            chosen = select_scale(curve) if val_loaders else cfg.scales[0]
            for _ in range(cfg.scale_extensions if val_loaders else 0):
                beyond = _beyond_edge(sorted(curve), chosen, sorted(cfg.scales))
                if beyond is None:
                    break
                measure(beyond)
                chosen = select_scale(curve)
            tried = sorted(curve)
            final = merged.scaled(chosen)
            install_adapter(model, MERGED_ADAPTER, final)
            model.set_adapter(MERGED_ADAPTER)
            report = merge_report(stack, final)
            scores, items = score(model)
            finish(
                MethodResult(
                    name,
                    "merge",
                    scale=chosen,
                    selection=curve.get(chosen),
                    scale_curve={str(s): v for s, v in curve.items()},
                    scores=scores,
                    items=items,
                    merge_seconds=seconds[name],
                    norm=report.get("norm"),
                    norm_ratio=report.get("norm_ratio_to_mean"),
                    scale_at_edge=len(tried) > 1 and chosen in (tried[0], tried[-1]),
                    cosine_to_sum=report.get("cosine_to_sum"),
                    space=_space_of(name, cfg),
                    rank=final.rank,
                    truncation_error=final.info.get("truncation_error_max"),
                )
            )
    finally:
        model.set_adapter(previous_adapter)
        if MERGED_ADAPTER in getattr(model, "peft_config", {}):
            model.delete_adapter(MERGED_ADAPTER)

    order = {name: i for i, name in enumerate(plan())}
    rows = sorted([*rows, *finished.values()], key=lambda r: order.get(r.name, len(order)))
    if val_loaders:
        _warn_grid_edges(rows, cfg.scales)
    kept = _choose_kept(rows, cfg.keep)
    fit_errors = {
        label: _summarise([r.fit_error for r in cp.values()]) for label, cp in cps.items()
    }
    loadings = {
        label: {**component_analysis(cp), "adapters": list(stack.names)}
        for label, cp in cps.items()
    }
    return StudyResult(rows, names, fit_errors, loadings, kept, merges)


def _space_of(method: str, cfg: StudyConfig) -> str:
    """Where a merge was computed: ``cp`` for CP rules, ``knots`` for KnOTS-TIES, else the
    study's ``merge_space`` (TSV and Iso-C give the same merge in every space)."""
    if method.startswith("cp"):
        return "cp"
    return "knots" if method == "knots_ties" else cfg.merge_space


def _say(message: str) -> None:
    """One progress line (``logging``, logger ``tclora.study.run``), on rank zero only."""
    if rank_and_world()[0] == 0:
        _log.info(message)


def _beyond_edge(tried: Sequence[float], chosen: float, grid: Sequence[float]) -> float | None:
    """The next scale past the edge ``chosen`` sits on (one step of the grid's outer ratio), or
    ``None`` when ``chosen`` is interior or the grid has a single scale (no ratio to step by)."""
    if len(grid) < 2:
        return None
    if chosen == tried[-1]:
        return tried[-1] * (grid[-1] / grid[-2])
    if chosen == tried[0]:
        return tried[0] / (grid[1] / grid[0])
    return None


def _warn_grid_edges(rows: Sequence[MethodResult], scales: Sequence[float]) -> None:
    """Warn when merges chose the smallest or the largest scale they tried (a better scale may
    lie beyond it)."""
    if len(scales) < 2 or rank_and_world()[0] != 0:
        return
    at_edge = [r for r in rows if r.kind == "merge" and r.scale_at_edge]
    for where, hint, pick in (("largest", "larger", max), ("smallest", "smaller", min)):
        names = [
            f"{r.name} ({r.scale:g})"
            for r in at_edge
            if r.scale == pick(float(s) for s in r.scale_curve)
        ]
        if names:
            merges = sum(r.kind == "merge" for r in rows)
            warnings.warn(
                f"merge study: {len(names)} of {merges} merges chose the {where} scale they "
                f"tried, grid {list(scales)} ({', '.join(names)}): a {hint} scale may be "
                "better; extend the scales or raise scale_extensions",
                UserWarning,
                stacklevel=3,
            )


def _choose_kept(rows: Sequence[MethodResult], keep: str) -> str | None:
    merged = [r for r in rows if r.kind == "merge"]
    if keep != "best":
        if not any(r.name == keep for r in merged):
            raise ValueError(
                f"keep={keep!r} is not a merge of this study: {[r.name for r in merged]}"
            )
        return keep
    scored = [r for r in merged if r.selection is not None and math.isfinite(r.selection)]
    if not scored:
        return merged[0].name if merged else None
    return min(scored, key=lambda r: r.selection if r.selection is not None else math.inf).name


def _summarise(values: Sequence[float]) -> dict[str, float]:
    tensor = torch.tensor(list(values), dtype=torch.float64)
    return {
        "mean": float(tensor.mean()),
        "max": float(tensor.max()),
        "min": float(tensor.min()),
    }
