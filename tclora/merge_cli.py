"""``tclora merge``: the CP merge study on saved peft adapter folders, without training.

Loads the base model once, attaches every adapter folder to it, and runs the same study as
:class:`~tclora.callbacks.CPMergeCallback` does at fit end: CP merges and baselines, each at the
scale chosen on validation data, evaluated against the references, written to ``--output_dir``
(results table, loadings figure, the kept merge as a peft adapter folder).

Example::

    tclora merge --adapters runs/demo/adapters/cluster_0 runs/demo/adapters/cluster_1 \\
        --val_data '[{registry: rectangles, max_samples: 32}]' \\
        --merge.scales '[1, 2, 4]' --merge.eval_sets '[registry:food]' --output_dir runs/merged
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jsonargparse import ActionConfigFile, ArgumentParser

from tclora.callbacks.cp_merge import CPMergeCallback


class MergeInputError(ValueError):
    """The adapter folders cannot be merged together."""


def adapter_base_models(folders: Sequence[str | Path]) -> dict[str, str]:
    """Read ``base_model_name_or_path`` from each adapter folder's ``adapter_config.json``.

    Args:
        folders: peft adapter folders.

    Returns:
        ``{folder: base model}``.

    Raises:
        MergeInputError: A folder or its config is missing, or the adapters were trained on
            different base models.
    """
    bases: dict[str, str] = {}
    for folder in folders:
        config = Path(folder) / "adapter_config.json"
        if not config.is_file():
            raise MergeInputError(
                f"adapters: {str(folder)!r} is not a peft adapter folder (no adapter_config.json)"
            )
        bases[str(folder)] = str(json.loads(config.read_text()).get("base_model_name_or_path"))
    if len(set(bases.values())) > 1:
        listing = ", ".join(f"{f} -> {b}" for f, b in bases.items())
        raise MergeInputError(f"adapters of different base models cannot be merged: {listing}")
    return bases


def build_parser() -> ArgumentParser:
    """The ``tclora merge`` argument parser (every ``CPMergeCallback`` option under ``--merge``)."""
    parser = ArgumentParser(
        prog="tclora merge",
        description="Merge saved LoRA adapter folders by joint CP decomposition and baselines, "
        "evaluate the merges, and export the kept one.",
    )
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_argument(
        "--adapters", type=list[str], required=True, help="peft adapter folders (2 or more)"
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
    parser.add_argument("--output_dir", type=str, required=True, help="folder for all outputs")
    parser.add_class_arguments(CPMergeCallback, "merge", skip={"output_dir"})
    return parser


def _val_loader(sources: list[Any], tokenizer: Any, max_length: int, batch_size: int) -> Any:
    import numpy as np
    from torch.utils.data import DataLoader

    from tclora.data import load_sources, parse_source
    from tclora.datamodules.cluster import TokenizedSamples, collate_batch

    samples = load_sources([parse_source(s) for s in sources])
    dataset = TokenizedSamples(
        samples, np.zeros(len(samples), dtype=np.int64), tokenizer, max_length
    )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=False, collate_fn=lambda b: collate_batch(b, pad)
    )


def merge_main(argv: Sequence[str]) -> int:
    """Run ``tclora merge`` with ``argv``; returns the process exit code."""
    parser = build_parser()
    cfg = parser.parse_args(list(argv))
    folders = [str(f) for f in cfg.adapters]
    if len(folders) < 2:
        parser.error(f"--adapters: need 2 or more adapter folders to merge, got {len(folders)}")
    bases = adapter_base_models(folders)
    merge_kwargs = dict(cfg.merge)
    merge_kwargs.pop("__path__", None)
    callback = CPMergeCallback(output_dir=cfg.output_dir, **merge_kwargs)
    if "routing" in callback.config.references:
        callback.config.references = [r for r in callback.config.references if r != "routing"]
    callback.load_eval_sets()  # a missing or malformed evaluation file fails before loading models

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tclora.assets import resolve_model

    model_name = resolve_model(cfg.model or next(iter(bases.values())))
    tokenizer = AutoTokenizer.from_pretrained(model_name)
    base = AutoModelForCausalLM.from_pretrained(model_name)
    names = list(cfg.names) if cfg.names else [Path(f).name for f in folders]
    if len(names) != len(folders) or len(set(names)) != len(names):
        raise MergeInputError(f"--names={names}: give one distinct name per adapter folder")
    model = PeftModel.from_pretrained(base, folders[0], adapter_name=names[0])
    for folder, name in zip(folders[1:], names[1:], strict=True):
        model.load_adapter(folder, adapter_name=name)
    model.set_adapter(names[0])
    val_loaders = (
        [_val_loader(list(cfg.val_data), tokenizer, callback.config.max_length, cfg.val_batch_size)]
        if cfg.val_data
        else []
    )
    from lightning.pytorch.loggers import TensorBoardLogger

    logger = TensorBoardLogger(cfg.output_dir, name="tensorboard")
    result = callback.run(
        model, tokenizer, out_dir=Path(cfg.output_dir), val_loaders=val_loaders, loggers=[logger]
    )
    logger.finalize("success")
    print((Path(cfg.output_dir) / "results.md").read_text())
    print(f"kept merge: {result.kept}; outputs in {cfg.output_dir}")
    return 0
