"""Baseline merges of LoRA deltas, per module, in full, KnOTS or core space.

Scale convention (as everywhere in ``tclora.merge``): at ``scale = 1`` T copies of one adapter
merge back to it, up to the method's own trimming or spectrum flattening (``dare_ties`` is the
exception: see :func:`merge_baseline`), so every baseline is computed as a *mean*-like merge and
the caller's ``scale`` multiplies it. Weights passed to peft's functions follow from that:
``1/T`` for the summing methods (``task_arithmetic``, ``dare_linear``, ``magnitude_prune``), ``1``
for the disjoint-mean ones (``ties``, ``dare_ties``), whose disjoint merge already averages.

Merge spaces (``merge_space``):

* ``"full"``: peft's ``merge_utils`` on the dense ``ΔW_t`` (the reference implementation), the
  result truncated by SVD to ``rank`` (its relative error is reported);
* ``"knots"``: the same functions on the per-adapter right factors of the KnOTS basis
  (``[ΔW_1 … ΔW_T] = U S [V_1ᵀ … V_Tᵀ]``, Stoica et al. 2025), merged as ``U S V_mergedᵀ``;
* ``"core"``: the same functions on the cores ``M_t`` of :mod:`tclora.merge.core`, mapped back
  (Panariello et al., 2025) -- exact for linear and spectral merges, the Core Space paper's
  variant for element-wise ones, and never larger than ``Σr × Σr``.

TSV and Iso-C are spectral (basis-invariant): they give the same merge in every space and are
computed from the core factors. KnOTS and core merges are exact low-rank products (rank ``≤ Σr``).
An all-zero stack merges to an all-zero delta (rank 1), in every space.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Literal, get_args

import torch
from peft.utils import merge_utils
from torch import Tensor

from tclora.merge._linalg import lowrank_svd, truncate_svd
from tclora.merge.core import CoreSpace, iter_core_spaces
from tclora.merge.rules import MergedAdapter, _check_scale
from tclora.merge.stack import AdapterStack

__all__ = [
    "BASELINES",
    "MERGE_SPACES",
    "Baseline",
    "MergeSpace",
    "cart",
    "cart_stacked",
    "iso_c",
    "knots_basis",
    "knots_ties",
    "merge_baseline",
    "tsv",
]

Baseline = Literal[
    "uniform",
    "ties",
    "dare_linear",
    "dare_ties",
    "magnitude_prune",
    "cart",
    "knots_ties",
    "tsv",
    "iso_c",
]
MergeSpace = Literal["full", "knots", "core"]
BASELINES: tuple[str, ...] = get_args(Baseline)
MERGE_SPACES: tuple[str, ...] = get_args(MergeSpace)
_ELEMENTWISE = ("uniform", "ties", "dare_linear", "dare_ties", "magnitude_prune", "cart")
_SPECTRAL = ("tsv", "iso_c")
_RANDOM = ("dare_linear", "dare_ties")
LowRank = tuple[Tensor, Tensor]


def knots_basis(factors: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, list[Tensor]]:
    """The KnOTS basis from the factors: ``[ΔW_1 … ΔW_T] = (U S) [V_1ᵀ … V_Tᵀ]``.

    With ``A_tᵀ = Q_t R_t``, ``[ΔW_t]_t = [B̃_t R_tᵀ]_t · blockdiag(Q_tᵀ)``, so the SVD of the
    ``d_out × Σr`` matrix ``[B̃_t R_tᵀ]_t = U S Wᵀ`` gives ``V_t = Q_t W_t`` (never a delta).

    Args:
        factors: per adapter ``(A_t, B̃_t)``, scaling folded into ``B̃_t``.

    Returns:
        ``(U S  d_out×k, [V_t  d_in×k per adapter])`` with ``ΔW_t = (U S) V_tᵀ``.
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
    v_t = [qs[i] @ wh[:, offsets[i] : offsets[i + 1]].T for i in range(len(qs))]
    return u * s, v_t


def cart(matrices: list[Tensor], rank_fraction: float, coefficient: float = 1.0) -> Tensor:
    """CART: centered arithmetic with rank-reduced task vectors (Choi et al., 2024, "Revisiting
    Weight Averaging for Model Merging", arXiv 2411.09263; shipped by the Core Space code).

    ``merged = τ̄ + coefficient · Σ_t SVD_k(τ_t − τ̄)`` with ``τ̄`` the mean and ``k =
    ceil(rank_fraction · min(shape))``: the mean plus the low-rank part of every task's
    deviation from it. T copies of one matrix give that matrix (every deviation is zero).

    Args:
        matrices: the task matrices (deltas, or their cores / KnOTS factors), one shape.
        rank_fraction: fraction of ``min(shape)`` kept of each deviation, in ``(0, 1]``.
        coefficient: weight of the deviations' low-rank sum.

    Returns:
        The merged matrix.
    """
    return cart_stacked(torch.stack(matrices), rank_fraction, coefficient)


def cart_stacked(stacked: Tensor, rank_fraction: float, coefficient: float = 1.0) -> Tensor:
    """:func:`cart` on stacked task matrices ``… × T × m × n`` (leading dimensions: independent
    modules of one shape, merged in one batched SVD).

    Args:
        stacked: the task matrices, tasks in dimension ``-3``.
        rank_fraction: fraction of ``min(m, n)`` kept of each deviation, in ``(0, 1]``.
        coefficient: weight of the deviations' low-rank sum.

    Returns:
        The merged matrices, ``… × m × n``.
    """
    mean = stacked.mean(-3, keepdim=True)
    k = max(1, math.ceil(rank_fraction * min(stacked.shape[-2:])))
    u, s, vh = torch.linalg.svd(stacked - mean, full_matrices=False)  # one batched SVD
    low = (u[..., :k] * s[..., None, :k]) @ vh[..., :k, :]
    return mean.squeeze(-3) + coefficient * low.sum(-3)


def knots_ties(
    factors: list[tuple[Tensor, Tensor]],
    density: float,
    majority_sign_method: Literal["total", "frequency"] = "total",
) -> LowRank:
    """KnOTS-TIES (Stoica et al., 2025, "Model merging with SVD to tie the KnOTS", arXiv 2410.19735).

    TIES (peft's ``merge_utils.ties``, weights 1 → disjoint mean) on the per-adapter right
    factors ``V_t`` of the shared basis ``U S`` (:func:`knots_basis`); the merge is
    ``U S V_mergedᵀ``. The same as ``merge_baseline(..., "ties", merge_space="knots")``.

    Args:
        factors: per adapter ``(A_t, B̃_t)``, scaling folded into ``B̃_t``.
        density: TIES density on the ``V_t`` entries.
        majority_sign_method: TIES sign election (``"total"`` or ``"frequency"``).

    Returns:
        ``(B', A')`` with the merged delta ``B' @ A'`` (scale 1).
    """
    us, v_t = knots_basis(factors)
    weights = torch.ones(len(v_t), dtype=us.dtype, device=us.device)
    v_merged = merge_utils.ties(v_t, weights, density, majority_sign_method)
    return us, v_merged.T


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


def _elementwise_merge(
    method: str,
    tensors: list[Tensor],
    density: float,
    majority_sign_method: Literal["total", "frequency"],
    cart_rank: float,
) -> Tensor:
    """peft's merge function for ``method`` (or :func:`cart`) on ``tensors``, mean-like."""
    t = len(tensors)
    mean_w = torch.full((t,), 1.0 / t, dtype=tensors[0].dtype, device=tensors[0].device)
    ones = torch.ones(t, dtype=tensors[0].dtype, device=tensors[0].device)
    if method == "uniform":
        return merge_utils.task_arithmetic(tensors, mean_w)
    if method == "magnitude_prune":
        return merge_utils.magnitude_prune(tensors, mean_w, density)
    if method == "dare_linear":
        return merge_utils.dare_linear(tensors, mean_w, density)
    if method == "ties":
        return merge_utils.ties(tensors, ones, density, majority_sign_method)
    if method == "dare_ties":
        return merge_utils.dare_ties(tensors, ones, density, majority_sign_method)
    return cart(tensors, cart_rank)


def _zero(d_out: int, d_in: int) -> LowRank:
    """The all-zero merge as a rank-1 LoRA."""
    return torch.zeros(d_out, 1, dtype=torch.float64), torch.zeros(1, d_in, dtype=torch.float64)


def _with_batched_cart(
    items: Iterable[tuple[str, list[tuple[Tensor, Tensor]], CoreSpace]],
    rank_fraction: float,
    batch: int = 32,
) -> Iterator[tuple[str, list[tuple[Tensor, Tensor]], CoreSpace, Tensor | None]]:
    """CART's merged core for every module, computed ``batch`` modules of one core shape at a
    time (one batched SVD of all their deviations; per module, ``cart`` would be one each)."""
    buffer: list[tuple[str, list[tuple[Tensor, Tensor]], CoreSpace]] = []

    def flush() -> Iterator[tuple[str, list[tuple[Tensor, Tensor]], CoreSpace, Tensor | None]]:
        if min(buffer[0][2].shape) == 0:  # all-zero modules: nothing to merge
            merged: list[Tensor | None] = [None] * len(buffer)
        else:
            cores = torch.stack([torch.stack(cs.cores) for _, _, cs in buffer])
            merged = list(cart_stacked(cores, rank_fraction))
        for (module, fac, cs), core in zip(buffer, merged, strict=True):
            yield module, fac, cs, core

    for item in items:
        if buffer and (item[2].shape != buffer[0][2].shape or len(buffer) == batch):
            yield from flush()
            buffer = []
        buffer.append(item)
    if buffer:
        yield from flush()


def _merge_module(
    method: str,
    space: str,
    fac: list[tuple[Tensor, Tensor]],
    cs: CoreSpace | None,
    shape: tuple[int, int],
    k: int,
    merge: Callable[[list[Tensor]], Tensor],
    full_deltas: Callable[[], list[Tensor]],
    merged_core: Tensor | None = None,
) -> tuple[Tensor, Tensor, float]:
    """One module's merge in ``space`` as ``(B', A', truncation error)`` (float64, scale 1);
    spectral and core-space merges use ``cs`` (the module's core space), full space merges
    ``full_deltas()`` (the dense deltas, as peft's functions expect them)."""
    d_out, d_in = shape
    if all(float(b.abs().max()) == 0.0 or float(a.abs().max()) == 0.0 for a, b in fac):
        b0, a0 = _zero(d_out, d_in)
        return b0, a0, 0.0
    if cs is not None:
        if method == "tsv":
            b, a = cs.to_full(*tsv(cs.factors, min(d_out, d_in)))
        elif method == "iso_c":
            b, a = cs.to_full(*iso_c(cs.factors))
        else:
            core = merged_core if merged_core is not None else merge(cs.cores)
            b, a = cs.matrix_to_full(core)
        return _truncate_lowrank(b, a, k)
    if space == "knots":
        us, v_t = knots_basis(fac)
        return _truncate_lowrank(us, merge(v_t).T, k)
    return truncate_svd(merge(full_deltas()).double(), k)


def merge_baseline(
    stack: AdapterStack,
    method: str,
    scale: float = 1.0,
    *,
    merge_space: MergeSpace = "full",
    rank: int | None = None,
    density: float = 0.2,
    seed: int = 0,
    majority_sign_method: Literal["total", "frequency"] = "total",
    cart_rank: float = 0.1,
) -> MergedAdapter:
    """Merge the adapters with a baseline, module by module, then express it as a LoRA.

    Methods: ``uniform`` (mean of the task matrices; peft ``task_arithmetic`` with weights
    ``1/T``), ``ties`` (Yadav et al., 2023; peft ``ties``), ``dare_linear`` / ``dare_ties`` (Yu et
    al., 2024; peft), ``magnitude_prune`` (peft), ``cart`` (:func:`cart`), ``knots_ties`` (TIES in
    KnOTS space, whatever ``merge_space`` says), ``tsv``, ``iso_c`` (spectral: the same in every
    space). ``dare_ties`` is not scale-correct: DARE rescales the kept entries by ``1/density``
    and the disjoint *mean* does not undo it, so T copies of an adapter merge to about
    ``(1 − (1 − density)^T) / density`` times it on the kept entries (≈ 3× at density 0.2,
    T = 4); the study's scale selection absorbs that, and ``merge_report`` shows it.

    Args:
        stack: the adapters.
        method: a name in ``BASELINES``.
        scale: the scale ``λ`` applied to the merged delta (``λ = T`` makes uniform the sum).
        merge_space: ``"full"`` (dense deltas), ``"knots"`` or ``"core"`` (see the module doc).
        rank: rank of the returned LoRA (default ``Σ_t r_t`` capped at ``min(d_out, d_in)``);
            a merge of higher rank is truncated by SVD and the relative error is in ``info``.
        density: fraction kept by TIES / DARE / magnitude pruning, in ``(0, 1]``.
        seed: seed of DARE's random drops (module ``i`` uses ``seed + i``; global RNG untouched).
        majority_sign_method: TIES sign election.
        cart_rank: CART's kept fraction of each deviation's rank, in ``(0, 1]``.

    Returns:
        The merged adapter (float32 factors); ``info`` has ``seconds``, ``rank``,
        ``truncation_error`` (mean over modules), ``truncation_error_max`` and ``space``
        (0 full, 1 knots, 2 core).

    Raises:
        ValueError: unknown method or space, bad scale, rank, density or cart_rank.
    """
    if method not in BASELINES:
        raise ValueError(f"method must be one of {BASELINES}, got method={method!r}")
    if merge_space not in MERGE_SPACES:
        raise ValueError(f"merge_space must be one of {MERGE_SPACES}, got {merge_space!r}")
    _check_scale(scale)
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0):
        raise ValueError(f"rank must be a positive int or None, got rank={rank!r}")
    if not (isinstance(density, int | float) and 0 < density <= 1):
        raise ValueError(f"density must be in (0, 1], got density={density!r}")
    if not (isinstance(cart_rank, int | float) and 0 < cart_rank <= 1):
        raise ValueError(f"cart_rank must be in (0, 1], got cart_rank={cart_rank!r}")
    if majority_sign_method not in ("total", "frequency"):
        raise ValueError(
            f"majority_sign_method must be 'total' or 'frequency', got {majority_sign_method!r}"
        )
    space = "knots" if method == "knots_ties" else merge_space
    inner = "ties" if method == "knots_ties" else method
    start = time.perf_counter()
    lowrank: dict[str, tuple[Tensor, Tensor]] = {}
    errors: list[float] = []
    names = stack.module_names
    index = {m: i for i, m in enumerate(names)}
    items: Iterable[tuple[str, list[tuple[Tensor, Tensor]], CoreSpace | None, Tensor | None]]
    if inner == "cart" and space == "core":  # bases and CART's SVDs batched by layout
        items = _with_batched_cart(iter_core_spaces(stack, names, torch.float64), cart_rank)
    elif inner in _SPECTRAL or space == "core":
        items = ((m, f, cs, None) for m, f, cs in iter_core_spaces(stack, names, torch.float64))
    else:
        items = ((m, stack.scaled_factors(m, torch.float64), None, None) for m in names)
    for module, fac, cs, merged_core in items:
        i = index[module]
        d_out, d_in = stack.shape(module)
        k = min(rank if rank is not None else stack.total_rank(module), d_out, d_in)
        dev = fac[0][0].device

        def merge(
            tensors: list[Tensor], module_index: int = i, device: torch.device = dev
        ) -> Tensor:
            if inner not in _RANDOM:
                return _elementwise_merge(inner, tensors, density, majority_sign_method, cart_rank)
            cuda = []
            if device.type == "cuda":
                cuda = [device.index if device.index is not None else torch.cuda.current_device()]
            with torch.random.fork_rng(devices=cuda):
                # the CPU generator (and the module's own GPU's, which need not be the current
                # one): torch.manual_seed would also queue seeds for every lazy backend, 1 ms a
                # module
                torch.random.default_generator.manual_seed(seed + module_index)
                if cuda:
                    torch.cuda.default_generators[cuda[0]].manual_seed(seed + module_index)
                return _elementwise_merge(inner, tensors, density, majority_sign_method, cart_rank)

        def deltas(module_name: str = module) -> list[Tensor]:
            return [stack.delta(module_name, t) for t in range(stack.num_adapters)]

        b, a, err = _merge_module(
            inner, space, fac, cs, (d_out, d_in), k, merge, deltas, merged_core
        )
        errors.append(err)
        lowrank[module] = ((b * scale).float().contiguous(), a.float().contiguous())
    info = {
        "seconds": time.perf_counter() - start,
        "scale": float(scale),
        "rank": float(max(a.shape[0] for _, a in lowrank.values())),
        "truncation_error": sum(errors) / len(errors),
        "truncation_error_max": max(errors),
        "space": float(MERGE_SPACES.index(space)),
    }
    return MergedAdapter(method=method, scale=float(scale), lowrank=lowrank, info=info)
