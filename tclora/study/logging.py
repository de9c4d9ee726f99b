"""Send a merge study's results to Lightning loggers (TensorBoard gets the table and figure too)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from lightning.pytorch.loggers import Logger, TensorBoardLogger

from tclora.study.config import StudyConfig
from tclora.study.results import StudyResult, loadings_figure, results_table, to_markdown

__all__ = ["log_study", "study_metrics"]


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


def log_study(
    loggers: Sequence[Logger], step: int, result: StudyResult, config: StudyConfig
) -> None:
    """Log the study's scalars and hyperparameters to every logger; TensorBoard also gets the
    Markdown table (text) and the CP loadings heatmap (image).

    Args:
        loggers: Lightning loggers (``trainer.loggers``, or one made by ``tclora merge``).
        step: Step the scalars are logged at.
        result: The study's result.
        config: The study's options (logged as hyperparameters).
    """
    metrics = study_metrics(result)
    markdown = to_markdown(results_table(result))
    kept_avg = result.row(result.kept).average(result.eval_sets) if result.kept else math.nan
    hparams = {
        "merge/cp_ranks": str(config.cp_ranks),
        "merge/engine": config.engine,
        "merge/kept": str(result.kept),
        "merge/scales": str(config.scales),
        "merge/selection_metric": config.selection_metric,
    }
    for logger in loggers:
        logger.log_metrics(metrics, step=step)
        if isinstance(logger, TensorBoardLogger):
            writer: Any = logger.experiment
            writer.add_text("merge/results", markdown, global_step=step)
            if result.loadings:
                writer.add_figure("merge/cp_loadings", loadings_figure(result.loadings), step)
        if math.isfinite(kept_avg):
            logger.log_hyperparams(hparams, metrics={"merge/kept_average": kept_avg})
        else:
            logger.log_hyperparams(hparams)
        logger.save()
