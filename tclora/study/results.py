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
    "display_name",
    "loadings_figure",
    "methods_figure",
    "results_table",
    "row_from_dict",
    "row_to_dict",
    "study_summary",
    "summary_table",
    "to_csv",
    "to_markdown",
    "to_text",
]

_BASELINE_NAMES = {
    "uniform": "uniform",
    "ties": "TIES",
    "dare_linear": "DARE linear",
    "dare_ties": "DARE-TIES",
    "magnitude_prune": "magnitude pruning",
    "cart": "CART",
    "knots_ties": "KnOTS-TIES",
    "tsv": "TSV",
    "iso_c": "Iso-C",
}


@dataclass
class MethodResult:
    """One row of the results table.

    ``scores`` holds each set's metrics; ``items`` each tclora-scored set's headline metric per
    example (``"0110..."`` in set order), so two rows can be compared item by item (paired
    bootstrap); the other fields describe the merge and its chosen scale: ``norm_ratio`` is the
    merge's norm relative to the mean merge's (one unit for every method's scale: uniform at
    scale 1 is 1.0), ``scale_at_edge`` says the chosen scale is the smallest or largest tried.
    """

    name: str
    kind: Literal["merge", "reference"]
    scale: float | None = None
    selection: float | None = None
    scale_curve: dict[str, float] = field(default_factory=dict)
    scores: dict[str, dict[str, float]] = field(default_factory=dict)
    items: dict[str, str] = field(default_factory=dict)
    merge_seconds: float | None = None
    norm: float | None = None
    norm_ratio: float | None = None
    scale_at_edge: bool | None = None
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
        ``{"fingerprint", "kept", "eval_sets", "rows", "cp_fit_error", "components",
        "adapters"}``; ``components`` has, per CP rank, how the components' loadings spread over
        the adapters (``shared_fraction``, ``mean_evenness``, ``adapter_energy``; see
        :func:`tclora.merge.component_analysis`).
    """
    components = {
        label: {
            "shared_fraction": float(analysis["shared_fraction"]),
            "mean_evenness": float(analysis["mean_evenness"]),
            "adapter_energy": [float(x) for x in analysis["adapter_energy"]],
        }
        for label, analysis in result.loadings.items()
        if "shared_fraction" in analysis
    }
    return {
        "fingerprint": fingerprint,
        "kept": result.kept,
        "eval_sets": list(result.eval_sets),
        "rows": [row_to_dict(r) for r in result.rows],
        "cp_fit_error": result.cp_fit_error,
        "components": components,
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
        entry["norm_ratio"] = row.norm_ratio
        entry["scale_at_edge"] = row.scale_at_edge
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
        ax.set_xticks(range(heat.shape[1]), [str(q + 1) for q in range(heat.shape[1])])
        ax.set_xlabel("CP component (by decreasing weight)")
        ax.set_ylabel("adapter")
        names = loadings[label].get("adapters")
        if names:
            ax.set_yticks(range(len(names)), names)
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return fig


def display_name(method: str) -> str:
    """A method's name for people: ``cp4_sum_components`` → ``CP rank 4, sum_components``,
    ``ties`` → ``TIES``, ``single:cluster_3`` → ``single adapter cluster_3``, ``base`` → ``base
    model``, ``routing`` → ``centroid routing``."""
    if method == "base":
        return "base model"
    if method == "routing":
        return "centroid routing"
    if method.startswith("single:"):
        return f"single adapter {method.split(':', 1)[1]}"
    rank, _, rule = method.partition("_")
    if rank.startswith("cp") and rank[2:].isdigit() and rule:
        return f"CP rank {rank[2:]}, {rule}"
    return _BASELINE_NAMES.get(method, method)


def _scale_grid(rows: Sequence[MethodResult]) -> list[float]:
    return sorted({float(s) for row in rows for s in row.scale_curve})


def _num(value: float | None, digits: int) -> str:
    return "" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def summary_table(
    rows: Sequence[MethodResult],
    eval_sets: Sequence[str],
    kept: str | None,
    *,
    best_single_only: bool = False,
) -> list[dict[str, str]]:
    """The table to read: one row per method, formatted, for TensorBoard and the README.

    Columns: ``method`` (display name, the kept merge marked ``(kept)``), the primary metric of
    each evaluation set, ``average``, ``chosen scale`` (``(grid max)`` / ``(grid min)`` when it
    is an edge of the scale grid), ``val loss`` (the selection metric), ``‖ΔW‖``, ``cos to Σ ΔW``
    and ``merge s``. Empty cells are values a row does not have.

    Args:
        rows: The study's rows (:attr:`StudyResult.rows`, or ``results.json``'s through
            :func:`row_from_dict`).
        eval_sets: The evaluation sets, in order.
        kept: The kept merge, or ``None``.
        best_single_only: Keep only the single adapter with the best average, as ``best single
            adapter (<name>)``. When the single adapters were scored on different sets
            (``single_sets``), no average compares them: they become one row, ``single adapters
            (each on its own sets)``, whose cell of a set is the best adapter scored on it.

    Returns:
        Rows of strings, every row with the same keys.
    """
    grid = _scale_grid(rows)
    singles = [r for r in rows if r.name.startswith("single:")]
    best_single = max(singles, key=lambda r: _finite(r.average(eval_sets)), default=None)
    if best_single_only and any(es not in r.scores for r in singles for es in eval_sets):
        best_single = _own_sets_row(singles, eval_sets)
    table = []
    for row in rows:
        name = display_name(row.name)
        if row.name.startswith("single:") and best_single_only:
            if row is not singles[0] or best_single is None:
                continue
            row = best_single  # the best adapter's row, where the first single adapter's was
            name = (
                f"best single adapter ({row.name.split(':', 1)[1]})"
                if row.name.startswith("single:")
                else row.name
            )
        if row.name == kept:
            name += " (kept)"
        entry = {"method": name}
        for es in eval_sets:
            entry[es] = _num(row.primary(es), 3)
        entry["average"] = _num(row.average(eval_sets), 3)
        scale = "" if row.scale is None else f"{row.scale:g}"
        if scale and len(grid) > 1 and row.scale in (grid[0], grid[-1]):
            scale += " (grid max)" if row.scale == grid[-1] else " (grid min)"
        entry["chosen scale"] = scale
        entry["val loss"] = _num(row.selection, 3)
        entry["‖ΔW‖"] = _num(row.norm, 2)
        entry["cos to Σ ΔW"] = _num(row.cosine_to_sum, 2)
        entry["merge s"] = _num(row.merge_seconds, 1)
        table.append(entry)
    return table


def _own_sets_row(singles: Sequence[MethodResult], eval_sets: Sequence[str]) -> MethodResult:
    """Single adapters scored on different sets as one reference row: per set, the best of the
    adapters scored on it (its own adapter, for ``single_sets`` of one adapter per set)."""
    scores = {}
    for es in eval_sets:
        scored = [r for r in singles if es in r.scores]
        if scored:
            scores[es] = max(scored, key=lambda r: _finite(r.primary(es))).scores[es]
    return MethodResult("single adapters (each on its own sets)", "reference", scores=scores)


def _finite(value: float) -> float:
    return value if math.isfinite(value) else -math.inf


def to_text(table: Sequence[Mapping[str, Any]]) -> str:
    """Render :func:`summary_table` rows as a fixed-width text table (no wrapping anywhere)."""
    if not table:
        return ""
    columns = list(table[0])
    cells = [[_fmt(row[c]) for c in columns] for row in table]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines) + "\n"


def methods_figure(rows: Sequence[MethodResult], eval_sets: Sequence[str], kept: str | None) -> Any:
    """Methods × evaluation sets at a glance: a horizontal bar per set and method, the average
    as a black mark, references above the merges (names in italics), the kept merge in bold.

    Args:
        rows: The study's rows.
        eval_sets: The evaluation sets.
        kept: The kept merge, or ``None``.

    Returns:
        A matplotlib ``Figure`` (no pyplot: the caller's backend stays untouched).
    """
    from matplotlib.figure import Figure

    names = [display_name(r.name) + (" (kept)" if r.name == kept else "") for r in rows]
    n_sets = max(1, len(eval_sets))
    fig = Figure(figsize=(7.5, 0.9 + 0.42 * len(rows) * max(1.0, n_sets / 2)))
    ax = fig.subplots()
    height = 0.8 / n_sets
    y = np.arange(len(rows))
    for j, es in enumerate(eval_sets):
        values = [r.primary(es) for r in rows]
        offset = (j - (n_sets - 1) / 2) * height
        ax.barh(y + offset, values, height=height, label=es)
    averages = [r.average(eval_sets) for r in rows]
    if eval_sets:
        ax.scatter(averages, y, marker="D", color="black", s=18, zorder=3, label="average")
    ax.set_yticks(y, names)
    for label, row in zip(ax.get_yticklabels(), rows, strict=True):
        if row.kind == "reference":
            label.set_fontstyle("italic")
        if row.name == kept:
            label.set_fontweight("bold")
    references = sum(r.kind == "reference" for r in rows)
    if 0 < references < len(rows):
        ax.axhline(references - 0.5, color="grey", linewidth=0.8, linestyle="--")
    ax.invert_yaxis()
    ax.set_xlim(0.0, 1.0)
    ax.set_xlabel("held-out score (accuracy or exact match)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(
        loc="lower center",
        bbox_to_anchor=(0.5, 1.0),
        ncol=n_sets + 1,
        fontsize="small",
        frameon=False,
    )
    fig.tight_layout()
    return fig
