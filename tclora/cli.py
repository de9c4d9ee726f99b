"""The ``tclora`` command (also ``python -m tclora``).

``fit`` and ``validate`` are Lightning's own (:class:`~tclora.lightning_cli.TCLoraCLI`, a
``LightningCLI`` over :class:`~tclora.module.LoRAModule` and
:class:`~tclora.datamodules.ClusterDataModule`); the commands of tclora's own are listed in
:data:`COMMANDS`: ``merge`` runs the CP merge on saved adapter folders, ``export`` turns a
checkpoint into adapter folders, ``assets`` lists and fetches the offline model and corpus.

This module imports nothing heavy: ``tclora --help`` answers without loading torch or Lightning,
and each command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tclora.lightning_cli import TCLoraCLI

__all__ = ["COMMANDS", "LIGHTNING_COMMANDS", "TCLoraCLI", "cli_main", "main"]

LIGHTNING_COMMANDS = {
    "fit": "cluster the data, train one LoRA adapter per cluster, merge them at fit end",
    "validate": "validation loss of every cluster's adapter on its own cluster",
}
"""Lightning's commands (``tclora <command> --help`` lists every option)."""

COMMANDS: dict[str, tuple[str, str]] = {
    "merge": (
        "merge saved adapter folders (CP and baselines), evaluate, export the kept merge",
        "tclora.study.cli:merge_main",
    ),
    "eval": (
        "score saved adapter folders on eval sets with tclora's scorer and/or lm-eval",
        "tclora.study.eval_cli:eval_main",
    ),
    "mbc": (
        "model-based clustering in one command: a LoRA per task, MBC groups, the K-adapter fit",
        "tclora.mbc_cli:mbc_main",
    ),
    "export": (
        "turn a checkpoint into peft adapter folders (and optionally a full merged model)",
        "tclora.export_cli:export_main",
    ),
    "assets": (
        "list the offline assets, fetching and verifying what is missing",
        "tclora.cli:_assets_main",
    ),
}
"""tclora's own commands: ``name -> (one-line help, "module:function")``; the function takes the
arguments after the name and returns the exit code. Add a command here."""

_NOT_OFFERED = {
    "test": "LoRAModule has no test step; score adapters and merges on held-out sets with "
    "`tclora merge --adapters ... --merge.eval_sets [...]`",
    "predict": "LoRAModule has no predict step; load an exported adapter with peft "
    "(PeftModel.from_pretrained) and call generate",
}


def __getattr__(name: str) -> Any:
    """``TCLoraCLI`` from :mod:`tclora.lightning_cli`, imported on first use (it loads Lightning)."""
    if name == "TCLoraCLI":
        from tclora.lightning_cli import TCLoraCLI

        return TCLoraCLI
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def cli_main(args: Sequence[str] | None = None, run: bool = True) -> TCLoraCLI:
    """Build (and by default run) the LightningCLI; ``args`` replaces ``sys.argv[1:]``.

    See :func:`tclora.lightning_cli.cli_main`.
    """
    from tclora.lightning_cli import cli_main as lightning_main

    return lightning_main(args, run=run)


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


def top_help() -> str:
    """The text of ``tclora --help``."""
    lines = [
        "usage: tclora <command> [options]     (or: python -m tclora <command> [options])",
        "",
        "TC-LoRA: cluster data, train one LoRA per cluster, merge them by joint CP decomposition.",
        "",
        "Lightning commands (`tclora fit --help` lists every option, the merge callback's too):",
    ]
    lines += [f"  {name:<10} {text}" for name, text in LIGHTNING_COMMANDS.items()]
    lines += ["", "commands of tclora's own (`tclora <command> --help`):"]
    lines += [f"  {name:<10} {text}" for name, (text, _) in COMMANDS.items()]
    return "\n".join(lines)


def _entry(name: str) -> Callable[[Sequence[str]], int]:
    module, function = COMMANDS[name][1].split(":")
    entry: Callable[[Sequence[str]], int] = getattr(importlib.import_module(module), function)
    return entry


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tclora`` console script and of ``python -m tclora``.

    Args:
        argv: The arguments; ``None`` reads ``sys.argv[1:]``.

    Returns:
        The exit code.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    command = args[0] if args else None
    if command is None or command in {"-h", "--help"}:
        print(top_help())
        return 0
    if command in COMMANDS:
        return _entry(command)(args[1:])
    if command in LIGHTNING_COMMANDS:
        # the console script passes nothing: Lightning reads sys.argv itself (passing it back
        # made LightningCLI warn "not recommended to provide both args and command line
        # arguments" on every command)
        cli_main(None if argv is None else args)
        return 0
    known = [*LIGHTNING_COMMANDS, *COMMANDS]
    reason = _NOT_OFFERED.get(command, "")
    print(
        f"tclora: command={command!r} is not a tclora command; expected one of {known}"
        + (f". tclora {command}: {reason}" if reason else "")
        + "\n(tclora --help lists them)",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
