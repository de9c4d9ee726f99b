"""How close peft's Arrow prototypes are to the exact top right singular vectors.

Arrow routes each token by its alignment with every adapter's prototype: the top right singular
vector of ``ΔW = B A`` in each adapted layer. peft computes it with 15 steps of power iteration
from a seeded random start (``ArrowLoraLinearLayer.top_right_singular_vec_from_BA``), not an
exact SVD; where an adapter's two largest singular values are close, 15 steps leave a blend of
their vectors. This script reads adapter folders, computes both vectors for every adapter and
module (the exact one from a QR of ``Aᵀ`` and the SVD of the small ``B Rᵀ``, in float64), and
prints how far apart they are (``|cos|``; the sign of a singular vector is arbitrary) beside the
ratio ``σ₂/σ₁`` that decides it.

Usage::

    python benchmarks/arrow_prototypes.py             # the sweep's per-task adapters (seed 0)
    python benchmarks/arrow_prototypes.py --adapters runs/demo/adapters/cluster_*
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "benchmarks" / "results" / "pieces" / "per_task-seed0" / "adapters"


def exact_top_right(a: Tensor, b: Tensor) -> tuple[Tensor, float]:
    """The top right singular vector of ``B A`` and ``σ₂/σ₁``, exactly, without forming ``B A``.

    Args:
        a: ``lora_A`` (``r × d_in``).
        b: ``lora_B`` (``d_out × r``).

    Returns:
        ``(v, σ₂/σ₁)``: ``v`` of length ``d_in`` (float64, unit norm); the ratio is 0 at rank 1.
    """
    q, r = torch.linalg.qr(a.double().T)  # Aᵀ = Q R, so B A = (B Rᵀ) Qᵀ
    _, s, vh = torch.linalg.svd(b.double() @ r.T, full_matrices=False)
    ratio = float(s[1] / s[0]) if s.numel() > 1 and float(s[0]) > 0 else 0.0
    return q @ vh[0], ratio


def power_top_right(a: Tensor, b: Tensor, iters: int = 15, seed: int = 0) -> Tensor:
    """peft's prototype: its own power iteration, called as the Arrow layer calls it.

    Args:
        a: ``lora_A``.
        b: ``lora_B``.
        iters: Power-iteration steps (peft's default 15).
        seed: peft's ``rng_seed``.

    Returns:
        The vector (float32, unit norm).
    """
    from peft.tuners.lora.arrow import ArrowLoraLinearLayer

    layer = SimpleNamespace(rng_seed=seed)
    return ArrowLoraLinearLayer.top_right_singular_vec_from_BA(layer, a, b, iters=iters)  # type: ignore[arg-type]


def compare(folders: Sequence[Path], iters: int, seed: int) -> list[tuple[float, float]]:
    """``(|cos|, σ₂/σ₁)`` of every adapter and module (read by ``AdapterStack.from_folders``)."""
    from tclora.merge import AdapterStack

    stack = AdapterStack.from_folders(folders)
    out = []
    for module in stack.module_names:
        for a, b, _ in stack.factors(module):  # the scaling changes no direction
            exact, ratio = exact_top_right(a, b)
            power = power_top_right(a, b, iters, seed).double()
            cos = abs(float(exact @ power)) / float(power.norm())
            out.append((cos, ratio))
    return out


def _quantile(values: Sequence[float], q: float) -> float:
    return float(torch.tensor(list(values), dtype=torch.float64).quantile(q))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapters", nargs="+", default=None, help="peft adapter folders")
    parser.add_argument("--iters", type=int, nargs="+", default=[15, 50], help="power steps")
    parser.add_argument("--seed", type=int, default=0, help="peft's rng_seed")
    args = parser.parse_args(argv)
    folders = (
        [Path(f) for f in args.adapters]
        if args.adapters
        else sorted(p for p in DEFAULT.glob("cluster_*") if p.is_dir())
    )
    if not folders:
        parser.error(f"--adapters: no adapter folders given, and none under {DEFAULT}")
    print(f"{len(folders)} adapters: {folders[0].parent}")
    print("| power steps | modules × adapters | min abs(cos) | 5% | median | abs(cos) < 0.99 |")
    print("|---|---|---|---|---|---|")
    ratios: list[float] = []
    for iters in args.iters:
        rows = compare(folders, iters, args.seed)
        cos = [c for c, _ in rows]
        ratios = [r for _, r in rows]
        low = sum(c < 0.99 for c in cos)
        print(
            f"| {iters} | {len(rows)} | {min(cos):.3f} | {_quantile(cos, 0.05):.3f} | "
            f"{_quantile(cos, 0.5):.4f} | {low} ({100 * low / len(rows):.1f}%) |"
        )
    print(
        f"σ₂/σ₁ over the same vectors: median {_quantile(ratios, 0.5):.3f}, 95% "
        f"{_quantile(ratios, 0.95):.3f}, max {max(ratios):.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
