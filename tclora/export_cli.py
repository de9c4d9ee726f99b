"""``tclora export``: a ``LoRAModule`` checkpoint as peft adapter folders, optionally a full model.

Any checkpoint of ``tclora fit`` (the last one, one of ``ModelCheckpoint``'s, or the
``interrupted-step=<N>.ckpt`` that Ctrl-C writes) becomes one peft adapter folder per cluster,
loadable with ``PeftModel.from_pretrained`` and mergeable with ``tclora merge``. With
``--full_model DIR --fold NAME``, one adapter or one merge of all of them is also added into
the base weights (:func:`tclora.merge.fold_into_base`) and the whole model is saved as a plain
transformers folder that needs no peft.

Example::

    tclora export --ckpt_path runs/demo/tensorboard/version_0/checkpoints/last.ckpt \\
        --output_dir runs/demo/adapters_from_ckpt --full_model runs/demo/full --fold cp4_mean_loading
"""

from __future__ import annotations

import argparse
import pickle
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["build_parser", "export_main", "fold_merge"]


def build_parser() -> argparse.ArgumentParser:
    """The ``tclora export`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="tclora export",
        description="Export the adapters of a tclora fit checkpoint as peft adapter folders, and "
        "optionally a full model with one adapter or merge folded into the base weights.",
    )
    parser.add_argument("--ckpt_path", required=True, help="checkpoint written by tclora fit")
    parser.add_argument(
        "--output_dir",
        default=None,
        help="folder for the adapter folders (default: <checkpoint name>-adapters beside it); "
        "absent, empty or an earlier export",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="base model, when the checkpoint's (its model hyperparameter) has moved",
    )
    parser.add_argument(
        "--full_model",
        default=None,
        help="also write a full transformers model folder (absent or empty) with --fold folded in",
    )
    parser.add_argument(
        "--fold",
        default=None,
        help="what --full_model folds into the base: an adapter (cluster_2) or a merge method "
        "of them all (cp4_mean_loading, uniform, ties, ...)",
    )
    parser.add_argument(
        "--scale",
        type=float,
        default=None,
        help="scale of the folded merge (default: the scale the fit's merge study chose for it, "
        "when the checkpoint holds one, else 1)",
    )
    return parser


def _study_scales(checkpoint: Mapping[str, Any]) -> dict[str, float]:
    """Each method's chosen scale from a ``CPMergeCallback`` state in the checkpoint."""
    scales: dict[str, float] = {}
    for state in (checkpoint.get("callbacks") or {}).values():
        if isinstance(state, Mapping):
            for row in state.get("done_rows", []):
                if row.get("scale") is not None:
                    scales[str(row["name"])] = float(row["scale"])
    return scales


def _study_merge_options(checkpoint: Mapping[str, Any]) -> dict[str, Any] | None:
    """How a ``CPMergeCallback`` of the checkpoint built its merges (``None`` if not recorded)."""
    for state in (checkpoint.get("callbacks") or {}).values():
        if isinstance(state, Mapping) and isinstance(state.get("merge_options"), Mapping):
            return dict(state["merge_options"])
    return None


def fold_merge(
    peft_model: Any,
    names: Sequence[str],
    fold: str,
    scale: float | None,
    chosen: Mapping[str, float],
    options: Mapping[str, Any] | None = None,
) -> tuple[Any, str]:
    """The merge named ``fold`` of the adapters ``names`` of ``peft_model``, at its scale.

    Args:
        peft_model: The ``PeftModel`` holding the adapters.
        names: Its adapters, in order.
        fold: An adapter name, or a merge method of the study (``cp<R>_<rule>`` or a baseline).
        scale: The scale; ``None`` takes ``chosen[fold]``, else 1.
        chosen: Scales a merge study chose, by method.
        options: How the study built its merges (``StudyConfig.merge_options``: engine, merge
            space, density, seed, ...); ``None``: the defaults, with a warning when ``chosen``
            has a scale for ``fold`` (that scale was chosen for a merge built in a way not
            recorded, so perhaps another merge).

    Returns:
        ``(MergedAdapter, where its scale came from)``.

    Raises:
        ValueError: ``fold`` is neither an adapter nor a merge method (the allowed ones listed).
    """
    from typing import get_args

    from tclora.merge import AdapterStack, MergedAdapter
    from tclora.study.config import Baseline, CPRule, StudyConfig
    from tclora.study.run import build_merges

    stack = AdapterStack.from_peft_model(peft_model, list(names))
    cp = re.fullmatch(r"cp(\d+)_(\w+)", fold)
    if cp is not None and (cp[2] not in get_args(CPRule) or int(cp[1]) < 1):
        cp = None
    if fold in names:
        index = list(names).index(fold)
        lowrank = {}
        for module in stack.module_names:
            a, b, scaling = stack.factors(module)[index]
            lowrank[module] = (b.float() * float(scaling), a.float())
        merged = MergedAdapter(method=f"single:{fold}", scale=1.0, lowrank=lowrank)
    elif cp is not None or fold in get_args(Baseline):
        if options is None and fold in chosen and scale is None:
            warnings.warn(
                f"--fold={fold!r}: the checkpoint's merge study did not record how it built its "
                "merges (a checkpoint of an older tclora), so the merge is rebuilt with the "
                "default options and the study's scale may belong to another merge; pass "
                "--scale to choose one",
                UserWarning,
                stacklevel=2,
            )
        built = dict(options or {})
        cfg = (
            StudyConfig(cp_ranks=[int(cp[1])], rules=[cp[2]], baselines=[], **built)  # type: ignore[list-item]
            if cp is not None
            else StudyConfig(rules=[], baselines=[fold], **built)  # type: ignore[list-item]
        )
        merges, _, _ = build_merges(stack, cfg)
        merged = merges[fold]
    else:
        raise ValueError(
            f"--fold={fold!r}: expected an adapter of the checkpoint ({list(names)}) or a merge "
            f"method: cp<R>_<rule> with rule in {list(get_args(CPRule))}, or one of "
            f"{list(get_args(Baseline))}"
        )
    if scale is not None:
        return merged.scaled(scale), f"scale {scale:g} (--scale)"
    if fold in chosen:
        return merged.scaled(chosen[fold]), f"scale {chosen[fold]:g} (chosen by the fit's study)"
    return merged, "scale 1"


def export_main(argv: Sequence[str]) -> int:
    """Run ``tclora export`` with ``argv``; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(list(argv))
    ckpt = Path(args.ckpt_path)
    if not ckpt.is_file():
        parser.error(f"--ckpt_path={str(ckpt)!r}: no such checkpoint file")
    if (args.full_model is None) != (args.fold is None):
        parser.error("--full_model and --fold go together: the folder, and what to fold into it")
    if args.scale is not None and args.fold is None:
        parser.error(f"--scale={args.scale}: only a folded merge (--fold) has a scale")
    from tclora._io import atomic_dir, check_writable
    from tclora.module import LoRAModule, check_export_dir

    out = Path(args.output_dir) if args.output_dir else ckpt.with_name(f"{ckpt.stem}-adapters")
    check_export_dir(out)
    full = Path(args.full_model) if args.full_model else None
    if full is not None:
        check_writable(full, "--full_model")
        if full.is_dir() and any(full.iterdir()):
            parser.error(f"--full_model={str(full)!r} is not empty; choose a new folder")

    import torch

    try:
        # Tensors and plain containers only: a checkpoint that needs arbitrary unpickling is
        # refused rather than run (tclora fit writes nothing else).
        checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"WeightsUnpickler error: (.*?\.)(?:\s|$)", str(err))
        reason = found.group(1) if found else str(err).strip().splitlines()[0]
        parser.error(
            f"--ckpt_path={str(ckpt)!r} holds objects other than tensors and plain containers, "
            f"which tclora loads only with weights_only=True: {reason}"
        )
    if not isinstance(checkpoint, dict) or "tclora" not in checkpoint:
        parser.error(
            f"--ckpt_path={str(ckpt)!r} was not written by a tclora fit (no 'tclora' entry)"
        )
    overrides: dict[str, Any] = {"export_dir": None}
    if args.model:
        overrides["model"] = args.model
    module = LoRAModule.load_from_checkpoint(
        ckpt, map_location="cpu", weights_only=True, **overrides
    )
    step = checkpoint.get("global_step")
    folders = module.export_adapters(out, {"checkpoint": str(ckpt), "global_step": step})
    print(f"tclora export: {len(folders)} adapters of {ckpt} (global step {step}) -> {out}")
    if full is not None:
        from transformers import AutoTokenizer

        from tclora.merge import fold_into_base

        merged, how = fold_merge(
            module.model,
            module.adapter_names,
            args.fold,
            args.scale,
            _study_scales(checkpoint),
            _study_merge_options(checkpoint),
        )
        fold_into_base(module.model, merged)
        plain = module.model.unload()
        tokenizer = AutoTokenizer.from_pretrained(module.model_path)
        with atomic_dir(full) as tmp:
            plain.save_pretrained(str(tmp))
            tokenizer.save_pretrained(str(tmp))
        print(
            f"tclora export: base model + {args.fold} at {how} -> {full} (a plain transformers model)"
        )
    return 0
