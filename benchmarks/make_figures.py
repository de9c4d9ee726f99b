"""Results figure of the issue-7 reproduction: benchmarks/results/repro_small.{json -> png}.

Two panels -- in-domain test accuracy (training tasks' held-out splits) and unseen-task accuracy --
with one bar per merge method and clustering (mean over seeds, error bar = std over seeds), the
references (best single adapters, one LoRA, routing) as bars of their own, and the base model,
majority-answer and chance floors as horizontal lines.

Usage::

    .venv/bin/python benchmarks/make_figures.py [--results benchmarks/results/repro_small.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from benchmarks.repro.aggregate import tasks_in  # noqa: E402

COLORS = {
    "per_task": "#4c72b0",
    "kmeans4": "#dd8452",
    "kmeans8": "#c44e52",
    "single": "#55a868",
    "base": "#8c8c8c",
}


def _value(row: Mapping[str, Any], key: str) -> float:
    value = row.get(key)
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else math.nan


def _scored(row: Mapping[str, Any], method: str, key: str) -> bool:
    return row["method"] == method and math.isfinite(_value(row, key))


def _mean_over(floor: Any, tasks: Sequence[str]) -> float:
    if not isinstance(floor, Mapping):
        return math.nan
    values = [floor[t] for t in tasks if t in floor]
    return sum(values) / len(values) if values else math.nan


def error_bars(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[str, str]:
    """What a panel's error bars show: the std over seeds when any row has one (two or more
    seeds), else one standard error from test-item sampling (a single seed has no spread).

    Args:
        rows: the summary's rows drawn in the panel.
        key: the panel's accuracy key (``"in_domain"`` or ``"out_of_domain"``).

    Returns:
        The suffix of the rows' spread key (``"std"`` or ``"se"``) and its axis label.
    """
    if any(math.isfinite(_value(r, f"{key}_std")) for r in rows):
        return "std", "std over seeds"
    return "se", "±1 SE over test items (one seed)"


def figure(summary: Mapping[str, Any]) -> Any:
    """Build the two-panel bar chart from the aggregated results (``repro_small.json``)."""
    rows = [r for r in summary["rows"] if r["method"] != "base"]
    methods: list[str] = []
    for r in rows:
        if r["method"] not in methods:
            methods.append(r["method"])
    variants = [v for v in COLORS if any(r["variant"] == v for r in rows)]
    tasks = summary["tasks"]
    in_domain, unseen = tasks_in(tasks, "in_domain"), tasks_in(tasks, "out_of_domain")
    floors = summary["floors"]
    panels = [
        ("in_domain", "In-domain test accuracy (training tasks, held-out items)", in_domain),
        ("out_of_domain", "Unseen-task accuracy (never trained or clustered on)", unseen),
    ]
    fig, axes = plt.subplots(2, 1, figsize=(max(10.0, 0.75 * len(methods) + 3), 8.5))
    width = 0.8 / max(len(variants), 1)
    for ax, (key, title, group) in zip(axes, panels, strict=True):
        top = 0.0
        spread, spread_label = error_bars(rows, key)
        # A method with no score in this panel (the per-task adapters have none on unseen
        # tasks) gets no tick: an empty slot would only crowd the axis.
        shown = [m for m in methods if any(_scored(r, m, key) for r in rows)]
        for j, variant in enumerate(variants):
            xs, ys, errs = [], [], []
            for i, method in enumerate(shown):
                row = next(
                    (r for r in rows if r["variant"] == variant and r["method"] == method), None
                )
                if row is None:
                    continue
                xs.append(i + (j - (len(variants) - 1) / 2) * width)
                ys.append(100 * _value(row, key))
                err = _value(row, f"{key}_{spread}")
                errs.append(100 * err if math.isfinite(err) else 0.0)
            ax.bar(xs, ys, width, yerr=errs, capsize=2, color=COLORS[variant], label=variant)
            top = max([top, *(y + e for y, e in zip(ys, errs, strict=True) if math.isfinite(y))])
        base = _mean_over(floors.get("base"), group)
        if math.isfinite(base):
            ax.axhline(100 * base, color="black", linestyle="--", linewidth=1, label="base model")
        if key == "in_domain":
            floor, label = floors.get("majority_in_domain"), "majority answer"
        else:
            floor, label = floors.get("chance_out_of_domain"), "chance"
        if isinstance(floor, int | float) and math.isfinite(floor):
            ax.axhline(100 * floor, color="grey", linestyle=":", linewidth=1.2, label=label)
        ax.set_title(f"{title}, mean of {len(group)} tasks")
        ax.set_ylabel(f"accuracy (%); error bars: {spread_label}", fontsize=8)
        ax.set_xticks(range(len(shown)), shown, rotation=30, ha="right")
        ax.grid(axis="y", alpha=0.3)
        ax.set_ylim(0, max(top, 1.0) * 1.3)  # head room for the legend above the bars
        ax.legend(fontsize=8, ncol=4, loc="upper right")
    fig.suptitle("SmolLM2-135M: merges of clustered / per-task LoRA adapters (mean over seeds)")
    fig.tight_layout()
    return fig


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--results", type=Path, default=ROOT / "benchmarks" / "results" / "repro_small.json"
    )
    parser.add_argument("--out", type=Path, help="PNG path (default: next to --results)")
    args = parser.parse_args(argv)
    if not args.results.is_file():
        parser.error(f"--results {args.results}: no such file; run benchmarks/repro_small.py first")
    summary = json.loads(args.results.read_text())
    out = args.out or args.results.with_suffix(".png")
    fig = figure(summary)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
