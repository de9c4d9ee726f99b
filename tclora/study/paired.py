"""Paired bootstrap intervals for the difference between two methods scored on the same items.

Two methods of a study are scored on the very same examples, so the question "is A better than
B?" is about the per-item differences ``A_i − B_i``, not about two independent accuracies: the
paired interval is much narrower than two standard errors, because most items are right (or
wrong) for both. The statistic is the one the results table reports -- the mean over evaluation
sets of each set's accuracy (every task weighs the same) -- and, with several seeds, its mean over
seeds.

Two intervals, both percentile bootstrap intervals:

* ``"items"``: items resampled with replacement within each set (stratified, paired: the same
  draw for A and B), seeds kept -- the uncertainty from the finite test sets;
* ``"seeds_items"``: seeds resampled too, then items within each drawn seed -- adds the
  variation between training runs (with 3 seeds a coarse, honest widening).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["PairedInterval", "paired_bootstrap", "parse_items"]

PairedInterval = dict[str, float]
"""``{"diff", "low", "high", "level", "n_boot", "n_items", "n_seeds"}``."""


def parse_items(items: str | Sequence[int]) -> np.ndarray:
    """``"0110"`` (a study row's ``items``) or a 0/1 sequence as an ``int8`` array.

    Raises:
        ValueError: a character other than ``0``/``1``.
    """
    if isinstance(items, str):
        if set(items) - {"0", "1"}:
            raise ValueError(f"items={items[:20]!r}...: expected a string of 0 and 1")
        return np.frombuffer(items.encode(), dtype=np.uint8).astype(np.int8) - ord("0")
    return np.asarray(items, dtype=np.int8)


def _differences(
    a: Sequence[Mapping[str, str | Sequence[int]]], b: Sequence[Mapping[str, str | Sequence[int]]]
) -> list[list[np.ndarray]]:
    """Per seed, per set (sorted names) the per-item differences ``A_i − B_i``."""
    if len(a) != len(b) or not a:
        raise ValueError(
            f"a has {len(a)} seeds and b has {len(b)}: give the same seeds (one or more) for both"
        )
    out: list[list[np.ndarray]] = []
    for s, (sa, sb) in enumerate(zip(a, b, strict=True)):
        if sorted(sa) != sorted(sb) or not sa:
            raise ValueError(
                f"seed {s}: a has sets {sorted(sa)} and b has {sorted(sb)}: pair the same sets"
            )
        per_set = []
        for name in sorted(sa):
            xa, xb = parse_items(sa[name]), parse_items(sb[name])
            if xa.shape != xb.shape or not len(xa):
                raise ValueError(
                    f"seed {s}, set {name!r}: {len(xa)} items for a and {len(xb)} for b; a paired "
                    "comparison needs the same (non-empty) items in the same order"
                )
            per_set.append(xa.astype(np.float64) - xb)
        out.append(per_set)
    return out


def paired_bootstrap(
    a: Sequence[Mapping[str, str | Sequence[int]]],
    b: Sequence[Mapping[str, str | Sequence[int]]],
    *,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, PairedInterval]:
    """Bootstrap intervals for ``mean_seeds mean_sets (acc_A − acc_B)``.

    Args:
        a: Per seed, ``{set name: per-item 0/1}`` of method A (a study row's ``items``).
        b: The same for method B: same seeds, sets and items, in the same order.
        n_boot: Bootstrap resamples (≥ 100).
        level: Coverage of the interval, in ``(0, 1)``.
        seed: Seed of the resampling.

    Returns:
        ``{"items": interval, "seeds_items": interval}`` (see the module docstring); each
        ``{"diff", "low", "high", "level", "n_boot", "n_items", "n_seeds"}`` with ``diff`` the
        observed difference (accuracy points as fractions, e.g. 0.031).

    Raises:
        ValueError: Mismatched seeds, sets or items, or bad ``n_boot`` / ``level``.
    """
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 100:
        raise ValueError(f"n_boot={n_boot!r}: must be an integer >= 100")
    if not 0 < level < 1:
        raise ValueError(f"level={level!r}: must be in (0, 1)")
    diffs = _differences(a, b)
    rng = np.random.default_rng(seed)
    # per seed: the observed statistic and n_boot item-resampled ones
    observed = np.array([np.mean([d.mean() for d in per_set]) for per_set in diffs])
    boot = np.empty((len(diffs), n_boot))
    for s, per_set in enumerate(diffs):
        total = np.zeros(n_boot)
        for d in per_set:
            idx = rng.integers(0, len(d), size=(n_boot, len(d)))
            total += d[idx].mean(axis=1)
        boot[s] = total / len(per_set)
    items_stat = boot.mean(axis=0)
    seeds = rng.integers(0, len(diffs), size=(n_boot, len(diffs)))
    draws = rng.integers(0, n_boot, size=(n_boot, len(diffs)))
    seeds_stat = boot[seeds, draws].mean(axis=1)
    tail = (1 - level) / 2
    n_items = int(sum(len(d) for d in diffs[0]))

    def interval(stat: np.ndarray) -> PairedInterval:
        low, high = np.quantile(stat, [tail, 1 - tail])
        return {
            "diff": float(observed.mean()),
            "low": float(low),
            "high": float(high),
            "level": float(level),
            "n_boot": float(n_boot),
            "n_items": float(n_items),
            "n_seeds": float(len(diffs)),
        }

    return {"items": interval(items_stat), "seeds_items": interval(seeds_stat)}
