"""``tclora merge``: the merge study on saved peft adapter folders, without training.

Checks every input first (adapter folders readable and of one base model, evaluation sets,
output folder), then loads the base model once, attaches every adapter folder to it and runs
:class:`~tclora.study.MergeStudy`: CP merges and baselines, each at the scale chosen on
validation data, evaluated against the references, written to the output folder (results table,
loadings figure, the kept merge as a peft adapter folder) and to TensorBoard.

Example::

    tclora merge --adapters runs/demo/adapters/cluster_0 runs/demo/adapters/cluster_1 \\
        --val_data '[{registry: rectangles, max_samples: 32}]' \\
        --merge.scales '[1, 2, 4]' --merge.eval_sets '[registry:food]'

Without ``--output_dir`` every call writes to a new ``runs/merge/version_<n>`` folder; with it,
an interrupted study in that folder resumes if (and only if) it is the very same study.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jsonargparse import ActionConfigFile, ArgumentParser

from tclora._checks import DTYPES, resolve_device, resolve_dtype
from tclora._io import check_writable

__all__ = ["MergeInputError", "adapter_base_models", "build_parser", "merge_main"]

DEFAULT_ROOT = "runs/merge"
_CALLBACK_ONLY = ("output_dir", "tokenizer")


class MergeInputError(ValueError):
    """The adapter folders cannot be merged together."""


def adapter_base_models(folders: Sequence[str | Path]) -> dict[str, str]:
    """Check each adapter folder and read the base model it was trained on.

    Every folder must hold a parseable ``adapter_config.json`` and a readable
    ``adapter_model.safetensors`` (a truncated file is named here, before any model loads).

    Args:
        folders: peft adapter folders.

    Returns:
        ``{folder: base model}`` (``base_model_name_or_path`` of each config).

    Raises:
        MergeInputError: A folder, its config or its weights are missing or unreadable, or the
            adapters were trained on different base models.
    """
    from safetensors import safe_open

    bases: dict[str, str] = {}
    for folder in folders:
        config = Path(folder) / "adapter_config.json"
        weights = Path(folder) / "adapter_model.safetensors"
        if not config.is_file():
            raise MergeInputError(
                f"adapters: {str(folder)!r} is not a peft adapter folder (no adapter_config.json)"
            )
        try:
            base = json.loads(config.read_text()).get("base_model_name_or_path")
        except (OSError, ValueError) as err:
            raise MergeInputError(
                f"adapters: {str(config)!r} is not valid JSON ({err}); re-export the adapter"
            ) from None
        if not weights.is_file():
            raise MergeInputError(
                f"adapters: {str(folder)!r} has no adapter_model.safetensors; re-export the adapter"
            )
        try:
            with safe_open(str(weights), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 -- safe_open has no __iter__
                    handle.get_tensor(key)
        except Exception as err:  # noqa: BLE001 -- any failure: the file is unreadable
            raise MergeInputError(
                f"adapters: {str(weights)!r} in folder {str(folder)!r} is unreadable "
                f"({type(err).__name__}: {str(err)[:200]}); it is truncated or corrupt, "
                "re-export the adapter"
            ) from None
        bases[str(folder)] = str(base)
    if len(set(bases.values())) > 1:
        listing = ", ".join(f"{f} -> {b}" for f, b in bases.items())
        raise MergeInputError(f"adapters of different base models cannot be merged: {listing}")
    return bases


def next_version_dir(root: str | Path) -> Path:
    """``<root>/version_<n>`` with ``n`` one more than the largest existing (0 for none)."""
    folder = Path(root)
    numbers = [
        int(m[1])
        for p in (folder.iterdir() if folder.is_dir() else [])
        if (m := re.fullmatch(r"version_(\d+)", p.name))
    ]
    return folder / f"version_{max(numbers, default=-1) + 1}"


def build_parser() -> ArgumentParser:
    """The ``tclora merge`` argument parser (every study option under ``--merge``)."""
    from tclora.callbacks.cp_merge import CPMergeCallback

    parser = ArgumentParser(
        prog="tclora merge",
        description="Merge saved LoRA adapter folders by joint CP decomposition and baselines, "
        "evaluate the merges, and export the kept one.",
    )
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_argument(
        "--adapters",
        type=str,
        nargs="+",
        required=True,
        help="peft adapter folders (2 or more): --adapters A B C or --adapters '[A, B, C]'",
    )
    parser.add_argument(
        "--names", type=list[str] | None, default=None, help="adapter names (default: folder names)"
    )
    parser.add_argument(
        "--model",
        type=str | None,
        default=None,
        help="base model: folder, packaged alias or hub id (default: the adapters' base model)",
    )
    parser.add_argument(
        "--val_data",
        type=list[Any] | None,
        default=None,
        help="validation sources (ClusterDataModule source syntax) for choosing each method's scale",
    )
    parser.add_argument("--val_batch_size", type=int, default=8, help="validation batch size")
    parser.add_argument(
        "--device",
        type=str,
        default="auto",
        help="where the model runs: auto (the first GPU if torch sees one, else cpu), cpu, "
        "cuda, cuda:<index>",
    )
    parser.add_argument(
        "--dtype",
        type=str,
        default="float32",
        choices=DTYPES,
        help="dtype of the base model's weights",
    )
    parser.add_argument(
        "--output_dir",
        type=str | None,
        default=None,
        help=f"folder for all outputs (default: a new {DEFAULT_ROOT}/version_<n>)",
    )
    parser.add_class_arguments(CPMergeCallback, "merge", skip=set(_CALLBACK_ONLY))
    return parser


def _adapter_folders(values: Sequence[Any]) -> list[str]:
    """``--adapters A B`` and ``--adapters '[A, B]'`` (a YAML list) as one list of folders."""
    import yaml

    out: list[str] = []
    for value in values:
        text = str(value)
        if text.lstrip().startswith("["):
            parsed = yaml.safe_load(text)
            out += [str(v) for v in (parsed if isinstance(parsed, list) else [parsed])]
        else:
            out.append(text)
    return out


def _val_loader(
    sources: list[Any], tokenizer: Any, max_length: int, batch_size: int, chat_template: bool
) -> Any:
    """The ``--val_data`` samples as one loader, formatted as the study formats its prompts
    (``--merge.chat_template``)."""
    import numpy as np
    from torch.utils.data import DataLoader

    from tclora.data import TokenizedSamples, collate_batch, load_sources, parse_source

    samples = load_sources([parse_source(s) for s in sources])
    dataset = TokenizedSamples(
        samples, np.zeros(len(samples), dtype=np.int64), tokenizer, max_length, chat_template
    )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=False, collate_fn=lambda b: collate_batch(b, pad)
    )


def merge_main(argv: Sequence[str]) -> int:
    """Run ``tclora merge`` with ``argv``; returns the process exit code."""
    from tclora.study.config import StudyConfig
    from tclora.study.study import MergeStudy

    parser = build_parser()
    cfg = parser.parse_args(list(argv))
    try:
        device = resolve_device(cfg.device)
    except ValueError as err:
        parser.error(str(err))
    dtype = resolve_dtype(cfg.dtype)
    folders = _adapter_folders(cfg.adapters)
    if len(folders) < 2:
        parser.error(f"--adapters: need 2 or more adapter folders to merge, got {len(folders)}")
    names = list(cfg.names) if cfg.names else [Path(f).name for f in folders]
    if len(names) != len(folders) or len(set(names)) != len(names):
        raise MergeInputError(f"--names={names}: give one distinct name per adapter folder")
    options = {k: v for k, v in dict(cfg.merge).items() if k not in (*_CALLBACK_ONLY, "__path__")}
    study_config = StudyConfig.from_options(**options)
    if "routing" in study_config.references:
        print("tclora merge: no data module to route with: the 'routing' reference is skipped")
        study_config = study_config.without_routing()
    try:
        study_config.check_validation(bool(cfg.val_data), "pass --val_data", prefix="--merge.")
    except ValueError as err:
        parser.error(str(err))
    bases = adapter_base_models(folders)
    study = MergeStudy(study_config)
    study.load_eval_sets()  # a missing or malformed evaluation file fails before loading models
    out_dir = Path(cfg.output_dir) if cfg.output_dir else next_version_dir(DEFAULT_ROOT)
    check_writable(out_dir, "--output_dir")

    from lightning.pytorch.loggers import TensorBoardLogger
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tclora.assets import resolve_model
    from tclora.study.logging import log_study

    model_name = resolve_model(cfg.model or next(iter(bases.values())))
    tokenizer = AutoTokenizer.from_pretrained(model_name)
    base = AutoModelForCausalLM.from_pretrained(model_name, dtype=dtype)
    model = PeftModel.from_pretrained(base, folders[0], adapter_name=names[0])
    for folder, name in zip(folders[1:], names[1:], strict=True):
        model.load_adapter(folder, adapter_name=name)
    model.set_adapter(names[0])
    model.to(device)
    print(f"tclora merge: {len(folders)} adapters on {model_name}, {cfg.dtype}, on {device}")
    val_loaders = (
        [
            _val_loader(
                list(cfg.val_data),
                tokenizer,
                study_config.max_length,
                cfg.val_batch_size,
                study_config.chat_template,
            )
        ]
        if cfg.val_data
        else []
    )
    result = study.run(model, tokenizer, out_dir=out_dir, val_loaders=val_loaders)
    logger = TensorBoardLogger(str(out_dir), name="tensorboard", version="")
    log_study([logger], 0, result, study_config)
    logger.finalize("success")
    print((out_dir / "results.md").read_text())
    print(f"kept merge: {result.kept}; outputs in {out_dir}")
    return 0
