"""Turn a merge into a LoRA: in memory on a PeftModel, as a peft adapter folder, or into the base.

A merge ``ΔW = B' @ A'`` (``k`` columns per module) becomes a LoRA of rank ``r = max k`` with
``lora_alpha = r`` (scaling 1), ``lora_B = B'`` and ``lora_A = A'``, zero-padded to ``r``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig
from torch import Tensor

from tclora._io import atomic_dir
from tclora.merge.rules import MergedAdapter

__all__ = [
    "export_adapter",
    "fold_into_base",
    "install_adapter",
    "merged_lora_config",
    "write_peft_folder",
]


def _padded(merged: MergedAdapter, module: str, r: int) -> tuple[Tensor, Tensor]:
    """``(A r×d_in, B d_out×r)`` of ``module``, zero-padded from ``k`` to ``r``."""
    b, a = merged.lowrank[module]
    k = a.shape[0]
    a_p = torch.zeros(r, a.shape[1], dtype=a.dtype, device=a.device)
    b_p = torch.zeros(b.shape[0], r, dtype=b.dtype, device=b.device)
    a_p[:k] = a
    b_p[:, :k] = b
    return a_p, b_p


def merged_lora_config(merged: MergedAdapter, lora_config: LoraConfig | None) -> LoraConfig:
    """The ``LoraConfig`` of a merge: ``r = lora_alpha = merged.rank``, its modules, no dropout.

    Fields of ``lora_config`` that still apply are kept (``task_type``,
    ``base_model_name_or_path``, ``fan_in_fan_out``); bias, per-module patterns, DoRA, rsLoRA,
    ``modules_to_save`` and layer filters are cleared. ``target_modules`` are short names
    (``["q_proj", "v_proj"]``, as peft writes them) when they are unambiguous: the adapters were
    targeted by exactly these names, with no layer filter, so on the same base they name exactly
    the merged modules; otherwise every merged module's full name.

    Args:
        merged: the merge.
        lora_config: the adapters' config (e.g. ``AdapterStack.lora_config``), or ``None``.

    Returns:
        A new ``LoraConfig``.
    """
    r = merged.rank
    base = lora_config if lora_config is not None else LoraConfig()
    return LoraConfig(
        r=r,
        lora_alpha=r,
        target_modules=_target_modules(merged.module_names, lora_config),
        lora_dropout=0.0,
        bias="none",
        fan_in_fan_out=base.fan_in_fan_out,
        task_type=base.task_type,
        base_model_name_or_path=base.base_model_name_or_path,
        revision=base.revision,
        inference_mode=True,
    )


def _target_modules(modules: list[str], lora_config: LoraConfig | None) -> list[str]:
    """Short module names when the adapters' own short names select exactly ``modules``."""
    leaves = sorted({m.rsplit(".", 1)[-1] for m in modules})
    given = lora_config.target_modules if lora_config is not None else None
    unambiguous = (
        lora_config is not None
        and isinstance(given, list | set | tuple)
        and all("." not in str(name) for name in given)
        and set(given) == set(leaves)
        and lora_config.layers_to_transform is None
        and lora_config.layers_pattern is None
        and not getattr(lora_config, "exclude_modules", None)
    )
    return leaves if unambiguous else list(modules)


def _base_model(model: Any) -> Any:
    """The model whose module names match the stack's (peft's ``base_model.model`` prefix dropped)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _check_merged(merged: MergedAdapter) -> None:
    if not merged.lowrank:
        raise ValueError("merged has no modules")
    for module, (b, a) in merged.lowrank.items():
        if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
            raise ValueError(f"non-finite values (nan/inf) in the merge, module {module!r}")


def install_adapter(peft_model: Any, name: str, merged: MergedAdapter) -> None:
    """Add (or replace) an in-memory LoRA adapter ``name`` whose delta is ``merged.delta``.

    Rank ``merged.rank``, ``lora_alpha = rank`` (scaling 1), ``inference_mode`` (not trainable).
    The active adapter is left as it was.

    Args:
        peft_model: a ``PeftModel`` holding LoRA adapters.
        name: the adapter name.
        merged: the merge.

    Raises:
        TypeError: ``peft_model`` is not a PeftModel.
        ValueError: a module of the merge is not a layer of the model, or its shape differs.
    """
    from peft import PeftModel

    if not isinstance(peft_model, PeftModel):
        raise TypeError(f"peft_model must be a peft.PeftModel, got {type(peft_model).__name__}")
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got name={name!r}")
    _check_merged(merged)
    base = _base_model(peft_model)
    layers = dict(base.named_modules())
    for module, (b, a) in merged.lowrank.items():
        layer = layers.get(module)
        if layer is None:
            raise ValueError(f"module {module!r} of the merge is not a module of the model")
        w = layer.get_base_layer().weight if hasattr(layer, "get_base_layer") else layer.weight
        fan = getattr(layer, "fan_in_fan_out", False)
        shape = tuple(w.shape[::-1]) if fan else tuple(w.shape)
        if shape != (b.shape[0], a.shape[1]):
            raise ValueError(
                f"shape differs on module {module!r}: model weight d_out×d_in {shape}, "
                f"merge {b.shape[0]}×{a.shape[1]}"
            )
    active = peft_model.active_adapter
    parent = peft_model.peft_config.get(active)
    parent_cfg = parent if isinstance(parent, LoraConfig) else None
    if name in peft_model.peft_config:
        if name == active:
            # peft refuses to delete the only/active adapter cleanly; re-add then restore below.
            others = [n for n in peft_model.peft_config if n != name]
            if others:
                peft_model.set_adapter(others[0])
        peft_model.delete_adapter(name)
    peft_model.add_adapter(name, merged_lora_config(merged, parent_cfg))
    r = merged.rank
    with torch.no_grad():
        for module in merged.lowrank:
            layer = base.get_submodule(module)
            a_p, b_p = _padded(merged, module, r)
            wa, wb = layer.lora_A[name].weight, layer.lora_B[name].weight
            wa.copy_(a_p.to(dtype=wa.dtype, device=wa.device))
            wb.copy_(b_p.to(dtype=wb.dtype, device=wb.device))
            wa.requires_grad_(False)
            wb.requires_grad_(False)
    if peft_model.active_adapter != active:
        peft_model.set_adapter(active)


def export_adapter(
    merged: MergedAdapter, out_dir: str | Path, lora_config: LoraConfig | None
) -> Path:
    """Write a merge as a standard peft adapter folder (atomically: readers see the old folder
    or the new one, whole).

    ``PeftModel.from_pretrained(base_model, out_dir)`` loads it; its delta on every module equals
    ``merged.delta(module)`` (float32 weights).

    Args:
        merged: the merge.
        out_dir: the folder to write (replaced if it exists).
        lora_config: the adapters' config (kept fields: see ``merged_lora_config``).

    Returns:
        ``out_dir`` as a ``Path``.

    Raises:
        ValueError: empty or non-finite merge, or ``out_dir`` is an existing file.
    """
    _check_merged(merged)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir={str(out)!r} exists and is not a folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    config = merged_lora_config(merged, lora_config)
    r = config.r
    state: dict[str, Tensor] = {}
    for module in merged.module_names:
        a_p, b_p = _padded(merged, module, r)
        state[f"base_model.model.{module}.lora_A.weight"] = a_p.float()
        state[f"base_model.model.{module}.lora_B.weight"] = b_p.float()
    with atomic_dir(out) as tmp:  # also removes leftovers of a killed earlier export
        write_peft_folder(tmp, config, state)
    return out


def write_peft_folder(folder: Path, config: LoraConfig, state: dict[str, Tensor]) -> None:
    """Write one adapter the way ``PeftModel.save_pretrained`` does: ``adapter_config.json``
    (with ``inference_mode=True``) and ``adapter_model.safetensors`` (``{"format": "pt"}``).

    Args:
        folder: The adapter folder (created; the caller makes the write atomic).
        config: The adapter's config (not changed: a copy is written).
        state: peft's keys without the adapter name (``base_model.model.<module>.lora_A.weight``)
            to tensors; written contiguous, on the CPU.
    """
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    written = copy.deepcopy(config)
    written.inference_mode = True
    written.save_pretrained(str(folder))
    tensors = {key: value.detach().cpu().contiguous() for key, value in state.items()}
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})


def fold_into_base(model: Any, merged: MergedAdapter) -> None:
    """Add ``merged.delta`` into the base weights in place (``W ← W + ΔW``).

    Works on a ``PeftModel`` (the LoRA layers' base layers are changed, the adapters are not) or
    on a plain model.

    Args:
        model: the model.
        merged: the merge.

    Raises:
        ValueError: a module of the merge is not in the model, or its shape differs.
    """
    _check_merged(merged)
    base = _base_model(model)
    layers = dict(base.named_modules())
    targets = []
    for module in merged.module_names:
        layer = layers.get(module)
        if layer is None:
            raise ValueError(f"module {module!r} of the merge is not a module of the model")
        w = layer.get_base_layer().weight if hasattr(layer, "get_base_layer") else layer.weight
        fan = bool(getattr(layer, "fan_in_fan_out", False))
        d_out, d_in = merged.lowrank[module][0].shape[0], merged.lowrank[module][1].shape[1]
        if tuple(w.shape) != ((d_in, d_out) if fan else (d_out, d_in)):
            raise ValueError(
                f"shape differs on module {module!r}: weight {tuple(w.shape)}, merge {d_out}×{d_in}"
            )
        targets.append((module, w, fan))
    with torch.no_grad():
        for module, w, fan in targets:
            delta = merged.delta(module)
            w.add_((delta.T if fan else delta).to(dtype=w.dtype, device=w.device))
