"""Baseline merges: scale convention, peft's functions really used, KnOTS / TSV / Iso-C references."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from peft import LoraConfig
from peft.utils import merge_utils
from torch.testing import assert_close

from tclora.merge import BASELINES, AdapterStack, merge_baseline

MODULES = ("model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.o_proj")


pytestmark = pytest.mark.usefixtures("one_thread")


def random_adapter(r: int, d_out: int = 20, d_in: int = 16, seed: int = 0, scaling: float = 2.0):
    g = torch.Generator().manual_seed(seed)
    return {
        m: (torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g), scaling)
        for m in MODULES
    }


def make_stack(adapters) -> AdapterStack:
    weights = {m: [ad[m] for ad in adapters] for m in adapters[0]}
    return AdapterStack(
        names=[f"a{i}" for i in range(len(adapters))],
        module_names=[],
        lora_config=LoraConfig(),
        weights=weights,
    )


@pytest.fixture
def stack() -> AdapterStack:
    return make_stack([random_adapter(r, seed=s) for s, r in enumerate([2, 3, 2])])


@pytest.mark.parametrize("method", [m for m in BASELINES if m != "iso_c"])
def test_copies_merge_back_to_the_adapter(method: str) -> None:
    one = random_adapter(3, seed=4)
    copies = make_stack([one, one, one])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The density 1.0 is greater")
        merged = merge_baseline(copies, method, density=1.0)
    for m in MODULES:
        target = copies.delta(m, 0)
        assert_close(merged.delta(m), target, atol=1e-4 * float(target.abs().max()), rtol=0)
    assert merged.info["truncation_error"] == pytest.approx(0.0, abs=1e-6)


def test_iso_c_of_copies_is_the_isotropic_adapter() -> None:
    one = random_adapter(3, seed=4)
    copies = make_stack([one, one])
    merged = merge_baseline(copies, "iso_c")
    for m in MODULES:
        u, s, vh = torch.linalg.svd(copies.delta(m, 0).double())
        expected = s[:3].mean() * u[:, :3] @ vh[:3]
        assert_close(merged.delta(m).double(), expected, atol=1e-5, rtol=0)


def test_uniform_is_the_mean_and_scale_t_is_the_sum(stack: AdapterStack) -> None:
    mean = merge_baseline(stack, "uniform")
    total = merge_baseline(stack, "uniform", scale=3.0)
    for m in MODULES:
        assert_close(mean.delta(m), stack.deltas(m).mean(0), atol=1e-5, rtol=1e-5)
        assert_close(total.delta(m), stack.deltas(m).sum(0), atol=1e-5, rtol=1e-5)
    assert mean.info["rank"] == 7 and mean.info["truncation_error"] < 1e-6


@pytest.mark.parametrize(
    ("method", "fn", "weights"),
    [
        ("uniform", "task_arithmetic", "mean"),
        ("magnitude_prune", "magnitude_prune", "mean"),
        ("dare_linear", "dare_linear", "mean"),
        ("ties", "ties", "ones"),
        ("dare_ties", "dare_ties", "ones"),
        ("knots_ties", "ties", "ones"),
    ],
)
def test_baselines_go_through_peft(
    stack: AdapterStack, monkeypatch: pytest.MonkeyPatch, method: str, fn: str, weights: str
) -> None:
    calls: list[tuple[list[torch.Tensor], torch.Tensor, tuple]] = []
    original = getattr(merge_utils, fn)

    def spy(task_tensors, w, *args):
        calls.append((task_tensors, w, args))
        return original(task_tensors, w, *args)

    monkeypatch.setattr(merge_utils, fn, spy)
    merged = merge_baseline(stack, method, density=0.5, rank=20, seed=1)
    assert len(calls) == len(MODULES)
    for (tensors, w, args), m in zip(calls, MODULES, strict=True):
        assert len(tensors) == 3
        expected_w = torch.full((3,), 1 / 3) if weights == "mean" else torch.ones(3)
        assert_close(w.float(), expected_w)
        if method != "uniform":
            assert args[0] == 0.5  # density passed through
        if method in ("uniform", "ties", "magnitude_prune"):  # deterministic: rerun the call
            direct = original(tensors, w, *args)
            assert_close(merged.delta(m), direct, atol=1e-4, rtol=1e-4)


def test_ties_equals_peft_direct(stack: AdapterStack) -> None:
    merged = merge_baseline(stack, "ties", density=0.3)
    for m in MODULES:
        deltas = [stack.delta(m, t) for t in range(3)]
        direct = merge_utils.ties(deltas, torch.ones(3), 0.3, "total")
        u, s, vh = torch.linalg.svd(direct.double())
        k = 7
        assert_close(merged.delta(m).double(), (u[:, :k] * s[:k]) @ vh[:k], atol=1e-5, rtol=0)
        tail = float(s[k:].norm() / s.norm())
        assert merged.info["truncation_error_max"] >= tail - 1e-9


def test_dare_is_seeded_and_leaves_global_rng_alone(stack: AdapterStack) -> None:
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = merge_baseline(stack, "dare_ties", density=0.5, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    b = merge_baseline(stack, "dare_ties", density=0.5, seed=7)
    c = merge_baseline(stack, "dare_ties", density=0.5, seed=8)
    m = MODULES[0]
    assert torch.equal(a.delta(m), b.delta(m))
    assert not torch.allclose(a.delta(m), c.delta(m))


def test_truncation_error_is_reported(stack: AdapterStack) -> None:
    merged = merge_baseline(stack, "uniform", rank=2)
    errs = []
    for m in MODULES:
        mean = stack.deltas(m).double().mean(0)
        s = torch.linalg.svdvals(mean)
        errs.append(float(s[2:].norm() / s.norm()))
        assert merged.lowrank[m][1].shape == (2, 16)
        assert float((merged.delta(m).double() - mean).norm() / mean.norm()) == pytest.approx(
            errs[-1], rel=1e-4
        )
    assert merged.info["truncation_error"] == pytest.approx(sum(errs) / 2, rel=1e-4)
    assert merged.info["truncation_error_max"] == pytest.approx(max(errs), rel=1e-4)
    lowrank = merge_baseline(stack, "tsv", rank=3)
    assert lowrank.info["rank"] == 3 and lowrank.info["truncation_error"] > 0


def test_knots_matches_dense_reference(stack: AdapterStack) -> None:
    merged = merge_baseline(stack, "knots_ties", density=0.4)
    for m in MODULES:
        deltas = [stack.delta(m, t).double() for t in range(3)]
        u, s, vh = torch.linalg.svd(torch.cat(deltas, dim=1), full_matrices=False)
        k = int((s > 1e-6 * s[0]).sum())
        assert k == 7
        u, s, vh = u[:, :k], s[:k], vh[:k]
        v_t = [vh[:, 16 * t : 16 * (t + 1)].T for t in range(3)]
        # singular vectors have a sign freedom; align the factored ones to the dense ones
        b, a = (x.double() for x in merged.lowrank[m])
        signs = torch.sign(((b / s) * u).sum(0))
        v_merged = merge_utils.ties(
            [v * signs for v in v_t], torch.ones(3, dtype=torch.float64), 0.4
        )
        expected = (u * s * signs) @ v_merged.T
        assert_close(merged.delta(m).double(), expected, atol=1e-4, rtol=0)


def test_tsv_matches_dense_reference(stack: AdapterStack) -> None:
    merged = merge_baseline(stack, "tsv")
    for m in MODULES:
        us, ss, vs = [], [], []
        for t in range(3):
            u, s, vh = torch.linalg.svd(stack.delta(m, t).double(), full_matrices=False)
            k = min(16 // 3, [2, 3, 2][t])
            us.append(u[:, :k])
            ss.append(s[:k])
            vs.append(vh[:k].T)

        def polar(x: torch.Tensor) -> torch.Tensor:
            p, _, qh = torch.linalg.svd(x, full_matrices=False)
            return p @ qh

        expected = polar(torch.cat(us, 1)) @ torch.diag(torch.cat(ss)) @ polar(torch.cat(vs, 1)).T
        assert_close(merged.delta(m).double(), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(method="fisher"), r"method must be one of \('uniform', 'ties'.*got method='fisher'"),
        (dict(method="ties", rank=0), r"rank must be a positive int or None, got rank=0"),
        (dict(method="ties", density=0.0), r"density must be in \(0, 1\], got density=0.0"),
        (dict(method="ties", density=1.5), r"density must be in \(0, 1\], got density=1.5"),
        (dict(method="uniform", scale=math.nan), r"scale must be a finite number, got scale=nan"),
        (
            dict(method="ties", majority_sign_method="vote"),
            r"majority_sign_method must be 'total' or 'frequency', got 'vote'",
        ),
    ],
)
def test_baseline_errors(stack: AdapterStack, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        merge_baseline(stack, **kwargs)
