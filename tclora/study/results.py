"""The results of a merge study: rows, the table in Markdown/CSV/JSON, the CP loadings figure.

Method names: ``cp{R}_{rule}`` for a CP merge at rank ``R`` (``cp4_sum_components``), the baseline
name for a dense merge (``uniform``, ``ties``, ...), and for the references ``base`` (adapters
disabled), ``single:<adapter>`` and ``routing`` (each example scored with the adapter of its
nearest cluster centroid).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from tclora.merge import MergedAdapter

__all__ = [
    "MethodResult",
    "StudyResult",
    "loadings_figure",
    "results_table",
    "row_from_dict",
    "row_to_dict",
    "study_summary",
    "to_csv",
    "to_markdown",
]


@dataclass
class MethodResult:
    """One row of the results table."""

    name: str
    kind: Literal["merge", "reference"]
    scale: float | None = None
    selection: float | None = None
    scale_curve: dict[str, float] = field(default_factory=dict)
    scores: dict[str, dict[str, float]] = field(default_factory=dict)
    merge_seconds: float | None = None
    norm: float | None = None
    cosine_to_sum: float | None = None
    space: str | None = None
    rank: int | None = None
    truncation_error: float | None = None

    def primary(self, eval_set: str) -> float:
        """The headline number of ``eval_set``: accuracy for multiple choice, else exact match."""
        scores = self.scores.get(eval_set, {})
        for key in ("acc", "exact_match"):
            if key in scores:
                return scores[key]
        return math.nan

    def average(self, eval_sets: Sequence[str]) -> float:
        """Mean of :meth:`primary` over ``eval_sets`` (``nan`` for none)."""
        values = [self.primary(name) for name in eval_sets]
        return sum(values) / len(values) if values else math.nan


@dataclass
class StudyResult:
    """Everything a study produced: rows, CP diagnostics and the kept merge."""

    rows: list[MethodResult]
    eval_sets: list[str]
    cp_fit_error: dict[str, dict[str, float]]
    loadings: dict[str, Any]
    kept: str | None
    merges: dict[str, MergedAdapter] = field(repr=False, default_factory=dict)

    def row(self, name: str) -> MethodResult:
        """The row of method ``name``."""
        return next(r for r in self.rows if r.name == name)

    def merged(self, name: str) -> MergedAdapter:
        """Method ``name``'s merge at the scale chosen for it."""
        return self.merges[name].scaled(self.row(name).scale or 1.0)


def study_summary(
    result: StudyResult, *, adapters: Sequence[str], fingerprint: str | None
) -> dict[str, Any]:
    """The JSON-ready ``results.json`` of a study: rows, kept merge, eval sets, CP fit errors.

    Args:
        result: The study's result.
        adapters: The merged adapters' names.
        fingerprint: The study's fingerprint (:mod:`tclora.study.progress`), or ``None``.

    Returns:
        ``{"fingerprint", "kept", "eval_sets", "rows", "cp_fit_error", "adapters"}``.
    """
    return {
        "fingerprint": fingerprint,
        "kept": result.kept,
        "eval_sets": list(result.eval_sets),
        "rows": [row_to_dict(r) for r in result.rows],
        "cp_fit_error": result.cp_fit_error,
        "adapters": list(adapters),
    }


def row_to_dict(row: MethodResult) -> dict[str, Any]:
    """A row as plain JSON-ready data (the inverse of :func:`row_from_dict`)."""
    return asdict(row)


def row_from_dict(data: Mapping[str, Any]) -> MethodResult:
    """A row from :func:`row_to_dict`'s data."""
    return MethodResult(**dict(data))


def results_table(result: StudyResult) -> list[dict[str, Any]]:
    """Rows of the methods x eval sets table (primary metric per set, their average, scale...)."""
    table = []
    for row in result.rows:
        entry: dict[str, Any] = {"method": row.name, "kind": row.kind, "space": row.space}
        for name in result.eval_sets:
            entry[name] = row.primary(name)
        entry["average"] = row.average(result.eval_sets)
        entry["scale"] = row.scale
        entry["selection"] = row.selection
        entry["norm"] = row.norm
        entry["cosine_to_sum"] = row.cosine_to_sum
        entry["rank"] = row.rank
        entry["truncation_error"] = row.truncation_error
        entry["merge_seconds"] = row.merge_seconds
        table.append(entry)
    return table


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def to_markdown(table: Sequence[Mapping[str, Any]]) -> str:
    """Render :func:`results_table` rows as a Markdown table."""
    if not table:
        return ""
    columns = list(table[0])
    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    lines += ["| " + " | ".join(_fmt(row[c]) for c in columns) + " |" for row in table]
    return "\n".join(lines) + "\n"


def to_csv(table: Sequence[Mapping[str, Any]]) -> str:
    """Render :func:`results_table` rows as CSV text."""
    if not table:
        return ""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(table[0]))
    writer.writeheader()
    writer.writerows({k: _fmt(v) for k, v in row.items()} for row in table)
    return buffer.getvalue()


def loadings_figure(loadings: Mapping[str, Any]) -> Any:
    """A heatmap of the CP task loadings (adapters x components), one panel per CP rank."""
    from matplotlib.figure import Figure  # no pyplot: the caller's backend stays untouched

    panels = [(label, np.asarray(data["heatmap"])) for label, data in loadings.items()]
    fig = Figure(figsize=(4.5 * len(panels), 3.6))
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (label, heat) in zip(axes[0], panels, strict=True):
        if float(heat.min()) >= 0:  # shares of each component (c_tq^2): sequential scale
            image = ax.imshow(heat, cmap="viridis", vmin=0.0, aspect="auto")
            ax.set_title(f"{label}: share of each component per adapter")
        else:
            limit = float(np.abs(heat).max()) or 1.0
            image = ax.imshow(heat, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
            ax.set_title(f"{label}: task loadings")
        ax.set_xlabel("CP component (by decreasing weight)")
        ax.set_ylabel("adapter")
        names = loadings[label].get("adapters")
        if names:
            ax.set_yticks(range(len(names)), names)
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return fig
