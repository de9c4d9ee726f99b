"""Argument checks shared by every layer: one wording for "this value is not allowed"."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, get_args

__all__ = [
    "DTYPES",
    "TRAIN_DTYPES",
    "TrainDtype",
    "check_choice",
    "resolve_device",
    "resolve_dtype",
]

DTYPES = ("float32", "bfloat16", "float16")
"""Dtypes a base model may be loaded in for merging and evaluation."""
TrainDtype = Literal["float32", "bfloat16"]
"""Dtypes of a frozen base for training (float16 would need a loss scaler); the type the
training classes annotate, so LightningCLI lists the same values :data:`TRAIN_DTYPES` checks."""
TRAIN_DTYPES: tuple[str, ...] = get_args(TrainDtype)
"""The names of :data:`TrainDtype`."""


def check_choice(name: str, value: Any, allowed: Sequence[Any]) -> None:
    """Raise ``ValueError`` naming the argument, its value and the allowed values.

    Args:
        name: The argument's name as the user writes it (e.g. ``"engine"``).
        value: The value given.
        allowed: The values accepted.

    Raises:
        ValueError: ``value`` is not in ``allowed``: ``"<name>=<value>: expected one of [...]"``.
    """
    if value not in allowed:
        raise ValueError(f"{name}={value!r}: expected one of {list(allowed)}")


def resolve_device(name: str, arg: str = "--device") -> Any:
    """The ``torch.device`` a command runs on, checked before any model is loaded.

    Args:
        name: ``"auto"`` (the first GPU when torch sees one, else the CPU), or a torch device
            string such as ``"cpu"``, ``"cuda"`` or ``"cuda:1"``.
        arg: The argument's name, for the error message.

    Returns:
        The device.

    Raises:
        ValueError: ``name`` is not a device string, names a GPU torch does not see, or a GPU
            index past the last one.
    """
    import torch

    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(
            f"{arg}={name!r}: not a device; use 'auto', 'cpu', 'cuda' or 'cuda:<index>'"
        ) from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"{arg}={name!r}: torch sees no CUDA device; use 'cpu' or 'auto'")
        if device.index is not None and device.index >= count:
            raise ValueError(f"{arg}={name!r}: torch sees {count} CUDA device(s), 0 to {count - 1}")
    elif device.type != "cpu":
        raise ValueError(f"{arg}={name!r}: use 'auto', 'cpu', 'cuda' or 'cuda:<index>'")
    return device


def resolve_dtype(name: str, arg: str = "--dtype", allowed: Sequence[str] = DTYPES) -> Any:
    """The ``torch.dtype`` named ``name``, one of ``allowed``.

    Args:
        name: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        arg: The argument's name, for the error message.
        allowed: The names accepted (:data:`DTYPES`, or :data:`TRAIN_DTYPES` for training).

    Returns:
        The dtype.

    Raises:
        ValueError: ``name`` is not one of ``allowed``.
    """
    import torch

    check_choice(arg, name, allowed)
    return getattr(torch, name)
