"""Where this process stands in a distributed run: one lookup for the whole package."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["is_deepspeed", "rank_and_world", "zero_stage"]


def rank_and_world(trainer: Any = None) -> tuple[int, int]:
    """``(global rank, world size)`` of this process.

    Args:
        trainer: A Lightning ``Trainer`` whose view is used when given; otherwise
            ``torch.distributed`` when it is initialised, else ``(0, 1)``.

    Returns:
        The rank and the number of processes.
    """
    if trainer is not None:
        return int(trainer.global_rank), int(trainer.world_size)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def is_deepspeed(strategy: Any) -> bool:
    """Whether a trainer's strategy is Lightning's ``DeepSpeedStrategy`` (a ``DDPStrategy``
    subclass whose optimizer steps flat partitions).

    Args:
        strategy: A trainer's strategy.

    Returns:
        ``True`` for ``DeepSpeedStrategy`` and its subclasses.
    """
    from lightning.pytorch.strategies import DeepSpeedStrategy

    return isinstance(strategy, DeepSpeedStrategy)


def zero_stage(strategy: Any) -> int | None:
    """The ZeRO stage of a Lightning ``DeepSpeedStrategy``, else ``None``.

    Args:
        strategy: A trainer's strategy.

    Returns:
        ``zero_optimization.stage`` of its DeepSpeed config; ``None`` for another strategy or a
        config without one.
    """
    if not is_deepspeed(strategy):
        return None
    return (getattr(strategy, "config", None) or {}).get("zero_optimization", {}).get("stage")
