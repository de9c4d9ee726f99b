"""What a merge study does: one validated configuration, one set of defaults.

:class:`StudyConfig` is the single source of truth for every option of the merge study; the
callback (:class:`~tclora.callbacks.CPMergeCallback`) and ``tclora merge`` both build one.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, get_args

from tclora._checks import check_choice
from tclora.merge.baselines import Baseline, MergeSpace
from tclora.merge.cp import Engine

__all__ = [
    "MERGE_OPTIONS",
    "Baseline",
    "CPRule",
    "MergeSpace",
    "Reference",
    "SelectionMetric",
    "StudyConfig",
    "check_single_sets",
]

CPRule = Literal["sum_components", "mean_loading", "ties_loading"]
Reference = Literal["base", "single", "routing", "arrow"]
SelectionMetric = Literal["val_loss", "val_loss_max"]
MERGE_OPTIONS = ("engine", "merge_space", "cp_iters", "cp_tol", "density", "cart_rank", "seed")
"""The study options that decide how a merge is built (beyond which methods are built)."""


@dataclass
class StudyConfig:
    """What to merge, how to pick scales, what to evaluate (see ``CPMergeCallback`` for each).

    Every value is checked on construction, so a bad option fails before any expensive work.
    """

    cp_ranks: list[int] = field(default_factory=lambda: [4])
    engine: Engine = "factored"
    rules: list[CPRule] = field(default_factory=lambda: ["sum_components", "mean_loading"])
    baselines: list[Baseline] = field(
        default_factory=lambda: ["uniform", "ties", "knots_ties", "tsv", "iso_c"]
    )
    merge_space: MergeSpace = "core"
    scales: list[float] = field(default_factory=lambda: [1.0])
    scale_extensions: int = 0
    eval_sets: list[str] = field(default_factory=list)
    eval_max_items: int | None = 200
    selection_metric: SelectionMetric = "val_loss"
    val_max_batches: int | None = 8
    adapters: str | None = None
    references: list[Reference] = field(default_factory=lambda: ["base", "single", "routing"])
    keep: str = "best"
    export: bool = True
    batch_size: int = 8
    max_length: int = 512
    max_new_tokens: int = 16
    fold_adapter: bool = False
    chat_template: bool = True
    cp_iters: int = 100
    cp_tol: float = 1e-8
    density: float = 0.2
    cart_rank: float = 0.1
    arrow_top_k: int | None = None
    arrow_temperature: float = 1.0
    single_sets: dict[str, list[str]] | None = None
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        ranks = [self.cp_ranks] if isinstance(self.cp_ranks, int) else list(self.cp_ranks)
        if not ranks or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in ranks):
            raise ValueError(f"cp_ranks={self.cp_ranks!r}: every CP rank must be an integer >= 1")
        self.cp_ranks = ranks
        check_choice("engine", self.engine, get_args(Engine))
        self.rules, self.baselines = list(self.rules), list(self.baselines)
        self.references = list(self.references)
        for rule in self.rules:
            check_choice("rules", rule, get_args(CPRule))
        for method in self.baselines:
            check_choice("baselines", method, get_args(Baseline))
        for ref in self.references:
            check_choice("references", ref, get_args(Reference))
        check_choice("selection_metric", self.selection_metric, get_args(SelectionMetric))
        check_choice("merge_space", self.merge_space, get_args(MergeSpace))
        if not self.rules and not self.baselines:
            raise ValueError(
                "rules=[] and baselines=[]: nothing to merge; name at least one method"
            )
        scales = list(self.scales)
        if not scales or any(not math.isfinite(float(s)) or float(s) <= 0 for s in scales):
            raise ValueError(f"scales={self.scales!r}: give one or more finite scales > 0")
        self.scales = [float(s) for s in scales]
        if (
            isinstance(self.scale_extensions, bool)
            or not isinstance(self.scale_extensions, int)
            or self.scale_extensions < 0
        ):
            raise ValueError(f"scale_extensions={self.scale_extensions!r}: must be an integer >= 0")
        self.eval_sets = [str(s) for s in self.eval_sets]
        for name in ("eval_max_items", "val_max_batches"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}={value!r}: must be >= 1 or None")
        for name in ("batch_size", "max_length", "max_new_tokens", "cp_iters"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"{name}={value!r}: must be >= 1")
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"density={self.density!r}: must be in (0, 1]")
        if not 0.0 < self.cart_rank <= 1.0:
            raise ValueError(f"cart_rank={self.cart_rank!r}: must be in (0, 1]")
        if self.arrow_top_k is not None and (
            isinstance(self.arrow_top_k, bool)
            or not isinstance(self.arrow_top_k, int)
            or self.arrow_top_k < 1
        ):
            raise ValueError(
                f"arrow_top_k={self.arrow_top_k!r}: must be an integer >= 1 (at most the number "
                "of adapters), or None for min(3, number of adapters)"
            )
        if not (math.isfinite(float(self.arrow_temperature)) and self.arrow_temperature > 0):
            raise ValueError(
                f"arrow_temperature={self.arrow_temperature!r}: must be a finite number > 0"
            )
        if self.single_sets is not None:
            self.single_sets = _single_sets(self.single_sets)
        if self.adapters is not None:
            try:
                re.compile(self.adapters)
            except re.error as err:
                raise ValueError(
                    f"adapters={self.adapters!r} is not a valid regular expression: {err}"
                ) from err
        if self.keep != "best" and self.keep not in self.method_names:
            raise ValueError(f"keep={self.keep!r}: expected 'best' or one of {self.method_names}")

    @classmethod
    def from_options(cls, **options: Any) -> StudyConfig:
        """Build from user options where ``None`` for a list option means its default.

        Args:
            **options: Field values; ``rules``, ``baselines``, ``scales``, ``eval_sets`` and
                ``references`` set to ``None`` take the defaults above.

        Returns:
            The validated config.
        """
        lists = ("rules", "baselines", "scales", "eval_sets", "references")
        return cls(**{k: v for k, v in options.items() if not (k in lists and v is None)})

    @property
    def method_names(self) -> list[str]:
        """Merge methods in study order: ``cp{R}_{rule}`` for every rank and rule, then baselines."""
        cp = [f"cp{r}_{rule}" for r in self.cp_ranks for rule in self.rules]
        return cp + list(self.baselines)

    def merge_options(self) -> dict[str, Any]:
        """The options that decide how a merge is built, beyond which methods
        (:data:`MERGE_OPTIONS`): kept with a study's state, so that ``tclora export --fold``
        rebuilds a merge as the study built and scored it."""
        return {name: getattr(self, name) for name in MERGE_OPTIONS}

    def check_validation(self, has_validation: bool, how: str, prefix: str = "") -> None:
        """Refuse options that choose on validation loss when there is no validation data.

        Several scales are chosen among by validation loss, and so is the kept merge
        (``keep="best"``) when there are several merges; without validation data the first scale
        and the first merge would be taken silently.

        Args:
            has_validation: Whether validation data is there.
            how: How to give validation data, as the error should say (e.g. ``"pass --val_data"``).
            prefix: Put before each option's name (``"--merge."`` on the command line).

        Raises:
            ValueError: ``has_validation`` is false and the options need validation data.
        """
        if has_validation:
            return
        choices = []
        if len(self.scales) > 1:
            choices.append(f"{prefix}scales={self.scales} (one scale per merge)")
        if self.keep == "best" and len(self.method_names) > 1:
            choices.append(f"{prefix}keep='best' (the merge to keep among {self.method_names})")
        if choices:
            raise ValueError(
                f"{' and '.join(choices)} {'are' if len(choices) > 1 else 'is'} chosen on "
                f"validation loss, and there is no validation data: {how}, or give a single "
                f"scale and name the merge to keep ({prefix}keep=<method>)"
            )

    def without_routing(self) -> StudyConfig:
        """A copy with the ``routing`` reference removed (for runs without a router)."""
        values = asdict(self)
        values["references"] = [r for r in self.references if r != "routing"]
        return StudyConfig(**values)

    def outcome_fields(self) -> dict[str, Any]:
        """The options that decide the study's rows (for its fingerprint).

        Left out: ``progress`` and ``export`` (they change no number), ``keep`` (the kept
        merge is chosen from the finished rows), and ``eval_sets``: where the sets' files lie is
        not what the rows depend on, their content is, and the fingerprint holds that
        (:func:`~tclora.study.progress.eval_sets_digest`: each set's name, kind and items, in
        order), so a checkout moved to another folder goes on with its rows.
        """
        values = asdict(self)
        for name in ("progress", "export", "keep", "eval_sets"):
            values.pop(name)
        return values


def _single_sets(value: Any) -> dict[str, list[str]]:
    """``single_sets`` as ``{adapter: [set, ...]}``, or a ``ValueError`` naming what is wrong."""
    expected = "expected {adapter name: [evaluation set name, ...]} with at least one set each"
    if not isinstance(value, dict) or not value:
        raise ValueError(f"single_sets={value!r}: {expected}")
    out: dict[str, list[str]] = {}
    for adapter, sets in value.items():
        if isinstance(sets, str):
            sets = [sets]
        if (
            not isinstance(adapter, str)
            or not isinstance(sets, list | tuple)
            or not sets
            or not all(isinstance(s, str) for s in sets)
        ):
            raise ValueError(f"single_sets={value!r}: entry {adapter!r}: {sets!r}: {expected}")
        out[adapter] = list(sets)
    return out


def check_single_sets(
    single_sets: dict[str, list[str]] | None,
    adapters: Sequence[str] | None = None,
    eval_sets: Sequence[str] | None = None,
) -> None:
    """Check that ``single_sets`` names only known adapters and loaded evaluation sets.

    Args:
        single_sets: :attr:`StudyConfig.single_sets` (``None`` passes).
        adapters: The adapters of the run, or ``None`` to skip that check.
        eval_sets: The loaded evaluation sets' names, or ``None`` to skip that check.

    Raises:
        ValueError: An adapter or set is named that the run does not have.
    """
    if single_sets is None:
        return
    if adapters is not None:
        unknown = sorted(set(single_sets) - set(adapters))
        if unknown:
            raise ValueError(
                f"single_sets: adapters {unknown} are not among the run's adapters {list(adapters)}"
            )
    if eval_sets is not None:
        missing = sorted({s for sets in single_sets.values() for s in sets} - set(eval_sets))
        if missing:
            raise ValueError(
                f"single_sets: evaluation sets {missing} are not among the loaded sets "
                f"{list(eval_sets)}"
            )
