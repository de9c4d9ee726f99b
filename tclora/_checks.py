"""Argument checks shared by every layer: one wording for "this value is not allowed"."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["check_choice"]


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
