"""FSDP units for a model with K LoRA adapters: none mixes frozen and trainable parameters.

FSDP (``FullyShardedDataParallel``, ``use_orig_params=True``) flattens each unit's parameters into
one tensor. Wrapping only the decoder layers, as ``auto_wrap_policy: [<DecoderLayer>]`` does, puts
each layer's frozen base weights and its adapters' LoRA weights into one flat parameter, and torch
then gives it a gradient the size of the whole unit: every rank holds a gradient shard of the
entire decoder (zeros for the frozen base) and reduce-scatters it on every step. For Mistral-7B
that is the gradient of 7 B parameters for a few million trainable ones.

:class:`AdapterWrapPolicy` also makes each adapter's LoRA module (``lora_A[name]``,
``lora_B[name]`` of every tuner layer: what peft's own ``fsdp_auto_wrap_policy`` wraps) a unit of
its own. The decoder-layer units then hold only frozen weights (no gradient, no reduce-scatter),
and a training step of adapter k gathers and reduces adapter k's units alone -- the other
adapters' units are never run, so they are neither gathered nor given a gradient. Use it from a
config as ``trainer.strategy.init_args.auto_wrap_policy`` (``configs/strategies/fsdp.yaml``).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from typing import Any

from torch import nn
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

__all__ = ["AdapterWrapPolicy", "adapter_modules"]


def adapter_modules(model: nn.Module) -> Iterator[nn.Module]:
    """Each adapter's own modules in a peft model: the entries of every tuner layer's adapter
    ``ModuleDict``s (``lora_A``, ``lora_B``, and DoRA's ``lora_magnitude_vector`` where present).

    Adapter weights kept in a ``ParameterDict`` (``lora_embedding_A``/``_B``) are parameters of
    their tuner layer, not modules: they stay in the unit that holds the layer.

    Args:
        model: A peft model (or any module holding peft tuner layers).

    Returns:
        The modules, in ``model.modules()`` order.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    for layer in model.modules():
        if isinstance(layer, BaseTunerLayer):
            for attr in layer.adapter_layer_names:
                container = getattr(layer, attr, None)
                if isinstance(container, nn.ModuleDict):
                    yield from container.values()


class AdapterWrapPolicy(ModuleWrapPolicy):
    """FSDP auto-wrap policy: one unit per decoder layer and one per adapter module.

    Args:
        layer_classes: The model's decoder layer class(es), e.g.
            ``transformers.models.mistral.modeling_mistral.MistralDecoderLayer``
            (``LlamaDecoderLayer`` for SmolLM2, ``Phi3DecoderLayer``); each instance becomes a
            unit holding that layer's frozen weights.

    Raises:
        ValueError: ``layer_classes`` is empty or holds something that is not a module class; at
            wrap time, when no module of the model is one of ``layer_classes`` (every frozen
            weight would sit in the root unit, unsharded until the whole model is gathered).
    """

    def __init__(self, layer_classes: Iterable[type[nn.Module]]) -> None:
        classes = list(layer_classes)
        if not classes or not all(
            isinstance(c, type) and issubclass(c, nn.Module) for c in classes
        ):
            raise ValueError(
                f"layer_classes={classes!r} must name one or more torch.nn.Module classes: the "
                "model's decoder layer, e.g. "
                "transformers.models.mistral.modeling_mistral.MistralDecoderLayer"
            )
        super().__init__(classes)
        self.layer_classes = classes

    def _run_policy(
        self,
        root_module: nn.Module,
        ignored_modules: set[nn.Module],
        root_kwargs: dict[str, Any],
    ) -> dict[nn.Module, dict[str, Any]]:
        targets = super()._run_policy(root_module, ignored_modules, root_kwargs)
        if not targets:
            present = {
                name
                for module in root_module.modules()
                for name in getattr(module, "_no_split_modules", None) or []
            }
            raise ValueError(
                f"layer_classes={[c.__qualname__ for c in self.layer_classes]} matches no module "
                f"of the model {type(root_module).__name__}; its decoder layer classes "
                f"(_no_split_modules) are {sorted(present)}"
            )
        for module in adapter_modules(root_module):
            if module not in ignored_modules:
                targets[module] = copy.copy(root_kwargs)
        return targets
