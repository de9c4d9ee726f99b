"""A LoRAModule fit through Lightning's own FSDPStrategy on two CPU processes (FULL_SHARD, gloo).

Usage: ``python tests/lightning_fsdp_script.py MODEL_DIR OUT_DIR MODE``. Every mode trains 2
adapters for 2 epochs of 3 steps (adapters 0, 1, 0 each epoch), every rank on the same batches,
exports the adapters to ``OUT_DIR/<MODE>`` and writes the last validation losses (one loader
per cluster) to ``OUT_DIR/<MODE>-val.json``. ``fsdp`` fits under
``FSDPStrategy(auto_wrap_policy=AdapterWrapPolicy)`` on 2 processes, ``single`` on one process
without a strategy; ``fsdp-first-epoch`` stops the FSDP fit after epoch 1 and saves
``OUT_DIR/ckpt/last.ckpt``, and ``fsdp-resumed`` resumes it from there to the end.

Lightning refuses ``FSDPStrategy`` off a GPU (its accelerator check tests the exact class) and
torch's FSDP needs ``device_id`` on the CPU: a subclass and a ``device_id`` default stand in for a
GPU here; the wrapping, sharding, root forward (where Lightning runs ``training_step``) and
gradient reduction are Lightning's and torch's own.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from lightning.pytorch import LightningDataModule, Trainer, seed_everything
from lightning.pytorch.strategies import FSDPStrategy
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import make_batch  # noqa: E402

CLUSTERS = (0, 1, 0)  # one epoch


class CPUFSDPStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy, accepted with ``accelerator="cpu"``."""


def _fsdp_on_cpu() -> None:
    fsdp_init = FullyShardedDataParallel.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        kwargs["device_id"] = kwargs.get("device_id") or torch.device("cpu")
        fsdp_init(self, *args, **kwargs)

    FullyShardedDataParallel.__init__ = init  # type: ignore[method-assign]
    # Lightning gathers checkpoints with offload_to_cpu=True, and torch's offload of parameters
    # already on the CPU crashes (tclora.module.full_parameters avoids it the same way)
    import torch.distributed.fsdp as fsdp
    import torch.distributed.fsdp.api as fsdp_api

    for owner, name in ((fsdp, "FullStateDictConfig"), (fsdp_api, "FullOptimStateDictConfig")):
        config = getattr(owner, name)
        setattr(owner, name, lambda config=config, **kw: config(**{**kw, "offload_to_cpu": False}))


class Batches(LightningDataModule):
    """The same cluster-pure batches on every rank, in order; one validation loader per
    cluster."""

    num_clusters = 2

    def train_dataloader(self) -> DataLoader:
        batches = [make_batch(cluster, seed) for seed, cluster in enumerate(CLUSTERS)]
        return DataLoader(batches, batch_size=None, shuffle=False)  # type: ignore[arg-type]

    def val_dataloader(self) -> list[DataLoader]:
        return [
            DataLoader([make_batch(c, 50 + c), make_batch(c, 60 + c)], batch_size=None)  # type: ignore[arg-type]
            for c in range(2)
        ]


def main() -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from tclora.fsdp_policy import AdapterWrapPolicy
    from tclora.module import LoRAModule

    model_dir, out, mode = sys.argv[1:4]
    if mode not in ("fsdp", "single", "fsdp-first-epoch", "fsdp-resumed"):
        raise SystemExit(f"MODE={mode!r} must be fsdp, single, fsdp-first-epoch or fsdp-resumed")
    if mode.startswith("fsdp"):
        _fsdp_on_cpu()
        strategy: Any = CPUFSDPStrategy(
            auto_wrap_policy=AdapterWrapPolicy([LlamaDecoderLayer]),
            sharding_strategy="FULL_SHARD",
            state_dict_type="full",
            process_group_backend="gloo",
        )
        devices = 2
    else:
        strategy, devices = "auto", 1
    seed_everything(0)
    module = LoRAModule(
        model=model_dir, r=4, lr=1e-2, gradient_checkpointing=True, export_dir=str(Path(out) / mode)
    )
    trainer = Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_epochs=1 if mode == "fsdp-first-epoch" else 2,
        use_distributed_sampler=False,  # every rank trains the same cluster at each step
        logger=False,
        enable_checkpointing=mode == "fsdp-first-epoch",
        callbacks=(
            [ModelCheckpoint(dirpath=Path(out) / "ckpt", save_last=True, save_top_k=0)]
            if mode == "fsdp-first-epoch"
            else []
        ),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    last = Path(out) / "ckpt" / "last.ckpt"
    trainer.fit(module, datamodule=Batches(), ckpt_path=last if mode == "fsdp-resumed" else None)
    if trainer.is_global_zero:  # the last epoch's validation losses
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val")}
        (Path(out) / f"{mode}-val.json").write_text(json.dumps(metrics))


if __name__ == "__main__":
    main()
