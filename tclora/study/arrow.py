"""The merge study's ``arrow`` reference: peft's own Arrow routing over the study's adapters.

Arrow (Ostapenko et al. 2024) routes every token, in every adapted layer, to the ``top_k`` adapters
whose prototype (the top right singular vector of ``ΔW_t = B_t A_t``) is most aligned with the
token's input, mixing them with a softmax at ``router_temperature``. peft 0.21 ships it
(:class:`peft.ArrowConfig`, :func:`peft.create_arrow_model`); nothing of it is re-implemented here.

peft builds an Arrow model only from adapter *folders* and a clean base model, so
:func:`build_arrow_model` saves the chosen adapters of the study's in-memory ``PeftModel`` to a
temporary folder (``save_pretrained(selected_adapters=...)``, ``adapters[i]`` → peft's
``task_i``), copies the model and removes its LoRA layers (``unload``) to get the base, and calls
``create_arrow_model``. The study's model is left untouched; the copy costs one more base model in
memory for as long as the ``arrow`` row is scored.
"""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Sequence
from typing import Any

__all__ = ["ARROW_TEMPERATURE", "ARROW_TOP_K", "arrow_top_k", "build_arrow_model"]

ARROW_TOP_K = 3
"""peft's default ``ArrowConfig.top_k``; the study uses ``min(ARROW_TOP_K, number of adapters)``."""
ARROW_TEMPERATURE = 1.0
"""peft's default ``ArrowConfig.router_temperature``."""


def arrow_top_k(num_adapters: int) -> int:
    """The study's ``top_k``: peft's default 3, or every adapter when there are fewer."""
    return min(ARROW_TOP_K, num_adapters)


def build_arrow_model(
    model: Any,
    adapters: Sequence[str],
    *,
    top_k: int,
    router_temperature: float = ARROW_TEMPERATURE,
    rng_seed: int | None = 0,
) -> Any:
    """peft's Arrow model over ``adapters`` of ``model``, on a copy of its base model.

    Args:
        model: A ``PeftModel`` holding the LoRA adapters (not modified).
        adapters: The adapters to route between, in order (``adapters[i]`` is peft's ``task_i``).
        top_k: Adapters mixed per token, ``1 <= top_k <= len(adapters)``.
        router_temperature: Softmax temperature of the routing coefficients, ``> 0``.
        rng_seed: Seed of peft's power iteration for the prototypes (``None``: not seeded, and
            the prototypes then vary from call to call).

    Returns:
        A new ``PeftModel`` with peft's adapters ``task_0 ... task_{T-1}`` and the active adapter
        ``arrow_router``, in eval mode.

    Raises:
        ValueError: Fewer than one adapter, an adapter ``model`` does not hold, ``top_k`` or
            ``router_temperature`` out of range, or adapters peft's Arrow refuses (different
            ranks, shapes or target modules).
    """
    from peft import ArrowConfig, create_arrow_model

    adapters = list(adapters)
    known = list(getattr(model, "peft_config", {}))
    if not adapters:
        raise ValueError("adapters=[]: Arrow routes between one or more adapters; name some")
    unknown = [a for a in adapters if a not in known]
    if unknown:
        raise ValueError(f"adapters={adapters!r}: {unknown} are not adapters of the model {known}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= len(adapters):
        raise ValueError(
            f"top_k={top_k!r}: must be an integer from 1 to the number of adapters, {len(adapters)}"
        )
    if not router_temperature > 0:
        raise ValueError(f"router_temperature={router_temperature!r}: must be > 0")
    with tempfile.TemporaryDirectory(prefix="tclora-arrow-") as folder:
        model.save_pretrained(folder, selected_adapters=adapters)
        paths = [folder if a == "default" else os.path.join(folder, a) for a in adapters]
        base = copy.deepcopy(model).unload()
        config = ArrowConfig(top_k=top_k, router_temperature=router_temperature, rng_seed=rng_seed)
        try:
            arrow = create_arrow_model(base, paths, config)
        except ValueError as err:
            names = ", ".join(f"task_{i} = {a}" for i, a in enumerate(adapters))
            raise ValueError(
                f"adapters={adapters!r}: peft's Arrow refuses them ({names}): {err}. Arrow needs "
                "every adapter with the same LoRA rank, shapes and target modules"
            ) from err
    return arrow.eval()
