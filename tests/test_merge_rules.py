"""CP merge rules: scale-correctness, the authors' rule, reports and component analysis."""

from __future__ import annotations

import math
import warnings

import pytest
import tensorly as tl
import torch
from peft import LoraConfig
from tensorly.cp_tensor import CPTensor
from torch.testing import assert_close

from tclora.merge import (
    CP_RULES,
    AdapterStack,
    CPResult,
    MergedAdapter,
    component_analysis,
    cp_decompose,
    merge_baseline,
    merge_cp,
    merge_report,
    merge_report_per_module,
    ties_loadings,
)
from tclora.merge.cp import normalize_cp

pytestmark = pytest.mark.usefixtures("one_thread")


MODULES = ("model.layers.0.mlp.down_proj", "model.layers.1.self_attn.v_proj")


def make_stack(adapters: list[dict[str, tuple[torch.Tensor, torch.Tensor, float]]]) -> AdapterStack:
    weights = {m: [ad[m] for ad in adapters] for m in adapters[0]}
    names = [f"a{i}" for i in range(len(adapters))]
    return AdapterStack(names=names, module_names=[], lora_config=LoraConfig(), weights=weights)


def random_adapter(r: int, d_out: int = 18, d_in: int = 14, seed: int = 0, scaling: float = 2.0):
    g = torch.Generator().manual_seed(seed)
    return {
        m: (
            torch.randn(r, d_in, generator=g, dtype=torch.float64),
            torch.randn(d_out, r, generator=g, dtype=torch.float64),
            scaling,
        )
        for m in MODULES
    }


@pytest.fixture(scope="module")
def copies() -> AdapterStack:
    one = random_adapter(3, seed=1)
    return make_stack([one, one, one, one])


@pytest.fixture(scope="module")
def copies_cp(copies: AdapterStack) -> dict[str, CPResult]:
    return cp_decompose(copies, 3, n_iter_max=300, tol=1e-14)


@pytest.mark.parametrize("rule", [*CP_RULES, "select:0", "select:a3"])
def test_every_rule_returns_the_adapter_for_copies(
    copies: AdapterStack, copies_cp: dict[str, CPResult], rule: str
) -> None:
    merged = merge_cp(copies, copies_cp, rule)
    for m in MODULES:
        target = copies.delta(m, 0)
        assert_close(
            merged.delta(m).double(), target, atol=1e-4 * float(target.abs().max()), rtol=0
        )
    assert merged.method == f"cp:{rule}" and merged.scale == 1.0 and merged.rank == 3


def test_scale_multiplies_and_scaled_is_cheap(copies: AdapterStack) -> None:
    cp = cp_decompose(copies, 3, n_iter_max=50)
    one = merge_cp(copies, cp, "mean_loading")
    four = merge_cp(copies, cp, "mean_loading", scale=4.0)
    for m in MODULES:
        assert_close(four.delta(m), 4 * one.delta(m))
        assert_close(one.scaled(4.0).delta(m), four.delta(m))
        assert_close(four.scaled(0.5).delta(m), 0.5 * one.delta(m))
    assert one.scaled(4.0).info["scale"] == 4.0


def test_select_reconstructs_each_adapter_and_mean_is_uniform() -> None:
    g = torch.Generator().manual_seed(0)
    c = torch.rand(3, 2, generator=g, dtype=torch.float64) + 0.1
    u = torch.randn(12, 2, generator=g, dtype=torch.float64)
    v = torch.randn(10, 2, generator=g, dtype=torch.float64)
    stack = make_stack([{m: (v.T, u * c[t], 1.0) for m in MODULES} for t in range(3)])
    cp = cp_decompose(stack, 2, n_iter_max=500, tol=1e-15)
    uniform = merge_baseline(stack, "uniform")
    mean = merge_cp(stack, cp, "mean_loading")
    for t in range(3):
        sel = merge_cp(stack, cp, f"select:{t}")
        for m in MODULES:
            assert_close(sel.delta(m).double(), stack.delta(m, t), atol=1e-5, rtol=0)
    for m in MODULES:
        assert_close(mean.delta(m), uniform.delta(m), atol=1e-5, rtol=0)


def test_sum_components_is_the_authors_rule_with_loading_norm_sqrt_t() -> None:
    stack = make_stack([random_adapter(2, seed=s) for s in range(3)])
    m = MODULES[0]
    x = stack.deltas(m).double()
    with tl.backend_context("pytorch"):
        from tensorly.decomposition import parafac

        (_, (c_t, u_t, v_t)) = parafac(
            x, 3, n_iter_max=30, init="svd", tol=0, normalize_factors=False
        )
    authors = u_t @ v_t.T  # mttl CPMergeAfter: loadings dropped, factors unnormalised
    cp = {
        mod: CPResult(cp=normalize_cp(c_t, u_t, v_t), fit_error=0.0, n_iter=30) for mod in MODULES
    }
    ours = merge_cp(stack, cp, "sum_components").delta(m).double()
    sign = torch.where(c_t.sum(0) < 0, -1.0, 1.0).double()
    rescaled = (u_t * sign * c_t.norm(dim=0) / math.sqrt(3)) @ v_t.T
    assert_close(ours, rescaled, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ours, authors.double(), atol=1e-3)


def test_ties_loadings() -> None:
    c = torch.tensor([[0.9, 0.5], [-0.3, -0.6], [0.1, 0.4], [0.2, -0.1]])
    # density 0.5 keeps 2 of 4 per column: col0 {0.9, -0.3} → +, mean 0.9; col1 {-0.6, 0.5} → -0.1 < 0 → -, mean -0.6
    assert_close(ties_loadings(c, 0.5), torch.tensor([0.9, -0.6]))
    # density 1: col0 sum 0.9 > 0 → mean(0.9, 0.1, 0.2); col1 sum 0.2 > 0 → mean(0.5, 0.4)
    assert_close(ties_loadings(c, 1.0), torch.tensor([0.4, 0.45]))
    assert_close(ties_loadings(torch.full((5, 3), 0.7), 0.2), torch.full((3,), 0.7))


def test_merge_report_matches_dense() -> None:
    stack = make_stack([random_adapter(2, seed=s) for s in range(3)])
    cp = cp_decompose(stack, 3, n_iter_max=20)
    merged = merge_cp(stack, cp, "sum_components", scale=1.7)
    per = merge_report_per_module(stack, merged)
    for m in MODULES:
        d, s = merged.delta(m).double(), stack.deltas(m).double().sum(0)
        assert per[m]["norm"] == pytest.approx(float(d.norm()), rel=1e-6)
        assert per[m]["norm_mean"] == pytest.approx(float(s.norm()) / 3, rel=1e-9)
        assert per[m]["cosine_to_sum"] == pytest.approx(
            float((d * s).sum() / d.norm() / s.norm()), rel=1e-6
        )
    rep = merge_report(stack, merged)
    total = math.sqrt(sum(per[m]["norm"] ** 2 for m in MODULES))
    assert rep["norm"] == pytest.approx(total)
    uni = merge_report(stack, merge_baseline(stack, "uniform", scale=3.0))
    assert uni["norm_ratio_to_mean"] == pytest.approx(3.0, rel=1e-5)
    assert uni["cosine_to_sum"] == pytest.approx(1.0, abs=1e-6)


def test_component_analysis_shared_vs_specific() -> None:
    t = 4
    c = torch.stack(
        [torch.full((t,), 0.5, dtype=torch.float64), torch.eye(t, dtype=torch.float64)[2]], dim=1
    )
    u, v = torch.eye(6, 2, dtype=torch.float64), torch.eye(5, 2, dtype=torch.float64)
    res = {
        m: CPResult(
            cp=CPTensor((torch.tensor([3.0, 1.0], dtype=torch.float64), [c, u, v])),
            fit_error=0.0,
            n_iter=1,
        )
        for m in MODULES
    }
    out = component_analysis(res)
    assert out["modules"] == sorted(MODULES)
    assert_close(
        out["evenness"],
        torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64),
        atol=1e-12,
        rtol=0,
    )
    assert_close(out["heatmap"][:, 0], torch.full((t,), 0.25, dtype=torch.float64))
    assert_close(out["heatmap"][:, 1], torch.eye(t, dtype=torch.float64)[2])
    assert out["shared_fraction"] == pytest.approx(9 / 10)
    assert out["mean_evenness"] == pytest.approx(9 / 10)
    assert_close(
        out["adapter_energy"], torch.tensor([2.25, 2.25, 3.25, 2.25], dtype=torch.float64) / 10
    )


def test_rule_errors(copies: AdapterStack) -> None:
    cp = cp_decompose(copies, 2, n_iter_max=3)
    with pytest.raises(
        ValueError,
        match=r"rule must be one of \('sum_components', 'mean_loading', 'ties_loading'\) or 'select:<t>', got rule='median'",
    ):
        merge_cp(copies, cp, "median")
    with pytest.raises(
        ValueError, match=r"rule='select:4': select needs an adapter index in \[0, 4\) or a name"
    ):
        merge_cp(copies, cp, "select:4")
    with pytest.raises(ValueError, match=r"scale must be a finite number, got scale=inf"):
        merge_cp(copies, cp, "mean_loading", scale=math.inf)
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\], got density=0"):
        merge_cp(copies, cp, "ties_loading", density=0)
    with pytest.raises(
        ValueError,
        match=r"module sets differ between the stack and cp: only in the stack: \['model.layers.1.self_attn.v_proj'\]",
    ):
        merge_cp(copies, {MODULES[0]: cp[MODULES[0]]}, "mean_loading")
    other = make_stack([random_adapter(3, seed=s) for s in range(2)])
    with pytest.raises(ValueError, match=r"has loadings for 4 adapters, the stack has 2"):
        merge_cp(other, cp, "mean_loading")
    merged = merge_cp(copies, cp, "mean_loading", scale=0.0)
    with pytest.raises(ValueError, match=r"cannot rescale a merge built with scale=0"):
        merged.scaled(1.0)
    with pytest.raises(KeyError, match=r"module='nope' is not in this merge"):
        merged.delta("nope")
    with pytest.raises(ValueError, match=r"cp is empty"):
        component_analysis({})
    assert isinstance(merged, MergedAdapter)


def _true_rank3_stack() -> AdapterStack:
    """Four rank-3 adapters built from the same three rank-1 matrices: CP rank 3, Σr = 12."""
    g = torch.Generator().manual_seed(0)
    u = torch.randn(40, 3, generator=g, dtype=torch.float64)
    v = torch.randn(30, 3, generator=g, dtype=torch.float64)
    c = torch.randn(4, 3, generator=g, dtype=torch.float64)
    adapters = [{MODULES[0]: (v.T.clone(), u * c[t], 1.0)} for t in range(4)]
    return make_stack(adapters)


def test_sum_components_warns_where_the_cp_is_degenerate_and_mean_loading_is_unique() -> None:
    stack = _true_rank3_stack()
    cps = [cp_decompose(stack, 6, init="random", seed=s, n_iter_max=500) for s in (0, 1)]
    for cp in cps:
        assert cp[MODULES[0]].fit_error < 1e-5
        assert cp[MODULES[0]].energy_ratio > 10  # components cancel each other
        assert cp[MODULES[0]].min_congruence < -0.8
    # the mean rule is a function of the fitted tensor: two ALS starts, one merge
    means = [merge_cp(stack, cp, "mean_loading").delta(MODULES[0]) for cp in cps]
    assert_close(means[0], means[1], atol=1e-5, rtol=1e-5)
    assert_close(means[0].double(), stack.deltas(MODULES[0]).mean(0), atol=1e-4, rtol=1e-4)
    # the sum rule is a function of the decomposition: two starts, two merges, and a warning
    with pytest.warns(UserWarning, match=r"rule='sum_components' on a degenerate CP: in 1 of 1"):
        sums = [merge_cp(stack, cp, "sum_components") for cp in cps]
    gap = (sums[0].delta(MODULES[0]) - sums[1].delta(MODULES[0])).norm() / means[0].norm()
    assert gap > 1.0
    assert sums[0].info["energy_ratio_max"] > 10


def test_no_degeneracy_warning_at_the_stacks_own_rank() -> None:
    stack = _true_rank3_stack()
    cp = cp_decompose(stack, 3, n_iter_max=500)
    assert cp[MODULES[0]].energy_ratio == pytest.approx(1.0, abs=0.02)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        merged = merge_cp(stack, cp, "sum_components")
    assert merged.info["energy_ratio_max"] == pytest.approx(1.0, abs=0.02)


def test_sum_components_is_sqrt_t_times_mean_loading_on_adapter_specific_components() -> None:
    """Orthogonal rank-1 adapters: every component belongs to one adapter (c_q one-hot), so the
    sum rule at scale 1 is the mean rule at scale √T."""
    g = torch.Generator().manual_seed(3)
    q_u, _ = torch.linalg.qr(torch.randn(18, 4, generator=g, dtype=torch.float64))
    q_v, _ = torch.linalg.qr(torch.randn(14, 4, generator=g, dtype=torch.float64))
    adapters = [
        {MODULES[0]: (q_v[:, t : t + 1].T.clone(), q_u[:, t : t + 1] * (t + 1), 1.0)}
        for t in range(4)
    ]
    stack = make_stack(adapters)
    cp = cp_decompose(stack, 4)
    assert_close(cp[MODULES[0]].loadings.abs().max(0).values, torch.ones(4, dtype=torch.float64))
    total = merge_cp(stack, cp, "sum_components").delta(MODULES[0])
    mean = merge_cp(stack, cp, "mean_loading", scale=2.0).delta(MODULES[0])  # √T = 2
    assert_close(total, mean, atol=1e-6, rtol=1e-6)
