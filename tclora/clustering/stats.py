"""Describing a clustering: statistics against the task labels, a 2-D projection and a scatter
plot of it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from tclora.clustering.kmeans import fit_sample_indices

__all__ = ["cluster_statistics", "plot_clusters", "project_2d"]


def cluster_statistics(
    assignments: np.ndarray,
    tasks: Sequence[str],
    embeddings: np.ndarray | None = None,
    num_clusters: int | None = None,
    sample_size: int = 2000,
    seed: int = 42,
    embedding_rows: np.ndarray | None = None,
) -> dict[str, Any]:
    """Describe a clustering against the task labels.

    Args:
        assignments: ``(N,)`` cluster ids.
        tasks: ``N`` task labels.
        embeddings: ``(N, D)`` samples, for the silhouette (skipped when ``None``).
        num_clusters: ``K`` (default: ``max(assignments) + 1``).
        sample_size: Samples the silhouette is computed on.
        seed: Seed of that sample.
        embedding_rows: Row of ``embeddings`` for each assignment (default: row ``i`` for
            assignment ``i``), so a subset can be described without copying the embeddings.

    Returns:
        ``{"num_clusters", "sizes": [K], "purity", "adjusted_rand_index",
        "normalized_mutual_info", "silhouette" (None if undefined), "tasks_per_cluster": [K]}``.
        Purity is the fraction of samples whose cluster's majority task is their own.
    """
    from sklearn.metrics import (
        adjusted_rand_score,
        normalized_mutual_info_score,
        silhouette_score,
    )

    k = int(num_clusters if num_clusters is not None else assignments.max() + 1)
    task_names, task_ids = np.unique(np.asarray(tasks, dtype=object), return_inverse=True)
    table = np.zeros((k, len(task_names)), dtype=np.int64)
    np.add.at(table, (assignments, task_ids), 1)
    n = max(len(assignments), 1)
    silhouette: float | None = None
    if embeddings is not None:
        idx = fit_sample_indices(len(assignments), 0.0, sample_size, seed)
        labels = assignments[idx]
        if 2 <= len(np.unique(labels)) <= len(idx) - 1:
            rows = idx if embedding_rows is None else np.asarray(embedding_rows)[idx]
            silhouette = float(silhouette_score(np.asarray(embeddings[rows]), labels))
    return {
        "num_clusters": k,
        "sizes": table.sum(axis=1).tolist(),
        "purity": float(table.max(axis=1).sum() / n),
        "adjusted_rand_index": float(adjusted_rand_score(task_ids, assignments)),
        "normalized_mutual_info": float(normalized_mutual_info_score(task_ids, assignments)),
        "silhouette": silhouette,
        "tasks_per_cluster": [
            {str(task_names[j]): int(row[j]) for j in np.nonzero(row)[0]} for row in table
        ],
    }


def project_2d(embeddings: np.ndarray, centroids: np.ndarray | None = None) -> np.ndarray:
    """Project rows (and centroids, appended) onto the first two principal components.

    Args:
        embeddings: ``(N, D)`` samples.
        centroids: Optional ``(K, D)`` rows projected with the same components.

    Returns:
        ``(N [+ K], 2)`` float32 coordinates.
    """
    x = np.asarray(embeddings, dtype=np.float64)
    mean = x.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    comps = vt[:2].T
    if comps.shape[1] < 2:
        comps = np.pad(comps, ((0, 0), (0, 2 - comps.shape[1])))
    rows = x if centroids is None else np.concatenate([x, np.asarray(centroids)], axis=0)
    return ((rows - mean) @ comps).astype(np.float32)


def plot_clusters(
    points: np.ndarray,
    assignments: np.ndarray,
    tasks: Sequence[str] | None = None,
    centroids_2d: np.ndarray | None = None,
    title: str = "clusters",
) -> Any:
    """Scatter plot of 2-D points coloured by cluster (marker by task, when given).

    Args:
        points: ``(N, 2)`` coordinates (e.g. :func:`project_2d`).
        assignments: ``(N,)`` cluster ids.
        tasks: Optional task labels, drawn as marker shapes.
        centroids_2d: Optional ``(K, 2)`` centroid coordinates, drawn as numbered crosses.
        title: Figure title.

    Returns:
        A matplotlib ``Figure`` (Agg canvas; no display needed).
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 5), dpi=100)
    ax = fig.add_subplot()
    markers = "os^vD<>pP*hX"
    task_names: list[str | None] = [None] if tasks is None else list(sorted(set(tasks)))
    for j, task in enumerate(task_names):
        mask = (
            np.ones(len(points), bool)
            if task is None
            else np.asarray([t == task for t in tasks or []], bool)
        )
        ax.scatter(
            points[mask, 0],
            points[mask, 1],
            c=assignments[mask],
            cmap="tab20",
            vmin=0,
            vmax=max(int(assignments.max()), 1) if len(assignments) else 1,
            s=12,
            marker=markers[j % len(markers)],
            label=task,
        )
    if centroids_2d is not None:
        for k, (cx, cy) in enumerate(centroids_2d):
            ax.scatter([cx], [cy], c="black", marker="x", s=60)
            ax.annotate(str(k), (cx, cy), fontsize=9, fontweight="bold")
    if tasks is not None and len(task_names) <= 20:
        ax.legend(fontsize=7, markerscale=1.5, title="task (marker)", loc="best")
    ax.set_title(title)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    fig.tight_layout()
    return fig
