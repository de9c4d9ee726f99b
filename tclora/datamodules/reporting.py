"""Cluster statistics to Lightning loggers: flat ``clusters/...`` scalars to every logger and, to
TensorBoard, a PCA figure of the clusters, the embedding projector and the tasks of each cluster.

The projector's metadata has two text columns, ``cluster`` (``cluster_k``, the adapter's name)
first and ``task``: TensorBoard labels the points by the first text column, and both columns are
offered under "Color by" as categories. (TensorBoard cannot be told which colouring to open with;
it opens uncoloured, and "Color by: cluster" is one click.)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from tclora.clustering import plot_clusters, project_2d
from tclora.data import Sample

__all__ = ["log_cluster_statistics", "projection_sample", "scalar_statistics"]

Projection = tuple[np.ndarray, np.ndarray, list[str]]
"""``(embeddings (M, D) float32, cluster ids (M,), task labels [M])`` of the projected samples."""


def scalar_statistics(statistics: Mapping[str, Any], num_truncated: int | None) -> dict[str, float]:
    """Cluster statistics as flat ``"clusters/..."`` scalars.

    Args:
        statistics: :func:`tclora.clustering.cluster_statistics` of the training samples.
        num_truncated: Training samples longer than ``max_length`` (``None``: not counted).

    Returns:
        ``{"clusters/num_clusters", "clusters/purity", ..., "clusters/size_<k>", ...}``.
    """
    s = statistics
    out = {
        "clusters/num_clusters": float(s["num_clusters"]),
        "clusters/purity": s["purity"],
        "clusters/adjusted_rand_index": s["adjusted_rand_index"],
        "clusters/normalized_mutual_info": s["normalized_mutual_info"],
    }
    if s["silhouette"] is not None:
        out["clusters/silhouette"] = s["silhouette"]
    for k, size in enumerate(s["sizes"]):
        out[f"clusters/size_{k}"] = float(size)
    if num_truncated is not None:
        out["clusters/num_truncated"] = float(num_truncated)
    return out


def projection_sample(
    embeddings: np.ndarray,
    rows: np.ndarray,
    assignments: np.ndarray,
    samples: Sequence[Sample],
    limit: int,
    seed: int,
) -> Projection:
    """At most ``limit`` of ``rows`` (a seeded, sorted subsample) for the projector.

    Args:
        embeddings: ``(N, D)`` embeddings of all samples.
        rows: The candidate rows (the training samples).
        assignments: ``(N,)`` cluster of every sample.
        samples: All samples (for their task labels).
        limit: Most rows kept.
        seed: Seed of the subsample.

    Returns:
        The embeddings, clusters and task labels of the kept rows.
    """
    idx = rows
    if len(idx) > limit:
        rng = np.random.default_rng(seed)
        idx = np.sort(rng.choice(idx, limit, replace=False))
    emb = np.asarray(embeddings[idx], dtype=np.float32)
    return emb, assignments[idx], [samples[i].task for i in idx]


def log_cluster_statistics(
    loggers: Sequence[Any],
    scalars: Mapping[str, float],
    statistics: Mapping[str, Any],
    centroids: np.ndarray,
    projection: Callable[[], Projection],
    title: str,
) -> None:
    """Send the scalars to every logger, and the pictures to those with a TensorBoard writer.

    Args:
        loggers: Lightning loggers.
        scalars: :func:`scalar_statistics`.
        statistics: :func:`tclora.clustering.cluster_statistics` (its ``tasks_per_cluster``).
        centroids: ``(K, D)`` centroids, drawn into the PCA figure.
        projection: Returns the samples to draw (called for each TensorBoard logger).
        title: Title of the PCA figure.
    """
    for logger in loggers:
        logger.log_metrics(scalars, step=0)
        experiment = getattr(logger, "experiment", None)
        if experiment is None or not hasattr(experiment, "add_embedding"):
            continue
        emb, clusters, tasks = projection()
        points = project_2d(emb, centroids)
        fig = plot_clusters(points[: len(emb)], clusters, tasks, points[len(emb) :], title=title)
        experiment.add_figure("clusters/pca", fig, global_step=0, close=True)
        # "cluster_k" (the adapter's name) is text, not a number: the projector then labels the
        # points by cluster (its first text column) and colours them by category, not a gradient
        experiment.add_embedding(
            torch.from_numpy(np.ascontiguousarray(emb)),
            metadata=[[f"cluster_{c}", t] for c, t in zip(clusters.tolist(), tasks, strict=True)],
            metadata_header=["cluster", "task"],
            tag="clusters",
            global_step=0,
        )
        experiment.add_text(
            "clusters/tasks_per_cluster",
            "\n".join(f"* cluster_{k}: {d}" for k, d in enumerate(statistics["tasks_per_cluster"])),
            global_step=0,
        )
