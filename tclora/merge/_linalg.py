"""Small linear-algebra helpers on low-rank products ``B @ A`` that never build the product."""

from __future__ import annotations

import torch
from torch import Tensor


def lowrank_svd(B: Tensor, A: Tensor, rtol: float = 1e-10) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of ``B @ A`` from its factors, at O((d_out + d_in) k²) instead of O(d_out d_in k).

    ``B = Q_B R_B`` and ``Aᵀ = Q_A R_A`` (reduced QR), so ``B A = Q_B (R_B R_Aᵀ) Q_Aᵀ`` and the SVD
    of the small core ``R_B R_Aᵀ`` gives the singular triplets of the product.

    Args:
        B: ``d_out × k`` left factor.
        A: ``k × d_in`` right factor.
        rtol: singular values below ``rtol · σ_max`` are dropped (numerical rank).

    Returns:
        ``(U, S, V)`` with ``U`` ``d_out × q``, ``S`` ``q`` (descending), ``V`` ``d_in × q`` and
        ``B @ A ≈ U diag(S) Vᵀ``; ``q`` is the numerical rank (at least 1 unless the product is 0).
    """
    q_b, r_b = torch.linalg.qr(B)
    q_a, r_a = torch.linalg.qr(A.T)
    p, s, qh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
    keep = s > rtol * s[0] if s.numel() and s[0] > 0 else torch.zeros_like(s, dtype=torch.bool)
    return q_b @ p[:, keep], s[keep], q_a @ qh[keep].T


def truncate_svd(delta: Tensor, rank: int) -> tuple[Tensor, Tensor, float]:
    """Best rank-``rank`` approximation of a dense matrix (Eckart–Young).

    Args:
        delta: ``d_out × d_in`` matrix.
        rank: number of singular triplets kept (capped at ``min(d_out, d_in)``).

    Returns:
        ``(B, A, err)`` with ``B = U_k S_k`` (``d_out × k``), ``A = V_kᵀ`` (``k × d_in``) and the
        relative Frobenius truncation error ``‖delta − B A‖ / ‖delta‖`` (0 for a zero matrix).
    """
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    k = min(rank, s.numel())
    total = float(torch.linalg.vector_norm(s))
    tail = float(torch.linalg.vector_norm(s[k:]))
    err = tail / total if total > 0 else 0.0
    return u[:, :k] * s[:k], vh[:k], err
