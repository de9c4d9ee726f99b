"""LoRAModule: one frozen causal LM, K LoRA adapters, each trained only on its own cluster.

(Why one file over 500 lines: the hooks below share one piece of per-adapter state -- step
counts, learning-rate schedules, dropout random streams, param groups -- and the invariant stated
next holds only if every hook updates it consistently; splitting the hooks across files would
scatter that state. The pure parts, ``lr_at_step`` and ``linear_module_names``, are small.)

Design (why one optimizer with automatic optimization is sound here):

* Every adapter ``cluster_k`` gets its own AdamW *param group*. A batch of cluster ``k`` activates
  adapter ``k`` only, so the other adapters are not part of the autograd graph and their
  ``.grad`` stays ``None`` (Lightning zeroes gradients with ``set_to_none=True``).
  ``torch.optim.AdamW`` skips every parameter whose gradient is ``None``: no weight decay, no
  moment update, no step-count increment (the step count is per-parameter state). As a guard for
  strategies that write zero gradients for unused parameters, :meth:`on_before_optimizer_step`
  additionally sets the gradients of every inactive adapter to ``None``.
* Each group's learning rate is computed from *that adapter's* step count
  (:func:`lr_at_step`), so an adapter's schedule does not depend on how many batches the other
  clusters had.
* LoRA dropout draws from a random stream per adapter (:meth:`LoRAModule._adapter_rng`), so the
  dropout masks an adapter sees do not depend on the other adapters either.

Together this gives the central invariant: after one fit of K adapters, adapter ``k`` equals a
fit of that adapter alone on the same batches in the same order with the same seed. Manual
optimization with K optimizers would give the same result but breaks Lightning features that
assume automatic optimization (gradient accumulation, clipping, DeepSpeed's engine step), so it is
not used.

Distributed notes:

* DDP: the loss of a step is the mean over ranks of each rank's token-mean loss (DDP averages
  gradients), which equals the token mean of the global batch when every rank has the same
  number of label tokens. All lora parameters require grad when the model is wrapped, so the
  reducer registers every adapter; inactive adapters are unused in a step, which needs
  ``strategy="ddp_find_unused_parameters_true"`` (checked in :meth:`setup`). The reducer leaves
  the gradients of globally unused parameters untouched (``None``). All ranks must train the same
  cluster at the same step (the cluster data module's sampler guarantees it; checked every step).
* FSDP: use ``use_orig_params=True`` (adapters have mixed ``requires_grad``),
  ``state_dict_type="full"`` so that :meth:`on_save_checkpoint` can drop the frozen base,
  ``dtype="float32"`` (FSDP flattens each unit into one dtype; peft keeps LoRA weights in float32)
  and :class:`tclora.fsdp_policy.AdapterWrapPolicy` (no unit mixes frozen and trainable weights).
  The adapter is switched in :meth:`on_train_batch_start`, before the strategy's forward: FSDP
  reads which units require grad in the root module's pre-forward, and Lightning runs
  :meth:`training_step` inside that forward. The export at the end of fit unshards the
  parameters on rank zero (``summon_full_params``). Training and the export ran on one H100
  (``benchmarks/results/gpu/``, decoder layers as the only units); several GPUs are untested
  there; Lightning's FSDPStrategy over two CPU processes (fit, resume, export) is tested. On one
  process (``NO_SHARD``) a model with tied embeddings needs mixed precision (checked in
  :meth:`setup`: torch's FSDP asserts at the first step otherwise).
* DeepSpeed: use ``exclude_frozen_parameters=True``. DeepSpeed steps flattened partitions, whose
  gradients are zeros rather than ``None`` for the inactive adapters, so AdamW would move them and
  advance their moments and step counts: their groups step with learning rate 0 and their
  optimizer state, held in :meth:`on_before_optimizer_step`, is put back in
  :meth:`optimizer_step` right after the step (before any callback can checkpoint it). A fit
  under ZeRO-1 or 2 then ends with a one-device fit's adapters, bit for bit
  (``benchmarks/gpu_kit/deepspeed_fit_check.py``: DeepSpeed 0.19.8 on the CPU). ZeRO stage 3 is not
  supported by :meth:`export_adapters` (use stage 2: LoRA parameters are small): a fit with
  ``export_dir`` under stage 3 is refused in :meth:`setup`, before training.
* Gradient accumulation: adapter ``k`` steps once per window that held a batch of cluster ``k``;
  the invariant needs windows that hold one cluster each.
* Per-adapter dropout streams are saved in checkpoints for rank zero only; a resumed multi-rank
  fit with ``lora_dropout > 0`` reseeds the other ranks' streams.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from tclora._checks import TRAIN_DTYPES, TrainDtype
from tclora._dist import is_deepspeed, zero_stage
from tclora._io import atomic_dir, atomic_write_text, check_writable
from tclora.adapter_switch import AdapterSwitch
from tclora.assets import base_model_id, resolve_model

__all__ = [
    "DEFAULT_ADAPTER_PREFIX",
    "EXPORT_MANIFEST",
    "INTERRUPTED_ADAPTERS",
    "InterruptSave",
    "LoRAModule",
    "check_export_dir",
    "linear_module_names",
    "lr_at_step",
]

DEFAULT_ADAPTER_PREFIX = "cluster_"
_SCHEDULES = ("constant", "linear", "cosine")
_RNG_SEED_STRIDE = 1_000_003  # separates the dropout streams of different ranks
EXPORT_MANIFEST = "tclora_adapters.json"
INTERRUPTED_ADAPTERS = "interrupted_adapters"
"""Folder (in the log folder) for the adapters of an interrupted fit without ``export_dir``."""
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")
"""Module-path segments torch's FSDP and activation-checkpoint wrappers add (not in peft's keys)."""


def lr_at_step(
    step: int,
    *,
    base_lr: float,
    schedule: str = "constant",
    warmup_steps: int = 0,
    total_steps: int | None = None,
) -> float:
    """Learning rate of an adapter's next optimizer step.

    Warmup is linear and reaches ``base_lr`` at the last warmup step (the first step is not
    wasted at lr 0); after warmup, ``linear`` decays linearly and ``cosine`` along a half cosine
    to 0 at ``total_steps``.

    Args:
        step: Number of optimizer steps this adapter has already taken (0 for its first step).
        base_lr: Peak learning rate.
        schedule: ``"constant"``, ``"linear"`` or ``"cosine"``.
        warmup_steps: Number of warmup steps (0 for none).
        total_steps: Steps of the whole schedule; required for ``linear`` and ``cosine``.

    Returns:
        The learning rate for step ``step``.
    """
    if step < 0:
        raise ValueError(f"step={step} must be >= 0")
    if schedule not in _SCHEDULES:
        raise ValueError(f"schedule={schedule!r} is not one of {list(_SCHEDULES)}")
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    if total_steps is None or total_steps <= 0:
        raise ValueError(f"total_steps={total_steps} must be a positive int for {schedule!r}")
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        return base_lr * (1.0 - progress)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def linear_module_names(model: nn.Module) -> list[str]:
    """Leaf names of the linear layers a LoRA can target, output embeddings excluded.

    Args:
        model: A transformers causal LM (or any module).

    Returns:
        Sorted unique leaf names, e.g. ``["down_proj", "gate_proj", ..., "v_proj"]`` for Llama.
    """
    from transformers.pytorch_utils import Conv1D

    output = None
    get_output = getattr(model, "get_output_embeddings", None)
    if callable(get_output):
        output = get_output()
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear | Conv1D) and module is not output and name
    }
    return sorted(names)


def check_export_dir(path: str | os.PathLike[str]) -> Path:
    """Check that ``path`` can receive a set of exported adapters, before any work.

    The set replaces the whole folder at once, so the folder must be writable and either absent,
    empty, or an earlier export (it holds ``tclora_adapters.json``); a folder with anything else
    in it is refused rather than replaced.

    Args:
        path: The export folder (``model.export_dir``).

    Returns:
        ``path`` as a ``Path``.

    Raises:
        PermissionError: The folder cannot be created or written.
        ValueError: The folder holds files that are not an earlier adapter export.
    """
    folder = check_writable(path, "model.export_dir")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / EXPORT_MANIFEST).is_file():
        listing = sorted(p.name for p in folder.iterdir())[:5]
        raise ValueError(
            f"model.export_dir={str(path)!r} holds other files ({listing}) and is not an earlier "
            f"adapter export (no {EXPORT_MANIFEST}); the export replaces the whole folder, so "
            "choose an empty or new folder"
        )
    return folder


@contextmanager
def _real_device_context() -> Iterator[None]:
    """Leave a surrounding ``torch.device("meta")`` context: pretrained weights must be real.

    A meta-initialised base would be re-initialised randomly by FSDP's ``reset_parameters``;
    loading the checkpoint on CPU instead lets FSDP shard the real weights.
    """
    if torch.empty(0).device.type == "meta":
        rank_zero_info("LoRAModule: loading the pretrained base on CPU (not on the meta device).")
        with torch.device("cpu"):
            yield
    else:
        yield


class LoRAModule(LightningModule):
    """A frozen causal LM with K LoRA adapters; each batch trains its own cluster's adapter.

    Args:
        model: Base causal LM: a local folder, a packaged alias (``"smollm2-135m-instruct"``) or a
            Hugging Face hub id (``"microsoft/Phi-3-mini-4k-instruct"``).
        num_adapters: Number of adapters K. ``None`` takes it from the data module's
            ``num_clusters`` (the CLI links it); a value that differs from it is an error.
        r: LoRA rank (> 0).
        lora_alpha: LoRA scaling numerator (> 0); scaling is ``alpha / r`` (``alpha / sqrt(r)``
            with ``use_rslora``).
        lora_dropout: Dropout on the LoRA input, in [0, 1). Each adapter draws from its own random
            stream, so the invariant holds with dropout too.
        target_modules: Leaf names of the linear layers to adapt. ``None``: every linear layer of
            the model except the output embeddings (the attention and MLP projections).
        use_rslora: Rank-stabilised LoRA scaling ``alpha / sqrt(r)``.
        lr: Peak AdamW learning rate (> 0).
        weight_decay: AdamW decoupled weight decay (>= 0); applied to an adapter only on its own
            steps.
        warmup_steps: Linear warmup steps, counted per adapter.
        lr_schedule: ``"constant"``, ``"linear"`` or ``"cosine"`` decay after warmup, per adapter.
        max_steps_per_adapter: Length of the decay schedule in steps of one adapter. ``None``:
            the trainer's estimated steps divided by K.
        dtype: Dtype of the frozen base, ``"float32"`` or ``"bfloat16"`` (adapters stay fp32).
        gradient_checkpointing: Recompute activations in the backward pass (non-reentrant).
        adapter_prefix: Adapter ``k`` is named ``f"{adapter_prefix}{k}"``.
        init_seed: Adapter ``k`` is initialised (and draws its dropout) from seed
            ``init_seed + k``, so it equals a single-adapter model built with that seed.
        shared_init: Every adapter starts from the same weights (seed ``init_seed``; dropout
            streams stay per adapter). Parameter-level comparisons need it: MBC's stage 1
            (``tclora mbc``) compares the adapters' raw LoRA weights, and with a different random
            ``lora_A`` each the cosine similarities are ~0 whatever the training did.
        export_dir: If set, every adapter is exported there as a peft folder at the end of fit.
    """

    model: Any  # peft.PeftModel after configure_model

    def __init__(
        self,
        model: str = "smollm2-135m-instruct",
        num_adapters: int | None = None,
        r: int = 8,
        lora_alpha: int = 16,
        lora_dropout: float = 0.0,
        target_modules: list[str] | None = None,
        use_rslora: bool = False,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        lr_schedule: Literal["constant", "linear", "cosine"] = "constant",
        max_steps_per_adapter: int | None = None,
        dtype: TrainDtype = "float32",
        gradient_checkpointing: bool = False,
        adapter_prefix: str = DEFAULT_ADAPTER_PREFIX,
        init_seed: int = 0,
        shared_init: bool = False,
        export_dir: str | None = None,
    ) -> None:
        super().__init__()
        _check(
            num_adapters is None or num_adapters >= 1,
            "num_adapters",
            num_adapters,
            "an int >= 1 or None",
        )
        _check(r > 0, "r", r, "an int > 0 (the LoRA rank)")
        _check(lora_alpha > 0, "lora_alpha", lora_alpha, "a number > 0")
        _check(0.0 <= lora_dropout < 1.0, "lora_dropout", lora_dropout, "a float in [0, 1)")
        _check(
            target_modules is None or len(target_modules) > 0,
            "target_modules",
            target_modules,
            "None or a non-empty list of module names",
        )
        _check(lr > 0 and math.isfinite(lr), "lr", lr, "a finite float > 0")
        _check(weight_decay >= 0, "weight_decay", weight_decay, "a float >= 0")
        _check(warmup_steps >= 0, "warmup_steps", warmup_steps, "an int >= 0")
        _check(lr_schedule in _SCHEDULES, "lr_schedule", lr_schedule, str(list(_SCHEDULES)))
        _check(
            max_steps_per_adapter is None or max_steps_per_adapter > 0,
            "max_steps_per_adapter",
            max_steps_per_adapter,
            "an int > 0 or None",
        )
        _check(dtype in TRAIN_DTYPES, "dtype", dtype, str(list(TRAIN_DTYPES)))
        _check(bool(adapter_prefix), "adapter_prefix", adapter_prefix, "a non-empty string")
        if export_dir is not None:
            check_export_dir(export_dir)  # fails now, not after the whole fit
        self.save_hyperparameters()
        # Resolve the model before any expensive work (the data module's setup runs first in fit).
        self.model_path = resolve_model(model)
        self.model = None
        self.adapter_names: list[str] = []
        self._switch: AdapterSwitch | Literal[False] | None = None  # built at the first switch
        self.strict_loading = False  # checkpoints hold the adapters only, never the frozen base
        self._adapter_steps: list[int] = []
        self._rng_states: dict[int, tuple[Tensor, Tensor | None]] = {}
        self._pending: set[int] = set()
        # DeepSpeed: the inactive adapters' optimizer state, held across a step and put back
        self._held: tuple[Any, dict[Tensor, dict[str, Any] | None]] | None = None
        self._schedule_lengths: list[int | None] = []
        self._exported_at: int | None = None  # the global step this fit exported at
        self._batch_start = 0.0
        self._val_sum: Tensor | None = None
        self._val_tokens: Tensor | None = None
        self._recent_losses: deque[Tensor] = deque()

    # ------------------------------------------------------------------ model
    def _resolve_num_adapters(self) -> int:
        given = self.hparams["num_adapters"]
        trainer = self._trainer
        datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
        data_k = getattr(datamodule, "num_clusters", None) if datamodule is not None else None
        if given is not None and data_k is not None and int(data_k) != int(given):
            raise ValueError(
                f"num_adapters={given} but the data module has num_clusters={data_k}: there must "
                "be exactly one adapter per cluster (leave num_adapters unset to take it from "
                "the data module)"
            )
        k = given if given is not None else data_k
        if k is None:
            raise ValueError(
                "num_adapters=None and no data module with num_clusters is attached: pass "
                "num_adapters or fit with a data module that exposes num_clusters"
            )
        return int(k)

    @override
    def configure_model(self) -> None:
        """Build the base model and the K adapters (idempotent; FSDP/DeepSpeed-friendly)."""
        k = self._resolve_num_adapters()
        if self.model is not None:
            if k != len(self.adapter_names):
                raise ValueError(
                    f"num_adapters={k} differs from the {len(self.adapter_names)} adapters "
                    "already built"
                )
            return
        with _real_device_context():
            self._build(k)

    def _build(self, k: int) -> None:
        """Load the base, check the target modules, add K adapters seeded ``init_seed + i``."""
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        hp: Any = self.hparams
        # hp.dtype is one of TRAIN_DTYPES: checked in __init__
        base = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=getattr(torch, hp.dtype))
        available = linear_module_names(base)
        targets = list(hp.target_modules) if hp.target_modules is not None else available
        missing = sorted(set(targets) - set(available))
        if missing:
            raise ValueError(
                f"target_modules={list(hp.target_modules or [])} names modules the model "
                f"{hp.model!r} does not have: {missing}. Its linear modules are: {available}"
            )
        if hp.gradient_checkpointing:
            base.activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False}
            )
        base.config.use_cache = False
        base.train()  # from_pretrained returns eval mode; Lightning keeps a module's mode
        config = LoraConfig(
            r=hp.r,
            lora_alpha=hp.lora_alpha,
            lora_dropout=hp.lora_dropout,
            target_modules=targets,
            use_rslora=hp.use_rslora,
            bias="none",
            task_type="CAUSAL_LM",
            # exported adapters name their base the way other tools load it (a hub id for the
            # packaged model, else what the user gave)
            base_model_name_or_path=base_model_id(hp.model),
        )
        names = [f"{hp.adapter_prefix}{i}" for i in range(k)]
        peft_model = None
        for i, name in enumerate(names):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(hp.init_seed + (0 if hp.get("shared_init", False) else i))
                if peft_model is None:
                    peft_model = get_peft_model(base, copy.deepcopy(config), adapter_name=name)
                else:
                    peft_model.add_adapter(name, copy.deepcopy(config))
        assert peft_model is not None
        # Register every adapter as trainable before a strategy wraps the model (DDP's reducer
        # only tracks parameters that require grad when it is built).
        tuner: Any = peft_model.base_model
        tuner.set_adapter(names[0])
        for pname, param in peft_model.named_parameters():
            param.requires_grad_(_is_lora(pname))
        self.model = peft_model
        self.adapter_names = names
        self._switch = None
        self._recent_losses = deque(maxlen=k)
        self.hparams["num_adapters"] = k
        if len(self._adapter_steps) != k:
            self._adapter_steps = [0] * k

    def adapter_parameters(self, index: int) -> list[tuple[str, nn.Parameter]]:
        """Named parameters of adapter ``index`` (in a stable order)."""
        name = self.adapter_names[index]
        return [
            (n, p)
            for n, p in self.model.named_parameters()
            if _is_lora(n) and (f".{name}." in n or n.endswith(f".{name}"))
        ]

    def adapter_state_dict(self, index: int) -> dict[str, Tensor]:
        """Adapter ``index``'s weights under the keys peft saves them with
        (``base_model.model.<module>.lora_A.weight``: no adapter name, and no wrapper that FSDP
        or activation checkpointing put into the module path)."""
        name = self.adapter_names[index]
        state = {}
        for n, p in self.adapter_parameters(index):
            n = _unwrapped(n)
            state[n.replace(f".{name}.", ".").removesuffix(f".{name}")] = p.detach()
        return state

    def adapter_weight_names(self) -> list[str]:
        """Sorted names of every adapter weight, as this module's state dict names them (no
        wrapper that FSDP or activation checkpointing put into the module path): what a
        checkpoint of this model must hold."""
        return sorted(_unwrapped(n) for n, _ in self.named_parameters() if _is_lora(n))

    def activate(self, index: int) -> None:
        """Route the forward pass through adapter ``index`` only (and make only its weights
        require grad), as peft's ``set_adapter`` does, without walking every module on each
        step (:class:`tclora.adapter_switch.AdapterSwitch`)."""
        name = self.adapter_names[index]
        if self._switch is None:
            self._switch = AdapterSwitch.build(self.model, self.adapter_names) or False
        if self._switch is False:
            self.model.base_model.set_adapter(name)
        else:
            self._switch(name)

    # -------------------------------------------------------------- optimizer
    def _schedule_lengths_from_trainer(self) -> list[int | None]:
        """Length of every adapter's decay schedule, in that adapter's own steps.

        ``max_steps_per_adapter`` if given; else, when the train loader's sampler exposes
        ``num_batches_per_cluster()`` (``ClusterBatchSampler``) and the fit is bounded by
        ``max_epochs``, each cluster's own number of optimizer steps (scaled down in proportion
        when ``limit_train_batches`` shortens the epoch); else the trainer's estimated steps
        divided by K. A warning names the adapters whose schedule is no longer than
        ``warmup_steps``: they never leave warmup.
        """
        hp: Any = self.hparams
        k = len(self.adapter_names)
        if hp.lr_schedule == "constant":
            return [None] * k
        if hp.max_steps_per_adapter is not None:
            return [int(hp.max_steps_per_adapter)] * k
        trainer = self.trainer
        estimated = trainer.estimated_stepping_batches  # also loads the train dataloader
        per_epoch = _batches_per_cluster(trainer.train_dataloader)
        if per_epoch is not None and len(per_epoch) == k and trainer.max_steps == -1:
            epochs = trainer.max_epochs if trainer.max_epochs is not None else 1
            accumulate = trainer.accumulate_grad_batches
            # limit_train_batches cuts every epoch short: each cluster keeps its share of it
            shown = trainer.num_training_batches
            share = min(1.0, shown / sum(per_epoch)) if math.isfinite(shown) else 1.0
            lengths: list[int | None] = [
                max(1, math.ceil(n * share * epochs / accumulate)) for n in per_epoch
            ]
        else:
            lengths = [max(1, math.ceil(estimated / k))] * k
        rank_zero_info(f"LoRAModule: max_steps_per_adapter=None, schedule lengths {lengths}")
        return lengths

    def _warn_short_schedules(self, lengths: Sequence[int | None]) -> None:
        warmup = int(self.hparams["warmup_steps"])
        short = {
            name: n
            for name, n in zip(self.adapter_names, lengths, strict=True)
            if n is not None and warmup > 0 and n <= warmup
        }
        if short:
            rank_zero_warn(
                f"LoRAModule: the schedules of {sorted(short)} are {sorted(set(short.values()))} "
                f"steps long, no longer than warmup_steps={warmup}: these adapters never leave "
                "warmup nor decay (their learning rate stays below lr); lower warmup_steps or "
                "train them longer"
            )

    def lr_for(self, index: int) -> float:
        """Learning rate of adapter ``index``'s next step, from its own step count."""
        hp: Any = self.hparams
        return lr_at_step(
            self._adapter_steps[index],
            base_lr=hp.lr,
            schedule=hp.lr_schedule,
            warmup_steps=hp.warmup_steps,
            total_steps=(
                self._schedule_lengths[index]
                if self._schedule_lengths
                else hp.max_steps_per_adapter
            ),
        )

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        """One AdamW group per adapter. Each group's learning rate is set from its adapter's own
        schedule before every step (:meth:`training_step`); the schedule lengths are read in
        :meth:`on_train_start`, not here: reading the trainer's step estimate here would build the
        train loader before a checkpoint is restored, and Lightning would then drop the loader's
        saved position (Lightning issue #20550)."""
        groups = []
        for i, name in enumerate(self.adapter_names):
            params = [p for _, p in self.adapter_parameters(i)]
            if not params:
                raise RuntimeError(f"adapter {name} has no parameters")
            groups.append({"params": params, "lr": self.hparams["lr"], "adapter": name})
        return torch.optim.AdamW(
            groups, lr=self.hparams["lr"], weight_decay=self.hparams["weight_decay"]
        )

    @override
    def on_train_start(self) -> None:
        pending = getattr(self.trainer.fit_loop, "_combined_loader_states_to_load", None)
        if pending:
            raise RuntimeError(
                "the checkpoint's train loader position was not restored: the train loader was "
                "built before the checkpoint was loaded (something read "
                "trainer.estimated_stepping_batches or trainer.train_dataloader in setup or "
                "configure_optimizers; Lightning issue #20550), so this resumed fit would repeat "
                "the epoch's first batches and skip its last ones. Read them in on_train_start."
            )
        self._schedule_lengths = self._schedule_lengths_from_trainer()
        self._warn_short_schedules(self._schedule_lengths)

    @override
    def setup(self, stage: str) -> None:
        from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

        from tclora.fsdp_policy import AdapterWrapPolicy

        strategy = self.trainer.strategy
        policy = getattr(strategy, "kwargs", {}).get("auto_wrap_policy")
        if isinstance(strategy, FSDPStrategy):
            self._check_unsharded_tied_embeddings(strategy)
        if isinstance(strategy, FSDPStrategy) and not isinstance(policy, AdapterWrapPolicy):
            rank_zero_warn(
                f"FSDPStrategy(auto_wrap_policy={type(policy).__name__}): FSDP units that hold "
                "frozen and LoRA weights together give each rank a gradient of those whole units, "
                "reduce-scattered on every step (Mistral-7B on 8 GPUs: 3.5 GB per rank against "
                "1.7 MB, benchmarks/fsdp_units.py); wrap with "
                "tclora.fsdp_policy.AdapterWrapPolicy([<decoder layer class>]), as "
                "configs/strategies/fsdp.yaml does"
            )
        if is_deepspeed(strategy):
            self._set_deepspeed_micro_batch(strategy)
        if zero_stage(strategy) == 3 and self.hparams["export_dir"] is not None:
            raise ValueError(
                f"export_dir={self.hparams['export_dir']!r} under DeepSpeedStrategy(stage=3): "
                "ZeRO-3 partitions every parameter and the export would read empty shards; "
                "use stage 2 (LoRA weights and their optimizer state are small), or FSDP"
            )
        if (  # DeepSpeedStrategy is a DDPStrategy without DDP's kwargs: not DDP's concern
            isinstance(strategy, DDPStrategy)
            and not is_deepspeed(strategy)
            and strategy.world_size > 1
            and not strategy._ddp_kwargs.get("find_unused_parameters", False)
        ):
            raise ValueError(
                f"strategy={type(strategy).__name__} without find_unused_parameters: inactive "
                "adapters are unused in a step, use strategy='ddp_find_unused_parameters_true'"
            )

    def _check_unsharded_tied_embeddings(self, strategy: Any) -> None:
        """Refuse, before the model is loaded, the FSDP set-up that fails at its first step.

        Where FSDP shards nothing (one process, where torch turns ``FULL_SHARD`` into
        ``NO_SHARD``, or ``sharding_strategy=NO_SHARD``) and parameters are not cast by mixed
        precision, a model whose input and output embeddings are one tied weight (SmolLM2) makes
        torch's FSDP (``use_orig_params``) assert ``as_params=True type(prim_param)=<class
        'torch.Tensor'>`` at the first step, under any wrap policy: on an H100 (``32-true``,
        ``bf16-true``) and on the CPU (``benchmarks/gpu_kit/fsdp_noshard_check.py``). Mixed
        precision, or sharding over several processes, trains.

        Raises:
            ValueError: That set-up, with what to change.
        """
        from torch.distributed.fsdp import ShardingStrategy
        from transformers import AutoConfig

        world = int(strategy.world_size)
        sharding = getattr(strategy, "sharding_strategy", None)
        precision = str(getattr(self.trainer, "precision", ""))
        if (world > 1 and sharding != ShardingStrategy.NO_SHARD) or precision.endswith("-mixed"):
            return
        if not getattr(AutoConfig.from_pretrained(self.model_path), "tie_word_embeddings", False):
            return
        raise ValueError(
            f"FSDPStrategy with {world} process(es) and "
            f"sharding_strategy={getattr(sharding, 'name', sharding)} shards nothing (NO_SHARD), "
            f"and with precision={precision!r} torch's FSDP fails at the first step on the tied "
            f"input and output embeddings of model={self.hparams['model']!r} "
            "(AssertionError 'as_params=True type(prim_param)'): use precision 'bf16-mixed' or "
            "'16-mixed', 2 or more processes with FULL_SHARD, or one device without FSDP "
            "(strategy 'auto')"
        )

    def _set_deepspeed_micro_batch(self, strategy: Any) -> None:
        """Give DeepSpeed's config ``train_micro_batch_size_per_gpu`` when it has none.

        Lightning's ``DeepSpeedStrategy`` otherwise reads it from the train loader's
        ``batch_sampler.batch_size``, and a loader whose sampler yields whole batches (as
        :class:`~tclora.datamodules.ClusterDataModule`'s does) has no ``batch_sampler``: the fit
        died before its first step (``AttributeError: 'NoneType' object has no attribute
        'batch_size'``, H100, 2026-11-27). The value is the data module's ``batch_size`` (1 when
        the data module has none: Lightning's own fallback); DeepSpeed uses it for its throughput
        log and its batch-size consistency check only.
        """
        config = getattr(strategy, "config", None)
        if config is None or "train_micro_batch_size_per_gpu" in config:
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        size = getattr(datamodule, "batch_size", None)
        config["train_micro_batch_size_per_gpu"] = int(size) if isinstance(size, int) else 1

    # --------------------------------------------------------------- training
    def _batch_cluster(self, batch: Mapping[str, Tensor]) -> int:
        cid = batch["cluster_id"]
        first = int(cid.reshape(-1)[0])
        if bool((cid != first).any()):
            raise ValueError(
                f"batch cluster_id={cid.tolist()} mixes clusters; every batch must hold one cluster"
            )
        if not 0 <= first < len(self.adapter_names):
            raise ValueError(
                f"batch cluster_id={first} is outside the {len(self.adapter_names)} adapters "
                f"{self.adapter_names}"
            )
        return first

    @contextmanager
    def _adapter_rng(self, index: int) -> Iterator[None]:
        """Run the block on adapter ``index``'s own random stream (only when dropout is on)."""
        if self.hparams["lora_dropout"] == 0:
            yield
            return
        device = self.device
        on_cuda = device.type == "cuda"
        cuda_index = device.index if device.index is not None else 0
        with torch.random.fork_rng(devices=[cuda_index] if on_cuda else []):
            state = self._rng_states.get(index)
            if state is None:
                torch.manual_seed(
                    self.hparams["init_seed"] + index + _RNG_SEED_STRIDE * self.global_rank
                )
            else:
                torch.set_rng_state(state[0])
                if on_cuda and state[1] is not None:
                    torch.cuda.set_rng_state(state[1], device)
            yield
            self._rng_states[index] = (
                torch.get_rng_state(),
                torch.cuda.get_rng_state(device) if on_cuda else None,
            )

    def _forward_loss(self, batch: Mapping[str, Tensor]) -> Tensor:
        out = self.model(
            input_ids=batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            labels=batch["labels"],
        )
        return out.loss

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._batch_start = time.perf_counter()
        # Switch here, before the strategy's forward: FSDP (use_orig_params) sets each unit's
        # flat parameter's requires_grad from its original parameters in the root module's
        # pre-forward, which under Lightning runs before training_step. Switched only inside
        # training_step, an AdapterWrapPolicy unit of the adapter that was inactive on the
        # previous step kept requires_grad=False: "element 0 of tensors does not require grad"
        # (an H100 on 2026-11-27; tests/test_module.py reproduces it with FSDP on the CPU).
        self.activate(self._batch_cluster(batch))

    @override
    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        index = self._batch_cluster(batch)
        self.activate(index)  # done in on_train_batch_start already; kept for direct calls
        lr = self.lr_for(index)
        for optimizer in self.trainer.optimizers:
            optimizer.param_groups[index]["lr"] = lr
        self._pending.add(index)
        with self._adapter_rng(index):
            loss = self._forward_loss(batch)
        self._check_step(index, loss.detach(), batch_idx)
        self._log_step(index, loss.detach(), lr, int(batch["input_ids"].shape[0]))
        return loss

    def _log_step(self, index: int, loss: Tensor, lr: float, size: int) -> None:
        """Log the losses without aliasing against the cluster schedule.

        ``train/loss`` is the mean over the last K steps (with round robin: one step of every
        cluster), so sampling it every ``log_every_n_steps`` steps does not pick the same cluster
        each time. Each cluster's loss and learning rate go to the loggers at that cluster's own
        steps (rank zero), on the step axis Lightning uses; they also reach
        ``trainer.callback_metrics`` through ``self.log(..., logger=False)``.
        """
        self._recent_losses.append(loss)
        window = torch.stack(list(self._recent_losses)).mean()
        self.log("train/loss", window, prog_bar=True, batch_size=size)
        own: dict[str, Tensor | float] = {
            f"train/loss_cluster_{index}": loss,
            f"lr/cluster_{index}": lr,
        }
        for key, value in own.items():
            self.log(key, value, batch_size=size, logger=False)
        if self.trainer.is_global_zero and self.loggers:
            step = self.trainer.fit_loop.epoch_loop._batches_that_stepped
            values = {key: float(value) for key, value in own.items()}
            for logger in self.loggers:
                logger.log_metrics(values, step=step)

    def _check_step(self, index: int, loss: Tensor, batch_idx: int) -> None:
        """Raise on a non-finite loss, and (on several ranks) when ranks train different clusters.

        Under DDP both checks use one small all-gather, so every rank raises together instead of
        one rank raising while the others wait in the gradient all-reduce.
        """
        name = self.adapter_names[index]
        where = f"at global step {self.global_step} (batch {batch_idx}) for adapter {name}"
        if self.trainer.world_size == 1:
            if not bool(torch.isfinite(loss)):
                raise FloatingPointError(f"non-finite loss {float(loss)} {where} (cluster {index})")
            return
        status = torch.stack(
            [torch.tensor(float(index), device=loss.device), torch.isfinite(loss).float()]
        )
        gathered = self.all_gather(status)
        assert isinstance(gathered, Tensor)
        rows = gathered.reshape(-1, 2).cpu()
        clusters = [int(c) for c in rows[:, 0]]
        if any(c != index for c in clusters):
            raise ValueError(
                f"ranks train different clusters {clusters} at global step {self.global_step}; "
                "the sampler must give all ranks the same cluster at every step"
            )
        bad = [rank for rank, ok in enumerate(rows[:, 1]) if ok < 1]
        if bad:
            raise FloatingPointError(
                f"non-finite loss {float(loss)} {where} (cluster {index}) on ranks {bad}"
            )

    @override
    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # DeepSpeed steps flat partitions whose gradients are zero-filled, not None: AdamW would
        # move the inactive adapters with their momentum and weight decay, and advance their
        # Adam moments and step counts. A learning rate of 0 keeps their weights where they are;
        # their optimizer state is held here and put back right after the step
        # (optimizer_step), so they come out of it as if skipped, as torch's AdamW skips a None
        # gradient.
        flat = is_deepspeed(self.trainer.strategy)
        held: dict[Tensor, dict[str, Any] | None] = {}
        for i, group in enumerate(optimizer.param_groups):
            if i not in self._pending:
                for p in group["params"]:
                    p.grad = None
                if flat:
                    group["lr"] = 0.0
                    held.update((p, _copied(optimizer.state.get(p))) for p in group["params"])
        self._held = (optimizer, held) if held else None
        for i in self._pending:
            self._adapter_steps[i] += 1
        self._pending.clear()

    @override
    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        if self._held is not None:  # before any callback can checkpoint the state
            optimizer, held = self._held
            _put_back(optimizer, held)
            self._held = None

    @override
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        elapsed = time.perf_counter() - self._batch_start
        mask = batch.get("attention_mask")
        tokens = int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())
        if elapsed > 0:
            # Throughput of all ranks (each rank sees a batch of the same shape).
            rate = tokens * self.trainer.world_size / elapsed
            self.log("train/tokens_per_s", rate, batch_size=int(batch["input_ids"].shape[0]))

    # ------------------------------------------------------------- validation
    @override
    def on_validation_epoch_start(self) -> None:
        k = len(self.adapter_names)
        self._val_sum = torch.zeros(k, dtype=torch.float64, device=self.device)
        self._val_tokens = torch.zeros(k, dtype=torch.float64, device=self.device)

    @override
    def validation_step(
        self, batch: Mapping[str, Tensor], batch_idx: int, dataloader_idx: int = 0
    ) -> Tensor:
        index = self._batch_cluster(batch)
        self.activate(index)
        loss = self._forward_loss(batch).detach()
        tokens = (batch["labels"][:, 1:] != -100).sum()
        assert self._val_sum is not None and self._val_tokens is not None
        if bool(tokens > 0):
            self._val_sum[index] += loss.double() * tokens
            self._val_tokens[index] += tokens
        return loss

    @override
    def on_validation_epoch_end(self) -> None:
        assert self._val_sum is not None and self._val_tokens is not None
        sums = self.trainer.strategy.reduce(self._val_sum, reduce_op="sum")
        tokens = self.trainer.strategy.reduce(self._val_tokens, reduce_op="sum")
        for i in range(len(self.adapter_names)):
            if tokens[i] > 0:
                self.log(f"val/loss_cluster_{i}", (sums[i] / tokens[i]).float(), sync_dist=True)
        if tokens.sum() > 0:
            overall = (sums.sum() / tokens.sum()).float()
            self.log("val/loss", overall, prog_bar=True, sync_dist=True)

    # ------------------------------------------------------------ checkpoints
    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("state_dict")
        if state is not None:
            checkpoint["state_dict"] = {k: v for k, v in state.items() if _is_lora(k)}
        checkpoint["tclora"] = {
            "adapter_names": list(self.adapter_names),
            # which adapter weights were saved, readable on load even where the strategy (FSDP)
            # has already consumed checkpoint["state_dict"] before on_load_checkpoint runs
            "adapter_weights": self.adapter_weight_names(),
            "adapter_steps": list(self._adapter_steps),
            "rng_states": {
                i: [s[0], s[1]] if s[1] is not None else [s[0]] for i, s in self._rng_states.items()
            },
        }

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        info = checkpoint.get("tclora")
        if info is None:
            raise ValueError("checkpoint has no 'tclora' entry: it was not written by LoRAModule")
        if self.adapter_names and list(info["adapter_names"]) != self.adapter_names:
            raise ValueError(
                f"checkpoint adapters {info['adapter_names']} differ from this model's "
                f"{self.adapter_names}"
            )
        names = self.adapter_weight_names() if self.model is not None else None
        saved = info.get("adapter_weights")  # absent in checkpoints written before 2026-11-27
        if saved is not None and names is not None:
            _check_same_adapter_weights(saved, names)
        state = checkpoint.get("state_dict")
        if state is not None and names is not None:
            absent = sorted(set(names) - set(state))
            if absent:
                raise ValueError(
                    f"checkpoint lacks {len(absent)} adapter weights, e.g. {absent[:3]}"
                )
            if self._trainer is None:
                # load_from_checkpoint: complete the state dict with the freshly loaded frozen
                # base (references, no copies) so that loading reports no missing keys.
                for key, value in self.state_dict().items():
                    state.setdefault(key, value)
        self._adapter_steps = [int(s) for s in info["adapter_steps"]]
        self._rng_states = {
            int(i): (s[0], s[1] if len(s) > 1 else None) for i, s in info["rng_states"].items()
        }

    # ----------------------------------------------------------------- export
    def export_adapters(
        self, out_dir: str | os.PathLike[str], note: Mapping[str, Any] | None = None
    ) -> list[Path]:
        """Write every adapter as a standard peft folder ``out_dir/<adapter name>``.

        Written as peft's ``save_pretrained`` writes them (``adapter_config.json``,
        ``adapter_model.safetensors``, peft's model card ``README.md``) from the module's own
        parameters (:meth:`adapter_state_dict`), so an FSDP-wrapped model exports the same keys
        (peft's own selection finds no LoRA weight under FSDP's wrappers); each config names its
        base model as :func:`tclora.assets.base_model_id` does, so ``PeftModel.from_pretrained(base,
        folder)`` and ``tclora merge`` take the folders as they are. The whole set is written to
        a temporary sibling and swapped in at once (:func:`tclora._io.atomic_dir`): a reader sees
        the previous set or the new one, never a set with some adapters missing; leftovers of a
        killed export are removed. ``tclora_adapters.json`` lists the set.

        Args:
            out_dir: The export folder: absent, empty, or an earlier export (it is replaced).
            note: More entries for ``tclora_adapters.json`` (e.g. the step of an interrupted fit).

        Returns:
            The adapter folders, in adapter order.
        """
        from tclora.merge.export import write_peft_folder  # tensorly's import only when exporting

        if self.model is None:
            raise RuntimeError("export_adapters() needs the model: call configure_model() first")
        out = check_export_dir(out_dir)
        base = base_model_id(self.hparams["model"])
        for name in self.adapter_names:
            self.model.peft_config[name].base_model_name_or_path = base
        manifest = {
            "adapters": list(self.adapter_names),
            "base_model": base,
            "adapter_steps": list(self._adapter_steps),
            **dict(note or {}),
        }
        with atomic_dir(out) as tmp:
            self.model.create_or_update_model_card(str(tmp))
            for k, name in enumerate(self.adapter_names):
                write_peft_folder(
                    tmp / name, self.model.peft_config[name], self.adapter_state_dict(k)
                )
            atomic_write_text(tmp / EXPORT_MANIFEST, json.dumps(manifest, indent=1))
        return [out / name for name in self.adapter_names]

    @override
    def on_fit_start(self) -> None:
        self._exported_at = None

    @override
    def on_fit_end(self) -> None:
        self.export_trained_adapters()

    def export_trained_adapters(self) -> None:
        """Export the adapters to ``export_dir`` at the end of a fit, once per fit.

        ``on_fit_end`` calls it; :class:`~tclora.callbacks.CPMergeCallback` calls it first,
        before its merge study (callbacks' ``on_fit_end`` run before the module's), so a study
        that fails loses none of the trained adapters. Call it on every rank: under FSDP the
        weights are gathered, and rank zero writes. Nothing happens without ``export_dir``, or
        when this fit's step was exported already.
        """
        export_dir = self.hparams["export_dir"]
        step = self.trainer.global_step
        if export_dir is None or self._exported_at == step:
            return
        with self._full_parameters():
            if self.trainer.is_global_zero:
                folders = self.export_adapters(export_dir)
                rank_zero_info(f"LoRAModule: exported {len(folders)} adapters to {export_dir}")
        self._exported_at = step

    @override
    def configure_callbacks(self) -> list[Callback]:
        """:class:`InterruptSave`: Ctrl-C during a fit keeps the work done so far."""
        return [InterruptSave()]

    def save_interrupted(self, trainer: Trainer) -> dict[str, Path]:
        """Save a checkpoint and export the adapters as they are (a fit was interrupted).

        The checkpoint goes to the checkpoint folder (``ModelCheckpoint``'s, else
        ``<log_dir>/checkpoints``) as ``interrupted-step=<N>.ckpt``; the adapters to
        ``model.export_dir``, else ``<log_dir>/interrupted_adapters``, with the step in
        ``tclora_adapters.json``. Both are said in one message. Nothing is saved before the first
        optimizer step, nor on several processes (a checkpoint is a collective there, and not
        every rank may still be running).

        Args:
            trainer: The interrupted trainer.

        Returns:
            ``{"checkpoint": path, "adapters": folder}`` for what was written (may be empty).
        """
        step = trainer.global_step
        if self.model is None or step == 0:
            rank_zero_info("LoRAModule: interrupted before the first step: nothing to save")
            return {}
        if trainer.world_size > 1:
            rank_zero_warn(
                f"LoRAModule: interrupted at step {step} on {trainer.world_size} processes: no "
                "checkpoint or export is written (resume from the last saved checkpoint)"
            )
            return {}
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)
        saver = trainer.checkpoint_callback
        dirpath = getattr(saver, "dirpath", None)
        ckpt_dir = Path(dirpath) if dirpath else log_dir / "checkpoints"
        written: dict[str, Path] = {}
        done: list[str] = []
        try:
            written["checkpoint"] = ckpt_dir / f"interrupted-step={step}.ckpt"
            trainer.save_checkpoint(written["checkpoint"])
            done.append(
                f"checkpoint saved to {written['checkpoint']} (resume: tclora fit --config "
                f"<the same config> --ckpt_path {written['checkpoint']})"
            )
            export_dir = self.hparams["export_dir"] or log_dir / INTERRUPTED_ADAPTERS
            self.export_adapters(export_dir, {"interrupted_at_step": step})
            written["adapters"] = Path(export_dir)
            done.append(
                f"the {len(self.adapter_names)} adapters as they are exported to {export_dir}"
            )
        except Exception as err:  # noqa: BLE001 -- an interrupt handler must not mask the interrupt
            done.append(f"saving failed ({type(err).__name__}: {err})")
        rank_zero_info(
            f"LoRAModule: fit interrupted at global step {step} (adapter steps "
            f"{self._adapter_steps}): " + "; ".join(done)
        )
        return written

    @contextmanager
    def _full_parameters(self) -> Iterator[None]:
        """Unshard the parameters on rank zero under FSDP (a collective: all ranks enter)."""
        from lightning.pytorch.strategies import FSDPStrategy

        strategy = self.trainer.strategy
        if isinstance(strategy, FSDPStrategy) and strategy.model is not None:
            with full_parameters(strategy.model):
                yield
        else:
            yield


@contextmanager
def full_parameters(fsdp_model: torch.nn.Module) -> Iterator[None]:
    """Whole parameters of an FSDP-wrapped model on rank zero, for reading (a collective).

    Sharded units on a GPU are gathered into CPU memory (``offload_to_cpu``); under ``NO_SHARD``
    -- which FSDP picks by itself on a single process -- every rank already holds whole
    parameters and torch refuses ``offload_to_cpu``, so they are read where they are, as they are
    on the CPU (where torch's offload of CPU parameters left tensors that crashed the export:
    a segfault, or safetensors' "invalid shape, data type, or offset", in 2-process FULL_SHARD
    over gloo).

    Args:
        fsdp_model: The model as the FSDP strategy wrapped it.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy

    units = FullyShardedDataParallel.fsdp_modules(fsdp_model)
    sharded = all(unit.sharding_strategy != ShardingStrategy.NO_SHARD for unit in units)
    on_cpu = all(getattr(unit.compute_device, "type", "cpu") == "cpu" for unit in units)
    with FullyShardedDataParallel.summon_full_params(
        fsdp_model, writeback=False, rank0_only=True, offload_to_cpu=sharded and not on_cpu
    ):
        yield


class InterruptSave(Callback):
    """On Ctrl-C during a fit of a :class:`LoRAModule`: a checkpoint and an export of the adapters.

    Lightning catches the ``KeyboardInterrupt``, calls ``on_exception`` and ends the process; this
    keeps the steps since the last checkpoint (:meth:`LoRAModule.save_interrupted`). Other
    exceptions save nothing (their weights may be what went wrong). ``LoRAModule`` adds it to every
    trainer (``configure_callbacks``).
    """

    @override
    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exception: BaseException
    ) -> None:
        if isinstance(exception, KeyboardInterrupt) and isinstance(pl_module, LoRAModule):
            if trainer.state.fn == "fit":
                pl_module.save_interrupted(trainer)


def _batches_per_cluster(loader: Any) -> list[int] | None:
    """``num_batches_per_cluster()`` of a loader's cluster sampler, if it has one."""
    for holder in (
        loader,
        getattr(loader, "batch_sampler", None),
        getattr(loader, "sampler", None),
    ):
        for candidate in (holder, getattr(holder, "cluster_sampler", None)):
            counts = getattr(candidate, "num_batches_per_cluster", None)
            if callable(counts):
                return [int(n) for n in counts()]
    return None


def _copied(state: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A copy of one parameter's optimizer state (its tensors cloned), or ``None``."""
    if state is None:
        return None
    return {k: v.clone() if isinstance(v, Tensor) else copy.deepcopy(v) for k, v in state.items()}


def _put_back(optimizer: Any, held: Mapping[Tensor, dict[str, Any] | None]) -> None:
    """Give parameters' optimizer state back what :func:`_copied` took (tensors copied in place,
    so that anything holding them sees the old values; a state the step created is dropped)."""
    for p, state in held.items():
        current = optimizer.state.get(p)
        if state is None:
            optimizer.state.pop(p, None)
        elif current is None:
            optimizer.state[p] = state
        else:
            for key, value in state.items():
                if isinstance(value, Tensor) and isinstance(current.get(key), Tensor):
                    current[key].copy_(value)
                else:
                    current[key] = value


def _is_lora(name: str) -> bool:
    return "lora_" in name


def _unwrapped(name: str) -> str:
    for wrapper in _WRAPPER_PREFIXES:
        name = name.replace(wrapper, "")
    return name


def _check_same_adapter_weights(saved: Sequence[str], model: Sequence[str]) -> None:
    """Refuse a checkpoint whose adapter weights are not this model's (another
    ``target_modules``, layer count or base model): loaded non-strictly, the weights it lacks
    would silently keep their initial values."""
    absent, extra = sorted(set(model) - set(saved)), sorted(set(saved) - set(model))
    if absent or extra:
        raise ValueError(
            f"checkpoint holds {len(saved)} adapter weights, this model has {len(model)}: "
            f"{len(absent)} of this model's are not in the checkpoint (e.g. {absent[:2]}), "
            f"{len(extra)} of the checkpoint's are not in this model (e.g. {extra[:2]}); "
            "it was written for another target_modules, layer count or base model"
        )


def _check(ok: bool, name: str, value: object, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} is invalid; expected {allowed}")
