"""A LoRAModule fit through Lightning's own FSDPStrategy on two CPU processes (FULL_SHARD, gloo).

Usage: ``python tests/lightning_fsdp_script.py MODEL_DIR OUT_DIR {fsdp,single}``. ``fsdp`` fits
under ``FSDPStrategy(auto_wrap_policy=AdapterWrapPolicy)`` on 2 processes, ``single`` on one
process without a strategy; both train 2 adapters for 6 steps (adapters 0, 1, 0, 1, 0, 0), every
rank on the same batches, and export the adapters to ``OUT_DIR/<mode>``.

Lightning refuses ``FSDPStrategy`` off a GPU (its accelerator check tests the exact class) and
torch's FSDP needs ``device_id`` on the CPU: a subclass and a ``device_id`` default stand in for a
GPU here; the wrapping, sharding, root forward (where Lightning runs ``training_step``) and
gradient reduction are Lightning's and torch's own.
"""

from __future__ import annotations

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

CLUSTERS = (0, 1, 0, 1, 0, 0)


class CPUFSDPStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy, accepted with ``accelerator="cpu"``."""


def _fsdp_on_cpu() -> None:
    fsdp_init = FullyShardedDataParallel.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        kwargs["device_id"] = kwargs.get("device_id") or torch.device("cpu")
        fsdp_init(self, *args, **kwargs)

    FullyShardedDataParallel.__init__ = init  # type: ignore[method-assign]


class Batches(LightningDataModule):
    """The same cluster-pure batches on every rank, in order."""

    num_clusters = 2

    def train_dataloader(self) -> DataLoader:
        batches = []
        for seed, cluster in enumerate(CLUSTERS):
            ids = torch.randint(100, 2000, (2, 12), generator=torch.Generator().manual_seed(seed))
            labels = ids.clone()
            labels[:, :3] = -100
            batches.append(
                {
                    "input_ids": ids,
                    "attention_mask": torch.ones_like(ids),
                    "labels": labels,
                    "cluster_id": torch.full((2,), cluster, dtype=torch.long),
                }
            )
        return DataLoader(batches, batch_size=None, shuffle=False)  # type: ignore[arg-type]


def main() -> None:
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from tclora.fsdp_policy import AdapterWrapPolicy
    from tclora.module import LoRAModule

    model_dir, out, mode = sys.argv[1:4]
    if mode == "fsdp":
        _fsdp_on_cpu()
        strategy: Any = CPUFSDPStrategy(
            auto_wrap_policy=AdapterWrapPolicy([LlamaDecoderLayer]),
            sharding_strategy="FULL_SHARD",
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
        max_steps=len(CLUSTERS),
        use_distributed_sampler=False,  # every rank trains the same cluster at each step
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=Batches())


if __name__ == "__main__":
    main()
