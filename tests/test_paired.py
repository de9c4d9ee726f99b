"""Paired bootstrap intervals between two methods scored on the same items."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tclora.study import paired_bootstrap, parse_items


def _items(pattern: list[int], n: int) -> str:
    return "".join(str(pattern[i % len(pattern)]) for i in range(n))


def test_identical_methods_differ_by_exactly_zero() -> None:
    a = [{"x": "0110101", "y": "1111"}]
    out = paired_bootstrap(a, a, n_boot=200)
    for key in ("items", "seeds_items"):
        assert out[key]["diff"] == out[key]["low"] == out[key]["high"] == 0.0
        assert out[key]["n_items"] == 11 and out[key]["n_seeds"] == 1


def test_items_interval_matches_the_normal_approximation() -> None:
    """One set of 400 items: A is right where B is on all but 40 items, where only A is right:
    d_i ∈ {0, 1} with mean 0.1, so the interval is ≈ 0.1 ± 1.96 · sqrt(0.09 / 400)."""
    n = 400
    b = np.zeros(n, dtype=int)
    b[::2] = 1
    a = b.copy()
    a[1:80:2] = 1  # 40 more right answers
    out = paired_bootstrap([{"t": a.tolist()}], [{"t": b.tolist()}], n_boot=4000, seed=1)["items"]
    half = 1.96 * math.sqrt(0.1 * 0.9 / n)
    assert out["diff"] == pytest.approx(0.1)
    assert out["low"] == pytest.approx(0.1 - half, abs=0.006)
    assert out["high"] == pytest.approx(0.1 + half, abs=0.006)
    # paired: far narrower than two independent 50%/60% accuracies' (±0.068)
    assert out["high"] - out["low"] < 0.07


def test_the_mean_is_over_sets_then_seeds_and_seeds_widen_the_interval() -> None:
    n = 200
    same = _items([1, 0], n)
    better = _items([1, 1], n)  # +0.5 on this set
    worse = _items([0, 0], n)  # -0.5 on this set
    a = [{"t1": better, "t2": same}, {"t1": worse, "t2": same}]
    b = [{"t1": same, "t2": same}, {"t1": same, "t2": same}]
    out = paired_bootstrap(a, b, n_boot=2000)
    assert out["items"]["diff"] == pytest.approx(0.0)  # (+0.25 - 0.25) / 2
    # items only: ±1.96 · sqrt(2 · 0.25 / 200) / 4 ≈ ±0.024 (both seeds kept)
    assert out["items"]["high"] - out["items"]["low"] == pytest.approx(0.049, abs=0.006)
    assert out["seeds_items"]["low"] < -0.2 and out["seeds_items"]["high"] > 0.2
    assert out == paired_bootstrap(a, b, n_boot=2000)  # seeded


def test_parse_items_and_errors() -> None:
    np.testing.assert_array_equal(parse_items("0110"), [0, 1, 1, 0])
    with pytest.raises(ValueError, match=r"items='01x'\.\.\.: expected a string of 0 and 1"):
        parse_items("01x")
    one = [{"t": "01"}]
    with pytest.raises(ValueError, match=r"a has 1 seeds and b has 0: give the same seeds"):
        paired_bootstrap(one, [])
    with pytest.raises(ValueError, match=r"seed 0: a has sets \['t'\] and b has \['u'\]"):
        paired_bootstrap(one, [{"u": "01"}])
    with pytest.raises(ValueError, match=r"seed 0, set 't': 2 items for a and 3 for b"):
        paired_bootstrap(one, [{"t": "011"}])
    with pytest.raises(ValueError, match=r"n_boot=10: must be an integer >= 100"):
        paired_bootstrap(one, one, n_boot=10)
    with pytest.raises(ValueError, match=r"level=1\.5: must be in \(0, 1\)"):
        paired_bootstrap(one, one, level=1.5)
