"""k-means and its companions: the seeded fit subsample, k-means++ fits, nearest-centroid
assignment, centroids of given assignments, the per-task baseline, merging small clusters and the
silhouette search for the number of clusters.

The clustering follows the authors' script (microsoft/mttl ``get_clusters.py``): k-means++ with
``n_init=10`` and ``random_state=42``, fitted on a 20% subsample, then every sample assigned to its
nearest centroid.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

__all__ = [
    "assign_to_centroids",
    "centroids_from_assignments",
    "choose_num_clusters",
    "fit_kmeans",
    "fit_sample_indices",
    "merge_small_clusters",
    "per_task_assignments",
]


def fit_sample_indices(
    num: int, fit_fraction: float, min_fit_samples: int, seed: int
) -> np.ndarray:
    """Sorted seeded subsample of ``range(num)``, as k-means is fitted on.

    Args:
        num: Number of rows to draw from.
        fit_fraction: Fraction of the rows drawn.
        min_fit_samples: Draw at least this many rows.
        seed: Seed of the draw.

    Returns:
        ``max(ceil(fit_fraction·num), min_fit_samples)`` sorted int64 indices, or all of
        ``range(num)`` when that is ``num`` or more.
    """
    size = min(num, max(math.ceil(fit_fraction * num), min_fit_samples))
    if size >= num:
        return np.arange(num)
    return np.sort(np.random.default_rng(seed).choice(num, size, replace=False))


def fit_kmeans(
    embeddings: np.ndarray,
    num_clusters: int,
    method: Literal["kmeans", "minibatch_kmeans"] = "kmeans",
    seed: int = 42,
    n_init: int = 10,
    fit_fraction: float = 0.2,
    min_fit_samples: int = 1000,
    minibatch_size: int = 4096,
) -> np.ndarray:
    """Fit k-means++ on a seeded subsample and return the centroids.

    Args:
        embeddings: ``(N, D)`` samples.
        num_clusters: Number of clusters ``K`` (``1 <= K <= N``).
        method: ``"kmeans"`` (Lloyd, scikit-learn ``KMeans``) or ``"minibatch_kmeans"``
            (scikit-learn ``MiniBatchKMeans``, for large N).
        seed: ``random_state`` of the subsample and of k-means.
        n_init: Number of k-means++ restarts (the best inertia wins).
        fit_fraction: Fraction of the samples the centroids are fitted on (the authors: 0.2).
        min_fit_samples: Fit on at least this many samples (or all, if fewer), so small data
            sets are not clustered from a handful of points.
        minibatch_size: Batch size of ``MiniBatchKMeans``.

    Returns:
        ``(K, D)`` float32 centroids.
    """
    from sklearn.cluster import KMeans, MiniBatchKMeans

    num = embeddings.shape[0]
    if not 1 <= num_clusters <= num:
        raise ValueError(f"num_clusters={num_clusters!r} must be between 1 and N={num}")
    fit = np.asarray(embeddings[fit_sample_indices(num, fit_fraction, min_fit_samples, seed)])
    if fit.shape[0] < num_clusters:
        fit = np.asarray(embeddings)
    model: Any
    if method == "kmeans":
        model = KMeans(num_clusters, init="k-means++", n_init=n_init, random_state=seed)
    elif method == "minibatch_kmeans":
        model = MiniBatchKMeans(
            num_clusters,
            init="k-means++",
            n_init=n_init,
            random_state=seed,
            batch_size=minibatch_size,
        )
    else:
        raise ValueError(f"method={method!r}; allowed: 'kmeans', 'minibatch_kmeans'")
    model.fit(fit)
    return np.asarray(model.cluster_centers_, dtype=np.float32)


def assign_to_centroids(
    embeddings: np.ndarray,
    centroids: np.ndarray,
    chunk_size: int = 65536,
    rows: np.ndarray | None = None,
) -> np.ndarray:
    """Assign each row to its nearest centroid (Euclidean, like ``KMeans.predict``).

    Args:
        embeddings: ``(N, D)`` samples (a memory-mapped array is read chunk by chunk).
        centroids: ``(K, D)`` centroids.
        chunk_size: Rows per chunk, bounding the ``chunk × K`` distance block in memory.
        rows: Assign only these rows, in this order (default: all).

    Returns:
        ``(len(rows),)`` int64 cluster ids.
    """
    c = np.asarray(centroids, dtype=np.float32)
    if embeddings.ndim != 2 or c.ndim != 2 or embeddings.shape[1] != c.shape[1]:
        raise ValueError(
            f"embeddings {embeddings.shape} and centroids {c.shape} must be (N, D) and (K, D)"
        )
    c_sq = (c * c).sum(axis=1)
    num = embeddings.shape[0] if rows is None else len(rows)
    out = np.empty(num, dtype=np.int64)
    for start in range(0, num, chunk_size):
        block = (
            embeddings[start : start + chunk_size]
            if rows is None
            else embeddings[np.asarray(rows[start : start + chunk_size])]
        )
        x = np.asarray(block, dtype=np.float32)
        out[start : start + len(x)] = np.argmin(c_sq[None, :] - 2.0 * x @ c.T, axis=1)
    return out


def centroids_from_assignments(
    embeddings: np.ndarray, assignments: np.ndarray, num_clusters: int
) -> np.ndarray:
    """Mean embedding of every cluster.

    Args:
        embeddings: ``(N, D)`` samples.
        assignments: ``(N,)`` cluster ids in ``[0, K)``.
        num_clusters: ``K``.

    Returns:
        ``(K, D)`` float32 centroids (zero rows for empty clusters).
    """
    dim = embeddings.shape[1]
    sums = np.zeros((num_clusters, dim), dtype=np.float64)
    np.add.at(sums, assignments, np.asarray(embeddings, dtype=np.float64))
    counts = np.bincount(assignments, minlength=num_clusters).astype(np.float64)
    return (sums / np.maximum(counts, 1.0)[:, None]).astype(np.float32)


def per_task_assignments(tasks: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """The per-task baseline: one cluster per task label (sorted by name).

    Args:
        tasks: Task label of every sample.

    Returns:
        ``(assignments, task_names)`` with ``assignments[i] = task_names.index(tasks[i])``.
    """
    names = sorted(set(tasks))
    index = {name: i for i, name in enumerate(names)}
    return np.fromiter((index[t] for t in tasks), dtype=np.int64, count=len(tasks)), names


def merge_small_clusters(
    embeddings: np.ndarray,
    assignments: np.ndarray,
    centroids: np.ndarray,
    min_size: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge every cluster smaller than ``min_size`` into its nearest neighbour.

    The smallest cluster goes first; its members join the cluster whose centroid is nearest to
    its own, that cluster's centroid becomes the mean of its members, and ids are renumbered
    densely (keeping their order) at the end.

    Args:
        embeddings: ``(N, D)`` samples the sizes are counted on.
        assignments: ``(N,)`` cluster ids in ``[0, K)``.
        centroids: ``(K, D)`` centroids.
        min_size: Minimum number of samples per cluster.

    Returns:
        ``(assignments, centroids, old_to_new)``: new ids, ``(K', D)`` centroids, and the
        ``(K,)`` map from old to new ids.
    """
    k = centroids.shape[0]
    assign = assignments.copy()
    cents = np.asarray(centroids, dtype=np.float32).copy()
    alive = np.ones(k, dtype=bool)
    target = np.arange(k)
    sizes = np.bincount(assign, minlength=k)
    while alive.sum() > 1:
        candidates = np.where(alive & (sizes < min_size))[0]
        if candidates.size == 0:
            break
        small = candidates[np.argmin(sizes[candidates])]
        others = np.where(alive)[0]
        others = others[others != small]
        dist = ((cents[others] - cents[small]) ** 2).sum(axis=1)
        into = others[np.argmin(dist)]
        members = assign == small
        assign[members] = into
        target[target == small] = into
        total = sizes[into] + sizes[small]
        if total > 0:
            cents[into] = (cents[into] * sizes[into] + cents[small] * sizes[small]) / total
        sizes[into] = total
        sizes[small] = 0
        alive[small] = False
    new_id = np.cumsum(alive) - 1
    old_to_new = new_id[target]
    if sizes[alive].sum() > 0:
        cents[alive] = centroids_from_assignments(embeddings, new_id[assign], int(alive.sum()))
    return new_id[assign].astype(np.int64), cents[alive], old_to_new.astype(np.int64)


def choose_num_clusters(
    embeddings: np.ndarray,
    k_range: Sequence[int],
    method: Literal["kmeans", "minibatch_kmeans"] = "kmeans",
    seed: int = 42,
    sample_size: int = 2000,
    n_init: int = 10,
    fit_fraction: float = 0.2,
    min_fit_samples: int = 1000,
) -> tuple[int, dict[int, float]]:
    """Pick the number of clusters with the best silhouette on a seeded sample.

    Args:
        embeddings: ``(N, D)`` samples.
        k_range: Candidate numbers of clusters; values outside ``[2, N - 1]`` of the sample are
            skipped.
        method: k-means flavour (see :func:`fit_kmeans`).
        seed: Seed of the sample and of k-means.
        sample_size: Samples the silhouette is computed on (and k-means fitted on).
        n_init: k-means++ restarts per candidate.
        fit_fraction: See :func:`fit_kmeans`.
        min_fit_samples: See :func:`fit_kmeans`.

    Returns:
        ``(best_k, {k: silhouette})``.
    """
    from sklearn.metrics import silhouette_score

    num = embeddings.shape[0]
    idx = fit_sample_indices(num, 0.0, sample_size, seed)
    sample = np.asarray(embeddings[idx])
    candidates = sorted({int(k) for k in k_range if 2 <= int(k) <= sample.shape[0] - 1})
    if not candidates:
        raise ValueError(
            f"num_clusters_range={list(k_range)!r}: no candidate in [2, {sample.shape[0] - 1}] "
            "for the silhouette search"
        )
    scores: dict[int, float] = {}
    for k in candidates:
        cents = fit_kmeans(sample, k, method, seed, n_init, fit_fraction, min_fit_samples)
        labels = assign_to_centroids(sample, cents)
        if len(np.unique(labels)) < 2:
            continue
        scores[k] = float(silhouette_score(sample, labels))
    if not scores:
        raise ValueError(
            f"num_clusters_range={list(k_range)!r}: every candidate collapsed to a single cluster"
        )
    best = max(scores, key=lambda k: (scores[k], -k))
    return best, scores
