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

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["CoreSpace", "core_space"]


def _span(x: Tensor, rtol: float) -> Tensor:
    """Orthonormal basis of ``x``'s column span (numerically null directions dropped)."""
    u, s, _ = torch.linalg.svd(x, full_matrices=False)
    if s.numel() == 0 or float(s[0]) == 0.0:
        return u[:, :0]
    return u[:, s > rtol * s[0]]


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


def core_space(factors: Sequence[tuple[Tensor, Tensor]], rtol: float = 1e-10) -> CoreSpace:
    """Express one module's adapters in core space.

    Args:
        factors: per adapter ``(A_t r_t×d_in, B̃_t d_out×r_t)``, scaling folded into ``B̃_t``
            (``AdapterStack.scaled_factors``); ranks may differ between adapters.
        rtol: singular values of ``B_cat`` / ``A_catᵀ`` below ``rtol · σ_max`` are null
            directions and are not part of the basis.

    Returns:
        The bases and the core factors. An all-zero stack gives empty bases (``k = 0``).
    """
    if not factors:
        raise ValueError("factors is empty: core space needs at least one adapter")
    a_cat = torch.cat([a for a, _ in factors], dim=0)
    b_cat = torch.cat([b for _, b in factors], dim=1)
    u_b, v_a = _span(b_cat, rtol), _span(a_cat.T, rtol)
    return CoreSpace(u_b, v_a, [(a @ v_a, u_b.T @ b) for a, b in factors])
