"""Does a LoRAModule fit under Lightning's DeepSpeedStrategy end with a one-device fit's adapters?

Two adapters of a tiny Llama (random weights, built here) train on 7 cluster-pure batches in the
order 0 1 1 0 0 1 0 (AdamW with weight decay, linear decay after one warm-up step, 4 steps per
adapter), once on one device without a strategy and once under ``DeepSpeedStrategy`` (ZeRO
stage 1 and 2, float32). DeepSpeed steps flat partitions whose gradients are zero-filled for the
inactive adapter, so ``LoRAModule`` steps the inactive groups with learning rate 0 and puts their
optimizer state back after the step; the rows "lr 0 only" switch the put-back off, as it was
before 2026-11-27. Prints the largest |difference| of each adapter's weights from the one-device
fit. On 2026-11-27 (DeepSpeed 0.19.8, torch 2.13, the CPU): 0 for both adapters with the
put-back, at both stages; 0.0092 and 0.0195 without it.

Lightning runs DeepSpeed on CUDA only; ``--accelerator cpu`` uses a subclass that lifts that
check (the CPU has no device index for DeepSpeed to select; it is given index 0). Usage::

    pip install deepspeed   # DS_BUILD_OPS=0 is enough
    python benchmarks/gpu_kit/deepspeed_fit_check.py                    # on a GPU
    python benchmarks/gpu_kit/deepspeed_fit_check.py --accelerator cpu  # anywhere
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

ORDER = (0, 1, 1, 0, 0, 1, 0)


def batches(vocab: int) -> list[dict[str, torch.Tensor]]:
    """Cluster-pure batches of 4 rows x 12 tokens, the first 3 tokens of each row unscored."""
    out = []
    for seed, cluster in enumerate(ORDER):
        ids = torch.randint(0, vocab, (4, 12), generator=torch.Generator().manual_seed(seed))
        labels = ids.clone()
        labels[:, :3] = -100
        cid = torch.full((4,), cluster, dtype=torch.long)
        out.append(
            {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
            | {"cluster_id": cid}
        )
    return out


def fit(model_dir: Path, strategy: Any, accelerator: str) -> dict[str, torch.Tensor]:
    """One fit of 2 adapters on :func:`batches`; every adapter weight after it."""
    from lightning.pytorch import LightningDataModule, Trainer, seed_everything
    from torch.utils.data import DataLoader

    from tclora.module import LoRAModule

    class Batches(LightningDataModule):
        def train_dataloader(self) -> DataLoader:
            return DataLoader(batches(128), batch_size=None, shuffle=False)  # type: ignore[arg-type]

    seed_everything(0)
    module = LoRAModule(
        model=str(model_dir),
        num_adapters=2,
        r=4,
        lora_alpha=8,
        lr=1e-2,
        weight_decay=0.1,
        lr_schedule="linear",
        warmup_steps=1,
        max_steps_per_adapter=4,
    )
    trainer = Trainer(
        accelerator=accelerator,
        devices=1,
        strategy=strategy or "auto",
        precision="32-true",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    trainer.fit(module, datamodule=Batches())
    return {
        f"{i}.{k}": v.detach().float().cpu().clone()
        for i in range(2)
        for k, v in module.adapter_state_dict(i).items()
    }


def deepspeed_strategy(stage: int, accelerator: str) -> Any:
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

    # no logging_batch_size_per_gpu: LoRAModule.setup gives DeepSpeed the micro batch size
    kwargs: dict[str, Any] = dict(stage=stage, exclude_frozen_parameters=True)
    if accelerator != "cpu":
        return DeepSpeedStrategy(**kwargs)

    class CPUDeepSpeed(DeepSpeedStrategy):
        """Lightning's DeepSpeedStrategy without its CUDA-only checks."""

        @property
        def root_device(self) -> torch.device:
            return torch.device("cpu", 0)

        def setup_environment(self) -> None:
            DDPStrategy.setup_environment(self)

        def setup_distributed(self) -> None:
            from lightning.fabric.utilities.seed import reset_seed

            reset_seed()
            self.set_world_ranks()
            self._init_deepspeed_distributed()

    return CPUDeepSpeed(process_group_backend="gloo", **kwargs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accelerator", choices=["gpu", "cpu"], default="gpu")
    args = parser.parse_args(argv)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29534")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import deepspeed

    import tclora.module
    from benchmarks.common import save_tiny_llama

    with tempfile.TemporaryDirectory() as folder:
        save_tiny_llama(Path(folder), 128, 32, 64)
        reference = fit(Path(folder), None, args.accelerator)
        rows = []
        put_back = tclora.module._put_back
        for stage in (1, 2):
            for restore in (True, False):
                tclora.module._put_back = put_back if restore else (lambda *a, **k: None)
                try:
                    got = fit(
                        Path(folder), deepspeed_strategy(stage, args.accelerator), args.accelerator
                    )
                finally:
                    tclora.module._put_back = put_back
                diffs = [
                    max(
                        (got[k] - reference[k]).abs().max().item()
                        for k in reference
                        if k[0] == str(i)
                    )
                    for i in range(2)
                ]
                rows.append((stage, restore, diffs))
    print(f"DeepSpeed {deepspeed.__version__}, torch {torch.__version__}, {args.accelerator}")
    print("| ZeRO stage | inactive adapters | max abs diff, adapter 0 | adapter 1 |")
    print("|---|---|---|---|")
    for stage, restore, diffs in rows:
        how = "lr 0, optimizer state put back" if restore else "lr 0 only"
        print(f"| {stage} | {how} | {diffs[0]:.3g} | {diffs[1]:.3g} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
