"""The per-adapter invariant under 2-process DDP (gloo on CPU).

Each global batch of 4 rows is split into two halves, one per rank. Every row has the same number
of label tokens, so the mean of the two per-rank mean losses equals the mean loss over the global
batch: the DDP fit must end with the same adapters as a one-process fit on the global batches.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.test_module import adapter_weights, fit, make_batch

SCRIPT = textwrap.dedent(
    """
    import os
    import sys

    os.environ["HF_HUB_OFFLINE"] = "1"
    from lightning.pytorch import LightningDataModule, Trainer, seed_everything
    from safetensors.torch import load_file, save_file
    from torch.utils.data import DataLoader

    from tclora.module import LoRAModule

    model_dir, batches_path, out_path = sys.argv[1:4]
    mismatch = len(sys.argv) > 4 and sys.argv[4] == "mismatch"
    flat = load_file(batches_path)
    steps = sorted({int(key.split(".")[0]) for key in flat})
    fields = ["input_ids", "attention_mask", "labels", "cluster_id"]
    global_batches = [{f: flat[f"{t}.{f}"] for f in fields} for t in steps]


    class RankShards(LightningDataModule):
        num_clusters = 2

        def train_dataloader(self):
            rank, world = self.trainer.global_rank, self.trainer.world_size
            local = []
            for batch in global_batches:
                per = batch["input_ids"].shape[0] // world
                shard = {k: v[rank * per : (rank + 1) * per] for k, v in batch.items()}
                if mismatch and rank == 1:
                    shard["cluster_id"] = 1 - shard["cluster_id"]
                local.append(shard)
            return DataLoader(local, batch_size=None)


    seed_everything(0)
    module = LoRAModule(
        model=model_dir, r=4, lora_alpha=8, lr=1e-2, weight_decay=0.1, warmup_steps=1,
        lr_schedule="linear", max_steps_per_adapter=4,
    )
    trainer = Trainer(
        accelerator="cpu", devices=2, strategy="ddp_find_unused_parameters_true", max_epochs=1,
        use_distributed_sampler=False, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, datamodule=RankShards())
    if trainer.is_global_zero:
        weights = {}
        for k in range(2):
            for name, param in module.adapter_parameters(k):
                weights[name] = param.detach().contiguous()
        save_file(weights, out_path)
    """
)


def run_ddp(tiny_model_dir: Path, tmp_path: Path, batches: list[dict], *extra: str) -> Any:
    """Run the DDP script on 2 CPU processes; return the finished process."""
    flat = {f"{t}.{k}": v for t, b in enumerate(batches) for k, v in b.items()}
    save_file(flat, str(tmp_path / "batches.safetensors"))
    script = tmp_path / "ddp_fit.py"
    script.write_text(SCRIPT)
    repo = Path(__file__).resolve().parents[1]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": f"{repo}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "OMP_NUM_THREADS": "1",
    }
    env.pop("MASTER_PORT", None)
    args = [str(tiny_model_dir), str(tmp_path / "batches.safetensors")]
    args += [str(tmp_path / "ddp_adapters.safetensors"), *extra]
    return subprocess.run(
        [sys.executable, str(script), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_ddp_two_processes_equals_single_process(tiny_model_dir: Path, tmp_path: Path) -> None:
    order = [0, 1, 1, 0, 0]
    batches = [make_batch(c, seed=i, rows=4) for i, c in enumerate(order)]
    proc = run_ddp(tiny_model_dir, tmp_path, batches)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = tmp_path / "ddp_adapters.safetensors"
    ddp = load_file(str(out))

    single, _ = fit(
        tiny_model_dir,
        batches,
        2,
        weight_decay=0.1,
        warmup_steps=1,
        lr_schedule="linear",
        max_steps_per_adapter=4,
    )
    for k in range(2):
        want = {n: p.detach() for n, p in single.adapter_parameters(k)}
        got = {n: ddp[n] for n in want}
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert any("lora_B" in n and w.abs().sum() > 0 for n, w in adapter_weights(single, 1).items())


@pytest.mark.slow
def test_ddp_ranks_on_different_clusters_fail_clearly(tiny_model_dir: Path, tmp_path: Path) -> None:
    batches = [make_batch(0, seed=0, rows=4)]
    proc = run_ddp(tiny_model_dir, tmp_path, batches, "mismatch")
    assert proc.returncode != 0
    assert "ranks train different clusters [0, 1] at global step 0" in proc.stderr, proc.stderr[
        -4000:
    ]
