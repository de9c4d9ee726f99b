"""The ``tclora`` command: ``tclora fit|validate|merge|assets``.

``fit`` and ``validate`` are Lightning's own (:class:`TCLoraCLI`, a ``LightningCLI`` subclass over
:class:`~tclora.module.LoRAModule` and :class:`~tclora.datamodules.ClusterDataModule`); ``assets``
lists and fetches the offline model and corpus; ``merge`` runs the CP merge on saved adapter
folders.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from tclora._io import check_writable

_OWN_COMMANDS = {
    "assets": "list the offline assets, fetching and verifying what is missing",
    "merge": "merge saved adapter folders (CP and baselines), evaluate, export the kept merge",
}


class TCLoraCLI(LightningCLI):
    """LightningCLI over ``LoRAModule`` and ``ClusterDataModule``.

    The number of adapters is never typed twice: it is linked from the data module's
    ``num_clusters`` when both are instantiated. Before ``fit`` starts any work, the folders it
    will write (logs, checkpoints, exported adapters, merge results) are checked writable and
    the merge callbacks load their evaluation sets. A fit resumed with ``--ckpt_path`` takes the
    ``model:`` section from the checkpoint (Lightning's rule); every value of the config that the
    checkpoint overrides is named in a warning.
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_clusters", "model.num_adapters", apply_on="instantiate")

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
        if not trainer.is_global_zero:
            return
        lines = ["", "tclora: fit finished"]
        if trainer.log_dir:
            lines.append(f"  logs:             {trainer.log_dir}")
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


def _assets_main(argv: Sequence[str]) -> int:
    """Run ``tclora assets``: list the assets, fetching the missing ones (or rebuilding some).

    Without flags, missing assets are fetched and corrupt ones only reported, with the repair
    command; ``--repair`` rebuilds the missing and corrupt ones (hashing every file afresh),
    ``--force`` rebuilds all of them, ``--no-fetch`` only lists.

    Args:
        argv: The arguments after ``assets``.

    Returns:
        0 when every asset is verified at the end, else 1.
    """
    from tclora.assets import AssetError, asset_status, ensure_asset, tclora_home

    parser = argparse.ArgumentParser(
        prog="tclora assets",
        description="List the offline assets under $TCLORA_HOME, fetching what is missing.",
    )
    parser.add_argument("--no-fetch", action="store_true", help="only list; fetch nothing")
    parser.add_argument(
        "--repair",
        action="store_true",
        help="re-hash every file and rebuild the assets that are missing or corrupt",
    )
    parser.add_argument("--force", action="store_true", help="rebuild every asset, even verified")
    args = parser.parse_args(list(argv))
    if args.no_fetch and (args.repair or args.force):
        parser.error("--no-fetch cannot be combined with --repair or --force")
    if not args.no_fetch:
        for row in asset_status(deep=args.repair, fresh=args.repair):
            state = row["status"]
            if not (args.force or state == "missing" or (args.repair and state == "corrupt")):
                continue
            action = "fetching" if state == "missing" else f"rebuilding ({state})"
            print(f"{action} {row['name']} from {row['source']} ...", file=sys.stderr, flush=True)
            try:
                ensure_asset(row["name"], force=True)
            except AssetError as err:
                print(f"error: {err}", file=sys.stderr)
                return 1
    print(f"TCLORA_HOME={tclora_home()}")
    rows = asset_status(deep=True)
    for row in rows:
        print(f"{row['name']:<24} {row['status']:<9} {row['source']:<24} {row['path']}")
    corrupt = [r for r in rows if r["status"] == "corrupt"]
    missing = [r["name"] for r in rows if r["status"] == "missing"]
    for row in corrupt:
        print(f"{row['name']}: {row['problem']}")
    if corrupt:
        names = ", ".join(r["name"] for r in corrupt)
        print(f"corrupt, not used: {names}; run `tclora assets --repair` to fetch it again")
    if missing:
        print(f"missing: {', '.join(missing)}; run `tclora assets` to fetch it")
    return 1 if corrupt or missing else 0


def _print_top_help() -> None:
    print("usage: tclora {fit,validate,test,predict,merge,assets} ...\n")
    print(
        "TC-LoRA: cluster data, train one LoRA per cluster, merge them by joint CP decomposition."
    )
    print("\ncommands of tclora's own:")
    for name, text in _OWN_COMMANDS.items():
        print(f"  {name:<10} {text}")
    print("\nLightning commands (`tclora fit --help` lists every option):\n")


def cli_main(args: Sequence[str] | None = None, run: bool = True) -> TCLoraCLI:
    """Build (and by default run) the LightningCLI; ``args`` replaces ``sys.argv[1:]``."""
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
        parser_kwargs={"parser_mode": "yaml"},
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tclora`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if argv and argv[0] == "assets":
        return _assets_main(argv[1:])
    if argv and argv[0] == "merge":
        from tclora.study.cli import merge_main

        return merge_main(argv[1:])
    if not argv or argv[0] in {"-h", "--help"}:
        _print_top_help()
    cli_main(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
