"""Text-level vs parameter-level clustering on one config's data, side by side (a figure).

* **text**: ``ClusterDataModule`` k-means on MiniLM sentence embeddings (what ``tclora fit`` does);
* **MBC**: ``tclora mbc``'s stages 1-2 (one short LoRA per task, then k-means on the cosine
  similarities of their flattened LoRA parameters), every sample in its task's group.

Both with the same ``K``, described against the task labels (purity, adjusted Rand index, NMI)
and against each other (ARI between the two clusterings). Writes ``<out>/text_vs_mbc.png``
(task x cluster counts for each, and MBC's task x task cosine matrix) and
``<out>/text_vs_mbc.json`` (the numbers).

Usage::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/text_vs_mbc.py --config configs/demo.yaml \\
        --num_clusters 2 --stage1_steps 48
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def figure(tasks: list[str], stats: dict[str, dict[str, Any]], similarity: dict[str, Any]) -> Any:
    """Task x cluster count heatmaps of each clustering, and MBC's cosine similarity matrix.

    Args:
        tasks: Task names (the heatmaps' columns, in this order).
        stats: ``{clustering name: cluster_statistics(...)}`` (``tasks_per_cluster``, purity, ARI).
        similarity: ``{"tasks", "cosine", "groups"}`` as ``tclora mbc`` writes it.

    Returns:
        The matplotlib figure.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(stats) + 1, figsize=(5.2 * (len(stats) + 1), 4.2))
    for ax, (name, st) in zip(axes, stats.items(), strict=False):
        table = np.array([[c.get(t, 0) for t in tasks] for c in st["tasks_per_cluster"]])
        ax.imshow(table, cmap="Blues", aspect="auto")
        for (i, j), v in np.ndenumerate(table):
            if v:
                ax.text(j, i, str(v), ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(tasks)), tasks, rotation=40, ha="right", fontsize=8)
        ax.set_yticks(range(len(table)), [f"cluster {k}" for k in range(len(table))])
        ax.set_title(
            f"{name}: purity {st['purity']:.2f}, ARI {st['adjusted_rand_index']:.2f}", fontsize=10
        )
    names = similarity["tasks"]
    cos = np.asarray(similarity["cosine"])
    ax = axes[-1]
    im = ax.imshow(cos, cmap="RdBu_r", vmin=-1, vmax=1)
    for (i, j), v in np.ndenumerate(cos):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
    labels = [f"{t} (g{g})" for t, g in zip(names, similarity["groups"], strict=True)]
    ax.set_xticks(range(len(names)), labels, rotation=40, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), labels, fontsize=8)
    ax.set_title("MBC: cosine of the tasks' LoRA parameters", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--num_clusters", type=int, default=2)
    parser.add_argument("--stage1_steps", type=int, default=48)
    parser.add_argument("--work", default="runs/text_vs_mbc", help="stage files of MBC")
    parser.add_argument("--out", default="docs/figures")
    args = parser.parse_args(argv)

    import yaml
    from sklearn.metrics import adjusted_rand_score

    from tclora.clustering import cluster_statistics, read_mbc_assignments
    from tclora.datamodules import ClusterDataModule
    from tclora.mbc_cli import mbc_main

    work, out = Path(args.work), Path(args.out)
    k = str(args.num_clusters)
    mbc_main(
        ["--config", args.config, "--num_clusters", k, "--stage1_steps", str(args.stage1_steps)]
        + ["--output_dir", str(work), "--stop_after", "stage2", "--trainer.logger", "false"]
        + ["--trainer.enable_checkpointing", "false", "--trainer.limit_val_batches", "0"]
    )
    groups = read_mbc_assignments(work / "mbc.json")
    similarity = json.loads((work / "mbc_similarity.json").read_text())

    config = yaml.safe_load(Path(args.config).read_text())
    data = ClusterDataModule(
        **{**config["data"], "num_clusters": args.num_clusters, "progress_bar": False}
    )
    data.prepare_data()
    data.setup("fit")
    idx = data.train_indices
    sample_tasks = [data.samples[i].task for i in idx]
    text = np.asarray(data.assignments[idx])
    mbc = np.array([groups[t] for t in sample_tasks])
    stats = {
        "text (k-means on MiniLM)": cluster_statistics(
            text, sample_tasks, num_clusters=len(set(text))
        ),
        "MBC (LoRA parameters)": cluster_statistics(mbc, sample_tasks),
    }
    tasks = sorted(set(sample_tasks))
    out.mkdir(parents=True, exist_ok=True)
    figure(tasks, stats, similarity).savefig(out / "text_vs_mbc.png", dpi=110, bbox_inches="tight")
    record = {
        "command": "python benchmarks/text_vs_mbc.py " + " ".join(argv or sys.argv[1:]),
        "config": args.config,
        "num_clusters": args.num_clusters,
        "stage1_steps": args.stage1_steps,
        "training_samples": len(idx),
        "mbc_groups": groups,
        "agreement_ari": float(adjusted_rand_score(text, mbc)),
        "stats": {
            name: {
                key: st[key]
                for key in ("purity", "adjusted_rand_index", "normalized_mutual_info", "sizes")
            }
            for name, st in stats.items()
        },
    }
    (out / "text_vs_mbc.json").write_text(json.dumps(record, indent=1) + "\n")
    for name, st in record["stats"].items():
        print(
            f"{name}: purity {st['purity']:.3f}, ARI {st['adjusted_rand_index']:.3f}, "
            f"NMI {st['normalized_mutual_info']:.3f}, sizes {st['sizes']}"
        )
    print(f"agreement (ARI text vs MBC): {record['agreement_ari']:.3f}; MBC groups {groups}")
    print(f"figure: {out / 'text_vs_mbc.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
