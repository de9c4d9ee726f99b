"""Where this process stands in a distributed run: one lookup for the whole package."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["rank_and_world", "zero_stage"]


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


def zero_stage(strategy: Any) -> int | None:
    """The ZeRO stage of a Lightning ``DeepSpeedStrategy``, else ``None``.

    Args:
        strategy: A trainer's strategy.

    Returns:
        ``zero_optimization.stage`` of its DeepSpeed config; ``None`` for another strategy or a
        config without one.
    """
    from lightning.pytorch.strategies import DeepSpeedStrategy

    if not isinstance(strategy, DeepSpeedStrategy):
        return None
    return (getattr(strategy, "config", None) or {}).get("zero_optimization", {}).get("stage")
