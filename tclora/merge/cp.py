"""Joint CP decomposition of stacked LoRA deltas, per module, with two engines.

For one module the T adapters' deltas ``ΔW_t = s_t B_t A_t`` form ``X`` (``T × d_out × d_in``) and
a rank-``R`` CP model ``X ≈ Σ_q λ_q c_q ⊗ u_q ⊗ v_q`` gives task loadings ``C`` (``T × R``), output
factors ``U`` (``d_out × R``) and input factors ``V`` (``d_in × R``).

Engines:
    ``"dense"``: ``tensorly.decomposition.parafac`` on the dense tensor (the reference; PyTorch
        backend set with ``tl.backend_context`` for the call only, so tensorly's global backend is
        left as it was).
    ``"factored"``: the same ALS sweeps with every product computed from ``A_t`` and ``B_t``:
        ``O(Σr·(d_in + d_out)·R)`` per sweep instead of ``O(T·d_out·d_in·R)`` and memory
        ``O((d_in + d_out)·(Σr + R))`` instead of ``O(T·d_out·d_in)``. From the same initial factors
        it reproduces tensorly's iterates (same mode order, same normal equations, same error
        formula and stopping rule); its SVD initialisation is computed exactly from the factors
        (a Tucker compression ``X = K ×₂ Q_B ×₃ Q_A``), its random one draws the same numbers.

Results are normalised: unit-norm columns in ``C``, ``U``, ``V``; the magnitudes in ``λ``;
each loading column oriented so that ``Σ_t c_tq ≥ 0`` (then the largest ``|u_q|`` entry positive,
with ``v_q`` flipped alongside); components sorted by ``λ`` descending.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np
import tensorly as tl
import torch
from tensorly.cp_tensor import CPTensor
from torch import Tensor

from tclora.merge.core import iter_core_spaces
from tclora.merge.stack import AdapterStack

__all__ = [
    "ENGINES",
    "Engine",
    "CPResult",
    "cp_decompose",
    "fold_in",
]

Engine = Literal["factored", "dense", "core"]
ENGINES: tuple[str, ...] = get_args(Engine)
_BATCH_BYTES = 256 * 2**20  # factored engine: modules of one shape are run together up to this size
Init = Literal["svd", "random"]


@dataclass
class CPResult:
    """CP decomposition of one module's stacked deltas.

    Attributes:
        cp: ``CPTensor((λ, [C, U, V]))``, normalised (unit columns, magnitudes in ``λ``).
        fit_error: relative error ``‖X − [[λ; C, U, V]]‖_F / ‖X‖_F``.
        n_iter: ALS sweeps run.
        norm: ``‖X‖_F`` (used by ``fold_in`` to update ``fit_error``).
        rank_requested: the rank asked for (``cp.rank`` is smaller when it was clamped).
    """

    cp: CPTensor
    fit_error: float
    n_iter: int
    norm: float = math.nan
    rank_requested: int = 0

    @property
    def weights(self) -> Tensor:
        """``λ`` (length ``R``)."""
        return self.cp.weights

    @property
    def loadings(self) -> Tensor:
        """``C`` (``T × R``), unit columns."""
        return self.cp.factors[0]

    def _congruence(self) -> Tensor:
        """The ``R × R`` matrix ``(CᵀC) ∗ (UᵀU) ∗ (VᵀV)``: with unit columns, the components'
        triple congruences (1 on the diagonal for nonzero components)."""
        _, (c, u, v) = self.cp
        return (c.T @ c) * (u.T @ u) * (v.T @ v)

    @property
    def energy_ratio(self) -> float:
        """``Σ_q λ_q² / ‖X̂‖²`` with ``X̂`` the CP reconstruction: 1 for orthogonal components,
        well above 1 when components cancel each other (a degenerate, non-unique decomposition:
        typically ``R`` above the tensor's CP rank). ``NaN`` for a zero decomposition."""
        lam = self.cp.weights
        recon = float((lam[:, None] * lam[None, :] * self._congruence()).sum())
        return float((lam**2).sum()) / recon if recon > 0 else math.nan

    @property
    def min_congruence(self) -> float:
        """Smallest ``cos(c_p, c_q) cos(u_p, u_q) cos(v_p, v_q)`` over component pairs: near −1
        when two components nearly cancel (the classic CP-degeneracy sign); 0 for ``R = 1``."""
        if self.cp.weights.shape[0] < 2:
            return 0.0
        phi = self._congruence()
        phi.fill_diagonal_(math.inf)
        return float(phi.min())


# --------------------------------------------------------------------------- public entry
def cp_decompose(
    stack: AdapterStack,
    rank: int,
    engine: Engine = "factored",
    *,
    n_iter_max: int = 100,
    tol: float = 1e-8,
    init: Init = "svd",
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> dict[str, CPResult]:
    """Rank-``rank`` CP decomposition of every module's stacked deltas.

    Args:
        stack: the adapters.
        rank: CP rank ``R`` (≥ 1). A module's stack has CP rank at most ``Σ_t r_t``; a larger
            ``rank`` is clamped to ``Σ_t r_t`` for that module with a ``UserWarning`` (the extra
            components could only be degenerate).
        engine: ``"factored"`` (ALS from the LoRA factors, never builds ``ΔW``), ``"core"`` (the
            same ALS on the ``T × k_B × k_A`` core tensor of :mod:`tclora.merge.core`, ``U`` and
            ``V`` mapped back: the same decomposition, at the cost of a tensor of ``T·(Σr)²``
            entries) or ``"dense"`` (tensorly ``parafac`` on the dense stack, the reference).
            A module whose deltas are all zero gets the zero decomposition (``λ = 0``).
        n_iter_max: maximum ALS sweeps (≥ 1).
        tol: stop when the relative error changes by less than ``tol`` between sweeps
            (tensorly's ``abs_rec_error`` criterion); ``0`` runs all ``n_iter_max`` sweeps.
        init: ``"svd"`` (leading singular vectors of each unfolding) or ``"random"``
            (``numpy.random.RandomState(seed)`` uniform draws, as tensorly).
        seed: random state for ``init="random"`` and for padding an SVD init (``R > T``).
        dtype: computation dtype (``torch.float64`` or ``torch.float32``).

    Returns:
        ``module -> CPResult`` for every module of the stack.

    Raises:
        ValueError: bad ``rank``, ``engine``, ``init``, ``n_iter_max``, ``tol`` or ``dtype``.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"rank must be a positive int, got rank={rank!r}")
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {list(ENGINES)}, got engine={engine!r}")
    if init not in ("svd", "random"):
        raise ValueError(f"init must be 'svd' or 'random', got init={init!r}")
    if isinstance(n_iter_max, bool) or not isinstance(n_iter_max, int) or n_iter_max < 1:
        raise ValueError(f"n_iter_max must be an int ≥ 1, got n_iter_max={n_iter_max!r}")
    if not (math.isfinite(tol) and tol >= 0):
        raise ValueError(f"tol must be a finite number ≥ 0, got tol={tol!r}")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got dtype={dtype}")

    clamped: dict[str, int] = {}
    groups: dict[tuple[Any, ...], list[str]] = {}
    for module in stack.module_names:
        cap = stack.total_rank(module)
        if cap < rank:
            clamped[module] = cap
        key = (stack.shape(module), tuple(stack.ranks(module)), min(rank, cap))
        groups.setdefault(key, []).append(module)
    raw: dict[str, tuple[list[Tensor], list[float], float]] = {}
    for (shape, ranks, r_eff), modules in groups.items():
        zero = [m for m in modules if _is_zero(stack.scaled_factors(m, dtype))]
        for module in zero:
            raw[module] = _zero_raw(stack.num_adapters, shape, r_eff, dtype)
        modules = [m for m in modules if m not in set(zero)]
        if not modules:
            continue
        if engine == "core":
            core = _cp_als_core(stack, modules, r_eff, n_iter_max, tol, init, seed, dtype)
            for module, ((c, _, _), _, _) in core.items():
                if c.shape[1] < r_eff:  # the core's own dimensions bound it further
                    clamped[module] = int(c.shape[1])
            raw.update(core)
            continue
        if engine == "dense":
            for module in modules:
                raw[module] = _cp_als_dense(
                    stack.scaled_factors(module, dtype),
                    r_eff,
                    n_iter_max=n_iter_max,
                    tol=tol,
                    init=init,
                    seed=seed,
                )
            continue
        per_module = 8 * sum(ranks) * (shape[0] + shape[1]) * 2  # bytes: factors + B_catᵀU etc.
        size = max(1, _BATCH_BYTES // per_module)
        for i in range(0, len(modules), size):
            chunk = modules[i : i + size]
            a, b = _fill(stack, chunk, dtype)
            outs = _als_batched(a, b, ranks, r_eff, n_iter_max, tol, init, seed)
            del a, b
            raw.update(zip(chunk, outs, strict=True))
    results: dict[str, CPResult] = {}
    for module in stack.module_names:
        (c, u, v), errors, norm = raw[module]
        results[module] = CPResult(
            cp=normalize_cp(c, u, v),
            fit_error=float(errors[-1]),
            n_iter=len(errors),
            norm=norm,
            rank_requested=rank,
        )
    if clamped:
        caps = sorted(set(clamped.values()))
        bound = (
            "what engine='core' can fit (the core's dimensions min(k_B, k_A), at most Σ_t r_t"
            if engine == "core"
            else "the CP rank the stack can have (Σ_t r_t"
        )
        warnings.warn(
            f"rank={rank} exceeds {bound} = {caps}) on {len(clamped)} module(s), e.g. "
            f"{next(iter(clamped))!r}; clamped to it there",
            UserWarning,
            stacklevel=2,
        )
    return results


def _is_zero(factors: Sequence[tuple[Tensor, Tensor]]) -> bool:
    """Whether every ``ΔW_t = B̃_t A_t`` is zero (``‖X‖² = Σ_t sum((B̃ᵀB̃) ∗ (AAᵀ))``)."""
    return all(float(((b.T @ b) * (a @ a.T)).sum()) == 0.0 for a, b in factors)


def _zero_raw(
    num_adapters: int, shape: tuple[int, int], rank: int, dtype: torch.dtype
) -> tuple[list[Tensor], list[float], float]:
    """The decomposition of an all-zero stack: zero factors (``λ = 0``), zero error."""
    d_out, d_in = shape
    zeros = [torch.zeros(n, rank, dtype=dtype) for n in (num_adapters, d_out, d_in)]
    return zeros, [0.0], 0.0


def _cp_als_core(
    stack: AdapterStack,
    modules: Sequence[str],
    rank: int,
    n_iter_max: int,
    tol: float,
    init: Init,
    seed: int,
    dtype: torch.dtype,
) -> dict[str, tuple[list[Tensor], list[float], float]]:
    """The factored ALS on each module's core factors, with ``U``/``V`` mapped back to full space.

    Modules whose cores have the same shape run in one batch. ``‖X‖`` and the relative errors are
    those of the full tensor (the maps to core space are isometries).
    """
    spaces = {m: cs for m, _, cs in iter_core_spaces(stack, modules, dtype)}
    groups: dict[tuple[Any, ...], list[str]] = {}
    for m, cs in spaces.items():
        r_m = min(rank, *cs.shape)  # more components than a mode's dimension are degenerate
        key = (cs.shape, tuple(int(a.shape[0]) for a, _ in cs.factors), r_m)
        groups.setdefault(key, []).append(m)
    out: dict[str, tuple[list[Tensor], list[float], float]] = {}
    for (_, ranks, r_m), chunk in groups.items():
        a = torch.stack([torch.cat([fa for fa, _ in spaces[m].factors], dim=0) for m in chunk])
        b = torch.stack([torch.cat([fb for _, fb in spaces[m].factors], dim=1) for m in chunk])
        for m, ((c, u, v), errors, norm) in zip(
            chunk, _als_batched(a, b, ranks, r_m, n_iter_max, tol, init, seed), strict=True
        ):
            out[m] = ([c, spaces[m].u_b @ u, spaces[m].v_a @ v], errors, norm)
    return out


def _fill(stack: AdapterStack, modules: Sequence[str], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``A_cat`` (``G × Σr × d_in``) and ``B_cat`` (``G × d_out × Σr``, scalings folded in)."""
    d_out, d_in = stack.shape(modules[0])
    total = stack.total_rank(modules[0])
    first = stack.factors(modules[0])[0][0]
    a = torch.empty(len(modules), total, d_in, dtype=dtype, device=first.device)
    b = torch.empty(len(modules), d_out, total, dtype=dtype, device=first.device)
    for g, module in enumerate(modules):
        off = 0
        for a_t, b_t, scaling in stack.factors(module):
            r = a_t.shape[0]
            a[g, off : off + r] = a_t
            b[g, :, off : off + r] = b_t.to(dtype) * scaling
            off += r
    return a, b


# --------------------------------------------------------------------------- dense engine
def _cp_als_dense(
    factors: Sequence[tuple[Tensor, Tensor]],
    rank: int,
    *,
    n_iter_max: int,
    tol: float,
    init: Init,
    seed: int,
) -> tuple[list[Tensor], list[float], float]:
    """tensorly ``parafac`` on the dense ``T × d_out × d_in`` tensor (unnormalised factors)."""
    from tensorly.decomposition import parafac

    x = torch.stack([b @ a for a, b in factors])
    with tl.backend_context("pytorch"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Trying to compute SVD with n_eigenvecs")
        cp, errors = parafac(
            x,
            rank,
            n_iter_max=n_iter_max,
            init=init,
            svd="truncated_svd",
            tol=tol,
            random_state=seed,
            normalize_factors=False,
            return_errors=True,
            linesearch=False,
        )
        norm = float(torch.linalg.vector_norm(x))
    return list(cp.factors), [float(e) for e in errors], norm


# ------------------------------------------------------------------------ factored engine
class _Concat:
    """The T adapters side by side: ``B_cat = [B̃_1 … B̃_T]``, ``A_cat = [A_1; …; A_T]``."""

    def __init__(self, a: Tensor, b: Tensor, task: Tensor, num_adapters: int) -> None:
        self.a, self.b, self.task, self.T = a, b, task, num_adapters  # Σr × d_in, d_out × Σr

    @classmethod
    def from_factors(cls, factors: Sequence[tuple[Tensor, Tensor]]) -> _Concat:
        a = torch.cat([a for a, _ in factors], dim=0)
        b = torch.cat([b for _, b in factors], dim=1)
        return cls(a, b, _task_index([int(x.shape[0]) for x, _ in factors], a.device), len(factors))


def _task_index(ranks: Sequence[int], device: torch.device) -> Tensor:
    """Adapter index of each of the ``Σr`` LoRA rows."""
    return torch.repeat_interleave(
        torch.arange(len(ranks), device=device), torch.tensor(list(ranks), device=device)
    )


def _svd_flip_u(u: Tensor) -> Tensor:
    """tensorly's ``svd_flip`` on ``U``: the largest-magnitude entry of each column positive."""
    idx = torch.argmax(u.abs(), dim=0)
    signs = torch.sign(u[idx, torch.arange(u.shape[1])])
    return u * signs


def _initialize(cat: _Concat, rank: int, init: Init, seed: int) -> list[Tensor]:
    """Initial ``[C, U, V]`` equal to tensorly's ``initialize_cp`` on the dense stack.

    ``"random"`` draws ``C``, ``U``, ``V`` from ``numpy.random.RandomState(seed).random_sample`` in
    that order. ``"svd"`` takes the leading left singular vectors of each unfolding, computed
    exactly from a Tucker compression: ``B_cat = Q_B R_B``, ``A_catᵀ = Q_A R_A`` and the core
    ``K_t = R_B[:, t] R_A[:, t]ᵀ`` (``T × k_B × k_A``, ``k ≤ Σr``), so the mode-2/3 unfoldings are
    ``Q_B K_(2)(…)ᵀ`` / ``Q_A K_(3)(…)ᵀ`` with orthonormal right factors. Mode 1 is scaled by its
    singular values; modes with fewer rows than ``rank`` are padded with random columns — as
    tensorly does.
    """
    dtype, device = cat.a.dtype, cat.a.device
    shape = (cat.T, int(cat.b.shape[0]), int(cat.a.shape[1]))
    rng = np.random.RandomState(seed)
    if init == "random":
        return [
            torch.tensor(rng.random_sample((s, rank)), dtype=dtype, device=device) for s in shape
        ]
    q_b, r_b = torch.linalg.qr(cat.b)
    q_a, r_a = torch.linalg.qr(cat.a.T)
    core = torch.stack(
        [r_b[:, cat.task == t] @ r_a[:, cat.task == t].T for t in range(cat.T)]
    )  # T × k_B × k_A
    out: list[Tensor] = []
    for mode in range(3):
        unfolded = torch.movedim(core, mode, 0).reshape(core.shape[mode], -1)
        u, s, _ = torch.linalg.svd(unfolded, full_matrices=False)
        if mode == 1:
            u = q_b @ u
        elif mode == 2:
            u = q_a @ u
        n = min(rank, min(shape[mode], math.prod(shape) // shape[mode]))
        u = _svd_flip_u(u[:, :n])
        if mode == 0:
            k = min(rank, s.numel(), n)
            u = torch.cat([u[:, :k] * s[:k], u[:, k:]], dim=1)
        if shape[mode] < rank:
            pad = torch.tensor(
                rng.random_sample((shape[mode], rank - shape[mode])), dtype=dtype, device=device
            )
            u = torch.cat([u, pad], dim=1)
        out.append(u[:, :rank])
    return out


def _bsolve(gram: Tensor, mttkrp: Tensor) -> Tensor:
    """``mttkrp · gram⁻¹`` as tensorly computes it, ``solve(gramᵀ, mttkrpᵀ)ᵀ``, batched.

    A singular ``gram`` (a factor with zero or repeated columns, e.g. adapters that are copies
    of one another under an SVD start) takes the least-squares solution ``mttkrp · gram⁺``
    instead of failing; the other modules of the batch keep the exact solve.
    """
    solution, info = torch.linalg.solve_ex(gram.mT, mttkrp.mT)
    solution = solution.mT
    failed = info != 0  # one flag per module of the batch
    if bool(failed.any()):
        solution[failed] = mttkrp[failed] @ torch.linalg.pinv(gram[failed])
    return solution


def _als_batched(
    a: Tensor,
    b: Tensor,
    ranks: Sequence[int],
    rank: int,
    n_iter_max: int,
    tol: float,
    init: Init,
    seed: int,
) -> list[tuple[list[Tensor], list[float], float]]:
    """CP-ALS on ``X[t] = B̃_t A_t`` for ``G`` modules of one shape at once, never forming ``X``.

    Per sweep (``P = B_catᵀ U``, ``Q = A_cat V``, both ``Σr × R``; ``c(k)`` the loading row of the
    adapter owning LoRA row ``k``):

    * mode T:     ``M[t, q] = Σ_{k∈t} P[k, q] Q[k, q]``  →  ``C = M (UᵀU ∗ VᵀV)⁻¹``
    * mode d_out: ``M = B_cat (Q ∗ C[task])``            →  ``U = M (CᵀC ∗ VᵀV)⁻¹``
    * mode d_in:  ``M = A_catᵀ (P ∗ C[task])``           →  ``V = M (CᵀC ∗ UᵀU)⁻¹``
    * error:      ``‖X − X̂‖² = ‖X‖² + sum(CᵀC ∗ UᵀU ∗ VᵀV) − 2 sum(M_{d_in} ∗ V)``

    Every module follows exactly its own iterates and stopping rule (``|err_{i-1} − err_i| <
    tol``; a converged module leaves the batch); batching only cuts kernel launches.

    Args:
        a: ``A_cat`` per module, ``G × Σr × d_in``.
        b: ``B_cat`` per module with the scalings folded in, ``G × d_out × Σr``.
        ranks: LoRA rank of each adapter (``Σ ranks = Σr``).
        rank: CP rank ``R``.
        n_iter_max: Maximum sweeps.
        tol: Stopping tolerance (0: never stop early).
        init: ``"svd"`` or ``"random"`` (:func:`_initialize`, each module on its own).
        seed: numpy random state of the initialisation.

    Returns:
        Per module ``([C, U, V], errors, ‖X‖)``: unnormalised factors and the relative error
        after each sweep.
    """
    t_count = len(ranks)
    task = _task_index(ranks, a.device)
    bt = b.transpose(1, 2)
    onehot = torch.nn.functional.one_hot(task, t_count).T.to(a.dtype)  # T × Σr
    same = task[:, None] == task[None, :]
    # ‖X‖² = Σ_t sum((B̃_tᵀB̃_t) ∗ (A_t A_tᵀ)): the block diagonal of the Σr × Σr Hadamard product.
    norm_sq = ((bt @ b) * (a @ a.mT) * same).sum((1, 2))
    norms = [math.sqrt(max(x, 0.0)) for x in norm_sq.tolist()]
    denom = torch.tensor([n if n > 0 else 1.0 for n in norms], dtype=a.dtype, device=a.device)
    g_count = a.shape[0]
    starts = [
        _initialize(_Concat(a[g], b[g], task, t_count), rank, init, seed) for g in range(g_count)
    ]
    c, u, v = (
        torch.stack([s[i].to(dtype=a.dtype, device=a.device) for s in starts]) for i in range(3)
    )
    active = list(range(g_count))
    errors: list[list[float]] = [[] for _ in range(g_count)]
    results: list[tuple[list[Tensor], list[float], float] | None] = [None] * g_count
    gu, gv = u.mT @ u, v.mT @ v
    p = bt @ u  # G × Σr × R; B_catᵀU is reused from the previous sweep's last mode
    for iteration in range(n_iter_max):
        q = a @ v
        c = _bsolve(gu * gv, onehot @ (p * q))
        gc = c.mT @ c
        ce = onehot.T @ c  # loading row of each LoRA row
        u = _bsolve(gc * gv, b @ (q * ce))
        gu = u.mT @ u
        p = bt @ u
        m_v = a.mT @ (p * ce)
        v = _bsolve(gc * gu, m_v)
        gv = v.mT @ v
        iprod = (m_v * v).sum((1, 2))
        model_sq = (gc * gu * gv).sum((1, 2))
        err = (torch.sqrt(torch.abs(norm_sq + model_sq - 2 * iprod)) / denom).tolist()
        done = []
        for i, g in enumerate(active):
            errors[g].append(err[i])
            last = iteration == n_iter_max - 1
            if last or (tol and iteration >= 1 and abs(errors[g][-2] - errors[g][-1]) < tol):
                results[g] = ([c[i], u[i], v[i]], errors[g], norms[g])
                done.append(i)
        if done:
            keep = [i for i in range(len(active)) if i not in done]
            if not keep:
                break
            idx = torch.tensor(keep, device=a.device)
            a, b, bt, c, u, v, p, gu, gv = (x[idx] for x in (a, b, bt, c, u, v, p, gu, gv))
            norm_sq, denom = norm_sq[idx], denom[idx]
            active = [active[i] for i in keep]
    return [r for r in results if r is not None]


# --------------------------------------------------------------------------- normalisation
def normalize_cp(c: Tensor, u: Tensor, v: Tensor) -> CPTensor:
    """Unit columns, magnitudes in ``λ``, canonical signs, components sorted by ``λ`` descending.

    Args:
        c: ``T × R`` loadings.
        u: ``d_out × R``.
        v: ``d_in × R``.

    Returns:
        ``CPTensor((λ, [C, U, V]))`` representing the same tensor.
    """
    norms = [torch.linalg.vector_norm(f, dim=0) for f in (c, u, v)]
    weights = norms[0] * norms[1] * norms[2]
    c, u, v = (
        f / torch.where(n == 0, torch.ones_like(n), n)
        for f, n in zip((c, u, v), norms, strict=True)
    )
    s1 = torch.where(c.sum(0) < 0, -1.0, 1.0).to(c.dtype)
    c, u = c * s1, u * s1
    idx = torch.argmax(u.abs(), dim=0)
    s2 = torch.where(u[idx, torch.arange(u.shape[1])] < 0, -1.0, 1.0).to(u.dtype)
    u, v = u * s2, v * s2
    order = torch.argsort(weights, descending=True, stable=True)
    return CPTensor((weights[order], [c[:, order], u[:, order], v[:, order]]))


# ------------------------------------------------------------------------------ fold-in
def fold_in(
    cp: Mapping[str, CPResult], factors: Mapping[str, tuple[Tensor, Tensor, float]]
) -> tuple[dict[str, CPResult], dict[str, float]]:
    """Add a new adapter to existing CP decompositions with ``U`` and ``V`` fixed.

    Its loadings solve ``min_c ‖ΔW − Σ_q λ_q c_q u_q v_qᵀ‖_F`` (normal equations
    ``(UᵀU ∗ VᵀV ∗ λλᵀ) c = λ ∗ diag(UᵀΔW V)``, with ``UᵀΔW V`` computed from the factors), i.e.
    the ALS loading update for one more slice. The extended CP has ``T + 1`` rows of loadings,
    re-normalised to unit columns (``λ`` absorbs the change); its ``fit_error`` covers the
    extended stack.

    Args:
        cp: ``module -> CPResult`` from ``cp_decompose``.
        factors: ``module -> (A r×d_in, B d_out×r, scaling)`` of the new adapter, for exactly the
            modules of ``cp``.

    Returns:
        ``(extended, residuals)``: the extended CP per module and the new adapter's relative
        residual ``‖ΔW − ΔŴ‖ / ‖ΔW‖`` per module.

    Raises:
        ValueError: module sets or shapes that differ, or non-finite weights.
    """
    if set(cp) != set(factors):
        only_cp, only_new = sorted(set(cp) - set(factors)), sorted(set(factors) - set(cp))
        raise ValueError(
            f"module sets differ: only in cp: {only_cp[:5]}; only in factors: {only_new[:5]}"
        )
    extended: dict[str, CPResult] = {}
    residuals: dict[str, float] = {}
    for module, res in cp.items():
        lam, (c, u, v) = res.cp
        a, b, scaling = factors[module]
        if (
            a.ndim != 2
            or b.ndim != 2
            or a.shape[0] != b.shape[1]
            or (b.shape[0], a.shape[1])
            != (
                u.shape[0],
                v.shape[0],
            )
        ):
            raise ValueError(
                f"shapes differ on module {module!r}: the CP has d_out×d_in {u.shape[0]}×{v.shape[0]}, "
                f"the new adapter has lora_A {tuple(a.shape)}, lora_B {tuple(b.shape)}"
            )
        if not (
            bool(torch.isfinite(a).all())
            and bool(torch.isfinite(b).all())
            and math.isfinite(scaling)
        ):
            raise ValueError(f"non-finite weights (nan/inf) in the new adapter, module {module!r}")
        a = a.to(u.dtype)
        b = b.to(u.dtype) * scaling
        p, q = b.T @ u, a @ v  # r × R
        m = lam * (p * q).sum(0)  # λ_q u_qᵀ ΔW v_q
        gram = (u.T @ u) * (v.T @ v) * torch.outer(lam, lam)
        new_c = torch.linalg.lstsq(gram, m[:, None]).solution[:, 0]
        x_sq = float(((b.T @ b) * (a @ a.T)).sum())
        r_sq = max(x_sq - 2 * float(new_c @ m) + float(new_c @ gram @ new_c), 0.0)
        residuals[module] = math.sqrt(r_sq / x_sq) if x_sq > 0 else 0.0
        c_ext = torch.cat([c, new_c[None]], dim=0)
        col = torch.linalg.vector_norm(c_ext, dim=0)
        safe = torch.where(col == 0, torch.ones_like(col), col)
        old_abs = res.fit_error * res.norm
        norm = math.sqrt(res.norm**2 + x_sq)
        extended[module] = CPResult(
            cp=CPTensor((lam * col, [c_ext / safe, u, v])),
            fit_error=math.sqrt(old_abs**2 + r_sq) / norm if norm > 0 else 0.0,
            n_iter=res.n_iter,
            norm=norm,
            rank_requested=res.rank_requested,
        )
    return extended, residuals
