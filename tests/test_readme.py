"""README's demo results are generated (benchmarks/demo_table.py), never edited by hand."""

from __future__ import annotations

import json

from benchmarks.demo_table import BEGIN, END, README, RECORD, main, readme_block, replace_block


def test_readme_demo_table_is_what_the_run_record_renders_to() -> None:
    """Before: the README's table was hand-edited and differed from the run's results.md."""
    assert main(["--check"]) == 0
    block = readme_block(json.loads(RECORD.read_text(encoding="utf-8")))
    readme = README.read_text(encoding="utf-8")
    assert block in readme
    assert "benchmarks/demo_table.py" in block and "(kept)" in block


def test_replace_block_keeps_the_rest() -> None:
    text = f"intro\n{BEGIN}\nold\n{END}\noutro\n"
    assert replace_block(text, f"{BEGIN}\nnew\n{END}") == f"intro\n{BEGIN}\nnew\n{END}\noutro\n"


def test_readme_sweep_results_are_what_repro_small_json_renders_to() -> None:
    from benchmarks.repro_table import main as repro_main

    assert repro_main(["--check"]) == 0


def test_sweep_findings_say_which_cp_differences_are_real() -> None:
    from benchmarks.repro.readme import findings, paired_table

    def pair(method: str, versus: str, split: str, diff: float, low: float, high: float) -> dict:
        return {
            "variant": "kmeans4",
            "method": method,
            "versus": versus,
            "versus_is_best_non_cp": versus == "tsv",
            "split": split,
            "diff": diff,
            "low": low - 0.01,
            "high": high + 0.01,
            "low_seeds": low,
            "high_seeds": high,
            "seeds": 3,
            "items": 1200,
        }

    paired = [
        pair("cp4_mean_loading", "uniform", "in_domain", 0.03, 0.01, 0.05),
        pair("cp4_mean_loading", "tsv", "in_domain", -0.04, -0.06, -0.02),
        pair("cp4_mean_loading", "uniform", "unseen", 0.01, -0.02, 0.04),
        pair("tsv", "uniform", "in_domain", 0.07, 0.05, 0.09),  # not a CP merge: no finding
    ]
    text = findings(paired)
    assert (
        text[0].startswith("Of 3 paired comparisons")
        and "1 is a real gain, 1 a real loss" in text[0]
    )
    two_up = findings([*paired, pair("cp16_mean_loading", "uniform", "unseen", 0.02, 0.01, 0.03)])
    assert "2 are real gains, 1 a real loss" in two_up[0]
    assert "and 1 cannot be told from no difference" in text[0]
    assert text[1] == (
        "CP is better (1):\n- kmeans4 cp4_mean_loading vs uniform in-domain: +3.0 points "
        "(95% [+1.0, +5.0], 3 seed(s), 1200 items)"
    )
    assert text[2].startswith(
        "CP loses (1):\n- kmeans4 cp4_mean_loading vs tsv (the best non-CP merge)"
    )
    table = paired_table(paired)
    assert table[2] == (
        "| kmeans4 | cp4_mean_loading | +3.0 [+1.0, +5.0] | -4.0 [-6.0, -2.0] (tsv) "
        "| +1.0 [-2.0, +4.0] | – |"
    )
    assert len(table) == 3
    # the best non-CP merge is named per cell: each split may pick its own
    unseen_best = {**pair("cp4_mean_loading", "ties", "unseen", 0.02, -0.01, 0.05)}
    unseen_best["versus_is_best_non_cp"] = True
    assert paired_table([*paired, unseen_best])[2].endswith("| +2.0 [-1.0, +5.0] (ties) |")


def test_sweep_floor_findings_count_merges_below_the_majority_answer() -> None:
    from benchmarks.repro.readme import floor_findings

    def row(variant: str, method: str, in_domain: float, one: float | None) -> dict:
        return {
            "variant": variant,
            "method": method,
            "in_domain": in_domain,
            "one_answer_sets": one,
            "mc_sets": None if one is None else 14,
        }

    summary = {
        "floors": {"majority_in_domain": 0.452, "chance_out_of_domain": 0.333},
        "rows": [
            row("base", "base", 0.395, 6),
            row("kmeans4", "routing", 0.48, 10),
            row("per_task", "single_adapters", 0.6, None),
            row("kmeans4", "cp4_mean_loading", 0.46, 2),
            row("kmeans4", "uniform", 0.41, 3),
            row("kmeans8", "tsv", 0.452, 5),
        ],
    }
    floors, one_answer = floor_findings(summary)
    assert floors == (
        "Floors: always giving a training task's most frequent training answer scores 45.2% "
        "in-domain; a uniform guess scores 33.3% on the unseen tasks. In-domain, 2 of 3 merges "
        "score at or below the majority floor (above it: kmeans4/cp4_mean_loading 46.0%); "
        "references above it: kmeans4/routing 48.0%, per_task/single_adapters 60.0%; at or "
        "below it: base 39.5%."
    )
    assert one_answer.startswith(
        "One-answer sets: of the 14 multiple-choice sets, the merges' per-item results are "
        "exactly those of always giving one answer on 2–5 sets (base 6, kmeans4/routing 10);"
    )
    assert floor_findings({"floors": {}, "rows": []}) == []


def test_sweep_sharing_findings_set_cp_sharing_beside_cp_gains() -> None:
    from benchmarks.repro.readme import sharing_findings

    def row(variant: str, method: str, shared: float | None) -> dict:
        return {"variant": variant, "method": method, "seeds": 3, "shared_fraction": shared}

    def pair(variant: str, method: str, split: str, diff: float, versus: str = "uniform") -> dict:
        return {
            "variant": variant,
            "method": method,
            "split": split,
            "diff": diff,
            "versus": versus,
        }

    rows = [row("kmeans4", "cp4_sum_components", 0.1), row("kmeans4", "cp16_sum_components", 0.3)]
    rows += [row("kmeans8", "cp4_sum_components", 0.0), row("kmeans4", "uniform", None)]
    paired = [pair("kmeans4", "cp4_sum_components", "in_domain", 0.02)]
    paired += [pair("kmeans4", "cp16_sum_components", "in_domain", 0.04)]
    paired += [pair("kmeans4", "cp4_sum_components", "unseen", -0.01)]
    paired += [pair("kmeans4", "cp4_sum_components", "unseen", 0.5, versus="tsv")]  # not uniform
    paired += [pair("kmeans8", "cp4_sum_components", "in_domain", -0.01)]
    paired += [pair("kmeans8", "cp4_sum_components", "unseen", 0.01)]
    assert sharing_findings({"rows": rows, "paired": paired}) == [
        "Sharing: each clustering's CP merges' mean shared fraction, and their mean paired "
        "difference to uniform (in-domain, unseen; points): kmeans4 0.20 (+3.0, -1.0; 2 CP "
        "merges); kmeans8 0.00 (-1.0, +1.0; 1 CP merge). In no clustering is more than 20% of "
        "the CP energy in components spread over the adapters: the CP merge mostly keeps each "
        "adapter's own strongest directions (a top-R truncation per adapter) rather than "
        "separating shared from task-specific ones. Against uniform, the clustering with the "
        "most sharing (kmeans4) does better in-domain (+3.0 against -1.0) and worse on unseen "
        "tasks (-1.0 against +1.0) than the one with the least (kmeans8); 2 clusterings and 3 "
        "seeds are too few to call this a relation."
    ]
    rows[1]["shared_fraction"] = 0.9  # much sharing: no truncation sentence
    (text,) = sharing_findings({"rows": rows[:2], "paired": paired})
    assert text.endswith("kmeans4 0.50 (+3.0, -1.0; 2 CP merges).")
    assert sharing_findings({"rows": rows[3:], "paired": []}) == []


def test_sweep_scale_findings_name_edge_scales_and_the_norm_range() -> None:
    from benchmarks.repro.readme import scale_findings

    def row(method: str, edge: int | None, ratio: float | None, seeds: int = 3) -> dict:
        return {
            "variant": "kmeans4",
            "method": method,
            "seeds": seeds,
            "scale_at_edge": edge,
            "norm_ratio": ratio,
        }

    interior = [row("uniform", 0, 1.0), row("tsv", 0, 2.47), row("cp4_mean_loading", 0, 0.7)]
    summary = {"rows": [row("routing", None, None), *interior]}
    assert scale_findings(summary) == [
        "Scales: all 3 merges chose a scale inside the range they tried (the grid is extended "
        "past an edge), in every seed; at their chosen scales the merged updates' norms run "
        "from 0.70× the mean merge's (kmeans4/cp4_mean_loading) to 2.47× (kmeans4/tsv)."
    ]
    summary["rows"].append(row("iso_c", 2, None))
    (text,) = scale_findings(summary)
    assert text.startswith(
        "Scales: 1 of 4 merges chose the edge of the scales they tried in some seed "
        "(kmeans4/iso_c in 2 of 3), so a better scale may lie beyond it; "
    )
    assert scale_findings({"rows": [row("routing", None, None)]}) == []
