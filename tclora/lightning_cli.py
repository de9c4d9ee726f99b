"""``tclora fit`` and ``tclora validate``: Lightning's CLI over tclora's module and data module.

Imported only when one of these commands runs (``tclora --help`` and tclora's own commands stay
fast): :class:`TCLoraCLI` (a ``LightningCLI``), its argument parser (``tclora fit --help`` also
documents :class:`~tclora.callbacks.CPMergeCallback`) and the training progress bar.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import _RICH_AVAILABLE
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from tclora._io import check_writable
from tclora.checkpoint_io import use_atomic_checkpoints

__all__ = ["StepsProgressBar", "TCLoraArgumentParser", "TCLoraCLI", "callback_help", "cli_main"]

CALLBACK_KEY = "trainer.callbacks"


def callback_help() -> str:
    """The options of :class:`~tclora.callbacks.CPMergeCallback`, as ``tclora fit --help`` ends.

    Rendered by jsonargparse from the callback's signature and docstring, the way
    ``--trainer.callbacks.help tclora.callbacks.CPMergeCallback`` renders them, with how to set
    them in a config and on the command line.
    """
    from jsonargparse import ArgumentParser

    from tclora.callbacks import CPMergeCallback

    parser = ArgumentParser(prog="tclora fit", add_help=False)
    parser.add_class_arguments(CPMergeCallback, CALLBACK_KEY)
    text = parser.format_help()
    body = text.split("\n\n", 1)[1]  # drop the usage block
    # drop the group's "--trainer.callbacks CONFIG / Path to a configuration file." entry
    body = re.sub(r"\n  --trainer\.callbacks CONFIG\n\s+Path to a configuration file\.", "", body)
    intro = (
        "\nCPMergeCallback (tclora.callbacks.CPMergeCallback): merges the adapters at fit end.\n"
        "Set it in a config under trainer.callbacks:\n"
        "  - class_path: tclora.callbacks.CPMergeCallback\n"
        "    init_args: {cp_ranks: [4], scales: [1, 2, 4], eval_sets: [registry:food]}\n"
        "or on the command line: --trainer.callbacks+=CPMergeCallback "
        "--trainer.callbacks.scales='[1, 2, 4]'\n\n"
    )
    return intro + body.split(":\n", 1)[1] if ":\n" in body else intro + body


class TCLoraArgumentParser(LightningArgumentParser):
    """Lightning's parser; a subcommand's help that has ``trainer.callbacks`` ends with the
    options of :class:`~tclora.callbacks.CPMergeCallback` (:func:`callback_help`)."""

    def format_help(self, formatter: argparse.HelpFormatter | None = None) -> str:
        """The parser's help, plus the merge callback's options on ``fit`` and ``validate``."""
        text = super().format_help(formatter)
        if any(getattr(action, "dest", None) == CALLBACK_KEY for action in self._actions):
            text += callback_help()
        return text


class StepsProgressBar(RichProgressBar):
    """Lightning's rich progress bar without its ``Epoch 0/-2`` when ``max_steps`` bounds the fit.

    With ``max_epochs`` unset and ``max_steps`` set, Lightning's bar writes ``max_epochs - 1``
    (``-2``); this one writes ``Epoch 0 (max_steps 48)``. Bounded by epochs it is Lightning's.
    """

    def _get_train_description(self, current_epoch: int) -> str:
        trainer = self.trainer
        if trainer.max_epochs is not None and trainer.max_epochs >= 1:
            return super()._get_train_description(current_epoch)
        text = f"Epoch {current_epoch}"
        if trainer.max_steps > 0:
            text += f" (max_steps {trainer.max_steps})"
        return f"{text:{len(self.validation_description)}}"


class TCLoraCLI(LightningCLI):
    """LightningCLI over ``LoRAModule`` and ``ClusterDataModule``: ``fit`` and ``validate``.

    Nothing is typed twice: the number of adapters is linked from the data module's
    ``num_clusters`` (when both are instantiated) and the data module's tokenizer from the
    module's ``model``. Before ``fit`` starts any work, the folders it will write (logs,
    checkpoints, exported adapters, merge results) are checked writable and the merge callbacks
    load their evaluation sets. A fit resumed with ``--ckpt_path`` takes the ``model:`` section
    from the checkpoint (Lightning's rule); every value of the config that the checkpoint
    overrides is named in a warning. Lightning's ``test`` and ``predict`` are not offered:
    ``LoRAModule`` has no test or predict step (``tclora merge`` evaluates adapters).
    """

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """``fit`` and ``validate`` (Lightning's ``test`` and ``predict`` need steps tclora lacks)."""
        return {
            name: skip
            for name, skip in LightningCLI.subcommands().items()
            if name in ("fit", "validate")
        }

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        """Lightning's parser, as :class:`TCLoraArgumentParser` unless another class was given."""
        if self.parser_class is LightningArgumentParser:
            self.parser_class = TCLoraArgumentParser
        return super().init_parser(**kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Link ``data.num_clusters`` → ``model.num_adapters`` and ``model.model`` →
        ``data.tokenizer``."""
        parser.link_arguments("data.num_clusters", "model.num_adapters", apply_on="instantiate")
        parser.link_arguments("model.model", "data.tokenizer", apply_on="parse")

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """Lightning's trainer, with :class:`StepsProgressBar` unless a bar is given or disabled,
        and checkpoints saved atomically (:class:`~tclora.checkpoint_io.AtomicCheckpointIO`)
        unless the config chose a checkpoint IO."""
        config = self._get(self.config_init, "trainer", default={})
        listed = config.get("callbacks") or []
        listed = listed if isinstance(listed, list) else [listed]
        wants_bar = config.get("enable_progress_bar") is not False and "callbacks" not in kwargs
        if wants_bar and _RICH_AVAILABLE and not any(isinstance(c, ProgressBar) for c in listed):
            kwargs["callbacks"] = [*listed, StepsProgressBar()]
        trainer = super().instantiate_trainer(**kwargs)
        use_atomic_checkpoints(trainer)
        return trainer

    def _parse_ckpt_path(self) -> None:
        subcommand = self.config.get("subcommand")
        section = self.config.get(subcommand) if subcommand else None
        before = _flat(section.get("model")) if section is not None else {}
        super()._parse_ckpt_path()
        if section is None or not section.get("ckpt_path"):
            return
        after = _flat(self.config[subcommand].get("model"))
        differ = {
            key: (before.get(key), after.get(key))
            for key in sorted(set(before) | set(after))
            if before.get(key) != after.get(key)
            # num_adapters left unset is linked from data.num_clusters at instantiation
            and not (key == "num_adapters" and before.get(key) is None)
        }
        if differ:
            listing = "; ".join(
                f"model.{k}: config {a!r} -> checkpoint {b!r}" for k, (a, b) in differ.items()
            )
            rank_zero_warn(
                f"resuming from {section.get('ckpt_path')}: the model section is taken from the "
                f"checkpoint, not from the config; these values differ and the checkpoint's are "
                f"used: {listing}. Start a new fit (no --ckpt_path) to change them"
            )

    def before_fit(self) -> None:
        """Check every output folder and the merge callbacks' inputs before any work starts."""
        from tclora.callbacks import CPMergeCallback

        trainer = self.trainer
        check_writable(trainer.default_root_dir, "trainer.default_root_dir")
        if trainer.log_dir:
            check_writable(trainer.log_dir, "trainer.logger (its log_dir)")
        for callback in trainer.callbacks:  # type: ignore[attr-defined]
            if isinstance(callback, CPMergeCallback):
                callback.check(trainer, self.datamodule)

    def after_fit(self) -> None:
        """Say where the logs, the adapters and the merge are, and how to open TensorBoard."""
        from tclora.callbacks import CPMergeCallback

        trainer = self.trainer
        log_dir = trainer.log_dir  # a collective under DDP: every rank asks, before rank zero
        if not trainer.is_global_zero:
            return
        lines = ["", "tclora: fit finished"]
        if log_dir:
            lines.append(f"  logs:             {log_dir}")
        export_dir = self.model.hparams.get("export_dir")
        if export_dir:
            lines.append(f"  adapters:         {export_dir}")
        for callback in trainer.callbacks:  # type: ignore[attr-defined]
            if isinstance(callback, CPMergeCallback):
                lines += callback.summary_lines()
        logger = trainer.logger
        if logger is not None and getattr(logger, "save_dir", None):
            lines.append(f"  open TensorBoard: tensorboard --logdir {logger.save_dir}")
        print("\n".join(lines))


def _flat(namespace: Any, prefix: str = "") -> dict[str, Any]:
    """A (nested) jsonargparse namespace or dict as ``{"a.b": value}``."""
    if namespace is None:
        return {}
    data = namespace.as_dict() if hasattr(namespace, "as_dict") else dict(namespace)
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key.startswith("__"):
            continue
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def cli_main(args: Sequence[str] | None = None, run: bool = True) -> TCLoraCLI:
    """Build (and by default run) the LightningCLI.

    Args:
        args: The arguments; ``None`` reads ``sys.argv[1:]`` (the console script).
        run: Run the subcommand (``False``: parse and instantiate only, no subcommand).

    Returns:
        The CLI, with ``trainer``, ``model`` and ``datamodule``.
    """
    import tclora.callbacks  # noqa: F401 -- registers CPMergeCallback for short names
    from tclora.datamodules import ClusterDataModule
    from tclora.module import LoRAModule

    return TCLoraCLI(
        LoRAModule,
        ClusterDataModule,
        args=list(args) if args is not None else None,
        run=run,
        save_config_kwargs={"overwrite": True},
        # LoRAModule builds one param group per adapter; a CLI optimizer would replace it.
        auto_configure_optimizers=False,
        # "tclora", also under `python -m tclora` (whose argv[0] is __main__.py)
        parser_kwargs={"parser_mode": "yaml", "prog": "tclora"},
    )
