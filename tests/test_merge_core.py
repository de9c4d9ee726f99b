"""Core space: bases from the factors, every baseline exact where it should be, CP equivalence,
heterogeneous ranks, the all-zero stack, and core-space methods against hand references."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from peft import LoraConfig
from torch import Tensor
from torch.testing import assert_close

from tclora.merge import (
    BASELINES,
    MERGE_SPACES,
    AdapterStack,
    core_space,
    core_spaces,
    cp_decompose,
    iter_core_spaces,
    merge_baseline,
    merge_cp,
)

pytestmark = pytest.mark.usefixtures("one_thread")
MODULES = ("m.q", "m.v")


def make_stack(ranks: list[int], d_out: int = 24, d_in: int = 18, seed: int = 0) -> AdapterStack:
    g = torch.Generator().manual_seed(seed)
    weights = {
        m: [
            (
                torch.randn(r, d_in, generator=g, dtype=torch.float64),
                torch.randn(d_out, r, generator=g, dtype=torch.float64),
                0.5,
            )
            for r in ranks
        ]
        for m in MODULES
    }
    names = [f"a{i}" for i in range(len(ranks))]
    return AdapterStack(names=names, module_names=[], lora_config=LoraConfig(), weights=weights)


def copies(t: int, r: int = 3) -> AdapterStack:
    one = make_stack([r, r], seed=4)
    weights = {m: one.weights[m][:1] * t for m in MODULES}
    names = [f"c{i}" for i in range(t)]
    return AdapterStack(names=names, module_names=[], lora_config=LoraConfig(), weights=weights)


def test_every_delta_is_exact_in_core_space() -> None:
    stack = make_stack([4, 8, 4])  # heterogeneous ranks
    for m in MODULES:
        cs = core_space(stack.scaled_factors(m, torch.float64))
        assert cs.shape == (16, 16)  # Σr, never a dimension of the delta
        assert_close(cs.u_b.T @ cs.u_b, torch.eye(16, dtype=torch.float64))
        for t, core in enumerate(cs.cores):
            b, a = cs.matrix_to_full(core)
            assert_close(b @ a, stack.delta(m, t).double(), atol=1e-10, rtol=0)


def test_batched_core_spaces_equal_one_module_at_a_time() -> None:
    """Modules of one layout share a batched decomposition; each keeps its own numerical rank
    (here one module is rank-deficient: two identical adapters)."""
    stack = make_stack([4, 8, 4], seed=2)
    dup = make_stack([4, 4], seed=5).weights[MODULES[0]]
    sets = [stack.scaled_factors(m, torch.float64) for m in MODULES]
    sets.append([(a.double(), b.double() * s) for a, b, s in [dup[0], dup[0], dup[1]]])
    sets.append(stack.scaled_factors(MODULES[0], torch.float64)[:2])  # another layout
    batched = core_spaces(sets)
    assert [cs.shape for cs in batched] == [(16, 16), (16, 16), (8, 8), (12, 12)]
    for fac, cs in zip(sets, batched, strict=True):
        one = core_space(fac)
        assert cs.shape == one.shape
        for (b_core, a_core), (a, b) in zip(
            (cs.matrix_to_full(core) for core in cs.cores), fac, strict=True
        ):
            assert_close(b_core @ a_core, b @ a, atol=1e-10, rtol=0)
        # the same bases up to the sign of each direction
        assert_close((cs.u_b.T @ one.u_b).abs(), torch.eye(cs.shape[0], dtype=torch.float64))


def test_iter_core_spaces_covers_every_module_once_in_chunks() -> None:
    stack = make_stack([4, 8])
    seen = [m for m, _, _ in iter_core_spaces(stack, stack.module_names, batch=1)]
    assert sorted(seen) == sorted(MODULES)
    with pytest.raises(ValueError, match=r"batch must be a positive int, got batch=0"):
        next(iter_core_spaces(stack, stack.module_names, batch=0))
    with pytest.raises(ValueError, match=r"rtol must be in \[0, 1\), got rtol=2"):
        core_spaces([stack.scaled_factors(MODULES[0])], rtol=2)
    with pytest.raises(ValueError, match=r"factor_sets\[0\] is empty"):
        core_spaces([[]])


@pytest.mark.parametrize("space", MERGE_SPACES)
def test_linear_merges_equal_full_space(space: str) -> None:
    stack = make_stack([4, 8, 4, 8])
    full = merge_baseline(stack, "uniform", merge_space="full")
    other = merge_baseline(stack, "uniform", merge_space=space)
    for m in MODULES:
        assert_close(other.delta(m).double(), stack.deltas(m).double().mean(0), atol=1e-6, rtol=0)
        assert_close(other.delta(m), full.delta(m), atol=1e-6, rtol=0)
    assert other.info["truncation_error_max"] < 1e-6


@pytest.mark.parametrize("space", MERGE_SPACES)
@pytest.mark.parametrize("method", [m for m in BASELINES if m != "iso_c"])
def test_copies_give_the_adapter_in_every_space(method: str, space: str) -> None:
    stack = copies(4)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The density 1.0 is greater")
        merged = merge_baseline(stack, method, merge_space=space, density=1.0)
    for m in MODULES:
        target = stack.delta(m, 0).double()
        assert_close(
            merged.delta(m).double(), target, atol=1e-5 * float(target.abs().max()), rtol=0
        )


@pytest.mark.parametrize("method", ["tsv", "iso_c"])
def test_spectral_merges_are_the_same_in_every_space(method: str) -> None:
    stack = make_stack([4, 8, 4])
    merges = [merge_baseline(stack, method, merge_space=s) for s in MERGE_SPACES]
    for m in MODULES:
        for other in merges[1:]:
            assert_close(other.delta(m), merges[0].delta(m), atol=1e-5, rtol=0)


def _ties_reference(tensors: list[Tensor], density: float) -> Tensor:
    """TIES by hand: keep each task's top-density entries, elect the sign of the sum, average
    the kept entries that agree with it."""
    kept = []
    for x in tensors:
        k = int(density * x.numel())
        threshold = x.abs().flatten().kthvalue(x.numel() - k + 1).values if k else math.inf
        kept.append(torch.where(x.abs() >= threshold, x, torch.zeros_like(x)))
    stacked = torch.stack(kept)
    sign = torch.where(stacked.sum(0) >= 0, 1.0, -1.0).to(stacked.dtype)
    agree = (torch.sign(stacked) == sign) & (stacked != 0)
    return (stacked * agree).sum(0) / agree.sum(0).clamp_min(1)


def _cart_reference(tensors: list[Tensor], fraction: float) -> Tensor:
    mean = sum(tensors) / len(tensors)
    k = math.ceil(fraction * min(mean.shape))
    out = mean.clone()
    for x in tensors:
        u, s, vh = torch.linalg.svd(x - mean)
        out += u[:, :k] @ torch.diag(s[:k]) @ vh[:k]
    return out


def _bases(stack: AdapterStack, m: str) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Bases of span(B_cat) and span(A_catᵀ) and the cores, written out directly."""
    factors = stack.scaled_factors(m, torch.float64)
    b_cat = torch.cat([b for _, b in factors], dim=1)
    a_cat = torch.cat([a for a, _ in factors], dim=0)
    u_b = torch.linalg.svd(b_cat, full_matrices=False)[0]
    v_a = torch.linalg.svd(a_cat.T, full_matrices=False)[0]
    return u_b, v_a, [u_b.T @ (b @ a) @ v_a for a, b in factors]


@pytest.mark.parametrize("method", ["ties", "cart"])
def test_core_space_elementwise_merges_against_a_hand_reference(method: str) -> None:
    stack = make_stack([2, 3, 2], d_out=12, d_in=10, seed=3)
    merged = merge_baseline(stack, method, merge_space="core", density=0.3, cart_rank=0.3)
    for m in MODULES:
        u_b, v_a, cores = _bases(stack, m)
        ref = _ties_reference(cores, 0.3) if method == "ties" else _cart_reference(cores, 0.3)
        assert_close(merged.delta(m).double(), u_b @ ref @ v_a.T, atol=1e-5, rtol=0)
    full = merge_baseline(stack, method, merge_space="full", density=0.3, cart_rank=0.3)
    gap = float((full.delta(MODULES[0]) - merged.delta(MODULES[0])).abs().max())
    if method == "ties":  # element-wise in another basis: the Core Space variant, not full TIES
        assert gap > 1e-3
    else:  # CART is spectral: with the same k (3 of 10 here, 3 of 7 in core) it is the same merge
        assert gap < 1e-5


def test_tsv_and_iso_c_against_dense_references() -> None:
    stack = make_stack([2, 3], d_out=12, d_in=10, seed=5)
    tsv = merge_baseline(stack, "tsv", merge_space="core")
    iso = merge_baseline(stack, "iso_c", merge_space="core")
    for m in MODULES:
        deltas = [stack.delta(m, t).double() for t in range(2)]
        k = min(12, 10) // 2
        us, ss, vs = [], [], []
        for d in deltas:  # each task's top-k singular triplets (a rank-r delta has r of them)
            u, s, vh = torch.linalg.svd(d)
            q = min(k, int((s > 1e-10 * s[0]).sum()))
            us.append(u[:, :q])
            ss.append(s[:q])
            vs.append(vh[:q].T)

        def polar(x: Tensor) -> Tensor:
            p, s, qh = torch.linalg.svd(x, full_matrices=False)
            keep = s > 1e-10 * s[0]
            return p[:, keep] @ qh[keep]

        expected = polar(torch.cat(us, 1)) @ torch.diag(torch.cat(ss)) @ polar(torch.cat(vs, 1)).T
        assert_close(tsv.delta(m).double(), expected, atol=1e-5, rtol=0)
        u, s, vh = torch.linalg.svd(sum(deltas) / 2, full_matrices=False)
        nonzero = s > 1e-10 * s[0]
        iso_ref = s[nonzero].mean() * u[:, nonzero] @ vh[nonzero]
        assert_close(iso.delta(m).double(), iso_ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("rank", [2, 4, 8])
def test_cp_in_core_space_is_the_dense_decomposition(rank: int) -> None:
    stack = make_stack([4, 8, 4, 8], d_out=40, d_in=30)
    dense = cp_decompose(stack, rank, "dense", n_iter_max=25, tol=0)
    core = cp_decompose(stack, rank, "core", n_iter_max=25, tol=0)
    for m in MODULES:
        assert core[m].n_iter == dense[m].n_iter == 25
        assert core[m].fit_error == pytest.approx(dense[m].fit_error, abs=1e-9)
        assert_close(core[m].cp.weights, dense[m].cp.weights, atol=1e-6, rtol=0)
        for got, want in zip(core[m].cp.factors, dense[m].cp.factors, strict=True):
            assert_close(got, want, atol=1e-6, rtol=0)
    for rule in ("sum_components", "mean_loading"):
        a, b = merge_cp(stack, core, rule), merge_cp(stack, dense, rule)
        for m in MODULES:
            assert_close(a.delta(m), b.delta(m), atol=1e-5, rtol=0)


def test_an_all_zero_stack_merges_to_zero_everywhere() -> None:
    """Before: CP raised LinAlgError, TSV an IndexError, KnOTS/Iso-C returned rank-0 merges."""
    stack = make_stack([2, 2])
    for m in MODULES:
        stack.weights[m] = [(a * 0, b, s) for a, b, s in stack.weights[m]]
    for space in MERGE_SPACES:
        for method in BASELINES:
            merged = merge_baseline(stack, method, merge_space=space)
            for m in MODULES:
                b, a = merged.lowrank[m]
                assert (b.shape[1], a.shape[0]) == (1, 1), (method, space)
                assert float(merged.delta(m).abs().max()) == 0.0, (method, space)
    for engine in ("factored", "dense", "core"):
        cp = cp_decompose(stack, 2, engine)  # type: ignore[arg-type]
        for m in MODULES:
            assert float(cp[m].cp.weights.abs().max()) == 0.0 and cp[m].fit_error == 0.0
        merged = merge_cp(stack, cp, "mean_loading")
        assert all(float(merged.delta(m).abs().max()) == 0.0 for m in MODULES)


def test_bad_space_is_refused() -> None:
    with pytest.raises(ValueError, match=r"merge_space must be one of \('full', 'knots', 'core'\)"):
        merge_baseline(make_stack([2, 2]), "uniform", merge_space="tucker")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"cart_rank must be in \(0, 1\], got cart_rank=0"):
        merge_baseline(make_stack([2, 2]), "cart", cart_rank=0)


def test_cart_batched_over_modules_equals_cart_per_module() -> None:
    from tclora.merge import cart, cart_stacked

    g = torch.Generator().manual_seed(7)
    mats = torch.randn(5, 4, 6, 6, generator=g, dtype=torch.float64)  # 5 modules, T = 4
    batched = cart_stacked(mats, 0.3)
    for i in range(5):
        assert_close(batched[i], cart(list(mats[i]), 0.3), atol=1e-12, rtol=0)
    stack = make_stack([4, 8, 4])
    merged = merge_baseline(stack, "cart", merge_space="core", cart_rank=0.3)
    for m in MODULES:
        cs = core_space(stack.scaled_factors(m, torch.float64))
        b, a = cs.matrix_to_full(cart(cs.cores, 0.3))
        assert_close(merged.delta(m).double(), b @ a, atol=1e-5, rtol=1e-5)
