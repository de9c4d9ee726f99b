"""Joint CP of stacked LoRA deltas: known-rank recovery, factored == dense tensorly, fold-in."""

from __future__ import annotations

import math

import pytest
import tensorly as tl
import torch
from peft import LoraConfig
from torch.testing import assert_close

from tclora.merge import AdapterStack, cp_decompose, fold_in

pytestmark = pytest.mark.usefixtures("one_thread")


MODULES = ("model.layers.0.mlp.up_proj", "model.layers.0.self_attn.q_proj")


def random_stack(
    ranks: list[int], d_out: int = 24, d_in: int = 20, seed: int = 0, modules=MODULES
) -> AdapterStack:
    g = torch.Generator().manual_seed(seed)
    weights = {
        m: [
            (torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g), 0.5 + 0.25 * i)
            for i, r in enumerate(ranks)
        ]
        for m in modules
    }
    names = [f"a{i}" for i in range(len(ranks))]
    return AdapterStack(names=names, module_names=[], lora_config=LoraConfig(), weights=weights)


def cp_rank_stack(t: int = 4, rank: int = 3, d_out: int = 16, d_in: int = 12, seed: int = 0):
    """Adapters whose stacked deltas have exact CP rank ``rank``: ΔW_t = U diag(c_t) Vᵀ."""
    g = torch.Generator().manual_seed(seed)
    c = torch.rand(t, rank, generator=g, dtype=torch.float64) + 0.2
    u = torch.randn(d_out, rank, generator=g, dtype=torch.float64)
    v = torch.randn(d_in, rank, generator=g, dtype=torch.float64)
    weights = {m: [(v.T.clone(), u * c[i], 1.0) for i in range(t)] for m in MODULES}
    stack = AdapterStack(
        names=[f"a{i}" for i in range(t)],
        module_names=[],
        lora_config=LoraConfig(),
        weights=weights,
    )
    return stack, (c, u, v)


def dense_tensor_of(cp) -> torch.Tensor:
    with tl.backend_context("pytorch"):
        return tl.cp_to_tensor(cp)


@pytest.mark.parametrize("engine", ["factored", "dense"])
def test_known_cp_rank_is_recovered(engine: str) -> None:
    stack, (c, u, v) = cp_rank_stack()
    res = cp_decompose(stack, 3, engine, n_iter_max=500, tol=1e-14)
    for module in MODULES:
        r = res[module]
        assert r.fit_error <= 1e-4
        x = stack.deltas(module).double()
        assert_close(dense_tensor_of(r.cp), x, atol=1e-4 * float(x.abs().max()), rtol=0)
        # every true output factor is matched by one recovered unit column (up to sign)
        u_hat = r.cp.factors[1]
        cos = (u / u.norm(dim=0)).T @ u_hat
        assert_close(
            cos.abs().max(dim=1).values, torch.ones(3, dtype=torch.float64), atol=1e-4, rtol=0
        )
        # normalised output: unit columns, λ descending, loadings summing non-negatively
        for f in r.cp.factors:
            assert_close(f.norm(dim=0), torch.ones(3, dtype=torch.float64))
        assert bool((r.cp.weights[:-1] >= r.cp.weights[1:]).all())
        assert bool((r.cp.factors[0].sum(0) >= 0).all())
        assert r.norm == pytest.approx(float(x.norm()), rel=1e-12)


@pytest.mark.parametrize("init", ["svd", "random"])
@pytest.mark.parametrize("rank", [4, 7])  # 7 > T: SVD init is padded with random columns
def test_factored_follows_dense_iterates(init: str, rank: int) -> None:
    stack = random_stack([2, 3, 4, 3, 2])
    kw = dict(n_iter_max=10, tol=0.0, init=init, seed=3)
    fac = cp_decompose(stack, rank, "factored", **kw)
    den = cp_decompose(stack, rank, "dense", **kw)
    for module in MODULES:
        f, d = fac[module], den[module]
        assert f.n_iter == d.n_iter == 10
        assert f.fit_error == pytest.approx(d.fit_error, rel=1e-9)
        for a, b in zip([f.cp.weights, *f.cp.factors], [d.cp.weights, *d.cp.factors], strict=True):
            assert float((a - b).norm() / b.norm()) <= 1e-6


def test_factored_follows_dense_stopping_rule() -> None:
    # modules of one shape run batched; each must still stop on its own sweep
    modules = tuple(f"model.layers.{i}.self_attn.q_proj" for i in range(4))
    stack = random_stack([3, 3, 3], modules=modules)
    fac = cp_decompose(stack, 3, "factored", n_iter_max=200, tol=1e-6)
    den = cp_decompose(stack, 3, "dense", n_iter_max=200, tol=1e-6)
    for module in modules:
        assert 2 <= fac[module].n_iter == den[module].n_iter < 200
        assert fac[module].fit_error == pytest.approx(den[module].fit_error, abs=1e-9)
        assert_close(fac[module].cp.factors[1], den[module].cp.factors[1], atol=1e-6, rtol=0)
    assert len({fac[m].n_iter for m in modules}) > 1


def test_float32_and_seed_determinism() -> None:
    stack = random_stack([2, 2, 2])
    a = cp_decompose(stack, 2, init="random", seed=5, n_iter_max=20, dtype=torch.float32)
    b = cp_decompose(stack, 2, init="random", seed=5, n_iter_max=20, dtype=torch.float32)
    c = cp_decompose(stack, 2, init="random", seed=6, n_iter_max=20, dtype=torch.float32)
    m = MODULES[0]
    assert a[m].cp.weights.dtype == torch.float32
    assert_close(a[m].cp.factors[1], b[m].cp.factors[1], rtol=0, atol=0)
    assert not torch.equal(a[m].cp.factors[1], c[m].cp.factors[1])
    d64 = cp_decompose(stack, 2, init="random", seed=5, n_iter_max=20)
    assert a[m].fit_error == pytest.approx(d64[m].fit_error, abs=1e-3)


def test_tensorly_backend_is_not_leaked() -> None:
    before = tl.get_backend()
    cp_decompose(random_stack([2, 2]), 2, "dense", n_iter_max=2)
    assert tl.get_backend() == before


def test_rank_above_stack_rank_is_clamped_with_warning() -> None:
    stack = random_stack([1, 2])
    with pytest.warns(
        UserWarning, match=r"rank=9 exceeds the CP rank the stack can have \(Σ_t r_t = \[3\]\)"
    ):
        res = cp_decompose(stack, 9, n_iter_max=5)
    assert all(r.cp.weights.shape == (3,) and r.rank_requested == 9 for r in res.values())
    # the core engine is bound by the core's dimensions too (d_out = 3 < Σr = 7): said, not silent
    small = random_stack([2, 4, 1], d_out=3, d_in=4)
    with pytest.warns(
        UserWarning,
        match=r"rank=5 exceeds what engine='core' can fit \(the core's dimensions min\(k_B, k_A\), "
        r"at most Σ_t r_t = \[3\]\) on 2 module\(s\)",
    ):
        res = cp_decompose(small, 5, n_iter_max=5, engine="core")
    assert all(r.cp.weights.shape == (3,) for r in res.values())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(rank=0), r"rank must be a positive int, got rank=0"),
        (dict(rank=-2), r"rank must be a positive int, got rank=-2"),
        (dict(rank=2.5), r"rank must be a positive int, got rank=2.5"),
        (
            dict(rank=2, engine="numpy"),
            r"engine must be one of \['factored', 'dense', 'core'\], got engine='numpy'",
        ),
        (dict(rank=2, init="nvecs"), r"init must be 'svd' or 'random', got init='nvecs'"),
        (dict(rank=2, n_iter_max=0), r"n_iter_max must be an int ≥ 1, got n_iter_max=0"),
        (dict(rank=2, tol=-1.0), r"tol must be a finite number ≥ 0, got tol=-1.0"),
        (dict(rank=2, dtype=torch.int64), r"dtype must be torch.float32 or torch.float64"),
    ],
)
def test_cp_decompose_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        cp_decompose(random_stack([2, 2]), **kwargs)


# --------------------------------------------------------------------------------- fold-in
def test_fold_in_of_stack_member_recovers_its_loadings_exact() -> None:
    stack, _ = cp_rank_stack(t=4, rank=3)
    res = cp_decompose(stack, 3, n_iter_max=500, tol=1e-14)
    ext, residual = fold_in(res, {m: stack.factors(m)[2] for m in MODULES})
    for m in MODULES:
        assert residual[m] <= 1e-6
        c_ext = ext[m].cp.factors[0]
        assert c_ext.shape == (5, 3)
        assert_close(c_ext[4], c_ext[2], atol=1e-6, rtol=0)
        assert_close(c_ext.norm(dim=0), torch.ones(3, dtype=torch.float64))
        # same tensor as before for the old adapters: λ_ext c_ext[:4] == λ c
        assert_close(ext[m].cp.weights * c_ext[:4], res[m].cp.weights * res[m].cp.factors[0])
        assert ext[m].fit_error <= 1e-4


def test_fold_in_of_stack_member_matches_converged_loadings() -> None:
    stack = random_stack([2, 3, 2, 3])
    res = cp_decompose(stack, 3, n_iter_max=3000, tol=1e-15)
    ext, residual = fold_in(res, {m: stack.factors(m)[1] for m in MODULES})
    for m in MODULES:
        lam, (c, _, _) = res[m].cp
        lam_e, (c_e, _, _) = ext[m].cp
        assert_close(lam_e * c_e[4], lam * c[1], atol=1e-4 * float(lam.max()), rtol=0)
        assert 0 < residual[m] < 1


def test_fold_in_new_adapter_fit_error_matches_dense() -> None:
    stack = random_stack([2, 2, 2])
    new = random_stack([3, 3], seed=9)
    res = cp_decompose(stack, 4, n_iter_max=50)
    factors = {m: new.factors(m)[0] for m in MODULES}
    ext, residual = fold_in(res, factors)
    for m in MODULES:
        a, b, s = factors[m]
        x_new = (s * b @ a).double()
        x = torch.cat([stack.deltas(m).double(), x_new[None]])
        rec = dense_tensor_of(ext[m].cp)
        assert ext[m].fit_error == pytest.approx(float((x - rec).norm() / x.norm()), rel=1e-8)
        assert residual[m] == pytest.approx(
            float((x_new - rec[-1]).norm() / x_new.norm()), rel=1e-8
        )


def test_fold_in_errors() -> None:
    stack = random_stack([2, 2])
    res = cp_decompose(stack, 2, n_iter_max=5)
    good = {m: stack.factors(m)[0] for m in MODULES}
    with pytest.raises(
        ValueError, match=r"module sets differ: only in cp: \['model.layers.0.self_attn.q_proj'\]"
    ):
        fold_in(res, {MODULES[0]: good[MODULES[0]]})
    bad_shape = {**good, MODULES[0]: (torch.randn(2, 7), torch.randn(24, 2), 1.0)}
    with pytest.raises(
        ValueError, match=r"shapes differ on module 'model.layers.0.mlp.up_proj'.*24×20"
    ):
        fold_in(res, bad_shape)
    a = torch.randn(2, 20)
    a[0, 0] = math.nan
    with pytest.raises(
        ValueError, match=r"non-finite weights \(nan/inf\) in the new adapter, module"
    ):
        fold_in(res, {**good, MODULES[1]: (a, torch.randn(24, 2), 1.0)})


@pytest.mark.parametrize(("copies", "r", "rank"), [(4, 3, 4), (4, 1, 3)])
def test_copies_of_one_adapter_decompose_instead_of_failing(copies: int, r: int, rank: int) -> None:
    """Before: the SVD start gave the loadings zero columns, and the factored engine's solve
    failed on the singular Gram matrix (tensorly's dense engine fitted the same stack)."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(r, 20, generator=g), torch.randn(24, r, generator=g)
    weights = {m: [(a.clone(), b.clone(), 1.0) for _ in range(copies)] for m in MODULES}
    names = [f"a{i}" for i in range(copies)]
    stack = AdapterStack(names=names, module_names=[], lora_config=LoraConfig(), weights=weights)
    for dtype in (torch.float32, torch.float64):
        for result in cp_decompose(stack, rank, n_iter_max=20, dtype=dtype).values():
            assert result.fit_error < 1e-3
