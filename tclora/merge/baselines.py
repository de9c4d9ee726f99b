"""Baseline merges of LoRA deltas, per module, under the scale convention of ``tclora.merge``.

At ``scale = 1`` T copies of one adapter merge back to it (up to the method's own trimming or
spectrum flattening), so every baseline is computed as a *mean*-like merge and the caller's
``scale`` multiplies it. Weights passed to peft's functions follow from that: ``1/T`` for the
summing methods (``task_arithmetic``, ``dare_linear``, ``magnitude_prune``), ``1`` for the
disjoint-mean ones (``ties``, ``dare_ties``), whose disjoint merge already averages.

The peft methods run on the dense ``ΔW_t`` (as peft's functions expect) and are then truncated
by SVD to ``rank``; KnOTS, TSV and Iso-C, which peft lacks, are computed from the factors in
low-rank form (exact, never wider than ``Σ_t r_t``).
"""

from __future__ import annotations

import time
from typing import Literal

import torch
from peft.utils import merge_utils
from torch import Tensor

from tclora.merge._linalg import lowrank_svd, truncate_svd
from tclora.merge.rules import MergedAdapter, _check_scale
from tclora.merge.stack import AdapterStack

__all__ = ["BASELINES", "iso_c", "knots_ties", "merge_baseline", "tsv"]

BASELINES = (
    "uniform",
    "ties",
    "dare_linear",
    "dare_ties",
    "magnitude_prune",
    "knots_ties",
    "tsv",
    "iso_c",
)
_PEFT_METHODS = ("uniform", "ties", "dare_linear", "dare_ties", "magnitude_prune")
LowRank = tuple[Tensor, Tensor]


def knots_ties(
    factors: list[tuple[Tensor, Tensor]],
    density: float,
    majority_sign_method: Literal["total", "frequency"] = "total",
) -> LowRank:
    """KnOTS-TIES (Stoica et al., 2025, "Model merging with SVD to tie the KnOTS", arXiv 2410.19735).

    SVD of the concatenated deltas ``[ΔW_1 … ΔW_T] = U S [V_1ᵀ … V_Tᵀ]`` puts every adapter in a
    shared basis ``U S``; TIES (peft's ``merge_utils.ties``, weights 1 → disjoint mean) merges the
    per-adapter right factors ``V_t``; the merge is ``U S V_mergedᵀ``. The SVD is taken from the
    factors: with ``A_tᵀ = Q_t R_t``, ``[ΔW_t]_t = [B̃_t R_tᵀ]_t · blockdiag(Q_tᵀ)``, so the SVD of
    the ``d_out × Σr`` matrix ``[B̃_t R_tᵀ]_t = U S Wᵀ`` gives ``V_t = Q_t W_t``.

    Args:
        factors: per adapter ``(A_t, B̃_t)``, scaling folded into ``B̃_t``.
        density: TIES density on the ``V_t`` entries.
        majority_sign_method: TIES sign election (``"total"`` or ``"frequency"``).

    Returns:
        ``(B', A')`` with the merged delta ``B' @ A'`` (scale 1).
    """
    qs, blocks = [], []
    for a, b in factors:
        q, r = torch.linalg.qr(a.T)
        qs.append(q)
        blocks.append(b @ r.T)
    u, s, wh = torch.linalg.svd(torch.cat(blocks, dim=1), full_matrices=False)
    keep = s > 1e-10 * s[0] if s[0] > 0 else s > 0
    u, s, wh = u[:, keep], s[keep], wh[keep]
    offsets = [0]
    for q in qs:
        offsets.append(offsets[-1] + q.shape[1])
    v_t = [qs[i] @ wh[:, offsets[i] : offsets[i + 1]].T for i in range(len(qs))]  # d_in × k
    weights = torch.ones(len(v_t), dtype=u.dtype, device=u.device)
    v_merged = merge_utils.ties(v_t, weights, density, majority_sign_method)
    return u * s, v_merged.T


def _polar(x: Tensor, rtol: float = 1e-10) -> Tensor:
    """Nearest partial isometry ``P Qᵀ`` of ``x`` (numerically null directions dropped)."""
    p, s, qh = torch.linalg.svd(x, full_matrices=False)
    keep = s > rtol * s[0] if s[0] > 0 else s > 0
    return p[:, keep] @ qh[keep]


def tsv(factors: list[tuple[Tensor, Tensor]], min_dim: int) -> LowRank:
    """TSV-Merge (Gargiulo et al., CVPR 2025, "Task Singular Vectors", arXiv 2412.00081).

    Each delta keeps its top ``k = max(1, min(d_out, d_in) // T)`` singular triplets (LoRA deltas
    have rank ``r_t``, so ``min(r_t, k)``); the task singular vectors are concatenated and
    decorrelated by their polar factors (``U_⊥ = P Qᵀ`` from ``SVD(U_cat) = P Σ Qᵀ``, same for
    ``V``); the merge is ``U_⊥ diag(S_cat) V_⊥ᵀ``. Orthogonal tasks give the sum of the deltas,
    identical ones give the delta itself (so no ``1/T`` is applied). Numerically null directions
    of ``U_cat``/``V_cat`` are dropped from the polar factor (the paper's full-rank setting has
    none; with duplicated adapters they would be arbitrary).

    Args:
        factors: per adapter ``(A_t, B̃_t)``.
        min_dim: ``min(d_out, d_in)`` of the module.

    Returns:
        ``(B', A')``.
    """
    k = max(1, min_dim // len(factors))
    us, ss, vs = [], [], []
    for a, b in factors:
        u, s, v = lowrank_svd(b, a)
        us.append(u[:, :k])
        ss.append(s[:k])
        vs.append(v[:, :k])
    u_o, v_o = _polar(torch.cat(us, dim=1)), _polar(torch.cat(vs, dim=1))
    return u_o * torch.cat(ss), v_o.T


def iso_c(factors: list[tuple[Tensor, Tensor]]) -> LowRank:
    """Iso-C (Marczak et al., ICML 2025, "No Task Left Behind: Isotropic Model Merging", arXiv 2502.04959).

    The merged delta's spectrum is flattened: ``SVD(mean_t ΔW_t) = U S Vᵀ`` → ``σ̄ U Vᵀ`` with
    ``σ̄`` the mean of its nonzero singular values (the paper flattens the task-arithmetic sum
    and tunes its scale; using the mean only moves that scale into ``scale``). It is the one
    baseline for which T copies of an adapter do not return the adapter: they return its
    isotropic version (same singular vectors, flat spectrum with the same trace norm).

    Args:
        factors: per adapter ``(A_t, B̃_t)``.

    Returns:
        ``(B', A')``.
    """
    t = len(factors)
    a_cat = torch.cat([a for a, _ in factors], dim=0)
    b_cat = torch.cat([b for _, b in factors], dim=1) / t
    u, s, v = lowrank_svd(b_cat, a_cat)
    return u * s.mean(), v.T


def _truncate_lowrank(b: Tensor, a: Tensor, rank: int) -> tuple[Tensor, Tensor, float]:
    """Cap a low-rank product at ``rank`` (best approximation) with its relative error."""
    if a.shape[0] <= rank:
        return b, a, 0.0
    u, s, v = lowrank_svd(b, a)
    total = float(torch.linalg.vector_norm(s))
    err = float(torch.linalg.vector_norm(s[rank:])) / total if total > 0 else 0.0
    return u[:, :rank] * s[:rank], v[:, :rank].T, err


def _peft_merge(
    method: str,
    deltas: list[Tensor],
    density: float,
    majority_sign_method: Literal["total", "frequency"],
) -> Tensor:
    t = len(deltas)
    mean_w = torch.full((t,), 1.0 / t, dtype=deltas[0].dtype, device=deltas[0].device)
    ones = torch.ones(t, dtype=deltas[0].dtype, device=deltas[0].device)
    if method == "uniform":
        return merge_utils.task_arithmetic(deltas, mean_w)
    if method == "magnitude_prune":
        return merge_utils.magnitude_prune(deltas, mean_w, density)
    if method == "dare_linear":
        return merge_utils.dare_linear(deltas, mean_w, density)
    if method == "ties":
        return merge_utils.ties(deltas, ones, density, majority_sign_method)
    return merge_utils.dare_ties(deltas, ones, density, majority_sign_method)


def merge_baseline(
    stack: AdapterStack,
    method: str,
    scale: float = 1.0,
    *,
    rank: int | None = None,
    density: float = 0.2,
    seed: int = 0,
    majority_sign_method: Literal["total", "frequency"] = "total",
) -> MergedAdapter:
    """Merge the adapters with a baseline, module by module, then express it as a LoRA.

    Methods: ``uniform`` (mean of ``ΔW_t``; peft ``task_arithmetic`` with weights ``1/T``),
    ``ties`` (Yadav et al., 2023; peft ``ties``), ``dare_linear`` / ``dare_ties`` (Yu et al., 2024;
    peft), ``magnitude_prune`` (peft), ``knots_ties``, ``tsv``, ``iso_c`` (see their functions).

    Args:
        stack: the adapters.
        method: a name in ``BASELINES``.
        scale: the scale ``λ`` applied to the merged delta (``λ = T`` makes uniform the sum).
        rank: rank of the returned LoRA (default ``Σ_t r_t`` capped at ``min(d_out, d_in)``);
            dense merges are truncated by SVD and the relative error is in ``info``.
        density: fraction kept by TIES / DARE / magnitude pruning / KnOTS-TIES, in ``(0, 1]``.
        seed: seed of DARE's random drops (module ``i`` uses ``seed + i``; global RNG untouched).
        majority_sign_method: TIES sign election.

    Returns:
        The merged adapter (float32 factors); ``info`` has ``seconds``, ``rank``,
        ``truncation_error`` (mean over modules) and ``truncation_error_max``.

    Raises:
        ValueError: unknown method, bad scale, rank or density.
    """
    if method not in BASELINES:
        raise ValueError(f"method must be one of {BASELINES}, got method={method!r}")
    _check_scale(scale)
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0):
        raise ValueError(f"rank must be a positive int or None, got rank={rank!r}")
    if not (isinstance(density, int | float) and 0 < density <= 1):
        raise ValueError(f"density must be in (0, 1], got density={density!r}")
    if majority_sign_method not in ("total", "frequency"):
        raise ValueError(
            f"majority_sign_method must be 'total' or 'frequency', got {majority_sign_method!r}"
        )
    start = time.perf_counter()
    lowrank: dict[str, tuple[Tensor, Tensor]] = {}
    errors: list[float] = []
    for i, module in enumerate(stack.module_names):
        d_out, d_in = stack.shape(module)
        k = min(rank if rank is not None else stack.total_rank(module), d_out, d_in)
        if method in _PEFT_METHODS:
            deltas = [stack.delta(module, t) for t in range(stack.num_adapters)]
            dev = deltas[0].device
            with torch.random.fork_rng(devices=[dev.index or 0] if dev.type == "cuda" else []):
                torch.manual_seed(seed + i)
                merged = _peft_merge(method, deltas, density, majority_sign_method)
            b, a, err = truncate_svd(merged.double(), k)
        else:
            fac = stack.scaled_factors(module, torch.float64)
            if method == "knots_ties":
                b, a = knots_ties(fac, density, majority_sign_method)
            elif method == "tsv":
                b, a = tsv(fac, min(d_out, d_in))
            else:
                b, a = iso_c(fac)
            b, a, err = _truncate_lowrank(b, a, k)
        errors.append(err)
        lowrank[module] = ((b * scale).float().contiguous(), a.float().contiguous())
    info = {
        "seconds": time.perf_counter() - start,
        "scale": float(scale),
        "rank": float(max(a.shape[0] for _, a in lowrank.values())),
        "truncation_error": sum(errors) / len(errors),
        "truncation_error_max": max(errors),
    }
    return MergedAdapter(method=method, scale=float(scale), lowrank=lowrank, info=info)
