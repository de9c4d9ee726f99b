"""The README's sweep results, rendered from ``benchmarks/results/repro_small.json`` (which the
sweep's aggregation builds from the committed run records alone), never edited by hand.

The block between ``<!-- repro-results:begin -->`` and ``<!-- repro-results:end -->`` holds:
which runs have finished, the main table (in-domain, normalised and unseen accuracy, CP fit
error, CP sharing, merge seconds, parameters), each CP merge's paired difference to uniform and
to the best non-CP merge, sentences saying which of those differences are real (their 95%
interval over seeds and items excludes 0) and where CP loses, whether CP helps where the CP
components are shared, the figure, and the commands.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from benchmarks.repro.aggregate import REFERENCE_ORDER
from benchmarks.repro.report import finite, main_table

__all__ = [
    "BEGIN",
    "END",
    "findings",
    "floor_findings",
    "readme_block",
    "scale_findings",
    "sharing_findings",
]

REFERENCES = (*REFERENCE_ORDER, "arrow")  # the rows that are not merges
BEGIN, END = "<!-- repro-results:begin -->", "<!-- repro-results:end -->"
COMMANDS = (
    "HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/repro_small.py  # resumes; skips committed runs",
    ".venv/bin/python benchmarks/make_figures.py",
    ".venv/bin/python benchmarks/repro_table.py  # this block",
)


def _interval(p: Mapping[str, Any]) -> tuple[float, float]:
    """The 95% interval a finding rests on: over seeds and items (over items with one seed)."""
    return (p["low_seeds"], p["high_seeds"]) if p["seeds"] > 1 else (p["low"], p["high"])


def _cell(p: Mapping[str, Any] | None) -> str:
    if p is None:
        return "–"
    low, high = _interval(p)
    return f"{100 * p['diff']:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}]"


def paired_table(paired: Sequence[Mapping[str, Any]]) -> list[str]:
    """One line per (clustering, CP merge): its paired differences in accuracy points."""
    cp = [p for p in paired if p["method"].startswith("cp")]
    keys = list(dict.fromkeys((p["variant"], p["method"]) for p in cp))
    if not keys:
        return []
    lines = [
        "| clustering | CP merge | in-domain − uniform | in-domain − best non-CP "
        "| unseen − uniform | unseen − best non-CP |",
        "|---|---|---|---|---|---|",
    ]
    for variant, method in keys:
        mine = [p for p in cp if (p["variant"], p["method"]) == (variant, method)]

        def pick(split: str, best: bool, mine: list[Mapping[str, Any]] = mine) -> Any:
            for p in mine:
                if p["split"] != split:
                    continue
                if (best and p["versus_is_best_non_cp"]) or (not best and p["versus"] == "uniform"):
                    return p
            return None

        cells = [pick(s, b) for s in ("in_domain", "unseen") for b in (False, True)]
        lines.append(
            f"| {variant} | {method} | "
            + " | ".join(
                _cell(c)
                + (f" ({c['versus']})" if c is not None and c["versus_is_best_non_cp"] else "")
                for c in cells
            )
            + " |"
        )
    return lines


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def findings(paired: Sequence[Mapping[str, Any]]) -> list[str]:
    """Plain sentences on the CP merges' paired differences: which are real (the 95% interval
    excludes 0), which direction, and how many are indistinguishable from no difference."""
    cp = [p for p in paired if p["method"].startswith("cp")]
    if not cp:
        return []
    real_up, real_down, unclear = [], [], 0
    for p in cp:
        low, high = _interval(p)
        versus = p["versus"] + (" (the best non-CP merge)" if p["versus_is_best_non_cp"] else "")
        split = "in-domain" if p["split"] == "in_domain" else "on unseen tasks"
        text = (
            f"{p['variant']} {p['method']} vs {versus} {split}: {100 * p['diff']:+.1f} points "
            f"(95% [{100 * low:+.1f}, {100 * high:+.1f}], {p['seeds']} seed(s), "
            f"{p['items']} items)"
        )
        if low > 0:
            real_up.append(text)
        elif high < 0:
            real_down.append(text)
        else:
            unclear += 1
    out = [
        f"Of {len(cp)} paired comparisons of a CP merge with uniform or the best non-CP merge, "
        f"{_count(len(real_up), 'is a real gain', 'are real gains')}, "
        f"{_count(len(real_down), 'a real loss', 'real losses')} (the 95% interval excludes "
        f"0), and {unclear} cannot be told from no difference."
    ]
    for title, found in (("CP is better", real_up), ("CP loses", real_down)):
        if found:
            out.append(f"{title} ({len(found)}):\n" + "\n".join(f"- {t}" for t in found))
    return out


def _label(row: Mapping[str, Any]) -> str:
    """A row's name in sentences: ``variant/method``, or the method alone where they agree."""
    return row["method"] if row["variant"] == row["method"] else f"{row['variant']}/{row['method']}"


def _paragraphs(texts: Sequence[str]) -> list[str]:
    """The block's lines for ``texts``, each followed by a blank line."""
    return [line for text in texts for line in (text, "")]


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def floor_findings(summary: Mapping[str, Any]) -> list[str]:
    """Plain sentences on the floors: how many merges (and which references) score below the
    majority answer in-domain, and on how many multiple-choice sets the methods' results are those
    of one constant answer."""
    floors = summary.get("floors") or {}
    majority, chance = floors.get("majority_in_domain"), floors.get("chance_out_of_domain")
    rows = [r for r in summary["rows"] if finite(r["in_domain"])]
    if majority is None or not rows:
        return []
    merges = [r for r in rows if r["method"] not in REFERENCES]
    refs = [r for r in rows if r["method"] in REFERENCES]
    above = [r for r in merges if r["in_domain"] > majority]

    def named(rs: Sequence[Mapping[str, Any]]) -> str:
        return ", ".join(f"{_label(r)} {_pct(r['in_domain'])}" for r in rs) or "none"

    text = (
        f"Floors: always giving a training task's most frequent training answer scores "
        f"{_pct(majority)} in-domain"
        + (f"; a uniform guess scores {_pct(chance)} on the unseen tasks" if chance else "")
        + f". In-domain, {len(merges) - len(above)} of {len(merges)} merges score at or below "
        f"the majority floor"
        + (f" (above it: {named(above)})" if above else "")
        + f"; references above it: {named([r for r in refs if r['in_domain'] > majority])}; "
        f"at or below it: {named([r for r in refs if r['in_domain'] <= majority])}."
    )
    out = [text]
    counted = [r for r in rows if r.get("one_answer_sets") is not None and r.get("mc_sets")]
    if counted:
        total = max(r["mc_sets"] for r in counted)
        counts = [r["one_answer_sets"] for r in counted if r["method"] not in REFERENCES]
        span = f"{min(counts):.2g}–{max(counts):.2g}" if counts else "–"
        refs_text = ", ".join(
            f"{_label(r)} {r['one_answer_sets']:.2g}" for r in counted if r["method"] in REFERENCES
        )
        out.append(
            f"One-answer sets: of the {total} multiple-choice sets, the merges' per-item results "
            f"are exactly those of always giving one answer on {span} sets"
            + (f" ({refs_text})" if refs_text else "")
            + "; an accuracy near the majority floor can come from answering one choice "
            "everywhere rather than from the task."
        )
    return out


def scale_findings(summary: Mapping[str, Any]) -> list[str]:
    """One sentence on the merges' chosen scales: whether any sits at the edge of the scales it
    tried (its optimum may lie beyond), and the range of the merged updates' norms relative to
    the mean merge's (the unit every method's scale shares)."""
    merges = [r for r in summary["rows"] if r.get("scale_at_edge") is not None]
    if not merges:
        return []

    edge = [r for r in merges if r["scale_at_edge"]]
    if edge:
        text = (
            f"Scales: {len(edge)} of {len(merges)} merges chose the edge of the scales they "
            "tried in some seed ("
            + ", ".join(f"{_label(r)} in {r['scale_at_edge']} of {r['seeds']}" for r in edge)
            + "), so a better scale may lie beyond it"
        )
    else:
        text = (
            f"Scales: all {len(merges)} merges chose a scale inside the range they tried "
            "(the grid is extended past an edge), in every seed"
        )
    ratios = [r for r in merges if finite(r.get("norm_ratio"))]
    if ratios:
        low = min(ratios, key=lambda r: r["norm_ratio"])
        high = max(ratios, key=lambda r: r["norm_ratio"])
        text += (
            f"; at their chosen scales the merged updates' norms run from "
            f"{low['norm_ratio']:.2f}× the mean merge's ({_label(low)}) to "
            f"{high['norm_ratio']:.2f}× ({_label(high)})"
        )
    return [text + "."]


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _points(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:+.1f}"


def sharing_findings(summary: Mapping[str, Any]) -> list[str]:
    """Whether CP helps where the clusters share structure: per clustering, its CP merges' mean
    shared fraction (the CP energy in components spread over the adapters) beside their mean
    paired difference to uniform on each split, and what the clusterings with the most and the
    least sharing show."""
    rows = [
        r
        for r in summary["rows"]
        if r["method"].startswith("cp") and finite(r.get("shared_fraction"))
    ]
    if not rows:
        return []
    versus_uniform = [
        p
        for p in summary.get("paired") or []
        if p["method"].startswith("cp") and p["versus"] == "uniform"
    ]
    stats: dict[str, tuple[float, dict[str, float | None], int]] = {}
    for variant in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == variant]
        gains = {
            split: _mean(
                [
                    p["diff"]
                    for p in versus_uniform
                    if (p["variant"], p["split"]) == (variant, split)
                ]
            )
            for split in ("in_domain", "unseen")
        }
        shared = _mean([r["shared_fraction"] for r in mine])
        assert shared is not None
        stats[variant] = (shared, gains, len(mine))
    text = (
        "Sharing: each clustering's CP merges' mean shared fraction, and their mean paired "
        "difference to uniform (in-domain, unseen; points): "
        + "; ".join(
            f"{v} {shared:.2f} ({_points(g['in_domain'])}, {_points(g['unseen'])}; "
            f"{_count(n, 'CP merge', 'CP merges')})"
            for v, (shared, g, n) in stats.items()
        )
        + "."
    )
    most = max(stats, key=lambda v: stats[v][0])
    if stats[most][0] < 0.25:
        text += (
            f" In no clustering is more than {100 * stats[most][0]:.0f}% of the CP energy in "
            "components spread over the adapters: the CP merge mostly keeps each adapter's own "
            "strongest directions (a top-R truncation per adapter) rather than separating shared "
            "from task-specific ones."
        )
    least = min(stats, key=lambda v: stats[v][0])
    if most != least and stats[most][0] > stats[least][0]:
        compared = []
        for split, name in (("in_domain", "in-domain"), ("unseen", "on unseen tasks")):
            hi, lo = stats[most][1][split], stats[least][1][split]
            if hi is not None and lo is not None:
                word = "better" if hi > lo else "worse" if hi < lo else "the same"
                compared.append(f"{word} {name} ({_points(hi)} against {_points(lo)})")
        if compared:
            seeds = max(r["seeds"] for r in rows)
            text += (
                f" Against uniform, the clustering with the most sharing ({most}) does "
                f"{' and '.join(compared)} than the one with the least ({least}); "
                f"{len(stats)} clusterings and {_count(seeds, 'seed', 'seeds')} are too few to "
                "call this a relation."
            )
    return [text]


def _status(summary: Mapping[str, Any]) -> str:
    sweep = summary.get("sweep", {})
    planned = [f"{v}/seed{s}" for s in sweep.get("seeds", []) for v in sweep.get("variants", [])]
    done = set(summary.get("timings", {}))
    missing = [r for r in planned if r not in done]
    text = f"Runs finished: {len(planned) - len(missing)} of {len(planned)}"
    if missing:
        text += f" (still to run: {', '.join(missing)}); **the comparison is incomplete**"
    return text + "."


def readme_block(summary: Mapping[str, Any] | None) -> str:
    """The README's sweep-results block for ``repro_small.json``'s data (``None``: no run yet)."""
    lines = [
        BEGIN,
        "<!-- generated by `python benchmarks/repro_table.py` from "
        "benchmarks/results/repro_small.json; do not edit -->",
        "",
    ]
    if summary is None:
        lines += ["No run of the sweep has finished yet.", ""]
    else:
        lines += [_status(summary), "", *main_table(summary), ""]
        lines += _paragraphs(floor_findings(summary)) + _paragraphs(scale_findings(summary))
        paired = summary.get("paired") or []
        pairs = paired_table(paired)
        if pairs:
            lines += [
                "Each CP merge's paired difference in accuracy points (same test items), with "
                "the 95% paired bootstrap interval over seeds and items (over items with one "
                "seed); the best non-CP merge of each clustering is picked with hindsight on the "
                "test items, on each split separately. All comparisons: "
                "`benchmarks/results/repro_small.md`.",
                "",
                *pairs,
                "",
                *_paragraphs(findings(paired)),
            ]
        lines += _paragraphs(sharing_findings(summary))
        lines += ["![sweep results](benchmarks/results/repro_small.png)", ""]
    lines += ["```bash", *COMMANDS, "```", END]
    return "\n".join(lines)
