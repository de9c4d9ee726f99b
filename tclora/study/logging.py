"""Send a merge study's results to Lightning loggers (TensorBoard gets tables and figures too).

What a TensorBoard run holds after a study (:func:`log_study`):

* scalars ``merge/<method>/<eval set>/<metric>``, ``merge/<method>/average`` and the method's
  ``scale``, ``selection``, ``merge_seconds``, ``norm``, ``cosine_to_sum``; the CP fit errors;
* a custom-scalars layout (the CUSTOM SCALARS tab): every method's average, and each evaluation
  set, in one chart each; the per-cluster training and validation curves side by side;
* text ``merge/results``: the methods × evaluation sets table, fixed width (nothing wraps), the
  kept merge marked, scales at an edge of the grid marked;
* images ``merge/methods_x_eval_sets`` (bars per method and set, the average marked) and
  ``merge/cp_loadings`` (the CP task loadings);
* one HPARAMS record: the run's hyperparameters with the merge's options, and as metrics
  ``merge/kept_average``, ``merge/kept_selection`` and every method's average.

Importing this module also gives tclora's own Python logger (``tclora``, whose ``tclora.study``
progress lines say what the study is doing) a console handler at INFO, the way Lightning does
for its own logger: only when the application has configured no logging.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

from lightning.pytorch.loggers import Logger, TensorBoardLogger

from tclora.study.config import StudyConfig
from tclora.study.results import (
    StudyResult,
    loadings_figure,
    methods_figure,
    summary_table,
    to_text,
)

__all__ = ["hparam_metrics", "log_study", "scalars_layout", "study_metrics"]

_tclora_logger = logging.getLogger("tclora")
_tclora_logger.setLevel(logging.INFO)
if not logging.getLogger().hasHandlers():
    _tclora_logger.addHandler(logging.StreamHandler())
    _tclora_logger.propagate = False


def study_metrics(result: StudyResult) -> dict[str, float]:
    """Every finite number of the study as a ``merge/...`` scalar.

    ``merge/<method>/<eval set>/<metric>``, ``merge/<method>/average`` and the method's
    ``scale``, ``selection``, ``merge_seconds``, ``norm``, ``cosine_to_sum``; the CP fit errors
    as ``merge/cp<R>/fit_error_<mean|max|min>``.
    """
    metrics: dict[str, float] = {}
    for row in result.rows:
        for name in result.eval_sets:
            for key, value in row.scores.get(name, {}).items():
                if key != "n":
                    metrics[f"merge/{row.name}/{name}/{key}"] = value
        metrics[f"merge/{row.name}/average"] = row.average(result.eval_sets)
        for key in ("scale", "selection", "merge_seconds", "norm", "cosine_to_sum"):
            value = getattr(row, key)
            if value is not None:
                metrics[f"merge/{row.name}/{key}"] = float(value)
    for label, summary in result.cp_fit_error.items():
        for key, value in summary.items():
            metrics[f"merge/{label}/fit_error_{key}"] = value
    return {k: v for k, v in metrics.items() if math.isfinite(v)}


def hparam_metrics(result: StudyResult) -> dict[str, float]:
    """The study's metrics for the HPARAMS record: the kept merge's average and selection
    metric, and every method's average (finite values only)."""
    metrics: dict[str, float] = {}
    if result.kept is not None:
        kept = result.row(result.kept)
        metrics["merge/kept_average"] = kept.average(result.eval_sets)
        if kept.selection is not None:
            metrics["merge/kept_selection"] = kept.selection
    for row in result.rows:
        metrics[f"merge/{row.name}/average"] = row.average(result.eval_sets)
    return {k: float(v) for k, v in metrics.items() if math.isfinite(v)}


def scalars_layout(result: StudyResult) -> dict[str, dict[str, list[Any]]]:
    """The custom-scalars layout: the merge's methods compared in one chart per metric, and the
    per-cluster curves of training (``train/loss_cluster_k``, ``lr/cluster_k``,
    ``val/loss_cluster_k``) in one chart each."""
    merge: dict[str, list[Any]] = {
        "average of every method": ["Multiline", [r"^merge/[^/]+/average$"]],
        "validation loss (selection) of every method": ["Multiline", [r"^merge/[^/]+/selection$"]],
    }
    for name in result.eval_sets:
        merge[f"{name}: every method"] = ["Multiline", [rf"^merge/[^/]+/{name}/[^/]+$"]]
    clusters = {
        "training loss per cluster": ["Multiline", [r"^train/loss_cluster_\d+$"]],
        "learning rate per cluster": ["Multiline", [r"^lr/cluster_\d+$"]],
        "validation loss per cluster": ["Multiline", [r"^val/loss_cluster_\d+$"]],
    }
    return {"merge": merge, "clusters": clusters}


def log_study(
    loggers: Sequence[Logger], step: int, result: StudyResult, config: StudyConfig
) -> None:
    """Log the study to every logger (see the module's docstring for what TensorBoard gets).

    Args:
        loggers: Lightning loggers (``trainer.loggers``, or one made by ``tclora merge``).
        step: Step the scalars are logged at.
        result: The study's result.
        config: The study's options (logged as hyperparameters).
    """
    metrics = study_metrics(result)
    hp_metrics = hparam_metrics(result)
    hparams = {
        "merge/cp_ranks": str(config.cp_ranks),
        "merge/engine": config.engine,
        "merge/kept": str(result.kept),
        "merge/scales": str(config.scales),
        "merge/selection_metric": config.selection_metric,
    }
    table = summary_table(result.rows, result.eval_sets, result.kept)
    text = (
        f"Methods × evaluation sets (primary metric of each set; kept merge: {result.kept}, "
        f"chosen by {config.selection_metric}). Scales at an edge of the grid are marked.\n\n"
        "```\n" + to_text(table) + "```\n"
    )
    for logger in loggers:
        if not isinstance(logger, TensorBoardLogger):
            logger.log_metrics({**metrics, **hp_metrics}, step=step)
            logger.log_hyperparams(hparams)
            logger.save()
            continue
        # the HPARAMS metrics are logged by log_hyperparams (at the same step, not twice)
        logger.log_metrics({k: v for k, v in metrics.items() if k not in hp_metrics}, step=step)
        writer: Any = logger.experiment
        writer.add_text("merge/results", text, global_step=step)
        writer.add_custom_scalars(scalars_layout(result))
        if result.eval_sets:
            figure = methods_figure(result.rows, result.eval_sets, result.kept)
            writer.add_figure("merge/methods_x_eval_sets", figure, step)
        if result.loadings:
            writer.add_figure("merge/cp_loadings", loadings_figure(result.loadings), step)
        # One record with the run's hyperparameters and the merge's: TensorBoard shows only
        # one per run (CPMergeCallback turns off Lightning's placeholder at fit start).
        logger.log_hyperparams(
            {**_plain(logger.hparams), **hparams}, metrics=hp_metrics or None, step=step
        )
        logger.save()


def _plain(hparams: Any) -> dict[str, Any]:
    """A logger's stored hyperparameters (an ``AttributeDict``) as a plain dict."""
    return dict(hparams) if isinstance(hparams, Mapping) else {}
