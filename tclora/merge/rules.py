"""Merge rules on CP factors, the merged-adapter container, reports and component analysis.

Scale convention (for every merge in ``tclora.merge``): at ``scale = 1`` merging T copies of one
adapter returns that adapter — so "uniform" is the *mean* of the deltas — and the returned delta
is multiplied by the caller's ``scale`` (``scale = T`` turns the mean into the task-arithmetic
sum). Merges differ in size as much as in direction; ``merge_report`` measures both.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from tclora.merge.cp import CPResult
from tclora.merge.stack import AdapterStack

__all__ = [
    "CP_RULES",
    "DEGENERATE_ENERGY_RATIO",
    "MergedAdapter",
    "component_analysis",
    "merge_cp",
    "merge_report",
    "merge_report_per_module",
    "ties_loadings",
]

CP_RULES = ("sum_components", "mean_loading", "ties_loading")
DEGENERATE_ENERGY_RATIO = 1.5
"""``CPResult.energy_ratio`` above which a module's components count as cancelling each other."""


@dataclass
class MergedAdapter:
    """A merged delta per module, in low-rank form.

    Attributes:
        method: the rule or baseline that produced it (e.g. ``"cp:mean_loading"``, ``"ties"``).
        scale: the scale ``λ`` already applied.
        lowrank: ``module -> (B' d_out×k, A' k×d_in)`` with ``ΔW = B' @ A'`` (scale included).
        info: scalars about the merge (``seconds``, ``truncation_error``, ``rank``, ...).
    """

    method: str
    scale: float
    lowrank: dict[str, tuple[Tensor, Tensor]]
    info: dict[str, float] = field(default_factory=dict)

    @property
    def module_names(self) -> list[str]:
        """Sorted module names."""
        return sorted(self.lowrank)

    @property
    def rank(self) -> int:
        """Largest ``k`` over modules."""
        return max(int(a.shape[0]) for _, a in self.lowrank.values())

    def delta(self, module: str) -> Tensor:
        """Dense merged ``ΔW`` of ``module`` (``d_out × d_in``)."""
        try:
            b, a = self.lowrank[module]
        except KeyError:
            raise KeyError(f"module={module!r} is not in this merge") from None
        return b @ a

    def scaled(self, scale: float) -> MergedAdapter:
        """The same merge at another scale (multiplies every ``B'`` by ``scale / self.scale``).

        Raises:
            ValueError: ``scale`` not finite, or ``self.scale == 0`` (nothing to rescale).
        """
        if not math.isfinite(scale):
            raise ValueError(f"scale must be finite, got scale={scale}")
        if self.scale == 0:
            raise ValueError("cannot rescale a merge built with scale=0; rebuild it instead")
        ratio = scale / self.scale
        return MergedAdapter(
            method=self.method,
            scale=scale,
            lowrank={m: (b * ratio, a) for m, (b, a) in self.lowrank.items()},
            info={**self.info, "scale": float(scale)},
        )


def _check_scale(scale: float) -> None:
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got scale={scale!r}")


def _check_modules(stack: AdapterStack, modules: Mapping[str, Any], what: str) -> None:
    if set(modules) != set(stack.module_names):
        only_s = sorted(set(stack.module_names) - set(modules))
        only_o = sorted(set(modules) - set(stack.module_names))
        raise ValueError(
            f"module sets differ between the stack and {what}: only in the stack: {only_s[:5]}; "
            f"only in {what}: {only_o[:5]}"
        )


def ties_loadings(loadings: Tensor, density: float) -> Tensor:
    """TIES (Yadav et al., 2023, arXiv 2306.01708) on loading vectors, one per component.

    For each component ``q`` the loadings ``c_:q`` of the T adapters are the "task values": keep
    the ``max(1, ceil(density·T))`` largest in magnitude (trim), elect the sign of their sum, and
    average the kept values that agree with it (disjoint mean). Copies of one loading give that
    loading back, so the rule is scale-correct.

    Args:
        loadings: ``T × R``.
        density: fraction of adapters kept per component, in ``(0, 1]``.

    Returns:
        Merged loading per component (``R``).
    """
    t = loadings.shape[0]
    k = max(1, math.ceil(density * t))
    idx = torch.topk(loadings.abs(), k, dim=0).indices
    keep = torch.zeros_like(loadings, dtype=torch.bool).scatter_(0, idx, True)
    trimmed = loadings * keep
    elected = torch.where(trimmed.sum(0) >= 0, 1.0, -1.0).to(loadings.dtype)
    agree = keep & (torch.sign(trimmed) == elected)
    count = agree.sum(0).clamp_min(1)
    return (trimmed * agree).sum(0) / count


def _parse_rule(rule: str, names: list[str]) -> tuple[str, int | None]:
    if rule in CP_RULES:
        return rule, None
    if isinstance(rule, str) and rule.startswith("select:"):
        arg = rule.split(":", 1)[1]
        t = names.index(arg) if arg in names else (int(arg) if arg.lstrip("-").isdigit() else None)
        if t is None or not 0 <= t < len(names):
            raise ValueError(
                f"rule={rule!r}: select needs an adapter index in [0, {len(names)}) or a name in {names}"
            )
        return "select", t
    raise ValueError(f"rule must be one of {CP_RULES} or 'select:<t>', got rule={rule!r}")


def merge_cp(
    stack: AdapterStack,
    cp: Mapping[str, CPResult],
    rule: str,
    scale: float = 1.0,
    *,
    density: float = 0.5,
) -> MergedAdapter:
    """Merge the adapters from their joint CP factors: ``ΔW = scale · Σ_q w_q u_q v_qᵀ``.

    With the normalised CP ``X[t] ≈ Σ_q λ_q c_tq u_q v_qᵀ`` (unit ``c_q``, ``u_q``, ``v_q``):

    * ``sum_components``: ``w_q = λ_q / √T`` — every component counted as if fully shared
      (loading ``1/√T`` for every adapter, the unit vector of equal loadings). This is the
      authors' rule made explicit: mttl's ``CPMergeAfter`` keeps ``U Vᵀ`` of *unnormalised*
      tensorly factors, which equals ``Σ_q (λ_q / ‖c̃_q‖) u_q v_qᵀ`` where ``‖c̃_q‖`` is whatever
      norm ALS happened to leave in their task factor (and a hand-tuned scaling coefficient
      compensates); ``sum_components`` is that merge with every ``‖c̃_q‖`` set to ``√T``, the value
      that makes T copies of one adapter merge back to it.
    * ``mean_loading``: ``w_q = λ_q · mean_t c_tq`` — the CP reconstruction of the mean delta.
    * ``ties_loading``: ``w_q = λ_q · TIES(c_:q)`` (see ``ties_loadings``; ``density`` applies).
    * ``select:<t>`` (index or adapter name): ``w_q = λ_q c_tq`` — adapter ``t`` reconstructed
      (a check of the decomposition).

    All are scale-correct: T copies of one adapter (exact CP fit) merge back to it at ``scale=1``.
    The result is exactly rank ``≤ R``: ``B' = scale · U diag(w)``, ``A' = Vᵀ``.

    When ``sum_components`` and ``mean_loading`` differ: per component, the ratio of their
    weights is ``√T / Σ_t c_tq`` -- 1 for a fully shared component (``c_q = 1/√T``), ``√T`` for a
    component owned by one adapter (``c_q`` one-hot), unbounded for a contrast component
    (``Σ_t c_tq ≈ 0``, which the mean cancels and the sum keeps). So on adapters whose
    components are all adapter-specific (the demo's, 99.8%) the sum rule at ``λ`` is the mean rule
    at ``√T · λ``; they part where components are shared or contrasting. ``mean_loading`` is a
    function of the fitted tensor (the CP reconstruction of the mean), whichever decomposition
    ALS found; ``sum_components`` is a function of the decomposition, and is not unique when the
    decomposition is not: with ``R`` above the stack's CP rank, ALS from two starts can give
    sum merges 0.5-16× apart. A module whose components cancel (``CPResult.energy_ratio`` above
    ``DEGENERATE_ENERGY_RATIO``) is such a case, and ``sum_components`` warns about it (the
    largest ratio is ``info["energy_ratio_max"]`` of every CP merge).

    Args:
        stack: the adapters the CP was computed from.
        cp: ``module -> CPResult`` from ``cp_decompose``.
        rule: a name in ``CP_RULES`` or ``"select:<t>"``.
        scale: the scale ``λ`` applied to the merged delta.
        density: fraction of adapters kept per component by ``ties_loading``.

    Returns:
        The merged adapter (float32 factors).

    Raises:
        ValueError: unknown rule, bad scale/density, or a CP that does not match the stack.
    """
    kind, t_sel = _parse_rule(rule, stack.names)
    _check_scale(scale)
    if not (isinstance(density, int | float) and 0 < density <= 1):
        raise ValueError(f"density must be in (0, 1], got density={density!r}")
    _check_modules(stack, cp, "cp")
    start = time.perf_counter()
    t_count = stack.num_adapters
    lowrank: dict[str, tuple[Tensor, Tensor]] = {}
    for module in stack.module_names:
        lam, (c, u, v) = cp[module].cp
        if c.shape[0] != t_count:
            raise ValueError(
                f"cp[{module!r}] has loadings for {c.shape[0]} adapters, the stack has {t_count}"
            )
        if kind == "sum_components":
            w = lam / math.sqrt(t_count)
        elif kind == "mean_loading":
            w = lam * c.mean(0)
        elif kind == "ties_loading":
            w = lam * ties_loadings(c, density)
        else:
            assert t_sel is not None
            w = lam * c[t_sel]
        lowrank[module] = ((u * (w * scale)).float().contiguous(), v.T.float().contiguous())
    fits = [cp[m].fit_error for m in stack.module_names]
    ratios = {m: cp[m].energy_ratio for m in stack.module_names}
    degenerate = {m: r for m, r in ratios.items() if r > DEGENERATE_ENERGY_RATIO}
    if kind == "sum_components" and degenerate:
        worst = max(degenerate, key=degenerate.__getitem__)
        warnings.warn(
            f"rule='sum_components' on a degenerate CP: in {len(degenerate)} of {len(ratios)} "
            f"module(s) the components cancel each other (Σλ² / ‖X̂‖² up to "
            f"{degenerate[worst]:.3g} on {worst!r}, above {DEGENERATE_ENERGY_RATIO}), so the "
            "decomposition is not unique there and another ALS start gives another sum merge. "
            "Lower the CP rank there, or use rule='mean_loading' (a function of the fitted tensor).",
            UserWarning,
            stacklevel=2,
        )
    info = {
        "seconds": time.perf_counter() - start,
        "scale": float(scale),
        "rank": float(max(a.shape[0] for _, a in lowrank.values())),
        "fit_error": sum(fits) / len(fits),
        "energy_ratio_max": max((r for r in ratios.values() if not math.isnan(r)), default=1.0),
        "truncation_error": 0.0,
        "truncation_error_max": 0.0,
    }
    return MergedAdapter(method=f"cp:{rule}", scale=float(scale), lowrank=lowrank, info=info)


# ----------------------------------------------------------------------------- reports
def merge_report_per_module(
    stack: AdapterStack, merged: MergedAdapter
) -> dict[str, dict[str, float]]:
    """Norm of each module's merge and its cosine to the plain sum of deltas (factored math).

    Args:
        stack: the adapters.
        merged: a merge of them.

    Returns:
        ``module -> {"norm", "norm_mean", "norm_sum", "norm_ratio_to_mean", "cosine_to_sum"}``
        where ``norm_mean`` / ``norm_sum`` are ``‖mean_t ΔW_t‖`` / ``‖Σ_t ΔW_t‖``.
    """
    _check_modules(stack, merged.lowrank, "merged")
    out: dict[str, dict[str, float]] = {}
    for module in stack.module_names:
        b_m, a_m = (x.double() for x in merged.lowrank[module])
        fac = stack.scaled_factors(module, torch.float64)
        a_cat = torch.cat([a for a, _ in fac], dim=0)
        b_cat = torch.cat([b for _, b in fac], dim=1)
        norm = math.sqrt(max(float(((b_m.T @ b_m) * (a_m @ a_m.T)).sum()), 0.0))
        norm_sum = math.sqrt(max(float(((b_cat.T @ b_cat) * (a_cat @ a_cat.T)).sum()), 0.0))
        inner = float(((b_m.T @ b_cat) * (a_m @ a_cat.T)).sum())
        norm_mean = norm_sum / stack.num_adapters
        out[module] = {
            "norm": norm,
            "norm_mean": norm_mean,
            "norm_sum": norm_sum,
            "norm_ratio_to_mean": norm / norm_mean if norm_mean > 0 else math.nan,
            "cosine_to_sum": inner / (norm * norm_sum) if norm > 0 and norm_sum > 0 else math.nan,
        }
    return out


def merge_report(stack: AdapterStack, merged: MergedAdapter) -> dict[str, float]:
    """Size and direction of a merge relative to the adapters, over all modules.

    Args:
        stack: the adapters.
        merged: a merge of them.

    Returns:
        ``norm`` (Frobenius over all modules), ``norm_mean`` (same for the mean delta),
        ``norm_ratio_to_mean`` (their ratio: 1 for uniform at scale 1),
        ``norm_ratio_to_mean_module`` (mean of the per-module ratios), ``cosine_to_sum``
        (mean over modules of the cosine to ``Σ_t ΔW_t``) and ``cosine_to_sum_min``.
    """
    per = merge_report_per_module(stack, merged)
    vals = list(per.values())
    norm = math.sqrt(sum(v["norm"] ** 2 for v in vals))
    norm_mean = math.sqrt(sum(v["norm_mean"] ** 2 for v in vals))
    cos = [v["cosine_to_sum"] for v in vals if not math.isnan(v["cosine_to_sum"])]
    ratios = [v["norm_ratio_to_mean"] for v in vals if not math.isnan(v["norm_ratio_to_mean"])]
    return {
        "norm": norm,
        "norm_mean": norm_mean,
        "norm_ratio_to_mean": norm / norm_mean if norm_mean > 0 else math.nan,
        "norm_ratio_to_mean_module": sum(ratios) / len(ratios) if ratios else math.nan,
        "cosine_to_sum": sum(cos) / len(cos) if cos else math.nan,
        "cosine_to_sum_min": min(cos) if cos else math.nan,
    }


def component_analysis(cp: Mapping[str, CPResult], shared_threshold: float = 0.5) -> dict[str, Any]:
    """How each CP component's loading spreads over the adapters (shared vs adapter-specific).

    For component ``q`` of a module, ``p_tq = c_tq²`` (sums to 1 over adapters) and its evenness
    is the normalised entropy ``H(p_:q) / log T``: 1 when all adapters load equally (shared),
    0 when one adapter owns it (specific).

    Args:
        cp: ``module -> CPResult``.
        shared_threshold: evenness at or above which a component counts as shared.

    Returns:
        ``modules`` (list), ``weights`` and ``evenness`` (``n_modules × R`` tensors, NaN where a
        module has fewer components), ``heatmap`` (``T × R``: mean over modules of ``c_tq²``,
        components by decreasing ``λ``; an adapters × components image), ``mean_evenness`` and
        ``shared_fraction`` (both weighted by ``λ²``), and ``adapter_energy`` (``T``: each
        adapter's share of ``Σ λ_q² c_tq²``).
    """
    if not cp:
        raise ValueError("cp is empty: nothing to analyse")
    modules = sorted(cp)
    r_max = max(int(cp[m].cp.weights.shape[0]) for m in modules)
    t_count = int(cp[modules[0]].cp.factors[0].shape[0])
    weights = torch.full((len(modules), r_max), math.nan, dtype=torch.float64)
    evenness = torch.full_like(weights, math.nan)
    heat = torch.zeros(t_count, r_max, dtype=torch.float64)
    heat_n = torch.zeros(r_max, dtype=torch.float64)
    energy = torch.zeros(t_count, dtype=torch.float64)
    for i, m in enumerate(modules):
        lam, (c, _, _) = cp[m].cp
        lam, c = lam.double().cpu(), c.double().cpu()
        if c.shape[0] != t_count:
            raise ValueError(
                f"cp[{m!r}] has {c.shape[0]} adapters, cp[{modules[0]!r}] has {t_count}"
            )
        p = c**2 / (c**2).sum(0).clamp_min(1e-300)
        ent = -(p * torch.log(p.clamp_min(1e-300))).sum(0)
        r = lam.shape[0]
        weights[i, :r] = lam
        evenness[i, :r] = ent / math.log(t_count) if t_count > 1 else torch.ones(r)
        heat[:, :r] += p
        heat_n[:r] += 1
        energy += (p * lam**2).sum(1)
    w2 = torch.nan_to_num(weights) ** 2
    ev = torch.nan_to_num(evenness)
    total = float(w2.sum())
    return {
        "modules": modules,
        "weights": weights,
        "evenness": evenness,
        "heatmap": heat / heat_n.clamp_min(1),
        "mean_evenness": float((w2 * ev).sum()) / total if total > 0 else math.nan,
        "shared_fraction": float((w2 * (ev >= shared_threshold)).sum()) / total
        if total > 0
        else math.nan,
        "adapter_energy": energy / energy.sum().clamp_min(1e-300),
    }
