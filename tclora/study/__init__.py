"""The merge study: merge a library of LoRA adapters every configured way, pick each merge's scale
on validation data, evaluate merges and references, write, log and export the results.

Layers, each using only those above it: :mod:`~tclora.study.config` (options),
:mod:`~tclora.study.results` (rows, tables, figure), :mod:`~tclora.study.run` (the core loop),
:mod:`~tclora.study.progress` (fingerprint, resumable progress), :mod:`~tclora.study.paired`
(paired bootstrap intervals between two rows' per-item results), :mod:`~tclora.study.study`
(:class:`MergeStudy`: the whole job, files included), :mod:`~tclora.study.logging` (Lightning
loggers) and :mod:`~tclora.study.cli` (``tclora merge``). No trainer anywhere.
"""

from tclora.study.config import (
    Baseline,
    CPRule,
    MergeSpace,
    Reference,
    SelectionMetric,
    StudyConfig,
)
from tclora.study.logging import log_study, study_metrics
from tclora.study.paired import paired_bootstrap, parse_items
from tclora.study.results import (
    MethodResult,
    StudyResult,
    loadings_figure,
    results_table,
    row_from_dict,
    row_to_dict,
    study_summary,
    to_csv,
    to_markdown,
)
from tclora.study.run import (
    MERGED_ADAPTER,
    Router,
    evaluate_sets,
    lm_loss,
    route,
    run_study,
    select_scale,
)
from tclora.study.study import MergeStudy, lora_adapter_names

__all__ = [
    "MERGED_ADAPTER",
    "Baseline",
    "CPRule",
    "MergeSpace",
    "MergeStudy",
    "MethodResult",
    "Reference",
    "Router",
    "SelectionMetric",
    "StudyConfig",
    "StudyResult",
    "evaluate_sets",
    "loadings_figure",
    "lm_loss",
    "log_study",
    "lora_adapter_names",
    "paired_bootstrap",
    "parse_items",
    "results_table",
    "route",
    "row_from_dict",
    "row_to_dict",
    "run_study",
    "select_scale",
    "study_summary",
    "study_metrics",
    "to_csv",
    "to_markdown",
]
