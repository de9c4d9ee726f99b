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

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

_OWN_COMMANDS = {
    "assets": "list the offline assets, fetching and verifying what is missing",
    "merge": "merge saved adapter folders (CP and baselines), evaluate, export the kept merge",
}


class TCLoraCLI(LightningCLI):
    """LightningCLI over ``LoRAModule`` and ``ClusterDataModule``.

    The number of adapters is never typed twice: it is linked from the data module's
    ``num_clusters`` when both are instantiated.
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_clusters", "model.num_adapters", apply_on="instantiate")

    def after_fit(self) -> None:
        """Say where the logs, the adapters and the merge are, and how to open TensorBoard."""
        trainer = self.trainer
        if not trainer.is_global_zero:
            return
        lines = ["", "tclora: fit finished"]
        if trainer.log_dir:
            lines.append(f"  logs:             {trainer.log_dir}")
        export_dir = getattr(self.model, "hparams", {}).get("export_dir")
        if export_dir:
            lines.append(f"  adapters:         {export_dir}")
        for callback in trainer.callbacks:  # type: ignore[attr-defined]
            resolve = getattr(callback, "resolve_output_dir", None)
            if resolve is not None and getattr(callback, "finished", False):
                out = resolve(trainer)
                lines.append(f"  merge results:    {out / 'results.md'}")
                if (out / "merged_adapter").is_dir():
                    lines.append(f"  merged adapter:   {out / 'merged_adapter'}")
                result = getattr(callback, "result", None)
                if result is not None and result.kept:
                    lines.append(f"  kept merge:       {result.kept}")
        logger = trainer.logger
        if logger is not None and getattr(logger, "save_dir", None):
            lines.append(f"  open TensorBoard: tensorboard --logdir {logger.save_dir}")
        print("\n".join(lines))


def _assets_main(argv: Sequence[str]) -> int:
    from tclora.assets import ASSETS, AssetError, asset_status, ensure_asset, tclora_home

    parser = argparse.ArgumentParser(
        prog="tclora assets",
        description="List the offline assets under $TCLORA_HOME, fetching what is missing.",
    )
    parser.add_argument("--no-fetch", action="store_true", help="only list; fetch nothing")
    parser.add_argument("--force", action="store_true", help="rebuild even verified assets")
    args = parser.parse_args(list(argv))
    if not args.no_fetch:
        for name in ASSETS:
            try:
                ensure_asset(name, force=args.force)
            except AssetError as err:
                print(f"error: {err}", file=sys.stderr)
                return 1
    print(f"TCLORA_HOME={tclora_home()}")
    rows = asset_status(deep=True)
    for row in rows:
        print(f"{row['name']:<24} {row['status']:<9} {row['source']:<24} {row['path']}")
    return 0 if all(r["status"] == "verified" for r in rows) else 1


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
        from tclora.merge_cli import merge_main

        return merge_main(argv[1:])
    if not argv or argv[0] in {"-h", "--help"}:
        _print_top_help()
    cli_main(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
