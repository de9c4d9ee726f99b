"""The clustering policy: from the embeddings of a train/validation split to one cluster per
sample, with the options a data module exposes (method, ``K`` or its silhouette search, fit
subsample, small-cluster policy).

The training samples are clustered (k-means fitted on a seeded subsample, or the per-task and
single-cluster baselines), clusters smaller than ``min_cluster_size`` are merged or rejected, and
the validation samples are assigned to the nearest centroid (by task label for ``"per_task"``).
Pure: nothing is cached or logged here except through the ``info`` callback.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np

from tclora.clustering.kmeans import (
    assign_to_centroids,
    centroids_from_assignments,
    choose_num_clusters,
    fit_kmeans,
    fit_sample_indices,
    merge_small_clusters,
    per_task_assignments,
)

__all__ = [
    "CLUSTERING_METHODS",
    "SMALL_CLUSTER_POLICIES",
    "ClusteringMethod",
    "ClusteringOptions",
    "Clusters",
    "check_num_clusters",
    "cluster_samples",
]

CLUSTERING_METHODS = ("kmeans", "minibatch_kmeans", "per_task", "single")
ClusteringMethod = Literal["kmeans", "minibatch_kmeans", "per_task", "single"]
SMALL_CLUSTER_POLICIES = ("merge", "reject")


@dataclass(frozen=True)
class ClusteringOptions:
    """How samples are clustered (checked by the data module that takes them as arguments).

    Attributes:
        method: One of :data:`CLUSTERING_METHODS`.
        num_clusters: ``K`` for the k-means methods; ``None`` searches ``num_clusters_range``
            by silhouette. Ignored by ``"per_task"`` and ``"single"``.
        num_clusters_range: ``(low, high)`` inclusive range of the silhouette search.
        seed: Seed of the subsamples and of k-means.
        n_init: k-means++ restarts.
        fit_fraction: Fraction of the training samples k-means is fitted on.
        min_fit_samples: Fit k-means on at least this many samples (or all).
        silhouette_sample_size: Samples the silhouette search is computed on.
        min_cluster_size: Clusters with fewer training samples are merged or rejected.
        small_cluster_policy: ``"merge"`` into the nearest cluster or ``"reject"`` (raise).
    """

    method: str = "kmeans"
    num_clusters: int | None = 4
    num_clusters_range: tuple[int, int] = (2, 16)
    seed: int = 42
    n_init: int = 10
    fit_fraction: float = 0.2
    min_fit_samples: int = 1000
    silhouette_sample_size: int = 2000
    min_cluster_size: int = 1
    small_cluster_policy: str = "merge"


class Clusters(NamedTuple):
    """A clustering of all samples (training and validation)."""

    assignments: np.ndarray
    """``(N,)`` int64 cluster of every sample."""
    centroids: np.ndarray
    """``(K, D)`` float32 centroids, the routing targets."""
    scores: dict[int, float]
    """Silhouette of every ``K`` tried by the search (empty without one)."""


def check_num_clusters(
    options: ClusteringOptions, texts: Sequence[str], val_fraction: float
) -> None:
    """Check a configured ``K`` against the data before anything is embedded.

    Args:
        options: The clustering options.
        texts: The text embedded for every sample.
        val_fraction: Fraction of the samples held out for validation (see
            :func:`tclora.data.split_train_val`).

    Raises:
        ValueError: ``K`` exceeds the training samples or their distinct texts (k-means would
            leave an empty cluster).
    """
    num = len(texts)
    num_train = num - min(math.ceil(num * val_fraction), max(num - 1, 0))
    k = options.num_clusters
    if options.method in ("kmeans", "minibatch_kmeans") and k is not None:
        if k > num_train:
            raise ValueError(
                f"num_clusters={k} is larger than the number of training samples "
                f"({num_train} of {num} after val_fraction={val_fraction})"
            )
        distinct = len(set(texts))
        if k > distinct:
            raise ValueError(
                f"num_clusters={k} is larger than the number of distinct texts to embed "
                f"({distinct}): k-means would leave an empty cluster"
            )


def cluster_samples(
    embeddings: np.ndarray,
    train: np.ndarray,
    val: np.ndarray,
    tasks: Sequence[str],
    options: ClusteringOptions,
    info: Callable[[str], None] | None = None,
) -> Clusters:
    """Cluster the training samples and assign the validation samples.

    Args:
        embeddings: ``(N, D)`` embeddings of all samples (a memory-mapped array is read by rows).
        train: Row indices of the training samples.
        val: Row indices of the validation samples.
        tasks: Task label of every sample (``N`` of them).
        options: The clustering options.
        info: Receives a line on a silhouette choice of ``K`` and on merged clusters.

    Returns:
        The assignments of all ``N`` samples, the centroids and the silhouette scores.

    Raises:
        ValueError: A cluster is left empty, or one is smaller than ``min_cluster_size`` with
            ``small_cluster_policy="reject"``.
    """
    say = info if info is not None else (lambda message: None)
    train_tasks = [tasks[i] for i in train]
    scores: dict[int, float] = {}
    if options.method in ("single", "per_task"):
        if options.method == "single":
            train_assign = np.zeros(len(train), dtype=np.int64)
        else:
            train_assign, _ = per_task_assignments(train_tasks)
        k = int(train_assign.max()) + 1
        centroids = centroids_from_assignments(np.asarray(embeddings[train]), train_assign, k)
    else:
        method: Literal["kmeans", "minibatch_kmeans"] = (
            "kmeans" if options.method == "kmeans" else "minibatch_kmeans"
        )
        k_opt = options.num_clusters
        if k_opt is None:
            low, high = options.num_clusters_range
            size = options.silhouette_sample_size
            sample = train[fit_sample_indices(len(train), 0.0, size, options.seed)]
            k_opt, scores = choose_num_clusters(
                np.asarray(embeddings[sample]),
                range(low, high + 1),
                method,
                options.seed,
                size,
                options.n_init,
                options.fit_fraction,
                options.min_fit_samples,
            )
            say(
                f"chose num_clusters={k_opt} by silhouette "
                f"{ {k: round(v, 4) for k, v in scores.items()} }"
            )
        # the subsample fit_kmeans would draw, taken here so only it is read into memory
        fit_rows = train[
            fit_sample_indices(
                len(train), options.fit_fraction, options.min_fit_samples, options.seed
            )
        ]
        centroids = fit_kmeans(
            np.asarray(embeddings[fit_rows]),
            k_opt,
            method,
            options.seed,
            options.n_init,
            fit_fraction=1.0,
            min_fit_samples=0,
        )
        train_assign = assign_to_centroids(embeddings, centroids, rows=train)
        k = k_opt
    sizes = np.bincount(train_assign, minlength=k)
    if (sizes == 0).any():
        raise ValueError(
            f"clustering={options.method!r} left empty cluster(s) "
            f"{np.nonzero(sizes == 0)[0].tolist()} (training sizes {sizes.tolist()}); use "
            "fewer num_clusters or more (distinct) data"
        )
    minimum = options.min_cluster_size
    if (sizes < minimum).any():
        small = {int(i): int(sizes[i]) for i in np.nonzero(sizes < minimum)[0]}
        if options.small_cluster_policy == "reject":
            raise ValueError(
                f"cluster(s) {small} (id: training samples) are smaller than "
                f"min_cluster_size={minimum} and small_cluster_policy='reject'; "
                "lower num_clusters or min_cluster_size, or use small_cluster_policy='merge'"
            )
        train_assign, centroids, _ = merge_small_clusters(
            np.asarray(embeddings[train]), train_assign, centroids, minimum
        )
        say(
            f"merged clusters {small} (smaller than min_cluster_size={minimum}); "
            f"{k} -> {centroids.shape[0]} clusters"
        )
        k = centroids.shape[0]
    assignments = np.empty(len(tasks), dtype=np.int64)
    assignments[train] = train_assign
    if len(val):
        if options.method == "per_task":  # the baseline routes by label, like training
            _, names = per_task_assignments(train_tasks)
            index = {n: i for i, n in enumerate(names)}
            val_assign = np.asarray([index.get(tasks[i], -1) for i in val], dtype=np.int64)
            unknown = val_assign < 0
            if unknown.any():
                val_assign[unknown] = assign_to_centroids(embeddings, centroids, rows=val[unknown])
        else:
            val_assign = assign_to_centroids(embeddings, centroids, rows=val)
        assignments[val] = val_assign
    return Clusters(assignments, np.asarray(centroids, dtype=np.float32), scores)
