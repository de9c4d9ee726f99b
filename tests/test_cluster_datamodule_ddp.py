"""Two CPU processes (DDP, gloo): both ranks train the same cluster at every step, on disjoint
shards, and together cover each cluster's samples exactly once per epoch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from lightning.pytorch import LightningModule, Trainer
    from tclora.datamodules import ClusterDataModule

    data, cache, out = sys.argv[1:4]

    class Recorder(LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen = []

        def training_step(self, batch, batch_idx):
            rows = []
            for ids, labels in zip(batch["input_ids"], batch["labels"]):
                rows.append(self.trainer.datamodule.tokenizer.decode(ids[labels == -100]))
            self.seen.append([self.current_epoch, int(batch["cluster_id"][0]), rows])
            return (self.w * batch["attention_mask"].float().mean()).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = ClusterDataModule([data], num_clusters=4, batch_size=4, val_fraction=0.0,
                           cache_dir=cache, progress_bar=False, schedule="proportional")
    model = Recorder()
    trainer = Trainer(strategy="ddp", accelerator="cpu", devices=2, max_epochs=2, logger=False,
                      enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False, limit_val_batches=0)
    trainer.fit(model, datamodule=dm)
    with open(f"{out}/rank{trainer.global_rank}.json", "w") as handle:
        json.dump({"seen": model.seen, "assignments": dm.assignments.tolist()}, handle)
    """
)


def _unique_samples() -> list[dict[str, str]]:
    samples = []
    for i in range(27):  # odd cluster sizes exercise the uneven last global batch
        samples += [
            {"prompt": f"What is {i} + {i + 7}? Answer with a number.", "response": str(2 * i + 7)},
            {"prompt": f"Translate into French: 'I have {i} red apples.'", "response": f"J'ai {i}"},
            {
                "prompt": f"Review #{i}: the hotel was dreadful. Positive or negative?",
                "response": "neg",
            },
            {
                "prompt": f"```python\\nprint({i} * 3)\\n```\\nWhat does this code print?",
                "response": str(3 * i),
            },
        ]
    return samples[:-3]  # 105 samples: sizes 27, 26, 26, 26


@pytest.mark.slow
def test_ddp_ranks_train_the_same_cluster_on_disjoint_shards(tmp_path: Path) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(s) + "\n" for s in _unique_samples()))
    script = tmp_path / "ddp_fit.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, str(script), str(data), str(tmp_path / "cache"), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["assignments"] == ranks[1]["assignments"]
    seen0, seen1 = ranks[0]["seen"], ranks[1]["seen"]
    assert len(seen0) == len(seen1) > 0
    assert [s[:2] for s in seen0] == [s[:2] for s in seen1]  # same epoch + cluster every step
    assignments = ranks[0]["assignments"]
    sizes = [assignments.count(k) for k in range(4)]
    for epoch in (0, 1):
        per_cluster: dict[int, list[str]] = {k: [] for k in range(4)}
        for (e, k, rows0), (_, _, rows1) in zip(seen0, seen1, strict=True):
            if e != epoch:
                continue
            assert not set(rows0) & set(rows1)  # disjoint shards
            assert abs(len(rows0) - len(rows1)) <= 1
            per_cluster[k] += rows0 + rows1
        for k in range(4):
            assert len(per_cluster[k]) == sizes[k] == len(set(per_cluster[k]))  # once each
    assert [s[2] for s in seen0 if s[0] == 0] != [s[2] for s in seen0 if s[0] == 1]
