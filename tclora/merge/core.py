"""Core space: LoRA deltas expressed in small bases built from their factors (Panariello et al.,
NeurIPS 2025, "Accurate and Efficient Low-Rank Model Merging in Core Space", arXiv 2509.17786).

For one module, the T adapters' factors stack into ``B_cat = [B̃_1 … B̃_T]`` (``d_out × Σr``,
scalings folded in) and ``A_cat = [A_1; …; A_T]`` (``Σr × d_in``). With orthonormal bases
``U_B`` of ``span(B_cat)`` and ``V_A`` of ``span(A_catᵀ)`` -- from thin SVDs of the *factors*,
never of a delta -- every delta is exactly ``ΔW_t = U_B M_t V_Aᵀ`` with the core
``M_t = (U_Bᵀ B̃_t)(A_t V_A)`` of size ``k_B × k_A`` (``k ≤ Σr``), because
``U_B U_Bᵀ B̃_t = B̃_t`` and ``A_t V_A V_Aᵀ = A_t``. A merge computed on the cores and mapped back,
``U_B f(M_1 … M_T) V_Aᵀ``, is exactly a LoRA of rank ``≤ min(k_B, k_A)``:

* linear merges (task arithmetic, the mean) are identical in full and core space;
* spectral merges (TSV, Iso-C) are identical too: the maps ``M ↦ U_B M V_Aᵀ`` preserve singular
  values and carry singular vectors and polar factors along;
* element-wise merges (TIES, DARE, magnitude pruning) act on the cores' entries instead of the
  deltas' entries: the Core Space paper's variants, not full-space TIES (both stay available);
* the CP decomposition of the ``T × k_B × k_A`` core tensor is the CP decomposition of the full
  ``T × d_out × d_in`` tensor mapped back (every ALS iterate of ``U`` and ``V`` stays in the two
  spans), at the cost of a tensor of a few thousand entries.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from tclora.merge.stack import AdapterStack

__all__ = ["CoreSpace", "core_space", "core_spaces", "iter_core_spaces"]


def _basis(x: Tensor) -> tuple[Tensor, Tensor]:
    """Left singular vectors and singular values of ``x`` (``… × n × m``, batched).

    A tall ``x = Q R`` (reduced QR, backward stable) needs only the SVD of the small ``R = P S Wᵀ``:
    ``x = (Q P) S Wᵀ``, so ``Q P`` are ``x``'s left singular vectors -- without a thin SVD of the
    tall matrix (2-3× cheaper for ``d × Σr`` factors).
    """
    if x.shape[-2] <= x.shape[-1]:
        u, s, _ = torch.linalg.svd(x, full_matrices=False)
        return u, s
    q, r = torch.linalg.qr(x)
    p, s, _ = torch.linalg.svd(r)
    return q @ p, s


def _keep(s: Tensor, rtol: float) -> Tensor:
    """Mask of the singular values above ``rtol · σ_max`` (none for a zero matrix)."""
    if s.numel() == 0 or float(s[0]) == 0.0:
        return torch.zeros_like(s, dtype=torch.bool)
    return s > rtol * s[0]


@dataclass
class CoreSpace:
    """One module's adapters in core space.

    Attributes:
        u_b: ``d_out × k_B`` orthonormal basis of ``span(B_cat)``.
        v_a: ``d_in × k_A`` orthonormal basis of ``span(A_catᵀ)``.
        factors: per adapter the core factors ``(A_t V_A  r_t×k_A, U_Bᵀ B̃_t  k_B×r_t)``, whose
            product is the core ``M_t`` (the same ``(A, B)`` layout as the full factors).
    """

    u_b: Tensor
    v_a: Tensor
    factors: list[tuple[Tensor, Tensor]]

    @property
    def cores(self) -> list[Tensor]:
        """``M_t = (U_Bᵀ B̃_t)(A_t V_A)``, each ``k_B × k_A``."""
        return [b @ a for a, b in self.factors]

    @property
    def shape(self) -> tuple[int, int]:
        """``(k_B, k_A)``."""
        return int(self.u_b.shape[1]), int(self.v_a.shape[1])

    @property
    def is_zero(self) -> bool:
        """Whether every adapter's delta is (numerically) zero on this module."""
        return min(self.shape) == 0

    def to_full(self, b: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
        """Map a core-space low-rank merge ``b @ a`` (``k_B × q``, ``q × k_A``) back to full
        space: ``(U_B b, a V_Aᵀ)``, a LoRA of rank ``q``."""
        return self.u_b @ b, a @ self.v_a.T

    def matrix_to_full(self, m: Tensor) -> tuple[Tensor, Tensor]:
        """Map a core-space matrix ``m`` (``k_B × k_A``) back as the LoRA ``(U_B m, V_Aᵀ)``."""
        return self.u_b @ m, self.v_a.T


def _check_rtol(rtol: float) -> None:
    if isinstance(rtol, bool) or not isinstance(rtol, int | float) or not 0 <= rtol < 1:
        raise ValueError(f"rtol must be in [0, 1), got rtol={rtol!r}")


def core_spaces(
    factor_sets: Sequence[Sequence[tuple[Tensor, Tensor]]], rtol: float = 1e-10
) -> list[CoreSpace]:
    """Express several modules' adapters in core space, batching modules of one layout.

    Modules whose factors have the same shapes, dtype and device (in a transformer: the same
    projection in every layer) share one batched QR and SVD per basis; each module keeps its own
    numerical rank. The result is the same as :func:`core_space` on each module.

    Args:
        factor_sets: per module, per adapter ``(A_t r_t×d_in, B̃_t d_out×r_t)`` (scaling folded
            into ``B̃_t``, as ``AdapterStack.scaled_factors`` gives them); ranks may differ.
        rtol: singular values of ``B_cat`` / ``A_catᵀ`` below ``rtol · σ_max`` are null
            directions and are not part of the basis.

    Returns:
        One :class:`CoreSpace` per module, in order. An all-zero module gets empty bases
        (``k = 0``).

    Raises:
        ValueError: a module with no adapters, or ``rtol`` outside ``[0, 1)``.
    """
    _check_rtol(rtol)
    groups: dict[tuple[object, ...], list[int]] = {}
    for i, factors in enumerate(factor_sets):
        if not factors:
            raise ValueError(f"factor_sets[{i}] is empty: core space needs at least one adapter")
        a0 = factors[0][0]
        key = (a0.dtype, a0.device, *((tuple(a.shape), tuple(b.shape)) for a, b in factors))
        groups.setdefault(key, []).append(i)
    out: list[CoreSpace | None] = [None] * len(factor_sets)
    for idx in groups.values():
        ranks = [int(a.shape[0]) for a, _ in factor_sets[idx[0]]]
        a_cat = torch.stack([torch.cat([a for a, _ in factor_sets[i]], dim=0) for i in idx])
        b_cat = torch.stack([torch.cat([b for _, b in factor_sets[i]], dim=1) for i in idx])
        u_b, s_b = _basis(b_cat)  # G × d_out × m, G × m
        v_a, s_a = _basis(a_cat.mT)  # G × d_in × m
        core_a = (a_cat @ v_a).split(ranks, dim=1)  # per adapter G × r_t × m  (A_t V_A)
        core_b = (u_b.mT @ b_cat).split(ranks, dim=2)  # per adapter G × m × r_t  (U_Bᵀ B̃_t)
        for g, i in enumerate(idx):
            kb, ka = _keep(s_b[g], rtol), _keep(s_a[g], rtol)
            out[i] = CoreSpace(
                u_b[g][:, kb],
                v_a[g][:, ka],
                [(fa[g][:, ka], fb[g][kb, :]) for fa, fb in zip(core_a, core_b, strict=True)],
            )
    return [cs for cs in out if cs is not None]


def core_space(factors: Sequence[tuple[Tensor, Tensor]], rtol: float = 1e-10) -> CoreSpace:
    """Express one module's adapters in core space.

    Args:
        factors: per adapter ``(A_t r_t×d_in, B̃_t d_out×r_t)``, scaling folded into ``B̃_t``
            (``AdapterStack.scaled_factors``); ranks may differ between adapters.
        rtol: singular values of ``B_cat`` / ``A_catᵀ`` below ``rtol · σ_max`` are null
            directions and are not part of the basis.

    Returns:
        The bases and the core factors. An all-zero stack gives empty bases (``k = 0``).

    Raises:
        ValueError: no adapters, or ``rtol`` outside ``[0, 1)``.
    """
    if not factors:
        raise ValueError("factors is empty: core space needs at least one adapter")
    return core_spaces([factors], rtol)[0]


def iter_core_spaces(
    stack: AdapterStack,
    modules: Sequence[str],
    dtype: torch.dtype = torch.float64,
    batch: int = 32,
) -> Iterator[tuple[str, list[tuple[Tensor, Tensor]], CoreSpace]]:
    """The core spaces of ``stack``'s modules, ``batch`` modules of one layout at a time.

    Modules are grouped by shape and ranks and handed to :func:`core_spaces` in chunks, so only
    one chunk's bases are in memory at a time (a 7B model's 224 modules at ``Σr = 160`` would
    hold ~5 GB of float64 bases at once).

    Args:
        stack: the adapters.
        modules: which modules (each once).
        dtype: dtype of the factors and bases.
        batch: modules per batched decomposition (≥ 1).

    Yields:
        ``(module, scaled factors, core space)``, grouped by layout (not in ``modules`` order).
    """
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got batch={batch!r}")
    groups: dict[tuple[object, ...], list[str]] = {}
    for m in modules:
        groups.setdefault((stack.shape(m), tuple(stack.ranks(m))), []).append(m)
    for chunk in groups.values():
        for j in range(0, len(chunk), batch):
            part = chunk[j : j + batch]
            facs = [stack.scaled_factors(m, dtype) for m in part]
            yield from zip(part, facs, core_spaces(facs), strict=True)
