"""The sweep's outputs: the summary as Markdown (main table, per-task table, floors, adapter
checks), and ``repro_small.{md,json,csv}`` in the results folder.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping
from typing import Any

from benchmarks.repro.sweep import Sweep
from tclora._io import atomic_write_text

__all__ = ["finite", "main_table", "markdown", "strict_json", "write_results"]


def finite(value: Any) -> bool:
    """A number to print or compare: not missing (``None``, which ``repro_small.json`` writes as
    ``null``), not NaN, not infinite."""
    return isinstance(value, int | float) and math.isfinite(value)


def _pct(value: Any, std: Any = None) -> str:
    if not finite(value):
        return "–"
    text = f"{100 * value:.1f}"
    if finite(std):
        text += f" ± {100 * std:.1f}"
    return text


def _num(value: Any, fmt: str) -> str:
    if not finite(value):
        return "–"
    return format(value, fmt)


def _span(low: Any, high: Any) -> str:
    """An interval in points, or "–" where it does not exist (over seeds, with one seed)."""
    if not (finite(low) and finite(high)):
        return "–"
    return f"[{100 * low:+.1f}, {100 * high:+.1f}]"


def _scale(row: Mapping[str, Any]) -> str:
    """The chosen scale, the merge's norm relative to the mean merge's, and how many seeds
    chose a scale at the edge of those tried (the optimum may lie beyond it)."""
    text = _num(row["scale"], ".3g")
    ratio = row.get("norm_ratio")
    if finite(row["scale"]) and finite(ratio):
        text += f" ({ratio:.2f}×)"
    if row.get("scale_at_edge"):
        text += f", edge in {row['scale_at_edge']} of {row['seeds']}"
    return text


def _one_answer(row: Mapping[str, Any]) -> str:
    count, total = row.get("one_answer_sets"), row.get("mc_sets")
    return "–" if count is None or total is None else f"{count:.2g} of {total}"


def main_table(summary: Mapping[str, Any]) -> list[str]:
    """The main table's lines (with the paragraph that explains its columns): per clustering
    and method, in-domain, normalised and unseen accuracy, scale, CP diagnostics, merge seconds
    and parameters."""
    lines = [
        "Accuracy in % (mean ± std over seeds). In-domain: each training task's held-out test "
        "split; normalised: accuracy / the task's own per-task adapter (same seed); "
        "unseen: tasks never trained or clustered on. ±SE: one standard error of the mean from "
        "test-item sampling alone. CP shared: the fraction of the CP components' energy (λ²) "
        "whose loadings spread evenly over the adapters (evenness ≥ 0.5; 0 = every component "
        "belongs to one adapter, a plain top-R truncation). One-answer sets: of the "
        "multiple-choice sets a method was scored on, those where its per-item results are "
        "exactly those of always giving one answer (mean over seeds). Scale: the scale chosen "
        "on validation loss (mean over seeds) and, in brackets, the merged update's norm "
        "relative to the mean merge's (one unit for every method); a scale at the edge of "
        "those tried (after extending the grid) is marked with the number of seeds.",
        "",
        "| clustering | method | seeds | in-domain | ±SE | normalised | unseen | ±SE | scale "
        "| one-answer sets | CP fit err | CP shared | merge s | params K adapters | params CP |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["rows"]:
        lines.append(
            f"| {r['variant']} | {r['method']} | {r['seeds']} "
            f"| {_pct(r['in_domain'], r['in_domain_std'])} | {_pct(r['in_domain_se'])} "
            f"| {_pct(r['normalised'], r['normalised_std'])} "
            f"| {_pct(r['out_of_domain'], r['out_of_domain_std'])} "
            f"| {_pct(r['out_of_domain_se'])} | {_scale(r)} "
            f"| {_one_answer(r)} | {_num(r['cp_fit_error'], '.3f')} | {_num(r.get('shared_fraction'), '.2f')} "
            f"| {_num(r['merge_seconds'], '.2f')} "
            f"| {_num(r['lora_params'], ',')} | {_num(r['cp_params'], ',')} |"
        )
    return lines


def resume_lines(checks: Mapping[str, Any]) -> list[str]:
    """One sentence on the runs whose fit was killed and resumed (``summary["resume_checks"]``:
    each record's :func:`benchmarks.repro.aggregate.resume_check`, by run), naming any whose
    resumed process did not repeat the killed one's steps."""
    resumed = {run: c for run, c in checks.items() if c and c["processes"] > 1}
    if not resumed:
        return []
    steps = sum(c["overlapping_steps"] for c in resumed.values())
    wrong = {run: c["mismatched_steps"] for run, c in resumed.items() if c["mismatched_steps"]}
    line = (
        f"Resumed fits: {len(resumed)} run(s) were killed and resumed from a checkpoint; "
        f"{steps} step(s) were trained by both processes"
    )
    if not wrong:
        return ["", line + ", with the same adapter and bit-identical loss at every one."]
    named = "; ".join(f"{run} at steps {s[:5]}" for run, s in wrong.items())
    return ["", line + f". **Not exact**: {named} (their adapters are not an uninterrupted fit's)."]


def markdown(summary: Mapping[str, Any], command: str) -> str:
    """The results as Markdown: main table, per-task table, floors and adapter checks."""
    floors = summary["floors"]
    lines = [f"Command: `{command}`", "", *main_table(summary)]
    paired = summary.get("paired") or []
    if paired:
        lines += [
            "",
            "Paired differences in accuracy points (method − versus, same items), with 95% "
            "paired bootstrap intervals: over test items with the seeds kept, and over seeds "
            "and items. `best non-CP` is the non-CP merge with the highest mean of that "
            "clustering on that split (picked with hindsight on the test items).",
            "",
            "| clustering | method | versus | split | diff | 95% (items) | 95% (seeds+items) "
            "| seeds | items |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for p in paired:
            versus = p["versus"] + (" (best non-CP)" if p["versus_is_best_non_cp"] else "")
            lines.append(
                f"| {p['variant']} | {p['method']} | {versus} | {p['split']} "
                f"| {100 * p['diff']:+.1f} | {_span(p['low'], p['high'])} "
                f"| {_span(p['low_seeds'], p['high_seeds'])} "
                f"| {p['seeds']} | {p['items']} |"
            )
    lines += [
        "",
        f"Floors: majority answer of the training split, in-domain mean "
        f"{_pct(floors['majority_in_domain'])}; chance on the unseen multiple-choice tasks "
        f"(0 for short answers), mean {_pct(floors['chance_out_of_domain'])}.",
        "",
        "Per task (mean over seeds; base model and majority floor beside each):",
        "",
    ]
    tasks = list(summary["tasks"])
    methods = list(summary["rows"])
    header = "| task | group | n | majority | " + " | ".join(
        f"{r['variant']}/{r['method']}" for r in methods
    )
    lines += [header + " |", "|" + "---|" * (4 + len(methods))]
    for t in tasks:
        info = summary["tasks"][t]
        maj = info.get("majority", {}).get("accuracy")
        cells = " | ".join(_pct(r["per_task"].get(t)) for r in methods)
        group = "in" if info["group"] == "in_domain" else "unseen"
        lines.append(f"| {t} | {group} | {info['n_test']} | {_pct(maj)} | {cells} |")
    checks = summary["adapter_checks"]
    if checks:
        beaten = sum(c["clearly_beats"] for c in checks)
        lines += [
            "",
            f"Per-task adapters clearly above the majority answer (> 2 SE): {beaten} of "
            f"{len(checks)} (task, seed) pairs.",
        ]
        failing = [c for c in checks if not c["clearly_beats"]]
        if failing:
            lines.append(
                "Not clearly above: "
                + ", ".join(
                    f"{c['task']} (seed {c['seed']}: {_pct(c['adapter'])} vs {_pct(c['majority'])})"
                    for c in failing
                )
                + "."
            )
    lines += resume_lines(summary.get("resume_checks") or {})
    return "\n".join(lines) + "\n"


def strict_json(value: Any) -> Any:
    """``value`` with every non-finite float (a std over one seed, a missing scale) as ``None``,
    so that ``json.dumps(..., allow_nan=False)`` writes standard JSON (``null``, not ``NaN``).

    Args:
        value: a JSON-like tree of dicts, lists, tuples, strings and numbers.

    Returns:
        The same tree, rebuilt, with ``None`` in place of NaN and ±infinity.
    """
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(v) for v in value]
    return value


def write_results(summary: Mapping[str, Any], sweep: Sweep, command: str) -> None:
    """Write ``repro_small.{md,json,csv}`` to ``sweep.results_dir`` and print the Markdown."""
    out = sweep.results_dir
    text = markdown(summary, command)
    atomic_write_text(out / "repro_small.md", text)
    atomic_write_text(
        out / "repro_small.json",
        json.dumps(strict_json({**summary, "command": command}), indent=1, allow_nan=False),
    )
    buffer = io.StringIO()
    keys = [k for k in summary["rows"][0] if k != "per_task"] if summary["rows"] else []
    tasks = list(summary["tasks"])
    writer = csv.writer(buffer)
    writer.writerow(keys + tasks)
    for r in summary["rows"]:
        writer.writerow([r[k] for k in keys] + [r["per_task"].get(t) for t in tasks])
    atomic_write_text(out / "repro_small.csv", buffer.getvalue())
    print(text)
