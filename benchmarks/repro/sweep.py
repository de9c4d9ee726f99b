"""What the sweep runs: tasks, sizes, seeds and clusterings (:class:`Sweep`), the folder of each
run, and the merge study every run does -- ``configs/repro_small.yaml``'s ``CPMergeCallback``
options under the sweep's overrides (:func:`callback_options`, :func:`study_config`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml  # type: ignore[import-untyped]

if TYPE_CHECKING:
    from tclora.study import StudyConfig

__all__ = [
    "BASE_CONFIG",
    "OOD_TASKS",
    "ROOT",
    "SPLIT_SEED",
    "TRAIN_TASKS",
    "VARIANTS",
    "Sweep",
    "base_config",
    "callback_options",
    "eval_files",
    "merge_callback",
    "run_dir",
    "study_config",
    "variant_clusters",
]

ROOT = Path(__file__).resolve().parents[2]
BASE_CONFIG = ROOT / "configs" / "repro_small.yaml"

# Training tasks: MIT-licensed registry tasks whose own adapter clearly beats the majority answer
# at this budget (seed-0 pilots, benchmarks/results/logs/repro_pilot-items180-*.md; 14 of 40
# screened tasks pass), of mixed formats: 4 two-choice (sarcasm headlines, naughty strings,
# physics interactions, heart-disease records), 2 many-choice (causal reasoning, 6 options; pointer
# value retrieval, 10), 6 short answers (date formatting, a lyric's singer named from 3, word
# association, determinants of small matrices, Belarusian inflection analogies, chord symbols from
# notes). The two borderline passers (polish-lexicon +2.0 SE, french-part-of-speech +2.4) are
# left out. All have enough items for 100 test + 180 training items.
TRAIN_TASKS = (
    "sarcasm",
    "naughty_strings",
    "physics-interaction",
    "heart-disease",
    "abstract-causal-reasoning",
    "pointer-value-retrieval",
    "imperial_date_to_string",
    "guess_the_singer",
    "word_association",
    "determinant",
    "belarusian_word_analogy_inflection",
    "music-theory",
)
# Unseen tasks (never in training or clustering): 4 multiple choice, 2 short answer.
OOD_TASKS = (
    "belarusian_lexicon",
    "syllables_long_words",
    "rectangles",
    "which_is_heavier",
    "logical_counting",
    "recurrence-relation",
)
SPLIT_SEED = 1234  # the train/test split is fixed across run seeds
# Clusterings: one adapter per task, k-means with K = 4 and 8, MBC with K = 4 (parameter-level:
# the tasks grouped by the per_task run's adapters of the same seed, so it runs after per_task),
# one LoRA on everything. per_task goes first in each seed: its adapters are the normaliser, and
# the check that they beat the majority answer gates every conclusion (issue 13).
VARIANTS = ("per_task", "kmeans4", "kmeans8", "mbc4", "single")


@dataclass
class Sweep:
    """What the sweep runs; ``quick()`` is the smoke-run version."""

    work_dir: Path = ROOT / "runs" / "repro_small"
    results_dir: Path = ROOT / "benchmarks" / "results"
    train_tasks: tuple[str, ...] = TRAIN_TASKS
    ood_tasks: tuple[str, ...] = OOD_TASKS
    train_items: int = 180  # per task; the data module holds 5% of the pooled items for validation
    test_items: int = 100  # the floor; see benchmarks/results/README.md for the time
    ood_items: int = 100
    seeds: tuple[int, ...] = (0, 1, 2)
    variants: tuple[str, ...] = VARIANTS
    overrides: dict[str, Any] = field(default_factory=dict)  # deep-merged into every run

    @classmethod
    def quick(cls) -> Sweep:
        return cls(
            work_dir=ROOT / "runs" / "repro_small_quick",
            results_dir=ROOT / "runs" / "repro_small_quick" / "results",
            train_tasks=("sarcasm", "naughty_strings", "food", "positive-binary-operations"),
            ood_tasks=("which_is_heavier", "logical_counting"),
            train_items=24,
            test_items=20,
            ood_items=20,
            seeds=(0,),
            variants=("kmeans4", "per_task", "mbc2", "single"),
            overrides={
                "trainer": {"max_epochs": 1, "max_steps": 8},
                "data": {"val_fraction": 0.25},
                "callback": {
                    "cp_ranks": [4, 16],
                    "rules": ["sum_components", "mean_loading"],
                    "baselines": ["uniform", "ties", "knots_ties", "tsv", "iso_c"],
                    "scales": [1.0, 4.0],
                    "max_length": 160,
                },
            },
        )


def variant_clusters(variant: str) -> int | None:
    """``K`` of a ``kmeans<K>`` or ``mbc<K>`` variant, ``None`` for the others."""
    for prefix in ("kmeans", "mbc"):
        if variant.startswith(prefix) and variant[len(prefix) :].isdigit():
            return int(variant[len(prefix) :])
    return None


def run_dir(sweep: Sweep, variant: str, seed: int) -> Path:
    """The folder of one run (overrides, logs, adapters, ``merge/results.json``)."""
    return sweep.work_dir / "runs" / variant / f"seed{seed}"


def eval_files(sweep: Sweep) -> list[str]:
    """Every evaluation file of a run: the training tasks' test splits, then the unseen tasks."""
    data = sweep.work_dir / "data"
    return [str(data / "test" / f"{t}.jsonl") for t in sweep.train_tasks] + [
        str(data / "ood" / f"{t}.jsonl") for t in sweep.ood_tasks
    ]


def base_config() -> dict[str, Any]:
    """``configs/repro_small.yaml``: one run of the sweep (K = 4, seed 0), which every run extends."""
    return dict(yaml.safe_load(BASE_CONFIG.read_text()))


def merge_callback(config: dict[str, Any]) -> dict[str, Any]:
    """The ``CPMergeCallback`` entry (``class_path``, ``init_args``) of ``config``'s trainer."""
    (callback,) = [
        c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("CPMergeCallback")
    ]
    return dict(callback)


def callback_options(sweep: Sweep, **run: Any) -> dict[str, Any]:
    """The ``CPMergeCallback`` options of a run: the base config's, then ``run``'s, then the
    sweep's ``overrides["callback"]``."""
    base = merge_callback(base_config())["init_args"]
    return {**base, **run, **sweep.overrides.get("callback", {})}


def study_config(sweep: Sweep, **run: Any) -> StudyConfig:
    """The merge study a run's ``CPMergeCallback`` does, built and validated as the callback does."""
    from tclora.callbacks import CPMergeCallback

    return CPMergeCallback(**callback_options(sweep, **run)).config
