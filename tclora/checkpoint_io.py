"""Checkpoints written whole or not at all.

Lightning's ``TorchCheckpointIO`` serialises the checkpoint into memory and moves a file from
the system's temporary folder into place; where that folder is on another file system (a
``tmpfs`` ``/tmp``) the move is a copy, and a process killed during it leaves a truncated
``last.ckpt`` that the next ``--ckpt_path`` cannot load. :class:`AtomicCheckpointIO` streams the
checkpoint into a sibling file of the destination and renames it into place in one step.
``tclora fit`` uses it by default; another Lightning project passes it as a plugin. It loads
with ``weights_only=True`` unless the caller passes ``False``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch import Trainer
from typing_extensions import override

from tclora._io import atomic_file

__all__ = ["AtomicCheckpointIO", "use_atomic_checkpoints"]


def _is_local(path: _PATH) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are atomic: a reader (or a resumed fit) sees the
    previous checkpoint or the new one, never part of one.

    The checkpoint is written by ``torch.save`` into ``.<name>.tmp-<pid>-<hex>`` beside the
    destination and renamed over it; leftovers of earlier killed saves of the same file are
    removed first. Remote paths (``s3://`` and the like) go through Lightning's own save.

    Example::

        Trainer(plugins=[AtomicCheckpointIO()], callbacks=[CPMergeCallback(...)])
    """

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        """Save ``checkpoint`` at ``path`` atomically (local paths).

        Args:
            checkpoint: The trainer's checkpoint dictionary.
            path: Destination file.
            storage_options: Not supported (as in ``TorchCheckpointIO``).
        """
        if storage_options is not None or not _is_local(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        target = Path(str(path).removeprefix("file://"))
        with atomic_file(target) as tmp, open(tmp, "wb") as handle:
            torch.save(checkpoint, handle)
            handle.flush()
            os.fsync(handle.fileno())

    @override
    def load_checkpoint(
        self,
        path: _PATH,
        map_location: Callable[..., Any] | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        """Load a checkpoint, with ``weights_only=True`` unless the caller asks otherwise.

        Lightning passes ``None`` by default and ``torch.load`` then follows its own default
        (and the ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` environment variable); a resumed fit here
        unpickles tensors and plain containers only, whatever the environment says.

        Args:
            path: Path to the checkpoint.
            map_location: Where to put the storages (as for ``torch.load``).
            weights_only: ``None`` (Lightning's default) is taken as ``True``; an explicit
                ``trainer.fit(..., weights_only=False)`` is kept.

        Returns:
            The loaded checkpoint.
        """
        safe = True if weights_only is None else weights_only
        return super().load_checkpoint(path, map_location=map_location, weights_only=safe)


def use_atomic_checkpoints(trainer: Trainer) -> bool:
    """Give ``trainer``'s strategy an :class:`AtomicCheckpointIO` when it has Lightning's default.

    A checkpoint IO chosen by the user, or a strategy's own (XLA, a cluster's), is kept.

    Args:
        trainer: A trainer, before ``fit``.

    Returns:
        Whether the checkpoint IO was replaced.
    """
    strategy = trainer.strategy
    if type(strategy.checkpoint_io) is not TorchCheckpointIO:
        return False
    strategy.checkpoint_io = AtomicCheckpointIO()
    return True
