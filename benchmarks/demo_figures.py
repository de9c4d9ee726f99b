"""Figures for the README from a finished demo run (``make demo``).

* ``docs/figures/clusters.png``: the demo's training samples in 2-D (PCA of their MiniLM
  embeddings), coloured by k-means cluster, marker by source task, centroids numbered -- rebuilt
  from the data module's caches, so nothing is embedded again.
* ``docs/figures/cp{R}_loadings.png``: the CP task loadings heatmap (adapters x components), the
  same decomposition ``CPMergeCallback`` ran, rebuilt from the exported adapter folders.
* ``docs/figures/demo_results.md``: the demo's results table.

Usage::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/demo_figures.py [--config configs/demo.yaml]
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import yaml

from tclora.clustering import plot_clusters, project_2d
from tclora.datamodules import ClusterDataModule
from tclora.merge import AdapterStack, component_analysis, cp_decompose
from tclora.study import loadings_figure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--out", default="docs/figures")
    args = parser.parse_args()
    config = yaml.safe_load(Path(args.config).read_text())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    data = ClusterDataModule(**{**config["data"], "progress_bar": False})
    data.prepare_data()
    data.setup("fit")
    idx = data.train_indices
    emb = np.asarray(data.embeddings[idx], dtype=np.float32)
    points = project_2d(emb, data.centroids)
    fig = plot_clusters(
        points[: len(emb)],
        data.assignments[idx],
        [data.samples[i].task for i in idx],
        points[len(emb) :],
        title=f"demo: {data.num_clusters} k-means clusters of MiniLM embeddings (PCA)",
    )
    fig.savefig(out / "clusters.png", dpi=110, bbox_inches="tight")
    stats = data.statistics
    print(
        f"clusters: sizes {stats['sizes']}, purity {stats['purity']:.3f}, ARI "
        f"{stats['adjusted_rand_index']:.3f}"
    )

    runs = sorted(Path(config["trainer"]["default_root_dir"]).glob("**/merge/results.md"))
    merge_args = next(
        c["init_args"]
        for c in config["trainer"]["callbacks"]
        if c["class_path"].endswith("CPMergeCallback")
    )
    merge_dir = runs[-1].parent if runs else Path(config["trainer"]["default_root_dir"]) / "merge"
    adapters = Path(config["model"]["export_dir"])
    folders = sorted(p for p in adapters.iterdir() if (p / "adapter_config.json").is_file())
    stack = AdapterStack.from_folders(folders)
    for rank in merge_args["cp_ranks"]:  # the callback's decomposition, rebuilt from the exports
        cp = cp_decompose(stack, rank, engine=merge_args.get("engine", "factored"))
        analysis = {**component_analysis(cp), "adapters": stack.names}
        loadings_figure({f"cp{rank}": analysis}).savefig(out / f"cp{rank}_loadings.png", dpi=110)
    for name, target in (("results.md", "demo_results.md"),):
        source = merge_dir / name
        if source.is_file():
            shutil.copyfile(source, out / target)
        else:
            print(f"missing {source}: run `make demo` first")
    print(f"figures in {out}")


if __name__ == "__main__":
    main()
