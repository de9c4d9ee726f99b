"""AdapterStack: the T LoRA adapters' factors ``(A_t, B_t, scaling_t)`` per module.

Read from a live peft model (``PeftModel`` or a module with LoRA layers injected) or from peft
adapter folders (``adapter_config.json`` + ``adapter_model.safetensors``) without a base model.
Every adapter must cover the same modules with the same ``d_out × d_in``; ranks may differ between
adapters (and between modules).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig
from torch import Tensor

__all__ = ["AdapterStack", "strip_peft_prefix"]

Factors = tuple[Tensor, Tensor, float]
_PEFT_PREFIX = "base_model.model."
_KEY_RE = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")


def strip_peft_prefix(name: str) -> str:
    """Module name relative to the base model: drop peft's ``base_model.model.`` prefix."""
    return name[len(_PEFT_PREFIX) :] if name.startswith(_PEFT_PREFIX) else name


@dataclass
class AdapterStack:
    """T LoRA adapters over one base model, factor by factor.

    Attributes:
        names: adapter names, length ``T`` (at least 2).
        module_names: sorted module names relative to the base model,
            e.g. ``"model.layers.0.self_attn.q_proj"``.
        lora_config: the first adapter's ``LoraConfig`` (target modules, base model name).
        weights: ``module -> [(A_t r_t×d_in, B_t d_out×r_t, scaling_t) for each adapter]``.

    The delta of adapter ``t`` on ``module`` is ``ΔW_t = scaling_t · B_t @ A_t`` (``d_out × d_in``,
    the layout of ``nn.Linear.weight``).
    """

    names: list[str]
    module_names: list[str]
    lora_config: LoraConfig
    weights: dict[str, list[Factors]] = field(repr=False)

    def __post_init__(self) -> None:
        _validate(self.names, self.weights)
        self.module_names = sorted(self.weights)

    # ------------------------------------------------------------------ access
    @property
    def num_adapters(self) -> int:
        """Number of adapters ``T``."""
        return len(self.names)

    def _check_module(self, module: str) -> list[Factors]:
        try:
            return self.weights[module]
        except KeyError:
            raise KeyError(
                f"module={module!r} is not in the stack; known modules include "
                f"{self.module_names[:3]} ({len(self.module_names)} in all)"
            ) from None

    def factors(self, module: str) -> list[Factors]:
        """Per adapter ``(A_t r_t×d_in, B_t d_out×r_t, scaling_t)`` of ``module``."""
        return list(self._check_module(module))

    def shape(self, module: str) -> tuple[int, int]:
        """``(d_out, d_in)`` of ``module``."""
        a, b, _ = self._check_module(module)[0]
        return int(b.shape[0]), int(a.shape[1])

    def ranks(self, module: str) -> list[int]:
        """LoRA rank of each adapter on ``module``."""
        return [int(a.shape[0]) for a, _, _ in self._check_module(module)]

    def scaled_factors(
        self, module: str, dtype: torch.dtype = torch.float64
    ) -> list[tuple[Tensor, Tensor]]:
        """Per adapter ``(A_t, scaling_t · B_t)`` cast to ``dtype``: ``ΔW_t = B̃_t @ A_t``."""
        return [(a.to(dtype), b.to(dtype) * s) for a, b, s in self._check_module(module)]

    def delta(self, module: str, t: int) -> Tensor:
        """Dense ``ΔW_t = scaling_t · B_t @ A_t`` (``d_out × d_in``, float32 or wider)."""
        entries = self._check_module(module)
        if not -len(entries) <= t < len(entries):
            raise IndexError(f"t={t} is out of range for {len(entries)} adapters")
        a, b, s = entries[t]
        dtype = torch.promote_types(a.dtype, torch.float32)
        return (b.to(dtype) @ a.to(dtype)) * s

    def deltas(self, module: str) -> Tensor:
        """All deltas of ``module`` stacked: ``T × d_out × d_in`` (dense)."""
        return torch.stack([self.delta(module, t) for t in range(self.num_adapters)])

    def total_rank(self, module: str) -> int:
        """``Σ_t r_t``: an upper bound on the CP rank (and matrix ranks) of the stacked deltas."""
        return sum(self.ranks(module))

    # ------------------------------------------------------------ constructors
    @classmethod
    def from_peft_model(
        cls, model: Any, adapter_names: Sequence[str] | None = None
    ) -> AdapterStack:
        """Read LoRA adapters from a ``PeftModel`` (or a module with LoRA layers injected).

        Args:
            model: the model holding the adapters.
            adapter_names: which adapters to stack (default: every LoRA adapter, in the order of
                ``model.peft_config``, or of the first LoRA layer when there is no config).

        Returns:
            The stack; weights are detached copies (the model can keep training).

        Raises:
            ValueError: no LoRA layer, an unknown or non-LoRA adapter, DoRA, LoRA bias, trained
                base biases or ``modules_to_save`` (weights a merge of ``B@A`` would drop), fewer
                than two adapters, or module sets / shapes that differ.
        """
        from peft.tuners.lora import LoraLayer

        layers = [
            (strip_peft_prefix(n), m) for n, m in model.named_modules() if isinstance(m, LoraLayer)
        ]
        if not layers:
            raise ValueError("model has no LoRA layers (expected a PeftModel with LoRA adapters)")
        configs: Mapping[str, Any] = getattr(model, "peft_config", None) or {}
        lora_names = [n for n, c in configs.items() if isinstance(c, LoraConfig)]
        if not configs:
            seen: dict[str, None] = {}
            for _, layer in layers:
                seen.update(dict.fromkeys(layer.lora_A.keys()))
                seen.update(dict.fromkeys(getattr(layer, "lora_embedding_A", {}).keys()))
            lora_names = list(seen)
        if adapter_names is None:
            names = lora_names
        else:
            names = list(adapter_names)
            unknown = [n for n in names if n not in lora_names]
            if unknown:
                raise ValueError(
                    f"adapter_names contains {unknown}, which are not LoRA adapters of the model; "
                    f"available: {lora_names}"
                )
        _check_count(names)
        for n in names:
            if n in configs:
                _check_only_lora_weights(configs[n], f"adapter {n!r}")
        weights: dict[str, list[Factors]] = {}
        for module, layer in layers:
            present = [
                n for n in names if n in layer.lora_A or n in getattr(layer, "lora_embedding_A", {})
            ]
            if not present:
                continue
            for n in present:
                if n not in layer.lora_A:
                    raise ValueError(
                        f"adapter {n!r} on module {module!r} is not a Linear LoRA "
                        f"(embedding/conv LoRA is not supported)"
                    )
                if layer.use_dora.get(n, False):
                    raise ValueError(
                        f"adapter {n!r} on module {module!r} uses DoRA, which is not B@A"
                    )
                if getattr(layer, "lora_bias", {}).get(n, False):
                    raise ValueError(
                        f"adapter {n!r} on module {module!r} has a LoRA bias (lora_bias)"
                    )
            missing = [n for n in names if n not in present]
            if missing:
                raise ValueError(
                    f"module sets differ: module {module!r} has adapters {present} but not {missing}"
                )
            weights[module] = [
                (_weight(layer.lora_A[n]), _weight(layer.lora_B[n]), float(layer.scaling[n]))
                for n in names
            ]
        if names[0] in configs:
            lora_config = configs[names[0]]
        else:
            ranks = {int(w[0][0].shape[0]) for w in weights.values()}
            lora_config = LoraConfig(r=max(ranks), target_modules=sorted(weights))
        return cls(
            names=list(names),
            module_names=sorted(weights),
            lora_config=lora_config,
            weights=weights,
        )

    @classmethod
    def from_folders(
        cls, folders: Sequence[str | Path], names: Sequence[str] | None = None
    ) -> AdapterStack:
        """Read LoRA adapters from peft adapter folders; no base model needed.

        Args:
            folders: folders written by ``PeftModel.save_pretrained`` (``adapter_config.json`` and
                ``adapter_model.safetensors``, or ``adapter_model.bin`` read with ``weights_only``).
            names: adapter names (default: the folder names).

        Returns:
            The stack.

        Raises:
            FileNotFoundError: a folder lacks its config or weights.
            ValueError: not LoRA, DoRA, weights besides ``lora_A``/``lora_B`` in the file or
                configured (LoRA bias, embedding LoRA, trained biases, ``modules_to_save``: a
                merge of ``B@A`` would drop them), different base models, names of the wrong
                length or repeated, fewer than two adapters, or module sets / shapes that differ.
        """
        paths = [Path(f) for f in folders]
        _check_count(paths, what="folders")
        adapter_names = [p.name for p in paths] if names is None else list(names)
        if len(adapter_names) != len(paths):
            raise ValueError(f"names has {len(adapter_names)} entries but folders has {len(paths)}")
        per_adapter: list[dict[str, Factors]] = []
        configs: list[LoraConfig] = []
        for path in paths:
            config, factors = _read_folder(path)
            configs.append(config)
            per_adapter.append(factors)
        bases = [c.base_model_name_or_path for c in configs]
        if len(set(bases)) > 1:
            listing = ", ".join(f"{n} -> {b}" for n, b in zip(adapter_names, bases, strict=True))
            raise ValueError(f"adapters of different base models cannot be merged: {listing}")
        modules = [set(f) for f in per_adapter]
        for name, mods in zip(adapter_names[1:], modules[1:], strict=True):
            if mods != modules[0]:
                raise ValueError(_module_diff_message(adapter_names[0], modules[0], name, mods))
        weights = {m: [f[m] for f in per_adapter] for m in sorted(modules[0])}
        return cls(
            names=adapter_names,
            module_names=sorted(weights),
            lora_config=configs[0],
            weights=weights,
        )


# --------------------------------------------------------------------------- helpers
def _weight(linear: Any) -> Tensor:
    """A detached copy of a LoRA ``nn.Linear``'s weight."""
    weight: Tensor = linear.weight
    return weight.detach().clone()


def _check_count(items: Sequence[Any], what: str = "adapters") -> None:
    if len(items) < 2:
        raise ValueError(f"need at least 2 {what} to merge, got {len(items)}: {list(items)}")


def _module_diff_message(n0: str, m0: set[str], n1: str, m1: set[str]) -> str:
    only0, only1 = sorted(m0 - m1), sorted(m1 - m0)
    return (
        f"module sets differ between adapters {n0!r} and {n1!r}: only in {n0!r}: {only0[:5]}"
        f"{' ...' if len(only0) > 5 else ''}; only in {n1!r}: {only1[:5]}{' ...' if len(only1) > 5 else ''}"
    )


def _validate(names: Sequence[str], weights: Mapping[str, Sequence[Factors]]) -> None:
    """Check counts, names, per-module shapes and finiteness; raise naming the culprit."""
    _check_count(names)
    if len(set(names)) != len(names):
        raise ValueError(f"adapter names must be unique, got {list(names)}")
    if not weights:
        raise ValueError("the stack has no modules")
    for module, entries in weights.items():
        if len(entries) != len(names):
            raise ValueError(
                f"module {module!r} has {len(entries)} adapters, expected {len(names)} ({list(names)})"
            )
        ref_shape: tuple[int, int] | None = None
        for name, (a, b, s) in zip(names, entries, strict=True):
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
                raise ValueError(
                    f"adapter {name!r} on module {module!r}: lora_A {tuple(a.shape)} and lora_B "
                    f"{tuple(b.shape)} are not r×d_in and d_out×r with the same r"
                )
            if a.shape[0] < 1:
                raise ValueError(f"adapter {name!r} on module {module!r} has rank 0")
            shape = (int(b.shape[0]), int(a.shape[1]))
            if ref_shape is None:
                ref_shape = shape
            elif shape != ref_shape:
                raise ValueError(
                    f"shapes differ on module {module!r}: adapter {names[0]!r} has d_out×d_in "
                    f"{ref_shape[0]}×{ref_shape[1]}, adapter {name!r} has {shape[0]}×{shape[1]}"
                )
            if not math.isfinite(s):
                raise ValueError(f"adapter {name!r} on module {module!r} has scaling={s}")
            for label, w in (("lora_A", a), ("lora_B", b)):
                if not bool(torch.isfinite(w).all()):
                    raise ValueError(
                        f"non-finite weights (nan/inf) in adapter {name!r}, module {module!r}, {label}"
                    )


def _check_only_lora_weights(config: Any, where: str) -> None:
    """Refuse a LoRA config whose adapter trains more than ``B@A`` (a merge would drop it).

    Args:
        config: The adapter's ``LoraConfig``.
        where: The adapter, as the error should name it.

    Raises:
        ValueError: ``lora_bias=True``, ``bias`` other than ``"none"`` or ``modules_to_save``.
    """
    if getattr(config, "lora_bias", False):
        raise ValueError(
            f"{where}: lora_bias=True; the LoRA bias is not part of B@A and cannot be merged here"
        )
    if getattr(config, "bias", "none") != "none":
        raise ValueError(
            f"{where}: bias={config.bias!r} trains the base model's biases, which a merge of "
            "B@A would drop; only bias='none' adapters can be merged here"
        )
    if getattr(config, "modules_to_save", None):
        raise ValueError(
            f"{where}: modules_to_save={list(config.modules_to_save)} trains whole modules "
            "besides the LoRA weights, which a merge of B@A would drop; only adapters without "
            "modules_to_save can be merged here"
        )


def _what_else(keys: Sequence[str]) -> str:
    """What weights outside ``lora_A``/``lora_B`` are, in words (for an error message)."""
    kinds = []
    if any(".lora_B.bias" in k or ".lora_A.bias" in k for k in keys):
        kinds.append("LoRA biases")
    if any("lora_embedding_" in k for k in keys):
        kinds.append("embedding LoRA")
    if any("lora_" not in k for k in keys):
        kinds.append("whole modules or biases of the base model")
    return ", ".join(kinds) or "other LoRA weights"


def _read_folder(path: Path) -> tuple[LoraConfig, dict[str, Factors]]:
    """One peft adapter folder → its config and ``module -> (A, B, scaling)``."""
    from peft.utils.other import get_pattern_key

    cfg_path = path / "adapter_config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found: {path} is not a peft adapter folder")
    raw = json.loads(cfg_path.read_text())
    if raw.get("peft_type", "LORA") != "LORA":
        raise ValueError(
            f"{path}: peft_type={raw.get('peft_type')!r}, only LORA adapters can be merged"
        )
    config = LoraConfig.from_pretrained(str(path))
    if config.use_dora:
        raise ValueError(
            f"{path}: use_dora=True, DoRA adapters are not B@A and cannot be merged here"
        )
    _check_only_lora_weights(config, str(path))
    st_path, bin_path = path / "adapter_model.safetensors", path / "adapter_model.bin"
    if st_path.is_file():
        from safetensors.torch import load_file

        state = load_file(str(st_path))
    elif bin_path.is_file():
        state = torch.load(bin_path, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{path} has no adapter_model.safetensors (or adapter_model.bin)")
    parts: dict[str, dict[str, Tensor]] = {}
    matches = {key: _KEY_RE.match(key) for key in state}
    others = sorted(key for key, match in matches.items() if match is None)
    if others:
        raise ValueError(
            f"{path}: the adapter file holds {len(others)} weights besides lora_A/lora_B "
            f"({_what_else(others)}; e.g. {others[:3]}); a merge of B@A would drop them "
            "silently, so only plain Linear LoRA adapters are merged"
        )
    for key, match in matches.items():
        assert match is not None  # every other key was refused above
        parts.setdefault(strip_peft_prefix(match["module"]), {})[match["which"]] = state[key]
    if not parts:
        raise ValueError(f"{path}: no lora_A/lora_B weights found in the adapter file")
    factors: dict[str, Factors] = {}
    for module, ab in sorted(parts.items()):
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{path}: module {module!r} has only lora_{''.join(ab)}")
        r = int(ab["A"].shape[0])
        alpha = config.lora_alpha
        if config.alpha_pattern:
            key = get_pattern_key(list(config.alpha_pattern), module)
            alpha = config.alpha_pattern.get(key, alpha)
        scaling = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        factors[module] = (ab["A"], ab["B"], float(scaling))
    return config, factors
