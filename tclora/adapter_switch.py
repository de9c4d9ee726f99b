"""Switch the active LoRA adapter of a peft model in O(adapter parameters), not O(modules).

peft's ``set_adapter`` walks every module of the model twice on each call (once for auxiliary
wrappers, once for tuner layers) and lists each adapter layer's parameters again: about 0.1 s for
SmolLM2-135M with 4 adapters on one CPU core. ``LoRAModule`` switches adapters on every training
step, so on an H100, where the step itself takes ~0.2 s, that walk made a K = 4 step 16-23 % slower
than a one-adapter peft loop (``benchmarks/results/gpu/h100-2026-11-26.md``; 0.98x with this
class, ``h100-2026-11-27.md``). :class:`AdapterSwitch` finds the tuner layers and each adapter's
parameters once, then does what ``set_adapter`` does: only the active adapter's weights require
grad, every layer's ``active_adapter`` is set, and the tuner's ``active_adapter`` too.
"""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["AdapterSwitch"]


class AdapterSwitch:
    """A cached, equivalent ``model.base_model.set_adapter(name)`` for a peft LoRA model.

    Build it with :meth:`build` after the model's adapters are all added; it keeps references to
    the layers and parameters (which Lightning's strategies, FSDP with ``use_orig_params`` too,
    keep as the same objects).

    Args:
        tuner: The peft tuner (``peft_model.base_model``).
        layers: Its tuner layers.
        params: Each adapter's leaf parameters, by adapter name.
    """

    def __init__(
        self, tuner: Any, layers: list[Any], params: dict[str, list[nn.Parameter]]
    ) -> None:
        self.tuner = tuner
        self.layers = layers
        self.params = params

    @classmethod
    def build(cls, peft_model: Any, adapter_names: list[str]) -> AdapterSwitch | None:
        """The switch of ``peft_model``'s adapters, or ``None`` where the cached switch would
        not match peft's ``set_adapter`` (auxiliary trainable modules, partly frozen adapter
        weights): the caller then uses ``set_adapter``.

        Args:
            peft_model: A ``peft.PeftModel``.
            adapter_names: The adapters to switch between.

        Returns:
            The switch, or ``None``.
        """
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper

        layers = []
        for module in peft_model.modules():
            if isinstance(module, AuxiliaryTrainingWrapper):
                return None
            if isinstance(module, BaseTunerLayer):
                if any(getattr(module, "frozen_peft_weight_names", None) or ()):
                    return None
                layers.append(module)
        params: dict[str, list[nn.Parameter]] = {name: [] for name in adapter_names}
        for layer in layers:
            for attr in layer.adapter_layer_names:
                for key, value in getattr(layer, attr).items():
                    if key not in params:
                        continue
                    found = [value] if isinstance(value, nn.Parameter) else value.parameters()
                    params[key].extend(p for p in found if p.is_leaf)
        return cls(peft_model.base_model, layers, params)

    def __call__(self, name: str) -> None:
        """Make ``name`` the active adapter (the one the forward pass uses and gradients reach).

        Args:
            name: An adapter name given to :meth:`build`.

        Raises:
            KeyError: ``name`` is not one of them.
        """
        if name not in self.params:
            raise KeyError(f"adapter {name!r} is not one of {sorted(self.params)}")
        if any(layer.merged for layer in self.layers):
            self.tuner.set_adapter(name)  # peft unmerges first, with its warning
            return
        for adapter, params in self.params.items():
            active = adapter == name
            for param in params:
                param.requires_grad_(active)
        for layer in self.layers:
            layer._active_adapter = [name]
        self.tuner.active_adapter = name
